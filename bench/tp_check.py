"""The split engine against the one-device engine on the same weights: greedy tokens must be equal.

Run it first on a machine with several GPUs (NCCL, Triton kernels, CUDA graphs with the all-reduces inside):
each tensor parallelism in --sizes that the GPUs allow serves the same prompts as tensor parallelism 1, in
float32, over a model small enough to load at once; a decode batch and a prefill-heavy batch (graphs of both
kinds replay). Prints one JSON line per size; exits 1 if any token differs.

    python bench/tp_check.py --device cuda --sizes 2,4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", default="2,4")
    ap.add_argument("--new-tokens", type=int, default=24)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_model import write_model

    from tritonize.runtime.engine import Engine

    gpus = torch.cuda.device_count() if args.device == "cuda" else 64
    sizes = [s for s in (int(x) for x in args.sizes.split(",")) if s <= gpus]
    work = Path(tempfile.mkdtemp(prefix="tp-check-"))
    # 16 heads over 8 kv heads: 2 ranks split both, 4 split both, 16 would replicate each kv head twice
    shape = dict(hidden=1024, layers=4, heads=16, kv_heads=8, ffn=2816, vocab=32000)
    model = write_model(work / "model", shape, dtype=torch.float32, tokenizer=None)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 31000, (n,), generator=g).tolist() for n in (5, 17, 64, 200, 9, 33, 1, 120)]
    limits = dict(device=args.device, dtype="float32", max_batch_size=16, max_seq_len=512, max_num_tokens=256)
    with Engine(model, **limits) as one:
        want = one.generate(prompts, max_new_tokens=args.new_tokens)
    failed = False
    for size in sizes:
        start = time.perf_counter()
        with Engine(model, tensor_parallel_size=size, **limits) as split:
            ready = time.perf_counter() - start
            got = split.generate(prompts, max_new_tokens=args.new_tokens)
            graphs = len(split.runner.graphs)
        same = [a == b for a, b in zip(got, want)]
        first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(got, want)]
        print(json.dumps({"tensor_parallel_size": size, "device": args.device, "equal": sum(same),
                          "prompts": len(prompts), "first_difference": first, "graphs": graphs,
                          "distinct_tokens": len({t for row in want for t in row}),
                          "ready_s": round(ready, 1)}), flush=True)
        failed |= not all(same)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
