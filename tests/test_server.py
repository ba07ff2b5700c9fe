"""Running a stock tritonserver: locating it, its Python backend, start/stop, errors, `tritonize serve`.

The e2e tests start the real tritonserver 2.51 of the nvidia-pytriton wheel on a hand-written
Python-backend repository (an echo model, BYTES in and out).
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from click.testing import CliRunner

from tritonize.cli.serve import serve
from tritonize.serving import server as server_module
from tritonize.serving.server import (
    SHM_DIR,
    STUB_NAME,
    ServerError,
    TritonServer,
    find_stub_processes,
    find_tritonserver,
    free_ports,
    prepare_backends,
    running_python_version,
    server_error,
    stub_python_version,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent

ECHO_CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: 8
input [ {{ name: "INPUT" data_type: TYPE_STRING dims: [ 1 ] }} ]
output [
  {{ name: "OUTPUT" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "PYTHON" data_type: TYPE_STRING dims: [ 2 ] }}
]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""

# Echoes its input and reports which Python environment the stub runs in (sys.prefix, numpy version).
ECHO_MODEL = """\
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
            env = np.array([[sys.prefix.encode(), np.__version__.encode()]] * data.shape[0], dtype=np.object_)
            responses.append(
                pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT", data), pb_utils.Tensor("PYTHON", env)])
            )
        return responses
"""

FAILING_MODEL = """\
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("tiny_engine cannot start: weights file model.safetensors is missing")

    def execute(self, requests):
        return []
"""


def write_model(repo: Path, name: str, model_py: str, config: str | None = None) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(config if config is not None else ECHO_CONFIG.format(name=name))
    (repo / name / "1" / "model.py").write_text(model_py)


def echo_repository(root: Path) -> Path:
    repo = root / "repo"
    write_model(repo, "echo", ECHO_MODEL)
    return repo


@pytest.fixture(scope="module")
def echo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return echo_repository(tmp_path_factory.mktemp("echo"))


def shm_segments(prefix: str) -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(f"{prefix}*"))


def infer_echo_http(endpoint: str, texts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    with httpclient.InferenceServerClient(endpoint) as client:
        data = np.array([[t] for t in texts], dtype=np.object_)
        tensor = httpclient.InferInput("INPUT", list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        result = client.infer("echo", [tensor])
        return result.as_numpy("OUTPUT"), result.as_numpy("PYTHON")


def ports_of(server: TritonServer) -> dict[str, int]:
    return {"http": server.http_port, "grpc": server.grpc_port, "metrics": server.metrics_port}


# --------------------------------------------------------------------------------------------------
# Locating the binary and preparing the Python backend (no server started)


def test_explicit_binary_wins_and_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "bin" / "tritonserver"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    other = tmp_path / "other"
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    monkeypatch.setenv("TRITONSERVER", str(other))
    assert find_tritonserver(fake) == fake
    assert find_tritonserver(tmp_path) == fake  # an install directory holding bin/tritonserver
    assert find_tritonserver(None) == other  # then $TRITONSERVER
    with pytest.raises(ServerError, match=r"--tritonserver .*nope: no such tritonserver binary"):
        find_tritonserver(tmp_path / "nope")
    monkeypatch.setenv("TRITONSERVER", str(tmp_path / "missing"))
    with pytest.raises(ServerError, match=r"\$TRITONSERVER .*missing: no such tritonserver binary"):
        find_tritonserver(None)
    fake.chmod(0o644)
    with pytest.raises(ServerError, match="not executable"):
        find_tritonserver(fake)


def test_path_then_bundled_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITONSERVER", raising=False)
    on_path = tmp_path / "tritonserver"
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_tritonserver() == on_path
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    bundled = find_tritonserver()
    assert bundled.parts[-4:] == ("pytriton", "tritonserver", "bin", "tritonserver")
    assert os.access(bundled, os.X_OK)


def test_no_binary_anywhere_is_one_clear_error(tmp_path: Path) -> None:
    """A Python without site-packages (-S) cannot see the nvidia-pytriton wheel: nothing is left."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(PROJECT_ROOT)!r})
        from tritonize.serving.server import ServerError, find_tritonserver
        try:
            find_tritonserver()
        except ServerError as exc:
            print(exc)
            sys.exit(3)
        """
    )
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-S", "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    assert result.stdout.strip() == (
        "no tritonserver found: install it with `pip install nvidia-pytriton==0.7.0` (tritonize's [server] extra), "
        "put it on PATH, or pass --tritonserver PATH"
    )


def test_prepare_backends_pairs_the_backend_with_this_pythons_stub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRITON_BACKENDS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    binary = server_module.bundled_tritonserver()
    assert binary is not None
    backends = prepare_backends(binary)
    assert backends.is_relative_to(tmp_path / "cache")
    stub = backends / "python" / STUB_NAME
    assert stub_python_version(stub) == running_python_version()
    assert (backends / "python" / "libtriton_python.so").resolve().is_file()
    assert (backends / "python" / "triton_python_backend_utils.py").is_file()
    assert prepare_backends(binary) == backends  # cached, not rebuilt
    # The GPU kit's $TRITON_BACKENDS is taken as is ...
    monkeypatch.setenv("TRITON_BACKENDS", str(backends))
    assert prepare_backends(binary) == backends
    # ... but must hold a stub.
    empty = tmp_path / "kit" / "python"
    empty.mkdir(parents=True)
    (empty / "libtriton_python.so").symlink_to((backends / "python" / "libtriton_python.so").resolve())
    monkeypatch.setenv("TRITON_BACKENDS", str(empty.parent))
    with pytest.raises(ServerError, match=rf"has no {STUB_NAME}"):
        prepare_backends(binary)


def test_no_stub_for_this_python_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server tree laid out like the wheel's, whose only stub is for another Python version."""
    monkeypatch.delenv("TRITON_BACKENDS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real = server_module.bundled_tritonserver()
    assert real is not None
    root = tmp_path / "tritonserver"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tritonserver").write_text("#!/bin/sh\n")  # not run: only its place in the tree counts
    (root / "backends" / "python").mkdir(parents=True)
    (root / "backends" / "python" / "libtriton_python.so").symlink_to(
        real.parent.parent / "backends" / "python" / "libtriton_python.so"
    )
    (root / "python_backend_stubs" / "3.99").mkdir(parents=True)
    (root / "python_backend_stubs" / "3.99" / STUB_NAME).write_bytes(b"\x7fELF libpython3.99.so.1.0")
    with pytest.raises(ServerError) as info:
        prepare_backends(root / "bin" / "tritonserver")
    message = str(info.value)
    assert f"no Python backend stub for Python {running_python_version()} (it has: 3.99)" in message
    assert "\n" not in message


def test_port_in_use_is_reported_before_launching(echo_repo: Path) -> None:
    for service in ("http", "grpc", "metrics"):
        ports = dict(zip(("http", "grpc", "metrics"), free_ports(3), strict=True))
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", ports[service]))
            taken.listen()
            server = TritonServer(
                echo_repo, http_port=ports["http"], grpc_port=ports["grpc"], metrics_port=ports["metrics"]
            )
            with pytest.raises(ServerError) as info:
                server.start()
        assert str(info.value).startswith(
            f"port {ports[service]} on 127.0.0.1 is in use: pass --{service}-port"
        )
        assert server.pid is None  # nothing was launched


def test_bad_repository_arguments(tmp_path: Path) -> None:
    with pytest.raises(ServerError, match="is not a directory"):
        TritonServer(tmp_path / "missing").start()
    with pytest.raises(ServerError, match="holds no model"):
        TritonServer(tmp_path).start()
    with pytest.raises(ServerError, match="ports must differ"):
        write_model(tmp_path, "echo", ECHO_MODEL)
        TritonServer(tmp_path, http_port=9000, grpc_port=9000).start()


# --------------------------------------------------------------------------------------------------
# A real server


@pytest.mark.e2e
def test_echo_over_http_grpc_and_metrics(triton_server, echo_repo: Path) -> None:
    server = triton_server(echo_repo)
    assert server.is_running and server.version is not None
    assert triton_server(echo_repo) is server  # shared by the session
    texts = ["héllo ✓".encode(), b"", b"\x00\xffraw bytes", "日本語".encode()]
    output, python = infer_echo_http(server.http_endpoint, texts)
    assert [row[0] for row in output] == texts
    assert {bytes(row[0]).decode() for row in python} == {sys.prefix}

    with grpcclient.InferenceServerClient(server.grpc_endpoint) as client:
        data = np.array([[b"gRPC"]], dtype=np.object_)
        tensor = grpcclient.InferInput("INPUT", [1, 1], "BYTES")
        tensor.set_data_from_numpy(data)
        assert client.infer("echo", [tensor]).as_numpy("OUTPUT")[0][0] == b"gRPC"

    connection = http.client.HTTPConnection(server.host, server.metrics_port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        metrics = connection.getresponse().read().decode()
    finally:
        connection.close()
    assert 'nv_inference_request_success{model="echo",version="1"}' in metrics
    assert server.stub_pids(), "the echo model runs in a Python backend stub"


@pytest.mark.e2e
def test_models_see_this_python_and_stop_is_clean(
    tmp_path: Path, echo_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With another python3 first on PATH, the stub must still run on this interpreter's environment."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    http_port, grpc_port, metrics_port = free_ports(3)
    with TritonServer(
        echo_repo,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        log_file=tmp_path / "server.log",
    ) as server:
        _, python = infer_echo_http(server.http_endpoint, [b"which python?"])
        prefix, numpy_version = (bytes(v).decode() for v in python[0])
        stubs = server.stub_pids()
        segments = shm_segments(server.shm_prefix)
        assert stubs and segments
    assert prefix == sys.prefix
    assert numpy_version == np.__version__
    # Triton itself ended its stubs and removed their shared memory: stop() found nothing to clean.
    assert server.cleanup == {"killed_pids": [], "removed_shm": []}
    assert not server.stub_pids() and not shm_segments(server.shm_prefix)
    assert "Signal (15) received" in server.log_text()


@pytest.mark.e2e
@pytest.mark.parametrize("failure", ["initialize raises", "config does not parse"])
def test_failed_load_reports_the_servers_error(tmp_path: Path, failure: str) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "echo", ECHO_MODEL)
    if failure == "initialize raises":
        write_model(repo, "tiny_engine", FAILING_MODEL)
        expected = "failed to load 'tiny_engine' version 1: Internal: RuntimeError: tiny_engine cannot start"
    else:
        config = ECHO_CONFIG.format(name="tiny_engine").replace("TYPE_STRING", "TYPE_TEXT", 1)
        write_model(repo, "tiny_engine", ECHO_MODEL, config)
        expected = "Poll failed for model directory 'tiny_engine'"
    http_port, grpc_port, metrics_port = free_ports(3)
    server = TritonServer(
        repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, log_file=tmp_path / "log"
    )
    started = time.monotonic()
    with pytest.raises(ServerError) as info:
        server.start(timeout=60)
    assert time.monotonic() - started < 30
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert str(tmp_path / "log") in message
    assert info.value.detail == server_error(server.log_text())
    if failure == "initialize raises":
        assert str(repo / "tiny_engine" / "1" / "model.py") in info.value.detail  # the model's traceback
    assert not server.is_running
    assert not server.stub_pids() and not shm_segments(server.shm_prefix)


@pytest.mark.e2e
def test_explicit_model_control_mode_loads_the_repository(triton_server, echo_repo: Path) -> None:
    server = triton_server(echo_repo, model_control_mode="explicit")
    with httpclient.InferenceServerClient(server.http_endpoint) as client:
        assert client.is_model_ready("echo")
        client.unload_model("echo")
        assert not client.is_model_ready("echo")
        client.load_model("echo")
        assert client.is_model_ready("echo")


@pytest.mark.e2e
def test_startup_timeout_stops_the_server(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "slow", ECHO_MODEL.replace("class TritonPythonModel:", SLOW_INIT))
    http_port, grpc_port, metrics_port = free_ports(3)
    server = TritonServer(
        repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, exit_timeout=2
    )
    with pytest.raises(ServerError, match=r"tritonserver was not ready after 3 s, still loading slow \("):
        server.start(timeout=3)
    assert not server.is_running
    assert not server.stub_pids() and not shm_segments(server.shm_prefix)


SLOW_INIT = """\
class TritonPythonModel:
    def initialize(self, args):
        import time
        time.sleep(120)
"""


ORPHAN_SCRIPT = """\
import sys, time
from tritonize.serving.server import TritonServer, free_ports
http_port, grpc_port, metrics_port = free_ports(3)
server = TritonServer(sys.argv[1], http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                      log_file=sys.argv[2])
server.start()
print(server.pid, server.shm_prefix, flush=True)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.e2e
def test_server_follows_a_killed_parent(tmp_path: Path, echo_repo: Path) -> None:
    """A caller killed with SIGKILL cannot stop its server: the kernel's parent-death signal does."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    caller = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_SCRIPT, str(echo_repo), str(tmp_path / "server.log")],
        env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        pid, prefix = caller.stdout.readline().split()
        assert _alive(int(pid)) and find_stub_processes(prefix)
    finally:
        caller.kill()
        caller.wait()
    deadline = time.monotonic() + 40
    while (_alive(int(pid)) or find_stub_processes(prefix)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(int(pid)) and not find_stub_processes(prefix)
    assert "Signal (15) received" in (tmp_path / "server.log").read_text()
    assert not shm_segments(prefix)


# --------------------------------------------------------------------------------------------------
# `tritonize serve`


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line)
    lines.put(None)


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_command_prints_endpoints_and_stops_on_signal(tmp_path: Path, signum: int) -> None:
    repo = echo_repository(tmp_path)
    http_port, grpc_port, metrics_port, openai_port = free_ports(4)
    command = [
        sys.executable, "-m", "tritonize.cli.serve", str(repo),
        "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
        "--openai-port", str(openai_port), "--log-file", str(tmp_path / "server.log"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    printed = []
    try:
        deadline = time.monotonic() + 90
        while not printed or "Press Ctrl-C" not in printed[-1]:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, f"serve exited early: {proc.wait()} {proc.stderr.read()}"
            printed.append(line)
        banner = "".join(printed)
        assert f"http://127.0.0.1:{http_port}" in banner
        assert f"127.0.0.1:{grpc_port}" in banner
        assert f"http://127.0.0.1:{metrics_port}/metrics" in banner
        assert "models   echo" in banner
        assert f"OpenAI   http://127.0.0.1:{openai_port}/v1" in banner
        # the OpenAI API beside it: up, and (not a tritonize repository) serving no model of its own
        with urllib.request.urlopen(f"http://127.0.0.1:{openai_port}/health", timeout=10) as health:
            assert json.loads(health.read()) == {"status": "ok"}
        with urllib.request.urlopen(f"http://127.0.0.1:{openai_port}/v1/models", timeout=10) as listing:
            assert json.loads(listing.read()) == {"object": "list", "data": []}

        output, _ = infer_echo_http(f"127.0.0.1:{http_port}", [b"through tritonize serve"])
        assert output[0][0] == b"through tritonize serve"
        stubs = find_stub_processes(str(repo))
        assert stubs, "the served model runs in a Python backend stub"
        segments = [argv[2] for argv in stubs.values()]  # the stub's shared-memory region name
        assert all((SHM_DIR / name).exists() for name in segments)

        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "stopping tritonserver" in proc.stderr.read()
    assert not find_stub_processes(str(repo))
    assert not any((SHM_DIR / name).exists() for name in segments)
    for port in (http_port, openai_port):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_serve_errors_are_one_line(tmp_path: Path) -> None:
    repo = echo_repository(tmp_path)
    runner = CliRunner()
    result = runner.invoke(serve, [str(repo), "--tritonserver", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert result.output.strip().startswith("Error: --tritonserver")
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output

    http_port, grpc_port, metrics_port = free_ports(3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", http_port))
        taken.listen()
        result = runner.invoke(
            serve,
            [str(repo), "--http-port", str(http_port), "--grpc-port", str(grpc_port),
             "--metrics-port", str(metrics_port)],
        )  # fmt: skip
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: port {http_port} on 127.0.0.1 is in use: pass --http-port with a free port, "
        "or stop what listens there"
    )


def test_serve_help_has_an_example() -> None:
    result = CliRunner().invoke(serve, ["--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output and "tritonize serve ./repo" in result.output
