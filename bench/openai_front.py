"""What the OpenAI front costs: the same load through it and straight over gRPC streaming, same server, same run.

Generates the repository for --model, starts tritonserver, and starts `tritonize openai` in a process of its
own (as `tritonize serve` runs it: one front per server). For each concurrency it alternates rounds of
- gRPC streaming to the ensemble (tritonize's load generator, tritonclient's asyncio client), and
- streamed /v1/completions through the front (the official `openai` client's raw streaming response, so
  each event is read as it arrives and counted, not turned into pydantic objects),
with the same prompts, greedy, exactly --output-len tokens each (min_tokens = max_tokens), and reports
output tokens/s, TTFT and ITL of both, and the front's throughput loss.

    python bench/openai_front.py --model /tmp/bt --device cpu --dtype float32 --concurrency 1,64
    python bench/openai_front.py --model /tmp/llama8b --device cuda --dtype bfloat16 --concurrency 1,64

Needs the `openai` package (the test extra) besides tritonize's own dependencies (FastAPI, uvicorn).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from common import parser

from tritonize.repository.build import build_repository
from tritonize.repository.spec import RepoSpec
from tritonize.serving.loadgen import LoadResult, RequestRecord, run_load_async, synthetic_prompts
from tritonize.serving.server import TritonServer, free_ports


async def _openai_user(client, model: str, prompts: list[str], output_len: int, deadline: float,
                       counter: list[int], records: list[RequestRecord]) -> None:
    while time.perf_counter() < deadline:
        prompt = prompts[counter[0] % len(prompts)]
        counter[0] += 1
        record = RequestRecord(start=time.perf_counter())
        records.append(record)
        try:
            async with client.completions.with_streaming_response.create(
                model=model, prompt=prompt, max_tokens=output_len, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"min_tokens": output_len},
            ) as response:
                async for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        record.error = event["error"].get("message", "error")
                        break
                    if event["choices"] and event["choices"][0]["text"]:
                        record.response_times.append(time.perf_counter())
                    if event.get("usage"):
                        record.output_tokens = event["usage"]["completion_tokens"]
        except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
            record.error = str(e)


async def run_openai_load(base_url: str, model: str, prompts: list[str], *, output_len: int, concurrency: int,
                          duration: float) -> LoadResult:
    import httpx2  # the openai client's own transport
    import openai

    limits = httpx2.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600,
                                  http_client=openai.DefaultAsyncHttpxClient(limits=limits)) as client:
        start = time.perf_counter()
        records: list[RequestRecord] = []
        counter = [0]
        await asyncio.gather(*(_openai_user(client, model, prompts, output_len, start + duration, counter, records)
                               for _ in range(concurrency)))
        return LoadResult(concurrency, time.perf_counter() - start, records)


def _front(grpc_url: str, repo: Path, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "tritonize.cli.openai", "--url", grpc_url, "--repository", str(repo),
               "--port", str(port)]
    proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"the OpenAI front did not start: {log.read_text()}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name()}, PyTorch {torch.__version__}"
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), platform.processor())
        return f"{os.cpu_count()} CPU cores ({cpu}), no GPU, PyTorch {torch.__version__}"
    except (ImportError, OSError):
        return platform.platform()


def main() -> None:
    ap = parser(__doc__)
    ap.set_defaults(input_len=32, output_len=64)
    ap.add_argument("--concurrency", default="1,64")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per door and concurrency")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tritonize-openai-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    spec = RepoSpec(name="llm", max_batch_size=max(levels), max_input_len=args.input_len + 16,
                    max_output_len=args.output_len, device=args.device, dtype=args.dtype,
                    max_num_tokens=max(2048, 2 * max(levels)) if args.device != "cpu" else 0)
    repo = build_repository(args.model, workdir / "repo", spec, force=True, progress=False)
    prompts = synthetic_prompts(str(repo / "llm_preprocessing" / "1" / "tokenizer"), args.input_len, count=64)
    result: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": _machine(),
                    "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "model": str(args.model),
                    "input_len": args.input_len, "output_len": args.output_len, "rounds": [], "summary": []}
    http, grpc, metrics, port = free_ports(4)
    server = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics,
                          log_file=workdir / "server.log", exit_timeout=5)
    server.start(timeout=900)
    url = f"127.0.0.1:{grpc}"
    front = _front(url, repo, port, workdir / "front.log")
    base = f"http://127.0.0.1:{port}/v1"
    try:
        asyncio.run(run_load_async(url, "llm", prompts, output_len=8, concurrency=max(levels), duration=3))
        asyncio.run(run_openai_load(base, "llm", prompts, output_len=8, concurrency=max(levels), duration=3))
        for c in levels:
            rows: dict[str, list[dict]] = {"grpc": [], "openai": []}
            for r in range(args.rounds):
                for door in ("grpc", "openai") if r % 2 == 0 else ("openai", "grpc"):
                    front_cpu = cpu_seconds(front.pid)
                    if door == "grpc":
                        load = asyncio.run(run_load_async(url, "llm", prompts, output_len=args.output_len,
                                                          concurrency=c, duration=args.duration))
                    else:
                        load = asyncio.run(run_openai_load(base, "llm", prompts, output_len=args.output_len,
                                                           concurrency=c, duration=args.duration))
                    row = {"door": door, "round": r, **load.summary()}
                    tokens = row["output_tokens_per_s"] * row["duration_s"]
                    # what the front process spent on this round's tokens (CPU ms per 1000 output tokens)
                    row["front_cpu_ms_per_1k_tokens"] = 1e6 * (cpu_seconds(front.pid) - front_cpu) / max(tokens, 1)
                    rows[door].append(row)
                    result["rounds"].append(row)
                    print(json.dumps(row), flush=True)
            grpc_tps = statistics.mean(x["output_tokens_per_s"] for x in rows["grpc"])
            openai_tps = statistics.mean(x["output_tokens_per_s"] for x in rows["openai"])
            summary = {"concurrency": c, "grpc_tok_s": grpc_tps, "openai_tok_s": openai_tps,
                       "loss": 1 - openai_tps / grpc_tps,
                       "errors": sum(x["errors"] for x in rows["grpc"] + rows["openai"])}
            summary["front_cpu_ms_per_1k_tokens"] = statistics.mean(x["front_cpu_ms_per_1k_tokens"]
                                                                    for x in rows["openai"])
            for door in ("grpc", "openai"):
                for key in ("ttft_ms_p50", "itl_ms_p50"):
                    summary[f"{door}_{key}"] = statistics.median(x[key] for x in rows[door] if x[key] is not None)
            result["summary"].append(summary)
            print(json.dumps(summary), flush=True)
    finally:
        front.terminate()
        front.wait(30)
        server.stop()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float))
    print(f"\n{result['machine']}, {result['date']}")
    print("| concurrency | gRPC streaming tok/s | OpenAI front tok/s | loss | TTFT p50 gRPC / OpenAI (ms) | "
          "ITL p50 gRPC / OpenAI (ms) | front CPU ms / 1k tokens |")
    print("|---|---|---|---|---|---|---|")
    for s in result["summary"]:
        print(f"| {s['concurrency']} | {s['grpc_tok_s']:,.1f} | {s['openai_tok_s']:,.1f} | {100 * s['loss']:.1f}% | "
              f"{s['grpc_ttft_ms_p50']:.1f} / {s['openai_ttft_ms_p50']:.1f} | "
              f"{s['grpc_itl_ms_p50']:.2f} / {s['openai_itl_ms_p50']:.2f} | {s['front_cpu_ms_per_1k_tokens']:.0f} |")


if __name__ == "__main__":
    main()
