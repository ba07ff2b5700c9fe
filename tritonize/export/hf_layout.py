"""Hugging Face tensor names of each supported architecture, both ways.

:func:`to_hf` names (and fuses or transposes) a canonical model's weights as ``spec.arch`` stores
them; :func:`from_hf` reads an HF checkpoint back into a canonical model.

Fused layouts, with q heads grouped per key/value head as Megatron stores them:
- Falcon ``query_key_value`` and GPTBigCode (multi-head) ``c_attn``: per kv group
  ``[q_0 .. q_{r-1}, k, v]``; GPTBigCode multi-query: ``[q, k, v]``.
- GPT-2 ``c_attn``: ``[q, k, v]``, and every GPT-2 linear is a Conv1D stored transposed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ExportError
from .canonical import Expert, Layer, Linear, Model, ModelSpec, Norm
from .lazy import Lazy, Quantized, Rows, Transpose, Zeros, add_offset, cat0, rows_of
from .stored import parse_dtype

#: norm convention of each architecture: the layer computes (weight + offset) * x_hat
NORM_OFFSET = {"GemmaForCausalLM": 1.0, "NemotronForCausalLM": 1.0}

_LLAMA_LIKE = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "GemmaForCausalLM")


# --------------------------------------------------------------------------------------------------
# canonical -> HF tensors
# --------------------------------------------------------------------------------------------------


def _bias(lin: Linear, rows: int, dtype: torch.dtype) -> Lazy:
    return lin.bias if lin.bias is not None else Zeros((rows,), dtype)


def _norm(n: Norm, arch: str) -> Lazy:
    return add_offset(n.weight, n.offset - NORM_OFFSET.get(arch, 0.0))


def _norm_bias(n: Norm, dtype: torch.dtype) -> Lazy:
    return n.bias if n.bias is not None else Zeros((n.weight.shape[0],), dtype)


def grouped_qkv(spec: ModelSpec, q: Lazy, k: Lazy, v: Lazy) -> Lazy:
    """``[q_0..q_{r-1}, k, v]`` per key/value group (Megatron's and Falcon's fused layout)."""
    d, groups = spec.head_dim, spec.num_kv_heads
    r = spec.num_heads // groups
    segs = []
    for g in range(groups):
        segs += [(q, g * r * d, r * d), (k, g * d, d), (v, g * d, d)]
    return Rows(segs)


def to_hf(model: Model) -> list[tuple[str, Lazy]]:
    """The HF tensors of ``model`` in ``model.spec.arch``'s names, in checkpoint order."""
    spec = model.spec
    a = spec.arch
    dt = model.embed.dtype
    out: list[tuple[str, Lazy]] = []

    def add(name: str, t: Lazy | None) -> None:
        if t is not None:
            out.append((name, t))

    if a in ("GPT2LMHeadModel", "GPTBigCodeForCausalLM", "FalconForCausalLM"):
        add("transformer.word_embeddings.weight" if a == "FalconForCausalLM" else "transformer.wte.weight", model.embed)
        if a != "FalconForCausalLM":
            if model.pos_embed is None:
                raise ExportError(f"{a} needs learned position embeddings, the source has none")
            add("transformer.wpe.weight", model.pos_embed)
    else:
        add("model.embed_tokens.weight", model.embed)

    for i, L in enumerate(model.layers):
        if a in _LLAMA_LIKE or a in ("NemotronForCausalLM", "Starcoder2ForCausalLM"):
            p = f"model.layers.{i}."
            bias_attn = a == "Starcoder2ForCausalLM" or ((spec.qkv_bias or spec.out_bias) and a != "MistralForCausalLM")
            add(p + "input_layernorm.weight", _norm(L.attn_norm, a))
            if spec.norm == "layer":
                add(p + "input_layernorm.bias", _norm_bias(L.attn_norm, dt))
            for role, lin, rows in (("q", L.q, spec.q_size), ("k", L.k, spec.kv_size), ("v", L.v, spec.kv_size),
                                    ("o", L.o, spec.hidden_size)):
                add(p + f"self_attn.{role}_proj.weight", lin.weight)
                if bias_attn:
                    add(p + f"self_attn.{role}_proj.bias", _bias(lin, rows, dt))
            add(p + "post_attention_layernorm.weight", _norm(L.mlp_norm, a))
            if spec.norm == "layer":
                add(p + "post_attention_layernorm.bias", _norm_bias(L.mlp_norm, dt))
            if a == "MixtralForCausalLM":
                add(p + "block_sparse_moe.gate.weight", L.router)
                for e, ex in enumerate(L.experts):
                    add(p + f"block_sparse_moe.experts.{e}.w1.weight", ex.gate.weight)
                    add(p + f"block_sparse_moe.experts.{e}.w2.weight", ex.down.weight)
                    add(p + f"block_sparse_moe.experts.{e}.w3.weight", ex.up.weight)
            elif a == "Starcoder2ForCausalLM":
                add(p + "mlp.c_fc.weight", L.up.weight)
                add(p + "mlp.c_fc.bias", _bias(L.up, spec.intermediate_size, dt))
                add(p + "mlp.c_proj.weight", L.down.weight)
                add(p + "mlp.c_proj.bias", _bias(L.down, spec.hidden_size, dt))
            else:
                names = (("up", L.up, spec.intermediate_size), ("down", L.down, spec.hidden_size))
                if spec.gated:
                    names = (("gate", L.gate, spec.intermediate_size),) + names
                for role, lin, rows in names:
                    add(p + f"mlp.{role}_proj.weight", lin.weight)
                    if spec.mlp_bias:
                        add(p + f"mlp.{role}_proj.bias", _bias(lin, rows, dt))
        elif a in ("GPT2LMHeadModel", "GPTBigCodeForCausalLM"):
            p = f"transformer.h.{i}."
            if a == "GPT2LMHeadModel" or spec.num_kv_heads == 1:
                qkv_w = cat0([L.q.weight, L.k.weight, L.v.weight])
                qkv_b = cat0([_bias(L.q, spec.q_size, dt), _bias(L.k, spec.kv_size, dt), _bias(L.v, spec.kv_size, dt)])
            else:
                qkv_w = grouped_qkv(spec, L.q.weight, L.k.weight, L.v.weight)
                qkv_b = grouped_qkv(spec, _bias(L.q, spec.q_size, dt), _bias(L.k, spec.kv_size, dt),
                                    _bias(L.v, spec.kv_size, dt))
            conv = Transpose if a == "GPT2LMHeadModel" else (lambda t: t)
            add(p + "ln_1.weight", _norm(L.attn_norm, a))
            add(p + "ln_1.bias", _norm_bias(L.attn_norm, dt))
            add(p + "attn.c_attn.weight", conv(qkv_w))
            add(p + "attn.c_attn.bias", qkv_b)
            add(p + "attn.c_proj.weight", conv(L.o.weight))
            add(p + "attn.c_proj.bias", _bias(L.o, spec.hidden_size, dt))
            add(p + "ln_2.weight", _norm(L.mlp_norm, a))
            add(p + "ln_2.bias", _norm_bias(L.mlp_norm, dt))
            add(p + "mlp.c_fc.weight", conv(L.up.weight))
            add(p + "mlp.c_fc.bias", _bias(L.up, spec.intermediate_size, dt))
            add(p + "mlp.c_proj.weight", conv(L.down.weight))
            add(p + "mlp.c_proj.bias", _bias(L.down, spec.hidden_size, dt))
        elif a == "FalconForCausalLM":
            p = f"transformer.h.{i}."
            if spec.new_decoder_architecture:
                norms = (("ln_attn", L.attn_norm), ("ln_mlp", L.mlp_norm))
            elif spec.parallel_attn:
                norms = (("input_layernorm", L.attn_norm),)
            else:
                norms = (("input_layernorm", L.attn_norm), ("post_attention_layernorm", L.mlp_norm))
            for name, n in norms:
                if n is None:
                    raise ExportError(f"Falcon layer {i} lacks its {name}")
                add(p + f"{name}.weight", _norm(n, a))
                add(p + f"{name}.bias", _norm_bias(n, dt))
            add(p + "self_attention.query_key_value.weight", grouped_qkv(spec, L.q.weight, L.k.weight, L.v.weight))
            add(p + "self_attention.dense.weight", L.o.weight)
            add(p + "mlp.dense_h_to_4h.weight", L.up.weight)
            add(p + "mlp.dense_4h_to_h.weight", L.down.weight)
            if spec.qkv_bias or spec.out_bias or spec.mlp_bias:
                add(p + "self_attention.query_key_value.bias",
                    grouped_qkv(spec, _bias(L.q, spec.q_size, dt), _bias(L.k, spec.kv_size, dt),
                                _bias(L.v, spec.kv_size, dt)))
                add(p + "self_attention.dense.bias", _bias(L.o, spec.hidden_size, dt))
                add(p + "mlp.dense_h_to_4h.bias", _bias(L.up, spec.intermediate_size, dt))
                add(p + "mlp.dense_4h_to_h.bias", _bias(L.down, spec.hidden_size, dt))

    if a in ("GPT2LMHeadModel", "GPTBigCodeForCausalLM", "FalconForCausalLM"):
        add("transformer.ln_f.weight", _norm(model.final_norm, a))
        add("transformer.ln_f.bias", _norm_bias(model.final_norm, dt))
    else:
        add("model.norm.weight", _norm(model.final_norm, a))
        if spec.norm == "layer":
            add("model.norm.bias", _norm_bias(model.final_norm, dt))
    if not spec.tie_embeddings:
        if model.lm_head is None:
            raise ExportError("the model has no output layer and does not share its embeddings")
        add("lm_head.weight", model.lm_head)
    return out


# --------------------------------------------------------------------------------------------------
# HF tensors -> canonical
# --------------------------------------------------------------------------------------------------

#: tensors some HF checkpoints carry that are not weights (causal masks, cached rotary tables)
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


#: where FP8 checkpoints keep a layer's KV cache scales: (key, value) names under ``model.layers.N.``
KV_SCALE_NAMES = (("self_attn.k_scale", "self_attn.v_scale"), ("self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale"),
                  ("self_attn.kv_scale", "self_attn.kv_scale"),
                  ("self_attn.k_proj.output_scale", "self_attn.v_proj.output_scale"))
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def from_hf(spec: ModelSpec, get: Callable[[str], Lazy], names: set[str],
            fp8_block: tuple[int, int] | None = None) -> Model:
    """Reads an HF checkpoint of ``spec.arch`` into a canonical model; every tensor must be used.

    An FP8 weight (``<linear>.weight`` in float8_e4m3fn) is read with its ``weight_scale`` (or
    ``weight_scale_inv``; block-wise with ``fp8_block``) and static ``input_scale`` (or ``activation_scale``)
    as a ``lazy.Quantized`` in ``spec.dtype``; KV cache scales (``KV_SCALE_NAMES``) onto each layer."""
    a = spec.arch
    used: set[str] = set()
    dt_holder: list[torch.dtype] = []
    out_dtype = _dtype_or(spec.dtype, torch.bfloat16)

    def take(name: str, required: bool = True) -> Lazy | None:
        if name not in names:
            if required:
                raise ExportError(f"tensor {name} is missing from the Hugging Face checkpoint")
            return None
        used.add(name)
        t = get(name)
        if t.dtype in _FP8_DTYPES and name.endswith(".weight"):
            prefix = name.removesuffix(".weight")
            scale = next((n for n in (f"{prefix}.weight_scale", f"{prefix}.weight_scale_inv") if n in names), None)
            if scale is None:
                raise ExportError(f"{name} is FP8 but the checkpoint has no {prefix}.weight_scale")
            if t.dtype != torch.float8_e4m3fn:
                raise ExportError(f"{name} is {t.dtype}; FP8 weights are read in float8_e4m3fn")
            inp = next((n for n in (f"{prefix}.input_scale", f"{prefix}.activation_scale") if n in names), None)
            used.update(n for n in (scale, inp) if n)
            t = Quantized(t, get(scale), out_dtype, fp8_block, get(inp) if inp else None)
        dt_holder.append(t.dtype)
        return t

    def lin(prefix: str, bias: bool) -> Linear:
        return Linear(take(prefix + ".weight"), take(prefix + ".bias", required=False) if bias else None)

    def norm(prefix: str, required: bool = True) -> Norm | None:
        w = take(prefix + ".weight", required)
        if w is None:
            return None
        return Norm(w, take(prefix + ".bias", required=False), NORM_OFFSET.get(a, 0.0))

    layers: list[Layer] = []
    pos_embed = None
    if a in ("GPT2LMHeadModel", "GPTBigCodeForCausalLM", "FalconForCausalLM"):
        embed = take("transformer.word_embeddings.weight" if a == "FalconForCausalLM" else "transformer.wte.weight")
        if a != "FalconForCausalLM":
            pos_embed = take("transformer.wpe.weight")
    else:
        embed = take("model.embed_tokens.weight")

    d, kv, nh = spec.head_dim, spec.num_kv_heads, spec.num_heads
    for i in range(spec.num_layers):
        if a in _LLAMA_LIKE or a in ("NemotronForCausalLM", "Starcoder2ForCausalLM"):
            p = f"model.layers.{i}."
            q, k, v, o = (lin(p + f"self_attn.{r}_proj", True) for r in "qkvo")
            layer = Layer(norm(p + "input_layernorm"), q, k, v, o, norm(p + "post_attention_layernorm"))
            for k_name, v_name in KV_SCALE_NAMES:
                if p + k_name in names and p + v_name in names:
                    layer.k_scale, layer.v_scale = take(p + k_name), take(p + v_name)
                    break
            if a == "MixtralForCausalLM":
                layer.router, layer.experts = _mixtral_experts(spec, p, take, names)
            elif a == "Starcoder2ForCausalLM":
                layer.up, layer.down = lin(p + "mlp.c_fc", True), lin(p + "mlp.c_proj", True)
            else:
                layer.up, layer.down = lin(p + "mlp.up_proj", True), lin(p + "mlp.down_proj", True)
                if spec.gated:
                    layer.gate = lin(p + "mlp.gate_proj", True)
        elif a in ("GPT2LMHeadModel", "GPTBigCodeForCausalLM"):
            p = f"transformer.h.{i}."
            conv = Transpose if a == "GPT2LMHeadModel" else (lambda t: t)
            qkv_w, qkv_b = conv(take(p + "attn.c_attn.weight")), take(p + "attn.c_attn.bias", required=False)
            if a == "GPT2LMHeadModel" or kv == 1:
                parts = _split_rows(qkv_w, (nh * d, kv * d, kv * d))
                bparts = _split_rows(qkv_b, (nh * d, kv * d, kv * d)) if qkv_b is not None else (None,) * 3
            else:
                parts, bparts = _ungroup(qkv_w, nh, kv, d), _ungroup(qkv_b, nh, kv, d) if qkv_b is not None else (None,) * 3
            q, k, v = (Linear(w, b) for w, b in zip(parts, bparts, strict=False))
            o = Linear(conv(take(p + "attn.c_proj.weight")), take(p + "attn.c_proj.bias", required=False))
            layer = Layer(norm(p + "ln_1"), q, k, v, o, norm(p + "ln_2"))
            layer.up = Linear(conv(take(p + "mlp.c_fc.weight")), take(p + "mlp.c_fc.bias", required=False))
            layer.down = Linear(conv(take(p + "mlp.c_proj.weight")), take(p + "mlp.c_proj.bias", required=False))
        else:  # Falcon
            p = f"transformer.h.{i}."
            if spec.new_decoder_architecture:
                attn_norm, mlp_norm = norm(p + "ln_attn"), norm(p + "ln_mlp")
            elif spec.parallel_attn:
                attn_norm, mlp_norm = norm(p + "input_layernorm"), None
            else:
                attn_norm, mlp_norm = norm(p + "input_layernorm"), norm(p + "post_attention_layernorm")
            qkv = lin(p + "self_attention.query_key_value", True)
            ws = _ungroup(qkv.weight, nh, kv, d)
            bs = _ungroup(qkv.bias, nh, kv, d) if qkv.bias is not None else (None,) * 3
            q, k, v = (Linear(w, b) for w, b in zip(ws, bs, strict=False))
            layer = Layer(attn_norm, q, k, v, lin(p + "self_attention.dense", True), mlp_norm)
            layer.up, layer.down = lin(p + "mlp.dense_h_to_4h", True), lin(p + "mlp.dense_4h_to_h", True)
        layers.append(layer)

    if a in ("GPT2LMHeadModel", "GPTBigCodeForCausalLM", "FalconForCausalLM"):
        final = norm("transformer.ln_f")
    else:
        final = norm("model.norm")
    lm_head = take("lm_head.weight", required=not spec.tie_embeddings)
    if spec.tie_embeddings and lm_head is not None:
        lm_head = None  # tied: the head is the embedding, whatever a stray copy says
    leftover = sorted(n for n in names - used if not n.endswith(_IGNORED_SUFFIXES))
    if leftover:
        raise ExportError(
            f"{a} checkpoint has tensors this exporter does not know ({', '.join(leftover[:4])}"
            f"{' ...' if len(leftover) > 4 else ''}); refusing to drop them silently"
        )
    return Model(spec, embed, final, layers, lm_head=lm_head, pos_embed=pos_embed)


def _dtype_or(name: str | None, default: torch.dtype) -> torch.dtype:
    try:
        return parse_dtype(name) if name else default
    except ExportError:
        return default


def _split_rows(t: Lazy, sizes: tuple[int, ...]) -> tuple[Lazy, ...]:
    if sum(sizes) != t.shape[0]:
        raise ExportError(f"fused tensor has {t.shape[0]} rows, expected {sum(sizes)}")
    out, pos = [], 0
    for n in sizes:
        out.append(rows_of(t, pos, n))
        pos += n
    return tuple(out)


def _ungroup(t: Lazy, nh: int, kv: int, d: int) -> tuple[Lazy, Lazy, Lazy]:
    """Inverse of :func:`grouped_qkv`: q, k, v out of ``[q_0..q_{r-1}, k, v]`` per group."""
    r = nh // kv
    if t.shape[0] != kv * (r + 2) * d:
        raise ExportError(f"fused qkv has {t.shape[0]} rows, expected {kv * (r + 2) * d}")
    step = (r + 2) * d
    q = Rows([(t, g * step, r * d) for g in range(kv)])
    k = Rows([(t, g * step + r * d, d) for g in range(kv)])
    v = Rows([(t, g * step + (r + 1) * d, d) for g in range(kv)])
    return q, k, v


def _mixtral_experts(spec: ModelSpec, p: str, take, names: set[str]) -> tuple[Lazy, list[Expert]]:
    """Both spellings: ``block_sparse_moe.experts.e.w{1,2,3}`` (files) and 5.x ``mlp.experts.gate_up_proj``."""
    from .lazy import Unstack

    inter = spec.intermediate_size
    if p + "block_sparse_moe.gate.weight" in names:
        router = take(p + "block_sparse_moe.gate.weight")
        experts = []
        for e in range(spec.num_experts):
            q = p + f"block_sparse_moe.experts.{e}."
            experts.append(Expert(gate=Linear(take(q + "w1.weight")), up=Linear(take(q + "w3.weight")),
                                  down=Linear(take(q + "w2.weight"))))
        return router, experts
    router = take(p + "mlp.gate.weight")
    gate_up, down = take(p + "mlp.experts.gate_up_proj"), take(p + "mlp.experts.down_proj")
    experts = []
    for e in range(spec.num_experts):
        gu = Unstack(gate_up, e)
        experts.append(Expert(gate=Linear(rows_of(gu, 0, inter)), up=Linear(rows_of(gu, inter, inter)),
                              down=Linear(Unstack(down, e))))
    return router, experts
