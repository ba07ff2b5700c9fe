"""Writing the ``tritonize-lora`` / ``tritonize-ptuning`` v1 directories the runtime reads.

Each is written into a scratch directory beside ``out_dir`` and renamed onto it only when
complete, so a failure leaves nothing behind and a reader never sees half an adapter.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors.torch import save_file

from ...errors import AdapterError
from .model import LoraAdapter, PromptTable

LORA_FORMAT = "tritonize-lora"
PTUNING_FORMAT = "tritonize-ptuning"
FORMAT_VERSION = 1


@contextlib.contextmanager
def _staged(out_dir: Path) -> Iterator[Path]:
    out_dir = Path(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as e:
        raise AdapterError(f"cannot write {out_dir} ({e})") from None
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except OSError as e:
        raise AdapterError(f"cannot write {out_dir} ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_lora(adapter: LoraAdapter, out_dir: Path) -> Path:
    tensors = {}
    for i, layer in enumerate(adapter.layers):
        for m, (a, b) in layer.items():
            tensors[f"layers.{i}.{m}.A"] = a.float().contiguous()
            tensors[f"layers.{i}.{m}.B"] = b.float().contiguous()
    if not tensors:
        raise AdapterError(f"adapter {adapter.source} holds no LoRA weights; nothing to write")
    meta = {
        "format": LORA_FORMAT, "format_version": FORMAT_VERSION, "rank": adapter.rank, "n_layers": adapter.n_layers,
        "modules": adapter.modules, "source": adapter.source, "source_format": adapter.source_format,
        "scale_folded": True,
    }
    with _staged(out_dir) as tmp:
        save_file(tensors, str(tmp / "adapter.safetensors"))
        (tmp / "adapter.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out_dir)


def write_ptuning(table: PromptTable, out_dir: Path) -> Path:
    meta = {"format": PTUNING_FORMAT, "format_version": FORMAT_VERSION, "n_virtual": table.n_virtual,
            "hidden": table.hidden, "source": table.source}
    with _staged(out_dir) as tmp:
        save_file({"table": table.table.float().contiguous()}, str(tmp / "table.safetensors"))
        (tmp / "ptuning.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out_dir)
