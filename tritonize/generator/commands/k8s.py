"""`tritonize k8s REPO`: Kubernetes manifests that serve a generated repository with the stock Triton image.

The repository reaches the pod through a volume (a PersistentVolumeClaim filled with `kubectl cp`, or a
node's hostPath) mounted read-only at /models; the container runs the image's own
`tritonserver --model-repository=/models`. Every value is validated or quoted before it reaches a
template, and the manifests are written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import click
import jinja2

import tritonize

from ..manifest import MANIFEST
from ..server import model_names

TEMPLATES = Path(__file__).resolve().parents[2] / "templates" / "k8s"
DEFAULT_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$")

_EPILOG = """\b
Examples:
  tritonize k8s ./repo --output ./k8s
  tritonize k8s ./repo --name llama-8b --gpus 1 --image registry.example.com/triton-llm:24.10
  tritonize k8s ./repo --host-path /srv/models/llama --output ./k8s

\b
Files: deployment.yaml, service.yaml and, with a claim (the default), pvc.yaml and copy-pod.yaml.
Rollout: examples/kubernetes/README.md. The stock image has no torch: serve with an image built
FROM it that adds the repository's Python requirements (the README shows the Dockerfile).
"""


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
    path = repo / MANIFEST
    if not path.is_file():
        raise click.ClickException(f"{repo} has no {MANIFEST}: pass a repository written by `tritonize generate`")
    try:
        models = json.loads(path.read_text())["models"]
        name, entry = next(iter(models.items()))
    except (ValueError, KeyError, StopIteration, AttributeError):
        raise click.ClickException(f"{path} is not a tritonize manifest; regenerate the repository") from None
    if name not in model_names(repo):
        raise click.ClickException(f"{repo} has no model folder {name!r} although {MANIFEST} names it; "
                                   "regenerate the repository")
    return name, entry.get("options", {}) if isinstance(entry, dict) else {}


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _storage_for(repo: Path) -> str:
    """Twice the repository's size in whole GiB (at least 1): room for a second version."""
    gib = 1 << 30
    return f"{max(1, -(-2 * _dir_size(repo) // gib))}Gi"


def _check(value: str, pattern: re.Pattern[str], what: str, example: str) -> str:
    if not pattern.match(value):
        raise click.BadParameter(f"{value!r} is not a valid {what}, e.g. {example}")
    return value


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
        "repo_name": repo.name, "version": tritonize.__version__,
    }
    files = ["deployment.yaml", "service.yaml"] + ([] if host_path else ["pvc.yaml", "copy-pod.yaml"])
    return {f: env.get_template(f"{f}.j2").render(**values) for f in files}


def write_manifests(files: dict[str, str], output: Path, *, force: bool) -> None:
    if output.exists() and not force:
        raise click.ClickException(f"{output} already exists: pass --force to replace it, or another --output")
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


@click.command("k8s", epilog=_EPILOG)
@click.argument("repo", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--image", default=DEFAULT_IMAGE, show_default=True,
              help="Triton image; it needs torch, numpy<2, tokenizers, sentencepiece and safetensors.")
@click.option("--name", default=None, help="Name of the Deployment and Service (default: from the model name).")
@click.option("--gpus", type=click.IntRange(0), default=1, show_default=True,
              help="nvidia.com/gpu per pod; 0 for a CPU repository.")
@click.option("--replicas", type=click.IntRange(1), default=1, show_default=True)
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for the manifests (default: ./k8s-NAME).")
@click.option("--host-path", default=None,
              help="Mount this node directory holding the repository instead of a PersistentVolumeClaim.")
@click.option("--claim", default=None, help="PersistentVolumeClaim name (default: NAME-models).")
@click.option("--storage", default=None, help="Claim size (default: twice the repository, in Gi).")
@click.option("--access-mode", type=click.Choice(["ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany"]),
              default="ReadWriteOnce", show_default=True,
              help="Claim access mode; replicas on several nodes need ReadWriteMany.")
@click.option("--service-type", type=click.Choice(["ClusterIP", "NodePort", "LoadBalancer"]), default="ClusterIP",
              show_default=True)
@click.option("--cpu", default="2", show_default=True, help="CPU request per pod.")
@click.option("--memory", default="16Gi", show_default=True, help="Memory request and limit per pod.")
@click.option("--force", is_flag=True, help="Replace an existing --output directory.")
def k8s(repo: Path, image: str, name: str | None, gpus: int, replicas: int, output: Path | None,
        host_path: str | None, claim: str | None, storage: str | None, access_mode: str, service_type: str,
        cpu: str, memory: str, force: bool) -> None:
    """Write Kubernetes manifests (Deployment, Service, volume) that serve REPO with tritonserver."""
    model, options = _repository_model(repo)
    if options.get("device") == "cuda" and gpus == 0:
        raise click.ClickException(f"{repo} was generated with --device cuda: give it --gpus 1 or more, "
                                   "or regenerate it with --device cpu")
    name = _check(name or k8s_name(model), _DNS_LABEL, "Kubernetes name (lower-case letters, digits, '-')",
                  "llama-8b")
    if claim is not None:
        _check(claim, _DNS_LABEL, "claim name (lower-case letters, digits, '-')", "llama-models")
    _check(image, _IMAGE, "container image", DEFAULT_IMAGE)
    for value, what in ((storage, "storage size"), (cpu, "CPU quantity"), (memory, "memory quantity")):
        if value is not None:
            _check(value, _QUANTITY, what, "16Gi")
    if host_path is not None and not host_path.startswith("/"):
        raise click.BadParameter(f"{host_path!r} must be an absolute path on the node, e.g. /srv/models/{model}")
    output = output or Path(f"k8s-{name}")
    files = render_manifests(repo, name=name, image=image, gpus=gpus, replicas=replicas, host_path=host_path,
                             claim=claim, storage=storage, access_mode=access_mode, service_type=service_type,
                             cpu=cpu, memory=memory)
    write_manifests(files, output, force=force)
    click.echo(f"wrote {', '.join(files)} to {output} (model {model!r}, Deployment and Service {name!r})")
    if options.get("device") == "cpu" and gpus > 0:
        click.echo(f"note: {repo} was generated with --device cpu; the GPU request will sit unused", err=True)
    click.echo("rollout: see examples/kubernetes/README.md")
