"""tritonize.json: what made a repository, so it can be validated, reused or reproduced later."""

from __future__ import annotations

import hashlib
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from ..version import __version__

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .spec import RepoSpec

CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: Path, *, progress: bool = False, desc: str = "hashing") -> dict[str, str]:
    """sha256 of every file under ``root``, keyed by its path relative to ``root``."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in tqdm(files, desc=desc, unit="file", disable=not progress)
    }


def _versions() -> dict[str, str]:
    out = {"tritonize": __version__, "python": platform.python_version()}
    for name in ("torch", "tokenizers", "sentencepiece", "numpy"):
        module = sys.modules.get(name)
        try:
            module = module or __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except ImportError:
            continue
    return out


def quantization_record(spec: RepoSpec, ckpt: Checkpoint) -> dict[str, Any] | None:
    """What tritonize.json says about FP8: the weights the repository holds and how they came to be, and the KV
    cache the torch runtime will use (None when nothing is FP8)."""
    kv_fp8 = spec.kv_cache_dtype == "fp8" or (spec.kv_cache_dtype == "auto" and ckpt.fp8_kv_cache)
    if spec.runtime not in ("torch", "auto"):
        kv_fp8 = False  # the TensorRT-LLM runtimes: their own KV cache options, recorded with the rest
    if not (ckpt.fp8_weights or kv_fp8 or ckpt.conversion):
        return None
    scheme = ckpt.quantization
    return {
        "weights": "fp8" if ckpt.fp8_weights else (ckpt.dtype or "as stored"),
        "format": scheme.method if scheme and scheme.weights else None,
        "block": list(scheme.block) if scheme and scheme.block else None,
        "activations": ("static" if scheme.static_activations else "dynamic") if scheme and scheme.weights else None,
        "origin": ckpt.conversion or "the checkpoint's",
        "kv_cache": "fp8" if kv_fp8 else "model dtype",
    }


def build_manifest(spec: RepoSpec, ckpt: Checkpoint, repo: Path, *, progress: bool = False,
                   adapters: dict | None = None) -> dict[str, Any]:
    """``adapters``: the served LoRA adapters and p-tuning tables (listing and hashes are recorded)."""
    engine = repo / f"{spec.name}_engine" / str(spec.version) / "weights"
    tokenizer = repo / f"{spec.name}_preprocessing" / str(spec.version) / "tokenizer"
    hashes = {
        "engine": hash_tree(engine, progress=progress, desc="hashing weights"),
        "tokenizer": hash_tree(tokenizer),
    }
    if adapters:
        hashes["adapters"] = hash_tree(engine.parent / "adapters")
    if (engine.parent / "engine").is_dir():  # trtllm-engine: the TensorRT-LLM engine beside the weights
        hashes["trtllm_engine"] = hash_tree(engine.parent / "engine", progress=progress, desc="hashing engine")
    quantization = quantization_record(spec, ckpt)
    return {
        "format": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "models": {
            spec.name: {
                "options": spec.as_dict(),
                "checkpoint": {
                    "path": str((ckpt.converted_from or ckpt.path).resolve()),
                    "architecture": ckpt.architecture,
                    "dtype": ckpt.dtype,
                    "tokenizer": ckpt.tokenizer_kind,
                    "vocab_size": ckpt.vocab_size,
                    "end_ids": ckpt.end_ids,
                    "pad_id": ckpt.pad_id,
                },
                "hashes": hashes,
                **({"adapters": adapters} if adapters else {}),
                **({"quantization": quantization} if quantization else {}),
            }
        },
    }


# The modules the model files of a repository import, by what they serve, with the pip argument that
# installs each (numpy: Triton 2.51's Python backend mis-reads text tensors under numpy 2).
_INSTALL = {"numpy": "'numpy<2'", "torch": "torch", "safetensors": "safetensors", "tokenizers": "tokenizers",
            "sentencepiece": "sentencepiece"}
TRTLLM_INSTALL = "--extra-index-url https://pypi.nvidia.com tensorrt_llm"


def required_modules(manifest: dict | None) -> dict[str, str]:
    """Module -> pip argument for every module the Python models of a repository import (``manifest`` is its
    tritonize.json; None, a repository tritonize did not write: numpy, which every Python model needs)."""
    needed = {"numpy": _INSTALL["numpy"]}
    for entry in (manifest or {}).get("models", {}).values():
        versions = entry.get("versions") if isinstance(entry.get("versions"), dict) else {"": entry}
        for version in versions.values():
            runtime = (version.get("options") or {}).get("runtime", "torch")
            tokenizer = (version.get("checkpoint") or {}).get("tokenizer")
            needed["sentencepiece" if tokenizer == "sentencepiece" else "tokenizers"] = ""
            if runtime in ("trtllm", "trtllm-engine"):
                needed["tensorrt_llm"] = TRTLLM_INSTALL
            needed.update({"torch": "", "safetensors": ""})
    return {module: spec or _INSTALL[module] for module, spec in needed.items()}
