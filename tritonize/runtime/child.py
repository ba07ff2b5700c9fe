"""Processes the engine model starts: fresh interpreters that import this package from the parent's path.

A plain subprocess rather than multiprocessing's spawn: spawn starts a resource tracker, which the interpreter
inside Triton's Python backend stub cannot run (its ``_thread`` module and its standard library may come from
different Python builds). The child talks to its parent through one socket (multiprocessing's ``Connection``)
and finds it closed when the parent is gone. The tensor-parallel workers (tp_ranks.py) and the engine's own
process (engine_process.py) start this way.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection

__all__ = ["Child", "python_executable"]

SYS_PATH_ENV = "TRITONIZE_CHILD_SYS_PATH"
# How a child starts: the parent's import path, then ``entry(fd)`` of a module of this package.
_BOOT = (f"import importlib, json, os, sys; sys.path[:0] = json.loads(os.environ.pop('{SYS_PATH_ENV}')); "
         "getattr(importlib.import_module(sys.argv[1]), sys.argv[2])(int(sys.argv[3]))")


def python_executable() -> str:
    """The interpreter for children. Inside Triton's Python backend stub ``sys.executable`` may name the
    stub itself; the stub's prefix is the environment whose ``python3`` comes first on the server's PATH."""
    exe = sys.executable or ""
    if os.path.basename(exe).startswith("python") and os.access(exe, os.X_OK):
        return exe
    for prefix in (sys.prefix, sys.exec_prefix):
        candidate = os.path.join(prefix, "bin", "python3")
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("python3") or exe


class Child:
    """A child process, and a file descriptor that becomes readable when it exits (``sentinel``)."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen = popen
        self.pid = popen.pid
        try:
            self.sentinel = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):  # no pidfd here: a thread waits for the process instead
            self.sentinel, done = os.pipe()
            threading.Thread(target=self._reap, args=(done,), name="tritonize-reap", daemon=True).start()

    def _reap(self, done: int) -> None:
        self.popen.wait()
        os.write(done, b"x")
        os.close(done)

    @classmethod
    def start(cls, module: str, entry: str) -> tuple[Child, Connection]:
        """Runs ``module.entry(fd)`` in a new interpreter; ``fd`` is the child's end of the returned
        connection. Raises OSError when the interpreter cannot be started."""
        mine, theirs = socket.socketpair()
        env = dict(os.environ, **{SYS_PATH_ENV: json.dumps([p for p in sys.path if p])})
        try:
            popen = subprocess.Popen([python_executable(), "-c", _BOOT, module, entry, str(theirs.fileno())],
                                     pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        except OSError:
            mine.close()
            raise
        finally:
            theirs.close()
        return cls(popen), Connection(mine.detach())

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def terminate(self) -> None:
        if self.is_alive():
            self.popen.terminate()

    def kill(self) -> None:
        if self.is_alive():
            self.popen.kill()

    def close(self) -> None:
        os.close(self.sentinel)
