"""Reading ``torch.save`` zip archives without ``torch.load``.

A torch archive is a zip of ``data.pkl`` (the object graph) and ``data/<key>`` records holding
raw storage bytes, stored uncompressed. torch DCP writes one such archive per tensor chunk into
its ``.distcp`` files and Megatron writes ``common.pt`` the same way. The pickle goes through the
restricted unpickler; each tensor comes back as an :class:`ArchivedTensor` that says where its
bytes lie, so nothing is read until asked for and nothing is executed.
"""

from __future__ import annotations

import math
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ExportError, UnsafePickleError
from . import safe_pickle
from .stored import Chunk
from .tree import FileView

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "Float8_e4m3fnStorage": torch.float8_e4m3fn,
    "Float8_e5m2Storage": torch.float8_e5m2,
}


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _StorageRef:
    dtype: torch.dtype
    key: str
    numel: int


@dataclass(frozen=True)
class ArchivedTensor:
    """Where a pickled tensor's elements are: enough to build a :class:`Chunk` or to read it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    path: Path
    byte_offset: int  # of element 0 of the tensor (storage offset included)

    def chunk(self, offsets: tuple[int, ...] | None = None) -> Chunk:
        offsets = offsets if offsets is not None else (0,) * len(self.shape)
        return Chunk(tuple(offsets), self.shape, self.path, self.byte_offset, self.strides, self.dtype)

    def load(self) -> torch.Tensor:
        from .stored import StoredTensor

        return StoredTensor("archived tensor", self.shape, self.dtype, [self.chunk()]).read()


def _rebuild_tensor(storage: Any, storage_offset: int, size: Any, stride: Any, *_rest: Any) -> Any:
    if not isinstance(storage, _StorageRef):
        raise UnsafePickleError("a tensor in the archive does not refer to a stored buffer")
    return ("__tensor__", storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    return data


def _local_header_data_offset(view: FileView, header_offset: int) -> int:
    view.seek(header_offset)
    header = view.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise ExportError("corrupt torch archive: bad zip local header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return header_offset + 30 + name_len + extra_len


def read_archive(path: Path, start: int, length: int, *, what: str) -> Any:
    """The object graph of the torch archive at ``path[start:start+length]``; tensors are ArchivedTensor."""
    view = FileView(path, start, length)
    try:
        try:
            zf = zipfile.ZipFile(view)
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise ExportError(f"{what}: not a torch archive ({e}); the checkpoint is corrupt") from None
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise ExportError(f"{what}: not a torch archive (no data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder").strip() not in (b"little", b""):
            raise ExportError(f"{what}: big-endian torch archives are not supported")

        def persistent_load(pid: Any) -> _StorageRef:
            if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
                raise UnsafePickleError(f"{what}: unexpected persistent id in torch archive")
            stype, key, numel = pid[1], str(pid[2]), int(pid[4])
            if not isinstance(stype, _StorageType):
                raise UnsafePickleError(f"{what}: unexpected storage type in torch archive")
            return _StorageRef(stype.dtype, key, numel)

        extra: dict[tuple[str, str], Any] = {
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        }
        for name, dtype in _STORAGE_DTYPES.items():
            extra[("torch", name)] = _StorageType(dtype)
        obj = safe_pickle.loads(zf.read(pkl[0]), what=what, extra_globals=extra,
                                persistent_load=persistent_load)
        infos = {i.filename: i for i in zf.infolist()}

        def resolve(node: Any) -> Any:
            if isinstance(node, tuple) and len(node) == 5 and node[0] == "__tensor__":
                _tag, ref, offset, size, stride = node
                info = infos.get(f"{prefix}data/{ref.key}")
                if info is None:
                    raise ExportError(f"{what}: storage record {ref.key} is missing from the archive")
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ExportError(f"{what}: compressed storage records are not supported")
                itemsize = ref.dtype.itemsize
                if ref.numel * itemsize > info.file_size:
                    raise ExportError(f"{what}: storage record {ref.key} is shorter than its tensor")
                last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=False)) if math.prod(size) else offset
                if offset < 0 or (math.prod(size) and last >= ref.numel):
                    raise ExportError(f"{what}: a tensor reaches past its storage; the archive is corrupt")
                data_at = _local_header_data_offset(view, info.header_offset)
                return ArchivedTensor(ref.dtype, size, stride, Path(path), start + data_at + offset * itemsize)
            if isinstance(node, dict):
                return type(node)((k, resolve(v)) for k, v in node.items())
            if isinstance(node, list):
                return [resolve(v) for v in node]
            if isinstance(node, tuple):
                return tuple(resolve(v) for v in node)
            return node

        return resolve(obj)
    finally:
        view.close()
