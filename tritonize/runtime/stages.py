"""What the engine model says while it starts: its stages, in Triton's log, and the warm-up that ends them.

The runtime's modules log their stages with ``logging`` (loading.py: the weights, loaded N of M GB, the
kernels, the profiling step; engine.py: the KV pool, each CUDA graph captured). While the engine model
starts, ``StageLog`` forwards those records to Triton's log through ``pb_utils.Logger``, each line
``tritonize: <model>/<version>: <stage>``, which is what ``tritonize serve`` shows as progress while it waits
for the server. Triton marks the model ready when ``initialize`` returns, so the last stage is a warm-up
request through the engine: a server that reports ready has answered once already.

Only ``initialize``'s thread logs through it: once serving, the stub is called from the engine model's
sender thread alone.
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["PACKAGE", "StageLog", "WARM_UP_PROMPT_TOKENS"]

PACKAGE = __name__.rpartition(".")[0]  # tritonize.runtime, or tritonize_backend inside a repository
# Shorter than a KV block: the warm-up leaves no prefix in the cache for a real request to find.
WARM_UP_PROMPT_TOKENS = 8
WARM_UP_NEW_TOKENS = 2
WARM_UP_TIMEOUT_S = 600.0


class _Forward(logging.Handler):
    def __init__(self, stages: StageLog) -> None:
        super().__init__(logging.INFO)
        self.stages = stages

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record must not stop a start
            return
        if record.levelno >= logging.ERROR:
            self.stages.error(message)
        elif record.levelno >= logging.WARNING:
            self.stages.warn(message)
        else:
            self.stages.info(message)


class StageLog:
    """Forwards the runtime's INFO records to ``logger`` (``pb_utils.Logger``) until ``close``.

    ``args`` are the ones Triton gives ``initialize``: the model's name and version label each line.
    """

    def __init__(self, logger: Any, args: dict[str, str]) -> None:
        self.logger = logger
        name = args.get("model_name") or "engine"
        self.prefix = f"tritonize: {name}/{args.get('model_version', '1')}: "
        self.start = time.monotonic()
        self._root = logging.getLogger(PACKAGE)
        self._level = self._root.level
        self._handler = _Forward(self)
        self._root.addHandler(self._handler)
        if self._root.getEffectiveLevel() > logging.INFO:
            self._root.setLevel(logging.INFO)

    def info(self, message: str) -> None:
        self.logger.log_info(self.prefix + message)

    def warn(self, message: str) -> None:
        self.logger.log_warn(self.prefix + message)

    def error(self, message: str) -> None:
        self.logger.log_error(self.prefix + message)

    def close(self) -> None:
        self._root.removeHandler(self._handler)
        self._root.setLevel(self._level)

    def warm_up(self, engine: Any) -> None:
        """One short request through the engine, then the line that says the model is ready; closes the log.

        Raises RuntimeError (the model then fails to load, with this message) when the engine cannot answer.
        """
        started = time.monotonic()
        try:
            engine.generate([[0] * WARM_UP_PROMPT_TOKENS], max_new_tokens=WARM_UP_NEW_TOKENS, end_ids=[],
                            timeout=WARM_UP_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the model must not report ready
            self.close()
            raise RuntimeError(f"tritonize: the warm-up request failed, so the model is not served: {exc}") from exc
        now = time.monotonic()
        self.info(f"warm-up: one request of {WARM_UP_PROMPT_TOKENS} prompt tokens and {WARM_UP_NEW_TOKENS} "
                  f"generated in {now - started:.2f} s; ready {now - self.start:.1f} s after the model started "
                  "loading")
        self.close()
