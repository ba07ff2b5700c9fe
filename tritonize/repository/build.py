"""``build_repository``: a checkpoint and the options of one model version in, a repository out.

The one entry point that ``generate``, ``deploy``, ``demo`` and the Python API share. Everything that
can be checked before a file is written is checked first (the checkpoint, the options against it), so
a bad request fails with one line and leaves nothing behind.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ExportError, TritonizeError
from .checkpoint import Checkpoint, inspect_checkpoint
from .layout import REPOSITORY_MANIFEST
from .options import refuse
from .render import write_repository
from .spec import RepoSpec, runtime_warning
from .trtllm_build import BuildOptions, build_options, resolve_trtllm_source, run_trtllm_build, stage_engine


@dataclass(frozen=True)
class Generated:
    repository: Path
    spec: RepoSpec  # what the model version was made with
    added: bool  # the repository was there: the model or version went in beside what it held
    quantization: dict | None = None  # what tritonize.json records about FP8 (weights, origin, KV cache)


def generate_repository(checkpoint: Path, output: Path, options: Mapping[str, Any], *, force: bool,
                        note: Callable[[str], None] = print) -> Generated:
    """`tritonize generate`: the options (by name, ``repository.options``) checked against the runtime, the spec
    built from them, the repository written. ``note`` gets a warning when this machine lacks what the
    runtime needs (not an error: the repository is usually served elsewhere)."""
    runtime = options.get("runtime") or "torch"
    refuse(options, runtime, nemo=False)
    spec = RepoSpec.from_options(options)
    warning = runtime_warning(runtime)
    if warning:
        note(warning)
    build = None
    if runtime == "trtllm-engine":
        build = build_options(spec, options, fp8_kv_cache_request=str(options.get("use_fp8_kv_cache") or "auto").lower())
    added = (Path(output) / REPOSITORY_MANIFEST).is_file()
    repo = build_repository(checkpoint, output, spec, force=force, build=build)
    return Generated(repo, spec, added, _recorded_quantization(repo, spec))


def _recorded_quantization(repo: Path, spec: RepoSpec) -> dict | None:
    from .render import model_versions, read_manifest

    entry = (read_manifest(repo) or {}).get("models", {}).get(spec.name)
    return model_versions(entry).get(str(spec.version), {}).get("quantization") if entry else None


def build_repository(checkpoint: Path, output: Path, spec: RepoSpec, *, force: bool, progress: bool = True,
                     build: BuildOptions | None = None,
                     runner: Callable[[Sequence[str]], None] = run_trtllm_build) -> Path:
    """Checks the checkpoint and the options against it, then writes the repository.

    For trtllm-engine, ``checkpoint`` is a TRT-LLM checkpoint / engine, or the export directory holding
    one: the engine is linked or built (``build``, run by ``runner``) into a staging directory beside
    ``output`` first, and the repository holds hard links to it.
    """
    if spec.runtime != "trtllm-engine":
        return _write(Path(checkpoint), output, spec, force=force, progress=progress)
    source = resolve_trtllm_source(checkpoint)
    output = Path(output).expanduser().absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.engine-", dir=output.parent))
    try:
        engine, (tp, pp) = stage_engine(source, spec, work, build=build, runner=runner)
        spec = replace(spec, tensor_parallel_size=tp, pipeline_parallel_size=pp)
        return _write(source.hf_dir, output, spec, force=force, progress=progress, engine_dir=engine)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write(checkpoint: Path, output: Path, spec: RepoSpec, *, force: bool, progress: bool,
           engine_dir: Path | None = None) -> Path:
    ckpt = inspect_checkpoint(checkpoint)
    context = spec.max_input_len + spec.max_output_len
    if ckpt.args.positions == "learned" and context > ckpt.args.max_position_embeddings:
        raise TritonizeError(
            f"--max-input-len + --max-output-len = {context} exceeds the {ckpt.args.max_position_embeddings} "
            f"positions this {ckpt.architecture} has learned: lower them"
        )
    if spec.runtime == "torch" and ckpt.quantization_error:
        raise CheckpointError(f"{ckpt.path}: {ckpt.quantization_error}")
    conversion = fp8_conversion(ckpt, spec)
    if conversion is None:
        return write_repository(spec, ckpt, output, force=force, progress=progress, engine_dir=engine_dir)
    output = Path(output).expanduser().absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.fp8-", dir=output.parent))
    try:
        converted = convert_checkpoint(ckpt, spec, work / "weights", progress=progress)
        return write_repository(spec, converted, output, force=force, progress=progress, engine_dir=engine_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fp8_conversion(ckpt: Checkpoint, spec: RepoSpec) -> str | None:
    """What generate does to the checkpoint's weights for ``spec.quantization`` (None: serve them as they are)."""
    if spec.quantization == "fp8" and (not ckpt.fp8_weights or spec.fp8_lm_head):
        return "quantized to FP8 per channel at generate time"
    if spec.quantization == "none" and ckpt.fp8_weights:
        return "FP8 dequantized at generate time"
    return None


def convert_checkpoint(ckpt: Checkpoint, spec: RepoSpec, out: Path, *, progress: bool) -> Checkpoint:
    """The weights of ``ckpt`` quantized to FP8 (``--quantization fp8``) or dequantized (``none``) into ``out``
    by the exporter; the tokenizer and the end ids stay the checkpoint's own."""
    from ..export.api import export_checkpoint

    conversion = fp8_conversion(ckpt, spec)
    try:
        if spec.quantization == "fp8":
            export_checkpoint(ckpt.path, out, quantization="fp8", fp8_lm_head=spec.fp8_lm_head, progress=progress)
        else:
            export_checkpoint(ckpt.path, out, keep_fp8=False, progress=progress)
    except ExportError as e:
        raise CheckpointError(f"--quantization {spec.quantization}: {e}") from None
    converted = inspect_checkpoint(out)
    return replace(converted, tokenizer_files=ckpt.tokenizer_files, tokenizer_kind=ckpt.tokenizer_kind,
                   end_ids=ckpt.end_ids, pad_id=ckpt.pad_id, converted_from=ckpt.path, conversion=conversion)
