"""The Python API: `Exporter` (export + in-process forward) and `Deployment` (generate + tritonserver)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from deploy_source import LIMITS, MAX_TOKENS, PROMPTS, nemo2_llama

from tritonize import Deployment, Exporter
from tritonize.deploy import DeployError
from tritonize.serving.client import GenerateOptions, grpc_generate
from tritonize.serving.server import free_ports


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    work = tmp_path_factory.mktemp("api")
    source = nemo2_llama(work)
    exporter = Exporter(work / "model_dir")
    exporter.export(nemo_checkpoint_path=source.path, model_type="llama", tensor_parallelism_size=1,
                    dtype="float32", **LIMITS)
    yield exporter, source, work
    exporter.close()


def test_import_tritonize_stays_light():
    code = "import sys, tritonize; assert 'torch' not in sys.modules; print(tritonize.Exporter.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "Exporter"


def test_forward_matches_transformers(exported):
    exporter, source, _ = exported
    assert json.loads((exporter.model_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    texts = exporter.forward(PROMPTS, max_output_token=MAX_TOKENS)
    assert texts == [source.greedy_text(p) for p in PROMPTS]
    assert len(set("".join(texts))) > 3, "the reference output is too uniform to tell a wrong model apart"


def test_forward_refuses_unknown_adapters_and_bad_lengths(exported):
    exporter, _, _ = exported
    with pytest.raises(DeployError, match=r"lora_uids has '0', .*it serves: none: pass lora_ckpt_list"):
        exporter.forward(PROMPTS, max_output_token=MAX_TOKENS, lora_uids=["0"])
    with pytest.raises(DeployError, match="task_ids has 'qa', .*add_prompt_table"):
        exporter.forward(PROMPTS, max_output_token=MAX_TOKENS, task_ids=["qa"])
    with pytest.raises(ValueError, match="max_output_token is 99"):
        exporter.forward(PROMPTS, max_output_token=99)


@pytest.mark.parametrize("kwargs", [
    {"pipeline_parallelism_size": 2}, {"opt_num_tokens": 64}, {"paged_kv_cache": False},
    {"use_parallel_embedding": True},
])
def test_export_refuses_trtllm_only_options_by_their_keyword(tmp_path, kwargs):
    """Named as the caller wrote it (keyword=value), with no command-line flag in the message."""
    [(keyword, value)] = kwargs.items()
    with pytest.raises(DeployError) as refused:
        Exporter(tmp_path / "out").export(tmp_path / "missing.nemo", **kwargs)
    message = str(refused.value)
    assert message.startswith(f"{keyword}={value!r} is not available in the Python API"), message
    assert "--" not in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_export_honours_nemos_fp8_switches(exported, tmp_path):
    """fp8_quantized=True: the export's linears in FP8 (per channel); fp8_kvcache=True: the engine's KV cache in FP8."""
    from tritonize.runtime.quantize import FP8Linear

    _, source, _ = exported
    exporter = Exporter(tmp_path / "fp8")
    exporter.export(nemo_checkpoint_path=source.path, model_type="llama", dtype="float32", fp8_quantized=True,
                    fp8_kvcache=True, **LIMITS)
    try:
        config = json.loads((exporter.model_dir / "config.json").read_text())
        assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
        model = exporter._engine.model
        assert isinstance(model.layers[0].attention.wqkv, FP8Linear) and exporter._engine.kv_cache_dtype == "fp8"
        texts = exporter.forward(PROMPTS[:2], max_output_token=MAX_TOKENS)
        assert all(isinstance(t, str) and t for t in texts)
    finally:
        exporter.close()


def test_export_refuses_fp8_switches_that_disagree(tmp_path):
    with pytest.raises(DeployError, match="fp8_quantized=True and quantization='none' disagree"):
        Exporter(tmp_path / "out").export(tmp_path / "missing.nemo", fp8_quantized=True, quantization="none")
    assert not (tmp_path / "out").exists()


def test_export_rejects_unknown_keywords(tmp_path):
    with pytest.raises(TypeError, match="'no_such_option'"):
        Exporter(tmp_path / "out").export(tmp_path / "missing.nemo", no_such_option=1)


@pytest.mark.e2e
def test_deployment_serves_what_forward_returns(exported):
    exporter, _, work = exported
    http, grpc, metrics = free_ports(3)
    deployment = Deployment(model=exporter, triton_model_name="tiny", http_port=http, grpc_port=grpc,
                            metrics_port=metrics, model_repository=work / "repo")
    try:
        deployment.run()
        options = GenerateOptions(max_tokens=MAX_TOKENS)
        served = [grpc_generate(deployment.server.grpc_endpoint, "tiny", p, options).text for p in PROMPTS]
    finally:
        deployment.stop()
    assert served == exporter.forward(PROMPTS, max_output_token=MAX_TOKENS)
    manifest = json.loads((work / "repo" / "tritonize.json").read_text())
    options = manifest["models"]["tiny"]["options"]
    assert (options["max_input_len"], options["max_output_len"], options["max_batch_size"]) == (32, 16, 2)
    # A second deploy of the same request reuses the repository instead of writing it again.
    before = (work / "repo" / "tritonize.json").stat().st_mtime_ns
    Deployment(model=exporter, triton_model_name="tiny", model_repository=work / "repo").deploy()
    assert (work / "repo" / "tritonize.json").stat().st_mtime_ns == before
