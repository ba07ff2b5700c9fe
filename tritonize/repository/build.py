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

from ..errors import TritonizeError
from ..runtime.tp import check_split
from .checkpoint import inspect_checkpoint
from .layout import REPOSITORY_MANIFEST
from .limits import derive_limits
from .options import refuse
from .render import write_repository
from .spec import RepoSpec, gpu_warning, runtime_warning
from .trtllm_build import BuildOptions, build_options, resolve_trtllm_source, run_trtllm_build, stage_engine


@dataclass(frozen=True)
class Generated:
    repository: Path
    spec: RepoSpec  # what the model version was made with
    added: bool  # the repository was there: the model or version went in beside what it held
    limits: str | None = None  # where the prompt / output limits came from, when the checkpoint gave them


def generate_repository(checkpoint: Path, output: Path, options: Mapping[str, Any], *, force: bool,
                        note: Callable[[str], None] = print) -> Generated:
    """`tritonize generate`: the options (by name, ``repository.options``) checked against the runtime, the spec
    built from them, the repository written. Limits left None come from the checkpoint (limits.py; the result
    says so). ``note`` gets a warning when this machine lacks what the runtime needs (not an error: the
    repository is usually served elsewhere)."""
    runtime = options.get("runtime") or "torch"
    refuse(options, runtime, nemo=False)
    options, limits = derive_limits(checkpoint, options, runtime)
    spec = RepoSpec.from_options(options)
    for warning in (runtime_warning(runtime), gpu_warning(spec)):
        if warning:
            note(warning)
    build = None
    if runtime == "trtllm-engine":
        build = build_options(spec, options, fp8_kv_cache_request=str(options.get("use_fp8_kv_cache") or "auto").lower())
    added = (Path(output) / REPOSITORY_MANIFEST).is_file()
    return Generated(build_repository(checkpoint, output, spec, force=force, build=build), spec, added, limits)


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
    return write_repository(spec, ckpt, output, force=force, progress=progress, engine_dir=engine_dir)
