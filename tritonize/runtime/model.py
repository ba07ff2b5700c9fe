"""One decoder-only transformer for every supported family, in the style of gpt-fast.

The family differences (norm kind, position encoding, MLP shape, biases, parallel attention, MoE)
are data in ``ModelArgs``; the forward pass reads top to bottom the same way for all of them.

Serving shapes the forward: a step packs the tokens of many sequences into one ``[N]`` batch (prompt
chunks and single decode tokens alike), each with its absolute position, and attention reads every
sequence's keys and values from the paged cache through ``AttentionMetadata`` (attention.py). The
forward returns the logits of the tokens the step samples from. Everything a faster device path
changes is a module here that can be swapped for another (``kernels.py`` swaps in Triton kernels on
CUDA, ``adapters.py`` wraps linears with LoRA), so this file stays the plain reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AttentionMetadata, PagedAttention
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


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.scale = args.attn_scale
        self.window = args.sliding_window
        qkv_dim = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
        self.wqkv = nn.Linear(args.dim, qkv_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.out_bias)
        self.paged: PagedAttention | None = None  # the cache and the attention over it; Transformer.setup_caches
        # An FP8 cache stores k / k_scale and v / v_scale: the checkpoint's calibrated scales (weights.py) or 1.
        self.k_scale = self.v_scale = 1.0

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, meta: AttentionMetadata) -> Tensor:
        N = x.shape[0]
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(N, self.n_heads, self.head_dim)
        k = k.view(N, self.n_kv_heads, self.head_dim)
        v = v.view(N, self.n_kv_heads, self.head_dim)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = self.paged(q, k, v, meta)
        return self.wo(y.view(N, q_dim))


class FeedForward(nn.Module):
    """Gated (act(gate) * up; gate and up fused into one ``w1``) or plain (act(fc)) MLP."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gated = args.mlp == "gated"
        self.act = ACTIVATIONS[args.activation]
        width = 2 * args.intermediate_size if self.gated else args.intermediate_size
        self.w1 = nn.Linear(args.dim, width, bias=args.mlp_bias)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)

    def activate(self, h: Tensor) -> Tensor:
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.act(gate) * up
        return self.act(h)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.activate(self.w1(x)))


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

    def forward(self, x: Tensor) -> Tensor:
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

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, meta: AttentionMetadata) -> Tensor:
        if self.parallel:
            h = self.attention_norm(x)
            m = self.ffn_norm(x) if self.ffn_norm is not None else h
            return x + (self.feed_forward(m) + self.attention(h, rope, meta))
        h = x + self.attention(self.attention_norm(x), rope, meta)
        return h + self.feed_forward(self.ffn_norm(h))


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
        self.max_seq_len = 0
        self.embed_scale = 1.0
        self.rope_cos: Tensor | None = None
        self.rope_sin: Tensor | None = None
        # kernels.py swaps in a class with the same cache and a device kernel (and sets device_attention).
        self.paged_attention_cls: type[PagedAttention] = PagedAttention
        self.device_attention = False
        self.kv_cache_dtype: torch.dtype | None = None  # None: the model's dtype; float8_e4m3fn: an FP8 cache
        self.quant_scheme = None  # what the checkpoint declares about FP8 (weights.py; quantize.QuantScheme)
        self.kv_scales_found = 0  # layers whose KV cache scales the checkpoint holds

    def setup_caches(self, num_blocks: int, block_size: int, max_seq_len: int) -> None:
        """Allocate the paged KV cache (``num_blocks`` blocks of ``block_size`` positions per layer) and
        the position tables up to ``max_seq_len``."""
        args = self.args
        if args.positions == "learned" and max_seq_len > args.max_position_embeddings:
            raise ValueError(
                f"max_seq_len {max_seq_len} exceeds the model's {args.max_position_embeddings} learned "
                "positions; lower max_seq_len"
            )
        weight = self.tok_embeddings.weight
        dtype, device = weight.dtype, weight.device
        self.max_seq_len = max_seq_len
        for layer in self.layers:
            attn = layer.attention
            attn.paged = None  # free the old cache before allocating the new one
            # the layer's own key/value heads: a tensor-parallel rank holds only its share (tp.py)
            attn.paged = self.paged_attention_cls(num_blocks, block_size, attn.n_kv_heads, attn.head_dim,
                                                  attn.scale, attn.window, dtype, device,
                                                  self.kv_cache_dtype, attn.k_scale, attn.v_scale)
        # The scale is applied as the model dtype would hold it, as transformers does for Gemma.
        self.embed_scale = float(torch.tensor(args.embedding_scale, dtype=dtype))
        if args.positions == "rope":
            freqs = torch.outer(torch.arange(max_seq_len).float(), rope_inv_freq(args))
            freqs = torch.cat((freqs, freqs), dim=-1)
            self.rope_cos = freqs.cos().to(device)
            self.rope_sin = freqs.sin().to(device)

    def forward(self, tokens: Tensor, input_pos: Tensor, meta: AttentionMetadata) -> Tensor:
        """tokens, input_pos ``[N]`` -> float32 logits ``[R, vocab]`` of the tokens ``meta.logits_indices``."""
        x = self.tok_embeddings(tokens)
        if self.args.embedding_scale != 1.0:
            x = x * self.embed_scale
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(input_pos)
        rope = None
        if self.rope_cos is not None:
            rope = (self.rope_cos[input_pos][:, None].to(x.dtype), self.rope_sin[input_pos][:, None].to(x.dtype))
        for layer in self.layers:
            x = layer(x, rope, meta)
        x = self.norm(x.index_select(0, meta.logits_indices))
        if self.output is None:
            return F.linear(x, self.tok_embeddings.weight).float()
        return self.output(x).float()


def prompt_logits(model: Transformer, ids: list[int], block_size: int = 16) -> Tensor:
    """Float32 logits of every token of one prompt, in a cache of its own (export --verify, tests)."""
    n = len(ids)
    blocks = -(-n // block_size)
    model.setup_caches(num_blocks=blocks + 1, block_size=block_size, max_seq_len=n)
    device = model.tok_embeddings.weight.device
    positions = torch.arange(n, device=device)
    meta = AttentionMetadata(
        slot_mapping=positions + block_size,  # blocks 1, 2, ... in order; block 0 stays unused
        block_tables=torch.arange(1, blocks + 1, device=device)[None], seq_lens=torch.tensor([n], device=device),
        query_start_loc=torch.tensor([0, n], device=device), logits_indices=positions, max_query_len=n,
        seq_lens_host=[n], query_start_host=[0, n],
    )
    with torch.no_grad():
        return model(torch.tensor(ids, device=device), positions, meta)
