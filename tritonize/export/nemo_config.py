"""NeMo model configs (NeMo 1 ``model_config.yaml``, NeMo 2 ``context/model.yaml``) as one dataclass.

Both spell Megatron-Core's TransformerConfig, with different names and defaults: NeMo 1 says
``normalization: rmsnorm``, ``activation: swiglu``, ``bias: false``; NeMo 2 says
``normalization: RMSNorm``, ``gated_linear_unit: true`` with an ``activation_func`` target,
``add_bias_linear: false``. :class:`MegatronConfig` holds the facts the weight mapping and the
reference forward need, whatever the spelling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ExportError
from .canonical import MODEL_TYPES


@dataclass
class MegatronConfig:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int | None  # the model's own (unpadded) vocabulary when the config says so
    normalization: str  # "layernorm" | "rmsnorm"
    zero_centered_gamma: bool  # norm output is (1 + w) * x_hat (layernorm1p, Gemma)
    norm_eps: float
    gated: bool
    activation: str  # HF ACT2FN name
    add_bias_linear: bool
    add_qkv_bias: bool
    position: str  # "rope" | "learned"
    rotary_base: float
    rotary_percent: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    share_embeddings: bool
    num_experts: int
    moe_topk: int
    parallel_attention: bool
    new_decoder_architecture: bool
    window_size: int | None
    model_type: str
    make_vocab_size_divisible_by: int = 128


_NEMO2_TYPES = {
    "LlamaModel": "llama",
    "Llama31Model": "llama",
    "Llama32Model": "llama",
    "MistralModel": "mistral",
    "MixtralModel": "mixtral",
    "GemmaModel": "gemma",
    "CodeGemmaModel": "gemma",
    "StarcoderModel": "starcoder",
    "Starcoder2Model": "starcoder2",
    "NemotronModel": "nemotron",
    "GPTModel": "gpt",
}


def _act_from_name(name: str, openai_gelu: bool = False) -> tuple[str, bool]:
    """(HF activation, gated) for a NeMo 1 ``activation`` string."""
    name = str(name).lower()
    gated = name.endswith("glu")
    base = name.removeprefix("fast-").removesuffix("glu") if gated else name
    table = {"gelu": "gelu", "ge": "gelu", "swi": "silu", "silu": "silu", "swish": "silu", "re": "relu",
             "relu": "relu", "squared-relu": "relu2", "approx-gelu": "gelu_pytorch_tanh",
             "openai-gelu": "gelu_pytorch_tanh"}
    if base not in table:
        raise ExportError(f"unsupported activation {name!r} in the NeMo config")
    act = table[base]
    if act == "gelu" and openai_gelu:
        act = "gelu_pytorch_tanh"
    return act, gated


def _act_from_target(target: str) -> str:
    """HF activation for a NeMo 2 ``activation_func._target_`` (a function path)."""
    fn = str(target).rsplit(".", 1)[-1].lower()
    table = {"silu": "silu", "swish": "silu", "gelu": "gelu", "openai_gelu": "gelu_pytorch_tanh",
             "fast_gelu": "gelu_pytorch_tanh", "approx_gelu": "gelu_pytorch_tanh", "gelu_tanh": "gelu_pytorch_tanh",
             "squared_relu": "relu2", "relu": "relu"}
    if fn not in table:
        raise ExportError(f"unsupported activation function {target!r} in the NeMo 2 config")
    return table[fn]


def _check_moe(c: dict[str, Any]) -> None:
    """Mixtral routing (top-k of the logits, softmax over those k) is the only one with an HF equivalent."""
    if not int(c.get("num_moe_experts") or 0):
        return
    unsupported = {
        "moe_router_pre_softmax": bool(c.get("moe_router_pre_softmax")),
        "moe_router_score_function": str(c.get("moe_router_score_function") or "softmax") != "softmax",
        "moe_router_topk_scaling_factor": c.get("moe_router_topk_scaling_factor") not in (None, 1, 1.0),
        "moe_router_enable_expert_bias": bool(c.get("moe_router_enable_expert_bias")),
        "moe_shared_expert_intermediate_size": bool(c.get("moe_shared_expert_intermediate_size")),
        "moe_layer_freq": c.get("moe_layer_freq") not in (None, 1),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ExportError(f"mixture-of-experts setting {bad[0]} = {c.get(bad[0])!r} has no Hugging Face "
                          "equivalent (only Mixtral-style routing is supported)")


def _check_type(model_type: str) -> str:
    mt = model_type.lower()
    if mt not in MODEL_TYPES:
        raise ExportError(f"unknown --model-type {model_type!r}; use one of {', '.join(MODEL_TYPES)}")
    return mt


def _check_common(c: dict[str, Any], where: str, hint: str = "") -> None:
    """What both NeMo generations must have, and the features neither export supports."""
    need = ("num_layers", "hidden_size", "num_attention_heads")
    missing = [k for k in need if c.get(k) is None]
    if missing:
        raise ExportError(f"{where} lacks {', '.join(missing)}{hint}")
    _check_moe(c)
    if c.get("qk_layernorm"):
        raise ExportError("models with qk_layernorm are not supported")


def _linear_scaling(c: dict[str, Any]) -> dict[str, Any] | None:
    if c.get("seq_len_interpolation_factor"):
        return {"rope_type": "linear", "factor": float(c["seq_len_interpolation_factor"])}
    return None


def _finish(c: dict[str, Any], **facts: Any) -> MegatronConfig:
    """The config from the keys NeMo 1 and NeMo 2 spell alike, plus ``facts`` (the ones they spell apart)."""
    window = c.get("window_size")
    facts = {
        "num_layers": int(c["num_layers"]),
        "hidden_size": int(c["hidden_size"]),
        "ffn_hidden_size": int(c.get("ffn_hidden_size") or 4 * int(c["hidden_size"])),
        "num_heads": int(c["num_attention_heads"]),
        "num_query_groups": c.get("num_query_groups"),
        "head_dim": c.get("kv_channels"),
        "norm_eps": float(c.get("layernorm_epsilon", 1e-5)),
        "position": "learned" if str(c.get("position_embedding_type", "learned_absolute")).startswith("learned")
        else "rope",
        "rotary_base": float(c.get("rotary_base", 10000.0)),
        "num_experts": int(c.get("num_moe_experts") or 0),
        "moe_topk": int(c.get("moe_router_topk") or 0),
        "window_size": int(window[0]) + 1 if isinstance(window, (list, tuple)) and window and window[0] else None,
        "make_vocab_size_divisible_by": int(c.get("make_vocab_size_divisible_by") or 128),
        **facts,
    }
    heads = int(facts["num_heads"])
    hidden = int(facts["hidden_size"])
    groups = int(facts.get("num_query_groups") or heads)
    head_dim = int(facts.get("head_dim") or hidden // heads)
    if heads % groups:
        raise ExportError(f"the NeMo config has {heads} attention heads, not a multiple of {groups} query groups")
    facts.update(num_query_groups=groups, head_dim=head_dim)
    return MegatronConfig(**facts)


def _llama3_scaling(c: dict[str, Any], target: str) -> dict[str, Any] | None:
    if "scale_factor" in c and any(t in target for t in ("Llama31", "Llama32", "Llama33", "Llama3")):
        return {"rope_type": "llama3", "factor": float(c.get("scale_factor", 8.0)),
                "low_freq_factor": float(c.get("low_freq_factor", 1.0)),
                "high_freq_factor": float(c.get("high_freq_factor", 4.0)),
                "original_max_position_embeddings": int(c.get("old_context_len", 8192))}
    return None


def from_nemo2(model_yaml: dict[str, Any], model_type: str | None) -> MegatronConfig:
    """``context/model.yaml`` (a fiddle-serialized ``GPTModel`` with its TransformerConfig)."""
    target = str(model_yaml.get("_target_", ""))
    cls = target.rsplit(".", 1)[-1]
    if model_type:
        mt = _check_type(model_type)
    elif cls in _NEMO2_TYPES:
        mt = _NEMO2_TYPES[cls]
    else:
        raise ExportError(
            f"unknown NeMo 2 model _target_ {target or '<none>'!r}; supported: "
            f"{', '.join(sorted(_NEMO2_TYPES))}; pass --model-type to force a type"
        )
    c = model_yaml.get("config")
    if not isinstance(c, dict):
        raise ExportError("context/model.yaml has no 'config' section")
    _check_common(c, "context/model.yaml config")
    conf_target = str(c.get("_target_", ""))
    act_target = (c.get("activation_func") or {}).get("_target_", "torch.nn.functional.gelu") \
        if isinstance(c.get("activation_func"), dict) else str(c.get("activation_func") or "gelu")
    norm = str(c.get("normalization", "LayerNorm")).lower()
    if c.get("multi_latent_attention"):
        raise ExportError("multi-latent attention models are not supported")
    if c.get("rotary_interleaved"):
        raise ExportError("interleaved rotary embeddings (rotary_interleaved: true) are not supported")
    scaling = _llama3_scaling(c, conf_target) or _linear_scaling(c)
    return _finish(
        c,
        vocab_size=int(c["vocab_size"]) if c.get("vocab_size") else None,
        normalization="rmsnorm" if "rms" in norm else "layernorm",
        zero_centered_gamma=bool(c.get("layernorm_zero_centered_gamma", False)) or norm == "layernorm1p",
        gated=bool(c.get("gated_linear_unit", False)),
        activation=_act_from_target(act_target),
        add_bias_linear=bool(c.get("add_bias_linear", True)),
        add_qkv_bias=bool(c.get("add_qkv_bias", False)) or bool(c.get("add_bias_linear", True)),
        rotary_percent=float(c.get("rotary_percent", 1.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(c.get("seq_length") or c.get("max_position_embeddings") or 4096),
        share_embeddings=bool(c.get("share_embeddings_and_output_weights", False)),
        parallel_attention=bool(c.get("parallel_attention", False)),
        new_decoder_architecture=bool(c.get("new_decoder_architecture", False)),
        model_type=mt,
    )


def _detect_nemo1_type(c: dict[str, Any]) -> str:
    name = str(c.get("name", "")).lower()
    for mt in ("mixtral", "gemma", "falcon", "starcoder2", "starcoder", "nemotron", "mistral", "llama"):
        if mt in name:
            return mt
    if int(c.get("num_moe_experts") or 0) > 0:
        return "mixtral"
    if c.get("mcore_customization_config"):
        return "falcon"
    norm = str(c.get("normalization", "layernorm")).lower()
    act = str(c.get("activation", "gelu")).lower()
    if norm == "rmsnorm" and c.get("layernorm_zero_centered_gamma"):
        return "gemma"
    if norm == "rmsnorm" and act in ("swiglu", "fast-swiglu"):
        return "mistral" if c.get("window_size") else "llama"
    if str(c.get("position_embedding_type", "learned_absolute")).startswith("learned") and int(
        c.get("num_query_groups") or 0
    ) == 1:
        return "starcoder"
    return "gpt"


def from_nemo1(c: dict[str, Any], model_type: str | None) -> MegatronConfig:
    """``model_config.yaml`` of a NeMo 1 ``.nemo`` (MegatronGPTModel with ``mcore_gpt: true``)."""
    if not isinstance(c, dict):
        raise ExportError("model_config.yaml is not a mapping")
    _check_common(c, "model_config.yaml", "; is this a GPT-family .nemo?")
    if c.get("mcore_gpt") is False:
        raise ExportError("this .nemo holds a legacy (non-mcore) Megatron GPT; re-save it with mcore_gpt: true")
    mt = _check_type(model_type) if model_type else _detect_nemo1_type(c)
    act, gated = _act_from_name(c.get("activation", "gelu"), bool(c.get("openai_gelu", False)))
    norm = str(c.get("normalization", "layernorm")).lower()
    custom = c.get("mcore_customization_config") or {}
    bias = bool(c.get("bias", True))
    scaling = None
    if c.get("scale_positional_embedding"):
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
    else:
        scaling = _linear_scaling(c)
    return _finish(
        c,
        vocab_size=None,
        normalization="rmsnorm" if norm == "rmsnorm" else "layernorm",
        zero_centered_gamma=norm == "layernorm1p" or bool(c.get("layernorm_zero_centered_gamma", False)),
        gated=gated,
        activation=act,
        add_bias_linear=bias,
        add_qkv_bias=bias or bool(c.get("qkv_bias", False)),
        rotary_percent=float(c.get("rotary_percentage", 1.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(c.get("max_position_embeddings") or c.get("encoder_seq_length") or 2048),
        share_embeddings=bool(c.get("share_embeddings_and_output_weights", True)),
        parallel_attention=bool(custom.get("parallel_attention", False)),
        new_decoder_architecture=bool(custom.get("new_decoder_architecture", False)),
        model_type=mt,
    )


def padded_vocab(vocab: int, divisible_by: int, tp: int = 1) -> int:
    multiple = divisible_by * tp
    return int(math.ceil(vocab / multiple) * multiple)
