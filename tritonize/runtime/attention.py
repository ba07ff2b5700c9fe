"""Attention over the paged KV cache, in plain PyTorch.

A step's tokens are packed one sequence after another (``query_start_loc``); each sequence reads its
keys and values through its block table. This version gathers each sequence's blocks and runs SDPA with
the causal mask of its positions: exact, simple and fast enough on a CPU, and the reference that the
Triton kernel (``cuda_kernels.paged_attention``, swapped in on CUDA) is tested against.

An FP8 cache (``cache_dtype`` float8_e4m3fn) stores ``k / k_scale`` and ``v / v_scale`` rounded to FP8
(saturating at 448) and multiplies them back when it reads them: half the bytes of a bfloat16 cache per
token. The scales are per layer and static: the checkpoint's calibrated ``k_scale`` / ``v_scale`` when it
has them, else 1.0 (as vLLM and TensorRT-LLM do without calibration).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quantize import FP8, to_fp8

__all__ = ["AttentionMetadata", "PagedAttention", "attend"]


@dataclass
class AttentionMetadata:
    """Where a step's tokens belong. Device tensors, plus the few host numbers the Python path needs.

    ``slot_mapping[i]``: the flat cache row (block * block_size + offset) token i's keys and values go to.
    ``block_tables[s]``: sequence s's blocks, padded with block 0. ``seq_lens[s]``: its tokens in the cache
    once this step is done; its queries are the last ``query_start_loc[s + 1] - query_start_loc[s]`` of them.
    ``logits_indices``: the tokens whose logits the step returns (one per sampling sequence).
    """

    slot_mapping: Tensor  # [N] int64
    block_tables: Tensor  # [S, max_blocks] int32
    seq_lens: Tensor  # [S] int32
    query_start_loc: Tensor  # [S + 1] int32
    logits_indices: Tensor  # [R] int64
    max_query_len: int
    seq_lens_host: list[int]
    query_start_host: list[int]


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """SDPA for q ``[T, H, D]`` over ``k, v [L, Hkv, D]`` with mask ``[T, L]`` -> ``[T, H, D]``.

    The query heads that share one key/value head are folded into the query length, so grouped-query
    and multi-query attention need no copy of the keys.
    """
    T, H, D = q.shape
    n_kv = k.shape[1]
    rep = H // n_kv
    q = q.view(T, n_kv, rep, D).permute(1, 2, 0, 3).reshape(n_kv, rep * T, D)
    mask = mask.repeat(rep, 1)
    y = F.scaled_dot_product_attention(q, k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale)
    return y.view(n_kv, rep, T, D).permute(2, 0, 1, 3).reshape(T, H, D)


class PagedAttention(nn.Module):
    """One layer's cache ``[num_blocks, block_size, kv_heads, head_dim]`` for K and for V, and the
    attention of a packed step over it."""

    def __init__(self, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int, scale: float,
                 window: int | None, dtype: torch.dtype, device: torch.device | str,
                 cache_dtype: torch.dtype | None = None, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        super().__init__()
        shape = (num_blocks, block_size, n_kv_heads, head_dim)
        cache_dtype = cache_dtype or dtype
        self.register_buffer("k_cache", torch.zeros(shape, dtype=cache_dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=cache_dtype, device=device), persistent=False)
        self.block_size = block_size
        self.scale = scale
        self.window = window or 0
        self.fp8 = cache_dtype == FP8
        self.k_scale, self.v_scale = (float(k_scale), float(v_scale)) if self.fp8 else (1.0, 1.0)

    def write(self, k: Tensor, v: Tensor, meta: AttentionMetadata) -> None:
        n_kv, d = k.shape[-2:]
        if self.fp8:  # index_copy_ has no FP8 kernel on the CPU: copy the bytes
            k_rows = self.k_cache.view(torch.uint8).view(-1, n_kv, d)
            v_rows = self.v_cache.view(torch.uint8).view(-1, n_kv, d)
            k_rows.index_copy_(0, meta.slot_mapping, to_fp8(k.float() / self.k_scale).view(torch.uint8))
            v_rows.index_copy_(0, meta.slot_mapping, to_fp8(v.float() / self.v_scale).view(torch.uint8))
            return
        self.k_cache.view(-1, n_kv, d).index_copy_(0, meta.slot_mapping, k)
        self.v_cache.view(-1, n_kv, d).index_copy_(0, meta.slot_mapping, v)

    def read(self, blocks: Tensor, seq_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Keys and values of one sequence's first ``seq_len`` positions, in ``dtype``."""
        keys = self.k_cache[blocks].flatten(0, 1)[:seq_len]
        values = self.v_cache[blocks].flatten(0, 1)[:seq_len]
        if self.fp8:
            return (keys.float() * self.k_scale).to(dtype), (values.float() * self.v_scale).to(dtype)
        return keys, values

    def forward(self, q: Tensor, k: Tensor, v: Tensor, meta: AttentionMetadata) -> Tensor:
        """q ``[N, H, D]``, k/v ``[N, Hkv, D]`` of this step's tokens -> ``[N, H, D]``."""
        self.write(k, v, meta)
        out = torch.empty_like(q)
        bs = self.block_size
        starts = meta.query_start_host
        for s, seq_len in enumerate(meta.seq_lens_host):
            q_s = q[starts[s] : starts[s + 1]]
            n_q = q_s.shape[0]
            if n_q == 0:
                continue
            blocks = meta.block_tables[s, : -(-seq_len // bs)]
            keys, values = self.read(blocks, seq_len, q.dtype)
            k_pos = torch.arange(seq_len, device=q.device)
            q_pos = k_pos[seq_len - n_q :, None]
            mask = k_pos[None, :] <= q_pos
            if self.window:
                mask = mask & (k_pos[None, :] > q_pos - self.window)
            out[starts[s] : starts[s + 1]] = attend(q_s, keys, values, mask, self.scale)
        return out
