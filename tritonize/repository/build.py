"""``build_repository``: a checkpoint and the options of one model version in, a repository out.

The one entry point that ``generate``, ``deploy``, ``demo`` and the Python API share. Everything that
can be checked before a file is written is checked first (the checkpoint, the options against it), so
a bad request fails with one line and leaves nothing behind.

``generate`` takes every source ``export`` reads: what its runtime cannot read as it is (a .nemo, a NeMo 2
or Megatron-Bridge directory, a .qnemo / TRT-LLM checkpoint) is exported first into a temporary directory
beside the output (``stage_export``, which ``deploy`` uses too), removed once the repository is written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ExportError, TritonizeError
from ..export.api import TRTLLM_DIR
from ..runtime.tp import check_split
from .checkpoint import Checkpoint, inspect_checkpoint
from .layout import REPOSITORY_MANIFEST
from .options import refuse
from .render import write_repository
from .spec import RepoSpec, gpu_warning, runtime_warning
from .trtllm_build import (
    BuildOptions,
    build_options,
    is_trtllm_checkpoint,
    link_tree,
    resolve_trtllm_source,
    run_trtllm_build,
    shard_embedding,
    stage_engine,
)


@dataclass(frozen=True)
class Generated:
    repository: Path
    spec: RepoSpec  # what the model version was made with
    added: bool  # the repository was there: the model or version went in beside what it held
    quantization: dict | None = None  # what tritonize.json records about FP8 (weights, origin, KV cache)


def generate_repository(checkpoint: Path, output: Path, options: Mapping[str, Any], *, force: bool,
                        note: Callable[[str], None] = print, progress: bool = True) -> Generated:
    """`tritonize generate`: the options (by name, ``repository.options``) checked against the runtime, the spec
    built from them, the repository written. ``note`` gets a warning when this machine lacks what the
    runtime needs (not an error: the repository is usually served elsewhere), and what is exported on the
    way when ``checkpoint`` is a source the runtime does not read as it is (``source_to_export``)."""
    runtime = options.get("runtime") or "torch"
    refuse(options, runtime, nemo=False)
    spec = RepoSpec.from_options(options)
    for warning in (runtime_warning(runtime), gpu_warning(spec)):
        if warning:
            note(warning)
    build = None
    if runtime == "trtllm-engine":
        build = build_options(spec, options, fp8_kv_cache_request=str(options.get("use_fp8_kv_cache") or "auto").lower())
    added = (Path(output) / REPOSITORY_MANIFEST).is_file()
    checkpoint = Path(checkpoint).expanduser()
    kind = source_to_export(checkpoint, runtime)
    if kind is None:
        repo = build_repository(checkpoint, output, spec, force=force, build=build, progress=progress)
        return Generated(repo, spec, added, _recorded_quantization(repo, spec))
    output = Path(output).expanduser().absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.export-", dir=output.parent))
    try:
        raw_trtllm = runtime == "trtllm-engine" and is_trtllm_checkpoint(checkpoint)
        note(f"exporting {checkpoint} ({SOURCE_KINDS[kind]}) into {work} first; it is removed once the "
             "repository is written")
        exported = stage_export(checkpoint, work, spec, trtllm_checkpoint=checkpoint if raw_trtllm else None,
                                progress=progress)
        repo = build_repository(exported, output, spec, force=force, build=build, progress=progress)
        return Generated(repo, spec, added, _recorded_quantization(repo, spec))
    finally:
        shutil.rmtree(work, ignore_errors=True)


SOURCE_KINDS = {"nemo1": "NeMo 1", "nemo2": "NeMo 2", "megatron-bridge": "Megatron-Bridge",
                "trtllm": "TRT-LLM (.qnemo)", "hf": "Hugging Face", "archive": ".nemo / .qnemo"}


def source_to_export(checkpoint: Path, runtime: str) -> str | None:
    """The kind of source (``SOURCE_KINDS``) ``runtime`` reads only once it is exported, or None when it reads
    ``checkpoint`` as it is: a Hugging Face-format directory (an export directory included), and for
    trtllm-engine an export directory holding its TRT-LLM checkpoint. A directory that is no checkpoint at
    all is a one-line error here, before anything is written."""
    from ..export.sources import detect
    from ..export.tree import DirTree

    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: pass a Hugging Face-format directory, a .nemo or "
                              ".qnemo file, or a NeMo 2, Megatron-Bridge or TRT-LLM checkpoint directory")
    if path.is_file():
        return "archive"
    if runtime == "trtllm-engine":
        try:
            resolve_trtllm_source(path)
            return None
        except TritonizeError:
            return detect(DirTree(path))
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    if isinstance(config, dict) and ("architectures" in config or "model_type" in config) \
            and "architecture" not in config:  # TRT-LLM's config.json names one "architecture"
        return None  # Hugging Face format: read as it is (inspect_checkpoint says what is wrong with it)
    return detect(DirTree(path))


def export_fp8_arguments(spec: RepoSpec) -> dict[str, Any]:
    """What an export on the way to a repository does with FP8: the torch runtime keeps an FP8 source's weights
    (or quantizes / dequantizes them, as ``spec.quantization`` says); the TensorRT-LLM runtimes get the
    dequantized HF export."""
    if spec.runtime != "torch":
        return {"keep_fp8": False}
    if spec.quantization == "fp8":
        return {"quantization": "fp8", "fp8_lm_head": spec.fp8_lm_head}
    return {"keep_fp8": False} if spec.quantization == "none" else {}


def stage_export(source: Path, work: Path, spec: RepoSpec, *, model_type: str | None = None,
                 dtype: str | None = None, trtllm_checkpoint: Path | None = None, parallel_embedding: bool = False,
                 progress: bool = False) -> Path:
    """Exports ``source`` into ``work/export`` in the form ``spec``'s runtime reads: the Hugging Face-format
    directory, and for trtllm-engine a TRT-LLM checkpoint for its parallelism in it (``trtllm_checkpoint``,
    a TRT-LLM checkpoint to build as it is, is linked there instead)."""
    from ..export import export_checkpoint

    exported = work / "export"
    engine = spec.runtime == "trtllm-engine"
    export_trtllm = engine and trtllm_checkpoint is None
    export_checkpoint(source, exported, model_type=model_type, dtype=dtype, progress=progress,
                      fmt="trtllm-checkpoint" if export_trtllm else "hf",
                      tp_size=spec.tensor_parallel_size if export_trtllm else 1,
                      pp_size=spec.pipeline_parallel_size if export_trtllm else 1,
                      **export_fp8_arguments(spec))
    if engine and trtllm_checkpoint is not None:
        link_tree(trtllm_checkpoint, exported / TRTLLM_DIR)
    if engine and parallel_embedding:
        shard_embedding(exported / TRTLLM_DIR)
    return exported


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
    problem = check_split(ckpt.args, spec.tensor_parallel_size)
    if problem:
        raise TritonizeError(f"--tensor-parallelism-size {spec.tensor_parallel_size}: {problem}")
    context = spec.max_input_len + spec.max_output_len
    if ckpt.args.positions == "learned" and context > ckpt.args.max_position_embeddings:
        raise TritonizeError(
            f"--max-input-len + --max-output-len = {context} exceeds the {ckpt.args.max_position_embeddings} "
            f"positions this {ckpt.architecture} has learned: lower them"
        )
    if spec.runtime == "torch" and ckpt.quantization_error:
        raise CheckpointError(f"{ckpt.path}: {ckpt.quantization_error}")
    fp8_weights = spec.quantization == "fp8" or (ckpt.fp8_weights and spec.quantization != "none")
    if spec.runtime in ("torch", "auto") and spec.tensor_parallel_size > 1 and fp8_weights:
        raise TritonizeError(f"--tensor-parallelism-size {spec.tensor_parallel_size} with FP8 weights: the torch "
                             "runtime does not split FP8 weights over GPUs yet; serve them on one GPU, or dequantize "
                             "them with --quantization none")
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
                   end_ids=ckpt.end_ids, pad_id=ckpt.pad_id, chat_template=ckpt.chat_template,
                   converted_from=ckpt.path, conversion=conversion)
