"""`tritonize serve REPO`: serve a generated model repository with a stock tritonserver until stopped."""

from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path
from types import FrameType

import click

from ..errors import TritonizeError
from ..launch import MULTI_GPU_MODES, LaunchPlan, repository_launch
from ..server import MODEL_CONTROL_MODES, ServerError, TritonServer, model_names

_EPILOG = """\b
Example:
  tritonize serve ./repo --http-port 8000
  curl -s localhost:8000/v2/models/<name>/generate \\
       -d '{"text_input": "The capital of France is", "max_tokens": 16}'

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


class _Shutdown(Exception):
    """Raised from the signal handler so a blocking wait, or a start in progress, unwinds at once."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # One request to stop is enough: later signals must not interrupt the clean shutdown itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Shutdown(signum)


def _describe(server: TritonServer) -> str:
    models = model_names(server.repo)
    version = server.version
    lines = [
        f"tritonserver{' ' + version if version else ''} is ready (pid {server.pid}), serving {server.repo}",
        f"  HTTP     {server.urls['http']}",
        f"  gRPC     {server.grpc_endpoint}",
        f"  metrics  {server.urls['metrics']}",
        f"  models   {', '.join(models) if models else '(none)'}",
        f"  log      {server.log_path}",
        "Press Ctrl-C to stop.",
    ]
    return "\n".join(lines)


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
    dry_run: bool = False,
) -> None:
    """Serve the model repository REPO with tritonserver until Ctrl-C or SIGTERM."""
    try:
        launch = repository_launch(repo)
    except TritonizeError as exc:
        raise click.ClickException(str(exc)) from None
    if multi_gpu_mode is not None and launch.world_size > 1:
        launch = LaunchPlan(launch.world_size, multi_gpu_mode, launch.engine_models)
    server = TritonServer(
        repo,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        address=address,
        tritonserver=tritonserver,
        log_verbose=log_verbose,
        model_control_mode=model_control_mode,
        log_file=log_file,
        extra_args=server_args,
        launch=launch,
    )
    if dry_run:
        try:
            command, env = server.command()
        except ServerError as exc:
            raise click.ClickException(str(exc)) from exc
        prefix = " ".join(f"{key}={value}" for key, value in env.items())
        click.echo((prefix + " " if prefix else "") + shlex.join(command))
        return
    if launch.world_size > 1:
        click.echo(f"{launch.world_size} GPUs ({launch.mode} mode) for {', '.join(launch.engine_models)}", err=True)
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start(timeout=startup_timeout)
        click.echo(_describe(server))
        while True:
            rc = server.wait(timeout=1.0)
            if rc is not None:
                reason = server.error_line() or "no error in its log"
                raise click.ClickException(
                    f"tritonserver exited unexpectedly with code {rc}: {reason} (log: {server.log_path})"
                )
    except _Shutdown as stop:
        click.echo(f"{stop}: stopping tritonserver", err=True)
    except ServerError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            server.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    click.echo("tritonserver stopped", err=True)


if __name__ == "__main__":
    sys.exit(serve(prog_name="tritonize serve"))
