"""The prompt as the engine receives it: a p-tuning task's virtual tokens, then the text's ids.

TensorRT-LLM's convention, which clients of tensorrtllm_backend already follow: virtual token ``j`` of
a task is the id ``vocab_size + j``, past every real token, so the engine can tell them apart and take
their embeddings from the task's table (or from a table sent with the request) instead. The
preprocessing model and the Python API both lay prompts out with this function.
"""

from __future__ import annotations


def virtual_tokens(vocab_size: int, count: int) -> list[int]:
    """The ids of ``count`` virtual tokens: ``vocab_size``, ``vocab_size + 1``, ..."""
    return list(range(vocab_size, vocab_size + count))
