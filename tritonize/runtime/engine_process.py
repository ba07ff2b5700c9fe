"""The engine in a process of its own, driven from the Triton engine model's process.

The engine model answers every stream through Triton's Python backend: a response per stream and step,
each a call into the stub made holding the GIL. In the same process the engine's thread, which launches the
steps, needs that GIL too. With ``TRITONIZE_ENGINE_PROCESS=1`` in the server's environment the engine runs in
a child process instead (as vLLM v1 runs its engine core), and the two exchange small messages over a socket:
requests and cancellations in; out, per engine step, one message with every output of the step and the
gauges the metrics read. The engine model's process is left with Triton's side: taking requests, sending
responses. Unset (or ``0``), the engine runs in the engine model's process: on one H100 at 64 streams the
child process measured slower than that (bench/RESULTS.md 8c), in a run where every step also waited for the
device in sampling, which has been fixed since; which is faster without that wait is still to be measured.

Failures: a child that cannot start fails the model's load with the child's one-line reason. A child that
exits while serving fails every open request, and every later one, with one line naming its exit code. A
request's ``is_cancelled`` is not carried across (the engine model cancels by id). The child leaves when the
parent's end of the socket closes, so a killed server leaves no engine behind.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from .child import Child, python_executable
from .errors import EngineError, one_line
from .request import GenerationEngine, GenerationRequest, StepOutput, no_output

__all__ = ["ENGINE_PROCESS_ENV", "EngineProcess", "wants_engine_process"]

log = logging.getLogger(__name__)

ENGINE_PROCESS_ENV = "TRITONIZE_ENGINE_PROCESS"
PACKAGE = __name__.rpartition(".")[0]  # tritonize.runtime, or tritonize_backend inside a repository
START_TIMEOUT_S = float(os.environ.get("TRITONIZE_ENGINE_START_TIMEOUT_S", "3600"))
# The child's engine thread and the thread that reads requests share its GIL; the reader waits in recv.
GIL_SWITCH_INTERVAL_S = 0.0005


def wants_engine_process() -> bool:
    """Whether the engine model runs its engine in a process of its own (see the module docstring)."""
    return os.environ.get(ENGINE_PROCESS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class _PoolView:
    """The KV pool's usage as the engine process last reported it (metrics.py reads ``pool.usage()``)."""

    def __init__(self) -> None:
        self.value = 0.0

    def usage(self) -> float:
        return self.value


class EngineProcess(GenerationEngine):
    """A ``GenerationEngine`` whose engine (``runtime.create_engine(runtime, model_dir, **options)``) runs in a
    child process. Construction returns once the child's engine is loaded and started (its CUDA graphs
    captured); the child's log records meanwhile go to this process's ``logging``, where the engine model's
    stage log picks them up."""

    tp = None  # tensor-parallel ranks, if any, are the child's: it logs them itself

    def __init__(self, runtime: str, model_dir: Any, *, trtllm_options: dict[str, Any] | None = None,
                 **options: Any) -> None:
        self._callbacks: dict[str, Callable[[StepOutput], None]] = {}
        self._lock = threading.Lock()  # _callbacks and _dead
        self._send_lock = threading.Lock()
        self._dead: str | None = None
        self._reader: threading.Thread | None = None
        self.num_running = 0
        self.num_waiting = 0
        self.pool = _PoolView()
        self.stats: dict[str, Any] = {"decode_batch_histogram": {}, "mixed_steps": 0}
        try:
            self.child, self.conn = Child.start(__name__, "_child_entry")
        except OSError as exc:
            raise EngineError(f"cannot start the engine process with {python_executable()}: {exc}") from None
        try:
            self.conn.send((runtime, str(model_dir), trtllm_options, options))
            info = self._wait_ready(START_TIMEOUT_S)
        except BaseException:
            self._stop_child(0.0)
            raise
        self.default_end_ids: list[int] = info["default_end_ids"]
        self.device = info["device"]  # the child's, resolved ("cuda:0", "cpu"): warm artifacts record it
        log.info("engine process %d serves the model; this process sends the responses", self.child.pid)

    # -- start -----------------------------------------------------------------------------------------
    def _wait_ready(self, timeout: float) -> dict[str, Any]:
        """The child's log records until it says ready (its facts) or fails (EngineError with its line)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise EngineError(f"the engine process did not start within {timeout:.0f} s")
            try:
                if not self.conn.poll(min(left, 1.0)):
                    continue
                message = self.conn.recv()
            except (EOFError, OSError):
                self.child.join(5.0)
                raise EngineError(f"the engine process exited while starting (code {self.child.exitcode}); "
                                  "see the server's log") from None
            kind = message[0]
            if kind == "log":
                log.log(message[1], "%s", message[2])
            elif kind == "ready":
                return message[1]
            elif kind == "error":
                self.child.join(10.0)
                raise EngineError(message[1])

    def start(self) -> EngineProcess:
        with self._lock:
            if self._reader is None:
                self._reader = threading.Thread(target=self._read, name="tritonize-engine-reader", daemon=True)
                self._reader.start()
        return self

    # -- requests --------------------------------------------------------------------------------------
    def submit(self, req: GenerationRequest) -> None:
        """Sends the request to the engine; its outputs come back through ``req.on_output`` on the reader thread."""
        if req.on_output is no_output or not callable(req.on_output):
            raise ValueError("GenerationRequest.on_output must be a callable")
        self.start()
        with self._lock:
            problem = self._dead
            if problem is None and req.request_id in self._callbacks:
                problem = f"request id {req.request_id!r} is already in flight; use a unique id"
            if problem is None:
                self._callbacks[req.request_id] = req.on_output
        if problem is None:
            try:
                self._send(("submit", dataclasses.replace(req, on_output=no_output, is_cancelled=None)))
                return
            except (OSError, ValueError) as exc:  # the child is gone: the reader fails the request with the rest
                log.debug("cannot send a request to the engine process: %s", exc)
                return
        req.on_output(StepOutput([], [], 0.0, True, "error", problem, len(req.prompt_ids), 0))

    def cancel(self, request_id: str) -> bool:
        with self._lock:
            known = request_id in self._callbacks and self._dead is None
        if known:
            try:
                self._send(("cancel", request_id))
            except (OSError, ValueError):
                return False
        return known

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self.conn.send(message)

    # -- outputs ---------------------------------------------------------------------------------------
    def _read(self) -> None:
        """Delivers each step's outputs and keeps the gauges; fails what is open when the child goes away."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "out":
                _, outputs, gauges, step_counts = message
                self.num_running, self.num_waiting, self.pool.value = gauges
                if step_counts is not None:
                    self.stats["decode_batch_histogram"], self.stats["mixed_steps"] = step_counts
                with self._lock:
                    calls = [(key, out, self._callbacks.pop(key, None) if out.finished else self._callbacks.get(key))
                             for key, out in outputs]
                for key, out, callback in calls:
                    if callback is not None:
                        try:
                            callback(out)
                        except Exception:  # noqa: BLE001 - one receiver's failure must not stop the others
                            log.exception("on_output of request %s raised", key)
            elif kind == "log":
                log.log(message[1], "%s", message[2])
            elif kind == "bye":
                return
        self.child.join(2.0)
        code = self.child.exitcode
        self._fail_all(f"tritonize: the engine process exited (code {code}); requests fail until the model is "
                       "loaded again", log_it=True)

    def _fail_all(self, message: str, log_it: bool = False) -> None:
        with self._lock:
            first = self._dead is None
            if first:
                self._dead = message
            callbacks, self._callbacks = self._callbacks, {}
        if log_it and first:
            log.error("%s", message)
        self.num_running = self.num_waiting = 0
        for callback in callbacks.values():
            try:
                callback(StepOutput([], [], 0.0, True, "error", message))
            except Exception:  # noqa: BLE001
                log.exception("on_output raised while failing a request")

    # -- end -------------------------------------------------------------------------------------------
    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stops the child's engine (its open requests finish with an error, delivered), then the child."""
        with self._lock:
            if self._dead is None:
                self._dead = "the engine was shut down; no new requests are accepted"
        try:
            self._send(("shutdown",))
        except (OSError, ValueError):
            pass
        if self._reader is not None:
            self._reader.join(timeout)
        self._stop_child(timeout or 0.0)
        self._fail_all("the engine was shut down before this request finished")

    def _stop_child(self, timeout: float) -> None:
        self.child.join(timeout)
        if self.child.is_alive():
            self.child.kill()
            self.child.join(5.0)
        try:
            self.conn.close()
        except OSError:
            pass
        self.child.close()


# -- the child -----------------------------------------------------------------------------------------


class _ToParent(logging.Handler):
    """The child's log records, as lines for the parent to log."""

    def __init__(self, core: _Core) -> None:
        super().__init__(logging.INFO)
        self.core = core

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.core.send(("log", record.levelno, record.getMessage()))
        except Exception:  # noqa: BLE001 - the parent is gone, or the record is malformed: nothing to do
            pass


class _Core:
    """The child's side: the engine, the outputs of each step gathered and sent in one message."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()  # the pending outputs and the socket's writing end
        self.pending: list[tuple[str, StepOutput]] = []
        self.engine: Any = None
        self.gauges: tuple = ()
        self.steps_sent = -1

    def send(self, message: tuple) -> None:
        with self.lock:
            self.conn.send(message)

    def collect(self, key: str, out: StepOutput) -> None:
        with self.lock:
            self.pending.append((key, out))

    def flush(self) -> None:
        """Sends what the engine delivered since the last flush, with the gauges when they changed.

        Called on the engine thread after each step (``Engine.after_step``) and on the main thread after each
        command and when idle; one lock keeps every request's outputs in order."""
        engine = self.engine
        pool = getattr(engine, "pool", None)
        gauges = (engine.num_running, engine.num_waiting, pool.usage() if pool is not None else 0.0)
        stats = getattr(engine, "stats", None) or {}
        steps = stats.get("decode_steps", 0) + stats.get("mixed_steps", 0)
        with self.lock:
            if not self.pending and gauges == self.gauges and steps == self.steps_sent:
                return
            step_counts = None  # (decode steps by batch size, steps with prompt chunks)
            if steps != self.steps_sent:
                try:
                    step_counts = (dict(stats.get("decode_batch_histogram", {})), stats.get("mixed_steps", 0))
                    self.steps_sent = steps
                except RuntimeError:  # changed while copied (not the engine thread): the next flush sends it
                    pass
            outputs, self.pending = self.pending, []
            self.gauges = gauges
            try:
                self.conn.send(("out", outputs, gauges, step_counts))
            except (OSError, ValueError):
                pass  # the parent is gone; the main thread sees it and stops

    def serve(self, runtime: str, model_dir: str, trtllm_options: dict | None, options: dict) -> int:
        from .runtime import create_engine

        root = logging.getLogger(PACKAGE)
        root.addHandler(_ToParent(self))
        root.setLevel(logging.INFO)
        root.propagate = False
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        try:
            engine = create_engine(runtime, model_dir, trtllm_options=trtllm_options, **options)
            ranks = getattr(engine, "tp", None)
            if ranks is not None:
                log.info("%s", ranks.describe())
            self.engine = engine
            if hasattr(engine, "after_step"):
                engine.after_step = self.flush
            engine.start()
        except BaseException as exc:  # noqa: BLE001 - the parent fails the model's load with this line
            self.send(("error", one_line(exc)))
            return 1
        self.send(("ready", {"default_end_ids": list(engine.default_end_ids),
                             "device": str(getattr(engine, "device", options.get("device", "cpu")))}))
        try:
            while True:
                if not self.conn.poll(0.05):
                    self.flush()  # outputs of other threads, and gauges, while the engine idles
                    continue
                message = self.conn.recv()
                if message[0] == "submit":
                    req = message[1]
                    req.on_output = lambda out, key=req.request_id: self.collect(key, out)
                    engine.submit(req)
                elif message[0] == "cancel":
                    engine.cancel(message[1])
                elif message[0] == "shutdown":
                    break
                self.flush()  # a refused or cancelled request's answer, made on this thread
        except (EOFError, OSError):
            pass  # the parent is gone
        engine.shutdown()
        self.flush()
        try:
            self.send(("bye",))
        except (OSError, ValueError):
            pass
        return 0


def _child_entry(fd: int) -> None:
    """The engine process's start (``Child.start``): what to run comes through the socket first."""
    conn = Connection(fd)
    try:
        runtime, model_dir, trtllm_options, options = conn.recv()
    except (EOFError, OSError):
        return
    code = _Core(conn).serve(runtime, model_dir, trtllm_options, options)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # threads the engine left (compilers, watchers) must not keep the process
