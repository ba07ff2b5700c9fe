"""Warm artifacts: what the engine compiles at start, kept in the repository so that every replica starts warm.

The torch runtime compiles nothing with torch.compile. On CUDA it compiles its Triton-language kernels
(cuda_kernels.py) at the profiling step and while it captures the CUDA graphs, and Triton keeps what it
compiled in its kernel cache (``$TRITON_CACHE_DIR``, default ``~/.triton/cache``), content-addressed. A new
machine, pod or container starts with that cache empty. ``tritonize warmup REPO`` loads the engine once with
an empty cache of its own and keeps the result in the engine's version folder::

    <name>_engine/<version>/warm/warm.json     what it was compiled on: device, torch, triton, runtime code
    <name>_engine/<version>/warm/kernels/...   Triton's kernel cache as it was left

``tritonize.json`` lists and hashes the files (``validate`` checks them). At load, ``use_warm_artifacts``
compares ``warm.json`` with this machine and, when the device, torch, triton and the runtime code all match,
copies the kernels into Triton's cache (a writable one: the repository may be mounted read-only), so the
start compiles nothing. Either way it returns the one line the engine model logs. A GPU of another kind,
another torch or triton, or other runtime code falls back to compiling (Triton's cache is keyed by content,
so a stale entry could never be used wrongly; the check keeps a mismatch visible instead of silent).
``TRITONIZE_WARM_ARTIFACTS=off`` ignores them.

``main`` is what ``tritonize warmup`` runs, in a process of its own, from the repository's copy of this
package: it imports the engine model's ``model.py`` with ``offline_backend_utils`` in place of Triton's
module and runs its ``initialize`` and ``finalize``, so the kernels compiled are exactly the server's.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

__all__ = ["KERNELS", "META", "SWITCH", "WARM_DIR", "code_version", "main", "this_machine", "use_warm_artifacts"]

WARM_DIR = "warm"
META = "warm.json"
KERNELS = "kernels"
SWITCH = "TRITONIZE_WARM_ARTIFACTS"
WRITING = "writing"  # the value ``main`` sets: tritonize warmup is writing them
MATCHED = ("device", "torch", "triton", "runtime")
_SKIPPED = ("__pycache__", "triton", "CONTRACT.md")  # what a repository's copy of the runtime leaves out


def code_version(package: Path | None = None) -> str:
    """A hash of the runtime package's source: the same for tritonize's own and a repository's copy."""
    root = Path(package or Path(__file__).resolve().parent)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if rel.parts[0] in _SKIPPED or "__pycache__" in rel.parts or path.suffix == ".pyc":
            continue
        digest.update(rel.as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _package_version(*names: str) -> str | None:
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    return None


def this_machine(device: str) -> dict[str, str | None]:
    """What warm artifacts must match: the device (a GPU's name and compute capability, or "cpu"), the torch
    and triton versions, and the runtime code."""
    import torch

    kind = str(device)
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    name = "cpu"
    if kind.startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(kind)
        index = dev.index if dev.index is not None else 0
        major, minor = torch.cuda.get_device_capability(index)
        name = f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"
    return {"device": name, "torch": torch.__version__, "triton": _package_version("triton", "pytorch-triton"),
            "runtime": code_version()}


def _describe(env: dict[str, Any], keys: tuple[str, ...]) -> str:
    words = {"device": "{}", "torch": "torch {}", "triton": "triton {}", "runtime": "runtime code {}"}
    return ", ".join(words[k].format(env.get(k) or "none") for k in keys)


def _kernel_entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _triton_cache_dir() -> Path:
    return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache").expanduser()


def _group_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("__grp__*"))


def _relocate_groups(folder: Path, where: Path | None) -> None:
    """Points the group files of one kernel's cache folder at ``where`` (None: bare file names).

    Some Triton versions record a kernel's files in its ``__grp__`` file by absolute path (``child_paths``
    a mapping) and treat a kernel whose paths are gone as not cached; others record names (a list), which
    move with the folder as they are.
    """
    for group in _group_files(folder):
        try:
            data = json.loads(group.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        children = data.get("child_paths") if isinstance(data, dict) else None
        if not isinstance(children, dict):
            continue
        data["child_paths"] = {name: Path(path).name if where is None else str(where / Path(path).name)
                               for name, path in children.items()}
        group.write_text(json.dumps(data), encoding="utf-8")


def _copy_into(entries: list[Path], cache: Path) -> None:
    """Each kernel's folder into ``cache`` (skipped when there), under a temporary name first."""
    cache.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        target = cache / entry.name
        if target.exists():
            continue
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=cache))
        try:
            shutil.copytree(entry, staging / entry.name)
            _relocate_groups(staging / entry.name, target)
            with contextlib.suppress(OSError):  # another process put it there first
                os.rename(staging / entry.name, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def use_warm_artifacts(version_dir: str | Path, device: str) -> str:
    """Puts the version folder's warm kernels into Triton's cache when they were compiled for this machine;
    returns the line to log, whatever happened."""
    folder = Path(version_dir) / WARM_DIR
    if os.environ.get(SWITCH) == WRITING:
        return f"warm artifacts: compiling into an empty cache for `tritonize warmup` ({_triton_cache_dir()})"
    if os.environ.get(SWITCH, "").lower() in ("off", "0", "false", "no"):
        return f"warm artifacts: off ({SWITCH}={os.environ[SWITCH]}): compiling"
    if not (folder / META).is_file():
        return f"warm artifacts: none in {folder} (`tritonize warmup REPO` writes them): compiling"
    here = this_machine(device)
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return f"warm artifacts in {folder} are unreadable ({exc}): compiling"
    differ = tuple(k for k in MATCHED if meta.get(k) != here.get(k))
    if differ:
        return f"warm artifacts are for {_describe(meta, differ)}, this is {_describe(here, differ)}: compiling"
    entries = _kernel_entries(folder / KERNELS)
    cache = _triton_cache_dir()
    try:
        _copy_into(entries, cache)
    except OSError:  # e.g. a read-only home: a cache of this process's own
        cache = Path(tempfile.mkdtemp(prefix="tritonize-triton-cache-"))
        _copy_into(entries, cache)
        os.environ["TRITON_CACHE_DIR"] = str(cache)
    what = f"{len(entries)} compiled kernels" if entries else "no compiled kernels (nothing compiles here)"
    return (f"using warm artifacts from {folder}: {what} for {_describe(here, ('device',))}, "
            f"made {meta.get('created', '?')}; Triton's cache: {cache}")


# -- tritonize warmup ---------------------------------------------------------------------------


def offline_backend_utils() -> types.ModuleType:
    """What the engine model's ``initialize`` and ``finalize`` use of ``triton_python_backend_utils``, for
    running them outside a server: log lines go to stderr, metrics nowhere."""
    module = types.ModuleType("triton_python_backend_utils")

    def log(level: str) -> Any:
        return lambda message: print(f"{level} {message}", file=sys.stderr, flush=True)

    module.Logger = types.SimpleNamespace(log_info=log("I"), log_warn=log("W"), log_error=log("E"),
                                          log_verbose=log("V"))

    class _Metric:
        def increment(self, value: float) -> None: ...

        def set(self, value: float) -> None: ...

        def observe(self, value: float) -> None: ...

    class MetricFamily:
        COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

        def __init__(self, name: str, description: str, kind: str) -> None:
            self.name = name

        def Metric(self, labels: dict | None = None, buckets: list | None = None) -> _Metric:  # noqa: N802 - Triton's name
            return _Metric()

    class TritonError(Exception):
        def message(self) -> str:
            return str(self)

    module.MetricFamily = MetricFamily
    module.TritonError = TritonError
    module.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    return module


def main(argv: list[str]) -> int:
    """``VERSION_DIR ARGS_JSON OUT_DIR``: runs the engine model of VERSION_DIR once (``initialize`` with Triton's
    ARGS_JSON, then ``finalize``) with an empty kernel cache at OUT_DIR/kernels, then writes OUT_DIR/warm.json."""
    import importlib.util

    version_dir, args_json, out_dir = Path(argv[0]), argv[1], Path(argv[2])
    kernels = out_dir / KERNELS
    kernels.mkdir(parents=True, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = str(kernels)
    os.environ[SWITCH] = WRITING  # compile everything into the empty cache
    sys.modules["triton_python_backend_utils"] = offline_backend_utils()
    spec = importlib.util.spec_from_file_location("model", version_dir / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = json.loads(args_json)
    model = module.TritonPythonModel()
    started = time.monotonic()
    model.initialize(args)
    took = time.monotonic() - started
    device = str(getattr(model.engine, "device", "cpu"))
    model.finalize()
    for entry in _kernel_entries(kernels):  # no path of this machine in what is kept
        _relocate_groups(entry, None)
    meta = {**this_machine(device), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_s": round(took, 2), "kernels": len(_kernel_entries(kernels))}
    (out_dir / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return 0
