"""The root of tritonize's errors, kept in the runtime because the runtime is copied into repositories on
its own: ``tritonize.errors`` builds the rest of the hierarchy on these."""

from __future__ import annotations


class TritonizeError(Exception):
    """Base of every error tritonize reports as one line, without a traceback."""


class OneLineError(TritonizeError):
    """An error whose message may be assembled from other errors' text: folded into one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class AdapterError(OneLineError, ValueError):
    """A LoRA adapter or p-tuning table that cannot be converted or served: an id the repository does not
    hold, an adapter made for another model, a limit it exceeds. A ValueError, so that an engine answers
    the request that asked for it with the message, and serves the others."""


class EngineError(TritonizeError, RuntimeError):
    """A request finished with reason "error" (raised by the blocking ``generate``)."""


def one_line(exc: BaseException) -> str:
    """An exception as the one line a process reports to its parent: the message of tritonize's own errors and
    ValueErrors (they say what to do), otherwise prefixed by the exception's type."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, (TritonizeError, ValueError)) else f"{type(exc).__name__}: {text}"
