"""`tritonize demo`: the whole pipeline on a fresh machine, with nothing to download."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from ..client import GenerateOptions, QueryError, grpc_generate
from ..demo_model import write_demo_checkpoint
from ..errors import TritonizeError
from ..server import ServerError, TritonServer, free_port
from ..spec import RepoSpec
from .generate import build_repository


@click.command()
@click.option("--prompt", "-p", default="What is the color of a banana?", show_default=True, help="Prompt to send.")
@click.option("--max-tokens", default=16, show_default=True, type=int, help="Tokens to generate.")
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Keep the checkpoint and repository here instead of a temporary directory.")
@click.option("--tritonserver", default=None, help="tritonserver binary (default: found as `serve` finds it).")
def demo(prompt: str, max_tokens: int, workdir: Path | None, tritonserver: str | None) -> None:
    """Build a small model, generate its repository, serve it, ask it one question, stop.

    \b
    The model is a 2-layer Llama with random weights and Mistral's real SentencePiece tokenizer
    (shipped in the mistral-common package), so the answer is fluent nonsense: what the demo shows
    is the path, from checkpoint to a stock tritonserver answering over gRPC.

    \b
    Example:
      tritonize demo --prompt "What is the color of a banana?"
    """
    with tempfile.TemporaryDirectory(prefix="tritonize-demo-") as tmp:
        root = workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        try:
            click.echo(f"1/4 building a tiny random-weight Llama in {root / 'checkpoint'}")
            write_demo_checkpoint(root / "checkpoint")
            click.echo(f"2/4 generating the model repository {root / 'repo'}")
            spec = RepoSpec(name="demo", max_batch_size=4, max_input_len=128, max_output_len=128, device="cpu")
            repo = build_repository(root / "checkpoint", root / "repo", spec, force=True, progress=False)
            ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
            click.echo("3/4 starting tritonserver")
            with TritonServer(repo, tritonserver=tritonserver, **ports):  # started on entry
                click.echo(f"    ready: gRPC 127.0.0.1:{ports['grpc_port']}, HTTP 127.0.0.1:{ports['http_port']}")
                click.echo(f"4/4 asking: {prompt}")
                result = grpc_generate(f"127.0.0.1:{ports['grpc_port']}", "demo", prompt,
                                       GenerateOptions(max_tokens=max_tokens))
            click.echo(f"answer ({result.num_output_tokens} tokens, {result.elapsed:.2f} s):{result.text}")
        except (TritonizeError, ServerError, QueryError) as e:
            raise click.ClickException(str(e)) from None
