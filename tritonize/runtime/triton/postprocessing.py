"""The ``<name>_postprocessing`` model: detokenizes each engine response without keeping state.

The engine sends, with each delta, the few tokens before it (``prefix_ids``); decoding
``prefix + delta`` and ``prefix`` and keeping the difference preserves spaces and multi-byte
characters that decoding the delta alone would break. Statelessness lets Triton run any number of
instances and interleave responses of many streams freely.

When a client cancels its stream on the ensemble, Triton 2.51 keeps the engine's request running and
hands each later response to this step marked cancelled. The step then asks the engine to ``stop``
that request (once per request), so its slot and KV cache are freed at once. This needs Triton's
default scheduler here: its dynamic batcher drops the steps of a cancelled request unseen.
"""

import os
import sys
from collections import OrderedDict

import numpy as np
import triton_python_backend_utils as pb_utils

if __name__.startswith("tritonize."):  # imported from the tritonize package (tests, the Python API)
    from ..tokenizer import Tokenizer, detokenize_delta
    from ..triton_args import model_args
else:  # a repository's model.py, which Triton imports as "<version>.model": the runtime package is beside it
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tritonize_backend.tokenizer import Tokenizer, detokenize_delta
    from tritonize_backend.triton_args import model_args

PASS_THROUGH = ("cum_log_probs", "output_log_probs", "num_input_tokens", "num_output_tokens")
STOPPED_MEMORY = 1024  # keys already stopped: later responses of the same request send no second stop
EMPTY_WORDS = np.array([[[0], [-1]]], dtype=np.int32)


class TritonPythonModel:
    def initialize(self, args):
        _, params, here = model_args(args)
        self.tokenizer = Tokenizer(os.path.join(here, params["tokenizer_dir"]))
        self.engine_name = params["engine_name"]
        self.stopped = OrderedDict()

    def execute(self, requests):
        responses = []
        for request in requests:
            if request.is_cancelled():
                # Answered as usual below: an error response here would leave the ensemble request
                # counted in flight for good, which holds up the server's exit by --exit-timeout-secs.
                self._stop_engine_request(request)
            delta = pb_utils.get_input_tensor_by_name(request, "output_ids").as_numpy().reshape(-1)
            prefix = pb_utils.get_input_tensor_by_name(request, "prefix_ids").as_numpy().reshape(-1)
            final = bool(pb_utils.get_input_tensor_by_name(request, "is_final").as_numpy().reshape(-1)[0])
            text = detokenize_delta(self.tokenizer, prefix.tolist(), delta.tolist(), final)
            outputs = [pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_))]
            for name in PASS_THROUGH:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                outputs.append(pb_utils.Tensor(name, tensor.as_numpy()))
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses

    def _stop_engine_request(self, request):
        """Sends the engine a ``stop`` for the request this response came from."""
        key = pb_utils.get_input_tensor_by_name(request, "request_key").as_numpy().reshape(-1)[0]
        key = key.decode() if isinstance(key, bytes) else str(key)
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
