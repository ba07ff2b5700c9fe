"""Executes a ``StepPlan``: lays the step's tokens out for the model, runs the forward, samples.

Everything a step needs on the device travels in one host-to-device copy: the plan is written into one
pinned int64 buffer (token ids, positions, cache rows, block tables, ...) whose regions the forward reads
as views. A decode-only step (one token per sequence) of up to ``max_num_seqs`` sequences is replayed
from a CUDA graph captured for the next larger batch bucket; padding rows read block 0, which no
sequence owns. Mixed steps (prompt chunks among the decodes) run eagerly.

The step does not wait for the device. A decode row's input is the token the previous step sampled for
it, which the host may not have read yet: the runner marks such tokens as pending and the forward takes
them from ``last_sampled`` (one device row per batch slot) instead. ``launch`` returns an ``InFlight``
whose ``result()`` waits for the tokens, so the engine can plan and launch the next step first.

A step with rows guided by a grammar is launched with ``sample=False``: the forward is queued and an
``Unsampled`` step comes back; ``sample(step, allowed)`` chooses its tokens once the host knows the
guided rows' masks, which depend on the previous step's tokens.

Tensor parallelism (tp.py): ``last_sampled`` and the staging buffer are two views of one device buffer,
``last_sampled`` first. Rank 0's runner sends each step's header to the workers and broadcasts that buffer
up to the end of the step's layout: the workers' runners (``follow``) get the step and the tokens sampled
so far in one collective, and run the same forward (the same CUDA graph) on their shard. Only rank 0
samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .attention import AttentionMetadata
from .sampling import Sampler, SamplingRow, TokenMask
from .scheduler import StepPlan

log = logging.getLogger(__name__)

__all__ = ["InFlight", "ModelRunner", "Unsampled", "batch_buckets", "token_buckets"]

_REGIONS = ("ids", "pos", "slot_mapping", "pending", "adapter")  # one int64 per token
# How a step runs: exactly laid out and eager, padded to a captured shape but eager, or a graph replay.
_EXACT, _PADDED, _GRAPH = 0, 1, 2
_SEQ_REGIONS = ("seq_lens", "logits_indices", "sample_slots")  # one per sequence


def batch_buckets(max_batch_size: int) -> list[int]:
    """Decode batch sizes that get a CUDA graph: 1, 2, 4, 8, then every 8 up to 64, every 32 after."""
    sizes = [b for b in (1, 2, 4) if b < max_batch_size]
    step, b = 8, 8
    while b < max_batch_size:
        sizes.append(b)
        if b >= 64:
            step = 32
        b += step
    return sizes + [max_batch_size]


def _tokens(seq, start: int, stop: int) -> list[int]:
    """Known tokens ``start:stop`` of a sequence without copying the rest of it."""
    n = len(seq.prompt)
    if stop <= n:
        return seq.prompt[start:stop]
    if start >= n:
        return seq.output[start - n : stop - n]
    return seq.prompt[start:] + seq.output[: stop - n]


def token_buckets(max_num_tokens: int) -> list[int]:
    """Token counts of a step with prompt chunks that get a CUDA graph: 16, 32, 64, 128, then four per doubling
    (256, 320, 384, 448, 512, 640, ...) up to the budget. A step pads to the next one: below 256 tokens a step
    costs about one read of the weights whatever its size, above it the padding is computed, so it is kept
    under a quarter (doubling buckets padded a 1,057-token prompt to 2,048 and nearly doubled its first token)."""
    sizes, t = [], 16
    while t < min(256, max_num_tokens):
        sizes.append(t)
        t *= 2
    while t < max_num_tokens:
        sizes.append(t)
        t += 1 << (t.bit_length() - 3)  # a quarter of the power of two at or below t
    return sizes + [max_num_tokens]


@dataclass(frozen=True)
class _Shape:
    """What a captured step was captured for: its tokens, its sequences, and whether it holds prompt chunks
    (the attention kernel's tiles differ)."""

    tokens: int
    seqs: int
    prompt: bool


class _Layout:
    """Offsets of one step's regions in the staging buffer: N tokens, S sequences, W blocks per table."""

    def __init__(self, n_tokens: int, n_seqs: int, width: int) -> None:
        self.n_tokens, self.n_seqs, self.width = n_tokens, n_seqs, width
        offset = 0
        self.at: dict[str, tuple[int, int]] = {}
        for name in _REGIONS:
            self.at[name] = (offset, offset + n_tokens)
            offset += n_tokens
        for name in _SEQ_REGIONS:
            self.at[name] = (offset, offset + n_seqs)
            offset += n_seqs
        self.at["query_start_loc"] = (offset, offset + n_seqs + 1)
        offset += n_seqs + 1
        self.at["block_tables"] = (offset, offset + n_seqs * width)
        offset += n_seqs * width
        self.size = offset

    def views(self, buf: torch.Tensor | np.ndarray) -> dict:
        out = {name: buf[a:b] for name, (a, b) in self.at.items()}
        out["block_tables"] = out["block_tables"].reshape(self.n_seqs, self.width)
        return out


@dataclass(frozen=True)
class _Step:
    """What both sides of a tensor-parallel group need to know to run the same step (its header)."""

    mode: int
    layout: _Layout
    shape: _Shape | None
    max_query_len: int
    rows: int

    def fields(self) -> tuple[int, ...]:
        shape = self.shape or _Shape(0, 0, False)
        return (self.mode, self.layout.n_tokens, self.layout.n_seqs, shape.tokens, shape.seqs, int(shape.prompt),
                self.max_query_len, self.rows)

    @staticmethod
    def read(fields: Sequence[int], width: int) -> _Step:
        mode, n_tokens, n_seqs, tokens, seqs, prompt, max_query_len, rows = fields[:8]
        shape = _Shape(tokens, seqs, bool(prompt)) if mode != _EXACT else None
        return _Step(mode, _Layout(n_tokens, n_seqs, width), shape, max_query_len, rows)


@dataclass
class InFlight:
    """A launched step: its plan and where its sampled tokens will land on the host."""

    plan: StepPlan
    tokens: torch.Tensor  # host [R]
    log_probs: torch.Tensor | None
    event: torch.cuda.Event | None

    def result(self) -> tuple[list[int], list[float] | None]:
        if self.event is not None:
            self.event.synchronize()
        return self.tokens.tolist(), (None if self.log_probs is None else self.log_probs.tolist())


@dataclass
class Unsampled:
    """A launched forward whose tokens are not chosen yet: ``ModelRunner.sample`` chooses them."""

    plan: StepPlan
    rows: Sequence[SamplingRow]
    logits: torch.Tensor  # device [R, vocab], valid until the next launch
    sample_slots: torch.Tensor  # device [R]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, sampler: Sampler, *, device: torch.device, max_num_seqs: int,
                 max_num_tokens: int, max_seq_len: int, block_size: int, cuda_graphs: bool,
                 token_adapter: torch.Tensor | None = None, vocab_size: int, tp=None, group=None) -> None:
        """``sampler`` None: a tensor-parallel worker's runner, which follows rank 0's steps (``follow``) over
        ``group``; ``tp`` is rank 0's ``tp.Leader``."""
        self.model = model
        self.sampler = sampler
        self.tp = tp
        self.group = tp.group if tp is not None else group
        self.out_of_step = False  # a step failed between its broadcast and the end of its forward
        self.device = device
        self.max_num_seqs = max_num_seqs
        self.max_num_tokens = max_num_tokens
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.width = -(-max_seq_len // block_size)
        self.token_adapter = token_adapter
        # One row per batch slot, plus a row the padding rows of a graph write into; the staging buffer after it.
        self.dummy_slot = max_num_seqs
        self._lead = max_num_seqs + 1
        cap = _Layout(max(max_num_tokens, max_num_seqs), max_num_seqs, self.width).size
        self._device_buffer = torch.zeros(self._lead + cap, dtype=torch.int64, device=device)
        self.last_sampled = self._device_buffer[: self._lead]
        self.staging = self._device_buffer[self._lead :]
        pin = device.type == "cuda"
        # Two host buffers, used in turn: step N+1 is written while step N's copy may still be queued (the
        # engine reads step N-1's tokens, and so knows its copy is done, before it plans step N+1).
        self._hosts = [torch.zeros(cap, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._turn = 0
        self.host = self._hosts[0]
        self.host_np = self.host.numpy()
        self.graphs: dict[_Shape, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.failed: set[_Shape] = set()
        self.capture = cuda_graphs
        self.buckets = batch_buckets(max_num_seqs) if cuda_graphs else []
        self.token_buckets = token_buckets(max_num_tokens) if cuda_graphs else []
        self._graph_pool = None

    # ---------------------------------------------------------------- building a step
    def _fill(self, plan: StepPlan, layout: _Layout, virtual_offset: Callable[[object], int],
              slot_adapter: np.ndarray | None) -> int:
        """Writes the plan into the host buffer; returns the number of sampling rows."""
        v = layout.views(self.host_np[: layout.size])
        bs = self.block_size
        t = 0
        r = 0
        qsl = v["query_start_loc"]
        qsl[0] = 0
        bt = v["block_tables"]
        bt.fill(0)
        vocab = self.vocab_size
        for s, chunk in enumerate(plan.chunks):
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            end = start + n
            known = min(end, seq.num_known)
            ids = _tokens(seq, start, known)
            offset = virtual_offset(seq)
            if offset:
                ids = [i + offset if i >= vocab else i for i in ids]
            k = len(ids)
            v["ids"][t : t + k] = ids
            v["pending"][t : t + k] = -1
            if k < n:  # the newest token was sampled on the device and not read yet
                v["ids"][t + k : t + n] = 0
                v["pending"][t + k : t + n] = seq.slot
            v["pos"][t : t + n] = np.arange(start, end)
            blocks = np.asarray(seq.blocks, dtype=np.int64)
            p = np.arange(start, end)
            v["slot_mapping"][t : t + n] = blocks[p // bs] * bs + p % bs
            if slot_adapter is not None:
                v["adapter"][t : t + n] = slot_adapter[seq.slot]
            bt[s, : len(blocks)] = blocks
            v["seq_lens"][s] = end
            t += n
            qsl[s + 1] = t
            if chunk.samples:
                v["logits_indices"][r] = t - 1
                v["sample_slots"][r] = seq.slot
                r += 1
        return r

    def _pad(self, layout: _Layout, used_tokens: int, used_seqs: int, rows: int) -> None:
        """Padding tokens (no sequence's, writing into block 0) and padding sequences (no queries), sampling
        rows that read token 0 and sample into the dummy slot."""
        v = layout.views(self.host_np[: layout.size])
        for name in _REGIONS:
            v[name][used_tokens:] = 0
        v["pending"][used_tokens:] = -1
        v["seq_lens"][used_seqs:] = 0
        v["query_start_loc"][used_seqs + 1 :] = used_tokens
        v["logits_indices"][rows:] = 0
        v["sample_slots"][rows:] = self.dummy_slot

    def _device_views(self, layout: _Layout) -> dict:
        self.staging[: layout.size].copy_(self.host[: layout.size], non_blocking=True)
        return layout.views(self.staging[: layout.size])

    def _host_lists(self, layout: _Layout, host_np: np.ndarray | None) -> dict | None:
        """The numbers the Python attention path reads on the host (None where the device kernel runs)."""
        if self.device.type == "cuda" and getattr(self.model, "device_attention", False):
            return None
        if host_np is None:  # a tensor-parallel worker: what the broadcast brought
            host_np = self.staging[: layout.size].cpu().numpy()
        hv = layout.views(host_np[: layout.size])
        return {"seq_lens": hv["seq_lens"].tolist(), "query_start_loc": hv["query_start_loc"].tolist()}

    def _forward(self, v: dict, max_query_len: int, host: dict | None) -> torch.Tensor:
        """The model on a laid-out step; ``host`` carries the numbers the Python attention path reads.
        Logits come for ``v["logits_indices"]`` (a step samples at most one token per sequence)."""
        ids = torch.where(v["pending"] >= 0, self.last_sampled[v["pending"].clamp(min=0)], v["ids"])
        n = ids.shape[0]
        if self.token_adapter is not None:
            self.token_adapter[:n].copy_(v["adapter"])
        meta = AttentionMetadata(
            slot_mapping=v["slot_mapping"], block_tables=v["block_tables"], seq_lens=v["seq_lens"],
            query_start_loc=v["query_start_loc"], logits_indices=v["logits_indices"], max_query_len=max_query_len,
            seq_lens_host=host["seq_lens"] if host else [], query_start_host=host["query_start_loc"] if host else [],
        )
        return self.model(ids, v["pos"], meta)

    # ---------------------------------------------------------------- running a step
    def launch(self, plan: StepPlan, rows: Sequence[SamplingRow], virtual_offset: Callable[[object], int],
               slot_adapter: np.ndarray | None, *, sample: bool = True) -> InFlight | Unsampled:
        """Queue the step; ``sample=False`` queues its forward only (see ``sample``)."""
        self._turn ^= 1
        self.host = self._hosts[self._turn]
        self.host_np = self.host.numpy()
        return self._launch(plan, rows, virtual_offset, slot_adapter, sample)

    def _shape(self, plan: StepPlan) -> _Shape | None:
        """The captured shape this plan replays, or None (eager)."""
        if plan.decode_only:
            n = len(plan.chunks)
            bucket = next((b for b in self.buckets if b >= n), None)
            shape = None if bucket is None else _Shape(bucket, bucket, False)
        else:
            n = plan.num_tokens
            bucket = next((t for t in self.token_buckets if t >= n), None)
            shape = None if bucket is None else self._prompt_shape(bucket)
        return None if shape in self.failed else shape

    def _launch(self, plan: StepPlan, rows: Sequence[SamplingRow], virtual_offset: Callable[[object], int],
                slot_adapter: np.ndarray | None, sample: bool = True) -> InFlight | Unsampled:
        n_seqs = len(plan.chunks)
        shape = self._shape(plan)
        graph = None
        if shape is not None and self.capture:
            graph = self.graphs.get(shape)
            if graph is None and self.tp is None:  # a group captures together, at start (capture_all)
                graph = self._capture(shape)
            if graph is None:
                shape = None  # could not be captured: eager, exactly laid out
        if shape is not None:  # a graph, or the padded layout run eagerly (tests check it where none is captured)
            layout = _Layout(shape.tokens, shape.seqs, self.width)
            r = self._fill(plan, layout, virtual_offset, slot_adapter)
            self._pad(layout, plan.num_tokens, n_seqs, r)
            step = _Step(_GRAPH if graph is not None else _PADDED, layout, shape, shape.tokens if shape.prompt else 1, r)
        else:
            layout = _Layout(plan.num_tokens, n_seqs, self.width)
            r = self._fill(plan, layout, virtual_offset, slot_adapter)
            step = _Step(_EXACT, layout, None, max(c.num_tokens for c in plan.chunks), r)
        self.staging[: layout.size].copy_(self.host[: layout.size], non_blocking=True)
        if self.tp is not None:
            self.out_of_step = True
            self.tp.step(step.fields(), self._device_buffer[: self._lead + layout.size])
        logits, sample_slots = self._execute(step, self.host_np)
        self.out_of_step = False
        if r == 0:
            return InFlight(plan, torch.zeros(0, dtype=torch.int64), None, None)
        step = Unsampled(plan, rows, logits, sample_slots)
        return self.sample(step) if sample else step

    def sample(self, step: Unsampled, allowed: TokenMask | None = None) -> InFlight:
        """Choose the tokens of a launched forward (``allowed``: the masks of its guided rows), before the
        next launch."""
        result = self.sampler.sample(step.logits, step.rows, allowed)
        self.last_sampled.index_copy_(0, step.sample_slots, result.tokens)
        return self._to_host(step.plan, result.tokens, result.log_probs)

    def _execute(self, step: _Step, host_np: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward of a step already in the staging buffer: (logits of its sampling rows, their slots)."""
        layout, r = step.layout, step.rows
        if step.mode == _GRAPH:
            graph, logits = self.graphs[step.shape]
            graph.replay()
            return logits[:r], layout.views(self.staging)["sample_slots"][:r]
        v = layout.views(self.staging[: layout.size])
        host = None
        if step.mode == _PADDED:
            v["logits_indices"] = v["logits_indices"][: min(step.shape.tokens, step.shape.seqs)]
        else:
            v["logits_indices"] = v["logits_indices"][:r]
            host = self._host_lists(layout, host_np)
        return self._forward(v, step.max_query_len, host)[:r], v["sample_slots"][:r]

    def follow(self, fields: Sequence[int]) -> None:
        """A tensor-parallel worker's part of a step rank 0 launched: its header ``fields``, then the broadcast
        buffer (``last_sampled`` and the step's layout), then the same forward on this rank's shard."""
        step = _Step.read(fields, self.width)
        self.group.broadcast(self._device_buffer[: self._lead + step.layout.size])
        self._execute(step, None)

    def _to_host(self, plan: StepPlan, tokens: torch.Tensor, log_probs: torch.Tensor | None) -> InFlight:
        if self.device.type != "cuda":
            return InFlight(plan, tokens, log_probs, None)
        host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host_tokens.copy_(tokens, non_blocking=True)
        host_lp = None
        if log_probs is not None:
            host_lp = torch.empty(log_probs.shape, dtype=log_probs.dtype, pin_memory=True)
            host_lp.copy_(log_probs, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return InFlight(plan, host_tokens, host_lp, event)

    # ---------------------------------------------------------------- CUDA graphs
    def _prompt_shape(self, tokens: int) -> _Shape:
        """A step of ``tokens`` tokens holds at most that many sequences (each chunk has one token or more): its
        graph is laid out for no more, so a small prompt step does not pad to the largest batch."""
        return _Shape(tokens, min(tokens, self.max_num_seqs), True)

    def shapes(self) -> list[_Shape]:
        """Every shape a step can replay, largest first (smaller graphs reuse the largest one's memory)."""
        decode = [_Shape(b, b, False) for b in self.buckets]
        prompt = [self._prompt_shape(t) for t in self.token_buckets]
        return sorted(decode + prompt, key=lambda s: (s.tokens, s.seqs, s.prompt), reverse=True)

    def capture_all(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Capture every shape now, so that no request pays for a capture later."""
        todo = self.shapes()
        if self.tp is not None and todo:
            self.tp.capture()  # the workers capture the same shapes, in the same order
        for k, shape in enumerate(todo):
            if shape not in self.graphs and shape not in self.failed:
                self._capture(shape)
            if progress is not None:
                progress(k + 1, len(todo))

    def _capture(self, shape: _Shape) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """The graph of ``shape``; None (and eager from now on for that shape) when the step cannot be
        captured, e.g. a mixture-of-experts layer routing more tokens than its dense path takes."""
        try:
            graph = self._capture_graph(shape)
        except Exception as exc:  # noqa: BLE001 - any capture failure: keep serving, eagerly
            torch.cuda.synchronize(self.device)
            log.warning("CUDA graph capture of a step of %d tokens failed (%s); such steps run eagerly",
                        shape.tokens, exc)
            graph = None
        if self.group is not None and not self.group.agree(graph is not None):
            graph = None  # a step runs as a graph on every rank of a group, or on none
            self.graphs.pop(shape, None)
        if graph is None:
            self.failed.add(shape)
        return graph

    def _capture_graph(self, shape: _Shape) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        layout = _Layout(shape.tokens, shape.seqs, self.width)
        self.host_np[: layout.size] = 0
        self._pad(layout, 0, 0, 0)
        v = self._device_views(layout)
        v["logits_indices"] = v["logits_indices"][: min(shape.tokens, shape.seqs)]  # no more rows can sample
        max_query_len = shape.tokens if shape.prompt else 1  # picks the attention kernel's tiles
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(v, max_query_len, None)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits = self._forward(v, max_query_len, None)
        self.graphs[shape] = (graph, logits)
        log.info("captured a CUDA graph for steps of %d tokens (%s)", shape.tokens,
                 "prompt chunks" if shape.prompt else "decode")
        return self.graphs[shape]
