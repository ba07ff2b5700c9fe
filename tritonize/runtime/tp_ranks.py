"""The processes of a tensor-parallel engine (the shard each holds is tp.py's).

The Triton engine model's process is rank 0 (``Leader``). It starts N-1 worker processes (child.py's
``Child``: fresh interpreters; ``_worker_main``), which join a process group over a TCP store on 127.0.0.1
(gloo on a CPU, NCCL on GPUs, one device per rank: rank r takes the GPU r places after rank 0's). Every rank loads its shard the
same way (``loading.load_for_serving``). Rank 0 runs the scheduler and sampling; each step its runner sends
the workers a small header through a pipe (what the step is: its layout's sizes, graph or eager,
``max_query_len``) and broadcasts the step's staging buffer, which carries the tokens sampled so far
(``last_sampled``) in front of the step's layout; the workers run the same forward on their shard (the same
CUDA graph on a GPU, captured together at start). Rare events travel as messages of their own: a request's
prompt-table rows, the capture of the CUDA graphs, the end.

Failures: a worker that exits is seen at once by a thread of rank 0 watching the processes, which logs
``tritonize: tensor-parallel worker R exited (code C); the engine stops`` and stops the engine: every
request, running or to come, fails with that line. A collective waits at most ``COLLECTIVE_TIMEOUT_S``
(gloo sees a closed peer at once; NCCL communicators are aborted), and a worker leaves when rank 0's pipe
closes. The environment's NCCL settings are left as they are (NVLink multicast stays off where it is off).
"""

from __future__ import annotations

import datetime
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch
from torch import Tensor

from .child import Child, python_executable
from .config import ModelArgs
from .errors import TritonizeError, one_line
from .tp import Group, Shard, TensorParallelError, check_split

log = logging.getLogger(__name__)

__all__ = ["COLLECTIVE_TIMEOUT_S", "Leader", "init_process_group"]

# A collective that waits longer than this is broken (a peer is gone or stuck): it raises instead of hanging.
COLLECTIVE_TIMEOUT_S = float(os.environ.get("TRITONIZE_TP_TIMEOUT_S", "300"))
# Loading a shard (and, on a GPU, profiling and capturing the graphs) may take this long per rank.
START_TIMEOUT_S = float(os.environ.get("TRITONIZE_TP_START_TIMEOUT_S", "1800"))

_HEADER = struct.Struct("<10q")
_STEP, _TABLE, _CAPTURE, _STOP = 1, 2, 3, 4


class _Rank:
    """What ``loading.load_for_serving`` needs of a rank: its group, and its shard of a checkpoint."""

    group: Group

    def shard(self, model_dir: str) -> Shard:
        from .weights import read_config

        return Shard(ModelArgs.from_hf_config(read_config(model_dir)), self.group.rank, self.group.world)


def _rank_device(device: torch.device, rank: int) -> torch.device:
    """One GPU per rank, counted from rank 0's (the engine model's instance device)."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def _say(line: str) -> None:
    """One line in the server's log: with no logging set up, Python prints errors on the stub's stderr."""
    log.error("%s", line)


class Leader(_Rank):
    """Rank 0: starts the workers, sends each step's header through their pipes, watches their processes.

    ``on_failure(message)`` is called (from the watching thread) when a worker exits while serving.
    """

    def __init__(self, world: int, device: torch.device, processes: list, conns: list,
                 on_failure: Callable[[str], None]) -> None:
        self.world, self.device = world, device
        self.group = Group(0, world, device)
        self.processes, self.conns = processes, conns  # index r - 1: rank r
        self.on_failure = on_failure
        self.errors: dict[int, str] = {}
        self._failure: str | None = None
        self._dead = threading.Event()
        self._closing = False
        self._wake_r, self._wake_w = os.pipe()
        self._watcher: threading.Thread | None = None
        self._joined = False

    # -- start -----------------------------------------------------------------------------------------
    @classmethod
    def start(cls, world: int, device: torch.device, options: dict[str, Any],
              on_failure: Callable[[str], None]) -> Leader:
        """Checks the split and the devices, starts ranks 1..world-1 and joins the group as rank 0."""
        import torch.distributed as dist

        from .weights import read_config

        problem = check_split(ModelArgs.from_hf_config(read_config(options["model_dir"])), world)
        if problem:
            raise TensorParallelError(f"tensor parallelism {world}: {problem}")
        if device.type == "cuda":
            first, count = device.index or 0, torch.cuda.device_count()
            if first + world > count:
                visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                raise TensorParallelError(
                    f"tensor parallelism {world} needs {world} GPUs (cuda:{first} to cuda:{first + world - 1}), but "
                    f"this server sees {count}{f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''}: "
                    "give the server more GPUs or generate the repository with a smaller --tensor-parallelism-size")
        elif dist.is_available() and not dist.is_gloo_available():
            raise TensorParallelError("tensor parallelism on a CPU needs torch.distributed with gloo")
        if dist.is_initialized():
            raise TensorParallelError("this process already belongs to a torch.distributed group: one "
                                      "tensor-parallel engine per process")
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
        processes, conns = [], []
        leader = cls(world, device, processes, conns, on_failure)
        leader._store = store  # rank 0 serves the store: it lives as long as the group
        try:
            for rank in range(1, world):
                try:
                    process, conn = Child.start(f"{__name__.rpartition('.')[0]}.tp_ranks", "_worker_entry")
                except OSError as exc:
                    raise TensorParallelError(f"cannot start tensor-parallel worker {rank} with "
                                              f"{python_executable()}: {exc}") from None
                processes.append(process)
                conns.append(conn)
                conn.send((rank, world, store.port, options))
            leader._expect("hello")  # every worker runs and imported the runtime
            _join(store, 0, world, device, datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
            leader._joined = True
        except BaseException:
            leader.close()
            raise
        return leader

    def _expect(self, what: str) -> None:
        """Waits for ``what`` from every worker; a worker that reports an error, exits or stays silent fails it."""
        from multiprocessing.connection import wait

        deadline = time.monotonic() + START_TIMEOUT_S
        pending = set(range(1, self.world))
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TensorParallelError(f"tensor-parallel workers {sorted(pending)} did not start within "
                                          f"{START_TIMEOUT_S:.0f} s")
            watched = {}
            for rank in pending:
                watched[self.conns[rank - 1]] = rank
                watched[self.processes[rank - 1].sentinel] = rank
            for rank in sorted({watched[item] for item in wait(list(watched), timeout=min(left, 5.0))}):
                conn, process = self.conns[rank - 1], self.processes[rank - 1]
                heard = None
                try:
                    while heard != what and conn.poll(0):
                        heard, text = conn.recv()
                        if heard == "error":
                            self.errors[rank] = text
                except (EOFError, OSError):
                    pass
                if heard == what:
                    pending.discard(rank)
                    continue
                process.join(1.0)
                if process.is_alive() and rank not in self.errors:
                    continue
                raise TensorParallelError(self.errors.get(rank) or
                                          f"tensor-parallel worker {rank} exited while starting (code "
                                          f"{process.exitcode})")

    def wait_ready(self) -> None:
        """Every worker loaded its shard; from now on a worker that exits stops the engine."""
        self._expect("ready")
        self._watcher = threading.Thread(target=self._watch, name="tritonize-tp-watch", daemon=True)
        self._watcher.start()

    def describe(self) -> str:
        """One line for the log: the split, the backend, the processes."""
        backend = "NCCL" if self.device.type == "cuda" else "gloo"
        devices = f" on cuda:{self.device.index or 0}-{(self.device.index or 0) + self.world - 1}" \
            if self.device.type == "cuda" else " on the CPU"
        pids = ", ".join(str(p.pid) for p in self.processes)
        others = "rank 1 is process" if self.world == 2 else f"ranks 1-{self.world - 1} are processes"
        return f"tensor parallelism {self.world} ({backend}{devices}): rank 0 is process {os.getpid()}, {others} {pids}"

    def raise_startup_failure(self, exc: BaseException) -> None:
        """After a failed start: a worker's own reason, when rank 0's error is only its consequence."""
        if isinstance(exc, (TritonizeError, ValueError)) or not self.errors:
            return
        rank = min(self.errors)
        raise TensorParallelError(self.errors[rank]) from None

    # -- serving ---------------------------------------------------------------------------------------
    def _send(self, *fields: int) -> None:
        message = _HEADER.pack(*fields, *([0] * (_HEADER.size // 8 - len(fields))))
        for conn in self.conns:
            conn.send_bytes(message)

    def step(self, fields: tuple[int, ...], buffer: Tensor) -> None:
        """One step: its header to every worker, then the buffer (last sampled tokens + layout) to all."""
        self._send(_STEP, *fields)
        self.group.broadcast(buffer)

    def capture(self) -> None:
        self._send(_CAPTURE)

    def write_prompt_table(self, start: int, rows: Tensor) -> None:
        """A request's own prompt-table rows, written at its admission on every rank."""
        self._send(_TABLE, start, rows.shape[0], rows.shape[1])
        self.group.broadcast(rows.contiguous())

    # -- failures --------------------------------------------------------------------------------------
    def _watch(self) -> None:
        from multiprocessing.connection import wait

        sentinels = {p.sentinel: rank for rank, p in enumerate(self.processes, start=1)}
        ready = wait([*sentinels, self._wake_r])
        if self._closing:
            return
        rank = next(sentinels[s] for s in ready if s in sentinels)
        process = self.processes[rank - 1]
        process.join(1.0)
        message = f"tritonize: tensor-parallel worker {rank} exited (code {process.exitcode}); the engine stops"
        self._failure = message
        self._dead.set()
        _say(message)
        self._abort_collectives()
        self.on_failure(message)

    def _abort_collectives(self) -> None:
        """NCCL waits for a lost peer until its timeout: abort the communicators so that rank 0's step fails now
        (gloo sees the closed connection by itself)."""
        if self.device.type != "cuda":
            return
        try:
            from torch.distributed import distributed_c10d

            distributed_c10d._abort_process_group()
        except Exception as exc:  # noqa: BLE001 - best effort: the collective's timeout still ends the wait
            log.warning("could not abort the NCCL communicators (%s); the step fails at its timeout", exc)

    def failure(self, wait: float = 0.0) -> str | None:
        """The line a lost worker ended the engine with (waiting up to ``wait`` s for the watch to see it)."""
        self._dead.wait(wait)
        return self._failure

    def close(self, timeout: float = 10.0) -> None:
        """Tells the workers to stop, waits for them (then ends them), leaves the group."""
        if self._closing:
            return
        self._closing = True
        os.write(self._wake_w, b"x")
        for conn in self.conns:
            try:
                conn.send_bytes(_HEADER.pack(_STOP, *([0] * 9)))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + timeout
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                process.terminate()
                process.join(2.0)
            if process.is_alive():
                process.kill()
                process.join(2.0)
        for conn in self.conns:
            conn.close()
        if self._watcher is not None:
            self._watcher.join(5.0)
        for process in self.processes:
            process.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._joined:
            self._joined = False
            _leave()


def _leave() -> None:
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - leaving a broken group must not hide why it broke
        log.warning("leaving the tensor-parallel group: %s", exc)


def _join(store, rank: int, world: int, device: torch.device, timeout: datetime.timedelta) -> None:
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world, timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)


class _Worker(_Rank):
    def __init__(self, group: Group) -> None:
        self.group = group


def _worker_entry(fd: int) -> None:
    """A worker process's start (``Child.start``): its rank and the engine's options come through its socket."""
    conn = Connection(fd)
    try:
        rank, world, port, options = conn.recv()
    except (EOFError, OSError):
        return  # rank 0 is gone before it said anything
    _worker_main(rank, world, port, options, conn)


def _worker_main(rank: int, world: int, port: int, options: dict[str, Any], conn) -> None:
    """Rank ``rank``: loads its shard as rank 0 does, then follows rank 0's messages until told to stop or
    until rank 0 is gone. Any failure is one line in the log and exit code 1."""
    import torch.distributed as dist

    joined = False
    try:
        device = _rank_device(torch.device(options["device"]), rank)
        if device.type == "cpu":  # the ranks share the CPU's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        from .loading import load_for_serving
        from .runner import ModelRunner

        conn.send(("hello", None))
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False,
                              timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
        _join(store, rank, world, device, datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        joined = True
        group = Group(rank, world, device)
        options = dict(options, device=str(device))
        loaded = load_for_serving(**options, tp=_Worker(group))
        runner = ModelRunner(loaded.model, None, device=device, max_num_seqs=options["max_batch_size"],
                             max_num_tokens=options["max_num_tokens"], max_seq_len=options["max_seq_len"],
                             block_size=options["block_size"], cuda_graphs=loaded.graphs,
                             token_adapter=loaded.adapters.token_adapter, vocab_size=loaded.model.args.vocab_size,
                             group=group)
        conn.send(("ready", None))
    except BaseException as exc:  # noqa: BLE001 - reported as one line
        line = f"tritonize: tensor-parallel worker {rank} could not start: {one_line(exc)}"
        _report(conn, line)
        os._exit(1)
    try:
        with torch.inference_mode():
            stopped = _follow(conn, runner, loaded.adapters, group)
    except BaseException as exc:  # noqa: BLE001 - reported as one line
        _report(conn, f"tritonize: tensor-parallel worker {rank} failed: {one_line(exc)}")
        os._exit(1)
    if not stopped:  # rank 0 is gone: leaving the group would wait for it
        os._exit(0)
    if joined:
        _leave()


def _follow(conn, runner, adapters, group: Group) -> bool:
    """Runs rank 0's messages; True when told to stop, False when rank 0 is gone."""
    parent = os.getppid()
    while True:
        if not conn.poll(1.0):
            if os.getppid() != parent:
                return False
            continue
        try:
            kind, *fields = _HEADER.unpack(conn.recv_bytes())
        except (EOFError, OSError):
            return False
        if kind == _STEP:
            runner.follow(fields)
        elif kind == _TABLE:
            start, n, dim = fields[:3]
            table = adapters.prompt_table
            rows = torch.empty(n, dim, dtype=table.dtype, device=table.device)
            group.broadcast(rows)
            table[start : start + n] = rows
        elif kind == _CAPTURE:
            runner.capture_all()
        elif kind == _STOP:
            return True


def _report(conn, line: str) -> None:
    _say(line)
    try:
        conn.send(("error", line))
    except (OSError, ValueError):
        pass


def init_process_group(rank: int, world: int, port: int, device: torch.device) -> Group:
    """Joins the group over the TCP store served on 127.0.0.1:``port`` (tests build groups of their own)."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, world, is_master=False,
                          timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
    _join(store, rank, world, device, datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return Group(rank, world, device)
