"""Which runtime the engine model runs, decided where it runs: on the server, at load time.

``generate`` may run on a machine without a GPU or tensorrt_llm; the server decides "auto" for
itself, so one repository serves from a CPU box and a TensorRT-LLM GPU box alike.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .choices import RUNTIMES

__all__ = ["create_engine", "resolve_runtime", "tensorrt_llm_available"]


def tensorrt_llm_available() -> bool:
    """True when tensorrt_llm imports (a found but broken install counts as missing)."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return False
    try:
        importlib.import_module("tensorrt_llm")
    except Exception:  # noqa: BLE001 - any import failure means this runtime cannot run here
        return False
    return True


def _gpu_present() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_runtime(runtime: str) -> str:
    """"auto" is trtllm when tensorrt_llm imports and a GPU is present, else torch."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    if runtime != "auto":
        return runtime
    return "trtllm" if _gpu_present() and tensorrt_llm_available() else "torch"


def create_engine(runtime: str, model_dir: str | Path, *, trtllm_options: dict[str, Any] | None = None,
                  **options: Any) -> Any:
    """An engine for a resolved runtime; ``options`` are the arguments every engine takes.

    ``trtllm_options`` are the TensorRT-LLM ones; ``engine_dir`` and ``multi_gpu_mode``
    among them only concern the trtllm-engine runtime and are dropped for the LLM API one. The torch
    runtime takes ``tensor_parallel_size`` of them (its own tensor parallelism, tp.py), and ``kv_cache_dtype``
    ("model", the torch runtime's "not FP8", is the LLM API's "auto").
    """
    trt = dict(trtllm_options or {})
    kv_cache_dtype = trt.get("kv_cache_dtype") or "auto"
    if kv_cache_dtype == "model":
        trt["kv_cache_dtype"] = "auto"
    if runtime != "torch":
        # rows reserved per slot for request tables: the torch engine's; TensorRT-LLM sizes its own at build
        options.pop("max_prompt_embedding_table_size", None)
    if runtime == "trtllm-engine":
        from .trtllm_executor import TrtllmExecutorEngine

        trt.pop("kv_cache_dtype", None)  # fixed in the engine when it was built
        return TrtllmExecutorEngine(model_dir, **options, **trt)
    if runtime == "trtllm":
        from .trtllm_engine import TrtllmEngine

        for key in ("engine_dir", "multi_gpu_mode"):
            trt.pop(key, None)
        return TrtllmEngine(model_dir, **options, **trt)
    if runtime == "torch":
        from .engine import Engine

        if int(trt.get("pipeline_parallel_size") or 1) > 1:
            raise ValueError("pipeline parallelism is TensorRT-LLM only: the torch runtime splits a model with "
                             "tensor parallelism (--tensor-parallelism-size)")
        return Engine(model_dir, tensor_parallel_size=int(trt.get("tensor_parallel_size") or 1),
                      kv_cache_dtype=kv_cache_dtype, **options)
    raise ValueError(f"runtime {runtime!r} is not resolved: call resolve_runtime first")
