"""`tritonize serve` stops within 5 s of SIGTERM when nothing is in flight, whatever ran before.

Triton 2.51 counts a model live until every reference to it is gone, and waits --exit-timeout-secs (30 s)
for it at shutdown. Two things leave such a model behind with nothing in flight: a gRPC stream that the
client cancels just after its final response (tritonclient's aio idiom of leaving the ``async for``, as a
load generator does), which keeps the ensemble referenced, and a Python model whose stub died under a
request, which never finishes unloading. Each test serves a repository, does one of those (and what a bench run or a
stream of refused requests does), then times the stop.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tritonize.cli.main import cli
from tritonize.errors import QueryError
from tritonize.export.demo_model import write_demo_checkpoint
from tritonize.repository.build import build_repository
from tritonize.repository.spec import RepoSpec
from tritonize.serving.client import GenerateOptions, grpc_generate, grpc_inputs
from tritonize.serving.server import find_stub_processes, free_ports

pytestmark = pytest.mark.e2e
PROJECT_ROOT = Path(__file__).resolve().parents[1]
STOP_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("shutdown")
    ckpt = write_demo_checkpoint(work / "ckpt", hidden=32, layers=1, seed=2)
    spec = RepoSpec(name="tiny", max_batch_size=4, max_input_len=32, max_output_len=16, device="cpu")
    return build_repository(ckpt, work / "repo", spec, force=False, progress=False)


class Served:
    """`tritonize serve REPO` as a user runs it, in its own process."""

    def __init__(self, repo: Path, tmp_path: Path) -> None:
        self.repo = repo
        self.http, self.grpc, self.metrics = free_ports(3)
        command = [sys.executable, "-m", "tritonize.cli.main", "serve", str(repo), "--http-port", str(self.http),
                   "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
                   "--log-file", str(tmp_path / "server.log")]
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
        self.proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc.stdout, lines), daemon=True).start()
        deadline = time.monotonic() + 120
        printed = ""
        while "Press Ctrl-C" not in printed:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, f"serve exited early: {self.proc.wait()} {self.proc.stderr.read()}"
            printed += line

    @staticmethod
    def _read(stream, lines: queue.Queue) -> None:
        for line in iter(stream.readline, ""):
            lines.put(line)
        lines.put(None)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def stop(self) -> tuple[float, int, str]:
        """SIGTERM as Ctrl-C or a supervisor sends it: (seconds to exit, exit code, what serve said on stderr)."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return time.monotonic() - start, rc, self.proc.stderr.read()


async def _cancelling_streams(endpoint: str, inputs_of, *, users: int, seconds: float) -> int:
    """Streams that leave the ``async for`` on their final response or error, which cancels the call."""
    import tritonclient.grpc.aio as aio

    done = 0

    async def user() -> None:
        nonlocal done
        async with aio.InferenceServerClient(endpoint) as client:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                async def request():
                    yield {"model_name": "tiny", "inputs": inputs_of(), "request_id": uuid.uuid4().hex,
                           "enable_empty_final_response": True}

                async for result, error in client.stream_infer(request()):
                    if error is not None:
                        break
                    final = result.get_response().parameters.get("triton_final_response")
                    if final is not None and final.bool_param:
                        break
                done += 1

    await asyncio.gather(*(user() for _ in range(users)))
    return done


def _tensor(name: str, array: np.ndarray, dtype: str):
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def _assert_quick_clean_stop(served: Served) -> str:
    seconds, rc, said = served.stop()
    assert rc == 0, said
    assert seconds <= STOP_WITHIN_S, f"serve took {seconds:.1f} s to stop: {said}"
    assert "tritonserver stopped" in said
    assert not find_stub_processes(str(served.repo))
    return said


def test_serve_stops_quickly_after_a_bench_run(repo, tmp_path):
    served = Served(repo, tmp_path)
    try:
        bench = CliRunner().invoke(cli, ["bench", "-m", "tiny", "-u", served.endpoint, "--input-len", "8",
                                         "--output-len", "4", "--concurrency", "1,4", "--duration", "2",
                                         "--output-dir", str(tmp_path / "bench")], env={"PERF_ANALYZER": ""})
        assert bench.exit_code == 0, bench.output
        # and a load generator that cancels each stream on its final response
        streamed = asyncio.run(_cancelling_streams(
            served.endpoint, lambda: grpc_inputs("Once upon a time", GenerateOptions(max_tokens=4), True),
            users=4, seconds=3))
        assert streamed > 4
    finally:
        _assert_quick_clean_stop(served)


def test_serve_stops_quickly_after_rejected_requests(repo, tmp_path):
    served = Served(repo, tmp_path)
    text = np.array([[b"hello"]], dtype=np.object_)
    refused = [  # what Triton itself refuses, then what the models refuse
        lambda: [_tensor("text_input", text, "BYTES"), _tensor("max_tokens", np.array([[4]], np.int32), "INT32"),
                 _tensor("temprature", np.array([[0.5]], np.float32), "FP32")],
        lambda: [_tensor("text_input", text, "BYTES"), _tensor("max_tokens", np.array([[4.0]], np.float32), "FP32")],
        lambda: [_tensor("text_input", np.array([[b"a", b"b"]], dtype=np.object_), "BYTES"),
                 _tensor("max_tokens", np.array([[4]], np.int32), "INT32")],
        lambda: [_tensor("text_input", text, "BYTES"), _tensor("stream", np.array([[True]]), "BOOL")],
        lambda: [_tensor("text_input", text, "BYTES"), _tensor("max_tokens", np.array([[99]], np.int32), "INT32")],
        lambda: [_tensor("text_input", text, "BYTES"), _tensor("max_tokens", np.array([[4]], np.int32), "INT32"),
                 _tensor("beam_width", np.array([[3]], np.int32), "INT32")],
    ]
    try:
        for inputs_of in refused:
            asyncio.run(_cancelling_streams(served.endpoint, inputs_of, users=2, seconds=0.5))
        assert grpc_generate(served.endpoint, "tiny", "still serving", GenerateOptions(max_tokens=3)).num_output_tokens
    finally:
        _assert_quick_clean_stop(served)


def test_serve_stops_quickly_after_a_stub_crashed(repo, tmp_path):
    served = Served(repo, tmp_path)
    try:
        assert grpc_generate(served.endpoint, "tiny", "hello", GenerateOptions(max_tokens=3)).num_output_tokens
        [engine] = [pid for pid, argv in find_stub_processes(str(repo)).items() if "tiny_engine" in argv[1]]
        os.kill(engine, signal.SIGKILL)
        time.sleep(0.5)
        with pytest.raises(QueryError, match="Stub process 'tiny_engine_0_0' is not healthy"):
            grpc_generate(served.endpoint, "tiny", "hello", GenerateOptions(max_tokens=3), timeout=30)
    finally:
        said = _assert_quick_clean_stop(served)
    # Triton never finishes unloading a model whose stub died under a request; serve says it did not wait.
    assert "tiny_engine" in said and "live" in said
