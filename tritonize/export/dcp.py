"""torch.distributed.checkpoint (Megatron ``torch_dist``) weights, read without torch's reader.

``FileSystemReader.read_metadata`` is a bare ``pickle.load`` of ``.metadata``, and the file also
pickles Megatron classes, so the metadata goes through the restricted unpickler instead. The
storage layout is torch's ``FileSystemWriter`` one: ``.metadata`` maps each (key, chunk offset) to
``_StorageInfo(relative_path, offset, length)``, and that byte range of the ``__R_I.distcp`` file
is one ``torch.save`` archive holding the chunk. Each chunk becomes a :class:`Chunk`, so tensors
are read region by region straight from the ``.distcp`` bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ExportError
from . import safe_pickle as sp
from .stored import StoredTensor, TensorStore
from .torch_archive import ArchivedTensor, read_archive
from .tree import Tree, clean_relpath


def read_metadata(tree: Tree, what: str) -> sp.StandIn:
    if not tree.is_file(".metadata"):
        raise ExportError(f"{what}: .metadata is missing; not a complete torch_dist checkpoint")
    meta = sp.loads(tree.read_bytes(".metadata"), what=f"{what}/.metadata")
    if not isinstance(meta, sp.Metadata) or not isinstance(getattr(meta, "state_dict_metadata", None), dict):
        raise ExportError(f"{what}/.metadata is not torch.distributed.checkpoint metadata")
    if not isinstance(getattr(meta, "storage_data", None), dict):
        raise ExportError(f"{what}/.metadata has no storage records (not written by FileSystemWriter)")
    mcore = getattr(meta, "mcore_data", None)  # megatron-core's MCoreMetadata (0.15): {key: {...}} or None
    if mcore is not None and not (isinstance(mcore, dict) and all(
            isinstance(k, str) and (v is None or isinstance(v, dict)) for k, v in mcore.items())):
        raise ExportError(f"{what}/.metadata: mcore_data is a {type(mcore).__name__}, not Megatron-Core's mapping "
                          "of tensor keys; the file is corrupt or was not written by Megatron-Core")
    return meta


def _flattened(meta: sp.StandIn, key: str) -> bool:
    """Whether Megatron-Core stored ``key`` N-D flattened (its distributed optimizer's layout, not a weight's)."""
    mcore = getattr(meta, "mcore_data", None) or {}
    return bool((mcore.get(key) or {}).get("nd_reformulated_orig_global_shape"))


def read_dcp(tree: Tree, what: str, want: Callable[[str], bool] = lambda key: True) -> TensorStore:
    """The tensors of a DCP directory whose key passes ``want`` (e.g. not ``optimizer.*``)."""
    meta = read_metadata(tree, what)
    records: dict[tuple[str, tuple[int, ...]], sp.StandIn] = {}
    for index, info in meta.storage_data.items():
        offset = getattr(index, "offset", None)
        records[(str(getattr(index, "fqn", "")), tuple(offset) if offset is not None else ())] = info

    tensors: dict[str, StoredTensor] = {}
    for key, md in meta.state_dict_metadata.items():
        if not isinstance(key, str) or not want(key) or isinstance(md, sp.BytesStorageMetadata):
            continue
        if not isinstance(md, sp.TensorStorageMetadata):
            raise ExportError(f"{what}: unexpected metadata entry for {key}")
        if _flattened(meta, key):
            raise ExportError(f"{what}: {key} is stored N-D flattened (Megatron-Core's distributed-optimizer "
                              "layout), not as a model weight; the checkpoint is not one tritonize can read")
        dtype = getattr(getattr(md, "properties", None), "dtype", None)
        shape = tuple(getattr(md, "size", ()))
        chunks = []
        for ch in getattr(md, "chunks", []):
            offsets, sizes = tuple(ch.offsets), tuple(ch.sizes)
            info = records.get((key, offsets))
            if info is None:
                raise ExportError(f"{what}: no storage record for {key} at {offsets}; the checkpoint is incomplete")
            if getattr(info, "transform_descriptors", None):
                raise ExportError(f"{what}: {key} is stored with transforms {info.transform_descriptors}, not supported")
            rel = clean_relpath(info.relative_path)
            path, base, total = tree.locate(rel)
            if info.offset < 0 or info.offset + info.length > total:
                raise ExportError(f"{what}/{rel} is truncated (record for {key} ends past the file); copy it again")
            archived = read_archive(path, base + info.offset, info.length, what=f"{what}/{rel} ({key})")
            if not isinstance(archived, ArchivedTensor):
                raise ExportError(f"{what}: the record for {key} does not hold a tensor")
            if archived.shape != sizes:
                raise ExportError(f"{what}: {key} chunk has shape {archived.shape}, metadata says {sizes}")
            chunks.append(archived.chunk(offsets))
        if not chunks or not isinstance(dtype, torch.dtype):
            raise ExportError(f"{what}: {key} has no dtype or no chunks in .metadata")
        tensors[key] = StoredTensor(key, shape, dtype, chunks)
    return TensorStore(tensors, what)


def read_common(tree: Tree, what: str) -> dict:
    """``common.pt`` (Megatron's non-sharded state) through the restricted unpickler."""
    if not tree.is_file("common.pt"):
        return {}
    path, base, length = tree.locate("common.pt")
    obj = read_archive(path, base, length, what=f"{what}/common.pt")
    return obj if isinstance(obj, dict) else {}
