"""`tritonize bench`: LLM load on a served ensemble at several concurrencies (see serving/bench.py)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import TritonizeError
from ..serving.bench import run_bench

_EPILOG = """\b
Examples:
  tritonize bench -m tiny --input-len 128 --output-len 128 --concurrency 1,16,64
  tritonize bench -m tiny -u 10.0.0.5:8001 --concurrency 1,8 --duration 60 \\
      --tokenizer-dir ./repo/tiny_preprocessing/1/tokenizer --output-dir ./bench-tiny

\b
The load goes to the decoupled ensemble over gRPC streaming (one request in flight per virtual user,
as perf_analyzer's concurrency mode). Every request asks for exactly --output-len tokens
(min_tokens = max_tokens). Without --tokenizer-dir the prompts are --input-len common words, which
most tokenizers turn into roughly as many tokens; the JSON says whether the count is exact.

\b
Triton's metrics endpoint is read before and after each run: a second table gives the engine model's
own figures for the same load (tritonize_* histograms and counters: output tokens/s, TTFT, ITL, queue
time, prefix-cache hits, preemptions) beside the client's.
"""


def _parse_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers, e.g. 1,16,64") from None
    if not levels or min(levels) < 1:
        raise click.BadParameter(f"{text!r}: give one or more concurrencies of at least 1, e.g. 1,16,64")
    return sorted(set(levels))


@click.command("bench", epilog=_EPILOG)
@click.option("-m", "--model-name", "model", required=True, help="The ensemble's name (generate's --model-name).")
@click.option("-u", "--url", default="127.0.0.1:8001", show_default=True, help="Triton gRPC host:port.")
@click.option("--input-len", type=click.IntRange(1), default=128, show_default=True, help="Prompt tokens.")
@click.option("--output-len", type=click.IntRange(1), default=128, show_default=True,
              help="Tokens generated per request (exactly: min_tokens = max_tokens).")
@click.option("--concurrency", "concurrency_text", default="1,16,64", show_default=True,
              help="Comma-separated numbers of concurrent streaming clients.")
@click.option("--duration", type=click.FloatRange(0.1), default=20.0, show_default=True,
              help="Seconds of load per concurrency (perf_analyzer: its measurement interval).")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("tritonize-bench"),
              show_default=True, help="Where bench.json and bench.png are written.")
@click.option("--tokenizer-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The repository's tokenizer (REPO/<name>_preprocessing/1/tokenizer) for exact prompt lengths.")
@click.option("--warmup/--no-warmup", default=True, show_default=True,
              help="Send one short request per client of the highest concurrency before measuring.")
@click.option("--perf-analyzer/--no-perf-analyzer", "use_pa", default=True, show_default=True,
              help="Use perf_analyzer ($PERF_ANALYZER or PATH) when it is installed.")
@click.option("--metrics-url", default="", metavar="URL",
              help="Triton's metrics endpoint, read before and after each run for the server's own view "
                   "(default: http://HOST:8002/metrics on the -u host; 'none' to skip).")
def bench(model: str, url: str, input_len: int, output_len: int, concurrency_text: str, duration: float,
          output_dir: Path, tokenizer_dir: Path | None, warmup: bool, use_pa: bool, metrics_url: str = "") -> None:
    """Measure output tokens/s, requests/s, time to first token and inter-token latency of a served model."""
    levels = _parse_levels(concurrency_text)
    try:
        run_bench(model, url, levels, input_len=input_len, output_len=output_len, duration=duration,
                  output_dir=output_dir, tokenizer_dir=tokenizer_dir, warmup=warmup, use_pa=use_pa,
                  metrics_url=None if metrics_url.lower() == "none" else metrics_url, say=click.echo,
                  note=lambda line: click.echo(line, err=True))
    except TritonizeError as e:
        raise click.ClickException(str(e)) from None
