"""Is a checkpoint FP8? Read from the config files the quantizers write, so "auto" needs no flag.

Two layouts say so: a Hugging Face config.json with a ``quantization_config`` (``quant_method``
"fp8", "compressed-tensors" with 8-bit float weights, or ModelOpt's "modelopt" with ``quant_algo`` FP8 and
optionally ``kv_cache_quant_algo`` FP8 / ``kv_cache_scheme``), and a TRT-LLM checkpoint (.qnemo, ``tritonize export --format
trtllm-checkpoint``, ``hf_quant_config.json``) whose ``quantization`` table holds ``quant_algo`` /
``kv_cache_quant_algo``. An export directory is judged by its TRT-LLM checkpoint when it has one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Fp8Detection", "detect_fp8", "detect_fp8_details", "resolve_fp8_switch"]


@dataclass(frozen=True)
class Fp8Detection:
    weights: bool
    kv_cache: bool
    source: Path | None  # the file that said so (None: no config file found)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_fp8(value: Any) -> bool:
    return isinstance(value, str) and value.upper().startswith("FP8")


def _from_quantization(table: dict[str, Any]) -> tuple[bool, bool]:
    """A TRT-LLM / ModelOpt quantization table: ``quant_algo`` and ``kv_cache_quant_algo``."""
    return _is_fp8(table.get("quant_algo")), _is_fp8(table.get("kv_cache_quant_algo"))


def _from_hf(qc: dict[str, Any]) -> tuple[bool, bool]:
    method = str(qc.get("quant_method", "")).lower()
    weights, kv = _from_quantization(qc)
    if method == "fp8":
        weights = True
    groups = qc.get("config_groups")
    if method == "compressed-tensors" and isinstance(groups, dict):
        weights = weights or any(isinstance(g, dict) and (g.get("weights") or {}).get("type") == "float"
                                 and (g.get("weights") or {}).get("num_bits") == 8 for g in groups.values())
    nested = qc.get("quantization")
    if isinstance(nested, dict):
        w, k = _from_quantization(nested)
        weights, kv = weights or w, kv or k
    scheme = qc.get("kv_cache_scheme")
    if isinstance(scheme, dict) and scheme.get("type") == "float" and scheme.get("num_bits") == 8:
        kv = True  # compressed-tensors spelling
    if str(qc.get("kv_cache_dtype", "")).lower().startswith("fp8"):
        kv = True
    return weights, kv


def detect_fp8_details(checkpoint_dir: str | Path) -> Fp8Detection:
    """`detect_fp8` with the file the answer came from."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return Fp8Detection(False, False, None)
    for candidate in (root / "trtllm_checkpoint" / "config.json", root / "config.json"):
        config = _read(candidate)
        if config is None:
            continue
        pretrained = config.get("pretrained_config")  # a built engine's config.json
        if isinstance(pretrained, dict):
            config = pretrained
        if isinstance(config.get("quantization"), dict):
            weights, kv = _from_quantization(config["quantization"])
            return Fp8Detection(weights, kv, candidate)
        if isinstance(config.get("quantization_config"), dict):
            weights, kv = _from_hf(config["quantization_config"])
            return Fp8Detection(weights, kv, candidate)
    extra = root / "hf_quant_config.json"  # ModelOpt's HF export keeps the table beside config.json
    data = _read(extra)
    if data is not None:
        table = data.get("quantization") if isinstance(data.get("quantization"), dict) else data
        weights, kv = _from_quantization(table)
        return Fp8Detection(weights, kv, extra)
    found = root / "config.json"
    return Fp8Detection(False, False, found if found.is_file() else None)


def detect_fp8(checkpoint_dir: str | Path) -> tuple[bool, bool]:
    """(weights are FP8, KV cache is FP8) as the checkpoint's config files declare; (False, False) if unsure."""
    found = detect_fp8_details(checkpoint_dir)
    return found.weights, found.kv_cache


def resolve_fp8_switch(value: str | bool | None, detected: bool) -> bool:
    """A seed FP8 switch ("auto" | "true" | "false") against what the checkpoint declares."""
    text = str(value).lower() if value is not None else "auto"
    if text in ("auto", "none"):
        return detected
    return text in ("true", "1", "yes", "on")
