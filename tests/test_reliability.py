"""Reliability: many streams at once, cancellation, bad input, a killed stub and SIGTERM mid-flight.

Each check runs a real tritonserver on a tiny Llama. Greedy outputs under load are compared with the
text each prompt gets when asked alone, so a lost, duplicated or mixed-up response shows up as a
mismatch. `bench/soak.py` runs the concurrent part for longer with more clients.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tritonize.export.demo_model import write_demo_checkpoint
from tritonize.repository.build import build_repository
from tritonize.repository.spec import RepoSpec
from tritonize.runtime.packed import unpack
from tritonize.serving.client import GenerateOptions, QueryError, grpc_generate, grpc_inputs
from tritonize.serving.loadgen import answers_under_load
from tritonize.serving.server import SHM_DIR, TritonServer, free_ports

grpcclient = pytest.importorskip("tritonclient.grpc")
pytestmark = pytest.mark.e2e

WORDS = "apple river stone cloud seven green quiet number house music paper light".split()
LONG = 1000  # max_output_len of the small-batch repository: a request that would hold its slot for seconds


def prompts(count: int) -> list[str]:
    """Distinct prompts, so a response delivered to the wrong client cannot match by chance."""
    return [f"{WORDS[i % len(WORDS)]} {WORDS[(i * 5 + 3) % len(WORDS)]} {i}" for i in range(count)]




def shm_segments(server: TritonServer) -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(f"{server.shm_prefix}*"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_demo_checkpoint(tmp_path_factory.mktemp("rel") / "ckpt", hidden=32, layers=2, seed=5)


@pytest.fixture(scope="module")
def wide_repo(ckpt, tmp_path_factory) -> Path:
    spec = RepoSpec(name="wide", max_batch_size=16, max_input_len=32, max_output_len=16, device="cpu",
                    dtype="float32")
    return build_repository(ckpt, tmp_path_factory.mktemp("wide") / "repo", spec, force=False, progress=False)


@pytest.fixture(scope="module")
def narrow_repo(ckpt, tmp_path_factory) -> Path:
    """Two slots and long generations: a request left running would make the next one wait."""
    spec = RepoSpec(name="narrow", max_batch_size=2, max_input_len=32, max_output_len=LONG, device="cpu",
                    dtype="float32")
    return build_repository(ckpt, tmp_path_factory.mktemp("narrow") / "repo", spec, force=False, progress=False)


def own_server(repo: Path, tmp_path: Path) -> TritonServer:
    """A server of the test's own, for tests that kill or stop it."""
    http_port, grpc_port, metrics_port = free_ports(3)
    server = TritonServer(repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          log_file=tmp_path / "server.log", exit_timeout=3)
    return server.start(timeout=180)


def test_concurrent_streams_get_their_own_answers_and_memory_stays_flat(triton_server, wide_repo):
    server = triton_server(wide_repo)
    asks = prompts(32)
    expected = {p: grpc_generate(server.grpc_endpoint, "wide", p, GenerateOptions(max_tokens=12)).text
                for p in asks}
    assert len(set(expected.values())) > 1
    rss = []
    total = 0
    for _ in range(2):
        done = asyncio.run(answers_under_load(server.grpc_endpoint, "wide", asks, clients=32, max_tokens=12,
                                              duration=3))
        total += len(done)
        assert len(done) >= 32
        for answer in done:
            assert answer.error is None and answer.finals == 1, answer
            assert answer.text == expected[answer.prompt], answer.prompt
        rss.append(server.rss_mb())
    assert rss[1] < rss[0] * 1.05 + 16, f"server RSS grew from {rss[0]:.0f} MB to {rss[1]:.0f} MB"
    print(f"{total} streamed requests, RSS {rss[0]:.0f} -> {rss[1]:.0f} MB")


def _tensor(name: str, array: np.ndarray, dtype: str):
    tensor = grpcclient.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def _text(value: bytes | list[bytes]) -> object:
    return _tensor("text_input", np.array([value if isinstance(value, list) else [value]], dtype=np.object_), "BYTES")


def _max_tokens(value: int) -> object:
    return _tensor("max_tokens", np.array([[value]], dtype=np.int32), "INT32")


def stream_error(url: str, model: str, inputs: list) -> str:
    """The error a streamed request gets (fails the test if it gets an answer, or none in 30 s)."""
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        _, error = answers.get(timeout=30)
    finally:
        client.stop_stream()
        client.close()
    assert error is not None, "the server accepted a bad request"
    return error.message()


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (lambda: [_text(b"\xff\xfe abc"), _max_tokens(4)], "text_input is not valid UTF-8"),
        (lambda: [_text(b"hello"), _max_tokens(-3)], "max_tokens is -3: ask for at least 1 token"),
        (lambda: [_text(b"hello"), _tensor("max_tokens", np.array([[4.0]], dtype=np.float32), "FP32")],
         "'max_tokens' data-type is 'FP32', but model 'wide' expects 'INT32'"),
        (lambda: [_text([b"hello", b"again"]), _max_tokens(4)],
         r"unexpected shape for input 'text_input' .* Expected \[-1,1\], got \[1,2\]"),
        (lambda: [_text(b"hello"), _max_tokens(4), _tensor("temprature", np.array([[0.5]], np.float32), "FP32")],
         "unexpected inference input 'temprature'"),
        (lambda: [_text(b"hello")], "max_tokens is required and missing"),
        (lambda: [_max_tokens(4), _tensor("stream", np.array([[True]]), "BOOL")], "text_input is required and missing"),
    ],
    ids=["invalid-utf8", "negative-max-tokens", "fp32-max-tokens", "shape-1x2", "unknown-input", "no-max-tokens",
         "no-text-input"],
)
def test_bad_requests_get_a_clear_error_and_the_server_stays_up(triton_server, wide_repo, inputs, message):
    server = triton_server(wide_repo)
    assert re.search(message, stream_error(server.grpc_endpoint, "wide", inputs()))
    assert grpc_generate(server.grpc_endpoint, "wide", "still there", GenerateOptions(max_tokens=3)).num_output_tokens


def _engine_inputs(max_tokens: int, *, stop: bool = False) -> list:
    empty_words = np.array([[[0], [-1]]], dtype=np.int32)
    return [
        _tensor("input_ids", np.array([[1, 500, 600, 700]], dtype=np.int32), "INT32"),
        _tensor("input_lengths", np.array([[4]], dtype=np.int32), "INT32"),
        _tensor("request_output_len", np.array([[max_tokens]], dtype=np.int32), "INT32"),
        _tensor("end_ids", np.array([[-1]], dtype=np.int32), "INT32"),
        _tensor("pad_id", np.array([[2]], dtype=np.int32), "INT32"),
        _tensor("stop_words_list", empty_words, "INT32"),
        _tensor("bad_words_list", empty_words, "INT32"),
        _tensor("stream", np.array([[True]]), "BOOL"),
        _tensor("stop", np.array([[stop]]), "BOOL"),
    ]


def _fill_slots_then_cancel(url: str, model: str, inputs: list) -> None:
    """Two long streams (every slot), a few responses each, then the client cancels them."""
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for _ in range(2):
        client.async_stream_infer(model, inputs)
    for _ in range(4):
        _, error = answers.get(timeout=30)
        assert error is None, error
    client.stop_stream(cancel_requests=True)
    client.close()


def _timed_short_request(url: str, model: str) -> float:
    start = time.perf_counter()
    got = grpc_generate(url, model, "next please", GenerateOptions(max_tokens=4), timeout=60)
    assert got.num_output_tokens == 4
    return time.perf_counter() - start


def test_cancelling_a_stream_frees_its_slot(narrow_repo, tmp_path):
    # An own server, to read from its log that no cancelled request was left in flight at exit.
    server = own_server(narrow_repo, tmp_path)
    try:
        _check_cancellation(server.grpc_endpoint)
    finally:
        server.stop(timeout=10)
    assert not re.search(r"has \d+ in-flight inferences", server.log_text()), "cancelled requests stayed in flight"


def _check_cancellation(url: str) -> None:
    start = time.perf_counter()
    full = grpc_generate(url, "narrow", "how long is this", GenerateOptions(max_tokens=LONG, min_tokens=LONG))
    full_time = time.perf_counter() - start
    assert full.num_output_tokens == LONG
    _timed_short_request(url, "narrow")  # warm

    # Cancelled on the engine model itself: the slot is free at once, the next request does not wait.
    _fill_slots_then_cancel(url, "narrow_engine", _engine_inputs(LONG))
    assert _timed_short_request(url, "narrow") < full_time / 2

    # Cancelled on the ensemble: Triton 2.51 does not mark the engine's own request cancelled, but
    # postprocessing sees the cancellation and sends the engine a stop, so the slot is free at once too.
    _fill_slots_then_cancel(url, "narrow", grpc_inputs("cancel me", GenerateOptions(max_tokens=LONG), True))
    assert _timed_short_request(url, "narrow") < full_time / 2


def test_stop_request_ends_the_stream_with_that_request_id(triton_server, narrow_repo):
    """tensorrtllm_backend's ``stop``: a request with stop=True cancels the request with its request id."""
    server = triton_server(narrow_repo)
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_endpoint)
    stopper = grpcclient.InferenceServerClient(server.grpc_endpoint)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer("narrow_engine", _engine_inputs(LONG), request_id="to-stop",
                                  enable_empty_final_response=True)
        _, error = answers.get(timeout=30)
        assert error is None, error
        stopper.start_stream(callback=lambda result, error: None)
        stopper.async_stream_infer("narrow_engine", _engine_inputs(1, stop=True), request_id="to-stop")
        generated = 1
        while True:
            result, error = answers.get(timeout=30)
            assert error is None, error
            packed = result.as_numpy("packed")
            generated += 0 if packed is None else len(unpack(packed).delta)
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        assert generated < LONG, "the stop request did not end the stream"
    finally:
        client.stop_stream()
        stopper.stop_stream()
        client.close()
        stopper.close()


def _get(server: TritonServer, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{server.http_endpoint}{path}", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_killed_engine_stub_fails_requests_clearly(narrow_repo, tmp_path):
    server = own_server(narrow_repo, tmp_path)
    try:
        assert grpc_generate(server.grpc_endpoint, "narrow", "hello", GenerateOptions(max_tokens=3)).text
        engines = [pid for pid in server.stub_pids() if "narrow_engine/" in " ".join(
            Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0"))]
        assert len(engines) == 1
        os.kill(engines[0], signal.SIGKILL)
        time.sleep(0.5)
        # Triton 2.51 does not restart the stub: every later request fails at once with this error,
        # while the server and its health endpoints still report ready.
        for _ in range(3):
            with pytest.raises(QueryError, match="Stub process 'narrow_engine_0_0' is not healthy"):
                grpc_generate(server.grpc_endpoint, "narrow", "hello", GenerateOptions(max_tokens=3), timeout=30)
        assert server.is_running
        assert _get(server, "/v2/health/live") == 200
        assert _get(server, "/v2/health/ready") == 200
        assert engines[0] not in server.stub_pids()
    finally:
        server.stop()
    assert shm_segments(server) == []
    assert server.stub_pids() == []


def test_sigterm_with_requests_in_flight_never_hangs(narrow_repo, tmp_path):
    server = own_server(narrow_repo, tmp_path)
    outcomes: dict[int, str] = {}

    def ask(i: int) -> None:
        try:
            got = grpc_generate(server.grpc_endpoint, "narrow", f"request {i}", GenerateOptions(max_tokens=LONG, min_tokens=LONG),
                                stream=i % 2 == 0, timeout=60)
            outcomes[i] = f"ok {got.num_output_tokens}"
        except QueryError as e:
            outcomes[i] = f"error {e}"

    threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(4)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        os.kill(server.pid, signal.SIGTERM)
        # Triton refuses new ensemble steps once it is stopping, so streams still running on the ensemble
        # cannot finish; it waits --exit-timeout-secs for them, then says "Exiting immediately" but may
        # stay alive. stop() (what `tritonize serve` does on Ctrl-C) ends it, which ends those streams.
        exited_alone = server.wait(server.exit_timeout + 4) is not None
        left = shm_segments(server)
        server.stop(timeout=5)
        deadline = time.monotonic() + 20
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(thread.is_alive() for thread in threads), f"requests hung after SIGTERM: {outcomes}"
    finally:
        server.stop()
    # Triton 2.51 waits its exit timeout for the open streams, gives up, and then exits or not (both were
    # seen); what it leaves running, stop() kills, and the shared memory it leaves behind, stop() removes.
    assert "Exit timeout expired" in server.log_text()
    if not exited_alone:
        assert server.cleanup["killed_pids"], "the server outlived its exit timeout but stop() killed nothing"
    assert set(server.cleanup["removed_shm"]) >= {f"/dev/shm/{segment}" for segment in left}
    assert sorted(outcomes) == [0, 1, 2, 3]
    for outcome in outcomes.values():  # refused by the stopping server, or cut when it went away
        assert outcome == f"ok {LONG}" or (outcome.startswith("error ") and (
            "Server is stopping" in outcome or "Stream removed" in outcome)), outcome
    assert shm_segments(server) == []
    assert server.stub_pids() == []
