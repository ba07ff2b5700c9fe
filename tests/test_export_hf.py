"""Export of Hugging Face checkpoints: every family, .bin weights, Mixtral's two spellings, dtypes, shards."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import FAMILIES, bpe_model, gpt2_bpe_tokenizer_dir, logits
from safetensors.torch import save_file

from tritonize.export import export_checkpoint


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_checkpoint_exports_to_the_same_logits_and_tokenizer(family, tmp_path):
    model = bpe_model(family)
    model.save_pretrained(tmp_path / "hf")
    gpt2_bpe_tokenizer_dir(tmp_path / "hf", vocab_size=300)
    result = export_checkpoint(tmp_path / "hf", tmp_path / "out", progress=False, verify=True)
    assert result.source_kind == "hf" and result.architecture == type(model).__name__
    assert result.verify["passed"] and result.verify["max_abs_logit_diff"] < 1e-5
    assert torch.equal(logits(tmp_path / "out"), logits(model))
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == 0


def test_pytorch_bin_weights(tmp_path):
    """``pytorch_model.bin`` (a torch.save archive) is read without torch.load's pickle."""
    model = bpe_model("gpt")
    model.save_pretrained(tmp_path / "hf")
    next((tmp_path / "hf").glob("*.safetensors")).unlink()
    torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    export_checkpoint(tmp_path / "hf", tmp_path / "out", progress=False)
    assert torch.equal(logits(tmp_path / "out"), logits(model))


def test_mixtral_fused_expert_names(tmp_path):
    """transformers 5.x keeps experts as mlp.experts.gate_up_proj [E, 2I, H]; files use w1/w2/w3."""
    model = bpe_model("mixtral")
    src = tmp_path / "hf"
    src.mkdir()
    model.config.save_pretrained(src)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(src / "model.safetensors"))
    export_checkpoint(src, tmp_path / "out", progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in index
    assert not any("gate_up_proj" in k for k in index)
    assert torch.equal(logits(tmp_path / "out"), logits(model))


def test_bfloat16_and_many_shards(tmp_path):
    model = bpe_model("llama")
    model.save_pretrained(tmp_path / "hf")
    result = export_checkpoint(tmp_path / "hf", tmp_path / "out", dtype="bfloat16", progress=False,
                               max_shard_bytes=64 << 10)
    shards = sorted(p.name for p in (tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(result.files) == set(shards)
    want = bpe_model("llama").to(torch.bfloat16).float()
    assert torch.allclose(logits(tmp_path / "out"), logits(want), atol=1e-5, rtol=0)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"


def test_rope_scaling_is_kept(tmp_path):
    model = bpe_model("llama", rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    plain = bpe_model("llama", rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    assert not torch.allclose(logits(model), logits(plain))  # the scaling matters for this model
    model.save_pretrained(tmp_path / "hf")
    export_checkpoint(tmp_path / "hf", tmp_path / "out", progress=False, verify=True)
    assert torch.equal(logits(tmp_path / "out"), logits(model))
