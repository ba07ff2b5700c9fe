"""Kubernetes manifests that serve a generated repository with the stock Triton image.

The repository reaches the pod through a volume (a PersistentVolumeClaim filled with `kubectl cp`, or a
node's hostPath) mounted read-only at /models; the container runs the image's own
`tritonserver --model-repository=/models`. Every value is validated (by the command) or quoted before it
reaches a template, and the manifests are written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from ..errors import RenderError
from ..version import __version__
from .layout import REPOSITORY_MANIFEST, model_names

TEMPLATES = Path(__file__).resolve().parent / "templates" / "k8s"
DEFAULT_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")
IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$")


def k8s_name(text: str) -> str:
    """A DNS-1123 label from a Triton model name: lower case, '_' and '.' become '-'."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].rstrip("-")
    return name or "triton"


def _yamlstr(value: object) -> str:
    """A double-quoted YAML scalar; JSON string escaping is a subset of YAML's."""
    return json.dumps(str(value))


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    env.filters["yamlstr"] = _yamlstr
    return env


def _repository_model(repo: Path) -> tuple[str, dict]:
    """The ensemble's name and its generate options, from tritonize.json."""
    path = repo / REPOSITORY_MANIFEST
    if not path.is_file():
        raise RenderError(f"{repo} has no {REPOSITORY_MANIFEST}: pass a repository written by `tritonize generate`")
    try:
        models = json.loads(path.read_text())["models"]
        name, entry = next(iter(models.items()))
    except (ValueError, KeyError, StopIteration, AttributeError):
        raise RenderError(f"{path} is not a tritonize manifest; regenerate the repository") from None
    if name not in model_names(repo):
        raise RenderError(f"{repo} has no model folder {name!r} although {REPOSITORY_MANIFEST} names it; "
                          "regenerate the repository")
    return name, entry.get("options", {}) if isinstance(entry, dict) else {}


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _storage_for(repo: Path) -> str:
    """Twice the repository's size in whole GiB (at least 1): room for a second version."""
    gib = 1 << 30
    return f"{max(1, -(-2 * _dir_size(repo) // gib))}Gi"


def render_manifests(repo: Path, *, name: str, image: str, gpus: int, replicas: int = 1,
                     host_path: str | None = None, claim: str | None = None, storage: str | None = None,
                     access_mode: str = "ReadWriteOnce", service_type: str = "ClusterIP", cpu: str = "2",
                     memory: str = "16Gi", shm_size: str = "1Gi", startup_minutes: int = 20,
                     copy_image: str = "busybox:1.36") -> dict[str, str]:
    """File name -> manifest text, in memory."""
    env = _environment()
    claim = claim or f"{name}-models"
    values = {
        "name": name, "image": image, "gpus": gpus, "replicas": replicas, "host_path": host_path,
        "claim": claim, "storage": storage or _storage_for(repo), "access_mode": access_mode,
        "service_type": service_type, "cpu": cpu, "memory": memory, "shm_size": shm_size,
        "startup_failures": max(1, startup_minutes * 6), "copy_image": copy_image,
        "repo_name": repo.name, "version": __version__,
    }
    files = ["deployment.yaml", "service.yaml"] + ([] if host_path else ["pvc.yaml", "copy-pod.yaml"])
    return {f: env.get_template(f"{f}.j2").render(**values) for f in files}


def write_manifests(files: dict[str, str], output: Path, *, force: bool) -> None:
    if output.exists() and not force:
        raise RenderError(f"{output} already exists: pass --force to replace it, or another --output")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        for file, text in files.items():
            (tmp / file).write_text(text)
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise




@dataclass
class K8sResult:
    files: dict[str, str]  # file name -> manifest text, as written
    model: str  # the ensemble served
    name: str  # of the Deployment and Service
    notes: list[str] = field(default_factory=list)


def repository_gpus(options: dict) -> int:
    """GPUs a pod needs for a repository's generate options: one per rank (tensor x pipeline parallelism);
    none for a --device cpu one."""
    if options.get("device") == "cpu":
        return 0
    return int(options.get("tensor_parallel_size") or 1) * int(options.get("pipeline_parallel_size") or 1)


def k8s_manifests(repo: Path, output: Path | None, *, name: str | None, force: bool, gpus: int | None,
                  **values: object) -> K8sResult:
    """Writes the manifests for ``repo`` to ``output`` (default ./k8s-NAME); ``values`` as render_manifests.

    ``name`` None is the ensemble's name made a DNS label; ``gpus`` None what the repository needs. The
    values the user typed are checked by the command (``DNS_LABEL``, ``IMAGE``, ``QUANTITY``); this checks
    them against the repository.
    """
    model, options = _repository_model(repo)
    needed = repository_gpus(options)
    if gpus is None:
        gpus = needed
    if options.get("device") == "cuda" and gpus == 0:
        raise RenderError(f"{repo} was generated with --device cuda: give it --gpus 1 or more, "
                          "or regenerate it with --device cpu")
    if needed > 1 and 0 < gpus < needed:
        raise RenderError(f"{repo} is split over {needed} GPUs (tensor x pipeline parallelism): give it --gpus "
                          f"{needed} or more, or regenerate it with a smaller --tensor-parallelism-size")
    name = name or k8s_name(model)
    output = output or Path(f"k8s-{name}")
    files = render_manifests(repo, name=name, gpus=gpus, **values)
    write_manifests(files, output, force=force)
    notes = []
    if options.get("device") == "cpu" and gpus > 0:
        notes.append(f"note: {repo} was generated with --device cpu; the GPU request will sit unused")
    return K8sResult(files, model, name, notes)
