"""Operability without a server: limits from the checkpoint, reading a metrics endpoint, the start-up lines
`tritonize serve` shows, warm artifacts' recognition and copy, the CPU KV pool's cap."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tritonize.errors import TritonizeError
from tritonize.repository.limits import STEP_TOKENS_CAP, derive_limits
from tritonize.runtime import loading, warm
from tritonize.serving.metrics import histogram_quantile, parse_metrics, server_view
from tritonize.serving.server import startup_line


def _config(path: Path, **config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


LLAMA = dict(architectures=["LlamaForCausalLM"], vocab_size=100, hidden_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)


# -- limits ---------------------------------------------------------------------------------------


def test_limits_split_the_positions_or_take_what_the_other_leaves(tmp_path):
    gpt2 = _config(tmp_path / "gpt2", architectures=["GPT2LMHeadModel"], vocab_size=100, n_embd=64, n_layer=2,
                   n_head=4, n_positions=256)
    values, line = derive_limits(gpt2, {"max_input_len": None, "max_output_len": None}, "torch")
    assert (values["max_input_len"], values["max_output_len"]) == (128, 128)
    assert "the 256 positions of this GPT2LMHeadModel (config.json's n_positions" in line
    values, line = derive_limits(gpt2, {"max_input_len": None, "max_output_len": 56}, "torch")
    assert (values["max_input_len"], values["max_output_len"]) == (200, 56) and "--max-input-len from" in line
    values, line = derive_limits(gpt2, {"max_input_len": 10, "max_output_len": 20}, "torch")
    assert (values["max_input_len"], values["max_output_len"], line) == (10, 20, None)
    with pytest.raises(TritonizeError, match="--max-input-len 300 leaves no room for an output in the 256"):
        derive_limits(gpt2, {"max_input_len": 300, "max_output_len": None}, "torch")


def test_a_sliding_window_does_not_limit_and_a_long_context_gets_chunked_steps(tmp_path):
    mistral = _config(tmp_path / "mistral", **{**LLAMA, "architectures": ["MistralForCausalLM"]},
                      max_position_embeddings=32768, sliding_window=4096)
    values, line = derive_limits(mistral, {"max_input_len": None, "max_output_len": None}, "torch")
    assert (values["max_input_len"], values["max_output_len"]) == (16384, 16384)
    assert values["max_num_tokens"] == STEP_TOKENS_CAP and "prefilled in chunks" in line
    values, _ = derive_limits(mistral, {"max_input_len": None, "max_output_len": None, "max_num_tokens": 4096}, "torch")
    assert values["max_num_tokens"] == 4096
    short = _config(tmp_path / "llama", **LLAMA)  # no max_position_embeddings: the family's default (2048)
    values, line = derive_limits(short, {"max_input_len": None, "max_output_len": None}, "torch")
    assert (values["max_input_len"], values["max_output_len"]) == (1024, 1024) and "max_num_tokens" not in values
    assert "the LlamaForCausalLM default, config.json names none" in line


def test_limits_of_an_engine_or_an_unreadable_config_are_the_fixed_defaults(tmp_path):
    values, line = derive_limits(tmp_path, {"max_input_len": None, "max_output_len": None}, "trtllm-engine")
    assert (values["max_input_len"], values["max_output_len"]) == (256, 256) and "trtllm-engine's defaults" in line
    values, line = derive_limits(tmp_path / "missing", {"max_input_len": None, "max_output_len": None}, "torch")
    assert (values["max_input_len"], values["max_output_len"], line) == (256, 256, None)


# -- metrics endpoint -------------------------------------------------------------------------------

EXPOSITION = """# HELP tritonize_generation_tokens_total Tokens generated
# TYPE tritonize_generation_tokens_total counter
tritonize_generation_tokens_total{model="m_engine",version="1"} %(gen)s
tritonize_generation_tokens_total{model="other_engine",version="1"} 999
tritonize_prompt_tokens_total{model="m_engine",version="1"} %(prompt)s
tritonize_prefix_cache_hit_tokens_total{model="m_engine",version="1"} %(hits)s
tritonize_preemptions_total{model="m_engine",version="1"} 0
tritonize_requests_finished_total{model="m_engine",reason="length",version="1"} %(length)s
tritonize_time_to_first_token_seconds_count{model="m_engine",version="1"} %(count)s
tritonize_time_to_first_token_seconds_sum{model="m_engine",version="1"} %(sum)s
tritonize_time_to_first_token_seconds_bucket{model="m_engine",version="1",le="0.1"} %(b1)s
tritonize_time_to_first_token_seconds_bucket{model="m_engine",version="1",le="1"} %(b2)s
tritonize_time_to_first_token_seconds_bucket{model="m_engine",version="1",le="+Inf"} %(count)s
tritonize_decode_steps_total{batch_size="2",model="m_engine",version="1"} %(steps2)s
tritonize_decode_steps_total{batch_size="4",model="m_engine",version="1"} %(steps4)s
tritonize_prompt_steps_total{model="m_engine",version="1"} %(prompt_steps)s
nv_inference_request_success{model="m",version="1"} 3
"""


def test_histogram_quantile_interpolates_within_buckets_as_prometheus_does():
    buckets = {0.1: 10.0, 1.0: 30.0, float("inf"): 40.0}
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.9 * (20 - 10) / 20)
    assert histogram_quantile(0.99, buckets) == pytest.approx(1.0)  # in +Inf: the highest finite bound
    assert histogram_quantile(0.5, {0.1: 0.0, float("inf"): 0.0}) is None


def test_server_view_is_the_difference_of_two_scrapes_for_one_model():
    before = parse_metrics(EXPOSITION % dict(gen=10, prompt=20, hits=0, length=2, count=2, sum=0.1, b1=2, b2=2,
                                             steps2=1, steps4=0, prompt_steps=2))
    after = parse_metrics(EXPOSITION % dict(gen=40, prompt=60, hits=16, length=6, count=6, sum=1.3, b1=3, b2=6,
                                            steps2=4, steps4=3, prompt_steps=5))
    view = server_view(before, after, "m_engine", 3.0)
    assert view["requests"] == 4 and view["finished"] == {"length": 4}
    assert (view["generation_tokens"], view["prompt_tokens"], view["output_tokens_per_s"]) == (30, 40, 10.0)
    assert view["prefix_hit_ratio"] == pytest.approx(16 / 40)
    assert view["ttft_ms_mean"] == pytest.approx(300.0)
    # the 4 new observations: 1 under 0.1 s, 3 in (0.1, 1]: the median is in the second bucket
    assert view["ttft_ms_p50"] == pytest.approx(1000 * (0.1 + 0.9 * (2 - 1) / 3))
    assert view["itl_ms_p50"] is None
    # 3 steps of 2 requests and 3 of 4 in 3 s: 2 decode steps a second, 3 requests in a step on average
    assert (view["decode_steps_per_s"], view["decode_batch_mean"], view["prompt_steps_per_s"]) == (2.0, 3.0, 1.0)
    assert server_view(before, after, "absent_engine", 3.0) is None


def test_startup_lines_are_the_engine_stages_and_the_models_loaded():
    assert startup_line('I1205 22:11:45.001080 18586 stages.py:66] "tritonize: m_engine/1: weights: loaded"') \
        == "m_engine/1: weights: loaded"
    assert startup_line("I1205 22:11:41.305347 18586 model_lifecycle.cc:839] \"successfully loaded 'm_sync'\"") \
        == "m_sync: loaded"
    assert startup_line('I1205 22:11:41.305347 18586 server.cc:1] "Started HTTPService at 0.0.0.0:8000"') is None
    assert startup_line("+------------+") is None


# -- warm artifacts ---------------------------------------------------------------------------------


def _warm_folder(version_dir: Path, **changes) -> Path:
    folder = version_dir / warm.WARM_DIR
    kernel = folder / warm.KERNELS / "ABCDEF0123"
    kernel.mkdir(parents=True)
    (kernel / "add_kernel.cubin").write_bytes(b"\x7fELF-not-really")
    (kernel / "__grp__add_kernel.json").write_text("{}")
    meta = {**warm.this_machine("cpu"), "created": "2026-12-05T00:00:00Z", **changes}
    (folder / warm.META).write_text(json.dumps(meta))
    return folder


def test_warm_kernels_for_this_machine_are_copied_into_tritons_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    monkeypatch.delenv(warm.SWITCH, raising=False)
    folder = _warm_folder(tmp_path / "v1")
    line = warm.use_warm_artifacts(tmp_path / "v1", "cpu")
    assert line.startswith(f"using warm artifacts from {folder}: 1 compiled kernels for cpu")
    assert (cache / "ABCDEF0123" / "add_kernel.cubin").read_bytes() == b"\x7fELF-not-really"
    assert [p.name for p in cache.iterdir()] == ["ABCDEF0123"]  # no staging left behind
    (cache / "ABCDEF0123" / "add_kernel.cubin").write_bytes(b"compiled here")  # an entry present stays as it is
    warm.use_warm_artifacts(tmp_path / "v1", "cpu")
    assert (cache / "ABCDEF0123" / "add_kernel.cubin").read_bytes() == b"compiled here"


def test_group_files_that_name_absolute_paths_follow_the_kernels(tmp_path, monkeypatch):
    """Some Triton versions keep absolute paths in a kernel's __grp__ file: they must name the copy."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    monkeypatch.delenv(warm.SWITCH, raising=False)
    folder = _warm_folder(tmp_path / "v1")
    kernel = folder / warm.KERNELS / "ABCDEF0123"
    (kernel / "__grp__add_kernel.json").write_text(json.dumps(
        {"child_paths": {"add_kernel.cubin": "/elsewhere/.warm-x/kernels/ABCDEF0123/add_kernel.cubin"}}))
    (kernel / "__grp__other.json").write_text(json.dumps({"child_paths": ["add_kernel.cubin"]}))
    warm.use_warm_artifacts(tmp_path / "v1", "cpu")
    group = json.loads((cache / "ABCDEF0123" / "__grp__add_kernel.json").read_text())
    assert group == {"child_paths": {"add_kernel.cubin": str(cache / "ABCDEF0123" / "add_kernel.cubin")}}
    assert Path(group["child_paths"]["add_kernel.cubin"]).is_file()
    assert json.loads((cache / "ABCDEF0123" / "__grp__other.json").read_text()) == {
        "child_paths": ["add_kernel.cubin"]}
    warm._relocate_groups(kernel, None)  # as tritonize warmup keeps them: names only
    assert json.loads((kernel / "__grp__add_kernel.json").read_text()) == {
        "child_paths": {"add_kernel.cubin": "add_kernel.cubin"}}


def test_a_cache_that_cannot_be_written_gets_a_writable_copy_of_its_own(tmp_path, monkeypatch):
    cache = tmp_path / "not-a-folder"  # as a read-only mount does for any user, root included
    cache.write_text("")
    monkeypatch.delenv(warm.SWITCH, raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    _warm_folder(tmp_path / "v1")
    line = warm.use_warm_artifacts(tmp_path / "v1", "cpu")
    assert os.environ["TRITON_CACHE_DIR"] != str(cache) and os.environ["TRITON_CACHE_DIR"] in line
    assert (Path(os.environ["TRITON_CACHE_DIR"]) / "ABCDEF0123" / "add_kernel.cubin").is_file()


def test_warm_artifacts_of_another_machine_or_code_are_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(warm.SWITCH, raising=False)
    _warm_folder(tmp_path / "v1", device="NVIDIA H100 80GB HBM3 (sm_90)", runtime="0123456789abcdef")
    line = warm.use_warm_artifacts(tmp_path / "v1", "cpu")
    assert line == (f"warm artifacts are for NVIDIA H100 80GB HBM3 (sm_90), runtime code 0123456789abcdef, this is "
                    f"cpu, runtime code {warm.code_version()}: compiling")
    assert not (tmp_path / "cache").exists()
    assert warm.use_warm_artifacts(tmp_path / "none", "cpu").startswith("warm artifacts: none in ")
    (tmp_path / "v1" / warm.WARM_DIR / warm.META).write_text("{not json")
    assert "are unreadable" in warm.use_warm_artifacts(tmp_path / "v1", "cpu")
    monkeypatch.setenv(warm.SWITCH, "off")
    assert warm.use_warm_artifacts(tmp_path / "v1", "cpu") == f"warm artifacts: off ({warm.SWITCH}=off): compiling"


def test_the_runtime_code_version_is_the_same_for_a_repositorys_copy(tmp_path):
    from tritonize.repository.render import RUNTIME_SRC, _copy_runtime

    copy = tmp_path / "tritonize_backend"
    _copy_runtime(copy)
    (copy / "__pycache__").mkdir(exist_ok=True)
    (copy / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"whatever")
    assert warm.code_version(copy) == warm.code_version(RUNTIME_SRC) == warm.code_version()
    (copy / "engine.py").write_text((copy / "engine.py").read_text() + "\n# edited\n")
    assert warm.code_version(copy) != warm.code_version(RUNTIME_SRC)


# -- the CPU KV pool ------------------------------------------------------------------------------


def test_the_cpu_pool_stays_within_a_quarter_of_the_available_memory(tmp_path, monkeypatch):
    from tritonize.export.demo_model import write_demo_checkpoint
    from tritonize.runtime.weights import load_model

    ckpt = write_demo_checkpoint(tmp_path / "ckpt", hidden=32, layers=2, seed=3)
    model = load_model(ckpt)
    sizer = loading._PoolSizer(model, torch.device("cpu"), 16, max_batch_size=8, max_seq_len=4096,
                               max_num_tokens=4096)
    per_token = sizer._bytes_per_token()
    assert sizer.blocks(None, None) == 8 * 256 + 1  # plenty of memory: 8 requests of 4096 tokens
    monkeypatch.setattr(loading, "_available_memory", lambda: 4 * 3 * 4096 * per_token)
    assert sizer.blocks(None, None) == 3 * 256 + 1  # a quarter of it: 3 requests
    monkeypatch.setattr(loading, "_available_memory", lambda: 1024)
    assert sizer.blocks(None, None) == 256 + 1  # never less than one request
    assert sizer.blocks(100, None) == 7 + 1  # --kv-cache-tokens decides alone
