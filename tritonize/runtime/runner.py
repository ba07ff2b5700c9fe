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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .attention import AttentionMetadata
from .sampling import Sampler, SamplingRow
from .scheduler import StepPlan

log = logging.getLogger(__name__)

__all__ = ["InFlight", "ModelRunner", "batch_buckets"]

_REGIONS = ("ids", "pos", "slot_mapping", "pending", "adapter")  # one int64 per token
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


class ModelRunner:
    def __init__(self, model: torch.nn.Module, sampler: Sampler, *, device: torch.device, max_num_seqs: int,
                 max_num_tokens: int, max_seq_len: int, block_size: int, cuda_graphs: bool,
                 token_adapter: torch.Tensor | None = None, vocab_size: int) -> None:
        self.model = model
        self.sampler = sampler
        self.device = device
        self.max_num_seqs = max_num_seqs
        self.max_num_tokens = max_num_tokens
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.width = -(-max_seq_len // block_size)
        self.token_adapter = token_adapter
        # One row per batch slot, plus a row the padding rows of a graph write into.
        self.last_sampled = torch.zeros(max_num_seqs + 1, dtype=torch.int64, device=device)
        self.dummy_slot = max_num_seqs
        cap = _Layout(max(max_num_tokens, max_num_seqs), max_num_seqs, self.width).size
        pin = device.type == "cuda"
        # Two host buffers, used in turn: step N+1 is written while step N's copy may still be queued (the
        # engine reads step N-1's tokens, and so knows its copy is done, before it plans step N+1).
        self._hosts = [torch.zeros(cap, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._turn = 0
        self.host = self._hosts[0]
        self.host_np = self.host.numpy()
        self.staging = torch.zeros(cap, dtype=torch.int64, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.buckets = batch_buckets(max_num_seqs) if cuda_graphs else []
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
        """Padding sequences of one token each at position 0 of block 0, sampling into the dummy slot."""
        v = layout.views(self.host_np[: layout.size])
        for name in _REGIONS:
            v[name][used_tokens:] = 0
        v["pending"][used_tokens:] = -1
        pad = np.arange(used_seqs, layout.n_seqs)
        v["seq_lens"][used_seqs:] = 1
        v["query_start_loc"][used_seqs + 1 :] = used_tokens + np.arange(1, layout.n_seqs - used_seqs + 1)
        v["logits_indices"][rows:] = used_tokens + (pad - used_seqs)
        v["sample_slots"][rows:] = self.dummy_slot

    def _device_views(self, layout: _Layout) -> dict:
        self.staging[: layout.size].copy_(self.host[: layout.size], non_blocking=True)
        return layout.views(self.staging[: layout.size])

    def _forward(self, v: dict, max_query_len: int, host: dict | None) -> torch.Tensor:
        """The model on a laid-out step; ``host`` carries the numbers the Python attention path reads."""
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
               slot_adapter: np.ndarray | None) -> InFlight:
        self._turn ^= 1
        self.host = self._hosts[self._turn]
        self.host_np = self.host.numpy()
        return self._launch(plan, rows, virtual_offset, slot_adapter)

    def _launch(self, plan: StepPlan, rows: Sequence[SamplingRow], virtual_offset: Callable[[object], int],
                slot_adapter: np.ndarray | None) -> InFlight:
        n_seqs = len(plan.chunks)
        bucket = None
        if plan.decode_only and self.buckets and n_seqs <= self.buckets[-1]:
            bucket = next(b for b in self.buckets if b >= n_seqs)
        if bucket is not None:
            layout = _Layout(bucket, bucket, self.width)
            r = self._fill(plan, layout, virtual_offset, slot_adapter)
            self._pad(layout, n_seqs, n_seqs, r)
            graph = self.graphs.get(bucket) or self._capture(bucket)
            if graph is None:
                return self._launch(plan, rows, virtual_offset, slot_adapter)  # now eager for this size
            self.staging[: layout.size].copy_(self.host[: layout.size], non_blocking=True)
            graph[0].replay()
            logits = graph[1][:r]
            sample_slots = layout.views(self.staging)["sample_slots"][:r]
        else:
            layout = _Layout(plan.num_tokens, n_seqs, self.width)
            r = self._fill(plan, layout, virtual_offset, slot_adapter)
            host = None
            if self.device.type != "cuda" or not getattr(self.model, "device_attention", False):
                hv = layout.views(self.host_np[: layout.size])
                host = {"seq_lens": hv["seq_lens"].tolist(), "query_start_loc": hv["query_start_loc"].tolist()}
            v = self._device_views(layout)
            v["logits_indices"] = v["logits_indices"][:r]
            max_q = max(c.num_tokens for c in plan.chunks)
            logits = self._forward(v, max_q, host)[:r]
            sample_slots = v["sample_slots"][:r]
        if r == 0:
            return InFlight(plan, torch.zeros(0, dtype=torch.int64), None, None)
        result = self.sampler.sample(logits, rows)
        self.last_sampled.index_copy_(0, sample_slots, result.tokens)
        return self._to_host(plan, result.tokens, result.log_probs)

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
    def capture_all(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Capture every bucket, largest first (the smaller graphs reuse the largest one's memory)."""
        todo = sorted(self.buckets, reverse=True)
        for k, bucket in enumerate(todo):
            if bucket not in self.graphs:
                self._capture(bucket)
            if progress is not None:
                progress(k + 1, len(todo))

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """The graph of a decode step of ``bucket`` rows; None (and eager from now on for that size) when the
        step cannot be captured, e.g. a mixture-of-experts layer routing more tokens than its dense path takes."""
        try:
            return self._capture_graph(bucket)
        except Exception as exc:  # noqa: BLE001 - any capture failure: keep serving, eagerly
            torch.cuda.synchronize(self.device)
            log.warning("CUDA graph capture of decode batch %d failed (%s); that size runs eagerly", bucket, exc)
            self.buckets = [b for b in self.buckets if b < bucket]
            return None

    def _capture_graph(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        layout = _Layout(bucket, bucket, self.width)
        hv = layout.views(self.host_np[: layout.size])
        self.host_np[: layout.size] = 0
        hv["pending"][:] = -1
        hv["seq_lens"][:] = 1
        hv["query_start_loc"][:] = np.arange(bucket + 1)
        hv["logits_indices"][:] = np.arange(bucket)
        hv["sample_slots"][:] = self.dummy_slot
        v = self._device_views(layout)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(v, 1, None)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits = self._forward(v, 1, None)
        self.graphs[bucket] = (graph, logits)
        log.info("captured a CUDA graph for decode batch %d", bucket)
        return self.graphs[bucket]
