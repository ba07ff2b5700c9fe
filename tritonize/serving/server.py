"""Run a stock tritonserver on a model repository, as a child process that is always cleaned up.

The server is the one bundled in the `nvidia-pytriton` wheel (or any other tritonserver 2.5x): only its
binary and Python backend are used, never PyTriton itself. Three things make it work from a plain venv:

* the Python backend needs a `triton_python_backend_stub` built for the running Python next to its
  `libtriton_python.so`; the wheel ships one stub per Python version, so a private backend directory
  (symlinks, cached) pairs the backend with the right stub, leaving the installed wheel untouched;
* the stub takes `sys.prefix` from the `python3` first on PATH, so this interpreter's bin directory goes
  first in the server's PATH and the models see the same packages (torch, numpy<2) as the caller; that
  python3 is checked before the server starts (numpy < 2, every module the repository's models import);
* tritonserver does not exit when a port is taken (it logs the error and lingers), and reports a model
  that failed to load only in its log: ports are checked before launching and the log is watched while
  waiting for readiness, so a failure surfaces as one ServerError line carrying the server's own words.

The server runs in its own session (process group): stop() ends it and then every process left in that
group (Python backend stubs), and removes the shared-memory segments of its Python backend.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import http.client
import importlib.metadata
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from ..errors import PythonEnvironmentError, ServerError
from ..repository.layout import REPOSITORY_MANIFEST, model_names
from .launch import LaunchPlan, mpi_leader_command

STUB_NAME = "triton_python_backend_stub"
PYTHON_BACKEND_LIB = "libtriton_python.so"
SHM_DIR = Path("/dev/shm")
# Triton's own default prefix, extended with a per-server tag so leftovers can be told apart.
SHM_PREFIX_BASE = "triton_python_backend_shm_region_"
MODEL_CONTROL_MODES = ("none", "poll", "explicit")

_INSTALL_HINT = (
    "no tritonserver found: install it with `pip install nvidia-pytriton==0.7.0` (tritonize's [server] extra), "
    "put it on PATH, or pass --tritonserver PATH"
)
# "E1125 14:06:17.559729 5236 model_lifecycle.cc:642] "msg"" (default format) or
# "2026-11-25T14:06:17Z E 5236 model_lifecycle.cc:642] msg" (ISO8601).
_LOG_LINE = re.compile(
    r"^(?:(?P<sev>[IWEF])\d{4} [\d:.]+\s+\d+|\S+ (?P<sev_iso>[IWEF])\s+\d+)\s+(?P<src>[\w.+-]+):\d+\]\s?(?P<msg>.*)$"
)
_PORT_TAKEN = re.compile(
    r"failed to start (HTTP|GRPC|Metrics) service: .*Socket '(.+):(\d+)' already in use", re.I
)
_STARTED = {
    "http": "Started HTTPService at",
    "grpc": "Started GRPCInferenceService at",
    "metrics": "Started Metrics Service at",
}
# Logged by a stopping tritonserver once no inference request is in flight: it then unloads every model.
UNLOADING = "All models are stopped, unloading models"
# How long a stopping server may stay up once it unloads with no Python model process left: Triton checks
# what is still live once a second, so a server that would exit by itself has done so by then.
UNLOAD_GRACE_S = 1.5
# Errors every CPU-only start logs and that say nothing about why a start failed.
_BENIGN_ERRORS = ("CudaDriverHelper", "NVML", "nvml", "DCGM", "dcgm", "CUDA driver", "GPU metrics")



# --------------------------------------------------------------------------------------------------
# Finding the binary and the Python backend


def _executable(path: Path, origin: str) -> Path:
    """The tritonserver binary a user named (a file, or an install dir holding bin/tritonserver)."""
    path = path.expanduser()
    if path.is_dir():
        for candidate in (path / "bin" / "tritonserver", path / "tritonserver"):
            if candidate.is_file():
                path = candidate
                break
    if not path.is_file():
        raise ServerError(f"{origin} {path}: no such tritonserver binary; point it at .../bin/tritonserver")
    if not os.access(path, os.X_OK):
        raise ServerError(
            f"{origin} {path}: not executable; run `chmod +x {path}` or point at another binary"
        )
    return path.absolute()


def bundled_tritonserver() -> Path | None:
    """The binary inside the nvidia-pytriton wheel, found without importing pytriton (slow, noisy)."""
    try:
        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        binary = Path(location) / "tritonserver" / "bin" / "tritonserver"
        if binary.is_file():
            return binary
    return None


def find_tritonserver(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Locate tritonserver: `--tritonserver`, then $TRITONSERVER, then PATH, then the pytriton wheel.

    A path the user gave that does not work is an error, never silently skipped for the next option.
    """
    if explicit:
        return _executable(Path(explicit), "--tritonserver")
    from_env = os.environ.get("TRITONSERVER")
    if from_env:
        return _executable(Path(from_env), "$TRITONSERVER")
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path).absolute()
    bundled = bundled_tritonserver()
    if bundled is not None:
        return _executable(bundled, "the nvidia-pytriton wheel's")
    raise ServerError(_INSTALL_HINT)


def running_python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def stub_python_version(stub: Path) -> str | None:
    """The Python a stub was built for, read from the libpython it links (None when not visible)."""
    try:
        data = stub.read_bytes()
    except OSError:
        return None
    versions = set(re.findall(rb"libpython(3\.\d+)", data))
    return versions.pop().decode() if len(versions) == 1 else None


def _check_stub(stub: Path, where: str) -> None:
    if not stub.is_file():
        raise ServerError(
            f"{where} has no {STUB_NAME}: put the stub built for Python {running_python_version()} at {stub}"
        )
    built_for = stub_python_version(stub)
    wanted = running_python_version()
    if built_for is not None and built_for != wanted:
        raise ServerError(
            f"{stub} is built for Python {built_for} but tritonize runs on Python {wanted}: run tritonize "
            f"with Python {built_for}, or use a backend directory whose stub matches Python {wanted}"
        )


def _check_backend_dir(backends: Path, where: str) -> Path:
    backends = backends.expanduser().absolute()
    if not (backends / "python" / PYTHON_BACKEND_LIB).is_file():
        raise ServerError(
            f"{where} {backends} is not a Triton backend directory: "
            f"expected {backends / 'python' / PYTHON_BACKEND_LIB}"
        )
    _check_stub(backends / "python" / STUB_NAME, f"{where} {backends}")
    return backends


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tritonize" / "backends"


def _fingerprint(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _link_backends(backends: Path, stub: Path, target: Path) -> None:
    """Fill `target` with symlinks: every backend of the server, python/ rebuilt around `stub`.

    Symlinks, not copies: the binaries find their bundled libraries through an $ORIGIN-relative RPATH,
    which resolves from the real file and would break in a copy.
    """
    for entry in backends.iterdir():
        if entry.name != "python":
            (target / entry.name).symlink_to(entry.resolve())
    python_dir = target / "python"
    python_dir.mkdir()
    for entry in (backends / "python").iterdir():
        if entry.name not in (STUB_NAME, "__pycache__"):
            (python_dir / entry.name).symlink_to(entry.resolve())
    (python_dir / STUB_NAME).symlink_to(stub.resolve())


def prepare_backends(server: Path) -> Path:
    """The --backend-directory for `server`: its backends with the stub for the running Python.

    $TRITON_BACKENDS (set by the GPU kit, stub already in place) is used as is. A server whose
    backends/python already holds a stub (an NGC-style install) is used as is too. A pytriton-style
    layout (python_backend_stubs/<major.minor>/) gets a private directory under the user cache
    (~/.cache/tritonize/backends/<hash>, or a temporary directory when the cache is not writable).
    """
    from_env = os.environ.get("TRITON_BACKENDS")
    if from_env:
        return _check_backend_dir(Path(from_env), "$TRITON_BACKENDS")

    root = Path(server).resolve().parent.parent
    backends = root / "backends"
    library = backends / "python" / PYTHON_BACKEND_LIB
    if not library.is_file():
        raise ServerError(
            f"no Python backend next to {server}: expected {library}; "
            "set TRITON_BACKENDS to a backend directory that has python/ with its stub"
        )
    stubs = root / "python_backend_stubs"
    if not stubs.is_dir():
        return _check_backend_dir(backends, "the backend directory")

    version = running_python_version()
    stub = stubs / version / STUB_NAME
    if not stub.is_file():
        available = sorted((p.parent.name for p in stubs.glob(f"*/{STUB_NAME}")), key=_version_key)
        raise ServerError(
            f"the tritonserver at {server} has no Python backend stub for Python {version} "
            f"(it has: {', '.join(available) or 'none'}): run tritonize with one of those Python versions, "
            "or set TRITON_BACKENDS to a backend directory with a stub for this one"
        )
    _check_stub(stub, str(stubs / version))

    key = _fingerprint(library, stub)
    try:
        cache = _cache_root()
        cache.mkdir(parents=True, exist_ok=True)
        final = cache / key
        if (final / "python" / STUB_NAME).exists():
            return final
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
    except OSError:
        final = Path(tempfile.mkdtemp(prefix="tritonize-backends-"))
        _link_backends(backends, stub, final)
        return final
    try:
        _link_backends(backends, stub, staging)
        os.rename(staging, final)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (final / "python" / STUB_NAME).exists():
            raise
    return final


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def server_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for tritonserver: this interpreter's bin dir first on PATH, its libpython first on
    LD_LIBRARY_PATH.

    The Python backend stub sets its sys.prefix from the first `python3` on PATH; putting ours first
    makes the models import this environment's torch, numpy and tokenizers. The stub links libpython by
    name: without this interpreter's own first, the loader may pick another Python of the same minor version
    (a distribution's), whose older libpython lacks symbols this interpreter's standard extension modules
    need (e.g. ``_ssl``, which xgrammar's imports load).
    """
    env = dict(os.environ if base is None else base)
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "python3").exists():
        raise ServerError(
            f"no python3 next to {sys.executable}: the Python backend stub finds its packages through the "
            f"python3 first on PATH; run tritonize from a virtualenv, or add a python3 link in {bin_dir}"
        )
    env["PATH"] = os.pathsep.join([str(bin_dir), *[p for p in env.get("PATH", "").split(os.pathsep) if p]])
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).is_file():
        rest = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *rest])
    return env


# Run by the Python the stub will use: which of the modules asked for it lacks, and its numpy version.
_PROBE = """
import importlib.metadata, importlib.util, json, sys
wanted = json.loads(sys.argv[1])
missing = []
for name in wanted:
    try:
        if importlib.util.find_spec(name) is None:
            missing.append(name)
    except (ImportError, ValueError):
        missing.append(name)
try:
    numpy = importlib.metadata.version("numpy")
except importlib.metadata.PackageNotFoundError:
    numpy = None
print(json.dumps({"executable": sys.executable, "missing": missing, "numpy": numpy}))
"""


def check_stub_python(repo: Path, env: dict[str, str]) -> None:
    """PythonEnvironmentError when the Python that the repository's Python models will run on (the first
    ``python3`` on the server's PATH, as the stub finds it) has numpy >= 2 or lacks a module they import.

    Without this check a model fails only inside the server, as "Stub process ... is not healthy".
    """
    from ..repository.manifest import required_modules

    try:  # read here, not through repository.render, which would cost this process an import of torch
        manifest = json.loads((repo / REPOSITORY_MANIFEST).read_text(encoding="utf-8"))
        modules = required_modules(manifest if isinstance(manifest, dict) else None)
    except (OSError, ValueError, AttributeError, TypeError):
        modules = required_modules(None)  # none, or unreadable: `tritonize validate` says what is wrong with it
    python = shutil.which("python3", path=env.get("PATH"))
    if python is None:
        raise ServerError("no python3 on the server's PATH: the Python backend runs its models on the first "
                          "python3 there; run tritonize from a virtualenv")
    try:
        proc = subprocess.run([python, "-c", _PROBE, json.dumps(sorted(modules))], env=env, capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL)
        found = json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        raise ServerError(f"cannot run {python}, the python3 the server's Python models would use: fix that "
                          "interpreter or put another first on PATH") from None
    numpy = found.get("numpy")
    if numpy is not None and _version_key(numpy)[:1] >= (2,):
        raise PythonEnvironmentError(
            python, f"{python} has numpy {numpy}, and Triton 2.51's Python backend needs numpy < 2 (under numpy 2 "
            "it mis-reads text tensors)", f"run `{python} -m pip install 'numpy<2'`")
    missing = [name for name in found.get("missing", []) if name in modules]
    if missing:
        args = " ".join(dict.fromkeys(modules[name] for name in missing))
        raise PythonEnvironmentError(
            python, f"{python} lacks {', '.join(missing)}, which this repository's models import",
            f"run `{python} -m pip install {args}`")


def has_gpu() -> bool:
    """Whether an NVIDIA GPU is visible, without importing torch (which takes seconds)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*")) or any(Path("/proc/driver/nvidia/gpus").glob("*"))


# --------------------------------------------------------------------------------------------------
# Ports and processes


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's choice), for tests and examples."""
    return free_ports(1, address)[0]


def free_ports(count: int, address: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports: all are held open together so the kernel cannot repeat one."""
    sockets = []
    try:
        for _ in range(count):
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((address, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_in_use(address: str, port: int) -> bool:
    """Whether binding `address:port` would fail, as it would for tritonserver (SO_REUSEADDR set)."""
    try:
        infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServerError(
            f"cannot use address {address!r}: {exc.strerror}; pass --address with an IP"
        ) from exc
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError:
                return True
    return False


def _proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def find_stub_processes(needle: str) -> dict[int, list[str]]:
    """Live Python backend stubs whose command line mentions `needle` (a shm prefix, a repository path).

    The stub's arguments are: model.py path, shm region name, shm sizes, parent pid, backend dir, ...
    """
    found: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = _proc_cmdline(int(entry.name))
        if argv and argv[0].endswith(STUB_NAME) and any(needle in arg for arg in argv[1:]):
            found[int(entry.name)] = argv
    return found


def _parent_death_signal() -> object | None:
    """A preexec_fn asking Linux to SIGTERM the server when this thread dies, so a killed caller leaves
    no server behind. Only from the main thread: the signal follows the creating thread, not the process.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


# --------------------------------------------------------------------------------------------------
# Reading the server log


def _log_message(line: str) -> tuple[str, str, str] | None:
    """(severity, source file, message) of a Triton log line; the message unquoted and unescaped."""
    match = _LOG_LINE.match(line.rstrip("\r\n"))
    if match is None:
        return None
    message = match.group("msg").strip()
    if len(message) >= 2 and message.startswith('"') and message.endswith('"'):
        try:
            message = json.loads(message)
        except ValueError:
            message = message[1:-1].replace("\\n", "\n")
    return match.group("sev") or match.group("sev_iso"), match.group("src"), message


def server_error(log_text: str) -> str | None:
    """The one message in a tritonserver log that says why it failed, with its traceback if any.

    Preference: a model that failed to load, a model directory that could not be read, a service
    that could not start, then the final `error: ...` line, then the last error not about the GPU.
    """
    errors: list[str] = []
    final = None
    for line in log_text.splitlines():
        if line.startswith("error: "):
            final = line[len("error: ") :].strip()
            continue
        parsed = _log_message(line)
        if parsed is not None and parsed[0] in ("E", "F"):
            errors.append(parsed[2])
    for marker in ("failed to load '", "Poll failed for model directory", "failed to start"):
        for message in errors:
            if marker in message:
                return message.strip()
    if final:
        return final
    relevant = [m for m in errors if not any(word in m for word in _BENIGN_ERRORS)]
    return relevant[-1].strip() if relevant else None


def startup_line(line: str) -> str | None:
    """What a start-up log line says worth showing while waiting, or None: the stages tritonize's engine
    model logs ("tritonize: <model>/<version>: <stage>", runtime/stages.py) and each model Triton loaded."""
    parsed = _log_message(line)
    if parsed is None:
        return None
    message = parsed[2]
    if message.startswith("tritonize: "):
        return message[len("tritonize: ") :]
    loaded = re.match(r"successfully loaded '([^']+)'(?: version (\d+))?", message)
    if loaded is not None:
        return f"{loaded.group(1)}{'/' + loaded.group(2) if loaded.group(2) else ''}: loaded"
    return None


def loading_models(log_text: str) -> list[str]:
    """Models the log shows as started loading but neither loaded nor failed yet."""
    started = re.findall(r"loading: ([^:\s\"]+):\d+", log_text)
    done = set(re.findall(r"(?:successfully loaded|failed to load) '([^']+)'", log_text))
    return sorted({name for name in started if name not in done})


def live_models(log_text: str) -> list[str]:
    """Models the log shows loaded and not unloaded since (what a stopping server still counts as live)."""
    loaded = re.findall(r"successfully loaded '([^']+)'", log_text)
    unloaded = set(re.findall(r"successfully unloaded '([^']+)'", log_text))
    return sorted({name for name in loaded if name not in unloaded})


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0].strip() if text.strip() else text


def _connect_host(address: str) -> str:
    if address in ("0.0.0.0", ""):
        return "127.0.0.1"
    if address in ("::", "[::]"):
        return "::1"
    return address


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value of `--flag=value` or `--flag value` in an argument list (last one wins)."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1 :]
    return value


# --------------------------------------------------------------------------------------------------
# The server


class TritonServer:
    """A tritonserver child process serving one model repository.

    Use as a context manager, or call start() and stop(). Readiness is checked over HTTP
    (`/v2/health/ready`), so HTTP must stay enabled. Server output goes to `log_path`.
    A stop waits for clients to close their connections (up to `exit_timeout`, Triton's default 30 s):
    close tritonclient clients when done with them.
    """

    def __init__(
        self,
        repo: str | os.PathLike[str],
        *,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        address: str = "127.0.0.1",
        tritonserver: str | os.PathLike[str] | None = None,
        backend_dir: str | os.PathLike[str] | None = None,
        log_verbose: int = 0,
        model_control_mode: str | None = None,
        extra_args: Sequence[str] = (),
        log_file: str | os.PathLike[str] | None = None,
        exit_timeout: int | None = None,
        launch: LaunchPlan | None = None,
        mpirun: str = "mpirun",
    ) -> None:
        if model_control_mode is not None and model_control_mode not in MODEL_CONTROL_MODES:
            raise ServerError(
                f"model control mode {model_control_mode!r} is not one of {', '.join(MODEL_CONTROL_MODES)}"
            )
        self.repo = Path(repo).expanduser().absolute()
        self.http_port = int(http_port)
        self.grpc_port = int(grpc_port)
        self.metrics_port = int(metrics_port)
        self.address = address
        self.log_verbose = int(log_verbose)
        self.model_control_mode = model_control_mode
        self.extra_args = tuple(str(a) for a in extra_args)
        # tritonserver's --exit-timeout-secs (its default is 30): how long a SIGTERM waits for in-flight
        # requests and open client connections (an idle keep-alive client counts) before it gives up.
        self.exit_timeout = exit_timeout
        self._tritonserver_arg = tritonserver
        # Several MPI ranks for a multi-GPU TensorRT-LLM engine (see launch.py); None or world size 1: one server.
        self.launch = launch or LaunchPlan(1, "leader", ())
        self.mpirun = mpirun
        self._backend_dir_arg = backend_dir
        self._log_file_arg = Path(log_file) if log_file is not None else None
        self.log_path: Path | None = self._log_file_arg
        self.binary: Path | None = None
        self.backend_dir: Path | None = None
        self.args: list[str] = []
        self.shm_prefix = _flag_backend_config(self.extra_args, "shm-region-prefix-name") or (
            f"{SHM_PREFIX_BASE}tz{secrets.token_hex(4)}_"
        )
        # What stop() had to clean up itself; empty after a clean shutdown.
        self.cleanup: dict[str, list] = {"killed_pids": [], "removed_shm": []}
        # What the last stop() found still live once nothing was left to wait for (see stop()).
        self.stuck_models: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_handle = None

    # --- endpoints ---------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address clients connect to (0.0.0.0 / :: map to loopback)."""
        return _connect_host(self.address)

    @property
    def http_endpoint(self) -> str:
        """`host:port` as tritonclient.http expects it."""
        return f"{_url_host(self.host)}:{self.http_port}"

    @property
    def grpc_endpoint(self) -> str:
        """`host:port` as tritonclient.grpc expects it."""
        return f"{_url_host(self.host)}:{self.grpc_port}"

    @property
    def urls(self) -> dict[str, str]:
        return {
            "http": f"http://{self.http_endpoint}",
            "grpc": f"grpc://{self.grpc_endpoint}",
            "metrics": f"http://{_url_host(self.host)}:{self.metrics_port}/metrics",
        }

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def version(self) -> str | None:
        """The server's version, from the options table it logs at startup."""
        match = re.search(r"\|\s*server_version\s*\|\s*(\S+)", self.log_text())
        return match.group(1) if match else None

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def error_line(self) -> str | None:
        """The server's own account of what went wrong, first line only."""
        message = server_error(self.log_text())
        return _first_line(message) if message else None

    def rss_mb(self) -> float:
        """Resident memory of tritonserver and its Python backend stubs, in MiB, from /proc."""
        total = 0
        for pid in [self.pid, *self.stub_pids()]:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except (OSError, TypeError):
                continue
            total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        return total / 1024

    def stub_pids(self) -> list[int]:
        """Live Python backend stubs of this server (matched by its shared-memory prefix)."""
        return sorted(find_stub_processes(self.shm_prefix))

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code once the server has exited, or None if it still runs after `timeout`."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    # --- start -------------------------------------------------------------------------------------

    def _check_ports(self) -> None:
        ports = {"http": self.http_port, "grpc": self.grpc_port, "metrics": self.metrics_port}
        for name, port in ports.items():
            if not 0 < port < 65536:
                raise ServerError(
                    f"{name} port {port} is out of range: pass --{name}-port between 1 and 65535"
                )
        if len(set(ports.values())) != len(ports):
            raise ServerError(
                f"the HTTP, gRPC and metrics ports must differ (got {self.http_port}, {self.grpc_port}, "
                f"{self.metrics_port}): pass distinct --http-port, --grpc-port and --metrics-port"
            )
        for name, port in ports.items():
            if name in self._enabled_services() and port_in_use(self.address, port):
                raise ServerError(
                    f"port {port} on {self.address} is in use: pass --{name}-port with a free port, "
                    "or stop what listens there"
                )

    def _enabled_services(self) -> list[str]:
        enabled = []
        for name in ("http", "grpc", "metrics"):
            value = _flag_value(self.extra_args, f"--allow-{name}")
            if value is None or value.lower() not in ("false", "0", "off", "no"):
                enabled.append(name)
        return enabled

    def _command(self) -> list[str]:
        assert self.binary is not None and self.backend_dir is not None
        args = [
            str(self.binary),
            f"--model-repository={self.repo}",
            f"--backend-directory={self.backend_dir}",
            f"--http-address={self.address}",
            f"--grpc-address={self.address}",
            f"--metrics-address={self.address}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--log-verbose={self.log_verbose}",
        ]
        # Config auto-completion stays on (no --disable-auto-complete-config), as on any stock server:
        # the generated configs must hold up under it; it costs ~1 s of startup per Python model.
        per_rank = self.launch.needs_mpirun  # mpi_leader_command gives each rank its own prefix
        if not per_rank and not _flag_backend_config(self.extra_args, "shm-region-prefix-name"):
            args.append(f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}")
        if self.exit_timeout is not None:
            args.append(f"--exit-timeout-secs={int(self.exit_timeout)}")
        if not has_gpu() and _flag_value(self.extra_args, "--allow-gpu-metrics") is None:
            args.append("--allow-gpu-metrics=false")
        if self.model_control_mode is not None:
            args.append(f"--model-control-mode={self.model_control_mode}")
            if self.model_control_mode == "explicit" and _flag_value(self.extra_args, "--load-model") is None:
                # Explicit mode loads nothing by itself; serve the whole repository, as the other modes do.
                args.append("--load-model=*")
        if per_rank:
            return mpi_leader_command([*args, *self.extra_args], self.launch, self.shm_prefix, self.mpirun)
        return [*args, *self.extra_args]

    def command(self) -> tuple[list[str], dict[str, str]]:
        """The command line start() would run and the environment it adds, without running anything."""
        self._validate_repo()
        self.binary = find_tritonserver(self._tritonserver_arg)
        if self._backend_dir_arg is not None:
            self.backend_dir = _check_backend_dir(Path(self._backend_dir_arg), "backend directory")
        else:
            self.backend_dir = prepare_backends(self.binary)
        return self._command(), dict(self.launch.env)

    def _validate_repo(self) -> None:
        if not self.repo.is_dir():
            raise ServerError(
                f"model repository {self.repo} is not a directory: pass the directory `generate` wrote"
            )
        if self.model_control_mode in (None, "none") and not model_names(self.repo):
            raise ServerError(
                f"model repository {self.repo} holds no model (no <name>/config.pbtxt): "
                "pass the directory `generate` wrote"
            )

    def start(self, timeout: float = 120.0, progress: Callable[[str], None] | None = None) -> TritonServer:
        """Launch tritonserver and wait until every model is ready; raise ServerError otherwise.

        ``progress`` gets each start-up line of the log worth showing while waiting (``startup_line``)."""
        if self.is_running:
            raise ServerError(f"tritonserver (pid {self.pid}) is already running for {self.repo}")
        self._validate_repo()
        if "http" not in self._enabled_services():
            raise ServerError("readiness is checked over HTTP: do not pass --allow-http=false")
        self.binary = find_tritonserver(self._tritonserver_arg)
        if self._backend_dir_arg is not None:
            self.backend_dir = _check_backend_dir(Path(self._backend_dir_arg), "backend directory")
        else:
            self.backend_dir = prepare_backends(self.binary)
        env = server_environment()
        env.update(self.launch.env)
        if self.launch.needs_mpirun and shutil.which(self.mpirun) is None:
            raise ServerError(
                f"{self.mpirun} is not on PATH: a {self.launch.world_size}-GPU engine runs one tritonserver per MPI "
                "rank; install Open MPI (as in the Triton TensorRT-LLM container), or serve with "
                "--multi-gpu-mode orchestrator"
            )
        check_stub_python(self.repo, env)
        self._check_ports()
        self.args = self._command()
        self.cleanup = {"killed_pids": [], "removed_shm": []}

        if self._log_file_arg is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            self._log_handle = os.fdopen(fd, "wb")
            self.log_path = Path(name)
        else:
            self.log_path = self._log_file_arg.expanduser().absolute()
            try:
                self._log_handle = open(self.log_path, "wb")
            except OSError as exc:
                raise ServerError(f"cannot write the server log {self.log_path}: {exc.strerror}") from exc
        try:
            self._proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=self._log_handle,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_parent_death_signal(),
            )
        except OSError as exc:
            self._close_log()
            raise ServerError(f"cannot run {self.binary}: {exc.strerror}", log_path=self.log_path) from exc
        try:
            self._wait_ready(timeout, progress)
        except BaseException:
            self.stop(timeout=15)
            raise
        return self

    def _wait_ready(self, timeout: float, progress: Callable[[str], None] | None = None) -> None:
        deadline = time.monotonic() + timeout
        expected = [_STARTED[name] for name in self._enabled_services()]
        reader = _LogFollower(self.log_path)
        shown = 0
        while True:
            text = reader.read()
            if progress is not None:
                for line in text[shown:].splitlines():
                    shown_line = startup_line(line)
                    if shown_line is not None:
                        progress(shown_line)
                shown = len(text)
            problem = self._startup_failure(text)
            if problem is not None:
                raise problem
            if self._proc is not None and self._proc.poll() is not None:
                rc = self._proc.returncode
                message = server_error(reader.read(final=True)) or "no error in its log"
                raise ServerError(
                    f"tritonserver exited with code {rc} before it was ready: {_first_line(message)} "
                    f"(log: {self.log_path})",
                    detail=message,
                    log_path=self.log_path,
                )
            if all(marker in text for marker in expected) and self._http_ready():
                # A service that fails to bind is logged just after its "Started" line: look once more.
                problem = self._startup_failure(reader.read())
                if problem is not None:
                    raise problem
                return
            if time.monotonic() > deadline:
                text = reader.read(final=True)
                pending = loading_models(text)
                message = server_error(text)
                hint = f", still loading {', '.join(pending)}" if pending else ""
                hint += f"; last error: {_first_line(message)}" if message else ""
                raise ServerError(
                    f"tritonserver was not ready after {timeout:g} s{hint} (log: {self.log_path}); "
                    "a large model may need a longer timeout",
                    detail=message,
                    log_path=self.log_path,
                )
            time.sleep(0.1)

    def _startup_failure(self, text: str) -> ServerError | None:
        taken = _PORT_TAKEN.search(text)
        if taken is not None:
            return ServerError(
                f"port {taken.group(3)} on {taken.group(2)} is in use: pass --{taken.group(1).lower()}-port "
                "with a free port, or stop what listens there",
                log_path=self.log_path,
            )
        if "failed to load '" in text or "Poll failed for model directory" in text:
            message = server_error(text)
            if message is not None:
                return ServerError(
                    f"tritonserver could not load the repository: {_first_line(message)} (log: {self.log_path})",
                    detail=message,
                    log_path=self.log_path,
                )
        return None

    def _http_ready(self) -> bool:
        connection = http.client.HTTPConnection(self.host, self.http_port, timeout=2)
        try:
            connection.request("GET", "/v2/health/ready")
            return connection.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    # --- stop --------------------------------------------------------------------------------------

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; then end leftover stubs and remove leftover shm.

        A server with nothing left to do is not waited for: once Triton has no request in flight and is
        unloading ("All models are stopped, unloading models") and none of its Python models' processes is
        alive, whatever it still counts as live holds nothing (an ensemble that a cancelled gRPC stream left
        referenced, a model whose stub died under a request), and it would only count down its exit timeout
        (--exit-timeout-secs, 30 s by default). It is ended after ``UNLOAD_GRACE_S``, and ``stuck_models``
        names what it was waiting for.

        Returns the server's exit code (None if it was never started; 0 when it was ended that way). Safe to
        call twice.
        """
        proc = self._proc
        rc = None
        self.stuck_models = []
        if proc is not None:
            outcome = "exited"
            if proc.returncode is None:
                if not _exited(proc.pid):
                    log = _LogFollower(self.log_path, start=self._log_size())
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGTERM)
                    outcome = self._wait_stopped(proc.pid, timeout, log)
                    if outcome != "exited":
                        self._kill_group(proc.pid)
                        _wait_exited(proc.pid, 10)
                # The leader is a zombie now, so its group id cannot be reused: safe to signal the group.
                self._kill_group(proc.pid)
            rc = proc.wait()
            if outcome == "idle":
                self.stuck_models = live_models(self.log_text())
                rc = 0
        self._reap_stubs()
        self._remove_shm()
        self._close_log()
        return rc

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size if self.log_path is not None else 0
        except OSError:
            return 0

    def _wait_stopped(self, pid: int, timeout: float, log: _LogFollower) -> str:
        """"exited"; "idle" once Triton unloads with nothing in flight and no stub left for
        ``UNLOAD_GRACE_S``; or "timeout"."""
        deadline = time.monotonic() + timeout
        unloading = False
        idle_since = None
        while not _exited(pid):
            now = time.monotonic()
            if now > deadline:
                return "timeout"
            unloading = unloading or UNLOADING in log.read()
            if unloading and not self.stub_pids():
                idle_since = idle_since or now
                if now - idle_since >= UNLOAD_GRACE_S:
                    return "idle"
            else:
                idle_since = None
            time.sleep(0.1)
        return "exited"

    def _kill_group(self, pgid: int) -> None:
        members = [pid for pid in _group_members(pgid) if pid != pgid]
        self.cleanup["killed_pids"].extend(members)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    def _reap_stubs(self) -> None:
        deadline = time.monotonic() + 5
        while True:
            stubs = find_stub_processes(self.shm_prefix)
            if not stubs or time.monotonic() > deadline:
                break
            for pid in stubs:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                if pid not in self.cleanup["killed_pids"]:
                    self.cleanup["killed_pids"].append(pid)
            time.sleep(0.05)

    def _remove_shm(self) -> None:
        if not SHM_DIR.is_dir():
            return
        for segment in SHM_DIR.glob(f"{self.shm_prefix}*"):
            with contextlib.suppress(OSError):
                segment.unlink()
                self.cleanup["removed_shm"].append(str(segment))

    def _close_log(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    # --- context manager ---------------------------------------------------------------------------

    def __enter__(self) -> TritonServer:
        if not self.is_running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_running else "stopped"
        return f"TritonServer({str(self.repo)!r}, {self.http_endpoint}, {state})"


def _flag_backend_config(args: Sequence[str], key: str) -> str | None:
    """A python backend setting from `--backend-config=python,key=value` arguments."""
    value = None
    for i, arg in enumerate(args):
        setting = arg[len("--backend-config=") :] if arg.startswith("--backend-config=") else None
        if arg == "--backend-config" and i + 1 < len(args):
            setting = args[i + 1]
        if setting and setting.startswith(f"python,{key}="):
            value = setting.split("=", 1)[1]
    return value


def _exited(pid: int) -> bool:
    """Whether a child has exited, without reaping it (its pid stays reserved as a zombie)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _wait_exited(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _exited(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state ppid pgrp ...
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            members.append(int(entry.name))
    return members


class _LogFollower:
    """Accumulates a growing log file; read() returns its complete lines so far (everything once the
    writer is gone), so a message is never judged by half of it."""

    def __init__(self, path: Path | None, start: int = 0) -> None:
        self._path = path
        self._offset = start
        self._text = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def read(self, final: bool = False) -> str:
        if self._path is not None:
            try:
                with open(self._path, "rb") as handle:
                    handle.seek(self._offset)
                    chunk = handle.read()
            except OSError:
                chunk = b""
            self._offset += len(chunk)
            self._text += self._decoder.decode(chunk)
        if final:
            return self._text
        return self._text[: self._text.rfind("\n") + 1]
