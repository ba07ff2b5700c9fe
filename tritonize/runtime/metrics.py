"""The engine model's Prometheus metrics, served on Triton's metrics port beside Triton's own.

Every series is labelled ``model`` (the engine model's name, as Triton labels its own ``nv_*`` series) and
``version``:

| metric | kind | what |
|---|---|---|
| ``tritonize_time_to_first_token_seconds`` | histogram | engine arrival -> first token, per request |
| ``tritonize_inter_token_latency_seconds`` | histogram | (last token - first token) / (tokens - 1), per request of 2+ tokens |
| ``tritonize_request_latency_seconds`` | histogram | engine arrival -> last token, per request that generated |
| ``tritonize_queue_time_seconds`` | histogram | engine arrival -> first scheduled, per request that was |
| ``tritonize_prompt_tokens_total`` | counter | prompt tokens of the requests the engine scheduled, counted when they finish |
| ``tritonize_generation_tokens_total`` | counter | tokens generated (end ids excluded), counted as they are sent |
| ``tritonize_prefix_cache_hit_tokens_total`` | counter | prompt tokens whose keys and values came from the prefix cache |
| ``tritonize_preemptions_total`` | counter | times a request was preempted (its blocks freed, computed again later) |
| ``tritonize_requests_finished_total{reason}`` | counter | finished requests by reason: length, end, stop, cancelled, error |
| ``tritonize_requests_running`` / ``_waiting`` | gauge | requests in the running batch / queued |
| ``tritonize_kv_cache_usage_ratio`` | gauge | share of the KV pool's blocks held by requests (cached prefixes nobody holds are free) |
| ``tritonize_decode_steps_total{batch_size}`` | counter | decode steps by the number of requests in them |
| ``tritonize_prompt_steps_total`` | counter | steps that held prompt chunks (alone or among decodes) |

Triton 2.51's Python backend offers histograms (``MetricFamily.HISTOGRAM``, buckets given per metric), so
the latencies are real Prometheus histograms: ``histogram_quantile`` works on their ``_bucket`` series.

Thread rule: every call into the stub (``increment``, ``set``, ``observe``) happens on the engine model's
sender thread: ``record`` for each response it sends, ``flush`` after each batch of them, ``refresh``
periodically. Counters are summed between flushes, so a busy server makes one call per counter and batch of
responses, plus one ``observe`` per histogram and finished request.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

__all__ = ["BUCKETS", "EngineMetrics"]

BUCKETS = {
    "tritonize_time_to_first_token_seconds": (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0,
                                              2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0),
    "tritonize_inter_token_latency_seconds": (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04,
                                              0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5),
    "tritonize_request_latency_seconds": (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0,
                                          300.0, 600.0),
    "tritonize_queue_time_seconds": (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                                     60.0),
}
_DESCRIPTIONS = {
    "tritonize_time_to_first_token_seconds": "Seconds from a request's arrival at the engine to its first token",
    "tritonize_inter_token_latency_seconds": "Seconds between tokens of a request: (last - first token) / "
                                             "(tokens - 1), one observation per request of two or more tokens",
    "tritonize_request_latency_seconds": "Seconds from a request's arrival at the engine to its last token",
    "tritonize_queue_time_seconds": "Seconds from a request's arrival at the engine to its first step",
}
_COUNTERS = {
    "prompt": ("tritonize_prompt_tokens_total", "Prompt tokens of the requests the engine scheduled"),
    "generation": ("tritonize_generation_tokens_total", "Tokens generated (end ids excluded)"),
    "prefix_hits": ("tritonize_prefix_cache_hit_tokens_total",
                    "Prompt tokens whose keys and values were reused from the prefix cache"),
    "preemptions": ("tritonize_preemptions_total", "Requests preempted: blocks freed, computed again later"),
}
_GAUGES = {
    "running": ("tritonize_requests_running", "Requests in the engine's running batch"),
    "waiting": ("tritonize_requests_waiting", "Requests queued for the engine"),
    "kv_usage": ("tritonize_kv_cache_usage_ratio", "Share of the KV cache blocks held by requests"),
}


class EngineMetrics:
    """The metrics of one engine model instance; ``pb_utils`` is Triton's ``triton_python_backend_utils``."""

    def __init__(self, pb_utils: Any, args: dict[str, str], engine: Any) -> None:
        family_cls = pb_utils.MetricFamily
        self.labels = {"model": args.get("model_name") or "engine", "version": str(args.get("model_version", "1"))}
        self.engine = engine
        self._families: list[Any] = []  # a family that is garbage-collected leaves the endpoint

        def family(name: str, description: str, kind: Any) -> Any:
            made = family_cls(name=name, description=description, kind=kind)
            self._families.append(made)
            return made

        self.histograms = {
            name: family(name, _DESCRIPTIONS[name], family_cls.HISTOGRAM).Metric(labels=self.labels,
                                                                                 buckets=list(buckets))
            for name, buckets in BUCKETS.items()
        }
        self.counters = {key: family(name, text, family_cls.COUNTER).Metric(labels=self.labels)
                         for key, (name, text) in _COUNTERS.items()}
        self.gauges = {key: family(name, text, family_cls.GAUGE).Metric(labels=self.labels)
                       for key, (name, text) in _GAUGES.items()}
        self._finished_family = family("tritonize_requests_finished_total",
                                       "Requests the engine finished, by reason (length, end, stop, cancelled, error)",
                                       family_cls.COUNTER)
        self._finished: dict[str, Any] = {}
        self._batch_family = family("tritonize_decode_steps_total",
                                    "Decode steps of the engine, by the number of requests in the batch",
                                    family_cls.COUNTER)
        self._batch: dict[int, Any] = {}
        self._prompt_steps = family("tritonize_prompt_steps_total",
                                    "Steps of the engine that held prompt chunks (alone or among decodes)",
                                    family_cls.COUNTER).Metric(labels=self.labels)
        self._prompt_steps_published = (getattr(engine, "stats", None) or {}).get("mixed_steps", 0)
        # from here on: the warm-up's steps are not the traffic's
        self._batch_published: dict[int, int] = dict((getattr(engine, "stats", None) or {}).get(
            "decode_batch_histogram", {}))
        self._pending: Counter[str] = Counter()
        self._pending_finished: Counter[str] = Counter()
        self._gauge_values: dict[str, float] = {}

    # -- per response (sender thread) ------------------------------------------------------------
    def record(self, out: Any) -> None:
        """One output of the engine as the engine model sends it (``StepOutput``, possibly merged)."""
        if out.error is None:
            self._pending["generation"] += len(out.token_ids)
        if not out.finished:
            return
        reason = out.finish_reason or ("error" if out.error else "unknown")
        self._pending_finished[reason] += 1
        metrics = out.metrics
        if metrics is None:  # an engine without per-request metrics: the prompt counts unless it was refused
            if reason != "error":
                self._pending["prompt"] += out.num_input_tokens
            return
        if metrics.first_scheduled_time_ns:
            self._pending["prompt"] += out.num_input_tokens
        self._pending["prefix_hits"] += metrics.prefix_hit_tokens
        self._pending["preemptions"] += metrics.preemptions
        arrival, first, last = metrics.arrival_time_ns, metrics.first_token_time_ns, metrics.last_token_time_ns
        if arrival and metrics.first_scheduled_time_ns:
            self._observe("tritonize_queue_time_seconds", metrics.first_scheduled_time_ns - arrival)
        if arrival and first:
            self._observe("tritonize_time_to_first_token_seconds", first - arrival)
            if last:
                self._observe("tritonize_request_latency_seconds", last - arrival)
        generated = out.num_output_tokens + (1 if reason == "end" else 0)  # the end id was generated too
        if first and last and generated >= 2:
            self._observe("tritonize_inter_token_latency_seconds", (last - first) / (generated - 1))

    def _observe(self, name: str, nanoseconds: float) -> None:
        self.histograms[name].observe(max(0.0, nanoseconds / 1e9))

    def flush(self) -> None:
        """The counters summed since the last flush, one call each."""
        for key, value in self._pending.items():
            if value:
                self.counters[key].increment(value)
        self._pending.clear()
        for reason, value in self._pending_finished.items():
            metric = self._finished.get(reason)
            if metric is None:
                metric = self._finished[reason] = self._finished_family.Metric(labels={**self.labels, "reason": reason})
            metric.increment(value)
        self._pending_finished.clear()

    # -- periodically (sender thread) -------------------------------------------------------------
    def refresh(self) -> None:
        """The gauges and the step counters from the engine's own state; unchanged values cost nothing."""
        engine = self.engine
        pool = getattr(engine, "pool", None)
        values = {
            "running": getattr(engine, "num_running", None),
            "waiting": getattr(engine, "num_waiting", None),
            "kv_usage": pool.usage() if pool is not None and hasattr(pool, "usage") else None,
        }
        for key, value in values.items():
            if value is not None and self._gauge_values.get(key) != value:
                self.gauges[key].set(float(value))
                self._gauge_values[key] = value
        stats = getattr(engine, "stats", None) or {}
        for size, count in list(stats.get("decode_batch_histogram", {}).items()):
            new = count - self._batch_published.get(size, 0)
            if new > 0:
                metric = self._batch.get(size)
                if metric is None:
                    metric = self._batch[size] = self._batch_family.Metric(
                        labels={**self.labels, "batch_size": str(size)})
                metric.increment(new)
                self._batch_published[size] = count
        prompt_steps = stats.get("mixed_steps", 0)
        if prompt_steps > self._prompt_steps_published:
            self._prompt_steps.increment(prompt_steps - self._prompt_steps_published)
            self._prompt_steps_published = prompt_steps
