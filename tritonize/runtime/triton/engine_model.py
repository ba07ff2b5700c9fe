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

A request may hold N prompts ([N, ...] inputs, tensorrtllm_backend's batched requests) and ask for
``num_return_sequences`` n of each: it becomes N x n engine requests that share its response sender,
each response says which prompt and sequence it belongs to (``batch_index``, ``sequence_index``), and
the final flag goes with the last of them. Sequence s > 0 of a seeded prompt draws with a seed derived
from the prompt's (``sampling.sequence_seed``), so the n sequences are independent and reproducible.

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
    from ..engine_process import EngineProcess, wants_engine_process
    from ..grammar import GuideError, make_guide
    from ..metrics import EngineMetrics
    from ..packed import Packed, pack
    from ..request import GenerationRequest, SamplingParams
    from ..runtime import create_engine, resolve_runtime
    from ..sampling import sequence_seed
    from ..stages import StageLog
    from ..tokenizer import response_ids
    from ..triton_args import model_args
    from ..warm import use_warm_artifacts
else:  # a repository's model.py, which Triton imports as "<version>.model": the runtime package is beside it
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tritonize_backend.engine_process import EngineProcess, wants_engine_process
    from tritonize_backend.grammar import GuideError, make_guide
    from tritonize_backend.metrics import EngineMetrics
    from tritonize_backend.packed import Packed, pack
    from tritonize_backend.request import GenerationRequest, SamplingParams
    from tritonize_backend.runtime import create_engine, resolve_runtime
    from tritonize_backend.sampling import sequence_seed
    from tritonize_backend.stages import StageLog
    from tritonize_backend.tokenizer import response_ids
    from tritonize_backend.triton_args import model_args
    from tritonize_backend.warm import use_warm_artifacts

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_POLL_S = 0.05
CANCEL_POLL_MAX = 64  # requests asked whether they were cancelled, per poll interval
# Two threads share this process's GIL: the engine's, which must launch each step on time, and the one
# that sends responses. Python's default switch interval (5 ms) can keep the engine waiting most of a step.
GIL_SWITCH_INTERVAL_S = 0.0005
_STOP = object()


def _scalar(request, name, cast, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    return cast(tensor.as_numpy().reshape(-1)[0])


class _Inputs:
    """A request's inputs by name, read row by row: row i belongs to the request's i-th prompt."""

    def __init__(self, request, names):
        self.arrays = {}
        for name in names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                self.arrays[name] = tensor.as_numpy()
        ids = self.arrays["input_ids"]
        self.rows = ids.shape[0] if ids.ndim > 1 else 1

    def row(self, name, i):
        """Row i of an input (the whole input when it has no batch dimension), or None when it is absent."""
        array = self.arrays.get(name)
        if array is None:
            return None
        if array.ndim == 0 or array.shape[0] != self.rows or (self.rows == 1 and array.ndim == 1):
            return array
        return array[i]

    def scalar(self, name, i, cast, default=None):
        value = self.row(name, i)
        return default if value is None else cast(np.asarray(value).reshape(-1)[0])


def _words_list(array):
    """Undoes the [2, N] layout of tensorrtllm_backend: ids, then each sequence's end offset."""
    if array is None:
        return []
    flat, offsets = np.asarray(array).reshape(2, -1).tolist()
    sequences, start = [], 0
    for end in offsets:
        if end < 0:
            break
        sequences.append(flat[start:end])
        start = end
    return [s for s in sequences if s]


def _bytes(value):
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def _error(message, invalid):
    """A Triton error: INVALID_ARG for what the request asked (HTTP 400), INTERNAL otherwise."""
    return pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG if invalid else pb_utils.TritonError.INTERNAL)


def _int_or_none(text):
    return int(text) if text and text.isdigit() else None


class _Group:
    """The engine requests one Triton request became (N prompts x n sequences), sharing its sender."""

    def __init__(self, sender, size):
        self.sender = sender
        self.open = size  # engine requests not finished yet: the final flag goes with the last one
        self.failed = False


class _Stream:
    """What the response path needs to know about one engine request."""

    def __init__(self, group, prompt, stream, exclude_input, handle, batch_index=0, sequence_index=0,
                 batched=False, sequences=False, perf=False):
        self.group = group
        self.sender = group.sender
        self.prompt = prompt
        self.stream = stream
        self.exclude_input = exclude_input
        self.handle = handle
        self.batch_index = batch_index
        self.sequence_index = sequence_index
        self.batched = batched
        self.sequences = sequences
        self.perf = perf
        self.generated = []
        self.log_probs = []


# The inputs the engine reads; the rest of ENGINE_INPUTS are read through _scalar (stop) or not at all.
_READ = ("input_ids", "input_lengths", "request_output_len", "end_ids", "stop_words_list", "bad_words_list",
         "prompt_embedding_table", "beam_width", "seed", "random_seed", "min_tokens", "min_length",
         "temperature", "top_k", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
         "stream", "exclude_input_in_output", "return_log_probs", "lora_task_id", "task_id",
         "num_return_sequences", "return_perf_metrics", "guided_decoding_guide_type", "guided_decoding_guide")


class TritonPythonModel:
    def initialize(self, args):
        _, params, here = model_args(args)
        stages = StageLog(pb_utils.Logger, args)  # the start's stages, in Triton's log (stages.py)
        device = params["device"]
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        self.max_input_len = int(params["max_input_len"])
        self.max_output_len = int(params["max_output_len"])
        self.vocab_size = int(params["vocab_size"])
        self.max_batch_size = int(params["max_batch_size"])
        # Only a repository with adapters passes the folder, so runtimes without adapter support still load.
        adapters = {"adapters_dir": os.path.join(here, params["adapters_dir"])} if params.get("adapters_dir") else {}
        requested = params.get("runtime", "torch")
        self.runtime = resolve_runtime(requested)
        stages.info(f"runtime {self.runtime} (asked for {requested})")
        if self.runtime == "torch":
            stages.info(use_warm_artifacts(here, device))
        fraction = params.get("kv_cache_free_gpu_memory_fraction", "")
        # TRITONIZE_ENGINE_PROCESS=1: the engine in a process of its own, so that sending responses here never
        # holds the GIL its thread needs (engine_process.py)
        make_engine = EngineProcess if wants_engine_process() else create_engine
        self.engine = make_engine(
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
        ranks = getattr(self.engine, "tp", None)
        if ranks is not None:
            stages.info(ranks.describe())
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.engine.start()
        stages.warm_up(self.engine)  # Triton reports the model ready once this returns
        self.streams = {}
        self.handles = {}  # handle -> engine key, for stop requests that name a stream by its handle
        self.next_handle = itertools.count(1)
        self.poll_turn = 0  # where the next cancellation poll starts among the open requests
        self.lock = threading.Lock()
        self.metrics = EngineMetrics(pb_utils, args, self.engine)  # metrics.py; updated on the sender thread only
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
                self.outbox.put((request.get_response_sender(), (str(e), True)))
            except Exception as e:  # noqa: BLE001 - every request gets an answer, a broken one included
                pb_utils.Logger.log_error(f"tritonize: cannot take a request: {e!r}")
                self.outbox.put((request.get_response_sender(), (f"the engine could not take the request: {e!r}", False)))
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
        """Checks every prompt of the request, then submits its N x n engine requests."""
        inputs = _Inputs(request, _READ)
        plans = [self._plan(inputs, i) for i in range(inputs.rows)]
        group = _Group(request.get_response_sender(), sum(len(p[1]) for p in plans))
        batched = inputs.rows > 1
        for i, (base, samplings, state) in enumerate(plans):
            for s, sampling in enumerate(samplings):
                handle = next(self.next_handle)
                key = f"{request.request_id()}/{handle}"
                stream = _Stream(group, state["prompt"], state["stream"], state["exclude"], handle, batch_index=i,
                                 sequence_index=s, batched=batched, sequences=len(samplings) > 1,
                                 perf=state["perf"])
                with self.lock:
                    self.streams[key] = stream
                    self.handles[handle] = key
                self.engine.submit(dataclasses.replace(
                    base, request_id=key, sampling=sampling, prompt_ids=list(base.prompt_ids),
                    on_output=lambda out, key=key: self.outbox.put((key, out))))

    def _plan(self, inputs, i):
        """Prompt i of a request: its engine request (without id), one sampling per sequence, what responses need."""
        length = inputs.scalar("input_lengths", i, int)
        ids = np.asarray(inputs.row("input_ids", i)).reshape(-1)
        prompt = ids[:length].astype(np.int64).tolist() if length is not None else ids.astype(np.int64).tolist()
        max_new = inputs.scalar("request_output_len", i, int)
        beam_width = inputs.scalar("beam_width", i, int, 1)
        if beam_width != 1:
            raise ValueError(
                f"beam_width {beam_width} is not supported by the {self.runtime} runtime: use beam_width 1"
            )
        n = inputs.scalar("num_return_sequences", i, int, 1)
        if n < 1 or n > self.max_batch_size:
            raise ValueError(f"num_return_sequences is {n}: ask for 1 to {self.max_batch_size} (this model's "
                             "max batch size) sequences")
        table = inputs.row("prompt_embedding_table", i)
        if table is not None:  # [n, hidden] of this prompt: its own virtual-token embeddings
            table = np.asarray(table)
            table = table.reshape(table.shape[-2:]) if table.ndim >= 2 else table
        seed = inputs.scalar("seed", i, int, inputs.scalar("random_seed", i, int))
        sampling = SamplingParams(
            temperature=inputs.scalar("temperature", i, float),
            top_k=inputs.scalar("top_k", i, int),
            top_p=inputs.scalar("top_p", i, float),
            seed=seed,
            repetition_penalty=inputs.scalar("repetition_penalty", i, float, 1.0),
            presence_penalty=inputs.scalar("presence_penalty", i, float, 0.0),
            frequency_penalty=inputs.scalar("frequency_penalty", i, float, 0.0),
            min_tokens=inputs.scalar("min_tokens", i, int, inputs.scalar("min_length", i, int, 0)),
        )
        try:
            guide = make_guide(inputs.scalar("guided_decoding_guide_type", i, _bytes),
                               inputs.scalar("guided_decoding_guide", i, _bytes))
        except GuideError as e:
            raise ValueError(str(e)) from None
        stream = inputs.scalar("stream", i, bool, False)
        perf = inputs.scalar("return_perf_metrics", i, bool, False)
        base = GenerationRequest(
            request_id="",
            prompt_ids=prompt,
            max_new_tokens=max_new,
            sampling=sampling,
            end_ids=[int(x) for x in np.asarray(inputs.row("end_ids", i)).reshape(-1) if x >= 0],
            stop_sequences=_words_list(inputs.row("stop_words_list", i)),
            bad_sequences=_words_list(inputs.row("bad_words_list", i)),
            return_log_probs=inputs.scalar("return_log_probs", i, bool, False),
            stream=stream,
            lora_task_id=inputs.scalar("lora_task_id", i, int),
            task_id=inputs.scalar("task_id", i, int),
            prompt_table=table,
            return_perf_metrics=perf,
            guide=guide,
        )
        samplings = [dataclasses.replace(sampling, seed=sequence_seed(seed, s)) for s in range(n)]
        # Virtual tokens of a p-tuning task have no text: the echoed prompt leaves them out.
        state = {"prompt": [t for t in prompt if t < self.vocab_size], "stream": stream,
                 "exclude": inputs.scalar("exclude_input_in_output", i, bool, False), "perf": perf}
        return base, samplings, state

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
                if not isinstance(key, str):  # answered in execute: (sender, None or (message, the client's fault))
                    if out is None:
                        key.send(flags=FINAL)
                    else:
                        key.send(pb_utils.InferenceResponse(error=_error(*out)), flags=FINAL)
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
            self._update_metrics(pending.values(), periodic=time.monotonic() - last_poll >= CANCEL_POLL_S)
            if time.monotonic() - last_poll >= CANCEL_POLL_S:
                last_poll = time.monotonic()
                self._poll_cancelled()

    def _poll_cancelled(self):
        """A client that cancelled or went away frees its slots and KV cache within a few poll intervals.

        ``is_cancelled`` is an IPC round trip: each interval asks at most ``CANCEL_POLL_MAX`` requests, taking
        turns, so that with many streams the asking does not crowd out the sending.
        """
        with self.lock:
            groups = {}
            for key, state in self.streams.items():
                groups.setdefault(state.group, []).append(key)
        if not groups:
            return
        order = list(groups)
        start = self.poll_turn % len(order)
        turn = (order[start:] + order[:start])[:CANCEL_POLL_MAX]
        self.poll_turn = start + len(turn)
        for group in turn:
            if group.sender.is_cancelled():
                for key in groups[group]:
                    self.engine.cancel(key)

    def _respond(self, key, out):
        with self.lock:
            state = self.streams.get(key)
            if state is None:
                return
            group = state.group
            if out.finished:
                del self.streams[key]
                self.handles.pop(state.handle, None)
                group.open -= 1
            last = group.open == 0
            first_error, siblings = False, []
            if out.error is not None and not group.failed:
                group.failed = first_error = True
                siblings = [k for k, other in self.streams.items() if other.group is group]
        if out.error is not None:
            # One error answers the whole request (final); its other prompts and sequences are stopped.
            if first_error:
                state.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(out.error)), flags=FINAL)
                for other in siblings:
                    self.engine.cancel(other)
            return
        if group.failed:  # answered with an error already
            return
        if out.finish_reason == "cancelled":
            if last:
                state.sender.send(flags=FINAL)
            return
        state.generated.extend(out.token_ids)
        state.log_probs.extend(out.log_probs or [])
        delta, prefix = response_ids(state.prompt, state.generated, list(out.token_ids), stream=state.stream,
                                     exclude_input=state.exclude_input)
        log_probs = list(out.log_probs or []) if state.stream else state.log_probs
        metrics = dataclasses.asdict(out.metrics) if out.metrics is not None else None
        if state.perf and metrics is None:
            metrics = {}  # a runtime that does not measure them: the outputs are sent, as 0
        packed = pack(Packed(
            delta=delta, prefix=prefix, log_probs=log_probs, final=out.finished, finish_reason=out.finish_reason,
            num_input_tokens=out.num_input_tokens, num_output_tokens=out.num_output_tokens,
            cum_log_prob=out.cum_log_prob or 0.0, handle=state.handle, metrics=metrics,
            batch_index=state.batch_index, sequence_index=state.sequence_index, batched=state.batched,
            sequences=state.sequences, perf=state.perf,
        ))
        tensors = [pb_utils.Tensor("packed", packed)]
        state.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if last else 0)

    # -- metrics --------------------------------------------------------------------------------
    def _update_metrics(self, outputs, periodic):
        """Counts what was just sent and, every poll interval, reads the engine's gauges (metrics.py).

        Called from the sender thread only: the Python backend's stub is not safe to call from several
        threads at once, and the engine thread must not wait on it.
        """
        try:
            for out in outputs:
                self.metrics.record(out)
            self.metrics.flush()
            if periodic:
                self.metrics.refresh()
        except Exception as e:  # noqa: BLE001 - metrics must never stop the responses
            pb_utils.Logger.log_error(f"tritonize: cannot update the metrics: {e}")

    def finalize(self):
        self.engine.shutdown()
        self.outbox.put(_STOP)
        self.sender.join(timeout=10)
        with self.lock:
            streams, self.streams = self.streams, {}
            self.handles.clear()
        for group in {state.group for state in streams.values()}:
            group.sender.send(
                pb_utils.InferenceResponse(error=pb_utils.TritonError("the model is shutting down")), flags=FINAL
            )
