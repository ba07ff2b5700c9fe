"""The checkpoint fixtures look like the real thing and each written layout is self-consistent.

The NeMo 2 llama case is compared bit for bit with a checkpoint NeMo's own importer wrote from the
same Hugging Face weights (../shared/fixtures/nemo2-llama). The other layouts are checked against
the documented facts, read back with code independent of the writers (tar, zarr chunks, DCP,
safetensors) and compared with the Hugging Face tensors of the model they came from.
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from fixtures import (
    BPE_VOCAB,
    FAMILIES,
    MQA_FAMILIES,
    REAL_NEMO2,
    UNKNOWN_TARGET,
    bpe_model,
    sentencepiece_tokenizer_dir,
    shrink_vocab,
    tiny_model,
    truncated_tar,
    write_nemo1,
    write_nemo2,
    write_pickle_bomb,
    write_qnemo,
    write_shape_mismatch,
    write_trtllm_checkpoint,
    write_unknown_target,
)
from fixtures.dist_ckpt import MCORE_MODULE, MCoreSavePlan, byte_keys, load_tensors, read_metadata, read_zarr
from safetensors.torch import load_file


def extract(tar_path: Path, dest: Path) -> Path:
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")
    return dest


def hf(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# NeMo 2: against a checkpoint written by NeMo itself
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nemo2_pair(tmp_path_factory):
    if not (REAL_NEMO2 / "nemo2" / "weights" / ".metadata").is_file():
        pytest.skip("the shared NeMo 2 fixture is not present")
    from transformers import LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("nemo2real")
    model = LlamaForCausalLM.from_pretrained(REAL_NEMO2 / "hf", dtype=torch.float32)
    tok = sentencepiece_tokenizer_dir(tmp / "tok", hf_files_from=REAL_NEMO2 / "hf")
    return write_nemo2(model, tok, tmp / "ckpt"), REAL_NEMO2 / "nemo2"


def _chunks(md, key):
    return sorted((tuple(c.offsets), tuple(c.sizes)) for c in md.state_dict_metadata[key].chunks)


def test_nemo2_llama_weights_match_nemo_importer_bit_for_bit(nemo2_pair):
    mine, real = nemo2_pair
    ours, theirs = load_tensors(mine / "weights"), load_tensors(real / "weights")
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key
    md_ours, md_theirs = read_metadata(mine / "weights"), read_metadata(real / "weights")
    for key in theirs:
        assert _chunks(md_ours, key) == _chunks(md_theirs, key), key
    assert sorted(byte_keys(mine / "weights")) == sorted(byte_keys(real / "weights"))
    assert sorted(md_ours.mcore_data) == sorted(md_theirs.mcore_data)
    assert type(md_ours.all_local_plans[0]).__name__ == type(md_theirs.all_local_plans[0]).__name__
    assert json.loads((mine / "weights/metadata.json").read_text()) == json.loads(
        (real / "weights/metadata.json").read_text()
    )
    common_ours = torch.load(mine / "weights/common.pt", weights_only=True)
    common_theirs = torch.load(real / "weights/common.pt", weights_only=True)
    assert set(common_ours) == set(common_theirs)


def test_nemo2_llama_extra_state_bytes_decode_like_nemo(nemo2_pair):
    mine, real = nemo2_pair
    key = "module.decoder.layers.self_attention.linear_qkv._extra_state/shard_0_2"

    def payload(root):
        md = read_metadata(root / "weights")
        info = next(v for k, v in md.storage_data.items() if k.fqn == key)
        with open(root / "weights" / info.relative_path, "rb") as f:
            f.seek(info.offset)
            return torch.load(io.BytesIO(f.read(info.length)), weights_only=True)

    assert payload(mine) == payload(real)


def test_nemo2_llama_context_matches_nemo_importer(nemo2_pair):
    mine, real = nemo2_pair
    files = sorted(str(p.relative_to(real / "context")) for p in (real / "context").rglob("*"))
    assert files == sorted(str(p.relative_to(mine / "context")) for p in (mine / "context").rglob("*"))
    ours = yaml.safe_load((mine / "context/model.yaml").read_text())
    theirs = yaml.safe_load((real / "context/model.yaml").read_text())
    assert ours["_target_"] == theirs["_target_"]
    assert ours["tokenizer"] == theirs["tokenizer"]
    assert set(ours) == set(theirs)
    assert set(ours["config"]) <= set(theirs["config"])
    for key in (
        "_target_",
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "kv_channels",
        "normalization",
        "gated_linear_unit",
        "add_bias_linear",
        "add_qkv_bias",
        "position_embedding_type",
        "rotary_base",
        "rotary_percent",
        "rotary_interleaved",
        "share_embeddings_and_output_weights",
        "vocab_size",
        "make_vocab_size_divisible_by",
        "activation_func",
        "layernorm_epsilon",
        "layernorm_zero_centered_gamma",
        "seq_length",
        "params_dtype",
        "bf16",
        "fp16",
        "num_moe_experts",
        "generation_config",
    ):
        assert ours["config"][key] == theirs["config"][key], key

    def model_graph(path):
        graph = json.loads(path.read_text())
        objs = graph["objects"]
        root = objs[graph["root"]["key"]]
        model = objs[dict(root["items"])["Attr(name='model')"]["key"]]
        meta = objs[model["metadata"]["key"]]
        target = dict(meta["items"])["Attr(name='fn_or_cls')"]
        config = objs[dict(model["items"])["Attr(name='config')"]["key"]]
        leaves = {k: v["value"] for k, v in config["items"] if v.get("type") == "leaf"}
        return target, leaves

    (t_ours, l_ours), (t_theirs, l_theirs) = (
        model_graph(mine / "context/io.json"),
        model_graph(real / "context/io.json"),
    )
    assert t_ours == t_theirs
    common = set(l_ours) & set(l_theirs)
    assert len(common) >= 20
    assert {k: l_ours[k] for k in common} == {k: l_theirs[k] for k in common}


def test_metadata_pickles_megatron_plan_classes(nemo2_pair):
    """Like the real one, ``.metadata`` cannot be unpickled without a stand-in for Megatron's module."""
    mine, real = nemo2_pair
    for root in (mine, real):
        with pytest.raises(ModuleNotFoundError, match="megatron"):
            with open(root / "weights/.metadata", "rb") as f:
                pickle.load(f)  # the whole point: a plain load of this pickle cannot even resolve its classes
        assert isinstance(read_metadata(root / "weights").all_local_plans[0], MCoreSavePlan)


# ---------------------------------------------------------------------------------------------
# NeMo 1 and NeMo 2 layouts: self-consistency for every family
# ---------------------------------------------------------------------------------------------


def _ungroup_qkv(qkv: torch.Tensor, heads: int, groups: int, d: int):
    r = heads // groups
    g = qkv.reshape(groups, r + 2, d, -1)
    return (
        g[:, :r].reshape(heads * d, -1),
        g[:, r].reshape(groups * d, -1),
        g[:, r + 1].reshape(groups * d, -1),
    )


def _hf_qkv(model, family: str, i: int, suffix: str = "weight"):
    """q, k, v weights (or biases) straight from the Hugging Face module names, independent of the writers."""
    sd, cfg = hf(model), model.config
    if family == "gpt":  # Conv1D: [in, out]
        w = sd[f"transformer.h.{i}.attn.c_attn.{suffix}"]
        return (w.t() if suffix == "weight" else w).chunk(3)
    if family == "starcoder":
        w = sd[f"transformer.h.{i}.attn.c_attn.{suffix}"]
        h, d = cfg.n_embd, cfg.n_embd // cfg.n_head
        return w[:h], w[h : h + d], w[h + d :]
    if family == "falcon":  # falcon-7b style: [q heads..., k, v]
        w = sd[f"transformer.h.{i}.self_attention.query_key_value.{suffix}"]
        d = cfg.hidden_size // cfg.num_attention_heads
        return w[: -2 * d], w[-2 * d : -d], w[-d:]
    p = f"model.layers.{i}.self_attn."
    return sd[p + f"q_proj.{suffix}"], sd[p + f"k_proj.{suffix}"], sd[p + f"v_proj.{suffix}"]


def _geometry(cfg: dict):
    heads, groups = cfg["num_attention_heads"], cfg["num_query_groups"]
    return heads, groups, cfg["kv_channels"], cfg["hidden_size"], cfg["num_layers"]


@pytest.mark.parametrize("family", FAMILIES)
def test_nemo1_torch_dist_and_zarr_are_self_consistent(family, bpe_dir, tmp_path):
    model = bpe_model(family)
    tp = 1 if family in MQA_FAMILIES else 2
    nemo = write_nemo1(model, bpe_dir, tmp_path / "m.nemo", tp_size=tp)
    zarr_dir = write_nemo1(model, bpe_dir, tmp_path / "zarr", backend="zarr", tar=False, tp_size=tp)

    with tarfile.open(nemo) as tar:
        names = tar.getnames()
    assert "./model_config.yaml" in names and "./model_weights/metadata.json" in names
    root = extract(nemo, tmp_path / "x")
    cfg = yaml.safe_load((root / "model_config.yaml").read_text())
    assert cfg["mcore_gpt"] is True and cfg["tensor_model_parallel_size"] == tp
    for field in ("vocab_file", "merge_file"):
        ref = cfg["tokenizer"][field]
        assert ref.startswith("nemo:") and (root / ref[len("nemo:") :]).is_file()
    assert json.loads((root / "model_weights/metadata.json").read_text())["sharded_backend"] == "torch_dist"

    dist = load_tensors(root / "model_weights")
    heads, groups, d, hidden, layers = _geometry(cfg)
    qkv = dist["model.decoder.layers.self_attention.linear_qkv.weight"]
    assert qkv.shape == (layers, groups * (heads // groups + 2) * d, hidden)
    ffn = cfg["ffn_hidden_size"]
    if "model.decoder.layers.mlp.linear_fc1.weight" in dist:
        gated = cfg["activation"].endswith("glu")
        assert dist["model.decoder.layers.mlp.linear_fc1.weight"].shape == (
            layers,
            (2 if gated else 1) * ffn,
            hidden,
        )
        assert dist["model.decoder.layers.mlp.linear_fc2.weight"].shape == (layers, hidden, ffn)
    emb = dist["model.embedding.word_embeddings.weight"]
    assert emb.shape[0] % (128 * tp) == 0 and BPE_VOCAB <= emb.shape[0] < BPE_VOCAB + 128 * tp
    assert ("model.output_layer.weight" in dist) != cfg["share_embeddings_and_output_weights"]
    qkv_bias = dist.get("model.decoder.layers.self_attention.linear_qkv.bias")
    assert (qkv_bias is not None) == (family in ("gpt", "starcoder", "starcoder2"))
    for i in range(layers):
        for ours, theirs in zip(
            _ungroup_qkv(qkv[i], heads, groups, d), _hf_qkv(model, family, i), strict=True
        ):
            assert torch.equal(ours, theirs)
        if qkv_bias is not None:
            ungrouped = _ungroup_qkv(qkv_bias[i], heads, groups, d)
            for ours, theirs in zip(ungrouped, _hf_qkv(model, family, i, "bias"), strict=True):
                assert torch.equal(ours.flatten(), theirs)
    learned = "model.embedding.position_embeddings.weight" in dist
    assert (
        learned == (cfg["position_embedding_type"] == "learned_absolute") == (family in ("gpt", "starcoder"))
    )

    # The zarr copy of the same model holds the same values, chunked the same way.
    assert json.loads((zarr_dir / "model_weights/metadata.json").read_text())["sharded_backend"] == "zarr"
    md = read_metadata(root / "model_weights")
    for key, value in dist.items():
        zarray = json.loads((zarr_dir / "model_weights" / key / ".zarray").read_text())
        assert zarray["compressor"] is None and zarray["dtype"] == "<f4"
        assert tuple(zarray["chunks"]) == tuple(md.state_dict_metadata[key].chunks[0].sizes), key
        assert torch.equal(read_zarr(zarr_dir / "model_weights" / key), value), key
    extra = sorted((zarr_dir / "model_weights").glob("*._extra_state/shard_*_*.pt"))
    assert extra and len(extra) == len(byte_keys(root / "model_weights"))


def test_nemo1_gated_fc1_is_gate_then_up_and_tp_chunks_split_halves(bpe_dir, tmp_path):
    model = bpe_model("llama")
    root = write_nemo1(model, bpe_dir, tmp_path / "n", tar=False, tp_size=2)
    key = "model.decoder.layers.mlp.linear_fc1.weight"
    fc1 = load_tensors(root / "model_weights", [key])[key]
    sd = hf(model)
    for i in range(2):
        assert torch.equal(
            fc1[i],
            torch.cat(
                [sd[f"model.layers.{i}.mlp.gate_proj.weight"], sd[f"model.layers.{i}.mlp.up_proj.weight"]]
            ),
        )
    chunks = read_metadata(root / "model_weights").state_dict_metadata[key].chunks
    # per layer: gate rank 0, gate rank 1, up rank 0, up rank 1 (64 rows each of 2 x 128)
    assert sorted(c.offsets[1] for c in chunks if c.offsets[0] == 0) == [0, 64, 128, 192]
    assert {tuple(c.sizes) for c in chunks} == {(1, 64, 64)}


def test_nemo1_bf16_zarr_gzip_and_separate_norms(sp_dir, tmp_path):
    model = tiny_model("llama")
    nemo = write_nemo1(
        model, sp_dir, tmp_path / "m.nemo", backend="zarr", gzip=True, dtype="bfloat16", fused_norms=False
    )
    with tarfile.open(nemo, "r:gz") as tar:
        assert any(n.endswith("_tokenizer.model") for n in tar.getnames())
    root = extract(nemo, tmp_path / "x")
    cfg = yaml.safe_load((root / "model_config.yaml").read_text())
    assert cfg["precision"] == "bf16" and cfg["tokenizer"]["library"] == "sentencepiece"
    assert (root / cfg["tokenizer"]["model"][len("nemo:") :]).is_file()
    w = root / "model_weights"
    zarray = json.loads((w / "model.decoder.layers.input_layernorm.weight/.zarray").read_text())
    assert zarray["dtype"] == "bfloat16"
    assert not (w / "model.decoder.layers.self_attention.linear_qkv.layer_norm_weight").exists()
    norm = read_zarr(w / "model.decoder.layers.pre_mlp_layernorm.weight")
    assert torch.equal(
        norm[1], model.model.layers[1].post_attention_layernorm.weight.detach().to(torch.bfloat16)
    )
    shard = next((w / "model.decoder.layers.mlp.linear_fc1._extra_state").glob("shard_0_2.pt"))
    with pytest.raises(pickle.UnpicklingError):  # a pickled io.BytesIO, as older Transformer Engine saved it
        torch.load(shard, weights_only=True)


def test_mixtral_expert_layouts(bpe_dir, tmp_path):
    model = bpe_model("mixtral")
    sd = hf(model)
    stacked = write_nemo2(model, bpe_dir, tmp_path / "a")
    per_expert = write_nemo1(model, bpe_dir, tmp_path / "b", tar=False, moe_layout="local_experts")
    a = load_tensors(stacked / "weights")
    b = load_tensors(per_expert / "model_weights")
    gate_up = sd["model.layers.1.mlp.experts.gate_up_proj"]  # transformers 5.x: [E, 2I, H], gate first
    assert torch.equal(a["module.decoder.layers.mlp.experts.experts.linear_fc1.weight"][1], gate_up)
    assert torch.equal(b["model.decoder.layers.mlp.experts.local_experts.3.linear_fc1.weight"][1], gate_up[3])
    assert torch.equal(a["module.decoder.layers.mlp.router.weight"][0], sd["model.layers.0.mlp.gate.weight"])
    assert "module.decoder.layers.pre_mlp_layernorm.weight" in a
    cfg = yaml.safe_load((stacked / "context/model.yaml").read_text())["config"]
    assert cfg["num_moe_experts"] == 4 and cfg["moe_router_topk"] == 2


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "falcon"])
def test_nemo2_layout_per_family(family, bpe_dir, tmp_path):
    model = bpe_model(family)
    root = write_nemo2(model, bpe_dir, tmp_path / "c", with_optimizer=True)
    doc = yaml.safe_load((root / "context/model.yaml").read_text())
    assert doc["_target_"].startswith("nemo.collections.llm.gpt.model.")
    assert doc["config"]["vocab_size"] == BPE_VOCAB
    assert (root / "context/nemo_tokenizer/tokenizer.json").is_file()
    md = read_metadata(root / "weights")
    keys = list(md.state_dict_metadata)
    model_keys = [k for k in keys if k.startswith("module.")]
    assert all(k.startswith(("module.", "optimizer.state.")) for k in keys)
    assert any(k.startswith("optimizer.state.exp_avg.module.") for k in keys)
    assert any("_extra_state/shard_0_2" in k for k in model_keys)
    if doc["config"]["layernorm_zero_centered_gamma"]:  # Gemma, Nemotron: stored as w, applied as 1 + w
        norm = load_tensors(root / "weights", ["module.decoder.final_layernorm.weight"])
        assert torch.equal(norm["module.decoder.final_layernorm.weight"], hf(model)["model.norm.weight"])


def test_nemo2_refuses_falcon(bpe_dir, tmp_path):
    from fixtures import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="NeMo 2"):
        write_nemo2(bpe_model("falcon"), bpe_dir, tmp_path / "f")
    assert not (tmp_path / "f").exists()


# ---------------------------------------------------------------------------------------------
# TRT-LLM checkpoints and .qnemo
# ---------------------------------------------------------------------------------------------


def _ranks(root: Path) -> list[dict[str, torch.Tensor]]:
    cfg = json.loads((root / "config.json").read_text())
    return [load_file(str(root / f"rank{r}.safetensors")) for r in range(cfg["mapping"]["world_size"])]


def test_trtllm_llama_tp_pp_split(tmp_path):
    model = tiny_model("llama", vocab_size=1001, num_hidden_layers=3)
    root = write_trtllm_checkpoint(model, tmp_path / "t", tp_size=2, pp_size=2)
    cfg = json.loads((root / "config.json").read_text())
    assert cfg["architecture"] == "LlamaForCausalLM" and cfg["mapping"] == {
        "world_size": 4,
        "tp_size": 2,
        "pp_size": 2,
        "gpus_per_node": 8,
        "moe_tp_size": 2,
        "moe_ep_size": 1,
    }
    ranks, sd = _ranks(root), hf(model)
    # pp stage 0 holds global layers 0-1, stage 1 holds layer 2 renumbered as 0
    assert {k.split(".")[2] for k in ranks[0] if k.startswith("transformer.layers.")} == {"0", "1"}
    assert {k.split(".")[2] for k in ranks[2] if k.startswith("transformer.layers.")} == {"0"}
    assert "transformer.vocab_embedding.weight" in ranks[1] and "lm_head.weight" not in ranks[1]
    assert "lm_head.weight" in ranks[3] and "transformer.ln_f.weight" in ranks[3]
    q_rows = 2 * 16  # 2 of 4 heads per rank, head size 16; one of 2 KV heads per rank
    for global_layer, (rank_base, local) in {0: (0, 0), 2: (2, 0)}.items():
        p = f"model.layers.{global_layer}."
        qkv = [ranks[rank_base + t][f"transformer.layers.{local}.attention.qkv.weight"] for t in range(2)]
        assert torch.equal(torch.cat([x[:q_rows] for x in qkv]), sd[p + "self_attn.q_proj.weight"])
        assert torch.equal(
            torch.cat([x[q_rows : q_rows + 16] for x in qkv]), sd[p + "self_attn.k_proj.weight"]
        )
        assert torch.equal(torch.cat([x[q_rows + 16 :] for x in qkv]), sd[p + "self_attn.v_proj.weight"])
        dense = torch.cat(
            [ranks[rank_base + t][f"transformer.layers.{local}.attention.dense.weight"] for t in range(2)],
            dim=1,
        )
        assert torch.equal(dense, sd[p + "self_attn.o_proj.weight"])
        fc = torch.cat([ranks[rank_base + t][f"transformer.layers.{local}.mlp.fc.weight"] for t in range(2)])
        gate = torch.cat(
            [ranks[rank_base + t][f"transformer.layers.{local}.mlp.gate.weight"] for t in range(2)]
        )
        assert torch.equal(fc, sd[p + "mlp.gate_proj.weight"]) and torch.equal(
            gate, sd[p + "mlp.up_proj.weight"]
        )
    head = torch.cat([ranks[2]["lm_head.weight"], ranks[3]["lm_head.weight"]])
    assert head.shape[0] == 1002 and torch.equal(head[:1001], sd["lm_head.weight"]) and not head[1001:].any()


def test_trtllm_mqa_duplicates_kv_and_gpt_variants(bpe_dir, tmp_path):
    model = bpe_model("falcon")
    ranks, sd = _ranks(write_trtllm_checkpoint(model, tmp_path / "f", tp_size=2)), hf(model)
    w = sd["transformer.h.0.self_attention.query_key_value.weight"]
    for t in range(2):
        qkv = ranks[t]["transformer.layers.0.attention.qkv.weight"]
        assert qkv.shape == (2 * 16 + 2 * 16, 64)
        assert torch.equal(qkv[32:48], w[64:80]) and torch.equal(
            qkv[48:], w[80:]
        )  # the one K/V head on every rank
    assert "transformer.layers.0.post_layernorm.weight" not in ranks[0]  # parallel attention, one norm
    for family, variant in (
        ("gpt", "gpt2"),
        ("starcoder", "starcoder"),
        ("starcoder2", "starcoder2"),
        ("gptnext", "nemotron"),
    ):
        cfg = json.loads(
            (write_trtllm_checkpoint(bpe_model(family), tmp_path / family) / "config.json").read_text()
        )
        assert cfg["architecture"] == "GPTForCausalLM" and cfg["gpt_variant"] == variant


def test_trtllm_norms_moe_and_fp8(bpe_dir, tmp_path):
    gemma = bpe_model("gemma")
    r = _ranks(write_trtllm_checkpoint(gemma, tmp_path / "g"))[0]
    assert torch.equal(r["transformer.ln_f.weight"], hf(gemma)["model.norm.weight"] + 1)

    mixtral = bpe_model("mixtral")
    ranks, sd = _ranks(write_trtllm_checkpoint(mixtral, tmp_path / "m", tp_size=2)), hf(mixtral)
    gate_up = sd["model.layers.0.mlp.experts.gate_up_proj"]  # [E, 2I, H], gate (w1) then up (w3)
    inter = gate_up.shape[1] // 2
    fc = ranks[1]["transformer.layers.0.mlp.fc.weight"]  # cat(w3, w1) of rank 1's halves
    assert torch.equal(fc[:, : inter // 2], gate_up[:, inter + inter // 2 :])
    assert torch.equal(fc[:, inter // 2 :], gate_up[:, inter // 2 : inter])
    assert ranks[0]["transformer.layers.0.mlp.router.weight"].dtype == torch.float32

    llama = bpe_model("llama")
    root = write_trtllm_checkpoint(llama, tmp_path / "q", fp8=True, fp8_kv_cache=True, dtype="bfloat16")
    cfg = json.loads((root / "config.json").read_text())
    assert cfg["quantization"]["quant_algo"] == "FP8" and cfg["quantization"]["kv_cache_quant_algo"] == "FP8"
    r = _ranks(root)[0]
    w, s = (
        r["transformer.layers.1.mlp.proj.weight"],
        r["transformer.layers.1.mlp.proj.weights_scaling_factor"],
    )
    assert w.dtype == torch.float8_e4m3fn and s.numel() == 1
    ref = hf(llama)["model.layers.1.mlp.down_proj.weight"]
    err = (w.float() * s - ref).abs().max() / ref.abs().max()
    assert err < 0.07  # e4m3 keeps 3 mantissa bits
    assert r["lm_head.weight"].dtype == torch.bfloat16
    assert "transformer.layers.0.attention.kv_cache_scaling_factor" in r


@pytest.mark.parametrize("layout", ["huggingface_tokenizer", "nemo_context", "tokenizer.model"])
def test_qnemo_tokenizer_layouts(layout, sp_dir, tmp_path):
    model = tiny_model("llama")
    qnemo = write_qnemo(model, sp_dir, tmp_path / "m.qnemo", tar=True, tokenizer_layout=layout)
    with tarfile.open(qnemo) as tar:
        names = tar.getnames()
    assert "./config.json" in names and "./rank0.safetensors" in names
    expected = {
        "huggingface_tokenizer": "./huggingface_tokenizer/tokenizer.model",
        "nemo_context": "./nemo_context/model.yaml",
        "tokenizer.model": "./tokenizer.model",
    }[layout]
    assert expected in names


# ---------------------------------------------------------------------------------------------
# Hostile inputs
# ---------------------------------------------------------------------------------------------


def test_truncated_tar_cannot_be_read_whole(bpe_dir, tmp_path):
    nemo = write_nemo1(bpe_model("llama"), bpe_dir, tmp_path / "m.nemo")
    bad = truncated_tar(nemo, tmp_path / "bad.nemo")
    assert 0 < bad.stat().st_size < nemo.stat().st_size
    with pytest.raises(tarfile.TarError):
        with tarfile.open(bad) as tar:
            for member in tar:
                if member.isfile():
                    tar.extractfile(member).read()


class _NaiveUnpickler(pickle.Unpickler):
    """What a converter with Megatron stand-ins but no allow-list would do."""

    def find_class(self, module, name):
        return MCoreSavePlan if module == MCORE_MODULE else super().find_class(module, name)


@pytest.mark.parametrize("layout", ["nemo2", "nemo1"])
def test_pickle_bomb_in_metadata(layout, bpe_dir, tmp_path):
    marker = tmp_path / "marker"
    out = (
        write_pickle_bomb(bpe_model("llama"), bpe_dir, tmp_path / "ck", marker, layout=layout, tar=False)
        if layout == "nemo1"
        else write_pickle_bomb(bpe_model("llama"), bpe_dir, tmp_path / "ck", marker)
    )
    weights = out / ("weights" if layout == "nemo2" else "model_weights")
    with pytest.raises(pickle.UnpicklingError):
        read_metadata(weights)  # the allow-list refuses it
    assert not marker.exists()
    with open(weights / ".metadata", "rb") as f:
        _NaiveUnpickler(f).load()
    assert marker.exists()  # the bomb is live: a lax reader runs it


@pytest.mark.parametrize("payload", ["open", "os.system"])
def test_pickle_bomb_in_common_pt(payload, bpe_dir, tmp_path):
    marker = tmp_path / "marker"
    out = write_pickle_bomb(
        bpe_model("llama"), bpe_dir, tmp_path / "ck", marker, where="common.pt", payload=payload
    )
    with pytest.raises(pickle.UnpicklingError):
        torch.load(out / "weights/common.pt", weights_only=True)
    assert not marker.exists()
    assert read_metadata(out / "weights").state_dict_metadata  # the rest of the checkpoint is ordinary
    if payload == "open":
        torch.load(out / "weights/common.pt", weights_only=False)
        assert marker.exists()


def test_unknown_target_shape_mismatch_and_small_vocab(bpe_dir, sp_dir, tmp_path):
    model = bpe_model("llama")
    unknown = write_unknown_target(model, bpe_dir, tmp_path / "u")
    assert yaml.safe_load((unknown / "context/model.yaml").read_text())["_target_"] == UNKNOWN_TARGET
    assert "HyenaModel" in (unknown / "context/io.json").read_text()

    key = "module.decoder.layers.self_attention.linear_qkv.weight"
    bad = write_shape_mismatch(model, bpe_dir, tmp_path / "s")
    assert load_tensors(bad / "weights", [key])[key].shape == (2, 128 - 16, 64)
    bad1 = write_shape_mismatch(model, bpe_dir, tmp_path / "s1", layout="nemo1", tar=False)
    assert load_tensors(bad1 / "model_weights", ["model." + key[len("module.") :]])[
        "model." + key[len("module.") :]
    ].shape == (2, 112, 64)
    trt = write_shape_mismatch(model, None, tmp_path / "t", layout="trtllm")
    assert load_file(str(trt / "rank0.safetensors"))["transformer.layers.0.attention.qkv.weight"].shape == (
        112,
        64,
    )

    small = shrink_vocab(tiny_model("llama"), 1000)
    root = write_nemo2(small, sp_dir, tmp_path / "v")
    emb = load_tensors(root / "weights", ["module.embedding.word_embeddings.weight"])
    assert emb["module.embedding.word_embeddings.weight"].shape[0] == 1024 < 32000
    assert yaml.safe_load((root / "context/model.yaml").read_text())["config"]["vocab_size"] == 1000
