"""``--verify``: the exported model against the source, logits side by side.

The export is run by transformers (tritonize's own runtime when transformers is not installed, or when
the export holds FP8 weights, which transformers reads only through extra packages). The source side is
transformers on the original directory for a Hugging Face source (the runtime for an FP8 one), and the
independent reference forward of :mod:`.reference` on the source's own tensors for NeMo and
single-rank TRT-LLM sources. The result is the largest absolute logit difference over a few
prompts, judged against a tolerance that follows the export dtype; an export that quantized a float
source to FP8 is judged by the cosine similarity of its logits to the source's instead (>= 0.99).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ExportError
from . import reference
from .canonical import ModelSpec
from .sources import Loaded
from .tree import DirTree, Tree
from .weight_files import read_safetensors

#: largest logit difference allowed, relative to the largest reference logit (at least 1.0)
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
FP8_COSINE = 0.99  # an export quantized to FP8 here: smallest cosine similarity of its logits to the source's

PROMPTS = ("The capital of France is", "def fibonacci(n):", "Hello")


def prompt_ids(loaded: Loaded, out_dir: Path, count: int = 3) -> list[list[int]]:
    """Token ids of a few prompts through the exported tokenizer, or fixed pseudo-random ids."""
    vocab = loaded.model.spec.vocab_size
    try:
        from tritonize.runtime.tokenizer import Tokenizer

        tok = Tokenizer(out_dir)
        ids = [tok.encode(p) for p in PROMPTS[:count]]
        if all(ids) and all(0 <= i < vocab for seq in ids for i in seq):
            return ids
    except Exception:  # noqa: BLE001 - any tokenizer trouble: fall back to synthetic ids
        pass
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (7, 5, 9)[:count]]


def _quantized(out_dir: Path) -> bool:
    import json

    try:
        config = json.loads((out_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config.get("quantization_config"), dict) or (out_dir / "hf_quant_config.json").is_file()


def _export_logits(out_dir: Path, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    if _quantized(out_dir):
        return _runtime_logits(out_dir, prompts)
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return _runtime_logits(out_dir, prompts)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return [model(torch.tensor([list(p)])).logits[0].float() for p in prompts]


def _runtime_logits(out_dir: Path, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    try:
        from tritonize.runtime.model import prompt_logits
        from tritonize.runtime.weights import load_model
    except ImportError as e:
        raise ExportError(f"--verify needs transformers or tritonize's runtime ({e}); pip install transformers") from None
    model = load_model(out_dir, device="cpu", dtype=torch.float32)
    return [prompt_logits(model, list(p)) for p in prompts]


def _hf_source_logits(tree: Tree, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    if not isinstance(tree, DirTree):
        raise ExportError("--verify of a Hugging Face source needs it as a directory")
    return _export_logits(tree.root, prompts)


def _semantics(spec: ModelSpec) -> reference.Semantics:
    return reference.Semantics(
        hidden=spec.hidden_size, heads=spec.num_heads, kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
        norm=spec.norm, norm_eps=spec.norm_eps, norm_offset=0.0, activation=spec.activation, gated=spec.gated,
        rope=spec.positions == "rope", rope_theta=spec.rope_theta, rotary_pct=spec.rotary_pct,
        rope_scaling=spec.rope_scaling, parallel=spec.parallel_attn, two_norms=spec.new_decoder_architecture,
        embedding_scale=spec.embedding_scale, top_k=spec.experts_per_token, vocab=spec.vocab_size,
        num_layers=spec.num_layers,
    )


def source_logits(loaded: Loaded, tree: Tree, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    if loaded.kind == "hf":
        if isinstance(tree, DirTree) and _quantized(tree.root):
            return _runtime_logits(tree.root, prompts)
        return _hf_source_logits(tree, prompts)
    if loaded.megatron_tensors is not None:  # NeMo 1, NeMo 2, Megatron-Bridge
        return [reference.megatron_logits(loaded.megatron_tensors, loaded.megatron, p, loaded.model.spec.vocab_size)
                for p in prompts]
    mapping = loaded.facts.get("mapping") or {}
    tp, pp = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
    ranks = [read_safetensors(tree, f"rank{r}.safetensors") for r in range(tp * pp)]
    sem = _semantics(loaded.model.spec)
    moe = bool(loaded.model.spec.num_experts)
    return [reference.trtllm_logits(ranks, tp, pp, sem, moe, p) for p in prompts]


def verify(loaded: Loaded, tree: Tree, out_dir: Path, dtype: str, quantized: bool = False) -> dict[str, Any]:
    """``quantized``: the export quantized a float source to FP8, so it is judged by cosine similarity."""
    prompts = prompt_ids(loaded, out_dir)
    want = source_logits(loaded, tree, prompts)
    got = _export_logits(out_dir, prompts)
    diff = max(float((a - b).abs().max()) for a, b in zip(got, want, strict=False))
    scale = max(1.0, max(float(b.abs().max()) for b in want))
    tol = TOLERANCE.get(dtype, 5e-2) * scale
    cosine = min(float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
                 for a, b in zip(got, want, strict=False))
    argmax_agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(got, want, strict=False))
    positions = sum(len(p) for p in prompts)
    passed = cosine >= FP8_COSINE if quantized else diff <= tol
    failure = (f"logits' cosine similarity {cosine:.4f} is below {FP8_COSINE}" if quantized else
               f"largest logit difference {diff:.3g} exceeds {tol:.3g}")
    return {
        "max_abs_logit_diff": diff,
        "max_abs_logit": scale,
        "tolerance": tol,
        "cosine_similarity": cosine,
        "criterion": f"cosine similarity >= {FP8_COSINE} (quantized to FP8)" if quantized else "tolerance",
        "passed": passed,
        "failure": None if passed else failure,
        "prompts": [list(p) for p in prompts],
        "argmax_agreement": f"{argmax_agree}/{positions}",
        "reference": "transformers on the source" if loaded.kind == "hf" else "reference forward on source tensors",
    }
