"""GPU kernels written in Triton: attention over the paged KV cache, and small fusions of the decode step.

Imported only where CUDA and the ``triton`` package are present; ``attention.py`` and ``model.py`` hold the
plain PyTorch versions that run everywhere else (and are the reference these kernels are tested against).

``paged_attention`` serves every step with one launch per layer, whatever mixes it holds: decode rows
(one query each), prompt chunks (many queries, causal), and chunks that continue a cached prefix. The
tokens of all sequences are packed one after the other (``query_start_loc`` says where each begins), as
in vLLM's unified attention; each program takes a tile of one sequence's queries for one key/value head,
with the query heads that share that key/value head stacked as rows of the same tile, and walks the
sequence's blocks through its block table with an online softmax. The grid depends only on the number
of tokens and sequences, so a decode step keeps its shape and can be replayed from a CUDA graph. A step with few
tiles (a decode of a few sequences, a short chunk over a long cached prefix) would leave most SMs idle while each
tile walks its whole context: there the keys of a tile are shared among up to 16 programs, each keeping its
running max, sum and output, and ``_combine_splits_kernel`` adds them (flash-decoding).

An FP8 KV cache (float8_e4m3fn) is written by ``rotary_and_cache`` as ``k / k_scale`` (``v / v_scale``) and
read by ``paged_attention``, which folds ``k_scale`` into the softmax scale and ``v_scale`` into the output.
Values are rounded to FP8 by ``_fp8_round`` in float32 arithmetic (nearest, ties to even, saturating at
448, as PyTorch's cast of a clamped value) before the cast, which then only converts an exact FP8 value:
the result is the same bytes on a GPU, in Triton's CPU interpreter (whose own float-to-FP8 cast rounds
differently) and in the PyTorch reference. ``per_token_fp8`` quantizes the activations of an FP8 linear
(quantize.ScaledMMLinear) in one kernel. ``_fp8_linear_kernel`` multiplies activations by FP8 weights in two
ways: ``fp8_weight_only_linear`` takes a few rows as they are and widens the weights to bfloat16 in registers (one
row as a matrix-vector product on the CUDA cores), so a small-batch step reads the FP8 bytes once and nothing else;
``fp8_scaled_linear`` takes activations already quantized per token and multiplies FP8 by FP8 on the tensor cores,
in tiles of 64 rows for decode-sized steps, where torch._scaled_mm's GEMMs leave SMs idle. quantize.ScaledMMLinear
picks by the step's rows (``TRITONIZE_FP8_WEIGHT_ONLY_ROWS``, ``TRITONIZE_FP8_KERNEL_ROWS``). Where an output is too
narrow to give every SM weights to read, K is shared among programs (split-K) and the last to finish adds the
shares in order.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["Fp8Tiling", "fp8_scaled_linear", "fp8_tiling", "fp8_weight_only_linear", "paged_attention", "per_token_fp8",
           "reserve_fp8_linear", "rms_norm", "rotary_and_cache", "silu_mul"]

FP8 = torch.float8_e4m3fn
WEIGHT_ONLY_MAX_ROWS = 64  # rows fp8_weight_only_linear takes (a program holds them all)


@triton.jit
def _fp8_round(x):
    """float32 ``x`` rounded to the nearest float8_e4m3fn value (ties to even), saturating at +-448; still float32."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    exp = (x.to(tl.int32, bitcast=True) >> 23) & 0xFF
    # 3 mantissa bits: a step of 2^(e - 3) in binade e; below the smallest normal (2^-6) a fixed step of 2^-9
    step_exp = tl.maximum(exp - 3, 127 - 9)
    step = (step_exp << 23).to(tl.float32, bitcast=True)
    inv_step = ((254 - step_exp) << 23).to(tl.float32, bitcast=True)
    r = x * inv_step  # exact: a power of two
    r = (r + 12582912.0) - 12582912.0  # 1.5 * 2^23: rounds to an integer, ties to even
    return r * step


@triton.jit
def _to_cache(x, scale, FP8_CACHE: tl.constexpr):
    """What the cache stores for float32 ``x``: ``x / scale`` (IEEE division, as PyTorch's) rounded to FP8, or ``x``."""
    if FP8_CACHE:
        return _fp8_round(tl.math.div_rn(x, scale))
    return x


@triton.jit
def _find_sequence(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence that owns query tile ``q_block``: tiles are numbered ``start // BLOCK_Q + s`` on."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["num_seqs"])
def _paged_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    scale, num_seqs,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_k_blk, stride_k_tok, stride_k_head, stride_v_blk, stride_v_tok, stride_v_head,
    stride_bt,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr, IEEE: tl.constexpr, FP8_CACHE: tl.constexpr, v_scale,
    acc_ws_ptr, ml_ws_ptr, n_heads, NUM_SPLITS: tl.constexpr,
):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    s = _find_sequence(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + s)
    q_len = tl.load(query_start_loc_ptr + s + 1) - q_start
    local = q_block - (q_start // BLOCK_Q + s)
    if local * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + s)
    context = seq_len - q_len  # tokens cached before this step's queries

    rows = tl.arange(0, BLOCK_M)
    t = local * BLOCK_Q + rows // GROUP_P  # query index within the sequence
    g = rows % GROUP_P
    row_ok = (t < q_len) & (g < GROUP)
    head = kv_head * GROUP + g
    d = tl.arange(0, HEAD_P)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + t)[:, None] * stride_q_tok + head[:, None] * stride_q_head + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = context + t

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_P], tl.float32)
    last = tl.minimum(local * BLOCK_Q + BLOCK_Q, q_len) - 1
    kv_end = context + last + 1
    kv_start = 0
    if WINDOW > 0:
        kv_start = tl.maximum(context + local * BLOCK_Q - WINDOW + 1, 0)
        kv_start = (kv_start // BLOCK_N) * BLOCK_N
    if NUM_SPLITS > 1:  # this program's share of the keys: whole tiles of BLOCK_N, the last shares may have none
        share = tl.cdiv(tl.cdiv(kv_end - kv_start, NUM_SPLITS), BLOCK_N) * BLOCK_N
        kv_start = kv_start + split * share
        kv_end = tl.minimum(kv_end, kv_start + share)
    for j0 in range(kv_start, kv_end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_ok = j < kv_end
        blk = tl.load(block_tables_ptr + s * stride_bt + j // BLOCK_SIZE, mask=j_ok, other=0).to(tl.int64)
        off = j % BLOCK_SIZE
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + blk[:, None] * stride_k_blk + off[:, None] * stride_k_tok
                    + kv_head * stride_k_head + d[None, :], mask=kv_mask, other=0.0)
        if FP8_CACHE:  # k_scale is folded into ``scale``
            k = k.to(q.dtype)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = qk * scale
        visible = (j[None, :] <= q_pos[:, None]) & j_ok[None, :]
        if WINDOW > 0:
            visible = visible & (j[None, :] > q_pos[:, None] - WINDOW)
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(qk - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + blk[:, None] * stride_v_blk + off[:, None] * stride_v_tok
                    + kv_head * stride_v_head + d[None, :], mask=kv_mask, other=0.0)
        if FP8_CACHE:
            v = v.to(q.dtype)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if NUM_SPLITS > 1:  # the share's running max, sum and unnormalized output, for _combine_splits_kernel
        at = ((q_start + t).to(tl.int64) * n_heads + head) * NUM_SPLITS + split
        tl.store(acc_ws_ptr + at[:, None] * HEAD_P + d[None, :], acc, mask=row_ok[:, None])
        tl.store(ml_ws_ptr + 2 * at, m_i, mask=row_ok)
        tl.store(ml_ws_ptr + 2 * at + 1, l_i, mask=row_ok)
        return
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if FP8_CACHE:
        out = out * v_scale
    tl.store(out_ptr + (q_start + t)[:, None] * stride_o_tok + head[:, None] * stride_o_head + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_splits_kernel(out_ptr, acc_ws_ptr, ml_ws_ptr, n_heads, stride_o_tok, stride_o_head, v_scale,
                           HEAD_DIM: tl.constexpr, HEAD_P: tl.constexpr, NUM_SPLITS: tl.constexpr,
                           FP8_CACHE: tl.constexpr):
    """One query head of one token: its key shares' partial softmaxes rescaled to their common max and added."""
    row = tl.program_id(0).to(tl.int64)  # token * n_heads + head
    splits = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_P)
    m = tl.load(ml_ws_ptr + 2 * (row * NUM_SPLITS + splits))
    l_s = tl.load(ml_ws_ptr + 2 * (row * NUM_SPLITS + splits) + 1)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp(m - m_safe)  # a share without keys: m = -inf, weight 0
    acc = tl.load(acc_ws_ptr + (row * NUM_SPLITS + splits)[:, None] * HEAD_P + d[None, :])
    total = tl.sum(acc * w[:, None], 0)
    denominator = tl.sum(l_s * w, 0)
    out = total / tl.where(denominator == 0.0, 1.0, denominator)
    if FP8_CACHE:
        out = out * v_scale
    token, head = row // n_heads, row % n_heads
    tl.store(out_ptr + token * stride_o_tok + head * stride_o_head + d, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 0  # Triton's CPU interpreter runs programs one after another: shares only where a test asks
    return torch.cuda.get_device_properties(device).multi_processor_count


MAX_SPLITS = 16


def attention_splits(programs: int, device: torch.device) -> int:
    """Shares of the keys per query tile: 1 where a step's tiles (``programs``, tiles x key/value heads) occupy at
    least half the SMs, else enough shares to cover them (a power of two, at most 16). A decode step of one
    sequence has 8 tiles on the 8B shape; each would walk the whole context alone, one block after the other."""
    sms = _sm_count(device)
    if 2 * programs >= sms:
        return 1
    return min(MAX_SPLITS, triton.next_power_of_2(triton.cdiv(sms, max(programs, 1))))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int, scale: float,
                    window: int = 0, out: torch.Tensor | None = None, k_scale: float = 1.0,
                    v_scale: float = 1.0, num_splits: int | None = None) -> torch.Tensor:
    """q ``[N, H, D]`` packed by sequence; caches ``[blocks, block_size, Hkv, D]`` (FP8 ones hold k / k_scale
    and v / v_scale); -> ``[N, H, D]``. ``num_splits`` shares each query tile's keys among that many programs
    (flash-decoding), their partial softmaxes added by a second kernel; by default ``attention_splits`` of the
    step's shape, which a CUDA graph fixes (the lengths it replays with may vary)."""
    n_tokens, n_heads, head_dim = q.shape
    num_blocks, block_size, n_kv, _ = k_cache.shape
    group = n_heads // n_kv
    group_p = triton.next_power_of_2(group)
    head_p = triton.next_power_of_2(head_dim)
    num_seqs = seq_lens.shape[0]
    # Tiles of 16 rows for decode (one query per sequence), 64 for prompt chunks.
    decode = max_query_len <= 1
    block_m = max(16, group_p) if decode else max(64, group_p)
    block_q = block_m // group_p
    if out is None:
        out = torch.empty_like(q)
    if num_splits is None:  # the tiles with work: one per sequence in decode, the tokens' tiles in prompt steps
        tiles = num_seqs if decode else max(1, n_tokens // block_q)
        num_splits = attention_splits(tiles * n_kv, q.device)
    grid = (n_tokens // block_q + num_seqs, n_kv, num_splits)
    fp8 = k_cache.dtype == FP8
    if num_splits > 1:
        acc_ws = torch.empty(n_tokens * n_heads * num_splits, head_p, dtype=torch.float32, device=q.device)
        ml_ws = torch.empty(n_tokens * n_heads * num_splits, 2, dtype=torch.float32, device=q.device)
    else:
        acc_ws = ml_ws = out
    _paged_attention_kernel[grid](
        out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        scale * k_scale if fp8 else scale, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, GROUP_P=group_p, HEAD_DIM=head_dim, HEAD_P=head_p,
        BLOCK_SIZE=block_size, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=64 if head_dim <= 128 else 32,
        WINDOW=int(window or 0), IEEE=q.dtype == torch.float32, FP8_CACHE=fp8, v_scale=float(v_scale),
        acc_ws_ptr=acc_ws, ml_ws_ptr=ml_ws, n_heads=n_heads, NUM_SPLITS=num_splits,
        num_warps=4, num_stages=2,
    )
    if num_splits > 1:
        _combine_splits_kernel[(n_tokens * n_heads,)](
            out, acc_ws, ml_ws, n_heads, out.stride(0), out.stride(1), float(v_scale),
            HEAD_DIM=head_dim, HEAD_P=head_p, NUM_SPLITS=num_splits, FP8_CACHE=fp8, num_warps=4)
    return out


@triton.jit
def _rms_norm_kernel(out_ptr, res_out_ptr, x_ptr, res_ptr, w_ptr, n_cols, eps, offset,
                     HAS_RES: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=ok, other=0.0)
    if HAS_RES:
        x = x + tl.load(res_ptr + row * n_cols + cols, mask=ok, other=0.0)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=ok)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / n_cols
    normed = xf * tl.rsqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    if HAS_OFFSET:  # Gemma: scale in float32, then round (model.Norm does the same)
        y = (normed * (w.to(tl.float32) + offset)).to(out_ptr.dtype.element_ty)
    else:  # Llama: round the normalised value first, then scale in the model dtype
        y = (w * normed.to(x.dtype)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * n_cols + cols, y, mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x`` (or of ``x + residual``, also returned) in one pass, rounding as model.Norm does."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    out = torch.empty_like(x2)
    res_out = torch.empty_like(x2) if residual is not None else out
    res = residual.reshape(-1, shape[-1]) if residual is not None else x2
    _rms_norm_kernel[(x2.shape[0],)](out, res_out, x2, res, weight, shape[-1], eps, offset,
                                     HAS_RES=residual is not None, HAS_OFFSET=offset != 0.0,
                                     BLOCK=triton.next_power_of_2(shape[-1]),
                                     num_warps=8 if shape[-1] >= 2048 else 4)
    if residual is not None:
        return out.view(shape), res_out.view(shape)
    return out.view(shape)


@triton.jit
def _silu_mul_kernel(out_ptr, x_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    gate = tl.load(x_ptr + row * 2 * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * n_cols + n_cols + cols, mask=ok, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    tl.store(out_ptr + row * n_cols + cols, act * up, mask=ok)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for ``x = [gate | up]`` along the last dim, in one kernel."""
    shape = x.shape
    n = shape[-1] // 2
    x2 = x.reshape(-1, shape[-1])
    out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    block = 1024
    _silu_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](out, x2, n, BLOCK=block)
    return out.view(*shape[:-1], n)


@triton.jit
def _rotary_cache_kernel(q_out_ptr, qkv_ptr, cos_ptr, sin_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
                         stride_qkv, stride_cs, stride_cache, k_scale, v_scale,
                         H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
                         HALF: tl.constexpr, HALF_P: tl.constexpr, ROPE: tl.constexpr, FP8_CACHE: tl.constexpr):
    """One head of one token: rotate q and k (rotate-half, first 2 * HALF dims), write k and v to the cache."""
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    src = qkv_ptr + tok * stride_qkv + head * D
    slot = tl.load(slot_ptr + tok)
    d = tl.arange(0, D_P)
    if head >= H + HKV:  # a value head: straight to the cache
        v = tl.load(src + d, mask=d < D).to(tl.float32)
        dst = v_cache_ptr + slot * stride_cache + (head - H - HKV) * D
        tl.store(dst + d, _to_cache(v, v_scale, FP8_CACHE).to(dst.dtype.element_ty), mask=d < D)
        return
    # (q_dst and k_dst: Triton wants a name assigned in both branches of a runtime `if` to keep one type)
    if ROPE:
        i = tl.arange(0, HALF_P)
        m = i < HALF
        x1 = tl.load(src + i, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + i, mask=m, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + tok * stride_cs + i, mask=m, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + tok * stride_cs + i, mask=m, other=0.0).to(tl.float32)
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
        r = 2 * HALF + d  # partial rotary: the rest of the head passes through
        rest = tl.load(src + r, mask=r < D, other=0.0)
        if head < H:
            q_dst = q_out_ptr + tok * (H * D) + head * D
            tl.store(q_dst + i, y1.to(q_dst.dtype.element_ty), mask=m)
            tl.store(q_dst + HALF + i, y2.to(q_dst.dtype.element_ty), mask=m)
            if 2 * HALF < D:
                tl.store(q_dst + r, rest, mask=r < D)
        else:
            k_dst = k_cache_ptr + slot * stride_cache + (head - H) * D
            tl.store(k_dst + i, _to_cache(y1, k_scale, FP8_CACHE).to(k_dst.dtype.element_ty), mask=m)
            tl.store(k_dst + HALF + i, _to_cache(y2, k_scale, FP8_CACHE).to(k_dst.dtype.element_ty), mask=m)
            if 2 * HALF < D:
                tl.store(k_dst + r, _to_cache(rest.to(tl.float32), k_scale, FP8_CACHE).to(k_dst.dtype.element_ty),
                         mask=r < D)
    else:
        x = tl.load(src + d, mask=d < D)
        if head < H:
            q_dst = q_out_ptr + tok * (H * D) + head * D
            tl.store(q_dst + d, x, mask=d < D)
        else:
            k_dst = k_cache_ptr + slot * stride_cache + (head - H) * D
            tl.store(k_dst + d, _to_cache(x.to(tl.float32), k_scale, FP8_CACHE).to(k_dst.dtype.element_ty), mask=d < D)


def rotary_and_cache(qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                     slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int,
                     n_kv: int, head_dim: int, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """From the fused projection ``qkv [N, (H + 2 Hkv) * D]``: rotated queries ``[N, H, D]`` returned, rotated
    keys and the values written to the cache rows ``slot_mapping`` (an FP8 cache gets ``k / k_scale`` and
    ``v / v_scale``). ``cos``/``sin``: each token's ``[N, ..., rot_dim]`` rows as model.Transformer gathers
    them (None: no rotary embedding)."""
    n = qkv.shape[0]
    q = torch.empty(n, n_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    rope = cos is not None
    half = cos.shape[-1] // 2 if rope else 1
    _rotary_cache_kernel[(n, n_heads + 2 * n_kv)](
        q, qkv, cos if rope else qkv, sin if rope else qkv, slot_mapping, k_cache, v_cache,
        qkv.stride(0), cos.stride(0) if rope else 0, n_kv * head_dim, float(k_scale), float(v_scale),
        H=n_heads, HKV=n_kv, D=head_dim, D_P=triton.next_power_of_2(head_dim),
        HALF=half, HALF_P=triton.next_power_of_2(half), ROPE=rope, FP8_CACHE=k_cache.dtype == FP8, num_warps=1,
    )
    return q


@triton.jit
def _per_token_fp8_kernel(out_ptr, scale_ptr, x_ptr, static_ptr, n_cols, STATIC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
    else:
        scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), 0), 448.0), 1e-12)
    q = _fp8_round(tl.math.div_rn(x, scale))  # IEEE divisions: the bytes quantize.per_token_fp8 gives
    tl.store(out_ptr + row * n_cols + cols, q.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(scale_ptr + row, scale)


def per_token_fp8(x: torch.Tensor, static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize.per_token_fp8 in one kernel: ``x [M, K]`` -> (float8 ``[M, K]``, float32 scales ``[M, 1]``)."""
    x = x.contiguous()
    m, k = x.shape
    out = torch.empty(m, k, dtype=FP8, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    _per_token_fp8_kernel[(m,)](out, scale, x, static_scale if static_scale is not None else scale, k,
                                STATIC=static_scale is not None, BLOCK=block,
                                num_warps=16 if block >= 8192 else (8 if block >= 2048 else 4))
    return out, scale


@triton.jit
def _scaled(sums, scale_ptr, cols, col_ok, x_scale_ptr, rows, row_ok, X_FP8: tl.constexpr):
    """A tile's float32 sums times each output's weight scale (and each row's activation scale)."""
    y = sums * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if X_FP8:
        y = y * tl.load(x_scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
    return y


@triton.jit
def _fp8_linear_kernel(out_ptr, x_ptr, x_scale_ptr, w_ptr, scale_ptr, part_ptr, count_ptr, m, n, k, k_split, m_tiles,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                       X_FP8: tl.constexpr, IEEE: tl.constexpr):
    tile = tl.program_id(0)
    # The row tiles of one weight tile are neighbours in the grid: they run together and the weight tile is read
    # from memory once, then from L2.
    m_tile, n_tile = tile % m_tiles, tile // m_tiles
    cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    depth = tl.arange(0, BLOCK_K)
    col_ok, row_ok = cols < n, rows < m
    w_rows = w_ptr + cols[:, None].to(tl.int64) * k
    x_rows = x_ptr + rows[:, None].to(tl.int64) * k
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = tl.program_id(1) * k_split  # this program's share of K: k_split is a multiple of BLOCK_K
    for k0 in range(k_start, tl.minimum(k_start + k_split, k), BLOCK_K):
        kk = k0 + depth
        k_ok = kk < k
        x = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if BLOCK_M == 1:  # one row: a matrix-vector product on the CUDA cores, no tile of 16 rows
            acc += tl.sum(x.to(tl.float32) * w.to(tl.float32), axis=1)[None, :]
        elif X_FP8:  # FP8 x FP8 on the tensor cores. Hopper accumulates FP8 products in fewer bits than float32:
            # each step's sums are moved into float32 (as DeepGEMM does every 128), not the whole of K's (2e-4 of
            # the largest output off at K=96 already); after every instruction cost 20% more time (RESULTS 16)
            acc += tl.dot(x, tl.trans(w), max_num_imprecise_acc=BLOCK_K)
        elif IEEE:  # float32 activations
            acc += tl.dot(x, tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:  # e4m3 widens exactly to the activations' 16-bit type
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    tile_offsets = rows[:, None] * n + cols[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    if SPLIT_K == 1:
        y = _scaled(acc, scale_ptr, cols, col_ok, x_scale_ptr, rows, row_ok, X_FP8)
        tl.store(out_ptr + tile_offsets, y.to(out_ptr.dtype.element_ty), mask=out_ok)
    else:
        # Each share's partial sums go to the workspace; the share that arrives last at this tile's counter adds
        # them in share order (the same sums whichever arrives last) and resets the counter for the next call.
        share_floats = m_tiles * BLOCK_M * n
        tl.store(part_ptr + tl.program_id(1) * share_floats + tile_offsets, acc, mask=col_ok[None, :])
        tl.debug_barrier()  # every thread's part of the partial is written before the count moves
        arrived = tl.atomic_add(count_ptr + tile, 1)  # acq_rel: the partial above is visible to the last share
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for share in tl.static_range(SPLIT_K):
                total += tl.load(part_ptr + share * share_floats + tile_offsets, mask=col_ok[None, :], other=0.0,
                                 volatile=True)
            y = _scaled(total, scale_ptr, cols, col_ok, x_scale_ptr, rows, row_ok, X_FP8)
            tl.store(out_ptr + tile_offsets, y.to(out_ptr.dtype.element_ty), mask=out_ok)
            tl.atomic_xchg(count_ptr + tile, 0)


@dataclass(frozen=True)
class Fp8Tiling:
    """How ``_fp8_linear_kernel`` covers a call: rows and output columns a program holds, the step through K, the
    pipeline depth, warps, and how many programs share K per output tile (split-K)."""

    block_m: int
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int
    split_k: int


def fp8_tiling(m: int, n: int, k: int, activation_bytes: int = 2, hopper: bool = True) -> Fp8Tiling:
    """The tiling of an ``m``-row call: the fastest of bench/fp8_kernels.py's grid for the 8B shape's linears on one
    H100 (bench/RESULTS.md section 16), with shallower pipelines where shared memory is an Ada's (``hopper`` False).

    Weight-only (16-bit activations, at most 64 rows): one row on the CUDA cores, 8-16 output columns a program in
    steps of 512; 2-16 rows in tiles of 16, 32 output columns a program, the wide output (gate/up: 896 programs)
    whole K, the narrow ones (q/k/v, o, down: 128-192 programs, too few for 132 SMs to stream the weights) K shared
    among 4 programs; 32 or 64 rows take short steps of K, whose activation tiles fit. FP8 activations
    (``activation_bytes`` 1): tiles of 64 rows whatever the step's size (Hopper's FP8 tensor-core instruction takes
    64 rows; with fewer, Triton widens both operands to 16 bits first) and 64 output columns, long steps of K in a
    deep pipeline; the wide output past 64 rows in tiles of 128 rows on two warp groups. Float32 activations (exact
    FMAs, no tensor cores: not a speed path) take short steps, which fit an Ada's shared memory."""
    if activation_bytes == 1:
        if m > 64 and n > 8192:
            return Fp8Tiling(128, 64, 128, 4 if hopper else 2, 8, 1)
        if n > 8192:
            return Fp8Tiling(64, 64, 128, 3, 4, 1)
        return Fp8Tiling(64, 64, 256 if hopper else 128, 5 if hopper else 3, 4, 2 if k > 8192 else 1)
    block_m = _block_m(m)
    if activation_bytes > 2:
        return Fp8Tiling(block_m, 32, 128 if block_m <= 32 else 64, 2, 4, 1)
    if m == 1:
        if n > 8192:
            return Fp8Tiling(1, 16, 512, 3, 4, 1)
        return Fp8Tiling(1, 8, 512, 3, 8, 1) if n > 4096 else Fp8Tiling(1, 16, 512, 3, 4, 4)
    if block_m > 16 or n > 8192:
        return Fp8Tiling(block_m, 32, 128, 3, 4, 1)
    return Fp8Tiling(block_m, 32, 128 if n > 4096 and k <= 8192 else 256, 3, 4, 4)


@functools.cache
def _hopper(device: torch.device) -> bool:
    """Hopper's shared memory (227 KB a block) or more, which the deep FP8 pipelines need; an Ada has 99 KB."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (9, 0)


class _SplitWorkspace:
    """The partial sums and per-tile counters of split-K calls, one pair per device, shared by every linear: the
    calls of one stream run one after another. Grown outside CUDA-graph capture only (``reserve``); the counters
    start at zero and each call leaves them at zero. A grown pair's predecessor is kept: graphs captured with it
    replay into it."""

    def __init__(self) -> None:
        self.parts: dict[torch.device, torch.Tensor] = {}
        self.counts: dict[torch.device, torch.Tensor] = {}
        self.retired: list[torch.Tensor] = []

    def reserve(self, device: torch.device, floats: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts, counts = self.parts.get(device), self.counts.get(device)
        if parts is None or parts.numel() < floats or counts.numel() < tiles:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("the FP8 linear kernel's split-K workspace must be reserved before CUDA-graph "
                                   "capture: call reserve_fp8_linear(weight) first")
            floats = max(floats, parts.numel() if parts is not None else 0)
            tiles = max(tiles, counts.numel() if counts is not None else 0)
            self.retired += [t for t in (parts, counts) if t is not None]
            parts = self.parts[device] = torch.empty(floats, dtype=torch.float32, device=device)
            counts = self.counts[device] = torch.zeros(tiles, dtype=torch.int32, device=device)
        return parts, counts


_WORKSPACE = _SplitWorkspace()


def _block_m(m: int) -> int:
    """Rows a program holds with 16-bit activations: 16 (the tensor cores' smallest tile), 32 or 64."""
    return min(64, max(16, triton.next_power_of_2(m)))


def _plan(m: int, n: int, k: int, activation_bytes: int, device: torch.device, tiling: dict
          ) -> tuple[Fp8Tiling, int, int, int]:
    """(tiling, row tiles, shares of K that have work, K per share) of a call: the tiling's fields given in
    ``tiling``, the rest from ``fp8_tiling``; K per share a multiple of block_k."""
    if not tiling:  # the runtime's calls: one plan per step shape, not worked out again in every eager step
        return _runtime_plan(m, n, k, activation_bytes, device)
    chosen = fp8_tiling(m, n, k, activation_bytes, _hopper(device))
    return _shares(dataclasses.replace(chosen, **{f: v for f, v in tiling.items() if v}), m, k)


@functools.cache
def _runtime_plan(m: int, n: int, k: int, activation_bytes: int, device: torch.device
                  ) -> tuple[Fp8Tiling, int, int, int]:
    return _shares(fp8_tiling(m, n, k, activation_bytes, _hopper(device)), m, k)


def _shares(t: Fp8Tiling, m: int, k: int) -> tuple[Fp8Tiling, int, int, int]:
    k_split = triton.cdiv(triton.cdiv(k, t.split_k), t.block_k) * t.block_k
    return t, triton.cdiv(m, t.block_m), triton.cdiv(k, k_split), k_split


def _split_buffers(device: torch.device, n: int, t: Fp8Tiling, m_tiles: int, split_k: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    return _WORKSPACE.reserve(device, split_k * m_tiles * t.block_m * n, m_tiles * triton.cdiv(n, t.block_n))


def reserve_fp8_linear(weight: torch.Tensor, weight_only_rows: int, fp8_rows: int) -> None:
    """Allocates what this weight's split-K tilings need for calls of up to ``weight_only_rows`` rows of 16-bit
    activations and ``fp8_rows`` rows of FP8 ones, so that calls captured in a CUDA graph allocate nothing."""
    n, k = weight.shape
    # one step size per plan: the row tiles of 16, 32 or 64 (weight-only) and each count of tiles of 64 (FP8)
    calls = [(m, 2) for m in {min(r, weight_only_rows) for r in (1, 16, 32, 64)} if m]
    calls += [(m, 1) for m in {*range(64, fp8_rows, 64), fp8_rows} if m > 0]
    for m, activation_bytes in calls:
        t, m_tiles, split_k, _ = _plan(m, n, k, activation_bytes, weight.device, {})
        if split_k > 1:
            _split_buffers(weight.device, n, t, m_tiles, split_k)


def _fp8_linear(x: torch.Tensor, x_scale: torch.Tensor | None, weight: torch.Tensor, scale: torch.Tensor,
                out_dtype: torch.dtype, tiling: dict) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    t, m_tiles, split_k, k_split = _plan(m, n, k, x.element_size(), x.device, tiling)
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    parts, counts = _split_buffers(x.device, n, t, m_tiles, split_k) if split_k > 1 else (out, out)
    _fp8_linear_kernel[(m_tiles * triton.cdiv(n, t.block_n), split_k)](
        out, x, x_scale if x_scale is not None else scale, weight, scale, parts, counts, m, n, k, k_split, m_tiles,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, SPLIT_K=split_k, X_FP8=x_scale is not None,
        IEEE=x.dtype == torch.float32, num_warps=t.num_warps, num_stages=t.num_stages)
    return out


def fp8_weight_only_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, **tiling: int) -> torch.Tensor:
    """``x [M, K] @ (weight [N, K] float8 * scale [N]).T`` for M <= 64, in ``x``'s dtype (sums in float32): the
    weights widened in registers, the activations as they are. ``tiling`` overrides fields of ``fp8_tiling``'s
    choice (bench/fp8_kernels.py times the choices on a card); ``block_m=1`` multiplies one row on the CUDA cores."""
    x = x.contiguous()
    if x.shape[0] > WEIGHT_ONLY_MAX_ROWS:
        raise ValueError(f"fp8_weight_only_linear takes at most {WEIGHT_ONLY_MAX_ROWS} rows, got {x.shape[0]}")
    if tiling.get("block_m") == 1 and x.shape[0] != 1:
        raise ValueError("block_m=1 multiplies a single row")
    return _fp8_linear(x, None, weight, scale, x.dtype, tiling)


def fp8_scaled_linear(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      out_dtype: torch.dtype = torch.bfloat16, **tiling: int) -> torch.Tensor:
    """``(xq * x_scale) @ (weight * scale).T``: FP8 activations ``xq [M, K]`` with one float32 scale per row
    (``x_scale [M, 1]``, per_token_fp8's) times FP8 weights on the tensor cores, sums in float32, any number of
    rows. What torch._scaled_mm computes, with tiles for decode-sized M: K shared among programs where the output
    is too narrow to give every SM weights to read."""
    return _fp8_linear(xq.contiguous(), x_scale.contiguous(), weight, scale, out_dtype, tiling)
