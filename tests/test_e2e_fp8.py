"""End to end, FP8: repositories made by `tritonize generate` from FP8 and float checkpoints, one tritonserver.

- ``fp8``: an FP8 checkpoint (transformers / vLLM ``fp8`` layout, per-tensor scales and static input scales)
  written from a float Llama by tests/fixtures/fp8.py, generated as it is: the served greedy text equals
  transformers ``generate`` on its dequantized twin (float32, CPU: the weight-only path is exact).
- ``quantized``: the float Llama generated with ``--quantization fp8``: the repository's weights are FP8 (per
  channel), and the served text equals transformers on those weights dequantized by fixture code.
- ``kv``: the float Llama with ``--use-fp8-kv-cache true``: every answer is well-formed, and each equals what
  the runtime's engine gives in process with an FP8 KV cache (the greedy agreement with the float cache is
  measured in test_fp8_runtime.py).
"""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm
import torch
from click.testing import CliRunner
from fixtures.fp8 import dequantize_dir, write_fp8_checkpoint

from tritonize.cli.main import cli
from tritonize.export.demo_model import write_demo_checkpoint
from tritonize.repository.validate import validate_repository
from tritonize.runtime.engine import Engine
from tritonize.serving.client import GenerateOptions, grpc_generate

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.e2e

PROMPTS = [
    "What is the color of a banana?",
    "Once upon a time",
    "The quick brown fox jumps over the lazy dog and then",
    "1, 2, 3,",
    "Ünïcödé 日本語 🍌",
    "def fibonacci(n):",
    "A",
    "In the beginning God created the heavens and the earth.",
]
MAX_TOKENS = 16
LIMITS = ["--device", "cpu", "--max-batch-size", "4", "--max-input-len", "48", "--max-output-len", "24"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e-fp8")
    ckpt = write_demo_checkpoint(work / "float", hidden=64, layers=2, seed=21)
    fp8_dir, twin = write_fp8_checkpoint(ckpt, work, "fp8-tensor-static")
    repo = work / "repo"
    for name, source, extra in (("fp8", fp8_dir, []), ("quantized", ckpt, ["--quantization", "fp8"]),
                                ("kv", ckpt, ["--use-fp8-kv-cache", "true"])):
        run = CliRunner().invoke(cli, ["generate", "-c", str(source), "-o", str(repo), "-n", name, *LIMITS, *extra])
        assert run.exit_code == 0, run.output
    return {"ckpt": ckpt, "fp8": fp8_dir, "twin": twin, "repo": repo, "work": work}


@pytest.fixture(scope="module")
def server(triton_server, built):
    return triton_server(built["repo"])


def _reference(model_dir, tokenizer_model):
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    texts = []
    for prompt in PROMPTS:
        ids = [sp.bos_id(), *sp.encode(prompt)]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=2,
                                 pad_token_id=2)
        new = out[0, len(ids):].tolist()
        new = new[: new.index(2)] if 2 in new else new
        texts.append(_text(sp, ids, new))
    return texts


def _text(sp, ids, new):
    whole, head = sp.decode(ids + new), sp.decode(ids)
    assert whole.startswith(head)
    return whole[len(head):]


def _served(server, name):
    return [grpc_generate(server.grpc_endpoint, name, p, GenerateOptions(max_tokens=MAX_TOKENS)) for p in PROMPTS]


def test_the_repositories_record_fp8_and_validate(built):
    report = validate_repository(built["repo"])
    assert report.ok, "\n".join(map(str, report.problems))
    models = json.loads((built["repo"] / "tritonize.json").read_text())["models"]
    assert models["fp8"]["quantization"] == {"weights": "fp8", "format": "fp8", "block": None, "activations": "static",
                                             "origin": "the checkpoint's", "kv_cache": "model dtype"}
    assert models["quantized"]["options"]["quantization"] == "fp8"
    assert models["quantized"]["quantization"]["origin"] == "quantized to FP8 per channel at generate time"
    assert models["quantized"]["checkpoint"]["path"] == str(built["ckpt"].resolve())
    assert models["kv"]["options"]["kv_cache_dtype"] == "fp8" and models["kv"]["quantization"]["kv_cache"] == "fp8"
    assert 'key: "kv_cache_dtype"' in (built["repo"] / "kv_engine" / "config.pbtxt").read_text()
    weights = built["repo"] / "quantized_engine" / "1" / "weights"
    config = json.loads((weights / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"


def test_an_fp8_checkpoint_serves_transformers_text_on_its_dequantized_weights(server, built):
    want = _reference(built["twin"], built["ckpt"] / "tokenizer.model")
    got = _served(server, "fp8")
    assert [g.text for g in got] == want
    assert len(set("".join(want))) > 10, "the reference output is too uniform to tell a wrong model apart"


def test_quantization_fp8_serves_transformers_text_on_the_dequantized_result(server, built):
    twin = dequantize_dir(built["repo"] / "quantized_engine" / "1" / "weights", built["work"] / "quantized-twin")
    want = _reference(twin, built["ckpt"] / "tokenizer.model")
    assert [g.text for g in _served(server, "quantized")] == want


def test_an_fp8_kv_cache_answers_every_prompt_as_the_engine_does(server, built):
    sp = spm.SentencePieceProcessor(model_file=str(built["ckpt"] / "tokenizer.model"))
    prompts = [[sp.bos_id(), *sp.encode(p)] for p in PROMPTS]
    engine = Engine(built["ckpt"], device="cpu", max_batch_size=4, max_seq_len=72, kv_cache_dtype="fp8")
    outputs = engine.generate(prompts, max_new_tokens=MAX_TOKENS)
    want = [_text(sp, ids, new[: new.index(2)] if 2 in new else new) for ids, new in zip(prompts, outputs, strict=True)]
    got = _served(server, "kv")
    for answer in got:
        assert isinstance(answer.text, str) and 0 < answer.num_output_tokens <= MAX_TOKENS
    assert [g.text for g in got] == want
