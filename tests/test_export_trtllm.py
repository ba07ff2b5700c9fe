"""TRT-LLM checkpoints and .qnemo in, and TRT-LLM checkpoints out.

In: checkpoints written by the fixture builders (TensorRT-LLM's documented layout), tensor- and
pipeline-parallel, FP8 with scales, and .qnemo with each tokenizer placement. Out:
``--format trtllm-checkpoint`` is compared rank by rank, tensor by tensor, with what the fixture
writer produces for the same model and parallelism.
"""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import (
    FAMILIES,
    MQA_FAMILIES,
    bpe_model,
    gpt2_bpe_tokenizer_dir,
    logits,
    sentencepiece_tokenizer_dir,
    tiny_model,
    write_qnemo,
)
from fixtures import write_trtllm_checkpoint as write_trt_fixture
from safetensors.torch import load_file

from tritonize.export import ExportError, export_checkpoint


@pytest.mark.parametrize("family", FAMILIES)
def test_trtllm_checkpoint_tp2_pp2(family, tmp_path):
    """tp=2 x pp=2 ranks merged back: q/k/v per rank, duplicated kv heads, padded lm_head."""
    model = bpe_model(family)
    src = write_trt_fixture(model, tmp_path / "trt", tp_size=2, pp_size=2)
    result = export_checkpoint(src, tmp_path / "out", progress=False, verify=True)
    assert result.source_kind == "trtllm"
    assert result.verify["passed"]
    assert torch.allclose(logits(tmp_path / "out"), logits(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "mixtral", "gemma", "falcon", "gptnext"])
def test_qnemo_fp8_dequantized(family, bpe_dir, tmp_path):
    """--no-keep-fp8: FP8 weights with per-tensor scales come out in the checkpoint dtype, equal to fp8 * scale."""
    model = bpe_model(family)
    src = write_qnemo(model, bpe_dir, tmp_path / "m.qnemo", tar=True, tp_size=2 if family not in MQA_FAMILIES else 1,
                      dtype="bfloat16", fp8=True)
    result = export_checkpoint(src, tmp_path / "out", progress=False, verify=True, keep_fp8=False)
    assert result.dtype == "bfloat16" and result.tokenizer == "huggingface"
    assert result.verify["passed"]
    got, want = logits(tmp_path / "out"), logits(model)
    # FP8 quantization error only: well under the logit scale, same argmax on most positions.
    assert float((got - want).abs().max()) < 0.1 * float(want.abs().max())
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.8


def test_qnemo_dequantization_is_exact(tmp_path):
    """A float32 .qnemo: each exported weight equals fp8 * weights_scaling_factor of the source."""
    model = bpe_model("llama")
    fp8 = write_qnemo(model, gpt2_bpe_tokenizer_dir(tmp_path / "bpe"), tmp_path / "q", dtype="float32", fp8=True)
    export_checkpoint(fp8, tmp_path / "out", progress=False, keep_fp8=False)
    rank0 = load_file(str(fp8 / "rank0.safetensors"))
    w = rank0["transformer.layers.1.mlp.proj.weight"]
    assert w.dtype == torch.float8_e4m3fn
    expected = w.float() * rank0["transformer.layers.1.mlp.proj.weights_scaling_factor"]
    out = {}
    for f in (tmp_path / "out").glob("model-*.safetensors"):
        out.update(load_file(str(f)))
    assert torch.equal(out["model.layers.1.mlp.down_proj.weight"], expected)


@pytest.mark.parametrize("layout", ["huggingface_tokenizer", "nemo_context", "tokenizer.model"])
def test_qnemo_tokenizer_layouts(layout, tmp_path):
    sp = sentencepiece_tokenizer_dir(tmp_path / "sp")
    model = tiny_model("llama")
    src = write_qnemo(model, sp, tmp_path / "q", tokenizer_layout=layout, fp8=False, dtype="float32")
    result = export_checkpoint(src, tmp_path / "out", progress=False)
    assert result.tokenizer == "sentencepiece"  # a tokenizer.model, wherever the .qnemo keeps it
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == (sp / "tokenizer.model").read_bytes()
    assert torch.allclose(logits(tmp_path / "out"), logits(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_trtllm_checkpoint_output_matches_documented_layout(family, tmp_path):
    """--format trtllm-checkpoint, tp=2 x pp=2 with an odd vocabulary: the same tensors rank by rank as
    the fixture writer (which follows TensorRT-LLM's convert.py), and it reads back to the same model."""
    model = bpe_model(family, vocab=301)
    model.save_pretrained(tmp_path / "hf")
    reference = write_trt_fixture(model, tmp_path / "ref", tp_size=2, pp_size=2)
    result = export_checkpoint(tmp_path / "hf", tmp_path / "out", fmt="trtllm-checkpoint", tp_size=2, pp_size=2,
                               progress=False)
    mine = result.trtllm_checkpoint
    config = json.loads((mine / "config.json").read_text())
    ref_config = json.loads((reference / "config.json").read_text())
    for key in ("architecture", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_size",
                "vocab_size", "position_embedding_type", "hidden_act", "mapping"):
        want = ref_config[key]
        if key == "mapping":
            want = {k: want[k] for k in ("world_size", "tp_size", "pp_size")}
            assert {k: config[key][k] for k in want} == want
        else:
            assert config[key] == want, key
    for rank in range(4):
        ours = load_file(str(mine / f"rank{rank}.safetensors"))
        theirs = load_file(str(reference / f"rank{rank}.safetensors"))
        missing = set(theirs) - set(ours)
        assert not missing, missing
        for name, t in ours.items():
            if name not in theirs:  # zero biases written where a family's single `bias` switch needs them
                assert not t.any(), name
                continue
            assert t.shape == theirs[name].shape and torch.equal(t.float(), theirs[name].float()), name
    # ... and that checkpoint exports back to the same model
    export_checkpoint(mine, tmp_path / "back", progress=False)
    assert torch.allclose(logits(tmp_path / "back"), logits(model), atol=1e-5, rtol=0)


def test_trtllm_output_refuses_impossible_split(tmp_path):
    model = bpe_model("llama")
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(ExportError, match="tensor parallelism 3"):
        export_checkpoint(tmp_path / "hf", tmp_path / "out", fmt="trtllm-checkpoint", tp_size=3, progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
