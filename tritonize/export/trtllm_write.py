"""A canonical model as a TRT-LLM checkpoint, sharded for tensor and pipeline parallelism.

For the legacy ``trtllm-build`` path. The rules are TensorRT-LLM's own (models/*/convert.py):
rank ``N = pp_rank * tp + tp_rank``; pipeline stage ``p`` gets layers
``tensor_split(range(L), pp)[p]`` renumbered from 0, the embedding on the first stage, ``ln_f``
and ``lm_head`` on the last; q/k/v are split per rank and stored ``[q_r; k_r; v_r]``, key/value
heads repeated when there are fewer than ranks; ``attention.dense`` / ``mlp.proj`` split along
dim 1, ``mlp.fc`` / ``mlp.gate`` / ``lm_head`` along dim 0, ``lm_head`` zero-padded to a multiple
of tp; norms as plain gains; MoE ``mlp.fc`` = cat(w3, w1) per expert.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import ExportError
from .canonical import Linear, Model, ModelSpec, Norm
from .lazy import Cols, Lazy, Rows, Stack, Zeros, add_offset, cat0, rows_of
from .stored import dtype_name
from .writer import WrittenFiles, write_safetensors

_ARCH = {
    "LlamaForCausalLM": "LlamaForCausalLM",
    "MistralForCausalLM": "MistralForCausalLM",
    "MixtralForCausalLM": "MixtralForCausalLM",
    "GemmaForCausalLM": "GemmaForCausalLM",
    "FalconForCausalLM": "FalconForCausalLM",
    "NemotronForCausalLM": "GPTForCausalLM",
    "Starcoder2ForCausalLM": "GPTForCausalLM",
    "GPTBigCodeForCausalLM": "GPTForCausalLM",
    "GPT2LMHeadModel": "GPTForCausalLM",
}
_GPT_VARIANT = {"NemotronForCausalLM": "nemotron", "Starcoder2ForCausalLM": "starcoder2",
                "GPTBigCodeForCausalLM": "starcoder", "GPT2LMHeadModel": "gpt2"}


def _hidden_act(spec: ModelSpec) -> str:
    # TRT-LLM computes every gelu spelling with the tanh approximation; the name keeps what the model meant.
    act = {"silu": "silu", "gelu": "gelu", "gelu_new": "gelu_pytorch_tanh", "gelu_pytorch_tanh": "gelu_pytorch_tanh",
           "gelu_fast": "gelu_pytorch_tanh", "relu": "relu", "relu2": "relu2"}.get(spec.activation)
    if act is None:
        raise ExportError(f"activation {spec.activation!r} has no TRT-LLM equivalent")
    if spec.gated and _ARCH[spec.arch] == "GPTForCausalLM":
        return {"silu": "swiglu", "gelu": "geglu", "gelu_pytorch_tanh": "geglu"}.get(act, act)
    return act


def trtllm_config(spec: ModelSpec, dtype: torch.dtype, tp: int, pp: int) -> dict[str, Any]:
    arch = _ARCH[spec.arch]
    cfg: dict[str, Any] = {
        "architecture": arch,
        "dtype": dtype_name(dtype),
        "logits_dtype": "float32",
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_size": spec.head_dim,
        "intermediate_size": spec.intermediate_size,
        "hidden_act": _hidden_act(spec),
        "norm_epsilon": spec.norm_eps,
        "position_embedding_type": "learned_absolute" if spec.positions == "learned" else "rope_gpt_neox",
        "rotary_base": spec.rope_theta,
        "rotary_pct": spec.rotary_pct,
        "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp, "moe_tp_size": tp, "moe_ep_size": 1},
        "qk_layernorm": False,
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "share_embedding_table": False,
        "tie_word_embeddings": spec.tie_embeddings,
        "bias": spec.qkv_bias or spec.out_bias or spec.mlp_bias,
        "attn_bias": spec.qkv_bias or spec.out_bias,
        "mlp_bias": spec.mlp_bias,
    }
    if spec.rope_scaling:
        sc = dict(spec.rope_scaling)
        cfg["rotary_scaling"] = {"type": sc.pop("rope_type", "linear"), **sc}
    if arch == "GPTForCausalLM":
        cfg["gpt_variant"] = _GPT_VARIANT[spec.arch]
    if arch == "FalconForCausalLM":
        cfg.update(parallel_attention=spec.parallel_attn, new_decoder_architecture=spec.new_decoder_architecture)
    if spec.num_experts:
        cfg["moe"] = {"num_experts": spec.num_experts, "top_k": spec.experts_per_token, "normalization_mode": 1}
    if spec.sliding_window:
        cfg["sliding_window"] = spec.sliding_window
    return cfg


def _split_rows(t: Lazy, tp: int, r: int, what: str) -> Lazy:
    if t.shape[0] % tp:
        raise ExportError(f"{what} has {t.shape[0]} rows, not divisible by tensor parallelism {tp}")
    n = t.shape[0] // tp
    return rows_of(t, r * n, n)


def _split_cols(t: Lazy, tp: int, r: int, what: str) -> Lazy:
    if t.shape[1] % tp:
        raise ExportError(f"{what} has {t.shape[1]} columns, not divisible by tensor parallelism {tp}")
    n = t.shape[1] // tp
    return Cols(t, r * n, n)


def _kv_for_rank(t: Lazy, spec: ModelSpec, tp: int, r: int, what: str) -> Lazy:
    d, kv = spec.head_dim, spec.num_kv_heads
    if kv >= tp:
        return _split_rows(t, tp, r, what)
    if tp % kv:
        raise ExportError(f"{kv} key/value heads cannot be spread over tensor parallelism {tp}")
    head = r // (tp // kv)
    return rows_of(t, head * d, d)


def _gain(n: Norm) -> Lazy:
    return add_offset(n.weight, n.offset)


def _bias_or_zeros(lin: Linear, rows: int, dtype: torch.dtype) -> Lazy:
    return lin.bias if lin.bias is not None else Zeros((rows,), dtype)


def rank_tensors(model: Model, tp: int, pp: int, tp_rank: int, pp_rank: int) -> list[tuple[str, Lazy]]:
    spec = model.spec
    dt = model.embed.dtype
    out: list[tuple[str, Lazy]] = []
    r = tp_rank
    any_bias = spec.qkv_bias or spec.out_bias or spec.mlp_bias
    one_switch = _ARCH[spec.arch] in ("GPTForCausalLM", "FalconForCausalLM")  # a single `bias` flag
    qkv_bias = any_bias if one_switch else spec.qkv_bias
    dense_bias = any_bias if one_switch else spec.out_bias
    mlp_bias = any_bias if one_switch else spec.mlp_bias

    def norm_bias(n: Norm) -> Lazy:
        return n.bias if n.bias is not None else Zeros((spec.hidden_size,), dt)
    if pp_rank == 0:
        out.append(("transformer.vocab_embedding.weight", model.embed))
        if model.pos_embed is not None:
            out.append(("transformer.position_embedding.weight", model.pos_embed))
    layer_ids = torch.tensor_split(torch.arange(spec.num_layers), pp)[pp_rank].tolist()
    for j, i in enumerate(layer_ids):
        L = model.layers[i]
        p = f"transformer.layers.{j}."
        out.append((p + "input_layernorm.weight", _gain(L.attn_norm)))
        if L.attn_norm.bias is not None or spec.norm == "layer":
            out.append((p + "input_layernorm.bias", norm_bias(L.attn_norm)))
        q = _split_rows(L.q.weight, tp, r, "q")
        k, v = (_kv_for_rank(x.weight, spec, tp, r, "kv") for x in (L.k, L.v))
        out.append((p + "attention.qkv.weight", cat0([q, k, v])))
        if qkv_bias:
            qb = _split_rows(_bias_or_zeros(L.q, spec.q_size, dt), tp, r, "q bias")
            kb, vb = (_kv_for_rank(_bias_or_zeros(x, spec.kv_size, dt), spec, tp, r, "kv bias") for x in (L.k, L.v))
            out.append((p + "attention.qkv.bias", cat0([qb, kb, vb])))
        out.append((p + "attention.dense.weight", _split_cols(L.o.weight, tp, r, "attention.dense")))
        if dense_bias:
            out.append((p + "attention.dense.bias", _bias_or_zeros(L.o, spec.hidden_size, dt)))
        if L.mlp_norm is not None:
            name = "mlp_layernorm" if spec.new_decoder_architecture else "post_layernorm"
            out.append((p + f"{name}.weight", _gain(L.mlp_norm)))
            if L.mlp_norm.bias is not None or spec.norm == "layer":
                out.append((p + f"{name}.bias", norm_bias(L.mlp_norm)))
        if L.experts:
            out.append((p + "mlp.router.weight", L.router))
            fc = [cat0([_split_rows(e.up.weight, tp, r, "w3"), _split_rows(e.gate.weight, tp, r, "w1")])
                  for e in L.experts]
            proj = [_split_cols(e.down.weight, tp, r, "w2") for e in L.experts]
            out.append((p + "mlp.fc.weight", Stack(fc)))
            out.append((p + "mlp.proj.weight", Stack(proj)))
            continue
        first = L.gate if spec.gated else L.up
        out.append((p + "mlp.fc.weight", _split_rows(first.weight, tp, r, "mlp.fc")))
        if mlp_bias:
            out.append((p + "mlp.fc.bias",
                        _split_rows(_bias_or_zeros(first, spec.intermediate_size, dt), tp, r, "mlp.fc bias")))
        if spec.gated:
            out.append((p + "mlp.gate.weight", _split_rows(L.up.weight, tp, r, "mlp.gate")))
            if mlp_bias:
                out.append((p + "mlp.gate.bias",
                            _split_rows(_bias_or_zeros(L.up, spec.intermediate_size, dt), tp, r, "mlp.gate bias")))
        out.append((p + "mlp.proj.weight", _split_cols(L.down.weight, tp, r, "mlp.proj")))
        if mlp_bias:
            out.append((p + "mlp.proj.bias", _bias_or_zeros(L.down, spec.hidden_size, dt)))
    if pp_rank == pp - 1:
        out.append(("transformer.ln_f.weight", _gain(model.final_norm)))
        if model.final_norm.bias is not None or spec.norm == "layer":
            out.append(("transformer.ln_f.bias", norm_bias(model.final_norm)))
        head = model.lm_head if model.lm_head is not None else model.embed
        pad = -spec.vocab_size % tp
        if pad:
            head = Rows([(head, 0, spec.vocab_size), (Zeros((pad, spec.hidden_size), dt), 0, pad)])
        out.append(("lm_head.weight", _split_rows(head, tp, r, "lm_head")))
    return out


def write_trtllm_checkpoint(model: Model, out_dir: Path, *, dtype: torch.dtype, tp: int, pp: int,
                            progress=None) -> WrittenFiles:
    spec = model.spec
    if tp < 1 or pp < 1:
        raise ExportError("tensor and pipeline parallelism sizes must be >= 1")
    if spec.num_heads % tp:
        raise ExportError(f"{spec.num_heads} attention heads do not split over tensor parallelism {tp}")
    if pp > spec.num_layers:
        raise ExportError(f"pipeline parallelism {pp} exceeds the {spec.num_layers} layers")
    if spec.rotary_pct != 1.0 and _ARCH[spec.arch] != "GPTForCausalLM":
        raise ExportError("partial rotary embeddings are only expressible for GPT-family TRT-LLM checkpoints")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(trtllm_config(spec, dtype, tp, pp), indent=2) + "\n")
    written = WrittenFiles()
    for p in range(pp):
        for t in range(tp):
            rank = p * tp + t
            res = write_safetensors(out_dir, rank_tensors(model, tp, pp, t, p), dtype=dtype,
                                    max_shard_bytes=1 << 62, prefix=f"rank{rank}", index=False, progress=progress)
            written.files.update(res.files)
            written.total_bytes += res.total_bytes
    return written
