"""`tritonize warmup REPO`: the kernels the engine compiles at start, written into the repository once.

For each engine model version (all of them, or the one asked for) this runs the repository's own engine
model once, outside any server, in a process of its own (``runtime/warm.py``'s ``main``: ``initialize`` with
the arguments Triton would give it, then ``finalize``), with an empty Triton kernel cache; what it compiled
becomes ``<name>_engine/<version>/warm/`` (``kernels/`` and ``warm.json``), listed and hashed in
tritonize.json under ``hashes.warm``. Servers on the same kind of GPU, with the same torch, triton and runtime
code, then start without compiling (the engine model logs which way it went).

On a CPU nothing is compiled (the model runs on PyTorch's own kernels): the folder then holds its metadata
only, which a server on a CPU recognises. Writing it anyway keeps one path for every machine, and the
command says so in its last line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2

from ..errors import TritonizeError
from ..runtime.warm import KERNELS, META, WARM_DIR
from .layout import REPOSITORY_MANIFEST
from .manifest import hash_tree
from .render import RUNTIME_PACKAGE, model_versions, parse_config, read_manifest

BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
        f"from {RUNTIME_PACKAGE}.warm import main; sys.exit(main(sys.argv[1:]))")
_LAST_LINES = 20


@dataclass(frozen=True)
class Warmed:
    model: str
    version: str
    folder: Path
    kernels: int
    size: int  # bytes
    device: str
    load_s: float


def _engine_args(repo: Path, name: str, version: str) -> dict[str, str]:
    """What Triton hands the engine model's ``initialize`` for ``version`` (its first instance)."""
    folder = repo / f"{name}_engine"
    config = parse_config((folder / "config.pbtxt").read_text(encoding="utf-8"))
    gpu = any(group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU for group in config.instance_group)
    return {
        "model_config": json_format.MessageToJson(config, preserving_proto_field_name=True),
        "model_repository": str(folder), "model_version": version, "model_name": f"{name}_engine",
        "model_instance_kind": "GPU" if gpu else "CPU", "model_instance_device_id": "0",
        "model_instance_name": f"{name}_engine_0_0",
    }


def _pick(manifest: dict, model: str | None, version: int | None) -> list[tuple[str, str, dict]]:
    models = manifest["models"]
    if model is not None and model not in models:
        raise TritonizeError(f"model {model!r} is not in this repository (it has: {', '.join(sorted(models))})")
    picked = []
    for name in [model] if model is not None else sorted(models):
        versions = model_versions(models[name])
        if version is not None and str(version) not in versions:
            raise TritonizeError(f"{name} has no version {version} (it has: {', '.join(sorted(versions, key=int))})")
        for v in [str(version)] if version is not None else sorted(versions, key=int):
            picked.append((name, v, versions[v]))
    return picked


def _run(repo: Path, name: str, version: str, staging: Path, python: str, note: Callable[[str], None]) -> None:
    vdir = repo / f"{name}_engine" / version
    args = json.dumps(_engine_args(repo, name, version))
    process = subprocess.Popen([python, "-c", BOOT, str(vdir), args, str(staging)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    last: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        line = line.rstrip("\n")
        last = (last + [line])[-_LAST_LINES:]
        if line.startswith("I tritonize: ") or line.startswith(("W tritonize: ", "E tritonize: ")):
            note("  " + line[len("I tritonize: "):])
    if process.wait() != 0:
        reason = next((text for text in reversed(last) if text.strip() and not text.startswith(" ")), "no output")
        raise TritonizeError(f"the engine of {name} version {version} did not load, so nothing was written: "
                             f"{reason.strip()}")


def _record(repo: Path, name: str, version: str, hashes: dict[str, str] | None) -> None:
    """tritonize.json with ``hashes.warm`` of one version set (None: removed), written atomically."""
    manifest = read_manifest(repo)
    entry = manifest["models"][name]
    versions = {v: dict(fields) for v, fields in model_versions(entry).items()}
    fields = versions[version]
    fields["hashes"] = {k: v for k, v in dict(fields.get("hashes", {})).items() if k != "warm"}
    if hashes is not None:
        fields["hashes"]["warm"] = hashes
    newest = versions[max(versions, key=int)]
    manifest["models"][name] = {**newest, "versions": dict(sorted(versions.items(), key=lambda kv: int(kv[0])))}
    fd, tmp = tempfile.mkstemp(prefix=f".{REPOSITORY_MANIFEST}.", dir=repo)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, repo / REPOSITORY_MANIFEST)


def warm_up_repository(repo: str | Path, *, model: str | None = None, version: int | None = None,
                       python: str | None = None, note: Callable[[str], None] = print) -> list[Warmed]:
    """Writes the warm artifacts of each engine model version picked; see the module docstring."""
    repo = Path(repo).expanduser().resolve()
    manifest = read_manifest(repo) if repo.is_dir() else None
    if manifest is None:
        raise TritonizeError(f"{repo} is not a tritonize repository (no {REPOSITORY_MANIFEST}): pass the directory "
                             "`tritonize generate` wrote")
    done = []
    for name, v, fields in _pick(manifest, model, version):
        runtime = fields.get("options", {}).get("runtime", "torch")
        if runtime not in ("torch", "auto"):
            raise TritonizeError(f"{name} runs the {runtime} runtime, which compiles what it needs itself: warm "
                                 "artifacts hold the torch runtime's kernels")
        vdir = repo / f"{name}_engine" / v
        if not (vdir / "model.py").is_file() or not (vdir / RUNTIME_PACKAGE).is_dir():
            raise TritonizeError(f"{vdir} has no model.py or {RUNTIME_PACKAGE}/: run `tritonize generate` again")
        note(f"{name} version {v}: loading the engine once to compile its kernels")
        staging = Path(tempfile.mkdtemp(prefix=".warm-", dir=vdir))
        try:
            _run(repo, name, v, staging, python or sys.executable, note)
            meta = json.loads((staging / META).read_text(encoding="utf-8"))
            target = vdir / WARM_DIR
            old = vdir / ".warm-old"
            shutil.rmtree(old, ignore_errors=True)
            if target.exists():
                os.rename(target, old)
            os.rename(staging, target)
            os.chmod(target, 0o755)  # a temporary directory's 0700: servers may run as another user
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        hashes = hash_tree(target)
        _record(repo, name, v, hashes)
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        kernels = len([p for p in (target / KERNELS).iterdir() if p.is_dir()]) if (target / KERNELS).is_dir() else 0
        done.append(Warmed(name, v, target, kernels, size, meta.get("device", "?"), float(meta.get("load_s", 0))))
    return done
