"""Tensors stored as one or more chunks of raw bytes, read region by region.

All the weight formats the exporter reads (torch DCP ``.distcp`` records, zarr chunk files,
safetensors, TRT-LLM rank files) come down to the same thing: a global tensor tiled by chunks,
each chunk a strided array of raw little-endian elements at some byte offset of some file. A
:class:`StoredTensor` reads any box of leading indices (a layer, a row range) by positional reads
of just the bytes it needs, so peak memory follows the region asked for, not the file.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ExportError

#: safetensors dtype names (also used for zarr / DCP descriptions)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str) -> torch.dtype:
    """A user- or config-supplied dtype name (``bfloat16``, ``bf16``, ``torch.float16`` ...)."""
    key = str(name).strip().lower().removeprefix("torch.")
    key = {"16": "float16", "32": "float32", "bf16-mixed": "bfloat16", "16-mixed": "float16",
           "32-true": "float32", "bf16-true": "bfloat16", "16-true": "float16"}.get(key, key)
    if key not in DTYPE_NAMES:
        raise ExportError(f"unsupported dtype {name!r}; use one of float32, float16, bfloat16")
    return DTYPE_NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a global tensor.

    ``offsets``/``sizes`` place it in the global tensor; element ``i`` of the piece lives at
    byte ``byte_offset + itemsize * sum(i_d * strides[d])`` of ``path``.
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    path: Path
    byte_offset: int
    strides: tuple[int, ...]
    dtype: torch.dtype

    @staticmethod
    def contiguous(offsets: Iterable[int], sizes: Iterable[int], path: Path, byte_offset: int,
                   dtype: torch.dtype) -> Chunk:
        sizes = tuple(int(s) for s in sizes)
        return Chunk(tuple(int(o) for o in offsets), sizes, Path(path), int(byte_offset),
                     contiguous_strides(sizes), dtype)


def contiguous_strides(sizes: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(sizes):
        strides.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(strides))


class _Files:
    """Open read handles shared by all tensors (one per path, the least recently used closed past
    ``limit``: a zarr checkpoint has a file per chunk, more than a process may keep open)."""

    def __init__(self, limit: int = 128) -> None:
        self._open: OrderedDict[Path, object] = OrderedDict()
        self.limit = limit

    def get(self, path: Path):
        f = self._open.pop(path, None)
        if f is None:
            try:
                f = open(path, "rb")  # noqa: SIM115 - closed on eviction or in close()
            except OSError as e:
                raise ExportError(f"cannot read {path.name}: {e.strerror}") from None
            while len(self._open) >= self.limit:
                self._open.popitem(last=False)[1].close()  # type: ignore[attr-defined]
        self._open[path] = f
        return f

    def close(self) -> None:
        for f in self._open.values():
            f.close()  # type: ignore[attr-defined]
        self._open.clear()


FILES = _Files()


def _read_into(path: Path, offset: int, out: torch.Tensor) -> None:
    """Fills the contiguous tensor ``out`` with the bytes at ``offset`` of ``path``."""
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    f = FILES.get(path)
    f.seek(offset)
    got = f.readinto(view)
    if got != len(view):
        raise ExportError(
            f"{path.name} is truncated: wanted {len(view)} bytes at offset {offset}, got {got}; "
            "copy the checkpoint again"
        )


class StoredTensor:
    """A global tensor made of chunks; ``read`` returns any box of leading indices."""

    def __init__(self, key: str, shape: Iterable[int], dtype: torch.dtype, chunks: list[Chunk]):
        self.key = key
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.chunks = chunks
        for c in chunks:
            if len(c.sizes) != len(self.shape) or any(
                o < 0 or o + s > g for o, s, g in zip(c.offsets, c.sizes, self.shape, strict=False)
            ):
                raise ExportError(f"{key}: a stored chunk {c.offsets}+{c.sizes} lies outside shape {self.shape}")
            if c.dtype != dtype:
                raise ExportError(
                    f"{key}: stored as {dtype_name(c.dtype)} but described as {dtype_name(dtype)}; "
                    "the checkpoint is inconsistent"
                )
        if sum(math.prod(c.sizes) for c in chunks) < math.prod(self.shape):
            raise ExportError(f"{key}: the stored chunks do not cover its shape {self.shape}; the checkpoint is incomplete")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def _box(self, index: tuple[int | slice, ...]) -> tuple[list[int], list[int], list[bool]]:
        if len(index) > len(self.shape):
            raise ExportError(f"{self.key}: index {index} has more dims than shape {self.shape}")
        lo, hi, keep = [], [], []
        for d, size in enumerate(self.shape):
            ix = index[d] if d < len(index) else slice(None)
            if isinstance(ix, slice):
                a, b, step = ix.indices(size)
                if step != 1:
                    raise ValueError("only unit-step slices are supported")
                lo.append(a)
                hi.append(max(a, b))
                keep.append(True)
            else:
                i = int(ix) + (size if int(ix) < 0 else 0)
                if not 0 <= i < size:
                    raise ExportError(f"{self.key}: index {ix} out of range for dim {d} of {self.shape}")
                lo.append(i)
                hi.append(i + 1)
                keep.append(False)
        return lo, hi, keep

    def _pieces(self, lo: list[int], hi: list[int]) -> list[_Piece]:
        """The parts of each chunk inside the box ``[lo, hi)``; they must tile it exactly."""
        pieces = []
        for c in self.chunks:
            ilo = [max(a, o) for a, o in zip(lo, c.offsets, strict=True)]
            ihi = [min(h, o + s) for h, o, s in zip(hi, c.offsets, c.sizes, strict=True)]
            if any(a >= b for a, b in zip(ilo, ihi, strict=True)):
                continue
            sizes = tuple(b - a for a, b in zip(ilo, ihi, strict=True))
            local = [a - o for a, o in zip(ilo, c.offsets, strict=True)]
            first = sum(i * s for i, s in zip(local, c.strides, strict=True))
            span = sum((n - 1) * s for n, s in zip(sizes, c.strides, strict=True)) + 1
            dense = span == math.prod(sizes) and _c_ordered(sizes, c.strides)
            pieces.append(_Piece(c, tuple(a - z for a, z in zip(ilo, lo, strict=True)), sizes,
                                 c.byte_offset + first * c.dtype.itemsize, span, dense))
        covered = sum(math.prod(p.sizes) for p in pieces)
        if covered != math.prod(h - a for a, h in zip(lo, hi, strict=True)):
            raise ExportError(f"{self.key}: the stored chunks do not cover region {lo}..{hi}; "
                              "the checkpoint is incomplete")
        return pieces

    def read(self, index: tuple[int | slice, ...] = ()) -> torch.Tensor:
        """``tensor[index]`` for an index of ints and unit-step slices over the leading dims."""
        lo, hi, keep = self._box(index)
        box = tuple(h - a for a, h in zip(lo, hi, strict=True))
        out = torch.empty(box, dtype=self.dtype)
        for p in self._pieces(lo, hi):
            dest = out[tuple(slice(a, a + n) for a, n in zip(p.start, p.sizes, strict=True))]
            if p.dense and dest.is_contiguous():
                _read_into(p.chunk.path, p.offset, dest)
            else:
                buf = torch.empty(p.span, dtype=p.chunk.dtype)
                _read_into(p.chunk.path, p.offset, buf)
                dest.copy_(buf.as_strided(p.sizes, p.chunk.strides))
        return out.reshape(tuple(n for n, k in zip(box, keep, strict=True) if k))

    def byte_ranges(self, index: tuple[int | slice, ...] = ()) -> list[tuple[Path, int, int]] | None:
        """``(file, offset, length)`` ranges whose concatenation is exactly the raw bytes of
        ``tensor[index]`` in C order, or None when the region is not stored that way (then read it)."""
        lo, hi, _keep = self._box(index)
        box = [h - a for a, h in zip(lo, hi, strict=True)]
        pieces = self._pieces(lo, hi)
        r = next((d for d, n in enumerate(box) if n > 1), len(box) - 1 if box else 0)
        for p in pieces:  # each piece: dense, and whole in every dim but the split one (r)
            if not p.dense or any(p.sizes[d] != box[d] for d in range(len(box)) if d != r):
                return None
        pieces.sort(key=lambda p: p.start[r] if box else 0)
        itemsize = self.dtype.itemsize
        return [(p.chunk.path, p.offset, math.prod(p.sizes) * itemsize) for p in pieces]


@dataclass(frozen=True)
class _Piece:
    chunk: Chunk
    start: tuple[int, ...]  # position inside the requested box
    sizes: tuple[int, ...]
    offset: int  # byte offset of the piece's first element in the chunk's file
    span: int  # elements between the piece's first and last element, inclusive
    dense: bool  # stored contiguously in C order


def _c_ordered(sizes: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    expected = contiguous_strides(sizes)
    return all(n == 1 or s == e for n, s, e in zip(sizes, strides, expected, strict=False))


class TensorStore(Mapping[str, StoredTensor]):
    """Named stored tensors of one checkpoint."""

    def __init__(self, tensors: dict[str, StoredTensor], name: str):
        self._tensors = tensors
        self.name = name

    def __getitem__(self, key: str) -> StoredTensor:
        try:
            return self._tensors[key]
        except KeyError:
            raise ExportError(f"{self.name}: tensor {key} is missing from the checkpoint") from None

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)
