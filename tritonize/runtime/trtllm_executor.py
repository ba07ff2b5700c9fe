"""The ``trtllm-engine`` runtime: prebuilt TensorRT-LLM engines (<= 1.2.x) through their executor.

Same interface as ``engine.Engine`` (start, submit, cancel, shutdown, generate, stats), over
``tensorrt_llm.bindings.executor``: one ``Executor`` on the engine directory, each request a
``Request`` queued with ``enqueue_request``, and one thread calling ``await_responses`` that turns every
response into a ``StepOutput`` for its request. Cancelling is ``cancel_request``; the executor then
answers the request with finish reason CANCELLED, which frees its KV cache blocks.

Wire semantics as in ``engine.py``: end ids end a request and are not in the output; stop sequences
stay in it (the executor keeps them too). The executor takes one ``end_id``; further end ids are sent as
one-token stop words and taken off the output again. Stop and bad words of any length are native.

Adapters: ``lora_task_id`` becomes ``LoraConfig(task_id, weights, config)`` converted from the
repository's tritonize-lora folder (sent with every request: the executor's LoRA cache would drop a
task it evicted); ``task_id`` becomes ``PromptTuningConfig(table)``, the prompt carrying the virtual
token ids >= vocab size that index it.

Multi-GPU: leader mode (one tritonserver per MPI rank, ``tritonize serve`` starts them) needs nothing
here: ranks > 0 build the same executor and serve no requests. Orchestrator mode passes a
``ParallelConfig`` in ORCHESTRATOR mode so this process spawns the worker ranks itself.

``tensorrt_llm`` is imported lazily: the mapping functions are usable (and tested) without it.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .choices import MULTI_GPU_MODES
from .engine import default_end_ids
from .errors import AdapterError
from .request import GenerationRequest, SamplingParams, StepOutput, stop_length
from .trtllm_adapters import AdapterStore, lora_executor_tensors, read_lora, read_ptuning_table
from .trtllm_engine import TrtllmEngineBase, import_tensorrt_llm, sampling_knobs

__all__ = [
    "ExecutorRequestPlan",
    "TrtllmExecutorEngine",
    "executor_config_kwargs",
    "executor_sampling_kwargs",
    "map_executor_finish_reason",
    "plan_executor_request",
]

log = logging.getLogger(__name__)
_AWAIT = datetime.timedelta(milliseconds=50)
_GATED_MLPS = {"LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "GemmaForCausalLM"}


def import_executor() -> Any:
    """``tensorrt_llm.bindings.executor``, or the one-line install error of the trtllm runtime."""
    import_tensorrt_llm()
    return import_tensorrt_llm("tensorrt_llm.bindings.executor", runtime="trtllm-engine",
                               fix="install a TensorRT-LLM that has it (<= 1.2.x), or use --runtime trtllm")


def executor_sampling_kwargs(sampling: SamplingParams) -> dict[str, Any]:
    """Keyword arguments of ``executor.SamplingConfig``: beam width 1 and only what was set."""
    kwargs: dict[str, Any] = {"beam_width": 1, **sampling_knobs(sampling)}
    if kwargs.get("temperature") == 0:
        del kwargs["temperature"]
        kwargs["top_k"] = 1  # greedy, as in the torch runtime; the executor rejects temperature 0
    return kwargs


@dataclass
class ExecutorRequestPlan:
    """What one ``executor.Request`` gets, before any tensorrt_llm object is made."""

    request: dict[str, Any]  # Request keyword arguments (sampling_config / output_config as kwargs dicts)
    sampling: dict[str, Any]
    output: dict[str, Any]
    extra_end_ids: list[int] = field(default_factory=list)  # sent as one-token stop words, stripped again
    lora_task_id: int | None = None
    task_id: int | None = None
    guide: tuple[str, str | None] | None = None  # (GuidedDecodingParams.GuideType name, guide)


def plan_executor_request(req: GenerationRequest, *, end_ids: Sequence[int], pad_id: int | None, max_seq_len: int,
                          vocab_size: int | None = None, n_virtual: int | None = None,
                          request_table: bool = False) -> ExecutorRequestPlan:
    """The ``Request`` arguments for one tritonize request; ValueError for what cannot be served."""
    if req.max_new_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, not {req.max_new_tokens}")
    prompt = [int(i) for i in req.prompt_ids]
    task_id = getattr(req, "task_id", None)
    if task_id is not None and n_virtual and vocab_size and not any(i >= vocab_size for i in prompt):
        prompt = list(range(vocab_size, vocab_size + n_virtual)) + prompt  # the virtual tokens lead the prompt
    if not prompt:
        raise ValueError("the prompt is empty")
    if vocab_size and task_id is None and not request_table and any(i >= vocab_size for i in prompt):
        raise ValueError(f"the prompt has ids >= the vocabulary size {vocab_size} but no task_id: send task_id")
    if len(prompt) + req.max_new_tokens > max_seq_len:
        raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({req.max_new_tokens}) exceeds max_seq_len "
                         f"{max_seq_len}")
    ends = [int(i) for i in end_ids if int(i) >= 0]
    kwargs: dict[str, Any] = {"input_token_ids": prompt, "max_tokens": int(req.max_new_tokens),
                              "streaming": bool(req.stream)}
    stops = [list(map(int, s)) for s in req.stop_sequences if s]
    if ends:
        kwargs["end_id"] = ends[0]
        stops += [[e] for e in ends[1:]]
    if pad_id is not None and pad_id >= 0:
        kwargs["pad_id"] = int(pad_id)
    elif ends:
        kwargs["pad_id"] = ends[0]
    if stops:
        kwargs["stop_words"] = stops
    bad = [list(map(int, s)) for s in req.bad_sequences if s]
    if bad:
        kwargs["bad_words"] = bad
    output = {"return_log_probs": bool(req.return_log_probs), "exclude_input_from_output": True}
    lora = getattr(req, "lora_task_id", None)
    guide = getattr(req, "guide", None)
    return ExecutorRequestPlan(kwargs, executor_sampling_kwargs(req.sampling), output, ends[1:],
                               None if lora is None else int(lora), None if task_id is None else int(task_id),
                               executor_guide(guide) if guide is not None else None)


# grammar.Guide's types -> the executor's GuidedDecodingParams.GuideType
_GUIDE_TYPES = {"json": "JSON", "json_schema": "JSON_SCHEMA", "regex": "REGEX", "ebnf_grammar": "EBNF_GRAMMAR",
                "structural_tag": "STRUCTURAL_TAG"}


def executor_guide(guide: Any) -> tuple[str, str | None]:
    """(``GuidedDecodingParams.GuideType`` name, guide text) of a ``grammar.Guide`` (JSON takes no text)."""
    return _GUIDE_TYPES[guide.type], (guide.text or None) if guide.type != "json" else None


def executor_guided_config(model_dir: str | Path, stop_ids: Sequence[int]) -> dict[str, Any] | None:
    """The vocabulary arguments of ``GuidedDecodingConfig`` (xgrammar backend), as TensorRT-LLM derives them
    from a fast tokenizer: the vocabulary by id, the tokenizer's JSON, the end ids. None without tokenizer.json."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    text = path.read_text(encoding="utf-8")
    vocab = Tokenizer.from_str(text).get_vocab(with_added_tokens=True)
    encoded = [""] * (max(vocab.values()) + 1)
    for piece, i in vocab.items():
        encoded[i] = piece
    return {"encoded_vocab": encoded, "tokenizer_str": text, "stop_token_ids": [int(i) for i in stop_ids] or None}


def map_executor_finish_reason(reason: Any) -> str | None:
    """``executor.FinishReason`` (or its name) in tritonize's words; None while not finished."""
    name = str(getattr(reason, "name", reason)).rsplit(".", 1)[-1].upper()
    return {"END_ID": "end", "STOP_WORDS": "stop", "LENGTH": "length", "CANCELLED": "cancelled",
            "TIMED_OUT": "cancelled"}.get(name)


def executor_config_kwargs(*, kv_cache_free_gpu_memory_fraction: float | None, max_batch_size: int | None,
                           max_num_tokens: int | None, multi_gpu_mode: str, world_size: int,
                           kv_cache_tokens: int | None = None, prefix_cache: bool = True) -> dict[str, Any]:
    """The plain (non-object) part of ``ExecutorConfig`` and of its KvCacheConfig / ParallelConfig."""
    if multi_gpu_mode not in MULTI_GPU_MODES:
        raise ValueError(f"multi_gpu_mode must be one of {', '.join(MULTI_GPU_MODES)}, not {multi_gpu_mode!r}")
    if kv_cache_free_gpu_memory_fraction is not None and not 0.0 < kv_cache_free_gpu_memory_fraction <= 1.0:
        raise ValueError(f"kv_cache_free_gpu_memory_fraction must be in (0, 1], not {kv_cache_free_gpu_memory_fraction}")
    kv: dict[str, Any] = {"enable_block_reuse": bool(prefix_cache)}
    if kv_cache_free_gpu_memory_fraction is not None:
        kv["free_gpu_memory_fraction"] = float(kv_cache_free_gpu_memory_fraction)
    if kv_cache_tokens:
        kv["max_tokens"] = int(kv_cache_tokens)
    config: dict[str, Any] = {"max_beam_width": 1, "kv_cache_config": kv,
                              "scheduler_policy": "GUARANTEED_NO_EVICT"}
    if max_batch_size:
        config["max_batch_size"] = int(max_batch_size)
    if max_num_tokens:
        config["max_num_tokens"] = int(max_num_tokens)
    config["parallel"] = {"communication_mode": "ORCHESTRATOR" if world_size > 1 and multi_gpu_mode == "orchestrator"
                          else "LEADER"}
    return config


class _Flight:
    """One request in the executor: its tritonize request and what was sent of it so far."""

    def __init__(self, req: GenerationRequest, plan: ExecutorRequestPlan) -> None:
        self.req = req
        self.plan = plan
        self.generated: list[int] = []
        self.log_probs: list[float] = []
        self.delivered = 0


class TrtllmExecutorEngine(TrtllmEngineBase):
    """``engine.Engine``'s interface over a TensorRT-LLM engine directory; see the module docstring.

    ``model_dir`` is the Hugging Face config + tokenizer folder (end ids, vocabulary size, model family);
    ``engine_dir`` the built engine; ``adapters_dir`` the repository's adapters (may be missing).
    """

    def __init__(self, model_dir: str | Path, *, engine_dir: str | Path, adapters_dir: str | Path | None = None,
                 device: str = "auto", dtype: str = "auto", max_batch_size: int = 8, max_seq_len: int = 512,
                 max_num_tokens: int | None = None, kv_cache_free_gpu_memory_fraction: float | None = None,
                 kv_cache_tokens: int | None = None, prefix_cache: bool = True, kv_cache_dtype: str = "auto", tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 multi_gpu_mode: str = "leader") -> None:
        self.model_dir = Path(model_dir)
        self.engine_dir = Path(engine_dir)
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.world_size = tensor_parallel_size * pipeline_parallel_size
        self.kv_cache_dtype = kv_cache_dtype  # an engine's KV cache dtype is fixed when it is built
        self.config_kwargs = executor_config_kwargs(
            kv_cache_free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction, max_batch_size=max_batch_size,
            max_num_tokens=max_num_tokens, multi_gpu_mode=multi_gpu_mode, world_size=self.world_size,
            kv_cache_tokens=kv_cache_tokens, prefix_cache=prefix_cache)
        hf = json.loads((self.model_dir / "config.json").read_text(encoding="utf-8"))
        self.vocab_size = int(hf.get("vocab_size") or 0) or None
        self.gated = (hf.get("architectures") or ["?"])[0] in _GATED_MLPS
        self.lora_dtype = _torch_dtype(dtype if dtype != "auto" else str(hf.get("torch_dtype") or "float16"))
        self.default_end_ids = default_end_ids(self.model_dir)
        self.pad_id = hf.get("pad_token_id") if isinstance(hf.get("pad_token_id"), int) else None
        self.adapters = AdapterStore(adapters_dir) if adapters_dir is not None else None
        self.guided_config = executor_guided_config(self.model_dir, self.default_end_ids)
        self.tllm = import_executor()
        self.executor = self.tllm.Executor(self.engine_dir, self.tllm.ModelType.DECODER_ONLY,
                                           self._executor_config())
        self._init_engine()
        self._flights: dict[int, _Flight] = {}
        self._ids: dict[str, int] = {}

    def _executor_config(self) -> Any:
        t, c = self.tllm, self.config_kwargs
        kwargs: dict[str, Any] = {
            "max_beam_width": 1,
            "kv_cache_config": t.KvCacheConfig(**c["kv_cache_config"]),
            "scheduler_config": t.SchedulerConfig(getattr(t.CapacitySchedulerPolicy, c["scheduler_policy"])),
        }
        if c["parallel"]["communication_mode"] == "ORCHESTRATOR":
            import tensorrt_llm

            worker = Path(tensorrt_llm.__file__).parent / "bin" / "executorWorker"
            kwargs["parallel_config"] = t.ParallelConfig(
                t.CommunicationType.MPI, t.CommunicationMode.ORCHESTRATOR,
                orchestrator_config=t.OrchestratorConfig(True, str(worker)))
        if self.guided_config is not None and hasattr(t, "GuidedDecodingConfig"):
            kwargs["guided_decoding_config"] = t.GuidedDecodingConfig(
                backend=t.GuidedDecodingConfig.GuidedDecodingBackend.XGRAMMAR, **self.guided_config)
        else:
            self.guided_config = None
        config = t.ExecutorConfig(**kwargs)
        for name in ("max_batch_size", "max_num_tokens"):  # runtime limits under the engine's own
            if name in c and hasattr(config, name):
                setattr(config, name, c[name])
        return config

    # ---------------------------------------------------------------- public API

    _thread_name = "tritonize-trtllm-executor"

    def _thread_target(self) -> Callable[[], None] | None:
        return self._responses if self.executor.can_enqueue_requests() else None  # ranks > 0 serve no requests

    def _prepare(self, req: GenerationRequest) -> tuple[ExecutorRequestPlan, Any]:
        n_virtual = None
        task_id = getattr(req, "task_id", None)
        table = None
        own = getattr(req, "prompt_table", None)
        if task_id is not None and own is not None:
            raise ValueError("send task_id or prompt_embedding_table, not both")
        if task_id is not None:
            table = self._ptuning(int(task_id))
            n_virtual = table.shape[0]
        elif own is not None:  # the request's own table: PromptTuningConfig as tensorrtllm_backend sends it
            import torch

            table = torch.as_tensor(own)
        plan = plan_executor_request(req, end_ids=req.end_ids or self.default_end_ids, pad_id=self.pad_id,
                                     max_seq_len=self.max_seq_len, vocab_size=self.vocab_size,
                                     n_virtual=n_virtual, request_table=own is not None)
        if plan.guide is not None and self.guided_config is None:
            raise ValueError("guided decoding is not available on the trtllm-engine runtime here: it needs the "
                             "model's tokenizer.json (and a TensorRT-LLM with GuidedDecodingConfig); use --runtime "
                             "torch or trtllm")
        return plan, self._request(plan, table)

    def _requests(self) -> Mapping[str, Any]:
        return self._ids

    def _enqueue(self, req: GenerationRequest, prepared: tuple[ExecutorRequestPlan, Any]) -> None:
        plan, request = prepared
        executor_id = self.executor.enqueue_request(request)
        self._flights[executor_id] = _Flight(req, plan)
        self._ids[req.request_id] = executor_id

    def _forget(self, req: GenerationRequest, key: Any) -> None:
        if key is not None:
            self._flights.pop(key, None)
            self._ids.pop(req.request_id, None)

    def cancel(self, request_id: str) -> bool:
        with self._lock:
            executor_id = self._ids.get(request_id)
        if executor_id is None:
            return False
        self.executor.cancel_request(executor_id)
        return True

    def _stop_library(self, thread_done: bool) -> None:
        if thread_done:
            self.executor.shutdown()

    # ---------------------------------------------------------------- requests

    def _ptuning(self, task_id: int) -> Any:
        if self.adapters is None:
            raise AdapterError(f"task_id {task_id} was sent, but this repository has no adapters: remove task_id")
        return self.adapters.get("ptuning", task_id, read_ptuning_table)

    def _lora(self, task_id: int) -> tuple[Any, Any]:
        if self.adapters is None:
            raise AdapterError(f"lora_task_id {task_id} was sent, but this repository has no adapters: remove it")
        return self.adapters.get("lora", task_id, lambda path: lora_executor_tensors(
            read_lora(path), gated=self.gated, dtype=self.lora_dtype))

    def _request(self, plan: ExecutorRequestPlan, table: Any) -> Any:
        t = self.tllm
        kwargs = dict(plan.request)
        kwargs["sampling_config"] = t.SamplingConfig(**plan.sampling)
        kwargs["output_config"] = t.OutputConfig(**plan.output)
        if plan.lora_task_id is not None:
            weights, config = self._lora(plan.lora_task_id)
            kwargs["lora_config"] = t.LoraConfig(task_id=plan.lora_task_id, weights=weights, config=config)
        if table is not None:
            kwargs["prompt_tuning_config"] = t.PromptTuningConfig(embedding_table=table.to(self.lora_dtype))
        if plan.guide is not None:
            kind, text = plan.guide
            kwargs["guided_decoding_params"] = t.GuidedDecodingParams(getattr(t.GuidedDecodingParams.GuideType, kind),
                                                                      text)
        return t.Request(**kwargs)

    # ---------------------------------------------------------------- responses

    def _responses(self) -> None:
        while True:
            with self._lock:
                if self._closed and not self._flights:
                    return
            try:
                responses = self.executor.await_responses(timeout=_AWAIT)
            except Exception:  # noqa: BLE001 - the executor is gone (shutdown); answer what is left
                log.exception("trtllm executor: await_responses failed")
                self._fail_all("the TensorRT-LLM executor stopped")
                return
            for response in responses:
                self._dispatch(response)

    def _dispatch(self, response: Any) -> None:
        with self._lock:
            flight = self._flights.get(response.request_id)
        if flight is None:
            return
        req = flight.req
        n_in = len(flight.plan.request["input_token_ids"])
        if response.has_error():
            self._answer(req, StepOutput([], [], 0.0, True, "error", str(response.error_msg), n_in,
                                         len(flight.generated)), response.request_id)
            return
        result = response.result
        new = [int(i) for i in result.output_token_ids[0]]
        if not req.stream:
            new = new[len(flight.generated):] if new[: len(flight.generated)] == flight.generated else new
        flight.generated.extend(new)
        if req.return_log_probs and new and result.log_probs:
            flight.log_probs.extend(float(x) for x in list(result.log_probs[0])[-len(new):])
        cum = float(result.cum_log_probs[0]) if req.return_log_probs and result.cum_log_probs else 0.0
        if not result.is_final:
            if req.stream and len(flight.generated) > flight.delivered:
                req.on_output(StepOutput(flight.generated[flight.delivered:], flight.log_probs[flight.delivered:],
                                         cum, False, None, None, n_in, len(flight.generated)))
                flight.delivered = len(flight.generated)
            return
        reasons = getattr(result, "finish_reasons", None) or [None]
        reason = map_executor_finish_reason(reasons[0]) or "length"
        if reason == "stop" and flight.generated and flight.generated[-1] in flight.plan.extra_end_ids \
                and not stop_length(flight.generated, flight.req.stop_sequences):
            flight.generated.pop()  # an extra end id, sent as a stop word: not part of the output
            del flight.log_probs[len(flight.generated):]
            reason = "end"
        if reason == "cancelled":
            out = StepOutput([], [], cum, True, "cancelled", None, n_in, len(flight.generated))
        else:
            start = flight.delivered if req.stream else 0
            out = StepOutput(flight.generated[start:], flight.log_probs[start:], cum, True, reason, None, n_in,
                             len(flight.generated))
        self._answer(req, out, response.request_id)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            flights = list(self._flights.items())
        for executor_id, flight in flights:
            self._answer(flight.req, StepOutput([], [], 0.0, True, "error", message, len(flight.req.prompt_ids),
                                                len(flight.generated)), executor_id)


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(name, torch.float16)
