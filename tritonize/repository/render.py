"""Renders a model repository, atomically: config.pbtxt from the Jinja templates, model.py and the
runtime package copied from ``tritonize.runtime``.

The repository is written into a temporary directory beside the destination and renamed into
place only when every file is written and every config parses as Triton's ModelConfig, so a failure
never leaves a half-written repository and an existing one is replaced only with ``force``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jinja2
from google.protobuf import text_format
from tqdm import tqdm
from tritonclient.grpc import model_config_pb2

from .. import runtime as runtime_pkg
from ..errors import RenderError
from ..version import __version__
from . import interface as wire
from .adapters import ADAPTERS_DIR, PreparedAdapters, prepare_adapters
from .chat_template import load_template_file, pick_default, special_tokens
from .checkpoint import Checkpoint
from .layout import REPOSITORY_MANIFEST, VERSIONED_SUFFIXES, model_folders
from .manifest import build_manifest
from .spec import RepoSpec
from .trtllm_build import ENGINE_DIR, link_tree, trtllm_engine_params

TEMPLATES = Path(__file__).resolve().parent / "templates"
RUNTIME_SRC = Path(runtime_pkg.__file__).resolve().parent
# The runtime package's name inside a repository: what model.py imports, and validate looks for.
RUNTIME_PACKAGE = "tritonize_backend"
# Each Python model's model.py: a module of tritonize.runtime.triton, copied as it is.
MODEL_FILES = {"preprocessing": "preprocessing.py", "engine": "engine_model.py",
               "postprocessing": "postprocessing.py", "sync": "sync.py"}
# Triton reads one config.pbtxt per model for all its versions. The models that hold version-specific files
# (tokenizer, weights) serve every version present so a client can address one; the ensemble and the
# ``_sync`` door route to the newest (``model_version: -1``), and explicit model control can pin an older one.
VERSION_POLICY_ALL = "version_policy: { all { } }\n"


def _pbstr(value: object) -> str:
    """A protobuf text-format string literal; json escaping is a valid subset of it, as long as characters
    beyond the BMP stay UTF-8 (json's surrogate-pair escapes are not protobuf's)."""
    return json.dumps(str(value), ensure_ascii=False)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["pbstr"] = _pbstr
    return env


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    """Parses config.pbtxt text the way tritonserver does (protobuf text format)."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@dataclass
class RenderedModel:
    folder: str
    config: str
    model_file: Path | None  # copied to <folder>/<version>/model.py (the ensemble has none)


def served_chat_template(spec: RepoSpec, ckpt: Checkpoint) -> object:
    """The chat template the repository serves: --chat-template's file, else the checkpoint's (or None)."""
    if spec.chat_template:
        return load_template_file(spec.chat_template)
    return ckpt.chat_template


def tokenizer_config(ckpt: Checkpoint, chat_template: object) -> dict | None:
    """The repository's tokenizer_config.json: the checkpoint's, with the served template; None: copy as is."""
    path = ckpt.path / "tokenizer_config.json"
    if chat_template is None:
        return None
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config["chat_template"] = chat_template
    return config


def chat_params(ckpt: Checkpoint, chat_template: object, adapters: PreparedAdapters) -> dict[str, str]:
    """What a front that sees only the server needs to know, in the preprocessing model's parameters: the
    chat template (the default one) with the special tokens it may name, and the LoRA adapters served."""
    tokens = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins, as in transformers
        path = ckpt.path / name
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            tokens.update(special_tokens(data) if isinstance(data, dict) else {})
    return {
        "chat_template": pick_default(chat_template) or "",
        "special_tokens": json.dumps(tokens, sort_keys=True),
        "lora_task_ids": json.dumps(sorted(adapters.lora)),
    }


def render_models(spec: RepoSpec, ckpt: Checkpoint, adapters: PreparedAdapters | None = None,
                  chat_template: object = None) -> list[RenderedModel]:
    """The config.pbtxt text of each model, in memory, and the file its model.py is copied from."""
    adapters = adapters or PreparedAdapters()
    env = _environment()
    common = {"spec": spec, "version": __version__}
    engine_params = {
        "runtime": spec.runtime,
        "weights_dir": "weights",
        "device": spec.device,
        "dtype": spec.dtype,
        "max_batch_size": spec.max_batch_size,
        "max_input_len": spec.max_input_len,
        "max_output_len": spec.max_output_len,
        "max_num_tokens": spec.step_tokens,
        "vocab_size": ckpt.args.vocab_size,
        # rows per request for a prompt_embedding_table sent with it (0: none accepted)
        "max_prompt_embedding_table_size": spec.max_prompt_embedding_table_size,
        "kv_cache_tokens": spec.kv_cache_tokens,
        "prefix_cache": str(spec.prefix_cache).lower(),
    }
    if spec.kv_cache_free_gpu_memory_fraction:
        engine_params["kv_cache_free_gpu_memory_fraction"] = spec.kv_cache_free_gpu_memory_fraction
    if spec.runtime in ("torch", "auto") and spec.kv_cache_dtype != "auto":
        engine_params["kv_cache_dtype"] = spec.kv_cache_dtype  # "auto" (the checkpoint's) goes without saying
    if adapters:
        engine_params["adapters_dir"] = ADAPTERS_DIR
    engine_params.update(trtllm_engine_params(spec))
    if spec.runtime in ("torch", "auto") and spec.tensor_parallel_size > 1:  # tp.py: ranks 1.. are its workers
        engine_params["tensor_parallel_size"] = spec.tensor_parallel_size
    tokenizer_params = {
        "tokenizer_dir": "tokenizer",
        "max_input_len": spec.max_input_len,
        "max_output_len": spec.max_output_len,
        "end_ids": json.dumps(ckpt.end_ids),
        "pad_id": ckpt.pad_id,
        "vocab_size": ckpt.args.vocab_size,
        "ptuning_tasks": json.dumps(adapters.task_sizes()),
        **chat_params(ckpt, chat_template, adapters),
    }
    instance_kind = "KIND_GPU" if spec.device == "cuda" else "KIND_CPU"
    # KIND_GPU puts an instance on every GPU; a model split over GPUs is one instance on the first, whose
    # workers take the next ones
    instance_gpus = [0] if instance_kind == "KIND_GPU" and spec.tensor_parallel_size > 1 \
        and spec.runtime in ("torch", "auto") else []
    models = {
        spec.name: ("ensemble", {"ensemble_inputs": wire.ENSEMBLE_INPUTS, "ensemble_outputs": wire.ENSEMBLE_OUTPUTS,
                                 "steps": wire.ensemble_steps(spec.name)}),
        f"{spec.name}_preprocessing": ("preprocessing", {"inputs": wire.PRE_INPUTS, "outputs": wire.PRE_OUTPUTS,
                                                         "params": tokenizer_params}),
        f"{spec.name}_engine": ("engine", {"inputs": wire.ENGINE_INPUTS, "outputs": wire.ENGINE_OUTPUTS,
                                           "params": engine_params, "instance_kind": instance_kind,
                                           "instance_gpus": instance_gpus}),
        f"{spec.name}_postprocessing": ("postprocessing", {"inputs": wire.POST_INPUTS, "outputs": wire.POST_OUTPUTS,
                                                           "params": {"tokenizer_dir": "tokenizer",
                                                                      "engine_name": f"{spec.name}_engine"}}),
        f"{spec.name}_sync": ("sync", {"inputs": wire.ENSEMBLE_INPUTS, "outputs": wire.ENSEMBLE_OUTPUTS,
                                       "params": {"ensemble_name": spec.name}}),
    }
    rendered = []
    for folder, (template, context) in models.items():
        config = env.get_template(f"{template}/config.pbtxt.j2").render(**common, **context)
        if folder.endswith(VERSIONED_SUFFIXES):
            config += VERSION_POLICY_ALL
        model_file = RUNTIME_SRC / "triton" / MODEL_FILES[template] if template in MODEL_FILES else None
        rendered.append(RenderedModel(folder, config, model_file))
    return rendered


def _check(rendered: list[RenderedModel]) -> None:
    for model in rendered:
        try:
            parsed = parse_config(model.config)
        except text_format.ParseError as e:
            raise RenderError(f"internal error: {model.folder}/config.pbtxt does not parse: {e}") from None
        if parsed.name != model.folder:
            raise RenderError(f"internal error: {model.folder}/config.pbtxt names {parsed.name!r}")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_runtime(dst: Path) -> None:
    # triton/: the model files, already copied as each model.py
    shutil.copytree(RUNTIME_SRC, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "CONTRACT.md", "triton"))


def _copy_tokenizer(ckpt: Checkpoint, config: dict | None, dst: Path) -> None:
    """The checkpoint's tokenizer files into ``dst``; ``config``: the tokenizer_config.json to write instead."""
    for f in ckpt.tokenizer_files:
        if f.name != "tokenizer_config.json" or config is None:
            shutil.copy2(f, dst / f.name)
    if config is not None:
        (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")


def _stage(spec: RepoSpec, ckpt: Checkpoint, rendered: list[RenderedModel], tmp: Path, progress: bool,
           adapters: PreparedAdapters, engine_dir: Path | None = None, chat_template: object = None) -> dict:
    """Writes every folder of ``spec.name`` (one version) under ``tmp``; returns its manifest entry."""
    tok_config = tokenizer_config(ckpt, chat_template)
    for model in rendered:
        folder = tmp / model.folder
        version_dir = folder / str(spec.version)
        version_dir.mkdir(parents=True)
        (folder / "config.pbtxt").write_text(model.config, encoding="utf-8")
        if model.model_file is not None:
            shutil.copyfile(model.model_file, version_dir / "model.py")
    for suffix in ("preprocessing", "postprocessing", "engine"):
        _copy_runtime(tmp / f"{spec.name}_{suffix}" / str(spec.version) / RUNTIME_PACKAGE)
    for suffix in ("preprocessing", "postprocessing"):
        tok_dir = tmp / f"{spec.name}_{suffix}" / str(spec.version) / "tokenizer"
        tok_dir.mkdir()
        _copy_tokenizer(ckpt, tok_config, tok_dir)
    weights_dir = tmp / f"{spec.name}_engine" / str(spec.version) / "weights"
    weights_dir.mkdir()
    shutil.copy2(ckpt.path / "config.json", weights_dir / "config.json")
    _copy_tokenizer(ckpt, tok_config, weights_dir)
    for f in ckpt.extra_files:  # hf_quant_config.json: read with the weights
        shutil.copy2(f, weights_dir / f.name)
    for f in tqdm(ckpt.weight_files, desc="weights", unit="file", disable=not progress):
        _link_or_copy(f, weights_dir / f.name)
    if adapters:
        adapters.write(weights_dir.parent, progress=progress)
    if engine_dir is not None:  # trtllm-engine: the built TensorRT-LLM engine beside the weights
        link_tree(engine_dir, weights_dir.parent / ENGINE_DIR)
    return build_manifest(spec, ckpt, tmp, progress=progress, adapters=adapters.listing() if adapters else None)


def read_manifest(repo: Path) -> dict | None:
    """The repository's tritonize.json, or None when it has none (not a tritonize repository)."""
    path = repo / REPOSITORY_MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RenderError(f"{path} is unreadable ({e}): restore it, or pass --force to replace the repository") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise RenderError(f"{path} has no 'models' table: restore it, or pass --force to replace the repository")
    return data


def model_versions(entry: dict) -> dict[str, dict]:
    """Each version's {options, checkpoint, hashes} of one manifest entry, keyed by version number."""
    versions = entry.get("versions")
    if isinstance(versions, dict) and versions:
        return versions
    fields = {k: entry[k] for k in ("options", "checkpoint", "hashes") if k in entry}
    return {str(entry.get("options", {}).get("version", 1)): fields}


def _merge_entry(old: dict | None, version: int, new: dict) -> dict:
    """One model's manifest entry: every version under ``versions``, the newest also at the top level."""
    versions = dict(model_versions(old)) if old else {}
    versions[str(version)] = new
    newest = versions[max(versions, key=int)]
    return {**newest, "versions": dict(sorted(versions.items(), key=lambda kv: int(kv[0])))}


def _owner(manifest: dict, folder: str) -> str | None:
    for name in manifest["models"]:
        if folder in model_folders(name):
            return name
    return None


def _short(value: str | None, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _config_differences(old: str, new: str) -> str:
    """What differs between two configs of one model, for an error message."""
    try:
        a, b = parse_config(old), parse_config(new)
    except text_format.ParseError:
        return "the existing config.pbtxt does not parse"
    diffs = []
    if a.max_batch_size != b.max_batch_size:
        diffs.append(f"max_batch_size {a.max_batch_size} vs {b.max_batch_size}")
    pa = {k: v.string_value for k, v in a.parameters.items()}
    pb = {k: v.string_value for k, v in b.parameters.items()}
    diffs += [f"{k} {_short(pa.get(k))} vs {_short(pb.get(k))}" for k in sorted(set(pa) | set(pb))
              if pa.get(k) != pb.get(k)]
    return ", ".join(diffs) or "the generated text differs"


def _check_addition(spec: RepoSpec, out: Path, manifest: dict, rendered: list[RenderedModel], force: bool) -> None:
    """Refuses a write into an existing repository that would touch another model or an existing version."""
    for folder in model_folders(spec.name):
        owner = _owner(manifest, folder)
        if (out / folder).exists() and owner != spec.name:
            what = f"model {owner!r}" if owner else "a model tritonize.json does not list"
            raise RenderError(
                f"{out / folder} belongs to {what}: choose another --model-name so the two do not collide"
            )
    if spec.name not in manifest["models"]:
        return
    present = set(model_versions(manifest["models"][spec.name])) | {
        p.name for p in (out / f"{spec.name}_engine").glob("*") if p.is_dir() and p.name.isdigit()
    }
    if str(spec.version) in present and not force:
        raise RenderError(
            f"{out} already exists and holds version {spec.version} of {spec.name!r}: pass --force to replace that version, "
            f"or choose another --model-version"
        )
    if not present - {str(spec.version)}:
        return
    for model in rendered:
        path = out / model.folder / "config.pbtxt"
        if path.is_file() and path.read_text(encoding="utf-8") != model.config:
            raise RenderError(
                f"{path}: version {spec.version} needs other settings than the versions already there "
                f"({_config_differences(path.read_text(encoding='utf-8'), model.config)}), and Triton reads one "
                f"config per model: generate with the same options, or choose another --model-name"
            )


def _move_in(spec: RepoSpec, tmp: Path, out: Path, trash: Path) -> None:
    """Moves the staged folders of one model version into ``out``, the old ones (if any) into ``trash``."""
    version = str(spec.version)
    for folder in model_folders(spec.name):
        staged, dest = tmp / folder, out / folder
        if not dest.exists():
            os.rename(staged, dest)
            continue
        if (dest / version).exists():
            os.rename(dest / version, trash / f"{folder}-{version}")
        os.rename(staged / version, dest / version)
        new_config = (staged / "config.pbtxt").read_text(encoding="utf-8")
        old_config = dest / "config.pbtxt"
        if not old_config.is_file() or old_config.read_text(encoding="utf-8") != new_config:
            os.replace(staged / "config.pbtxt", dest / "config.pbtxt")


def write_repository(spec: RepoSpec, ckpt: Checkpoint, output: str | Path, *, force: bool = False,
                     progress: bool = True, engine_dir: Path | None = None) -> Path:
    """Writes version ``spec.version`` of model ``spec.name`` at ``output``; returns the repository path.

    A new ``output`` gets a whole repository. An existing tritonize repository gains the model or the
    version beside what it holds, which stays untouched; replacing a version that is there needs
    ``force`` and replaces only that version's folders. Any other existing ``output`` is replaced
    only with ``force``.
    """
    out = Path(output).resolve()
    if out.exists() and not out.is_dir():
        raise RenderError(f"{out} exists and is not a directory: remove it or choose another --output")
    manifest = read_manifest(out) if out.exists() else None
    if out.exists() and manifest is None and not force:
        raise RenderError(
            f"{out} already exists and is not a tritonize repository (no {REPOSITORY_MANIFEST}): pass --force to replace "
            f"it, or choose another --output"
        )
    adapters = prepare_adapters(spec, ckpt)
    chat_template = served_chat_template(spec, ckpt)
    rendered = render_models(spec, ckpt, adapters, chat_template)
    _check(rendered)
    if manifest is not None:
        _check_addition(spec, out, manifest, rendered, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        staged = _stage(spec, ckpt, rendered, tmp, progress, adapters, engine_dir, chat_template)
        entry = staged["models"][spec.name]
        if manifest is None:
            staged["models"][spec.name] = _merge_entry(None, spec.version, entry)
            (tmp / REPOSITORY_MANIFEST).write_text(json.dumps(staged, indent=2) + "\n", encoding="utf-8")
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.rename(out, old / "repo")
                os.rename(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out)
            return out
        manifest["models"][spec.name] = _merge_entry(manifest["models"].get(spec.name), spec.version, entry)
        manifest["created"] = staged["created"]
        manifest["versions"] = staged["versions"]
        (tmp / REPOSITORY_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        trash = tmp / ".replaced"
        trash.mkdir()
        _move_in(spec, tmp, out, trash)
        os.replace(tmp / REPOSITORY_MANIFEST, out / REPOSITORY_MANIFEST)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
