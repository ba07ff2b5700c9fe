"""`tritonize openai`: the OpenAI-compatible API in front of a tritonserver that runs already."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import TritonizeError
from ..serving.openai.options import API_KEY_ENV, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_PORT, FrontOptions

_EPILOG = f"""\b
Example:
  tritonize openai --url 127.0.0.1:8001 --repository ./repo
  curl -s localhost:{DEFAULT_PORT}/v1/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "<name>", "prompt": "The capital of France is", "max_tokens": 16}}'

\b
Models, chat templates, limits and LoRA adapters (served as NAME/ID) come from --repository, or,
without it, from the configs of the models the server has loaded. `tritonize serve` runs the same
API beside the server it starts. Ctrl-C or SIGTERM stops it.
"""


@click.command("openai", epilog=_EPILOG)
@click.option("--url", "-u", default="127.0.0.1:8001", show_default=True,
              help="tritonserver's gRPC endpoint (host:port).")
@click.option("--repository", "-r", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The tritonize repository the server serves (default: ask the server).")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True, help="Port to listen on.")
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 serves the network.")
@click.option("--api-key", default=None, metavar="KEY",
              help=f"Key clients must send as 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else none).")
@click.option("--max-request-bytes", type=click.IntRange(min=1), default=DEFAULT_MAX_REQUEST_BYTES, show_default=True,
              help="Largest request body read.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="warning",
              show_default=True, help="uvicorn's log level (info logs each request).")
def openai(url: str, repository: Path | None, port: int, address: str, api_key: str | None, max_request_bytes: int,
           log_level: str) -> None:
    """Serve the OpenAI API (/v1/models, /v1/completions, /v1/chat/completions) in front of a tritonserver."""
    from ..serving.openai.runner import run_front

    for scheme in ("grpc://", "http://"):
        url = url.removeprefix(scheme)
    options = FrontOptions(address=address, port=port, api_key=api_key, max_request_bytes=max_request_bytes,
                           log_level=log_level)
    try:
        run_front(url, options, repository, say=click.echo)
    except TritonizeError as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    sys.exit(openai(prog_name="tritonize openai"))
