"""What the engine knows about one request while it is queued, running or preempted.

Token bookkeeping follows vLLM v1: ``num_computed`` tokens have their keys and values in the cache, and
a step computes ``num_tokens - num_computed`` more of them (a prompt chunk, or the one token a decode
step feeds). The engine schedules step N+1 before it has read the tokens sampled in step N (the GPU
works while the host catches up), so a sequence may carry ``num_pending`` tokens that exist only on
the device; they count in ``num_tokens`` and become ``output`` when the host reads them.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from .kv_cache import block_hashes

__all__ = ["Sequence", "Status"]


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: object  # the GenerationRequest it serves
    prompt: list[int]  # the ids the model reads (virtual tokens already mapped to prompt-table rows)
    max_new_tokens: int
    extra_key: bytes = b""  # what else decides the KV of these ids: adapter, prompt table
    status: Status = Status.WAITING
    slot: int = -1  # row of the per-request device state while running
    output: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    num_pending: int = 0
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # of the full blocks, in order
    num_cached_blocks: int = 0  # blocks of ``blocks`` already published to the pool
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    preemptions: int = 0
    prefix_hit_tokens: int = 0  # prompt tokens taken from the prefix cache when first admitted
    blocks_reused: int = 0  # cached blocks taken, over every admission
    blocks_allocated: int = 0  # fresh blocks taken, over every admission and growth
    finish_reason: str | None = None
    delivered: int = 0  # output tokens already handed to the client
    # What the engine fixes when the request arrives or gets a slot:
    end_ids: frozenset[int] = frozenset()
    seed: int = 0
    needs_history: bool = False  # its sampling reads the previous tokens (see Sampler.needs_history)
    virtual_offset: int = 0  # added to prompt ids >= vocab_size: where its prompt-table rows start
    polled_at: float = 0.0  # last time the engine asked whether its client is still there
    grammar: Any = None  # structured output: the Future of its compiled grammar while it waits for it
    guide: Any = None  # then its grammar.GuideState (the matcher of its output)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_known(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def num_tokens(self) -> int:
        return self.num_known + self.num_pending

    @property
    def num_generated(self) -> int:
        return len(self.output) + self.num_pending

    @property
    def prefilling(self) -> bool:
        return self.num_computed < len(self.prompt)

    def token(self, index: int) -> int:
        n = len(self.prompt)
        return self.prompt[index] if index < n else self.output[index - n]

    def known_tokens(self) -> list[int]:
        return self.prompt + self.output

    def full_block_hashes(self, block_size: int) -> list[bytes]:
        """Hashes of every full block of the known tokens (extending the ones computed before)."""
        known = self.num_known // block_size
        if known > len(self.hashes):
            parent = self.hashes[-1] if self.hashes else b""
            self.hashes += block_hashes(self.known_tokens(), block_size, self.extra_key, start=len(self.hashes),
                                        parent=parent)  # its full blocks: the first ``known``
        return self.hashes
