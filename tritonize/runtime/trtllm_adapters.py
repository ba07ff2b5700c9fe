"""The repository's adapters in the shapes TensorRT-LLM takes them.

A generated repository keeps LoRA adapters in the ``tritonize-lora`` format (``adapters/lora/<id>/``:
adapter.json + adapter.safetensors with ``layers.{i}.{m}.A`` [r, in] and ``layers.{i}.{m}.B`` [out, r],
B already scaled) and p-tuning tables in the ``tritonize-ptuning`` format (``adapters/ptuning/<id>/``).
TensorRT-LLM wants them otherwise:

* its executor (engines, ``trtllm-engine``) takes a LoRA as two tensors: ``weights``
  [modules x layers, max(r*in + out*r)] (per row A flattened, then B flattened, zero-padded) and
  ``config`` [modules x layers, 3] = (module id, layer, rank), module ids as its ``LoraModuleType``;
* its LLM API (``trtllm``) takes ``LoRARequest(name, id, path)`` with ``path`` a Hugging Face PEFT
  directory, which ``write_peft_dir`` writes from the canonical adapter;
* p-tuning: the executor's ``PromptTuningConfig(embedding_table)``, the [n, hidden] table as stored.

Pure torch + safetensors: nothing here needs tensorrt_llm, so every layout is checked anywhere.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AdapterError

__all__ = [
    "LORA_MODULE_IDS",
    "AdapterStore",
    "LoraAdapter",
    "lora_executor_tensors",
    "read_lora",
    "read_ptuning_table",
    "write_peft_dir",
]

# TensorRT-LLM's LoraModuleType values (tensorrt_llm/runtime LoraModule): the ids of the config tensor.
LORA_MODULE_IDS = {
    "attn_qkv": 0, "attn_q": 1, "attn_k": 2, "attn_v": 3, "attn_dense": 4,
    "mlp_h_to_4h": 5, "mlp_4h_to_h": 6, "mlp_gate": 7,
}
# Hugging Face module paths per canonical module, by family (PEFT target names are the last part).
_LLAMA_LIKE = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
HF_MODULES = {
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "GemmaForCausalLM": _LLAMA_LIKE,
    "MixtralForCausalLM": {k: v for k, v in _LLAMA_LIKE.items() if k in ("q", "k", "v", "o")},
    "NemotronForCausalLM": {**{k: v for k, v in _LLAMA_LIKE.items() if k in ("q", "k", "v", "o")},
                            "up": "mlp.up_proj", "down": "mlp.down_proj"},
    "Starcoder2ForCausalLM": {**{k: v for k, v in _LLAMA_LIKE.items() if k in ("q", "k", "v", "o")},
                              "up": "mlp.c_fc", "down": "mlp.c_proj"},
}


@dataclass
class LoraAdapter:
    path: Path
    rank: int
    n_layers: int
    modules: list[str]
    tensors: dict[str, torch.Tensor]

    def pair(self, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        a = self.tensors.get(f"layers.{layer}.{module}.A")
        b = self.tensors.get(f"layers.{layer}.{module}.B")
        return None if a is None or b is None else (a, b)


def _meta(path: Path, fmt: str, what: str) -> dict:
    """The description file of a ``fmt`` v1 folder; AdapterError naming the folder otherwise."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path} is unreadable ({e}): convert the {what} again") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt or meta.get("format_version") != 1:
        raise AdapterError(f"{path.parent} is not a {fmt} v1 {what}: convert it again")
    return meta


def read_lora(adapter_dir: str | Path) -> LoraAdapter:
    """A ``tritonize-lora`` v1 directory; raises AdapterError naming what is wrong."""
    from safetensors.torch import load_file

    root = Path(adapter_dir)
    meta = _meta(root / "adapter.json", "tritonize-lora", "adapter")
    tensors = {k: v.float() for k, v in load_file(str(root / "adapter.safetensors")).items()}
    return LoraAdapter(root, int(meta["rank"]), int(meta["n_layers"]), list(meta["modules"]), tensors)


def _executor_modules(module: str, a: torch.Tensor, b: torch.Tensor, gated: bool) -> list[tuple[str, torch.Tensor,
                                                                                                  torch.Tensor]]:
    """(TensorRT-LLM module, A, B) for one canonical module; a fused gate_up becomes its two halves."""
    if module == "gate_up":
        half = b.shape[0] // 2
        return [("mlp_h_to_4h", a, b[:half]), ("mlp_gate", a, b[half:])]
    name = {"qkv": "attn_qkv", "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_dense",
            "down": "mlp_4h_to_h", "gate": "mlp_h_to_4h", "up": "mlp_gate" if gated else "mlp_h_to_4h"}.get(module)
    if name is None:
        raise AdapterError(f"LoRA module {module!r} has no TensorRT-LLM equivalent")
    return [(name, a, b)]


def lora_executor_tensors(adapter: LoraAdapter, *, gated: bool, dtype: torch.dtype = torch.float16
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, config) for ``tensorrt_llm.bindings.executor.LoraConfig``; rows ordered by layer, module id.

    ``gated``: the base model's MLP is gated (llama-like), so canonical ``up`` is TensorRT-LLM's
    ``mlp_gate`` and ``gate`` its ``mlp_h_to_4h``; on plain MLPs ``up`` is ``mlp_h_to_4h``.
    """
    rows: list[tuple[int, int, int, torch.Tensor]] = []
    for layer in range(adapter.n_layers):
        for module in adapter.modules:
            pair = adapter.pair(layer, module)
            if pair is None:
                continue
            for name, a, b in _executor_modules(module, *pair, gated=gated):
                rank = a.shape[0]
                if b.shape[1] != rank:
                    raise AdapterError(f"layer {layer} {module}: A has rank {rank} but B {b.shape[1]}")
                rows.append((layer, LORA_MODULE_IDS[name], rank, torch.cat([a.reshape(-1), b.reshape(-1)])))
    if not rows:
        raise AdapterError(f"{adapter.path} holds no LoRA weights")
    rows.sort(key=lambda r: (r[0], r[1]))
    width = max(r[3].numel() for r in rows)
    weights = torch.zeros(len(rows), width, dtype=dtype)
    for i, (_, _, _, flat) in enumerate(rows):
        weights[i, : flat.numel()] = flat.to(dtype)
    config = torch.tensor([[module_id, layer, rank] for layer, module_id, rank, _ in rows], dtype=torch.int32)
    return weights, config


def _split_qkv(b: torch.Tensor, hf_config: dict) -> list[torch.Tensor]:
    heads = hf_config["num_attention_heads"]
    kv = hf_config.get("num_key_value_heads") or heads
    d = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    return list(torch.split(b, [heads * d, kv * d, kv * d], dim=0))


def write_peft_dir(adapter: LoraAdapter, out_dir: str | Path, hf_config: dict) -> Path:
    """The adapter as a Hugging Face PEFT directory for the model of ``hf_config`` (what LoRARequest loads).

    B is already scaled, so ``lora_alpha`` equals ``r`` (scale 1). Fused modules are written as their
    parts sharing A (``qkv`` -> q, k, v; ``gate_up`` -> gate, up), which gives the same delta.
    """
    from safetensors.torch import save_file

    arch = (hf_config.get("architectures") or ["?"])[0]
    names = HF_MODULES.get(arch)
    if names is None:
        raise AdapterError(f"LoRA on the trtllm runtime is written for {', '.join(HF_MODULES)}, not {arch}: "
                           "use --runtime trtllm-engine or torch")
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for layer in range(adapter.n_layers):
        for module in adapter.modules:
            pair = adapter.pair(layer, module)
            if pair is None:
                continue
            a, b = pair
            if module == "qkv":
                parts = list(zip(("q", "k", "v"), _split_qkv(b, hf_config)))
            elif module == "gate_up":
                parts = list(zip(("gate", "up"), torch.chunk(b, 2, dim=0)))
            else:
                parts = [(module, b)]
            for part, b_part in parts:
                path = names.get(part)
                if path is None:
                    raise AdapterError(f"LoRA module {part!r} has no {arch} counterpart")
                prefix = f"base_model.model.model.layers.{layer}.{path}"
                tensors[f"{prefix}.lora_A.weight"] = a.clone()  # fused parts share A: one copy each
                tensors[f"{prefix}.lora_B.weight"] = b_part.clone()
                targets.add(path.rsplit(".", 1)[-1])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter.rank, "lora_alpha": adapter.rank,
              "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "base_model_name_or_path": None}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def read_ptuning_table(task_dir: str | Path) -> torch.Tensor:
    """The [n_virtual, hidden] table of a ``tritonize-ptuning`` v1 directory."""
    from safetensors.torch import load_file

    root = Path(task_dir)
    meta = _meta(root / "ptuning.json", "tritonize-ptuning", "p-tuning table")
    table = load_file(str(root / "table.safetensors"))["table"]
    if tuple(table.shape) != (int(meta["n_virtual"]), int(meta["hidden"])):
        raise AdapterError(f"{root}: the table is {tuple(table.shape)}, ptuning.json says "
                           f"[{meta['n_virtual']}, {meta['hidden']}]")
    return table


class AdapterStore:
    """The adapters of one engine version, loaded on first use and kept; ids are the directory names."""

    def __init__(self, adapters_dir: str | Path) -> None:
        self.root = Path(adapters_dir)
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, int], object] = {}

    def ids(self, kind: str) -> list[int]:
        folder = self.root / kind
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())

    def directory(self, kind: str, task_id: int) -> Path:
        """The folder of one adapter; AdapterError naming the ids there are when it is missing."""
        path = self.root / kind / str(int(task_id))
        if not path.is_dir():
            have = ", ".join(map(str, self.ids(kind))) or "none"
            what = "lora_task_id" if kind == "lora" else "task_id"
            raise AdapterError(f"{what} {task_id} is not in this repository (it has: {have})")
        return path

    def get(self, kind: str, task_id: int, load):
        """``load(directory)`` once per adapter, then the cached result."""
        key = (kind, int(task_id))
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        value = load(self.directory(kind, task_id))
        with self._lock:
            self._cache.setdefault(key, value)
            return self._cache[key]
