"""Tensor parallelism: one model split over N processes (one GPU each), in the spirit of gpt-fast's ``tp.py``.

What each rank holds (``Shard``):

- attention: its share of the query heads and the key/value heads they read. With fewer key/value heads
  than ranks, a key/value head is replicated on the ranks whose query heads share it. ``wqkv`` keeps the
  rank's rows of q, k and v (column-parallel); ``wo`` its input columns (row-parallel);
- MLP: ``w1`` the rank's slice of the intermediate dimension, gate and up each sliced so the fused layout
  stays ``[gate_r; up_r]``; ``w2`` the matching input columns. Mixture-of-experts layers are split the same
  way inside every expert (tensor-parallel experts): every rank routes every token to the same experts and
  computes its slice of each, so no token moves between ranks;
- the token embedding is replicated (a lookup reads only the rows a step uses); the LM head is split over
  the vocabulary and its logits gathered, so each rank reads 1/N of it per step;
- the KV cache holds only the rank's key/value heads.

One all-reduce follows attention's ``wo`` and one the MLP's ``w2`` (a Falcon parallel block sums both
partial outputs and reduces once); biases of row-parallel linears are added by rank 0 only. After each
all-reduce every rank holds the same activations, so routing, norms and residuals agree bit for bit.

Weights are read shard by shard: each checkpoint tensor is sliced right after the family mapping names
it (fused q/k/v and gate/up are sliced part by part, before they are concatenated), from the
memory-mapped file, so no rank ever holds the whole model.

The processes that hold the ranks, and how a step reaches them, are tp_ranks.py's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AttentionMetadata
from .config import ModelArgs
from .errors import TritonizeError
from .model import TransformerBlock

log = logging.getLogger(__name__)

__all__ = ["Group", "ParallelBlock", "RowParallel", "Shard", "TensorParallelError", "VocabParallelHead",
           "check_split", "parallelize"]


class TensorParallelError(TritonizeError, RuntimeError):
    """The model cannot be split this way, or a rank failed: one line, said as it is."""


def check_split(args: ModelArgs, world: int) -> str | None:
    """Why ``args`` cannot be split over ``world`` ranks, or None when it can."""
    if world < 1:
        return f"tensor parallelism must be at least 1, not {world}"
    if world == 1:
        return None
    if args.n_heads % world:
        return (f"{args.n_heads} attention heads cannot be split over {world} ranks: use a tensor parallelism "
                f"that divides {args.n_heads}")
    kv = args.n_kv_heads
    if kv % world and world % kv:
        return (f"{kv} key/value heads cannot be split over {world} ranks (nor replicated: {world} is not a "
                f"multiple of {kv}): use a tensor parallelism that divides {kv} or is a multiple of it")
    if args.intermediate_size % world:
        return (f"the MLP's intermediate size {args.intermediate_size} cannot be split over {world} ranks: use a "
                f"tensor parallelism that divides it")
    return None


@dataclass(frozen=True)
class Shard:
    """What rank ``rank`` of ``world`` keeps of a model described by ``args``."""

    args: ModelArgs
    rank: int
    world: int

    def __post_init__(self) -> None:
        problem = check_split(self.args, self.world)
        if problem:
            raise TensorParallelError(problem)
        if not 0 <= self.rank < self.world:
            raise TensorParallelError(f"rank {self.rank} is outside the group of {self.world}")

    # -- what the rank keeps ---------------------------------------------------------------------------
    @property
    def n_heads(self) -> int:
        return self.args.n_heads // self.world

    @property
    def n_kv_heads(self) -> int:
        return max(1, self.args.n_kv_heads // self.world)

    @property
    def first_kv_head(self) -> int:
        kv = self.args.n_kv_heads
        if kv >= self.world:
            return self.rank * (kv // self.world)
        return self.rank // (self.world // kv)  # replicated: the kv head this rank's query heads read

    @property
    def intermediate(self) -> int:
        return self.args.intermediate_size // self.world

    @property
    def vocab(self) -> tuple[int, int, int]:
        """(first, end, rows): the rank's vocabulary rows of the LM head, padded to ``rows`` on every rank."""
        rows = -(-self.args.vocab_size // self.world)
        first = min(self.rank * rows, self.args.vocab_size)
        return first, min(first + rows, self.args.vocab_size), rows

    def q_rows(self) -> Tensor:
        hd = self.args.head_dim
        return torch.arange(self.rank * self.n_heads * hd, (self.rank + 1) * self.n_heads * hd)

    def qkv_rows(self) -> Tensor:
        """Rows of the fused ``[q; k; v]`` projection this rank keeps."""
        a, hd = self.args, self.args.head_dim
        q_dim, kv_dim = a.n_heads * hd, a.n_kv_heads * hd
        kv = torch.arange(self.first_kv_head * hd, (self.first_kv_head + self.n_kv_heads) * hd)
        return torch.cat([self.q_rows(), q_dim + kv, q_dim + kv_dim + kv])

    def inter_rows(self) -> Tensor:
        return torch.arange(self.rank * self.intermediate, (self.rank + 1) * self.intermediate)

    def mlp_rows(self) -> Tensor:
        """Rows of ``w1`` (``[gate; up]`` when gated) this rank keeps."""
        rows = self.inter_rows()
        if self.args.mlp == "gated" or self.args.num_experts:
            return torch.cat([rows, self.args.intermediate_size + rows])
        return rows

    # -- slicing checkpoint tensors ---------------------------------------------------------------------
    def select(self, name: str, tensor: Any) -> Tensor:
        """The rank's piece of the full runtime tensor ``name`` (a tensor, or weights.py's lazy concatenation)."""
        if name.endswith((".attention.wqkv.weight", ".attention.wqkv.bias")):
            return _take(tensor, 0, self.qkv_rows())
        if name.endswith(".attention.wo.weight"):
            return _take(tensor, 1, self.q_rows())
        if name.endswith((".feed_forward.w1.weight", ".feed_forward.w1.bias")):
            return _take(tensor, 0, self.mlp_rows())
        if name.endswith(".feed_forward.w2.weight"):
            return _take(tensor, 1, self.inter_rows())
        if name.endswith(".feed_forward.w13"):  # [experts, 2 I, dim]
            return _take(tensor, 1, self.mlp_rows())
        if name.endswith(".feed_forward.w2"):  # [experts, dim, I]
            return _take(tensor, 2, self.inter_rows())
        if name.endswith((".attention.wo.bias", ".feed_forward.w2.bias")):
            full = _whole(tensor)  # added once, after the sum: by rank 0
            return full if self.rank == 0 else torch.zeros_like(full)
        if name == "output.weight":
            first, end, rows = self.vocab
            return _pad_rows(_take(tensor, 0, torch.arange(first, end)), rows)
        return _whole(tensor)

    def shard_modules(self, model: nn.Module) -> None:
        """Gives a model built on the meta device its local shapes and head counts (before loading)."""
        a = self.args
        hd, q, kv = a.head_dim, self.n_heads, self.n_kv_heads
        width = 2 * self.intermediate if a.mlp == "gated" else self.intermediate
        with torch.device("meta"):
            for layer in model.layers:
                attn = layer.attention
                attn.n_heads, attn.n_kv_heads = q, kv
                attn.wqkv = nn.Linear(a.dim, (q + 2 * kv) * hd, bias=a.qkv_bias)
                attn.wo = nn.Linear(q * hd, a.dim, bias=a.out_bias)
                ff = layer.feed_forward
                if a.num_experts:
                    ff.w13 = nn.Parameter(torch.empty(a.num_experts, 2 * self.intermediate, a.dim))
                    ff.w2 = nn.Parameter(torch.empty(a.num_experts, a.dim, self.intermediate))
                else:
                    ff.w1 = nn.Linear(a.dim, width, bias=a.mlp_bias)
                    ff.w2 = nn.Linear(self.intermediate, a.dim, bias=a.mlp_bias)
            if model.output is not None:
                model.output = nn.Linear(a.dim, self.vocab[2], bias=False)

    def lora(self, name: str, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """The rank's part of the stacked LoRA of linear ``name`` (``a [n, R, in]``, ``b [n, out, R]``): the
        rows of B that a column-parallel linear keeps, the columns of A that a row-parallel one reads."""
        if name == "wqkv":
            return a, b.index_select(1, self.qkv_rows())
        if name == "w1":
            return a, b.index_select(1, self.mlp_rows())
        if name == "wo":
            return a.index_select(2, self.q_rows()), b
        if name == "w2":
            return a.index_select(2, self.inter_rows()), b
        return a, b


def _take(tensor: Any, dim: int, index: Tensor) -> Tensor:
    return tensor.index_select(dim, index)  # torch.Tensor and weights.py's lazy tensors alike


def _whole(tensor: Any) -> Tensor:
    return tensor if isinstance(tensor, Tensor) else tensor.materialize()


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, torch.zeros(rows - t.shape[0], *t.shape[1:], dtype=t.dtype, device=t.device)])


# --------------------------------------------------------------------------------------------------
# Collectives and the modules that call them


class Group:
    """This rank's process group: the collectives the model and the step need."""

    def __init__(self, rank: int, world: int, device: torch.device) -> None:
        self.rank, self.world, self.device = rank, world, device

    def all_reduce(self, t: Tensor) -> Tensor:
        import torch.distributed as dist

        dist.all_reduce(t)
        return t

    def all_gather_rows(self, t: Tensor) -> Tensor:
        """``[R, C]`` on every rank -> ``[world * R, C]`` (rank 0's rows first) on every rank."""
        import torch.distributed as dist

        out = torch.empty(self.world * t.shape[0], *t.shape[1:], dtype=t.dtype, device=t.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, t.contiguous())
        return out

    def broadcast(self, t: Tensor) -> None:
        import torch.distributed as dist

        dist.broadcast(t, src=0)

    def agree(self, ok: bool) -> bool:
        """True on every rank only when ``ok`` is true on every rank."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=self.device)
        self._min(flag)
        return bool(flag.item())

    def min_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self._min(t)
        return int(t.item())

    def _min(self, t: Tensor) -> None:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MIN)


class RowParallel(nn.Module):
    """A row-parallel module (``wo``, ``w2``, a tensor-parallel MoE layer): its partial output, summed over
    the ranks."""

    def __init__(self, inner: nn.Module, group: Group) -> None:
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, x: Tensor) -> Tensor:
        return self.group.all_reduce(self.inner(x))


class VocabParallelHead(nn.Module):
    """The LM head split over the vocabulary: each rank's logits, gathered into the whole row."""

    def __init__(self, weight: Tensor, group: Group, vocab_size: int) -> None:
        super().__init__()
        self.weight, self.group, self.vocab_size = weight, group, vocab_size

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[0]
        if rows == 0:
            return x.new_zeros(0, self.vocab_size)
        local = F.linear(x, self.weight)  # [R, V / world]
        whole = self.group.all_gather_rows(local).view(self.group.world, rows, -1)
        return whole.permute(1, 0, 2).reshape(rows, -1)[:, : self.vocab_size]


def parallelize(model: nn.Module, shard: Shard, group: Group) -> None:
    """Swaps the collectives into a sharded model (after adapters are installed, before the kernels are)."""
    for layer in model.layers:
        if layer.parallel:
            layer.__class__ = ParallelBlock  # one all-reduce of attention + MLP
            layer.group = group
            continue
        layer.attention.wo = RowParallel(layer.attention.wo, group)
        if shard.args.num_experts:
            layer.feed_forward = RowParallel(layer.feed_forward, group)
        else:
            layer.feed_forward.w2 = RowParallel(layer.feed_forward.w2, group)
    first, end, rows = shard.vocab
    if model.output is not None:
        weight = model.output.weight
    else:  # tied: the rank's rows of the (replicated) embedding, padded where the vocabulary runs out
        weight = model.tok_embeddings.weight[first:end]
        weight = _pad_rows(weight, rows) if end - first != rows else weight
    model.output = VocabParallelHead(weight, group, shard.args.vocab_size)


class ParallelBlock(TransformerBlock):
    """Falcon's parallel block over a shard: attention's and the MLP's partial outputs summed, reduced once."""

    group: Group

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, meta: AttentionMetadata) -> Tensor:
        h = self.attention_norm(x)
        m = self.ffn_norm(x) if self.ffn_norm is not None else h
        return x + self.group.all_reduce(self.feed_forward(m) + self.attention(h, rope, meta))
