"""The front's side of the gRPC stream: one ensemble request per OpenAI choice, over tritonclient's asyncio
client (one channel, one HTTP/2 stream per request), so no request waits on another.

The ensemble is decoupled: a streamed request gets one response per few tokens, a request that does not
stream exactly one. A request given up early (the OpenAI client went away, or a stop string ended the
answer) is cancelled on the server, and its engine is sent tensorrtllm_backend's ``stop`` for the
request's id: Triton 2.51 does not tell an ensemble's steps that their request was cancelled, and a
request that does not stream has no response on the way through which the engine could learn it, so
the ``stop`` is what frees the engine's slot at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from .protocol import ApiError, WireRequest

_NP = {"INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64, "BOOL": np.bool_}
# What a model's error means for the client: most are about the request (a prompt over the limit, an adapter
# that is not served); these are about the server.
_SERVER_SIDE = ("shutting down", "unavailable", "not ready", "failed to load")
STOP_TIMEOUT_S = 10.0
OUTPUTS = ("text_output", "num_input_tokens", "num_output_tokens", "finish_reason")
LOGPROB_OUTPUTS = ("output_log_probs", "output_tokens")


@dataclass
class Piece:
    """One response of the ensemble."""

    text: str = ""
    finish_reason: str | None = None  # set on the final response (tritonize's ensembles)
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None
    tokens: list[str] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)


def _strings(raw: bytes) -> list[str]:
    """A BYTES tensor's elements (each a 4-byte little-endian length, then the bytes)."""
    out, at = [], 0
    while at + 4 <= len(raw):
        n = int.from_bytes(raw[at:at + 4], "little")
        out.append(raw[at + 4:at + 4 + n].decode("utf-8", "replace"))
        at += 4 + n
    return out


def piece_of(result: object) -> Piece:
    """One response, read from its raw output contents without a numpy array per tensor: the front reads a
    response per token of every stream, and this is most of its work. The text is read shape-agnostically
    (``[1, 1]`` here, ``[1]`` in tensorrtllm_backend's newer ensembles)."""
    response = result.get_response()  # type: ignore[attr-defined]
    raw = response.raw_output_contents
    if len(raw) != len(response.outputs):  # a server that sends typed contents: the general path
        return _piece_of_arrays(result)
    piece = Piece()
    for output, data in zip(response.outputs, raw):
        name = output.name
        if name == "text_output":
            texts = _strings(data)
            piece.text = texts[0] if texts else ""
        elif name in ("num_input_tokens", "num_output_tokens"):
            if len(data) >= 4:
                setattr(piece, name, int.from_bytes(data[:4], "little", signed=True))
        elif name == "finish_reason":
            texts = _strings(data)
            piece.finish_reason = texts[0] if texts and texts[0] else None
        elif name == "output_log_probs":
            piece.log_probs = np.frombuffer(data, dtype=np.float32).tolist()
        elif name == "output_tokens":
            piece.tokens = _strings(data)
    return piece


def _piece_of_arrays(result: object) -> Piece:
    get = result.as_numpy  # type: ignore[attr-defined]

    def text(array: np.ndarray | None) -> str:
        if array is None or array.size == 0:
            return ""
        value = array.reshape(-1)[0]
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    def count(array: np.ndarray | None) -> int | None:
        return None if array is None or array.size == 0 else int(array.reshape(-1)[0])

    piece = Piece(text=text(get("text_output")), num_input_tokens=count(get("num_input_tokens")),
                  num_output_tokens=count(get("num_output_tokens")))
    piece.finish_reason = text(get("finish_reason")) or None
    log_probs = get("output_log_probs")
    if log_probs is not None and log_probs.size:
        piece.log_probs = log_probs.reshape(-1).tolist()
        tokens = get("output_tokens")
        if tokens is not None and tokens.size:
            piece.tokens = [text(t[None]) for t in tokens.reshape(-1)]
    return piece


def model_error(message: str) -> ApiError:
    """A model's error answer as what the client gets."""
    if any(word in message.lower() for word in _SERVER_SIDE):
        return ApiError(503, message)
    if "unknown model" in message.lower():
        return ApiError(404, message, param="model", code="model_not_found")
    return ApiError(400, message)


class Backend:
    """A tritonserver's gRPC endpoint, as the front uses it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client = None
        self.ready_models: set[str] = set()
        self._stopping: set[asyncio.Task] = set()

    @property
    def client(self):  # noqa: ANN201 - tritonclient.grpc.aio.InferenceServerClient
        """Made on first use, inside the event loop that uses it (gRPC's asyncio channels belong to one)."""
        if self._client is None:
            import tritonclient.grpc.aio as aio

            self._client = aio.InferenceServerClient(self.url)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def server_ready(self) -> bool:
        try:
            return bool(await self.client.is_server_ready())
        except Exception:  # noqa: BLE001 - unreachable, refused, not yet listening: not ready
            return False

    async def check_ready(self, model: str) -> None:
        """A 503 while the server or the model is not ready; asked once, then trusted until a call fails."""
        if model in self.ready_models:
            return
        try:
            ready = bool(await self.client.is_model_ready(model))
        except Exception:  # noqa: BLE001
            ready = False
        if not ready:
            raise ApiError(503, f"tritonserver at {self.url} is not ready to serve {model} yet: retry shortly")
        self.ready_models.add(model)

    def inputs(self, wire: WireRequest) -> list:
        import tritonclient.grpc as grpcclient

        def make(name: str, array: np.ndarray, dtype: str):
            tensor = grpcclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            return tensor

        inputs = [
            make("text_input", np.array([[wire.text.encode("utf-8")]], dtype=np.object_), "BYTES"),
            make("max_tokens", np.array([[wire.max_tokens]], dtype=np.int32), "INT32"),
            make("stream", np.array([[wire.stream]], dtype=np.bool_), "BOOL"),
            make("exclude_input_in_output", np.array([[True]], dtype=np.bool_), "BOOL"),
        ]
        for name, (value, dtype) in wire.scalars.items():
            inputs.append(make(name, np.array([[value]], dtype=_NP[dtype]), dtype))
        if wire.stop_words:
            inputs.append(make("stop_words", np.array([[w.encode("utf-8") for w in wire.stop_words]],
                                                      dtype=np.object_), "BYTES"))
        if wire.guide is not None:
            for name, value in zip(("guided_decoding_guide_type", "guided_decoding_guide"), wire.guide):
                inputs.append(make(name, np.array([[value.encode("utf-8")]], dtype=np.object_), "BYTES"))
        return inputs

    def outputs(self, logprobs: bool) -> list:
        """The outputs the front reads: fewer tensors for the server to send and this process to read."""
        import tritonclient.grpc as grpcclient

        names = OUTPUTS + (LOGPROB_OUTPUTS if logprobs else ())
        return [grpcclient.InferRequestedOutput(name) for name in names]

    def stop_inputs(self) -> list:
        """A ``stop`` request to a tritonize engine model: its required inputs (any values) and ``stop``."""
        import tritonclient.grpc as grpcclient

        one = np.array([[1]], dtype=np.int32)
        words = np.array([[[0], [-1]]], dtype=np.int32)
        inputs = []
        for name, array, dtype in (("input_ids", one, "INT32"), ("input_lengths", one, "INT32"),
                                   ("request_output_len", one, "INT32"), ("end_ids", one, "INT32"),
                                   ("pad_id", one, "INT32"), ("stop_words_list", words, "INT32"),
                                   ("bad_words_list", words, "INT32"), ("stop", np.array([[True]]), "BOOL")):
            tensor = grpcclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs

    async def stop(self, engine: str, request_id: str) -> None:
        """Asks ``engine`` to end the request ``request_id`` now (it answers at once, whether it ran or not)."""
        async def one_request():
            yield {"model_name": engine, "inputs": self.stop_inputs(), "request_id": request_id}

        async def drain() -> None:
            async for _ in self.client.stream_infer(one_request()):
                pass

        with contextlib.suppress(Exception):
            await asyncio.wait_for(drain(), STOP_TIMEOUT_S)

    def _stop_later(self, engine: str, request_id: str) -> None:
        task = asyncio.ensure_future(self.stop(engine, request_id))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def generate(self, model: str, wire: WireRequest, lora_task_id: int | None = None,
                       engine: str | None = None) -> AsyncIterator[Piece]:
        """The ensemble's responses to one request; closing the iterator early cancels the request (and,
        given the name of its ``engine`` model, stops it there)."""
        import grpc

        inputs = self.inputs(wire)
        if lora_task_id is not None:
            import tritonclient.grpc as grpcclient

            tensor = grpcclient.InferInput("lora_task_id", [1, 1], "UINT64")
            tensor.set_data_from_numpy(np.array([[lora_task_id]], dtype=np.uint64))
            inputs.append(tensor)

        request_id = uuid.uuid4().hex

        outputs = self.outputs(wire.logprobs)

        async def one_request():
            yield {"model_name": model, "inputs": inputs, "outputs": outputs, "request_id": request_id}

        responses = self.client.stream_infer(one_request())
        finished = False
        try:
            async for result, error in responses:
                if error is not None:
                    finished = True
                    raise model_error(error.message() if hasattr(error, "message") else str(error))
                piece = piece_of(result)
                if piece.finish_reason is not None:
                    finished = True
                yield piece
                if finished:
                    return
            finished = True
        except grpc.RpcError as e:
            finished = True
            self.ready_models.discard(model)
            code = e.code() if hasattr(e, "code") else None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise ApiError(503, f"tritonserver at {self.url} is not reachable: {e.details()}") from None
            raise ApiError(500, f"tritonserver at {self.url}: {e.details() if hasattr(e, 'details') else e}") from None
        finally:
            if not finished:
                responses.cancel()
                if engine is not None:
                    self._stop_later(engine, request_id)
