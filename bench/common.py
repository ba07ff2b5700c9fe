"""What every benchmark script here takes: the model, where it runs, the prompt and output lengths, and FP8."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def parser(doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="an HF-format checkpoint directory")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--quantization", choices=("auto", "fp8", "fp8-head"), default="auto",
                    help="fp8: run --model's linears in FP8 (quantized per channel once, into <model>-fp8); "
                         "fp8-head: the LM head too (<model>-fp8-head)")
    ap.add_argument("--kv-cache-dtype", choices=("auto", "fp8", "model"), default="auto",
                    help="the KV cache: fp8, the model's dtype, or as the checkpoint says (auto)")
    return ap


def fp8_checkpoint(model: Path, lm_head: bool = False) -> Path:
    """``model`` with its linears in FP8 (``tritonize export --quantization fp8``, with ``--fp8-lm-head`` when
    ``lm_head``), written once beside it."""
    out = model.parent / f"{model.name}-fp8{'-head' if lm_head else ''}"
    if not (out / "config.json").is_file():
        from tritonize.export import export_checkpoint

        t = time.perf_counter()
        export_checkpoint(model, out, quantization="fp8", fp8_lm_head=lm_head, progress=True, force=True)
        print(f"quantized {model} to FP8 in {time.perf_counter() - t:.0f} s: {out}", flush=True)
    return out


def checkpoint_for(args: argparse.Namespace) -> Path:
    """The checkpoint a run serves: --model, or its FP8 version with --quantization fp8 / fp8-head."""
    if args.quantization == "auto":
        return args.model
    return fp8_checkpoint(args.model, lm_head=args.quantization == "fp8-head")
