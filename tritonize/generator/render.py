"""Renders a model repository from the Jinja templates, atomically.

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

import tritonize
from tritonize import backend as backend_pkg

from . import interface as wire
from .checkpoint import Checkpoint
from .errors import RenderError
from .manifest import build_manifest
from .spec import RepoSpec

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
BACKEND_SRC = Path(backend_pkg.__file__).resolve().parent
BACKEND_PACKAGE = "tritonize_backend"


def _pbstr(value: object) -> str:
    """A protobuf text-format string literal; json escaping is a valid subset of it."""
    return json.dumps(str(value))


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
    model_py: str | None


def render_models(spec: RepoSpec, ckpt: Checkpoint) -> list[RenderedModel]:
    """The config.pbtxt / model.py text of each model, in memory."""
    env = _environment()
    common = {"spec": spec, "version": tritonize.__version__}
    max_num_tokens = spec.max_num_tokens or spec.max_input_len
    engine_params = {
        "runtime": spec.runtime,
        "weights_dir": "weights",
        "device": spec.device,
        "dtype": spec.dtype,
        "max_batch_size": spec.max_batch_size,
        "max_input_len": spec.max_input_len,
        "max_output_len": spec.max_output_len,
        "max_num_tokens": max_num_tokens,
    }
    tokenizer_params = {
        "tokenizer_dir": "tokenizer",
        "max_input_len": spec.max_input_len,
        "max_output_len": spec.max_output_len,
        "end_ids": json.dumps(ckpt.end_ids),
        "pad_id": ckpt.pad_id,
    }
    instance_kind = "KIND_GPU" if spec.device == "cuda" else "KIND_CPU"
    models = {
        spec.name: ("ensemble", {"ensemble_inputs": wire.ENSEMBLE_INPUTS, "ensemble_outputs": wire.ENSEMBLE_OUTPUTS,
                                 "steps": wire.ensemble_steps(spec.name)}),
        f"{spec.name}_preprocessing": ("preprocessing", {"inputs": wire.PRE_INPUTS, "outputs": wire.PRE_OUTPUTS,
                                                         "params": tokenizer_params}),
        f"{spec.name}_engine": ("engine", {"inputs": wire.ENGINE_INPUTS, "outputs": wire.ENGINE_OUTPUTS,
                                           "params": engine_params, "instance_kind": instance_kind}),
        f"{spec.name}_postprocessing": ("postprocessing", {"inputs": wire.POST_INPUTS, "outputs": wire.POST_OUTPUTS,
                                                           "params": {"tokenizer_dir": "tokenizer"}}),
        f"{spec.name}_sync": ("sync", {"inputs": wire.ENSEMBLE_INPUTS, "outputs": wire.ENSEMBLE_OUTPUTS,
                                       "params": {"ensemble_name": spec.name}}),
    }
    rendered = []
    for folder, (template, context) in models.items():
        config = env.get_template(f"{template}/config.pbtxt.j2").render(**common, **context)
        model_py = None
        if (TEMPLATES / template / "model.py.j2").is_file():
            model_py = env.get_template(f"{template}/model.py.j2").render(**common, **context)
        rendered.append(RenderedModel(folder, config, model_py))
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


def _copy_backend(dst: Path) -> None:
    shutil.copytree(
        BACKEND_SRC, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "CONTRACT.md")
    )


def write_repository(spec: RepoSpec, ckpt: Checkpoint, output: str | Path, *, force: bool = False,
                     progress: bool = True) -> Path:
    """Writes the repository for ``ckpt`` at ``output``; returns its path."""
    spec.validate()
    out = Path(output).resolve()
    if out.exists() and not force:
        raise RenderError(f"{out} already exists: pass --force to replace it, or choose another --output")
    if out.exists() and not out.is_dir():
        raise RenderError(f"{out} exists and is not a directory: remove it or choose another --output")
    rendered = render_models(spec, ckpt)
    _check(rendered)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for model in rendered:
            folder = tmp / model.folder
            version_dir = folder / str(spec.version)
            version_dir.mkdir(parents=True)
            (folder / "config.pbtxt").write_text(model.config, encoding="utf-8")
            if model.model_py is not None:
                (version_dir / "model.py").write_text(model.model_py, encoding="utf-8")
        for suffix in ("preprocessing", "postprocessing", "engine"):
            _copy_backend(tmp / f"{spec.name}_{suffix}" / str(spec.version) / BACKEND_PACKAGE)
        for suffix in ("preprocessing", "postprocessing"):
            tok_dir = tmp / f"{spec.name}_{suffix}" / str(spec.version) / "tokenizer"
            tok_dir.mkdir()
            for f in ckpt.tokenizer_files:
                shutil.copy2(f, tok_dir / f.name)
        weights_dir = tmp / f"{spec.name}_engine" / str(spec.version) / "weights"
        weights_dir.mkdir()
        for f in [ckpt.path / "config.json", *ckpt.tokenizer_files]:
            shutil.copy2(f, weights_dir / f.name)
        for f in tqdm(ckpt.weight_files, desc="weights", unit="file", disable=not progress):
            _link_or_copy(f, weights_dir / f.name)
        manifest = build_manifest(spec, ckpt, tmp, progress=progress)
        (tmp / "tritonize.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "repo")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
