"""`tritonize demo`: the whole path on a fresh machine, with nothing to download.

A 2-layer Llama with random weights and Mistral's real SentencePiece tokenizer (shipped in the
mistral-common package) goes through the real steps: checkpoint, repository, a stock tritonserver,
one request over gRPC. The answer is fluent nonsense; the path is the one a real model takes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from ..export.demo_model import write_demo_checkpoint
from ..repository.build import build_repository
from ..repository.spec import RepoSpec
from .client import GenerateOptions, Result, grpc_generate
from .server import TritonServer, free_port


def run_demo(prompt: str, *, max_tokens: int = 16, workdir: Path | None = None, tritonserver: str | None = None,
             say: Callable[[str], None] = print) -> Result:
    """Builds, generates, serves and asks; ``say`` gets one line per step. The server is always stopped."""
    with tempfile.TemporaryDirectory(prefix="tritonize-demo-") as tmp:
        root = workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        say(f"1/4 building a tiny random-weight Llama in {root / 'checkpoint'}")
        write_demo_checkpoint(root / "checkpoint")
        say(f"2/4 generating the model repository {root / 'repo'}")
        spec = RepoSpec(name="demo", max_batch_size=4, max_input_len=128, max_output_len=128, device="cpu")
        repo = build_repository(root / "checkpoint", root / "repo", spec, force=True, progress=False)
        ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
        say("3/4 starting tritonserver")
        with TritonServer(repo, tritonserver=tritonserver, **ports):  # started on entry
            say(f"    ready: gRPC 127.0.0.1:{ports['grpc_port']}, HTTP 127.0.0.1:{ports['http_port']}")
            say(f"4/4 asking: {prompt}")
            return grpc_generate(f"127.0.0.1:{ports['grpc_port']}", "demo", prompt,
                                 GenerateOptions(max_tokens=max_tokens))
