"""A genai-perf-shaped load over gRPC streaming, and the LLM statistics it reports.

perf_analyzer and genai-perf are the tools of record for Triton fleets; this generator exists for
machines where neither runs (their wheels need a newer glibc than some hosts have). Each virtual
user sends one streaming request at a time, as perf_analyzer's concurrency mode does, and every
response's arrival time is recorded, so time to first token and inter-token latency are measured
the way genai-perf measures them.

A stream is left to end by itself after its final response (the request side is closed once the
request is sent, so the server ends the call): leaving the ``async for`` early cancels the call, and
Triton 2.51 then keeps the ensemble referenced for good, which holds up its shutdown by
``--exit-timeout-secs``.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestRecord:
    start: float
    response_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None
    # with perf (timed_request): wall-clock ns of the send, of the engine's arrival, first step and first token (the
    # engine's perf outputs), and of the first response's receipt: what the hops take on the way in and on the way out
    perf: dict[str, int] | None = None

    @property
    def ttft(self) -> float | None:
        return self.response_times[0] - self.start if self.response_times else None

    @property
    def itl(self) -> float | None:
        """genai-perf's inter-token latency: (last response - first response) / (tokens - 1), which
        stays right when one response carries several tokens."""
        t = self.response_times
        if len(t) < 2 or self.output_tokens < 2:
            return None
        return (t[-1] - t[0]) / (self.output_tokens - 1)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values), q))


@dataclass
class LoadResult:
    concurrency: int
    duration: float
    records: list[RequestRecord]

    def summary(self) -> dict[str, float | int | None]:
        ok = [r for r in self.records if r.error is None]
        ttft = [r.ttft for r in ok if r.ttft is not None]
        itl = [r.itl for r in ok if r.itl is not None]
        tokens = sum(r.output_tokens for r in ok)
        out: dict[str, float | int | None] = {
            "concurrency": self.concurrency,
            "requests": len(ok),
            "errors": len(self.records) - len(ok),
            "duration_s": self.duration,
            "output_tokens_per_s": tokens / self.duration if self.duration else None,
            "requests_per_s": len(ok) / self.duration if self.duration else None,
        }
        for name, values in (("ttft_ms", ttft), ("itl_ms", itl)):
            for q in (50, 90, 99):
                p = percentile(values, q)
                out[f"{name}_p{q}"] = None if p is None else p * 1000
            out[f"{name}_mean"] = statistics.fmean(values) * 1000 if values else None
        return out


def _inputs(prompt: str, output_len: int, grpcclient, perf: bool = False):  # noqa: ANN001 - module passed in lazily
    def make(name, array, dtype):
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    inputs = [
        make("text_input", np.array([[prompt.encode()]], dtype=np.object_), "BYTES"),
        make("max_tokens", np.array([[output_len]], dtype=np.int32), "INT32"),
        make("min_tokens", np.array([[output_len]], dtype=np.int32), "INT32"),
        make("stream", np.array([[True]], dtype=np.bool_), "BOOL"),
        make("exclude_input_in_output", np.array([[True]], dtype=np.bool_), "BOOL"),
    ]
    if perf:
        inputs.append(make("return_perf_metrics", np.array([[True]], dtype=np.bool_), "BOOL"))
    return inputs


async def timed_request(client, model: str, prompt: str, output_len: int,  # noqa: ANN001 - aio client
                        perf: bool = False) -> RequestRecord:
    """One streaming request over an open ``tritonclient.grpc.aio`` client, every response's arrival recorded;
    with ``perf``, the engine's arrival, first-step and first-token times beside the client's (``RequestRecord.perf``)."""
    import tritonclient.grpc as grpcclient

    record = RequestRecord(start=time.perf_counter())
    sent_ns = time.time_ns()

    async def one_request():
        yield {"model_name": model, "inputs": _inputs(prompt, output_len, grpcclient, perf),
               "request_id": uuid.uuid4().hex, "enable_empty_final_response": True}

    try:
        async for result, error in client.stream_infer(one_request()):  # ends after the final response
            if error is not None:
                record.error = record.error or str(error)
                continue
            text = result.as_numpy("text_output")
            if text is not None and record.error is None:
                record.response_times.append(time.perf_counter())
                if perf and record.perf is None:
                    engine = {name: result.as_numpy(name)
                              for name in ("arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns")}
                    if all(v is not None for v in engine.values()):
                        record.perf = {"sent_ns": sent_ns, "received_ns": time.time_ns(),
                                       **{k: int(v.reshape(-1)[0]) for k, v in engine.items()}}
                n = result.as_numpy("num_output_tokens")
                if n is not None:
                    record.output_tokens = int(n.reshape(-1)[0])
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        record.error = str(e)
    return record


async def _user(url: str, model: str, prompts: list[str], output_len: int, deadline: float, max_requests: int,
                counter: list[int], records: list[RequestRecord]) -> None:
    import tritonclient.grpc.aio as aio

    async with aio.InferenceServerClient(url) as client:
        while time.perf_counter() < deadline and counter[0] < max_requests:
            i = counter[0]
            counter[0] += 1
            records.append(await timed_request(client, model, prompts[i % len(prompts)], output_len))


async def run_load_async(url: str, model: str, prompts: list[str], *, output_len: int, concurrency: int,
                         duration: float = 30.0, max_requests: int = 1_000_000) -> LoadResult:
    start = time.perf_counter()
    records: list[RequestRecord] = []
    counter = [0]
    deadline = start + duration
    await asyncio.gather(*(
        _user(url, model, prompts, output_len, deadline, max_requests, counter, records)
        for _ in range(concurrency)
    ))
    return LoadResult(concurrency, time.perf_counter() - start, records)


def run_load(url: str, model: str, prompts: list[str], **kwargs) -> LoadResult:  # noqa: ANN003
    return asyncio.run(run_load_async(url, model, prompts, **kwargs))


def synthetic_prompts(tokenizer_dir: str, input_len: int, count: int = 64, seed: int = 0) -> list[str]:
    """Prompts of exactly ``input_len`` tokens (with BOS) under the repository's own tokenizer."""
    from tritonize.runtime.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_dir)
    rng = np.random.default_rng(seed)
    words = "the of and to in is was for on that with as by at from his her an which their be this".split()
    prompts = []
    for _ in range(count):
        text = " ".join(rng.choice(words, size=input_len * 2))
        ids = tok.encode(text)
        while len(ids) > input_len:
            text = text[: int(len(text) * input_len / len(ids)) - 1]
            ids = tok.encode(text)
        while len(ids) < input_len:
            text += " " + str(rng.choice(words))
            ids = tok.encode(text)
            if len(ids) > input_len:
                text = text.rsplit(" ", 1)[0]
                ids = tok.encode(text)
                break
        prompts.append(text)
    return prompts


@dataclass
class Answer:
    """One streamed request as a client saw it, for checks of what came back (not of timing)."""

    prompt: str
    text: str = ""
    finals: int = 0  # final responses received: exactly one when the engine keeps its promise
    error: str | None = None  # the first error, a response of another request on this stream included


async def stream_answer(client, model: str, prompt: str, max_tokens: int) -> Answer:  # noqa: ANN001 - aio client
    """Streams ``prompt`` over an open ``tritonclient.grpc.aio`` client until the final response."""
    from .client import GenerateOptions, grpc_inputs

    request_id = uuid.uuid4().hex
    answer = Answer(prompt)

    async def request():
        yield {"model_name": model, "inputs": grpc_inputs(prompt, GenerateOptions(max_tokens=max_tokens), True),
               "request_id": request_id, "enable_empty_final_response": True}

    try:
        async for result, error in client.stream_infer(request()):  # ends after the final response
            if error is not None:
                answer.error = answer.error or str(error)
                continue
            if result.get_response().id != request_id:
                answer.error = answer.error or f"response for request {result.get_response().id} on {request_id}'s stream"
                continue
            out = result.as_numpy("text_output")
            if out is not None:
                answer.text += b"".join(out.reshape(-1)).decode()
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                answer.finals += 1
    except Exception as e:  # noqa: BLE001 - reported with the answer
        answer.error = str(e)
    return answer


async def answers_under_load(url: str, model: str, prompts: list[str], *, clients: int, max_tokens: int,
                             duration: float) -> list[Answer]:
    """``clients`` concurrent streaming clients, each cycling through ``prompts`` until ``duration`` is up."""
    import tritonclient.grpc.aio as aio

    answers: list[Answer] = []
    deadline = time.monotonic() + duration

    async def user(k: int) -> None:
        async with aio.InferenceServerClient(url) as client:
            i = k
            while time.monotonic() < deadline:
                answers.append(await stream_answer(client, model, prompts[i % len(prompts)], max_tokens))
                i += clients

    await asyncio.gather(*(user(k) for k in range(clients)))
    return answers
