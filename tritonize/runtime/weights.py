"""Load an HF-format checkpoint directory into a ``Transformer``.

Each family's parameter names are mapped onto the runtime's, tensor by tensor from memory-mapped
safetensors, so peak host memory stays near one tensor beyond the model itself. The model is built
on the meta device and the loaded tensors are assigned in place of its parameters, so nothing is
initialised only to be overwritten.

With a tensor-parallel ``Shard`` (tp.py) each rank reads only its piece: a tensor is sliced as soon as
the family mapping names it, still a view of the memory-mapped file, and the runtime tensors fused from
several checkpoint tensors (q/k/v, gate/up, a layer's experts) arrive as ``Concat`` / ``Stack``, which
slice each part before joining them.

FP8 checkpoints (``quantize.read_quantization``): a linear whose weight is stored in float8_e4m3fn is
loaded as an ``FP8Linear`` (swapped in for the ``nn.Linear`` before the weights are assigned) with its
scale: ``weight_scale`` (per tensor ``[]``/``[1]``, per channel ``[out]``/``[out, 1]``, or a block grid) or
``weight_scale_inv`` (transformers' name for the same multiplier), and ``input_scale`` /
``activation_scale`` when the activations have a static scale. Fused linears (q, k, v; gate, up) keep
each part's scales, per row. The KV cache scales of each layer are read from ``self_attn.k_scale`` /
``v_scale`` (vLLM, compressed-tensors), ``self_attn.k_proj.k_scale`` / ``v_proj.v_scale`` (ModelOpt),
``self_attn.kv_scale`` (one for both) or ``k_proj.output_scale`` / ``v_proj.output_scale``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import ModelArgs, UnsupportedModelError
from .model import Transformer
from .quantize import FP8, FP8Linear, QuantScheme, fuse_fp8, read_quantization, row_scale


class WeightsError(ValueError):
    """The checkpoint's tensors do not match what its config.json describes."""


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def weights_dtype(dtype: torch.dtype | str | None, args: ModelArgs) -> torch.dtype:
    """``None``/"auto" means the checkpoint's own dtype (float32 when it does not say)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = args.dtype if dtype in (None, "auto") else dtype
    name = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}.get(name, name)
    if name is None:
        return torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; use one of {', '.join(_DTYPES)} or 'auto'")
    return _DTYPES[name]


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path} not found: model_dir must be an HF-format checkpoint directory") from None
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path} is not valid JSON ({exc})") from None


class TensorFiles:
    """Name -> tensor access over a directory's ``*.safetensors`` (or ``.bin``) files, read lazily."""

    def __init__(self, model_dir: Path, stack: ExitStack, block: tuple[int, int] | None = None) -> None:
        self.model_dir = model_dir
        self.block = block  # the FP8 weight block size the checkpoint declares (None: per tensor or channel)
        self._where: dict[str, Callable[[], Tensor]] = {}
        files = sorted(model_dir.glob("*.safetensors"))
        if files:
            from safetensors import safe_open

            for file in files:
                handle = stack.enter_context(safe_open(str(file), framework="pt"))
                for name in handle.keys():
                    self._where[name] = lambda h=handle, n=name: h.get_tensor(n)
            return
        bins = sorted(model_dir.glob("pytorch_model*.bin"))
        if not bins:
            raise WeightsError(f"{model_dir}: no *.safetensors or pytorch_model*.bin weight files")
        for file in bins:
            state = _load_bin(file)
            for name, tensor in state.items():
                self._where[name] = lambda t=tensor: t

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> Tensor:
        if name not in self._where:
            raise WeightsError(f"{self.model_dir}: tensor {name!r} missing from the checkpoint")
        return self._where[name]()

    def first(self, *names: str) -> Tensor | None:
        """The first of ``names`` the checkpoint holds (None if none)."""
        for name in names:
            if name in self._where:
                return self.get(name)
        return None


def _load_bin(file: Path) -> dict[str, Tensor]:
    """``.bin`` files are pickles: only ever read with ``weights_only=True``."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # Legacy (non-zip) serialisation cannot be memory-mapped.
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling refusal is a bad checkpoint
        raise WeightsError(f"{file}: cannot read weights safely ({type(exc).__name__}: {exc})") from None


# --- FP8 linears -----------------------------------------------------------------------------------


@dataclass
class Fp8Weight:
    """An FP8 linear's weight with its per-row (or block) scale and static input scale, as loaded."""

    weight: Tensor
    scale: Tensor
    input_scale: Tensor | None
    block: tuple[int, int] | None


def _fp8(ck: TensorFiles, theirs: str, weight: Tensor) -> Fp8Weight:
    scale = ck.first(f"{theirs}.weight_scale", f"{theirs}.weight_scale_inv")
    if scale is None:
        raise WeightsError(f"{ck.model_dir}: {theirs}.weight is FP8 but has no weight_scale (or weight_scale_inv)")
    out_features, in_features = weight.shape
    try:
        scale = row_scale(scale, out_features, in_features, ck.block)
    except UnsupportedModelError as e:
        raise WeightsError(f"{ck.model_dir}: {theirs}: {e}") from None
    input_scale = ck.first(f"{theirs}.input_scale", f"{theirs}.activation_scale")
    return Fp8Weight(weight, scale, None if input_scale is None else input_scale.float().reshape(()), ck.block)


# --- per-family name maps: each yields (runtime name, tensor) -------------------------------------

Tensors = Iterator[tuple[str, "Tensor | Concat | Stack | Fp8Weight"]]


def _norm(ck: TensorFiles, ours: str, theirs: str, args: ModelArgs) -> Tensors:
    yield f"{ours}.weight", ck.get(f"{theirs}.weight")
    if args.norm_bias:
        yield f"{ours}.bias", ck.get(f"{theirs}.bias")


def _linear(ck: TensorFiles, ours: str, theirs: str, bias: bool, transpose: bool = False) -> Tensors:
    weight = ck.get(f"{theirs}.weight")
    if weight.dtype == FP8 and not transpose:
        yield f"{ours}.weight", _fp8(ck, theirs, weight)
    else:
        yield f"{ours}.weight", weight.t() if transpose else weight
    if bias:
        yield f"{ours}.bias", ck.get(f"{theirs}.bias")


class Concat:
    """Checkpoint tensors joined along dim 0 into one runtime tensor, joined only when asked: a shard takes
    its rows part by part, so the whole fused tensor is never built."""

    def __init__(self, parts: list[Tensor]) -> None:
        self.parts = parts
        self.shape = torch.Size([sum(p.shape[0] for p in parts), *parts[0].shape[1:]])

    def materialize(self) -> Tensor:
        return torch.cat(self.parts)

    def index_select(self, dim: int, index: Tensor) -> Tensor:
        if dim != 0:
            return torch.cat([p.index_select(dim, index) for p in self.parts])
        pieces, start = [], 0
        for part in self.parts:
            stop = start + part.shape[0]
            mine = index[(index >= start) & (index < stop)] - start
            if len(mine):
                pieces.append(part.index_select(0, mine))
            start = stop
        return torch.cat(pieces)


class Stack:
    """Per-expert tensors (or ``Concat``s) stacked along a new dim 0, stacked only when asked."""

    def __init__(self, parts: list) -> None:
        self.parts = parts
        self.shape = torch.Size([len(parts), *parts[0].shape])

    def materialize(self) -> Tensor:
        return torch.stack([_whole(p) for p in self.parts])

    def index_select(self, dim: int, index: Tensor) -> Tensor:
        if dim == 0:
            return torch.stack([_whole(self.parts[int(i)]) for i in index])
        return torch.stack([p.index_select(dim - 1, index) for p in self.parts])


def _dtype_of(t: Tensor | Concat | Stack) -> torch.dtype:
    while not isinstance(t, Tensor):
        t = t.parts[0]
    return t.dtype


def _whole(t: Tensor | Concat | Stack) -> Tensor:
    return t if isinstance(t, Tensor) else t.materialize()


def _fused(ck: TensorFiles, ours: str, theirs: list[str], bias: bool) -> Tensors:
    weights = [ck.get(f"{t}.weight") for t in theirs]
    fp8 = [w.dtype == FP8 for w in weights]
    if all(fp8):
        parts = [_fp8(ck, t, w) for t, w in zip(theirs, weights, strict=True)]
        try:
            weight, scale, input_scale = fuse_fp8([(p.weight, p.scale, p.input_scale) for p in parts], ck.block)
        except UnsupportedModelError as e:
            raise WeightsError(f"{ck.model_dir}: {ours}: {e}") from None
        yield f"{ours}.weight", Fp8Weight(weight, scale, input_scale, ck.block)
    elif any(fp8):
        raise WeightsError(f"{ck.model_dir}: {', '.join(theirs)} are fused into one layer here, but only some of "
                           "them are stored in FP8")
    else:
        yield f"{ours}.weight", Concat(weights)
    if bias:
        yield f"{ours}.bias", Concat([ck.get(f"{t}.bias") for t in theirs])


def _head(ck: TensorFiles, args: ModelArgs, embed: str, final_norm: str, lm_head: str) -> Tensors:
    yield "tok_embeddings.weight", ck.get(embed)
    yield from _norm(ck, "norm", final_norm, args)
    if not args.tie_word_embeddings:
        yield from _linear(ck, "output", lm_head.removesuffix(".weight"), False)


def _llama_layout(ck: TensorFiles, args: ModelArgs) -> Tensors:
    """Llama, Mistral, Mixtral, Gemma, StarCoder 2, Nemotron: ``model.layers.N.self_attn.q_proj``..."""
    yield from _head(ck, args, "model.embed_tokens.weight", "model.norm", "lm_head.weight")
    for i in range(args.n_layers):
        hf, ours = f"model.layers.{i}", f"layers.{i}"
        yield from _norm(ck, f"{ours}.attention_norm", f"{hf}.input_layernorm", args)
        yield from _norm(ck, f"{ours}.ffn_norm", f"{hf}.post_attention_layernorm", args)
        attn = f"{hf}.self_attn"
        yield from _fused(ck, f"{ours}.attention.wqkv", [f"{attn}.{p}_proj" for p in "qkv"], args.qkv_bias)
        yield from _linear(ck, f"{ours}.attention.wo", f"{attn}.o_proj", args.out_bias)
        ff = f"{ours}.feed_forward"
        if args.num_experts:
            yield from _mixtral_experts(ck, args, ff, hf)
        elif args.architecture == "Starcoder2ForCausalLM":
            yield from _linear(ck, f"{ff}.w1", f"{hf}.mlp.c_fc", args.mlp_bias)
            yield from _linear(ck, f"{ff}.w2", f"{hf}.mlp.c_proj", args.mlp_bias)
        elif args.mlp == "plain":
            yield from _linear(ck, f"{ff}.w1", f"{hf}.mlp.up_proj", args.mlp_bias)
            yield from _linear(ck, f"{ff}.w2", f"{hf}.mlp.down_proj", args.mlp_bias)
        else:
            yield from _fused(ck, f"{ff}.w1", [f"{hf}.mlp.gate_proj", f"{hf}.mlp.up_proj"], args.mlp_bias)
            yield from _linear(ck, f"{ff}.w2", f"{hf}.mlp.down_proj", args.mlp_bias)


def _mixtral_experts(ck: TensorFiles, args: ModelArgs, ours: str, hf: str) -> Tensors:
    """Per-expert ``block_sparse_moe.experts.E.w{1,2,3}`` or transformers 5.x stacked ``mlp.experts``."""
    if ck.has(f"{hf}.mlp.experts.gate_up_proj"):
        yield f"{ours}.gate.weight", ck.get(f"{hf}.mlp.gate.weight")
        yield f"{ours}.w13", ck.get(f"{hf}.mlp.experts.gate_up_proj")
        yield f"{ours}.w2", ck.get(f"{hf}.mlp.experts.down_proj")
        return
    moe = f"{hf}.block_sparse_moe"
    yield f"{ours}.gate.weight", ck.get(f"{moe}.gate.weight")
    experts = range(args.num_experts)
    yield f"{ours}.w13", Stack([
        Concat([ck.get(f"{moe}.experts.{e}.w1.weight"), ck.get(f"{moe}.experts.{e}.w3.weight")]) for e in experts
    ])
    yield f"{ours}.w2", Stack([ck.get(f"{moe}.experts.{e}.w2.weight") for e in experts])


def _split_interleaved_qkv(t: Tensor, n_heads: int, head_dim: int) -> Tensor:
    """``[heads, 3, head_dim, ...]`` (per-head q, k, v) -> ``[q heads; k heads; v heads]``."""
    t = t.reshape(n_heads, 3, head_dim, *t.shape[1:])
    return torch.cat([t[:, j].reshape(n_heads * head_dim, *t.shape[3:]) for j in range(3)])


def _gpt2_prefix(ck: TensorFiles) -> str:
    return "transformer." if ck.has("transformer.wte.weight") else ""


def _gpt2_family(ck: TensorFiles, args: ModelArgs, linears: Callable[[str, str], Tensors]) -> Tensors:
    """GPT-2 and StarCoder 1 share everything but how a layer's linears are stored (``linears(hf, ours)``)."""
    p = _gpt2_prefix(ck)
    yield from _head(ck, args, f"{p}wte.weight", f"{p}ln_f", "lm_head.weight")
    yield "pos_embeddings.weight", ck.get(f"{p}wpe.weight")
    for i in range(args.n_layers):
        hf, ours = f"{p}h.{i}", f"layers.{i}"
        yield from _norm(ck, f"{ours}.attention_norm", f"{hf}.ln_1", args)
        yield from _norm(ck, f"{ours}.ffn_norm", f"{hf}.ln_2", args)
        yield from linears(hf, ours)


def _gpt2(ck: TensorFiles, args: ModelArgs) -> Tensors:
    """GPT-2: ``Conv1D`` weights are stored ``[in, out]``; c_attn is [q; k; v] along ``out``."""

    def linears(hf: str, ours: str) -> Tensors:
        yield from _linear(ck, f"{ours}.attention.wqkv", f"{hf}.attn.c_attn", True, transpose=True)
        yield from _linear(ck, f"{ours}.attention.wo", f"{hf}.attn.c_proj", True, transpose=True)
        yield from _linear(ck, f"{ours}.feed_forward.w1", f"{hf}.mlp.c_fc", True, transpose=True)
        yield from _linear(ck, f"{ours}.feed_forward.w2", f"{hf}.mlp.c_proj", True, transpose=True)

    return _gpt2_family(ck, args, linears)


def _gpt_bigcode(ck: TensorFiles, args: ModelArgs) -> Tensors:
    """StarCoder 1: ``nn.Linear`` weights; c_attn is [q; k; v] (multi-query) or per-head interleaved."""

    def linears(hf: str, ours: str) -> Tensors:
        for kind in ("weight", "bias"):
            t = ck.get(f"{hf}.attn.c_attn.{kind}")
            if args.n_kv_heads != 1:
                t = _split_interleaved_qkv(t, args.n_heads, args.head_dim)
            yield f"{ours}.attention.wqkv.{kind}", t
        yield from _linear(ck, f"{ours}.attention.wo", f"{hf}.attn.c_proj", True)
        yield from _linear(ck, f"{ours}.feed_forward.w1", f"{hf}.mlp.c_fc", True)
        yield from _linear(ck, f"{ours}.feed_forward.w2", f"{hf}.mlp.c_proj", True)

    return _gpt2_family(ck, args, linears)


def _falcon_qkv(t: Tensor, args: ModelArgs) -> Tensor:
    """Falcon's fused ``query_key_value`` in its three layouts -> ``[q heads; k heads; v heads]``."""
    hd = args.head_dim
    if args.extra["new_decoder_architecture"]:
        # Grouped: per kv group, its query heads then one k and one v.
        rep = args.n_heads // args.n_kv_heads
        t = t.reshape(args.n_kv_heads, rep + 2, hd, *t.shape[1:])
        rest = t.shape[3:]
        q = t[:, :rep].reshape(args.n_heads * hd, *rest)
        k = t[:, rep].reshape(args.n_kv_heads * hd, *rest)
        v = t[:, rep + 1].reshape(args.n_kv_heads * hd, *rest)
        return torch.cat([q, k, v])
    if args.extra["multi_query"]:
        return t  # already [q heads; k; v]
    return _split_interleaved_qkv(t, args.n_heads, hd)


def _falcon(ck: TensorFiles, args: ModelArgs) -> Tensors:
    p = "transformer."
    yield from _head(ck, args, f"{p}word_embeddings.weight", f"{p}ln_f", "lm_head.weight")
    for i in range(args.n_layers):
        hf, ours = f"{p}h.{i}", f"layers.{i}"
        if args.parallel_attn and args.parallel_norms == 2:
            yield from _norm(ck, f"{ours}.attention_norm", f"{hf}.ln_attn", args)
            yield from _norm(ck, f"{ours}.ffn_norm", f"{hf}.ln_mlp", args)
        else:
            yield from _norm(ck, f"{ours}.attention_norm", f"{hf}.input_layernorm", args)
            if not args.parallel_attn:
                yield from _norm(ck, f"{ours}.ffn_norm", f"{hf}.post_attention_layernorm", args)
        qkv = f"{hf}.self_attention.query_key_value"
        yield f"{ours}.attention.wqkv.weight", _falcon_qkv(ck.get(f"{qkv}.weight"), args)
        if args.qkv_bias:
            yield f"{ours}.attention.wqkv.bias", _falcon_qkv(ck.get(f"{qkv}.bias"), args)
        yield from _linear(ck, f"{ours}.attention.wo", f"{hf}.self_attention.dense", args.out_bias)
        yield from _linear(ck, f"{ours}.feed_forward.w1", f"{hf}.mlp.dense_h_to_4h", args.mlp_bias)
        yield from _linear(ck, f"{ours}.feed_forward.w2", f"{hf}.mlp.dense_4h_to_h", args.mlp_bias)


_FAMILIES: dict[str, Callable[[TensorFiles, ModelArgs], Tensors]] = {
    "LlamaForCausalLM": _llama_layout,
    "MistralForCausalLM": _llama_layout,
    "MixtralForCausalLM": _llama_layout,
    "GemmaForCausalLM": _llama_layout,
    "Starcoder2ForCausalLM": _llama_layout,
    "NemotronForCausalLM": _llama_layout,
    "GPT2LMHeadModel": _gpt2,
    "GPTBigCodeForCausalLM": _gpt_bigcode,
    "FalconForCausalLM": _falcon,
}


_FP8_FAMILIES = ("LlamaForCausalLM", "MistralForCausalLM", "GemmaForCausalLM", "Starcoder2ForCausalLM",
                 "NemotronForCausalLM", "MixtralForCausalLM")
# Where checkpoints keep each layer's KV cache scales, as (key scale, value scale) name pairs under the layer.
_KV_SCALE_NAMES = (("self_attn.k_scale", "self_attn.v_scale"), ("self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale"),
                   ("self_attn.kv_scale", "self_attn.kv_scale"),
                   ("self_attn.k_proj.output_scale", "self_attn.v_proj.output_scale"))


def read_scheme(model_dir: str | Path, config: dict | None = None) -> QuantScheme | None:
    """What ``model_dir``'s config.json (and ModelOpt's hf_quant_config.json) declare about FP8."""
    model_dir = Path(model_dir)
    config = read_config(model_dir) if config is None else config
    extra = None
    if (model_dir / "hf_quant_config.json").is_file():
        try:
            extra = json.loads((model_dir / "hf_quant_config.json").read_text())
        except ValueError as exc:
            raise WeightsError(f"{model_dir}/hf_quant_config.json is not valid JSON ({exc})") from None
    try:
        return read_quantization(config, extra)
    except UnsupportedModelError as exc:
        raise WeightsError(f"{model_dir}: {exc}") from None


def _swap_fp8(model: Transformer, name: str, w: Fp8Weight, dtype: torch.dtype) -> None:
    """Replace the meta ``nn.Linear`` owning ``name`` (``<path>.weight``) with an FP8Linear of the same shape."""
    path = name.removesuffix(".weight")
    owner_path, _, attr = path.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    linear = getattr(owner, attr)
    if not isinstance(linear, torch.nn.Linear):
        raise WeightsError(f"{name} is FP8 in the checkpoint, but {path} is not a linear layer here")
    if tuple(w.weight.shape) != (linear.out_features, linear.in_features):
        raise WeightsError(f"{name} has shape {tuple(w.weight.shape)} but config.json implies "
                           f"{(linear.out_features, linear.in_features)}; the weights do not belong to this config")
    with torch.device("meta"):
        setattr(owner, attr, FP8Linear(linear.in_features, linear.out_features, linear.bias is not None, w.block,
                                       w.input_scale is not None, dtype=dtype))


def _kv_scales(ck: TensorFiles, model: Transformer) -> int:
    """Each layer's KV cache scales from the checkpoint onto its attention; returns how many layers had them."""
    if model.args.architecture not in _FP8_FAMILIES:
        return 0
    found = 0
    for i, layer in enumerate(model.layers):
        for k_name, v_name in _KV_SCALE_NAMES:
            prefix = f"model.layers.{i}."
            if ck.has(prefix + k_name) and ck.has(prefix + v_name):
                layer.attention.k_scale = float(ck.get(prefix + k_name).float().reshape(-1)[0])
                layer.attention.v_scale = float(ck.get(prefix + v_name).float().reshape(-1)[0])
                found += 1
                break
    return found


def load_model(model_dir: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | str | None = torch.float32, shard: Any = None) -> Transformer:
    """Build the ``Transformer`` described by ``model_dir/config.json`` and load its weights.

    ``dtype`` None or "auto" keeps the checkpoint's dtype (FP8 weights stay FP8, their scales float32).
    ``shard`` (tp.py) loads only one tensor-parallel rank's piece, with the local shapes and head counts;
    ``tp.parallelize`` then adds the collectives. Caches are not allocated: call ``setup_caches`` next.
    ``model.quant_scheme`` is what the checkpoint declares (None: not quantized), ``model.kv_scales_found``
    how many layers brought their KV cache scales.
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    args = ModelArgs.from_hf_config(config)
    scheme = read_scheme(model_dir, config)
    dtype = weights_dtype(dtype, args)
    if scheme is not None and scheme.weights and args.architecture not in _FP8_FAMILIES:
        raise WeightsError(f"{model_dir}: FP8 weights of {args.architecture} are not supported by the torch runtime; "
                           f"export the checkpoint dequantized (tritonize export --no-keep-fp8)")
    if scheme is not None and scheme.weights and shard is not None:
        raise WeightsError(f"{model_dir}: FP8 weights cannot be split over tensor-parallel ranks yet: serve this "
                           "checkpoint on one GPU, or export it dequantized (tritonize export --no-keep-fp8)")
    with torch.device("meta"):
        model = Transformer(args)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if shard is not None:
        shard.shard_modules(model)
    local = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state: dict[str, Tensor] = {}
    with ExitStack() as stack:
        ck = TensorFiles(model_dir, stack, block=scheme.block if scheme else None)
        for name, tensor in _FAMILIES[args.architecture](ck, args):
            if isinstance(tensor, Fp8Weight):
                _swap_fp8(model, name, tensor, dtype)
                expected = local = {name: tuple(t.shape) for name, t in model.state_dict().items()}
                prefix = name.removesuffix(".weight")
                state[name] = tensor.weight.to(device=device).contiguous()
                state[f"{prefix}.weight_scale"] = tensor.scale.to(device=device, dtype=torch.float32).contiguous()
                if tensor.input_scale is not None:
                    state[f"{prefix}.input_scale"] = tensor.input_scale.to(device=device, dtype=torch.float32)
                continue
            if _dtype_of(tensor) in (FP8, torch.float8_e5m2):
                raise WeightsError(f"{model_dir}: {name} is stored in FP8, which the torch runtime does not support "
                                   "for this tensor (FP8 is read for the linear layers of dense models); export the "
                                   "checkpoint dequantized (tritonize export --no-keep-fp8)")
            if name not in expected:
                raise WeightsError(f"{model_dir}: unexpected runtime parameter {name!r} for {args.architecture}")
            if tuple(tensor.shape) != expected[name]:
                raise WeightsError(
                    f"{model_dir}: {name} has shape {tuple(tensor.shape)} but config.json implies "
                    f"{expected[name]}; the weights do not belong to this config"
                )
            piece = _whole(tensor) if shard is None else shard.select(name, tensor)
            if name in local and tuple(piece.shape) != local[name]:
                raise WeightsError(f"{model_dir}: {name} sharded to {tuple(piece.shape)}, expected {local[name]}")
            state[name] = piece.to(device=device, dtype=dtype).contiguous()
        kv_found = _kv_scales(ck, model)
    missing = sorted(set(local) - set(state))
    if missing:
        raise WeightsError(f"{model_dir}: no weights for {', '.join(missing[:5])}")
    model.load_state_dict(state, strict=True, assign=True)
    model.quant_scheme = scheme
    model.kv_scales_found = kv_found
    return model.eval().requires_grad_(False)
