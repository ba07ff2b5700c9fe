"""The bench plot: tokens/s on its own axis from 0, requests/s a second readout of it, latency unchanged."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from tritonize.serving.benchreport import plot_figure, write_plot  # noqa: E402


def _row(conc: int, tok_s: float, tokens_each: float) -> dict:
    latency = {f"{m}_ms_p{q}": base * q / 50 for m, base in (("ttft", 40.0 * conc), ("itl", 8.0)) for q in (50, 90, 99)}
    return {"concurrency": conc, "output_tokens_per_s": tok_s, "requests_per_s": tok_s / tokens_each, **latency}


def test_tokens_per_second_from_zero_and_requests_per_second_as_its_second_scale(tmp_path):
    import matplotlib.pyplot as plt

    rows = [_row(1, 120.0, 128), _row(16, 1000.0, 128), _row(64, 1650.0, 128)]
    fig = plot_figure(rows, "t")
    try:
        throughput, latency = fig.axes[:2]
        assert throughput.get_ylim()[0] == 0 and throughput.get_ylim()[1] >= 1650
        assert [line.get_label() for line in throughput.get_lines()] == ["output tokens/s"]
        [scale] = [child for child in throughput.get_children() if type(child).__name__ == "SecondaryAxis"]
        assert "requests/s" in scale.get_ylabel() and "128 tokens each" in scale.get_ylabel()
        # the second scale reads the same line: 1650 tokens/s is 1650 / 128 requests/s
        assert scale._functions[0](1650.0) == pytest.approx(1650.0 / 128)
        assert latency.get_yscale() == "log" and len(latency.get_lines()) == 6
        assert sorted(line.get_label() for line in latency.get_lines())[:3] == ["ITL p50", "ITL p90", "ITL p99"]
    finally:
        plt.close(fig)
    write_plot(tmp_path / "bench.png", rows, "t")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unequal_request_sizes_label_each_point_with_its_requests_per_second():
    import matplotlib.pyplot as plt

    fig = plot_figure([_row(1, 100.0, 100), _row(4, 300.0, 50)], "t")
    try:
        throughput = fig.axes[0]
        labels = [text.get_text() for text in throughput.texts]
        assert labels == ["1.00 req/s", "6.00 req/s"]
        assert not [c for c in throughput.get_children() if type(c).__name__ == "SecondaryAxis"]
    finally:
        plt.close(fig)
