"""Hugging Face configs: writing config.json for a model, reading one back, choosing the architecture.

Configs are written in transformers 5.x spelling (``rope_parameters``, ``dtype``) with the 4.x keys
beside them (``rope_theta``, ``rope_scaling``, ``torch_dtype``) so either major version, and
tritonize's runtime, read them. ``check_representable`` refuses a model an architecture cannot
express exactly rather than writing something that would compute differently.
"""

from __future__ import annotations

from typing import Any

from ..errors import ExportError
from .canonical import ModelSpec

ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "GemmaForCausalLM",
    "NemotronForCausalLM",
    "Starcoder2ForCausalLM",
    "GPTBigCodeForCausalLM",
    "GPT2LMHeadModel",
    "FalconForCausalLM",
)

HF_MODEL_TYPE = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
    "GemmaForCausalLM": "gemma",
    "NemotronForCausalLM": "nemotron",
    "Starcoder2ForCausalLM": "starcoder2",
    "GPTBigCodeForCausalLM": "gpt_bigcode",
    "GPT2LMHeadModel": "gpt2",
    "FalconForCausalLM": "falcon",
}

_LLAMA_LIKE = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "GemmaForCausalLM")


def _rope_fields(spec: ModelSpec, partial: bool = False) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(spec.rope_theta)}
    legacy: dict[str, Any] = {"rope_theta": float(spec.rope_theta)}
    if spec.rope_scaling:
        params.update(spec.rope_scaling)
        legacy["rope_scaling"] = dict(spec.rope_scaling)
    if partial:
        params["partial_rotary_factor"] = float(spec.rotary_pct)
        legacy["partial_rotary_factor"] = float(spec.rotary_pct)
    return {"rope_parameters": params, **legacy}


def _common(spec: ModelSpec) -> dict[str, Any]:
    eos = spec.eos_token_ids
    return {
        "architectures": [spec.arch],
        "model_type": HF_MODEL_TYPE[spec.arch],
        "vocab_size": spec.vocab_size,
        "tie_word_embeddings": bool(spec.tie_embeddings),
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": (eos[0] if len(eos) == 1 else list(eos)) if eos else None,
        "pad_token_id": spec.pad_token_id,
        "dtype": spec.dtype,
        "torch_dtype": spec.dtype,
        "use_cache": True,
    }


def hf_config(spec: ModelSpec) -> dict[str, Any]:
    """config.json for ``spec.arch`` (validated by :func:`check_representable` first)."""
    check_representable(spec)
    cfg = _common(spec)
    a = spec.arch
    if a in _LLAMA_LIKE or a in ("NemotronForCausalLM", "Starcoder2ForCausalLM"):
        cfg.update(
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            hidden_act=spec.activation,
            max_position_embeddings=spec.max_position_embeddings,
            attention_dropout=0.0,
        )
        cfg.update(_rope_fields(spec, partial=a == "NemotronForCausalLM"))
    if a in _LLAMA_LIKE:
        cfg["rms_norm_eps"] = spec.norm_eps
    if a == "LlamaForCausalLM":
        cfg.update(attention_bias=spec.qkv_bias or spec.out_bias, mlp_bias=spec.mlp_bias)
    if a in ("MistralForCausalLM", "MixtralForCausalLM", "Starcoder2ForCausalLM"):
        cfg["sliding_window"] = spec.sliding_window
    if a == "MixtralForCausalLM":
        cfg.update(num_local_experts=spec.num_experts, num_experts_per_tok=spec.experts_per_token,
                   router_jitter_noise=0.0)
    if a == "GemmaForCausalLM":
        cfg["hidden_activation"] = spec.activation
    if a == "NemotronForCausalLM":
        cfg.update(norm_eps=spec.norm_eps, attention_bias=spec.qkv_bias or spec.out_bias, mlp_bias=spec.mlp_bias)
    if a == "Starcoder2ForCausalLM":
        cfg.update(norm_epsilon=spec.norm_eps, use_bias=True, residual_dropout=0.0, embedding_dropout=0.0)
    if a in ("GPT2LMHeadModel", "GPTBigCodeForCausalLM"):
        cfg.update(
            n_embd=spec.hidden_size,
            n_layer=spec.num_layers,
            n_head=spec.num_heads,
            n_inner=spec.intermediate_size,
            n_positions=spec.max_position_embeddings,
            activation_function=spec.activation,
            layer_norm_epsilon=spec.norm_eps,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            scale_attn_weights=True,
        )
    if a == "GPTBigCodeForCausalLM":
        cfg["multi_query"] = spec.num_kv_heads == 1
    if a == "FalconForCausalLM":
        cfg.update(
            hidden_size=spec.hidden_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_kv_heads=spec.num_kv_heads,
            multi_query=spec.num_kv_heads == 1 and not spec.new_decoder_architecture,
            new_decoder_architecture=spec.new_decoder_architecture,
            num_ln_in_parallel_attn=2 if spec.new_decoder_architecture else None,
            parallel_attn=spec.parallel_attn or spec.new_decoder_architecture,
            bias=spec.qkv_bias or spec.out_bias or spec.mlp_bias,
            alibi=False,
            layer_norm_epsilon=spec.norm_eps,
            ffn_hidden_size=spec.intermediate_size,
            activation=spec.activation,
            max_position_embeddings=spec.max_position_embeddings,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
        cfg.update(_rope_fields(spec))
    return cfg


def check_representable(spec: ModelSpec) -> None:
    """Raises ExportError when ``spec.arch`` cannot express the model exactly."""
    a = spec.arch

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise ExportError(f"{spec.model_type} model cannot be written as {a}: {what}")

    need(a in ARCHITECTURES, f"unsupported architecture (supported: {', '.join(ARCHITECTURES)})")
    need(spec.num_heads % spec.num_kv_heads == 0, "attention heads are not a multiple of key/value heads")
    if a in _LLAMA_LIKE:
        need(spec.norm == "rms" and spec.gated and spec.positions == "rope", "needs RMSNorm, a gated MLP and RoPE")
        need(spec.rotary_pct == 1.0, "partial rotary embeddings are not supported by this architecture")
        need(not spec.parallel_attn, "parallel attention is not supported by this architecture")
    if a in ("MistralForCausalLM", "MixtralForCausalLM", "GemmaForCausalLM"):
        need(not (spec.qkv_bias or spec.out_bias or spec.mlp_bias), "linear biases are not supported")
    need((spec.num_experts > 0) == (a == "MixtralForCausalLM"), "mixture of experts only as MixtralForCausalLM")
    if a in ("NemotronForCausalLM", "Starcoder2ForCausalLM"):
        need(spec.norm == "layer" and not spec.gated and spec.positions == "rope",
             "needs LayerNorm, a non-gated MLP and RoPE")
        need(not spec.parallel_attn, "parallel attention is not supported by this architecture")
    if a == "Starcoder2ForCausalLM":
        need(spec.rotary_pct == 1.0, "partial rotary embeddings are not supported")
    if a in ("GPT2LMHeadModel", "GPTBigCodeForCausalLM"):
        need(spec.norm == "layer" and not spec.gated and spec.positions == "learned",
             "needs LayerNorm, a non-gated MLP and learned absolute positions")
        need(spec.head_dim * spec.num_heads == spec.hidden_size, "head size x heads must equal hidden size")
        need(not spec.parallel_attn, "parallel attention is not supported by this architecture")
    if a == "GPT2LMHeadModel":
        need(spec.num_kv_heads == spec.num_heads, "grouped or multi-query attention is not supported")
    if a == "GPTBigCodeForCausalLM":
        need(spec.num_kv_heads in (1, spec.num_heads), "only multi-head or multi-query attention")
    if a == "FalconForCausalLM":
        need(spec.norm == "layer" and not spec.gated and spec.positions == "rope",
             "needs LayerNorm, a non-gated MLP and RoPE")
        need(spec.rotary_pct == 1.0, "partial rotary embeddings are not supported")
        need(spec.head_dim * spec.num_heads == spec.hidden_size, "head size x heads must equal hidden size")
        need(spec.new_decoder_architecture or spec.num_kv_heads in (1, spec.num_heads),
             "grouped-query attention needs the new decoder architecture")


def choose_arch(spec: ModelSpec) -> str:
    """The HF architecture for a model type and the features the source declares."""
    mt = spec.model_type
    if mt == "mixtral" or spec.num_experts:
        return "MixtralForCausalLM"
    if mt == "gemma":
        return "GemmaForCausalLM"
    if mt == "falcon":
        return "FalconForCausalLM"
    if mt == "starcoder2" or (mt == "starcoder" and spec.positions == "rope"):
        return "Starcoder2ForCausalLM"
    if mt == "starcoder":
        return "GPTBigCodeForCausalLM"
    if mt == "mistral" and not (spec.qkv_bias or spec.out_bias or spec.mlp_bias):
        return "MistralForCausalLM"
    if mt in ("llama", "mistral"):
        return "LlamaForCausalLM"
    # gpt / gptnext / nemotron: whatever architecture expresses the declared features exactly
    if spec.positions == "learned":
        return "GPT2LMHeadModel" if spec.num_kv_heads == spec.num_heads else "GPTBigCodeForCausalLM"
    if spec.norm == "rms" and spec.gated:
        return "LlamaForCausalLM"
    if spec.norm == "layer" and not spec.gated:
        return "NemotronForCausalLM"
    raise ExportError(
        f"{mt} model with {spec.norm} norm, {'gated' if spec.gated else 'plain'} MLP and {spec.positions} "
        "positions has no equivalent Hugging Face architecture; pass --model-type if the type is wrong"
    )


# --------------------------------------------------------------------------------------------------
# HF config -> spec
# --------------------------------------------------------------------------------------------------

_HF_TO_TYPE = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
    "GemmaForCausalLM": "gemma",
    "NemotronForCausalLM": "nemotron",
    "Starcoder2ForCausalLM": "starcoder2",
    "GPTBigCodeForCausalLM": "starcoder",
    "GPT2LMHeadModel": "gpt",
    "FalconForCausalLM": "falcon",
}


def _rope_from_cfg(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None, float]:
    params: dict[str, Any] = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0)
    partial = float(params.pop("partial_rotary_factor", None) or cfg.get("partial_rotary_factor") or 1.0)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.pop("type", None)
    scaling = params if params.get("rope_type", "default") != "default" else None
    return theta, scaling, partial


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def spec_from_hf_config(cfg: dict[str, Any], model_type: str | None = None) -> ModelSpec:
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else ""
    if arch not in ARCHITECTURES:
        by_type = {v: k for k, v in HF_MODEL_TYPE.items()}
        arch = by_type.get(cfg.get("model_type", ""), arch)
    if arch not in ARCHITECTURES:
        raise ExportError(
            f"unsupported Hugging Face architecture {arch or cfg.get('model_type')!r}; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    g = cfg.get
    theta, scaling, partial = _rope_from_cfg(cfg)
    dtype = g("dtype") or g("torch_dtype") or ""  # unknown: the writer keeps the weights' own dtype
    common = dict(
        arch=arch,
        model_type=model_type or _HF_TO_TYPE[arch],
        vocab_size=int(g("vocab_size")),
        tie_embeddings=bool(g("tie_word_embeddings", arch in ("GemmaForCausalLM", "GPT2LMHeadModel",
                                                             "GPTBigCodeForCausalLM", "FalconForCausalLM",
                                                             "Starcoder2ForCausalLM"))),
        bos_token_id=g("bos_token_id"),
        eos_token_ids=_ids(g("eos_token_id")),
        pad_token_id=g("pad_token_id"),
        dtype=str(dtype).removeprefix("torch."),
        rope_theta=theta,
        rope_scaling=scaling,
        rotary_pct=partial,
    )
    if arch in ("GPT2LMHeadModel", "GPTBigCodeForCausalLM"):
        h, nh = int(g("n_embd")), int(g("n_head"))
        kv = 1 if (arch == "GPTBigCodeForCausalLM" and g("multi_query", True)) else nh
        return ModelSpec(**common, hidden_size=h, num_layers=int(g("n_layer")), num_heads=nh, num_kv_heads=kv,
                         head_dim=h // nh, intermediate_size=int(g("n_inner") or 4 * h), norm="layer",
                         norm_eps=float(g("layer_norm_epsilon", 1e-5)), gated=False,
                         activation=g("activation_function", "gelu_new"), qkv_bias=True, out_bias=True,
                         mlp_bias=True, positions="learned", max_position_embeddings=int(g("n_positions", 1024)))
    if arch == "FalconForCausalLM":
        h, nh = int(g("hidden_size")), int(g("num_attention_heads"))
        new = bool(g("new_decoder_architecture", False))
        if g("alibi", False):
            raise ExportError("Falcon with ALiBi positions is not supported")
        kv = int(g("num_kv_heads") or nh) if new else (1 if g("multi_query", True) else nh)
        bias = bool(g("bias", False))
        return ModelSpec(**common, hidden_size=h, num_layers=int(g("num_hidden_layers")), num_heads=nh,
                         num_kv_heads=kv, head_dim=h // nh, intermediate_size=int(g("ffn_hidden_size") or 4 * h),
                         norm="layer", norm_eps=float(g("layer_norm_epsilon", 1e-5)), gated=False,
                         activation=g("activation", "gelu"), qkv_bias=bias, out_bias=bias, mlp_bias=bias,
                         positions="rope", max_position_embeddings=int(g("max_position_embeddings", 2048)),
                         parallel_attn=bool(g("parallel_attn", True)) or new, new_decoder_architecture=new)
    h, nh = int(g("hidden_size")), int(g("num_attention_heads"))
    kv = int(g("num_key_value_heads") or nh)
    head_dim = int(g("head_dim") or h // nh)
    layer_norm = arch in ("NemotronForCausalLM", "Starcoder2ForCausalLM")
    eps = g("rms_norm_eps") or g("norm_eps") or g("norm_epsilon") or 1e-5
    act = g("hidden_activation") if arch == "GemmaForCausalLM" and g("hidden_activation") else g("hidden_act", "silu")
    attn_bias = bool(g("attention_bias", False)) or (arch == "Starcoder2ForCausalLM" and bool(g("use_bias", True)))
    mlp_bias = bool(g("mlp_bias", False)) or (arch == "Starcoder2ForCausalLM" and bool(g("use_bias", True)))
    return ModelSpec(**common, hidden_size=h, num_layers=int(g("num_hidden_layers")), num_heads=nh, num_kv_heads=kv,
                     head_dim=head_dim, intermediate_size=int(g("intermediate_size")),
                     norm="layer" if layer_norm else "rms", norm_eps=float(eps),
                     gated=not layer_norm, activation=act, qkv_bias=attn_bias, out_bias=attn_bias,
                     mlp_bias=mlp_bias, positions="rope",
                     max_position_embeddings=int(g("max_position_embeddings", 4096)),
                     sliding_window=g("sliding_window"),
                     num_experts=int(g("num_local_experts", 0)) if arch == "MixtralForCausalLM" else 0,
                     experts_per_token=int(g("num_experts_per_tok", 0)) if arch == "MixtralForCausalLM" else 0,
                     embedding_scale=arch == "GemmaForCausalLM")
