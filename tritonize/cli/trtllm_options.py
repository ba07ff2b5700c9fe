"""The TensorRT-LLM options of `tritonize generate`, and where each one lands.

Kept apart from generate.py so that command carries one decorator and one call for all of them.
Parallel sizes, the KV cache fraction / dtype and the multi-GPU launch go into the spec (the engine
model's parameters); the TensorRT build switches into ``BuildOptions`` for ``trtllm-build``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ..errors import TritonizeError
from ..repository.spec import RepoSpec
from ..repository.trtllm_build import BuildOptions
from ..runtime.runtime import MULTI_GPU_MODES

__all__ = ["TRTLLM_OPTION_NAMES", "apply_trtllm_options", "trtllm_generate_options"]

_FP8 = click.Choice(["auto", "true", "false"], case_sensitive=False)

_OPTIONS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (("--tensor-parallelism-size", "tensor_parallelism_size"),
     {"type": click.IntRange(min=1), "default": 1, "show_default": True,
      "help": "TensorRT-LLM runtimes: GPUs per pipeline stage (trtllm-engine: from the engine if left at 1)."}),
    (("--pipeline-parallelism-size", "pipeline_parallelism_size"),
     {"type": click.IntRange(min=1), "default": 1, "show_default": True,
      "help": "TensorRT-LLM runtimes: pipeline stages."}),
    (("--kv-cache-free-gpu-memory-fraction", "kv_cache_free_gpu_memory_fraction"),
     {"type": click.FloatRange(0.0, 1.0, min_open=True), "default": None,
      "help": "TensorRT-LLM runtimes: share of free GPU memory the KV cache takes (TensorRT-LLM's default 0.9)."}),
    (("--use-fp8-kv-cache", "use_fp8_kv_cache"),
     {"type": _FP8, "default": "auto", "show_default": True,
      "help": "trtllm: FP8 KV cache (auto: as the checkpoint says). trtllm-engine: fixed by the checkpoint."}),
    (("--multi-gpu-mode", "multi_gpu_mode"),
     {"type": click.Choice(MULTI_GPU_MODES), "default": "leader", "show_default": True,
      "help": "trtllm-engine over several GPUs: one tritonserver per MPI rank (leader) or one that spawns "
              "its workers (orchestrator)."}),
    (("--opt-num-tokens", "opt_num_tokens"),
     {"type": click.IntRange(min=1), "default": None, "help": "trtllm-engine build: optimal tokens per step."}),
    (("--no-paged-kv-cache", "no_paged_kv_cache"),
     {"is_flag": True, "help": "trtllm-engine build: a contiguous KV cache instead of the paged one."}),
    (("--disable-remove-input-padding", "disable_remove_input_padding"),
     {"is_flag": True, "help": "trtllm-engine build: keep input padding."}),
    (("--build-workers", "build_workers"),
     {"type": click.IntRange(min=1), "default": 1, "show_default": True,
      "help": "trtllm-engine build: ranks built in parallel (trtllm-build --workers)."}),
]
TRTLLM_OPTION_NAMES = tuple(names[1] for names, _ in _OPTIONS)
_BUILD_ONLY = {"opt_num_tokens": None, "no_paged_kv_cache": False, "disable_remove_input_padding": False,
               "build_workers": 1}


def trtllm_generate_options(command: Callable) -> Callable:
    """Adds the TensorRT-LLM options to a click command (they arrive as keyword arguments)."""
    for names, kwargs in reversed(_OPTIONS):
        command = click.option(*names, **kwargs)(command)
    return command


def apply_trtllm_options(spec: RepoSpec, values: dict[str, Any]) -> BuildOptions | None:
    """Puts the options into ``spec``; the build options for trtllm-engine (None for other runtimes).

    Build switches on a runtime that builds nothing are refused by name rather than ignored.
    """
    spec.tensor_parallel_size = int(values.get("tensor_parallelism_size") or 1)
    spec.pipeline_parallel_size = int(values.get("pipeline_parallelism_size") or 1)
    spec.kv_cache_free_gpu_memory_fraction = float(values.get("kv_cache_free_gpu_memory_fraction") or 0.0)
    spec.multi_gpu_mode = values.get("multi_gpu_mode") or "leader"
    fp8 = str(values.get("use_fp8_kv_cache") or "auto").lower()
    if spec.runtime == "trtllm" and fp8 == "true":
        spec.kv_cache_dtype = "fp8"
    elif fp8 == "true" and spec.runtime != "trtllm-engine":
        raise TritonizeError(f"--use-fp8-kv-cache true needs --runtime trtllm or trtllm-engine, not {spec.runtime}")
    if spec.runtime != "trtllm-engine":
        for name, default in _BUILD_ONLY.items():
            if values.get(name, default) != default:
                flag = "--" + name.replace("_", "-")
                raise TritonizeError(f"{flag} is a TensorRT-LLM engine build option: use --runtime trtllm-engine")
        return None
    return BuildOptions(
        max_batch_size=spec.max_batch_size, max_input_len=spec.max_input_len, max_output_len=spec.max_output_len,
        max_num_tokens=spec.max_num_tokens or None, opt_num_tokens=values.get("opt_num_tokens"),
        paged_kv_cache=not values.get("no_paged_kv_cache"),
        remove_input_padding=not values.get("disable_remove_input_padding"),
        workers=int(values.get("build_workers") or 1), fp8_kv_cache_request=fp8,
    )
