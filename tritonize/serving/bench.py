"""`tritonize bench`: LLM load on a served ensemble at several concurrencies, as a table, JSON and a plot.

perf_analyzer is the tool of record when it is installed; otherwise tritonize's own async gRPC
streaming load generator measures the same statistics the same way. The genai-perf command for each
load is always printed, so numbers can be reproduced with the fleet's usual tool.
"""

from __future__ import annotations

import shlex
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import QueryError, TritonizeError
from .benchreport import format_table, write_json, write_plot
from .loadgen import run_load, synthetic_prompts
from .perfanalyzer import genai_perf_command, perf_analyzer_binary, perf_analyzer_run

_WORDS = ("the of and to in is was for on that with as by at from his her an which their be this "
          "time people year way day man thing woman life child world school state family").split()

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
        raise QueryError(f"cannot use {url!r} as a gRPC host:port: {e}") from None
    try:
        try:
            live = client.is_server_live(client_timeout=timeout)
        except InferenceServerException as e:
            raise QueryError(
                f"cannot reach a Triton gRPC endpoint at {url} ({(e.message() or str(e)).splitlines()[0]}); "
                "start it with `tritonize serve REPO` or pass -u HOST:GRPC_PORT"
            ) from None
        if not live:
            raise QueryError(f"the Triton server at {url} is not live yet; try again when it is")
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
            raise QueryError(f"model {model!r} is not ready at {url} (ready models: {served}); "
                                       "pass the ensemble's name with -m")
    finally:
        client.close()


def run_bench(model: str, url: str, levels: list[int], *, input_len: int, output_len: int, duration: float,
              output_dir: Path, tokenizer_dir: Path | None = None, warmup: bool = True, use_pa: bool = True,
              say: Callable[[str], None] = print, note: Callable[[str], None] = print) -> dict:
    """Measures ``model`` at each concurrency of ``levels``; writes bench.json and bench.png to ``output_dir``
    and returns what bench.json holds. TritonizeError when the model is not served, or requests failed."""
    url = url.split("://", 1)[-1].rstrip("/")
    check_served(url, model)
    if tokenizer_dir is not None:
        try:
            prompts = synthetic_prompts(str(tokenizer_dir), input_len, count=64)
        except Exception as e:  # noqa: BLE001 - any tokenizer failure is the user's directory
            raise TritonizeError(f"cannot load a tokenizer from {tokenizer_dir}: {e}") from None
        prompt_tokens = "exact"
    else:
        prompts = word_prompts(input_len)
        prompt_tokens = "approximate"
        note(f"note: no --tokenizer-dir, so prompts are {input_len} words each; their token count is approximate")

    pa = perf_analyzer_binary() if use_pa else None
    tool = "perf_analyzer" if pa else "tritonize-loadgen"
    genai = {c: genai_perf_command(model, url, input_len=input_len, output_len=output_len, concurrency=c,
                                   tokenizer=str(tokenizer_dir) if tokenizer_dir else None,
                                   measurement_interval_ms=int(duration * 1000))
             for c in levels}
    say("genai-perf, for the same load:")
    for cmd in genai.values():
        say("  " + shlex.join(cmd))
    note(f"measuring with {tool}: concurrency {','.join(map(str, levels))}, {duration:g} s each, "
         f"{input_len} prompt tokens ({prompt_tokens}), {output_len} output tokens")

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
                note(f"concurrency {c}: {row.get('error') or row['first_error']}")

    say(format_table(rows))
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
        raise TritonizeError(f"wrote {json_path}, but the plot needs matplotlib: pip install matplotlib") \
            from None
    say(f"wrote {json_path} and {png_path}")
    failed = sum(int(r.get("errors") or 0) for r in rows) + sum(1 for r in rows if r.get("error"))
    if failed:
        raise TritonizeError(f"{failed} request(s) or run(s) failed; see the errors column and {json_path}")
    return result
