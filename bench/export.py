"""Export benchmark: time and peak memory of ``tritonize export`` on a multi-GB checkpoint.

Writes a random-weight checkpoint with Llama-3.1-8B layer shapes (hidden 4096, 32 heads, 8 KV
heads, FFN 14336, vocabulary 128256) but only a few layers, once as a NeMo 2 directory
(Megatron-Core names, layer-stacked tensors, torch_dist via torch's own DCP writer) and once as a
Hugging Face directory (sharded safetensors). Each is exported in a fresh subprocess, which
reports its own peak RSS; a plain copy of the same weight files is the baseline.

    python bench/export.py                      # 2 layers, bfloat16: ~3.0 GB per checkpoint
    python bench/export.py --layers 1 --small   # seconds-long smoke run
    python bench/export.py --markdown out.md    # also write the result table
    python bench/export.py --convert float16    # add a run that converts every weight

Targets: peak RSS under 25% of the checkpoint size, export time under 3x the copy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

SHAPES_8B = dict(hidden=4096, heads=32, kv_heads=8, ffn=14336, vocab=128256)
SHAPES_SMALL = dict(hidden=512, heads=8, kv_heads=2, ffn=1792, vocab=32000)


def _rand(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(dtype)


def write_nemo2(path: Path, layers: int, s: dict, dtype: torch.dtype) -> None:
    """NeMo 2 layout: context/model.yaml + weights/ (torch DCP, Megatron-Core keys)."""
    import torch.distributed.checkpoint as dcp
    import yaml

    h, d = s["hidden"], s["hidden"] // s["heads"]
    qkv = (s["heads"] + 2 * s["kv_heads"]) * d
    gen = torch.Generator().manual_seed(0)
    state = {
        "module.embedding.word_embeddings.weight": _rand((s["vocab"], h), gen, dtype),
        "module.decoder.layers.self_attention.linear_qkv.layer_norm_weight": torch.ones(layers, h, dtype=dtype),
        "module.decoder.layers.self_attention.linear_qkv.weight": _rand((layers, qkv, h), gen, dtype),
        "module.decoder.layers.self_attention.linear_proj.weight": _rand((layers, h, s["heads"] * d), gen, dtype),
        "module.decoder.layers.mlp.linear_fc1.layer_norm_weight": torch.ones(layers, h, dtype=dtype),
        "module.decoder.layers.mlp.linear_fc1.weight": _rand((layers, 2 * s["ffn"], h), gen, dtype),
        "module.decoder.layers.mlp.linear_fc2.weight": _rand((layers, h, s["ffn"]), gen, dtype),
        "module.decoder.final_layernorm.weight": torch.ones(h, dtype=dtype),
        "module.output_layer.weight": _rand((s["vocab"], h), gen, dtype),
    }
    (path / "weights").mkdir(parents=True)
    dcp.save(state, checkpoint_id=str(path / "weights"), no_dist=True)
    (path / "weights" / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    del state
    config = {
        "_target_": "nemo.collections.llm.gpt.model.llama.LlamaConfig",
        "num_layers": layers, "hidden_size": h, "ffn_hidden_size": s["ffn"], "num_attention_heads": s["heads"],
        "num_query_groups": s["kv_heads"], "kv_channels": d, "vocab_size": s["vocab"], "normalization": "RMSNorm",
        "gated_linear_unit": True, "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
        "add_bias_linear": False, "position_embedding_type": "rope", "rotary_base": 500000.0, "seq_length": 8192,
        "share_embeddings_and_output_weights": False, "layernorm_epsilon": 1e-5,
    }
    model = {"_target_": "nemo.collections.llm.gpt.model.llama.LlamaModel", "config": config, "tokenizer": None}
    (path / "context").mkdir()
    (path / "context" / "model.yaml").write_text(yaml.safe_dump(model, sort_keys=False))


def write_hf(path: Path, layers: int, s: dict, dtype: torch.dtype, shard_bytes: int = 2 << 30) -> None:
    """Hugging Face layout: config.json + model-0000i-of-0000n.safetensors + index."""
    from safetensors.torch import save_file

    h, d = s["hidden"], s["hidden"] // s["heads"]
    gen = torch.Generator().manual_seed(0)
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (s["vocab"], h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                   (p + "self_attn.q_proj.weight", (s["heads"] * d, h)),
                   (p + "self_attn.k_proj.weight", (s["kv_heads"] * d, h)),
                   (p + "self_attn.v_proj.weight", (s["kv_heads"] * d, h)),
                   (p + "self_attn.o_proj.weight", (h, s["heads"] * d)),
                   (p + "mlp.gate_proj.weight", (s["ffn"], h)), (p + "mlp.up_proj.weight", (s["ffn"], h)),
                   (p + "mlp.down_proj.weight", (h, s["ffn"]))]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (s["vocab"], h))]
    shards, current, size = [], [], 0
    for name, shape in shapes:
        n = torch.Size(shape).numel() * dtype.itemsize
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += n
    shards.append(current)
    path.mkdir(parents=True)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: _rand(sh, gen, dtype) for n, sh in shard}, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n, _ in shard})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": s["ffn"], "num_hidden_layers": layers, "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"], "head_dim": d, "vocab_size": s["vocab"], "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."), "bos_token_id": 128000, "eos_token_id": 128001,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))


def weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def plain_copy(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    shutil.copytree(src, dst)
    _sync(dst)
    return time.perf_counter() - start


def _sync(path: Path) -> None:
    import os

    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# Peak RSS is read from VmHWM: ru_maxrss would carry over the parent's peak across fork + exec.
_PEAK = "int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024"

_CHILD = """
import json, sys, time
from pathlib import Path
from tritonize.export import export_checkpoint
start = time.perf_counter()
r = export_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]), progress=False, dtype=(sys.argv[3:] or [None])[0])
import os
for p in Path(sys.argv[2]).rglob("*"):
    if p.is_file():
        fd = os.open(p, os.O_RDONLY); os.fsync(fd); os.close(fd)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss": PEAK,
                  "arch": r.architecture, "dtype": r.dtype, "params": r.num_parameters}))
""".replace("PEAK", _PEAK)

_BASELINE = """
import json
import torch, safetensors, tritonize.export  # noqa: F401 - the imports the export pays for
print(json.dumps({"peak_rss": PEAK}))
""".replace("PEAK", _PEAK)


def run_child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="tiny shapes (a smoke run)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--workdir", type=Path, default=None, help="scratch dir (needs ~4x the checkpoint size)")
    ap.add_argument("--markdown", type=Path, default=None, help="write the result table here")
    ap.add_argument("--convert", choices=["float16", "float32"], default=None,
                    help="also export the NeMo 2 checkpoint to this dtype (no verbatim copy possible)")
    args = ap.parse_args()
    shapes = SHAPES_SMALL if args.small else SHAPES_8B
    dtype = getattr(torch, args.dtype)
    base = Path(tempfile.mkdtemp(prefix="tritonize-bench-", dir=args.workdir))
    rows = []
    try:
        baseline = run_child(_BASELINE)["peak_rss"]
        for kind, writer in (("NeMo 2", write_nemo2), ("HF", write_hf)):
            src = base / f"src-{kind.replace(' ', '')}"
            writer(src, args.layers, shapes, dtype)
            size = weight_bytes(src)
            copy_s = plain_copy(src, base / "copy")
            shutil.rmtree(base / "copy")
            runs = [(kind, [])]
            if args.convert and kind == "NeMo 2":
                runs.append((f"{kind} -> {args.convert}", [args.convert]))
            for label, extra in runs:
                res = run_child(_CHILD, str(src), str(base / "out"), *extra)
                shutil.rmtree(base / "out")
                rows.append((label, size, res, copy_s))
                print(f"{label}: {size / 1e9:.2f} GB, export {res['seconds']:.1f} s, copy {copy_s:.1f} s, "
                      f"peak RSS {res['peak_rss'] / 1e6:.0f} MB", flush=True)
            shutil.rmtree(src)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    lines = [
        f"Export benchmark: {args.layers} layers of Llama-3.1-8B shapes (hidden {shapes['hidden']}, FFN "
        f"{shapes['ffn']}, vocab {shapes['vocab']}), {args.dtype}, random weights; "
        f"{torch.get_num_threads()} threads. Baseline RSS of the imports alone: {baseline / 1e6:.0f} MB.",
        "",
        "| source | checkpoint | export time | plain copy | time / copy | peak RSS | RSS / checkpoint |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, size, res, copy_s in rows:
        lines.append(f"| {kind} | {size / 1e9:.2f} GB | {res['seconds']:.1f} s | {copy_s:.1f} s | "
                     f"{res['seconds'] / copy_s:.2f}x | {res['peak_rss'] / 1e6:.0f} MB | "
                     f"{100 * res['peak_rss'] / size:.1f}% |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
