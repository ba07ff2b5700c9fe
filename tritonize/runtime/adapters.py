"""LoRA adapters and p-tuning tables served beside the base weights, many per model.

LoRA: the n adapters of one linear layer are concatenated along the rank axis, ``A [n * R, in]`` and
``B [out, n * R]`` (R is the largest rank; smaller adapters are zero-padded). A row computes ``x @ A.T``
for all of them, keeps only its own adapter's R columns (a 0/1 mask; adapter index 0, the base model,
keeps none) and multiplies by ``B.T``: two small dense matmuls per linear, the adapters' weights read
once per step however many rows use them, and no per-row gather of weights. The adapted linears are
swapped in for the model's own (``LoRALinear`` wraps an ``nn.Linear``, as gpt-fast's quantize.py swaps
in its int8 linear), so model.py knows nothing of adapters. Which adapter each token of a step uses is
read from one buffer the engine fills before the forward (``AdapterSet.token_adapter``), so requests with
different adapters, and without one, share one step whose signature (and CUDA graph) does not change.

P-tuning: the tables of all tasks are concatenated into one ``[total, hidden]`` tensor. As in
TensorRT-LLM, a prompt carries a task's virtual tokens as ids ``vocab_size + j`` (j < that task's
count; the preprocessing model puts them there) and the engine maps them to ``vocab_size + offset + j``
of the concatenated table, whose rows replace the token embeddings at those positions
(``PromptTableEmbedding``, swapped in for the model's token embedding).

The on-disk formats (``tritonize-lora`` and ``tritonize-ptuning``) are described in CONTRACT.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from .config import ModelArgs
from .errors import AdapterError

__all__ = ["AdapterSet", "LoRA", "LoRALinear", "PromptTableEmbedding", "load_adapters"]

LORA_FORMAT = "tritonize-lora"
PTUNING_FORMAT = "tritonize-ptuning"
MLP_IN_MODULES = ("gate", "up", "gate_up")  # the canonical modules that adapt model.py's w1


class LoRA(torch.nn.Module):
    """The adapters of one linear layer; ``forward`` is the delta of each row's own adapter."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """``a [n, R, in]``, ``b [n, out, R]``: adapter i + 1 (index 0 is the base model) at position i."""
        super().__init__()
        n, rank, _ = a.shape
        self.register_buffer("a", a.reshape(n * rank, -1).contiguous(), persistent=False)  # [n R, in]
        self.register_buffer("b", b.permute(1, 0, 2).reshape(b.shape[1], n * rank).contiguous(), persistent=False)
        # row i: which of the n R columns adapter index i keeps (none for index 0)
        keep = torch.zeros(n + 1, n * rank, dtype=a.dtype, device=a.device)
        for i in range(n):
            keep[i + 1, i * rank : (i + 1) * rank] = 1
        self.register_buffer("keep", keep, persistent=False)

    def forward(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """x ``[N, in]``, rows ``[N]`` adapter indices -> ``[N, out]``."""
        h = F.linear(x, self.a) * self.keep.index_select(0, rows)
        return F.linear(h, self.b)


class LoRALinear(torch.nn.Module):
    """A model linear plus the delta of each token's adapter; ``rows`` is the engine's shared buffer."""

    def __init__(self, base: torch.nn.Linear, lora: LoRA, rows: torch.Tensor) -> None:
        super().__init__()
        self.base, self.lora, self.rows = base, lora, rows
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora(x, self.rows[: x.shape[0]])


class PromptTableEmbedding(torch.nn.Module):
    """The token embedding, where ids >= vocab_size take row ``id - vocab_size`` of the prompt table.

    Static shapes and no data-dependent branch, so a step that uses it stays capturable.
    """

    def __init__(self, base: torch.nn.Embedding, table: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.weight = base.weight  # tied output layers read the embedding matrix through this name
        self.register_buffer("table", table, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        vocab = self.base.num_embeddings
        real = self.base(tokens.clamp(max=vocab - 1))
        rows = (tokens - vocab).clamp(0, self.table.shape[0] - 1)
        return torch.where((tokens >= vocab)[..., None], self.table[rows], real)


@dataclass
class _Lora:
    task_id: int
    path: Path
    meta: dict
    tensors: dict[str, torch.Tensor]


@dataclass
class AdapterSet:
    """What a model serves: LoRA task id -> stacked index, p-tuning task id -> (offset, count)."""

    lora: dict[int, int] = field(default_factory=dict)
    tasks: dict[int, tuple[int, int]] = field(default_factory=dict)
    table: torch.Tensor | None = None
    # rows each batch slot holds for a table sent with the request (``prompt_embedding_table``); 0: none
    max_prompt_embedding_table_size: int = 0
    request_base: int = 0  # where the slots' regions start in prompt_table
    prompt_table: torch.Tensor | None = None  # the installed [rows, hidden] table (device, model dtype)
    token_adapter: torch.Tensor | None = None  # [max_num_tokens]: each token's LoRA index, filled per step
    _loras: list[_Lora] = field(default_factory=list)

    def lora_index(self, lora_task_id: int | None) -> int:
        if lora_task_id is None:
            return 0
        if lora_task_id not in self.lora:
            served = ", ".join(map(str, sorted(self.lora))) or "none"
            raise AdapterError(f"lora_task_id {lora_task_id} is not loaded (this model serves: {served}); "
                               "send one of those ids, or none for the base model")
        return self.lora[lora_task_id]

    def task(self, task_id: int) -> tuple[int, int]:
        if task_id not in self.tasks:
            served = ", ".join(map(str, sorted(self.tasks))) or "none"
            raise AdapterError(f"task_id {task_id} has no p-tuning table here (this model serves: {served}); "
                               "send one of those ids")
        return self.tasks[task_id]

    # -- installing into model.py's Transformer --------------------------------------------------
    def install(self, model: torch.nn.Module, num_slots: int, max_num_tokens: int,
                max_prompt_embedding_table_size: int = 0, shard=None) -> None:
        """Swaps the adapted linears and the prompt-table embedding into ``model``.

        ``max_prompt_embedding_table_size`` > 0 reserves that many prompt-table rows per batch slot for tables sent with a
        request, after the tasks' rows: the tensor never moves, so a captured step stays valid.
        ``token_adapter`` (``[max_num_tokens]``) is where the engine writes each token's adapter index.
        ``shard`` (tp.py's ``Shard``) keeps a tensor-parallel rank's part of each adapter: the output rows of
        its column-parallel linears, the input columns of its row-parallel ones (whose partial deltas the
        all-reduce after them sums).
        """
        args: ModelArgs = model.args
        weight = model.tok_embeddings.weight
        dtype, device = weight.dtype, weight.device
        rows_each = max_prompt_embedding_table_size
        self.max_prompt_embedding_table_size = rows_each
        self.request_base = 0 if self.table is None else self.table.shape[0]
        if self.table is not None or rows_each:
            rows = [self.table] if self.table is not None else []
            if rows_each:
                rows.append(torch.zeros(num_slots * rows_each, args.dim))
            model.tok_embeddings = PromptTableEmbedding(model.tok_embeddings, torch.cat(rows).to(device, dtype))
            self.prompt_table = model.tok_embeddings.table
        if not self._loras:
            return
        mlp_keys = [k for lora in self._loras for k in lora.tensors if k.split(".")[2] in (*MLP_IN_MODULES, "down")]
        if args.num_experts and mlp_keys:
            raise AdapterError(f"LoRA on the MLP of a mixture-of-experts model is not supported ({mlp_keys[0]}): "
                               "target the attention modules only (attn_q, attn_k, attn_v, attn_dense)")
        self.token_adapter = torch.zeros(max_num_tokens, dtype=torch.int64, device=device)
        dims = _linear_dims(args)
        for i, layer in enumerate(model.layers):
            attn, ff = layer.attention, layer.feed_forward
            parts = {
                "wqkv": (attn, _qkv_rows(args)),
                "wo": (attn, {"o": (0, args.dim)}),
                "w1": (ff, _mlp_in_rows(args)),
                "w2": (ff, {"down": (0, args.dim)}),
            }
            for name, (owner, rows) in parts.items():
                linear = getattr(owner, name, None)
                stacked = self._stack(i, rows, linear, *dims[name])
                if stacked is not None:
                    a, b = stacked if shard is None else shard.lora(name, *stacked)
                    setattr(owner, name, LoRALinear(linear, LoRA(a.to(device, dtype), b.to(device, dtype)),
                                                    self.token_adapter))

    def _stack(self, layer: int, rows: dict[str, tuple[int, int]], linear, out_features: int,
               in_features: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A/B of one fused linear for every adapter: each module's A stacked along the rank axis and its B
        placed at the module's output rows (a block-diagonal B), padded to the largest total rank."""
        per_adapter = []
        for lora in self._loras:
            a_parts, b_parts = [], []
            for module, (start, stop) in rows.items():
                a = lora.tensors.get(f"layers.{layer}.{module}.A")
                if a is None:
                    continue
                b = lora.tensors[f"layers.{layer}.{module}.B"]
                full = torch.zeros(out_features, b.shape[1], dtype=b.dtype)
                full[start:stop] = b
                a_parts.append(a)
                b_parts.append(full)
            per_adapter.append((a_parts, b_parts))
        if linear is None or not any(a for a, _ in per_adapter):
            return None
        rank = max(sum(x.shape[0] for x in a) for a, _ in per_adapter)
        n = len(per_adapter)
        a_all = torch.zeros(n, rank, in_features)
        b_all = torch.zeros(n, out_features, rank)
        for index, (a_parts, b_parts) in enumerate(per_adapter):
            if a_parts:
                a_cat, b_cat = torch.cat(a_parts), torch.cat(b_parts, dim=1)
                a_all[index, : a_cat.shape[0]] = a_cat
                b_all[index, :, : b_cat.shape[1]] = b_cat
        return a_all, b_all


def _qkv_rows(args: ModelArgs) -> dict[str, tuple[int, int]]:
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv), "qkv": (0, q + 2 * kv)}


def _linear_dims(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(out, in) of each adaptable linear of the whole model (a tensor-parallel rank holds a part of each)."""
    q, kv, f = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.intermediate_size
    return {"wqkv": (q + 2 * kv, args.dim), "wo": (args.dim, q),
            "w1": (2 * f if args.mlp == "gated" else f, args.dim), "w2": (args.dim, f)}


def _mlp_in_rows(args: ModelArgs) -> dict[str, tuple[int, int]]:
    f = args.intermediate_size
    if args.mlp == "gated":
        return {"gate": (0, f), "up": (f, 2 * f), "gate_up": (0, 2 * f)}
    return {"up": (0, f)}


def _expected_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(in, out) of each canonical module on this model."""
    q, kv, f, d = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.intermediate_size, args.dim
    shapes = {"q": (d, q), "k": (d, kv), "v": (d, kv), "qkv": (d, q + 2 * kv), "o": (q, d), "up": (d, f),
              "down": (f, d)}
    if args.mlp == "gated":
        shapes.update({"gate": (d, f), "gate_up": (d, 2 * f)})
    return shapes


def _read_json(path: Path, fmt: str) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path} is unreadable ({e}): regenerate the repository") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise AdapterError(f"{path} is not a {fmt} description: regenerate the repository")
    return meta


def _read_lora(path: Path, task_id: int, args: ModelArgs) -> _Lora:
    meta = _read_json(path / "adapter.json", LORA_FORMAT)
    tensors = load_file(str(path / "adapter.safetensors"))
    shapes = _expected_shapes(args)
    for key, t in tensors.items():
        parts = key.split(".")
        if len(parts) != 4 or parts[0] != "layers" or parts[3] not in ("A", "B") or parts[2] not in shapes:
            raise AdapterError(f"LoRA {task_id}: unexpected tensor {key!r} in {path}; regenerate the repository")
        layer, module, which = int(parts[1]), parts[2], parts[3]
        if layer >= args.n_layers:
            raise AdapterError(f"LoRA {task_id}: layer {layer} does not exist (the model has {args.n_layers})")
        fan_in, fan_out = shapes[module]
        other = tensors.get(f"layers.{layer}.{module}.{'B' if which == 'A' else 'A'}")
        if other is None:
            raise AdapterError(f"LoRA {task_id}: {key} has no matching {'B' if which == 'A' else 'A'}")
        ok = t.shape == ((other.shape[1], fan_in) if which == "A" else (fan_out, other.shape[0]))
        if not ok:
            raise AdapterError(f"LoRA {task_id}: {key} has shape {tuple(t.shape)}, which does not fit this "
                               f"model's {module} ({fan_in} -> {fan_out}); it was made for another model")
    return _Lora(task_id, path, meta, {k: v.float() for k, v in tensors.items()})


def load_adapters(adapters_dir: str | Path | None, args: ModelArgs) -> AdapterSet:
    """Reads ``adapters_dir/lora/<lora_task_id>/`` and ``adapters_dir/ptuning/<task_id>/``; empty if absent."""
    found = AdapterSet()
    if adapters_dir is None or not Path(adapters_dir).is_dir():
        return found
    root = Path(adapters_dir)
    lora_dirs = sorted((p for p in (root / "lora").glob("*") if p.is_dir()), key=lambda p: int(p.name)) \
        if (root / "lora").is_dir() else []
    for index, path in enumerate(lora_dirs, start=1):
        lora = _read_lora(path, int(path.name), args)
        found._loras.append(lora)
        found.lora[lora.task_id] = index
    tables, offset = [], 0
    task_dirs = sorted((p for p in (root / "ptuning").glob("*") if p.is_dir()), key=lambda p: int(p.name)) \
        if (root / "ptuning").is_dir() else []
    for path in task_dirs:
        _read_json(path / "ptuning.json", PTUNING_FORMAT)
        table = load_file(str(path / "table.safetensors")).get("table")
        if table is None or table.dim() != 2 or table.shape[1] != args.dim:
            shape = None if table is None else tuple(table.shape)
            raise AdapterError(f"p-tuning task {path.name}: table shape {shape} does not fit this model's hidden "
                               f"size {args.dim}; it was made for another model")
        found.tasks[int(path.name)] = (offset, table.shape[0])
        offset += table.shape[0]
        tables.append(table.float())
    if tables:
        found.table = torch.cat(tables)
    return found
