"""Talking to a generated repository the way fleet clients do: gRPC streaming, or HTTP generate.

gRPC streaming reaches the decoupled ensemble both for streamed and single-response requests;
HTTP goes through Triton's /generate and /generate_stream endpoints. Plain HTTP /infer works on
the ``<name>_sync`` model only (Triton refuses decoupled models there).
"""

from __future__ import annotations

import http.client
import json
import queue
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import QueryError


@dataclass
class GenerateOptions:
    max_tokens: int = 64
    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_words: list[str] = field(default_factory=list)
    bad_words: list[str] = field(default_factory=list)
    end_id: int | None = None
    exclude_input_in_output: bool = True
    return_log_probs: bool = False
    task_id: int | None = None  # p-tuning task
    lora_task_id: int | None = None  # LoRA adapter
    guide_type: str | None = None  # structured output: json, json_schema, regex, ebnf_grammar, structural_tag
    guide: str | None = None  # the schema, pattern or grammar

    def texts(self) -> dict[str, str]:
        """The BYTES inputs of one element that are set (structured output)."""
        out = {"guided_decoding_guide_type": self.guide_type, "guided_decoding_guide": self.guide}
        return {k: v for k, v in out.items() if v is not None}

    def scalars(self) -> dict[str, tuple[object, str]]:
        """Input name -> (value, Triton dtype) for every option that is set."""
        table: dict[str, tuple[object, str]] = {
            "max_tokens": (self.max_tokens, "INT32"),
            "exclude_input_in_output": (self.exclude_input_in_output, "BOOL"),
        }
        optional = {
            "top_k": (self.top_k, "INT32"),
            "top_p": (self.top_p, "FP32"),
            "temperature": (self.temperature, "FP32"),
            "seed": (self.seed, "UINT64"),
            "repetition_penalty": (self.repetition_penalty, "FP32"),
            "min_tokens": (self.min_tokens, "INT32"),
            "end_id": (self.end_id, "INT32"),
            "return_log_probs": (self.return_log_probs or None, "BOOL"),
            "task_id": (self.task_id, "UINT64"),
            "lora_task_id": (self.lora_task_id, "UINT64"),
        }
        table.update({k: v for k, v in optional.items() if v[0] is not None})
        return table


@dataclass
class Result:
    text: str
    pieces: list[str]
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None
    cum_log_prob: float | None = None
    output_log_probs: list[float] | None = None
    time_to_first_piece: float | None = None
    elapsed: float = 0.0


_NP = {"INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64, "BOOL": np.bool_}


def grpc_inputs(prompt: str, opts: GenerateOptions, stream: bool) -> list:
    import tritonclient.grpc as grpcclient

    def make(name: str, array: np.ndarray, dtype: str):
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        return tensor

    inputs = [
        make("text_input", np.array([[prompt.encode("utf-8")]], dtype=np.object_), "BYTES"),
        make("stream", np.array([[stream]], dtype=np.bool_), "BOOL"),
    ]
    for name, (value, dtype) in opts.scalars().items():
        inputs.append(make(name, np.array([[value]], dtype=_NP[dtype]), dtype))
    for name, words in (("stop_words", opts.stop_words), ("bad_words", opts.bad_words)):
        if words:
            inputs.append(make(name, np.array([[w.encode() for w in words]], dtype=np.object_), "BYTES"))
    for name, text in opts.texts().items():
        inputs.append(make(name, np.array([[text.encode("utf-8")]], dtype=np.object_), "BYTES"))
    return inputs


def _grpc_url(url: str) -> str:
    for scheme in ("grpc://", "http://", "https://"):
        if url.startswith(scheme):
            return url[len(scheme):]
    return url


def grpc_generate(url: str, model: str, prompt: str, opts: GenerateOptions, *, stream: bool = False,
                  on_piece: Callable[[str], None] | None = None, timeout: float = 300.0) -> Result:
    """One request over a gRPC stream; works for streamed and single-response requests alike."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    responses: queue.Queue = queue.Queue()
    target = _grpc_url(url)
    try:
        client = grpcclient.InferenceServerClient(target)
    except InferenceServerException as e:
        raise QueryError(f"cannot use the gRPC address {target}: {e.message() or e}") from None
    _check_reachable(client, target, timeout)
    result = Result(text="", pieces=[])
    start = time.perf_counter()
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(model, grpc_inputs(prompt, opts, stream), request_id=uuid.uuid4().hex,
                                  enable_empty_final_response=True)
        while True:
            try:
                res, err = responses.get(timeout=timeout)
            except queue.Empty:
                raise QueryError(f"no response from {model} within {timeout:.0f} s") from None
            if err is not None:
                raise QueryError(err.message() if hasattr(err, "message") else str(err))
            _absorb(result, res.as_numpy, on_piece, start)
            params = res.get_response().parameters
            if params.get("triton_final_response") and params["triton_final_response"].bool_param:
                break
    except InferenceServerException as e:
        message = e.message() or str(e)
        if "no longer in valid state" in message:  # the stream broke: its callback got the reason
            while not responses.empty():
                _, err = responses.get_nowait()
                if err is not None:
                    message = f"the gRPC stream to {target} broke: {_reason(err)}"
                    break
        raise QueryError(message) from None
    finally:
        try:
            client.stop_stream()
        finally:
            client.close()
    result.elapsed = time.perf_counter() - start
    return result


def _check_reachable(client, target: str, timeout: float) -> None:  # noqa: ANN001 - a tritonclient.grpc client
    """QueryError in one line when nothing answers at ``target``: without this a stream to a closed port
    fails later and in gRPC's words ("The stream is no longer in valid state ...")."""
    from tritonclient.utils import InferenceServerException

    try:
        client.is_server_live(client_timeout=min(timeout, 10.0))
    except InferenceServerException as e:
        client.close()
        status = (e.status() or "").replace("StatusCode.", "")
        if status in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "") or "connect" in (e.message() or "").lower():
            raise QueryError(f"cannot reach tritonserver's gRPC endpoint at {target} ({_reason(e)}): start it with "
                             "`tritonize serve REPO`, or pass the right host:port with -u") from None
        raise QueryError(e.message() or str(e)) from None


def _reason(e: Exception) -> str:
    """The useful part of a gRPC connection error: "connection refused", "deadline exceeded", ..."""
    text = (getattr(e, "message", lambda: "")() or str(e)).strip()
    if "resolving" in text or "lookup failed" in text:
        return "the host name does not resolve"
    for known in ("Connection refused", "Deadline Exceeded", "Name or service not known", "No route to host",
                  "Connection reset", "Socket closed", "failed to connect"):
        if known.lower() in text.lower():
            return known.lower()
    return text.splitlines()[0][:120] if text else "no answer"


def _absorb(result: Result, get: Callable[[str], np.ndarray | None], on_piece: Callable[[str], None] | None,
            start: float) -> None:
    text = get("text_output")
    if text is None:
        return
    piece = b"".join(t if isinstance(t, bytes) else str(t).encode() for t in text.reshape(-1)).decode("utf-8")
    if result.time_to_first_piece is None:
        result.time_to_first_piece = time.perf_counter() - start
    result.pieces.append(piece)
    result.text += piece
    if on_piece is not None:
        on_piece(piece)
    for name in ("num_input_tokens", "num_output_tokens"):
        value = get(name)
        if value is not None:
            setattr(result, name, int(value.reshape(-1)[0]))
    cum = get("cum_log_probs")
    if cum is not None:
        result.cum_log_prob = float(cum.reshape(-1)[0])
    logp = get("output_log_probs")
    if logp is not None and logp.size:
        result.output_log_probs = (result.output_log_probs or []) + logp.reshape(-1).tolist()


def http_generate(url: str, model: str, prompt: str, opts: GenerateOptions, *, stream: bool = False,
                  on_piece: Callable[[str], None] | None = None, timeout: float = 300.0) -> Result:
    """One request to Triton's /generate (one response) or /generate_stream (server-sent events)."""
    base = url if url.startswith(("http://", "https://")) else f"http://{url}"
    endpoint = f"{base.rstrip('/')}/v2/models/{model}/{'generate_stream' if stream else 'generate'}"
    body: dict[str, object] = {"text_input": prompt, "stream": stream}
    body.update({k: v for k, (v, _) in opts.scalars().items()})
    if opts.stop_words:
        body["stop_words"] = opts.stop_words
    if opts.bad_words:
        body["bad_words"] = opts.bad_words
    body.update(opts.texts())
    request = urllib.request.Request(endpoint, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    result = Result(text="", pieces=[])
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if stream:
                for raw in response:
                    line = raw.decode("utf-8").strip()
                    if line.startswith("data:"):
                        event = json.loads(line[5:])
                        if "error" in event:
                            raise QueryError(event["error"])
                        _absorb(result, lambda k, e=event: _json_field(e, k), on_piece, start)
            else:
                _absorb(result, lambda k, e=json.loads(response.read()): _json_field(e, k), on_piece, start)
    except urllib.error.HTTPError as e:
        raise QueryError(_http_error(e.read().decode("utf-8", "replace"), e.code)) from None
    except urllib.error.URLError as e:
        raise QueryError(f"cannot reach tritonserver's HTTP endpoint at {base} ({e.reason}): start it with "
                         "`tritonize serve REPO`, or pass the right http://host:port with -u") from None
    except (ConnectionError, http.client.HTTPException) as e:
        raise QueryError(f"the connection to {base} broke ({e}): is tritonserver still running?") from None
    result.elapsed = time.perf_counter() - start
    return result


def _http_error(body: str, status: int) -> str:
    """The server's message in an HTTP error body: JSON ``{"error": ...}``, or the same framed as server-sent
    events (``data: {...}``, how /generate_stream answers an error); the body itself otherwise."""
    for line in body.splitlines() or [body]:
        line = line.strip()
        if line.startswith("data:"):
            line = line[5:].strip()
        try:
            message = json.loads(line).get("error")
        except (ValueError, AttributeError):
            continue
        if message:
            return str(message)
    return body.strip() or f"HTTP {status}"


def _json_field(event: dict, key: str) -> np.ndarray | None:
    if key not in event:
        return None
    value = event[key]
    if key == "text_output":
        return np.array([value.encode("utf-8")], dtype=np.object_)
    return np.array(value)
