"""`tritonize deploy`: export + generate + serve from a NeMo checkpoint, reuse, mismatch, refusals."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from deploy_source import LIMITS, MAX_TOKENS, PROMPTS, nemo2_llama

from tritonize.cli.main import cli
from tritonize.deploy import DeployError
from tritonize.serving.client import GenerateOptions, grpc_generate
from tritonize.serving.server import find_stub_processes, free_ports

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SEED_LIMITS = ["--max_input_len", "32", "--max_output_len", "16", "--max_batch_size", "2"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return nemo2_llama(tmp_path_factory.mktemp("deploy"))


def _deploy(*args: str) -> Result:
    return CliRunner().invoke(cli, ["deploy", *args])


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line)
    lines.put(None)


@pytest.mark.e2e
def test_deploy_from_nemo_serves_then_reuses(source, tmp_path):
    repo = tmp_path / "repo"
    http, grpc, metrics = free_ports(3)
    command = [sys.executable, "-m", "tritonize.cli.main", "deploy", "--nemo_checkpoint", str(source.path),
               "--triton_model_name", "tiny", "--triton_model_repository", str(repo), "--triton_port", str(http),
               "--grpc_port", str(grpc), "--metrics-port", str(metrics), "--dtype", "float32", *SEED_LIMITS]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        printed: list[str] = []
        while not printed or "Press Ctrl-C" not in printed[-1]:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, f"deploy exited early: {proc.wait()} {proc.stderr.read()}"
            printed.append(line)
        assert f"http://127.0.0.1:{http}" in "".join(printed)
        endpoint = f"127.0.0.1:{grpc}"
        served = [grpc_generate(endpoint, "tiny", p, GenerateOptions(max_tokens=MAX_TOKENS)).text for p in PROMPTS]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "export" in proc.stderr.read()
    assert served == [source.greedy_text(p) for p in PROMPTS]
    assert not find_stub_processes(str(repo))

    manifest = json.loads((repo / "tritonize.json").read_text())
    options = manifest["models"]["tiny"]["options"]
    assert options["extra"]["source"] == str(source.path.resolve())
    assert (options["max_input_len"], options["max_output_len"], options["max_batch_size"]) == (32, 16, 2)
    assert not [p for p in tmp_path.iterdir() if ".deploy-" in p.name], "the staged export is removed"

    # The same request again: nothing is exported or generated.
    again = _deploy("--nemo-checkpoint", str(source.path), "--triton-model-name", "tiny", "--triton-model-repository",
                    str(repo), "--dtype", "float32", *SEED_LIMITS, "--dry-run")
    assert again.exit_code == 0, again.output
    assert "would serve" in again.output and "tritonize.json matches the request" in again.output
    assert "would export" not in again.output


def test_deploy_builds_the_repository_and_mismatch_names_the_option(source, tmp_path):
    repo = tmp_path / "repo"
    from tritonize.deploy import carry_out, plan_deploy
    from tritonize.repository.spec import RepoSpec

    spec = RepoSpec(name="tiny", device="cpu", dtype="float32", **LIMITS)
    plan = plan_deploy(repo, spec, source=source.path, export_dtype="float32")
    assert plan.action == "build"
    carry_out(plan)
    assert (repo / "tiny_engine" / "1" / "weights" / "config.json").is_file()

    base = ["--nemo_checkpoint", str(source.path), "--triton_model_name", "tiny", "--triton_model_repository",
            str(repo), "--device", "cpu", "--dtype", "float32", "--dry-run"]
    same = _deploy(*base, *SEED_LIMITS)
    assert same.exit_code == 0 and "serve" in same.output and "matches the request" in same.output, same.output

    bigger = _deploy(*base, "--max_input_len", "64", "--max_output_len", "16", "--max_batch_size", "2")
    assert bigger.exit_code != 0
    assert "--max-input-len is 64 but the repository was made with 32" in bigger.output
    other_dtype = _deploy(*base[:-3], "--dtype", "bfloat16", "--dry-run", *SEED_LIMITS)
    assert other_dtype.exit_code != 0 and "--dtype" in other_dtype.output and "'bfloat16'" in other_dtype.output

    forced = _deploy(*base, "--max_input_len", "64", "--max_output_len", "16", "--max_batch_size", "2", "--force")
    assert forced.exit_code == 0 and "would export" in forced.output, forced.output

    # A repository without a checkpoint is served as it is; an unknown model name is an error.
    as_is = _deploy("--triton_model_repository", str(repo), "--triton_model_name", "tiny", "--dry-run")
    assert as_is.exit_code == 0 and "as it is (no checkpoint given)" in as_is.output
    unknown = _deploy("--triton_model_repository", str(repo), "--triton_model_name", "other", "--dry-run")
    assert unknown.exit_code != 0 and "holds no model 'other' (it holds: tiny)" in unknown.output


def test_a_new_version_is_built_beside_the_old(source, tmp_path):
    repo = tmp_path / "repo"
    out = _deploy("--nemo-checkpoint", str(source.path), "--triton-model-repository", str(repo),
                  "--triton-model-version", "2", *SEED_LIMITS, "--dry-run")
    assert out.exit_code == 0 and "would export" in out.output and "version 2" in out.output
    assert not repo.exists(), "--dry-run writes nothing"


@pytest.mark.parametrize("args, refused", [
    (["--pipeline-parallelism-size", "2"], "--pipeline-parallelism-size (--pipeline_parallelism_size) above 1 needs "
                                           "--runtime trtllm or trtllm-engine (pipeline parallelism is TensorRT-LLM only"),
    (["--opt_num_tokens", "128"], "--opt-num-tokens (--opt_num_tokens) needs --runtime trtllm-engine"),
    (["--task_ids", "3"], "--task-ids gives 1 id(s) for 0 --ptuning-nemo-checkpoint"),
    (["--ptuning_nemo_checkpoint", "p.nemo", "--task_ids", "a"], "--task-ids 'a' is not a number"),
    (["--runtime", "trtllm", "--ptuning_nemo_checkpoint", "p.nemo"],
     "--ptuning-nemo-checkpoint (--ptuning_nemo_checkpoint) needs --runtime torch or trtllm-engine"),
    (["--no_paged_kv_cache"], "--no-paged-kv-cache (--no_paged_kv_cache)"),
    (["--disable_remove_input_padding"], "--disable-remove-input-padding"),
    (["--use_parallel_embedding"], "--use-parallel-embedding (--use_parallel_embedding)"),
    (["--runtime", "trtllm", "--quantization", "fp8"], "--quantization needs --runtime torch"),
    (["--export_fp8_quantized", "true", "--quantization", "none"],
     "--export-fp8-quantized true and --quantization none disagree"),
])
def test_options_the_torch_runtime_cannot_honour_are_refused_by_name(source, tmp_path, args, refused):
    out = _deploy("--nemo_checkpoint", str(source.path), "--triton_model_repository", str(tmp_path / "r"), *args)
    assert out.exit_code != 0
    assert refused in out.output
    assert len(out.output.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_fp8_auto_and_false_are_accepted(source, tmp_path):
    out = _deploy("--nemo_checkpoint", str(source.path), "--triton_model_repository", str(tmp_path / "r"),
                  "--export_fp8_quantized", "false", "--use_fp8_kv_cache", "auto", "--dry-run")
    assert out.exit_code == 0, out.output


def test_the_torch_runtime_takes_nemos_fp8_switches(source, tmp_path):
    """--export_fp8_quantized true is --quantization fp8 (a float source is quantized at export), --use_fp8_kv_cache
    true an FP8 KV cache; both are recorded, so a second deploy without them is a different request."""
    repo = tmp_path / "r"
    out = _deploy("--nemo_checkpoint", str(source.path), "--triton_model_repository", str(repo),
                  "--export_fp8_quantized", "true", "--use_fp8_kv_cache", "true", "--dry-run")
    assert out.exit_code == 0, out.output
    assert "FP8 weights: on (quantized to FP8 per channel at export)" in out.output
    assert "FP8 KV cache: on (--use-fp8-kv-cache true)" in out.output
    from tritonize.deploy import carry_out, fp8_choices, plan_deploy
    from tritonize.repository.spec import RepoSpec

    options = {"name": "m", "device": "cpu", "max_input_len": 48, "max_output_len": 16, "use_fp8_kv_cache": "true",
               "export_fp8_quantized": "true", "runtime": "torch"}
    spec, _ = fp8_choices(RepoSpec.from_options(options), options, source.path)
    assert (spec.quantization, spec.kv_cache_dtype) == ("fp8", "fp8")
    carry_out(plan_deploy(repo, spec, source=source.path))
    manifest = json.loads((repo / "tritonize.json").read_text())["models"]["m"]
    assert manifest["options"]["quantization"] == "fp8" and manifest["options"]["kv_cache_dtype"] == "fp8"
    assert manifest["quantization"]["weights"] == "fp8" and manifest["quantization"]["kv_cache"] == "fp8"
    plain_options = {**options, "use_fp8_kv_cache": "auto", "export_fp8_quantized": "auto"}
    plain, _ = fp8_choices(RepoSpec.from_options(plain_options), plain_options, source.path)
    with pytest.raises(DeployError, match="made differently: (--quantization|--use-fp8-kv-cache) is 'auto'"):
        plan_deploy(repo, plain, source=source.path)


def test_missing_inputs_are_one_line_errors(tmp_path):
    nothing = _deploy()
    assert nothing.exit_code != 0 and "give --nemo-checkpoint" in nothing.output
    missing = _deploy("--nemo_checkpoint", str(tmp_path / "none.nemo"), "--dry-run")
    assert missing.exit_code != 0 and "does not exist" in missing.output
    (tmp_path / "plain").mkdir()
    (tmp_path / "src").mkdir()
    foreign = _deploy("--nemo_checkpoint", str(tmp_path / "src"), "--triton_model_repository",
                      str(tmp_path / "plain"), "--dry-run")
    assert foreign.exit_code != 0 and "is not a tritonize repository" in foreign.output


def test_deploy_serves_adapters_and_a_changed_adapter_is_a_mismatch(source, tmp_path):
    """The adapter flags of NeMo's deploy_triton.py reach the repository: converted, listed in tritonize.json, and part of the
    request a later deploy is compared with."""
    import peft
    import torch
    import transformers
    from safetensors.torch import save_file

    from tritonize.deploy import carry_out, plan_deploy
    from tritonize.repository.spec import RepoSpec

    repo = tmp_path / "repo"
    first = _deploy("--nemo_checkpoint", str(source.path), "--triton_model_repository", str(repo), *SEED_LIMITS,
                    "--dry-run")
    assert first.exit_code == 0, first.output
    # the exported model's shapes, for an adapter and a table that fit it
    spec = RepoSpec.from_options({"name": "model", "max_input_len": 32, "max_output_len": 16, "max_batch_size": 2})
    carry_out(plan_deploy(repo, spec, source=source.path))
    config = json.loads((repo / "model_engine" / "1" / "weights" / "config.json").read_text())
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    tuned = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    tuned.save_pretrained(tmp_path / "peft")
    save_file({"table": torch.randn(3, config["hidden_size"])}, str(tmp_path / "task.safetensors"))

    args = ["--nemo_checkpoint", str(source.path), "--triton_model_repository", str(repo), *SEED_LIMITS,
            "--lora_ckpt", str(tmp_path / "peft"), "--use_lora_plugin", "bfloat16", "--max_lora_rank", "4",
            "--ptuning_nemo_checkpoint", str(tmp_path / "task.safetensors"), "--task_ids", "5"]
    changed = _deploy(*args, "--dry-run")
    assert changed.exit_code != 0 and "made differently: --lora-ckpt" in changed.output, changed.output
    assert "--use-lora-plugin bfloat16: a TensorRT build switch; the torch runtime serves LoRA adapters" in \
        changed.output

    options = {"lora_ckpt": (tmp_path / "peft",), "use_lora_plugin": "bfloat16", "max_lora_rank": 4,
               "ptuning_nemo_checkpoint": (tmp_path / "task.safetensors",), "task_ids": ("5",)}
    spec = RepoSpec.from_options({"name": "model", "max_input_len": 32, "max_output_len": 16, "max_batch_size": 2,
                                  **options})
    carry_out(plan_deploy(repo, spec, source=source.path, force=True))
    entry = json.loads((repo / "tritonize.json").read_text())["models"]["model"]
    assert entry["adapters"]["lora"]["0"]["rank"] == 4 and entry["adapters"]["ptuning"]["5"]["n_virtual"] == 3
    assert (repo / "model_engine" / "1" / "adapters" / "lora" / "0" / "adapter.safetensors").is_file()
    same = _deploy(*args, "--dry-run")
    assert same.exit_code == 0 and "matches the request" in same.output, same.output
