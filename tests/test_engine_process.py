"""The engine in a process of its own (engine_process.py), on a tiny Llama, against transformers and against the
same engine in-process: the same tokens, the same outcomes for bad requests, cancellation, gauges, and a child
that dies."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from fixtures import engine_llama

from tritonize.runtime.engine import Engine
from tritonize.runtime.engine_process import EngineProcess, wants_engine_process
from tritonize.runtime.request import EngineError, GenerationRequest, SamplingParams, StepOutput

PROMPTS = [[1, 17, 42, 99, 7], [1, 250, 3], [1] + list(range(60, 90)), [1, 5, 5, 5, 8, 200, 31, 64, 2, 9, 11]]
OPTIONS = dict(device="cpu", dtype="float32", max_batch_size=4, max_seq_len=128, max_num_tokens=16)
TIMEOUT = 60


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    return path, engine_llama(path)


@pytest.fixture(scope="module")
def engine(tiny):
    eng = EngineProcess("torch", tiny[0], **OPTIONS).start()
    yield eng
    eng.shutdown()


def _greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_the_engine_process_gives_transformers_greedy_tokens_for_a_running_batch(engine, tiny):
    got = engine.generate(PROMPTS, 12, end_ids=[], timeout=TIMEOUT)
    assert got == [_greedy(tiny[1], p, 12) for p in PROMPTS]
    assert engine.default_end_ids == [2]
    assert engine.device == "cpu"  # the child's resolved device, which warm artifacts record


def test_streamed_outputs_arrive_in_order_and_equal_the_in_process_engine(engine, tiny):
    local = Engine(tiny[0], **OPTIONS).start()
    try:
        sampling = SamplingParams(temperature=0.8, top_k=20, seed=7)
        expected = local.generate(PROMPTS[:2], 10, sampling=sampling, end_ids=[], timeout=TIMEOUT)
    finally:
        local.shutdown()
    streams = {i: [] for i in range(2)}
    done = threading.Event()
    finished = []

    def on_output(i):
        def take(out: StepOutput) -> None:
            streams[i].append(out)
            if out.finished:
                finished.append(i)
                if len(finished) == 2:
                    done.set()
        return take

    for i, prompt in enumerate(PROMPTS[:2]):
        engine.submit(GenerationRequest(f"stream-{i}", list(prompt), 10, sampling=sampling, stream=True,
                                        on_output=on_output(i)))
    assert done.wait(TIMEOUT)
    for i in range(2):
        assert [t for out in streams[i] for t in out.token_ids] == expected[i]
        assert [out.finished for out in streams[i]] == [False] * (len(streams[i]) - 1) + [True]
        assert streams[i][-1].finish_reason == "length" and streams[i][-1].metrics.first_token_time_ns > 0


def test_a_bad_request_gets_the_engines_one_line_error_and_the_process_keeps_serving(engine, tiny):
    with pytest.raises(EngineError, match="exceeds"):
        engine.generate([[1] * 200], 8, end_ids=[], timeout=TIMEOUT)
    assert engine.generate([PROMPTS[1]], 4, end_ids=[], timeout=TIMEOUT) == [_greedy(tiny[1], PROMPTS[1], 4)]


def _collector(on_output=None):
    """A request's outputs as they come, an event set by the last, and the callback; ``on_output(outs)`` runs
    after each output that is not the last."""
    outs: list[StepOutput] = []
    done = threading.Event()

    def take(out: StepOutput) -> None:
        outs.append(out)
        if out.finished:
            done.set()
        elif on_output is not None:
            on_output(outs)

    return outs, done, take


def test_cancel_stops_a_request_and_the_gauges_return_to_zero(engine):
    outs, done, take = _collector(lambda outs: engine.cancel("long") if len(outs) == 2 else None)
    engine.submit(GenerationRequest("long", [1, 2, 3], 100, stream=True, on_output=take))
    assert done.wait(TIMEOUT)
    assert outs[-1].finish_reason == "cancelled" and len(outs) < 100
    deadline = time.monotonic() + 5
    while (engine.num_running or engine.num_waiting) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (engine.num_running, engine.num_waiting) == (0, 0)
    assert 0.0 <= engine.pool.usage() <= 1.0
    assert sum(engine.stats["decode_batch_histogram"].values()) > 0
    assert engine.cancel("never-submitted") is False


def test_a_model_that_cannot_load_fails_the_start_with_the_childs_one_line_reason(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EngineError) as info:
        EngineProcess("torch", tmp_path, **OPTIONS)
    assert "\n" not in str(info.value) and str(info.value)


def test_a_child_that_dies_fails_open_and_later_requests_with_one_line(tiny):
    eng = EngineProcess("torch", tiny[0], **OPTIONS).start()
    try:
        outs, done, take = _collector()
        eng.submit(GenerationRequest("doomed", [1, 2, 3], 120, stream=True, on_output=take))
        while not outs:
            time.sleep(0.01)
        os.kill(eng.child.pid, signal.SIGKILL)
        assert done.wait(TIMEOUT)
        assert outs[-1].finish_reason == "error" and "engine process exited" in outs[-1].error
        with pytest.raises(EngineError, match="engine process exited"):
            eng.generate([PROMPTS[0]], 2, end_ids=[], timeout=TIMEOUT)
    finally:
        eng.shutdown(timeout=5)


def test_the_engine_gets_its_own_process_only_when_the_environment_asks(monkeypatch):
    monkeypatch.delenv("TRITONIZE_ENGINE_PROCESS", raising=False)
    assert not wants_engine_process()
    monkeypatch.setenv("TRITONIZE_ENGINE_PROCESS", "1")
    assert wants_engine_process()
    monkeypatch.setenv("TRITONIZE_ENGINE_PROCESS", "0")
    assert not wants_engine_process()
