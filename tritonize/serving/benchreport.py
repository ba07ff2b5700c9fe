"""A benchmark's results in the three forms people read them in: a table, a JSON file, a plot.

Files are written under a temporary name and renamed, so an interrupted run never leaves a truncated
JSON or PNG where a previous run's used to be.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

COLUMNS: list[tuple[str, str, str]] = [
    # (row key, header, format)
    ("concurrency", "conc", "{:d}"),
    ("requests", "requests", "{:d}"),
    ("errors", "errors", "{:d}"),
    ("output_tokens_per_s", "out tok/s", "{:.1f}"),
    ("requests_per_s", "req/s", "{:.2f}"),
    ("ttft_ms_p50", "TTFT p50", "{:.1f}"),
    ("ttft_ms_p90", "TTFT p90", "{:.1f}"),
    ("ttft_ms_p99", "TTFT p99", "{:.1f}"),
    ("itl_ms_p50", "ITL p50", "{:.2f}"),
    ("itl_ms_p90", "ITL p90", "{:.2f}"),
    ("itl_ms_p99", "ITL p99", "{:.2f}"),
]


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table, one line per concurrency; latencies in milliseconds."""
    header = [h for _, h, _ in COLUMNS]
    body = [[_cell(row.get(key), fmt) for key, _, fmt in COLUMNS] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in body]
    lines.append("(TTFT: time to first token, ITL: inter-token latency, both in ms)")
    return "\n".join(lines)


def _replace_atomically(path: Path, write) -> None:  # noqa: ANN001 - write(tmp_path) produces the file
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, result: dict[str, Any]) -> None:
    _replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(result, indent=2, default=float) + "\n"))


def plot_figure(rows: list[dict[str, Any]], title: str):  # noqa: ANN201 - a matplotlib Figure
    """Throughput (left) and TTFT / ITL percentiles (right) against concurrency.

    Throughput is output tokens/s on its own axis from 0. Requests/s is proportional to it when every
    request generates the same number of tokens (as the bench asks): it is then a second scale of the
    same line (right-hand axis, tokens/s divided by the tokens per request), and otherwise a label at
    each point. The latency panel draws TTFT and ITL p50 / p90 / p99 on a log scale.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in rows if "error" not in r), key=lambda r: r["concurrency"])
    conc = [r["concurrency"] for r in rows]

    def series(key: str) -> list[float]:
        return [float("nan") if r.get(key) is None else r[key] for r in rows]

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    tokens = series("output_tokens_per_s")
    left.plot(conc, tokens, "o-", color="tab:blue", label="output tokens/s")
    left.set_xlabel("concurrency")
    left.set_ylabel("output tokens/s", color="tab:blue")
    top = max((t for t in tokens if t == t), default=0.0)
    left.set_ylim(0, top * 1.12 if top > 0 else 1.0)
    per_request = [r["output_tokens_per_s"] / r["requests_per_s"] for r in rows
                   if r.get("output_tokens_per_s") and r.get("requests_per_s")]
    if per_request and max(per_request) - min(per_request) <= 0.01 * max(per_request):
        ratio = sum(per_request) / len(per_request)
        scale = left.secondary_yaxis("right", functions=(lambda t: t / ratio, lambda r: r * ratio))
        scale.set_ylabel(f"requests/s ({ratio:.0f} tokens each)", color="tab:gray")
    else:
        for c, t, r in zip(conc, tokens, series("requests_per_s")):
            if t == t and r == r:
                left.annotate(f"{r:.2f} req/s", (c, t), textcoords="offset points", xytext=(0, 7), ha="center",
                              fontsize="small", color="tab:gray")
    left.set_title("throughput")
    for metric, color in (("ttft", "tab:red"), ("itl", "tab:green")):
        for q, style in ((50, "o-"), (90, "^--"), (99, "v:")):
            right.plot(conc, series(f"{metric}_ms_p{q}"), style, color=color, label=f"{metric.upper()} p{q}")
    right.set_xlabel("concurrency")
    right.set_ylabel("ms")
    right.set_yscale("log")
    right.set_title("latency")
    right.legend(fontsize="small", ncol=2)
    for ax in (left, right):
        if len(conc) > 1 and max(conc) / max(min(conc), 1) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """``plot_figure`` as a PNG."""
    import matplotlib.pyplot as plt

    fig = plot_figure(rows, title)
    try:
        _replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
