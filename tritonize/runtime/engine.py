"""In-flight batching over a paged KV cache: the engine the Triton engine model drives.

One thread owns the model and loops:

1. take new requests (validated when submitted) into the scheduler's queue, drop cancelled ones;
2. ``Scheduler.schedule()`` plans the next step under the token budget: every running decode, prompt
   chunks of newcomers (many prompts packed into one forward), prefix blocks reused from the pool,
   preemption when the pool is short (scheduler.py);
3. ``ModelRunner.launch()`` runs it without waiting for the device (runner.py);
4. meanwhile the tokens of the previous step are read, applied (``update_from_output``), checked
   (``check_stop``) and handed to each request's ``on_output``.

So the host's bookkeeping of step N overlaps the device's work on step N+1. A request that an end id or
a stop sequence ends in step N has already been given a row in step N+1; that row's token is dropped.
Requests whose next choice needs their previous tokens on the host (multi-token bad words) make the
engine wait for each step instead.

Structured output (grammar.py): a guided request waits in its own queue while a thread pool compiles its
grammar, then joins the scheduler's. A step holding guided rows is launched without its sampling; once
step N's tokens are applied (each guided request's matcher takes its new token), the guided rows' masks
for step N+1 are filled on the host and the step's tokens are chosen. The forward of step N+1 still runs
while the host reads step N; only the sampling waits for the masks.

An exception inside a step finishes the requests it touched with reason "error" and the thread goes on.
Callbacks (``on_output``) run on the engine thread and must be quick; one that raises is treated as a
client that went away, and its request is dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .kv_cache import BlockPool
from .loading import load_for_serving
from .request import GenerationEngine, GenerationRequest, RequestMetrics, StepOutput, no_output
from .runner import InFlight, ModelRunner, Unsampled
from .sampling import Sampler, SamplingRow, TokenMask
from .scheduler import Scheduler, StepPlan, check_stop
from .sequence import Sequence, Status

__all__ = ["Engine", "resolve_device", "resolve_dtype"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_CACHE_DTYPES = ("auto", "fp8", "model")  # auto: FP8 when the checkpoint declares an FP8 KV cache
_STATS_HISTORY = 100_000


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" means the GPU when there is one: the same repository serves from either."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" is bfloat16 on CUDA (the checkpoints' training dtype) and float32 on CPU (bf16 matmuls are
    slow there and would make CPU results drift from the float32 reference)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def default_end_ids(model_dir: str | Path) -> list[int]:
    """The checkpoint's end-of-sequence ids: generation_config.json first (it may list several), then
    config.json."""
    for name in ("generation_config.json", "config.json"):
        eos = _read_json(Path(model_dir) / name).get("eos_token_id")
        if eos is not None:
            return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return []


class Engine(GenerationEngine):
    """Thread-safe in-flight batching engine over ``model.py``'s Transformer; see the module docstring."""

    # ``is_cancelled`` may be an IPC round trip (Triton's stub asks the server): poll each request at
    # most this often rather than every step.
    cancel_poll_interval_s = 0.05

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        max_batch_size: int = 8,
        max_seq_len: int = 512,
        max_num_tokens: int | None = None,
        cuda_graphs: bool | None = None,
        adapters_dir: str | Path | None = None,
        max_prompt_embedding_table_size: int = 0,
        kv_cache_tokens: int | None = None,
        kv_cache_free_gpu_memory_fraction: float | None = None,
        block_size: int = 16,
        prefix_cache: bool = True,
        kernels: bool | None = None,
        tensor_parallel_size: int = 1,
        kv_cache_dtype: str = "auto",
        fp8_matmul: bool | None = None,
    ) -> None:
        if max_batch_size < 1 or max_seq_len < 2:
            raise ValueError(f"need max_batch_size >= 1 and max_seq_len >= 2, got {max_batch_size}, {max_seq_len}")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {tensor_parallel_size}")
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, not {kv_cache_dtype!r}")
        if max_num_tokens is None:
            max_num_tokens = max(512, 2 * max_batch_size)
        if max_num_tokens < max_batch_size:
            raise ValueError(
                f"max_num_tokens ({max_num_tokens}) must be at least max_batch_size ({max_batch_size}): each decode "
                "row uses one token of the per-step budget"
            )
        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.max_num_tokens = max_num_tokens
        self.block_size = block_size
        self.default_end_ids = default_end_ids(self.model_dir)
        on_cuda = self.device.type == "cuda"
        use_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        if use_graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs device cuda")

        self._cv = threading.Condition()
        self._fatal: str | None = None  # set when a tensor-parallel rank is lost: every request fails with it
        options = dict(model_dir=str(self.model_dir), device=str(self.device), dtype=self.dtype,
                       max_batch_size=max_batch_size, max_seq_len=max_seq_len, max_num_tokens=max_num_tokens,
                       cuda_graphs=use_graphs, kernels=on_cuda if kernels is None else kernels,
                       adapters_dir=None if adapters_dir is None else str(adapters_dir),
                       max_prompt_embedding_table_size=max_prompt_embedding_table_size,
                       kv_cache_tokens=kv_cache_tokens, kv_cache_free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction,
                       block_size=block_size, kv_cache_dtype=kv_cache_dtype, fp8_matmul=fp8_matmul)
        self.tp = None
        self.tensor_parallel_size = tensor_parallel_size
        if tensor_parallel_size > 1:
            from .tp_ranks import Leader

            self.tp = Leader.start(tensor_parallel_size, self.device, options, on_failure=self._fail_fatal)
        try:
            loaded = load_for_serving(**options, tp=self.tp)
            if self.tp is not None:
                self.tp.wait_ready()
        except BaseException as exc:
            if self.tp is not None:
                self.tp.close()
                self.tp.raise_startup_failure(exc)
            raise
        self.model, self.adapters, num_blocks = loaded.model, loaded.adapters, loaded.num_blocks
        self.kernels = loaded.kernels
        self.kv_cache_dtype = loaded.kv_cache_dtype
        self.fp8_linears = loaded.fp8_linears  # FP8 linears on FP8 tensor cores (the rest, if any, weight-only)
        self.vocab_size = self._vocab_size()
        self.sampler = Sampler(self.vocab_size, max_batch_size, self.device)
        self.pool = BlockPool(num_blocks, block_size, prefix_caching=prefix_cache)
        self.scheduler = Scheduler(self.pool, max_num_seqs=max_batch_size, max_num_tokens=max_num_tokens)
        self.runner = ModelRunner(
            self.model, self.sampler, device=self.device, max_num_seqs=max_batch_size, max_num_tokens=max_num_tokens,
            max_seq_len=max_seq_len, block_size=block_size, cuda_graphs=loaded.graphs,
            token_adapter=self.adapters.token_adapter, vocab_size=self.vocab_size, tp=self.tp,
        )
        self.slot_adapter = np.zeros(max_batch_size, dtype=np.int64) if self.adapters.lora else None
        kv_tokens = (num_blocks - 1) * block_size
        self.kv_cache_bytes = sum(b.numel() * b.element_size() for name, b in self.model.named_buffers()
                                  if name.endswith(("k_cache", "v_cache")))
        self.kv_cache_tokens = kv_tokens
        per_rank = f" on each of {tensor_parallel_size} ranks" if self.tp is not None else ""
        log.info("KV cache: %d tokens in %d blocks of %d (%.2f GB, %s%s); %d requests of %d tokens fit at once%s",
                 kv_tokens, num_blocks - 1, block_size, self.kv_cache_bytes / 1e9, self.kv_cache_dtype, per_rank,
                 kv_tokens // max_seq_len, max_seq_len, "; prefix reuse on" if prefix_cache else "")
        if self.kv_cache_dtype == "fp8":
            found = self.model.kv_scales_found
            log.info("FP8 KV cache scales: %s", f"the checkpoint's, {found} of {self.model.args.n_layers} layers "
                     "(1.0 for the rest)" if found else "1.0 (the checkpoint has none)")
        if self.model.quant_scheme is not None:
            log.info("quantization: %s; %d FP8 linears on FP8 tensor cores", self.model.quant_scheme.describe(),
                     self.fp8_linears)

        self._incoming: deque[GenerationRequest] = deque()
        self._live: set[str] = set()
        self._cancel_ids: set[str] = set()
        self._stopping = False
        self._closed = False
        self._thread: threading.Thread | None = None
        # Called on the engine thread after each pass of its loop has delivered that pass's outputs (and once
        # when it stops): engine_process.py sends a step's outputs to the engine model's process in one message.
        self.after_step: Callable[[], None] | None = None
        # Touched by the scheduler thread only.
        self._seqs: dict[str, Sequence] = {}
        self.stats: dict[str, Any] = {
            "decode_batch_sizes": deque(maxlen=_STATS_HISTORY),
            "decode_batch_histogram": {},
            "prefill_chunks": deque(maxlen=_STATS_HISTORY),
            "decode_steps": 0,
            "mixed_steps": 0,
            "prefill_tokens": 0,
            "generated_tokens": 0,
            "finished": {},
            "kv_cache_tokens": kv_tokens,
            "pool": self.pool.stats,
            # seconds the engine thread spent planning, launching, waiting for the device, and applying
            "time_s": {"schedule": 0.0, "launch": 0.0, "wait": 0.0, "apply": 0.0, "guide": 0.0},
        }
        # Structured output (grammar.py), set up at the first guided request.
        self._grammar: Any = None  # grammar.GrammarCompiler
        self._grammar_missing: str | None = None
        self._compiling: list[Sequence] = []  # guided sequences whose grammar is being compiled
        self._compiled = False  # one of them is ready (set by the compiler's thread)
        self._bitmask: torch.Tensor | None = None  # host [max_batch_size, words] int32: guided rows' masks
        self._scratch: torch.Tensor | None = None

    def _vocab_size(self) -> int:
        args = getattr(self.model, "args", None) or getattr(self.model, "config", None)
        size = getattr(args, "vocab_size", None) or _read_json(self.model_dir / "config.json").get("vocab_size")
        if not size:
            raise ValueError(f"cannot tell the vocabulary size of {self.model_dir}: no vocab_size in config.json")
        return int(size)

    # ---------------------------------------------------------------- public API

    def start(self) -> Engine:
        with self._cv:
            if self._closed:
                raise RuntimeError("this engine was shut down; create a new one")
            if self._thread is not None:
                return self
        if self.runner.shapes():
            with torch.inference_mode():
                self.runner.capture_all(progress=_CaptureLog())  # before serving, not on the first requests
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tritonize-engine", daemon=True)
                self._thread.start()
        return self

    def submit(self, req: GenerationRequest) -> None:
        """Queue a request; every outcome, a rejection included, arrives through ``req.on_output``."""
        if req.on_output is no_output or not callable(req.on_output):
            raise ValueError("GenerationRequest.on_output must be a callable")
        problem = self._fatal or self._validate(req)
        if problem is None:
            with self._cv:
                if self._fatal:
                    problem = self._fatal
                elif self._closed:
                    problem = "the engine was shut down; no new requests are accepted"
                elif req.request_id in self._live:
                    problem = f"request id {req.request_id!r} is already in flight; use a unique id"
                else:
                    self._live.add(req.request_id)
                    self._incoming.append(req)
                    self._cv.notify()
                    return
        self._deliver(req, self._final(req, [], [], 0.0, 0, "error", problem))

    def cancel(self, request_id: str) -> bool:
        """Stop a request: queued ones leave at once, running ones before the next step. False if unknown."""
        with self._cv:
            for req in self._incoming:
                if req.request_id == request_id:
                    self._incoming.remove(req)
                    self._live.discard(request_id)
                    break
            else:
                if request_id not in self._live:
                    return False
                self._cancel_ids.add(request_id)
                self._cv.notify()
                return True
        self._deliver(req, self._final(req, [], [], 0.0, 0, "cancelled", None))
        return True

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the thread; requests still queued or running finish with reason "error"."""
        with self._cv:
            self._closed = True
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        if thread is None or not thread.is_alive():
            self._abort_all(self._fatal or "the engine was shut down before this request finished")
        if self.tp is not None:
            self.tp.close()
        if self._grammar is not None:
            self._grammar.shutdown()

    def _fail_fatal(self, message: str) -> None:
        """A tensor-parallel rank is lost (called from the thread that watches them): every request running,
        queued or still to come fails with ``message`` and the engine stops."""
        with self._cv:
            if self._fatal is None:
                self._fatal = message
            self._cv.notify_all()

    def _group_failure(self, exc: Exception) -> str:
        """The message a failed tensor-parallel step ends the engine with: a lost worker's, or this one's."""
        lost = self.tp.failure(wait=5.0)  # the watching thread has said which worker, and logged it
        if lost:
            return lost
        message = f"tritonize: a tensor-parallel step failed on rank 0 ({exc}); the engine stops"
        log.error("%s", message)
        return message

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self._incoming) + len(self._compiling)

    # ---------------------------------------------------------------- validation

    def _validate(self, req: GenerationRequest) -> str | None:
        try:
            req.sampling.validate()
        except ValueError as exc:
            return str(exc)
        n = len(req.prompt_ids)
        if n == 0:
            return "the prompt is empty; send at least one token"
        if req.max_new_tokens < 1:
            return f"max_new_tokens must be >= 1, got {req.max_new_tokens}"
        if n + req.max_new_tokens > self.max_seq_len:
            return (
                f"prompt ({n} tokens) + max_new_tokens ({req.max_new_tokens}) = {n + req.max_new_tokens} exceeds "
                f"the engine's max_seq_len ({self.max_seq_len}); shorten the prompt or ask for fewer tokens"
            )
        if not self.scheduler.fits(n + req.max_new_tokens):
            return (f"prompt + max_new_tokens = {n + req.max_new_tokens} tokens do not fit the KV cache of "
                    f"{self.kv_cache_tokens} tokens; ask for fewer tokens or give the cache more memory")
        try:
            self.adapters.lora_index(req.lora_task_id)
            virtual = self.adapters.task(req.task_id)[1] if req.task_id is not None else 0
        except ValueError as exc:
            return str(exc)
        if req.prompt_table is not None:
            problem = self._check_request_table(req)
            if problem:
                return problem
            virtual = len(req.prompt_table)
        bad = [t for t in req.prompt_ids if not 0 <= int(t) < self.vocab_size + virtual]
        if bad:
            task = f" plus task {req.task_id}'s {virtual} virtual tokens" if req.task_id is not None else ""
            task = f" plus the request's {virtual}-row prompt table" if req.prompt_table is not None else task
            return f"prompt holds token ids outside the vocabulary [0, {self.vocab_size}){task}: {bad[:5]}"
        bad = [t for t in req.end_ids if not 0 <= int(t) < self.vocab_size]
        if bad:
            return f"end_ids holds token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}"
        for what, seqs in (("stop_sequences", req.stop_sequences), ("bad_sequences", req.bad_sequences)):
            if any(len(s) == 0 for s in seqs):
                return f"{what} holds an empty sequence"
        if req.guide is not None:
            return self._guide_problem(req.guide)
        return None

    def _guide_problem(self, guide: Any) -> str | None:
        from .grammar import Guide, GuideError, grammar_library_missing, make_guide

        if not isinstance(guide, Guide):
            return f"guide must be a grammar.Guide, not {type(guide).__name__}"
        try:
            make_guide(guide.type, guide.text)
        except GuideError as exc:
            return str(exc)
        if self._grammar_missing is None:
            self._grammar_missing = grammar_library_missing() or ""
        return self._grammar_missing or None

    def _check_request_table(self, req: GenerationRequest) -> str | None:
        rows = self.adapters.max_prompt_embedding_table_size
        shape = tuple(getattr(req.prompt_table, "shape", ()))
        if req.task_id is not None:
            return "send task_id or prompt_embedding_table, not both"
        if not rows:
            return ("this model takes no prompt_embedding_table in a request: regenerate the repository with "
                    "--max-prompt-embedding-table-size N (rows per request), or serve the tables with "
                    "--ptuning-nemo-checkpoint and send task_id")
        if len(shape) != 2 or shape[1] != self.model.args.dim or shape[0] < 1:
            return f"prompt_embedding_table has shape {shape}; send [1, n, {self.model.args.dim}] (n >= 1)"
        if shape[0] > rows:
            return (f"prompt_embedding_table has {shape[0]} rows, more than this model's "
                    f"--max-prompt-embedding-table-size of {rows}: send fewer")
        return None

    # ---------------------------------------------------------------- scheduler thread

    def _run(self) -> None:
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        inflight: InFlight | None = None
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._stopping or self._incoming or self._cancel_ids or inflight is not None
                               or self.scheduler.has_work or self._compiled or self._fatal):
                        self._cv.wait()
                    if self._fatal:
                        break
                    if self._stopping:
                        break
                    cancel_ids, self._cancel_ids = self._cancel_ids, set()
                    incoming = list(self._incoming)
                    self._incoming.clear()
                    self._compiled = False
                try:
                    for req in incoming:
                        self._add(req)
                    self._drop_cancelled(cancel_ids)
                    if self._compiling:
                        self._take_compiled()
                    if inflight is not None and self._needs_sync():
                        self._complete(inflight)
                        inflight = None
                    timing = self.stats["time_s"]
                    t0 = time.perf_counter()
                    plan = self.scheduler.schedule()
                    t1 = time.perf_counter()
                    launched = self._launch(plan) if plan else None
                    timing["schedule"] += t1 - t0
                    timing["launch"] += time.perf_counter() - t1
                    if inflight is not None:
                        self._complete(inflight)
                    if isinstance(launched, Unsampled):  # guided rows: their masks follow what was just applied
                        launched = self._sample_guided(launched)
                    inflight = launched
                    if inflight is None and not plan and self.scheduler.has_work:
                        with self._cv:  # nothing can run until something finishes or arrives
                            self._cv.wait(0.005)
                except Exception as exc:  # a bug in the engine itself: fail what is running, keep serving
                    log.exception("engine step failed")
                    inflight = None
                    if self.tp is not None:  # the ranks may no longer be in step: stop
                        self._fail_fatal(self._group_failure(exc))
                        break
                    for seq in list(self._seqs.values()):
                        self._finish(seq, "error", f"internal engine error: {exc}")
                if self.after_step is not None:
                    self.after_step()
        if self._fatal:
            self._abort_all(self._fatal)
        if self.after_step is not None:
            self.after_step()

    def _add(self, req: GenerationRequest) -> None:
        if _client_gone(req):
            with self._cv:
                self._live.discard(req.request_id)
            self._deliver(req, self._final(req, [], [], 0.0, 0, "cancelled", None))
            return
        extra = b""
        if req.lora_task_id is not None:
            extra += b"lora:%d;" % req.lora_task_id
        if req.task_id is not None:
            extra += b"task:%d;" % req.task_id
        if req.prompt_table is not None:
            table = np.ascontiguousarray(np.asarray(torch.as_tensor(req.prompt_table).float().cpu()))
            extra += b"table:" + hashlib.blake2b(table.tobytes(), digest_size=16).digest()
        seq = Sequence(
            request=req, prompt=[int(t) for t in req.prompt_ids], max_new_tokens=req.max_new_tokens, extra_key=extra,
            end_ids=frozenset(int(e) for e in req.end_ids),
            seed=req.sampling.seed if req.sampling.seed is not None else secrets.randbits(64),
            needs_history=any(len(s) > 1 for s in req.bad_sequences)
            or (req.sampling.min_tokens > 0 and any(len(s) > 1 for s in req.stop_sequences)),
        )
        self._seqs[req.request_id] = seq
        if req.guide is not None:  # it waits for its grammar, compiled off this thread
            seq.grammar = self._grammar_compiler().compile(req.guide)
            self._compiling.append(seq)
            seq.grammar.add_done_callback(self._grammar_ready)
            return
        self.scheduler.add(seq)

    # ---------------------------------------------------------------- structured output
    def _grammar_compiler(self) -> Any:
        if self._grammar is None:
            from .grammar import GrammarCompiler

            self._grammar = GrammarCompiler(self.model_dir, self.vocab_size, self.default_end_ids)
        return self._grammar

    def _grammar_ready(self, _future: Any) -> None:
        with self._cv:
            self._compiled = True
            self._cv.notify()

    def _take_compiled(self) -> None:
        """Guided sequences whose grammar is compiled join the scheduler's queue; a guide that does not
        compile finishes its request with the compiler's one-line reason."""
        from .grammar import GuideState

        waiting = []
        for seq in self._compiling:
            if seq.status is Status.FINISHED:
                continue
            if not seq.grammar.done():
                waiting.append(seq)
                continue
            try:
                seq.guide = GuideState(self._grammar.xgrammar, seq.grammar.result(), seq.end_ids, self.vocab_size,
                                       self._grammar.stop_ids)
            except Exception as exc:  # GuideError: the client's one line; anything else: the library's
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                self._finish(seq, "error", reason if isinstance(exc, ValueError) else f"guided decoding failed: {reason}")
                continue
            seq.grammar = None
            self.scheduler.add(seq)
        self._compiling = waiting

    def _guide_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._bitmask is None:
            from .grammar import bitmask_words

            words = bitmask_words(self.vocab_size)
            self._bitmask = torch.full((self.max_batch_size, words), -1, dtype=torch.int32)
            self._scratch = torch.full((1, words), -1, dtype=torch.int32)
        return self._bitmask, self._scratch

    def _sample_guided(self, step: Unsampled) -> InFlight | None:
        """Choose the tokens of a step that holds guided rows, each masked by what its grammar allows after
        the tokens applied so far."""
        t0 = time.perf_counter()
        try:
            bitmask, _ = self._guide_masks()
            guided: list[int] = []
            row = 0
            for chunk in step.plan.chunks:
                if not chunk.samples:
                    continue
                guide = chunk.seq.guide
                if guide is not None and chunk.seq.status is Status.RUNNING and guide.advance(chunk.seq.output):
                    guide.fill(bitmask, len(guided))
                    guided.append(row)
                row += 1
            kernel = self._grammar.cpu_kernel if self.device.type == "cpu" else None
            inflight = self.runner.sample(step, TokenMask(guided, bitmask, kernel) if guided else None)
        except Exception as exc:  # a bug: fail this step's requests, keep serving
            log.exception("guided step failed")
            for chunk in step.plan.chunks:
                self._finish(chunk.seq, "error", f"step failed: {exc}")
            return None
        self.stats["time_s"]["guide"] += time.perf_counter() - t0
        return inflight

    def _guide_stop(self, seq: Sequence) -> str | None:
        """After a guided sequence's new token: "stop" when its grammar is complete and allows nothing but an
        end id; "error" (the request is finished here) when the token is not one the grammar allows."""
        if not seq.guide.advance(seq.output):
            self._finish(seq, "error", "the guide allows no token here that the request's other limits (bad_words, "
                                       "min_tokens) allow: remove the conflicting limit")
            return "error"
        return "stop" if seq.guide.finished(self._guide_masks()[1]) else None

    def _needs_sync(self) -> bool:
        """Rows whose next choice depends on tokens the host has not read yet (see Sampler.needs_history)."""
        return any(seq.needs_history for seq in self.scheduler.running)

    def _drop_cancelled(self, cancel_ids: set[str]) -> None:
        now = time.monotonic()
        for seq in list(self._seqs.values()):
            if seq.request_id in cancel_ids:
                self._finish(seq, "cancelled")
            elif seq.request.is_cancelled is not None and now - seq.polled_at >= self.cancel_poll_interval_s:
                seq.polled_at = now
                if _client_gone(seq.request):
                    self._finish(seq, "cancelled")

    def _setup_slot(self, seq: Sequence) -> None:
        """A sequence got a batch slot: its adapter, penalty counts and prompt-table rows."""
        req = seq.request
        seq.virtual_offset = 0
        if req.task_id is not None:
            seq.virtual_offset = self.adapters.task(req.task_id)[0]
        elif req.prompt_table is not None:
            seq.virtual_offset = self.adapters.request_base + seq.slot * self.adapters.max_prompt_embedding_table_size
            table = torch.as_tensor(req.prompt_table).to(self.adapters.prompt_table)
            start = seq.virtual_offset
            self.adapters.prompt_table[start : start + len(table)] = table
            if self.tp is not None:  # every rank embeds the prompt: each needs the rows
                try:
                    self.tp.write_prompt_table(start, table)
                except Exception as exc:
                    self._fail_fatal(self._group_failure(exc))
                    raise
        if self.slot_adapter is not None:
            self.slot_adapter[seq.slot] = self.adapters.lora_index(req.lora_task_id)
        real = [t for t in seq.known_tokens() if t < self.vocab_size]
        self.sampler.start(seq.slot, real, req.sampling)

    def _launch(self, plan: StepPlan) -> InFlight | Unsampled | None:
        for seq in plan.admitted:
            try:
                self._setup_slot(seq)
            except Exception as exc:
                if self._fatal:  # the tensor-parallel group is lost: the engine stops
                    return None
                log.exception("admitting request %s failed", seq.request_id)
                self._finish(seq, "error", f"could not admit the request: {exc}")
        plan.chunks = [c for c in plan.chunks if c.seq.status is Status.RUNNING]
        if not plan.chunks:
            return None
        rows = []
        guided = False
        for chunk in plan.chunks:
            if not chunk.samples:
                self.stats["prefill_chunks"].append(chunk.num_tokens)
                self.stats["prefill_tokens"] += chunk.num_tokens
                continue
            seq = chunk.seq
            if chunk.num_tokens > 1:
                self.stats["prefill_chunks"].append(chunk.num_tokens)
                self.stats["prefill_tokens"] += chunk.num_tokens
            req = seq.request
            guided = guided or seq.guide is not None
            rows.append(SamplingRow(
                params=req.sampling, seed=seq.seed, slot=seq.slot, step=seq.num_generated - 1,
                history=seq.known_tokens() if seq.needs_history else (),
                end_ids=tuple(seq.end_ids), stop_sequences=req.stop_sequences, bad_sequences=req.bad_sequences,
                want_log_probs=req.return_log_probs,
            ))
        if plan.decode_only:
            n = len(plan.chunks)
            self.stats["decode_steps"] += 1
            self.stats["decode_batch_sizes"].append(n)
            histogram = self.stats["decode_batch_histogram"]
            histogram[n] = histogram.get(n, 0) + 1
        else:
            self.stats["mixed_steps"] += 1
        try:
            return self.runner.launch(plan, rows, _virtual_offset, self.slot_adapter, sample=not guided)
        except Exception as exc:
            if self.tp is not None and self.runner.out_of_step:  # a worker is gone, or may have been left behind
                self._fail_fatal(self._group_failure(exc))
                return None
            log.exception("step failed")
            for chunk in plan.chunks:
                self._finish(chunk.seq, "error", f"step failed: {exc}")
            return None

    def _complete(self, inflight: InFlight) -> None:
        """Read a step's tokens, apply them, and answer the sequences they ended or advanced."""
        t0 = time.perf_counter()
        try:
            tokens, log_probs = inflight.result()
        except Exception as exc:
            log.exception("step failed")
            for chunk in inflight.plan.chunks:
                self._finish(chunk.seq, "error", f"step failed: {exc}")
            return
        t1 = time.perf_counter()
        self.stats["time_s"]["wait"] += t1 - t0
        self._apply(inflight, tokens, log_probs)
        self.stats["time_s"]["apply"] += time.perf_counter() - t1

    def _apply(self, inflight: InFlight, tokens: list[int], log_probs: list[float] | None) -> None:
        self.scheduler.update_from_output(inflight.plan, tokens, log_probs)
        self.stats["generated_tokens"] += len(tokens)
        for chunk in inflight.plan.chunks:
            seq = chunk.seq
            if not chunk.samples or seq.status is Status.FINISHED:
                continue
            reason = check_stop(seq, seq.end_ids, seq.request.stop_sequences)
            if seq.guide is not None and reason != "end":
                reason = self._guide_stop(seq) or reason
                if reason == "error":
                    continue
            if reason == "end":  # the end id is not part of the output
                seq.output.pop()
                if seq.request.return_log_probs and seq.log_probs:
                    seq.log_probs.pop()
            if reason is not None:
                self._finish(seq, reason)
            elif seq.request.stream:
                self._emit(seq, finished=False)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if self._seqs.pop(seq.request_id, None) is None:
            return
        self.scheduler.finish(seq, reason)
        with self._cv:
            self._live.discard(seq.request_id)
        finished = self.stats["finished"]
        finished[reason] = finished.get(reason, 0) + 1
        self._emit(seq, finished=True, reason=reason, error=error)

    def _emit(self, seq: Sequence, finished: bool, reason: str | None = None, error: str | None = None) -> None:
        req = seq.request
        if not req.stream and not finished:
            return
        new = seq.output[seq.delivered :]
        new_log_probs = seq.log_probs[seq.delivered :] if req.return_log_probs else []
        seq.delivered = len(seq.output)
        out = StepOutput(
            token_ids=list(new),
            log_probs=list(new_log_probs),
            cum_log_prob=float(sum(seq.log_probs)) if req.return_log_probs else 0.0,
            finished=finished,
            finish_reason=reason,
            error=error,
            num_input_tokens=len(seq.prompt),
            num_output_tokens=len(seq.output),
            metrics=_metrics(seq) if finished or req.return_perf_metrics else None,
        )
        if not self._deliver(req, out) and not finished:
            # The receiver is gone (e.g. the client disconnected): stop spending compute on it.
            self._finish(seq, "cancelled")

    @staticmethod
    def _final(req, tokens, log_probs, cum, num_out, reason, error) -> StepOutput:
        return StepOutput(tokens, log_probs, cum, True, reason, error, len(req.prompt_ids), num_out)

    @staticmethod
    def _deliver(req: GenerationRequest, out: StepOutput) -> bool:
        try:
            req.on_output(out)
            return True
        except Exception:
            log.exception("on_output of request %s raised; dropping the request", req.request_id)
            return False

    def _abort_all(self, message: str) -> None:
        with self._cv:
            queued = list(self._incoming)
            self._incoming.clear()
        for req in queued:
            self._deliver(req, self._final(req, [], [], 0.0, 0, "error", message))
        for seq in list(self._seqs.values()):
            self._finish(seq, "error", message)
        with self._cv:
            self._live.clear()


class _CaptureLog:
    """Logs the CUDA-graph captures at start: the first, one every ``interval_s``, and the last."""

    interval_s = 1.0

    def __init__(self) -> None:
        self.start = self.last = time.monotonic()

    def __call__(self, k: int, total: int) -> None:
        now = time.monotonic()
        if k == 1 or now - self.last >= self.interval_s:
            self.last = now
            log.info("CUDA graphs: capturing graph %d of %d", k, total)
        if k == total:
            log.info("CUDA graphs: captured %d in %.1f s", total, now - self.start)


def _wall_ns(monotonic: float | None) -> int:
    """A time.monotonic() reading as time.time_ns()."""
    if monotonic is None:
        return 0
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)


def _metrics(seq: Sequence) -> RequestMetrics:
    return RequestMetrics(
        arrival_time_ns=_wall_ns(seq.arrival), first_scheduled_time_ns=_wall_ns(seq.first_scheduled),
        first_token_time_ns=_wall_ns(seq.first_token), last_token_time_ns=_wall_ns(seq.last_token),
        prefix_hit_tokens=seq.prefix_hit_tokens,
        kv_cache_alloc_new_blocks=seq.blocks_allocated, kv_cache_reused_blocks=seq.blocks_reused,
        kv_cache_alloc_total_blocks=seq.blocks_allocated + seq.blocks_reused, preemptions=seq.preemptions,
    )


def _virtual_offset(seq: Sequence) -> int:
    return seq.virtual_offset


def _client_gone(req: GenerationRequest) -> bool:
    if req.is_cancelled is None:
        return False
    try:
        return bool(req.is_cancelled())
    except Exception:
        log.exception("is_cancelled of request %s raised; dropping the request", req.request_id)
        return True
