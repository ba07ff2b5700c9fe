"""The adapters a repository serves: read and checked before anything is written, then staged with it.

Every adapter is converted into tritonize's own format (``tritonize-lora`` / ``tritonize-ptuning``, see
the backend's CONTRACT.md) under ``<name>_engine/<version>/adapters/``, so the engine reads one format
whatever the source was (PEFT, NeMo 1, NeMo 2, a plain table file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..export.adapters import (
    AdapterError,
    LoraAdapter,
    PromptTable,
    check_prompt_tables,
    read_lora,
    read_ptuning,
    write_lora,
    write_ptuning,
)
from .checkpoint import Checkpoint
from .spec import RepoSpec

ADAPTERS_DIR = "adapters"


@dataclass
class PreparedAdapters:
    lora: dict[int, LoraAdapter] = field(default_factory=dict)
    ptuning: dict[int, PromptTable] = field(default_factory=dict)
    sources: dict[str, dict[int, str]] = field(default_factory=lambda: {"lora": {}, "ptuning": {}})

    def __bool__(self) -> bool:
        return bool(self.lora or self.ptuning)

    def task_sizes(self) -> dict[str, int]:
        """task id -> its number of virtual tokens (what preprocessing inserts)."""
        return {str(task): table.n_virtual for task, table in sorted(self.ptuning.items())}

    def listing(self) -> dict:
        """What tritonize.json and `tritonize validate` show."""
        return {
            "lora": {str(t): {"source": self.sources["lora"][t], "rank": a.rank, "modules": a.modules}
                     for t, a in sorted(self.lora.items())},
            "ptuning": {str(t): {"source": self.sources["ptuning"][t], "n_virtual": p.n_virtual}
                        for t, p in sorted(self.ptuning.items())},
        }

    def write(self, engine_version_dir: Path, progress: bool = True) -> None:
        root = engine_version_dir / ADAPTERS_DIR
        items = [("lora", t, a) for t, a in sorted(self.lora.items())]
        items += [("ptuning", t, p) for t, p in sorted(self.ptuning.items())]
        for kind, task, adapter in tqdm(items, desc="adapters", unit="adapter", disable=not progress):
            (root / kind).mkdir(parents=True, exist_ok=True)
            if kind == "lora":
                write_lora(adapter, root / kind / str(task))
            else:
                write_ptuning(adapter, root / kind / str(task))


def prepare_adapters(spec: RepoSpec, ckpt: Checkpoint) -> PreparedAdapters:
    """Reads every adapter of ``spec`` against the checkpoint's shapes and the spec's limits."""
    prepared = PreparedAdapters()
    for task, source in spec.lora:
        prepared.lora[task] = read_lora(Path(source), ckpt.args, max_lora_rank=spec.max_lora_rank or None,
                                        target_modules=spec.lora_target_modules or None)
        prepared.sources["lora"][task] = str(source)
    for task, source in spec.ptuning:
        prepared.ptuning[task] = read_ptuning(Path(source), ckpt.args.dim)
        prepared.sources["ptuning"][task] = str(source)
    if prepared.ptuning:
        check_prompt_tables(prepared.ptuning, spec.max_prompt_embedding_table_size or None)
    if prepared.ptuning:
        longest = max(t.n_virtual for t in prepared.ptuning.values())
        if longest >= spec.max_input_len:
            raise AdapterError(f"a p-tuning task has {longest} virtual tokens, as many as --max-input-len "
                             f"{spec.max_input_len}: raise --max-input-len")
    return prepared
