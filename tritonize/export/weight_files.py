"""Hugging Face / TRT-LLM weight files: safetensors, and PyTorch ``.bin`` archives.

safetensors is an 8-byte header length, a JSON header (dtype, shape, data offsets per tensor)
and the raw bytes; parsing the header ourselves turns each tensor into a :class:`Chunk` read with
positional reads (no mmap, so resident memory stays what is actually being converted). ``.bin``
files are ``torch.save`` archives and go through the restricted reader; a pre-1.6 (non-zip)
``.bin`` falls back to ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import zipfile

import torch

from ..errors import ExportError
from .stored import SAFETENSORS_DTYPES, Chunk, StoredTensor
from .torch_archive import ArchivedTensor, read_archive
from .tree import Tree

_MAX_HEADER = 256 << 20


def read_safetensors(tree: Tree, rel: str) -> dict[str, StoredTensor]:
    path, base, length = tree.locate(rel)
    what = f"{tree.name}/{rel}"
    with open(path, "rb") as f:
        f.seek(base)
        head = f.read(8)
        if len(head) != 8:
            raise ExportError(f"{what} is truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, length - 8):
            raise ExportError(f"{what} is not a safetensors file or is truncated (header length {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ExportError(f"{what}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ExportError(f"{what}: corrupt safetensors header")
    data_start = base + 8 + n
    data_len = length - 8 - n
    out: dict[str, StoredTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ExportError(f"{what}: unsupported or corrupt entry for {name} ({info})") from None
        if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end <= data_len:
            raise ExportError(f"{what}: {name} byte range {begin}..{end} does not fit its shape or the file; "
                              "the file is truncated or corrupt")
        out[name] = StoredTensor(name, shape, dtype,
                                 [Chunk.contiguous((0,) * len(shape), shape, path, data_start + begin, dtype)])
    return out


class _InMemory(StoredTensor):
    """A tensor already in memory (legacy ``.bin`` loaded with ``weights_only=True``)."""

    def __init__(self, key: str, tensor: torch.Tensor):
        self.key, self.shape, self.dtype, self.chunks = key, tuple(tensor.shape), tensor.dtype, []
        self._t = tensor

    def read(self, index=()) -> torch.Tensor:
        return self._t[index].clone()


def read_bin(tree: Tree, rel: str) -> dict[str, StoredTensor]:
    path, base, length = tree.locate(rel)
    what = f"{tree.name}/{rel}"
    with open(path, "rb") as f:
        f.seek(base)
        is_zip = f.read(4) == b"PK\x03\x04"
    if is_zip:
        obj = read_archive(path, base, length, what=what)
        if not isinstance(obj, dict):
            raise ExportError(f"{what} does not hold a state dict")
        out = {}
        for k, v in obj.items():
            if isinstance(v, ArchivedTensor):
                out[str(k)] = StoredTensor(str(k), v.shape, v.dtype, [v.chunk()])
        return out
    if base != 0:
        raise ExportError(f"{what}: legacy (non-zip) .bin files must not be inside a tar")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError) as e:
        raise ExportError(f"{what}: refused or unreadable with weights_only=True ({e})") from None
    if not isinstance(state, dict):
        raise ExportError(f"{what} does not hold a state dict")
    return {str(k): _InMemory(str(k), v) for k, v in state.items() if isinstance(v, torch.Tensor)}
