"""Hugging Face PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``).

PEFT keys are ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``. ``lora_A`` is
always a ``Linear(in, r)`` and ``lora_B`` a ``Linear(r, out)``, also around GPT-2's ``Conv1D``
(``fan_in_fan_out`` only changes how PEFT merges into the transposed base weight), so ``B @ A`` is
the delta in ``Linear`` orientation for every family. The scale is ``lora_alpha / r``
(``lora_alpha / sqrt(r)`` with ``use_rslora``), per module when ``rank_pattern`` / ``alpha_pattern``
name it.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ...errors import AdapterError, ExportError
from ...runtime.config import ModelArgs
from ..lazy import Const
from ..megatron import _group_rows
from ..torch_archive import ArchivedTensor, read_archive
from ..tree import DirTree
from ..weight_files import read_safetensors

_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?P<ab>lora_A|lora_B)(?:\.[A-Za-z0-9_-]+)?\.weight$")
_LAYER = re.compile(r"^(?:model\.|transformer\.)?(?:layers|h)\.(?P<i>\d+)\.(?P<module>.+)$")

_LLAMA_ATTN = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o"}
_GPT2 = {"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "up", "mlp.c_proj": "down"}

#: HF module path inside a layer -> canonical module, per architecture
_MODULES: dict[str, dict[str, str]] = {
    **{arch: {**_LLAMA_ATTN, "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}
       for arch in ("LlamaForCausalLM", "MistralForCausalLM", "GemmaForCausalLM", "MixtralForCausalLM")},
    "NemotronForCausalLM": {**_LLAMA_ATTN, "mlp.up_proj": "up", "mlp.down_proj": "down"},
    "GPT2LMHeadModel": _GPT2,
    "GPTBigCodeForCausalLM": _GPT2,
    "Starcoder2ForCausalLM": {**_LLAMA_ATTN, "mlp.c_fc": "up", "mlp.c_proj": "down"},
    "FalconForCausalLM": {"self_attention.query_key_value": "qkv", "self_attention.dense": "o",
                          "mlp.dense_h_to_4h": "up", "mlp.dense_4h_to_h": "down"},
}


def is_peft_dir(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


def _config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}/adapter_config.json is not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}/adapter_config.json is not a JSON object")
    what = f"PEFT adapter {path}"
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{what} is a {peft_type or 'untyped'} adapter; only LoRA (peft_type LORA) can be served")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{what} trains biases (bias={cfg['bias']!r}); only bias='none' LoRA adapters can be served")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{what} also fine-tunes whole modules (modules_to_save={cfg['modules_to_save']}); "
                           "merge it into the base model and export that instead")
    if cfg.get("use_dora"):
        raise AdapterError(f"{what} is a DoRA adapter (use_dora=true); merge it into the base model instead")
    if cfg.get("layer_replication"):
        raise AdapterError(f"{what} uses layer_replication, which cannot be served as an adapter")
    return cfg


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    st, binf = path / "adapter_model.safetensors", path / "adapter_model.bin"
    try:
        if st.is_file():
            stored = read_safetensors(DirTree(path), "adapter_model.safetensors")
            return {k: v.read() for k, v in stored.items()}
        if binf.is_file():
            return _bin(binf)
    except ExportError as e:
        raise AdapterError(str(e)) from None
    raise AdapterError(f"PEFT adapter {path} has no adapter_model.safetensors (or adapter_model.bin)")


def _bin(path: Path) -> dict[str, torch.Tensor]:
    """A ``.bin`` only as plain tensors: the restricted reader for zip archives, else weights_only."""
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    if is_zip:
        obj = read_archive(path, 0, path.stat().st_size, what=str(path))
        if not isinstance(obj, dict):
            raise AdapterError(f"{path} does not hold a state dict")
        return {str(k): v.load() for k, v in obj.items() if isinstance(v, ArchivedTensor)}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError) as e:
        raise AdapterError(f"{path} is refused by torch.load(weights_only=True) ({e}); convert it to "
                           "adapter_model.safetensors") from None
    if not isinstance(obj, dict):
        raise AdapterError(f"{path} does not hold a state dict")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _pattern(patterns: dict[str, Any], name: str, default: Any) -> Any:
    # PEFT's own rule (peft.utils.other.get_pattern_key): the key matches a suffix of the module name.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_peft(path: Path, args: ModelArgs) -> tuple[dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], bool]:
    """``(layer, module) -> (A, B * scale)`` and whether the adapter should cover every layer."""
    cfg = _config(path)
    what = f"PEFT adapter {path}"
    table = _MODULES.get(args.architecture)
    if table is None:
        raise AdapterError(f"{what}: LoRA for {args.architecture} is not supported")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in _tensors(path).items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{what}: tensor {key} is not a LoRA A/B matrix of a linear layer "
                               "(embedding LoRA, DoRA or trained biases cannot be served)")
        pairs.setdefault(m["path"], {})[m["ab"]] = t
    r_default, alpha_default = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    found = {}
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise AdapterError(f"{what}: {name} has only {', '.join(ab)}; the adapter file is incomplete")
        lm = _LAYER.match(name)
        module = table.get(lm["module"]) if lm else None
        if module is None:
            raise AdapterError(f"{what}: LoRA on module {name} is not supported for {args.architecture} "
                               f"(supported: {', '.join(sorted(table))})")
        a, b = ab["lora_A"].float(), ab["lora_B"].float()
        r = int(_pattern(rank_pattern, name, r_default))
        if a.dim() != 2 or a.shape[0] != r:
            raise AdapterError(f"{what}: {name}.lora_A has shape {list(a.shape)} but the config says rank {r}")
        alpha = float(_pattern(alpha_pattern, name, alpha_default))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        b = b * scale
        i = int(lm["i"])
        if module == "qkv" and args.architecture == "FalconForCausalLM":
            # Falcon's fused rows are grouped per KV head like Megatron's: [q heads of group g..., k_g, v_g].
            module, b = "qkv", _ungroup(b, args, what, name)
        found[(i, module)] = (a, b)
    return found, not cfg.get("layers_to_transform")


def _ungroup(b: torch.Tensor, args: ModelArgs, what: str, name: str) -> torch.Tensor:
    d, ng = args.head_dim, args.n_kv_heads
    r = args.n_heads // ng
    if b.shape[0] != ng * (r + 2) * d:
        raise AdapterError(f"{what}: {name}.lora_B has {b.shape[0]} rows, the base model's fused QKV has "
                           f"{ng * (r + 2) * d}; the adapter was made for another model size")
    return torch.cat([part.full() for part in _group_rows(Const(b), ng, r, d)], 0)
