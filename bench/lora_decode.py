"""What serving LoRA adapters costs the torch runtime: decode tokens/s with and without them.

One run, one device: the same engine settings load the model once without adapters and once with
``--adapters`` random rank-``--rank`` adapters on every attention and MLP projection; in the second
run the requests of a batch rotate over the adapters and the base model (mixed batches, the serving
case). Printed per batch size: decode tok/s of each and their ratio.

    python bench/lora_decode.py --model /tmp/llama8b --batch 1,16,64 --json out.json
"""

from __future__ import annotations

import faulthandler
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser  # noqa: E402 - bench/common.py, beside this script
from engine_bench import random_prompts, run_batch  # noqa: E402

from tritonize.runtime.config import ModelArgs  # noqa: E402
from tritonize.runtime.engine import Engine  # noqa: E402


def write_random_adapters(model_dir: Path, out: Path, count: int, rank: int) -> None:
    """``count`` adapters in the tritonize-lora format (the backend's CONTRACT.md), random A and B."""
    args = ModelArgs.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    q, kv, f, d = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.intermediate_size, args.dim
    shapes = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "up": (d, f), "down": (f, d)}
    if args.mlp == "gated":
        shapes["gate"] = (d, f)
    g = torch.Generator().manual_seed(0)
    for task in range(count):
        tensors = {}
        for layer in range(args.n_layers):
            for module, (fan_in, fan_out) in shapes.items():
                tensors[f"layers.{layer}.{module}.A"] = torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5
                tensors[f"layers.{layer}.{module}.B"] = torch.randn(fan_out, rank, generator=g) * 0.01
        folder = out / "lora" / str(task)
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "adapter.safetensors"))
        (folder / "adapter.json").write_text(json.dumps({
            "format": "tritonize-lora", "format_version": 1, "rank": rank, "n_layers": args.n_layers,
            "modules": sorted(shapes), "source": "random", "source_format": "peft", "scale_folded": True}))


def measure(model: Path, batches: list[int], input_len: int, output_len: int, device: str, dtype: str,
            adapters: Path | None, lora_ids: list[int | None] | None) -> tuple[list[dict], float]:
    t = time.perf_counter()
    engine = Engine(model, device=device, dtype=dtype, max_batch_size=max(batches),
                    max_seq_len=input_len + output_len + 8, max_num_tokens=4096, adapters_dir=adapters).start()
    load_s = time.perf_counter() - t
    print(f"loaded ({'with' if adapters else 'without'} adapters) in {load_s:.1f} s", flush=True)
    rows = []
    for batch in batches:
        run_batch(engine, random_prompts(batch, 16, engine.vocab_size, 0), 4, f"w{batch}", lora_ids)  # warm-up
        rows.append(run_batch(engine, random_prompts(batch, input_len, engine.vocab_size, batch), output_len,
                              f"b{batch}{'l' if lora_ids else ''}", lora_ids))
        print(json.dumps({"adapters": bool(adapters), **rows[-1]}), flush=True)
    engine.shutdown()
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows, load_s


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--only-lora", action="store_true", help="skip the run without adapters (diagnosis)")
    ap.add_argument("--stacks-every", type=float, default=0, help="dump all thread stacks every N s (diagnosis)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",") if b]
    if args.stacks_every:
        faulthandler.dump_traceback_later(args.stacks_every, repeat=True)
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "model": str(args.model), "adapters": args.adapters, "rank": args.rank,
              "input_len": args.input_len, "output_len": args.output_len, "torch": torch.__version__}
    base, result["load_s_base"] = ([], 0.0) if args.only_lora else measure(
        args.model, batches, args.input_len, args.output_len, args.device, args.dtype, None, None)
    with tempfile.TemporaryDirectory() as tmp:
        write_random_adapters(args.model, Path(tmp), args.adapters, args.rank)
        ids: list[int | None] = [None, *range(args.adapters)]
        lora, result["load_s_lora"] = measure(args.model, batches, args.input_len, args.output_len, args.device,
                                              args.dtype, Path(tmp), ids)
    result["rows"] = [{"batch": b["batch"], "base_decode_tok_s": b["decode_tok_s"],
                       "lora_decode_tok_s": lo["decode_tok_s"], "ratio": lo["decode_tok_s"] / b["decode_tok_s"]}
                      for b, lo in zip(base, lora)]
    for row in result["rows"]:
        print(f"batch {row['batch']:>3}: base {row['base_decode_tok_s']:8.1f} tok/s, mixed LoRA "
              f"{row['lora_decode_tok_s']:8.1f} tok/s, ratio {row['ratio']:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
