"""Megatron ``zarr`` weights, read without the zarr package.

Megatron's zarr strategy writes one zarr v2 array per tensor key: a directory with a ``.zarray``
JSON (shape, chunk shape, dtype, ``compressor: null``) and one file of raw C-order bytes per chunk,
named by its grid index (``0.0.0``). Edge chunks are stored at full chunk size. bfloat16, which
numpy lacks, is spelled as the dtype string ``"bfloat16"``.
"""

from __future__ import annotations

import itertools
import json
import math

import torch

from ..errors import ExportError
from .stored import Chunk, StoredTensor, TensorStore, contiguous_strides
from .tree import Tree

_ZARR_DTYPES = {
    "bfloat16": torch.bfloat16,
    "<f4": torch.float32,
    "<f2": torch.float16,
    "<f8": torch.float64,
    "<i8": torch.int64,
    "<i4": torch.int32,
    "<i2": torch.int16,
    "|i1": torch.int8,
    "|u1": torch.uint8,
    "|b1": torch.bool,
}


def _array(tree: Tree, key: str, what: str) -> StoredTensor:
    try:
        meta = json.loads(tree.read_text(f"{key}/.zarray"))
    except ValueError as e:
        raise ExportError(f"{what}/{key}/.zarray is not valid JSON ({e})") from None
    dtype = _ZARR_DTYPES.get(str(meta.get("dtype")))
    if dtype is None:
        raise ExportError(f"{what}/{key}: unsupported zarr dtype {meta.get('dtype')!r}")
    if meta.get("compressor") is not None or meta.get("filters"):
        raise ExportError(f"{what}/{key}: compressed zarr chunks are not supported (Megatron writes them raw)")
    if meta.get("order", "C") != "C":
        raise ExportError(f"{what}/{key}: only C-order zarr arrays are supported")
    shape = tuple(int(s) for s in meta.get("shape", ()))
    chunk_shape = tuple(int(s) for s in meta.get("chunks", shape)) or ()
    if len(chunk_shape) != len(shape) or any(c <= 0 for c in chunk_shape):
        raise ExportError(f"{what}/{key}: .zarray chunks {chunk_shape} do not match shape {shape}")
    sep = meta.get("dimension_separator", ".")
    chunk_bytes = math.prod(chunk_shape) * dtype.itemsize
    chunks = []
    grid = [range(math.ceil(s / c)) for s, c in zip(shape, chunk_shape, strict=False)]
    for idx in itertools.product(*grid):
        name = sep.join(str(i) for i in idx) if idx else "0"
        rel = f"{key}/{name}"
        if not tree.is_file(rel):
            raise ExportError(f"{what}: zarr chunk {rel} is missing; the checkpoint is incomplete")
        path, base, length = tree.locate(rel)
        if length != chunk_bytes:
            raise ExportError(
                f"{what}: zarr chunk {rel} has {length} bytes, expected {chunk_bytes} "
                f"({meta.get('dtype')} x {chunk_shape}); wrong dtype or truncated file"
            )
        offsets = tuple(i * c for i, c in zip(idx, chunk_shape, strict=False))
        sizes = tuple(min(c, s - o) for c, s, o in zip(chunk_shape, shape, offsets, strict=False))
        chunks.append(Chunk(offsets, sizes, path, base, contiguous_strides(chunk_shape), dtype))
    return StoredTensor(key, shape, dtype, chunks)


def read_zarr(tree: Tree, what: str, want=lambda key: True) -> TensorStore:
    """Every zarr array directly under ``tree`` whose key passes ``want``."""
    tensors = {}
    for key in tree.list(""):
        if tree.is_file(f"{key}/.zarray") and want(key):
            tensors[key] = _array(tree, key, what)
    return TensorStore(tensors, what)
