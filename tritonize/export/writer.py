"""Streaming safetensors writer: shard by shard, tensor by tensor, block by block.

A safetensors file starts with a JSON header giving every tensor's dtype, shape and byte range,
so once the shapes are known (they are, from the lazy tensors) the header can be written first
and each tensor's bytes appended as its row blocks are produced. Nothing larger than one block
(plus whatever the source format forces a reader to hold) is ever in memory.

Most rows of most exports are bytes that already sit, unchanged, in a source file (same dtype,
a contiguous run of a stored tensor): those are copied file to file with ``copy_file_range``, so
they never pass through Python. The SHA-256 of each shard is computed by a second thread that
reads back what was written, overlapping with the copying.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ExportError
from .lazy import Lazy
from .stored import FILES, SAFETENSORS_NAMES

DEFAULT_SHARD_BYTES = 2 << 30
DEFAULT_BLOCK_BYTES = 64 << 20


@dataclass
class WrittenFiles:
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    weight_map: dict[str, str] = field(default_factory=dict)  # tensor -> file name
    total_bytes: int = 0


def _nbytes(t: Lazy, dtype: torch.dtype) -> int:
    return math.prod(t.shape) * dtype.itemsize


def plan_shards(tensors: list[tuple[str, Lazy]], dtype_of: Callable[[str, Lazy], torch.dtype],
                max_shard_bytes: int) -> list[list[tuple[str, Lazy]]]:
    shards: list[list[tuple[str, Lazy]]] = [[]]
    size = 0
    for name, t in tensors:
        n = _nbytes(t, dtype_of(name, t))
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += n
    return shards


def _header(entries: list[tuple[str, Lazy]], dtype_of: Callable[[str, Lazy], torch.dtype]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, t in entries:
        dt = dtype_of(name, t)
        if dt not in SAFETENSORS_NAMES:
            raise ExportError(f"cannot write {name}: dtype {dt} has no safetensors name")
        n = _nbytes(t, dt)
        header[name] = {"dtype": SAFETENSORS_NAMES[dt], "shape": list(t.shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def stream_tensor(name: str, t: Lazy, dtype: torch.dtype, block_bytes: int):
    """Yields ``t`` as row blocks of about ``block_bytes``: file ranges to copy verbatim when the
    rows are stored as they must be written, contiguous ``dtype`` tensors otherwise."""
    rows = t.nrows
    row_bytes = max(1, t.row_numel * max(dtype.itemsize, t.dtype.itemsize))
    step = max(1, block_bytes // row_bytes)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        ranges = t.byte_source(a, b) if t.dtype == dtype else None
        if ranges is not None:
            yield ranges
            continue
        block = t.rows(a, b)
        want = (b - a, *t.shape[1:]) if t.shape else ()
        if tuple(block.shape) != tuple(want):
            raise ExportError(f"{name}: produced a block of shape {list(block.shape)}, expected {list(want)}; "
                              "the checkpoint's tensors do not match its config")
        yield block.to(dtype).contiguous()


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _copy_range(src: Path, offset: int, length: int, dst_fd: int) -> None:
    """``length`` bytes of ``src`` at ``offset`` appended to ``dst_fd``, in the kernel when it can."""
    src_fd = FILES.get(src).fileno()
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src_fd, dst_fd, length - done, offset + done)
            if n == 0:
                raise ExportError(f"{src.name} is truncated: wanted {length} bytes at offset {offset}")
            done += n
        return
    except (AttributeError, OSError) as e:
        if isinstance(e, ExportError):
            raise
    buf = bytearray(min(16 << 20, length - done) or 1)  # file systems without copy_file_range
    view = memoryview(buf)
    while done < length:
        n = os.preadv(src_fd, [view[: min(len(buf), length - done)]], offset + done)
        if n == 0:
            raise ExportError(f"{src.name} is truncated: wanted {length} bytes at offset {offset}")
        _write_all(dst_fd, view[:n])
        done += n


class _Hasher(threading.Thread):
    """SHA-256 of written files, computed from (file, offset, length) notices in write order."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.jobs: queue.Queue = queue.Queue()
        self.digests: dict[Path, str] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        current: tuple[Path, object, object] | None = None
        buf = bytearray(16 << 20)
        view = memoryview(buf)
        try:
            while True:
                job = self.jobs.get()
                if job is None:
                    return
                path, offset, length = job
                if current is None or current[0] != path:
                    current = (path, open(path, "rb"), hashlib.sha256())  # noqa: SIM115 - closed below
                _path, f, digest = current
                done = 0
                while done < length:
                    n = os.preadv(f.fileno(), [view[: min(len(buf), length - done)]], offset + done)
                    if n == 0:
                        raise OSError(f"{path} shrank while being hashed")
                    digest.update(view[:n])
                    done += n
                if length == 0:  # end of file marker
                    self.digests[path] = digest.hexdigest()
                    f.close()
                    current = None
        except BaseException as e:  # noqa: BLE001 - handed to the writer thread in finish()
            self.error = e

    def add(self, path: Path, offset: int, length: int) -> None:
        if length:
            self.jobs.put((path, offset, length))

    def close_file(self, path: Path) -> None:
        self.jobs.put((path, 0, 0))

    def finish(self) -> dict[Path, str]:
        self.jobs.put(None)
        self.join()
        if self.error is not None:
            raise ExportError(f"hashing the written files failed: {self.error}")
        return self.digests


def write_safetensors(
    out_dir: Path,
    tensors: list[tuple[str, Lazy]],
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    prefix: str = "model",
    progress: Callable[[int], None] | None = None,
    index: bool = True,
    keep_dtype: set[str] | frozenset[str] = frozenset(),
) -> WrittenFiles:
    """Writes ``prefix-0000i-of-0000n.safetensors`` (+ ``prefix.safetensors.index.json``), or a single
    ``prefix.safetensors`` with ``index=False``; floating-point tensors are cast to ``dtype``, except those
    named in ``keep_dtype`` (FP8 weights and their float32 scales)."""

    def dtype_of(name: str, t: Lazy) -> torch.dtype:
        if name in keep_dtype:
            return t.dtype
        return dtype if dtype is not None and t.dtype.is_floating_point else t.dtype

    names = [n for n, _ in tensors]
    if len(set(names)) != len(names):
        raise ExportError("internal error: two output tensors share a name")
    shards = plan_shards(tensors, dtype_of, max_shard_bytes)
    if not index and len(shards) > 1:
        raise ExportError("internal error: an unindexed safetensors file cannot be sharded")
    result = WrittenFiles()
    hasher = _Hasher()
    hasher.start()
    try:
        for i, entries in enumerate(shards):
            fname = f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" if index else f"{prefix}.safetensors"
            path = out_dir / fname
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                head = _header(entries, dtype_of)
                _write_all(fd, memoryview(head))
                hasher.add(path, 0, len(head))
                pos = len(head)
                for name, t in entries:
                    expected = _nbytes(t, dtype_of(name, t))
                    written = 0
                    for block in stream_tensor(name, t, dtype_of(name, t), block_bytes):
                        if isinstance(block, list):
                            n = 0
                            for src, offset, length in block:
                                _copy_range(src, offset, length, fd)
                                n += length
                        else:
                            data = memoryview(block.reshape(-1).view(torch.uint8).numpy())
                            _write_all(fd, data)
                            n = len(data)
                        hasher.add(path, pos, n)
                        pos += n
                        written += n
                        if progress:
                            progress(n)
                    if written != expected:
                        raise ExportError(f"{name}: wrote {written} bytes, expected {expected}")
                    result.weight_map[name] = fname
                    result.total_bytes += written
            finally:
                os.close(fd)
            hasher.close_file(path)
            result.files[fname] = ""
    finally:
        digests = hasher.finish()
    for fname in result.files:
        result.files[fname] = digests[out_dir / fname]
    if index:
        idx = {"metadata": {"total_size": result.total_bytes}, "weight_map": result.weight_map}
        (out_dir / f"{prefix}.safetensors.index.json").write_text(json.dumps(idx, indent=2) + "\n")
    return result
