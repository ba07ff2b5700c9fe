"""User-facing errors: each one's message is a single line saying what is wrong and what to do."""

from __future__ import annotations


class TritonizeError(Exception):
    """Base of every error the CLI reports as one line, without a traceback."""


class CheckpointError(TritonizeError):
    """The checkpoint cannot be served as it is."""


class RenderError(TritonizeError):
    """The repository cannot be written with the given options."""
