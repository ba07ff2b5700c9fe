"""The linears of one decode step, per kernel, on one GPU: what each way of multiplying by FP8 weights costs
against bfloat16, in microseconds and in GB/s of weights read (bench/RESULTS.md, "FP8 against bf16").

    python bench/fp8_kernels.py --rows 1,16,32,64,128,256 --json /tmp/bench-out/fp8-kernels.json

For the four linears of a decoder layer of the chosen shape (fused q/k/v, o, fused gate/up, down) at M rows:
``bf16`` (F.linear on bfloat16 weights: the baseline), ``scaled_mm`` (per-token activation quantization then
torch._scaled_mm: what FP8 runs for steps of more rows than TRITONIZE_FP8_KERNEL_ROWS), ``fp8_kernel``
(per-token quantization then cuda_kernels.fp8_scaled_linear: FP8 x FP8 in Triton), ``weight_only``
(cuda_kernels.fp8_weight_only_linear: the activations as they are, steps of up to TRITONIZE_FP8_WEIGHT_ONLY_ROWS)
and, at one row, ``vector`` (the same kernel with ``block_m=1``: a matrix-vector product on the CUDA cores). Each
Triton kernel is timed in every tiling of a small grid, whole K per program and K shared among programs per output
tile (split-K); the best tiling per linear is reported, and the runtime's own choice (``*_default``), with the
layer's total per kernel. Each timing replays a CUDA graph of 20 calls, so launch costs count as they do in a
captured decode step; the calls go round enough copies of the weight (at least 128 MB) that none is read from L2
(the card's 50 MB would hold a small linear's FP8 weight, which a step never finds there). Weights are random:
only their sizes matter here.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tritonize.runtime.cuda_kernels import (  # noqa: E402
    WEIGHT_ONLY_MAX_ROWS,
    fp8_scaled_linear,
    fp8_weight_only_linear,
    per_token_fp8,
)

SHAPES = {  # (n, k) of the fused q/k/v, o, fused gate/up and down projections
    "llama3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
}
ROTATE_BYTES = 128e6  # weights the calls of one timing go round: more than twice an H100's L2


def _grid(**axes) -> list[dict]:
    return [dict(zip(axes, v, strict=True)) for v in itertools.product(*axes.values())]


# Weight-only at up to 16 rows (a program holds 16): whole K, then K shared (the narrow linears leave SMs idle)
WEIGHT_ONLY = (_grid(block_n=(16, 32, 64), block_k=(128, 256, 512), num_warps=(4, 8), num_stages=(3, 5), split_k=(1,))
               + _grid(block_n=(16, 32, 64), block_k=(128, 256), num_warps=(4,), num_stages=(3,), split_k=(2, 4, 8)))
# More than 16 rows (a program holds 32 or 64): shorter steps of K, whose activation tiles fit
WEIGHT_ONLY_WIDE = (_grid(block_n=(32, 64), block_k=(64, 128, 256), num_warps=(4, 8), num_stages=(3, 4), split_k=(1,))
                    + _grid(block_n=(32, 64), block_k=(128,), num_warps=(4,), num_stages=(3,), split_k=(2, 4)))
# One row on the CUDA cores: a few output columns a program, long steps of K
VECTOR = _grid(block_m=(1,), block_n=(8, 16, 32), block_k=(256, 512), num_warps=(4, 8), num_stages=(3,),
               split_k=(1, 2, 4))
# FP8 x FP8: tiles of 64 rows (Hopper's FP8 instruction), 128 with two warp groups for large steps
FP8_KERNEL = _grid(block_m=(64,), block_n=(64, 128), block_k=(128, 256), num_warps=(4,), num_stages=(3, 5),
                   split_k=(1, 2, 4))
FP8_KERNEL_LARGE = _grid(block_m=(128,), block_n=(64, 128), block_k=(128,), num_warps=(8,), num_stages=(3, 4),
                         split_k=(1, 2))


def time_us(fns: list, calls: int = 20, reps: int = 20) -> float:
    """Median microseconds per call over ``reps`` replays of a graph of ``calls`` calls, going round ``fns`` (one
    per copy of the weight)."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return sorted(times)[len(times) // 2]


def scaled_mm(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What runtime.quantize.ScaledMMLinear does for large steps: per-token FP8 activations, then the FP8 GEMM."""
    xq, xs = per_token_fp8(x)
    return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=scale.view(1, -1), out_dtype=torch.bfloat16)


def fp8_kernel(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, **tiling: int) -> torch.Tensor:
    """What it does for decode-sized steps: per-token FP8 activations, then Triton's FP8 x FP8 kernel."""
    xq, xs = per_token_fp8(x)
    return fp8_scaled_linear(xq, xs, wq, scale, **tiling)


def best_of(kind: str, fn, weights: list, grid: list[dict], label: str) -> tuple[float, dict] | None:
    """(microseconds, tiling) of the fastest tiling of ``grid`` for ``fn(weight, scale, **tiling)``; None for an
    empty grid (``--defaults-only``) or one that none fits."""
    best = None
    for tiling in grid:
        try:
            t = time_us([partial(fn, w, s, **tiling) for w, s in weights])
        except Exception as e:  # a tiling that does not fit the card's shared memory
            print(f"  {label} {kind} {tiling}: {type(e).__name__}", file=sys.stderr)
            continue
        if best is None or t < best[0]:
            best = (t, tiling)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--rows", default="1,16,32,64,128,256", help="M: rows of the step (comma-separated)")
    ap.add_argument("--weight-only-rows", type=int, default=16,
                    help="time the weight-only kernel's grid up to this many rows (64 at most)")
    ap.add_argument("--defaults-only", action="store_true",
                    help="time each kernel in the runtime's own tiling only (no grid)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    results = {"card": torch.cuda.get_device_name(dev), "shape": args.shape, "rotate_bytes": ROTATE_BYTES,
               "linears": []}
    for m in (int(r) for r in args.rows.split(",")):
        totals: dict[str, float] = {}
        for name, (n, k) in SHAPES[args.shape].items():
            label = f"{name} m={m}"
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5
            scale = (w.abs().amax(dim=1).float() / 448.0).clamp(min=1e-12)
            wq = (w.float() / scale[:, None]).to(torch.float8_e4m3fn)
            bf16 = [w] + [w.clone() for _ in range(math.ceil(ROTATE_BYTES / (2 * n * k)) - 1)]
            fp8 = [(wq, scale)] + [(wq.clone(), scale.clone()) for _ in range(math.ceil(ROTATE_BYTES / (n * k)) - 1)]
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            row = {"rows": m, "linear": name, "n": n, "k": k, "weight_copies": len(fp8)}
            row["bf16"] = time_us([partial(F.linear, x, b) for b in bf16])
            row["scaled_mm"] = time_us([partial(scaled_mm, x, q, s) for q, s in fp8])
            kinds = [("fp8_kernel", partial(fp8_kernel, x), FP8_KERNEL + (FP8_KERNEL_LARGE if m >= 128 else []))]
            if m <= min(args.weight_only_rows, WEIGHT_ONLY_MAX_ROWS):
                kinds.append(("weight_only", partial(fp8_weight_only_linear, x),
                              WEIGHT_ONLY if m <= 16 else WEIGHT_ONLY_WIDE))
            if m == 1:
                kinds.append(("vector", partial(fp8_weight_only_linear, x), VECTOR))
            for kind, fn, grid in kinds:
                if kind != "vector":
                    row[f"{kind}_default"] = time_us([partial(fn, q, s) for q, s in fp8])
                best = best_of(kind, fn, fp8, [] if args.defaults_only else grid, label)
                if best is not None:
                    row[kind], row[f"{kind}_tiling"] = best
            for kind, nbytes in (("bf16", 2), ("scaled_mm", 1), ("fp8_kernel", 1), ("fp8_kernel_default", 1),
                                 ("weight_only", 1), ("weight_only_default", 1), ("vector", 1)):
                if kind in row:
                    row[f"{kind}_GBps"] = round(n * k * nbytes / row[kind] / 1e3, 1)
                    totals[kind] = totals.get(kind, 0.0) + row[kind]
            results["linears"].append(row)
            print(json.dumps(row), flush=True)
        per_layer = {"rows": m, **{f"{kind}_us": round(t, 1) for kind, t in totals.items()}}
        per_layer.update({f"{kind}_speedup": round(totals["bf16"] / t, 2) for kind, t in totals.items() if kind != "bf16"})
        results.setdefault("per_layer", []).append(per_layer)
        print(json.dumps({"per_layer": per_layer}), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
