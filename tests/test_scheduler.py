"""The block pool and the token-budget scheduler on their own: no model, no tensors."""

from __future__ import annotations

import pytest

from tritonize.runtime.kv_cache import NULL_BLOCK, BlockPool, block_hashes
from tritonize.runtime.scheduler import Scheduler, check_stop
from tritonize.runtime.sequence import Sequence, Status


class Req:
    def __init__(self, rid: str) -> None:
        self.request_id = rid


def seq(rid: str, prompt: list[int], max_new: int = 8, extra: bytes = b"") -> Sequence:
    return Sequence(request=Req(rid), prompt=list(prompt), max_new_tokens=max_new, extra_key=extra)


def run_step(sched: Scheduler, token: int = 7):
    """Schedule one step and feed back ``token`` for every sampling chunk, as the engine would."""
    plan = sched.schedule()
    sched.update_from_output(plan, [token] * sum(c.samples for c in plan.chunks))
    return plan


# ---------------------------------------------------------------- pool

def test_pool_never_hands_out_block_zero_and_counts_references():
    pool = BlockPool(5, 4)
    got = pool.allocate(4)
    assert sorted(got) == [1, 2, 3, 4] and NULL_BLOCK not in got
    assert pool.allocate(1) is None and pool.num_free == 0
    pool.take([got[0]])  # a second holder
    pool.free(got)
    assert pool.num_free == 3 and pool.ref[got[0]] == 1
    pool.free([got[0]])
    assert pool.num_free == 4 and pool.usage() == 0.0


def test_cached_blocks_are_reused_and_evicted_least_recently_freed_first():
    pool = BlockPool(4, 2)
    a, b = pool.allocate(2)
    ha, hb = block_hashes([1, 2, 3, 4], 2)
    pool.register(a, ha)
    pool.register(b, hb)
    pool.free([a, b])
    assert pool.lookup([ha, hb]) == [a, b]  # freed, but still cached
    fresh = pool.allocate(1)  # the never-cached block goes first
    assert fresh not in ([a], [b])
    (evicted,) = pool.allocate(1)  # then the request's last block (b), keeping its prefix block longest
    assert evicted == b and pool.lookup([ha, hb]) == [a] and pool.stats.evictions == 1


def test_hashes_chain_the_whole_prefix_and_the_extra_key():
    assert block_hashes([1, 2, 3, 4], 2)[1] != block_hashes([9, 9, 3, 4], 2)[1]
    assert block_hashes([1, 2, 3, 4], 2, b"lora:1")[0] != block_hashes([1, 2, 3, 4], 2, b"lora:2")[0]
    assert len(block_hashes([1, 2, 3], 2)) == 1  # only full blocks
    # fixed-width tokens: blocks whose decimal texts could run together stay apart; virtual ids past the vocab hash
    assert block_hashes([1, 23], 2) != block_hashes([12, 3], 2)
    tokens = [5, 70000, 128256 + 3, 0, 42, 7]
    whole = block_hashes(tokens, 2)
    assert len(set(whole)) == 3
    assert block_hashes(tokens, 2, start=1, parent=whole[0]) == whole[1:]  # hashing extends where it stopped


# ---------------------------------------------------------------- scheduler

def test_budget_packs_prompt_chunks_of_several_requests_after_the_decodes():
    sched = Scheduler(BlockPool(64, 4), max_num_seqs=4, max_num_tokens=16)
    a, b, c = seq("a", range(10)), seq("b", range(20, 30)), seq("c", range(40, 50))
    for s in (a, b, c):
        sched.add(s)
    plan = run_step(sched)
    assert [(ch.seq.request_id, ch.num_tokens, ch.samples) for ch in plan.chunks] == [("a", 10, True), ("b", 6, False)]
    plan = run_step(sched)
    # a decodes first, then b's rest, then what is left for c
    assert [(ch.seq.request_id, ch.start, ch.num_tokens) for ch in plan.chunks] == [
        ("a", 10, 1), ("b", 6, 4), ("c", 0, 10)]
    assert plan.num_tokens == 15 and not plan.decode_only
    plan = run_step(sched)
    assert plan.decode_only and len(plan.chunks) == 3


def test_batch_rows_limit_admission():
    sched = Scheduler(BlockPool(64, 4), max_num_seqs=2, max_num_tokens=100)
    for i in range(3):
        sched.add(seq(str(i), [i] * 5))
    plan = run_step(sched)
    assert len(plan.chunks) == 2 and len(sched.waiting) == 1


def test_prefix_blocks_are_taken_not_computed():
    pool = BlockPool(64, 4)
    sched = Scheduler(pool, max_num_seqs=4, max_num_tokens=64)
    shared = list(range(100, 116))  # four full blocks
    first = seq("first", shared + [1, 2], max_new=2)
    sched.add(first)
    run_step(sched)
    run_step(sched)
    assert check_stop(first, frozenset(), []) == "length"
    first_blocks = list(first.blocks)
    sched.finish(first, "length")
    again = seq("again", shared + [3], max_new=2)
    other_adapter = seq("lora", shared + [3], max_new=2, extra=b"lora:1")
    sched.add(again)
    sched.add(other_adapter)
    plan = run_step(sched)
    starts = {ch.seq.request_id: (ch.start, ch.num_tokens) for ch in plan.chunks}
    assert starts == {"again": (16, 1), "lora": (0, 17)}
    assert again.blocks[:4] == first_blocks[:4] and not set(other_adapter.blocks) & set(first_blocks[:4])
    assert pool.stats.prefix_hit_tokens == 16 and pool.stats.prompt_tokens == 18 + 17 + 17


def test_a_prompt_entirely_in_the_cache_still_computes_its_last_block():
    """Reuse is by whole blocks and the step must yield logits: the last block is computed again."""
    pool = BlockPool(64, 4)
    sched = Scheduler(pool, max_num_seqs=2, max_num_tokens=64)
    prompt = list(range(8))
    a = seq("a", prompt, max_new=1)
    sched.add(a)
    run_step(sched)
    sched.finish(a, "length")
    b = seq("b", prompt, max_new=1)
    sched.add(b)
    plan = run_step(sched)
    assert [(c.start, c.num_tokens, c.samples) for c in plan.chunks] == [(4, 4, True)]


def test_the_newest_request_is_preempted_and_recomputed_with_its_output():
    pool = BlockPool(7, 2)  # 6 usable blocks = 12 tokens
    sched = Scheduler(pool, max_num_seqs=4, max_num_tokens=64)
    old, new = seq("old", [1, 2, 3], max_new=6), seq("new", [4, 5, 6], max_new=6)
    sched.add(old)
    sched.add(new)
    preempted = []
    for _ in range(8):
        plan = run_step(sched)
        preempted += [s.request_id for s in plan.preempted]
        for s in list(sched.running):
            if check_stop(s, frozenset(), []):
                sched.finish(s, "length")
    assert preempted and set(preempted) == {"new"} and pool.stats.preemptions == len(preempted)
    assert old.status is Status.FINISHED and old.output == [7] * 6
    while sched.has_work:
        run_step(sched)
        for s in list(sched.running):
            if check_stop(s, frozenset(), []):
                sched.finish(s, "length")
    assert new.output == [7] * 6 and new.preemptions >= 1


def test_check_stop_rules():
    s = seq("s", [1, 2], max_new=3)
    s.output = [5]
    assert check_stop(s, frozenset({9}), [[2, 5]]) == "stop"
    s.output = [9]
    assert check_stop(s, frozenset({9}), []) == "end"
    s.output = [4, 4, 4]
    assert check_stop(s, frozenset({9}), []) == "length"
    s.output = [4]
    assert check_stop(s, frozenset({9}), [[7, 4]]) is None


def test_pending_tokens_count_but_are_not_known_until_read():
    sched = Scheduler(BlockPool(64, 4), max_num_seqs=2, max_num_tokens=64)
    a = seq("a", [1, 2, 3], max_new=4)
    sched.add(a)
    first = sched.schedule()  # prefill; its token is on the device
    assert a.num_pending == 1 and a.num_tokens == 4 and a.num_known == 3
    second = sched.schedule()  # the decode of that pending token is planned before it is read
    assert [(c.start, c.num_tokens) for c in second.chunks] == [(3, 1)] and a.num_pending == 2
    sched.update_from_output(first, [11])
    sched.update_from_output(second, [12])
    assert a.output == [11, 12] and a.num_pending == 0


def test_requests_that_can_never_fit_are_told_apart():
    sched = Scheduler(BlockPool(5, 4), max_num_seqs=2, max_num_tokens=64)
    assert sched.fits(16) and not sched.fits(17)
    with pytest.raises(ValueError):
        BlockPool(1, 4)
