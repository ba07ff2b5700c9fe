"""The two TensorRT-LLM engines' request handling, driven through stand-ins for TensorRT-LLM at its
documented call shapes (tests/fixtures/fake_trtllm.py): what they answer, how they refuse, and that a
stop sequence ends a request with the sequence kept, as the torch engine does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures import fake_trtllm

from tritonize.runtime.request import GenerationRequest, submit_and_wait


@pytest.fixture
def model_dir(tmp_path) -> Path:
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "eos_token_id": 2, "pad_token_id": 0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.fixture(params=["trtllm", "trtllm-engine"])
def engine(request, monkeypatch, model_dir):
    fake_trtllm.install(monkeypatch)
    if request.param == "trtllm":
        from tritonize.runtime.trtllm_engine import TrtllmEngine

        made = TrtllmEngine(model_dir, max_batch_size=2, max_seq_len=32)
    else:
        from tritonize.runtime.trtllm_executor import TrtllmExecutorEngine

        made = TrtllmExecutorEngine(model_dir, engine_dir=model_dir / "engine", max_batch_size=2, max_seq_len=32)
    with made:
        yield made


def test_generates_and_streams(engine):
    assert engine.generate([[1, 2, 3], [4]], 4, timeout=10) == [fake_trtllm.tokens(4)] * 2
    [final] = submit_and_wait(engine, [GenerationRequest("s", [1, 2], 3, stream=True)], timeout=10)
    assert final.finished and final.finish_reason == "length" and final.num_output_tokens == 3
    assert engine.stats["finished"]["length"] >= 3


def test_a_stop_sequence_ends_the_request_and_stays_in_the_output(engine):
    stop = fake_trtllm.tokens(3)[1:]
    [out] = submit_and_wait(engine, [GenerationRequest("x", [1], 8, stop_sequences=[stop])], timeout=10)
    assert out.token_ids == fake_trtllm.tokens(3) and out.finish_reason == "stop"


def test_refusals_are_answered_not_raised(engine):
    outputs = []
    too_long = GenerationRequest("long", [1] * 30, 8, on_output=outputs.append)
    engine.submit(too_long)
    assert outputs[-1].finished and outputs[-1].finish_reason == "error" and "max_seq_len" in outputs[-1].error
    engine.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.submit(GenerationRequest("late", [1], 2, on_output=outputs.append))
