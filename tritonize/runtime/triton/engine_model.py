"""The ``<name>_engine`` model: runs the repository's runtime with in-flight batching, decoupled.

``execute`` only queues requests: the runtime's scheduler thread batches every running request
into each decode step and answers through each request's response sender, so requests that arrive
while others are generating join the running batch instead of waiting for it to drain.
With ``stream`` false exactly one response is sent (carrying the final flag), which is what
Triton's /generate endpoint and the non-decoupled ``<name>_sync`` model need.

Each response is one int32 tensor (``packed.py``): every tensor a response carries costs this process
time holding the GIL, which the engine's own thread needs, while the postprocessing models unpack and
build the ensemble's outputs in processes of their own. When the engine produces tokens faster than
responses leave, the tokens of one stream that wait are sent in one response.

A client that cancels its stream on the engine is seen through ``is_cancelled``. Triton 2.51 does
not mark the engine's request cancelled when the client cancels the ensemble instead; there the
postprocessing step sees the cancellation and sends a ``stop`` request (tensorrtllm_backend's
input: cancel the request with this request id) naming the stream by the handle each response carries.
"""

import dataclasses
import itertools
import os
import queue
import sys
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

if __name__.startswith("tritonize."):  # imported from the tritonize package (tests, the Python API)
    from ..grammar import GuideError, make_guide
    from ..packed import Packed, pack
    from ..request import GenerationRequest, SamplingParams
    from ..runtime import create_engine, resolve_runtime
    from ..tokenizer import response_ids
    from ..triton_args import model_args
else:  # a repository's model.py, which Triton imports as "<version>.model": the runtime package is beside it
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tritonize_backend.grammar import GuideError, make_guide
    from tritonize_backend.packed import Packed, pack
    from tritonize_backend.request import GenerationRequest, SamplingParams
    from tritonize_backend.runtime import create_engine, resolve_runtime
    from tritonize_backend.tokenizer import response_ids
    from tritonize_backend.triton_args import model_args

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_POLL_S = 0.05
# Two threads share this process's GIL: the engine's, which must launch each step on time, and the one
# that sends responses. Python's default switch interval (5 ms) can keep the engine waiting most of a step.
GIL_SWITCH_INTERVAL_S = 0.0005
_STOP = object()


def _scalar(request, name, cast, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    return cast(tensor.as_numpy().reshape(-1)[0])


def _ids(request, name):
    return pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1).astype(np.int64).tolist()


def _words_list(request, name):
    """Undoes the [2, N] layout of tensorrtllm_backend: ids, then each sequence's end offset."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return []
    flat, offsets = tensor.as_numpy().reshape(2, -1).tolist()
    sequences, start = [], 0
    for end in offsets:
        if end < 0:
            break
        sequences.append(flat[start:end])
        start = end
    return [s for s in sequences if s]


def _bytes(value):
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def _int_or_none(text):
    return int(text) if text and text.isdigit() else None


class _Stream:
    """What the response path needs to know about one request."""

    def __init__(self, sender, prompt, stream, exclude_input, handle):
        self.sender = sender
        self.prompt = prompt
        self.stream = stream
        self.exclude_input = exclude_input
        self.handle = handle
        self.generated = []
        self.log_probs = []


class TritonPythonModel:
    def initialize(self, args):
        _, params, here = model_args(args)
        device = params["device"]
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        self.max_input_len = int(params["max_input_len"])
        self.max_output_len = int(params["max_output_len"])
        self.vocab_size = int(params["vocab_size"])
        # Only a repository with adapters passes the folder, so runtimes without adapter support still load.
        adapters = {"adapters_dir": os.path.join(here, params["adapters_dir"])} if params.get("adapters_dir") else {}
        requested = params.get("runtime", "torch")
        self.runtime = resolve_runtime(requested)
        pb_utils.Logger.log_info(f"tritonize: runtime {self.runtime} (asked for {requested})")
        fraction = params.get("kv_cache_free_gpu_memory_fraction", "")
        self.engine = create_engine(
            self.runtime,
            os.path.join(here, params["weights_dir"]),
            device=device,
            dtype=params["dtype"],
            max_batch_size=int(params["max_batch_size"]),
            max_seq_len=self.max_input_len + self.max_output_len,
            max_num_tokens=int(params["max_num_tokens"]),
            max_prompt_embedding_table_size=int(params.get("max_prompt_embedding_table_size") or 0),
            kv_cache_tokens=int(params.get("kv_cache_tokens") or 0) or None,
            kv_cache_free_gpu_memory_fraction=float(fraction) if fraction else None,
            prefix_cache=params.get("prefix_cache", "true") != "false",
            **adapters,
            trtllm_options={
                "kv_cache_dtype": params.get("kv_cache_dtype", "auto") or "auto",
                "tensor_parallel_size": int(params.get("tensor_parallel_size", "1") or 1),
                "pipeline_parallel_size": int(params.get("pipeline_parallel_size", "1") or 1),
                # trtllm-engine only: the built engine and how its ranks are launched
                "engine_dir": os.path.join(here, params.get("engine_dir") or "engine"),
                "multi_gpu_mode": params.get("multi_gpu_mode") or "leader",
            },
        )
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.engine.start()
        self.streams = {}
        self.handles = {}  # handle -> engine key, for stop requests that name a stream by its handle
        self.next_handle = itertools.count(1)
        self.lock = threading.Lock()
        self.batch_metric = pb_utils.MetricFamily(
            name="tritonize_decode_steps_total",
            description="decode steps of the engine, by the number of requests in the batch",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.batch_counters = {}
        self.published = {}
        # Every call into the stub (send, is_cancelled, metrics) happens on this one thread: the stub is
        # not safe to call from several threads at once, and the engine thread must not wait on it.
        self.outbox = queue.SimpleQueue()
        self.sender = threading.Thread(target=self._send_loop, name="tritonize-send", daemon=True)
        self.sender.start()

    # -- requests in ----------------------------------------------------------------------------
    def execute(self, requests):
        for request in requests:
            try:
                if _scalar(request, "stop", bool, False):
                    self._stop(request)
                    continue
                self._submit(request)
            except ValueError as e:
                self.outbox.put((request.get_response_sender(), str(e)))
        return None

    def _stop(self, request):
        """Cancels the requests whose request id, or engine key ``<request id>/<handle>``, is this request's id."""
        target = request.request_id()
        if not target:
            raise ValueError("stop was sent without a request id: set request_id to the id of the request to stop")
        handle = _int_or_none(target.rpartition("/")[2])
        with self.lock:
            keys = [key for key in self.streams if key == target or key.startswith(f"{target}/")]
            if not keys and handle in self.handles:  # postprocessing may not see the client's request id
                keys = [self.handles[handle]]
        for key in keys:
            self.engine.cancel(key)
        self.outbox.put((request.get_response_sender(), None))

    def _submit(self, request):
        sender = request.get_response_sender()
        prompt = _ids(request, "input_ids")
        max_new = _scalar(request, "request_output_len", int)
        beam_width = _scalar(request, "beam_width", int, 1)
        if beam_width != 1:
            raise ValueError(
                f"beam_width {beam_width} is not supported by the {self.runtime} runtime: use beam_width 1"
            )
        table = pb_utils.get_input_tensor_by_name(request, "prompt_embedding_table")
        if table is not None:  # [1, n, hidden]: this request's own virtual-token embeddings
            table = table.as_numpy()
            table = table.reshape(table.shape[-2:]) if table.ndim >= 2 else table
        seed = _scalar(request, "seed", int, _scalar(request, "random_seed", int))
        min_tokens = _scalar(request, "min_tokens", int, _scalar(request, "min_length", int, 0))
        sampling = SamplingParams(
            temperature=_scalar(request, "temperature", float),
            top_k=_scalar(request, "top_k", int),
            top_p=_scalar(request, "top_p", float),
            seed=seed,
            repetition_penalty=_scalar(request, "repetition_penalty", float, 1.0),
            presence_penalty=_scalar(request, "presence_penalty", float, 0.0),
            frequency_penalty=_scalar(request, "frequency_penalty", float, 0.0),
            min_tokens=min_tokens,
        )
        try:
            guide = make_guide(_scalar(request, "guided_decoding_guide_type", _bytes),
                               _scalar(request, "guided_decoding_guide", _bytes))
        except GuideError as e:
            raise ValueError(str(e)) from None
        stream = _scalar(request, "stream", bool, False)
        exclude = _scalar(request, "exclude_input_in_output", bool, False)
        handle = next(self.next_handle)
        key = f"{request.request_id()}/{handle}"
        # Virtual tokens of a p-tuning task have no text: the echoed prompt leaves them out.
        state = _Stream(sender, [t for t in prompt if t < self.vocab_size], stream, exclude, handle)
        with self.lock:
            self.streams[key] = state
            self.handles[handle] = key
        self.engine.submit(
            GenerationRequest(
                request_id=key,
                prompt_ids=prompt,
                max_new_tokens=max_new,
                sampling=sampling,
                end_ids=[i for i in _ids(request, "end_ids") if i >= 0],
                stop_sequences=_words_list(request, "stop_words_list"),
                bad_sequences=_words_list(request, "bad_words_list"),
                return_log_probs=_scalar(request, "return_log_probs", bool, False),
                stream=stream,
                on_output=lambda out, key=key: self.outbox.put((key, out)),
                lora_task_id=_scalar(request, "lora_task_id", int),
                task_id=_scalar(request, "task_id", int),
                prompt_table=table,
                guide=guide,
            )
        )

    # -- responses out --------------------------------------------------------------------------
    def _send_loop(self):
        """Sends what the engine produced, merging a stream's pending tokens into one response.

        When responses are produced faster than the stub sends them (many streams at once), the
        tokens of one stream that are waiting are sent together: throughput then follows the GPU,
        not the per-response cost, and the text is the same.
        """
        last_poll = time.monotonic()
        while True:
            try:
                items = [self.outbox.get(timeout=CANCEL_POLL_S)]
            except queue.Empty:
                items = []
            while True:
                try:
                    items.append(self.outbox.get_nowait())
                except queue.Empty:
                    break
            pending = {}
            for item in items:
                if item is _STOP:
                    return
                key, out = item
                if not isinstance(key, str):  # answered in execute: (sender, error message or None)
                    if out is None:
                        key.send(flags=FINAL)
                    else:
                        key.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(out)), flags=FINAL)
                    continue
                before = pending.get(key)
                if before is not None:
                    out = dataclasses.replace(
                        out,
                        token_ids=list(before.token_ids) + list(out.token_ids),
                        log_probs=list(before.log_probs or []) + list(out.log_probs or []),
                    )
                pending[key] = out
            for key, out in pending.items():
                try:
                    self._respond(key, out)
                except Exception as e:  # noqa: BLE001 - one broken stream must not stop the others
                    pb_utils.Logger.log_error(f"tritonize: cannot send a response: {e}")
            if time.monotonic() - last_poll >= CANCEL_POLL_S:
                last_poll = time.monotonic()
                self._poll_cancelled()

    def _poll_cancelled(self):
        """A client that cancelled or went away frees its slot and KV cache at once."""
        with self.lock:
            streams = list(self.streams.items())
        for key, state in streams:
            if state.sender.is_cancelled():
                self.engine.cancel(key)

    def _respond(self, key, out):
        with self.lock:
            state = self.streams.get(key)
            if state is not None and out.finished:
                del self.streams[key]
                self.handles.pop(state.handle, None)
        if state is None:
            return
        if out.error is not None:
            state.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(out.error)), flags=FINAL)
            return
        if out.finished:
            self._publish_batch_sizes()
        if out.finish_reason == "cancelled":
            state.sender.send(flags=FINAL)
            return
        state.generated.extend(out.token_ids)
        state.log_probs.extend(out.log_probs or [])
        delta, prefix = response_ids(state.prompt, state.generated, list(out.token_ids), stream=state.stream,
                                     exclude_input=state.exclude_input)
        log_probs = list(out.log_probs or []) if state.stream else state.log_probs
        metrics = dataclasses.asdict(out.metrics) if out.metrics is not None else None
        packed = pack(Packed(
            delta=delta, prefix=prefix, log_probs=log_probs, final=out.finished, finish_reason=out.finish_reason,
            num_input_tokens=out.num_input_tokens, num_output_tokens=out.num_output_tokens,
            cum_log_prob=out.cum_log_prob or 0.0, handle=state.handle, metrics=metrics,
        ))
        tensors = [pb_utils.Tensor("packed", packed)]
        state.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if out.finished else 0)

    # -- metrics --------------------------------------------------------------------------------
    def _publish_batch_sizes(self):
        """Mirrors the engine's batch-size histogram into Triton's metrics endpoint.

        Called from the engine thread only: the Python backend's stub is not safe to call from
        several threads at once, and the engine thread is the one that sends responses.
        """
        for size, count in list(self.engine.stats.get("decode_batch_histogram", {}).items()):
            new = count - self.published.get(size, 0)
            if new > 0:
                counter = self.batch_counters.get(size)
                if counter is None:
                    counter = self.batch_metric.Metric(labels={"batch_size": str(size)})
                    self.batch_counters[size] = counter
                counter.increment(new)
                self.published[size] = count

    def finalize(self):
        self.engine.shutdown()
        self.outbox.put(_STOP)
        self.sender.join(timeout=10)
        with self.lock:
            streams, self.streams = self.streams, {}
            self.handles.clear()
        for state in streams.values():
            state.sender.send(
                pb_utils.InferenceResponse(error=pb_utils.TritonError("the model is shutting down")), flags=FINAL
            )
