"""TensorRT-LLM LoRA module names (what ``--lora-target-modules`` accepts) and the canonical ones.

TensorRT-LLM names the h->4h projection ``mlp_h_to_4h`` and, on gated MLPs, calls HF's
``gate_proj`` ``mlp_h_to_4h`` and ``up_proj`` ``mlp_gate``. Canonical names follow HF instead
(``gate`` is the projection that goes through the activation), so the mapping depends on whether
the base model's MLP is gated.
"""

from __future__ import annotations

#: canonical module names in the order adapters list them
CANONICAL_MODULES = ("qkv", "q", "k", "v", "o", "gate_up", "gate", "up", "down")

TRTLLM_MODULES = ("attn_qkv", "attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_gate", "mlp_4h_to_h")


def TRTLLM_TO_CANONICAL(mlp_kind: str) -> dict[str, tuple[str, ...]]:  # noqa: N802 - a table, named as one
    """TensorRT-LLM module name -> the canonical modules it admits, for a ``"gated"`` or plain MLP."""
    gated = mlp_kind == "gated"
    return {
        "attn_qkv": ("qkv", "q", "k", "v"),
        "attn_q": ("q",),
        "attn_k": ("k",),
        "attn_v": ("v",),
        "attn_dense": ("o",),
        "mlp_h_to_4h": ("gate", "gate_up") if gated else ("up",),
        "mlp_gate": ("up",) if gated else (),
        "mlp_4h_to_h": ("down",),
    }


def canonical_to_trtllm(module: str, mlp_kind: str) -> str:
    """The TensorRT-LLM name of one canonical module (q/k/v keep their own names, not ``attn_qkv``)."""
    gated = mlp_kind == "gated"
    table = {
        "qkv": "attn_qkv", "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_dense",
        "gate": "mlp_h_to_4h", "gate_up": "mlp_h_to_4h",
        "up": "mlp_gate" if gated else "mlp_h_to_4h", "down": "mlp_4h_to_h",
    }
    if module not in table or (not gated and module in ("gate", "gate_up")):
        raise KeyError(f"no TensorRT-LLM name for module {module!r} on a {mlp_kind} MLP")
    return table[module]
