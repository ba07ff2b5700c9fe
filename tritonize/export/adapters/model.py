"""In-memory adapters: a LoRA adapter as per-layer (A, B) pairs, a p-tuning table as one matrix.

Every reader produces the same :class:`LoraAdapter`: canonical module names, HF row order, float32,
the adapter's scale already folded into ``B``, one rank for all modules (smaller ranks are padded
with zeros, which leaves ``B @ A`` unchanged), and every module present in every layer (layers an
adapter skips get zero matrices), so the runtime sees one regular shape per module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ...errors import AdapterError
from ...runtime.config import ModelArgs
from .names import CANONICAL_MODULES, TRTLLM_MODULES, TRTLLM_TO_CANONICAL, canonical_to_trtllm


@dataclass
class LoraAdapter:
    """``layers[i][m] = (A [r, in], B [out, r])`` with ``W_m += B @ A`` (scale folded into B)."""

    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]
    source: str
    source_format: str  # "peft" | "nemo" | "nemo2"

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def modules(self) -> list[str]:
        present = set().union(*(layer.keys() for layer in self.layers)) if self.layers else set()
        return [m for m in CANONICAL_MODULES if m in present]

    @property
    def rank(self) -> int:
        return max((a.shape[0] for layer in self.layers for a, _ in layer.values()), default=0)

    def delta(self, layer: int, module: str) -> torch.Tensor:
        a, b = self.layers[layer][module]
        return b @ a


@dataclass
class PromptTable:
    """The embeddings of one task's virtual tokens, ``[n_virtual, hidden]`` float32."""

    table: torch.Tensor
    source: str
    extra: dict = field(default_factory=dict)

    @property
    def n_virtual(self) -> int:
        return int(self.table.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.table.shape[1])


def module_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every canonical module the base model has."""
    H, d, F = args.dim, args.head_dim, args.intermediate_size
    nh, nkv = args.n_heads, args.n_kv_heads
    shapes = {
        "qkv": (H, (nh + 2 * nkv) * d), "q": (H, nh * d), "k": (H, nkv * d), "v": (H, nkv * d),
        "o": (nh * d, H), "up": (H, F), "down": (F, H),
    }
    if args.mlp == "gated":
        shapes.update(gate=(H, F), gate_up=(H, 2 * F))
    return shapes


def _pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    r = a.shape[0]
    if r == rank:
        return a, b
    return (torch.cat([a, a.new_zeros(rank - r, a.shape[1])], 0), torch.cat([b, b.new_zeros(b.shape[0], rank - r)], 1))


def assemble(
    found: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
    args: ModelArgs,
    *,
    source: str,
    source_format: str,
    all_layers_expected: bool,
    max_lora_rank: int | None,
    target_modules: Sequence[str] | None,
) -> LoraAdapter:
    """Check ``(layer, module) -> (A, B scaled)`` against the base model and make it regular."""
    what = f"adapter {source}"
    if not found:
        raise AdapterError(f"{what} holds no LoRA weights")
    shapes = module_shapes(args)
    layer_ids = sorted({i for i, _ in found})
    if layer_ids[-1] >= args.n_layers:
        raise AdapterError(f"{what} has weights for layer {layer_ids[-1]} but the base model has {args.n_layers} "
                           "layers; the adapter was made for another model")
    if all_layers_expected and layer_ids != list(range(args.n_layers)):
        raise AdapterError(f"{what} adapts {len(layer_ids)} layers but the base model has {args.n_layers}; "
                           "the adapter was made for another model")
    for (i, m), (a, b) in sorted(found.items(), key=lambda kv: (kv[0][0], CANONICAL_MODULES.index(kv[0][1]))):
        if m not in shapes:
            raise AdapterError(f"{what}: module {m} (layer {i}) does not exist in the base model "
                               f"({args.architecture}, {args.mlp} MLP)")
        fan_in, fan_out = shapes[m]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != fan_in or b.shape != (fan_out, r):
            raise AdapterError(
                f"{what}: module {m} of layer {i} has A {list(a.shape)} and B {list(b.shape)}, the base model needs "
                f"A [r, {fan_in}] and B [{fan_out}, r]; the adapter was made for another model size"
            )
    _check_targets(found, args.mlp, what, target_modules)
    rank = max(a.shape[0] for a, _ in found.values())
    if max_lora_rank is not None and rank > max_lora_rank:
        raise AdapterError(f"{what} has rank {rank} above --max-lora-rank {max_lora_rank}: raise it")
    modules = [m for m in CANONICAL_MODULES if any(mm == m for _, mm in found)]
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    for i in range(args.n_layers):
        layer = {}
        for m in modules:
            if (i, m) in found:
                a, b = found[(i, m)]
                a, b = a.float().contiguous(), b.float().contiguous()
            else:
                fan_in, fan_out = shapes[m]
                a, b = torch.zeros(rank, fan_in), torch.zeros(fan_out, rank)
            layer[m] = _pad_rank(a, b, rank)
        layers.append(layer)
    return LoraAdapter(layers, source, source_format)


def _check_targets(found: Mapping[tuple[int, str], object], mlp_kind: str, what: str,
                   target_modules: Sequence[str] | None) -> None:
    if target_modules is None:
        return
    unknown = [t for t in target_modules if t not in TRTLLM_MODULES]
    if unknown:
        raise AdapterError(f"--lora-target-modules: unknown module {unknown[0]!r}; choose from {', '.join(TRTLLM_MODULES)}")
    table = TRTLLM_TO_CANONICAL(mlp_kind)
    allowed = {m for t in target_modules for m in table[t]}
    for m in sorted({m for _, m in found}, key=CANONICAL_MODULES.index):
        if m not in allowed:
            raise AdapterError(
                f"{what} adapts module {canonical_to_trtllm(m, mlp_kind)} ({m}) which is not in --lora-target-modules "
                f"({', '.join(target_modules)}): add it to the flag"
            )
