"""Read-only access to a checkpoint's files, whether they sit in a directory or inside a tar.

A ``.nemo`` or ``.qnemo`` file is a plain (sometimes gzip) tar. Extracting a 16 GB tar first
would double the disk and the time, so an uncompressed tar is read in place: every member is a
contiguous byte range of the tar, and :class:`FileView` exposes such a range as a seekable file.
A gzip tar cannot be seeked, so it is decompressed once into a scratch file and then read the
same way.

Paths inside a checkpoint come from untrusted metadata (DCP storage records, ``nemo:`` tokenizer
references), so every relative path is normalised and may not leave the tree.
"""

from __future__ import annotations

import gzip
import io
import os
import posixpath
import shutil
import tarfile
from pathlib import Path
from typing import BinaryIO

from ..errors import ExportError


def clean_relpath(rel: str) -> str:
    """Normalises a checkpoint-relative path; refuses absolute paths and ``..``."""
    rel = str(rel).replace("\\", "/")
    norm = posixpath.normpath(rel.lstrip("/")) if rel not in ("", ".", "./") else ""
    if norm == ".":
        norm = ""
    if rel.startswith("/") or norm.startswith("..") or "/../" in f"/{norm}/":
        raise ExportError(f"checkpoint refers to a path outside itself: {rel!r}")
    return norm


class FileView(io.RawIOBase):
    """A seekable, read-only window ``[start, start + length)`` of an open file."""

    def __init__(self, path: Path, start: int, length: int):
        super().__init__()
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._start = start
        self._length = length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._length - self._pos))
        if n == 0:
            return 0
        self._file.seek(self._start + self._pos)
        got = self._file.readinto(view[:n])
        self._pos += got
        return got

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


class Tree:
    """The files of a checkpoint, addressed by relative POSIX paths."""

    name: str = ""

    def files(self) -> list[str]:
        raise NotImplementedError

    def size(self, rel: str) -> int:
        raise NotImplementedError

    def open(self, rel: str) -> BinaryIO:
        raise NotImplementedError

    def locate(self, rel: str) -> tuple[Path, int, int]:
        """(file on disk, byte offset, length) of a member: lets readers use plain positional reads."""
        raise NotImplementedError

    def is_file(self, rel: str) -> bool:
        return clean_relpath(rel) in self._file_set()

    def is_dir(self, rel: str) -> bool:
        rel = clean_relpath(rel)
        if rel == "":
            return True
        prefix = rel + "/"
        return any(f.startswith(prefix) for f in self._file_set())

    def list(self, rel: str = "") -> list[str]:
        """Names of the immediate children (files and directories) of ``rel``."""
        rel = clean_relpath(rel)
        prefix = rel + "/" if rel else ""
        out = {f[len(prefix):].split("/", 1)[0] for f in self._file_set() if f.startswith(prefix)}
        return sorted(out)

    def read_bytes(self, rel: str) -> bytes:
        with self.open(rel) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        try:
            return self.read_bytes(rel).decode("utf-8")
        except UnicodeDecodeError:
            raise ExportError(f"{self.name}: {rel} is not UTF-8 text") from None

    def sub(self, rel: str) -> SubTree:
        return SubTree(self, clean_relpath(rel))

    def _file_set(self) -> set[str]:
        cache = getattr(self, "_files_cache", None)
        if cache is None:
            cache = set(self.files())
            self._files_cache = cache
        return cache

    def close(self) -> None:
        pass

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DirTree(Tree):
    def __init__(self, root: Path):
        self.root = Path(root)
        self.name = self.root.name

    def files(self) -> list[str]:
        out = []
        for dirpath, _dirs, names in os.walk(self.root, followlinks=True):
            for n in names:
                full = Path(dirpath) / n
                if full.is_file():
                    out.append(full.relative_to(self.root).as_posix())
        return out

    def _path(self, rel: str) -> Path:
        return self.root / clean_relpath(rel)

    def is_file(self, rel: str) -> bool:
        return self._path(rel).is_file()

    def is_dir(self, rel: str) -> bool:
        return self._path(rel).is_dir()

    def list(self, rel: str = "") -> list[str]:
        p = self._path(rel)
        return sorted(c.name for c in p.iterdir()) if p.is_dir() else []

    def size(self, rel: str) -> int:
        return self._path(rel).stat().st_size

    def open(self, rel: str) -> BinaryIO:
        try:
            return open(self._path(rel), "rb")  # noqa: SIM115
        except OSError as e:
            raise ExportError(f"{self.name}: cannot read {rel}: {e.strerror}") from None

    def locate(self, rel: str) -> tuple[Path, int, int]:
        p = self._path(rel)
        if not p.is_file():
            raise ExportError(f"{self.name}: {rel} is missing")
        return p, 0, p.stat().st_size


class TarTree(Tree):
    """Members of an uncompressed tar, read in place."""

    def __init__(self, path: Path, display_name: str | None = None):
        self.path = Path(path)
        self.name = display_name or self.path.name
        total = self.path.stat().st_size
        self._members: dict[str, tuple[int, int]] = {}
        try:
            with tarfile.open(self.path, "r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    rel = clean_relpath(m.name)
                    if m.offset_data + m.size > total:
                        raise ExportError(
                            f"{self.name} is truncated: member {rel} ends past the end of the file; "
                            "copy the checkpoint again"
                        )
                    self._members[rel] = (m.offset_data, m.size)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ExportError(f"{self.name} is not a readable tar ({e}); the file is corrupt or truncated") from None
        if not self._members:
            raise ExportError(f"{self.name} is an empty tar")

    def files(self) -> list[str]:
        return list(self._members)

    def size(self, rel: str) -> int:
        return self._member(rel)[1]

    def _member(self, rel: str) -> tuple[int, int]:
        rel = clean_relpath(rel)
        if rel not in self._members:
            raise ExportError(f"{self.name}: {rel} is missing")
        return self._members[rel]

    def open(self, rel: str) -> BinaryIO:
        start, length = self._member(rel)
        return io.BufferedReader(FileView(self.path, start, length))  # type: ignore[return-value]

    def locate(self, rel: str) -> tuple[Path, int, int]:
        start, length = self._member(rel)
        return self.path, start, length


class SubTree(Tree):
    """A directory inside another tree, addressed relative to itself."""

    def __init__(self, parent: Tree, prefix: str):
        self.parent = parent
        self.prefix = prefix
        self.name = f"{parent.name}/{prefix}" if prefix else parent.name

    def _full(self, rel: str) -> str:
        rel = clean_relpath(rel)
        return f"{self.prefix}/{rel}" if self.prefix and rel else (self.prefix or rel)

    def files(self) -> list[str]:
        p = self.prefix + "/" if self.prefix else ""
        return [f[len(p):] for f in self.parent.files() if f.startswith(p)]

    def is_file(self, rel: str) -> bool:
        return self.parent.is_file(self._full(rel))

    def is_dir(self, rel: str) -> bool:
        return self.parent.is_dir(self._full(rel))

    def list(self, rel: str = "") -> list[str]:
        return self.parent.list(self._full(rel))

    def size(self, rel: str) -> int:
        return self.parent.size(self._full(rel))

    def open(self, rel: str) -> BinaryIO:
        return self.parent.open(self._full(rel))

    def locate(self, rel: str) -> tuple[Path, int, int]:
        return self.parent.locate(self._full(rel))


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def open_tree(source: Path, scratch: Path) -> Tree:
    """A directory as itself; a tar in place; a gzip tar decompressed into ``scratch`` first."""
    source = Path(source)
    if source.is_dir():
        return DirTree(source)
    if not source.is_file():
        raise ExportError(f"{source} does not exist")
    if _is_gzip(source):
        plain = scratch / (source.name + ".tar")
        try:
            with gzip.open(source, "rb") as src, open(plain, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise ExportError(f"{source.name} is a corrupt or truncated gzip file ({e})") from None
        return TarTree(plain, display_name=source.name)
    if not tarfile.is_tarfile(source):
        raise ExportError(
            f"{source.name} is neither a directory nor a tar archive; expected a .nemo/.qnemo tar "
            "or a checkpoint directory"
        )
    return TarTree(source)
