"""FP8 linear layers, swapped into model.py's Transformer as gpt-fast's quantize.py swaps in its int8 linear.

``FP8Linear`` takes the place of an ``nn.Linear`` whose weight stays ``float8_e4m3fn``; model.py does not
change. weights.py swaps one in for every linear an FP8 checkpoint stores in FP8, ``quantize_model`` for
the linears of a model already loaded (per-channel scales, the same arithmetic ``tritonize export
--quantization fp8`` writes to disk).

What an FP8Linear holds: ``weight`` float8_e4m3fn ``[out, in]``; ``weight_scale`` float32, one scale per
output row (``[out]``: a per-tensor scale is repeated, which is also how the separate per-tensor scales
of q, k and v survive being fused into one ``wqkv``) or one per block (``[ceil(out / bo), ceil(in / bi)]``
with ``block = (bo, bi)``); the real weight is ``weight * scale``. ``input_scale`` (a float32 scalar, or
absent): the checkpoint's static activation scale.

How it runs:

- ``FP8Linear.forward`` (CPU, GPUs without FP8): weight-only. The weight is dequantized in float32 and
  cast to the activations' dtype on the fly, then an ordinary matmul; the static input scale is not used.
  Memory is FP8's, speed is not; this is the path the CPU tests check against transformers.
- ``ScaledMMLinear`` (CUDA, compute capability 8.9 and up; ``use_fp8_matmul`` swaps it in): by the
  step's rows, the FP8 weights times the activations as they are (Triton, up to ``WEIGHT_ONLY_ROWS``),
  or the activations quantized to FP8 too, one scale per token (or the checkpoint's static scale), then
  Triton's FP8 x FP8 kernel (up to ``KERNEL_ROWS``) or ``torch._scaled_mm`` with row-wise scales, into
  bfloat16. Static shapes, no host syncs: it runs inside the engine's CUDA graphs. A block-scaled weight is requantized per output row once, when
  it is swapped in (one more FP8 rounding; PyTorch's block-wise ``_scaled_mm`` needs CUDA 12.9 builds).

``read_quantization`` says what a checkpoint's ``config.json`` (and ModelOpt's ``hf_quant_config.json``)
declares: FP8 weights (transformers' / vLLM's ``fp8``, ``compressed-tensors`` float 8-bit, ModelOpt
``FP8``), their block size, static or dynamic activations, and an FP8 KV cache.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import UnsupportedModelError

log = logging.getLogger(__name__)

__all__ = ["FP8", "FP8_MAX", "FP8Linear", "QuantScheme", "ScaledMMLinear", "dequantize", "fp8_matmul_supported",
           "fuse_fp8", "per_token_fp8", "quantize_model", "quantize_per_channel", "read_quantization",
           "to_fp8", "use_fp8_matmul"]

FP8 = torch.float8_e4m3fn
# Decode-sized steps do not go through torch._scaled_mm, whose FP8 GEMMs are built for larger M. On one H100 (8B
# shape, weights read from memory, bench/RESULTS.md section 16) a layer's linears take, against bf16's 162-174 us:
# one row 86 us on a matrix-vector kernel (_scaled_mm: 132); steps of at most WEIGHT_ONLY_ROWS rows (0 to 64:
# cuda_kernels.WEIGHT_ONLY_MAX_ROWS) 99 us at 16 rows multiplying the FP8 weights by the activations as they are
# (cuda_kernels.fp8_weight_only_linear: the weights widened in registers; logits closer to bf16); steps of at most
# KERNEL_ROWS rows quantize the activations per token for cuda_kernels.fp8_scaled_linear (FP8 x FP8 in tiles of 64
# rows): 110 us at 64 rows (_scaled_mm: 126), 128 at 128 (129); larger ones torch._scaled_mm (256 rows: 155 against
# the kernel's 178). TRITONIZE_FP8_WEIGHT_ONLY_ROWS=0 / TRITONIZE_FP8_KERNEL_ROWS=0 turn either off.
WEIGHT_ONLY_ROWS = max(0, min(64, int(os.environ.get("TRITONIZE_FP8_WEIGHT_ONLY_ROWS", "16") or 0)))
KERNEL_MAX_ROWS = 256  # the split-K workspace is reserved for steps of up to this many rows
KERNEL_ROWS = max(0, min(KERNEL_MAX_ROWS, int(os.environ.get("TRITONIZE_FP8_KERNEL_ROWS", "128") or 0)))
FP8_MAX = 448.0  # the largest float8_e4m3fn value


# --------------------------------------------------------------------------- what a checkpoint declares
@dataclass(frozen=True)
class QuantScheme:
    """The FP8 a checkpoint declares. ``method``: the ``quant_method`` it came from (fp8,
    compressed-tensors, modelopt)."""

    method: str
    weights: bool = False  # linear weights stored in float8_e4m3fn with scales
    block: tuple[int, int] | None = None  # block-wise weight scales (rows, cols per scale)
    static_activations: bool = False  # the checkpoint carries input_scale for its linears
    kv_cache: bool = False  # keys and values are meant to be stored in FP8 (with k_scale / v_scale if given)

    def describe(self) -> str:
        parts = []
        if self.weights:
            how = f"block {self.block[0]}x{self.block[1]}" if self.block else "per tensor or channel"
            parts.append(f"FP8 weights ({how}, {'static' if self.static_activations else 'dynamic'} activations)")
        if self.kv_cache:
            parts.append("FP8 KV cache")
        return f"{self.method}: " + (", ".join(parts) or "nothing in FP8")


def _is_fp8_name(value: Any) -> bool:
    return isinstance(value, str) and value.upper().startswith("FP8")


def _block(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    raise UnsupportedModelError(f"FP8 weight block size {value!r} is not two positive integers")


def _compressed_tensors(qc: dict[str, Any]) -> QuantScheme:
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise UnsupportedModelError("compressed-tensors quantization_config has no config_groups")
    static, block, weights = False, None, False
    for name, group in groups.items():
        w = (group or {}).get("weights") or {}
        if w.get("type") != "float" or int(w.get("num_bits", 0)) != 8:
            raise UnsupportedModelError(
                f"compressed-tensors group {name}: {w.get('num_bits')}-bit {w.get('type')} weights are not supported "
                "(FP8 weights only: type float, num_bits 8)")
        strategy = w.get("strategy", "tensor")
        if strategy == "block":
            block = _block(w.get("block_structure"))
        elif strategy not in ("tensor", "channel"):
            raise UnsupportedModelError(f"compressed-tensors group {name}: weight strategy {strategy!r} is not "
                                        "supported (tensor, channel or block)")
        weights = True
        act = (group or {}).get("input_activations") or {}
        if act and not act.get("dynamic", False):
            static = True
    fmt = qc.get("format")
    if fmt not in (None, "float-quantized", "naive-quantized"):
        raise UnsupportedModelError(f"compressed-tensors format {fmt!r} is not supported (float-quantized FP8)")
    kv = isinstance(qc.get("kv_cache_scheme"), dict)
    return QuantScheme("compressed-tensors", weights, block, static, kv)


def read_quantization(config: dict[str, Any], hf_quant_config: dict[str, Any] | None = None) -> QuantScheme | None:
    """The FP8 scheme of a checkpoint (None: not quantized); UnsupportedModelError for a quantization this
    runtime cannot run (int4, int8, NVFP4, ...), so it is never read as plain weights by mistake."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        if isinstance(hf_quant_config, dict):  # ModelOpt's HF export beside config.json
            table = hf_quant_config.get("quantization") or hf_quant_config
            qc = {"quant_method": "modelopt", **table}
        else:
            return None
    method = str(qc.get("quant_method", "")).lower()
    kv_dtype = str(qc.get("kv_cache_dtype", "") or "").lower()
    if method == "fp8":
        static = str(qc.get("activation_scheme", "dynamic")).lower() == "static"
        return QuantScheme("fp8", True, _block(qc.get("weight_block_size")), static, kv_dtype.startswith("fp8"))
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method == "modelopt":
        algo = qc.get("quant_algo")
        if algo not in (None, "FP8") and not (isinstance(algo, str) and algo.upper() == "FP8"):
            raise UnsupportedModelError(f"ModelOpt quant_algo {algo!r} is not supported (FP8 only)")
        return QuantScheme("modelopt", algo is not None, None, True, _is_fp8_name(qc.get("kv_cache_quant_algo")))
    raise UnsupportedModelError(f"quantization_config quant_method {method or '?'!r} is not supported: the torch "
                                "runtime reads FP8 checkpoints (fp8, compressed-tensors FP8, modelopt FP8) and "
                                "unquantized ones")


# --------------------------------------------------------------------------- the arithmetic
def to_fp8(x: Tensor) -> Tensor:
    """float8_e4m3fn of a float tensor, saturating at +-448 (a plain cast would turn larger values into NaN)."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``weight [out, in]`` -> (float8 weight, float32 scale ``[out]``): each row scaled so that its largest
    magnitude is 448. An all-zero row gets scale 1."""
    w = weight.float()
    amax = w.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return to_fp8(w / scale[..., None]), scale


def expand_block_scale(scale: Tensor, block: tuple[int, int], shape: tuple[int, int]) -> Tensor:
    """A block-scale grid ``[ceil(out / bo), ceil(in / bi)]`` as one scale per weight element ``[out, in]``."""
    bo, bi = block
    return scale.repeat_interleave(bo, dim=0).repeat_interleave(bi, dim=1)[: shape[0], : shape[1]]


def dequantize(weight: Tensor, scale: Tensor, block: tuple[int, int] | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """``weight * scale`` computed in float32, then cast to ``dtype``."""
    w = weight.float()
    s = scale.float()
    if block is not None:
        s = expand_block_scale(s, block, tuple(w.shape))
    elif s.numel() == 1:
        s = s.reshape(())
    else:
        s = s.reshape(-1, *([1] * (w.dim() - 1)))
    return (w * s).to(dtype)


def per_token_fp8(x: Tensor, static_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Activations ``[M, K]`` -> (float8 ``[M, K]``, float32 scales ``[M, 1]``): one scale per row (its largest
    magnitude maps to 448), or the checkpoint's static scale for every row."""
    xf = x.float()
    if static_scale is None:
        scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    else:
        scale = static_scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()
    return to_fp8(xf / scale), scale


def fuse_fp8(parts: list[tuple[Tensor, Tensor, Tensor | None]], block: tuple[int, int] | None
             ) -> tuple[Tensor, Tensor, Tensor | None]:
    """One fused linear (q, k, v -> wqkv; gate, up -> w1) out of FP8 parts ``(weight, scale, input_scale)``
    whose scales are already per row (or block grids). Nothing is requantized: per-row scales are
    concatenated, block grids too (each part's rows must fill whole blocks). The static input scale of the
    fused layer is the largest of the parts' (they all read the same input)."""
    weight = torch.cat([w for w, _, _ in parts])
    if block is not None:
        for w, _, _ in parts:
            if w.shape[0] % block[0]:
                raise UnsupportedModelError(f"a fused FP8 weight part has {w.shape[0]} rows, not a multiple of the "
                                            f"block size {block[0]}: the block scales cannot be concatenated")
    scale = torch.cat([s for _, s, _ in parts])
    inputs = [i for _, _, i in parts if i is not None]
    input_scale = torch.stack([i.float().reshape(()) for i in inputs]).max() if len(inputs) == len(parts) else None
    return weight, scale, input_scale


def row_scale(scale: Tensor, out_features: int, in_features: int, block: tuple[int, int] | None) -> Tensor:
    """A checkpoint's weight scale as this module stores it: ``[out]`` float32 (from a scalar, ``[out]`` or
    ``[out, 1]``), or the block grid when ``block`` is given."""
    s = scale.float()
    if block is not None:
        grid = (-(-out_features // block[0]), -(-in_features // block[1]))
        if tuple(s.shape) != grid:
            raise UnsupportedModelError(f"block-wise FP8 scale has shape {tuple(s.shape)}, expected {grid} for a "
                                        f"[{out_features}, {in_features}] weight in blocks of {block}")
        return s.contiguous()
    if s.numel() == 1:
        return s.reshape(1).expand(out_features).contiguous()
    if s.numel() == out_features and (s.dim() == 1 or (s.dim() == 2 and s.shape[1] == 1)):
        return s.reshape(out_features).contiguous()
    raise UnsupportedModelError(f"FP8 weight scale of shape {tuple(s.shape)} fits neither per tensor, per channel "
                                f"([{out_features}] or [{out_features}, 1]) nor a declared block size")


# --------------------------------------------------------------------------- the modules
class FP8Linear(nn.Module):
    """An ``nn.Linear`` whose weight is float8_e4m3fn with scales; runs weight-only (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, block: tuple[int, int] | None = None,
                 static_input: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, block
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8, device=device))
        scale_shape = (out_features,) if block is None else (-(-out_features // block[0]), -(-in_features // block[1]))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.input_scale: Tensor | None
        if static_input:
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        else:
            self.input_scale = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        """Per-channel FP8 of an existing linear (``quantize_per_channel``)."""
        weight, scale = quantize_per_channel(linear.weight.detach())
        dtype = linear.weight.dtype
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=dtype,
                  device=linear.weight.device)
        out.weight.copy_(weight)
        out.weight_scale.copy_(scale)
        if linear.bias is not None:
            out.bias.data.copy_(linear.bias.detach())
        return out

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        return dequantize(self.weight, self.weight_scale, self.block, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantized(x.dtype), self.bias)

    def extra_repr(self) -> str:
        scales = f"block={self.block}" if self.block else "per-channel"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {scales}, "
                f"static_input={self.input_scale is not None}, bias={self.bias is not None}")


class ScaledMMLinear(FP8Linear):
    """FP8 x FP8 on the tensor cores: activations quantized per token (or with the static input scale), then
    Triton's FP8 kernel for decode-sized steps, ``torch._scaled_mm`` with row-wise scales for larger ones; steps
    of a few rows skip the quantization (``WEIGHT_ONLY_ROWS``)."""

    def quantize_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return per_token_fp8(x, self.input_scale)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if rows.shape[0] <= WEIGHT_ONLY_ROWS and self.input_scale is None:
            from .cuda_kernels import fp8_weight_only_linear

            y = fp8_weight_only_linear(rows, self.weight, self.weight_scale)
        else:
            xq, xs = self.quantize_input(rows)
            if rows.shape[0] <= KERNEL_ROWS:
                from .cuda_kernels import fp8_scaled_linear

                y = fp8_scaled_linear(xq, xs, self.weight, self.weight_scale, out_dtype=x.dtype)
            else:
                y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale.view(1, -1),
                                     out_dtype=torch.bfloat16).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


def fp8_matmul_supported(device: torch.device) -> bool:
    """CUDA with FP8 tensor cores (compute capability 8.9: Ada, 9.0: Hopper, and later) and torch._scaled_mm."""
    return (device.type == "cuda" and torch.cuda.is_available() and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) >= (8, 9))


def use_fp8_matmul(model: nn.Module) -> int:
    """Swap ``ScaledMMLinear`` in for every ``FP8Linear`` of ``model`` whose shape the FP8 GEMM takes (both
    dimensions multiples of 16); returns how many. Block-scaled weights are requantized per row first."""
    swapped = 0
    for name, module in model.named_modules():
        if type(module) is not FP8Linear:
            continue
        if module.in_features % 16 or module.out_features % 16:
            log.info("%s (%d -> %d) stays weight-only: the FP8 GEMM needs multiples of 16", name,
                     module.in_features, module.out_features)
            continue
        if module.block is not None:
            weight, scale = quantize_per_channel(module.dequantized(torch.float32))
            module.weight = weight.to(module.weight.device)
            module.weight_scale = scale.to(module.weight.device)
            module.block = None
        module.__class__ = ScaledMMLinear
        if module.weight.is_cuda:  # a split-K tiling's workspace exists before any step is captured in a graph
            from .cuda_kernels import WEIGHT_ONLY_MAX_ROWS, reserve_fp8_linear

            reserve_fp8_linear(module.weight, WEIGHT_ONLY_MAX_ROWS, KERNEL_MAX_ROWS)
        swapped += 1
    return swapped


# Linears of each block that FP8 covers (the router of a mixture of experts is not one of them).
LAYER_LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2")


def quantize_model(model: nn.Module, lm_head: bool = False) -> int:
    """Per-channel FP8 for every linear of every block (and the LM head with ``lm_head``), in place; returns
    how many were swapped. Embeddings, norms and the router stay as they are."""
    targets = []
    for i, _ in enumerate(model.layers):
        for path in LAYER_LINEARS:
            targets.append(f"layers.{i}.{path}")
    if lm_head and getattr(model, "output", None) is not None:
        targets.append("output")
    swapped = 0
    for path in targets:
        owner_path, _, name = path.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        linear = getattr(owner, name, None)
        if type(linear) is nn.Linear:
            setattr(owner, name, FP8Linear.from_linear(linear))
            swapped += 1
    return swapped
