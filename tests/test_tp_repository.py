"""--tensor-parallelism-size on the torch runtime, from the command line to the repository: generate checks the
split and records it, validate, k8s and the launch follow it, deploy and the Python API pass it through."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from deploy_source import nemo2_llama

from tritonize.api import Exporter
from tritonize.cli.main import cli
from tritonize.export.demo_model import write_demo_checkpoint
from tritonize.repository.render import parse_config
from tritonize.serving.launch import LaunchPlan, repository_launch


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    # 4 heads, 2 key/value heads, intermediate 128
    return write_demo_checkpoint(tmp_path_factory.mktemp("tp-repo") / "ckpt", hidden=32, layers=2, seed=2)


def _generate(ckpt: Path, out: Path, *args: str):
    return CliRunner().invoke(cli, ["generate", "-c", str(ckpt), "-o", str(out), "-n", "m", "--max-input-len", "16",
                                    "--max-output-len", "8", *args])


def _engine_config(repo: Path):
    return parse_config((repo / "m_engine" / "config.pbtxt").read_text())


def test_generate_records_the_split(ckpt, tmp_path):
    result = _generate(ckpt, tmp_path / "repo", "--device", "cuda", "--tensor-parallelism-size", "4")
    assert result.exit_code == 0, result.output
    assert "split:  tensor parallelism 4 (one process per GPU, started by m_engine)" in result.output
    config = _engine_config(tmp_path / "repo")
    assert config.parameters["tensor_parallel_size"].string_value == "4"
    (group,) = config.instance_group
    assert (group.count, list(group.gpus)) == (1, [0])  # one instance; its workers take the next GPUs
    manifest = json.loads((tmp_path / "repo" / "tritonize.json").read_text())
    assert manifest["models"]["m"]["options"]["tensor_parallel_size"] == 4
    assert repository_launch(tmp_path / "repo") == LaunchPlan(1, "leader", ())  # one tritonserver, no mpirun
    validated = CliRunner().invoke(cli, ["validate", str(tmp_path / "repo")])
    assert validated.exit_code == 0, validated.output


@pytest.mark.parametrize("args, message", [
    (["--tensor-parallelism-size", "3"], "--tensor-parallelism-size 3: 4 attention heads cannot be split over 3 ranks"),
    (["--tensor-parallelism-size", "8"], "--tensor-parallelism-size 8: 4 attention heads cannot be split over 8 ranks"),
    (["--tensor-parallelism-size", "2", "--instance-count", "2"], "--instance-count 2 with --tensor-parallelism-size 2"),
    (["--pipeline-parallelism-size", "2"], "--pipeline-parallelism-size above 1 needs --runtime trtllm or "
                                           "trtllm-engine (pipeline parallelism is TensorRT-LLM only"),
])
def test_generate_refuses_a_split_that_cannot_be(ckpt, tmp_path, args, message):
    result = _generate(ckpt, tmp_path / "repo", *args)
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "repo").exists()


def test_validate_follows_the_split(ckpt, tmp_path):
    repo = tmp_path / "repo"
    assert _generate(ckpt, repo, "--device", "cpu", "--tensor-parallelism-size", "2").exit_code == 0
    config = repo / "m_engine" / "config.pbtxt"
    text = config.read_text()
    edited = text.replace('key: "tensor_parallel_size"\n  value: { string_value: "2" }',
                          'key: "tensor_parallel_size"\n  value: { string_value: "4" }')
    assert edited != text
    config.write_text(edited)
    result = CliRunner().invoke(cli, ["validate", str(repo)])
    assert result.exit_code != 0
    assert "m_engine/config.pbtxt: parameter tensor_parallel_size is 4 but tritonize.json says 2" in result.output

    manifest = json.loads((repo / "tritonize.json").read_text())
    for entry in (manifest["models"]["m"], *manifest["models"]["m"]["versions"].values()):
        entry["options"]["tensor_parallel_size"] = 3
    (repo / "tritonize.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(cli, ["validate", str(repo)])
    assert "tensor parallelism 3: 4 attention heads cannot be split over 3 ranks" in result.output


def test_k8s_asks_for_a_gpu_per_rank(ckpt, tmp_path):
    repo = tmp_path / "repo"
    assert _generate(ckpt, repo, "--device", "cuda", "--tensor-parallelism-size", "2").exit_code == 0
    result = CliRunner().invoke(cli, ["k8s", str(repo), "--output", str(tmp_path / "k8s")])
    assert result.exit_code == 0, result.output
    (doc,) = yaml.safe_load_all((tmp_path / "k8s" / "deployment.yaml").read_text())
    assert doc["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    short = CliRunner().invoke(cli, ["k8s", str(repo), "--output", str(tmp_path / "k8s1"), "--gpus", "1"])
    assert short.exit_code != 0 and "is split over 2 GPUs" in short.output and "--gpus 2" in short.output
    cpu = tmp_path / "cpu"
    assert _generate(ckpt, cpu, "--device", "cpu").exit_code == 0
    assert CliRunner().invoke(cli, ["k8s", str(cpu), "--output", str(tmp_path / "k8s-cpu")]).exit_code == 0
    (doc,) = yaml.safe_load_all((tmp_path / "k8s-cpu" / "deployment.yaml").read_text())
    assert "nvidia.com/gpu" not in doc["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_deploy_takes_nemos_spelling_for_the_torch_runtime(tmp_path):
    source = nemo2_llama(tmp_path / "src")
    result = CliRunner().invoke(cli, ["deploy", "--nemo_checkpoint", str(source.path), "--triton_model_repository",
                                      str(tmp_path / "repo"), "--tensor_parallelism_size", "2", "--max_input_len",
                                      "32", "--max_output_len", "16", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "would export" in result.output


def test_the_python_api_splits_the_engine_and_the_repository(ckpt, tmp_path):
    one = Exporter(tmp_path / "one", device="cpu", dtype="float32", max_input_len=16, max_output_len=8)
    one.export(ckpt, max_input_len=16, max_output_len=8)
    split = Exporter(tmp_path / "split", device="cpu", dtype="float32", max_input_len=16, max_output_len=8)
    split.export(ckpt, tensor_parallelism_size=2, max_input_len=16, max_output_len=8)
    try:
        assert split._engine.tensor_parallel_size == 2
        prompts = ["hello there", "one two three"]
        assert split.forward(prompts, max_output_token=6) == one.forward(prompts, max_output_token=6)
        from tritonize.api import Deployment

        assert Deployment(model=split)._spec().tensor_parallel_size == 2
    finally:
        one.close()
        split.close()
