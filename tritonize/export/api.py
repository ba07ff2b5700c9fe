"""``export_checkpoint``: any supported checkpoint in, an HF-format engine directory out.

Everything is written into a temporary directory beside the output and renamed into place at
the end, so a failure (a corrupt source, a refused pickle, a failed ``--verify``) leaves no
half-written output, and an existing output is only replaced with ``force``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ExportError
from ..version import __version__
from . import fp8 as fp8_mod
from . import hf_config, hf_layout, sources
from . import verify as verify_mod
from .canonical import MODEL_TYPES
from .lazy import Region
from .stored import FILES, dtype_name, parse_dtype
from .tree import DirTree, open_tree
from .trtllm_write import write_trtllm_checkpoint
from .weight_files import read_safetensors
from .writer import DEFAULT_SHARD_BYTES, write_safetensors

FORMATS = ("hf", "trtllm-checkpoint")
QUANTIZATIONS = ("fp8",)
EXPORT_MANIFEST = "export_manifest.json"
TRTLLM_DIR = "trtllm_checkpoint"


@dataclass
class ExportResult:
    output: Path
    source_kind: str
    model_type: str
    architecture: str
    dtype: str
    vocab_size: int
    num_parameters: int
    files: dict[str, str]  # file -> sha256
    tokenizer: str | None
    trtllm_checkpoint: Path | None = None
    verify: dict[str, Any] | None = None
    seconds: float = 0.0
    manifest: dict[str, Any] = field(default_factory=dict)


class _Progress:
    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_args(source: Path, output: Path, model_type: str | None, fmt: str, tp_size: int, pp_size: int,
                force: bool) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if model_type is not None and model_type.lower() not in MODEL_TYPES:
        raise ExportError(f"unknown model type {model_type!r}; use one of {', '.join(MODEL_TYPES)}")
    if tp_size < 1 or pp_size < 1:
        raise ExportError("tensor and pipeline parallelism sizes must be at least 1")
    if (tp_size, pp_size) != (1, 1) and fmt != "trtllm-checkpoint":
        raise ExportError("--tensor-parallelism-size / --pipeline-parallelism-size apply to "
                          "--format trtllm-checkpoint only")
    if not source.exists():
        raise ExportError(f"{source} does not exist")
    if output == source or source in output.parents or output in source.parents:
        raise ExportError(f"output {output} must not overlap the source {source}")
    if output.exists() and not force:
        raise ExportError(f"{output} already exists; pass --force to replace it")
    if output.exists() and not output.is_dir():
        raise ExportError(f"{output} exists and is not a directory")


def _generation_config(loaded: sources.Loaded) -> dict[str, Any]:
    spec = loaded.model.spec
    gen = dict(loaded.generation_config or {})
    gen.pop("transformers_version", None)
    if spec.bos_token_id is not None:
        gen.setdefault("bos_token_id", spec.bos_token_id)
    if spec.eos_token_ids:
        gen["eos_token_id"] = spec.eos_token_ids[0] if len(spec.eos_token_ids) == 1 else spec.eos_token_ids
    if spec.pad_token_id is not None:
        gen.setdefault("pad_token_id", spec.pad_token_id)
    return gen


def _hf_config(loaded: sources.Loaded) -> dict[str, Any]:
    spec = loaded.model.spec
    cfg = hf_config.hf_config(spec)
    if loaded.hf_config is not None:  # keep a Hugging Face source's own fields, new dtype
        base = dict(loaded.hf_config)
        base.update(architectures=[spec.arch], dtype=spec.dtype, torch_dtype=spec.dtype)
        base.pop("transformers_version", None)
        base.pop("quantization_config", None)
        return base
    return cfg


def _num_parameters(tensors: list[tuple[str, Any]]) -> int:
    total = 0
    for _name, t in tensors:
        n = 1
        for s in t.shape:
            n *= s
        total += n
    return total


def export_checkpoint(
    source: Path,
    output: Path,
    *,
    model_type: str | None = None,
    dtype: str | None = None,
    fmt: str = "hf",
    tp_size: int = 1,
    pp_size: int = 1,
    force: bool = False,
    verify: bool = False,
    progress: bool = True,
    tokenizer: Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    keep_fp8: bool | None = None,
    quantization: str | None = None,
    fp8_lm_head: bool = False,
) -> ExportResult:
    """Exports ``source`` (.nemo, NeMo 2 dir, .qnemo / TRT-LLM checkpoint, HF dir) to ``output``.

    ``output`` receives an HF-format directory (config.json, sharded safetensors + index,
    generation_config.json, tokenizer files, export_manifest.json) and, with
    ``fmt="trtllm-checkpoint"``, a TRT-LLM checkpoint for ``tp_size`` x ``pp_size`` ranks in
    ``output/trtllm_checkpoint``. Raises :class:`ExportError` with a one-line message on any
    problem; nothing is left behind then.

    FP8 (``fp8.py``): an FP8 source's linears stay FP8 with their scales (``keep_fp8`` None: where the torch
    runtime serves them, else dequantized with a note in the manifest; True: or fail; False: always
    dequantized). ``quantization="fp8"`` quantizes a float source's decoder linears per output channel (and
    the LM head with ``fp8_lm_head``); the embedding and norms stay in ``dtype``.
    """
    started = time.monotonic()
    source = Path(source).expanduser().resolve()
    output = Path(output).expanduser().resolve()
    _check_args(source, output, model_type, fmt, tp_size, pp_size, force)
    if quantization not in (None, *QUANTIZATIONS):
        raise ExportError(f"unknown quantization {quantization!r}; use {', '.join(QUANTIZATIONS)} (or none)")
    if quantization and keep_fp8 is False:
        raise ExportError("--quantization fp8 writes FP8 weights: drop --no-keep-fp8")
    if fp8_lm_head and not quantization:
        raise ExportError("--fp8-lm-head goes with --quantization fp8")
    out_dtype = parse_dtype(dtype) if dtype else None
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.export-", dir=output.parent))
    tree = None
    try:
        scratch = work / "scratch"
        stage = work / "stage"
        scratch.mkdir()
        stage.mkdir()
        tree = open_tree(source, scratch)
        loaded = sources.load(tree, model_type.lower() if model_type else None, tokenizer)
        spec = loaded.model.spec
        if out_dtype is None:
            try:
                out_dtype = parse_dtype(spec.dtype)
            except ExportError:
                out_dtype = loaded.model.embed.dtype if loaded.model.embed.dtype.is_floating_point else torch.float32
        spec.dtype = dtype_name(out_dtype)
        hf_cfg = _hf_config(loaded)
        fp8_info = _fp8_plan(loaded, keep_fp8, quantization, fp8_lm_head)
        tensors = hf_layout.to_hf(loaded.model)
        keep_dtype: set[str] = set()
        if fp8_info.get("weights") == "fp8":
            out = fp8_mod.fp8_tensors(tensors, loaded.model, kv_cache=True)
            tensors, keep_dtype = out.tensors, out.keep_dtype
            hf_cfg["quantization_config"] = out.quantization_config
            fp8_info.update(strategy=out.strategy, activations="static" if out.static_activations else "dynamic",
                            kv_cache_scales=out.kv_scales, fp8_linears=out.fp8_linears)

        (stage / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        (stage / "generation_config.json").write_text(json.dumps(_generation_config(loaded), indent=2) + "\n")
        if loaded.tokenizer is not None:
            loaded.tokenizer.write(stage)

        total = sum(_nbytes(t, t.dtype if n in keep_dtype else out_dtype) for n, t in tensors)
        bar = _Progress(total * (2 if fmt == "trtllm-checkpoint" else 1), progress, f"export {source.name}")
        try:
            written = write_safetensors(stage, tensors, dtype=out_dtype, max_shard_bytes=max_shard_bytes, progress=bar,
                                        keep_dtype=keep_dtype)
            trt_dir = None
            trt_files: dict[str, str] = {}
            if fmt == "trtllm-checkpoint":
                trt_dir = stage / TRTLLM_DIR
                trt_files = _write_trtllm(stage, trt_dir, out_dtype, tp_size, pp_size, bar)
        finally:
            bar.close()

        verify_result = None
        if verify:
            verify_result = verify_mod.verify(loaded, tree, stage, spec.dtype,
                                              quantized=fp8_info.get("origin") == "quantized by this export")
            if not verify_result["passed"]:
                raise ExportError(f"verification failed: {verify_result['failure']}; the export does not reproduce "
                                  "the source")

        manifest = _manifest(loaded, source, spec, written.files, stage, fmt, tp_size, pp_size, trt_files,
                             verify_result, _num_parameters(tensors))
        manifest["output"]["quantization"] = fp8_info or None
        (stage / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        FILES.close()
        tree.close()
        tree = None
        _replace(stage, output, work)
        return ExportResult(
            output=output,
            source_kind=loaded.kind,
            model_type=spec.model_type,
            architecture=spec.arch,
            dtype=spec.dtype,
            vocab_size=spec.vocab_size,
            num_parameters=manifest["output"]["num_parameters"],
            files=written.files,
            tokenizer=loaded.tokenizer.kind if loaded.tokenizer else None,
            trtllm_checkpoint=output / TRTLLM_DIR if fmt == "trtllm-checkpoint" else None,
            verify=verify_result,
            seconds=time.monotonic() - started,
            manifest=manifest,
        )
    except ExportError:
        raise
    except (OSError, MemoryError) as e:
        raise ExportError(f"export failed: {type(e).__name__}: {e}") from None
    except Exception as e:  # a checkpoint malformed in a way no check anticipated: still one line, no output
        raise ExportError(f"export failed unexpectedly ({type(e).__name__}: {e}); the checkpoint may be "
                          "malformed, or this is a bug in tritonize") from e
    finally:
        FILES.close()
        if tree is not None:
            tree.close()
        shutil.rmtree(work, ignore_errors=True)


def _fp8_plan(loaded: sources.Loaded, keep_fp8: bool | None, quantization: str | None,
              fp8_lm_head: bool) -> dict[str, Any]:
    """Decides (and applies, for ``quantization``) what the export writes in FP8; what the manifest records."""
    model = loaded.model
    source_fp8 = fp8_mod.is_fp8(model)
    reason = fp8_mod.not_keepable(model) if source_fp8 else None
    if quantization == "fp8":
        if reason:
            raise ExportError(f"--quantization fp8: {reason}")
        count = fp8_mod.quantize(model, lm_head=fp8_lm_head)
        origin = "quantized by this export" if count else "the source's"
        if count and source_fp8:
            origin = "the source's, and the float linears quantized by this export"
        return {"weights": "fp8", "origin": origin, "quantized_linears": count, "lm_head": fp8_lm_head}
    if not source_fp8:
        return {}
    if keep_fp8 is False:
        return {"weights": "dequantized", "origin": "the source's FP8, dequantized (--no-keep-fp8)"}
    if reason is None:
        return {"weights": "fp8", "origin": "the source's"}
    if keep_fp8:
        raise ExportError(f"--keep-fp8: {reason}; export with --no-keep-fp8 to dequantize")
    return {"weights": "dequantized", "origin": f"the source's FP8, dequantized: {reason}"}


def _nbytes(t: Any, dtype: torch.dtype) -> int:
    n = 1
    for s in t.shape:
        n *= s
    return n * (dtype.itemsize if t.dtype.is_floating_point else t.dtype.itemsize)


def _write_trtllm(stage: Path, trt_dir: Path, dtype: torch.dtype, tp: int, pp: int, bar: _Progress) -> dict[str, str]:
    """Reads the staged HF export back and writes it as a TRT-LLM checkpoint (one code path for all sources)."""
    hf_tree = DirTree(stage)
    cfg = json.loads((stage / "config.json").read_text())
    spec = hf_config.spec_from_hf_config(cfg)
    tensors: dict[str, Any] = {}
    for name in sorted(n for n in hf_tree.list("") if n.endswith(".safetensors")):
        tensors.update(read_safetensors(hf_tree, name))
    model = hf_layout.from_hf(spec, lambda n: Region(tensors[n]), set(tensors), fp8_block=fp8_mod.hf_fp8_block(cfg))
    written = write_trtllm_checkpoint(model, trt_dir, dtype=dtype, tp=tp, pp=pp, progress=bar)
    return {f"{TRTLLM_DIR}/{k}": v for k, v in written.files.items()}


def _manifest(loaded: sources.Loaded, source: Path, spec, files: dict[str, str], stage: Path, fmt: str,
              tp: int, pp: int, trt_files: dict[str, str], verify_result: dict | None, num_params: int) -> dict:
    tok_files = {n: _sha256(stage / n) for n in (loaded.tokenizer.files if loaded.tokenizer else {})}
    other = {n: _sha256(stage / n) for n in ("config.json", "generation_config.json")}
    if (stage / "model.safetensors.index.json").exists():
        other["model.safetensors.index.json"] = _sha256(stage / "model.safetensors.index.json")
    return {
        "tritonize_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(source), "kind": loaded.kind, **{k: v for k, v in loaded.facts.items() if v is not None}},
        "model_type": spec.model_type,
        "output": {
            "format": fmt,
            "architecture": spec.arch,
            "dtype": spec.dtype,
            "vocab_size": spec.vocab_size,
            "num_parameters": num_params,
            "weights": files,
            "files": other,
        },
        "tokenizer": {"kind": loaded.tokenizer.kind, "origin": loaded.tokenizer.origin, "files": tok_files}
        if loaded.tokenizer else None,
        "trtllm_checkpoint": {"dir": TRTLLM_DIR, "tp_size": tp, "pp_size": pp, "files": trt_files}
        if fmt == "trtllm-checkpoint" else None,
        "verify": verify_result,
    }


def _replace(stage: Path, output: Path, work: Path) -> None:
    """Renames the staged export into place; an existing output is moved aside first, then removed."""
    old = None
    if output.exists():
        old = work / "previous"
        output.rename(old)
    try:
        stage.rename(output)
    except OSError:
        if old is not None:
            old.rename(output)
        raise
