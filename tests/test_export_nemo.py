"""Export of NeMo checkpoints (NeMo 1 .nemo with torch_dist / zarr weights, NeMo 2 dirs).

Every case starts from a tiny random transformers model, writes it in a NeMo layout with the
fixture builders (tests/fixtures, built from the documented layouts, not from the converter),
exports it, loads the export with transformers and compares logits with the original model.
The real NeMo 2 checkpoint written by NeMo itself (../shared/fixtures/nemo2-llama) is one case.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from fixtures import (
    BPE_VOCAB,
    FAMILIES,
    MQA_FAMILIES,
    PROBE_IDS,
    REAL_NEMO2,
    bpe_model,
    logits,
    tiny_model,
    write_nemo1,
    write_nemo2,
)
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tritonize.export import export_checkpoint
from tritonize.export.tiktoken_convert import PATTERN_TIKTOKEN


def reference_logits(model, ids: torch.Tensor = PROBE_IDS, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The source model's logits, its weights first rounded to ``dtype`` as the export stores them."""
    if dtype != torch.float32:
        state = {k: v.to(dtype).float() for k, v in model.state_dict().items()}
        model = type(model)(model.config).eval()
        model.load_state_dict(state)
    with torch.no_grad():
        return model(ids).logits


def assert_matches(model, out: Path, atol: float = 1e-5, dtype: torch.dtype = torch.float32) -> None:
    got, want = logits(out), reference_logits(model, dtype=dtype)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=atol, rtol=0), float((got - want).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_nemo1_torch_dist_tar(family, bpe_dir, tmp_path):
    """A .nemo tar (torch_dist weights, trained with TP 2 where Megatron can shard it) of every family."""
    model = bpe_model(family)
    src = write_nemo1(model, bpe_dir, tmp_path / "m.nemo", tp_size=1 if family in MQA_FAMILIES else 2)
    result = export_checkpoint(src, tmp_path / "out", progress=False)
    assert result.source_kind == "nemo1"
    assert result.vocab_size == BPE_VOCAB  # Megatron's padded rows (384 or 512) are trimmed to the tokenizer
    assert_matches(model, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "export_manifest.json").read_text())
    assert manifest["source"]["weights_backend"] == "torch_dist"
    assert manifest["tokenizer"]["kind"] == "gpt2-bpe"
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (tmp_path / "out").iterdir()}


@pytest.mark.parametrize("family", FAMILIES)
def test_nemo1_zarr_dir_unfused_norms(family, bpe_dir, tmp_path):
    """An extracted .nemo with zarr weights and separate input_layernorm / pre_mlp_layernorm."""
    model = bpe_model(family)
    src = write_nemo1(model, bpe_dir, tmp_path / "m", backend="zarr", tar=False, fused_norms=False)
    result = export_checkpoint(src, tmp_path / "out", progress=False)
    assert result.manifest["source"]["weights_backend"] == "zarr"
    assert_matches(model, tmp_path / "out")


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "falcon"])
def test_nemo2_training_checkpoint_exports_to_the_same_logits(family, bpe_dir, tmp_path):
    """A NeMo 2 dir of every family NeMo 2 has (a training checkpoint: optimizer state is skipped)."""
    model = bpe_model(family)
    src = write_nemo2(model, bpe_dir, tmp_path / "ckpt", with_optimizer=True, tp_size=1 if family in MQA_FAMILIES else 2)
    result = export_checkpoint(src, tmp_path / "out", progress=False, verify=True)
    assert result.source_kind == "nemo2"
    assert result.verify["passed"] and result.verify["max_abs_logit_diff"] < 1e-4
    assert_matches(model, tmp_path / "out")


def test_model_types_map_to_architectures(bpe_dir, tmp_path):
    expected = {"gpt": "GPT2LMHeadModel", "gptnext": "NemotronForCausalLM", "llama": "LlamaForCausalLM",
                "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM", "gemma": "GemmaForCausalLM",
                "starcoder": "GPTBigCodeForCausalLM", "starcoder2": "Starcoder2ForCausalLM"}
    for family, arch in expected.items():
        src = write_nemo2(bpe_model(family), bpe_dir, tmp_path / family)
        result = export_checkpoint(src, tmp_path / f"out-{family}", progress=False)
        assert result.architecture == arch
        config = json.loads((tmp_path / f"out-{family}" / "config.json").read_text())
        assert config["architectures"] == [arch]


def test_real_nemo2_checkpoint(tmp_path):
    """The checkpoint NeMo's own importer wrote: logits equal transformers on its HF source."""
    if not (REAL_NEMO2 / "nemo2" / "weights" / ".metadata").is_file():
        pytest.skip("the shared NeMo 2 fixture is not present")
    out = tmp_path / "out"
    result = export_checkpoint(REAL_NEMO2 / "nemo2", out, progress=False, verify=True)
    assert (result.architecture, result.vocab_size, result.tokenizer) == ("LlamaForCausalLM", 32000, "huggingface")
    reference = json.loads((REAL_NEMO2 / "reference_outputs.json").read_text())
    source = AutoModelForCausalLM.from_pretrained(REAL_NEMO2 / "hf", dtype=torch.float32).eval()
    for prompt in reference["prompts"]:
        ids = torch.tensor([prompt["input_ids"]])
        with torch.no_grad():
            want = source(ids).logits
        assert torch.allclose(logits(out, ids), want, atol=1e-5, rtol=0)
    # The tokenizer the checkpoint declares (its tokenizer.json) is the one served: 'The' -> 1014.
    from tritonize.runtime.tokenizer import Tokenizer

    served = Tokenizer(out)
    for prompt in reference["prompts"]:
        assert served.encode(prompt["prompt"]) == prompt["input_ids"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert result.verify["max_abs_logit_diff"] < 1e-4


def test_sentencepiece_gzip_nemo1_and_nemo2(sp_dir, tmp_path):
    """A gzip .nemo and a NeMo 2 dir carrying a SentencePiece model (32000 pieces)."""
    model = tiny_model("llama")
    nemo = write_nemo1(model, sp_dir, tmp_path / "m.nemo", gzip=True)
    export_checkpoint(nemo, tmp_path / "out1", progress=False)
    assert_matches(model, tmp_path / "out1")
    assert (tmp_path / "out1" / "tokenizer.model").read_bytes() == (sp_dir / "tokenizer.model").read_bytes()
    nemo2 = write_nemo2(model, sp_dir, tmp_path / "ckpt", tokenizer="sentencepiece")
    result = export_checkpoint(nemo2, tmp_path / "out2", progress=False)
    assert result.tokenizer == "sentencepiece"
    assert_matches(model, tmp_path / "out2")


def test_bfloat16_storage_and_dtype_override(bpe_dir, tmp_path):
    model = bpe_model("llama")
    src = write_nemo1(model, bpe_dir, tmp_path / "m.nemo", dtype="bfloat16")
    result = export_checkpoint(src, tmp_path / "out", progress=False)
    assert result.dtype == "bfloat16"
    shard = next((tmp_path / "out").glob("model-*.safetensors"))
    with safe_open(shard, "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert_matches(model, tmp_path / "out", atol=1e-4, dtype=torch.bfloat16)

    result = export_checkpoint(src, tmp_path / "out16", dtype="float16", progress=False)
    with safe_open(next((tmp_path / "out16").glob("model-*.safetensors")), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.float16
    assert json.loads((tmp_path / "out16" / "config.json").read_text())["dtype"] == "float16"


def test_mixtral_local_experts_layout(bpe_dir, tmp_path):
    model = bpe_model("mixtral")
    src = write_nemo2(model, bpe_dir, tmp_path / "ckpt", moe_layout="local_experts")
    export_checkpoint(src, tmp_path / "out", progress=False)
    assert_matches(model, tmp_path / "out")


@pytest.mark.parametrize("variant", [
    {"new_decoder_architecture": True, "num_kv_heads": 2, "parallel_attn": True},
    {"parallel_attn": False},
    {"multi_query": False, "bias": True},
])
def test_falcon_variants(variant, bpe_dir, tmp_path):
    model = bpe_model("falcon", **variant)
    src = write_nemo1(model, bpe_dir, tmp_path / "m.nemo")
    export_checkpoint(src, tmp_path / "out", progress=False)
    assert_matches(model, tmp_path / "out")


def test_llama31_rope_scaling_from_nemo2_config(bpe_dir, tmp_path):
    """NeMo 2's Llama31Config carries the llama3 rope scaling as config fields."""
    model = bpe_model("llama", rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    src = write_nemo2(model, bpe_dir, tmp_path / "ckpt")
    path = src / "context" / "model.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["config"].update(_target_="nemo.collections.llm.gpt.model.llama.Llama31Config8B", rotary_base=500000.0,
                         scale_factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=64)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = export_checkpoint(src, tmp_path / "out", progress=False, verify=True)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
    assert result.verify["passed"]
    assert_matches(model, tmp_path / "out")


def test_export_runs_in_tritonize_runtime(bpe_dir, tmp_path):
    """The exported directory is what the torch runtime of a generated repository loads."""
    from tritonize.runtime.model import prompt_logits
    from tritonize.runtime.weights import load_model

    for family in ("llama", "falcon", "starcoder"):
        model = bpe_model(family)
        out = tmp_path / family
        export_checkpoint(write_nemo1(model, bpe_dir, tmp_path / f"{family}.nemo"), out, progress=False)
        runtime = load_model(out, device="cpu", dtype=torch.float32)
        got = prompt_logits(runtime, PROBE_IDS[0].tolist())[None]
        assert torch.allclose(got, reference_logits(model), atol=1e-4, rtol=0)


def test_nemo2_tiktoken_tokenizer(bpe_dir, tmp_path):
    """NeMo's TiktokenTokenizer vocabulary (rank / token_bytes / token_str list) served as tokenizer.json,
    with ids shifted by the 1000 special tokens, and the model vocabulary trimmed to the tokenizer."""
    import base64

    tiktoken = pytest.importorskip("tiktoken")
    from tokenizers import Tokenizer

    ranks = {bytes([i]): i for i in range(256)}
    for word in ("th", "the", "in", "ing", "er", " the", "is", " is", "Paris", " Paris"):
        ranks.setdefault(word.encode(), len(ranks))
    ranks_for_tiktoken = dict(ranks)
    model = tiny_model("llama", vocab_size=1400, bos_token_id=1, eos_token_id=2)
    src = write_nemo2(model, bpe_dir, tmp_path / "ckpt")
    ctx = src / "context"
    shutil.rmtree(ctx / "nemo_tokenizer")
    vocab = [{"rank": r, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode("utf-8", "replace")}
             for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    (ctx / "nemo_tokenizer").mkdir()
    (ctx / "nemo_tokenizer" / "tiktoken_vocab.json").write_text(json.dumps(vocab))
    doc = yaml.safe_load((ctx / "model.yaml").read_text())
    doc["tokenizer"] = {"_target_": "nemo.collections.common.tokenizers.tiktoken_tokenizer.TiktokenTokenizer",
                        "vocab_file": "/original/machine/path/tiktoken_vocab.json", "num_special_tokens": 1000}
    (ctx / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))

    result = export_checkpoint(src, tmp_path / "out", progress=False)
    assert result.tokenizer == "tiktoken" and result.vocab_size == 1000 + len(ranks)
    served = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    ref = tiktoken.Encoding("nemo", pat_str=PATTERN_TIKTOKEN, mergeable_ranks=ranks_for_tiktoken, special_tokens={})
    text = "the thing is in Paris, isn't it"
    assert served.encode(text, add_special_tokens=False).ids == [i + 1000 for i in ref.encode(text)]
    ids = torch.tensor([[1000, 1003, 1260, 5, 2]])
    got = logits(tmp_path / "out", ids)
    with torch.no_grad():
        want = model(ids).logits[..., : result.vocab_size]
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_verify_catches_a_wrong_conversion(bpe_dir, tmp_path, monkeypatch):
    """--verify compares against an independent forward pass: a converter that swaps k and v is caught,
    and nothing is written."""
    from tritonize.export import ExportError, megatron

    model = bpe_model("llama")
    src = write_nemo2(model, bpe_dir, tmp_path / "ckpt")
    right = megatron._group_rows
    monkeypatch.setattr(megatron, "_group_rows", lambda *a: (lambda q, k, v: (q, v, k))(*right(*a)))
    with pytest.raises(ExportError, match="verification failed"):
        export_checkpoint(src, tmp_path / "out", progress=True, verify=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_nemo1_single_file_weights(bpe_dir, tmp_path):
    """Older .nemo files hold ``model_weights.ckpt``: one torch.save state dict with per-layer keys
    (``model.decoder.layers.0.…``). Built here by unstacking a distributed checkpoint's tensors."""
    from fixtures.dist_ckpt import load_tensors

    model = bpe_model("starcoder2")
    src = write_nemo1(model, bpe_dir, tmp_path / "m", tar=False)
    stacked = load_tensors(src / "model_weights")
    state = {}
    for key, t in stacked.items():
        if key.startswith("model.decoder.layers."):
            for i in range(t.shape[0]):
                state[key.replace("decoder.layers.", f"decoder.layers.{i}.")] = t[i].clone()
        else:
            state[key] = t
    shutil.rmtree(src / "model_weights")
    torch.save(state, src / "model_weights.ckpt")
    result = export_checkpoint(src, tmp_path / "out", progress=False, verify=True)
    assert result.manifest["source"]["weights_backend"] == "ckpt" and result.verify["passed"]
    assert_matches(model, tmp_path / "out")
