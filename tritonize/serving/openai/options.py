"""How the OpenAI front is run; kept apart so that the command line can name it without loading FastAPI."""

from __future__ import annotations

import os
from dataclasses import dataclass

API_KEY_ENV = "TRITONIZE_API_KEY"
DEFAULT_PORT = 9000
DEFAULT_MAX_REQUEST_BYTES = 8 << 20


@dataclass(frozen=True)
class FrontOptions:
    address: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = None  # None: $TRITONIZE_API_KEY, else no key
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    log_level: str = "warning"

    def key(self) -> str | None:
        return self.api_key or os.environ.get(API_KEY_ENV) or None

    def url(self) -> str:
        """The base URL clients use (``.../v1``)."""
        host = "127.0.0.1" if self.address in ("0.0.0.0", "") else "::1" if self.address == "::" else self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/v1"
