"""perf_analyzer and genai-perf, the load tools of record for Triton fleets, driven with tritonize's load.

perf_analyzer is run in streaming mode against the decoupled ensemble with an input-data JSON shaped
like genai-perf's `tensorrtllm` converter (prompts fixed, ``min_tokens = max_tokens`` so every request
makes exactly ``output_len`` tokens); its per-response timestamps give TTFT and inter-token latency the
way genai-perf computes them. genai-perf itself is only printed: it needs its own tokenizer download
and a newer environment than tritonize, and users run it where their fleet tools live.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from .loadgen import percentile


def perf_analyzer_binary() -> str | None:
    """$PERF_ANALYZER, else perf_analyzer on PATH, else None."""
    return os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer")


def input_data(prompts: list[str], output_len: int) -> dict:
    """perf_analyzer's --input-data JSON: one entry per prompt, every request streamed."""
    return {"data": [{
        "text_input": {"content": [p], "shape": [1]},
        "max_tokens": {"content": [output_len], "shape": [1]},
        "min_tokens": {"content": [output_len], "shape": [1]},
        "stream": {"content": [True], "shape": [1]},
        "exclude_input_in_output": {"content": [True], "shape": [1]},
    } for p in prompts]}


def perf_analyzer_run(binary: str, url: str, model: str, prompts: list[str], output_len: int, concurrency: int,
                      workdir: Path, interval_ms: int) -> dict:
    """One concurrency level; the row has the keys of ``loadgen.LoadResult.summary`` (or ``error``)."""
    inputs = workdir / "inputs.json"
    inputs.write_text(json.dumps(input_data(prompts, output_len)))
    export = workdir / f"profile_c{concurrency}.json"
    cmd = [binary, "-m", model, "-i", "grpc", "-u", url, "--streaming", "--input-data", str(inputs),
           "--concurrency-range", str(concurrency), "--measurement-interval", str(interval_ms),
           "--stability-percentage", "999", "--profile-export-file", str(export)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"tool": "perf_analyzer", "concurrency": concurrency, "error": f"perf_analyzer did not run: {e}",
                "command": shlex.join(cmd)}
    (workdir / f"perf_analyzer_c{concurrency}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"tool": "perf_analyzer", "concurrency": concurrency,
                "error": f"perf_analyzer exited {proc.returncode}: {proc.stderr.strip()[-300:]}",
                "command": shlex.join(cmd)}
    # Every request generates exactly output_len tokens (min_tokens = max_tokens), so tokens/s is
    # requests/s x output_len; a streamed response may carry several tokens when the server is busy.
    match = re.search(r"\n\s*Throughput: ([0-9.]+) infer/sec", proc.stdout)
    profile = json.loads(export.read_text())
    requests = profile["experiments"][-1]["requests"]
    ttft, itl = [], []
    for r in requests:
        times = r.get("response_timestamps") or []
        if times:
            ttft.append((times[0] - r["timestamp"]) / 1e9)
            if len(times) > 1 and output_len > 1:  # genai-perf's definition: per request, over its tokens
                itl.append((times[-1] - times[0]) / 1e9 / (output_len - 1))
    requests_per_s = float(match.group(1)) if match else None
    row: dict = {
        "tool": "perf_analyzer",
        "concurrency": concurrency,
        "requests": len(requests),
        "errors": 0,
        "duration_s": interval_ms / 1000,
        "output_tokens_per_s": requests_per_s * output_len if requests_per_s is not None else None,
        "requests_per_s": requests_per_s,
    }
    for name, values in (("ttft_ms", ttft), ("itl_ms", itl)):
        for q in (50, 90, 99):
            p = percentile(values, q)
            row[f"{name}_p{q}"] = None if p is None else p * 1e3
    row["command"] = shlex.join(cmd)
    return row


def genai_perf_command(model: str, url: str, *, input_len: int, output_len: int, concurrency: int,
                       tokenizer: str | None = None, measurement_interval_ms: int | None = None) -> list[str]:
    """The genai-perf command line for the same load (Triton gRPC, tensorrtllm wire format, streaming).

    Without a tokenizer genai-perf counts tokens with its default Llama tokenizer, which is only close
    to the served model's; pass the repository's tokenizer directory for exact counts.
    """
    cmd = ["genai-perf", "profile", "-m", model, "--service-kind", "triton", "--backend", "tensorrtllm",
           "--streaming", "--url", url,
           "--synthetic-input-tokens-mean", str(input_len), "--synthetic-input-tokens-stddev", "0",
           "--output-tokens-mean", str(output_len), "--output-tokens-stddev", "0",
           "--output-tokens-mean-deterministic", "--concurrency", str(concurrency)]
    if measurement_interval_ms:
        cmd += ["--measurement-interval", str(measurement_interval_ms)]
    if tokenizer:
        cmd += ["--tokenizer", tokenizer]
    return cmd
