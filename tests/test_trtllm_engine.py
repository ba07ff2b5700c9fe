"""The trtllm-engine runtime, multi-GPU launch, TensorRT-LLM option wiring and FP8 detection.

tensorrt_llm (and so trtllm-build, its executor and real engines) cannot be installed on these machines.
What runs here is everything up to that boundary: the trtllm-build command line flag by flag, the
mpirun lines of a multi-GPU launch, the executor's request / config arguments, the LoRA tensors in the
executor's packed layout and as a PEFT directory (loaded by peft onto a transformers model), FP8
detection from written config files, and generate / deploy / serve / query on the generated files.
An engine directory here is written in the documented layout (config.json with build_config and
pretrained_config, rank*.engine): generate only links it; nothing tries to run it.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from tritonize.cli.main import cli
from tritonize.errors import AdapterError, OptionError
from tritonize.export import export_checkpoint
from tritonize.export.demo_model import write_demo_checkpoint
from tritonize.repository.fp8 import detect_fp8
from tritonize.repository.options import honoured, refuse
from tritonize.repository.render import parse_config
from tritonize.repository.trtllm_build import (
    BuildOptions,
    TrtllmBuildError,
    resolve_trtllm_source,
    shard_embedding,
    trtllm_build_command,
)
from tritonize.runtime.request import GenerationRequest
from tritonize.runtime.runtime import create_engine
from tritonize.runtime.sampling import SamplingParams
from tritonize.runtime.trtllm_adapters import (
    LORA_MODULE_IDS,
    AdapterStore,
    lora_executor_tensors,
    read_lora,
    write_peft_dir,
)
from tritonize.runtime.trtllm_engine import TrtllmNotInstalledError
from tritonize.runtime.trtllm_executor import (
    executor_config_kwargs,
    executor_sampling_kwargs,
    map_executor_finish_reason,
    plan_executor_request,
)
from tritonize.serving.client import GenerateOptions, grpc_inputs
from tritonize.serving.launch import LaunchPlan, mpi_leader_command, repository_launch

# ---------------------------------------------------------------------------- trtllm-build command line


def _flags(cmd: list[str]) -> dict[str, list[str]]:
    """flag -> its values, in the order given."""
    out: dict[str, list[str]] = {}
    key = None
    for arg in cmd[1:]:
        if arg.startswith("--"):
            key = arg
            out[key] = []
        else:
            out[key].append(arg)
    return out


def test_build_command_defaults_are_the_seeds():
    cmd = trtllm_build_command("ckpt", "out", BuildOptions(max_batch_size=4, max_input_len=100, max_output_len=28))
    assert cmd[0] == "trtllm-build"
    assert _flags(cmd) == {
        "--checkpoint_dir": ["ckpt"], "--output_dir": ["out"], "--max_batch_size": ["4"], "--max_input_len": ["100"],
        "--max_seq_len": ["128"], "--max_beam_width": ["1"], "--gemm_plugin": ["auto"],
        "--gpt_attention_plugin": ["auto"], "--kv_cache_type": ["paged"], "--remove_input_padding": ["enable"],
        "--use_paged_context_fmha": ["enable"],
    }


@pytest.mark.parametrize("change, expected", [
    ({"max_num_tokens": 512}, {"--max_num_tokens": ["512"]}),
    ({"opt_num_tokens": 64}, {"--opt_num_tokens": ["64"]}),
    ({"paged_kv_cache": False}, {"--kv_cache_type": ["continuous"], "--use_paged_context_fmha": ["disable"]}),
    ({"remove_input_padding": False}, {"--remove_input_padding": ["disable"]}),
    ({"lora_plugin": "bfloat16", "lora_target_modules": ["attn_qkv", "mlp_4h_to_h"], "max_lora_rank": 16},
     {"--lora_plugin": ["bfloat16"], "--max_lora_rank": ["16"], "--lora_target_modules": ["attn_qkv", "mlp_4h_to_h"]}),
    ({"lora_plugin": "auto", "lora_dirs": [Path("/l/a"), Path("/l/b")], "lora_ckpt_source": "nemo"},
     {"--lora_plugin": ["auto"], "--max_lora_rank": ["64"], "--lora_dir": ["/l/a", "/l/b"],
      "--lora_ckpt_source": ["nemo"]}),
    ({"max_prompt_embedding_table_size": 80}, {"--max_prompt_embedding_table_size": ["80"]}),
    ({"fp8_kv_cache": True}, {"--use_fp8_context_fmha": ["enable"]}),
    ({"workers": 4}, {"--workers": ["4"]}),
])
def test_each_build_option_reaches_its_flag(change, expected):
    base = _flags(trtllm_build_command("c", "o", BuildOptions()))
    got = _flags(trtllm_build_command("c", "o", BuildOptions(**change)))
    assert {k: v for k, v in got.items() if base.get(k) != v} == expected


@pytest.mark.parametrize("opts, message", [
    (BuildOptions(fp8_kv_cache=True, paged_kv_cache=False), "FP8 KV cache needs the paged KV cache"),
    (BuildOptions(lora_target_modules=["attn_q"]), "need --use-lora-plugin"),
    (BuildOptions(lora_plugin="int4"), "--use-lora-plugin 'int4'"),
])
def test_impossible_builds_are_one_line_errors(opts, message):
    with pytest.raises(TrtllmBuildError, match=message):
        trtllm_build_command("c", "o", opts)


# ---------------------------------------------------------------------------- sources: export, checkpoint, engine


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    return write_demo_checkpoint(tmp_path_factory.mktemp("hf") / "ckpt", hidden=32, layers=2, seed=3)


@pytest.fixture(scope="module")
def export_tp2(hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exp") / "export"
    export_checkpoint(hf, out, fmt="trtllm-checkpoint", tp_size=2, pp_size=1, progress=False)
    return out


def _engine_dir(export: Path, tp: int, pp: int) -> Path:
    """An engine directory in TensorRT-LLM's documented layout (config.json + rank*.engine)."""
    engine = export / "engine"
    engine.mkdir(exist_ok=True)
    pretrained = json.loads((export / "trtllm_checkpoint" / "config.json").read_text())
    pretrained["mapping"] = {"world_size": tp * pp, "tp_size": tp, "pp_size": pp}
    config = {"version": "0.17.0", "pretrained_config": pretrained,
              "build_config": {"max_batch_size": 2, "max_input_len": 16, "max_seq_len": 24}}
    (engine / "config.json").write_text(json.dumps(config))
    for rank in range(tp * pp):
        (engine / f"rank{rank}.engine").write_bytes(bytes([rank]) * 64)
    return engine


def test_sources_are_recognised_and_bad_ones_named(export_tp2, hf, tmp_path):
    source = resolve_trtllm_source(export_tp2)
    assert (source.hf_dir, source.trtllm_dir, source.is_engine) == (export_tp2, export_tp2 / "trtllm_checkpoint",
                                                                     False)
    inner = resolve_trtllm_source(export_tp2 / "trtllm_checkpoint")
    assert inner.hf_dir == export_tp2 and not inner.is_engine
    with pytest.raises(TrtllmBuildError, match="holds no TRT-LLM checkpoint or engine.*--format trtllm-checkpoint"):
        resolve_trtllm_source(hf)
    lone = tmp_path / "lone"
    lone.mkdir()
    for f in (export_tp2 / "trtllm_checkpoint").iterdir():
        (lone / f.name).write_bytes(f.read_bytes())
    with pytest.raises(TrtllmBuildError, match="not inside a `tritonize export` directory"):
        resolve_trtllm_source(lone)


def test_generate_without_trtllm_build_is_one_line_and_writes_nothing(export_tp2, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no trtllm-build anywhere
    out = tmp_path / "repo"
    result = CliRunner().invoke(cli, ["generate", "-c", str(export_tp2), "-o", str(out), "--runtime",
                                      "trtllm-engine", "--max-input-len", "16", "--max-output-len", "8"])
    assert result.exit_code != 0
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "trtllm-build is not on PATH" in error[0] and "pip install" in error[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo.")]  # the staging dir is gone


def test_parallel_sizes_that_differ_from_the_checkpoint_are_refused(export_tp2, tmp_path):
    result = CliRunner().invoke(cli, ["generate", "-c", str(export_tp2), "-o", str(tmp_path / "r"), "--runtime",
                                      "trtllm-engine", "--tensor-parallelism-size", "4"])
    assert result.exit_code != 0 and "tensor x pipeline parallelism 2 x 1, not 4 x 1" in result.output


def _params(repo: Path, name: str) -> dict[str, str]:
    config = parse_config((repo / f"{name}_engine" / "config.pbtxt").read_text())
    return {key: value.string_value for key, value in config.parameters.items()}


def _serve_dry_run(repo: Path, *extra: str) -> list[str]:
    result = CliRunner().invoke(cli, ["serve", str(repo), "--dry-run", "--http-port", "18000", "--grpc-port",
                                      "18001", "--metrics-port", "18002", *extra])
    assert result.exit_code == 0, result.output
    return shlex.split(result.output.strip().splitlines()[-1])


def test_engine_dir_is_linked_and_served_with_one_rank_per_gpu(export_tp2, tmp_path):
    engine = _engine_dir(export_tp2, 2, 1)
    repo = tmp_path / "repo"
    result = CliRunner().invoke(cli, ["generate", "-c", str(engine), "-o", str(repo), "-n", "t", "--runtime",
                                      "trtllm-engine", "--max-input-len", "16", "--max-output-len", "8",
                                      "--kv-cache-free-gpu-memory-fraction", "0.5"])
    assert result.exit_code == 0, result.output
    copied = repo / "t_engine" / "1" / "engine"
    assert sorted(p.name for p in copied.iterdir()) == ["config.json", "rank0.engine", "rank1.engine"]
    assert (copied / "rank1.engine").read_bytes() == (engine / "rank1.engine").read_bytes()
    params = _params(repo, "t")
    assert params["runtime"] == "trtllm-engine" and params["engine_dir"] == "engine"
    assert (params["tensor_parallel_size"], params["pipeline_parallel_size"]) == ("2", "1")  # from the engine
    assert params["kv_cache_free_gpu_memory_fraction"] == "0.5" and params["multi_gpu_mode"] == "leader"
    assert (repo / "t_engine" / "1" / "tritonize_backend" / "trtllm_executor.py").is_file()
    assert repository_launch(repo) == LaunchPlan(2, "leader", ("t_engine",))
    # the engine files are hashed in tritonize.json: validate notices one that changed after a copy
    assert CliRunner().invoke(cli, ["validate", str(repo)]).exit_code == 0
    target = copied / "rank1.engine"
    original = target.read_bytes()
    target.unlink()  # a hard link of the source engine: replace it rather than write through it
    target.write_bytes(b"truncated")
    damaged = CliRunner().invoke(cli, ["validate", str(repo)])
    assert damaged.exit_code == 1 and "t_engine/1/engine/rank1.engine: sha256 differs" in damaged.output
    target.unlink()
    target.write_bytes(original)

    cmd = _serve_dry_run(repo)
    assert cmd[:2] == ["mpirun", "--allow-run-as-root"] and cmd.count(":") == 1
    rank0, rank1 = " ".join(cmd).split(" : ")
    assert "--http-port=18000" in rank0 and "--grpc-port=18001" in rank0 and f"--model-repository={repo}" in rank0
    assert "--http-port" not in rank1 and "--model-control-mode=explicit" in rank1 and "--load-model=t_engine" in rank1
    assert "--allow-http=false" in rank1 and f"--model-repository={repo}" in rank1
    prefixes = [a.split("=", 2)[2] for a in cmd if a.startswith("--backend-config=python,shm-region-prefix-name")]
    assert len(prefixes) == 2 and prefixes[0] != prefixes[1] and prefixes[0].endswith("r0_")

    orchestrator = _serve_dry_run(repo, "--multi-gpu-mode", "orchestrator")
    assert orchestrator[0] == "TRTLLM_ORCHESTRATOR=1" and Path(orchestrator[1]).name == "tritonserver"
    assert "mpirun" not in orchestrator and "--http-port=18000" in orchestrator


def test_a_torch_repository_is_one_plain_tritonserver(hf, tmp_path):
    repo = tmp_path / "repo"
    result = CliRunner().invoke(cli, ["generate", "-c", str(hf), "-o", str(repo), "-n", "t", "--max-input-len",
                                      "16", "--max-output-len", "8"])
    assert result.exit_code == 0, result.output
    cmd = _serve_dry_run(repo)
    assert Path(cmd[0]).name == "tritonserver" and ":" not in cmd
    assert "tensor_parallel_size" not in _params(repo, "t")  # torch repositories render as before
    assert repository_launch(repo) == LaunchPlan(1, "leader", ())


# ---------------------------------------------------------------------------- mpirun lines


SINGLE = ["/opt/tritonserver/bin/tritonserver", "--model-repository=/r", "--backend-directory=/b",
          "--http-address=0.0.0.0", "--http-port=8000", "--grpc-port=8001", "--metrics-port=8002", "--log-verbose=0"]


def _expected(world: int, engines: tuple[str, ...]) -> list[str]:
    cmd = ["mpirun", "--allow-run-as-root"]
    for rank in range(world):
        if rank:
            cmd += [":", "-n", "1", SINGLE[0], "--model-repository=/r", "--backend-directory=/b", "--log-verbose=0",
                    "--allow-http=false", "--allow-grpc=false", "--allow-metrics=false",
                    "--model-control-mode=explicit", *[f"--load-model={e}" for e in engines]]
        else:
            cmd += ["-n", "1", *SINGLE]
        cmd.append(f"--backend-config=python,shm-region-prefix-name=pfx_r{rank}_")
    return cmd


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)])
def test_leader_mode_mpirun_lines(tp, pp):
    plan = LaunchPlan(tp * pp, "leader", ("m_engine",))
    assert mpi_leader_command(SINGLE, plan, "pfx_") == _expected(tp * pp, ("m_engine",))


def test_world_size_one_and_orchestrator_keep_one_server():
    assert mpi_leader_command(SINGLE, LaunchPlan(1, "leader", ()), "pfx_") == SINGLE
    plan = LaunchPlan(4, "orchestrator", ("m_engine",))
    assert not plan.needs_mpirun and plan.env == {"TRTLLM_ORCHESTRATOR": "1"}


# ---------------------------------------------------------------------------- executor arguments


def _req(**kw) -> GenerationRequest:
    base = dict(request_id="r", prompt_ids=[5, 6, 7], max_new_tokens=4, sampling=SamplingParams(), end_ids=[],
                stop_sequences=[], bad_sequences=[], return_log_probs=False, stream=False, on_output=print)
    base.update(kw)
    return GenerationRequest(**base)


def test_executor_request_carries_every_field():
    req = _req(sampling=SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=3, repetition_penalty=1.2,
                                       presence_penalty=0.1, frequency_penalty=0.2, min_tokens=2),
               stop_sequences=[[8, 9]], bad_sequences=[[1], [2, 3]], return_log_probs=True, stream=True)
    plan = plan_executor_request(req, end_ids=[2, 11], pad_id=0, max_seq_len=32, vocab_size=100)
    assert plan.request == {"input_token_ids": [5, 6, 7], "max_tokens": 4, "streaming": True, "end_id": 2,
                            "pad_id": 0, "stop_words": [[8, 9], [11]], "bad_words": [[1], [2, 3]]}
    assert plan.sampling == {"beam_width": 1, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 3,
                             "repetition_penalty": 1.2, "presence_penalty": 0.1, "frequency_penalty": 0.2,
                             "min_tokens": 2}
    assert plan.output == {"return_log_probs": True, "exclude_input_from_output": True}
    assert plan.extra_end_ids == [11] and plan.lora_task_id is None and plan.task_id is None


def test_executor_request_adapters_and_refusals():
    req = _req()
    req.lora_task_id, req.task_id = 3, 1
    plan = plan_executor_request(req, end_ids=[2], pad_id=None, max_seq_len=32, vocab_size=100, n_virtual=3)
    assert plan.request["input_token_ids"] == [100, 101, 102, 5, 6, 7]  # virtual tokens lead the prompt
    assert (plan.lora_task_id, plan.task_id, plan.request["pad_id"]) == (3, 1, 2)
    assert executor_sampling_kwargs(SamplingParams(temperature=0.0)) == {"beam_width": 1, "top_k": 1}
    with pytest.raises(ValueError, match="exceeds max_seq_len 6"):
        plan_executor_request(_req(), end_ids=[], pad_id=None, max_seq_len=6)
    with pytest.raises(ValueError, match="no task_id"):
        plan_executor_request(_req(prompt_ids=[150, 5]), end_ids=[], pad_id=None, max_seq_len=32, vocab_size=100)


def test_executor_finish_reasons_and_config():
    assert [map_executor_finish_reason(r) for r in ("FinishReason.END_ID", "STOP_WORDS", "LENGTH", "CANCELLED",
                                                    "NOT_FINISHED")] == ["end", "stop", "length", "cancelled", None]
    config = executor_config_kwargs(kv_cache_free_gpu_memory_fraction=0.4, max_batch_size=8, max_num_tokens=256,
                                    multi_gpu_mode="orchestrator", world_size=2)
    assert config["kv_cache_config"] == {"free_gpu_memory_fraction": 0.4, "enable_block_reuse": True}
    assert config["parallel"] == {"communication_mode": "ORCHESTRATOR"}
    assert (config["max_batch_size"], config["max_num_tokens"], config["max_beam_width"]) == (8, 256, 1)
    leader = executor_config_kwargs(kv_cache_free_gpu_memory_fraction=None, max_batch_size=None, max_num_tokens=None,
                                    multi_gpu_mode="leader", world_size=2, kv_cache_tokens=4096, prefix_cache=False)
    assert leader["kv_cache_config"] == {"enable_block_reuse": False, "max_tokens": 4096}
    assert leader["parallel"] == {"communication_mode": "LEADER"}


def test_engine_runtime_without_tensorrt_llm_is_one_line(export_tp2, tmp_path):
    pytest.importorskip("torch")
    if __import__("importlib").util.find_spec("tensorrt_llm") is not None:
        pytest.skip("tensorrt_llm is installed")
    with pytest.raises(TrtllmNotInstalledError) as info:
        create_engine("trtllm-engine", export_tp2, trtllm_options={"engine_dir": tmp_path, "kv_cache_dtype": "auto"})
    assert "\n" not in str(info.value) and "pip install" in str(info.value)


# ---------------------------------------------------------------------------- LoRA: executor tensors and PEFT

H, NH, NKV, D, F, L, R = 32, 4, 2, 8, 48, 2, 4


def _write_lora(root: Path, modules: dict[str, tuple[int, int]], seed: int) -> Path:
    """A tritonize-lora v1 directory as the adapter format describes it."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(L):
        for m, (fan_in, fan_out) in modules.items():
            tensors[f"layers.{i}.{m}.A"] = torch.randn(R, fan_in, generator=g)
            tensors[f"layers.{i}.{m}.B"] = torch.randn(fan_out, R, generator=g)
    root.mkdir(parents=True)
    (root / "adapter.json").write_text(json.dumps({"format": "tritonize-lora", "format_version": 1, "rank": R,
                                                   "n_layers": L, "modules": list(modules), "source": "test",
                                                   "source_format": "peft", "scale_folded": True}))
    save_file(tensors, str(root / "adapter.safetensors"))
    return root


FUSED = {"qkv": (H, (NH + 2 * NKV) * D), "o": (NH * D, H), "gate_up": (H, 2 * F), "down": (F, H)}
SPLIT = {"q": (H, NH * D), "k": (H, NKV * D), "v": (H, NKV * D), "gate": (H, F), "up": (H, F)}


def test_executor_lora_tensors_are_packed_rows(tmp_path):
    adapter = read_lora(_write_lora(tmp_path / "a", {**FUSED}, seed=1))
    weights, config = lora_executor_tensors(adapter, gated=True, dtype=torch.float32)
    names = {v: k for k, v in LORA_MODULE_IDS.items()}
    expected_rows = []
    for i in range(L):
        for m in ("qkv", "o", "gate_up", "down"):
            a, b = adapter.pair(i, m)
            parts = ([("mlp_h_to_4h", a, b[:F]), ("mlp_gate", a, b[F:])] if m == "gate_up"
                     else [({"qkv": "attn_qkv", "o": "attn_dense", "down": "mlp_4h_to_h"}[m], a, b)])
            expected_rows += [(i, LORA_MODULE_IDS[n], pa, pb) for n, pa, pb in parts]
    expected_rows.sort(key=lambda r: (r[0], r[1]))
    assert config.tolist() == [[mid, i, R] for i, mid, _, _ in expected_rows]
    assert weights.shape == (len(expected_rows), max(R * a.shape[1] + b.shape[0] * R for _, _, a, b in expected_rows))
    for row, (i, mid, a, b) in zip(weights, expected_rows):
        n_in, n_out = a.numel(), b.numel()
        assert torch.equal(row[:n_in].reshape(R, -1), a), (i, names[mid])
        assert torch.equal(row[n_in:n_in + n_out].reshape(-1, R), b), (i, names[mid])
        assert not row[n_in + n_out:].any()
    plain = read_lora(_write_lora(tmp_path / "p", {"up": (H, F), "down": (F, H)}, seed=2))
    _, plain_config = lora_executor_tensors(plain, gated=False)
    assert sorted({r[0] for r in plain_config.tolist()}) == [LORA_MODULE_IDS["mlp_h_to_4h"], LORA_MODULE_IDS["mlp_4h_to_h"]]


@pytest.mark.parametrize("modules", [FUSED, {**SPLIT, "o": FUSED["o"], "down": FUSED["down"]}],
                         ids=["fused", "split"])
def test_peft_dir_merges_to_w_plus_ba(tmp_path, modules):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=H, num_attention_heads=NH, num_key_value_heads=NKV,
                                      head_dim=D, intermediate_size=F, num_hidden_layers=L)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    adapter = read_lora(_write_lora(tmp_path / "lora", modules, seed=4))
    hf_config = {**config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    peft_dir = write_peft_dir(adapter, tmp_path / "peft", hf_config)
    merged = peft.PeftModel.from_pretrained(base, str(peft_dir)).merge_and_unload().state_dict()

    hf_names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    for i in range(L):
        deltas = {}
        for m in modules:
            a, b = adapter.pair(i, m)
            delta = b @ a
            if m == "qkv":
                deltas.update(zip("qkv", torch.split(delta, [NH * D, NKV * D, NKV * D])))
            elif m == "gate_up":
                deltas.update(zip(("gate", "up"), torch.chunk(delta, 2)))
            else:
                deltas[m] = delta
        assert set(deltas) == set(hf_names)
        for m, delta in deltas.items():
            key = f"model.layers.{i}.{hf_names[m]}.weight"
            torch.testing.assert_close(merged[key], before[key] + delta, rtol=1e-5, atol=1e-5)


def test_unknown_adapter_ids_name_what_is_there(tmp_path):
    _write_lora(tmp_path / "adapters" / "lora" / "3", {"o": FUSED["o"]}, seed=5)
    store = AdapterStore(tmp_path / "adapters")
    assert store.ids("lora") == [3] and store.ids("ptuning") == []
    with pytest.raises(AdapterError, match=r"lora_task_id 9 is not in this repository \(it has: 3\)"):
        store.directory("lora", 9)
    with pytest.raises(AdapterError, match=r"task_id 0 is not in this repository \(it has: none\)"):
        store.directory("ptuning", 0)


# ---------------------------------------------------------------------------- FP8 detection


@pytest.mark.parametrize("files, expected", [
    ({"config.json": {"architectures": ["LlamaForCausalLM"]}}, (False, False)),
    ({"config.json": {"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}}},
     (True, False)),
    ({"config.json": {"quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8",
                                              "kv_cache_quant_algo": "FP8"}}}, (True, True)),
    ({"config.json": {"architectures": ["LlamaForCausalLM"]},
      "hf_quant_config.json": {"quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None}}}, (True, False)),
    ({"config.json": {"architecture": "LlamaForCausalLM", "mapping": {},
                      "quantization": {"quant_algo": None, "kv_cache_quant_algo": "FP8"}}}, (False, True)),
    ({"config.json": {"pretrained_config": {"quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}},
                      "build_config": {}}}, (True, True)),
    ({"config.json": {"model_type": "llama"},
      "trtllm_checkpoint/config.json": {"quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None}}},
     (True, False)),
])
def test_detect_fp8_reads_the_config_files(tmp_path, files, expected):
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps(content))
    assert detect_fp8(tmp_path) == expected


def test_detect_fp8_on_a_real_export_is_off(export_tp2):
    assert detect_fp8(export_tp2) == (False, False)


# ---------------------------------------------------------------------------- parallel embedding


def test_shard_embedding_splits_the_table_over_tp_ranks(export_tp2, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in (export_tp2 / "trtllm_checkpoint").iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    full = load_file(str(ckpt / "rank0.safetensors"))["transformer.vocab_embedding.weight"]
    shard_embedding(ckpt)
    parts = [load_file(str(ckpt / f"rank{r}.safetensors"))["transformer.vocab_embedding.weight"] for r in (0, 1)]
    assert torch.equal(torch.cat(parts)[: full.shape[0]], full) and parts[0].shape == parts[1].shape
    config = json.loads((ckpt / "config.json").read_text())
    assert config["use_parallel_embedding"] is True and config["embedding_sharding_dim"] == 0


# ---------------------------------------------------------------------------- option wiring


def test_generate_trtllm_options_reach_the_engine_parameters(hf, tmp_path):
    repo = tmp_path / "repo"
    result = CliRunner().invoke(cli, ["generate", "-c", str(hf), "-o", str(repo), "-n", "t", "--runtime", "trtllm",
                                      "--tensor-parallelism-size", "2", "--pipeline-parallelism-size", "2",
                                      "--kv-cache-free-gpu-memory-fraction", "0.3", "--use-fp8-kv-cache", "true",
                                      "--max-input-len", "16", "--max-output-len", "8"])
    assert result.exit_code == 0, result.output
    params = _params(repo, "t")
    assert (params["tensor_parallel_size"], params["pipeline_parallel_size"]) == ("2", "2")
    assert (params["kv_cache_free_gpu_memory_fraction"], params["kv_cache_dtype"]) == ("0.3", "fp8")
    assert repository_launch(repo) == LaunchPlan(1, "leader", ())  # the LLM API spawns its own ranks


@pytest.mark.parametrize("args, message", [
    (["--pipeline-parallelism-size", "2"], "--pipeline-parallelism-size above 1 needs --runtime trtllm or trtllm-engine "
                                           "(pipeline parallelism is TensorRT-LLM only"),
    (["--runtime", "trtllm", "--no-paged-kv-cache"],
     "--no-paged-kv-cache needs --runtime trtllm-engine (TensorRT-LLM's LLM API always pages its KV cache)"),
    (["--opt-num-tokens", "8"], "--opt-num-tokens needs --runtime trtllm-engine (a TensorRT build profile)"),
    (["--runtime", "trtllm", "--quantization", "fp8"], "--quantization needs --runtime torch"),
    (["--fp8-lm-head"], "--fp8-lm-head goes with --quantization fp8"),
    (["--runtime", "trtllm", "--ptuning-nemo-checkpoint", "t.npy"],
     "--ptuning-nemo-checkpoint needs --runtime torch or trtllm-engine"),
])
def test_generate_refuses_options_the_runtime_cannot_honour(hf, tmp_path, args, message):
    result = CliRunner().invoke(cli, ["generate", "-c", str(hf), "-o", str(tmp_path / "r"), *args])
    assert result.exit_code != 0 and message in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("runtime, options, refused", [
    ("torch", {"pipeline_parallel_size": 2}, "--pipeline-parallelism-size (--pipeline_parallelism_size) above 1 needs "
                                             "--runtime trtllm or trtllm-engine (pipeline parallelism is TensorRT-LLM only"),
    ("trtllm", {"no_paged_kv_cache": True}, "--no-paged-kv-cache (--no_paged_kv_cache) needs --runtime trtllm-engine"),
    ("trtllm", {"opt_num_tokens": 64}, "--opt-num-tokens (--opt_num_tokens) needs --runtime trtllm-engine"),
    ("trtllm", {"export_fp8_quantized": "true"}, "--export-fp8-quantized (--export_fp8_quantized) needs --runtime"),
    ("trtllm", {"ptuning_nemo_checkpoint": ("p.nemo",)},
     "--ptuning-nemo-checkpoint (--ptuning_nemo_checkpoint) needs --runtime torch or trtllm-engine"),
])
def test_deploy_refuses_by_name_per_runtime(runtime, options, refused):
    with pytest.raises(OptionError, match=refused.replace("(", r"\(").replace(")", r"\)")):
        refuse(options, runtime)


@pytest.mark.parametrize("runtime, options", [
    ("trtllm", {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "use_fp8_kv_cache": "true",
                "lora_ckpt": ("l",), "max_lora_rank": 8}),
    ("trtllm-engine", {"tensor_parallel_size": 2, "opt_num_tokens": 64, "no_paged_kv_cache": True,
                       "disable_remove_input_padding": True, "use_parallel_embedding": True,
                       "use_lora_plugin": "float16", "ptuning_nemo_checkpoint": ("p",)}),
    ("torch", {"lora_ckpt": ("l",), "ptuning_nemo_checkpoint": ("p",), "task_ids": ("0",), "use_lora_plugin": "auto",
               "tensor_parallel_size": 4, "use_fp8_kv_cache": "true", "export_fp8_quantized": "true",
               "quantization": "fp8", "fp8_lm_head": True}),
])
def test_deploy_accepts_what_each_runtime_honours(runtime, options):
    assert set(options) <= honoured(runtime)
    try:
        refuse(options, runtime)
    except OptionError as e:
        pytest.fail(f"{runtime} refused an option it honours: {e}")


def test_deploy_dry_run_prints_fp8_detection(hf, tmp_path):
    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    for f in hf.iterdir():
        (fp8 / f.name).write_bytes(f.read_bytes())
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}
    (fp8 / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["deploy", "--nemo_checkpoint", str(fp8), "--triton_model_repository",
                                      str(tmp_path / "r"), "--runtime", "trtllm", "--tensor_parallelism_size", "2",
                                      "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"FP8 KV cache: on (detected from {fp8 / 'config.json'})" in result.output
    assert "FP8 weights: detected" in result.output
    off = CliRunner().invoke(cli, ["deploy", "--nemo_checkpoint", str(fp8), "--triton_model_repository",
                                   str(tmp_path / "r"), "--runtime", "trtllm", "--use_fp8_kv_cache", "false",
                                   "--dry-run"])
    assert off.exit_code == 0 and "FP8 KV cache: off (--use-fp8-kv-cache false)" in off.output
    engine = CliRunner().invoke(cli, ["deploy", "--nemo_checkpoint", str(fp8), "--triton_model_repository",
                                      str(tmp_path / "r"), "--runtime", "trtllm-engine", "--dry-run"])
    assert engine.exit_code != 0 and "needs a TRT-LLM checkpoint quantized to FP8" in engine.output


# ---------------------------------------------------------------------------- query


def test_query_sends_task_ids_as_uint64():
    opts = GenerateOptions(max_tokens=4, task_id=2, lora_task_id=7)
    inputs = {t.name(): t for t in grpc_inputs("hi", opts, stream=False)}
    assert inputs["task_id"].datatype() == "UINT64" and inputs["lora_task_id"].datatype() == "UINT64"
    assert opts.scalars()["task_id"] == (2, "UINT64") and opts.scalars()["lora_task_id"] == (7, "UINT64")
    assert "task_id" not in GenerateOptions().scalars()
    result = CliRunner().invoke(cli, ["query", "--help"])
    assert "--task-id" in result.output and "--lora-task-id" in result.output


# ---------------------------------------------------------------------------- deploy through the build step

# trtllm-build cannot run here; this stand-in on PATH stands for it at the process boundary only: it
# records the argv it was given and writes an engine directory in the documented layout for the
# checkpoint's mapping, so what deploy does before and after the build is checked on real files.
STAND_IN = """#!{python}
import json, sys, pathlib
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
ckpt, out = pathlib.Path(value("--checkpoint_dir")), pathlib.Path(value("--output_dir"))
config = json.loads((ckpt / "config.json").read_text())
(out / "config.json").write_text(json.dumps({{"pretrained_config": config, "build_config": {{}}}}))
for rank in range(config["mapping"]["world_size"]):
    (out / f"rank{{rank}}.engine").write_bytes(b"engine")
(pathlib.Path({log!r})).write_text(json.dumps({{"argv": args, "config": config}}))
"""


def test_deploy_trtllm_engine_exports_for_tp_and_builds(tmp_path, monkeypatch):
    import sys

    from deploy_source import nemo2_llama

    source = nemo2_llama(tmp_path / "src")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "build.json"
    script = bin_dir / "trtllm-build"
    script.write_text(STAND_IN.format(python=sys.executable, log=str(log)))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    repo = tmp_path / "repo"
    args = ["deploy", "--nemo_checkpoint", str(source.path), "--triton_model_repository", str(repo),
            "--triton_model_name", "m", "--runtime", "trtllm-engine", "--tensor_parallelism_size", "2",
            "--max_input_len", "32", "--max_output_len", "16", "--max_batch_size", "2", "--opt_num_tokens", "16",
            "--no_paged_kv_cache", "--use_parallel_embedding", "--kv-cache-free-gpu-memory-fraction", "0.6"]
    # deploy would serve next; --tritonserver pointing nowhere stops it right after the build, with one line
    result = CliRunner().invoke(cli, [*args, "--tritonserver", str(tmp_path / "none")])
    assert "no such tritonserver binary" in result.output, result.output
    built = json.loads(log.read_text())
    flags = _flags(["trtllm-build", *built["argv"]])
    assert flags["--max_seq_len"] == ["48"] and flags["--opt_num_tokens"] == ["16"]
    assert flags["--kv_cache_type"] == ["continuous"] and flags["--use_paged_context_fmha"] == ["disable"]
    assert built["config"]["mapping"]["tp_size"] == 2 and built["config"]["use_parallel_embedding"] is True
    assert sorted(p.name for p in (repo / "m_engine" / "1" / "engine").iterdir()) == [
        "config.json", "rank0.engine", "rank1.engine"]
    params = _params(repo, "m")
    assert (params["tensor_parallel_size"], params["kv_cache_free_gpu_memory_fraction"]) == ("2", "0.6")
    assert repository_launch(repo) == LaunchPlan(2, "leader", ("m_engine",))
    again = CliRunner().invoke(cli, [*args, "--dry-run"])
    assert again.exit_code == 0 and "tritonize.json matches the request" in again.output
    other = CliRunner().invoke(cli, [*args[:-2], "--dry-run"])
    assert other.exit_code != 0 and "--kv-cache-free-gpu-memory-fraction is 0.0" in other.output
