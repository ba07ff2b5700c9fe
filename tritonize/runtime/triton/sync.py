"""The ``<name>_sync`` model: the door for clients that cannot stream (HTTP /infer, unary gRPC,
perf_analyzer without --streaming).

Triton refuses decoupled models on those paths, and the engine must be decoupled to stream. This
model forwards each request to the ensemble with ``stream`` forced off, so the engine answers with
exactly one response, and returns it. The requests of one batch are forwarded concurrently, so the
engine still batches them; there is no second copy of the weights.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

OUTPUTS = ("text_output", "cum_log_probs", "output_log_probs", "num_input_tokens", "num_output_tokens",
           "finish_reason", "output_tokens")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.target = params["ensemble_name"]
        self.input_names = [t["name"] for t in config["input"]]
        self.pool = ThreadPoolExecutor(max_workers=max(1, int(config.get("max_batch_size", 1))))

    def execute(self, requests):
        return list(self.pool.map(self._forward, requests))

    def finalize(self):
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _forward(self, request):
        tensors = []
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None and name != "stream":
                tensors.append(tensor)
        tensors.append(pb_utils.Tensor("stream", np.array([[False]], dtype=np.bool_)))
        inner = pb_utils.InferenceRequest(
            model_name=self.target,
            inputs=tensors,
            requested_output_names=list(OUTPUTS),
        )
        result = None
        for response in inner.exec(decoupled=True):
            if response.has_error():
                return pb_utils.InferenceResponse(error=response.error())
            if response.output_tensors():
                result = response
        if result is None:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.target} sent no response"))
        outputs = [pb_utils.Tensor(name, pb_utils.get_output_tensor_by_name(result, name).as_numpy()) for name in OUTPUTS]
        return pb_utils.InferenceResponse(output_tensors=outputs)
