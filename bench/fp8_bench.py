"""FP8 against bfloat16 on one GPU, in one run (bench/RESULTS.md, "FP8 against bf16").

One command on an H100 (PyTorch + CUDA, the Triton kit of bench/gpu_suite.sh for tritonserver and
perf_analyzer):

    python bench/fp8_bench.py --model /tmp/llama8b --out /tmp/bench-out/fp8

--model is a bfloat16 HF checkpoint (bench/make_model.py --shape llama3-8b writes the 8B shape; made here
when missing). Its FP8 version is written once beside it (``tritonize export --quantization fp8``: every
decoder linear per output channel, embedding / norms / LM head bfloat16). Three variants, measured in the
same run so the ratios compare like with like: ``bf16`` (the baseline), ``fp8`` (FP8 weights as served: steps of up
to 16 rows on the weight-only kernel, up to 128 on Triton's FP8 x FP8 kernel, larger ones through torch._scaled_mm;
bfloat16 KV cache) and ``fp8-kv`` (the same with an FP8 KV cache); ``--variants`` may add ``fp8-mm`` (every step
through torch._scaled_mm: the default before 2026-12-06, whose runs called the default ``fp8`` and the weight-only
one ``fp8-wo``), ``fp8-wo-mm`` (steps above 16 rows through torch._scaled_mm: the default before RESULTS section
16) and ``fp8-head`` (the LM head in FP8 too: ``--fp8-lm-head``, its own checkpoint). Phases (``--phases``, each in its own process so the GPU is empty between them):

- ``logits``: the logits of the FP8 model and of the bf16 one on 8 prompts (every position): cosine
  similarity (min and mean over prompts), top-1 agreement per position. FP8 runs as it is served (the prompts
  are under 16 tokens: the weight-only kernel on a GPU with FP8), and on a GPU also with the activations
  quantized per token: ``fp8-w8a8`` (Triton's FP8 x FP8 kernel) and ``fp8-mm`` (torch._scaled_mm).
- ``engine``: bench/engine_bench.py per variant, batches 1 and 64, 128 prompt / 128 output tokens: decode
  tok/s (the runtime alone, CUDA graphs and Triton kernels on).
- ``serve``: bench/serve_load.py per variant through the generated repository on tritonserver, concurrency
  1 and 64, perf_analyzer (--streaming) when on PATH, tritonize's load generator always.

The summary (JSON and a Markdown table with the issue's targets: batch 1 >= 1.6x, 64 streams >= 1.3x,
cosine >= 0.99) lands in --out. Random weights are a harsh case for the cosine: report what is seen.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import fp8_checkpoint  # noqa: E402

# quantization, KV cache, environment: fp8-mm sends every step through torch._scaled_mm; fp8-wo-mm steps of more
# than 16 rows (the default before section 16); fp8-head has the LM head in FP8 too (--fp8-lm-head)
VARIANTS = {"bf16": ("auto", "model", {}), "fp8": ("fp8", "model", {}), "fp8-kv": ("fp8", "fp8", {}),
            "fp8-mm": ("fp8", "model", {"TRITONIZE_FP8_WEIGHT_ONLY_ROWS": "0", "TRITONIZE_FP8_KERNEL_ROWS": "0"}),
            "fp8-wo-mm": ("fp8", "model", {"TRITONIZE_FP8_KERNEL_ROWS": "0"}), "fp8-head": ("fp8-head", "model", {})}
DEFAULT_VARIANTS = "bf16,fp8,fp8-kv"
PROMPTS = [
    "The capital of France is", "def fibonacci(n):\n    if n < 2:", "Once upon a time, in a land far away,",
    "The mitochondria is the powerhouse of", "SELECT name, count(*) FROM users WHERE", "1, 1, 2, 3, 5, 8, 13,",
    "In 1969 the first humans walked on", "Translate to French: the cat sits on the mat.",
]
TARGETS = {"batch-1 decode": 1.6, "64 streams": 1.3, "cosine": 0.99}


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    print("+ " + " ".join([*(f"{k}={v}" for k, v in (env or {}).items()), *cmd]), flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})})
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        if proc.wait() != 0:
            raise SystemExit(f"{cmd[1]} failed (exit {proc.returncode}); see {log}")


def logits_phase(model: Path, fp8: Path, device: str, out: Path) -> dict:
    """Cosine similarity of the FP8 model's logits to the bf16 model's, every position of 8 prompts."""
    import torch

    from tritonize.runtime import quantize
    from tritonize.runtime.model import prompt_logits
    from tritonize.runtime.quantize import FP8, fp8_matmul_supported, use_fp8_matmul
    from tritonize.runtime.tokenizer import Tokenizer
    from tritonize.runtime.weights import load_model

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else device if device != "auto" else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tok = Tokenizer(model)
    prompts = [tok.encode(p) for p in PROMPTS]

    default_rows, default_kernel_rows = quantize.WEIGHT_ONLY_ROWS, quantize.KERNEL_ROWS

    def logits(path: Path, fp8_kv: bool = False, activations: str = "") -> list[torch.Tensor]:
        quantize.WEIGHT_ONLY_ROWS = 0 if activations else default_rows  # read at each call
        quantize.KERNEL_ROWS = 0 if activations == "scaled_mm" else default_kernel_rows
        m = load_model(path, device=dev, dtype=dtype)
        swapped = use_fp8_matmul(m) if fp8_matmul_supported(dev) else 0
        m.kv_cache_dtype = FP8 if fp8_kv else None
        with torch.no_grad():
            out = [prompt_logits(m, ids).float().cpu() for ids in prompts]
        print(f"{path.name}{' + FP8 KV cache' if fp8_kv else ''}{' all through ' + activations if activations else ''}: "
              f"{swapped} FP8 GEMM linears", flush=True)
        del m
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return out

    base = logits(model)
    result: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "prompts": PROMPTS}
    variants = [("fp8", {}), ("fp8-kv", {"fp8_kv": True})]
    if dev.type == "cuda":  # FP8 GEMMs: activations rounded to FP8 too
        variants += [("fp8-w8a8", {"activations": "kernel"}), ("fp8-mm", {"activations": "scaled_mm"})]
    for name, kwargs in variants:
        got = logits(fp8, **kwargs)
        cos = [float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) for a, b in zip(got, base)]
        last = [float(torch.nn.functional.cosine_similarity(a[-1], b[-1], dim=0)) for a, b in zip(got, base)]
        top1 = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(got, base))
        result[name] = {"cosine_min": min(cos), "cosine_mean": sum(cos) / len(cos), "cosine_last_token_min": min(last),
                        "top1_agreement": top1 / sum(len(p) for p in prompts), "cosine_per_prompt": cos}
        print(f"{name}: {json.dumps(result[name])}", flush=True)
    (out / "logits.json").write_text(json.dumps(result, indent=2))
    return result


def _served_tok_s(run: dict, concurrency: int) -> tuple[float | None, str]:
    rows = [r for r in run.get("runs", []) if r.get("concurrency") == concurrency]
    for tool in ("perf_analyzer", "tritonize-loadgen"):
        for r in rows:
            if r.get("tool") == tool and r.get("output_tokens_per_s"):
                return float(r["output_tokens_per_s"]), tool
    return None, "-"


def summary(out: Path, variants: list[str], low: int = 1, high: int = 64, lengths: tuple[int, int] = (128, 128)) -> dict:
    """The table of the run in ``out``: the engine's decode tok/s at batch ``low`` and ``high``, served tok/s at
    those concurrencies, each against bf16."""
    result: dict = {"date": time.strftime("%Y-%m-%d"), "variants": variants}
    if (out / "logits.json").is_file():
        result["logits"] = json.loads((out / "logits.json").read_text())
    engine = {v: json.loads((out / f"engine-{v}.json").read_text()) for v in variants
              if (out / f"engine-{v}.json").is_file()}
    serve = {v: json.loads((out / f"serve-{v}.json").read_text()) for v in variants
             if (out / f"serve-{v}.json").is_file()}
    lines = [f"| variant | engine decode b={low} tok/s | ratio | engine decode b={high} tok/s | ratio | served c={low} "
             f"tok/s | ratio | served c={high} tok/s | ratio | KV tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
    base_e = {r["batch"]: r["decode_tok_s"] for r in engine.get("bf16", {}).get("rows", [])}
    base_s = {c: _served_tok_s(serve.get("bf16", {}), c)[0] for c in (low, high)}
    result["table"] = {}
    for v in variants:
        e = {r["batch"]: r["decode_tok_s"] for r in engine.get(v, {}).get("rows", [])}
        s = {c: _served_tok_s(serve.get(v, {}), c) for c in (low, high)}

        def ratio(x, y):
            return f"{x / y:.2f}x" if x and y else "-"

        row = {f"engine_b{low}": e.get(low), f"engine_b{high}": e.get(high), f"served_c{low}": s[low][0],
               f"served_c{high}": s[high][0], "served_tool": s[low][1],
               "kv_cache_tokens": engine.get(v, {}).get("kv_cache_tokens")}
        result["table"][v] = row
        cells = [f"{e[low]:.0f}" if e.get(low) else "-", ratio(e.get(low), base_e.get(low)),
                 f"{e[high]:.0f}" if e.get(high) else "-", ratio(e.get(high), base_e.get(high)),
                 f"{s[low][0]:.0f}" if s[low][0] else "-", ratio(s[low][0], base_s[low]),
                 f"{s[high][0]:.0f}" if s[high][0] else "-", ratio(s[high][0], base_s[high]),
                 str(row["kv_cache_tokens"])]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    if "logits" in result:
        for v in ("fp8", "fp8-kv", "fp8-w8a8", "fp8-mm"):
            if v in result["logits"]:
                lg = result["logits"][v]
                lines.append(f"\n{v}: logits cosine similarity to bf16 on 8 prompts: min {lg['cosine_min']:.4f}, mean "
                             f"{lg['cosine_mean']:.4f}; top-1 agreement {lg['top1_agreement']:.1%}")
    device = next((d.get("device") for d in (*engine.values(), *serve.values()) if d.get("device")), "?")
    lines.insert(0, f"FP8 vs bf16, {device}, {result['date']}, {lengths[0]} prompt / {lengths[1]} output tokens "
                    f"(targets: batch 1 >= {TARGETS['batch-1 decode']}x, 64 streams >= {TARGETS['64 streams']}x, "
                    f"cosine >= {TARGETS['cosine']})\n")
    text = "\n".join(lines)
    (out / "fp8-summary.md").write_text(text + "\n")
    (out / "fp8-summary.json").write_text(json.dumps(result, indent=2, default=float))
    print(text, flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("/tmp/llama8b"), help="a bfloat16 HF-format checkpoint")
    ap.add_argument("--shape", default="llama3-8b", help="bench/make_model.py shape, when --model is missing")
    ap.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.model for make_model.py")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-out/fp8"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--phases", default="logits,engine,serve")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of load per concurrency (serve)")
    ap.add_argument("--logits-only-in-process", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    variants = [v for v in args.variants.split(",") if v]
    phases = [p for p in args.phases.split(",") if p]
    if args.logits_only_in_process:
        logits_phase(args.model, fp8_checkpoint(args.model), args.device, args.out)
        return
    if not (args.model / "config.json").is_file():
        cmd = [sys.executable, str(HERE / "make_model.py"), "--shape", args.shape, "--out", str(args.model)]
        _run(cmd + (["--tokenizer", str(args.tokenizer)] if args.tokenizer else []), args.out / "make-model.log")
    fp8_checkpoint(args.model)
    py = sys.executable
    common = ["--model", str(args.model), "--device", args.device, "--dtype", "bfloat16" if args.device == "cuda"
              else "auto", "--input-len", str(args.input_len), "--output-len", str(args.output_len)]
    if "logits" in phases:
        _run([py, __file__, "--model", str(args.model), "--out", str(args.out), "--device", args.device,
              "--logits-only-in-process"], args.out / "logits.log")
    for v in variants:
        quantization, kv, env = VARIANTS[v]
        flags = [*common, "--quantization", quantization, "--kv-cache-dtype", kv]
        if "engine" in phases:
            _run([py, str(HERE / "engine_bench.py"), *flags, "--batches", args.batches, "--prefix-len", "0",
                  "--json", str(args.out / f"engine-{v}.json")], args.out / f"engine-{v}.log", env)
        if "serve" in phases:
            _run([py, str(HERE / "serve_load.py"), *flags, "--concurrency", args.batches, "--prefix-len", "0",
                  "--duration", str(args.duration), "--workdir", str(args.out / f"serve-{v}"),
                  "--json", str(args.out / f"serve-{v}.json")], args.out / f"serve-{v}.log", env)
    levels = [int(b) for b in args.batches.split(",") if b]
    summary(args.out, variants, min(levels), max(levels), (args.input_len, args.output_len))


if __name__ == "__main__":
    main()
