"""The torch runtime alone: decode tokens/s against the memory-bandwidth roofline, and transformers.

Measured in one run, on one device, so every figure is also a ratio to the same run's baselines:
- copy bandwidth (device-to-device, bytes read + written) and the roofline = bandwidth / weight bytes
  (a batch-1 decode step must read every weight once);
- the engine's decode rate per batch size: tokens after the first divided by the time between the
  first and the last token of each request (prefill excluded), summed over the batch;
- transformers `generate` (eager, greedy, same weights) at its batch sizes, tokens/s end to end.

    python bench/runtime_decode.py --model /tmp/llama8b --batch 1,16,64 --hf-batch 1,8,32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch

from tritonize.backend.engine import Engine, GenerationRequest, SamplingParams


def copy_bandwidth(device: torch.device, gib: float = 2.0) -> float:
    """Bytes moved per second by a device-to-device copy (read + write), best of 10."""
    if device.type != "cuda":
        return float("nan")
    n = int(gib * (1 << 30)) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(12):
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    del a, b
    return 2 * n * 2 / best


def weight_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def engine_decode(engine: Engine, batch: int, input_len: int, output_len: int, vocab: int,
                  lora_ids: list[int | None] | None = None) -> dict:
    """Submits ``batch`` requests at once and times each one's decode phase from its token callbacks.

    ``lora_ids``: request i uses adapter ``lora_ids[i % len(lora_ids)]`` (None: the base model)."""
    g = torch.Generator().manual_seed(batch)
    times: dict[int, list[float]] = {i: [] for i in range(batch)}
    done = threading.Event()
    remaining = [batch]

    def on_output(i: int, out) -> None:  # noqa: ANN001 - called on the engine thread: never block here
        times[i].append(time.perf_counter())
        if out.finished:
            remaining[0] -= 1
            if remaining[0] == 0:
                done.set()

    start = time.perf_counter()
    for i in range(batch):
        prompt = torch.randint(100, vocab - 100, (input_len,), generator=g).tolist()
        engine.submit(GenerationRequest(
            request_id=f"b{batch}-{i}", prompt_ids=prompt, max_new_tokens=output_len,
            sampling=SamplingParams(min_tokens=output_len), stream=True,
            on_output=lambda out, i=i: on_output(i, out),
            lora_task_id=lora_ids[i % len(lora_ids)] if lora_ids else None))
    done.wait()
    wall = time.perf_counter() - start
    per_request = [(len(t) - 1) / (t[-1] - t[0]) for t in times.values() if len(t) > 1]
    ttft = sorted(t[0] - start for t in times.values())
    return {
        "batch": batch,
        "decode_tok_s": sum(per_request),
        "decode_tok_s_per_request": sum(per_request) / len(per_request),
        "end_to_end_tok_s": batch * output_len / wall,
        "ttft_s_median": ttft[len(ttft) // 2],
        "wall_s": wall,
    }


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--hf-batch", default="1,8,32", help="transformers batch sizes ('' to skip)")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",") if b]
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result: dict = {"device": device_name, "model": str(args.model), "input_len": args.input_len,
                    "output_len": args.output_len, "torch": torch.__version__}

    if not batches:  # transformers only
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        result["transformers"] = hf_generate(args.model, [int(b) for b in args.hf_batch.split(",") if b],
                                             args.input_len, args.output_len, dev,
                                             torch.bfloat16 if dev.type == "cuda" else torch.float32)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return
    t = time.perf_counter()
    kwargs = {}
    engine = Engine(args.model, device=args.device, dtype=args.dtype, max_batch_size=max(batches),
                    max_seq_len=args.input_len + args.output_len + 8, max_num_tokens=4096, **kwargs)
    engine.start()
    result["load_s"] = time.perf_counter() - t
    dev = engine.device
    bw = copy_bandwidth(dev)
    wbytes = weight_bytes(args.model)
    result.update({"copy_bandwidth_GBs": bw / 1e9, "weight_GB": wbytes / 1e9,
                   "roofline_tok_s": bw / wbytes if dev.type == "cuda" else None})
    # bandwidth counted as bytes read + written, as the design brief's 2.99 TB/s is
    print(json.dumps({k: result[k] for k in ("device", "copy_bandwidth_GBs", "weight_GB", "roofline_tok_s")}),
          flush=True)
    vocab = engine.vocab_size
    engine_decode(engine, 1, 16, 8, vocab)  # warm-up: captures / compiles the batch-1 step
    rows = []
    for batch in batches:
        engine_decode(engine, batch, 16, 4, vocab)  # warm-up for this bucket
        row = engine_decode(engine, batch, args.input_len, args.output_len, vocab)
        if result["roofline_tok_s"]:
            row["fraction_of_roofline_per_request"] = row["decode_tok_s_per_request"] / result["roofline_tok_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result["engine"] = rows
    engine.shutdown()
    del engine
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    hf_batches = [int(b) for b in args.hf_batch.split(",") if b]
    if hf_batches:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        result["transformers"] = hf_generate(args.model, hf_batches, args.input_len, args.output_len, dev, dtype)
        base = {r["batch"]: r["tok_s"] for r in result["transformers"]}
        for row in rows:
            ref = base.get(row["batch"]) or (base.get(1) if row["batch"] == 1 else None)
            if ref:
                row["ratio_to_transformers"] = row["end_to_end_tok_s"] / ref
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
