"""The token-budget scheduler: which sequences run in the next step, and how many tokens each.

``schedule()`` produces a plan (``StepPlan``) that the model runner executes; ``update_from_output()``
applies what the step sampled; ``check_stop`` is the one place that decides a sequence is done. No
model, no tensors: the planner is tested on its own.

Each step spends at most ``max_num_tokens`` tokens:

1. every running sequence first, oldest first: a decode feeds its one newest token, a prompt that is
   still being prefilled gets the next chunk the budget allows;
2. then waiting sequences, oldest first, while a batch row and budget are left: a prompt's full blocks
   that the pool already holds (prefix reuse) are taken as they are, the rest is computed in chunks.

When the pool has no block left for a running sequence, the newest running sequence is preempted: its
blocks are freed and it goes back to the front of the queue, to be computed again (prompt and the tokens
it generated so far) when memory allows. Its output is the same as if it had run alone: greedy choice,
and seeded draws that depend only on the seed and the token count, do not care when a token is computed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from .kv_cache import BlockPool
from .sequence import Sequence, Status

__all__ = ["ScheduledChunk", "Scheduler", "StepPlan", "check_stop"]


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # position of the first token computed in this step
    num_tokens: int
    samples: bool  # the chunk ends at the sequence's newest token: the step samples the next one


@dataclass
class StepPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)  # given a slot in this step
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def decode_only(self) -> bool:
        return all(c.num_tokens == 1 and c.samples for c in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.chunks)


def check_stop(seq: Sequence, end_ids: frozenset[int], stop_sequences: Seq[Seq[int]]) -> str | None:
    """Why ``seq`` is finished after its newest known token, or None (TensorRT-LLM's rules: an end id
    ends it and is not output, a stop sequence ends it and stays in the output)."""
    if not seq.output:
        return None
    if seq.output[-1] in end_ids:
        return "end"
    if stop_sequences:
        tokens = seq.known_tokens()
        for stop in stop_sequences:
            n = len(stop)
            if 0 < n <= len(tokens) and tokens[-n:] == list(stop):
                return "stop"
    if len(seq.output) >= seq.max_new_tokens:
        return "length"
    return None


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_tokens: int) -> None:
        if max_num_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_seqs and max_num_tokens must be >= 1")
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_tokens = max_num_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(max_num_seqs - 1, -1, -1))

    # ---------------------------------------------------------------- admission and removal
    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def fits(self, num_tokens: int) -> bool:
        """Whether a sequence of ``num_tokens`` can ever run, alone in the whole pool."""
        return self.pool.blocks_for(num_tokens) <= self.pool.usable_blocks

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take ``seq`` out of the queues and give back what it holds."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def _release(self, seq: Sequence) -> None:
        self.pool.free(seq.blocks)
        seq.blocks = []
        seq.num_cached_blocks = 0
        self.free_slots.append(seq.slot)
        seq.slot = -1

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ---------------------------------------------------------------- planning
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_tokens
        scheduled: set[int] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(self._wanted(seq), budget)
            if n <= 0:
                i += 1
                continue
            while not self._grow(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim, plan)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break  # it preempted itself: everything after it is gone too
            plan.chunks.append(self._chunk(seq, n))
            scheduled.add(id(seq))
            budget -= n
            i += 1
        if not plan.preempted:
            while self.waiting and budget > 0 and self.free_slots:
                seq = self.waiting[0]
                if seq.num_pending:  # preempted with a token still on its way: wait for it
                    break
                n = self._admit(seq, budget)
                if n == 0:
                    break
                self.waiting.popleft()
                self.running.append(seq)
                plan.admitted.append(seq)
                plan.chunks.append(self._chunk(seq, n))
                budget -= n
        return plan

    def _wanted(self, seq: Sequence) -> int:
        """Tokens ``seq`` would compute now: the rest of its prompt, or the one newest token."""
        if seq.num_generated >= seq.max_new_tokens:
            return 0  # its last token is on its way; nothing more to compute
        return seq.num_tokens - seq.num_computed

    def _chunk(self, seq: Sequence, n: int) -> ScheduledChunk:
        start = seq.num_computed
        seq.num_computed += n
        if seq.first_scheduled is None:
            seq.first_scheduled = time.monotonic()
        samples = seq.num_computed == seq.num_tokens
        if samples:
            seq.num_pending += 1
        return ScheduledChunk(seq, start, n, samples)

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        need = self.pool.blocks_for(num_tokens) - len(seq.blocks)
        if need <= 0:
            return True
        new = self.pool.allocate(need)
        if new is None:
            return False
        seq.blocks += new
        seq.blocks_allocated += need
        return True

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.pool.stats.preemptions += 1
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Give ``seq`` its cached prefix, a slot and the blocks of its first chunk; 0 if it must wait."""
        pool = self.pool
        cached = pool.lookup(seq.full_block_hashes(pool.block_size))
        # At least the newest token is computed, so that the step yields logits to sample from.
        cached = cached[: (seq.num_tokens - 1) // pool.block_size]
        computed = len(cached) * pool.block_size
        n = min(seq.num_tokens - computed, budget)
        need = pool.blocks_for(computed + n) - len(cached)
        if need > pool.num_free - sum(1 for b in cached if pool.ref[b] == 0):
            return 0
        pool.take(cached)
        seq.blocks = cached + (pool.allocate(need) or [])
        seq.blocks_reused += len(cached)
        seq.blocks_allocated += max(need, 0)
        seq.num_cached_blocks = len(cached)
        seq.num_computed = computed
        seq.slot = self.free_slots.pop()
        seq.status = Status.RUNNING
        if seq.preemptions == 0:
            pool.stats.prompt_tokens += len(seq.prompt)
            pool.stats.prefix_hit_tokens += computed
            seq.prefix_hit_tokens = computed
        return n

    # ---------------------------------------------------------------- results
    def update_from_output(self, plan: StepPlan, tokens: Seq[int], log_probs: Seq[float] | None = None) -> None:
        """Apply the tokens the step sampled, one per sampling chunk in plan order, and publish the
        blocks that became full to the prefix cache."""
        now = time.monotonic()
        k = 0
        for chunk in plan.chunks:
            if not chunk.samples:
                continue
            seq = chunk.seq
            token = int(tokens[k])
            lp = None if log_probs is None else float(log_probs[k])
            k += 1
            seq.num_pending -= 1
            if seq.status is Status.FINISHED:
                continue  # ended by an earlier token; this one was computed for nothing
            seq.output.append(token)
            if lp is not None:
                seq.log_probs.append(lp)
            if seq.first_token is None:
                seq.first_token = now
            seq.last_token = now
        if self.pool.prefix_caching:
            for chunk in plan.chunks:
                if chunk.seq.status is Status.RUNNING:
                    self._publish(chunk.seq)

    def _publish(self, seq: Sequence) -> None:
        bs = self.pool.block_size
        full = min(seq.num_computed, seq.num_known) // bs
        if full <= seq.num_cached_blocks:
            return
        hashes = seq.full_block_hashes(bs)
        for b in range(seq.num_cached_blocks, min(full, len(seq.blocks))):
            self.pool.register(seq.blocks[b], hashes[b])
        seq.num_cached_blocks = full
