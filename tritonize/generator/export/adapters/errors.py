"""The error every adapter reader and writer raises."""

from __future__ import annotations

from ...errors import TritonizeError


class AdapterError(TritonizeError):
    """A LoRA adapter or p-tuning table that cannot be served; ``str()`` is one line saying what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
