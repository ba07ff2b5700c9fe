"""Asking a served tritonize repository through each of its doors, with tritonclient alone.

    tritonize serve ./repo &
    python examples/clients.py --model tiny --prompt "What is the color of a banana?"

The ensemble ``<name>`` streams (gRPC streaming; HTTP /generate and /generate_stream); ``<name>_sync``
answers plain HTTP /infer and unary gRPC for the clients that cannot stream. All three calls below ask
for the same greedy completion, so they print the same text. Nothing here needs tritonize installed:
this is what any client of the wire interface (tensorrtllm_backend's) sends.
"""

from __future__ import annotations

import argparse
import json
import queue
import urllib.request

import numpy as np


def _inputs(module, prompt: str, max_tokens: int, **flags: bool) -> list:
    """The request's tensors, shaped [1, 1] as tensorrtllm_backend's ensemble takes them."""
    arrays = [("text_input", np.array([[prompt.encode()]], dtype=np.object_), "BYTES"),
              ("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32")]
    arrays += [(name, np.array([[value]], dtype=np.bool_), "BOOL") for name, value in flags.items()]
    inputs = []
    for name, array, dtype in arrays:
        tensor = module.InferInput(name, [1, 1], dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def grpc_stream(url: str, model: str, prompt: str, max_tokens: int) -> str:
    """The ensemble over gRPC streaming: one response per new piece of text, concatenated."""
    import tritonclient.grpc as grpcclient

    inputs = _inputs(grpcclient, prompt, max_tokens, stream=True, exclude_input_in_output=True)
    responses: queue.SimpleQueue = queue.SimpleQueue()
    pieces = []
    with grpcclient.InferenceServerClient(url) as client:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=120)
            if error is not None:
                raise RuntimeError(str(error))
            text = result.as_numpy("text_output")
            if text is not None:
                pieces.append(text.reshape(-1)[0].decode())
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        client.stop_stream()
    return "".join(pieces)


def http_generate(url: str, model: str, prompt: str, max_tokens: int) -> str:
    """The ensemble over Triton's HTTP generate endpoint: one JSON answer."""
    body = {"text_input": prompt, "max_tokens": max_tokens, "exclude_input_in_output": True}
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["text_output"]


def http_infer_sync(url: str, model: str, prompt: str, max_tokens: int) -> str:
    """``<name>_sync`` over plain HTTP /infer, as perf_analyzer and genai-perf send without --streaming."""
    import tritonclient.http as httpclient

    inputs = _inputs(httpclient, prompt, max_tokens, exclude_input_in_output=True)
    with httpclient.InferenceServerClient(url) as client:
        result = client.infer(f"{model}_sync", inputs)
    return result.as_numpy("text_output").reshape(-1)[0].decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the ensemble's name (generate's --model-name)")
    parser.add_argument("--prompt", default="What is the color of a banana?")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--grpc", default="127.0.0.1:8001", help="gRPC host:port")
    parser.add_argument("--http", default="127.0.0.1:8000", help="HTTP host:port")
    args = parser.parse_args()
    for door, ask, url in (("gRPC stream", grpc_stream, args.grpc), ("HTTP generate", http_generate, args.http),
                           ("HTTP /infer", http_infer_sync, args.http)):
        print(f"{door:13}: {ask(url, args.model, args.prompt, args.max_tokens)!r}")


if __name__ == "__main__":
    main()
