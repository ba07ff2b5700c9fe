"""Swaps Triton kernels into a model on CUDA, in place (as gpt-fast's quantize.py swaps its linears).

What changes: attention over the paged cache (one kernel per layer for any mix of prompt chunks and
decode rows, which is also what lets a decode step be captured in a CUDA graph; FP8 caches included),
RMSNorm in one pass, the gated SiLU MLP's activation in one kernel, and the per-token quantization of
the activations of FP8 linears (quantize.ScaledMMLinear) in one kernel. The modules keep their parameters and buffers; only
``forward`` differs, so the weights loaded for model.py serve unchanged.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch
from torch import Tensor

from .attention import AttentionMetadata, PagedAttention
from .model import Attention, FeedForward, Norm, Transformer, TransformerBlock
from .quantize import ScaledMMLinear

log = logging.getLogger(__name__)

__all__ = ["triton_available", "use_triton_kernels"]


def triton_available() -> bool:
    """Triton on a CUDA device (or its CPU interpreter, TRITON_INTERPRET=1, which tests use)."""
    device_ok = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    return device_ok and importlib.util.find_spec("triton") is not None


class TritonPagedAttention(PagedAttention):
    def forward(self, q: Tensor, k: Tensor, v: Tensor, meta: AttentionMetadata) -> Tensor:
        from .cuda_kernels import paged_attention

        self.write(k, v, meta)
        return paged_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens,
                               meta.query_start_loc, meta.max_query_len, self.scale, self.window,
                               k_scale=self.k_scale, v_scale=self.v_scale)


class TritonAttention(Attention):
    """Rotary embedding, the cache write and attention in two kernels instead of a dozen small ones."""

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, meta: AttentionMetadata) -> Tensor:
        from .cuda_kernels import paged_attention, rotary_and_cache

        qkv = self.wqkv(x)
        cache = self.paged
        cos, sin = rope if rope is not None else (None, None)
        q = rotary_and_cache(qkv, cos, sin, meta.slot_mapping, cache.k_cache, cache.v_cache,
                             self.n_heads, self.n_kv_heads, self.head_dim, cache.k_scale, cache.v_scale)
        y = paged_attention(q, cache.k_cache, cache.v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                            meta.max_query_len, cache.scale, cache.window, k_scale=cache.k_scale,
                            v_scale=cache.v_scale)
        return self.wo(y.view(x.shape[0], -1))


class TritonRMSNorm(Norm):
    def forward(self, x: Tensor) -> Tensor:
        from .cuda_kernels import rms_norm

        return rms_norm(x, self.weight, self.eps, self.offset)


class TritonBlock(TransformerBlock):
    """A sequential block with RMSNorms: the residual add after attention is folded into the second norm."""

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, meta: AttentionMetadata) -> Tensor:
        from .cuda_kernels import rms_norm

        attn = self.attention(self.attention_norm(x), rope, meta)
        norm = self.ffn_norm
        normed, h = rms_norm(attn, norm.weight, norm.eps, norm.offset, residual=x)
        return h + self.feed_forward(normed)


class TritonScaledMMLinear(ScaledMMLinear):
    def quantize_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        from .cuda_kernels import per_token_fp8

        return per_token_fp8(x, self.input_scale)


class TritonSiluFeedForward(FeedForward):
    def activate(self, h: Tensor) -> Tensor:
        from .cuda_kernels import silu_mul

        return silu_mul(h)


def use_triton_kernels(model: Transformer) -> bool:
    """Swap the kernels in; False (model unchanged) where Triton or CUDA is missing."""
    if not triton_available():
        log.warning("triton is not importable here: the model runs on PyTorch's own kernels")
        return False
    model.paged_attention_cls = TritonPagedAttention
    model.device_attention = True
    for module in model.modules():
        if type(module) is Norm and module.kind == "rms":
            module.__class__ = TritonRMSNorm
        elif type(module) is FeedForward and module.gated and module.act is torch.nn.functional.silu:
            module.__class__ = TritonSiluFeedForward
        elif type(module) is Attention:
            module.__class__ = TritonAttention
        elif type(module) is ScaledMMLinear:
            module.__class__ = TritonScaledMMLinear
    for block in model.layers:
        if not block.parallel and isinstance(block.ffn_norm, TritonRMSNorm):
            block.__class__ = TritonBlock
    return True
