"""`tritonize bench` against a real tritonserver serving a tiny generated repository.

perf_analyzer is not installed here, so these runs go through tritonize's own gRPC-streaming load
generator; the genai-perf line is checked for the load it describes.
"""

from __future__ import annotations

import json
import shlex
import struct
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from tritonize.cli.main import cli
from tritonize.export.demo_model import write_demo_checkpoint
from tritonize.repository.build import build_repository
from tritonize.repository.spec import RepoSpec
from tritonize.serving.perfanalyzer import genai_perf_command, input_data

pytestmark = pytest.mark.e2e

INPUT_LEN, OUTPUT_LEN = 12, 6


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    ckpt = write_demo_checkpoint(tmp_path_factory.mktemp("bench-llama") / "ckpt", hidden=32, layers=2, seed=5)
    spec = RepoSpec(name="benchy", max_batch_size=4, max_input_len=32, max_output_len=16, device="cpu",
                    dtype="float32")
    return build_repository(ckpt, tmp_path_factory.mktemp("bench-repo") / "repo", spec, force=False,
                            progress=False)


@pytest.fixture(scope="module")
def server(triton_server, repo):
    return triton_server(repo)


def _png_chunks(data: bytes) -> list[bytes]:
    """Walks a PNG's chunks, checking each CRC: a truncated or corrupt file fails here."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        kinds.append(kind)
        pos += 12 + length
    return kinds


def test_bench_reports_table_json_and_plot(server, repo, tmp_path):
    out = tmp_path / "results"
    args = ["bench", "-m", "benchy", "-u", server.grpc_endpoint, "--input-len", str(INPUT_LEN),
            "--output-len", str(OUTPUT_LEN), "--concurrency", "2,1", "--duration", "2", "--output-dir", str(out),
            "--tokenizer-dir", str(repo / "benchy_preprocessing" / "1" / "tokenizer"),
            "--metrics-url", f"http://{server.host}:{server.metrics_port}/metrics"]
    result = CliRunner().invoke(cli, args, env={"PERF_ANALYZER": ""})
    assert result.exit_code == 0, result.output
    assert "genai-perf profile -m benchy --service-kind triton --backend tensorrtllm --streaming" in result.output
    assert "out tok/s" in result.output and "TTFT p50" in result.output and "ITL p99" in result.output

    report = json.loads((out / "bench.json").read_text())
    assert report["tool"] == "tritonize-loadgen" and report["prompt_tokens"] == "exact"
    assert report["concurrency"] == [1, 2] and [r["concurrency"] for r in report["runs"]] == [1, 2]
    for row in report["runs"]:
        assert row["errors"] == 0 and row["requests"] >= 1
        # every request makes exactly OUTPUT_LEN tokens (min_tokens = max_tokens)
        assert row["output_tokens_per_s"] == pytest.approx(row["requests"] * OUTPUT_LEN / row["duration_s"])
        assert row["requests_per_s"] == pytest.approx(row["requests"] / row["duration_s"])
        for metric in ("ttft_ms", "itl_ms"):
            p50, p90, p99 = (row[f"{metric}_p{q}"] for q in (50, 90, 99))
            assert 0 < p50 <= p90 <= p99
        assert row["ttft_ms_p99"] < row["duration_s"] * 1000
        line = [ln for ln in result.output.splitlines() if ln.split()[:1] == [str(row["concurrency"])]]
        assert line and line[0].split()[1] == str(row["requests"])
        # the engine's own count of the same run, from the metrics port (warm-up requests excluded)
        server_side = row["server"]
        assert server_side["requests"] == row["requests"] and server_side["finished"] == {"length": row["requests"]}
        assert server_side["generation_tokens"] == row["requests"] * OUTPUT_LEN
        assert server_side["prompt_tokens"] == row["requests"] * INPUT_LEN
        assert 0 < server_side["ttft_ms_p50"] <= server_side["ttft_ms_p99"]
        assert len(line) == 2  # the client's row and the server's
    assert "server side (http://" in result.output and "queue p50" in result.output

    genai = shlex.split(report["genai_perf_commands"]["2"])
    flags = dict(zip(genai, genai[1:]))
    assert flags["--synthetic-input-tokens-mean"] == str(INPUT_LEN)
    assert flags["--output-tokens-mean"] == str(OUTPUT_LEN)
    assert flags["--concurrency"] == "2" and flags["--url"] == server.grpc_endpoint

    kinds = _png_chunks((out / "bench.png").read_bytes())
    assert kinds[0] == b"IHDR" and b"IDAT" in kinds and kinds[-1] == b"IEND"


def test_bench_without_tokenizer_says_prompt_lengths_are_approximate(server, tmp_path):
    result = CliRunner().invoke(cli, ["bench", "-m", "benchy", "-u", server.grpc_endpoint, "--input-len", "8",
                                      "--output-len", "4", "--concurrency", "1", "--duration", "1",
                                      "--no-warmup", "--output-dir", str(tmp_path)], env={"PERF_ANALYZER": ""})
    assert result.exit_code == 0, result.output
    assert "approximate" in result.output
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["prompt_tokens"] == "approximate" and report["runs"][0]["errors"] == 0


def test_bench_errors_are_one_line(server, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(cli, ["bench", "-m", "nosuch", "-u", server.grpc_endpoint, "--output-dir", str(tmp_path)])
    assert missing.exit_code != 0
    assert "'nosuch' is not ready" in missing.output and "benchy" in missing.output
    assert len(missing.output.strip().splitlines()) == 1

    from tritonize.serving.server import free_port

    down = runner.invoke(cli, ["bench", "-m", "benchy", "-u", f"127.0.0.1:{free_port()}",
                               "--output-dir", str(tmp_path)])
    assert down.exit_code != 0 and "cannot reach" in down.output
    assert len(down.output.strip().splitlines()) == 1
    bad = runner.invoke(cli, ["bench", "-m", "benchy", "--concurrency", "1,x"])
    assert bad.exit_code != 0 and "comma-separated" in bad.output
    assert not list(tmp_path.iterdir())


def test_perf_analyzer_input_data_matches_the_wire_interface():
    data = input_data(["a b", "c"], 7)["data"]
    assert [d["text_input"]["content"] for d in data] == [["a b"], ["c"]]
    assert all(d["max_tokens"]["content"] == [7] == d["min_tokens"]["content"] for d in data)
    assert all(d["stream"]["content"] == [True] for d in data)
    cmd = genai_perf_command("m", "h:1", input_len=3, output_len=4, concurrency=5, tokenizer="/t")
    assert cmd[:2] == ["genai-perf", "profile"] and cmd[cmd.index("--tokenizer") + 1] == "/t"
