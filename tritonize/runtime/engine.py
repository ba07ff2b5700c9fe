"""In-flight batching over a static KV cache: the engine the Triton engine model drives.

One scheduler thread owns the model. Each iteration it

1. drops cancelled requests (their slot is free for the next admission at once),
2. admits queued requests into free slots (``max_batch_size`` slots of ``max_seq_len`` positions,
   allocated once by ``model.setup_caches``: KV memory never grows, extra requests wait in the queue),
3. runs one batched decode step (T=1) for every row whose prompt is fully in the cache,
4. spends what is left of ``max_num_tokens`` on prompt chunks of newcomers, so a long prompt is spread
   over several iterations instead of stalling the running streams,
5. delivers outputs; finished rows leave the batch in the same iteration.

An exception inside a step finishes the requests it touched with reason "error" and the thread goes on.
Callbacks (``on_output``) run on the scheduler thread and must be quick; one that raises is treated as a
client that went away, and its request is dropped.

The batched forward is the module-level ``_decode_step``: the seam for a faster GPU path. On CUDA it is
replayed from CUDA graphs captured per batch bucket (see ``cuda_graphs.py``); on CPU it runs eagerly.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .request import GenerationEngine, GenerationRequest, StepOutput, no_output, stop_length
from .sampling import Sampler, SamplingRow

__all__ = ["Engine", "resolve_device", "resolve_dtype"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_STATS_HISTORY = 100_000


@dataclass(eq=False)
class _Running:
    """A request that holds a cache slot: its prompt is (partly) in the cache, or it is decoding."""

    req: GenerationRequest
    slot: int
    seed: int
    history: list[int]  # prompt + generated; history[-1] is not in the cache yet while decoding
    prompt_len: int
    end_ids: frozenset[int]
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    cum_log_prob: float = 0.0
    delivered: int = 0
    polled_at: float = 0.0

    @property
    def decoding(self) -> bool:
        return self.prefilled == self.prompt_len

    def sampling_row(self) -> SamplingRow:
        return SamplingRow(
            params=self.req.sampling,
            seed=self.seed,
            slot=self.slot,
            step=len(self.generated),
            history=self.history,
            end_ids=tuple(self.end_ids),
            stop_sequences=self.req.stop_sequences,
            bad_sequences=self.req.bad_sequences,
            want_log_probs=self.req.return_log_probs,
        )


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


def _decode_step(model: torch.nn.Module, tokens: torch.Tensor, input_pos: torch.Tensor, slots: torch.Tensor):
    """One batched decode forward: tokens/input_pos [B, 1], slots [B] -> logits [B, vocab].

    Kept free of Python-side state so that it can be captured in a CUDA graph or compiled as it is.
    """
    return model(tokens, input_pos, slots, last_only=True)[:, -1, :]


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
        compile: bool | None = None,
        adapters_dir: str | Path | None = None,
        max_prompt_embedding_table_size: int = 0,
    ) -> None:
        if max_batch_size < 1 or max_seq_len < 2:
            raise ValueError(f"need max_batch_size >= 1 and max_seq_len >= 2, got {max_batch_size}, {max_seq_len}")
        if max_num_tokens is None:
            max_num_tokens = max(512, 2 * max_batch_size)
        if max_num_tokens <= max_batch_size:
            raise ValueError(
                f"max_num_tokens ({max_num_tokens}) must exceed max_batch_size ({max_batch_size}): each decode "
                "row uses one token of the per-step budget and prompts need the rest"
            )
        from .adapters import load_adapters
        from .weights import load_model

        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.max_num_tokens = max_num_tokens
        self.default_end_ids = default_end_ids(self.model_dir)

        self.model = load_model(self.model_dir, device=self.device, dtype=self.dtype)
        self.vocab_size = self._vocab_size()
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if use_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs device cuda")
        # CUDA graphs pad a batch up to its bucket; the padding rows write into one spare slot.
        num_slots = max_batch_size + (1 if use_graphs else 0)
        with torch.no_grad():
            self.model.setup_caches(max_batch_size=num_slots, max_seq_len=max_seq_len)
            # Before the step is compiled or captured: the LoRA layers are part of it.
            self.adapters = load_adapters(adapters_dir, self.model.args)
            self.adapters.install(self.model, num_slots, max_prompt_embedding_table_size=max_prompt_embedding_table_size)
        self._decode: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
        # torch.compile fuses the step's many small kernels (norms, rotary, activations); the CUDA graph
        # then removes the launches. Batch size 1 compiles on its own (size-1 specialisation), the other
        # buckets share one dynamic-shape compile.
        # With LoRA adapters the step graph is several times larger and Inductor's fusion pass did not finish
        # compiling an 8B model's step in 8 minutes (bench/RESULTS.md): such engines replay CUDA graphs of
        # the eager step instead.
        if compile is None:
            compile = self.device.type == "cuda" and not self.adapters.lora
        use_compile = compile
        step = torch.compile(_decode_step, dynamic=True) if use_compile else _decode_step
        self.compiled = use_compile
        self._decode = lambda tokens, pos, slots: step(self.model, tokens, pos, slots)
        if use_graphs:
            from .cuda_graphs import CudaGraphDecoder

            self._decode = CudaGraphDecoder(self.model, step, max_batch_size, pad_slot=max_batch_size)
        self.sampler = Sampler(self.vocab_size, num_slots, self.device)

        self._cv = threading.Condition()
        self._queue: deque[GenerationRequest] = deque()
        self._live: set[str] = set()
        self._cancel_ids: set[str] = set()
        self._stopping = False
        self._closed = False
        self._thread: threading.Thread | None = None
        # Touched by the scheduler thread only.
        self._running: dict[str, _Running] = {}
        self._free_slots: list[int] = list(range(max_batch_size - 1, -1, -1))
        self.stats: dict[str, Any] = {
            "decode_batch_sizes": deque(maxlen=_STATS_HISTORY),
            "decode_batch_histogram": {},
            "prefill_chunks": deque(maxlen=_STATS_HISTORY),
            "decode_steps": 0,
            "prefill_tokens": 0,
            "generated_tokens": 0,
            "finished": {},
        }

    def _vocab_size(self) -> int:
        args = getattr(self.model, "args", None) or getattr(self.model, "config", None)
        size = getattr(args, "vocab_size", None) or _read_json(self.model_dir / "config.json").get("vocab_size")
        if not size:
            raise ValueError(f"cannot tell the vocabulary size of {self.model_dir}: no vocab_size in config.json")
        return int(size)

    # ---------------------------------------------------------------- public API

    def start(self) -> Engine:
        capture_all = getattr(self._decode, "capture_all", None)
        if capture_all is not None and self._thread is None:
            with torch.inference_mode():
                capture_all()  # compile and capture before serving, not on the first requests
        with self._cv:
            if self._closed:
                raise RuntimeError("this engine was shut down; create a new one")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tritonize-engine", daemon=True)
                self._thread.start()
        return self

    def submit(self, req: GenerationRequest) -> None:
        """Queue a request; every outcome, a rejection included, arrives through ``req.on_output``."""
        if req.on_output is no_output or not callable(req.on_output):
            raise ValueError("GenerationRequest.on_output must be a callable")
        problem = self._validate(req)
        if problem is None:
            with self._cv:
                if self._closed:
                    problem = "the engine was shut down; no new requests are accepted"
                elif req.request_id in self._live:
                    problem = f"request id {req.request_id!r} is already in flight; use a unique id"
                else:
                    self._live.add(req.request_id)
                    self._queue.append(req)
                    self._cv.notify()
                    return
        self._deliver(req, self._final(req, [], [], 0.0, 0, "error", problem))

    def cancel(self, request_id: str) -> bool:
        """Stop a request: queued ones leave at once, running ones before the next step. False if unknown."""
        with self._cv:
            for req in self._queue:
                if req.request_id == request_id:
                    self._queue.remove(req)
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
            self._abort_all("the engine was shut down before this request finished")

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
        return None

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
            torch.cuda.set_device(self.device)  # graph capture uses the thread's current device
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._stopping or self._queue or self._running or self._cancel_ids):
                        self._cv.wait()
                    if self._stopping:
                        break
                    cancel_ids, self._cancel_ids = self._cancel_ids, set()
                    admitted = [self._queue.popleft() for _ in range(min(len(self._free_slots), len(self._queue)))]
                try:
                    self._drop_cancelled(cancel_ids)
                    for req in admitted:
                        self._admit(req)
                    if self._running:
                        self._step()
                except Exception as exc:  # a bug in the scheduler itself: fail what is running, keep serving
                    log.exception("engine step failed")
                    for run in list(self._running.values()):
                        self._finish(run, "error", f"internal engine error: {exc}")

    def _drop_cancelled(self, cancel_ids: set[str]) -> None:
        now = time.monotonic()
        for run in list(self._running.values()):
            if run.req.request_id in cancel_ids:
                self._finish(run, "cancelled")
            elif run.req.is_cancelled is not None and now - run.polled_at >= self.cancel_poll_interval_s:
                run.polled_at = now
                if _client_gone(run.req):
                    self._finish(run, "cancelled")

    def _admit(self, req: GenerationRequest) -> None:
        if _client_gone(req):
            with self._cv:
                self._live.discard(req.request_id)
            self._deliver(req, self._final(req, [], [], 0.0, 0, "cancelled", None))
            return
        slot = self._free_slots.pop()
        seed = req.sampling.seed if req.sampling.seed is not None else secrets.randbits(64)
        history = [int(t) for t in req.prompt_ids]
        offset = None
        if req.task_id is not None:  # the task's virtual ids -> rows of the concatenated table
            offset = self.adapters.task(req.task_id)[0]
        elif req.prompt_table is not None:  # the request's own table -> its slot's rows
            offset = self.adapters.request_base + slot * self.adapters.max_prompt_embedding_table_size
            table = torch.as_tensor(req.prompt_table)
            self.model.prompt_table[offset : offset + len(table)] = table.to(self.model.prompt_table)
        if offset is not None:
            history = [t + offset if t >= self.vocab_size else t for t in history]
        if self.model.slot_adapter is not None:
            self.model.slot_adapter[slot] = self.adapters.lora_index(req.lora_task_id)
        run = _Running(
            req=req,
            slot=slot,
            seed=seed,
            history=history,
            prompt_len=len(req.prompt_ids),
            end_ids=frozenset(int(e) for e in req.end_ids),
        )
        self._running[req.request_id] = run
        try:
            self.sampler.start(slot, [t for t in run.history if t < self.vocab_size], req.sampling)
        except Exception as exc:
            log.exception("admitting request %s failed", req.request_id)
            self._finish(run, "error", f"could not admit the request: {exc}")

    def _step(self) -> None:
        decoding = [run for run in self._running.values() if run.decoding]
        if decoding:
            self._decode_rows(decoding)
        budget = self.max_num_tokens - len(decoding)
        for run in [run for run in self._running.values() if not run.decoding]:
            if budget <= 0:
                break
            chunk = min(run.prompt_len - run.prefilled, budget)
            budget -= chunk
            self._prefill_chunk(run, chunk)

    def _decode_rows(self, rows: list[_Running]) -> None:
        self.stats["decode_steps"] += 1
        self.stats["decode_batch_sizes"].append(len(rows))
        histogram = self.stats["decode_batch_histogram"]
        histogram[len(rows)] = histogram.get(len(rows), 0) + 1
        try:
            tokens = torch.tensor([[run.history[-1]] for run in rows], dtype=torch.int64, device=self.device)
            pos = torch.tensor([[len(run.history) - 1] for run in rows], dtype=torch.int64, device=self.device)
            slots = torch.tensor([run.slot for run in rows], dtype=torch.int64, device=self.device)
            logits = self._decode(tokens, pos, slots)
            result = self.sampler.sample(logits, [run.sampling_row() for run in rows])
        except Exception as exc:
            log.exception("decode step failed")
            for run in rows:
                self._finish(run, "error", f"decode step failed: {exc}")
            return
        for b, run in enumerate(rows):
            self._advance(run, result.tokens[b], result.log_probs[b] if result.log_probs else None)

    def _prefill_chunk(self, run: _Running, chunk: int) -> None:
        start = run.prefilled
        self.stats["prefill_chunks"].append(chunk)
        self.stats["prefill_tokens"] += chunk
        try:
            tokens = torch.tensor([run.history[start : start + chunk]], dtype=torch.int64, device=self.device)
            pos = torch.arange(start, start + chunk, dtype=torch.int64, device=self.device)[None, :]
            slots = torch.tensor([run.slot], dtype=torch.int64, device=self.device)
            logits = self.model(tokens, pos, slots, last_only=True)[:, -1, :]
            run.prefilled = start + chunk
            if not run.decoding:
                return
            result = self.sampler.sample(logits, [run.sampling_row()])
        except Exception as exc:
            log.exception("prefill of request %s failed", run.req.request_id)
            self._finish(run, "error", f"prefill failed: {exc}")
            return
        self._advance(run, result.tokens[0], result.log_probs[0] if result.log_probs else None)

    def _advance(self, run: _Running, token: int, log_prob: float | None) -> None:
        """Append a sampled token and decide whether the request is done (TensorRT-LLM's rules: the end
        id is dropped from the output, a stop sequence is kept)."""
        self.stats["generated_tokens"] += 1
        if token in run.end_ids:
            self._finish(run, "end")
            return
        run.generated.append(token)
        run.history.append(token)
        if log_prob is not None:
            run.log_probs.append(log_prob)
            run.cum_log_prob += log_prob
        if stop_length(run.history, run.req.stop_sequences):
            self._finish(run, "stop")
        elif len(run.generated) >= run.req.max_new_tokens:
            self._finish(run, "length")
        elif run.req.stream:
            self._emit(run, finished=False)

    def _finish(self, run: _Running, reason: str, error: str | None = None) -> None:
        if self._running.pop(run.req.request_id, None) is None:
            return
        self._free_slots.append(run.slot)
        with self._cv:
            self._live.discard(run.req.request_id)
        finished = self.stats["finished"]
        finished[reason] = finished.get(reason, 0) + 1
        self._emit(run, finished=True, reason=reason, error=error)

    def _emit(self, run: _Running, finished: bool, reason: str | None = None, error: str | None = None) -> None:
        if not run.req.stream and not finished:
            return
        new = run.generated[run.delivered :]
        new_log_probs = run.log_probs[run.delivered :] if run.req.return_log_probs else []
        run.delivered = len(run.generated)
        out = StepOutput(
            token_ids=list(new),
            log_probs=list(new_log_probs),
            cum_log_prob=run.cum_log_prob,
            finished=finished,
            finish_reason=reason,
            error=error,
            num_input_tokens=run.prompt_len,
            num_output_tokens=len(run.generated),
        )
        if not self._deliver(run.req, out) and not finished:
            # The receiver is gone (e.g. the client disconnected): stop spending compute on it.
            self._finish(run, "cancelled")

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
            queued = list(self._queue)
            self._queue.clear()
        for req in queued:
            self._deliver(req, self._final(req, [], [], 0.0, 0, "error", message))
        for run in list(self._running.values()):
            self._finish(run, "error", message)
        with self._cv:
            self._live.clear()


def _client_gone(req: GenerationRequest) -> bool:
    if req.is_cancelled is None:
        return False
    try:
        return bool(req.is_cancelled())
    except Exception:
        log.exception("is_cancelled of request %s raised; dropping the request", req.request_id)
        return True
