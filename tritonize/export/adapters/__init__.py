"""LoRA adapters (Hugging Face PEFT, NeMo 1, NeMo 2) and p-tuning tables (NeMo, plain files)
converted into the ``tritonize-lora`` / ``tritonize-ptuning`` directories the runtime serves."""

from ...errors import AdapterError
from .lora import read_lora
from .model import LoraAdapter, PromptTable, module_shapes
from .names import TRTLLM_MODULES, TRTLLM_TO_CANONICAL, canonical_to_trtllm
from .ptuning import check_prompt_tables, read_ptuning
from .write import write_lora, write_ptuning

__all__ = [
    "AdapterError", "LoraAdapter", "PromptTable", "TRTLLM_MODULES", "TRTLLM_TO_CANONICAL", "canonical_to_trtllm",
    "check_prompt_tables", "module_shapes", "read_lora", "read_ptuning", "write_lora", "write_ptuning",
]
