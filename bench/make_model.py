"""Writes a random-weight Hugging Face-format Llama of a given shape, for benchmarks.

Weights are drawn on the GPU when there is one (an 8B model is 16 GB of bf16) and written shard by
shard, so the host never holds more than one shard. The tokenizer is Mistral's v1 SentencePiece
model from the mistral-common package, or any tokenizer.model passed with --tokenizer.

    python bench/make_model.py --shape llama3-8b --out /tmp/llama8b
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    # Llama-3.1-8B: 32 layers, hidden 4096, 32 heads, 8 kv heads, ffn 14336, vocab 128256
    "llama3-8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, ffn=14336, vocab=128256),
    # same layer shapes, fewer layers: a cheaper stand-in for tests of the benchmark scripts
    "llama3-8b-2l": dict(hidden=4096, layers=2, heads=32, kv_heads=8, ffn=14336, vocab=128256),
    # and 4 / 8 layers: how FP8's logits error grows with depth on random weights (bench/fp8_bench.py --phases logits)
    "llama3-8b-4l": dict(hidden=4096, layers=4, heads=32, kv_heads=8, ffn=14336, vocab=128256),
    "llama3-8b-8l": dict(hidden=4096, layers=8, heads=32, kv_heads=8, ffn=14336, vocab=128256),
    # Llama-3.1-70B: 80 layers, hidden 8192, 64 heads, 8 kv heads, ffn 28672, vocab 128256 (141 GB in bf16)
    "llama3-70b": dict(hidden=8192, layers=80, heads=64, kv_heads=8, ffn=28672, vocab=128256),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=32000),
}


def write_model(out: Path, shape: dict, *, dtype: torch.dtype, tokenizer: Path | None, seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(seed)
    h, ffn, vocab = shape["hidden"], shape["ffn"], shape["vocab"]
    hd = h // shape["heads"]

    def rand(*dims: int) -> torch.Tensor:
        return (torch.randn(*dims, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype).cpu()

    def shards():  # one file per layer, made as it is written: a 70B model never sits in memory whole
        yield {"model.embed_tokens.weight": rand(vocab, h), "model.norm.weight": torch.ones(h, dtype=dtype),
               "lm_head.weight": rand(vocab, h)}
        for i in range(shape["layers"]):
            p = f"model.layers.{i}."
            yield {
                p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
                p + "self_attn.q_proj.weight": rand(shape["heads"] * hd, h),
                p + "self_attn.k_proj.weight": rand(shape["kv_heads"] * hd, h),
                p + "self_attn.v_proj.weight": rand(shape["kv_heads"] * hd, h),
                p + "self_attn.o_proj.weight": rand(h, shape["heads"] * hd),
                p + "mlp.gate_proj.weight": rand(ffn, h),
                p + "mlp.up_proj.weight": rand(ffn, h),
                p + "mlp.down_proj.weight": rand(h, ffn),
            }

    index: dict[str, str] = {}
    total = 0
    n = shape["layers"] + 1
    for k, tensors in enumerate(shards()):
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for key, t in tensors.items():
            index[key] = name
            total += t.numel() * t.element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": h,
        "intermediate_size": ffn, "num_hidden_layers": shape["layers"], "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"], "head_dim": hd, "hidden_act": "silu",
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": vocab - 1,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    # A benchmark must not stop early: the end id is one the tokenizer never produces (1 in 128k per token).
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": vocab - 1}))
    if tokenizer is None:
        from tritonize.export.demo_model import mistral_tokenizer_model

        tokenizer = mistral_tokenizer_model()
    shutil.copy2(tokenizer, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<s>",
                                                           "eos_token": "</s>"}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--tokenizer", type=Path, default=None, help="a SentencePiece tokenizer.model")
    args = ap.parse_args()
    start = time.perf_counter()
    write_model(args.out, SHAPES[args.shape], dtype=getattr(torch, args.dtype), tokenizer=args.tokenizer)
    size = sum(p.stat().st_size for p in args.out.glob("*.safetensors"))
    print(f"wrote {args.out}: {size / 1e9:.2f} GB in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
