"""The trtllm and auto runtimes up to the tensorrt_llm boundary.

tensorrt_llm cannot be installed on these machines, so what runs here is: the mapping of every wire
input onto the LLM API's SamplingParams, the finish-reason and log-prob translation, the import error,
`generate --runtime trtllm|auto`, and `auto` choosing torch in a real tritonserver. The test that drives
tensorrt_llm.LLM itself is skipped unless tensorrt_llm imports.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from click.testing import CliRunner

from tritonize.cli.main import cli
from tritonize.export.demo_model import write_demo_checkpoint
from tritonize.repository.build import build_repository
from tritonize.repository.render import parse_config
from tritonize.repository.spec import RepoSpec
from tritonize.runtime.choices import RUNTIMES
from tritonize.runtime.runtime import create_engine, resolve_runtime, tensorrt_llm_available
from tritonize.runtime.sampling import SamplingParams
from tritonize.runtime.trtllm_engine import (
    INSTALL_HINT,
    TrtllmNotInstalledError,
    import_tensorrt_llm,
    map_finish_reason,
    to_trtllm_sampling,
    token_log_probs,
)
from tritonize.serving.client import GenerateOptions, grpc_generate

HAVE_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None


# ---------------------------------------------------------------------------- sampling mapping


def test_nothing_set_passes_only_max_tokens():
    """Unset knobs stay unset so TensorRT-LLM's defaults (greedy) apply, as they do in the torch runtime."""
    assert to_trtllm_sampling(SamplingParams(), 7) == {"max_tokens": 7}


def test_every_sampling_input_reaches_its_field():
    sampling = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=1234, repetition_penalty=1.3,
                              presence_penalty=0.5, frequency_penalty=0.25, min_tokens=3)
    got = to_trtllm_sampling(sampling, 20)
    assert got == {"max_tokens": 20, "temperature": 0.7, "top_k": 40, "top_p": 0.9, "seed": 1234,
                   "repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.25, "min_tokens": 3}
    assert all(type(got[k]) is int for k in ("max_tokens", "top_k", "seed", "min_tokens"))
    assert all(type(got[k]) is float for k in ("temperature", "top_p", "repetition_penalty"))


@pytest.mark.parametrize("sampling", [
    SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=0), SamplingParams(top_p=0.0, seed=3),
])
def test_a_temperature_alone_stays_greedy(sampling):
    """The wire rule is the executor's (no top_k, no top_p: greedy); the LLM API would sample on a
    temperature alone, so none of the three is sent."""
    got = to_trtllm_sampling(sampling, 4)
    assert not {"temperature", "top_k", "top_p"} & set(got)


@pytest.mark.parametrize(("sampling", "field", "value"), [
    (SamplingParams(temperature=0.0), "temperature", 0.0),  # greedy, said explicitly
    (SamplingParams(top_k=1), "top_k", 1),
    (SamplingParams(top_p=1.0), "top_p", 1.0),
    (SamplingParams(seed=0), "seed", 0),
])
def test_explicit_values_that_look_like_defaults_are_kept(sampling, field, value):
    assert to_trtllm_sampling(sampling, 4)[field] == value


def test_end_ids_pad_id_bad_words_and_log_probs():
    got = to_trtllm_sampling(SamplingParams(), 5, end_ids=[2, 7, -1], bad_sequences=[[9], [4], [9]],
                             return_log_probs=True, pad_id=0)
    assert got["end_id"] == 2
    assert got["stop_token_ids"] == [7]  # the other end ids also end the request, out of the output
    assert got["pad_id"] == 0
    assert got["bad_token_ids"] == [4, 9]
    assert got["logprobs"] == 1
    one = to_trtllm_sampling(SamplingParams(), 5, end_ids=[2])
    assert one["end_id"] == 2 and "stop_token_ids" not in one and "logprobs" not in one


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sampling": SamplingParams(), "max_new_tokens": 0}, "max_tokens must be at least 1"),
    ({"sampling": SamplingParams(temperature=-1.0), "max_new_tokens": 3}, "temperature must be >= 0"),
    ({"sampling": SamplingParams(top_k=-2), "max_new_tokens": 3}, "top_k must be >= 0"),
    ({"sampling": SamplingParams(top_p=1.5), "max_new_tokens": 3}, r"top_p must be in \[0, 1\]"),
    ({"sampling": SamplingParams(), "max_new_tokens": 3, "bad_sequences": [[5, 6]]}, "spans 2 tokens"),
])
def test_what_the_llm_api_cannot_express_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        to_trtllm_sampling(**kwargs)


def test_finish_reasons_and_log_probs_translate():
    assert map_finish_reason("length") == "length"
    assert map_finish_reason("stop") == "end"
    assert map_finish_reason("cancelled") == "cancelled"
    assert map_finish_reason(None) is None

    class Logprob:  # TensorRT-LLM's per-candidate record: the log-prob sits in .logprob
        def __init__(self, value: float) -> None:
            self.logprob = value

    assert token_log_probs([-0.5, -1.5], [3, 4]) == [-0.5, -1.5]
    assert token_log_probs([{3: Logprob(-0.25), 8: Logprob(-2.0)}, {4: Logprob(-0.75)}], [3, 4]) == [-0.25, -0.75]
    assert token_log_probs(None, [3]) == []


# ---------------------------------------------------------------------------- import error and selection


@pytest.mark.skipif(HAVE_TRTLLM, reason="tensorrt_llm is installed")
def test_missing_tensorrt_llm_is_one_line_naming_the_install(tmp_path):
    with pytest.raises(TrtllmNotInstalledError) as info:
        import_tensorrt_llm()
    message = str(info.value)
    assert "\n" not in message and INSTALL_HINT in message and "--runtime torch" in message
    with pytest.raises(TrtllmNotInstalledError, match="pip install"):
        create_engine("trtllm", tmp_path, device="cpu", dtype="float32", max_batch_size=2, max_seq_len=16,
                      max_num_tokens=16)


def test_auto_resolves_by_what_the_machine_has():
    expected = "trtllm" if tensorrt_llm_available() and torch.cuda.is_available() else "torch"
    assert resolve_runtime("auto") == expected
    assert resolve_runtime("torch") == "torch" and resolve_runtime("trtllm") == "trtllm"
    with pytest.raises(ValueError, match="unknown runtime 'vllm'"):
        resolve_runtime("vllm")
    assert RUNTIMES == ("torch", "trtllm", "trtllm-engine", "auto")
    assert resolve_runtime("trtllm-engine") == "trtllm-engine"  # never what auto picks: it needs a built engine


# ---------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_demo_checkpoint(tmp_path_factory.mktemp("llama") / "ckpt", hidden=32, layers=2, seed=5)


def _engine_params(repo: Path, name: str) -> dict[str, str]:
    config = parse_config((repo / f"{name}_engine" / "config.pbtxt").read_text())
    return {key: value.string_value for key, value in config.parameters.items()}


def _generate(ckpt: Path, out: Path, runtime: str) -> str:
    """`generate --runtime RUNTIME` of a small repository named t: its output."""
    result = CliRunner().invoke(cli, ["generate", "--checkpoint", str(ckpt), "--output", str(out), "--model-name",
                                      "t", "--runtime", runtime, "--max-input-len", "16", "--max-output-len", "8"])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.skipif(HAVE_TRTLLM, reason="tensorrt_llm is installed")
def test_generate_trtllm_writes_the_repository_and_warns(ckpt, tmp_path):
    out = tmp_path / "repo"
    output = _generate(ckpt, out, "trtllm")
    warnings = [line for line in output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "tensorrt_llm is not installed" in warnings[0] and "pip install" in warnings[0]
    assert _engine_params(out, "t")["runtime"] == "trtllm"
    assert (out / "t_engine" / "1" / "tritonize_backend" / "trtllm_engine.py").is_file()
    assert json.loads((out / "tritonize.json").read_text())  # a complete repository, manifest included


def test_generate_auto_does_not_warn(ckpt, tmp_path):
    out = tmp_path / "repo"
    assert "warning" not in _generate(ckpt, out, "auto")
    assert _engine_params(out, "t")["runtime"] == "auto"


# ---------------------------------------------------------------------------- auto in a real server


@pytest.mark.e2e
def test_auto_serves_with_torch_here_and_matches_transformers(ckpt, tmp_path_factory, triton_server):
    if resolve_runtime("auto") != "torch":
        pytest.skip("this machine would pick trtllm for auto")
    transformers = pytest.importorskip("transformers")
    spec = RepoSpec(name="tinyauto", max_batch_size=2, max_input_len=32, max_output_len=12, runtime="auto",
                    device="cpu", dtype="float32")
    repo = build_repository(ckpt, tmp_path_factory.mktemp("auto") / "repo", spec, force=False, progress=False)
    server = triton_server(repo)

    prompt = "Once upon a time"
    got = grpc_generate(server.grpc_endpoint, "tinyauto", prompt, GenerateOptions(max_tokens=10))

    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    ids = [sp.bos_id(), *sp.encode(prompt)]
    model = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=2,
                             pad_token_id=2)
    new = out[0, len(ids):].tolist()
    if 2 in new:
        new = new[: new.index(2)]
    expected = sp.decode(ids + new)[len(sp.decode(ids)):]
    assert got.text == expected
    assert got.num_output_tokens == len(new)
    log = Path(server.log_path).read_text(errors="replace")
    assert "runtime torch (asked for auto)" in log


# ---------------------------------------------------------------------------- tensorrt_llm itself


def test_trtllm_engine_generates_like_the_torch_engine(ckpt):
    pytest.importorskip("tensorrt_llm", reason="tensorrt_llm is not installed")
    if not torch.cuda.is_available():
        pytest.skip("tensorrt_llm needs an NVIDIA GPU")
    from tritonize.runtime.engine import Engine
    from tritonize.runtime.trtllm_engine import TrtllmEngine

    prompts = [[1, 450, 4996, 17354], [1, 9038, 2501, 263, 931]]
    with Engine(ckpt, device="cuda", dtype="float32", max_batch_size=2, max_seq_len=32) as reference:
        expected = reference.generate(prompts, max_new_tokens=8)
    with TrtllmEngine(ckpt, dtype="float32", max_batch_size=2, max_seq_len=32) as engine:
        assert engine.generate(prompts, max_new_tokens=8) == expected
