"""examples/clients.py, run as a user runs it, against a served repository: every door gives the same text."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tritonize.export.demo_model import write_demo_checkpoint
from tritonize.repository.build import build_repository
from tritonize.repository.spec import RepoSpec

pytestmark = pytest.mark.e2e
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "clients.py"


@pytest.fixture(scope="module")
def server(triton_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("clients")
    ckpt = write_demo_checkpoint(work / "ckpt", hidden=32, layers=2, seed=7)
    spec = RepoSpec(name="tiny", max_batch_size=4, max_input_len=32, max_output_len=16, device="cpu")
    return triton_server(build_repository(ckpt, work / "repo", spec, force=False, progress=False))


def test_each_door_answers_the_same(server):
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--model", "tiny", "--prompt", "The capital of France is",
                           "--max-tokens", "8", "--grpc", server.grpc_endpoint, "--http", server.http_endpoint],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    answers = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert sorted(answers) == ["HTTP /infer  ", "HTTP generate", "gRPC stream  "]
    texts = {ast.literal_eval(text) for text in answers.values()}
    assert len(texts) == 1 and texts.pop()


API_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "python_api.py"


def test_the_python_api_example_runs_and_both_answers_are_transformers_greedy_text(tmp_path):
    """examples/python_api.py as a user runs it: export, in-process forward, deploy, serve, ask, stop."""
    import sentencepiece as spm
    import torch
    import transformers

    from tritonize.serving.server import find_stub_processes, free_ports

    http, grpc, metrics = free_ports(3)
    prompt = "The capital of France is"
    proc = subprocess.run([sys.executable, str(API_EXAMPLE), "--prompt", prompt, "--max-tokens", "8",
                           "--work", str(tmp_path), "--http-port", str(http), "--grpc-port", str(grpc),
                           "--metrics-port", str(metrics)], capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr
    answers = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert sorted(answers) == ["in-process", "served    "]

    ckpt = tmp_path / "ckpt"
    model = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    ids = [sp.bos_id(), *sp.encode(prompt)]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=2)
    new = out[0, len(ids):].tolist()
    new = new[: new.index(2)] if 2 in new else new
    expected = sp.decode(ids + new)[len(sp.decode(ids)):]
    assert expected
    assert {ast.literal_eval(text) for text in answers.values()} == {expected}
    assert not find_stub_processes(str(tmp_path / "repo")), "the example left the server's processes behind"
