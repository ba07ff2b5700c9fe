"""Export (or reuse) + generate + serve: `tritonize deploy` (NeMo's deploy_triton.py) and ``tritonize.Deployment``.

The NeMo workflow skipped the export when the engine directory already held what was asked for. Here
the repository's tritonize.json records the options it was made with, and the source checkpoint and
export settings ride along in the spec's ``extra`` table, so a second deploy with the same request
reuses the repository and a different request fails naming the option that differs (rather than
serving something other than what was asked for).

What a runtime cannot honour is refused by name before anything is done (``repository.options``);
never dropped silently.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import DeployError
from .export.api import EXPORT_MANIFEST, TRTLLM_DIR
from .repository.build import build_repository, stage_export
from .repository.fp8 import detect_fp8_details, resolve_fp8_switch
from .repository.options import describe, refuse
from .repository.render import model_versions, read_manifest
from .repository.spec import TRTLLM_RUNTIMES, RepoSpec
from .repository.trtllm_build import (
    BuildOptions,
    build_options,
    is_trtllm_checkpoint,
)
from .serving.serve import ServeOptions, serve_repository


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
    build: BuildOptions | None = None  # trtllm-engine: what trtllm-build gets
    trtllm_checkpoint: Path | None = None  # trtllm-engine: build this TRT-LLM checkpoint as is (FP8 source)
    parallel_embedding: bool = False  # trtllm-engine: shard the embedding table over the TP ranks
    notes: list[str] = field(default_factory=list)  # what deploy prints about its choices (FP8 detection)

    def describe(self) -> str:
        s = self.spec
        if self.action == "build":
            engine = ""
            if s.runtime == "trtllm-engine":
                what = (f"the FP8 checkpoint {self.trtllm_checkpoint} as it is" if self.trtllm_checkpoint else
                        f"a TRT-LLM checkpoint for tensor x pipeline parallelism {s.tensor_parallel_size} x "
                        f"{s.pipeline_parallel_size}")
                engine = f", build {what} with trtllm-build,"
            return (f"export {self.source} (model type {self.model_type or 'detected'}, dtype "
                    f"{self.export_dtype or 'as stored'}){engine} and generate {s.name} version {s.version} into "
                    f"{self.repository} ({self.reason})")
        return f"serve {self.repository} as it is ({self.reason})"


def request_spec(spec: RepoSpec, source: Path, model_type: str | None, export_dtype: str | None) -> RepoSpec:
    """`spec` with the export request recorded in ``extra``, which tritonize.json keeps among the options."""
    return replace(spec, extra={**spec.extra, "source": str(Path(source).expanduser().resolve()),
                                "model_type": (model_type or "auto").lower(),
                                "export_dtype": export_dtype or "as stored"})


def _difference(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> str | None:
    flat_stored = {**{k: v for k, v in stored.items() if k != "extra"}, **(stored.get("extra") or {})}
    flat_wanted = {**{k: v for k, v in wanted.items() if k != "extra"}, **(wanted.get("extra") or {})}
    for key, value in flat_wanted.items():
        if key in flat_stored and flat_stored[key] != value:
            return f"{describe(key)} is {value!r} but the repository was made with {flat_stored[key]!r}"
        if key not in flat_stored and key in ("source", "model_type", "export_dtype"):
            return f"{describe(key)}: the repository records no export source (it was not made by deploy)"
    return None


@dataclass
class TrtllmChoices:
    """What the TensorRT-LLM options of one deploy request come to (``trtllm_choices``)."""

    build: BuildOptions | None = None
    trtllm_checkpoint: Path | None = None
    parallel_embedding: bool = False
    notes: list[str] = field(default_factory=list)


def _fp8_note(what: str, on: bool, value: Any, detected: bool, where: Path | None) -> str:
    if str(value).lower() in ("auto", "none"):
        how = f"detected from {where}" if detected else "auto: the checkpoint declares none"
    else:
        how = f"{'--use-fp8-kv-cache' if what == 'KV cache' else '--export-fp8-quantized'} {value}"
    return f"FP8 {what}: {'on' if on else 'off'} ({how})"


def trtllm_choices(spec: RepoSpec, options: Mapping[str, Any], source: Path | None) -> tuple[RepoSpec, TrtllmChoices]:
    """``spec`` with the KV cache dtype a trtllm runtime gets, and the build for trtllm-engine.

    FP8 "auto" follows the source checkpoint's config files (``fp8.detect_fp8``). trtllm: an FP8 KV cache
    is the LLM API's KvCacheConfig dtype. trtllm-engine: FP8 weights or KV cache come from a TRT-LLM
    checkpoint that already has them (a .qnemo), built as it is; tritonize's own export writes neither.
    """
    choices = TrtllmChoices()
    if spec.runtime not in TRTLLM_RUNTIMES:
        return spec, choices
    found = detect_fp8_details(source) if source is not None else None
    w_detected, kv_detected = (found.weights, found.kv_cache) if found else (False, False)
    where = found.source if found else None
    kv_value = options.get("use_fp8_kv_cache", "auto")
    w_value = options.get("export_fp8_quantized", "auto")
    kv_on = resolve_fp8_switch(kv_value, kv_detected)
    w_on = resolve_fp8_switch(w_value, w_detected)
    if spec.runtime == "trtllm":
        choices.notes.append(_fp8_note("KV cache", kv_on, kv_value, kv_detected, where))
        if w_detected:
            choices.notes.append(f"FP8 weights: detected in {where}; the trtllm runtime serves the dequantized "
                                 "export (--runtime trtllm-engine builds the FP8 checkpoint as it is)")
        return replace(spec, kv_cache_dtype="fp8" if kv_on else "auto"), choices
    fp8_source = source is not None and is_trtllm_checkpoint(source) and (w_detected or kv_detected)
    for what, on, value in (("weights", w_on, w_value), ("KV cache", kv_on, kv_value)):
        if on and not fp8_source:
            raise DeployError(f"FP8 {what} ({_fp8_note(what, on, value, False, where)}) on trtllm-engine needs a "
                              "TRT-LLM checkpoint quantized to FP8 (a .qnemo directory) as --nemo-checkpoint")
        choices.notes.append(_fp8_note(what, on, value, (w_detected if what == "weights" else kv_detected), where))
    if fp8_source:
        if not (w_on and kv_on == kv_detected):
            raise DeployError(f"{source} is quantized to FP8 (weights {w_detected}, KV cache {kv_detected}) and "
                              "trtllm-engine builds it as it is: leave --export-fp8-quantized and "
                              "--use-fp8-kv-cache at auto")
        choices.trtllm_checkpoint = source
    choices.parallel_embedding = bool(options.get("use_parallel_embedding"))
    choices.build = b = build_options(spec, options, fp8_kv_cache_request="true" if kv_on else "auto")
    return replace(spec, extra={**spec.extra, "trtllm_build": json.dumps(
        {"opt_num_tokens": b.opt_num_tokens, "paged_kv_cache": b.paged_kv_cache,
         "remove_input_padding": b.remove_input_padding, "parallel_embedding": choices.parallel_embedding,
         "fp8_weights": w_on, "fp8_kv_cache": kv_on}, sort_keys=True)}), choices


def fp8_choices(spec: RepoSpec, options: Mapping[str, Any], source: Path | None) -> tuple[RepoSpec, list[str]]:
    """The torch runtime's FP8: ``--export-fp8-quantized`` (NeMo's switch) is ``--quantization`` fp8 / none, and
    what "auto" comes to for the source is said. The TensorRT-LLM runtimes: ``trtllm_choices``."""
    if spec.runtime != "torch":
        return spec, []
    value = str(options.get("export_fp8_quantized") or "auto").lower()
    wanted = {"true": "fp8", "false": "none"}.get(value)
    if wanted is not None:
        if spec.quantization not in ("auto", wanted):
            raise DeployError(f"--export-fp8-quantized {value} and --quantization {spec.quantization} disagree: "
                              "give one of them")
        spec = replace(spec, quantization=wanted)
    found = detect_fp8_details(source) if source is not None else None
    notes = []
    if spec.quantization == "fp8":
        how = "kept as they are" if found and found.weights else "quantized to FP8 per channel at export"
        notes.append(f"FP8 weights: on ({how})")
    elif spec.quantization == "none" and found and found.weights:
        notes.append(f"FP8 weights: off (the FP8 checkpoint {found.source} is dequantized at export)")
    elif found and found.weights:
        notes.append(f"FP8 weights: on (detected from {found.source}; served as FP8)")
    if spec.kv_cache_dtype != "auto":
        on = "on" if spec.kv_cache_dtype == "fp8" else "off"
        notes.append(f"FP8 KV cache: {on} (--use-fp8-kv-cache {options.get('use_fp8_kv_cache')})")
    elif found and found.kv_cache:
        notes.append(f"FP8 KV cache: on (detected from {found.source})")
    else:
        notes.append("FP8 KV cache: off (auto: the checkpoint declares none)")
    return spec, notes


def adapter_notes(spec: RepoSpec, options: Mapping[str, Any]) -> list[str]:
    """What deploy says about the adapters of a request (generate converts and checks them)."""
    notes = []
    if options.get("use_lora_plugin") and spec.runtime != "trtllm-engine":
        notes.append(f"--use-lora-plugin {options['use_lora_plugin']}: a TensorRT build switch; the "
                     f"{spec.runtime} runtime serves LoRA adapters without it")
    if spec.lora:
        notes.append("LoRA adapters: " + ", ".join(f"lora_task_id {t} = {p}" for t, p in spec.lora))
    if spec.ptuning:
        notes.append("p-tuning tasks: " + ", ".join(f"task_id {t} = {p}" for t, p in spec.ptuning))
    return notes


def plan_deploy(repository: Path, spec: RepoSpec, *, source: Path | None, model_type: str | None = None,
                export_dtype: str | None = None, force: bool = False,
                trtllm: TrtllmChoices | None = None) -> DeployPlan:
    """Decides between building, reusing and serving as is, checking the request against tritonize.json."""
    plan = _plan_deploy(repository, spec, source=source, model_type=model_type, export_dtype=export_dtype,
                        force=force)
    if trtllm is not None:
        plan.build, plan.trtllm_checkpoint = trtllm.build, trtllm.trtllm_checkpoint
        plan.parallel_embedding, plan.notes = trtllm.parallel_embedding, list(trtllm.notes)
    return plan


def _plan_deploy(repository: Path, spec: RepoSpec, *, source: Path | None, model_type: str | None,
                 export_dtype: str | None, force: bool) -> DeployPlan:
    repository = Path(repository).expanduser().absolute()
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
    spec = request_spec(spec, source, model_type, export_dtype)
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
    return path is not None and path.is_dir() and (path / EXPORT_MANIFEST).is_file()


def carry_out(plan: DeployPlan, *, progress: bool = False) -> Path:
    """Runs the export + generate steps of a "build" plan; the export is staged and removed afterwards.

    The repository's weights are hard links (or copies) of the export's files, so dropping the staged
    export frees nothing the repository needs.
    """
    if plan.action != "build":
        return plan.repository
    plan.repository.parent.mkdir(parents=True, exist_ok=True)
    engine = plan.spec.runtime == "trtllm-engine"
    if _is_export(plan.source) and plan.model_type is None and plan.export_dtype is None and (
            not engine or (plan.source / TRTLLM_DIR).is_dir()) and not plan.parallel_embedding:
        return build_repository(plan.source, plan.repository, plan.spec, force=plan.replace, progress=progress,
                                build=plan.build)
    work = Path(tempfile.mkdtemp(prefix=f".{plan.repository.name}.deploy-", dir=plan.repository.parent))
    try:
        exported = stage_export(plan.source, work, plan.spec, model_type=plan.model_type, dtype=plan.export_dtype,
                                trtllm_checkpoint=plan.trtllm_checkpoint, parallel_embedding=plan.parallel_embedding,
                                progress=progress)
        return build_repository(exported, plan.repository, plan.spec, force=plan.replace, progress=progress,
                                build=plan.build)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def deploy(options: Mapping[str, Any], *, force: bool = False, dry_run: bool = False,
           tritonserver: Path | None = None, startup_timeout: float = 600, say: Callable[[str], None] = print,
           note: Callable[[str], None] = print) -> None:
    """NeMo's deploy_triton.py: export (or reuse) ``source``, generate it into ``triton_model_repository``, and
    serve it until stopped.

    ``options`` are deploy's, by name (``repository.options``); what ``runtime`` cannot honour is refused
    first. Without ``triton_model_repository`` a temporary repository is used and removed at the end.
    With ``dry_run`` only what would be done is said.
    """
    source, repository = options.get("source"), options.get("triton_model_repository")
    refuse(options, options.get("runtime") or "torch")
    serve = ServeOptions(http_port=options["triton_port"], grpc_port=options["grpc_port"],
                         metrics_port=options["metrics_port"], address=options["triton_http_address"],
                         tritonserver=tritonserver, startup_timeout=startup_timeout, openai=None)
    temporary = None
    try:
        if repository is None:
            if source is None:
                raise DeployError("give --nemo-checkpoint to export, or --triton-model-repository to serve")
            temporary = Path(tempfile.mkdtemp(prefix="tritonize-deploy-"))
            repository = temporary / "repo"
        spec = RepoSpec.from_options(options)
        for line in adapter_notes(spec, options):
            note(line)
        spec, fp8_notes = fp8_choices(spec, options, source)
        for line in fp8_notes:
            note(line)
        spec, choices = trtllm_choices(spec, options, source)
        plan = plan_deploy(repository, spec, source=source, model_type=options.get("model_type"),
                           export_dtype=options.get("dtype"), force=force, trtllm=choices)
        for line in plan.notes:
            note(line)
        if dry_run:
            say(f"would {plan.describe()}")
            say(f"would serve it: tritonize serve {plan.repository} --http-port {serve.http_port} "
                f"--grpc-port {serve.grpc_port} --metrics-port {serve.metrics_port} --address {serve.address}")
            return
        if plan.action == "build":
            note(f"{plan.describe()} ...")
            carry_out(plan, progress=False)
        else:
            note(plan.describe())
        serve_repository(plan.repository, serve, say=say, note=note)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
