"""Start time: from `tritonize serve` to a first answered request, cold and with warm artifacts.

Generates a repository for --model (or takes --repo), then measures three starts of `tritonize serve`, each
from the moment the command is launched until an HTTP generate request is answered (requests are sent
every 0.2 s meanwhile; `serve`'s own "ready after" and the stages it showed are recorded too):

1. cold: an empty Triton kernel cache (TRITON_CACHE_DIR), no warm artifacts: what a new pod or machine pays;
2. warm: `tritonize warmup REPO` first (timed), then again an empty kernel cache: the repository's warm
   artifacts are all there is;
3. host cache: the kernel cache the cold start left, warm artifacts off: a second start on the same machine.

    python bench/start_time.py --model /tmp/llama8b --device cuda --dtype bfloat16 --json out.json
    python bench/start_time.py --model /tmp/bt --device cpu --json cpu.json      # the same, on a CPU

The repository options default to section 2's (batch 64, 160 in, 128 out, 2048 tokens a step); pass
--generate-args "" for generate's defaults (limits taken from the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from tritonize.serving.server import free_ports

CLI = [sys.executable, "-m", "tritonize.cli.main"]
NAME = "llm"
TARGETS_S = {"cold": 120.0, "warm": 40.0}  # one H100, 8B shape bf16 (issue 14)


def _first_answer(http_port: int, proc: subprocess.Popen, deadline: float) -> float | None:
    body = json.dumps({"text_input": "Hello", "max_tokens": 4}).encode()
    url = f"http://127.0.0.1:{http_port}/v2/models/{NAME}/generate"
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:
                if response.status == 200 and json.loads(response.read()).get("text_output") is not None:
                    return time.monotonic()
        except (OSError, ValueError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    return None


def start_once(repo: Path, env: dict[str, str], log: Path, timeout: float) -> dict:
    http, grpc, metrics = free_ports(3)
    command = [*CLI, "serve", str(repo), "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port",
               str(metrics), "--no-openai", "--log-file", str(log), "--startup-timeout", str(timeout)]
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((round(time.monotonic() - started, 2), line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    answered = _first_answer(http, proc, started + timeout)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    reader.join(timeout=10)
    text = log.read_text(errors="replace") if log.is_file() else ""
    ready = next((float(m.group(1)) for _, line in lines if (m := re.search(r"is ready after ([\d.]+) s", line))), None)
    warm = next((line.split('"', 1)[-1].rstrip('"') for line in text.splitlines() if "warm artifacts" in line), None)
    return {"first_answer_s": None if answered is None else round(answered - started, 2), "ready_s": ready,
            "warm_line": warm, "serve_output": lines, "command": shlex.join(command)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="an HF-format checkpoint directory (or pass --repo)")
    ap.add_argument("--repo", type=Path, help="an existing repository whose ensemble is named llm")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--generate-args", default="--max-batch-size 64 --max-input-len 160 --max-output-len 128 "
                                              "--max-num-tokens 2048")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds one start may take")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if (args.model is None) == (args.repo is None):
        ap.error("pass --model or --repo")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tritonize-start-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        import torch

        result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        result["torch"] = torch.__version__
    except ImportError:
        result["device"] = "?"
    repo = args.repo
    if repo is None:
        repo = work / "repo"
        command = [*CLI, "generate", "-c", str(args.model), "-o", str(repo), "-n", NAME, "--device", args.device,
                   "--dtype", args.dtype, "--force", *shlex.split(args.generate_args)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        result["generate"] = shlex.join(command)
    shutil.rmtree(repo / f"{NAME}_engine" / "1" / "warm", ignore_errors=True)
    base = dict(os.environ)

    def cache(name: str) -> str:
        path = work / f"triton-cache-{name}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        return str(path)

    starts = {}
    cold_cache = cache("cold")
    starts["cold"] = start_once(repo, {**base, "TRITON_CACHE_DIR": cold_cache}, work / "cold.log", args.timeout)
    t = time.monotonic()
    warmup = subprocess.run([*CLI, "warmup", str(repo)], env={**base, "TRITON_CACHE_DIR": cache("warmup")},
                            capture_output=True, text=True)
    result["warmup_s"] = round(time.monotonic() - t, 2)
    result["warmup_output"] = (warmup.stdout + warmup.stderr).strip().splitlines()[-3:]
    if warmup.returncode != 0:
        raise SystemExit(f"tritonize warmup failed: {warmup.stderr.strip().splitlines()[-1:]}")
    starts["warm"] = start_once(repo, {**base, "TRITON_CACHE_DIR": cache("warm")}, work / "warm.log", args.timeout)
    starts["host_cache"] = start_once(repo, {**base, "TRITON_CACHE_DIR": cold_cache,
                                             "TRITONIZE_WARM_ARTIFACTS": "off"}, work / "host.log", args.timeout)
    result["starts"] = starts
    result["targets_s"] = TARGETS_S
    summary = {name: {"first_answer_s": s["first_answer_s"], "ready_s": s["ready_s"], "warm": s["warm_line"]}
               for name, s in starts.items()}
    print(json.dumps({"device": result["device"], "warmup_s": result["warmup_s"], **summary}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
