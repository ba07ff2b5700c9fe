"""The model between reader and writer: hyper-parameters plus lazily read weights, by role.

Each source format (Megatron, TRT-LLM, Hugging Face) is read into this one shape, and each output
format (an HF architecture, a TRT-LLM checkpoint) is written from it, so N formats need N readers
and M writers rather than N x M converters. Weights are named by role (q, k, v, gate, up, ...)
with separate q/k/v; any fusing or transposing is the writer's business.

Norm weights keep the convention they were stored in: ``offset`` says the layer computes
``(weight + offset) * x_hat``. A writer converts only when its format's convention differs, so a
bfloat16 weight is never rounded through ``w + 1 - 1``.

FP8 weights are ``lazy.Quantized``: read as their dequantized values by any writer, kept as FP8 bytes and
scales by the one that asks (``fp8.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .lazy import Lazy

#: tritonize's model types (the --model_type values of NeMo's deploy_triton.py, plus aliases people use)
MODEL_TYPES = ("gpt", "gptnext", "nemotron", "llama", "mistral", "falcon", "starcoder", "starcoder2",
               "mixtral", "gemma")


@dataclass
class ModelSpec:
    """Architecture facts in HF terms; ``arch`` is the HF ``architectures[0]`` to write."""

    arch: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-5
    gated: bool = True
    activation: str = "silu"  # HF ACT2FN name
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    positions: str = "rope"  # "rope" | "learned"
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rotary_pct: float = 1.0
    rope_scaling: dict[str, Any] | None = None
    tie_embeddings: bool = False
    num_experts: int = 0
    experts_per_token: int = 0
    parallel_attn: bool = False  # Falcon: attention and MLP read the same block input
    new_decoder_architecture: bool = False  # Falcon 40B/180B style (two norms, grouped qkv)
    sliding_window: int | None = None
    embedding_scale: bool = False  # Gemma: embeddings multiplied by sqrt(hidden) at run time
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    dtype: str = "float32"  # the source's dtype name

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass
class Linear:
    weight: Lazy
    bias: Lazy | None = None


@dataclass
class Norm:
    weight: Lazy
    bias: Lazy | None = None
    offset: float = 0.0


@dataclass
class Expert:
    gate: Linear
    up: Linear
    down: Linear


@dataclass
class Layer:
    attn_norm: Norm | None
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    mlp_norm: Norm | None  # None: the MLP reads attn_norm's output (Falcon parallel, one norm)
    up: Linear | None = None  # the plain MLP's fc, or the gated MLP's up (not activated)
    gate: Linear | None = None  # gated MLPs only: the activated half
    down: Linear | None = None
    router: Lazy | None = None
    experts: list[Expert] = field(default_factory=list)
    # FP8 KV cache scales (what an FP8 cache stores is k / k_scale, v / v_scale): scalars, when the source has them
    k_scale: Lazy | None = None
    v_scale: Lazy | None = None


@dataclass
class Model:
    spec: ModelSpec
    embed: Lazy
    final_norm: Norm
    layers: list[Layer]
    lm_head: Lazy | None = None  # None: tied to embed
    pos_embed: Lazy | None = None
