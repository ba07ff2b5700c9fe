"""The two TensorRT-LLM engines' request handling, driven through stand-ins for TensorRT-LLM at its
documented call shapes (tests/fixtures/fake_trtllm.py): what they answer, how they refuse, and that a
stop sequence ends a request with the sequence kept, as the torch engine does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures import fake_trtllm

from tritonize.runtime.grammar import Guide
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


SCHEMA = '{"type": "object", "properties": {"a": {"type": "integer"}}}'
GUIDES = [Guide("json"), Guide("json_schema", SCHEMA), Guide("regex", "[a-z]+"), Guide("ebnf_grammar", 'root ::= "a"'),
          Guide("structural_tag", '{"type": "structural_tag"}')]


@pytest.mark.parametrize("runtime", ["trtllm", "trtllm-engine"])
def test_guides_reach_tensorrt_llm_as_its_documented_parameters(runtime, monkeypatch, model_dir):
    """LLM API: LLM(guided_decoding_backend="xgrammar") and SamplingParams(guided_decoding=GuidedDecodingParams(
    json=..., regex=..., grammar=..., json_object=..., structural_tag=...)); executor: ExecutorConfig(
    guided_decoding_config=GuidedDecodingConfig(XGRAMMAR, encoded_vocab, tokenizer_str, stop_token_ids)) and
    Request(guided_decoding_params=GuidedDecodingParams(GuideType, guide))."""
    import shutil

    from fixtures.models import REAL_NEMO2

    shutil.copy(REAL_NEMO2 / "hf" / "tokenizer.json", model_dir / "tokenizer.json")
    fake_trtllm.install(monkeypatch)
    requests = [GenerationRequest(f"g{i}", [1, 2], 3, guide=g) for i, g in enumerate(GUIDES)]
    if runtime == "trtllm":
        from tritonize.runtime.trtllm_engine import TrtllmEngine

        with TrtllmEngine(model_dir, max_batch_size=2, max_seq_len=32) as eng:
            assert eng.llm.kwargs["guided_decoding_backend"] == "xgrammar"
            assert eng.llm.kwargs["skip_tokenizer_init"] is False
            outs = submit_and_wait(eng, requests, timeout=10)
            sent = [p.kwargs.get("guided_decoding") for p in eng.llm.sampling_params]
        assert [g.kwargs for g in sent] == [{"json_object": True}, {"json": SCHEMA}, {"regex": "[a-z]+"},
                                            {"grammar": 'root ::= "a"'},
                                            {"structural_tag": '{"type": "structural_tag"}'}]
        assert all(p.kwargs["detokenize"] is False for p in eng.llm.sampling_params)
    else:
        from tritonize.runtime.trtllm_executor import TrtllmExecutorEngine

        with TrtllmExecutorEngine(model_dir, engine_dir=model_dir / "engine", max_batch_size=2, max_seq_len=32) as eng:
            config = eng.executor.args[2].kwargs["guided_decoding_config"].kwargs
            outs = submit_and_wait(eng, requests, timeout=10)
            sent = [r.kwargs["guided_decoding_params"].args for r in eng.executor.requests]
        assert config["backend"] == "XGRAMMAR" and config["stop_token_ids"] == [2]
        assert len(config["encoded_vocab"]) == 32000 and config["encoded_vocab"][2] == "</s>"
        assert config["tokenizer_str"] == (model_dir / "tokenizer.json").read_text()
        assert sent == [("JSON", None), ("JSON_SCHEMA", SCHEMA), ("REGEX", "[a-z]+"), ("EBNF_GRAMMAR", 'root ::= "a"'),
                        ("STRUCTURAL_TAG", '{"type": "structural_tag"}')]
    assert [o.finish_reason for o in outs] == ["length"] * len(GUIDES)


def test_without_tokenizer_files_a_guided_request_is_refused_in_one_line(engine):
    [out] = submit_and_wait(engine, [GenerationRequest("g", [1], 3, guide=Guide("regex", "a+"))], timeout=10)
    assert out.finish_reason == "error" and "guided decoding is not available" in out.error and "\n" not in out.error
    assert engine.generate([[1]], 2, timeout=10) == [fake_trtllm.tokens(2)]
