"""FP8 in the export: keep an FP8 source's weights as FP8, or quantize a float source's linears.

Readers represent an FP8 weight as ``lazy.Quantized`` (FP8 bytes, scale, static input scale), which reads
as its dequantized value, so a writer that knows nothing of FP8 dequantizes (the trtllm runtimes' HF
export, ``--no-keep-fp8``). ``fp8_tensors`` does the opposite for the HF-format output: every linear
weight whose FP8 bytes and scales can be taken back out (``lazy.fp8_parts``, through the row
rearrangements of fused q/k/v and gate/up) is written as they are, with its scales, in the layout
``compressed-tensors`` uses for FP8 (which vLLM and transformers read as well as tritonize's runtime):

- ``<linear>.weight`` F8_E4M3, ``<linear>.weight_scale`` F32: ``[1]`` (strategy "tensor", when every weight
  has one scale), ``[out, 1]`` ("channel"; per-tensor scales repeated per row, exactly) or the block grid
  ("block");
- ``<linear>.input_scale`` F32 ``[1]`` when every linear has a static activation scale (activations
  "tensor", static), else none (activations "token", dynamic);
- ``model.layers.N.self_attn.k_scale`` / ``v_scale`` F32 ``[]`` and a ``kv_cache_scheme`` when the source
  has KV cache scales;
- ``quantization_config``: ``quant_method`` "compressed-tensors", ``format`` "float-quantized", one config
  group for ``Linear``, ``ignore`` listing the LM head unless it is FP8.

``quantize`` turns a float source's decoder linears into per-row FP8 (``runtime.quantize.quantize_per_channel``,
block by block as they are written): the same arithmetic the runtime's ``quantize_model`` uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ExportError
from ..runtime.quantize import FP8, read_quantization
from .canonical import Linear, Model
from .lazy import Broadcast, Fp8Parts, Lazy, Quantized, fp8_parts, is_scalar, quantize_rows

#: architectures whose FP8 linears tritonize's runtime serves as FP8 (its ``weights._FP8_FAMILIES``)
FP8_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "GemmaForCausalLM",
                     "Starcoder2ForCausalLM", "NemotronForCausalLM")
KV_SCALE_NAMES = ("self_attn.k_scale", "self_attn.v_scale")


def hf_fp8_block(config: dict[str, Any], hf_quant_config: dict[str, Any] | None = None) -> tuple[int, int] | None:
    """The weight block size an HF config declares (None: per tensor or per channel, or not FP8)."""
    try:
        scheme = read_quantization(config, hf_quant_config)
    except ValueError as e:
        raise ExportError(f"config.json: {e}") from None
    return scheme.block if scheme is not None else None


def _linears(model: Model) -> list[tuple[str, Linear]]:
    """(what, linear) of every linear of the decoder layers, experts included."""
    out = []
    for i, layer in enumerate(model.layers):
        for role in ("q", "k", "v", "o", "gate", "up", "down"):
            if getattr(layer, role) is not None:
                out.append((f"layer {i} {role}", getattr(layer, role)))
        for e, expert in enumerate(layer.experts):
            for role in ("gate", "up", "down"):
                out.append((f"layer {i} expert {e} {role}", getattr(expert, role)))
    return out


def _weights(model: Model) -> list[tuple[str, Lazy]]:
    """(what, weight) of every linear, the LM head included."""
    out = [(what, lin.weight) for what, lin in _linears(model)]
    return out + ([("lm_head", model.lm_head)] if model.lm_head is not None else [])


def is_fp8(model: Model) -> bool:
    """Whether any linear of the source is stored in FP8."""
    return any(_has_quantized(w) for _, w in _weights(model))


def not_keepable(model: Model) -> str | None:
    """Why the FP8 weights of ``model`` cannot be written as FP8 for tritonize's runtime (None: they can)."""
    fp8 = [(what, w) for what, w in _weights(model) if _has_quantized(w)]
    if not fp8:
        return None
    if model.spec.arch not in FP8_ARCHITECTURES:
        return f"the torch runtime does not serve FP8 weights of {model.spec.arch}"
    for what, w in fp8:
        if "expert" in what:
            return "the torch runtime does not serve FP8 mixture-of-experts weights"
        if fp8_parts(w) is None:
            return f"the FP8 scales of {what} cannot follow its rows into the Hugging Face layout"
    return None


def _has_quantized(t: Lazy) -> bool:
    """Whether any FP8 weight is behind ``t`` (itself, or a piece of it)."""
    if isinstance(t, Quantized):
        return True
    for child in ("base", "parts", "segments"):
        value = getattr(t, child, None)
        if isinstance(value, Lazy) and _has_quantized(value):
            return True
        if isinstance(value, list) and any(_has_quantized(v[0] if isinstance(v, tuple) else v) for v in value):
            return True
    return False


def quantize(model: Model, *, lm_head: bool = False) -> int:
    """Per-row FP8 for every float linear of the decoder layers (and the LM head with ``lm_head``), in place;
    linears that are FP8 already keep their own scales, experts of a mixture stay in their dtype (the runtime
    serves FP8 linears of dense layers). Returns how many were quantized."""
    if model.spec.arch not in FP8_ARCHITECTURES:
        raise ExportError(f"--quantization fp8: the torch runtime serves FP8 weights of "
                          f"{', '.join(FP8_ARCHITECTURES)}, not {model.spec.arch}")
    count = 0
    for what, lin in _linears(model):
        if "expert" not in what and not _has_quantized(lin.weight):
            lin.weight = quantize_rows(lin.weight)
            count += 1
    if lm_head:
        if model.lm_head is None:
            raise ExportError("--fp8-lm-head: the LM head shares the embedding matrix (tied), which stays in its "
                              "dtype")
        if not _has_quantized(model.lm_head):
            model.lm_head = quantize_rows(model.lm_head)
            count += 1
    return count


class _Reshape(Lazy):
    """``base`` (``[]``, ``[1]`` or ``[rows]``) as ``shape``, read whole (scales are small)."""

    def __init__(self, base: Lazy, shape: Sequence[int]):
        self.base, self.shape, self.dtype = base, tuple(shape), torch.float32

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.base.full().float().reshape(self.shape)[start:stop] if self.shape else \
            self.base.full().float().reshape(())


@dataclass
class Fp8Output:
    tensors: list[tuple[str, Lazy]]
    quantization_config: dict[str, Any]
    keep_dtype: set[str]  # names written in their own dtype (FP8 weights, float32 scales)
    strategy: str
    static_activations: bool
    kv_scales: bool
    fp8_linears: int


def fp8_tensors(tensors: list[tuple[str, Lazy]], model: Model, *, kv_cache: bool) -> Fp8Output:
    """The HF tensors with every FP8 linear written as FP8 + scales (see the module docstring). ``kv_cache``:
    write the layers' KV cache scales and declare an FP8 KV cache (when the source has the scales)."""
    found: dict[str, Fp8Parts] = {}
    for name, t in tensors:
        if name.endswith(".weight") and len(t.shape) == 2:
            parts = fp8_parts(t)
            if parts is not None:
                found[name] = parts
    if not found:
        raise ExportError("internal error: asked to keep FP8 weights, but no linear is FP8")
    blocks = {p.block for p in found.values()}
    if len(blocks) > 1:
        raise ExportError(f"FP8 weights with different block sizes ({sorted(map(str, blocks))}) cannot be written "
                          "as one compressed-tensors scheme")
    block = blocks.pop()
    if block is not None:
        strategy = "block"
    elif all(is_scalar(p.scale) for p in found.values()):
        strategy = "tensor"
    else:
        strategy = "channel"
    static = all(p.input_scale is not None for p in found.values())
    out: list[tuple[str, Lazy]] = []
    keep: set[str] = set()
    for name, t in tensors:
        parts = found.get(name)
        if parts is None:
            out.append((name, t))
            continue
        prefix = name.removesuffix(".weight")
        rows = parts.weight.nrows
        if strategy == "block":
            scale: Lazy = _Reshape(parts.scale, parts.scale.shape)
        elif strategy == "tensor":
            scale = _Reshape(parts.scale, (1,))
        else:
            per_row = parts.scale if not is_scalar(parts.scale) else Broadcast(parts.scale, rows)
            scale = _Reshape(per_row, (rows, 1))
        out += [(name, parts.weight), (f"{prefix}.weight_scale", scale)]
        keep |= {name, f"{prefix}.weight_scale"}
        if static:
            out.append((f"{prefix}.input_scale", _Reshape(parts.input_scale, (1,))))
            keep.add(f"{prefix}.input_scale")
    kv = kv_cache and all(layer.k_scale is not None and layer.v_scale is not None for layer in model.layers)
    if kv:
        for i, layer in enumerate(model.layers):
            for which, value in zip(KV_SCALE_NAMES, (layer.k_scale, layer.v_scale), strict=True):
                name = f"model.layers.{i}.{which}"
                out.append((name, _Reshape(value, ())))
                keep.add(name)
    for name, t in out:
        if t.dtype == FP8 and name not in keep:
            raise ExportError(f"internal error: {name} would be written as FP8 without its scale")
    return Fp8Output(out, _compressed_tensors_config(strategy, block, static, kv, "lm_head.weight" in found),
                     keep, strategy, static, kv, len(found))


def _compressed_tensors_config(strategy: str, block: tuple[int, int] | None, static: bool, kv: bool,
                               lm_head: bool) -> dict[str, Any]:
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": strategy,
               "group_size": None, "block_structure": list(block) if block else None}
    activations = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": not static,
                   "strategy": "tensor" if static else "token"}
    config: dict[str, Any] = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations,
                                      "output_activations": None}},
        "ignore": [] if lm_head else ["lm_head"],
        "kv_cache_scheme": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                            "strategy": "tensor"} if kv else None,
    }
    return config
