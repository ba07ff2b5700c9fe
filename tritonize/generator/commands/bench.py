"""`tritonize bench`: LLM load on a served ensemble at several concurrencies, as a table, JSON and a plot.

perf_analyzer is the tool of record when it is installed; otherwise tritonize's own async gRPC
streaming load generator measures the same statistics the same way. The genai-perf command for each
load is always printed, so numbers can be reproduced with the fleet's usual tool.
"""

from __future__ import annotations

import shlex
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from ..benchreport import format_table, write_json, write_plot
from ..loadgen import run_load, synthetic_prompts
from ..perfanalyzer import genai_perf_command, perf_analyzer_binary, perf_analyzer_run

_WORDS = ("the of and to in is was for on that with as by at from his her an which their be this "
          "time people year way day man thing woman life child world school state family").split()

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
"""


def _parse_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers, e.g. 1,16,64") from None
    if not levels or min(levels) < 1:
        raise click.BadParameter(f"{text!r}: give one or more concurrencies of at least 1, e.g. 1,16,64")
    return sorted(set(levels))


def word_prompts(input_len: int, count: int = 64, seed: int = 0) -> list[str]:
    """Prompts of ``input_len`` common words: roughly ``input_len`` tokens without knowing the tokenizer."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, size=input_len)) for _ in range(count)]


def check_served(url: str, model: str, timeout: float = 10.0) -> None:
    """Fails with one line when the server cannot be reached or does not serve ``model``."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    try:
        client = grpcclient.InferenceServerClient(url)
    except Exception as e:  # noqa: BLE001 - a malformed URL, reported as one line
        raise click.ClickException(f"cannot use {url!r} as a gRPC host:port: {e}") from None
    try:
        try:
            live = client.is_server_live(client_timeout=timeout)
        except InferenceServerException as e:
            raise click.ClickException(
                f"cannot reach a Triton gRPC endpoint at {url} ({(e.message() or str(e)).splitlines()[0]}); "
                "start it with `tritonize serve REPO` or pass -u HOST:GRPC_PORT"
            ) from None
        if not live:
            raise click.ClickException(f"the Triton server at {url} is not live yet; try again when it is")
        try:
            ready = client.is_model_ready(model, client_timeout=timeout)
        except InferenceServerException:
            ready = False
        if not ready:
            try:
                index = client.get_model_repository_index(client_timeout=timeout)
                names = sorted({m.name for m in index.models if m.state == "READY"})
            except InferenceServerException:
                names = []
            served = ", ".join(names) if names else "none"
            raise click.ClickException(f"model {model!r} is not ready at {url} (ready models: {served}); "
                                       "pass the ensemble's name with -m")
    finally:
        client.close()


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
def bench(model: str, url: str, input_len: int, output_len: int, concurrency_text: str, duration: float,
          output_dir: Path, tokenizer_dir: Path | None, warmup: bool, use_pa: bool) -> None:
    """Measure output tokens/s, requests/s, time to first token and inter-token latency of a served model."""
    levels = _parse_levels(concurrency_text)
    url = url.split("://", 1)[-1].rstrip("/")
    check_served(url, model)
    if tokenizer_dir is not None:
        try:
            prompts = synthetic_prompts(str(tokenizer_dir), input_len, count=64)
        except Exception as e:  # noqa: BLE001 - any tokenizer failure is the user's directory
            raise click.ClickException(f"cannot load a tokenizer from {tokenizer_dir}: {e}") from None
        prompt_tokens = "exact"
    else:
        prompts = word_prompts(input_len)
        prompt_tokens = "approximate"
        click.echo(f"note: no --tokenizer-dir, so prompts are {input_len} words each; their token count is "
                   "approximate", err=True)

    pa = perf_analyzer_binary() if use_pa else None
    tool = "perf_analyzer" if pa else "tritonize-loadgen"
    genai = {c: genai_perf_command(model, url, input_len=input_len, output_len=output_len, concurrency=c,
                                   tokenizer=str(tokenizer_dir) if tokenizer_dir else None,
                                   measurement_interval_ms=int(duration * 1000))
             for c in levels}
    click.echo("genai-perf, for the same load:")
    for cmd in genai.values():
        click.echo("  " + shlex.join(cmd))
    click.echo(f"measuring with {tool}: concurrency {','.join(map(str, levels))}, {duration:g} s each, "
               f"{input_len} prompt tokens ({prompt_tokens}), {output_len} output tokens", err=True)

    if warmup:
        run_load(url, model, prompts, output_len=min(output_len, 4), concurrency=max(levels),
                 duration=60.0, max_requests=max(levels))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tritonize-bench-") as work:
        for c in levels:
            if pa:
                row = perf_analyzer_run(pa, url, model, prompts, output_len, c, Path(work), int(duration * 1000))
            else:
                load = run_load(url, model, prompts, output_len=output_len, concurrency=c, duration=duration)
                row = load.summary()
                row["tool"] = tool
                first_error = next((r.error for r in load.records if r.error), None)
                if first_error:
                    row["first_error"] = first_error.splitlines()[0]
            rows.append(row)
            if row.get("error") or row.get("first_error"):
                click.echo(f"concurrency {c}: {row.get('error') or row['first_error']}", err=True)

    click.echo(format_table(rows))
    result = {
        "model": model, "url": url, "tool": tool, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "input_len": input_len, "output_len": output_len, "prompt_tokens": prompt_tokens,
        "duration_s": duration, "concurrency": levels, "runs": rows,
        "genai_perf_commands": {str(c): shlex.join(cmd) for c, cmd in genai.items()},
    }
    json_path, png_path = output_dir / "bench.json", output_dir / "bench.png"
    write_json(json_path, result)
    try:
        write_plot(png_path, rows, f"{model}: {input_len} in / {output_len} out tokens, {tool}")
    except ImportError:
        raise click.ClickException(f"wrote {json_path}, but the plot needs matplotlib: pip install 'tritonize[bench]'") \
            from None
    click.echo(f"wrote {json_path} and {png_path}")
    failed = sum(int(r.get("errors") or 0) for r in rows) + sum(1 for r in rows if r.get("error"))
    if failed:
        raise click.ClickException(f"{failed} request(s) or run(s) failed; see the errors column and {json_path}")
