"""Export (or reuse) + generate for `tritonize deploy` and `tritonize.Deployment`.

The NeMo deploy workflow skipped the export when the engine directory already held what was asked
for. Here the repository's tritonize.json records the options it was made with, and the source
checkpoint and export settings ride along in the spec's ``extra`` table, so a second deploy with the
same request reuses the repository and a different request fails naming the option that differs
(rather than serving something other than what was asked for).

Options of the seed that only TensorRT-LLM can honour are refused by name, never dropped silently.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import TritonizeError
from .render import model_versions, read_manifest
from .spec import RepoSpec

_NEEDS_TRTLLM = "needs the trtllm runtime, not available in this build"
_NEEDS_ADAPTERS = "needs the trtllm runtime or adapters support, not available in this build"

# option (seed spelling) -> (value that means "not used", why the torch runtime cannot honour it)
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "tensor_parallelism_size": (1, "above 1 " + _NEEDS_TRTLLM + " (the torch runtime runs on one device)"),
    "pipeline_parallelism_size": (1, "above 1 " + _NEEDS_TRTLLM + " (the torch runtime runs on one device)"),
    "opt_num_tokens": (None, _NEEDS_TRTLLM + " (a TensorRT build profile)"),
    "ptuning_nemo_checkpoint": ((), _NEEDS_ADAPTERS),
    "task_ids": ((), _NEEDS_ADAPTERS),
    "max_prompt_embedding_table_size": (None, _NEEDS_ADAPTERS),
    "lora_ckpt": ((), _NEEDS_ADAPTERS),
    "use_lora_plugin": (None, _NEEDS_ADAPTERS),
    "lora_target_modules": ((), _NEEDS_ADAPTERS),
    "max_lora_rank": (None, _NEEDS_ADAPTERS),
    "no_paged_kv_cache": (False, _NEEDS_TRTLLM + " (the torch runtime's KV cache is static, not paged)"),
    "disable_remove_input_padding": (False, _NEEDS_TRTLLM + " (a TensorRT build switch)"),
    "use_parallel_embedding": (False, _NEEDS_TRTLLM + " (tensor-parallel embedding)"),
    "export_fp8_quantized": ("auto", _NEEDS_TRTLLM + " (FP8 weights; the torch runtime runs them dequantized)"),
    "use_fp8_kv_cache": ("auto", _NEEDS_TRTLLM + " (FP8 KV cache)"),
}
# "auto" and "false" both mean: no FP8 on the torch runtime.
_FP8_OFF = {"auto", "false", "0", "no", None, False}

# spec / extra field -> the flag a user passes for it
FLAGS = {
    "name": "--triton-model-name",
    "version": "--triton-model-version",
    "max_batch_size": "--max-batch-size",
    "max_input_len": "--max-input-len",
    "max_output_len": "--max-output-len",
    "max_num_tokens": "--max-num-tokens",
    "runtime": "--runtime",
    "device": "--device",
    "dtype": "--dtype",
    "instance_count": "--instance-count",
    "tokenizer_instance_count": "tokenizer instance count",
    "source": "--nemo-checkpoint",
    "model_type": "--model-type",
    "export_dtype": "--dtype (export)",
}


class DeployError(TritonizeError):
    """A deploy request that cannot be carried out as asked; the message names the option and the fix."""


def _unused(name: str, value: Any) -> bool:
    default = UNSUPPORTED[name][0]
    if name in ("export_fp8_quantized", "use_fp8_kv_cache"):
        return (value.lower() if isinstance(value, str) else value) in _FP8_OFF
    if isinstance(default, tuple):
        return not value
    if name in ("max_prompt_embedding_table_size", "max_lora_rank"):
        return value is None or value == 0
    return value == default


def refuse_unsupported(options: Mapping[str, Any]) -> None:
    """Raises DeployError for the first option the torch runtime cannot honour; `options` is by seed name."""
    for name, value in options.items():
        if name not in UNSUPPORTED:
            raise DeployError(f"unknown option {name!r}")
        if not _unused(name, value):
            dashed = name.replace("_", "-")
            raise DeployError(f"--{dashed} (--{name}) {UNSUPPORTED[name][1]}")


@dataclass
class DeployPlan:
    """What deploy will do: "build" (export + generate), "reuse" (serve what is there) or "serve" (no source)."""

    action: str
    repository: Path
    spec: RepoSpec
    source: Path | None
    model_type: str | None
    export_dtype: str | None
    reason: str
    replace: bool = False

    def describe(self) -> str:
        s = self.spec
        if self.action == "build":
            return (f"export {self.source} (model type {self.model_type or 'detected'}, dtype "
                    f"{self.export_dtype or 'as stored'}) and generate {s.name} version {s.version} into "
                    f"{self.repository} ({self.reason})")
        return f"serve {self.repository} as it is ({self.reason})"


def request_spec(spec: RepoSpec, source: Path, model_type: str | None, export_dtype: str | None) -> RepoSpec:
    """`spec` with the export request recorded in ``extra``, which tritonize.json keeps among the options."""
    spec.extra = {**spec.extra, "source": str(Path(source).expanduser().resolve()),
                  "model_type": (model_type or "auto").lower(), "export_dtype": export_dtype or "as stored"}
    return spec


def _difference(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> str | None:
    flat_stored = {**{k: v for k, v in stored.items() if k != "extra"}, **(stored.get("extra") or {})}
    flat_wanted = {**{k: v for k, v in wanted.items() if k != "extra"}, **(wanted.get("extra") or {})}
    for key, value in flat_wanted.items():
        if key in flat_stored and flat_stored[key] != value:
            return f"{FLAGS.get(key, key)} is {value!r} but the repository was made with {flat_stored[key]!r}"
        if key not in flat_stored and key in ("source", "model_type", "export_dtype"):
            return f"{FLAGS.get(key, key)}: the repository records no export source (it was not made by deploy)"
    return None


def plan_deploy(repository: Path, spec: RepoSpec, *, source: Path | None, model_type: str | None = None,
                export_dtype: str | None = None, force: bool = False) -> DeployPlan:
    """Decides between building, reusing and serving as is, checking the request against tritonize.json."""
    repository = Path(repository).expanduser().absolute()
    spec.validate()
    if source is None:
        if not repository.is_dir():
            raise DeployError(f"{repository} does not exist: give --nemo-checkpoint to export one, "
                              "or point --triton-model-repository at a generated repository")
        manifest = read_manifest(repository)
        if manifest is not None and spec.name not in manifest["models"]:
            held = ", ".join(sorted(manifest["models"])) or "none"
            raise DeployError(f"{repository} holds no model {spec.name!r} (it holds: {held}): "
                              "pass one of those as --triton-model-name")
        return DeployPlan("serve", repository, spec, None, model_type, export_dtype,
                          "no checkpoint given")
    source = Path(source).expanduser()
    if not source.exists():
        raise DeployError(f"--nemo-checkpoint {source} does not exist")
    request_spec(spec, source, model_type, export_dtype)
    manifest = read_manifest(repository) if repository.is_dir() else None
    if repository.exists() and manifest is None and not force:
        raise DeployError(f"{repository} exists and is not a tritonize repository: choose another "
                          "--triton-model-repository, or pass --force to replace it")
    entry = (manifest or {}).get("models", {}).get(spec.name)
    stored = model_versions(entry).get(str(spec.version)) if entry else None
    if stored is None:
        return DeployPlan("build", repository, spec, source, model_type, export_dtype,
                          "the repository does not hold this model version yet", replace=force)
    diff = _difference(stored.get("options") or {}, spec.as_dict())
    if diff is None:
        return DeployPlan("reuse", repository, spec, source, model_type, export_dtype,
                          "tritonize.json matches the request")
    if force:
        return DeployPlan("build", repository, spec, source, model_type, export_dtype, f"--force: {diff}",
                          replace=True)
    raise DeployError(f"{repository} holds {spec.name} version {spec.version} made differently: {diff}; "
                      "deploy with the same options, pass --force to rebuild, or choose another repository")


def _is_export(path: Path | None) -> bool:
    """A directory `tritonize export` wrote: generate reads it as it is, exporting again would only copy it."""
    return path is not None and path.is_dir() and (path / "export_manifest.json").is_file()


def carry_out(plan: DeployPlan, *, progress: bool = False) -> Path:
    """Runs the export + generate steps of a "build" plan; the export is staged and removed afterwards.

    The repository's weights are hard links (or copies) of the export's files, so dropping the staged
    export frees nothing the repository needs.
    """
    if plan.action != "build":
        return plan.repository
    from .commands.generate import build_repository
    from .export import export_checkpoint

    plan.repository.parent.mkdir(parents=True, exist_ok=True)
    if _is_export(plan.source) and plan.model_type is None and plan.export_dtype is None:
        return build_repository(plan.source, plan.repository, plan.spec, force=plan.replace, progress=progress)
    work = Path(tempfile.mkdtemp(prefix=f".{plan.repository.name}.deploy-", dir=plan.repository.parent))
    try:
        exported = work / "export"
        export_checkpoint(plan.source, exported, model_type=plan.model_type, dtype=plan.export_dtype,
                          progress=progress)
        return build_repository(exported, plan.repository, plan.spec, force=plan.replace, progress=progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
