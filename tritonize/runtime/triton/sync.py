"""The ``<name>_sync`` model: the door for clients that cannot stream (HTTP /infer, unary gRPC,
perf_analyzer without --streaming).

Triton refuses decoupled models on those paths, and the engine must be decoupled to stream. This
model forwards each request to the ensemble with ``stream`` forced off and returns what it answers as
one response: the ensemble's single response as it is, or, for a request of N prompts or
``num_return_sequences`` n, its N x n responses joined in (batch_index, sequence_index) order
(``text_output`` [N x n], the others [N x n, ...], ``output_log_probs`` padded with 0 past each
sequence's ``num_output_tokens``). The requests of one batch are forwarded concurrently, so the
engine still batches them; there is no second copy of the weights.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

# tensorrtllm_backend's required inputs: checked here too, because an error that comes back from the
# ensemble has lost its code, and a request that lacks one is the client's error (HTTP 400), not the server's
REQUIRED = ("text_input", "max_tokens")


def _index(response, name):
    tensor = pb_utils.get_output_tensor_by_name(response, name)
    return 0 if tensor is None else int(tensor.as_numpy().reshape(-1)[0])


def _join(arrays):
    """Arrays of one output, one per response, along the first axis; ragged trailing axes padded with 0."""
    if len(arrays) == 1:
        return arrays[0]
    shape = [max(a.shape[d] for a in arrays) for d in range(1, arrays[0].ndim)]
    padded = []
    for a in arrays:
        if list(a.shape[1:]) != shape:
            out = np.zeros((a.shape[0], *shape), dtype=a.dtype)
            out[tuple(slice(0, s) for s in a.shape)] = a
            a = out
        padded.append(a)
    return np.concatenate(padded, axis=0)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.target = params["ensemble_name"]
        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]
        self.pool = ThreadPoolExecutor(max_workers=max(1, int(config.get("max_batch_size", 1))))

    def execute(self, requests):
        return list(self.pool.map(self._forward, requests))

    def finalize(self):
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _forward(self, request):
        for name in REQUIRED:
            if pb_utils.get_input_tensor_by_name(request, name) is None:
                return pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"{name} is required and missing: send it, one row per prompt", pb_utils.TritonError.INVALID_ARG))
        tensors = []
        rows = 1
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None and name != "stream":
                tensors.append(tensor)
                if name == "text_input":
                    rows = max(1, tensor.as_numpy().shape[0])
        tensors.append(pb_utils.Tensor("stream", np.zeros((rows, 1), dtype=np.bool_)))
        wanted = list(request.requested_output_names() or self.output_names)
        inner = pb_utils.InferenceRequest(model_name=self.target, inputs=tensors, requested_output_names=wanted)
        results = []
        for response in inner.exec(decoupled=True):
            if response.has_error():
                return pb_utils.InferenceResponse(error=response.error())
            if response.output_tensors():
                results.append(response)
        if not results:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.target} sent no response"))
        results.sort(key=lambda r: (_index(r, "batch_index"), _index(r, "sequence_index")))
        outputs = []
        for name in wanted:
            arrays = [pb_utils.get_output_tensor_by_name(r, name) for r in results]
            if any(a is None for a in arrays):
                continue
            outputs.append(pb_utils.Tensor(name, _join([a.as_numpy() for a in arrays])))
        return pb_utils.InferenceResponse(output_tensors=outputs)
