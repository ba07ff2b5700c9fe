"""``build_repository``: a checkpoint and the options of one model version in, a repository out.

The one entry point that ``generate``, ``deploy``, ``demo`` and the Python API share. Everything that
can be checked before a file is written is checked first (the checkpoint, the options against it), so
a bad request fails with one line and leaves nothing behind.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import TritonizeError
from .checkpoint import inspect_checkpoint
from .render import write_repository
from .spec import RepoSpec
from .trtllm_build import BuildOptions, resolve_trtllm_source, run_trtllm_build, stage_engine


def build_repository(checkpoint: Path, output: Path, spec: RepoSpec, *, force: bool, progress: bool = True,
                     build: BuildOptions | None = None,
                     runner: Callable[[Sequence[str]], None] = run_trtllm_build) -> Path:
    """Checks the checkpoint and the options against it, then writes the repository.

    For trtllm-engine, ``checkpoint`` is a TRT-LLM checkpoint / engine, or the export directory holding
    one: the engine is linked or built (``build``, run by ``runner``) into a staging directory beside
    ``output`` first, and the repository holds hard links to it.
    """
    spec.validate()
    if spec.runtime != "trtllm-engine":
        return _write(Path(checkpoint), output, spec, force=force, progress=progress)
    source = resolve_trtllm_source(checkpoint)
    output = Path(output).expanduser().absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.engine-", dir=output.parent))
    try:
        engine, (tp, pp) = stage_engine(source, spec, work, build=build, runner=runner)
        spec.tensor_parallel_size, spec.pipeline_parallel_size = tp, pp
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
    return write_repository(spec, ckpt, output, force=force, progress=progress, engine_dir=engine_dir)
