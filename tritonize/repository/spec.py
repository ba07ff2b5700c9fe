"""The options of one model version of a repository: built once, checked once, never edited.

A ``RepoSpec`` is checked when it is made, and ``dataclasses.replace`` (the only way to change one)
makes a new one that is checked again, so whatever holds a spec holds a valid one: templates receive
nothing else, and no user-supplied string reaches a config.pbtxt unchecked (names are restricted to
Triton's safe characters, numbers are numbers). The flags its messages name come from the options
table.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..errors import RenderError
from ..runtime.choices import MULTI_GPU_MODES, RUNTIMES
from .options import OPTIONS, flag, lora_pairs, ptuning_pairs, split_modules

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
# torch: tritonize's own runtime; trtllm: tensorrt_llm.LLM on the server; trtllm-engine: a TensorRT-LLM
# engine built by trtllm-build, run by the executor; auto: trtllm where the server has tensorrt_llm and a
# GPU, else torch (decided by the engine model at load time).
TRTLLM_RUNTIMES = ("trtllm", "trtllm-engine")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# FP8 weights of the torch runtime: the checkpoint's as they are, quantized per channel at generate time, or an
# FP8 checkpoint dequantized at generate time
QUANTIZATIONS = ("auto", "fp8", "none")
# the KV cache: "auto" FP8 when the checkpoint declares it, "fp8", "model" the model's dtype (torch only)
KV_CACHE_DTYPES = ("auto", "fp8", "model")


def check_name(name: str, what: str = "model name") -> str:
    if not NAME_RE.match(name or "") or name in (".", ".."):
        raise RenderError(
            f"{what} {name!r} has characters Triton does not accept: use letters, digits, '_', '.' and '-'"
        )
    return name


def runtime_warning(runtime: str) -> str | None:
    """A line for `generate` when the repository needs what this machine lacks.

    Not an error: the repository is usually written on one machine and served on another.
    """
    if runtime in TRTLLM_RUNTIMES and importlib.util.find_spec("tensorrt_llm") is None:
        return (f"warning: tensorrt_llm is not installed here; the server needs it for --runtime {runtime} "
                "(pip install --extra-index-url https://pypi.nvidia.com tensorrt_llm)")
    return None


def gpu_warning(spec: RepoSpec) -> str | None:
    """A line for `generate` when this machine has GPUs, but fewer than the repository is split over (the
    engine model checks the server's own count when it loads)."""
    if spec.world_size < 2 or spec.device == "cpu":
        return None
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < visible < spec.world_size:
        return (f"warning: the repository is split over {spec.world_size} GPUs but this machine sees {visible}; "
                f"the server needs {spec.world_size}")
    return None


def step_tokens(max_num_tokens: int, max_input_len: int, max_batch_size: int, device: str) -> int:
    """Tokens per scheduler step (a decode row takes one, prompt chunks the rest); 0 asks for the default."""
    if max_num_tokens:
        return max_num_tokens
    return max(max_input_len, max_batch_size, 0 if device == "cpu" else 2048)


@dataclass(frozen=True)
class RepoSpec:
    name: str
    version: int = 1
    max_batch_size: int = 8  # generate's default: 8 on --device cpu, else 256
    max_input_len: int = 256
    max_output_len: int = 256
    max_num_tokens: int = 0  # tokens per scheduler step; 0: see ``step_tokens``
    runtime: str = "torch"
    device: str = "auto"
    dtype: str = "auto"
    instance_count: int = 1
    tokenizer_instance_count: int = 0  # 0: 1 on --device cpu, else 4 (a GPU's streams outrun one detokenizing process)
    # adapters: (lora_task_id, source) and (task_id, source) pairs, and the limits they are checked against
    lora: tuple[tuple[int, str], ...] = ()
    ptuning: tuple[tuple[int, str], ...] = ()
    max_lora_rank: int = 0  # 0: the largest adapter's rank
    lora_target_modules: tuple[str, ...] = ()  # empty: whatever the adapters hold
    max_prompt_embedding_table_size: int = 0  # 0: no limit
    # the KV cache: its size (tokens, or a share of the GPU memory free after the weights) and prefix reuse
    kv_cache_tokens: int = 0  # 0: from kv_cache_free_gpu_memory_fraction on a GPU; on a CPU what the limits need
    kv_cache_free_gpu_memory_fraction: float = 0.0  # 0: the default, 0.9 (TensorRT-LLM's)
    prefix_cache: bool = True
    # a chat template file that replaces the checkpoint's (generate --chat-template); None: the checkpoint's
    chat_template: str | None = None
    # torch runtime only: FP8 weights (QUANTIZATIONS) and the LM head with them
    quantization: str = "auto"
    fp8_lm_head: bool = False
    # GPUs the model is split over: tensor parallelism (every runtime), pipeline stages (TensorRT-LLM only)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    kv_cache_dtype: str = "auto"  # KV_CACHE_DTYPES; an engine's (trtllm-engine) is fixed at build time
    multi_gpu_mode: str = "leader"  # how tritonize serve launches world size > 1: leader | orchestrator
    # what else made the repository (deploy's export request), recorded in tritonize.json with the rest
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Lists given by callers become tuples (and ``extra`` a read-only mapping): nothing shares them.
        object.__setattr__(self, "lora", tuple((int(t), str(p)) for t, p in self.lora))
        object.__setattr__(self, "ptuning", tuple((int(t), str(p)) for t, p in self.ptuning))
        object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))
        if self.tokenizer_instance_count == 0:  # every maker of a spec (generate, the Python API, bench) gets this
            object.__setattr__(self, "tokenizer_instance_count", 1 if self.device == "cpu" else 4)
        self._check()

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> RepoSpec:
        """The spec of a generate / deploy request, its options by name (``repository.options``).

        Options of no spec field are left to whoever takes them (the export, the build, the server); None
        means the default; the adapter options become (task id, source) pairs, and ``use_fp8_kv_cache`` the
        KV cache dtype (true: "fp8"; false: "model" on the torch runtime, which would otherwise follow an FP8
        checkpoint, and "auto" on trtllm, whose "auto" is the checkpoint's as well).
        """
        names = {f.name for f in fields(cls)}
        values = {name: value for name, value in options.items() if name in names and value is not None}
        if "max_batch_size" not in values:  # the KV cache is paged: a batch row reserves no memory
            rows = 8 if values.get("device") == "cpu" else 256
            values["max_batch_size"] = min(rows, values.get("max_num_tokens") or rows)
        values["lora"] = lora_pairs(list(options.get("lora_ckpt") or ()))
        values["ptuning"] = ptuning_pairs(list(options.get("ptuning_nemo_checkpoint") or ()),
                                          list(options.get("task_ids") or ()))
        values["lora_target_modules"] = split_modules(list(options.get("lora_target_modules") or ()))
        if values.get("chat_template"):  # recorded absolute, as adapter sources are
            values["chat_template"] = str(Path(values["chat_template"]).expanduser().resolve())
        fp8_kv = str(options.get("use_fp8_kv_cache")).lower()
        runtime = values.get("runtime") or "torch"
        if runtime in ("trtllm", "torch", "auto") and fp8_kv == "true":
            values["kv_cache_dtype"] = "fp8"
        elif runtime in ("torch", "auto") and fp8_kv == "false":
            values["kv_cache_dtype"] = "model"
        return cls(**values)

    @property
    def step_tokens(self) -> int:
        return step_tokens(self.max_num_tokens, self.max_input_len, self.max_batch_size, self.device)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def _check(self) -> None:
        check_name(self.name)
        for name in ("version", "max_batch_size", "max_input_len", "max_output_len", "instance_count", "tokenizer_instance_count",
                     "tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise RenderError(f"{flag(name)} must be a positive integer, not {value!r}")
        if self.max_num_tokens < 0:
            raise RenderError(f"--max-num-tokens must be 0 (automatic) or positive, not {self.max_num_tokens}")
        if 0 < self.max_num_tokens < self.max_batch_size:
            raise RenderError(f"--max-num-tokens {self.max_num_tokens} is below --max-batch-size {self.max_batch_size}: "
                              "each request in a step takes at least one token; raise it or leave it at 0")
        if self.runtime not in RUNTIMES:
            raise RenderError(f"--runtime {self.runtime!r} is not available: choose one of {', '.join(RUNTIMES)}")
        if self.device not in DEVICES:
            raise RenderError(f"--device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            raise RenderError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        for name, pairs in (("lora_ckpt", self.lora), ("ptuning_nemo_checkpoint", self.ptuning)):
            ids = [task for task, _ in pairs]
            if len(set(ids)) != len(ids) or any(t < 0 for t in ids):
                raise RenderError(f"{flag(name)}: task ids must be distinct non-negative integers, got {ids}")
        for name in ("max_lora_rank", "max_prompt_embedding_table_size", "kv_cache_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise RenderError(f"{flag(name)} must be 0 (no limit) or positive, not {value!r}")
        if not 0.0 <= self.kv_cache_free_gpu_memory_fraction <= 1.0:
            raise RenderError("--kv-cache-free-gpu-memory-fraction must be in (0, 1], not "
                              f"{self.kv_cache_free_gpu_memory_fraction}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise RenderError(f"KV cache dtype {self.kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
        if self.quantization not in QUANTIZATIONS:
            raise RenderError(f"--quantization {self.quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
        if self.fp8_lm_head and self.quantization != "fp8":
            raise RenderError("--fp8-lm-head goes with --quantization fp8")
        if self.multi_gpu_mode not in MULTI_GPU_MODES:
            raise RenderError(f"--multi-gpu-mode {self.multi_gpu_mode!r} is not one of {', '.join(MULTI_GPU_MODES)}")
        self._check_runtime()
        if self.tensor_parallel_size > 1 and self.instance_count > 1 and self.runtime not in TRTLLM_RUNTIMES:
            raise RenderError(f"--instance-count {self.instance_count} with --tensor-parallelism-size "
                              f"{self.tensor_parallel_size}: each engine instance would start its own ranks on the "
                              "same GPUs; serve one instance")
        if self.device == "cpu" and self.dtype == "float16":
            raise RenderError("--dtype float16 is not supported on --device cpu: use float32 or bfloat16")

    def _check_runtime(self) -> None:
        """What the options table says the runtime does not honour is refused here too, whoever built the spec
        (generate and deploy refuse it earlier, by the flag the user typed)."""
        for option in OPTIONS.values():
            value = getattr(self, option.spec_field or option.name, None)
            if self.runtime not in option.runtimes and value is not None and not option.is_unset(value):
                raise RenderError(f"{flag(option.name)} needs --runtime {option.honouring()}, not {self.runtime}")

    def as_dict(self) -> dict[str, Any]:
        """As tritonize.json stores it (JSON types: the adapter pairs become lists), so stored and asked-for
        options compare equal."""
        plain = {f.name: getattr(self, f.name) for f in fields(self)}
        plain["extra"] = dict(self.extra)
        return json.loads(json.dumps(plain))
