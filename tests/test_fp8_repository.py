"""FP8 in generated repositories, without a server: what generate writes and records, what validate catches."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from fixtures.fp8 import write_fp8_checkpoint
from safetensors.torch import load_file, save_file

from tritonize.cli.main import cli
from tritonize.export.demo_model import write_demo_checkpoint
from tritonize.repository.validate import validate_repository

LIMITS = ["--device", "cpu", "--max-batch-size", "2", "--max-input-len", "32", "--max-output-len", "16"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    work = tmp_path_factory.mktemp("fp8-repo")
    ckpt = write_demo_checkpoint(work / "float", hidden=64, layers=2, seed=2)
    fp8, _ = write_fp8_checkpoint(ckpt, work, "compressed-tensors")
    return ckpt, fp8


def _generate(source, repo, *extra):
    return CliRunner().invoke(cli, ["generate", "-c", str(source), "-o", str(repo), "-n", "m", *LIMITS, *extra])


def _entry(repo):
    return json.loads((repo / "tritonize.json").read_text())["models"]["m"]


def _problems(repo):
    return [str(p) for p in validate_repository(repo).problems]


def test_an_fp8_checkpoint_is_linked_as_it_is(ckpts, tmp_path):
    _, fp8 = ckpts
    run = _generate(fp8, tmp_path / "r", "--quantization", "fp8")
    assert run.exit_code == 0, run.output
    assert "FP8:    weights fp8 (the checkpoint's), KV cache fp8" in run.output
    weights = tmp_path / "r" / "m_engine" / "1" / "weights"
    assert os.path.samefile(weights / "model.safetensors", fp8 / "model.safetensors")
    assert _entry(tmp_path / "r")["quantization"] == {
        "weights": "fp8", "format": "compressed-tensors", "block": None, "activations": "dynamic",
        "origin": "the checkpoint's", "kv_cache": "fp8"}
    assert _problems(tmp_path / "r") == []


def test_quantization_none_dequantizes_an_fp8_checkpoint(ckpts, tmp_path):
    _, fp8 = ckpts
    run = _generate(fp8, tmp_path / "r", "--quantization", "none", "--use-fp8-kv-cache", "false")
    assert run.exit_code == 0, run.output
    tensors = load_file(str(next((tmp_path / "r" / "m_engine" / "1" / "weights").glob("model*.safetensors"))))
    assert all(t.dtype != torch.float8_e4m3fn for t in tensors.values())
    entry = _entry(tmp_path / "r")
    assert entry["quantization"]["origin"] == "FP8 dequantized at generate time"
    assert entry["quantization"]["kv_cache"] == "model dtype" and entry["options"]["kv_cache_dtype"] == "model"
    assert _problems(tmp_path / "r") == []


def test_validate_catches_fp8_weights_that_do_not_add_up(ckpts, tmp_path):
    ckpt, _ = ckpts
    repo = tmp_path / "r"
    assert _generate(ckpt, repo, "--quantization", "fp8").exit_code == 0
    weights = repo / "m_engine" / "1" / "weights"
    config = json.loads((weights / "config.json").read_text())
    del config["quantization_config"]
    (weights / "config.json").write_text(json.dumps(config))
    shard = next(weights.glob("model*.safetensors"))
    tensors = load_file(str(shard))
    del tensors["model.layers.0.mlp.down_proj.weight_scale"]
    tensors["model.layers.0.self_attn.o_proj.weight"] = tensors["model.layers.0.self_attn.o_proj.weight"].to(
        torch.float8_e5m2)
    os.unlink(shard)  # a hard link into the generate's staging copy: write a new file
    save_file(tensors, str(shard))
    engine_config = repo / "m_engine" / "config.pbtxt"
    engine_config.write_text(engine_config.read_text().replace("parameters", 'parameters: { key: "kv_cache_dtype" '
                                                               'value: { string_value: "fp8" } }\nparameters', 1))
    problems = "\n".join(_problems(repo))
    assert "FP8 tensor model.layers.0.mlp.down_proj.weight has no model.layers.0.mlp.down_proj.weight_scale" in problems
    assert "tensor model.layers.0.self_attn.o_proj.weight is F8_E5M2, which the torch runtime does not read" in problems
    assert "declares no FP8 quantization_config" in problems
    assert "parameter kv_cache_dtype is 'fp8' but tritonize.json says 'auto'" in problems


def test_generate_refuses_a_quantization_the_torch_runtime_cannot_run(ckpts, tmp_path):
    ckpt, _ = ckpts
    awq = tmp_path / "awq"
    awq.mkdir()
    for f in ckpt.iterdir():
        (awq / f.name).write_bytes(f.read_bytes())
    config = json.loads((awq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (awq / "config.json").write_text(json.dumps(config))
    run = _generate(awq, tmp_path / "r")
    assert run.exit_code != 0 and "quant_method 'awq' is not supported" in run.output
    assert not (tmp_path / "r").exists()


def test_fp8_weights_are_not_split_over_ranks(ckpts, tmp_path):
    """Tensor parallelism splits float weights; FP8 ones are refused in one line (and nothing is written), the
    same checkpoint dequantized is split, and the engine refuses a split of FP8 weights it is handed anyway."""
    from tritonize.runtime.config import ModelArgs
    from tritonize.runtime.tp import Shard
    from tritonize.runtime.weights import WeightsError, load_model, read_config

    ckpt, fp8 = ckpts
    for source, extra in ((fp8, ()), (ckpt, ("--quantization", "fp8"))):
        run = _generate(source, tmp_path / "r", "--tensor-parallelism-size", "2", *extra)
        assert run.exit_code == 1 and "does not split FP8 weights" in run.output and len(run.output.splitlines()) == 1
        assert not (tmp_path / "r").exists()
    run = _generate(fp8, tmp_path / "d", "--tensor-parallelism-size", "2", "--quantization", "none",
                    "--use-fp8-kv-cache", "false")
    assert run.exit_code == 0, run.output
    shard = Shard(ModelArgs.from_hf_config(read_config(fp8)), rank=1, world=2)
    with pytest.raises(WeightsError, match="cannot be split over tensor-parallel ranks"):
        load_model(fp8, shard=shard)
