"""The in-flight batching engine on a tiny Llama, checked against transformers running the same weights."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch
from fixtures import engine_llama

from tritonize.runtime.engine import Engine
from tritonize.runtime.request import EngineError, GenerationRequest, SamplingParams, StepOutput

PROMPTS = [[1, 17, 42, 99, 7], [1, 250, 3], [1] + list(range(60, 90)), [1, 5, 5, 5, 8, 200, 31, 64, 2, 9, 11]]
TIMEOUT = 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    return path, engine_llama(path)


@pytest.fixture(scope="module")
def engine(tiny):
    eng = Engine(tiny[0], device="cpu", max_batch_size=4, max_seq_len=128, max_num_tokens=16).start()
    yield eng
    eng.shutdown()


def gen(eng: Engine, prompts, n, **kw) -> list[list[int]]:
    return eng.generate(prompts, n, timeout=TIMEOUT, **kw)


def hf_greedy(model, prompt, n, **kw):
    kw.setdefault("eos_token_id", None)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


class Collector:
    """Gathers one request's outputs; ``wait`` returns them once the final one arrived."""

    def __init__(self, then=None):
        self.outputs: list[StepOutput] = []
        self.done = threading.Event()
        self.then = then

    def __call__(self, out: StepOutput) -> None:
        self.outputs.append(out)
        if self.then is not None:
            self.then(self)
        if out.finished:
            self.done.set()

    def wait(self) -> list[StepOutput]:
        assert self.done.wait(TIMEOUT), "request did not finish"
        return self.outputs

    @property
    def tokens(self) -> list[int]:
        return [t for out in self.wait() for t in out.token_ids]

    @property
    def final(self) -> StepOutput:
        return self.wait()[-1]


def request(rid, prompt, n, collector, **kw):
    return GenerationRequest(request_id=rid, prompt_ids=prompt, max_new_tokens=n, on_output=collector, **kw)


def test_concurrent_greedy_equals_transformers(tiny, engine):
    _, model = tiny
    before = len(engine.stats["decode_batch_sizes"])
    outputs = gen(engine, PROMPTS, 12, end_ids=[])
    for prompt, got in zip(PROMPTS, outputs, strict=True):
        assert got == hf_greedy(model, prompt, 12)
    sizes = list(engine.stats["decode_batch_sizes"])[before:]
    assert max(sizes) == len(PROMPTS)
    # The 31-token prompt does not fit the 16-token budget: it was prefilled in several chunks.
    assert max(engine.stats["prefill_chunks"]) <= 16


def test_staggered_arrivals_join_the_running_batch(tiny, engine):
    _, model = tiny
    collectors: list[Collector] = []

    def chain(i):
        # Request i+1 arrives while request i is mid-stream, after its 3rd token.
        def then(c: Collector) -> None:
            if i + 1 < len(PROMPTS) and sum(len(o.token_ids) for o in c.outputs) == 3 and len(collectors) == i + 1:
                submit(i + 1)
        return then

    def submit(i):
        collectors.append(Collector(then=chain(i)))
        engine.submit(request(f"stagger-{i}", PROMPTS[i], 10, collectors[i], stream=True))

    before = len(engine.stats["decode_batch_sizes"])
    submit(0)
    for i in range(len(PROMPTS)):
        while len(collectors) <= i:
            threading.Event().wait(0.01)
        assert collectors[i].tokens == hf_greedy(model, PROMPTS[i], 10)
    sizes = list(engine.stats["decode_batch_sizes"])[before:]
    assert sizes[0] == 1 and max(sizes) >= 3, sizes


def test_seed_reproducible_whatever_the_batch(engine):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    alone = gen(engine, [PROMPTS[0]], 10, sampling=params, end_ids=[])[0]
    crowd = [Collector() for _ in range(3)]
    for i, c in enumerate(crowd):
        engine.submit(request(f"crowd-{i}", PROMPTS[i + 1], 10, c, sampling=SamplingParams(temperature=1.2, top_p=1.0)))
    mine = Collector()
    engine.submit(request("seeded", PROMPTS[0], 10, mine, sampling=params))
    assert mine.tokens == alone
    other_seed = gen(engine, [PROMPTS[0]], 10, sampling=SamplingParams(temperature=1.0, top_p=0.95, seed=99), end_ids=[])
    assert other_seed[0] != alone


def test_top_k_1_is_greedy(engine):
    greedy = gen(engine, PROMPTS, 8, end_ids=[])
    assert gen(engine, PROMPTS, 8, sampling=SamplingParams(top_k=1, temperature=0.8, seed=5), end_ids=[]) == greedy


def test_stop_sequence_is_kept_and_end_ids_are_dropped(engine):
    prompt = PROMPTS[3]
    greedy = gen(engine, [prompt], 12, end_ids=[])[0]
    stop = greedy[3:5]
    first = next(i for i in range(len(greedy) - 1) if greedy[i : i + 2] == stop)
    c = Collector()
    engine.submit(request("stop", prompt, 12, c, stop_sequences=[[255, 254], stop]))
    assert c.tokens == greedy[: first + 2] and c.final.finish_reason == "stop"

    k = next(i for i in range(2, len(greedy)) if greedy[i] not in greedy[:i])
    c = Collector()
    engine.submit(request("ends", prompt, 12, c, end_ids=[251, greedy[k]]))
    assert c.tokens == greedy[:k] and c.final.finish_reason == "end"
    assert c.final.num_output_tokens == k and c.final.num_input_tokens == len(prompt)


def test_min_tokens_matches_transformers(tiny, engine):
    _, model = tiny
    prompt = PROMPTS[0]
    eos = hf_greedy(model, prompt, 1)[0]
    ref = hf_greedy(model, prompt, 10, eos_token_id=eos, min_new_tokens=4)
    c = Collector()
    engine.submit(request("min", prompt, 10, c, end_ids=[eos], sampling=SamplingParams(min_tokens=4)))
    assert c.tokens == [t for t in ref if t != eos][: len(c.tokens)]
    assert len(c.tokens) >= 4 and eos not in c.tokens
    assert c.tokens == (ref[:-1] if ref[-1] == eos else ref)


def test_bad_sequences_match_transformers(tiny, engine):
    _, model = tiny
    prompt = PROMPTS[1]
    greedy = hf_greedy(model, prompt, 10)
    bad = [[greedy[1]], [greedy[2], greedy[3]], [prompt[-1], greedy[0]]]
    ref = hf_greedy(model, prompt, 10, bad_words_ids=bad)
    assert ref != greedy
    assert gen(engine, [prompt], 10, end_ids=[], bad_sequences=bad)[0] == ref


def test_repetition_penalty_matches_transformers(tiny, engine):
    _, model = tiny
    for prompt in PROMPTS[:2]:
        ref = hf_greedy(model, prompt, 12, repetition_penalty=1.8)
        assert ref != hf_greedy(model, prompt, 12)
        got = gen(engine, [prompt], 12, sampling=SamplingParams(repetition_penalty=1.8), end_ids=[])
        assert got[0] == ref


def test_presence_and_frequency_penalties_follow_the_definition(tiny, engine):
    _, model = tiny
    prompt, n = PROMPTS[3], 10
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1].float()
            for tok, count in Counter(seq).items():
                logits[tok] -= 0.9 + 0.4 * count
            seq.append(int(logits.argmax()))
    params = SamplingParams(presence_penalty=0.9, frequency_penalty=0.4)
    assert gen(engine, [prompt], n, sampling=params, end_ids=[])[0] == seq[len(prompt):]


def test_log_probs_match_transformers_logits(tiny, engine):
    _, model = tiny
    prompt = PROMPTS[2]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0,
                             eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    want = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens, strict=True)]
    c = Collector()
    engine.submit(request("lp", prompt, 6, c, return_log_probs=True))
    assert c.tokens == tokens
    assert c.final.log_probs == pytest.approx(want, abs=1e-4)
    assert c.final.cum_log_prob == pytest.approx(sum(want), abs=1e-3)


def test_streaming_one_token_per_callback(engine):
    plain = gen(engine, [PROMPTS[3]], 9, end_ids=[])[0]
    c = Collector()
    engine.submit(request("stream", PROMPTS[3], 9, c, stream=True, return_log_probs=True))
    outs = c.wait()
    assert [len(o.token_ids) for o in outs] == [1] * 9
    assert [o.finished for o in outs] == [False] * 8 + [True]
    assert [t for o in outs for t in o.token_ids] == plain
    assert all(len(o.log_probs) == 1 for o in outs)
    assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 9


def test_over_long_and_malformed_requests_are_rejected(engine):
    cases = [
        (request("long", [1] * 100, 29, None), "max_seq_len"),
        (request("empty", [], 5, None), "empty"),
        (request("vocab", [1, 300], 5, None), "vocabulary"),
        (request("temp", [1, 2], 5, None, sampling=SamplingParams(top_p=2.0)), "top_p"),
    ]
    for req, word in cases:
        c = Collector()
        req.on_output = c
        engine.submit(req)
        outs = c.wait()
        assert len(outs) == 1 and outs[0].finished and outs[0].finish_reason == "error"
        assert word in outs[0].error and outs[0].token_ids == []
    # 100 + 28 fits exactly.
    assert len(gen(engine, [[1] * 100], 28, end_ids=[])[0]) == 28


def test_queueing_when_all_slots_are_busy(tiny):
    _, model = tiny
    prompts = [PROMPTS[i % 4][: 3 + i] for i in range(7)]
    with Engine(tiny[0], device="cpu", max_batch_size=2, max_seq_len=64, max_num_tokens=8) as eng:
        outputs = gen(eng, prompts, 6, end_ids=[])
        assert max(eng.stats["decode_batch_sizes"]) == 2
    for prompt, got in zip(prompts, outputs, strict=True):
        assert got == hf_greedy(model, prompt, 6)


def test_cancel_frees_the_slot(tiny):
    _, model = tiny
    with Engine(tiny[0], device="cpu", max_batch_size=1, max_seq_len=128, max_num_tokens=8) as eng:
        def cancel_after_two(c: Collector) -> None:
            if len(c.outputs) == 2:
                eng.cancel("long")

        long, queued, waiting = Collector(then=cancel_after_two), Collector(), Collector()
        eng.submit(request("long", PROMPTS[0], 100, long, stream=True))
        eng.submit(request("next", PROMPTS[1], 5, queued))
        eng.submit(request("gone", PROMPTS[1], 5, waiting))
        assert eng.cancel("gone") and not eng.cancel("no-such-request")
        assert waiting.final.finish_reason == "cancelled"
        assert long.final.finish_reason == "cancelled" and len(long.tokens) < 10
        assert queued.tokens == hf_greedy(model, PROMPTS[1], 5)
        assert max(eng.stats["decode_batch_sizes"]) == 1

        # A client that went away (polled through is_cancelled) frees the slot the same way.
        gone = threading.Event()
        eng.cancel_poll_interval_s = 0.0
        polled, after = Collector(then=lambda c: gone.set() if len(c.outputs) == 3 else None), Collector()
        eng.submit(request("polled", PROMPTS[2], 60, polled, stream=True, is_cancelled=gone.is_set))
        eng.submit(request("after", PROMPTS[3], 5, after))
        assert polled.final.finish_reason == "cancelled" and len(polled.tokens) == 3
        assert after.tokens == hf_greedy(model, PROMPTS[3], 5)
        assert sum(eng.stats["decode_batch_histogram"].values()) == len(eng.stats["decode_batch_sizes"])


def test_a_failing_step_finishes_its_requests_and_the_engine_goes_on(tiny):
    _, model = tiny
    with Engine(tiny[0], device="cpu", max_batch_size=2, max_seq_len=64) as eng:
        real = eng.runner.launch
        calls = {"n": 0}

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected fault")
            return real(*args, **kwargs)

        eng.runner.launch = flaky
        with pytest.raises(EngineError, match="injected fault"):
            gen(eng, PROMPTS[:2], 5, end_ids=[])
        assert gen(eng, [PROMPTS[0]], 5, end_ids=[])[0] == hf_greedy(model, PROMPTS[0], 5)

        def broken_client(out: StepOutput) -> None:
            raise ConnectionError("client went away")

        eng.submit(request("rude", PROMPTS[1], 50, broken_client, stream=True))
        assert gen(eng, [PROMPTS[1]], 5, end_ids=[])[0] == hf_greedy(model, PROMPTS[1], 5)
        assert eng.stats["finished"].get("cancelled", 0) == 1


def test_shutdown_fails_what_is_left(tiny):
    eng = Engine(tiny[0], device="cpu", max_batch_size=1, max_seq_len=64)
    queued = Collector()
    eng.submit(request("never", PROMPTS[0], 5, queued))  # not started: it waits in the queue
    eng.shutdown()
    assert queued.final.finish_reason == "error" and "shut down" in queued.final.error
    late = Collector()
    eng.submit(request("late", PROMPTS[0], 5, late))
    assert late.final.finish_reason == "error"


@pytest.mark.parametrize("budget", [24, 256, 2048, 8192])
def test_prompt_steps_pad_by_at_most_a_quarter_above_256_tokens(budget):
    """A step with prompt chunks replays the graph of the next token bucket: the padding is computed, so above
    256 tokens (where a step's cost grows with its tokens) no step pads by more than a quarter of its size."""
    from tritonize.runtime.runner import token_buckets

    buckets = token_buckets(budget)
    assert buckets == sorted(set(buckets)) and buckets[0] == min(16, budget) and buckets[-1] == budget
    for tokens in range(1, budget + 1):
        bucket = next(b for b in buckets if b >= tokens)
        assert bucket <= max(256, tokens * 1.25), (tokens, bucket)
    assert len(buckets) <= 5 + 4 * max(0, (budget // 256).bit_length())  # four graphs per doubling


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph decode path needs a GPU")
def test_cuda_graph_decode_matches_transformers(tiny):
    path, model = tiny
    with Engine(path, device="cuda", dtype="float32", max_batch_size=6, max_seq_len=128) as eng:
        assert eng.kernels and eng.runner.shapes()
        outputs = gen(eng, PROMPTS, 12, end_ids=[])
        # every shape was captured at start: prompt steps and decode steps alike replay a graph
        assert set(eng.runner.graphs) == set(eng.runner.shapes()) and not eng.runner.failed
        assert eng.stats["decode_steps"] > 0 and eng.stats["mixed_steps"] > 0
        for prompt, got in zip(PROMPTS, outputs, strict=True):
            assert got == hf_greedy(model, prompt, 12)
        seeded = SamplingParams(temperature=1.0, top_p=1.0, seed=7)
        alone = gen(eng, [PROMPTS[2]], 8, sampling=seeded, end_ids=[])[0]
        assert gen(eng, PROMPTS, 8, sampling=seeded, end_ids=[])[2] == alone


def test_a_shared_prefix_is_reused_and_gives_the_text_it_gives_alone(tiny):
    _, model = tiny
    shared = [1] + list(range(10, 70))  # 61 tokens: 15 full blocks of 4
    with Engine(tiny[0], device="cpu", max_batch_size=2, max_seq_len=128, max_num_tokens=32, block_size=4) as eng:
        first = gen(eng, [shared + [5, 6]], 6, end_ids=[])[0]
        before = eng.pool.stats.prefix_hit_tokens
        second = gen(eng, [shared + [7, 8, 9]], 6, end_ids=[])[0]
        assert eng.pool.stats.prefix_hit_tokens - before == 60
    assert first == hf_greedy(model, shared + [5, 6], 6)
    assert second == hf_greedy(model, shared + [7, 8, 9], 6)
    with Engine(tiny[0], device="cpu", max_batch_size=2, max_seq_len=128, block_size=4, prefix_cache=False) as eng:
        gen(eng, [shared + [5, 6]], 2, end_ids=[])
        gen(eng, [shared + [7, 8, 9]], 2, end_ids=[])
        assert eng.pool.stats.prefix_hit_tokens == 0


def test_a_pool_too_small_for_the_load_preempts_and_loses_nothing(tiny):
    _, model = tiny
    prompts = [[1] + list(range(20 + 7 * i, 40 + 7 * i)) for i in range(4)]  # 21 tokens each
    seeded = SamplingParams(temperature=1.0, top_p=1.0, seed=3)
    with Engine(tiny[0], device="cpu", max_batch_size=4, max_seq_len=64, max_num_tokens=64, block_size=4,
                kv_cache_tokens=64) as eng:  # room for two of the four at a time
        greedy_out = gen(eng, prompts, 14, end_ids=[])
        assert eng.pool.stats.preemptions > 0
        alone = gen(eng, [prompts[3]], 14, sampling=seeded, end_ids=[])[0]
        preempted_before = eng.pool.stats.preemptions
        crowded = gen(eng, prompts, 14, sampling=seeded, end_ids=[])[3]
        assert eng.pool.stats.preemptions > preempted_before
    assert crowded == alone
    for prompt, got in zip(prompts, greedy_out, strict=True):
        assert got == hf_greedy(model, prompt, 14)


def test_a_request_larger_than_the_pool_is_refused(tiny):
    with Engine(tiny[0], device="cpu", max_batch_size=2, max_seq_len=64, block_size=4, kv_cache_tokens=16) as eng:
        with pytest.raises(EngineError, match="do not fit the KV cache of 16 tokens"):
            gen(eng, [PROMPTS[0]], 20)


def test_final_outputs_carry_the_request_metrics(tiny):
    from tritonize.runtime.request import submit_and_wait

    shared = [1] + list(range(10, 42))  # 33 tokens: 8 full blocks of 4
    with Engine(tiny[0], device="cpu", max_batch_size=2, max_seq_len=64, block_size=4) as eng:
        gen(eng, [shared], 3, end_ids=[])
        (out,) = submit_and_wait(eng, [GenerationRequest("m", shared + [5], 4, end_ids=[])], timeout=TIMEOUT)
    m = out.metrics
    assert m.prefix_hit_tokens == 32 and m.kv_cache_reused_blocks == 8
    assert m.kv_cache_alloc_new_blocks == 2 and m.kv_cache_alloc_total_blocks == 10  # 34 + 3 tokens in the cache
    assert 0 < m.arrival_time_ns <= m.first_scheduled_time_ns <= m.first_token_time_ns <= m.last_token_time_ns
