"""The options of one generated repository, validated before anything is rendered.

Templates receive only a validated `RepoSpec`, so no user-supplied string reaches a config.pbtxt
unchecked: names are restricted to Triton's safe characters and numbers are numbers.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import asdict, dataclass, field

from .errors import RenderError

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
# torch: tritonize's own runtime; trtllm: tensorrt_llm.LLM on the server; auto: trtllm where the server
# has tensorrt_llm and a GPU, else torch (decided by the engine model at load time).
RUNTIMES = ("torch", "trtllm", "auto")
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
    if runtime == "trtllm" and importlib.util.find_spec("tensorrt_llm") is None:
        return ("warning: tensorrt_llm is not installed here; the server needs it for --runtime trtllm "
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
    extra: dict[str, str] = field(default_factory=dict)

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
        if self.device == "cpu" and self.dtype == "float16":
            raise RenderError("--dtype float16 is not supported on --device cpu: use float32 or bfloat16")
        return self

    def as_dict(self) -> dict:
        return asdict(self)
