"""The linears of one decode step, per kernel, on one GPU: what each way of multiplying by FP8 weights costs
against bfloat16, in microseconds and in GB/s of weights read (bench/RESULTS.md, "FP8 against bf16").

    python bench/fp8_kernels.py --json /tmp/bench-out/fp8-kernels.json

For the four linears of a decoder layer of the chosen shape (fused q/k/v, o, fused gate/up, down) at M rows:
``bf16`` (F.linear on bfloat16 weights: the baseline), ``scaled_mm`` (per-token activation quantization then
torch._scaled_mm: what FP8 runs for steps of more rows than TRITONIZE_FP8_WEIGHT_ONLY_ROWS) and ``weight-only``
(cuda_kernels.fp8_weight_only_linear: steps of up to that many rows, 64 at most) in every tiling of a small grid
(its own for more than 16 rows), whole K per program
and K shared among 2-8 programs per output tile (split-K); the best tiling per linear is reported (and the best
split-K one apart), with the layer's total per kernel. Each timing
replays a CUDA graph of 20 calls, so launch costs count as they do in a captured decode step. Weights are random:
only their sizes matter here.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tritonize.runtime.cuda_kernels import WEIGHT_ONLY_MAX_ROWS, fp8_weight_only_linear, per_token_fp8  # noqa: E402

SHAPES = {  # (n, k) of the fused q/k/v, o, fused gate/up and down projections
    "llama3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
}
GRID = {"block_n": (16, 32, 64), "block_k": (128, 256, 512), "num_warps": (4, 8), "num_stages": (3, 5)}
# K shared among split_k programs per output tile (the narrow linears leave SMs idle with whole-K programs)
SPLIT_GRID = {"block_n": (16, 32, 64), "block_k": (128, 256), "num_warps": (4,), "num_stages": (3,),
              "split_k": (2, 4, 8)}
# More than 16 rows (a program holds 32 or 64): shorter steps of K, whose activation tiles fit
WIDE_GRID = {"block_n": (32, 64), "block_k": (64, 128, 256), "num_warps": (4, 8), "num_stages": (3, 4)}
WIDE_SPLIT_GRID = {"block_n": (32, 64), "block_k": (128,), "num_warps": (4,), "num_stages": (3,), "split_k": (2, 4)}


def tilings(m: int) -> list[dict]:
    """Every tiling timed for ``m`` rows: whole K per program, then K shared."""
    grid, split_grid = (GRID, SPLIT_GRID) if m <= 16 else (WIDE_GRID, WIDE_SPLIT_GRID)
    whole = [dict(zip(grid, v, strict=True), split_k=1) for v in itertools.product(*grid.values())]
    return whole + [dict(zip(split_grid, v, strict=True)) for v in itertools.product(*split_grid.values())]


def time_us(fn, calls: int = 20, reps: int = 20) -> float:
    """Median microseconds per call over ``reps`` replays of a graph of ``calls`` calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
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
    """What runtime.quantize.ScaledMMLinear does: per-token FP8 activations, then the FP8 GEMM."""
    xq, xs = per_token_fp8(x)
    return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=scale.view(1, -1), out_dtype=torch.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--rows", default="1,16,64", help="M: rows of the step (comma-separated)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    results = {"card": torch.cuda.get_device_name(dev), "shape": args.shape, "linears": []}
    for m in (int(r) for r in args.rows.split(",")):
        totals: dict[str, float] = {}
        for name, (n, k) in SHAPES[args.shape].items():
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5
            scale = (w.abs().amax(dim=1).float() / 448.0).clamp(min=1e-12)
            wq = (w.float() / scale[:, None]).to(torch.float8_e4m3fn)
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            row = {"rows": m, "linear": name, "n": n, "k": k}
            row["bf16"] = time_us(partial(F.linear, x, w))
            row["scaled_mm"] = time_us(partial(scaled_mm, x, wq, scale))
            best = None
            if m <= WEIGHT_ONLY_MAX_ROWS:
                best_split = None
                for tiling in tilings(m):
                    try:
                        t = time_us(partial(fp8_weight_only_linear, x, wq, scale, **tiling))
                    except Exception as e:  # a tiling that does not fit the card's shared memory
                        print(f"  {name} m={m} {tiling}: {type(e).__name__}", file=sys.stderr)
                        continue
                    if best is None or t < best[0]:
                        best = (t, tiling)
                    if tiling["split_k"] > 1 and (best_split is None or t < best_split[0]):
                        best_split = (t, tiling)
                default = time_us(partial(fp8_weight_only_linear, x, wq, scale))
                row["weight_only_default"] = default
                row["weight_only"], row["weight_only_tiling"] = best
                if best_split is not None:
                    row["weight_only_split"], row["weight_only_split_tiling"] = best_split
            for kind, nbytes in (("bf16", 2), ("scaled_mm", 1), ("weight_only", 1)):
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
