"""The torch runtime's engine alone (no server): decode rate per batch, prefix reuse, and where a step's time goes.

Measured in one run on one device, so the figures compare with each other and with the roofline:
- copy bandwidth (device-to-device, bytes read + written) and the roofline = bandwidth / weight bytes;
- per batch size B: B requests of ``--input-len`` random tokens submitted at once, each generating exactly
  ``--output-len`` tokens (``min_tokens``, the checkpoint's end ids banned until then, as the served loads
  ask; ``--no-end-ids``: requests that name none, as this script did before 2026-12-06): decode tok/s (tokens
  after the first over the time between first and last, summed over requests), end-to-end tok/s, TTFT p50;
- prefix reuse: TTFT of a request whose ``--prefix-len``-token prefix is cached, against the same request
  cold (prefix cache emptied);
- the engine thread's own time per step (planning, launching, waiting for the device, applying) and, with
  ``--profile-dir``, torch.profiler tables of the device kernels of decode steps at the largest batch and of a
  cold and a cached-prefix request alone (where their first tokens' time goes).

- transformers ``generate`` (eager, greedy, same weights) at ``--hf-batch`` sizes, end-to-end tok/s.

    python bench/engine_bench.py --model /tmp/llama8b --batches 1,16,64,256 --hf-batch 1,8,32 --json out.json
    python bench/engine_bench.py --model /tmp/llama8b --batches 1,64 --quantization fp8 --kv-cache-dtype fp8 ...
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import checkpoint_for, parser  # noqa: E402 - bench/common.py, beside this script

from tritonize.runtime.engine import Engine  # noqa: E402
from tritonize.runtime.request import GenerationRequest, SamplingParams  # noqa: E402


def copy_bandwidth(device: torch.device, gib: float = 2.0) -> float:
    if device.type != "cuda":
        return float("nan")
    n = int(gib * (1 << 30)) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(10):
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    del a, b
    return 2 * n * 2 / best


def run_batch(engine: Engine, prompts: list[list[int]], output_len: int, tag: str,
              lora_ids: list[int | None] | None = None, end_ids: list[int] | None = None) -> dict:
    """Submit every prompt at once; time each request's tokens from its own callbacks. ``lora_ids``:
    request i uses adapter ``lora_ids[i % len(lora_ids)]`` (None: the base model). ``end_ids``: what requests
    name (banned by min_tokens until the last token); none by default."""
    times: dict[int, list[float]] = {i: [] for i in range(len(prompts))}
    done = threading.Event()
    left = [len(prompts)]

    def on_output(i: int, out) -> None:  # noqa: ANN001 - engine thread
        if out.token_ids:
            times[i].append(time.perf_counter())
        if out.finished:
            left[0] -= 1
            if left[0] == 0:
                done.set()

    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.submit(GenerationRequest(
            request_id=f"{tag}-{i}", prompt_ids=prompt, max_new_tokens=output_len,
            sampling=SamplingParams(min_tokens=output_len), stream=True, end_ids=list(end_ids or []),
            on_output=lambda out, i=i: on_output(i, out),
            lora_task_id=lora_ids[i % len(lora_ids)] if lora_ids else None))
    done.wait()
    wall = time.perf_counter() - start
    per_request = [(len(t) - 1) / (t[-1] - t[0]) for t in times.values() if len(t) > 1]
    ttft = sorted(t[0] - start for t in times.values())
    return {
        "batch": len(prompts),
        "decode_tok_s": sum(per_request),
        "decode_tok_s_per_request": sum(per_request) / len(per_request),
        "end_to_end_tok_s": len(prompts) * output_len / wall,
        "ttft_ms_p50": 1000 * ttft[len(ttft) // 2],
        "wall_s": wall,
    }


def closed_loop(engine: Engine, concurrency: int, input_len: int, output_len: int, vocab: int, duration: float,
                end_ids: list[int], profile_dir: Path | None = None, lockstep: bool = False) -> dict:
    """``concurrency`` requests in flight, each replaced by a new one as it finishes (perf_analyzer's concurrency
    mode, without the server): the steady state a served load gives the engine, prompts arriving while others
    decode. The first round asks for 1 to ``output_len`` tokens, so that requests end, and new ones arrive, spread
    over the steps as a served load's do (a new prompt every ``output_len / concurrency`` steps); ``lockstep``: all
    ask for ``output_len`` and stay in step (rounds of prefills between runs of pure decode steps). Tokens are
    counted over ``duration`` seconds after a warm-up round. With ``profile_dir`` (CUDA), a
    kernel table of 0.3 s of the same steady state is taken after the measured window: the profiler slows the
    steps it traces, so it never runs while they are counted."""
    import queue

    finished: queue.Queue = queue.Queue()
    tokens = [0]
    firsts: list[float] = []
    starts: dict[int, float] = {}
    prompts = random_prompts(64, input_len, vocab, 11)

    def submit(i: int, length: int = output_len) -> None:
        starts[i] = time.perf_counter()

        def on_output(out, i=i) -> None:  # noqa: ANN001 - engine thread
            if out.token_ids:
                if starts.get(i) is not None:
                    firsts.append(time.perf_counter() - starts.pop(i))
                tokens[0] += len(out.token_ids)
            if out.finished:
                finished.put(i)

        engine.submit(GenerationRequest(
            request_id=f"loop{concurrency}-{i}", prompt_ids=prompts[i % len(prompts)], max_new_tokens=length,
            sampling=SamplingParams(min_tokens=length), stream=True, end_ids=list(end_ids), on_output=on_output))

    def steps() -> tuple[int, int]:
        return engine.stats["decode_steps"], engine.stats["mixed_steps"]

    for i in range(concurrency):  # the first round staggered: later rounds arrive spread out, as served ones do
        submit(i, output_len if lockstep else 1 + (i * output_len) // concurrency)
    n = concurrency
    t0 = time.perf_counter() + 2.0 * output_len * 0.02 + 1.0  # past the first round's start-up
    t1 = t0 + duration
    profiling = profile_dir is not None and engine.device.type == "cuda"
    t2 = t1 + (0.3 if profiling else 0.0)
    phase, prof, row = "warm", None, {}
    before: dict = {}
    while True:
        try:
            finished.get(timeout=0.01)
            done = True
        except queue.Empty:
            done = False
        now = time.perf_counter()
        if phase == "warm" and now >= t0:
            phase, t0 = "measure", now
            tokens[0], firsts[:] = 0, []
            before = {"steps": steps(), **engine.stats["time_s"]}
        elif phase == "measure" and now >= t1:
            wall = now - t0
            (decode, mixed), (d0, m0) = steps(), before["steps"]
            count = max(decode - d0 + mixed - m0, 1)
            ttfts = sorted(firsts)
            row = {"closed_loop_concurrency": concurrency, "lockstep": lockstep, "output_tok_s": tokens[0] / wall,
                   "decode_steps": decode - d0, "mixed_steps": mixed - m0, "ms_per_step": 1000 * wall / count,
                   "ttft_ms_p50": 1000 * ttfts[len(ttfts) // 2] if ttfts else None,
                   "engine_ms_per_step": {k: 1000 * (v - before[k]) / count for k, v in engine.stats["time_s"].items()}}
            phase = "profile"
            if profiling:
                from torch.profiler import ProfilerActivity, profile

                prof = profile(activities=[ProfilerActivity.CUDA])
                prof.__enter__()
        elif phase == "profile" and now >= t2:
            if prof is not None:
                prof.__exit__(None, None, None)
                profile_dir.mkdir(parents=True, exist_ok=True)
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
                (profile_dir / f"closed_loop_c{concurrency}.txt").write_text(table)
            break
        if done:
            submit(n)
            n += 1
    while engine.num_running or engine.num_waiting:  # let the last round finish
        time.sleep(0.01)
    return row


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n, length), generator=g).tolist()


def ttft(engine: Engine, prompt: list[int], tag: str) -> float:
    got = threading.Event()
    t = time.perf_counter()
    first: list[float] = []

    def on_output(out) -> None:  # noqa: ANN001
        if not first:
            first.append(time.perf_counter() - t)
        if out.finished:
            got.set()

    engine.submit(GenerationRequest(request_id=tag, prompt_ids=prompt, max_new_tokens=2, stream=True,
                                    end_ids=[], on_output=on_output))
    got.wait()
    return 1000 * first[0]


def hf_generate(model_dir: Path, batches: list[int], input_len: int, output_len: int, device: torch.device,
                dtype: torch.dtype) -> list[dict]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    vocab = model.config.vocab_size
    rows = []
    for batch in batches:
        ids = torch.randint(100, vocab - 100, (batch, input_len), device=device)
        kwargs = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            model.generate(ids, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        wall = time.perf_counter() - t
        rows.append({"batch": batch, "tok_s": batch * output_len / wall, "wall_s": wall})
        print(f"transformers generate batch {batch}: {rows[-1]['tok_s']:.1f} tok/s", flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def prefix_reuse(engine: Engine, prefix_len: int, vocab: int) -> dict:
    """TTFT of prompts whose ``prefix_len``-token prefix is cached, against the same kind of prompt cold."""
    prefix = random_prompts(1, prefix_len, vocab, 99)[0]
    engine.pool.reset_prefix_cache()
    cold = [ttft(engine, prefix + random_prompts(1, 32, vocab, 100)[0], "cold0")]
    ttft(engine, prefix + [7] * 32, "fill")  # from here on the prefix is cached
    hits = engine.pool.stats.prefix_hit_tokens
    warm = [ttft(engine, prefix + random_prompts(1, 32, vocab, 200 + i)[0], f"warm{i}") for i in range(3)]
    hits = engine.pool.stats.prefix_hit_tokens - hits
    for i in range(2):
        engine.pool.reset_prefix_cache()
        cold.append(ttft(engine, prefix + random_prompts(1, 32, vocab, 300 + i)[0], f"cold{i + 1}"))
    return {"prefix_len": prefix_len, "cold_ttft_ms": cold, "cached_ttft_ms": warm,
            "prefix_hit_tokens": hits, "ratio": min(warm) / min(cold)}


def profile_prefix(engine: Engine, prefix_len: int, vocab: int, out_dir: Path) -> dict:
    """Where the first token of a request goes, alone on the engine, cold and with its ``prefix_len``-token prefix
    cached: torch.profiler (CPU and CUDA) around each request; per request the wall time to its first token, the
    engine's own split (submit -> arrival in the engine thread -> first step -> first token), the steps and chunk
    sizes it took, and the device's side: kernel time summed, the time the device was busy, the largest kernels
    (a table per request in ``out_dir``)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = random_prompts(1, prefix_len, vocab, 99)[0]
    with profile(activities=activities):  # the profiler's own first start is slow
        ttft(engine, [5] * 32, "profiler-warm")
    result = {}
    for kind in ("cold", "cached"):
        engine.pool.reset_prefix_cache()
        if kind == "cached":
            ttft(engine, prefix + [7] * 32, f"fill-{kind}")
        prompt = prefix + random_prompts(1, 32, vocab, 500)[0]
        engine.stats["prefill_chunks"].clear()  # a bounded history: emptied, it holds this request's chunks alone
        steps = engine.stats["decode_steps"] + engine.stats["mixed_steps"]
        times = dict(engine.stats["time_s"])
        got, first, final = threading.Event(), [], []

        def on_output(out, first=first, final=final, got=got) -> None:  # noqa: ANN001 - engine thread
            if not first:
                first.append(time.perf_counter())
            if out.finished:
                final.append(out)
                got.set()

        with profile(activities=activities) as prof:
            submitted_ns, t = time.time_ns(), time.perf_counter()
            engine.submit(GenerationRequest(request_id=f"profile-{kind}", prompt_ids=prompt, max_new_tokens=1,
                                            stream=True, end_ids=[], on_output=on_output))
            got.wait()
        m = final[0].metrics
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == DeviceType.CUDA)
        busy, end = 0.0, float("-inf")
        for a, b in spans:  # the union of the kernels' intervals
            busy += max(0.0, b - max(a, end))
            end = max(end, b)
        row = {
            "wall_ttft_ms": 1000 * (first[0] - t),
            "submit_to_arrival_ms": (m.arrival_time_ns - submitted_ns) / 1e6,
            "queue_ms": (m.first_scheduled_time_ns - m.arrival_time_ns) / 1e6,
            "steps_ms": (m.first_token_time_ns - m.first_scheduled_time_ns) / 1e6,
            "prefix_hit_tokens": m.prefix_hit_tokens, "prompt_tokens": len(prompt),
            "prefill_chunks": list(engine.stats["prefill_chunks"]),
            "steps": engine.stats["decode_steps"] + engine.stats["mixed_steps"] - steps,
            "engine_thread_ms": {k: 1000 * (v - times[k]) for k, v in engine.stats["time_s"].items()},
            "kernels": len(spans), "kernel_ms": sum(b - a for a, b in spans) / 1000, "device_busy_ms": busy / 1000,
        }
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
        (out_dir / f"prefix_{kind}.txt").write_text(json.dumps(row, indent=1) + "\n" + table)
        result[kind] = row
        print(json.dumps({f"prefix_profile_{kind}": row}), flush=True)
    return result


def profile_decode(engine: Engine, batch: int, input_len: int, vocab: int, out_dir: Path) -> None:
    """torch.profiler over ~30 decode-only steps of a full batch (prefill excluded): the kernel table."""
    from torch.profiler import ProfilerActivity, profile

    out_dir.mkdir(parents=True, exist_ok=True)
    worker = threading.Thread(target=run_batch, args=(engine, random_prompts(batch, input_len, vocab, 7), 120, "prof"))
    worker.start()
    while engine.num_waiting or any(s.prefilling for s in list(engine.scheduler.running)) \
            or len(engine.scheduler.running) < batch:
        time.sleep(0.005)
    time.sleep(0.05)
    steps = engine.stats["decode_steps"]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        time.sleep(0.3)
    steps = engine.stats["decode_steps"] - steps
    worker.join()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    text = f"decode steps in the window: {steps}\n{table}"
    (out_dir / f"decode_b{batch}.txt").write_text(text)
    print(text, flush=True)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--hf-batch", default="", help="transformers generate batch sizes, e.g. 1,8,32 ('': skip)")
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--max-num-tokens", type=int, default=2048)
    ap.add_argument("--no-end-ids", action="store_true",
                    help="requests name no end ids (before 2026-12-06 the only way; the served loads send the "
                         "checkpoint's, which min_tokens bans until the last token)")
    ap.add_argument("--closed-loop", default="", help="concurrencies to hold in flight, requests replaced as they "
                    "finish (the served steady state without the server), e.g. 64,256 ('': skip)")
    ap.add_argument("--closed-loop-s", type=float, default=8.0, help="seconds measured per --closed-loop level")
    ap.add_argument("--lockstep", action="store_true", help="--closed-loop: every request of the first round as long "
                    "as the rest, so that rounds stay in step (by default they are spread out, as served loads are)")
    ap.add_argument("--profile-dir", type=Path, default=None, help="write kernel tables here: decode steps at the largest "
                    "batch, and a cold and a cached-prefix request alone")
    ap.add_argument("--doubling-token-buckets", action="store_true", help="prompt steps pad to 16, 32, 64, ... tokens "
                    "(the CUDA-graph sizes before 2026-12-06) instead of four sizes per doubling above 256")
    ap.add_argument("--no-attention-splits", action="store_true", help="each query tile walks its keys alone (the "
                    "attention kernel before 2026-12-06), however few tiles a step has")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.no_attention_splits:
        from tritonize.runtime import cuda_kernels

        cuda_kernels.MAX_SPLITS = 1
    batches = [int(b) for b in args.batches.split(",") if b]
    loops = [int(c) for c in args.closed_loop.split(",") if c]
    max_seq_len = max(args.input_len + args.output_len, args.prefix_len + 64)
    model = checkpoint_for(args)
    t = time.perf_counter()
    engine = Engine(model, device=args.device, dtype=args.dtype, max_batch_size=max(batches + loops),
                    max_seq_len=max_seq_len, max_num_tokens=args.max_num_tokens,
                    kv_cache_dtype=args.kv_cache_dtype).start()
    load_s = time.perf_counter() - t
    if args.doubling_token_buckets and engine.runner.token_buckets:  # graphs of the other sizes are captured on use
        doubling = [16 << i for i in range(16) if 16 << i < args.max_num_tokens] + [args.max_num_tokens]
        engine.runner.token_buckets = doubling
    dev = engine.device
    bw = copy_bandwidth(dev)
    weights = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "model": str(model),
        "quantization": args.quantization, "kv_cache_dtype": engine.kv_cache_dtype, "fp8_linears": engine.fp8_linears,
        "load_s": load_s, "attention_splits": not args.no_attention_splits,
        "token_buckets": engine.runner.token_buckets, "kv_cache_tokens": engine.kv_cache_tokens, "kernels": engine.kernels,
        "cuda_graphs": [(g.tokens, g.seqs, g.prompt) for g in engine.runner.shapes()], "copy_bandwidth_GBs": bw / 1e9, "weight_GB": weights / 1e9,
        "roofline_tok_s": bw / weights if dev.type == "cuda" else None,
        "input_len": args.input_len, "output_len": args.output_len, "end_ids": not args.no_end_ids, "rows": [],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)
    vocab = engine.vocab_size
    end_ids = [] if args.no_end_ids else list(engine.default_end_ids)  # what the measured requests name
    run_batch(engine, random_prompts(2, 16, vocab, 0), 8, "warm")
    for b in batches:
        run_batch(engine, random_prompts(b, 16, vocab, 1), 4, f"warm{b}")
        before = {k: v for k, v in engine.stats["time_s"].items()}
        steps_before = engine.stats["decode_steps"] + engine.stats["mixed_steps"]
        row = run_batch(engine, random_prompts(b, args.input_len, vocab, 2 + b), args.output_len, f"b{b}",
                        end_ids=end_ids)
        steps = engine.stats["decode_steps"] + engine.stats["mixed_steps"] - steps_before
        row["engine_ms_per_step"] = {k: 1000 * (engine.stats["time_s"][k] - before[k]) / max(steps, 1)
                                     for k in before}
        row["steps"] = steps
        if result["roofline_tok_s"]:
            row["fraction_of_roofline_per_request"] = row["decode_tok_s_per_request"] / result["roofline_tok_s"]
        result["rows"].append(row)
        print(json.dumps(row), flush=True)

    for c in loops:
        row = closed_loop(engine, c, args.input_len, args.output_len, vocab, args.closed_loop_s,
                          end_ids, args.profile_dir, args.lockstep)
        result.setdefault("closed_loop", []).append(row)
        print(json.dumps(row), flush=True)

    if args.prefix_len:
        result["prefix"] = prefix_reuse(engine, args.prefix_len, vocab)
        print(json.dumps(result["prefix"]), flush=True)
        if args.profile_dir and dev.type == "cuda":
            result["prefix_profile"] = profile_prefix(engine, args.prefix_len, vocab, args.profile_dir)

    if args.profile_dir and dev.type == "cuda" and batches:
        profile_decode(engine, max(batches), args.input_len, vocab, args.profile_dir)
    engine.shutdown()
    del engine
    hf_batches = [int(b) for b in args.hf_batch.split(",") if b]
    if hf_batches:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        result["transformers"] = hf_generate(args.model, hf_batches, args.input_len, args.output_len, dev, dtype)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
