"""TRT-LLM checkpoints (and ``.qnemo``, which wraps one) as a canonical model.

Layout (TensorRT-LLM docs/source/architecture/checkpoint.md, models/*/convert.py):
- ``config.json`` (architecture, dtype, sizes, ``mapping.tp_size/pp_size``, ``quantization``)
  and ``rank{N}.safetensors`` with ``N = pp_rank * tp_size + tp_rank``;
- pipeline stage ``p`` holds layers ``tensor_split(range(L), pp)[p]`` under local indices;
- ``attention.qkv`` is ``[q_r; k_r; v_r]`` per tensor-parallel rank, key/value heads duplicated
  when there are fewer of them than ranks; ``attention.dense`` and ``mlp.proj`` are split along
  dim 1 (row parallel), ``mlp.fc``/``mlp.gate``/``lm_head`` along dim 0 (``lm_head`` padded to a
  multiple of tp);
- GatedMLP: ``mlp.fc`` is the activated half (HF ``gate_proj``), ``mlp.gate`` the other
  (``up_proj``); MoE ``mlp.fc`` is ``[E, 2I/tp, H]`` = cat(w3, w1), ``mlp.proj`` ``[E, H, I/tp]``;
- norms are plain gains (Gemma's ``1 + w`` folded in);
- FP8 weights come with ``weights_scaling_factor`` (per tensor or per output channel; the real weight is
  ``fp8 * scale``) and, for static activations (``FP8``), ``activation_scaling_factor``; they are read as
  ``lazy.Quantized`` (dequantized to the checkpoint's ``dtype`` unless a writer keeps them FP8), and each
  layer's ``attention.kv_cache_scaling_factor`` as its KV cache scale (the same for keys and values).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from ..errors import ExportError
from .canonical import MODEL_TYPES, Expert, Layer, Linear, Model, ModelSpec, Norm
from .hf_config import choose_arch
from .lazy import Cat1, Lazy, Quantized, Region, Rows, Unstack, cat0, rows_of
from .stored import StoredTensor, parse_dtype
from .tree import Tree
from .weight_files import read_safetensors

_ARCH_TYPES = {
    "LlamaForCausalLM": "llama",
    "LLaMAForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
    "GemmaForCausalLM": "gemma",
    "FalconForCausalLM": "falcon",
    "GPTForCausalLM": "gpt",
    "NemotronForCausalLM": "nemotron",
    "Starcoder2ForCausalLM": "starcoder2",
    "GPTBigCodeForCausalLM": "starcoder",
}
_GPT_VARIANTS = {"starcoder": "starcoder", "santacoder": "starcoder", "starcoder2": "starcoder2",
                 "nemotron": "nemotron", "gpt2": "gpt"}
_IGNORED = ("activation_scaling_factor", "kv_cache_scaling_factor", "kv_cache_rcp_scaling_factor",
            "prequant_scaling_factor", "smoother", "act_scale")
_DEQUANT = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN")


def _activation(cfg: dict[str, Any], model_type: str) -> tuple[str, bool]:
    """(HF activation, gated) for TRT-LLM's ``hidden_act``; plain ``gelu`` keeps each family's HF default."""
    act = str(cfg.get("hidden_act", "gelu")).lower()
    gated = act in ("swiglu", "geglu", "gated-gelu", "gated-silu") or model_type in ("llama", "mistral", "mixtral",
                                                                                     "gemma")
    base = {"swiglu": "silu", "gated-silu": "silu", "silu": "silu", "swish": "silu", "relu": "relu",
            "squared-relu": "relu2", "relu2": "relu2", "gelu_new": "gelu_new",
            "gelu_pytorch_tanh": "gelu_pytorch_tanh", "openai-gelu": "gelu_pytorch_tanh"}.get(act)
    if base is None and act in ("gelu", "geglu", "gated-gelu", "fast-gelu"):
        tanh_default = model_type in ("gemma", "starcoder", "starcoder2") or cfg.get("gpt_variant") == "gpt2"
        base = "gelu_pytorch_tanh" if tanh_default else "gelu"
    if base is None:
        raise ExportError(f"TRT-LLM checkpoint: unsupported hidden_act {act!r}")
    return base, gated


def _rope(cfg: dict[str, Any]) -> dict[str, Any] | None:
    sc = cfg.get("rotary_scaling")
    if not sc:
        return None
    sc = dict(sc)
    kind = sc.pop("type", None) or sc.pop("rope_type", "linear")
    out = {"rope_type": kind, **{k: v for k, v in sc.items() if v is not None}}
    return out


def read_config(tree: Tree, what: str) -> dict[str, Any]:
    try:
        cfg = json.loads(tree.read_text("config.json"))
    except ValueError as e:
        raise ExportError(f"{what}/config.json is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or "architecture" not in cfg:
        raise ExportError(f"{what}/config.json is not a TRT-LLM checkpoint config (no 'architecture')")
    return cfg


class _Ranks:
    """The rank files, and tensors merged over tensor-parallel ranks (with FP8 dequantized)."""

    def __init__(self, tree: Tree, cfg: dict[str, Any], what: str):
        mapping = cfg.get("mapping") or {}
        self.tp = int(mapping.get("tp_size", 1))
        self.pp = int(mapping.get("pp_size", 1))
        world = int(mapping.get("world_size", self.tp * self.pp))
        if world != self.tp * self.pp:
            raise ExportError(f"{what}: mapping world_size {world} != tp_size {self.tp} x pp_size {self.pp}")
        if int(mapping.get("moe_ep_size", 1)) > 1 or int(mapping.get("cp_size", 1)) > 1:
            raise ExportError(f"{what}: expert- or context-parallel TRT-LLM checkpoints are not supported")
        self.what = what
        self.files: list[dict[str, StoredTensor]] = []
        for r in range(world):
            if not tree.is_file(f"rank{r}.safetensors"):
                raise ExportError(f"{what}: rank{r}.safetensors is missing (mapping says {world} ranks)")
            self.files.append(read_safetensors(tree, f"rank{r}.safetensors"))
        self.used: set[tuple[int, str]] = set()
        quant = cfg.get("quantization") or {}
        algo = quant.get("quant_algo")
        if algo not in (None, *_DEQUANT):
            raise ExportError(f"{what}: quantization {algo} is not supported (only FP8 weights are dequantized)")
        self.dtype = parse_dtype(cfg.get("dtype", "float16"))

    def rank(self, pp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.tp + tp_rank

    def has(self, r: int, name: str) -> bool:
        return name in self.files[r]

    def get(self, r: int, name: str) -> Lazy:
        if name not in self.files[r]:
            raise ExportError(f"{self.what}: rank{r}.safetensors lacks {name}")
        self.used.add((r, name))
        t: Lazy = Region(self.files[r][name])
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale_name = name.rsplit(".", 1)[0] + ".weights_scaling_factor"
            if scale_name not in self.files[r]:
                raise ExportError(f"{self.what}: FP8 tensor {name} has no weights_scaling_factor")
            self.used.add((r, scale_name))
            act_name = name.rsplit(".", 1)[0] + ".activation_scaling_factor"
            act = None
            if act_name in self.files[r]:
                self.used.add((r, act_name))
                act = Region(self.files[r][act_name])
            t = Quantized(t, Region(self.files[r][scale_name]), self.dtype, input_scale=act)
        return t

    def cols(self, pp_rank: int, name: str) -> Lazy:
        """Column-parallel (dim 0) pieces of all tp ranks, concatenated."""
        return cat0([self.get(self.rank(pp_rank, t), name) for t in range(self.tp)])

    def rows_parallel(self, pp_rank: int, name: str) -> Lazy:
        """Row-parallel (dim 1) pieces, concatenated."""
        parts = [self.get(self.rank(pp_rank, t), name) for t in range(self.tp)]
        return parts[0] if len(parts) == 1 else Cat1(parts)

    def replicated(self, pp_rank: int, name: str, required: bool = True) -> Lazy | None:
        r = self.rank(pp_rank, 0)
        if not self.has(r, name):
            if required:
                raise ExportError(f"{self.what}: rank{r}.safetensors lacks {name}")
            return None
        for t in range(1, self.tp):  # the other ranks' copies are the same weight
            if self.has(self.rank(pp_rank, t), name):
                self.used.add((self.rank(pp_rank, t), name))
        return self.get(r, name)

    def leftovers(self) -> list[str]:
        out = []
        for r, names in enumerate(self.files):
            for n in names:
                if (r, n) not in self.used and not n.endswith(_IGNORED) and not n.endswith("weights_scaling_factor"):
                    out.append(f"rank{r}:{n}")
        return out


def _qkv(ranks: _Ranks, p: int, name: str, spec: ModelSpec) -> tuple[Lazy, Lazy, Lazy]:
    """q, k, v out of the per-rank ``[q_r; k_r; v_r]`` pieces, duplicated kv heads dropped."""
    d, tp = spec.head_dim, ranks.tp
    q_r = spec.num_heads // tp * d
    pieces = [ranks.get(ranks.rank(p, t), name) for t in range(tp)]
    kv_r = (pieces[0].shape[0] - q_r) // 2
    if kv_r <= 0 or kv_r % d or pieces[0].shape[0] != q_r + 2 * kv_r:
        raise ExportError(f"{ranks.what}: {name} has {pieces[0].shape[0]} rows per rank, which does not fit "
                          f"{spec.num_heads} heads / {spec.num_kv_heads} kv heads of size {d} over tp={tp}")
    dup = max(1, kv_r * tp // spec.kv_size)
    if kv_r * tp != spec.kv_size * dup:
        raise ExportError(f"{ranks.what}: {name} holds {kv_r * tp // d} kv heads over all ranks, config says "
                          f"{spec.num_kv_heads}")
    q = Rows([(pc, 0, q_r) for pc in pieces])
    keep = pieces[::dup]
    k = Rows([(pc, q_r, kv_r) for pc in keep])
    v = Rows([(pc, q_r + kv_r, kv_r) for pc in keep])
    return q, k, v


def _layer_ranges(num_layers: int, pp: int) -> list[list[int]]:
    return [t.tolist() for t in torch.tensor_split(torch.arange(num_layers), pp)]


def read_trtllm(tree: Tree, model_type: str | None, what: str) -> Model:
    cfg = read_config(tree, what)
    arch = str(cfg["architecture"])
    mt = model_type or _ARCH_TYPES.get(arch)
    if arch == "GPTForCausalLM" and not model_type:
        mt = _GPT_VARIANTS.get(str(cfg.get("gpt_variant", "gpt")), "gpt")
    moe = cfg.get("moe") or {}
    num_experts = int(moe.get("num_experts") or cfg.get("moe_num_experts") or 0)
    if mt == "llama" and num_experts:
        mt = "mixtral"
    if num_experts and int(moe.get("normalization_mode", 1)) != 1:
        raise ExportError(f"{what}: MoE normalization_mode {moe.get('normalization_mode')} is not supported "
                          "(only RENORMALIZE, Mixtral's routing)")
    if mt not in MODEL_TYPES:
        raise ExportError(f"{what}: unsupported TRT-LLM architecture {arch!r}; pass --model-type to force a type")
    if cfg.get("qk_layernorm") or cfg.get("use_qk_norm"):
        raise ExportError(f"{what}: models with qk layer norms are not supported")
    pos = str(cfg.get("position_embedding_type", "learned_absolute"))
    if pos not in ("learned_absolute", "rope_gpt_neox"):
        raise ExportError(f"{what}: position_embedding_type {pos!r} is not supported "
                          "(only learned_absolute and rope_gpt_neox)")
    ranks = _Ranks(tree, cfg, what)
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_size") or cfg.get("head_dim") or hidden // heads)
    L = int(cfg["num_hidden_layers"])
    activation, gated = _activation(cfg, mt)
    last = ranks.pp - 1
    first_layer_name = "transformer.layers.0."
    r0 = ranks.rank(0, 0)
    gated = gated or ranks.has(r0, first_layer_name + "mlp.gate.weight")
    spec = ModelSpec(
        arch="",
        model_type=mt,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        num_layers=L,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=int(cfg.get("intermediate_size") or cfg.get("ffn_hidden_size") or 4 * hidden),
        norm="rms" if mt in ("llama", "mistral", "mixtral", "gemma") else "layer",
        norm_eps=float(cfg.get("norm_epsilon", 1e-5)),
        gated=gated,
        activation=activation,
        qkv_bias=ranks.has(r0, first_layer_name + "attention.qkv.bias"),
        out_bias=ranks.has(r0, first_layer_name + "attention.dense.bias"),
        mlp_bias=ranks.has(r0, first_layer_name + "mlp.fc.bias") or ranks.has(r0, first_layer_name + "mlp.proj.bias"),
        positions="learned" if pos == "learned_absolute" else "rope",
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
        rope_theta=float(cfg.get("rotary_base", 10000.0)),
        rotary_pct=float(cfg.get("rotary_pct", cfg.get("partial_rotary_factor", 1.0)) or 1.0),
        rope_scaling=_rope(cfg),
        tie_embeddings=bool(cfg.get("share_embedding_table", False)) or bool(cfg.get("tie_word_embeddings", False))
        or not ranks.has(ranks.rank(last, 0), "lm_head.weight"),
        num_experts=num_experts,
        experts_per_token=int(moe.get("top_k") or cfg.get("moe_top_k") or 0),
        parallel_attn=bool(cfg.get("parallel_attention", False)) or bool(cfg.get("new_decoder_architecture", False)),
        new_decoder_architecture=bool(cfg.get("new_decoder_architecture", False)),
        sliding_window=cfg.get("sliding_window") if isinstance(cfg.get("sliding_window"), int) else None,
        embedding_scale=mt == "gemma",
        dtype=str(cfg.get("dtype", "float16")),
    )
    spec.arch = choose_arch(spec)
    if heads % ranks.tp:
        raise ExportError(f"{what}: {heads} heads do not split over tp_size {ranks.tp}")

    def norm(p: int, name: str, required: bool = True) -> Norm | None:
        w = ranks.replicated(p, name + ".weight", required)
        return None if w is None else Norm(w, ranks.replicated(p, name + ".bias", required=False), 0.0)

    layers: list[Layer] = []
    for p, global_layers in enumerate(_layer_ranges(L, ranks.pp)):
        for j, _g in enumerate(global_layers):
            pre = f"transformer.layers.{j}."
            q, k, v = _qkv(ranks, p, pre + "attention.qkv.weight", spec)
            qb = kb = vb = None
            if spec.qkv_bias:
                qb, kb, vb = _qkv(ranks, p, pre + "attention.qkv.bias", spec)
            o = Linear(ranks.rows_parallel(p, pre + "attention.dense.weight"),
                       ranks.replicated(p, pre + "attention.dense.bias", required=False))
            attn_norm = norm(p, pre + "input_layernorm")
            if spec.new_decoder_architecture:
                mlp_norm = norm(p, pre + "mlp_layernorm")
            else:
                mlp_norm = norm(p, pre + "post_layernorm", required=not spec.parallel_attn)
            layer = Layer(attn_norm, Linear(q, qb), Linear(k, kb), Linear(v, vb), o, mlp_norm)
            kv_scale = ranks.replicated(p, pre + "attention.kv_cache_scaling_factor", required=False)
            layer.k_scale = layer.v_scale = kv_scale
            if num_experts:
                layer.router = ranks.replicated(p, pre + "mlp.router.weight")
                layer.experts = _experts(ranks, p, pre, spec)
            else:
                fc_b = (ranks.cols(p, pre + "mlp.fc.bias")
                        if ranks.has(ranks.rank(p, 0), pre + "mlp.fc.bias") else None)
                fc = Linear(ranks.cols(p, pre + "mlp.fc.weight"), fc_b)
                layer.down = Linear(ranks.rows_parallel(p, pre + "mlp.proj.weight"),
                                    ranks.replicated(p, pre + "mlp.proj.bias", required=False))
                if spec.gated:
                    gate_b = (ranks.cols(p, pre + "mlp.gate.bias")
                              if ranks.has(ranks.rank(p, 0), pre + "mlp.gate.bias") else None)
                    layer.gate, layer.up = fc, Linear(ranks.cols(p, pre + "mlp.gate.weight"), gate_b)
                else:
                    layer.up = fc
            layers.append(layer)

    embed = _embedding(ranks, cfg, spec)
    pos_embed = ranks.replicated(0, "transformer.position_embedding.weight", required=spec.positions == "learned")
    final = norm(last, "transformer.ln_f")
    lm_head = None
    if spec.tie_embeddings:  # a copy of the embedding written for TRT-LLM's sake
        ranks.used.update((ranks.rank(last, t), "lm_head.weight") for t in range(ranks.tp))
    else:
        full = ranks.cols(last, "lm_head.weight")
        if full.shape[0] < spec.vocab_size:
            raise ExportError(f"{what}: lm_head has {full.shape[0]} rows for a vocabulary of {spec.vocab_size}")
        lm_head = rows_of(full, 0, spec.vocab_size)
    leftover = ranks.leftovers()
    if leftover:
        raise ExportError(f"{what}: tensors the {mt} mapping does not use ({', '.join(leftover[:4])}"
                          f"{' ...' if len(leftover) > 4 else ''}); refusing to drop them silently")
    return Model(spec, embed, final, layers, lm_head=lm_head, pos_embed=pos_embed)


def _embedding(ranks: _Ranks, cfg: dict[str, Any], spec: ModelSpec) -> Lazy:
    name = "transformer.vocab_embedding.weight"
    if cfg.get("use_parallel_embedding") and ranks.tp > 1:
        if int(cfg.get("embedding_sharding_dim", 0)) == 0:
            full = ranks.cols(0, name)
        else:
            full = ranks.rows_parallel(0, name)
    else:
        full = ranks.replicated(0, name)
    if full.shape[0] < spec.vocab_size or full.shape[1] != spec.hidden_size:
        raise ExportError(f"{ranks.what}: vocab_embedding has shape {list(full.shape)}, expected "
                          f"[{spec.vocab_size}, {spec.hidden_size}]")
    return rows_of(full, 0, spec.vocab_size)


def _experts(ranks: _Ranks, p: int, pre: str, spec: ModelSpec) -> list[Expert]:
    tp = ranks.tp
    inter_r = spec.intermediate_size // tp
    fcs = [ranks.get(ranks.rank(p, t), pre + "mlp.fc.weight") for t in range(tp)]
    projs = [ranks.get(ranks.rank(p, t), pre + "mlp.proj.weight") for t in range(tp)]
    if fcs[0].shape != (spec.num_experts, 2 * inter_r, spec.hidden_size):
        raise ExportError(f"{ranks.what}: {pre}mlp.fc.weight has shape {list(fcs[0].shape)}, expected "
                          f"[{spec.num_experts}, {2 * inter_r}, {spec.hidden_size}] per rank")
    out = []
    for e in range(spec.num_experts):
        per_rank = [Unstack(f, e) for f in fcs]
        up = cat0([rows_of(x, 0, inter_r) for x in per_rank])  # w3 first
        gate = cat0([rows_of(x, inter_r, inter_r) for x in per_rank])  # then w1
        downs = [Unstack(pr, e) for pr in projs]
        down = downs[0] if tp == 1 else Cat1(downs)
        out.append(Expert(gate=Linear(gate), up=Linear(up), down=Linear(down)))
    return out
