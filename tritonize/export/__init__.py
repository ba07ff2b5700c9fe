"""Checkpoint export: NeMo (.nemo, NeMo 2), Megatron-Bridge, .qnemo / TRT-LLM and Hugging Face checkpoints to an
HF-format directory (and optionally a TRT-LLM checkpoint) that the generated repository serves.

Reads every source without NeMo, Megatron or TensorRT-LLM installed; see ``api.export_checkpoint``.
"""

from ..errors import ExportError
from .api import ExportResult, export_checkpoint

__all__ = ["ExportError", "ExportResult", "export_checkpoint"]
