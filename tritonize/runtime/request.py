"""The contract between a runtime and whatever drives it: requests in, step outputs out.

The Triton engine model and the Python API drive every runtime (the torch ``Engine``, ``TrtllmEngine``,
``TrtllmExecutorEngine``) through ``GenerationEngine``: ``start``, ``submit``, ``cancel``, ``shutdown``.
A request carries its callback; an engine answers every request through it, a rejection included,
and the last call has ``finished`` set. Wire semantics follow TensorRT-LLM, so the tensorrtllm_backend
interface keeps its meaning whatever runs underneath: end ids end a request and are not in the output,
stop sequences end it and stay in the output (``stop_length`` is the one matcher of them).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import EngineError
from .sampling import SamplingParams

__all__ = [
    "EngineError",
    "GenerationEngine",
    "GenerationRequest",
    "RequestMetrics",
    "SamplingParams",
    "StepOutput",
    "no_output",
    "stop_length",
    "submit_and_wait",
]


@dataclass
class StepOutput:
    """What one ``on_output`` call carries: the tokens new since the previous call for this request."""

    token_ids: list[int]
    log_probs: list[float]
    cum_log_prob: float
    finished: bool
    finish_reason: str | None = None  # "length" | "end" | "stop" | "cancelled" | "error"
    error: str | None = None
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    # On the final output (on every output with ``return_perf_metrics``): how the request went so far, for
    # metrics and tensorrtllm_backend's perf outputs. None from runtimes that do not measure it.
    metrics: RequestMetrics | None = None


@dataclass(frozen=True)
class RequestMetrics:
    """Times are time.time_ns() (wall clock, as TensorRT-LLM reports them); 0 where it never happened."""

    arrival_time_ns: int = 0
    first_scheduled_time_ns: int = 0
    first_token_time_ns: int = 0
    last_token_time_ns: int = 0
    prefix_hit_tokens: int = 0  # prompt tokens whose keys and values were reused from the prefix cache
    kv_cache_alloc_new_blocks: int = 0
    kv_cache_reused_blocks: int = 0
    kv_cache_alloc_total_blocks: int = 0
    preemptions: int = 0


def no_output(_: StepOutput) -> None:
    """The placeholder callback of a request built without one; engines refuse such a request."""
    raise ValueError("GenerationRequest.on_output is required")


@dataclass
class GenerationRequest:
    """One generation, with TensorRT-LLM's conventions so the wire interface keeps its meaning.

    ``end_ids``: any of them ends the request and is not part of the output (nor of the log-probs).
    ``stop_sequences``: generation stops once the sequence so far (prompt included) ends with one; the
    stop sequence stays in the output. ``bad_sequences``: see ``sampling.banned_tokens``.
    ``stream``: one ``on_output`` call per step with that step's token, the last with ``finished`` (it may
    carry no token when an end id finished the request); otherwise exactly one call, at the end.
    ``is_cancelled``: polled between steps (e.g. Triton's ``response_sender.is_cancelled``); True, or an
    exception, drops the request as if ``cancel`` had been called.
    ``lora_task_id``: the served LoRA adapter to use (None: the base model). ``task_id``: the p-tuning
    task whose table the prompt's virtual tokens (``prompt.virtual_tokens``) select; ``prompt_table``: a
    ``[n, hidden]`` table of this request's own instead (tensorrtllm_backend's prompt_embedding_table);
    see adapters.py.
    ``guide``: structured output (``grammar.Guide``: a JSON schema, regex, EBNF grammar, ...): every token
    is one the guide allows, and the request ends ("stop") once the guide is complete and allows nothing
    more; end ids are allowed exactly where the guide may end.
    """

    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    end_ids: list[int] = field(default_factory=list)
    stop_sequences: list[list[int]] = field(default_factory=list)
    bad_sequences: list[list[int]] = field(default_factory=list)
    return_log_probs: bool = False
    stream: bool = False
    on_output: Callable[[StepOutput], None] = no_output
    is_cancelled: Callable[[], bool] | None = None
    lora_task_id: int | None = None
    task_id: int | None = None
    prompt_table: Any = None  # torch.Tensor or numpy array [n, hidden]
    guide: Any = None  # grammar.Guide
    return_perf_metrics: bool = False  # metrics on every output, not only the final one


def stop_length(history: Sequence[int], stops: Sequence[Sequence[int]]) -> int:
    """Length of the stop sequence ``history`` ends with; 0 when it ends with none."""
    for stop in stops:
        n = len(stop)
        if 0 < n <= len(history) and list(history[-n:]) == list(stop):
            return n
    return 0


class GenerationEngine(Protocol):
    """What every runtime's engine is, and what it gets for being one (subclass it explicitly).

    ``submit`` returns at once; every outcome arrives through the request's ``on_output``. ``cancel``
    answers the request with reason "cancelled" and frees what it held (False when the id is unknown).
    ``shutdown`` stops the engine; requests still in flight finish with an error.
    """

    default_end_ids: list[int]  # the checkpoint's end ids, for requests that name none
    stats: dict[str, Any]  # counters the engine model mirrors into Triton's metrics

    def start(self) -> GenerationEngine: ...

    def submit(self, req: GenerationRequest) -> None: ...

    def cancel(self, request_id: str) -> bool: ...

    def shutdown(self, timeout: float | None = 30.0) -> None: ...

    def __enter__(self) -> GenerationEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        end_ids: Sequence[int] | None = None,
        stop_sequences: Sequence[Sequence[int]] = (),
        bad_sequences: Sequence[Sequence[int]] = (),
        timeout: float | None = None,
    ) -> list[list[int]]:
        """Run prompts concurrently and wait: the generated ids of each (end id excluded).

        ``end_ids`` None means the checkpoint's own (generation_config.json). Raises EngineError if a
        request finished with an error.
        """
        requests = [
            GenerationRequest(
                request_id=f"generate-{secrets.token_hex(8)}-{i}",
                prompt_ids=list(prompt),
                max_new_tokens=max_new_tokens,
                sampling=sampling or SamplingParams(),
                end_ids=list(self.default_end_ids if end_ids is None else end_ids),
                stop_sequences=[list(s) for s in stop_sequences],
                bad_sequences=[list(s) for s in bad_sequences],
            )
            for i, prompt in enumerate(prompts)
        ]
        results = []
        for out in submit_and_wait(self, requests, timeout):
            if out.finish_reason == "error":
                raise EngineError(out.error or "generation failed")
            results.append(list(out.token_ids))
        return results


def submit_and_wait(engine: GenerationEngine, requests: Sequence[GenerationRequest],
                    timeout: float | None = None) -> list[StepOutput]:
    """Submits every request at once (one running batch) and returns each one's final output.

    Each request's ``on_output`` is replaced by a collector. On timeout every request is cancelled and
    TimeoutError raised.
    """
    engine.start()
    outputs: list[StepOutput | None] = [None] * len(requests)
    done = [threading.Event() for _ in requests]

    def collector(i: int) -> Callable[[StepOutput], None]:
        def on_output(out: StepOutput) -> None:
            if out.finished:
                outputs[i] = out
                done[i].set()

        return on_output

    for i, req in enumerate(requests):
        req.on_output = collector(i)
        engine.submit(req)
    for event in done:
        if not event.wait(timeout):
            for req in requests:
                engine.cancel(req.request_id)
            raise TimeoutError(f"generate did not finish within {timeout} s")
    return [out for out in outputs if out is not None]
