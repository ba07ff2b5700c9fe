"""One decoder-only transformer for every supported family, in the style of gpt-fast.

The family differences (norm kind, position encoding, MLP shape, biases, parallel attention, MoE)
are data in ``ModelArgs``; the forward pass reads top to bottom the same way for all of them.

Serving needs more than a training-style forward: a static KV cache of ``max_batch_size`` slots x
``max_seq_len`` positions per layer, rows that live in arbitrary slots, ragged positions in decode
and prefill that continues at an offset. Attention therefore always runs over the whole cache of
the row's slot with a boolean mask built from absolute positions, which keeps every shape static in
decode (nothing data-dependent in Python), so the decode step can be captured by torch.compile or
a CUDA graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapters import LoRA
from .config import ModelArgs

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
}


class Norm(nn.Module):
    """RMSNorm or LayerNorm; ``offset`` 1.0 means the stored weight w is applied as (1 + w)."""

    def __init__(self, dim: int, kind: str, eps: float, offset: float = 0.0, bias: bool = False) -> None:
        super().__init__()
        self.kind, self.eps, self.offset = kind, eps, offset
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "layer":
            return F.layer_norm(x, self.weight.shape, self.weight + self.offset, self.bias, self.eps)
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            # Gemma scales in float32 before casting back; Llama casts first (as transformers does).
            return (normed * (self.weight.float() + self.offset)).type_as(x)
        return self.weight * normed.type_as(x)


class KVCache(nn.Module):
    """Static per-layer cache: ``[slots, kv_heads, max_seq_len, head_dim]`` for K and for V."""

    def __init__(self, slots: int, seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        shape = (slots, n_kv_heads, seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: Tensor, input_pos: Tensor, k: Tensor, v: Tensor) -> None:
        """Write k/v ``[B, T, kv_heads, head_dim]`` of row b at (slot ``slots[b]``, ``input_pos[b, t]``)."""
        rows = slots[:, None]
        self.k_cache[rows, :, input_pos] = k
        self.v_cache[rows, :, input_pos] = v


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """Inverse frequencies of rotate-half RoPE, with linear or llama3 scaling applied."""
    d = args.rotary_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if args.rope_type == "linear":
        inv_freq = inv_freq / args.rope_factor
    elif args.rope_type == "llama3":
        old_len = args.rope_original_max_position_embeddings
        low_wavelen = old_len / args.rope_low_freq_factor
        high_wavelen = old_len / args.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / args.rope_factor, inv_freq)
        smooth = (old_len / wavelen - args.rope_low_freq_factor) / (
            args.rope_high_freq_factor - args.rope_low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / args.rope_factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on the first ``cos.shape[-1]`` dims of each head (partial rotary)."""
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """SDPA for q ``[B, T, H, D]`` over caches ``[B, Hkv, L, D]`` with mask ``[B, T, L]``.

    The query heads that share one K/V head are folded into the query length, so grouped-query and
    multi-query attention need no copy of the cache; returns ``[B, T, H * D]``.
    """
    B, T, H, D = q.shape
    n_kv = k.shape[1]
    rep = H // n_kv
    q = q.view(B, T, n_kv, rep, D).permute(0, 2, 3, 1, 4).reshape(B, n_kv, rep * T, D)
    mask = mask[:, None].repeat(1, 1, rep, 1)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return y.view(B, n_kv, rep, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H * D)


class Attention(nn.Module):
    # Decode attends in slot order over the whole cache once more than 1/slot_order_ratio of the
    # slots are in the batch (reading every slot once beats copying the rows' caches out first).
    slot_order_ratio = 3

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.scale = args.attn_scale
        qkv_dim = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
        self.wqkv = nn.Linear(args.dim, qkv_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.out_bias)
        self.kv_cache: KVCache | None = None
        # Stacked LoRA adapters (adapters.py), attached when the model serves some.
        self.wqkv_lora: LoRA | None = None
        self.wo_lora: LoRA | None = None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor,
                input_pos: Tensor, slots: Tensor, adapters: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        qkv = self.wqkv(x)
        if self.wqkv_lora is not None:
            qkv = qkv + self.wqkv_lora(x, adapters)
        q, k, v = qkv.split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        cache = self.kv_cache
        cache.update(slots, input_pos, k, v)
        n_slots = cache.k_cache.shape[0]
        if T == 1 and self.slot_order_ratio * B > n_slots:
            # Idle slots get a dummy query whose output is dropped.
            q = q.new_zeros(n_slots, *q.shape[1:]).index_copy(0, slots, q)
            mask = mask.new_ones(n_slots, *mask.shape[1:]).index_copy(0, slots, mask)
            y = attend(q, cache.k_cache, cache.v_cache, mask, self.scale).index_select(0, slots)
        else:
            y = attend(q, cache.k_cache[slots], cache.v_cache[slots], mask, self.scale)
        if self.wo_lora is not None:
            return self.wo(y) + self.wo_lora(y, adapters)
        return self.wo(y)


class FeedForward(nn.Module):
    """Gated (act(gate) * up; gate and up fused into one ``w1``) or plain (act(fc)) MLP."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gated = args.mlp == "gated"
        self.act = ACTIVATIONS[args.activation]
        width = 2 * args.intermediate_size if self.gated else args.intermediate_size
        self.w1 = nn.Linear(args.dim, width, bias=args.mlp_bias)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)
        self.w1_lora: LoRA | None = None
        self.w2_lora: LoRA | None = None

    def forward(self, x: Tensor, adapters: Tensor | None = None) -> Tensor:
        h = self.w1(x)
        if self.w1_lora is not None:
            h = h + self.w1_lora(x, adapters)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        if self.w2_lora is not None:
            return self.w2(h) + self.w2_lora(h, adapters)
        return self.w2(h)


class MoEFeedForward(nn.Module):
    """Mixtral sparse MoE: softmax over all experts, top-k, weights renormalised to sum to 1.

    Few tokens (decode) run every expert densely: a static-shaped step that reads each expert's
    weights once, which is what bounds decode anyway. Many tokens (prefill) run each expert on its
    own tokens only.
    """

    # Decode batches up to this many tokens stay memory-bound even at E/k times the expert FLOPs.
    dense_max_tokens = 128

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.act = ACTIVATIONS[args.activation]
        n, d, i = args.num_experts, args.dim, args.intermediate_size
        self.gate = nn.Linear(d, n, bias=False)
        self.w13 = nn.Parameter(torch.empty(n, 2 * i, d))  # [gate; up] per expert
        self.w2 = nn.Parameter(torch.empty(n, d, i))

    def forward(self, x: Tensor, adapters: Tensor | None = None) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        if x.shape[0] <= self.dense_max_tokens:
            out = self._dense(x, weights, experts)
        else:
            out = self._sparse(x, weights, experts)
        return out.view(shape)

    def _expert_mlp(self, x: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
        gate, up = F.linear(x, w13).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, w2)

    def _dense(self, x: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        gate, up = torch.einsum("nd,efd->nef", x, self.w13).chunk(2, dim=-1)
        y = torch.einsum("nei,edi->ned", self.act(gate) * up, self.w2)
        route = torch.zeros(x.shape[0], self.w13.shape[0], dtype=weights.dtype, device=x.device)
        route = route.scatter(1, experts, weights)
        return (y * route[..., None]).sum(dim=1).to(x.dtype)

    def _sparse(self, x: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        for e in range(self.w13.shape[0]):
            token_idx, which = torch.where(experts == e)
            y = self._expert_mlp(x[token_idx], self.w13[e], self.w2[e])
            out.index_add_(0, token_idx, (y * weights[token_idx, which, None]).to(x.dtype))
        return out


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.parallel = args.parallel_attn

        def norm() -> Norm:
            return Norm(args.dim, args.norm, args.norm_eps, args.norm_offset, args.norm_bias)

        self.attention_norm = norm()
        # Falcon's old parallel block shares one norm between attention and MLP.
        self.ffn_norm = norm() if not self.parallel or args.parallel_norms == 2 else None
        self.attention = Attention(args)
        self.feed_forward: nn.Module = MoEFeedForward(args) if args.num_experts else FeedForward(args)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor,
                input_pos: Tensor, slots: Tensor, adapters: Tensor | None = None) -> Tensor:
        if self.parallel:
            h = self.attention_norm(x)
            m = self.ffn_norm(x) if self.ffn_norm is not None else h
            return x + (self.feed_forward(m, adapters) + self.attention(h, rope, mask, input_pos, slots, adapters))
        h = x + self.attention(self.attention_norm(x), rope, mask, input_pos, slots, adapters)
        return h + self.feed_forward(self.ffn_norm(h), adapters)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.pos_embeddings = (
            nn.Embedding(args.max_position_embeddings, args.dim) if args.positions == "learned" else None
        )
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = Norm(args.dim, args.norm, args.norm_eps, args.norm_offset, args.norm_bias)
        # Tied models multiply by the embedding matrix itself: one tensor, no aliasing tricks.
        self.output = None if args.tie_word_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.max_batch_size = 0
        self.max_seq_len = 0
        self.embed_scale = 1.0
        self.rope_cos: Tensor | None = None
        self.rope_sin: Tensor | None = None
        self.kv_positions: Tensor | None = None
        # Served adapters (adapters.py): the LoRA index of each cache slot, and the p-tuning rows that
        # token ids >= vocab_size select.
        self.slot_adapter: Tensor | None = None
        self.prompt_table: Tensor | None = None

    def setup_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate the static KV cache (``max_batch_size`` slots x ``max_seq_len`` positions)."""
        args = self.args
        if args.positions == "learned" and max_seq_len > args.max_position_embeddings:
            raise ValueError(
                f"max_seq_len {max_seq_len} exceeds the model's {args.max_position_embeddings} learned "
                "positions; lower max_seq_len"
            )
        weight = self.tok_embeddings.weight
        dtype, device = weight.dtype, weight.device
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(
                max_batch_size, max_seq_len, args.n_kv_heads, args.head_dim, dtype, device
            )
        self.kv_positions = torch.arange(max_seq_len, device=device)
        # The scale is applied as the model dtype would hold it, as transformers does for Gemma.
        self.embed_scale = float(torch.tensor(args.embedding_scale, dtype=dtype))
        if args.positions == "rope":
            freqs = torch.outer(torch.arange(max_seq_len).float(), rope_inv_freq(args))
            freqs = torch.cat((freqs, freqs), dim=-1)
            self.rope_cos = freqs.cos().to(device)
            self.rope_sin = freqs.sin().to(device)

    def forward(self, tokens: Tensor, input_pos: Tensor, slots: Tensor, last_only: bool = False) -> Tensor:
        """Logits ``[B, T, vocab]`` (``[B, 1, vocab]`` if ``last_only``) in float32; see CONTRACT.md."""
        if self.prompt_table is None:
            x = self.tok_embeddings(tokens)
        else:
            # Virtual tokens (ids >= vocab_size) take their embedding from the p-tuning table; static
            # shapes, no data-dependent branch, so the decode step stays capturable.
            vocab = self.args.vocab_size
            virtual = (tokens >= vocab)[..., None]
            real = self.tok_embeddings(tokens.clamp(max=vocab - 1))
            rows = (tokens - vocab).clamp(0, self.prompt_table.shape[0] - 1)
            x = torch.where(virtual, self.prompt_table[rows], real)
        if self.args.embedding_scale != 1.0:
            x = x * self.embed_scale
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(input_pos)
        rope = None
        if self.rope_cos is not None:
            rope = (self.rope_cos[input_pos][:, :, None].to(x.dtype),
                    self.rope_sin[input_pos][:, :, None].to(x.dtype))
        # Row b, query at position p sees cache positions <= p of its own slot (within the window).
        kv_pos = self.kv_positions[None, None, :]
        q_pos = input_pos[:, :, None]
        mask = kv_pos <= q_pos
        if self.args.sliding_window:
            mask = mask & (kv_pos > q_pos - self.args.sliding_window)
        adapters = None if self.slot_adapter is None else self.slot_adapter[slots]
        for layer in self.layers:
            x = layer(x, rope, mask, input_pos, slots, adapters)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        if self.output is None:
            return F.linear(x, self.tok_embeddings.weight).float()
        return self.output(x).float()
