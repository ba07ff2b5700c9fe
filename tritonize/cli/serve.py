"""`tritonize serve REPO`: serve a generated model repository with a stock tritonserver until stopped."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import TritonizeError
from ..runtime.choices import MULTI_GPU_MODES
from ..serving.openai.options import API_KEY_ENV, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_PORT, FrontOptions
from ..serving.serve import ServeOptions, dry_run_line, serve_repository
from ..serving.server import MODEL_CONTROL_MODES

_EPILOG = f"""\b
Example:
  tritonize serve ./repo --http-port 8000
  curl -s localhost:8000/v2/models/<name>/generate \\
       -d '{{"text_input": "The capital of France is", "max_tokens": 16}}'
  curl -s localhost:{DEFAULT_PORT}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "<name>", "messages": [{{"role": "user", "content": "Hi"}}]}}'

\b
The OpenAI API (/v1/models, /v1/completions, /v1/chat/completions, /health) listens on
--openai-port at the same --address and talks to this tritonserver over gRPC streaming;
--api-key (or ${API_KEY_ENV}) makes it require 'Authorization: Bearer KEY'.

\b
The tritonserver binary is --tritonserver, else $TRITONSERVER, else the one on PATH, else the one
bundled in `pip install nvidia-pytriton==0.7.0`. Its Python models run on this Python environment.
Ctrl-C or SIGTERM stops the server and its Python model processes, and exits 0.

\b
A trtllm-engine repository built for tensor x pipeline parallelism N > 1 is launched with one MPI rank
per GPU, the world size read from the repository: `mpirun` with one tritonserver per rank (leader mode,
rank 0 serves the ports), or one tritonserver whose executor spawns its workers (orchestrator mode,
--multi-gpu-mode orchestrator or generate's choice). --dry-run prints the command line and exits.
"""

@click.command("serve", epilog=_EPILOG)
@click.argument("repo", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option(
    "--address", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 serves the network."
)
@click.option(
    "--tritonserver",
    "tritonserver",
    type=click.Path(path_type=Path),
    default=None,
    help="tritonserver binary (or its install dir) to run.",
)
@click.option(
    "--log-verbose", type=click.IntRange(0), default=0, show_default=True, help="Triton log verbosity."
)
@click.option(
    "--model-control-mode",
    type=click.Choice(MODEL_CONTROL_MODES),
    default=None,
    help="Triton's model control mode (default none); explicit still loads every model at start.",
)
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where the server log goes (default: a new temporary file).",
)
@click.option(
    "--startup-timeout",
    type=click.FloatRange(min=1),
    default=600,
    show_default=True,
    help="Seconds to wait for every model to load.",
)
@click.option(
    "--server-arg",
    "server_args",
    multiple=True,
    metavar="ARG",
    help="Extra tritonserver argument, repeatable, e.g. --server-arg=--exit-timeout-secs=5.",
)
@click.option(
    "--multi-gpu-mode",
    type=click.Choice(MULTI_GPU_MODES),
    default=None,
    help="Launch of a multi-GPU trtllm-engine repository (default: what generate recorded).",
)
@click.option("--openai-port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True,
              help="Port of the OpenAI-compatible API (same --address).")
@click.option("--openai/--no-openai", "openai", default=True, show_default=True,
              help="Serve the OpenAI-compatible API beside tritonserver.")
@click.option("--api-key", default=None, metavar="KEY",
              help=f"Key the OpenAI API requires as 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else none).")
@click.option("--max-request-bytes", type=click.IntRange(min=1), default=DEFAULT_MAX_REQUEST_BYTES, show_default=True,
              help="Largest request body the OpenAI API reads.")
@click.option("--dry-run", is_flag=True, help="Print the command line(s) that would run, and exit.")
def serve(
    repo: Path,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    address: str,
    tritonserver: Path | None,
    log_verbose: int,
    model_control_mode: str | None,
    log_file: Path | None,
    startup_timeout: float,
    server_args: tuple[str, ...],
    multi_gpu_mode: str | None = None,
    openai_port: int = DEFAULT_PORT,
    openai: bool = True,
    api_key: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    dry_run: bool = False,
) -> None:
    """Serve the model repository REPO with tritonserver, and the OpenAI API, until Ctrl-C or SIGTERM."""
    front = FrontOptions(address=address, port=openai_port, api_key=api_key,
                         max_request_bytes=max_request_bytes) if openai else None
    options = ServeOptions(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, address=address,
                           tritonserver=tritonserver, log_verbose=log_verbose, model_control_mode=model_control_mode,
                           log_file=log_file, startup_timeout=startup_timeout, server_args=server_args,
                           multi_gpu_mode=multi_gpu_mode, openai=front)
    try:
        if dry_run:
            click.echo(dry_run_line(repo, options))
            return
        serve_repository(repo, options, say=click.echo, note=lambda line: click.echo(line, err=True))
    except TritonizeError as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    sys.exit(serve(prog_name="tritonize serve"))
