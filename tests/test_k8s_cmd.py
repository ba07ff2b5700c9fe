"""`tritonize k8s`: the manifests parse as YAML and ask Kubernetes for what serving the repository needs.

Nothing here reaches a cluster; the manifests are checked field by field against what the Deployment,
Service and PersistentVolumeClaim APIs expect.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tritonize.cli.main import cli
from tritonize.export.demo_model import write_demo_checkpoint
from tritonize.repository.build import build_repository
from tritonize.repository.spec import RepoSpec


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    ckpt = write_demo_checkpoint(tmp_path_factory.mktemp("k8s-llama") / "ckpt", hidden=32, layers=2, seed=1)
    spec = RepoSpec(name="Tiny_Llama.v1", max_batch_size=2, max_input_len=16, max_output_len=8, device="cuda",
                    dtype="float32")
    return build_repository(ckpt, tmp_path_factory.mktemp("k8s-repo") / "repo", spec, force=False, progress=False)


def _load(folder: Path) -> dict[str, dict]:
    docs = {}
    for path in sorted(folder.glob("*.yaml")):
        (doc,) = list(yaml.safe_load_all(path.read_text()))
        docs[doc["kind"]] = doc
    return docs


def test_manifests_with_a_claim(repo, tmp_path):
    out = tmp_path / "k8s"
    result = CliRunner().invoke(cli, ["k8s", str(repo), "--output", str(out), "--gpus", "2"])
    assert result.exit_code == 0, result.output
    docs = _load(out)
    assert set(docs) == {"Deployment", "Service", "PersistentVolumeClaim", "Pod", "ServiceMonitor"}

    dep = docs["Deployment"]
    assert dep["apiVersion"] == "apps/v1" and dep["metadata"]["name"] == "tiny-llama-v1"
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8002"
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    assert container["args"] == ["tritonserver", "--model-repository=/models"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and ports[get["port"]] == 8000
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["models"]["mountPath"] == "/models" and mounts["models"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert docs["Pod"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory" and mounts["dshm"]["mountPath"] == "/dev/shm"
    assert docs["PersistentVolumeClaim"]["spec"]["resources"]["requests"]["storage"].endswith("Gi")

    svc = docs["Service"]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        "http": (8000, "http"), "grpc": (8001, "grpc"), "metrics": (8002, "metrics")}
    assert svc["metadata"]["annotations"]["prometheus.io/port"] == "8002"

    monitor = docs["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["name"] == "tiny-llama-v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]}[endpoint["port"]] == 8002


def test_service_monitor_labels_or_none(repo, tmp_path):
    out = tmp_path / "k8s"
    result = CliRunner().invoke(cli, ["k8s", str(repo), "--output", str(out), "--monitor-label", "release=prometheus",
                                      "--monitor-label", "example.com/team=llm"])
    assert result.exit_code == 0, result.output
    labels = _load(out)["ServiceMonitor"]["metadata"]["labels"]
    assert labels == {"app.kubernetes.io/name": "tiny-llama-v1", "release": "prometheus", "example.com/team": "llm"}
    none = CliRunner().invoke(cli, ["k8s", str(repo), "--output", str(tmp_path / "k2"), "--no-service-monitor"])
    assert none.exit_code == 0 and "ServiceMonitor" not in _load(tmp_path / "k2")
    bad = CliRunner().invoke(cli, ["k8s", str(repo), "--output", str(tmp_path / "k3"), "--monitor-label", "x y=1"])
    assert bad.exit_code != 0 and "is not a Kubernetes label KEY=VALUE" in bad.output
    assert not (tmp_path / "k3").exists()


def test_host_path_and_options(repo, tmp_path):
    out = tmp_path / "k8s"
    result = CliRunner().invoke(cli, ["k8s", str(repo), "--output", str(out), "--host-path", "/srv/models/tiny",
                                      "--name", "llm", "--replicas", "3", "--image", "registry.local/triton:1"])
    assert result.exit_code == 0, result.output
    docs = _load(out)
    assert set(docs) == {"Deployment", "Service", "ServiceMonitor"}
    dep = docs["Deployment"]
    assert dep["metadata"]["name"] == "llm" and dep["spec"]["replicas"] == 3
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["models"]["hostPath"] == {"path": "/srv/models/tiny", "type": "Directory"}
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/triton:1"


def test_bad_input_is_one_line_and_writes_nothing(repo, tmp_path):
    runner = CliRunner()
    out = tmp_path / "k8s"
    cases = [
        (["--name", "Bad_Name"], "Kubernetes name"),
        (["--gpus", "0"], "--device cuda"),
        (["--host-path", "relative/dir"], "absolute path"),
        (["--memory", "lots"], "memory quantity"),
        (["--image", "a b"], "container image"),
    ]
    for extra, message in cases:
        result = runner.invoke(cli, ["k8s", str(repo), "--output", str(out), *extra])
        assert result.exit_code != 0 and message in result.output, (extra, result.output)
        assert not out.exists()
    not_repo = runner.invoke(cli, ["k8s", str(tmp_path), "--output", str(out)])
    assert not_repo.exit_code != 0 and "tritonize.json" in not_repo.output
    assert runner.invoke(cli, ["k8s", str(repo), "--output", str(out)]).exit_code == 0
    again = runner.invoke(cli, ["k8s", str(repo), "--output", str(out)])
    assert again.exit_code != 0 and "--force" in again.output
    assert runner.invoke(cli, ["k8s", str(repo), "--output", str(out), "--force"]).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k8s"]
