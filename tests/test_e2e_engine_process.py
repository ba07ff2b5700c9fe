"""The engine in a process of its own (engine_process.py), asked for with TRITONIZE_ENGINE_PROCESS=1 and
served by a real tritonserver on the CPU: transformers' greedy text over gRPC streaming
(concurrent requests) and HTTP, the metrics, and a child that dies while serving."""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from fixtures import bpe_model, randomized, save_with_tokenizer

from tritonize.cli.main import cli
from tritonize.serving.client import GenerateOptions, grpc_generate, http_generate
from tritonize.serving.metrics import scrape, server_view
from tritonize.serving.server import TritonServer, free_ports

pytestmark = pytest.mark.e2e

NAME = "proc"
ENGINE = f"{NAME}_engine"
PROMPTS = ["the capital of France is", "once upon a time there was a", "def main():\n    return", "hello"]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, bpe_dir) -> tuple[Path, torch.nn.Module]:
    work = tmp_path_factory.mktemp("proc-gpt2")
    model = randomized(bpe_model("gpt", max_position_embeddings=128), 11)
    return save_with_tokenizer(model, work / "ckpt", bpe_dir), model


@pytest.fixture(scope="module")
def server(gpt2, tmp_path_factory):
    ckpt, _ = gpt2
    work = tmp_path_factory.mktemp("proc-repo")
    result = CliRunner().invoke(cli, ["generate", "-c", str(ckpt), "-o", str(work / "repo"), "-n", NAME, "--device",
                                      "cpu", "--max-batch-size", "4", "--max-input-len", "64", "--max-output-len", "32"])
    assert result.exit_code == 0, result.output
    http, grpc, metrics = free_ports(3)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TRITONIZE_ENGINE_PROCESS", "1")
        srv = TritonServer(work / "repo", http_port=http, grpc_port=grpc, metrics_port=metrics,
                           log_file=work / "server.log", exit_timeout=10)
        srv.start(timeout=180)
    yield srv
    srv.stop()


def _tokenizer(server: TritonServer):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(server.repo / f"{NAME}_preprocessing" / "1" / "tokenizer" / "tokenizer.json"))


def _greedy_text(model, tok, prompt: str, n: int) -> str:
    ids = tok.encode(prompt).ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return tok.decode(out[0].tolist())[len(tok.decode(ids)):]


def _engine_pid(server: TritonServer) -> int:
    match = re.search(r"engine process (\d+) serves the model", server.log_path.read_text(errors="replace"))
    assert match, "the engine model did not say it runs its engine in a process of its own"
    return int(match.group(1))


def test_concurrent_streams_and_http_give_transformers_greedy_text(server, gpt2):
    _, model = gpt2
    tok = _tokenizer(server)
    opts = GenerateOptions(max_tokens=12, min_tokens=12)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        streamed = list(pool.map(lambda p: grpc_generate(server.grpc_endpoint, NAME, p, opts, stream=True), PROMPTS))
    for prompt, got in zip(PROMPTS, streamed):
        assert got.text == _greedy_text(model, tok, prompt, 12)
    assert http_generate(server.http_endpoint, NAME, PROMPTS[0], opts).text == streamed[0].text
    assert _engine_pid(server) != 0


def test_metrics_count_what_the_engine_process_did(server):
    url = f"http://{server.host}:{server.metrics_port}/metrics"
    before = scrape(url)
    for i, prompt in enumerate(PROMPTS):
        grpc_generate(server.grpc_endpoint, NAME, prompt, GenerateOptions(max_tokens=3 + i, min_tokens=3 + i),
                      stream=i % 2 == 0)

    def grew(after, counter: str) -> float:  # noqa: ANN001 - a metrics Snapshot
        return after.total(counter, model=ENGINE) - before.total(counter, model=ENGINE)

    deadline = time.monotonic() + 10
    while True:  # the step counters are published every poll interval, after the requests are counted
        after = scrape(url)
        view = server_view(before, after, ENGINE, 1.0)
        settled = view is not None and view["requests"] == len(PROMPTS) and \
            after.total("tritonize_requests_running", model=ENGINE) == 0 and \
            grew(after, "tritonize_decode_steps_total") >= 2 + len(PROMPTS) - 1 and \
            grew(after, "tritonize_prompt_steps_total") >= 1
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert view["finished"] == {"length": len(PROMPTS)}
    assert view["generation_tokens"] == sum(3 + i for i in range(len(PROMPTS)))
    assert after.total("tritonize_requests_waiting", model=ENGINE) == 0
    assert grew(after, "tritonize_decode_steps_total") >= 2 + len(PROMPTS) - 1
    assert grew(after, "tritonize_prompt_steps_total") >= 1  # every request's prompt went through at least one step


def test_an_engine_process_that_dies_turns_requests_into_one_line_errors_and_the_server_stays_up(server):
    os.kill(_engine_pid(server), signal.SIGKILL)
    deadline = time.monotonic() + 10
    message = ""
    while time.monotonic() < deadline:
        try:
            grpc_generate(server.grpc_endpoint, NAME, "hello", GenerateOptions(max_tokens=4))
        except Exception as exc:  # noqa: BLE001 - the error the client sees is the point
            message = str(exc)
            break
        time.sleep(0.2)
    assert "the engine process exited (code -9)" in message and "\n" not in message.strip()
    with urllib.request.urlopen(f"http://{server.http_endpoint}/v2/health/live", timeout=5) as response:
        assert response.status == 200
