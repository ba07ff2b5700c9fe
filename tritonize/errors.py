"""What can go wrong, as one hierarchy: every error a user can cause is a ``TritonizeError``.

Each message is a single line saying what is wrong and what to do, so the CLI prints it as it is, exits
non-zero and shows no traceback.
"""

from __future__ import annotations

from pathlib import Path

from .runtime.errors import AdapterError, EngineError, OneLineError, TritonizeError

__all__ = [
    "AdapterError", "CheckpointError", "DeployError", "EngineError", "ExportError", "LaunchError", "OptionError",
    "PythonEnvironmentError", "QueryError", "RenderError", "ServerError", "TritonizeError", "TrtllmBuildError",
    "UnsafePickleError",
]


class ExportError(OneLineError):
    """A checkpoint that cannot be exported (a corrupt tar, a missing file, an unsupported model)."""


class UnsafePickleError(ExportError):
    """A pickle in the checkpoint asked for something the restricted unpickler does not admit."""


class CheckpointError(TritonizeError):
    """The checkpoint cannot be served as it is."""


class RenderError(TritonizeError):
    """The repository cannot be written with the given options."""


class TrtllmBuildError(TritonizeError):
    """A TensorRT-LLM engine could not be found or built."""


class DeployError(TritonizeError):
    """A deploy request that cannot be carried out as asked; the message names the option and the fix."""


class OptionError(DeployError):
    """An option the chosen runtime cannot honour (or none that exists), named as the user spelled it; a
    DeployError because deploy and the Python API raised that for it before generate shared the check."""


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


class PythonEnvironmentError(ServerError):
    """The Python that the server's Python models would run on cannot run them (numpy 2, a missing package):
    found before the server starts. ``python`` is that interpreter, ``problem`` and ``fix`` the two halves of
    the message."""

    def __init__(self, python: str, problem: str, fix: str) -> None:
        super().__init__(f"{problem}: {fix}")
        self.python, self.problem, self.fix = python, problem, fix


class QueryError(TritonizeError):
    """The server refused or failed the request; the message is the server's."""
