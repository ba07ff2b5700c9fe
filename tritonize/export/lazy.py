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
from dataclasses import dataclass
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


# --------------------------------------------------------------------------------------------------
# FP8 weights: read as their dequantized values by default, kept as FP8 + scales by writers that can
# --------------------------------------------------------------------------------------------------


class Quantized(Lazy):
    """An FP8 weight with its scale, read as ``fp8 * scale`` in ``dtype`` (so every writer that knows nothing of
    FP8 gets the dequantized weight). ``scale``: a scalar (per tensor), ``[rows]`` (per output row) or a block
    grid ``[ceil(rows / b0), ceil(cols / b1)]`` with ``block``; ``input_scale``: the static activation scale
    (a scalar lazy) or None. ``fp8_parts`` takes the FP8 bytes and scales back out, through row rearrangements."""

    def __init__(self, base: Lazy, scale: Lazy, dtype: torch.dtype, block: tuple[int, int] | None = None,
                 input_scale: Lazy | None = None):
        self.base, self.scale, self.block, self.input_scale = base, scale, block, input_scale
        self.shape, self.dtype = base.shape, dtype
        n = math.prod(scale.shape) if scale.shape else 1
        if block is None and n not in (1, base.nrows):
            raise ExportError(f"FP8 scale with {n} values does not fit a {list(base.shape)} weight")
        if block is not None and len(base.shape) != 2:
            raise ExportError(f"block-scaled FP8 weight of shape {list(base.shape)} is not 2-D")
        self._scale: torch.Tensor | None = None

    def scales(self) -> torch.Tensor:
        if self._scale is None:
            self._scale = self.scale.full().float()
        return self._scale

    def rows(self, start: int, stop: int) -> torch.Tensor:
        w = self.base.rows(start, stop).float()
        s = self.scales()
        if self.block is not None:
            b0, b1 = self.block
            grid = s.repeat_interleave(b0, dim=0)[start:stop].repeat_interleave(b1, dim=1)[:, : w.shape[1]]
            return (w * grid).to(self.dtype)
        if s.numel() == 1:
            return (w * s.reshape(())).to(self.dtype)
        return (w * s.reshape(-1)[start:stop].reshape(-1, *([1] * (w.dim() - 1)))).to(self.dtype)


class QuantizedRows(Lazy):
    """Per-row FP8 of a float lazy tensor (``runtime.quantize.quantize_per_channel``, row block by row block):
    ``weight`` gives the FP8 rows, ``scale`` their float32 scales."""

    def __init__(self, base: Lazy):
        from ..runtime.quantize import FP8

        if len(base.shape) != 2:
            raise ExportError(f"only 2-D weights are quantized per row, not {list(base.shape)}")
        self.base = base
        self.shape, self.dtype = base.shape, FP8
        self.scale = _RowScales(base)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        from ..runtime.quantize import quantize_per_channel

        return quantize_per_channel(self.base.rows(start, stop))[0]


class _RowScales(Lazy):
    def __init__(self, base: Lazy):
        self.base = base
        self.shape, self.dtype = (base.shape[0],), torch.float32

    def rows(self, start: int, stop: int) -> torch.Tensor:
        from ..runtime.quantize import quantize_per_channel

        return quantize_per_channel(self.base.rows(start, stop))[1]


def quantize_rows(weight: Lazy) -> Quantized:
    """``weight`` quantized to FP8 per output row, as a Quantized lazy (read back as its dequantized value)."""
    q = QuantizedRows(weight)
    return Quantized(q, q.scale, weight.dtype)


@dataclass
class Fp8Parts:
    """What a writer keeps of an FP8 weight: its FP8 bytes, its scale (a scalar, ``[rows]``, or a block grid)
    and its static input scale (None: dynamic activations)."""

    weight: Lazy
    scale: Lazy
    block: tuple[int, int] | None
    input_scale: Lazy | None


class Broadcast(Lazy):
    """A scalar lazy as ``[rows]`` (a per-tensor scale where per-row ones are needed)."""

    def __init__(self, scalar: Lazy, rows: int):
        self.scalar, self.shape, self.dtype = scalar, (rows,), torch.float32

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.scalar.full().float().reshape(1).expand(stop - start).clone()


class _MaxOf(Lazy):
    """The largest of several scalar lazies (the static input scale of rows gathered from several linears)."""

    def __init__(self, parts: Sequence[Lazy]):
        self.parts, self.shape, self.dtype = list(parts), (), torch.float32

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return torch.stack([p.full().float().reshape(()) for p in self.parts]).max()


def is_scalar(t: Lazy) -> bool:
    """One value (shape ``[]`` or ``[1]``): a per-tensor scale."""
    return math.prod(t.shape) == 1


def _per_row(parts: Fp8Parts, rows: int) -> Lazy:
    return Broadcast(parts.scale, rows) if is_scalar(parts.scale) else parts.scale


def fp8_parts(t: Lazy) -> Fp8Parts | None:
    """The FP8 bytes and scales behind ``t``, through the row rearrangements the readers build (row segments of
    fused tensors, one expert of a stack); None when ``t`` is not (all) FP8 or its scales cannot follow."""
    if isinstance(t, Quantized):
        return Fp8Parts(t.base, t.scale, t.block, t.input_scale)
    if isinstance(t, Rows):
        segments = []
        inputs = []
        for k, (base, start, length) in enumerate(t.segments):
            parts = fp8_parts(base)
            if parts is None:
                return None
            if parts.block is not None:  # whole blocks only (a partial one last, at the end of its tensor)
                last = k == len(t.segments) - 1
                if start % parts.block[0] or (length % parts.block[0] and not (last and start + length == base.nrows)):
                    return None
            segments.append((parts, start, length))
            inputs.append(parts.input_scale)
        blocks = {p.block for p, _, _ in segments}
        if len(blocks) != 1:
            return None
        block = blocks.pop()
        weight = Rows([(p.weight, s, n) for p, s, n in segments])
        if block is not None:
            scale = Rows([(p.scale, s // block[0], -(-n // block[0])) for p, s, n in segments])
        elif len({id(p.scale) for p, _, _ in segments}) == 1 and is_scalar(segments[0][0].scale):
            scale = segments[0][0].scale  # one per-tensor scale for all the rows
        else:
            scale = Rows([(_per_row(p, p.weight.nrows), s, n) for p, s, n in segments])
        input_scale = None if any(i is None for i in inputs) else (inputs[0] if len(inputs) == 1 else _MaxOf(inputs))
        return Fp8Parts(weight, scale, block, input_scale)
    if isinstance(t, Unstack):
        parts = fp8_parts(t.base)
        if parts is None or parts.block is not None:
            return None
        if is_scalar(parts.scale):
            scale = parts.scale
        elif len(parts.scale.shape) == 2:  # [experts, rows]
            scale = Unstack(parts.scale, t.index)
        else:
            return None
        return Fp8Parts(Unstack(parts.weight, t.index), scale, None, parts.input_scale)
    if isinstance(t, Cat1):
        parts = [fp8_parts(p) for p in t.parts]
        if any(p is None or p.block is not None for p in parts):
            return None
        values = [p.scale.full().float().reshape(-1) for p in parts]  # small: a scalar or one value per row each
        if not all(v.shape == values[0].shape and torch.equal(v, values[0]) for v in values):
            return None  # column pieces with different scales: no single scale per row fits
        inputs = [p.input_scale for p in parts]
        input_scale = None if any(i is None for i in inputs) else _MaxOf(inputs)
        return Fp8Parts(Cat1([p.weight for p in parts]), parts[0].scale, None, input_scale)
    return None
