"""``read_lora``: any supported LoRA adapter, checked against the base model it will be served on."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ...errors import AdapterError
from ...runtime.config import ModelArgs
from .model import LoraAdapter, assemble
from .nemo_lora import read_nemo_lora
from .peft_lora import is_peft_dir, read_peft


def read_lora(path: Path, args: ModelArgs, *, max_lora_rank: int | None = None,
              target_modules: Sequence[str] | None = None) -> LoraAdapter:
    """A PEFT directory, a NeMo 1 ``.nemo`` (tar or directory) or a NeMo 2 PEFT checkpoint."""
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"LoRA adapter {path} does not exist")
    if is_peft_dir(path):
        found, all_layers = read_peft(path, args)
        fmt = "peft"
    else:
        found, all_layers, fmt = read_nemo_lora(path, args)
    return assemble(found, args, source=str(path), source_format=fmt, all_layers_expected=all_layers,
                    max_lora_rank=max_lora_rank, target_modules=target_modules)
