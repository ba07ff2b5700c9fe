"""Soak: many concurrent streaming clients for a long time against a tiny model on a real tritonserver.

The long version of tests/test_reliability.py's concurrency check. Every prompt's greedy text is first
asked alone; under load each streamed answer must equal it and end with exactly one final response,
so a lost, duplicated or mixed-up response counts as a failure. Server memory (tritonserver plus its
Python backend stubs, from /proc) is read before the load, after the first half and after the second
half: a leak shows as growth between the two halves.

    python bench/soak.py --clients 64 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from tritonize.export.demo_model import write_demo_checkpoint
from tritonize.repository.build import build_repository
from tritonize.repository.spec import RepoSpec
from tritonize.serving.client import GenerateOptions, grpc_generate
from tritonize.serving.loadgen import answers_under_load
from tritonize.serving.server import SHM_DIR, TritonServer, free_ports

WORDS = "apple river stone cloud seven green quiet number house music paper light".split()


def prompts(count: int) -> list[str]:
    return [f"{WORDS[i % len(WORDS)]} {WORDS[(i * 5 + 3) % len(WORDS)]} {i}" for i in range(count)]




async def load_round(url: str, model: str, expected: dict[str, str], clients: int, max_tokens: int,
                     duration: float) -> tuple[int, list[str]]:
    """Runs `clients` streaming clients for `duration` seconds; returns (requests, failure descriptions)."""
    answers = await answers_under_load(url, model, list(expected), clients=clients, max_tokens=max_tokens,
                                       duration=duration)
    failures = []
    for a in answers:
        if a.error is not None:
            failures.append(f"{a.prompt!r}: error {a.error}")
        elif a.finals != 1:
            failures.append(f"{a.prompt!r}: {a.finals} final responses")
        elif a.text != expected[a.prompt]:
            failures.append(f"{a.prompt!r}: got {a.text!r}, expected {expected[a.prompt]!r}")
    return len(answers), failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load in all (two halves)")
    parser.add_argument("--prompts", type=int, default=128, help="distinct prompts")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--repo", type=Path, help="an existing repository (model name from --model)")
    parser.add_argument("--model", default="soak")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tritonize-soak-") as tmp:
        repo = args.repo
        if repo is None:
            ckpt = write_demo_checkpoint(Path(tmp) / "ckpt", hidden=32, layers=2, seed=5)
            spec = RepoSpec(name=args.model, max_batch_size=args.max_batch_size, max_input_len=32,
                            max_output_len=max(args.max_tokens, 16), device="cpu", dtype="float32")
            repo = build_repository(ckpt, Path(tmp) / "repo", spec, force=False, progress=False)
        http_port, grpc_port, metrics_port = free_ports(3)
        with TritonServer(repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          log_file=Path(tmp) / "server.log", exit_timeout=10) as server:
            opts = GenerateOptions(max_tokens=args.max_tokens)
            expected = {p: grpc_generate(server.grpc_endpoint, args.model, p, opts).text
                        for p in prompts(args.prompts)}
            rss = [server.rss_mb()]
            total, failures, start = 0, [], time.monotonic()
            for _ in range(2):
                count, failed = asyncio.run(load_round(server.grpc_endpoint, args.model, expected, args.clients,
                                                       args.max_tokens, args.duration / 2))
                total += count
                failures += failed
                rss.append(server.rss_mb())
            elapsed = time.monotonic() - start
            shm_prefix = server.shm_prefix
        left = sorted(p.name for p in SHM_DIR.glob(f"{shm_prefix}*"))

    print(f"clients {args.clients}, prompts {args.prompts}, max_tokens {args.max_tokens}")
    print(f"requests {total}, duration {elapsed:.1f} s, {total / elapsed:.1f} req/s, failures {len(failures)}")
    print(f"server RSS: before {rss[0]:.0f} MB, after half 1 {rss[1]:.0f} MB, after half 2 {rss[2]:.0f} MB")
    print(f"/dev/shm segments left after stop: {len(left)}")
    for failure in failures[:10]:
        print("  FAIL", failure)
    return 1 if failures or left else 0


if __name__ == "__main__":
    sys.exit(main())
