"""`tritonize demo`: the whole pipeline on a fresh machine, with nothing to download."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import TritonizeError
from ..serving.demo import run_demo


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
    (shipped in the mistral-common package), so the answers are fluent nonsense: what the demo shows
    is the path, from checkpoint to a stock tritonserver answering over gRPC, then a chat request
    through the OpenAI API in front of it.

    \b
    Example:
      tritonize demo --prompt "What is the color of a banana?"
    """
    try:
        run_demo(prompt, max_tokens=max_tokens, workdir=workdir, tritonserver=tritonserver, say=click.echo)
    except TritonizeError as e:
        raise click.ClickException(str(e)) from None
