"""Serve a repository in the foreground until Ctrl-C or SIGTERM: what `tritonize serve` and `deploy` do.

A stop request interrupts whatever is running (a start still loading models included) and always ends
in ``TritonServer.stop``, so no server, stub process or shared-memory segment outlives the call.
"""

from __future__ import annotations

import shlex
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from ..errors import ServerError
from ..repository.layout import REPOSITORY_MANIFEST, model_names
from .launch import LaunchPlan, repository_launch
from .openai.options import FrontOptions
from .server import TritonServer, port_in_use


@dataclass(frozen=True)
class ServeOptions:
    """How the server is started; the defaults are Triton's ports on the loopback address."""

    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    address: str = "127.0.0.1"
    tritonserver: Path | None = None
    log_verbose: int = 0
    model_control_mode: str | None = None
    log_file: Path | None = None
    startup_timeout: float = 600
    server_args: tuple[str, ...] = ()
    multi_gpu_mode: str | None = None  # None: what generate recorded in the repository
    openai: FrontOptions | None = FrontOptions()  # the OpenAI API beside the server (None: off)


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


def describe(server: TritonServer, openai_url: str | None = None) -> str:
    """What a user needs once the server is ready: its endpoints, models and log."""
    models = model_names(server.repo)
    version = server.version
    lines = [
        f"tritonserver{' ' + version if version else ''} is ready (pid {server.pid}), serving {server.repo}",
        f"  HTTP     {server.urls['http']}",
        f"  gRPC     {server.grpc_endpoint}",
        f"  metrics  {server.urls['metrics']}",
        *([f"  OpenAI   {openai_url}"] if openai_url else []),
        f"  models   {', '.join(models) if models else '(none)'}",
        f"  log      {server.log_path}",
        "Press Ctrl-C to stop.",
    ]
    return "\n".join(lines)


def _server(repo: Path, options: ServeOptions) -> TritonServer:
    launch = repository_launch(repo)
    if options.multi_gpu_mode is not None and launch.world_size > 1:
        launch = LaunchPlan(launch.world_size, options.multi_gpu_mode, launch.engine_models)
    return TritonServer(
        repo, http_port=options.http_port, grpc_port=options.grpc_port, metrics_port=options.metrics_port,
        address=options.address, tritonserver=options.tritonserver, log_verbose=options.log_verbose,
        model_control_mode=options.model_control_mode, log_file=options.log_file, extra_args=options.server_args,
        launch=launch,
    )


def dry_run_line(repo: Path, options: ServeOptions) -> str:
    """The command line(s) ``serve_repository`` would run, with the environment it sets, as one shell line."""
    command, env = _server(repo, options).command()
    prefix = " ".join(f"{key}={value}" for key, value in env.items())
    return (prefix + " " if prefix else "") + shlex.join(command)


def serve_repository(repo: Path, options: ServeOptions = ServeOptions(), *, say: Callable[[str], None] = print,
                     note: Callable[[str], None] = print) -> None:
    """Runs tritonserver on ``repo`` until SIGINT / SIGTERM, then stops it; ServerError if it fails or dies.

    ``say`` gets what a user reads on stdout (the ready description), ``note`` the progress lines.
    """
    server = _server(repo, options)
    launch = server.launch
    if launch.world_size > 1:
        note(f"{launch.world_size} GPUs ({launch.mode} mode) for {', '.join(launch.engine_models)}")
    if options.openai is not None and port_in_use(options.openai.address, options.openai.port):
        raise ServerError(f"port {options.openai.port} on {options.openai.address} is in use (the OpenAI API): pass "
                          "another --openai-port, or --no-openai")
    front = None
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start(timeout=options.startup_timeout)
        if options.openai is not None:
            from .openai.runner import OpenAIFront

            # a tritonize repository says what it serves; any other is asked of the server
            described = repo if (Path(repo) / REPOSITORY_MANIFEST).is_file() else None
            front = OpenAIFront(server.grpc_endpoint, options.openai, repository=described).start()
        say(describe(server, front.url if front is not None else None))
        while True:
            rc = server.wait(timeout=1.0)
            if rc is not None:
                reason = server.error_line() or "no error in its log"
                raise ServerError(
                    f"tritonserver exited unexpectedly with code {rc}: {reason} (log: {server.log_path})"
                )
    except _Shutdown as stop:
        note(f"{stop}: stopping tritonserver")
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            if front is not None:
                front.stop()
            server.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if server.stuck_models:
        note(f"tritonserver stopped (it still counted {', '.join(server.stuck_models)} live with nothing in flight "
             "and no model process left, and was ended rather than waited for)")
    else:
        note("tritonserver stopped")
