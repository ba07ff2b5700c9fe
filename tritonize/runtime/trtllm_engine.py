"""The ``trtllm`` runtime: ``tensorrt_llm.LLM`` (PyTorch backend) behind the interface of ``engine.Engine``.

The Triton engine model talks to one engine object (start, submit, cancel, shutdown, stats, generate);
this class gives it TensorRT-LLM's in-flight batching and paged KV cache instead of tritonize's own
scheduler. TensorRT-LLM's LLM API is asynchronous, so an asyncio loop runs in a background thread and
each submitted request becomes a task there that iterates ``generate_async(prompt_ids, ...)`` and turns
every update into a ``StepOutput`` delta.

Wire semantics are kept as in ``engine.py``: end ids end a request and are not in the output; stop
sequences stay in the output. Multi-token stop sequences are matched here (TensorRT-LLM's public
``stop_token_ids`` take single tokens) and the request is aborted once one appears.

Structured output: where the model folder has its tokenizer, the LLM is made with
``guided_decoding_backend="xgrammar"`` (which reads the vocabulary through TensorRT-LLM's own tokenizer, so
that is loaded; outputs are not detokenized) and a guided request's ``SamplingParams`` carry
``guided_decoding=GuidedDecodingParams(...)``.

``tensorrt_llm`` is imported lazily: the module imports without it, so the mapping functions are
usable (and tested) anywhere.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .engine import default_end_ids
from .errors import AdapterError
from .request import GenerationEngine, GenerationRequest, SamplingParams, StepOutput, stop_length
from .trtllm_adapters import AdapterStore, read_lora, write_peft_dir

__all__ = [
    "INSTALL_HINT",
    "TrtllmEngine",
    "TrtllmEngineBase",
    "TrtllmNotInstalledError",
    "import_tensorrt_llm",
    "map_finish_reason",
    "peft_adapters",
    "to_trtllm_sampling",
    "trtllm_guided_kwargs",
    "token_log_probs",
]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install --extra-index-url https://pypi.nvidia.com tensorrt_llm"


class TrtllmNotInstalledError(ImportError):
    """The trtllm runtime was asked for on a machine without tensorrt_llm."""


def import_tensorrt_llm(module: str = "tensorrt_llm", *, runtime: str = "trtllm",
                        fix: str = f"install it with `{INSTALL_HINT}` (NVIDIA GPU, see TensorRT-LLM's installation "
                                   "guide) or use --runtime torch") -> Any:
    """tensorrt_llm (or ``module`` of it), or a one-line error saying how to get it (it is not on PyPI proper)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TrtllmNotInstalledError(
            f"the {runtime} runtime needs {module}, which cannot be imported here ({e}): {fix}") from None


def sampling_knobs(sampling: SamplingParams) -> dict[str, Any]:
    """The sampling arguments both TensorRT-LLM APIs name alike (LLM ``SamplingParams`` and executor
    ``SamplingConfig``): only what was set, validated; raises ValueError."""
    kwargs: dict[str, Any] = {}
    if sampling.temperature is not None:
        if sampling.temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {sampling.temperature}")
        kwargs["temperature"] = float(sampling.temperature)
    if sampling.top_k is not None:
        if sampling.top_k < 0:
            raise ValueError(f"top_k must be >= 0, not {sampling.top_k}")
        kwargs["top_k"] = int(sampling.top_k)
    if sampling.top_p is not None:
        if not 0.0 <= sampling.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], not {sampling.top_p}")
        kwargs["top_p"] = float(sampling.top_p)
    if sampling.greedy and sampling.temperature != 0 and sampling.top_k != 1:
        # The wire rule (the executor's): no top_k and no top_p is greedy, whatever the temperature. The
        # LLM API samples on a temperature alone, so a greedy request sends none of the three.
        for key in ("temperature", "top_k", "top_p"):
            kwargs.pop(key, None)
    if sampling.seed is not None:
        kwargs["seed"] = int(sampling.seed)
    if sampling.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = float(sampling.repetition_penalty)
    if sampling.presence_penalty != 0.0:
        kwargs["presence_penalty"] = float(sampling.presence_penalty)
    if sampling.frequency_penalty != 0.0:
        kwargs["frequency_penalty"] = float(sampling.frequency_penalty)
    if sampling.min_tokens:
        kwargs["min_tokens"] = int(sampling.min_tokens)
    return kwargs


def to_trtllm_sampling(
    sampling: SamplingParams,
    max_new_tokens: int,
    end_ids: Sequence[int] = (),
    bad_sequences: Sequence[Sequence[int]] = (),
    return_log_probs: bool = False,
    pad_id: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``tensorrt_llm.SamplingParams`` for one tritonize request.

    Only what was set is passed, so TensorRT-LLM's own defaults (greedy when no sampling knob is given)
    apply to the rest. The first end id is ``end_id``; any others become ``stop_token_ids``, which
    TensorRT-LLM also leaves out of the output. Stop sequences are not mapped: the engine matches them
    itself to keep them in the output. Raises ValueError for what the LLM API cannot express.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, not {max_new_tokens}")
    kwargs: dict[str, Any] = {"max_tokens": int(max_new_tokens), **sampling_knobs(sampling)}
    ends = [int(i) for i in end_ids if int(i) >= 0]
    if ends:
        kwargs["end_id"] = ends[0]
        if len(ends) > 1:
            kwargs["stop_token_ids"] = ends[1:]
    if pad_id is not None and pad_id >= 0:
        kwargs["pad_id"] = int(pad_id)
    bad = [list(s) for s in bad_sequences if s]
    longer = [s for s in bad if len(s) > 1]
    if longer:
        raise ValueError(
            f"bad_words {longer[0]} spans {len(longer[0])} tokens; the trtllm runtime bans single tokens "
            "only: send one-token bad words or use --runtime torch"
        )
    if bad:
        kwargs["bad_token_ids"] = sorted({s[0] for s in bad})
    if return_log_probs:
        kwargs["logprobs"] = 1  # the sampled token's log-prob (plus at most one alternative)
    return kwargs


# grammar.Guide's types -> the field of TensorRT-LLM's GuidedDecodingParams that carries each (LLM API)
_LLM_API_GUIDES = {"json_schema": "json", "regex": "regex", "ebnf_grammar": "grammar", "structural_tag": "structural_tag"}


def trtllm_guided_kwargs(guide: Any) -> dict[str, Any]:
    """Keyword arguments of ``tensorrt_llm.llmapi.GuidedDecodingParams`` for a ``grammar.Guide``."""
    if guide.type == "json":
        return {"json_object": True}
    return {_LLM_API_GUIDES[guide.type]: guide.text}


def has_tokenizer(model_dir: str | Path) -> bool:
    """Whether the model folder has tokenizer files, which TensorRT-LLM's guided decoding reads."""
    d = Path(model_dir)
    return any((d / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))


NO_GUIDES = ("guided decoding is not available here: the model folder has no tokenizer files for TensorRT-LLM's "
             "grammar backend; regenerate the repository or use --runtime torch")


def map_finish_reason(finish_reason: str | None) -> str | None:
    """TensorRT-LLM's ``finish_reason`` in tritonize's words ("length" | "end" | "stop" | "cancelled").

    TensorRT-LLM says "stop" for both an end id and a stop token; only ids the request listed as
    end ids are ours (we add no stop tokens of our own), so a "stop" is always an end here.
    """
    if finish_reason is None:
        return None
    if finish_reason == "length":
        return "length"
    if finish_reason == "stop":
        return "end"
    if finish_reason in ("cancelled", "abort", "aborted"):
        return "cancelled"
    return finish_reason


def token_log_probs(entries: Sequence[Any] | None, token_ids: Sequence[int]) -> list[float]:
    """The sampled tokens' log-probs from ``CompletionOutput.logprobs``.

    TensorRT-LLM gives either plain floats or, per position, a dict ``{token_id: Logprob}`` holding the
    top candidates and the sampled token.
    """
    if not entries:
        return []
    out = []
    for entry, token in zip(entries, token_ids):
        if isinstance(entry, dict):
            value = entry.get(token)
            if value is None:
                value = next(iter(entry.values()), 0.0)
            entry = getattr(value, "logprob", value)
        out.append(float(entry))
    return out


def peft_adapters(adapters_dir: str | Path, hf_config: dict[str, Any], dest: str | Path) -> dict[int, tuple[Path, int]]:
    """Every LoRA of the repository written as a PEFT directory under ``dest``: {lora_task_id: (dir, rank)}.

    TensorRT-LLM's LLM API loads LoRA from Hugging Face PEFT (or NeMo) directories only.
    """
    store = AdapterStore(adapters_dir)
    out = {}
    for task_id in store.ids("lora"):
        adapter = read_lora(store.directory("lora", task_id))
        out[task_id] = (write_peft_dir(adapter, Path(dest) / str(task_id), hf_config), adapter.rank)
    return out


def _lora_config_class() -> Any:
    for module in ("tensorrt_llm.lora_helper", "tensorrt_llm.lora_manager"):
        try:
            return importlib.import_module(module).LoraConfig
        except (ImportError, AttributeError):
            continue
    raise TrtllmNotInstalledError("this tensorrt_llm has no LoraConfig: LoRA needs TensorRT-LLM 0.18 or newer")


def _refused(req: GenerationRequest, problem: str) -> StepOutput:
    return StepOutput([], [], 0.0, True, "error", problem, len(req.prompt_ids), 0)


class TrtllmEngineBase(GenerationEngine):
    """What both TensorRT-LLM engines do around the library that batches for them: one background thread,
    the admission of each request, and its final answer with the counters the engine model publishes.

    A subclass says how a request is prepared (``_prepare``: ValueError / TypeError refuse it), queued
    (``_enqueue``), found (``_requests``) and forgotten (``_forget``), what its thread runs
    (``_thread_target``), and how the library stops (``_stop_library``).
    """

    _thread_name = "tritonize-trtllm"

    def _init_engine(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.stats: dict[str, Any] = {"decode_batch_histogram": {}, "generated_tokens": 0, "finished": {}}

    def _thread_target(self) -> Callable[[], None] | None:
        """What the background thread runs; None where this process serves no requests."""
        raise NotImplementedError

    def _prepare(self, req: GenerationRequest) -> Any:
        raise NotImplementedError

    def _requests(self) -> Mapping[str, Any]:
        """The requests in flight, by request id; read holding the lock."""
        raise NotImplementedError

    def _enqueue(self, req: GenerationRequest, prepared: Any) -> None:
        """Hands the request to TensorRT-LLM; called holding the lock."""
        raise NotImplementedError

    def _forget(self, req: GenerationRequest, key: Any) -> None:
        """Drops what is kept about a finished request; called holding the lock."""
        raise NotImplementedError

    def _stop_library(self, thread_done: bool) -> None:
        """Stops TensorRT-LLM: called once before the thread is joined (``thread_done`` False), once after."""
        raise NotImplementedError

    def start(self) -> TrtllmEngineBase:
        with self._lock:
            if self._closed:
                raise RuntimeError("this engine was shut down; create a new one")
            if self._thread is None:
                target = self._thread_target()
                if target is not None:
                    self._thread = threading.Thread(target=target, name=self._thread_name, daemon=True)
                    self._thread.start()
        return self

    def submit(self, req: GenerationRequest) -> None:
        """Queue a request; every outcome, a rejection included, arrives through ``req.on_output``."""
        if not callable(req.on_output):
            raise ValueError("GenerationRequest.on_output must be a callable")
        self.start()
        try:
            prepared = self._prepare(req)
        except (ValueError, TypeError) as e:  # AdapterError is a ValueError
            self._answer(req, _refused(req, str(e)))
            return
        with self._lock:
            problem = None
            if self._closed:
                problem = "the engine was shut down; no new requests are accepted"
            elif req.request_id in self._requests():
                problem = f"request id {req.request_id!r} is already in flight; use a unique id"
            else:
                self._enqueue(req, prepared)
        if problem is not None:
            self._answer(req, _refused(req, problem))

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stops taking requests, cancels the ones in flight (each answers "cancelled") and stops the library."""
        with self._lock:
            self._closed = True
            ids = list(self._requests())
        for request_id in ids:
            self.cancel(request_id)
        self._stop_library(thread_done=False)
        if self._thread is not None:
            self._thread.join(timeout)
        self._stop_library(thread_done=True)

    def _answer(self, req: GenerationRequest, out: StepOutput, key: Any = None) -> None:
        with self._lock:
            self._forget(req, key)
            finished = self.stats["finished"]
            finished[out.finish_reason] = finished.get(out.finish_reason, 0) + 1
            self.stats["generated_tokens"] += out.num_output_tokens
        try:
            req.on_output(out)
        except Exception:  # noqa: BLE001 - a client that went away
            log.warning("on_output of %s raised; dropping it", req.request_id)


class TrtllmEngine(TrtllmEngineBase):
    """``engine.Engine``'s interface over ``tensorrt_llm.LLM``; see the module docstring.

    ``max_seq_len`` is prompt plus output; ``kv_cache_free_gpu_memory_fraction`` None keeps TensorRT-LLM's
    default, ``kv_cache_tokens`` caps the KV cache (KvCacheConfig.max_tokens), ``prefix_cache`` is
    KvCacheConfig.enable_block_reuse; ``kv_cache_dtype`` "fp8" stores the KV cache in FP8 ("auto" follows
    the checkpoint).
    ``device`` is accepted for the same call shape; TensorRT-LLM places ranks on the visible GPUs.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 8,
        max_seq_len: int = 512,
        max_num_tokens: int | None = None,
        kv_cache_free_gpu_memory_fraction: float | None = None,
        kv_cache_tokens: int | None = None,
        prefix_cache: bool = True,
        kv_cache_dtype: str = "auto",
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        adapters_dir: str | Path | None = None,
    ) -> None:
        if max_batch_size < 1 or max_seq_len < 2:
            raise ValueError(f"need max_batch_size >= 1 and max_seq_len >= 2, got {max_batch_size}, {max_seq_len}")
        if tensor_parallel_size < 1 or pipeline_parallel_size < 1:
            raise ValueError("tensor_parallel_size and pipeline_parallel_size must be at least 1")
        if kv_cache_free_gpu_memory_fraction is not None and not 0.0 < kv_cache_free_gpu_memory_fraction <= 1.0:
            raise ValueError(f"kv_cache_free_gpu_memory_fraction must be in (0, 1], not {kv_cache_free_gpu_memory_fraction}")
        if kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype must be auto or fp8, not {kv_cache_dtype!r}")
        trtllm = import_tensorrt_llm()
        from tensorrt_llm.llmapi import KvCacheConfig

        self.model_dir = Path(model_dir)
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.max_num_tokens = max_num_tokens
        self.default_end_ids = default_end_ids(self.model_dir)
        self._sampling_cls = trtllm.SamplingParams
        kv: dict[str, Any] = {"enable_block_reuse": bool(prefix_cache)}
        if kv_cache_free_gpu_memory_fraction is not None:
            kv["free_gpu_memory_fraction"] = kv_cache_free_gpu_memory_fraction
        if kv_cache_tokens:
            kv["max_tokens"] = int(kv_cache_tokens)
        if kv_cache_dtype != "auto":
            kv["dtype"] = kv_cache_dtype
        llm_args: dict[str, Any] = {
            "model": str(self.model_dir),
            "skip_tokenizer_init": True,  # ids in, ids out: the ensemble's tokenizer models do the text
            "dtype": dtype,
            "tensor_parallel_size": tensor_parallel_size,
            "pipeline_parallel_size": pipeline_parallel_size,
            "max_batch_size": max_batch_size,
            "max_seq_len": max_seq_len,
            "kv_cache_config": KvCacheConfig(**kv),
        }
        if max_num_tokens:
            llm_args["max_num_tokens"] = max_num_tokens
        self._peft_root: str | None = None
        self.loras: dict[int, tuple[Path, int]] = {}
        if adapters_dir is not None and AdapterStore(adapters_dir).ids("lora"):
            self._peft_root = tempfile.mkdtemp(prefix="tritonize-peft-")
            hf_config = json.loads((self.model_dir / "config.json").read_text(encoding="utf-8"))
            self.loras = peft_adapters(adapters_dir, hf_config, self._peft_root)
            n = len(self.loras)
            llm_args["lora_config"] = _lora_config_class()(
                lora_dir=[str(path) for path, _ in self.loras.values()],
                max_lora_rank=max(rank for _, rank in self.loras.values()), max_loras=n, max_cpu_loras=n)
        self.adapters_dir = adapters_dir
        self.guided_problem: str | None = NO_GUIDES
        self._guided_cls = getattr(importlib.import_module("tensorrt_llm.llmapi"), "GuidedDecodingParams", None)
        if has_tokenizer(self.model_dir) and self._guided_cls is not None:
            llm_args["guided_decoding_backend"] = "xgrammar"
            llm_args["skip_tokenizer_init"] = False  # xgrammar reads the vocabulary through TensorRT-LLM's tokenizer
            self.guided_problem = None
        self.llm_args = llm_args
        try:
            self.llm = trtllm.LLM(**llm_args)
        except (TypeError, ValueError) as e:  # a TensorRT-LLM that refuses these arguments: serve without guides
            if self.guided_problem is not None:
                raise
            log.warning("TensorRT-LLM refused guided decoding (%s); serving without it", e)
            llm_args.pop("guided_decoding_backend")
            llm_args["skip_tokenizer_init"] = True
            self.guided_problem = f"guided decoding is not available with this TensorRT-LLM: {e}"
            self.llm = trtllm.LLM(**llm_args)

        self._init_engine()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._results: dict[str, Any] = {}
        self._cancelled: set[str] = set()  # asked to cancel before TensorRT-LLM had the request

    # ---------------------------------------------------------------- public API

    def _thread_target(self) -> Callable[[], None]:
        self._loop = asyncio.new_event_loop()
        return self._loop.run_forever

    def _prepare(self, req: GenerationRequest) -> tuple[Any, Any]:
        kwargs = to_trtllm_sampling(req.sampling, req.max_new_tokens, req.end_ids or self.default_end_ids,
                                    req.bad_sequences, req.return_log_probs)
        guide = getattr(req, "guide", None)
        if guide is not None:
            if self.guided_problem is not None:
                raise ValueError(self.guided_problem)
            kwargs["guided_decoding"] = self._guided_cls(**trtllm_guided_kwargs(guide))
        if self.guided_problem is None:
            kwargs["detokenize"] = False  # ids out: the ensemble's postprocessing makes the text
        if not req.prompt_ids:
            raise ValueError("the prompt is empty")
        if len(req.prompt_ids) + req.max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.max_new_tokens}) exceeds "
                             f"max_seq_len {self.max_seq_len}")
        return self._sampling_cls(**kwargs), self._lora_request(req)

    def _requests(self) -> Mapping[str, Any]:
        return self._tasks

    def _enqueue(self, req: GenerationRequest, prepared: tuple[Any, Any]) -> None:
        params, lora_request = prepared
        future = asyncio.run_coroutine_threadsafe(self._run(req, params, lora_request), self._loop)
        self._tasks[req.request_id] = future  # type: ignore[assignment]

    def _forget(self, req: GenerationRequest, key: Any) -> None:
        self._tasks.pop(req.request_id, None)
        self._results.pop(req.request_id, None)
        self._cancelled.discard(req.request_id)

    def _lora_request(self, req: GenerationRequest) -> Any:
        """LoRARequest for the request's lora_task_id (None without one); task_id is refused by name."""
        if getattr(req, "prompt_table", None) is not None:
            raise AdapterError("prompt_embedding_table is not available on the trtllm runtime: TensorRT-LLM's LLM "
                               "API takes no prompt tables; use --runtime torch or trtllm-engine")
        if getattr(req, "task_id", None) is not None:
            raise AdapterError("task_id (p-tuning) is not available on the trtllm runtime: TensorRT-LLM's LLM API "
                               "takes no prompt tables; use --runtime trtllm-engine or torch")
        task_id = getattr(req, "lora_task_id", None)
        if task_id is None:
            return None
        if int(task_id) not in self.loras:
            have = ", ".join(map(str, sorted(self.loras))) or "none"
            raise AdapterError(f"lora_task_id {task_id} is not in this repository (it has: {have})")
        from tensorrt_llm.executor.request import LoRARequest

        return LoRARequest(f"lora-{int(task_id)}", int(task_id), str(self.loras[int(task_id)][0]))

    def cancel(self, request_id: str) -> bool:
        """Abort through TensorRT-LLM (frees its KV blocks); on_output gets finished with "cancelled"."""
        with self._lock:
            result = self._results.get(request_id)
            known = request_id in self._tasks
            if known:
                self._cancelled.add(request_id)
        if not known:
            return False
        if result is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(result.abort)
        return True

    def _stop_library(self, thread_done: bool) -> None:
        if not thread_done:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._loop.stop)
            return
        self.llm.shutdown()
        if self._peft_root is not None:
            shutil.rmtree(self._peft_root, ignore_errors=True)

    # ---------------------------------------------------------------- the asyncio side

    async def _run(self, req: GenerationRequest, params: Any, lora_request: Any = None) -> None:
        n_in = len(req.prompt_ids)
        generated: list[int] = []
        log_probs: list[float] = []
        delivered = 0
        reason: str | None = None
        cum = 0.0
        try:
            extra = {"lora_request": lora_request} if lora_request is not None else {}
            result = self.llm.generate_async(req.prompt_ids, sampling_params=params, streaming=req.stream, **extra)
            with self._lock:
                self._results[req.request_id] = result
                early = req.request_id in self._cancelled
            if early:
                result.abort()
            async for update in result:
                completion = update.outputs[0]
                tokens = list(completion.token_ids)
                new = tokens[len(generated):]
                generated.extend(new)
                if req.return_log_probs:
                    log_probs.extend(token_log_probs(list(completion.logprobs or [])[len(log_probs):], new))
                    cum = float(getattr(completion, "cumulative_logprob", None) or sum(log_probs))
                reason = map_finish_reason(completion.finish_reason)
                if req.is_cancelled is not None and req.is_cancelled():
                    result.abort()
                cut = self._stop_cut(req, generated, len(new)) if req.stop_sequences and new else None
                if cut is not None:  # a stop sequence wins over whatever ended the request after it
                    del generated[cut:]
                    del log_probs[cut:]
                    if req.return_log_probs:
                        cum = sum(log_probs)
                    if reason is None:
                        result.abort()
                    reason = "stop"
                if getattr(update, "finished", False) and reason is None:
                    reason = "cancelled" if getattr(result, "aborted", False) else "length"
                if reason is not None:
                    break
                if req.stream and len(generated) > delivered:
                    req.on_output(StepOutput(generated[delivered:], log_probs[delivered:], cum, False, None, None,
                                             n_in, len(generated)))
                    delivered = len(generated)
            if reason is None:
                reason = "cancelled"
            start = delivered if req.stream else 0
            if reason == "cancelled":
                self._answer(req, StepOutput([], [], cum, True, "cancelled", None, n_in, len(generated)))
            else:
                self._answer(req, StepOutput(generated[start:], log_probs[start:], cum, True, reason, None, n_in,
                                             len(generated)))
        except asyncio.CancelledError:
            self._answer(req, StepOutput([], [], cum, True, "cancelled", None, n_in, len(generated)))
        except Exception as e:  # noqa: BLE001 - a failed request must answer, not hang its client
            log.exception("trtllm request %s failed", req.request_id)
            self._answer(req, StepOutput([], [], cum, True, "error", f"{type(e).__name__}: {e}", n_in,
                                         len(generated)))

    def _stop_cut(self, req: GenerationRequest, generated: list[int], n_new: int) -> int | None:
        """Where to cut the output if one of the new tokens completes a stop sequence (kept in the output)."""
        history = list(req.prompt_ids) + generated
        first = len(generated) - n_new
        for k in range(first, len(generated)):
            if stop_length(history[: len(req.prompt_ids) + k + 1], req.stop_sequences):
                return k + 1
        return None
