"""Tensor parallelism: one model split over N processes (one GPU each), in the spirit of gpt-fast's ``tp.py``.

What each rank holds (``Shard``):

- attention: its share of the query heads and the key/value heads they read. With fewer key/value heads
  than ranks, a key/value head is replicated on the ranks whose query heads share it. ``wqkv`` keeps the
  rank's rows of q, k and v (column-parallel); ``wo`` its input columns (row-parallel);
- MLP: ``w1`` the rank's slice of the intermediate dimension, gate and up each sliced so the fused layout
  stays ``[gate_r; up_r]``; ``w2`` the matching input columns. Mixture-of-experts layers are split the same
  way inside every expert (tensor-parallel experts): every rank routes every token to the same experts and
  computes its slice of each, so no token moves between ranks;
- the token embedding is replicated (a lookup reads only the rows a step uses); the LM head is split over
  the vocabulary and its logits gathered, so each rank reads 1/N of it per step;
- the KV cache holds only the rank's key/value heads.

One all-reduce follows attention's ``wo`` and one the MLP's ``w2`` (a Falcon parallel block sums both
partial outputs and reduces once); biases of row-parallel linears are added by rank 0 only. After each
all-reduce every rank holds the same activations, so routing, norms and residuals agree bit for bit.

Weights are read shard by shard: each checkpoint tensor is sliced right after the family mapping names
it (fused q/k/v and gate/up are sliced part by part, before they are concatenated), from the
memory-mapped file, so no rank ever holds the whole model.

Processes (``Leader`` on rank 0, ``_worker_main`` on the others): the Triton engine model's process is
rank 0. It starts N-1 workers (``torch.multiprocessing``, spawn), which join a process group over a TCP
store on 127.0.0.1 (gloo on a CPU, NCCL on GPUs, one device per rank). Rank 0 runs the scheduler and
sampling; each step it sends the workers a small header through a pipe (what the step is: its layout's
sizes, graph or eager, ``max_query_len``) and broadcasts the step's staging buffer, which carries the
tokens sampled so far (``last_sampled``) in front of the step's layout; the workers run the same forward
on their shard (the same CUDA graph on a GPU). Rare events travel as messages of their own: a request's
prompt-table rows, the capture of the CUDA graphs, the end. A worker that dies is seen by a thread of
rank 0 watching the processes; the engine then fails every request with one line. Collectives time out
(``COLLECTIVE_TIMEOUT_S``) rather than wait forever, and a worker leaves when rank 0's pipe closes.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AttentionMetadata
from .config import ModelArgs
from .errors import TritonizeError
from .model import TransformerBlock

log = logging.getLogger(__name__)

__all__ = ["Group", "Leader", "ParallelBlock", "RowParallel", "Shard", "TensorParallelError", "VocabParallelHead", "check_split", "parallelize"]

# A collective that waits longer than this is broken (a peer is gone or stuck): it raises instead of hanging.
COLLECTIVE_TIMEOUT_S = float(os.environ.get("TRITONIZE_TP_TIMEOUT_S", "300"))
# Loading a shard (and, on a GPU, profiling and capturing the graphs) may take this long per rank.
START_TIMEOUT_S = float(os.environ.get("TRITONIZE_TP_START_TIMEOUT_S", "1800"))


class TensorParallelError(TritonizeError, RuntimeError):
    """The model cannot be split this way, or a rank failed: one line, said as it is."""


def check_split(args: ModelArgs, world: int) -> str | None:
    """Why ``args`` cannot be split over ``world`` ranks, or None when it can."""
    if world < 1:
        return f"tensor parallelism must be at least 1, not {world}"
    if world == 1:
        return None
    if args.n_heads % world:
        return (f"{args.n_heads} attention heads cannot be split over {world} ranks: use a tensor parallelism "
                f"that divides {args.n_heads}")
    kv = args.n_kv_heads
    if kv % world and world % kv:
        return (f"{kv} key/value heads cannot be split over {world} ranks (nor replicated: {world} is not a "
                f"multiple of {kv}): use a tensor parallelism that divides {kv} or is a multiple of it")
    if args.intermediate_size % world:
        return (f"the MLP's intermediate size {args.intermediate_size} cannot be split over {world} ranks: use a "
                f"tensor parallelism that divides it")
    return None


@dataclass(frozen=True)
class Shard:
    """What rank ``rank`` of ``world`` keeps of a model described by ``args``."""

    args: ModelArgs
    rank: int
    world: int

    def __post_init__(self) -> None:
        problem = check_split(self.args, self.world)
        if problem:
            raise TensorParallelError(problem)
        if not 0 <= self.rank < self.world:
            raise TensorParallelError(f"rank {self.rank} is outside the group of {self.world}")

    # -- what the rank keeps ---------------------------------------------------------------------------
    @property
    def n_heads(self) -> int:
        return self.args.n_heads // self.world

    @property
    def n_kv_heads(self) -> int:
        return max(1, self.args.n_kv_heads // self.world)

    @property
    def first_kv_head(self) -> int:
        kv = self.args.n_kv_heads
        if kv >= self.world:
            return self.rank * (kv // self.world)
        return self.rank // (self.world // kv)  # replicated: the kv head this rank's query heads read

    @property
    def intermediate(self) -> int:
        return self.args.intermediate_size // self.world

    @property
    def vocab(self) -> tuple[int, int, int]:
        """(first, end, rows): the rank's vocabulary rows of the LM head, padded to ``rows`` on every rank."""
        rows = -(-self.args.vocab_size // self.world)
        first = min(self.rank * rows, self.args.vocab_size)
        return first, min(first + rows, self.args.vocab_size), rows

    def q_rows(self) -> Tensor:
        hd = self.args.head_dim
        return torch.arange(self.rank * self.n_heads * hd, (self.rank + 1) * self.n_heads * hd)

    def qkv_rows(self) -> Tensor:
        """Rows of the fused ``[q; k; v]`` projection this rank keeps."""
        a, hd = self.args, self.args.head_dim
        q_dim, kv_dim = a.n_heads * hd, a.n_kv_heads * hd
        kv = torch.arange(self.first_kv_head * hd, (self.first_kv_head + self.n_kv_heads) * hd)
        return torch.cat([self.q_rows(), q_dim + kv, q_dim + kv_dim + kv])

    def inter_rows(self) -> Tensor:
        return torch.arange(self.rank * self.intermediate, (self.rank + 1) * self.intermediate)

    def mlp_rows(self) -> Tensor:
        """Rows of ``w1`` (``[gate; up]`` when gated) this rank keeps."""
        rows = self.inter_rows()
        if self.args.mlp == "gated" or self.args.num_experts:
            return torch.cat([rows, self.args.intermediate_size + rows])
        return rows

    # -- slicing checkpoint tensors ---------------------------------------------------------------------
    def select(self, name: str, tensor: Any) -> Tensor:
        """The rank's piece of the full runtime tensor ``name`` (a tensor, or weights.py's lazy concatenation)."""
        if name.endswith((".attention.wqkv.weight", ".attention.wqkv.bias")):
            return _take(tensor, 0, self.qkv_rows())
        if name.endswith(".attention.wo.weight"):
            return _take(tensor, 1, self.q_rows())
        if name.endswith((".feed_forward.w1.weight", ".feed_forward.w1.bias")):
            return _take(tensor, 0, self.mlp_rows())
        if name.endswith(".feed_forward.w2.weight"):
            return _take(tensor, 1, self.inter_rows())
        if name.endswith(".feed_forward.w13"):  # [experts, 2 I, dim]
            return _take(tensor, 1, self.mlp_rows())
        if name.endswith(".feed_forward.w2"):  # [experts, dim, I]
            return _take(tensor, 2, self.inter_rows())
        if name.endswith((".attention.wo.bias", ".feed_forward.w2.bias")):
            full = _whole(tensor)  # added once, after the sum: by rank 0
            return full if self.rank == 0 else torch.zeros_like(full)
        if name == "output.weight":
            first, end, rows = self.vocab
            return _pad_rows(_take(tensor, 0, torch.arange(first, end)), rows)
        return _whole(tensor)

    def shard_modules(self, model: nn.Module) -> None:
        """Gives a model built on the meta device its local shapes and head counts (before loading)."""
        a = self.args
        hd, q, kv = a.head_dim, self.n_heads, self.n_kv_heads
        width = 2 * self.intermediate if a.mlp == "gated" else self.intermediate
        with torch.device("meta"):
            for layer in model.layers:
                attn = layer.attention
                attn.n_heads, attn.n_kv_heads = q, kv
                attn.wqkv = nn.Linear(a.dim, (q + 2 * kv) * hd, bias=a.qkv_bias)
                attn.wo = nn.Linear(q * hd, a.dim, bias=a.out_bias)
                ff = layer.feed_forward
                if a.num_experts:
                    ff.w13 = nn.Parameter(torch.empty(a.num_experts, 2 * self.intermediate, a.dim))
                    ff.w2 = nn.Parameter(torch.empty(a.num_experts, a.dim, self.intermediate))
                else:
                    ff.w1 = nn.Linear(a.dim, width, bias=a.mlp_bias)
                    ff.w2 = nn.Linear(self.intermediate, a.dim, bias=a.mlp_bias)
            if model.output is not None:
                model.output = nn.Linear(a.dim, self.vocab[2], bias=False)

    def lora(self, name: str, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """The rank's part of the stacked LoRA of linear ``name`` (``a [n, R, in]``, ``b [n, out, R]``): the
        rows of B that a column-parallel linear keeps, the columns of A that a row-parallel one reads."""
        if name == "wqkv":
            return a, b.index_select(1, self.qkv_rows())
        if name == "w1":
            return a, b.index_select(1, self.mlp_rows())
        if name == "wo":
            return a.index_select(2, self.q_rows()), b
        if name == "w2":
            return a.index_select(2, self.inter_rows()), b
        return a, b


def _take(tensor: Any, dim: int, index: Tensor) -> Tensor:
    return tensor.index_select(dim, index)  # torch.Tensor and weights.py's lazy tensors alike


def _whole(tensor: Any) -> Tensor:
    return tensor if isinstance(tensor, Tensor) else tensor.materialize()


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, torch.zeros(rows - t.shape[0], *t.shape[1:], dtype=t.dtype, device=t.device)])


# --------------------------------------------------------------------------------------------------
# Collectives and the modules that call them


class Group:
    """This rank's process group: the collectives the model and the step need."""

    def __init__(self, rank: int, world: int, device: torch.device) -> None:
        self.rank, self.world, self.device = rank, world, device

    def all_reduce(self, t: Tensor) -> Tensor:
        import torch.distributed as dist

        dist.all_reduce(t)
        return t

    def all_gather_rows(self, t: Tensor) -> Tensor:
        """``[R, C]`` on every rank -> ``[world * R, C]`` (rank 0's rows first) on every rank."""
        import torch.distributed as dist

        out = torch.empty(self.world * t.shape[0], *t.shape[1:], dtype=t.dtype, device=t.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, t.contiguous())
        return out

    def broadcast(self, t: Tensor) -> None:
        import torch.distributed as dist

        dist.broadcast(t, src=0)

    def agree(self, ok: bool) -> bool:
        """True on every rank only when ``ok`` is true on every rank."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=self.device)
        self._min(flag)
        return bool(flag.item())

    def min_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self._min(t)
        return int(t.item())

    def _min(self, t: Tensor) -> None:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MIN)


class RowParallel(nn.Module):
    """A row-parallel module (``wo``, ``w2``, a tensor-parallel MoE layer): its partial output, summed over
    the ranks."""

    def __init__(self, inner: nn.Module, group: Group) -> None:
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, x: Tensor) -> Tensor:
        return self.group.all_reduce(self.inner(x))


class VocabParallelHead(nn.Module):
    """The LM head split over the vocabulary: each rank's logits, gathered into the whole row."""

    def __init__(self, weight: Tensor, group: Group, vocab_size: int) -> None:
        super().__init__()
        self.weight, self.group, self.vocab_size = weight, group, vocab_size

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[0]
        if rows == 0:
            return x.new_zeros(0, self.vocab_size)
        local = F.linear(x, self.weight)  # [R, V / world]
        whole = self.group.all_gather_rows(local).view(self.group.world, rows, -1)
        return whole.permute(1, 0, 2).reshape(rows, -1)[:, : self.vocab_size]


def parallelize(model: nn.Module, shard: Shard, group: Group) -> None:
    """Swaps the collectives into a sharded model (after adapters are installed, before the kernels are)."""
    for layer in model.layers:
        if layer.parallel:
            layer.__class__ = ParallelBlock  # one all-reduce of attention + MLP
            layer.group = group
            continue
        layer.attention.wo = RowParallel(layer.attention.wo, group)
        if shard.args.num_experts:
            layer.feed_forward = RowParallel(layer.feed_forward, group)
        else:
            layer.feed_forward.w2 = RowParallel(layer.feed_forward.w2, group)
    first, end, rows = shard.vocab
    if model.output is not None:
        weight = model.output.weight
    else:  # tied: the rank's rows of the (replicated) embedding, padded where the vocabulary runs out
        weight = model.tok_embeddings.weight[first:end]
        weight = _pad_rows(weight, rows) if end - first != rows else weight
    model.output = VocabParallelHead(weight, group, shard.args.vocab_size)


class ParallelBlock(TransformerBlock):
    """Falcon's parallel block over a shard: attention's and the MLP's partial outputs summed, reduced once."""

    group: Group

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, meta: AttentionMetadata) -> Tensor:
        h = self.attention_norm(x)
        m = self.ffn_norm(x) if self.ffn_norm is not None else h
        return x + self.group.all_reduce(self.feed_forward(m) + self.attention(h, rope, meta))


# --------------------------------------------------------------------------------------------------
# Processes: rank 0 (the engine model's process) and its workers

_HEADER = struct.Struct("<10q")
_STEP, _TABLE, _CAPTURE, _STOP = 1, 2, 3, 4


class _Rank:
    """What ``engine.load_for_serving`` needs of a rank: its group, and its shard of a checkpoint."""

    group: Group

    def shard(self, model_dir: str) -> Shard:
        from .weights import read_config

        return Shard(ModelArgs.from_hf_config(read_config(model_dir)), self.group.rank, self.group.world)


def _rank_device(device: torch.device, rank: int) -> torch.device:
    """One GPU per rank, counted from rank 0's (the engine model's instance device)."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def _python() -> str:
    """The interpreter for the workers. Inside Triton's Python backend stub ``sys.executable`` may name the
    stub itself; the stub's prefix is the environment whose ``python3`` comes first on the server's PATH."""
    exe = sys.executable or ""
    if os.path.basename(exe).startswith("python") and os.access(exe, os.X_OK):
        return exe
    for prefix in (sys.prefix, sys.exec_prefix):
        candidate = os.path.join(prefix, "bin", "python3")
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("python3") or exe


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
        import torch.multiprocessing as mp

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
        ctx = mp.get_context("spawn")
        ctx.set_executable(_python())
        processes, conns = [], []
        leader = cls(world, device, processes, conns, on_failure)
        leader._store = store  # rank 0 serves the store: it lives as long as the group
        try:
            for rank in range(1, world):
                mine, theirs = ctx.Pipe(duplex=True)
                process = ctx.Process(target=_worker_main, args=(rank, world, store.port, options, theirs),
                                      name=f"tritonize-tp-worker-{rank}", daemon=True)
                process.start()
                theirs.close()
                processes.append(process)
                conns.append(mine)
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


def _worker_main(rank: int, world: int, port: int, options: dict[str, Any], conn) -> None:
    """Rank ``rank``: loads its shard as rank 0 does, then follows rank 0's messages until told to stop or
    until rank 0 is gone. Any failure is one line in the log and exit code 1."""
    import torch.distributed as dist

    joined = False
    try:
        device = _rank_device(torch.device(options["device"]), rank)
        if device.type == "cpu":  # the ranks share the CPU's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        from .engine import load_for_serving
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
        line = f"tritonize: tensor-parallel worker {rank} could not start: {_one_line(exc)}"
        _report(conn, line)
        os._exit(1)
    try:
        with torch.inference_mode():
            _follow(conn, runner, loaded.adapters, group)
    except BaseException as exc:  # noqa: BLE001 - reported as one line
        _report(conn, f"tritonize: tensor-parallel worker {rank} failed: {_one_line(exc)}")
        os._exit(1)
    if joined:
        _leave()


def _follow(conn, runner, adapters, group: Group) -> None:
    parent = os.getppid()
    while True:
        if not conn.poll(1.0):
            if os.getppid() != parent:  # rank 0 is gone
                return
            continue
        try:
            kind, *fields = _HEADER.unpack(conn.recv_bytes())
        except (EOFError, OSError):  # rank 0 is gone
            return
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
            return


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, (TritonizeError, ValueError)) else f"{type(exc).__name__}: {text}"


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
