"""Megatron-Core GPT weights (NeMo 1 and NeMo 2 checkpoints) as a canonical model.

Layout facts (Megatron-Core attention.py / mlp.py, as saved by dist_checkpointing):
- keys start with ``module.`` (NeMo 2) or ``model.`` (NeMo 1); ``_extra_state`` (Transformer
  Engine's FP8 bookkeeping) and ``optimizer.*`` are not weights;
- per-layer tensors are stacked with the global layer index as dim 0
  (``decoder.layers.self_attention.linear_qkv.weight`` is ``[L, ...]``); a per-layer spelling
  ``decoder.layers.{i}.…`` is accepted too;
- ``linear_qkv.weight`` is ``[ng*(r+2)*d, H]``, grouped per query group as ``[q_0..q_{r-1}, k, v]``;
- a gated ``linear_fc1`` is ``[gate; up]``, the first half activated;
- norms are fused into the next linear (``linear_qkv.layer_norm_weight``) or separate
  (``input_layernorm``, ``pre_mlp_layernorm``; Falcon's ``post_self_attn_layernorm``);
- MoE experts are ``mlp.experts.experts.linear_fc{1,2}.weight`` ``[L, E, ...]``;
- the vocabulary is padded (multiple of 128 x TP): rows past the real vocabulary are dropped;
- no ``output_layer`` means the output layer shares the embedding.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import ExportError
from .canonical import Expert, Layer, Linear, Model, ModelSpec, Norm
from .hf_config import choose_arch
from .lazy import Lazy, Region, Rows, rows_of
from .nemo_config import MegatronConfig
from .stored import StoredTensor, dtype_name

#: keys of a Megatron state dict that are not model weights
_SKIP_MARKERS = ("_extra_state", "optimizer.", "rng_state", "rerun_state")


def strip_prefix(key: str) -> str:
    while key.startswith(("module.", "model.")):
        key = key.split(".", 1)[1]
    return key


def is_weight_key(key: str) -> bool:
    return not any(m in key for m in _SKIP_MARKERS) and not key.startswith(("optimizer", "opt_param"))


class _Weights:
    """Looks up Megatron tensors by their stripped names and remembers which were used."""

    def __init__(self, tensors: Mapping[str, StoredTensor], num_layers: int, what: str):
        self.t = dict(tensors)
        self.used: set[str] = set()
        self.L = num_layers
        self.what = what

    def has(self, name: str) -> bool:
        return name in self.t

    def get(self, name: str) -> Lazy:
        if name not in self.t:
            raise ExportError(f"{self.what}: tensor {name} is missing")
        self.used.add(name)
        return Region(self.t[name])

    def layer(self, name: str, i: int, required: bool = True) -> Lazy | None:
        """Layer ``i`` of ``decoder.layers.<name>``: stacked ``[L, ...]`` or per-layer keys."""
        stacked, single = f"decoder.layers.{name}", f"decoder.layers.{i}.{name}"
        if stacked in self.t:
            st = self.t[stacked]
            if st.shape[0] != self.L:
                raise ExportError(f"{self.what}: {stacked} stacks {st.shape[0]} layers, the config says {self.L}")
            self.used.add(stacked)
            return Region(st, (i,))
        if single in self.t:
            self.used.add(single)
            return Region(self.t[single])
        if required:
            raise ExportError(f"{self.what}: tensor {stacked} is missing")
        return None

    def has_layer(self, name: str) -> bool:
        return f"decoder.layers.{name}" in self.t or f"decoder.layers.0.{name}" in self.t


def _expect(t: Lazy | None, shape: tuple[int, ...], name: str, what: str) -> None:
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ExportError(
            f"{what}: {name} has shape {list(t.shape)} but the model config implies {list(shape)}; "
            "the config does not match the weights"
        )


def build_spec(cfg: MegatronConfig, w: _Weights, vocab: int, dtype: str) -> ModelSpec:
    spec = ModelSpec(
        arch="",
        model_type=cfg.model_type,
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_query_groups,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.ffn_hidden_size,
        norm="rms" if cfg.normalization == "rmsnorm" else "layer",
        norm_eps=cfg.norm_eps,
        gated=cfg.gated,
        activation=cfg.activation,
        qkv_bias=w.has_layer("self_attention.linear_qkv.bias"),
        out_bias=w.has_layer("self_attention.linear_proj.bias"),
        mlp_bias=w.has_layer("mlp.linear_fc1.bias") or w.has_layer("mlp.linear_fc2.bias"),
        positions="learned" if w.has("embedding.position_embeddings.weight") else cfg.position,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rotary_base,
        rotary_pct=cfg.rotary_percent,
        rope_scaling=cfg.rope_scaling,
        tie_embeddings=not w.has("output_layer.weight"),
        num_experts=cfg.num_experts,
        experts_per_token=cfg.moe_topk if cfg.num_experts else 0,
        parallel_attn=cfg.parallel_attention or cfg.new_decoder_architecture,
        new_decoder_architecture=cfg.new_decoder_architecture,
        sliding_window=cfg.window_size,
        embedding_scale=cfg.model_type == "gemma",
        dtype=dtype,
    )
    if spec.positions == "learned" and cfg.position == "rope":
        raise ExportError("the checkpoint has learned position embeddings but its config says rope")
    spec.arch = choose_arch(spec)
    if (spec.arch == "NemotronForCausalLM" and cfg.model_type == "gpt" and not cfg.zero_centered_gamma
            and cfg.rotary_percent == 1.0):
        spec.arch = "Starcoder2ForCausalLM"  # a plain LayerNorm GPT with RoPE: the architecture made for it
    return spec


def _norm(w: _Weights, names: tuple[str, ...], i: int, offset: float) -> Norm | None:
    """The first of ``names`` (``<module>.weight`` / fused ``<linear>.layer_norm_weight``) present."""
    for name in names:
        weight_name = name + ("_weight" if name.endswith("layer_norm") else ".weight")
        bias_name = name + ("_bias" if name.endswith("layer_norm") else ".bias")
        if w.has_layer(weight_name):
            return Norm(w.layer(weight_name, i), w.layer(bias_name, i, required=False), offset)
    return None


def megatron_model(tensors: Mapping[str, StoredTensor], cfg: MegatronConfig, vocab: int, what: str) -> Model:
    """Canonical model of Megatron tensors (keys already stripped of ``module.``/``model.``)."""
    w = _Weights(tensors, cfg.num_layers, what)
    if not w.has("embedding.word_embeddings.weight"):
        legacy = any(k.startswith("language_model.") for k in tensors)
        raise ExportError(
            f"{what}: no embedding.word_embeddings.weight"
            + ("; this is a legacy (non-mcore) Megatron checkpoint, not supported" if legacy else
               "; not a Megatron-Core GPT checkpoint")
        )
    embed_full = w.get("embedding.word_embeddings.weight")
    H = cfg.hidden_size
    if embed_full.shape[1] != H:
        raise ExportError(f"{what}: embedding width {embed_full.shape[1]} does not match hidden_size {H}")
    if vocab > embed_full.shape[0]:
        raise ExportError(
            f"{what}: the tokenizer has {vocab} tokens but the model's vocabulary has only {embed_full.shape[0]} "
            "rows; the tokenizer does not belong to this checkpoint"
        )
    spec = build_spec(cfg, w, vocab, dtype_name(embed_full.dtype))
    offset = 1.0 if cfg.zero_centered_gamma else 0.0
    d, ng = cfg.head_dim, cfg.num_query_groups
    r = cfg.num_heads // ng
    ffn = cfg.ffn_hidden_size

    layers = []
    for i in range(cfg.num_layers):
        qkv = w.layer("self_attention.linear_qkv.weight", i)
        _expect(qkv, (ng * (r + 2) * d, H), "self_attention.linear_qkv.weight", what)
        qkv_b = w.layer("self_attention.linear_qkv.bias", i, required=False)
        _expect(qkv_b, (ng * (r + 2) * d,), "self_attention.linear_qkv.bias", what)
        qw, kw, vw = _group_rows(qkv, ng, r, d)
        qb, kb, vb = _group_rows(qkv_b, ng, r, d) if qkv_b is not None else (None, None, None)
        o = Linear(w.layer("self_attention.linear_proj.weight", i),
                   w.layer("self_attention.linear_proj.bias", i, required=False))
        _expect(o.weight, (H, cfg.num_heads * d), "self_attention.linear_proj.weight", what)
        attn_norm = _norm(w, ("self_attention.linear_qkv.layer_norm", "input_layernorm"), i, offset)
        if attn_norm is None:
            raise ExportError(f"{what}: layer norm before attention is missing (input_layernorm)")
        mlp_norm = _norm(w, ("mlp.linear_fc1.layer_norm", "pre_mlp_layernorm", "post_self_attn_layernorm"), i, offset)
        if mlp_norm is None and not (cfg.parallel_attention and not cfg.new_decoder_architecture):
            raise ExportError(f"{what}: layer norm before the MLP is missing (pre_mlp_layernorm)")
        layer = Layer(attn_norm, Linear(qw, qb), Linear(kw, kb), Linear(vw, vb), o, mlp_norm)
        if cfg.num_experts:
            layer.router = w.layer("mlp.router.weight", i)
            _expect(layer.router, (cfg.num_experts, H), "mlp.router.weight", what)
            layer.experts = _experts(w, cfg, i, what)
        else:
            fc1 = w.layer("mlp.linear_fc1.weight", i)
            fc1_b = w.layer("mlp.linear_fc1.bias", i, required=False)
            fc2 = Linear(w.layer("mlp.linear_fc2.weight", i), w.layer("mlp.linear_fc2.bias", i, required=False))
            rows = 2 * ffn if cfg.gated else ffn
            _expect(fc1, (rows, H), "mlp.linear_fc1.weight", what)
            _expect(fc2.weight, (H, ffn), "mlp.linear_fc2.weight", what)
            if cfg.gated:
                layer.gate = Linear(rows_of(fc1, 0, ffn), rows_of(fc1_b, 0, ffn) if fc1_b is not None else None)
                layer.up = Linear(rows_of(fc1, ffn, ffn), rows_of(fc1_b, ffn, ffn) if fc1_b is not None else None)
            else:
                layer.up = Linear(fc1, fc1_b)
            layer.down = fc2
        layers.append(layer)

    final = Norm(w.get("decoder.final_layernorm.weight"),
                 w.get("decoder.final_layernorm.bias") if w.has("decoder.final_layernorm.bias") else None, offset)
    embed = rows_of(embed_full, 0, vocab)
    lm_head = None
    if w.has("output_layer.weight"):
        out = w.get("output_layer.weight")
        if out.shape[1] != H or out.shape[0] < vocab:
            raise ExportError(f"{what}: output_layer.weight has shape {list(out.shape)}, expected [>={vocab}, {H}]")
        lm_head = rows_of(out, 0, vocab)
    pos = w.get("embedding.position_embeddings.weight") if w.has("embedding.position_embeddings.weight") else None
    leftover = sorted(set(w.t) - w.used)
    if leftover:
        raise ExportError(
            f"{what}: tensors the {spec.model_type} mapping does not use ({', '.join(leftover[:4])}"
            f"{' ...' if len(leftover) > 4 else ''}); refusing to drop them silently (wrong --model-type?)"
        )
    return Model(spec, embed, final, layers, lm_head=lm_head, pos_embed=pos)


def _group_rows(t: Lazy, ng: int, r: int, d: int) -> tuple[Lazy, Lazy, Lazy]:
    step = (r + 2) * d
    return (Rows([(t, g * step, r * d) for g in range(ng)]),
            Rows([(t, g * step + r * d, d) for g in range(ng)]),
            Rows([(t, g * step + (r + 1) * d, d) for g in range(ng)]))


def _experts(w: _Weights, cfg: MegatronConfig, i: int, what: str) -> list[Expert]:
    E, ffn, H = cfg.num_experts, cfg.ffn_hidden_size, cfg.hidden_size
    rows = 2 * ffn if cfg.gated else ffn
    out = []
    stacked = "mlp.experts.experts.linear_fc1.weight"
    for e in range(E):
        if w.has_layer(stacked):
            fc1_all = w.layer(stacked, i)
            fc2_all = w.layer("mlp.experts.experts.linear_fc2.weight", i)
            _expect(fc1_all, (E, rows, H), stacked, what)
            _expect(fc2_all, (E, H, ffn), "mlp.experts.experts.linear_fc2.weight", what)
            fc1 = Region(fc1_all.stored, fc1_all.prefix + (e,))
            fc2 = Region(fc2_all.stored, fc2_all.prefix + (e,))
        else:
            fc1 = w.layer(f"mlp.experts.local_experts.{e}.linear_fc1.weight", i)
            fc2 = w.layer(f"mlp.experts.local_experts.{e}.linear_fc2.weight", i)
            _expect(fc1, (rows, H), f"mlp.experts.local_experts.{e}.linear_fc1.weight", what)
            _expect(fc2, (H, ffn), f"mlp.experts.local_experts.{e}.linear_fc2.weight", what)
        if not cfg.gated:
            raise ExportError(f"{what}: non-gated mixture-of-experts MLPs are not supported")
        out.append(Expert(gate=Linear(rows_of(fc1, 0, ffn)), up=Linear(rows_of(fc1, ffn, ffn)), down=Linear(fc2)))
    return out
