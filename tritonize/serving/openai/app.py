"""The HTTP side of the front: a FastAPI application with OpenAI's routes.

``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as server-sent events
ending with ``data: [DONE]``, or not) and ``GET /health``. Every error is OpenAI's ``{"error": {...}}``
body: 400 for a request the front or the model refuses (naming the parameter where there is one), 401
without the API key, 404 for a model that is not served, 413 for a body over the limit, 503 while
tritonserver or the model is not ready.

A client that goes away is noticed while its answer is being made, streamed or not: its request is
cancelled on the server, which frees the engine's slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...repository.chat_template import ChatTemplateError, render_chat
from .backend import Backend, Piece
from .catalog import Catalog, ServedModel
from .options import DEFAULT_MAX_REQUEST_BYTES
from .protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    StopMatcher,
    TokenLogprobs,
    WireRequest,
    bad_request,
    finish_reason,
    parse,
    token_limit,
    wire_request,
)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


# --- the models, from the repository or from the server ---------------------------------------------------
class Models:
    """The catalog: fixed (read from a repository) or read from the server when first needed."""

    REFRESH_S = 5.0

    def __init__(self, backend: Backend, catalog: Catalog | None = None) -> None:
        self.backend = backend
        self.fixed = catalog is not None
        self.catalog = catalog
        self.read_at = 0.0
        self.lock = asyncio.Lock()

    async def get(self, refresh: bool = False) -> Catalog:
        if self.fixed:
            return self.catalog  # type: ignore[return-value]
        async with self.lock:
            stale = time.monotonic() - self.read_at > self.REFRESH_S
            if self.catalog is None or (refresh and stale) or (not self.catalog.models and stale):
                from .catalog import catalog_from_server

                try:
                    self.catalog = await catalog_from_server(self.backend.client)
                except Exception as e:  # noqa: BLE001 - the server is not up (yet)
                    raise ApiError(503, f"tritonserver at {self.backend.url} cannot list its models yet ({e}): "
                                        "retry shortly") from None
                self.read_at = time.monotonic()
            return self.catalog

    async def resolve(self, model_id: str) -> tuple[ServedModel, int | None]:
        try:
            return (await self.get()).resolve(model_id)
        except ApiError as e:
            if e.status != 404 or self.fixed:
                raise
            return (await self.get(refresh=True)).resolve(model_id)


# --- HTTP plumbing ------------------------------------------------------------------------------------------
class BodyLimit:
    """413 for a request body over ``limit`` bytes, declared or sent, before it is read whole."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.error = ApiError(413, f"the request body is larger than this server's limit of {limit} bytes",
                              code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # a body sent without its length: answered by the ApiError handler
                    raise self.error
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(self.error.body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class EventStream(StreamingResponse):
    """Server-sent events from an async iterator of ``data:`` payloads, ending in ``data: [DONE]``.

    The client's going away is watched for while events are made, not only when one is sent: the
    iterator is then closed at once, which cancels its request on the server.
    """

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(events, headers=SSE_HEADERS, media_type="text/event-stream")
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": f"data: {event}\n\n".encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

        try:
            await until_disconnected(receive, stream())
        except OSError:  # the connection broke while sending
            pass
        finally:
            await self.events.aclose()  # type: ignore[attr-defined]


async def until_disconnected(receive: Receive, work: Awaitable[Any]) -> Any:
    """Runs ``work`` until it ends or the client disconnects (then it is cancelled and None returned)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            if (await receive())["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return task.result() if not task.cancelled() else None


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# --- one choice -------------------------------------------------------------------------------------------
@dataclass
class Choice:
    """What one choice (one prompt) has produced so far."""

    index: int
    max_tokens: int
    stops: list[str]
    logprobs: bool = False
    text: str = ""
    finish: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens: TokenLogprobs = field(default_factory=TokenLogprobs)

    def __post_init__(self) -> None:
        self.matcher = StopMatcher(self.stops)

    def absorb(self, piece: Piece) -> str:
        """The text of ``piece`` that may be sent now (stop strings held back or cut)."""
        if piece.num_input_tokens is not None:
            self.prompt_tokens = piece.num_input_tokens
        if piece.num_output_tokens is not None:
            self.completion_tokens = piece.num_output_tokens
        before = len(self.text)
        new = self.matcher.feed(piece.text)
        if piece.finish_reason is not None and not self.matcher.stopped:
            new += self.matcher.flush()
        self.text += new
        if self.logprobs:
            self.tokens.extend(piece.tokens, piece.log_probs)
            if self.matcher.stopped:
                self.tokens.cut(len(self.text))
        if self.matcher.stopped:
            self.finish = "stop"
        elif piece.finish_reason is not None:
            self.finish = finish_reason(piece.finish_reason, piece.num_output_tokens, self.max_tokens)
        return self.text[before:]

    def end(self) -> None:
        """The stream ended without a final response carrying a reason (an ensemble without that output)."""
        if self.finish is None:
            self.text += self.matcher.flush()
            self.finish = finish_reason(None, self.completion_tokens, self.max_tokens)


class Front:
    """The routes' logic, over one backend and one catalog."""

    def __init__(self, backend: Backend, models: Models) -> None:
        self.backend = backend
        self.models = models

    async def pieces(self, model: ServedModel, wire: WireRequest, lora: int | None,
                     choice: Choice) -> AsyncIterator[tuple[Choice, Piece, str]]:
        engine = f"{model.name}_engine"  # every tritonize model has one, and it takes tensorrtllm_backend's stop
        async with contextlib.aclosing(self.backend.generate(model.name, wire, lora, engine)) as responses:
            async for piece in responses:
                new = choice.absorb(piece)
                yield choice, piece, new
                if choice.finish is not None:
                    return
        choice.end()

    async def merged(self, streams: list[AsyncIterator[tuple[Choice, Piece, str]]]
                     ) -> AsyncIterator[tuple[Choice, Piece, str]]:
        """The pieces of several choices as they come; one choice is passed through as it is."""
        if len(streams) == 1:
            async with contextlib.aclosing(streams[0]) as only:  # type: ignore[type-var]
                async for item in only:
                    yield item
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(stream: AsyncIterator) -> None:
            try:
                async with contextlib.aclosing(stream) as s:  # type: ignore[type-var]
                    async for item in s:
                        await queue.put(item)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                await queue.put(e)
                return
            await queue.put(done)

        tasks = [asyncio.ensure_future(pump(s)) for s in streams]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def prime(self, stream: AsyncIterator, receive: Receive) -> AsyncIterator:
        """Waits for the first piece before the response starts, so a refused request is an HTTP error
        (a client that leaves meanwhile cancels it)."""
        marker = object()

        async def first_piece() -> Any:
            try:
                return await stream.__anext__()
            except StopAsyncIteration:
                return marker

        try:
            first = await until_disconnected(receive, first_piece())
        except BaseException:
            await stream.aclose()  # type: ignore[attr-defined]
            raise
        if first is None:  # the client left
            await stream.aclose()  # type: ignore[attr-defined]
            raise ApiError(499, "the client closed the request")
        if first is marker:
            first = None

        async def rest() -> AsyncIterator:
            try:
                if first is not None:
                    yield first
                async for item in stream:
                    yield item
            finally:
                await stream.aclose()  # type: ignore[attr-defined]

        return rest()

    # -- /v1/completions ----------------------------------------------------------------------------
    async def completions(self, body: Any, receive: Receive) -> Response:
        req: CompletionRequest = parse(CompletionRequest, body)
        req.refuse_unsupported()
        prompts = req.prompts()
        model, lora = await self.models.resolve(req.model)
        tokens = token_limit(req, req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, model.max_output_len, "max_tokens")
        want_logprobs = req.logprobs is not None
        wires = [wire_request(req, p, tokens, add_special_tokens=True, logprobs=want_logprobs) for p in prompts]
        await self.backend.check_ready(model.name)
        choices = [Choice(i, tokens, req.stops(), want_logprobs) for i in range(len(prompts))]
        stream = self.merged([self.pieces(model, w, lora, c) for w, c in zip(wires, choices)])
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model}
        top = req.logprobs or 0
        offsets = [len(p) if req.echo else 0 for p in prompts]
        if req.stream:
            stream = await self.prime(stream, receive)
            return EventStream(self._completion_events(stream, head, choices, prompts, req, top, offsets))
        result = await until_disconnected(receive, _drain(stream))
        if result is None:
            return Response(status_code=499)
        out = []
        for choice, prompt, offset in zip(choices, prompts, offsets):
            out.append({"index": choice.index, "text": (prompt if req.echo else "") + choice.text,
                        "logprobs": choice.tokens.completion(offset, top) if want_logprobs else None,
                        "finish_reason": choice.finish})
        return JSONResponse({**head, "choices": out, "usage": _usage(choices)})

    async def _completion_events(self, stream: AsyncIterator, head: dict, choices: list[Choice], prompts: list[str],
                                 req: CompletionRequest, top: int, offsets: list[int]) -> AsyncIterator[str]:
        usage_key = {"usage": None} if req.include_usage else {}
        sent_logprobs = [0] * len(choices)
        text_at = list(offsets)
        try:
            if req.echo:
                for choice, prompt in zip(choices, prompts):
                    yield _json({**head, "choices": [{"index": choice.index, "text": prompt, "logprobs": None,
                                                      "finish_reason": None}], **usage_key})
            async with contextlib.aclosing(stream) as pieces:  # type: ignore[type-var]
                async for choice, _piece, new in pieces:
                    logprobs = None
                    if choice.logprobs:
                        i = choice.index
                        part = TokenLogprobs(choice.tokens.tokens[sent_logprobs[i]:],
                                             choice.tokens.logprobs[sent_logprobs[i]:])
                        sent_logprobs[i] = len(choice.tokens.tokens)
                        logprobs = part.completion(text_at[i], top)
                        text_at[i] += len(new)
                    if new or logprobs and logprobs["tokens"] or choice.finish:
                        yield _json({**head, "choices": [{"index": choice.index, "text": new, "logprobs": logprobs,
                                                          "finish_reason": choice.finish}], **usage_key})
        except ApiError as e:
            yield _json(e.body())
            return
        if req.include_usage:
            yield _json({**head, "choices": [], "usage": _usage(choices)})

    # -- /v1/chat/completions -----------------------------------------------------------------------
    async def chat(self, body: Any, receive: Receive) -> Response:
        req: ChatRequest = parse(ChatRequest, body)
        req.refuse_unsupported()
        model, lora = await self.models.resolve(req.model)
        if not model.chat_template:
            raise bad_request(f"{model.name} has no chat template (its checkpoint declares none): use "
                              "/v1/completions, or regenerate the repository with generate --chat-template FILE",
                              "messages")
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        tokens = token_limit(req, asked, model.max_output_len or COMPLETIONS_DEFAULT_MAX_TOKENS,
                             model.max_output_len, param)
        try:
            prompt = render_chat(model.chat_template, req.plain_messages(),
                                 add_generation_prompt=req.add_generation_prompt is not False,
                                 tokens=model.special_tokens, **(req.chat_template_kwargs or {}))
        except ChatTemplateError as e:
            raise bad_request(f"the chat template of {model.name} refuses these messages: {e}", "messages") from None
        if not prompt:
            raise bad_request("the chat template made an empty prompt of these messages", "messages")
        want_logprobs = bool(req.logprobs)
        wire = wire_request(req, prompt, tokens, add_special_tokens=False, logprobs=want_logprobs)
        await self.backend.check_ready(model.name)
        choice = Choice(0, tokens, req.stops(), want_logprobs)
        stream = self.merged([self.pieces(model, wire, lora, choice)])
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model, "system_fingerprint": None}
        top = req.top_logprobs or 0
        if req.stream:
            stream = await self.prime(stream, receive)
            return EventStream(self._chat_events(stream, {**head, "object": "chat.completion.chunk"}, choice, req, top))
        result = await until_disconnected(receive, _drain(stream))
        if result is None:
            return Response(status_code=499)
        out = {"index": 0, "message": {"role": "assistant", "content": choice.text},
               "logprobs": {"content": choice.tokens.chat(top)} if want_logprobs else None,
               "finish_reason": choice.finish}
        return JSONResponse({**head, "choices": [out], "usage": _usage([choice])})

    async def _chat_events(self, stream: AsyncIterator, head: dict, choice: Choice, req: ChatRequest,
                           top: int) -> AsyncIterator[str]:
        usage_key = {"usage": None} if req.include_usage else {}
        sent = 0
        try:
            yield _json({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": None}], **usage_key})
            async with contextlib.aclosing(stream) as pieces:  # type: ignore[type-var]
                async for _choice, _piece, new in pieces:
                    logprobs = None
                    if choice.logprobs and len(choice.tokens.tokens) > sent:
                        part = TokenLogprobs(choice.tokens.tokens[sent:], choice.tokens.logprobs[sent:])
                        sent = len(choice.tokens.tokens)
                        logprobs = {"content": part.chat(top)}
                    if new or logprobs:
                        yield _json({**head, "choices": [{"index": 0, "delta": {"content": new},
                                                          "logprobs": logprobs, "finish_reason": None}], **usage_key})
            yield _json({**head, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                              "finish_reason": choice.finish}], **usage_key})
        except ApiError as e:
            yield _json(e.body())
            return
        if req.include_usage:
            yield _json({**head, "choices": [], "usage": _usage([choice])})


async def _drain(stream: AsyncIterator) -> bool:
    async with contextlib.aclosing(stream) as pieces:  # type: ignore[type-var]
        async for _ in pieces:
            pass
    return True


def _usage(choices: list[Choice]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in choices)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# --- the application -------------------------------------------------------------------------------------
def create_app(grpc_url: str, catalog: Catalog | None = None, *, api_key: str | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> ASGIApp:
    """The front as an ASGI application over tritonserver's gRPC endpoint ``grpc_url`` (host:port);
    ``catalog`` None reads the models from the server."""
    backend = Backend(grpc_url)
    models = Models(backend, catalog)
    front = Front(backend, models)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await backend.close()

    app = FastAPI(title="tritonize OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(bad_request(f"the request is not valid: {error.errors()[0].get('msg')}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return error_response(ApiError(error.status_code, str(error.detail), kind=kind))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        return error_response(ApiError(500, f"internal error: {type(error).__name__}: {error}"))

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def json_body(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except ValueError as e:
            raise bad_request(f"the request body is not JSON ({e})") from None

    def route(handler: Callable[..., Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            authorized(request)
            return await handler(await json_body(request), request.receive)

        return endpoint

    app.add_api_route("/v1/completions", route(front.completions), methods=["POST"])
    app.add_api_route("/v1/chat/completions", route(front.chat), methods=["POST"])

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        authorized(request)
        catalog_now = await models.get(refresh=True)
        data = [{"id": model_id, "object": "model", "created": model.created, "owned_by": "tritonize",
                 "root": model.name, "parent": None if model_id == model.name else model.name}
                for model in catalog_now.models.values() for model_id in model.ids()]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict:
        authorized(request)
        model, _ = await models.resolve(model_id)
        return {"id": model_id, "object": "model", "created": model.created, "owned_by": "tritonize",
                "root": model.name, "parent": None if model_id == model.name else model.name}

    @app.get("/health")
    async def health() -> Response:
        if not await backend.server_ready():
            return error_response(ApiError(503, f"tritonserver at {backend.url} is not ready"))
        return JSONResponse({"status": "ok"})

    return BodyLimit(app, max_request_bytes)
