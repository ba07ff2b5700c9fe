"""One engine response as one int32 tensor, from the engine model to the postprocessing model.

Each tensor a Python-backend model creates costs it time holding the GIL, and the engine model sends a
response per stream per step from one process: at 64 streams that is thousands of responses a second,
all competing with the engine's own thread. So the engine packs everything a response carries (new
token ids, the few tokens before them that detokenization needs, log-probs, counts, and on the last
response the request's metrics) into one tensor, and the postprocessing models, which Triton runs as
many instances of as the repository asks, unpack it and build the ensemble's outputs.

Layout: a header of ``HEADER`` int32s (version, flags, the three lengths, the token counts, the handle, the
finish reason, the cumulative log-prob as float32 bits, the batch index, the sequence index), then the delta
ids, the prefix ids, the log-probs (float32 bits), then, when ``FLAG_METRICS`` is set, ``len(METRICS)``
int64 values as pairs of int32s. ``FLAG_BATCHED`` / ``FLAG_SEQUENCES`` / ``FLAG_PERF`` say which of
tensorrtllm_backend's optional outputs the response carries: ``batch_index`` (the request held several
prompts), ``sequence_index`` (it asked for several sequences), the perf-metric outputs (it set
``return_perf_metrics``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

__all__ = ["FINISH_REASONS", "METRICS", "Packed", "pack", "unpack"]

VERSION = 2
HEADER = 12
FLAG_FINAL, FLAG_METRICS, FLAG_BATCHED, FLAG_SEQUENCES, FLAG_PERF = 1, 2, 4, 8, 16
FINISH_REASONS = (None, "end", "stop", "length", "cancelled", "error")
METRICS = (  # the fields of request.RequestMetrics
    "arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns",
    "prefix_hit_tokens", "kv_cache_alloc_new_blocks", "kv_cache_reused_blocks", "kv_cache_alloc_total_blocks",
    "preemptions",
)
_F32, _F32_AS_I32 = struct.Struct("<f"), struct.Struct("<i")
_METRICS_I64, _METRICS_AS_I32 = struct.Struct(f"<{len(METRICS)}q"), struct.Struct(f"<{2 * len(METRICS)}i")


@dataclass
class Packed:
    delta: list[int]
    prefix: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    final: bool = False
    finish_reason: str | None = None
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    cum_log_prob: float = 0.0
    handle: int = 0  # the engine's number for this stream: a stop request names it
    metrics: dict[str, int] | None = None
    batch_index: int = 0  # which prompt of the request
    sequence_index: int = 0  # which of its num_return_sequences
    batched: bool = False  # the request held several prompts: the response carries batch_index
    sequences: bool = False  # the request asked for several sequences: the response carries sequence_index
    perf: bool = False  # the request set return_perf_metrics: the response carries the perf outputs


def pack(p: Packed) -> np.ndarray:
    """-> int32 ``[1, n]``, made from one Python list (a response costs the engine model's sending thread
    about a microsecond here instead of several small numpy writes)."""
    nd, npre, nlp = len(p.delta), len(p.prefix), len(p.log_probs)
    flags = ((FLAG_FINAL if p.final else 0) | (FLAG_METRICS if p.metrics is not None else 0)
             | (FLAG_BATCHED if p.batched else 0) | (FLAG_SEQUENCES if p.sequences else 0)
             | (FLAG_PERF if p.perf else 0))
    values = [VERSION, flags, nd, npre, nlp, p.num_input_tokens, p.num_output_tokens, p.handle,
              FINISH_REASONS.index(p.finish_reason), _F32_AS_I32.unpack(_F32.pack(p.cum_log_prob))[0],
              p.batch_index, p.sequence_index]
    values += p.delta
    values += p.prefix
    if nlp:
        values += struct.unpack(f"<{nlp}i", struct.pack(f"<{nlp}f", *p.log_probs))
    if p.metrics is not None:
        values += _METRICS_AS_I32.unpack(_METRICS_I64.pack(*(int(p.metrics.get(k, 0)) for k in METRICS)))
    return np.array([values], dtype=np.int32)


def unpack(array: np.ndarray) -> Packed:
    a = np.asarray(array, dtype=np.int32).reshape(-1)
    if a.size < HEADER or a[0] != VERSION:
        raise ValueError("not a packed engine response of this version: regenerate the repository")
    flags, nd, npre, nlp = int(a[1]), int(a[2]), int(a[3]), int(a[4])
    at = HEADER
    delta = a[at : at + nd].tolist()
    at += nd
    prefix = a[at : at + npre].tolist()
    at += npre
    log_probs = a[at : at + nlp].view(np.float32).tolist()
    at += nlp
    metrics = None
    if flags & FLAG_METRICS:
        metrics = dict(zip(METRICS, a[at : at + 2 * len(METRICS)].view(np.int64).tolist(), strict=True))
    return Packed(
        delta=delta, prefix=prefix, log_probs=log_probs, final=bool(flags & FLAG_FINAL),
        finish_reason=FINISH_REASONS[int(a[8])], num_input_tokens=int(a[5]), num_output_tokens=int(a[6]),
        cum_log_prob=float(a[9:10].view(np.float32)[0]), handle=int(a[7]), metrics=metrics,
        batch_index=int(a[10]), sequence_index=int(a[11]), batched=bool(flags & FLAG_BATCHED),
        sequences=bool(flags & FLAG_SEQUENCES), perf=bool(flags & FLAG_PERF),
    )
