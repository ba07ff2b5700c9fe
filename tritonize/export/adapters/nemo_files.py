"""Opening a NeMo adapter checkpoint (a ``.nemo`` tar or its extracted directory) safely.

Adapter ``.nemo`` files hold ``model_config.yaml`` and a single-rank ``model_weights.ckpt``
(``torch.save`` zip). The state dict goes through the project's restricted unpickler; the tar is
read in place (a gzip one is decompressed into a scratch dir first). Every failure of the
underlying readers becomes an :class:`AdapterError`.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ...errors import AdapterError, ExportError
from ..torch_archive import ArchivedTensor, read_archive
from ..tree import Tree, open_tree


@contextlib.contextmanager
def nemo_tree(path: Path) -> Iterator[Tree]:
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"{path} does not exist")
    with tempfile.TemporaryDirectory(prefix="tritonize-adapter-") as scratch:
        try:
            with open_tree(path, Path(scratch)) as tree:
                yield tree
        except ExportError as e:
            raise AdapterError(str(e)) from None


def model_config(tree: Tree) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load(tree.read_text("model_config.yaml"))
    except yaml.YAMLError as e:
        raise AdapterError(f"{tree.name}/model_config.yaml is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{tree.name}/model_config.yaml is not a mapping")
    if isinstance(cfg.get("model"), dict) and "peft" not in cfg:
        cfg = cfg["model"]
    return cfg


def weights_file(tree: Tree) -> str:
    if tree.is_file("model_weights.ckpt"):
        return "model_weights.ckpt"
    if tree.is_file("mp_rank_00/model_weights.ckpt"):
        if tree.is_file("mp_rank_01/model_weights.ckpt"):
            raise AdapterError(f"{tree.name} is split over tensor-parallel ranks (mp_rank_01); re-save the adapter "
                               "with tensor_model_parallel_size=1")
        return "mp_rank_00/model_weights.ckpt"
    raise AdapterError(f"{tree.name} has no model_weights.ckpt; not a NeMo adapter checkpoint")


def read_state(tree: Tree, rel: str) -> dict[str, Any]:
    """The state dict, tensors as :class:`ArchivedTensor` (nested dicts kept), via the restricted reader."""
    path, start, length = tree.locate(rel)
    with open(path, "rb") as f:
        f.seek(start)
        if f.read(4) != b"PK\x03\x04":
            raise AdapterError(f"{tree.name}/{rel} is not a torch zip archive (legacy torch.save format); "
                               "re-save it with a current NeMo")
    obj = read_archive(path, start, length, what=f"{tree.name}/{rel}")
    if not isinstance(obj, dict):
        raise AdapterError(f"{tree.name}/{rel} does not hold a state dict")
    return obj


def load(t: Any) -> Any:
    return t.load() if isinstance(t, ArchivedTensor) else t
