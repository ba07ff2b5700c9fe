"""Model hyper-parameters of every supported family, read from a Hugging Face ``config.json``.

One flat dataclass describes all families so that ``model.py`` can stay a single readable
transformer whose behaviour is switched by data, not by subclasses. ``from_hf_config`` is the only
place that knows the per-family spellings (and the transformers 4.x vs 5.x ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "GemmaForCausalLM",
    "GPT2LMHeadModel",
    "GPTBigCodeForCausalLM",
    "Starcoder2ForCausalLM",
    "FalconForCausalLM",
    "NemotronForCausalLM",
)

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model this runtime cannot run faithfully."""


@dataclass
class ModelArgs:
    architecture: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    # Normalisation: "rms" or "layer"; gemma and NeMo's layernorm1p store w and apply (1 + w).
    norm: str = "rms"
    norm_eps: float = 1e-5
    norm_offset: float = 0.0
    norm_bias: bool = False
    # Feed-forward: "gated" (act(gate) * up) or "plain" (act(fc)); activation names below.
    mlp: str = "gated"
    activation: str = "silu"
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    # Falcon: attention and MLP both read the block input; 2 norms (new arch) or 1 shared.
    parallel_attn: bool = False
    parallel_norms: int = 1
    # Positions: "rope" (rotate-half) or "learned" (absolute embedding table).
    positions: str = "rope"
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rotary_dim: int = 0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    sliding_window: int | None = None
    # Mixture of experts (Mixtral): 0 experts means a dense MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    tie_word_embeddings: bool = False
    embedding_scale: float = 1.0
    attn_scale: float = 0.0
    dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.rotary_dim:
            self.rotary_dim = self.head_dim
        if not self.attn_scale:
            self.attn_scale = self.head_dim**-0.5
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(
                f"{self.architecture}: {self.n_heads} attention heads are not a multiple of "
                f"{self.n_kv_heads} key/value heads"
            )

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        """Build the arguments from a parsed HF ``config.json`` (transformers 4.x or 5.x)."""
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else _ARCH_BY_MODEL_TYPE.get(cfg.get("model_type", ""), "")
        reader = _READERS.get(arch)
        if reader is None:
            raise UnsupportedModelError(
                f"unsupported architecture {arch or cfg.get('model_type') or '<none>'!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        return reader(cfg, arch)


_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gpt_bigcode": "GPTBigCodeForCausalLM",
    "starcoder2": "Starcoder2ForCausalLM",
    "falcon": "FalconForCausalLM",
    "nemotron": "NemotronForCausalLM",
}

# HF activation names -> the few this runtime implements.
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu2": "relu2",
    "relu": "relu",
}


def _activation(arch: str, name: str) -> str:
    if name not in _ACTIVATIONS:
        raise UnsupportedModelError(
            f"{arch}: unsupported activation {name!r}; supported: {', '.join(sorted(_ACTIVATIONS))}"
        )
    return _ACTIVATIONS[name]


def _dtype(cfg: dict[str, Any]) -> str | None:
    value = cfg.get("dtype") or cfg.get("torch_dtype")
    return value if isinstance(value, str) else None


def _head_dim(cfg: dict[str, Any], dim: int, n_heads: int) -> int:
    return int(cfg.get("head_dim") or dim // n_heads)


def _rope(cfg: dict[str, Any], arch: str, head_dim: int, default_theta: float = 10000.0,
          default_partial: float = 1.0) -> dict[str, Any]:
    """Merge ``rope_theta``/``rope_scaling`` (4.x) and ``rope_parameters`` (5.x) into ModelArgs fields."""
    params: dict[str, Any] = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta")) or default_theta
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{arch}: unsupported rope scaling {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    partial = default_partial if partial is None else float(partial)
    out: dict[str, Any] = {
        "rope_theta": float(theta),
        "rope_type": rope_type,
        "rotary_dim": int(head_dim * partial),
    }
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(params["low_freq_factor"])
        out["rope_high_freq_factor"] = float(params["high_freq_factor"])
        out["rope_original_max_position_embeddings"] = int(
            params.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
            or cfg["max_position_embeddings"]
        )
    return out


def _hf_shape(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    """The shape fields of the families whose config.json uses transformers' standard names."""
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    return {
        "architecture": arch,
        "vocab_size": cfg["vocab_size"],
        "dim": dim,
        "n_layers": cfg["num_hidden_layers"],
        "n_heads": n_heads,
        "n_kv_heads": cfg.get("num_key_value_heads") or n_heads,
        "head_dim": _head_dim(cfg, dim, n_heads),
        "intermediate_size": cfg["intermediate_size"],
    }


def _llama_like(cfg: dict[str, Any], arch: str) -> ModelArgs:
    """Llama, Mistral, Mixtral and Gemma: RMSNorm, rotary, gated MLP (or MoE)."""
    shape = _hf_shape(cfg, arch)
    gemma = arch == "GemmaForCausalLM"
    act = cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu"
    if gemma:
        # Gemma's released configs say "gelu" but mean the tanh approximation (as transformers does).
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        act = "gelu_pytorch_tanh" if act == "gelu" else act
    mixtral = arch == "MixtralForCausalLM"
    attention_bias = bool(cfg.get("attention_bias", False))
    return ModelArgs(
        **shape,
        norm="rms",
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        norm_offset=1.0 if gemma else 0.0,
        activation=_activation(arch, act),
        qkv_bias=attention_bias,
        out_bias=attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        sliding_window=cfg.get("sliding_window") if arch in ("MistralForCausalLM", "MixtralForCausalLM") else None,
        num_experts=cfg.get("num_local_experts", 0) if mixtral else 0,
        num_experts_per_tok=cfg.get("num_experts_per_tok", 2) if mixtral else 0,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
        embedding_scale=math.sqrt(shape["dim"]) if gemma else 1.0,
        dtype=_dtype(cfg),
        **_rope(cfg, arch, shape["head_dim"], default_theta=1e6 if mixtral else 10000.0),
    )


def _nemotron(cfg: dict[str, Any], arch: str) -> ModelArgs:
    """Nemotron (NeMo gptnext): layernorm1p, partial rotary, squared-ReLU non-gated MLP."""
    shape = _hf_shape(cfg, arch)
    attention_bias = bool(cfg.get("attention_bias", False))
    return ModelArgs(
        **shape,
        norm="layer",
        norm_eps=float(cfg.get("norm_eps", 1e-5)),
        norm_offset=1.0,
        norm_bias=True,
        mlp="plain",
        activation=_activation(arch, cfg.get("hidden_act", "relu2")),
        qkv_bias=attention_bias,
        out_bias=attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        dtype=_dtype(cfg),
        **_rope(cfg, arch, shape["head_dim"], default_partial=0.5),
    )


def _starcoder2(cfg: dict[str, Any], arch: str) -> ModelArgs:
    """StarCoder 2: LayerNorm with bias, rotary, biases everywhere, plain GeLU MLP."""
    shape = _hf_shape(cfg, arch)
    bias = bool(cfg.get("use_bias", True))
    return ModelArgs(
        **shape,
        norm="layer",
        norm_eps=float(cfg.get("norm_epsilon", 1e-5)),
        norm_bias=True,
        mlp="plain",
        activation=_activation(arch, cfg.get("hidden_act", "gelu_pytorch_tanh")),
        qkv_bias=bias,
        out_bias=bias,
        mlp_bias=bias,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        sliding_window=cfg.get("sliding_window"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        dtype=_dtype(cfg),
        **_rope(cfg, arch, shape["head_dim"]),
    )


def _gpt2_like(cfg: dict[str, Any], arch: str) -> ModelArgs:
    """GPT-2 and GPTBigCode (StarCoder 1): learned positions, LayerNorm, plain GeLU MLP, fused c_attn."""
    dim, n_heads = cfg["n_embd"], cfg["n_head"]
    if cfg.get("scale_attn_by_inverse_layer_idx"):
        raise UnsupportedModelError(f"{arch}: scale_attn_by_inverse_layer_idx=true is not supported")
    bigcode = arch == "GPTBigCodeForCausalLM"
    n_kv = 1 if bigcode and cfg.get("multi_query", True) else n_heads
    head_dim = dim // n_heads
    return ModelArgs(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        dim=dim,
        n_layers=cfg["n_layer"],
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=cfg.get("n_inner") or 4 * dim,
        norm="layer",
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        norm_bias=True,
        mlp="plain",
        activation=_activation(arch, cfg.get("activation_function", "gelu_new")),
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        positions="learned",
        max_position_embeddings=cfg.get("n_positions", 1024),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        attn_scale=head_dim**-0.5 if cfg.get("scale_attn_weights", True) else 1.0,
        dtype=_dtype(cfg),
    )


def _falcon(cfg: dict[str, Any], arch: str) -> ModelArgs:
    """Falcon: rotary only (no ALiBi), LayerNorm with bias, GeLU MLP, parallel attention."""
    if cfg.get("alibi"):
        raise UnsupportedModelError(f"{arch}: ALiBi position encoding (alibi=true) is not supported; only rotary")
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = dim // n_heads
    new_arch = bool(cfg.get("new_decoder_architecture", False))
    multi_query = bool(cfg.get("multi_query", True))
    n_kv = cfg.get("num_kv_heads") or n_heads
    if not new_arch and multi_query:
        n_kv = 1
    parallel = bool(cfg.get("parallel_attn", True)) or new_arch
    num_ln = cfg.get("num_ln_in_parallel_attn") or (2 if new_arch else 1)
    bias = bool(cfg.get("bias", False))
    return ModelArgs(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        dim=dim,
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=cfg.get("ffn_hidden_size") or 4 * dim,
        norm="layer",
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        norm_bias=True,
        mlp="plain",
        activation=_activation(arch, cfg.get("activation") or "gelu"),
        qkv_bias=bias,
        out_bias=bias,
        mlp_bias=bias,
        parallel_attn=parallel,
        parallel_norms=num_ln if new_arch and parallel else 1,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        dtype=_dtype(cfg),
        extra={"new_decoder_architecture": new_arch, "multi_query": multi_query},
        **_rope(cfg, arch, head_dim),
    )


_READERS = {
    "LlamaForCausalLM": _llama_like,
    "MistralForCausalLM": _llama_like,
    "MixtralForCausalLM": _llama_like,
    "GemmaForCausalLM": _llama_like,
    "GPT2LMHeadModel": _gpt2_like,
    "GPTBigCodeForCausalLM": _gpt2_like,
    "Starcoder2ForCausalLM": _starcoder2,
    "FalconForCausalLM": _falcon,
    "NemotronForCausalLM": _nemotron,
}
