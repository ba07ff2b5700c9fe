"""The one exception type the exporter lets out.

Every failure a user can cause (a corrupt tar, a missing file, a hostile pickle, an unsupported
model) becomes an ``ExportError`` whose ``str()`` is a single line saying what is wrong and what to
do, so the CLI can print it as-is and exit non-zero.
"""

from __future__ import annotations


class ExportError(Exception):
    """A checkpoint that cannot be exported; ``str(error)`` is the one-line user message."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class UnsafePickleError(ExportError):
    """A pickle in the checkpoint asked for something the restricted unpickler does not admit."""
