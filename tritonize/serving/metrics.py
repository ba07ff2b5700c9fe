"""Triton's metrics endpoint read from outside: what the engine model counted over a stretch of time.

``tritonize bench`` takes a ``Snapshot`` before and after each load and prints ``server_view`` of the two
beside what its clients measured: the same questions (how fast, how long to the first token, between tokens)
answered by the server's own histograms (``runtime/metrics.py``), quantiles interpolated within buckets as
Prometheus' ``histogram_quantile`` does.
"""

from __future__ import annotations

import math
import re
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

__all__ = ["Snapshot", "default_metrics_url", "histogram_quantile", "parse_metrics", "scrape", "server_view"]

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
HISTOGRAMS = {"ttft": "tritonize_time_to_first_token_seconds", "itl": "tritonize_inter_token_latency_seconds",
              "latency": "tritonize_request_latency_seconds", "queue": "tritonize_queue_time_seconds"}


@dataclass
class Snapshot:
    """The samples of one scrape: name -> [(labels, value)]."""

    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    def total(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels``."""
        return sum(v for got, v in self.samples.get(name, []) if labels.items() <= got.items())

    def by(self, name: str, label: str, **labels: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for got, v in self.samples.get(name, []):
            if labels.items() <= got.items() and label in got:
                out[got[label]] += v
        return dict(out)

    def has(self, name: str, **labels: str) -> bool:
        return any(labels.items() <= got.items() for got, _ in self.samples.get(name, []))


def parse_metrics(text: str) -> Snapshot:
    """Prometheus' text exposition format (what Triton's /metrics serves)."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        labels = {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _LABEL.findall(match.group(2) or "")}
        samples[match.group(1)].append((labels, value))
    return Snapshot(dict(samples))


def scrape(url: str, timeout: float = 5.0) -> Snapshot:
    """One read of ``url``; OSError (URLError is one) when it cannot be read."""
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - a URL the user gave
        return parse_metrics(response.read().decode("utf-8", "replace"))


def default_metrics_url(grpc_url: str, port: int = 8002) -> str:
    """Triton's metrics endpoint on the host of a gRPC ``host:port``."""
    host = grpc_url.split("://", 1)[-1].rsplit(":", 1)[0] or "127.0.0.1"
    return f"http://{host}:{port}/metrics"


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The ``q`` quantile of cumulative ``buckets`` (upper bound -> count), as Prometheus interpolates it."""
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in ordered:
        if count >= rank:
            if math.isinf(upper):  # in the open bucket: the highest finite bound, as Prometheus answers
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return ordered[-1][0]


def _delta_buckets(before: Snapshot, after: Snapshot, name: str, labels: dict[str, str]) -> dict[float, float]:
    def read(snap: Snapshot) -> dict[float, float]:
        return {float(le): v for le, v in snap.by(f"{name}_bucket", "le", **labels).items()}

    old, new = read(before), read(after)
    return {le: v - old.get(le, 0.0) for le, v in new.items()}


def server_view(before: Snapshot, after: Snapshot, model: str, seconds: float) -> dict | None:
    """What the engine model ``model`` (its Triton name, e.g. ``tiny_engine``) counted between two snapshots;
    None when the endpoint has no tritonize series for it (another server, or an older repository)."""
    labels = {"model": model}
    if not after.has("tritonize_generation_tokens_total", **labels):
        return None

    def delta(name: str) -> float:
        return after.total(name, **labels) - before.total(name, **labels)

    finished_after = after.by("tritonize_requests_finished_total", "reason", **labels)
    finished_before = before.by("tritonize_requests_finished_total", "reason", **labels)
    finished = {r: int(v - finished_before.get(r, 0)) for r, v in finished_after.items() if v - finished_before.get(r, 0)}
    generated = delta("tritonize_generation_tokens_total")
    prompt = delta("tritonize_prompt_tokens_total")
    view: dict = {
        "requests": sum(finished.values()), "finished": finished, "prompt_tokens": int(prompt),
        "generation_tokens": int(generated),
        "output_tokens_per_s": generated / seconds if seconds > 0 else None,
        "prefix_hit_ratio": delta("tritonize_prefix_cache_hit_tokens_total") / prompt if prompt else None,
        "preemptions": int(delta("tritonize_preemptions_total")),
    }
    sizes_after = after.by("tritonize_decode_steps_total", "batch_size", **labels)
    sizes_before = before.by("tritonize_decode_steps_total", "batch_size", **labels)
    steps = {int(b): v - sizes_before.get(b, 0.0) for b, v in sizes_after.items() if b.isdigit()}
    decode_steps = sum(steps.values())
    view["decode_steps_per_s"] = decode_steps / seconds if seconds > 0 else None
    view["decode_batch_mean"] = sum(b * v for b, v in steps.items()) / decode_steps if decode_steps else None
    view["prompt_steps_per_s"] = delta("tritonize_prompt_steps_total") / seconds if seconds > 0 else None
    for key, name in HISTOGRAMS.items():
        buckets = _delta_buckets(before, after, name, labels)
        count = delta(f"{name}_count")
        view[f"{key}_ms_mean"] = 1000 * delta(f"{name}_sum") / count if count else None
        for q in (50, 90, 99):
            value = histogram_quantile(q / 100, buckets) if count else None
            view[f"{key}_ms_p{q}"] = None if value is None else 1000 * value
    return view
