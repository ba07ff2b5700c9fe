"""The ``<name>_postprocessing`` model: detokenizes each engine response without keeping state.

The engine sends each response as one packed int32 tensor (``packed.py``) holding, with each delta,
the few tokens before it; decoding ``prefix + delta`` and ``prefix`` and keeping the difference preserves
spaces and multi-byte characters that decoding the delta alone would break. This model builds the
ensemble's outputs from it, shaped as tensorrtllm_backend's: ``text_output`` one string per response
([1]), the others [1, 1] (``output_log_probs`` [1, 1, T]); ``batch_index``, ``sequence_index`` and the
perf-metric outputs only when the request calls for them (several prompts, several sequences,
``return_perf_metrics``); and tritonize's own: the text of each token the log-probs belong to, and on the
final response why the answer ended (``finish_reason``). Statelessness lets Triton run any number of
instances and interleave responses of many streams freely, and the work done here is work the engine's
process does not do.

When a client cancels its stream on the ensemble, Triton 2.51 keeps the engine's request running and
hands each later response to this step marked cancelled. The step then asks the engine to ``stop``
that request (once per request), so its slot and KV cache are freed within a poll interval. Asking whether
a request was cancelled is a round trip to the server: a stream is asked at most once per ``CANCEL_CHECK_S``,
counted from its first response (which carries the first token and waits for no question), not on each of its
responses (64 streams make thousands a second). This needs Triton's
default scheduler here: its dynamic batcher drops the steps of a cancelled request unseen.
"""

import os
import sys
import time
from collections import OrderedDict

import numpy as np
import triton_python_backend_utils as pb_utils

if __name__.startswith("tritonize."):  # imported from the tritonize package (tests, the Python API)
    from ..packed import METRICS, unpack
    from ..tokenizer import Tokenizer, detokenize_delta, token_texts
    from ..triton_args import model_args
else:  # a repository's model.py, which Triton imports as "<version>.model": the runtime package is beside it
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tritonize_backend.packed import METRICS, unpack
    from tritonize_backend.tokenizer import Tokenizer, detokenize_delta, token_texts
    from tritonize_backend.triton_args import model_args

# The perf outputs that come from the engine's metrics (packed.METRICS), with their Triton dtypes; the
# speculative-decoding ones are 0: the engine drafts no tokens.
PERF_FIELDS = [(name, np.int64 if name.endswith("_ns") else np.int32) for name in METRICS
               if name.startswith(("kv_cache_", "arrival_", "first_", "last_"))]
DRAFT_FIELDS = [("acceptance_rate", np.float32), ("total_accepted_draft_tokens", np.int32),
                ("total_draft_tokens", np.int32)]
CANCEL_CHECK_S = 0.05  # as the engine model polls its own requests
STOPPED_MEMORY = 1024  # keys already stopped: later responses of the same request send no second stop
EMPTY_WORDS = np.array([[[0], [-1]]], dtype=np.int32)


class TritonPythonModel:
    def initialize(self, args):
        _, params, here = model_args(args)
        self.tokenizer = Tokenizer(os.path.join(here, params["tokenizer_dir"]))
        self.engine_name = params["engine_name"]
        self.stopped = OrderedDict()
        self.checked = OrderedDict()  # stream key -> when it was last asked whether its client cancelled

    def execute(self, requests):
        responses = []
        for request in requests:
            p = unpack(pb_utils.get_input_tensor_by_name(request, "packed").as_numpy())
            if self._due(request, p) and request.is_cancelled():
                # Answered as usual below: an error response here would leave the ensemble request
                # counted in flight for good, which holds up the server's exit by --exit-timeout-secs.
                self._stop_engine_request(request, p.handle)
            text = detokenize_delta(self.tokenizer, p.prefix, p.delta, p.final)
            reason = (p.finish_reason or "") if p.final else ""
            tokens = []
            if p.log_probs:  # the text of each token whose log-prob this response carries (the last ones)
                n = len(p.log_probs)
                tokens = token_texts(self.tokenizer, p.prefix + p.delta[:-n], p.delta[-n:], p.final)
            outputs = [
                pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
                pb_utils.Tensor("cum_log_probs", np.array([[p.cum_log_prob]], dtype=np.float32)),
                pb_utils.Tensor("output_log_probs", np.array(p.log_probs, dtype=np.float32).reshape(1, 1, -1)),
                pb_utils.Tensor("num_input_tokens", np.array([[p.num_input_tokens]], dtype=np.int32)),
                pb_utils.Tensor("num_output_tokens", np.array([[p.num_output_tokens]], dtype=np.int32)),
                pb_utils.Tensor("finish_reason", np.array([[reason.encode()]], dtype=np.object_)),
                pb_utils.Tensor("output_tokens", np.array([[t.encode("utf-8") for t in tokens]],
                                                          dtype=np.object_).reshape(1, len(tokens))),
            ]
            if p.batched:
                outputs.append(pb_utils.Tensor("batch_index", np.array([[p.batch_index]], dtype=np.int32)))
            if p.sequences:
                outputs.append(pb_utils.Tensor("sequence_index", np.array([[p.sequence_index]], dtype=np.int32)))
            if p.perf:
                metrics = p.metrics or {}
                outputs += [pb_utils.Tensor(name, np.array([[metrics.get(name, 0)]], dtype=dtype))
                            for name, dtype in PERF_FIELDS]
                outputs += [pb_utils.Tensor(name, np.zeros((1, 1), dtype=dtype)) for name, dtype in DRAFT_FIELDS]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses

    def _due(self, request, p):
        """Whether to ask if this response's stream was cancelled now: once per CANCEL_CHECK_S after its first
        response; never on the first (the time to the first token pays for no round trip) nor the final one (the
        engine is done with it)."""
        key = (request.request_id(), p.handle)
        if p.final:
            self.checked.pop(key, None)
            return False
        now = time.monotonic()
        last = self.checked.get(key)
        if last is not None and now - last < CANCEL_CHECK_S:
            return False
        self.checked[key] = now
        self.checked.move_to_end(key)
        while len(self.checked) > STOPPED_MEMORY:  # streams whose final response went to another instance
            self.checked.popitem(last=False)
        return last is not None

    def _stop_engine_request(self, request, handle):
        """Sends the engine a ``stop`` for the stream (the engine's handle) this response came from."""
        key = f"{request.request_id()}/{handle}"
        if key in self.stopped:
            return
        self.stopped[key] = None
        if len(self.stopped) > STOPPED_MEMORY:
            self.stopped.popitem(last=False)
        one = np.array([[1]], dtype=np.int32)
        stop = pb_utils.InferenceRequest(
            model_name=self.engine_name,
            request_id=key,
            inputs=[
                pb_utils.Tensor("input_ids", one),
                pb_utils.Tensor("input_lengths", one),
                pb_utils.Tensor("request_output_len", one),
                pb_utils.Tensor("end_ids", one),
                pb_utils.Tensor("pad_id", one),
                pb_utils.Tensor("stop_words_list", EMPTY_WORDS),
                pb_utils.Tensor("bad_words_list", EMPTY_WORDS),
                pb_utils.Tensor("stop", np.array([[True]], dtype=np.bool_)),
            ],
            requested_output_names=[],
        )
        for response in stop.exec(decoupled=True):
            if response.has_error():
                pb_utils.Logger.log_warn(f"tritonize: cannot stop {key}: {response.error().message()}")
