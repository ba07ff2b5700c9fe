"""The paged KV cache: a pool of fixed-size blocks, and prefix reuse over it.

Every layer's keys and values live in one tensor of ``num_blocks`` blocks of ``block_size`` token
positions; a request holds a list of block ids (its block table) instead of a reserved slot of
``max_seq_len`` positions, so memory follows the tokens actually in flight and long and short requests
share one pool (PagedAttention, as in vLLM and TensorRT-LLM's paged KV cache).

Prefix reuse: a block that is full gets a hash of its whole token prefix (the parent block's hash, its
own tokens and the request's *extra key*: the LoRA adapter and the prompt table, because the same ids
under another adapter or table give other keys and values). A later request whose prompt starts with
the same full blocks takes them as they are. A block nobody holds keeps its contents and its hash and
waits in the free queue, least recently freed first; it is reused as is when a prompt asks for it, or
evicted (its hash forgotten) when the pool needs a free block. Block 0 is never handed out: padded rows
of a batch point at it.

Everything here is host-side bookkeeping (no tensors): the scheduler decides, the model runner copies
block tables to the device.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["NULL_BLOCK", "BlockPool", "PoolStats", "block_hashes"]

NULL_BLOCK = 0


def block_hashes(tokens: Sequence[int], block_size: int, extra: bytes = b"", start: int = 0,
                 parent: bytes = b"") -> list[bytes]:
    """Hashes of the full blocks of ``tokens`` from block index ``start`` on, each chained to the one
    before (``parent`` is the hash of block ``start - 1``; empty for the first). A block is hashed as its
    tokens' 8-byte integers (fixed width: no two blocks share an encoding), then ``#`` and ``extra``. Packed
    once for the whole prompt, a 1,024-token prefix hashes in about 0.1 ms, against 0.3 ms as the tokens'
    decimal text: it is on the way to every request's first token."""
    end = len(tokens) // block_size
    data = array("q", tokens[start * block_size : end * block_size]).tobytes()
    width = 8 * block_size
    out = []
    for offset in range(0, len(data), width):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(data[offset : offset + width])
        h.update(b"#")
        h.update(extra)
        parent = h.digest()
        out.append(parent)
    return out


@dataclass
class PoolStats:
    """Counters an operator reads: prefix hits are prompt tokens that were not computed again."""

    prompt_tokens: int = 0
    prefix_hit_tokens: int = 0
    evictions: int = 0
    preemptions: int = 0


class BlockPool:
    """Block ids ``1 .. num_blocks - 1`` with reference counts and an LRU free queue."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 blocks, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.ref = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        # Free blocks, the one to hand out next first; blocks that still hold a cached prefix sit here too.
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.stats = PoolStats()

    # ---------------------------------------------------------------- queries
    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        """Share of the pool held by requests (cached blocks nobody holds count as free)."""
        return 1.0 - self.num_free / self.usable_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def lookup(self, hashes: Iterable[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of ``hashes`` (nothing is taken yet)."""
        if not self.prefix_caching:
            return []
        found = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            found.append(block)
        return found

    # ---------------------------------------------------------------- changes
    def take(self, blocks: Iterable[int]) -> None:
        """Hold cached blocks found by ``lookup`` (one more reference each)."""
        for b in blocks:
            if self.ref[b] == 0:
                del self.free_queue[b]
            self.ref[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh blocks, or None (nothing taken) when the pool has fewer than ``n`` free."""
        if n > len(self.free_queue):
            return None
        out = []
        for _ in range(n):
            b, _ = self.free_queue.popitem(last=False)
            h = self.hash_of[b]
            if h is not None:  # the least recently used cached block: forget its prefix
                if self.cached.get(h) == b:
                    del self.cached[h]
                self.hash_of[b] = None
                self.stats.evictions += 1
            self.ref[b] = 1
            out.append(b)
        return out

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference of each block; blocks nobody holds go to the free queue's end, a request's
        last block first, so that its first blocks (the prefix others are likeliest to share) stay longest."""
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if self.hash_of[b] is None or not self.prefix_caching:
                    self.hash_of[b] = None
                    # uncached blocks are handed out before cached ones
                    self.free_queue[b] = None
                    self.free_queue.move_to_end(b, last=False)
                else:
                    self.free_queue[b] = None

    def register(self, block: int, h: bytes) -> None:
        """Publish a full block's prefix hash, so later prompts can reuse it."""
        if not self.prefix_caching or self.hash_of[block] is not None:
            return
        self.hash_of[block] = h
        self.cached.setdefault(h, block)

    def reset_prefix_cache(self) -> None:
        for h, b in list(self.cached.items()):
            if self.ref[b] == 0:
                self.hash_of[b] = None
            del self.cached[h]
