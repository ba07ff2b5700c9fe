"""Operating a served repository on a real tritonserver: limits taken from the checkpoint, the engine model's
metrics on Triton's metrics port, `tritonize serve`'s start-up progress, and warm artifacts.

The model is a GPT-2 with 256 learned positions, generated with no limits given (they come from the
checkpoint). Metrics are read from the server's /metrics as Prometheus would, between two snapshots, so the
tests hold whatever ran on the shared server before.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from fixtures import BPE_VOCAB, bpe_model, randomized, save_with_tokenizer

from tritonize.cli.main import cli
from tritonize.serving.client import GenerateOptions, grpc_generate
from tritonize.serving.metrics import Snapshot, scrape, server_view
from tritonize.serving.server import TritonServer, free_ports

pytestmark = pytest.mark.e2e

NAME = "ops"
ENGINE = f"{NAME}_engine"
POSITIONS = 256
PROMPTS = ["the capital of France is", "once upon a time there was a", "def main():\n    return", "hello"]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, bpe_dir) -> tuple[Path, torch.nn.Module]:
    work = tmp_path_factory.mktemp("ops-gpt2")
    model = randomized(bpe_model("gpt", max_position_embeddings=POSITIONS), 7)
    return save_with_tokenizer(model, work / "ckpt", bpe_dir), model


@pytest.fixture(scope="module")
def generated(gpt2, tmp_path_factory) -> tuple[Path, str]:
    """`tritonize generate` with no --max-input-len / --max-output-len."""
    ckpt, _ = gpt2
    out = tmp_path_factory.mktemp("ops-repo") / "repo"
    result = CliRunner().invoke(cli, ["generate", "-c", str(ckpt), "-o", str(out), "-n", NAME, "--device", "cpu",
                                      "--max-batch-size", "4"])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="module")
def server(triton_server, generated) -> TritonServer:
    return triton_server(generated[0])


def _tokenizer(repo: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(repo / f"{NAME}_preprocessing" / "1" / "tokenizer" / "tokenizer.json"))


def _greedy(model: torch.nn.Module, ids: list[int], max_new: int, eos: int = 0) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    new = out[0, len(ids):].tolist()
    return new[: new.index(eos)] if eos in new else new


def _metrics(server: TritonServer) -> Snapshot:
    return scrape(f"http://{server.host}:{server.metrics_port}/metrics")


def _settled(server: TritonServer, before: Snapshot, done: callable, timeout: float = 10.0) -> Snapshot:
    """The first snapshot for which ``done(view, snapshot)`` holds (metrics are flushed by the engine model's
    sender thread just after it sends; a scrape may come first), else the last one."""
    deadline = time.monotonic() + timeout
    while True:
        after = _metrics(server)
        view = server_view(before, after, ENGINE, 1.0)
        if (view is not None and done(view, after)) or time.monotonic() > deadline:
            return after
        time.sleep(0.1)


# -- limits from the checkpoint -------------------------------------------------------------------


def test_gpt2_limits_come_from_its_256_positions_and_are_printed(generated):
    repo, output = generated
    assert ("limits: prompt 128 + output 128 tokens = the 256 positions of this GPT2LMHeadModel (config.json's "
            "n_positions; --max-input-len and --max-output-len from the checkpoint)") in output
    options = json.loads((repo / "tritonize.json").read_text())["models"][NAME]["options"]
    assert (options["max_input_len"], options["max_output_len"]) == (128, 128)
    result = CliRunner().invoke(cli, ["validate", str(repo)])
    assert result.exit_code == 0, result.output


def test_gpt2_with_no_limits_given_serves_the_whole_context(server, generated, gpt2):
    repo, _ = generated
    _, model = gpt2
    tok = _tokenizer(repo)
    words = "the capital of France is Paris and the river is long".split()
    prompt = words[0]
    while len(tok.encode(prompt + " " + words[len(prompt.split()) % len(words)]).ids) <= 128:
        prompt += " " + words[len(prompt.split()) % len(words)]
    ids = tok.encode(prompt).ids
    assert 120 <= len(ids) <= 128, len(ids)
    expected = _greedy(model, ids, 128)
    got = grpc_generate(server.grpc_endpoint, NAME, prompt, GenerateOptions(max_tokens=128))
    assert got.num_input_tokens == len(ids) and got.num_output_tokens == len(expected)
    whole, head = tok.decode(ids + expected), tok.decode(ids)
    assert got.text == whole[len(head):]
    with pytest.raises(Exception, match="max_output_len of 128"):
        grpc_generate(server.grpc_endpoint, NAME, "hello", GenerateOptions(max_tokens=129))


def test_explicit_limits_that_do_not_fit_are_still_refused(gpt2, tmp_path):
    ckpt, _ = gpt2
    result = CliRunner().invoke(cli, ["generate", "-c", str(ckpt), "-o", str(tmp_path / "r"), "--max-input-len",
                                      "200", "--max-output-len", "100"])
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1] == (
        "Error: --max-input-len + --max-output-len = 300 exceeds the 256 positions this GPT2LMHeadModel has "
        "learned: lower them")
    one = CliRunner().invoke(cli, ["generate", "-c", str(ckpt), "-o", str(tmp_path / "r2"), "--max-output-len", "300"])
    assert one.exit_code != 0 and "Traceback" not in one.output
    assert one.output.strip().splitlines()[-1] == (
        "Error: --max-output-len 300 leaves no room for a prompt in the 256 positions of this GPT2LMHeadModel: "
        "lower it, or give --max-input-len too")
    rest = CliRunner().invoke(cli, ["generate", "-c", str(ckpt), "-o", str(tmp_path / "r3"), "--max-output-len", "56"])
    assert rest.exit_code == 0, rest.output
    assert "limits: prompt 200 + output 56 tokens" in rest.output


# -- metrics ---------------------------------------------------------------------------------------


def test_metrics_count_the_requests_and_tokens_sent(server, generated):
    repo, _ = generated
    tok = _tokenizer(repo)
    before = _metrics(server)
    sizes = [(prompt, 3 + i) for i, prompt in enumerate(PROMPTS)]
    for i, (prompt, n) in enumerate(sizes):  # exactly n tokens each (min_tokens = max_tokens), streamed or not
        got = grpc_generate(server.grpc_endpoint, NAME, prompt, GenerateOptions(max_tokens=n, min_tokens=n),
                            stream=i % 2 == 0)
        assert got.num_output_tokens == n and got.num_input_tokens == len(tok.encode(prompt).ids)
    with pytest.raises(Exception, match="outside the vocabulary"):  # refused by the engine: finished, reason error
        grpc_generate(server.grpc_endpoint, NAME, "hello", GenerateOptions(max_tokens=2, end_id=BPE_VOCAB + 5))
    prompt_tokens = sum(len(tok.encode(p).ids) for p, _ in sizes)
    generated_tokens = sum(n for _, n in sizes)

    def grew(after: Snapshot, counter: str) -> float:
        return after.total(counter, model=ENGINE) - before.total(counter, model=ENGINE)

    def done(view: dict, after: Snapshot) -> bool:  # the step counters are published every poll interval
        return (view["requests"] == len(sizes) + 1 and after.total("tritonize_requests_running", model=ENGINE) == 0
                and grew(after, "tritonize_decode_steps_total") >= max(n for _, n in sizes) - 1
                and grew(after, "tritonize_prompt_steps_total") >= 1)

    after = _settled(server, before, done)
    view = server_view(before, after, ENGINE, 1.0)
    assert view["finished"] == {"length": len(sizes), "error": 1}
    assert view["prompt_tokens"] == prompt_tokens and view["generation_tokens"] == generated_tokens
    for name in ("time_to_first_token", "request_latency", "inter_token_latency", "queue_time"):
        series = f"tritonize_{name}_seconds"
        count = after.total(f"{series}_count", model=ENGINE) - before.total(f"{series}_count", model=ENGINE)
        assert count == len(sizes), name
        buckets = after.by(f"{series}_bucket", "le", model=ENGINE)
        assert buckets["+Inf"] == after.total(f"{series}_count", model=ENGINE)
    assert 0 < view["ttft_ms_p50"] <= view["ttft_ms_p99"] and view["itl_ms_mean"] > 0
    labels = {"model": ENGINE, "version": "1"}
    for gauge in ("tritonize_requests_running", "tritonize_requests_waiting"):
        assert [(got, value) for got, value in after.samples[gauge] if got["model"] == ENGINE] == [(labels, 0.0)]
    (usage,) = [value for got, value in after.samples["tritonize_kv_cache_usage_ratio"] if got["model"] == ENGINE]
    assert 0.0 <= usage <= 1.0
    assert grew(after, "tritonize_decode_steps_total") >= max(n for _, n in sizes) - 1
    assert grew(after, "tritonize_prompt_steps_total") >= 1  # every request's prompt went through at least one step


def test_a_repeated_prompt_counts_prefix_cache_hits(server, generated):
    repo, _ = generated
    prompt = " ".join(["once upon a time"] * 10)
    n = len(_tokenizer(repo).encode(prompt).ids)
    assert n > 32
    before = _metrics(server)
    for _ in range(2):
        grpc_generate(server.grpc_endpoint, NAME, prompt, GenerateOptions(max_tokens=2, min_tokens=2))
    after = _settled(server, before, lambda view, _: view["requests"] == 2)
    view = server_view(before, after, ENGINE, 1.0)
    # the second request finds the first one's whole 16-token blocks and computes at least its last token
    assert view["prefix_hit_ratio"] == pytest.approx(((n - 1) // 16 * 16) / (2 * n))
    assert view["preemptions"] == 0


# -- tritonize serve: progress while it starts ------------------------------------------------------


def test_serve_shows_the_start_stages_with_elapsed_time_then_ready(generated, tmp_path):
    repo, _ = generated
    http, grpc, metrics = free_ports(3)
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "tritonize.cli.main", "serve", str(repo), "--http-port", str(http),
               "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--no-openai", "--log-file", str(log)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 240
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if "is ready" in line or time.monotonic() > deadline:
                break
        assert any("is ready after" in line for line in lines), "\n".join(lines)
        got = grpc_generate(f"127.0.0.1:{grpc}", NAME, "hello", GenerateOptions(max_tokens=2))
        assert got.num_output_tokens == 2
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    stages = [line for line in lines if re.match(r"^\[\s*\d+\.\d s\] ", line)]
    text = "\n".join(stages)
    for stage in (f"{ENGINE}/1: runtime torch", f"{ENGINE}/1: warm artifacts: none in", f"{ENGINE}/1: weights: loaded",
                  f"{ENGINE}/1: kernels: PyTorch's own on cpu", f"{ENGINE}/1: KV cache:", f"{ENGINE}/1: warm-up:",
                  f"{ENGINE}: loaded", f"{NAME}: loaded"):
        assert stage in text, f"{stage!r} not in:\n{text}"
    elapsed = [float(re.match(r"^\[\s*(\d+\.\d) s\]", line).group(1)) for line in stages]
    assert elapsed == sorted(elapsed)
    order = [next(i for i, line in enumerate(stages) if key in line)
             for key in ("weights: loaded", "KV cache:", "warm-up:", f"{NAME}: loaded")]
    assert order == sorted(order)
    ready = next(i for i, line in enumerate(lines) if "is ready after" in line)
    assert ready > lines.index(stages[-1])
    assert "warm-up: one request" in log.read_text()


# -- warm artifacts ---------------------------------------------------------------------------------


def _start(repo: Path, log: Path) -> TritonServer:
    http, grpc, metrics = free_ports(3)
    return TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, log_file=log,
                        exit_timeout=10).start(timeout=240)


def _warm_line(log: Path) -> str:
    (line,) = [ln for ln in log.read_text().splitlines() if "warm artifacts" in ln]
    return line


def test_warm_artifacts_are_recognised_on_a_second_start_and_a_mismatch_compiles(generated, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(generated[0], repo)
    prompt, opts = PROMPTS[0], GenerateOptions(max_tokens=12)
    texts = []
    with _start(repo, tmp_path / "first.log") as server:
        texts.append(grpc_generate(server.grpc_endpoint, NAME, prompt, opts).text)
    assert f"warm artifacts: none in {repo}/{ENGINE}/1/warm" in _warm_line(tmp_path / "first.log")

    result = CliRunner().invoke(cli, ["warmup", str(repo)])
    assert result.exit_code == 0, result.output
    assert "nothing is compiled on cpu, so it holds its metadata only" in result.stdout
    assert f"{ENGINE}/1: warm-up:" in result.stderr
    warm = repo / ENGINE / "1" / "warm"
    meta = json.loads((warm / "warm.json").read_text())
    assert meta["device"] == "cpu" and meta["torch"] == torch.__version__ and meta["kernels"] == 0
    hashes = json.loads((repo / "tritonize.json").read_text())["models"][NAME]["hashes"]
    assert set(hashes["warm"]) == {"warm.json"}
    assert CliRunner().invoke(cli, ["validate", str(repo)]).exit_code == 0

    with _start(repo, tmp_path / "second.log") as server:
        texts.append(grpc_generate(server.grpc_endpoint, NAME, prompt, opts).text)
    line = _warm_line(tmp_path / "second.log")
    assert f"using warm artifacts from {warm}: no compiled kernels (nothing compiles here) for cpu" in line

    meta["torch"] = "0.0.0+elsewhere"
    (warm / "warm.json").write_text(json.dumps(meta))
    with _start(repo, tmp_path / "third.log") as server:
        texts.append(grpc_generate(server.grpc_endpoint, NAME, prompt, opts).text)
    assert (f"warm artifacts are for torch 0.0.0+elsewhere, this is torch {torch.__version__}: compiling"
            in _warm_line(tmp_path / "third.log"))
    assert texts[0] and texts == [texts[0]] * 3
    changed = CliRunner().invoke(cli, ["validate", str(repo)])
    assert changed.exit_code == 1 and f"{ENGINE}/1/warm/warm.json: sha256 differs" in changed.output
    assert f"run `tritonize warmup {repo} -n {NAME} --model-version 1` again" in changed.output


def test_the_grafana_dashboard_queries_series_the_server_exports(server):
    dashboard = json.loads((Path(__file__).resolve().parents[1] / "examples" / "grafana" /
                            "tritonize-dashboard.json").read_text())
    grpc_generate(server.grpc_endpoint, NAME, "hello", GenerateOptions(max_tokens=3, min_tokens=3))
    exported = set(_metrics(server).samples)
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queried |= set(re.findall(r"\b(tritonize_[a-z_]+)\b", target["expr"]))
    assert len(queried) >= 10
    assert queried <= exported, queried - exported
    model_var = next(v for v in dashboard["templating"]["list"] if v["name"] == "model")
    assert re.search(r"label_values\((tritonize_[a-z_]+), model\)", model_var["definition"]).group(1) in exported
