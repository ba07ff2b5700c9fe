"""Running the front: in a background thread beside the tritonserver that `tritonize serve` started, or in
the foreground against one that runs already (`tritonize openai`). uvicorn serves the application."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ...errors import ServerError
from ..server import port_in_use
from .app import create_app
from .catalog import Catalog, catalog_from_repository
from .options import FrontOptions


def _config(grpc_url: str, options: FrontOptions, catalog: Catalog | None):  # noqa: ANN202 - uvicorn.Config
    import uvicorn

    if options.max_request_bytes < 1:
        raise ServerError("--max-request-bytes must be positive")
    app = create_app(grpc_url, catalog, api_key=options.key(), max_request_bytes=options.max_request_bytes)
    # asyncio's own loop: gRPC's asyncio channels are made for it (uvicorn would take uvloop if installed);
    # HTTP parsing by httptools where it is installed, else h11 (uvicorn's choice)
    return uvicorn.Config(app, host=options.address, port=options.port, log_level=options.log_level,
                          access_log=False, lifespan="on", timeout_graceful_shutdown=5, loop="asyncio")


def _catalog(repository: Path | None) -> Catalog | None:
    if repository is None:
        return None
    try:
        return catalog_from_repository(repository)
    except ValueError as e:
        raise ServerError(str(e)) from None


def check_port(options: FrontOptions) -> None:
    if port_in_use(options.address, options.port):
        raise ServerError(f"port {options.port} on {options.address} is in use: pass another --openai-port / "
                          "--port, or stop what listens there")


class OpenAIFront:
    """The front in a background thread; ``start`` returns once it listens, ``stop`` ends it."""

    def __init__(self, grpc_url: str, options: FrontOptions = FrontOptions(), repository: Path | None = None) -> None:
        self.grpc_url = grpc_url
        self.options = options
        self.repository = repository
        self._server = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return self.options.url()

    def start(self, timeout: float = 30.0) -> OpenAIFront:
        import uvicorn

        check_port(self.options)
        self._server = uvicorn.Server(_config(self.grpc_url, self.options, _catalog(self.repository)))

        def run() -> None:
            try:
                self._server.run()
            except BaseException as e:  # noqa: BLE001 - SystemExit from a failed bind included
                self._error = e

        self._thread = threading.Thread(target=run, name="tritonize-openai", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"the OpenAI API did not start on {self.options.address}:{self.options.port}"
                                  f"{': ' + str(self._error) if self._error else ''}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> OpenAIFront:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_front(grpc_url: str, options: FrontOptions, repository: Path | None = None, *,
              say: Callable[[str], None] = print) -> None:
    """`tritonize openai`: the front in the foreground until Ctrl-C / SIGTERM (uvicorn handles both)."""
    import uvicorn

    check_port(options)
    catalog = _catalog(repository)
    server = uvicorn.Server(_config(grpc_url, options, catalog))
    where = f"the models of {repository}" if catalog is not None else "the models the server has loaded"
    say(f"OpenAI API on {options.url()} in front of tritonserver "
        f"{grpc_url} ({where}){'; API key required' if options.key() else ''}. Press Ctrl-C to stop.")
    logging.getLogger("uvicorn.error").setLevel(options.log_level.upper())
    server.run()
