"""A small reference forward pass computed straight from a source checkpoint's own tensors.

``--verify`` compares the exported model, run by transformers, against this. It deliberately does
not reuse the converter: it reads Megatron's fused ``linear_qkv`` by reshaping it to
``[groups, r + 2, head_dim, hidden]`` (the layout Megatron-Core's attention.py computes with), splits
``linear_fc1`` with ``chunk``, applies ``layernorm_zero_centered_gamma`` as ``1 + w``, and so on, so a
mistake in the row bookkeeping of the converter shows up as a logit difference. The same
forward serves single-rank TRT-LLM checkpoints through a second weight accessor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ExportError
from .nemo_config import MegatronConfig
from .stored import StoredTensor

Tensor = torch.Tensor


@dataclass
class Semantics:
    """How the network computes, independent of where its weights are stored."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    norm: str  # "rms" | "layer"
    norm_eps: float
    norm_offset: float
    activation: str
    gated: bool
    rope: bool
    rope_theta: float
    rotary_pct: float
    rope_scaling: dict | None
    parallel: bool  # attention and MLP read the layer input
    two_norms: bool  # parallel with a separate MLP norm (Falcon new decoder architecture)
    embedding_scale: bool
    top_k: int
    vocab: int
    num_layers: int


def _act(name: str, x: Tensor) -> Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    if name == "relu2":
        return F.relu(x) ** 2
    raise ExportError(f"reference forward: unsupported activation {name!r}")


def _norm(s: Semantics, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    gain = w + s.norm_offset
    if s.norm == "rms":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + s.norm_eps) * gain
    return F.layer_norm(x, (x.shape[-1],), gain, b, s.norm_eps)


def _inv_freq(s: Semantics, rot: int) -> Tensor:
    inv = 1.0 / (s.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    sc = s.rope_scaling or {}
    if sc.get("rope_type") == "llama3":
        factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old = float(sc["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif sc.get("rope_type") == "linear":
        inv = inv / float(sc["factor"])
    elif sc and sc.get("rope_type") not in (None, "default"):
        raise ExportError(f"reference forward: unsupported rope scaling {sc.get('rope_type')!r}")
    return inv.float()


def _rope(s: Semantics, x: Tensor, pos: Tensor) -> Tensor:
    """Rotate-half RoPE on the first ``rotary_pct`` of each head (x: [T, heads, d])."""
    rot = int(s.head_dim * s.rotary_pct)
    freqs = torch.outer(pos.float(), _inv_freq(s, rot))
    cos, sin = torch.cat([freqs, freqs], -1).cos()[:, None], torch.cat([freqs, freqs], -1).sin()[:, None]
    xr, rest = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], -1)
    return torch.cat([xr * cos + rotated * sin, rest], -1)


def _attention(s: Semantics, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    T = q.shape[0]
    r = s.heads // s.kv_heads
    k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
    scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(s.head_dim)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return torch.einsum("hts,shd->thd", probs, v).reshape(T, -1)


class Weights:
    """What the forward needs, as float32 tensors; subclasses read a particular layout."""

    def embed(self) -> Tensor: ...
    def pos(self) -> Tensor | None: ...
    def final_norm(self) -> tuple[Tensor, Tensor | None]: ...
    def output(self) -> Tensor | None: ...
    def attn_norm(self, i: int) -> tuple[Tensor, Tensor | None]: ...
    def mlp_norm(self, i: int) -> tuple[Tensor, Tensor | None] | None: ...
    def qkv(self, i: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]: ...
    def proj(self, i: int) -> tuple[Tensor, Tensor | None]: ...
    def mlp(self, i: int, x: Tensor, s: Semantics) -> Tensor: ...


def _linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    return F.linear(x, w, b)


def _dense_mlp(x: Tensor, s: Semantics, fc1: Tensor, fc1_b: Tensor | None, fc2: Tensor, fc2_b: Tensor | None,
               gate_first: bool = True) -> Tensor:
    h = _linear(x, fc1, fc1_b)
    if s.gated:
        a, b = h.chunk(2, dim=-1)
        if not gate_first:
            a, b = b, a
        h = _act(s.activation, a) * b
    else:
        h = _act(s.activation, h)
    return _linear(h, fc2, fc2_b)


def _moe(x: Tensor, s: Semantics, router: Tensor, experts: list[tuple[Tensor, Tensor]], gate_first: bool) -> Tensor:
    logits = _linear(x, router)
    top, idx = logits.topk(s.top_k, dim=-1)
    weights = top.softmax(-1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(s.top_k):
            fc1, fc2 = experts[int(idx[t, j])]
            out[t] += weights[t, j] * _dense_mlp(x[t : t + 1], s, fc1, None, fc2, None, gate_first)[0]
    return out


def forward(w: Weights, s: Semantics, tokens: Sequence[int]) -> Tensor:
    ids = torch.tensor(list(tokens), dtype=torch.long)
    pos = torch.arange(len(ids))
    x = w.embed()[ids]
    if s.embedding_scale:
        x = x * math.sqrt(s.hidden)
    p = w.pos()
    if p is not None:
        x = x + p[pos]
    for i in range(s.num_layers):
        ln = _norm(s, x, *w.attn_norm(i))
        q, k, v = w.qkv(i, ln)
        T = q.shape[0]
        q, k, v = q.view(T, s.heads, s.head_dim), k.view(T, s.kv_heads, s.head_dim), v.view(T, s.kv_heads, s.head_dim)
        if s.rope:
            q, k = _rope(s, q, pos), _rope(s, k, pos)
        attn = _linear(_attention(s, q, k, v), *w.proj(i))
        if s.parallel:
            mlp_in = _norm(s, x, *w.mlp_norm(i)) if s.two_norms else ln
            x = x + attn + w.mlp(i, mlp_in, s)
        else:
            x = x + attn
            x = x + w.mlp(i, _norm(s, x, *w.mlp_norm(i)), s)
    x = _norm(s, x, *w.final_norm())
    head = w.output()
    head = w.embed() if head is None else head
    return _linear(x, head)[:, : s.vocab]


# --------------------------------------------------------------------------------------------------
# Megatron-Core layout
# --------------------------------------------------------------------------------------------------


class MegatronWeights(Weights):
    def __init__(self, t: Mapping[str, StoredTensor], cfg: MegatronConfig):
        self.t, self.cfg = t, cfg

    def _get(self, name: str) -> Tensor | None:
        return self.t[name].read().float() if name in self.t else None

    def _layer(self, name: str, i: int) -> Tensor | None:
        if f"decoder.layers.{name}" in self.t:
            return self.t[f"decoder.layers.{name}"].read((i,)).float()
        return self._get(f"decoder.layers.{i}.{name}")

    def _norm_pair(self, i: int, candidates: tuple[tuple[str, str], ...]) -> tuple[Tensor, Tensor | None] | None:
        for wname, bname in candidates:
            wt = self._layer(wname, i)
            if wt is not None:
                return wt, self._layer(bname, i)
        return None

    def embed(self) -> Tensor:
        return self._get("embedding.word_embeddings.weight")

    def pos(self) -> Tensor | None:
        return self._get("embedding.position_embeddings.weight")

    def final_norm(self):
        return self._get("decoder.final_layernorm.weight"), self._get("decoder.final_layernorm.bias")

    def output(self) -> Tensor | None:
        return self._get("output_layer.weight")

    def attn_norm(self, i: int):
        return self._norm_pair(i, (("self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.layer_norm_bias"),
                                   ("input_layernorm.weight", "input_layernorm.bias")))

    def mlp_norm(self, i: int):
        return self._norm_pair(i, (("mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.layer_norm_bias"),
                                   ("pre_mlp_layernorm.weight", "pre_mlp_layernorm.bias"),
                                   ("post_self_attn_layernorm.weight", "post_self_attn_layernorm.bias")))

    def qkv(self, i: int, x: Tensor):
        c = self.cfg
        r = c.num_heads // c.num_query_groups
        out = _linear(x, self._layer("self_attention.linear_qkv.weight", i),
                      self._layer("self_attention.linear_qkv.bias", i))
        out = out.view(x.shape[0], c.num_query_groups, r + 2, c.head_dim)
        q = out[:, :, :r].reshape(x.shape[0], -1)
        return q, out[:, :, r].reshape(x.shape[0], -1), out[:, :, r + 1].reshape(x.shape[0], -1)

    def proj(self, i: int):
        return self._layer("self_attention.linear_proj.weight", i), self._layer("self_attention.linear_proj.bias", i)

    def mlp(self, i: int, x: Tensor, s: Semantics) -> Tensor:
        if self.cfg.num_experts:
            router = self._layer("mlp.router.weight", i)
            stacked = self._layer("mlp.experts.experts.linear_fc1.weight", i)
            if stacked is not None:
                fc2 = self._layer("mlp.experts.experts.linear_fc2.weight", i)
                experts = [(stacked[e], fc2[e]) for e in range(self.cfg.num_experts)]
            else:
                experts = [(self._layer(f"mlp.experts.local_experts.{e}.linear_fc1.weight", i),
                            self._layer(f"mlp.experts.local_experts.{e}.linear_fc2.weight", i))
                           for e in range(self.cfg.num_experts)]
            return _moe(x, s, router, experts, gate_first=True)
        return _dense_mlp(x, s, self._layer("mlp.linear_fc1.weight", i), self._layer("mlp.linear_fc1.bias", i),
                          self._layer("mlp.linear_fc2.weight", i), self._layer("mlp.linear_fc2.bias", i))


def megatron_semantics(cfg: MegatronConfig, vocab: int) -> Semantics:
    return Semantics(
        hidden=cfg.hidden_size, heads=cfg.num_heads, kv_heads=cfg.num_query_groups, head_dim=cfg.head_dim,
        norm="rms" if cfg.normalization == "rmsnorm" else "layer", norm_eps=cfg.norm_eps,
        norm_offset=1.0 if cfg.zero_centered_gamma else 0.0, activation=cfg.activation, gated=cfg.gated,
        rope=cfg.position == "rope", rope_theta=cfg.rotary_base, rotary_pct=cfg.rotary_percent,
        rope_scaling=cfg.rope_scaling, parallel=cfg.parallel_attention or cfg.new_decoder_architecture,
        two_norms=cfg.new_decoder_architecture, embedding_scale=cfg.model_type == "gemma", top_k=cfg.moe_topk,
        vocab=vocab, num_layers=cfg.num_layers,
    )


def megatron_logits(tensors: Mapping[str, StoredTensor], cfg: MegatronConfig, tokens: Sequence[int],
                    vocab: int) -> Tensor:
    if "embedding.position_embeddings.weight" in tensors and cfg.position == "rope":
        raise ExportError("reference forward: learned positions with a rope config")
    return forward(MegatronWeights(tensors, cfg), megatron_semantics(cfg, vocab), tokens)


# --------------------------------------------------------------------------------------------------
# TRT-LLM checkpoint layout
# --------------------------------------------------------------------------------------------------


def _dequantized(rank: Mapping[str, StoredTensor], name: str) -> Tensor:
    w = rank[name].read()
    if w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        scale = rank[name.rsplit(".", 1)[0] + ".weights_scaling_factor"].read().float().reshape(-1)
        w = w.float() * (scale if scale.numel() == 1 else scale.reshape(-1, *([1] * (w.dim() - 1))))
    return w.float()


def merge_trtllm_ranks(ranks: Sequence[Mapping[str, StoredTensor]], tp: int, pp: int, s: Semantics
                       ) -> dict[str, Tensor]:
    """One full float32 state dict (TRT-LLM names, global layer numbers) out of ``tp * pp`` rank files."""
    out: dict[str, Tensor] = {}
    q_rows = s.heads * s.head_dim // tp
    stages = torch.tensor_split(torch.arange(s.num_layers), pp)
    for p in range(pp):
        group = [ranks[p * tp + t] for t in range(tp)]
        for name in group[0]:
            if name.endswith("scaling_factor"):
                continue
            parts = [_dequantized(r, name) for r in group]
            if name.startswith("transformer.layers."):
                local, suffix = name[len("transformer.layers."):].split(".", 1)
                key = f"transformer.layers.{int(stages[p][int(local)])}.{suffix}"
            else:
                key = name
            if suffix_is(name, "attention.qkv"):
                kv_rows = (parts[0].shape[0] - q_rows) // 2
                dup = max(1, kv_rows * tp // (s.kv_heads * s.head_dim))
                q = torch.cat([x[:q_rows] for x in parts])
                k = torch.cat([x[q_rows:q_rows + kv_rows] for x in parts[::dup]])
                v = torch.cat([x[q_rows + kv_rows:] for x in parts[::dup]])
                out[key] = torch.cat([q, k, v])
            elif suffix_is(name, "attention.dense.weight", "mlp.proj.weight"):
                out[key] = torch.cat(parts, dim=-1)
            elif suffix_is(name, "mlp.fc", "mlp.gate", "lm_head"):
                if parts[0].dim() == 3:  # MoE [E, 2I/tp, H] = cat(w3_r, w1_r)
                    half = parts[0].shape[1] // 2
                    w3 = torch.cat([x[:, :half] for x in parts], dim=1)
                    w1 = torch.cat([x[:, half:] for x in parts], dim=1)
                    out[key] = torch.cat([w3, w1], dim=1)
                else:
                    out[key] = torch.cat(parts)
            else:
                out[key] = parts[0]
    return out


def suffix_is(name: str, *suffixes: str) -> bool:
    base = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
    return any(name.endswith(x) or base.endswith(x) for x in suffixes)


class TrtllmWeights(Weights):
    """A merged TRT-LLM state dict: ``qkv`` is ``[q; k; v]``, ``mlp.fc`` the activated half."""

    def __init__(self, t: Mapping[str, Tensor], s: Semantics, moe: bool):
        self.t, self.s, self.moe = t, s, moe

    def _get(self, name: str) -> Tensor | None:
        return self.t.get(name)

    def embed(self):
        return self._get("transformer.vocab_embedding.weight")

    def pos(self):
        return self._get("transformer.position_embedding.weight")

    def final_norm(self):
        return self._get("transformer.ln_f.weight"), self._get("transformer.ln_f.bias")

    def output(self):
        return self._get("lm_head.weight")

    def attn_norm(self, i):
        p = f"transformer.layers.{i}.input_layernorm."
        return self._get(p + "weight"), self._get(p + "bias")

    def mlp_norm(self, i):
        for n in ("post_layernorm", "mlp_layernorm"):
            p = f"transformer.layers.{i}.{n}."
            if p + "weight" in self.t:
                return self._get(p + "weight"), self._get(p + "bias")
        return None

    def qkv(self, i, x):
        p = f"transformer.layers.{i}.attention.qkv."
        out = _linear(x, self._get(p + "weight"), self._get(p + "bias"))
        q = self.s.heads * self.s.head_dim
        kv = self.s.kv_heads * self.s.head_dim
        return torch.split(out, [q, kv, kv], dim=-1)

    def proj(self, i):
        p = f"transformer.layers.{i}.attention.dense."
        return self._get(p + "weight"), self._get(p + "bias")

    def mlp(self, i, x, s):
        p = f"transformer.layers.{i}.mlp."
        if self.moe:
            fc, proj = self._get(p + "fc.weight"), self._get(p + "proj.weight")
            return _moe(x, s, self._get(p + "router.weight"), [(fc[e], proj[e]) for e in range(fc.shape[0])],
                        gate_first=False)
        fc, fc_b = self._get(p + "fc.weight"), self._get(p + "fc.bias")
        if s.gated:
            up, up_b = self._get(p + "gate.weight"), self._get(p + "gate.bias")
            h = _act(s.activation, _linear(x, fc, fc_b)) * _linear(x, up, up_b)
        else:
            h = _act(s.activation, _linear(x, fc, fc_b))
        return _linear(h, self._get(p + "proj.weight"), self._get(p + "proj.bias"))


def trtllm_logits(ranks: Sequence[Mapping[str, StoredTensor]], tp: int, pp: int, s: Semantics, moe: bool,
                  tokens: Sequence[int]) -> Tensor:
    weights = merge_trtllm_ranks(ranks, tp, pp, s)
    head = weights.get("lm_head.weight")
    if head is not None:
        weights["lm_head.weight"] = head[: s.vocab]
    return forward(TrtllmWeights(weights, s, moe), s, tokens)
