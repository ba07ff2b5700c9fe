"""The per-row sampler against transformers' logits processors and against plain probability."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tritonize.runtime.sampling import (
    Sampler,
    SamplingParams,
    SamplingRow,
    counter_uniform,
    top_k_top_p_filter,
    unit_interval,
)

V = 64


def rows_for(params_list, histories, **kw):
    return [
        SamplingRow(params=p, seed=kw.get("seed", 1234), slot=i, step=kw.get("step", 0), history=h,
                    end_ids=kw.get("end_ids", ()), stop_sequences=kw.get("stop_sequences", ()),
                    bad_sequences=kw.get("bad_sequences", ()), want_log_probs=kw.get("want_log_probs", False))
        for i, (p, h) in enumerate(zip(params_list, histories, strict=True))
    ]


def started_sampler(rows, prompts) -> Sampler:
    sampler = Sampler(V, len(rows), "cpu")
    for row, prompt in zip(rows, prompts, strict=True):
        sampler.start(row.slot, prompt, row.params)
    return sampler


@pytest.mark.parametrize(
    "params, greedy",
    [
        (SamplingParams(), True),
        (SamplingParams(top_k=1, temperature=0.7), True),
        (SamplingParams(temperature=0.0, top_p=0.9), True),
        (SamplingParams(top_k=0, top_p=0.0), True),
        (SamplingParams(seed=3), True),
        # TensorRT-LLM's rule: unset top_k and top_p are greedy, whatever the temperature
        (SamplingParams(temperature=1.0), True),
        (SamplingParams(temperature=0.7, seed=3), True),
        (SamplingParams(temperature=1.0, top_k=0), True),
        (SamplingParams(temperature=1.0, top_p=0.0), True),
        (SamplingParams(top_k=5), False),
        (SamplingParams(top_p=0.5), False),
        (SamplingParams(temperature=1.0, top_p=1.0), False),
        (SamplingParams(temperature=0.8, top_k=40), False),
    ],
)
def test_greedy_rule(params, greedy):
    assert params.greedy is greedy


@pytest.mark.parametrize(
    "params, word",
    [
        (SamplingParams(temperature=-1), "temperature"),
        (SamplingParams(top_k=-2), "top_k"),
        (SamplingParams(top_p=1.5), "top_p"),
        (SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
        (SamplingParams(presence_penalty=float("nan")), "presence_penalty"),
        (SamplingParams(min_tokens=-1), "min_tokens"),
    ],
)
def test_validate_names_the_field(params, word):
    with pytest.raises(ValueError, match=word):
        params.validate()


def test_repetition_penalty_and_temperature_match_transformers():
    torch.manual_seed(0)
    prompts = [[3, 5, 5, 9], [1, 2], [7, 7, 7, 40, 41]]
    generated = [[9, 11], [], [63, 0]]
    logits = torch.randn(3, V) * 3
    for penalty, temperature in [(1.3, None), (0.8, 0.7), (2.0, 1.6)]:
        params = SamplingParams(temperature=temperature, repetition_penalty=penalty)
        rows = rows_for([params] * 3, [p + g for p, g in zip(prompts, generated, strict=True)])
        sampler = started_sampler(rows, prompts)
        # Feed the generated tokens through the sampler's own bookkeeping, one step at a time.
        for step in range(2):
            active = [r for r, g in zip(rows, generated, strict=True) if len(g) > step]
            toks = torch.tensor([g[step] for g in generated if len(g) > step])
            sampler.record(active, toks)
        got = sampler.process(logits, rows)
        want = []
        for b in range(3):
            ids = torch.tensor([prompts[b] + generated[b]])
            ref = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits[b : b + 1].clone())
            if temperature:
                ref = TemperatureLogitsWarper(temperature)(ids, ref)
            want.append(ref[0])
        torch.testing.assert_close(got, torch.stack(want))


def test_presence_and_frequency_penalties_follow_the_definition():
    torch.manual_seed(1)
    prompt, generated = [4, 4, 8, 15], [16, 4, 23]
    logits = torch.randn(1, V) * 2
    params = SamplingParams(temperature=0.5, presence_penalty=0.7, frequency_penalty=0.3)
    rows = rows_for([params], [prompt + generated])
    sampler = started_sampler(rows, [prompt])
    for tok in generated:
        sampler.record(rows, torch.tensor([tok]))
    got = sampler.process(logits, rows)[0]
    counts = Counter(prompt + generated)
    want = logits[0] / 0.5  # TensorRT-LLM: temperature first, then the penalties
    for tok, n in counts.items():
        want[tok] -= 0.7 + 0.3 * n
    torch.testing.assert_close(got, want)
    # A row without penalties in the same slot must not see the previous occupant's counts.
    plain = rows_for([SamplingParams()], [prompt])
    torch.testing.assert_close(sampler.process(logits, plain), logits)


def test_bad_sequences_match_transformers():
    torch.manual_seed(2)
    history = [5, 6, 7, 8, 9]
    bad = [[3], [8, 9, 10], [7, 11], [9, 12], [1, 2, 13]]
    logits = torch.randn(1, V)
    got = Sampler(V, 1, "cpu").process(logits, rows_for([SamplingParams()], [history], bad_sequences=bad))
    want = NoBadWordsLogitsProcessor(bad)(torch.tensor([history]), logits.clone())
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert sorted(torch.nonzero(torch.isinf(got[0])).flatten().tolist()) == [3, 10, 12]


def test_min_tokens_bans_end_ids_and_stop_ends_until_reached():
    torch.manual_seed(3)
    prompt = [1, 2, 3]
    ends, stops = [0, 2], [[5], [3, 6], [4, 7]]
    logits = torch.randn(1, V)
    params = SamplingParams(min_tokens=2)
    for step, history in [(0, prompt), (1, prompt + [9]), (2, prompt + [9, 10])]:
        rows = rows_for([params], [history], step=step, end_ids=ends, stop_sequences=stops)
        got = Sampler(V, 1, "cpu").process(logits, rows)
        ref = MinNewTokensLengthLogitsProcessor(len(prompt), 2, ends)(torch.tensor([history]), logits.clone())
        banned = set(torch.nonzero(torch.isinf(got[0])).flatten().tolist())
        ref_banned = set(torch.nonzero(torch.isinf(ref[0])).flatten().tolist())
        # transformers knows no stop sequences: its bans are ours minus the stop-sequence ends.
        stop_bans = ({5, 6} if history[-1] == 3 else {5}) if step < 2 else set()
        assert banned == ref_banned | stop_bans


def test_top_k_top_p_filter_matches_transformers_warpers():
    torch.manual_seed(4)
    logits = torch.randn(4, V) * 2
    settings = [(5, 1.0), (0, 0.6), (10, 0.5), (0, 1.0)]
    got = top_k_top_p_filter(logits, torch.tensor([k for k, _ in settings]),
                             torch.tensor([p for _, p in settings], dtype=torch.float32))
    for b, (k, p) in enumerate(settings):
        ref = logits[b : b + 1].clone()
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1.0:
            ref = TopPLogitsWarper(p)(None, ref)
        assert torch.equal(torch.isinf(got[b]), torch.isinf(ref[0])), (k, p)
    assert int(torch.isfinite(got[0]).sum()) == 5


def test_greedy_top_k_1_and_temperature_0_take_the_argmax():
    torch.manual_seed(5)
    logits = torch.randn(3, V)
    params = [SamplingParams(), SamplingParams(top_k=1, temperature=2.0), SamplingParams(temperature=0)]
    result = Sampler(V, 3, "cpu").sample(logits, rows_for(params, [[1]] * 3))
    assert result.tokens.tolist() == logits.argmax(-1).tolist()


def test_log_probs_are_log_softmax_of_the_processed_logits():
    torch.manual_seed(6)
    logits = torch.randn(2, V) * 3
    params = [SamplingParams(), SamplingParams(temperature=0.6, top_k=8, seed=9)]
    result = Sampler(V, 2, "cpu").sample(logits, rows_for(params, [[1], [1]], want_log_probs=True))
    greedy_lp = torch.log_softmax(logits[0], -1)[result.tokens[0]]
    sampled_lp = torch.log_softmax(logits[1] / 0.6, -1)[result.tokens[1]]
    assert result.log_probs.tolist() == pytest.approx([greedy_lp.item(), sampled_lp.item()], abs=1e-5)


def test_samples_follow_the_processed_distribution():
    """Empirical frequencies over many counter steps match softmax(logits / T), restricted to top-k."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0] + [-8.0] * (V - 6))
    n = 6000
    for params, support in [(SamplingParams(temperature=0.8, top_p=1.0, seed=11), V), (SamplingParams(top_k=3, seed=5), 3)]:
        rows = [SamplingRow(params=params, seed=params.seed, slot=0, step=s, history=[1]) for s in range(n)]
        tokens = Sampler(V, 1, "cpu").sample(logits.expand(n, V), rows).tokens.tolist()
        scaled = logits / (params.temperature or 1.0)
        scaled[support:] = float("-inf")
        probs = torch.softmax(scaled, -1)
        freq = torch.bincount(torch.tensor(tokens), minlength=V).float() / n
        assert set(tokens) <= set(range(support))
        # 4.5 binomial standard deviations: fails for a wrong distribution, practically never by chance.
        tolerance = 4.5 * torch.sqrt(probs * (1 - probs) / n) + 1e-3
        assert bool(((freq - probs).abs() <= tolerance).all()), (freq[:6], probs[:6])


def test_seeded_draws_do_not_depend_on_the_batch():
    torch.manual_seed(7)
    logits = torch.randn(5, V)
    params = SamplingParams(temperature=1.0, top_p=1.0, seed=42)
    alone = Sampler(V, 1, "cpu").sample(logits[2:3], [SamplingRow(params, 42, 0, 3, [1])]).tokens
    others = [SamplingRow(SamplingParams(temperature=1.3, top_p=0.9), 100 + i, i, i, [2]) for i in range(5)]
    others[2] = SamplingRow(params, 42, 2, 3, [1])
    in_batch = Sampler(V, 5, "cpu").sample(logits, others).tokens
    assert int(in_batch[2]) == int(alone[0])
    draws = {tuple(Sampler(V, 1, "cpu").sample(logits[:1], [SamplingRow(params, seed, 0, 0, [1])]).tokens.tolist())
             for seed in range(40)}
    assert len(draws) > 5


def test_counter_uniform_is_uniform_and_row_specific():
    u = counter_uniform([1, 1, 2], [0, 1, 0], 20000, "cpu")
    edge = unit_interval(torch.tensor([0, 1, 2**31, 2**32 - 1], dtype=torch.int64))
    assert float(edge.min()) > 0.0 and float(edge.max()) < 1.0
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    for row in u:
        assert abs(float(row.mean()) - 0.5) < 0.01
        hist = torch.histc(row, bins=10, min=0, max=1) / row.numel()
        assert bool(((hist - 0.1).abs() < 0.01).all())
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert abs(float(torch.corrcoef(u[:2])[0, 1])) < 0.03
    assert torch.equal(u[0], counter_uniform([1], [0], 20000, "cpu")[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_step_with_banned_tokens_never_waits_for_the_device():
    """min_tokens bans the end ids each step: masking them must not synchronize with the GPU (it did: a host
    scalar copied into a CUDA tensor waits for the step's forward)."""
    sampler = Sampler(1000, 4, "cuda")
    params = SamplingParams(min_tokens=8, temperature=0.7, top_k=50, seed=3)
    rows = [SamplingRow(params=params, seed=3, slot=i, step=1, history=[1, 2], end_ids=[2, 7],
                        bad_sequences=[[5]]) for i in range(4)]
    logits = torch.randn(4, 1000, device="cuda")
    sampler.sample(logits, rows)  # the first use may allocate; what follows is a step like any other
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sampler.sample(logits, rows).tokens
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert not set(tokens.tolist()) & {2, 5, 7}
