"""What can go wrong, as one hierarchy: every error a user can cause is a ``TritonizeError``.

Each message is a single line saying what is wrong and what to do, so the CLI prints it as it is, exits
non-zero and shows no traceback.
"""

from __future__ import annotations

from pathlib import Path


class TritonizeError(Exception):
    """Base of every error the CLI reports as one line, without a traceback."""


class _OneLine(TritonizeError):
    """Messages assembled from other errors' text may span lines: they are folded into one."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class ExportError(_OneLine):
    """A checkpoint that cannot be exported (a corrupt tar, a missing file, an unsupported model)."""


class UnsafePickleError(ExportError):
    """A pickle in the checkpoint asked for something the restricted unpickler does not admit."""


class AdapterError(_OneLine):
    """A LoRA adapter or p-tuning table that cannot be converted or served with the options given."""


class CheckpointError(TritonizeError):
    """The checkpoint cannot be served as it is."""


class RenderError(TritonizeError):
    """The repository cannot be written with the given options."""


class TrtllmBuildError(TritonizeError):
    """A TensorRT-LLM engine could not be found or built."""


class DeployError(TritonizeError):
    """A deploy request that cannot be carried out as asked; the message names the option and the fix."""


class LaunchError(TritonizeError):
    """The repository's engine models disagree on how they must be launched."""


class ServerError(TritonizeError, RuntimeError):
    """A tritonserver could not be found, prepared, started or stopped.

    ``detail`` holds the server's full error text (tracebacks included) where there is one, ``log_path``
    the server log to read for more.
    """

    def __init__(self, message: str, *, detail: str | None = None, log_path: Path | None = None) -> None:
        super().__init__(message)
        self.detail = detail
        self.log_path = log_path


class QueryError(TritonizeError):
    """The server refused or failed the request; the message is the server's."""
