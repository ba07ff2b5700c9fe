"""The Python API end to end: export a checkpoint, generate in-process, serve it with tritonserver, ask it.

    python examples/python_api.py --checkpoint ./llama31_8b.nemo --prompt "The capital of France is"
    python examples/python_api.py            # the demo's tiny Llama (random weights; needs mistral-common)

``Exporter`` takes the place of NeMo's ``TensorRTLLM`` and ``Deployment`` that of ``DeployPyTriton``
(docs/nemo-migration.md): the same calls, with tritonize's torch runtime in-process and a stock
tritonserver serving the generated repository. Both answers below are greedy, so they are the same text.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import urllib.request
from pathlib import Path

from tritonize import Deployment, Exporter


def ask_http_generate(http_port: int, model: str, prompt: str, max_tokens: int) -> str:
    """What any client of the served model does: Triton's HTTP generate endpoint, one JSON answer."""
    body = {"text_input": prompt, "max_tokens": max_tokens, "exclude_input_in_output": True}
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v2/models/{model}/generate",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["text_output"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help=".nemo, NeMo 2, .qnemo or Hugging Face checkpoint (default: the demo's tiny Llama)")
    parser.add_argument("--prompt", default="What is the color of a banana?")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--work", type=Path, default=None, help="where the export and repository go (default: a "
                        "temporary directory)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="tritonize-api-example-"))
    checkpoint = args.checkpoint
    if checkpoint is None:
        from tritonize.export.demo_model import write_demo_checkpoint

        checkpoint = write_demo_checkpoint(work / "ckpt", hidden=64, layers=2, seed=3)

    # NeMo: TensorRTLLM(model_dir=...).export(nemo_checkpoint_path=..., ...)
    exporter = Exporter(work / "model_dir")
    exporter.export(nemo_checkpoint_path=checkpoint, max_input_len=64, max_output_len=args.max_tokens,
                    max_batch_size=4)
    try:
        [in_process] = exporter.forward([args.prompt], max_output_token=args.max_tokens)
        print(f"in-process: {in_process!r}")

        # NeMo: DeployPyTriton(model=..., triton_model_name=...).deploy() / .run() / .stop()
        deployment = Deployment(model=exporter, triton_model_name="tiny", model_repository=work / "repo",
                                http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port)
        deployment.deploy()
        deployment.run()
        try:
            served = ask_http_generate(args.http_port, "tiny", args.prompt, args.max_tokens)
            print(f"served    : {served!r}")
        finally:
            deployment.stop()
    finally:
        exporter.close()


if __name__ == "__main__":
    main()
