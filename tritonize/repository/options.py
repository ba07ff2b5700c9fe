"""Every option of `generate`, `deploy` and the Python API, once: its flag, NeMo's spelling, where it lands,
and which runtimes honour it.

An option has one name from the command line to the engine (``tensor_parallel_size``,
``max_prompt_embedding_table_size``, ...): the click parameter, the key of a deploy request, the
``RepoSpec`` field when it is one. The table also says how a user spells it (``flag``; ``nemo`` is the
spelling of NeMo's deploy_triton.py, an alias on `deploy`; ``api`` the keyword of NeMo's
``TensorRTLLM.export``) and which runtimes honour a value other than "not used": every other runtime
refuses it by name, never drops it. `generate` and `deploy` build their flags from it, `deploy` and the
Python API check requests against it, and the spec names its flags from it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AdapterError, OptionError
from ..runtime.choices import RUNTIMES

ALL = frozenset(RUNTIMES)
TRTLLM = frozenset({"trtllm", "trtllm-engine"})
ENGINE = frozenset({"trtllm-engine"})
TORCH = frozenset({"torch"})
PTUNING = frozenset({"torch", "auto", "trtllm-engine"})  # TensorRT-LLM's LLM API takes no prompt tables
# "auto" and "false" both leave FP8 off where it is not detected
FP8_OFF = ("auto", "false", "0", "no", None, False)
_NO_PROMPT_TABLES = " (TensorRT-LLM's LLM API takes no prompt tables)"


def _fp8_value(value: Any) -> str:
    """NeMo's API spells the FP8 switches as booleans (None: as the checkpoint says)."""
    return "auto" if value is None else str(value).lower()


def _inverted(value: Any) -> bool:
    """NeMo's API spells two build switches positively (``paged_kv_cache=False`` is ``--no-paged-kv-cache``)."""
    return value is False


@dataclass(frozen=True)
class Option:
    name: str  # the one name it travels under (and the RepoSpec field it lands in, unless ``spec_field``)
    flag: str  # tritonize's spelling (deploy's, where generate spells it otherwise: see ``generate``)
    nemo: str | None = None  # NeMo deploy_triton.py's spelling: an alias on deploy
    spec_field: str | None = None  # the RepoSpec field (or ``extra`` key) it lands in, when not ``name``
    runtimes: frozenset[str] = ALL  # the runtimes that honour a value other than ``unset``
    unset: tuple = (None,)  # values that mean "not used"
    used: str = ""  # how a used value reads when refused ("above 1")
    why: Mapping[str, str] = field(default_factory=dict)  # runtime ("*": any) -> why it refuses the option
    api: str | None = None  # NeMo TensorRTLLM.export's keyword, where it takes the option
    api_value: Callable[[Any], Any] | None = None  # NeMo API value -> tritonize's
    generate: str | None = None  # generate's flag where it differs from ``flag``
    label: str | None = None  # how a difference in a stored repository is named, where not by ``flag``

    def is_unset(self, value: Any) -> bool:
        if isinstance(value, (tuple, list)):
            return not value
        return (value.lower() if isinstance(value, str) else value) in self.unset

    def honouring(self) -> str:
        """The runtimes to name in a refusal ("auto" goes without saying)."""
        return " or ".join(r for r in RUNTIMES if r in self.runtimes and r != "auto")

    def api_refusal(self, keyword: str, value: Any) -> str:
        """The refusal of a used value passed to the Python API, whose engine is the torch runtime: named by the
        keyword the caller used, with no command-line flag in it."""
        why = self.why.get("torch", self.why.get("*", "")).strip()
        return (f"{keyword}={value!r} is not available in the Python API, whose engine is the torch runtime"
                f"{' ' + why if why else ''}: leave {keyword} at its default")

    def refusal(self, runtime: str, *, nemo: bool) -> str:
        """The one-line refusal of a used value on ``runtime``; ``nemo`` adds NeMo's spelling."""
        spelled = f"{self.flag} ({self.nemo})" if nemo and self.nemo else self.generate or self.flag
        why = self.why.get(runtime, self.why.get("*", ""))
        return f"{spelled}{' ' + self.used if self.used else ''} needs --runtime {self.honouring()}{why}"


def _row(name: str, *, nemo: bool = True, **rest: Any) -> Option:
    """An option whose flag is its name dashed and, with ``nemo``, whose NeMo spelling is its name."""
    flag = rest.pop("flag", "--" + name.replace("_", "-"))
    return Option(name, flag, rest.pop("nemo_name", "--" + name) if nemo else None, **rest)


_PIPELINE = {"*": " (pipeline parallelism is TensorRT-LLM only: the torch runtime splits a model over GPUs by "
                  "tensor parallelism)"}
_BUILD_PROFILE = {"*": " (a TensorRT build profile)",
                  "trtllm": " (a TensorRT build profile; the trtllm runtime builds no engine)"}

OPTIONS: dict[str, Option] = {o.name: o for o in (
    # what to export and where to serve it (deploy)
    _row("source", flag="--nemo-checkpoint", nemo_name="--nemo_checkpoint"),
    _row("model_type"),
    _row("triton_model_repository"),
    _row("triton_port"),
    _row("grpc_port"),
    _row("metrics_port"),
    _row("triton_http_address"),
    # the model and its limits (RepoSpec fields)
    _row("name", flag="--triton-model-name", nemo_name="--triton_model_name", generate="--model-name"),
    _row("version", flag="--triton-model-version", nemo_name="--triton_model_version", generate="--model-version"),
    _row("max_input_len"),
    _row("max_output_len"),
    _row("max_batch_size"),
    _row("max_num_tokens"),
    _row("runtime", nemo=False),
    _row("device", nemo=False),
    _row("dtype", nemo=False),
    _row("export_dtype", flag="--dtype", nemo=False, label="--dtype (export)"),
    _row("instance_count", nemo=False),
    _row("tokenizer_instance_count", nemo=False),
    _row("chat_template", nemo=False),
    # adapters
    _row("lora_ckpt", spec_field="lora"),
    _row("lora_target_modules"),
    _row("max_lora_rank", unset=(None, 0)),
    _row("use_lora_plugin"),  # a TensorRT build switch; elsewhere it only says "LoRA on"
    _row("ptuning_nemo_checkpoint", spec_field="ptuning", runtimes=PTUNING, why={"trtllm": _NO_PROMPT_TABLES}),
    _row("task_ids", spec_field="ptuning", runtimes=PTUNING, why={"trtllm": _NO_PROMPT_TABLES}),
    _row("max_prompt_embedding_table_size", runtimes=PTUNING, unset=(None, 0), why={"trtllm": _NO_PROMPT_TABLES}),
    # parallelism: every runtime splits a model with tensor parallelism (the torch runtime with tp.py);
    # pipeline stages are TensorRT-LLM's only
    _row("tensor_parallel_size", flag="--tensor-parallelism-size", nemo_name="--tensor_parallelism_size",
         unset=(None, 1), used="above 1", api="tensor_parallelism_size"),
    _row("pipeline_parallel_size", flag="--pipeline-parallelism-size", nemo_name="--pipeline_parallelism_size",
         runtimes=TRTLLM, unset=(None, 1), used="above 1", why=_PIPELINE, api="pipeline_parallelism_size"),
    # TensorRT-LLM: KV cache, launch
    # the KV cache: every runtime pages it and reuses cached prefixes
    _row("kv_cache_free_gpu_memory_fraction", unset=(None, 0.0)),
    _row("kv_cache_tokens", nemo=False, unset=(None, 0)),
    _row("prefix_cache", nemo=False, flag="--prefix-cache/--no-prefix-cache", unset=(None, True)),
    _row("use_fp8_kv_cache", spec_field="kv_cache_dtype", unset=FP8_OFF, api="fp8_kvcache", api_value=_fp8_value),
    _row("multi_gpu_mode"),
    # TensorRT-LLM engine builds (trtllm-build)
    _row("opt_num_tokens", runtimes=ENGINE, why=_BUILD_PROFILE, api="opt_num_tokens"),
    _row("no_paged_kv_cache", runtimes=ENGINE, unset=(None, False), api="paged_kv_cache", api_value=_inverted,
         why={"*": " (the torch runtime always pages its KV cache)",
              "trtllm": " (TensorRT-LLM's LLM API always pages its KV cache)"}),
    _row("disable_remove_input_padding", runtimes=ENGINE, unset=(None, False), api="remove_input_padding",
         api_value=_inverted, why={"*": " (a TensorRT build switch)"}),
    _row("use_parallel_embedding", runtimes=ENGINE, unset=(None, False), api="use_parallel_embedding",
         why={"*": " (tensor-parallel embedding)",
              "trtllm": " (a TRT-LLM checkpoint layout; trtllm loads the HF export)"}),
    _row("export_fp8_quantized", runtimes=TORCH | ENGINE, unset=FP8_OFF, api="fp8_quantized", api_value=_fp8_value,
         why={"*": " (FP8 weights)",
              "trtllm": " with an FP8 TRT-LLM checkpoint (.qnemo) as source (the trtllm runtime serves the "
                        "Hugging Face export, dequantized)"}),
    # FP8 weights of the torch runtime: the checkpoint's ("auto"), quantized at generate time ("fp8") or dequantized
    _row("quantization", nemo=False, runtimes=TORCH, unset=(None, "auto"),
         why={"*": " (its own FP8 linears; the TensorRT-LLM runtimes serve the checkpoint's quantization as it is)"}),
    _row("fp8_lm_head", nemo=False, flag="--fp8-lm-head", runtimes=TORCH, unset=(None, False),
         why={"*": " (its own FP8 linears)"}),
    _row("build_workers", nemo=False, runtimes=ENGINE, unset=(None, 1), why={"*": " (trtllm-build --workers)"}),
)}

LORA_OPTIONS = frozenset({"lora_ckpt", "lora_target_modules", "max_lora_rank", "use_lora_plugin"})
PTUNING_OPTIONS = frozenset({"ptuning_nemo_checkpoint", "task_ids", "max_prompt_embedding_table_size"})
# What NeMo's TensorRTLLM.export takes that changes nothing here: TensorRT plugin / profile switches, or
# the default behaviour by name. Accepted and ignored.
API_NEUTRAL = frozenset({"gpus_per_node", "use_embedding_sharing", "paged_context_fmha", "multiple_profiles",
                         "gpt_attention_plugin", "gemm_plugin", "max_seq_len", "reduce_fusion", "fp8_kvcache_type"})


def honoured(runtime: str) -> frozenset[str]:
    """The options ``runtime`` takes a used value of."""
    return frozenset(o.name for o in OPTIONS.values() if runtime in o.runtimes)


def refuse(values: Mapping[str, Any], runtime: str, *, nemo: bool = True) -> None:
    """OptionError, naming the option and the runtime that would take it, for the first used value that
    ``runtime`` cannot honour; ``values`` by option name."""
    for name, value in values.items():
        option = OPTIONS.get(name)
        if option is None:
            raise OptionError(f"unknown option {name!r}")
        if option.runtimes != ALL and runtime not in option.runtimes and not option.is_unset(value):
            raise OptionError(option.refusal(runtime, nemo=nemo))


def describe(key: str) -> str:
    """How a user names the option behind a RepoSpec field or ``extra`` key: its flag(s)."""
    named = [o for o in OPTIONS.values() if (o.spec_field or o.name) == key]
    if len(named) == 1 and named[0].label:
        return named[0].label
    if named:
        return " / ".join(o.flag for o in named)
    return {"trtllm_build": "the TensorRT-LLM build options"}.get(key, key)


def flag(name: str) -> str:
    """The flag `generate` users know an option by (the spec's validation messages name it so)."""
    option = OPTIONS[name]
    return option.generate or option.flag


def from_api(keyword: str, value: Any) -> tuple[str, Any] | None:
    """A NeMo TensorRTLLM.export keyword (or a refusable option's own name) and its value as (option name,
    value); None for one without effect here; KeyError for one that is neither."""
    if keyword in API_NEUTRAL:
        return None
    for option in OPTIONS.values():
        if option.api == keyword:
            return option.name, option.api_value(value) if option.api_value else value
    if keyword in OPTIONS and OPTIONS[keyword].runtimes != ALL:
        return keyword, value
    raise KeyError(keyword)


def lora_pairs(values: Sequence[str | Path]) -> list[tuple[int, str]]:
    """``--lora-ckpt`` values: ``PATH`` (lora_task_id = its position, 0-based, as NeMo numbered them) or
    ``ID=PATH``."""
    pairs = []
    for position, value in enumerate(values):
        task, sep, path = str(value).partition("=")
        if sep and task.strip().isdigit():
            pairs.append((int(task), _absolute(path)))
        else:
            pairs.append((position, _absolute(value)))
    return pairs


def _absolute(path: str | Path) -> str:
    """Sources are recorded absolute, so a later deploy from another directory compares equal."""
    return str(Path(path).expanduser().resolve())


def ptuning_pairs(paths: Sequence[str | Path], task_ids: Sequence[int | str]) -> list[tuple[int, str]]:
    """``--ptuning-nemo-checkpoint`` values with ``--task-ids`` (default 0, 1, ... in order)."""
    if task_ids and len(task_ids) != len(paths):
        raise AdapterError(f"--task-ids gives {len(task_ids)} id(s) for {len(paths)} --ptuning-nemo-checkpoint "
                           "value(s): give one id per checkpoint, or none")
    ids = []
    for task in task_ids or range(len(paths)):
        try:
            ids.append(int(task))
        except (TypeError, ValueError):
            raise AdapterError(f"--task-ids {task!r} is not a number: task ids are integers on the wire (task_id "
                               "is UINT64); pass 0, 1, ...") from None
    return [(task, _absolute(path)) for task, path in zip(ids, paths)]


def split_modules(values: list[str] | tuple[str, ...]) -> list[str]:
    """``--lora-target-modules a b`` (NeMo's form, one string) and repeated flags alike."""
    return [m for value in values for m in value.replace(",", " ").split()]
