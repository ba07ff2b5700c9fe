"""Through the generated repository on a stock tritonserver: LLM load at several concurrencies.

Generates the repository for --model, starts tritonserver, and for each concurrency measures output
tokens/s, time to first token and inter-token latency (p50 / p99) with
- perf_analyzer (if on PATH or $PERF_ANALYZER): --streaming against the ensemble with a genai-perf
  shaped input-data JSON, statistics computed from its --profile-export-file per-response timestamps;
- tritonize's own async gRPC-streaming load generator (always; it is the only one on machines where
  perf_analyzer does not run).
With --sequential it also serves the same requests one at a time (concurrency 1) so the batched
throughput is reported as a ratio to sequential serving in the same run.

    python bench/serve_load.py --model /tmp/llama8b --device cuda --concurrency 1,16,64 --json out.json
    python bench/serve_load.py --model /tmp/llama8b --device cuda --quantization fp8 --kv-cache-dtype fp8 ...
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

from common import checkpoint_for, parser

from tritonize.repository.build import build_repository
from tritonize.repository.spec import RepoSpec
from tritonize.serving.loadgen import run_load, synthetic_prompts, timed_request
from tritonize.serving.metrics import HISTOGRAMS, scrape, server_view
from tritonize.serving.perfanalyzer import perf_analyzer_binary, perf_analyzer_run
from tritonize.serving.server import TritonServer, free_ports


def prefix_ttft(url: str, metrics_url: str, repo: Path, prefix_len: int) -> dict:
    """Served TTFT of prompts that share a cached ``prefix_len``-token prefix, against cold prompts: as the client
    sees it and as the engine counted it (arrival in the engine to its first token, from the engine model's
    TTFT histogram read before and after each request), so what the hops add shows apart from the engine.

    One client sends them one after the other over one connection, as a client of a fleet does (and as
    perf_analyzer does): a fresh gRPC channel per request would add its connection set-up to every first token.
    """
    tokenizer = str(repo / "llm_preprocessing" / "1" / "tokenizer")
    prefixes = synthetic_prompts(tokenizer, prefix_len, count=5, seed=123)
    suffixes = synthetic_prompts(tokenizer, 32, count=6, seed=456)
    prompts = [prefixes[4] + " " + suffixes[0]]  # opens the connection; its prefix is never used again
    prompts += [prefixes[i] + " " + suffixes[i] for i in (1, 2, 3)]  # cold
    prompts += [prefixes[0] + " " + suffixes[0]]  # the prefix is cached from here on
    prompts += [prefixes[0] + " " + suffixes[i] for i in (3, 4, 5)]  # cached
    name = HISTOGRAMS["ttft"]
    hops: list[dict | None] = []  # per request: the client's and the engine's wall-clock readings

    def engine_ttft() -> tuple[float, float]:
        snap = scrape(metrics_url)
        return snap.total(name + "_count"), snap.total(name + "_sum")

    async def run() -> list[tuple[float, float]]:
        import tritonclient.grpc.aio as aio

        out = []
        async with aio.InferenceServerClient(url) as client:
            for prompt in prompts:
                count, total = engine_ttft()
                record = await timed_request(client, "llm", prompt, 4, perf=True)
                hops.append(record.perf)
                for _ in range(100):  # the engine model counts a request once its final response is out
                    after_count, after_total = engine_ttft()
                    if after_count > count:
                        break
                    await asyncio.sleep(0.01)
                engine = 1000 * (after_total - total) if after_count == count + 1 else float("nan")
                out.append((1000 * record.ttft if record.ttft is not None else float("nan"), engine))
        return out

    ttft = asyncio.run(run())
    client, engine = [t for t, _ in ttft], [e for _, e in ttft]

    def way(i: int, start: str, end: str) -> float:  # ms between two wall-clock readings of request i
        p = hops[i]
        return (p[end] - p[start]) / 1e6 if p and p.get(end) and p.get(start) else float("nan")

    # into the engine: send -> the engine's arrival (tokenizer, ensemble, engine model); out of it: the engine's
    # first token -> its receipt (the response path, postprocessing)
    hops_in = [way(i, "sent_ns", "arrival_time_ns") for i in range(len(hops))]
    hops_out = [way(i, "first_token_time_ns", "received_ns") for i in range(len(hops))]
    # inside the engine: arrival -> its first step (queue), first step -> first token (the prompt's steps)
    queue = [way(i, "arrival_time_ns", "first_scheduled_time_ns") for i in range(len(hops))]
    steps = [way(i, "first_scheduled_time_ns", "first_token_time_ns") for i in range(len(hops))]
    return {"prefix_len": prefix_len, "cold_ttft_ms": client[1:4], "cached_ttft_ms": client[5:8],
            "engine_cold_ttft_ms": engine[1:4], "engine_cached_ttft_ms": engine[5:8],
            "hops_in_ms": hops_in[1:4] + hops_in[5:8], "hops_out_ms": hops_out[1:4] + hops_out[5:8],
            "engine_queue_ms": queue[1:4] + queue[5:8], "engine_steps_ms": steps[1:4] + steps[5:8],
            "ratio_p50": sorted(client[5:8])[1] / sorted(client[1:4])[1],
            "engine_ratio_p50": sorted(engine[5:8])[1] / sorted(engine[1:4])[1]}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load per concurrency (own loader)")
    ap.add_argument("--pa-interval-ms", type=int, default=5000)
    ap.add_argument("--sequential", action="store_true", help="also report batched / sequential throughput")
    ap.add_argument("--prefix-len", type=int, default=1024,
                    help="TTFT of a prompt whose prefix of this many tokens is cached, against cold (0: skip)")
    ap.add_argument("--no-perf-analyzer", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--tensor-parallelism-size", type=int, default=1, help="GPUs the torch runtime splits the model over")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tritonize-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    spec = RepoSpec(name="llm", max_batch_size=max(levels), max_input_len=max(args.input_len, args.prefix_len + 64) + 16,
                    max_output_len=args.output_len, device=args.device, dtype=args.dtype,
                    max_num_tokens=max(2048, 2 * max(levels)), tensor_parallel_size=args.tensor_parallelism_size,
                    kv_cache_dtype=args.kv_cache_dtype)
    model = checkpoint_for(args)
    t = time.perf_counter()
    repo = build_repository(model, workdir / "repo", spec, force=True, progress=False)
    result: dict = {"model": str(model), "input_len": args.input_len, "output_len": args.output_len,
                    "tensor_parallel_size": args.tensor_parallelism_size, "quantization": args.quantization,
                    "kv_cache_dtype": args.kv_cache_dtype, "generate_s": time.perf_counter() - t, "runs": []}
    try:
        import torch

        result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except ImportError:
        result["device"] = "?"
    prompts = synthetic_prompts(str(repo / "llm_preprocessing" / "1" / "tokenizer"), args.input_len, count=64)
    http, grpc, metrics = free_ports(3)
    server = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics,
                          log_file=workdir / "server.log", exit_timeout=5)
    t = time.perf_counter()
    server.start(timeout=900)
    result["server_ready_s"] = time.perf_counter() - t
    print(f"server ready in {result['server_ready_s']:.1f} s", flush=True)
    url = f"127.0.0.1:{grpc}"
    pa = None if args.no_perf_analyzer else perf_analyzer_binary()
    try:
        run_load(url, "llm", prompts, output_len=8, concurrency=max(levels), duration=5.0,
                 max_requests=max(levels))  # warm-up
        if args.sequential:
            seq = run_load(url, "llm", prompts, output_len=args.output_len, concurrency=1,
                           duration=args.duration).summary()
            seq["tool"] = "tritonize-loadgen"
            result["sequential"] = seq
            print(json.dumps(seq), flush=True)
        metrics_url = f"http://127.0.0.1:{metrics}/metrics"
        for c in levels:
            before, t = scrape(metrics_url), time.perf_counter()
            row = run_load(url, "llm", prompts, output_len=args.output_len, concurrency=c,
                           duration=args.duration).summary()
            row["tool"] = "tritonize-loadgen"
            # the same stretch as the engine model counted it: its step rate and batch, its own TTFT and queue time
            row["engine"] = server_view(before, scrape(metrics_url), "llm_engine", time.perf_counter() - t)
            if args.sequential and result["sequential"]["output_tokens_per_s"]:
                row["ratio_to_sequential"] = row["output_tokens_per_s"] / result["sequential"]["output_tokens_per_s"]
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
            if pa:
                row = perf_analyzer_run(pa, url, "llm", prompts, args.output_len, c, workdir, args.pa_interval_ms)
                result["runs"].append(row)
                print(json.dumps(row), flush=True)
        if args.prefix_len:
            result["prefix"] = prefix_ttft(url, metrics_url, repo, args.prefix_len)
            print(json.dumps(result["prefix"]), flush=True)
        text = server.log_text()
        result["server_errors"] = [ln for ln in text.splitlines() if ln.startswith("E") and "cuda" not in ln.lower()
                                   and "nvml" not in ln.lower() and "dcgm" not in ln.lower()][:10]
    finally:
        server.stop()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float))
    print(json.dumps(result, indent=2, default=float))



if __name__ == "__main__":
    main()
