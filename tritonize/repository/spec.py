"""The options of one generated repository, validated before anything is rendered.

Templates receive only a validated `RepoSpec`, so no user-supplied string reaches a config.pbtxt
unchecked: names are restricted to Triton's safe characters and numbers are numbers.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import asdict, dataclass, field

from ..errors import RenderError
from ..runtime.runtime import MULTI_GPU_MODES, RUNTIMES

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
# torch: tritonize's own runtime; trtllm: tensorrt_llm.LLM on the server; trtllm-engine: a TensorRT-LLM
# engine built by trtllm-build, run by the executor; auto: trtllm where the server has tensorrt_llm and a
# GPU, else torch (decided by the engine model at load time).
TRTLLM_RUNTIMES = ("trtllm", "trtllm-engine")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


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


@dataclass
class RepoSpec:
    name: str
    version: int = 1
    max_batch_size: int = 8
    max_input_len: int = 256
    max_output_len: int = 256
    max_num_tokens: int = 0  # prefill tokens per scheduler step; 0 = max_input_len
    runtime: str = "torch"
    device: str = "auto"
    dtype: str = "auto"
    instance_count: int = 1
    tokenizer_instance_count: int = 1
    # adapters: (lora_task_id, source) and (task_id, source) pairs, and the limits they are checked against
    lora: list[tuple[int, str]] = field(default_factory=list)
    ptuning: list[tuple[int, str]] = field(default_factory=list)
    max_lora_rank: int = 0  # 0: the largest adapter's rank
    lora_target_modules: list[str] = field(default_factory=list)  # empty: whatever the adapters hold
    max_prompt_embedding_table_size: int = 0  # 0: no limit
    # TensorRT-LLM runtimes only (validate refuses them elsewhere):
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    kv_cache_free_gpu_memory_fraction: float = 0.0  # 0: TensorRT-LLM's default (0.9)
    kv_cache_dtype: str = "auto"  # "fp8" on the trtllm runtime; an engine's is fixed at build time
    multi_gpu_mode: str = "leader"  # how tritonize serve launches world size > 1: leader | orchestrator
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def validate(self) -> RepoSpec:
        check_name(self.name)
        positive = {
            "--model-version": self.version,
            "--max-batch-size": self.max_batch_size,
            "--max-input-len": self.max_input_len,
            "--max-output-len": self.max_output_len,
            "--instance-count": self.instance_count,
        }
        for flag, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise RenderError(f"{flag} must be a positive integer, not {value!r}")
        if self.max_num_tokens < 0:
            raise RenderError(f"--max-num-tokens must be 0 (automatic) or positive, not {self.max_num_tokens}")
        if self.runtime not in RUNTIMES:
            raise RenderError(f"--runtime {self.runtime!r} is not available: choose one of {', '.join(RUNTIMES)}")
        if self.device not in DEVICES:
            raise RenderError(f"--device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            raise RenderError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        for flag, pairs in (("--lora-ckpt", self.lora), ("--ptuning-nemo-checkpoint", self.ptuning)):
            ids = [task for task, _ in pairs]
            if len(set(ids)) != len(ids) or any(not isinstance(t, int) or t < 0 for t in ids):
                raise RenderError(f"{flag}: task ids must be distinct non-negative integers, got {ids}")
        for flag, value in (("--max-lora-rank", self.max_lora_rank),
                            ("--max-prompt-embedding-table-size", self.max_prompt_embedding_table_size)):
            if not isinstance(value, int) or value < 0:
                raise RenderError(f"{flag} must be 0 (no limit) or positive, not {value!r}")
        self._validate_trtllm()
        if self.device == "cpu" and self.dtype == "float16":
            raise RenderError("--dtype float16 is not supported on --device cpu: use float32 or bfloat16")
        return self

    def _validate_trtllm(self) -> None:
        for flag, value in (("--tensor-parallelism-size", self.tensor_parallel_size),
                            ("--pipeline-parallelism-size", self.pipeline_parallel_size)):
            if not isinstance(value, int) or value < 1:
                raise RenderError(f"{flag} must be a positive integer, not {value!r}")
        if not 0.0 <= self.kv_cache_free_gpu_memory_fraction <= 1.0:
            raise RenderError("--kv-cache-free-gpu-memory-fraction must be in (0, 1], not "
                              f"{self.kv_cache_free_gpu_memory_fraction}")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise RenderError(f"KV cache dtype {self.kv_cache_dtype!r} is not auto or fp8")
        if self.multi_gpu_mode not in MULTI_GPU_MODES:
            raise RenderError(f"--multi-gpu-mode {self.multi_gpu_mode!r} is not one of {', '.join(MULTI_GPU_MODES)}")
        if self.runtime in TRTLLM_RUNTIMES:
            return
        used = [flag for flag, on in (("--tensor-parallelism-size", self.tensor_parallel_size > 1),
                                      ("--pipeline-parallelism-size", self.pipeline_parallel_size > 1),
                                      ("--kv-cache-free-gpu-memory-fraction", self.kv_cache_free_gpu_memory_fraction > 0),
                                      ("--use-fp8-kv-cache", self.kv_cache_dtype == "fp8")) if on]
        if used:
            raise RenderError(f"{used[0]} needs --runtime trtllm or trtllm-engine, not {self.runtime}")

    def as_dict(self) -> dict:
        """As tritonize.json stores it (JSON types: the adapter pairs become lists), so stored and asked-for
        options compare equal."""
        return json.loads(json.dumps(asdict(self)))
