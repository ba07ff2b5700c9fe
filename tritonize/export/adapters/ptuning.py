"""P-tuning prompt tables: a NeMo p-tuning ``.nemo`` or a plain ``[n, H]`` table file.

NeMo computes the prompt encoder's output once at save time and stores it as the inference table.
Its key, as NeMo's and TensorRT-LLM's exporters look it up: ``model.embedding.adapter_layer.
ptuning_adapter.inference_table`` (Megatron-Core), ``model.language_model.adapter_layer.
ptuning_adapter.inference_table.prompt_table.taskname.prompt_embeddings.weight`` (legacy), or a
nested ``prompt_table`` dict of ``prompt_table.<task>.prompt_embeddings.weight`` (prompt learning).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ...errors import AdapterError
from .model import PromptTable
from .nemo_files import load, model_config, nemo_tree, read_state, weights_file

_MCORE_KEY = "model.embedding.adapter_layer.ptuning_adapter.inference_table"
_LEGACY_KEY = ("model.language_model.adapter_layer.ptuning_adapter.inference_table.prompt_table.taskname."
               "prompt_embeddings.weight")


def read_ptuning(path: Path, hidden_size: int) -> PromptTable:
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"p-tuning table {path} does not exist")
    if path.is_file() and path.suffix == ".safetensors":
        table = _safetensors(path)
    elif path.is_file() and path.suffix == ".npy":
        table = _npy(path)
    else:
        table = _nemo(path)
    if table.dim() != 2 or table.shape[0] == 0:
        raise AdapterError(f"p-tuning table {path} has shape {list(table.shape)}; expected [n_virtual_tokens, hidden]")
    if table.shape[1] != hidden_size:
        raise AdapterError(f"p-tuning table {path} is {table.shape[1]} wide but the model's hidden size is "
                           f"{hidden_size}; the table was made for another model")
    return PromptTable(table.float().contiguous(), str(path))


def _safetensors(path: Path) -> torch.Tensor:
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{path} is not a readable safetensors file ({e})") from None
    if len(tensors) != 1:
        raise AdapterError(f"{path} holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:4])}); a p-tuning "
                           "table file must hold exactly one [n, hidden] tensor")
    return next(iter(tensors.values()))


def _npy(path: Path) -> torch.Tensor:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise AdapterError(f"{path} is not a plain numeric .npy array ({e})") from None
    if arr.dtype.kind not in "fiu":
        raise AdapterError(f"{path} holds {arr.dtype} values; expected floats")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def _nemo(path: Path) -> torch.Tensor:
    with nemo_tree(path) as tree:
        what = f"p-tuning checkpoint {tree.name}"
        if tree.is_file("model_config.yaml"):
            peft = model_config(tree).get("peft")
            scheme = str(peft.get("peft_scheme", "")) if isinstance(peft, dict) else ""
            if scheme and "ptuning" not in scheme:
                raise AdapterError(f"{what} is a {scheme} checkpoint (peft_scheme {scheme!r}), not p-tuning")
        state = read_state(tree, weights_file(tree))
        return _table(state, what)


def _table(state: Mapping[str, Any], what: str) -> torch.Tensor:
    for key in (_MCORE_KEY, _LEGACY_KEY):
        if key in state:
            return _tensor(state[key], what, key)
    nested = state.get("prompt_table")
    if isinstance(nested, Mapping):
        tasks = {k: v for k, v in nested.items() if str(k).endswith(".prompt_embeddings.weight")}
        if len(tasks) == 1:
            key, value = next(iter(tasks.items()))
            return _tensor(value, what, f"prompt_table/{key}")
        if tasks:
            names = ", ".join(str(k).split(".")[1] for k in tasks)
            raise AdapterError(f"{what} holds prompt tables for several tasks ({names}); save each task's table "
                               "as its own .safetensors file and pass them one per task id")
    others = [k for k in state if "ptuning_adapter" in str(k)]
    hint = (" (it has the prompt encoder but no inference_table: save it again with NeMo after training)"
            if others else "")
    raise AdapterError(f"{what} has no p-tuning table ({_MCORE_KEY}){hint}")


def _tensor(value: Any, what: str, key: str) -> torch.Tensor:
    t = load(value)
    if not isinstance(t, torch.Tensor):
        raise AdapterError(f"{what}: {key} is not a tensor")
    return t


def check_prompt_tables(tables: Mapping[int, PromptTable], max_prompt_embedding_table_size: int | None) -> None:
    """All tasks' virtual tokens together must fit the engine's prompt table (TensorRT-LLM's limit)."""
    if not tables:
        return
    widths = {t.hidden for t in tables.values()}
    if len(widths) > 1:
        per = ", ".join(f"task {k}: {t.hidden}" for k, t in sorted(tables.items()))
        raise AdapterError(f"p-tuning tables differ in width ({per}); all must match the model's hidden size")
    total = sum(t.n_virtual for t in tables.values())
    if max_prompt_embedding_table_size is not None and total > max_prompt_embedding_table_size:
        per = ", ".join(f"task {k}: {t.n_virtual}" for k, t in sorted(tables.items()))
        raise AdapterError(
            f"p-tuning tables hold {total} virtual tokens in all ({per}), above --max-prompt-embedding-table-size "
            f"{max_prompt_embedding_table_size}: raise it or drop a task"
        )
