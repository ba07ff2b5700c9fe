"""Row-addressable lazy tensors: a converted weight described before any byte is read.

Every conversion the exporter needs is a rearrangement of rows (dim 0) of stored tensors:
per-layer slices, q/k/v rows picked out of a fused matrix per query group, the gate and up halves
of a fused fc1, a vocabulary trimmed to the tokenizer, tensor-parallel pieces concatenated along
dim 0 or 1, an elementwise +1 on a norm. A :class:`Lazy` knows its shape and can produce any row
range on demand, so the writer streams each output tensor in blocks of bounded size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import ExportError
from .stored import StoredTensor


class Lazy:
    shape: tuple[int, ...]
    dtype: torch.dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError

    def byte_source(self, start: int, stop: int) -> list[tuple[Path, int, int]] | None:
        """File ranges holding exactly the raw bytes of rows ``[start, stop)`` (in ``self.dtype``),
        when they are stored that way: the writer then copies them without reading them in."""
        return None

    def full(self) -> torch.Tensor:
        if not self.shape:
            return self.rows(0, 1)
        return self.rows(0, self.shape[0])

    @property
    def nrows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}{list(self.shape)}"


class Region(Lazy):
    """``stored[prefix]``: the sub-tensor under fixed leading indices (e.g. one layer)."""

    def __init__(self, stored: StoredTensor, prefix: tuple[int, ...] = ()):
        self.stored = stored
        self.prefix = tuple(prefix)
        self.shape = stored.shape[len(prefix):]
        self.dtype = stored.dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if not self.shape:
            return self.stored.read(self.prefix)
        return self.stored.read(self.prefix + (slice(start, stop),))

    def byte_source(self, start: int, stop: int) -> list[tuple[Path, int, int]] | None:
        if not self.shape:
            return self.stored.byte_ranges(self.prefix)
        return self.stored.byte_ranges(self.prefix + (slice(start, stop),))


class Const(Lazy):
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor if not self.shape else self.tensor[start:stop]


class Zeros(Lazy):
    def __init__(self, shape: Sequence[int], dtype: torch.dtype):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return torch.zeros((stop - start, *self.shape[1:]), dtype=self.dtype)


class Rows(Lazy):
    """The concatenation (dim 0) of row segments ``(base, start, length)`` of one or more bases."""

    def __init__(self, segments: Sequence[tuple[Lazy, int, int]]):
        if not segments:
            raise ValueError("Rows needs at least one segment")
        tail = segments[0][0].shape[1:]
        for base, start, length in segments:
            if base.shape[1:] != tail or start < 0 or start + length > base.nrows:
                raise ExportError(f"row segment {start}+{length} of {base} does not fit; shapes disagree")
        self.segments = [(b, int(s), int(n)) for b, s, n in segments if n > 0]
        self.shape = (sum(n for _, _, n in self.segments), *tail)
        self.dtype = segments[0][0].dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        parts, pos = [], 0
        for base, s, n in self.segments:
            a, b = max(start, pos), min(stop, pos + n)
            if a < b:
                parts.append(base.rows(s + a - pos, s + b - pos))
            pos += n
            if pos >= stop:
                break
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def byte_source(self, start: int, stop: int) -> list[tuple[Path, int, int]] | None:
        ranges, pos = [], 0
        for base, s, n in self.segments:
            a, b = max(start, pos), min(stop, pos + n)
            if a < b:
                part = base.byte_source(s + a - pos, s + b - pos)
                if part is None:
                    return None
                ranges += part
            pos += n
            if pos >= stop:
                break
        return ranges


def rows_of(base: Lazy, start: int, length: int) -> Rows:
    return Rows([(base, start, length)])


def cat0(parts: Sequence[Lazy]) -> Lazy:
    return parts[0] if len(parts) == 1 else Rows([(p, 0, p.nrows) for p in parts])


class Cat1(Lazy):
    """Concatenation along dim 1 (row-parallel tensor-parallel pieces)."""

    def __init__(self, parts: Sequence[Lazy]):
        first = parts[0]
        for p in parts:
            if p.shape[0] != first.shape[0] or p.shape[2:] != first.shape[2:]:
                raise ExportError(f"cannot concatenate {list(parts)} along dim 1: shapes disagree")
        self.parts = list(parts)
        self.shape = (first.shape[0], sum(p.shape[1] for p in parts), *first.shape[2:])
        self.dtype = first.dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return torch.cat([p.rows(start, stop) for p in self.parts], dim=1)


class Apply(Lazy):
    """An elementwise (row-local) function of another lazy tensor."""

    def __init__(self, base: Lazy, fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype | None = None):
        self.base = base
        self.fn = fn
        self.shape = base.shape
        self.dtype = dtype or base.dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.fn(self.base.rows(start, stop))


def add_offset(base: Lazy, delta: float) -> Lazy:
    """``base + delta`` computed in float32 (norm weights stored as w for an output of 1 + w)."""
    if delta == 0:
        return base
    return Apply(base, lambda t: (t.float() + delta).to(t.dtype))


class Transpose(Lazy):
    """The transpose of a 2-D tensor (GPT-2's Conv1D layout); read whole, once."""

    def __init__(self, base: Lazy):
        if len(base.shape) != 2:
            raise ValueError("Transpose needs a 2-D tensor")
        self.base = base
        self.shape = (base.shape[1], base.shape[0])
        self.dtype = base.dtype
        self._cache: torch.Tensor | None = None

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if self._cache is None:
            self._cache = self.base.full().t().contiguous()
        out = self._cache[start:stop]
        if stop >= self.shape[0]:
            self._cache = None
        return out


class Stack(Lazy):
    """A new leading dim over equally shaped tensors (e.g. experts)."""

    def __init__(self, parts: Sequence[Lazy]):
        self.parts = list(parts)
        for p in parts:
            if p.shape != parts[0].shape:
                raise ExportError(f"cannot stack {list(parts)}: shapes disagree")
        self.shape = (len(parts), *parts[0].shape)
        self.dtype = parts[0].dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return torch.stack([self.parts[i].full() for i in range(start, stop)])


class Unstack(Lazy):
    """Index ``i`` of a lazy tensor's leading dim (e.g. one expert of ``[E, ...]``)."""

    def __init__(self, base: Lazy, index: int):
        self.base = base
        self.index = index
        self.shape = base.shape[1:]
        self.dtype = base.dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if isinstance(self.base, Region):
            return self.base.stored.read(self.base.prefix + (self.index, slice(start, stop)))
        return self.base.rows(self.index, self.index + 1)[0, start:stop]

    def byte_source(self, start: int, stop: int) -> list[tuple[Path, int, int]] | None:
        if isinstance(self.base, Region):
            return self.base.stored.byte_ranges(self.base.prefix + (self.index, slice(start, stop)))
        return None


class Cols(Lazy):
    """Columns ``[start, start + length)`` of dim 1 (one rank's piece of a row-parallel weight)."""

    def __init__(self, base: Lazy, start: int, length: int):
        if len(base.shape) < 2 or start < 0 or start + length > base.shape[1]:
            raise ExportError(f"columns {start}+{length} do not fit {base}")
        self.base, self.start, self.length = base, start, length
        self.shape = (base.shape[0], length, *base.shape[2:])
        self.dtype = base.dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.base.rows(start, stop)[:, self.start : self.start + self.length]
