"""NeMo LoRA checkpoints: NeMo 1 ``.nemo`` (``model_config.yaml`` + ``model_weights.ckpt``) and NeMo 2.

NeMo 1 (``peft.peft_scheme: lora``, ``peft.lora_tuning.{adapter_dim, alpha, target_modules,
variant, layer_selection}``) keys, after the ``model.`` prefix, are
``decoder.layers.{i}.self_attention.adapter_layer.<adapter>.linear_in.weight`` ``[r, in]`` and
``.linear_out.weight`` ``[out, r]`` with adapters ``lora_kqv_adapter`` (the fused Megatron QKV,
rows grouped per query group ``[q heads of group g..., k_g, v_g]``), ``lora_unfused_kqv_adapter.
{q,k,v}_adapter`` (``variant: canonical``), ``lora_dense_attention_adapter`` (o), and under
``mlp.adapter_layer``: ``lora_hto4h_adapter`` (fc1; gated MLPs: rows ``[gate; up]``),
``lora_unfused_hto4h_adapter.{gate,up}_adapter`` and ``lora_4htoh_adapter`` (fc2). NeMo 2 PEFT
checkpoints hold ``weights/`` (torch_dist, keys ``module.decoder.layers[.i].self_attention.
linear_qkv.adapter.linear_in.weight``, ``...linear_proj.adapter``, ``mlp.linear_fc{1,2}.adapter``;
CanonicalLoRA adds ``.adapter_{q,k,v,up,gate}``), ``weights/adapter_metadata.json`` and the
``model_transform`` (dim, alpha) in ``context/model.yaml``. The scale is ``alpha / adapter_dim``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import yaml

from ...errors import AdapterError
from ...runtime.config import ModelArgs
from .. import dcp
from ..lazy import Const
from ..megatron import _group_rows
from ..tree import Tree
from .nemo_files import load, model_config, nemo_tree, read_state, weights_file

_NEMO1 = {
    "self_attention.adapter_layer.lora_kqv_adapter": "qkv",
    "self_attention.adapter_layer.lora_unfused_kqv_adapter.q_adapter": "q",
    "self_attention.adapter_layer.lora_unfused_kqv_adapter.k_adapter": "k",
    "self_attention.adapter_layer.lora_unfused_kqv_adapter.v_adapter": "v",
    "self_attention.adapter_layer.lora_dense_attention_adapter": "o",
    "mlp.adapter_layer.lora_hto4h_adapter": "fc1",
    "mlp.adapter_layer.lora_unfused_hto4h_adapter.gate_adapter": "gate",
    "mlp.adapter_layer.lora_unfused_hto4h_adapter.up_adapter": "up",
    "mlp.adapter_layer.lora_4htoh_adapter": "down",
}
_NEMO2 = {
    "self_attention.linear_qkv.adapter": "qkv",
    "self_attention.linear_qkv.adapter.adapter_q": "q",
    "self_attention.linear_qkv.adapter.adapter_k": "k",
    "self_attention.linear_qkv.adapter.adapter_v": "v",
    "self_attention.linear_proj.adapter": "o",
    "mlp.linear_fc1.adapter": "fc1",
    "mlp.linear_fc1.adapter.adapter_gate": "gate",
    "mlp.linear_fc1.adapter.adapter_up": "up",
    "mlp.linear_fc2.adapter": "down",
}
_KEY = re.compile(r"^decoder\.layers\.(?:(?P<i>\d+)\.)?(?P<module>.+)\.(?P<side>linear_in|linear_out)\.weight$")

Found = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def is_nemo2(tree: Tree) -> bool:
    return tree.is_dir("weights") and (tree.is_dir("context") or tree.is_file("weights/adapter_metadata.json"))


def read_nemo_lora(path: Path, args: ModelArgs) -> tuple[Found, bool, str]:
    """``(layer, module) -> (A, B * scale)``, whether every layer is expected, and "nemo"/"nemo2"."""
    with nemo_tree(path) as tree:
        if is_nemo2(tree):
            found, all_layers = _nemo2(tree, args)
            return found, all_layers, "nemo2"
        if not tree.is_file("model_config.yaml"):
            raise AdapterError(f"{path} is not a LoRA adapter: expected a PEFT directory (adapter_config.json), "
                               "a NeMo .nemo (model_config.yaml) or a NeMo 2 checkpoint (weights/, context/)")
        found, all_layers = _nemo1(tree, args)
        return found, all_layers, "nemo"


def _nemo1(tree: Tree, args: ModelArgs) -> tuple[Found, bool]:
    what = f"NeMo adapter {tree.name}"
    cfg = model_config(tree)
    peft = cfg.get("peft") if isinstance(cfg.get("peft"), dict) else {}
    scheme = str(peft.get("peft_scheme", "lora" if "lora_tuning" in peft else "none")).lower()
    if "lora" not in scheme.split(","):
        kind = "p-tuning" if "ptuning" in scheme else scheme
        raise AdapterError(f"{what} is a {kind} checkpoint (peft_scheme {scheme!r}), not LoRA"
                           + ("; pass it as a p-tuning table" if kind == "p-tuning" else ""))
    if scheme != "lora":
        raise AdapterError(f"{what} combines PEFT schemes ({scheme}); only a plain LoRA checkpoint can be served")
    lora = peft.get("lora_tuning") or {}
    if not isinstance(lora, dict) or not lora.get("adapter_dim"):
        raise AdapterError(f"{what}: model_config.yaml has no peft.lora_tuning.adapter_dim")
    if lora.get("weight_tying"):
        raise AdapterError(f"{what} ties LoRA weights across layers (weight_tying); not supported")
    if cfg.get("num_layers") is not None and int(cfg["num_layers"]) != args.n_layers:
        raise AdapterError(f"{what} was trained on a {cfg['num_layers']}-layer model; the base model has "
                           f"{args.n_layers} layers")
    dim = int(lora["adapter_dim"])
    scale = float(lora.get("alpha") or dim) / dim
    raw = {}
    for key, value in read_state(tree, weights_file(tree)).items():
        k = str(key)
        while k.startswith(("model.", "module.")):
            k = k.split(".", 1)[1]
        if k.startswith("language_model."):
            raise AdapterError(f"{what} is a legacy (non-Megatron-Core) NeMo checkpoint ({key}); not supported")
        raw[k] = value
    return _collect(raw, _NEMO1, scale, args, what), not lora.get("layer_selection")


def _find_transform(node: Any) -> dict[str, Any] | None:
    if isinstance(node, dict):
        if isinstance(node.get("model_transform"), dict):
            return node["model_transform"]
        for v in node.values():
            found = _find_transform(v)
            if found is not None:
                return found
    return None


def _nemo2(tree: Tree, args: ModelArgs) -> tuple[Found, bool]:
    what = f"NeMo 2 adapter {tree.name}"
    if not tree.is_file("weights/adapter_metadata.json"):
        raise AdapterError(f"{what}: weights/adapter_metadata.json is missing; this is a full NeMo 2 model, "
                           "not a PEFT adapter checkpoint")
    if not tree.is_file("context/model.yaml"):
        raise AdapterError(f"{what}: context/model.yaml is missing; cannot read the LoRA dim and alpha")
    try:
        ctx = yaml.safe_load(tree.read_text("context/model.yaml"))
    except yaml.YAMLError as e:
        raise AdapterError(f"{what}: context/model.yaml is not valid YAML ({str(e).splitlines()[0]})") from None
    transform = _find_transform(ctx)
    if transform is None or not transform.get("dim"):
        raise AdapterError(f"{what}: context/model.yaml has no model_transform with a LoRA dim; "
                           "re-save the adapter with NeMo's PEFT callback")
    target = str(transform.get("_target_", ""))
    if "lora" not in target.lower() or "dora" in target.lower():
        raise AdapterError(f"{what}: model_transform {target!r} is not LoRA; only LoRA adapters can be served")
    dim = int(transform["dim"])
    scale = float(transform.get("alpha") or dim) / dim
    tensors = dcp.read_dcp(tree.sub("weights"), f"{tree.name}/weights", lambda k: ".adapter." in k)
    raw: dict[str, Any] = {}
    for key, stored in tensors.items():
        k = key
        while k.startswith(("model.", "module.")):
            k = k.split(".", 1)[1]
        m = _KEY.match(k)
        if m is not None and m["i"] is None:  # stacked [L, ...]: split per layer
            full = stored.read()
            for i in range(full.shape[0]):
                raw[f"decoder.layers.{i}.{m['module']}.{m['side']}.weight"] = full[i]
        else:
            raw[k] = stored.read()
    return _collect(raw, _NEMO2, scale, args, what), True


def _collect(raw: dict[str, Any], table: dict[str, str], scale: float, args: ModelArgs, what: str) -> Found:
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        m = _KEY.match(key)
        if m is None or m["i"] is None:
            raise AdapterError(f"{what}: tensor {key} is not a LoRA linear_in/linear_out weight of a decoder layer")
        module = table.get(m["module"])
        if module is None:
            raise AdapterError(f"{what}: adapter {m['module']} is not supported (supported: {', '.join(table)})")
        t = load(value)
        if not isinstance(t, torch.Tensor):
            raise AdapterError(f"{what}: {key} is not a tensor")
        pairs.setdefault((int(m["i"]), module), {})[m["side"]] = t.float()
    found: Found = {}
    for (i, module), sides in sorted(pairs.items()):
        if set(sides) != {"linear_in", "linear_out"}:
            raise AdapterError(f"{what}: layer {i} {module} has only {', '.join(sides)}; the checkpoint is incomplete")
        a, b = sides["linear_in"], sides["linear_out"] * scale
        if module == "qkv":
            b = _ungroup(b, args, what, i)
        elif module == "fc1":
            module = _fc1_name(b, args, what, i)
        found[(i, module)] = (a, b)
    return found


def _ungroup(b: torch.Tensor, args: ModelArgs, what: str, layer: int) -> torch.Tensor:
    """Megatron's per-group QKV rows -> ``[q; k; v]`` with the base converter's own row mapping."""
    d, ng = args.head_dim, args.n_kv_heads
    r = args.n_heads // ng
    if b.dim() != 2 or b.shape[0] != ng * (r + 2) * d:
        return b  # not this model's QKV: the shape check names module, layer and shapes
    return torch.cat([part.full() for part in _group_rows(Const(b), ng, r, d)], 0)


def _fc1_name(b: torch.Tensor, args: ModelArgs, what: str, layer: int) -> str:
    F = args.intermediate_size
    if args.mlp != "gated":
        return "up"
    if b.shape[0] == F:
        raise AdapterError(f"{what}: layer {layer} fc1 adapter has {F} output rows, but the base model's gated fc1 "
                           f"has {2 * F} ([gate; up]); the adapter was trained without the gated activation")
    return "gate_up"  # a wrong size is reported by the shape check
