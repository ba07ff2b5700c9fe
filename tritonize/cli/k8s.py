"""`tritonize k8s REPO`: Kubernetes manifests that serve a generated repository (see repository/k8s.py)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from ..errors import TritonizeError
from ..repository.k8s import DEFAULT_IMAGE, DNS_LABEL, IMAGE, QUANTITY, k8s_manifests

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


def _check(value: str, pattern: re.Pattern[str], what: str, example: str) -> str:
    if not pattern.match(value):
        raise click.BadParameter(f"{value!r} is not a valid {what}, e.g. {example}")
    return value


@click.command("k8s", epilog=_EPILOG)
@click.argument("repo", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--image", default=DEFAULT_IMAGE, show_default=True,
              help="Triton image; it needs torch, numpy<2, tokenizers, sentencepiece and safetensors.")
@click.option("--name", default=None, help="Name of the Deployment and Service (default: from the model name).")
@click.option("--gpus", type=click.IntRange(0), default=None,
              help="nvidia.com/gpu per pod (default: what the repository needs: one per tensor-parallel rank, "
                   "0 for a --device cpu repository).")
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
def k8s(repo: Path, image: str, name: str | None, gpus: int | None, replicas: int, output: Path | None,
        host_path: str | None, claim: str | None, storage: str | None, access_mode: str, service_type: str,
        cpu: str, memory: str, force: bool) -> None:
    """Write Kubernetes manifests (Deployment, Service, volume) that serve REPO with tritonserver."""
    if name is not None:
        _check(name, DNS_LABEL, "Kubernetes name (lower-case letters, digits, '-')", "llama-8b")
    if claim is not None:
        _check(claim, DNS_LABEL, "claim name (lower-case letters, digits, '-')", "llama-models")
    _check(image, IMAGE, "container image", DEFAULT_IMAGE)
    for value, what in ((storage, "storage size"), (cpu, "CPU quantity"), (memory, "memory quantity")):
        if value is not None:
            _check(value, QUANTITY, what, "16Gi")
    if host_path is not None and not host_path.startswith("/"):
        raise click.BadParameter(f"{host_path!r} must be an absolute path on the node, e.g. /srv/models/<model>")
    try:
        result = k8s_manifests(repo, output, name=name, force=force, image=image, gpus=gpus, replicas=replicas,
                               host_path=host_path, claim=claim, storage=storage, access_mode=access_mode,
                               service_type=service_type, cpu=cpu, memory=memory)
    except TritonizeError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {', '.join(result.files)} to {output or Path(f'k8s-{result.name}')} (model {result.model!r}, "
               f"Deployment and Service {result.name!r})")
    for note in result.notes:
        click.echo(note, err=True)
    click.echo("rollout: see examples/kubernetes/README.md")
