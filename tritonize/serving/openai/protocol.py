"""The OpenAI requests the front takes, what each one becomes on the wire, and OpenAI-shaped errors.

Requests are validated by pydantic models of the fields the front serves; every OpenAI field it does not
serve is refused by name when a request sets it to something other than its default (``n`` above 1,
``logit_bias``, tools, ...), and fields OpenAI does not know are ignored, as vLLM does. The extensions
vLLM users send through ``extra_body`` (``top_k``, ``repetition_penalty``, ``min_tokens``,
``chat_template_kwargs``, ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``)
arrive at the top level of the body.

Structured output (``response_format`` ``json_object`` / ``json_schema``, or vLLM's guided fields) becomes
the wire's ``guided_decoding_guide_type`` / ``guided_decoding_guide``; the engine enforces it.

Sampling follows OpenAI's semantics, sent explicitly because the wire's rule differs (TensorRT-LLM's:
greedy unless top_k / top_p ask for sampling):

- ``temperature`` 0 (or ``top_k`` 1) is greedy: the wire gets ``top_k`` 1 and nothing else;
- otherwise (OpenAI's defaults are ``temperature`` 1, ``top_p`` 1) it samples: the wire gets
  ``temperature``, ``top_p`` (1 when not given) and ``top_k`` (0, no limit, when not given or -1).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Above what OpenAI takes, and what tritonize's engine must not be sent.
UINT64 = 1 << 64


class ApiError(Exception):
    """An error the client gets as OpenAI's ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or {401: "authentication_error", 404: "invalid_request_error",
                             413: "invalid_request_error", 500: "server_error",
                             503: "service_unavailable"}.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param} is not supported: {why}", param=param, code="unsupported_parameter")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = False


class _Common(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extensions (extra_body)
    top_k: int | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    # structured output: OpenAI's, and vLLM's extra_body spellings (older guided_*, newer structured_outputs)
    response_format: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[Any] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    structured_outputs: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def refuse_unsupported(self) -> None:
        if self.n is not None and self.n != 1:
            raise unsupported("n", "one choice per request (send the request n times, with different seeds)")
        if self.logit_bias:
            raise unsupported("logit_bias", "the engine takes no per-token biases")
        if self.ignore_eos:
            raise unsupported("ignore_eos", "send min_tokens equal to max_tokens instead")
        if self.skip_special_tokens is False:
            raise unsupported("skip_special_tokens", "special tokens are always left out of the text")
        if self.guided_whitespace_pattern:
            raise unsupported("guided_whitespace_pattern", "JSON is written compact (no whitespace between tokens)")


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and all(isinstance(p, str) for p in self.prompt):
            return list(self.prompt)  # type: ignore[arg-type]
        if not self.prompt:
            raise bad_request("prompt is empty: send a prompt of at least one character", "prompt")
        raise unsupported("prompt", "send text; prompts as token ids cannot travel over the ensemble's text "
                          "interface")

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.best_of is not None and self.best_of != 1:
            raise unsupported("best_of", "one candidate per request")
        if self.suffix:
            raise unsupported("suffix", "the models here complete text after a prompt, not between two texts")
        if self.logprobs is not None and not 0 <= self.logprobs <= 5:
            raise bad_request(f"logprobs must be between 0 and 5, got {self.logprobs}", "logprobs")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    # vLLM's
    add_generation_prompt: bool | None = True
    chat_template_kwargs: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise unsupported(name, "tool calling is not served")
        for name in ("tool_choice", "function_call"):
            value = getattr(self, name)
            if value not in (None, "none"):
                raise unsupported(name, "tool calling is not served")
        if self.audio is not None or (self.modalities and self.modalities != ["text"]):
            raise unsupported("modalities" if self.modalities else "audio", "the models here read and write text")
        if self.prediction is not None:
            raise unsupported("prediction", "predicted outputs are not served")
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= 20:
                raise bad_request(f"top_logprobs must be between 0 and 20, got {self.top_logprobs}", "top_logprobs")
            if not self.logprobs:
                raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")

    def plain_messages(self) -> list[dict[str, Any]]:
        """The messages as the template sees them: text content parts joined into one string."""
        out = []
        for i, message in enumerate(self.messages):
            item = message.model_dump(exclude_none=True)
            content = message.content
            if isinstance(content, list):
                texts = []
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                        raise unsupported(f"messages[{i}].content", f"content parts of type {kind!r}: the models "
                                          "here read text")
                    texts.append(part["text"])
                item["content"] = "".join(texts)
            elif content is None:
                item["content"] = ""
            out.append(item)
        return out


def parse(model: type[BaseModel], body: Any) -> Any:
    """``body`` as ``model``; a 400 naming the first bad field otherwise."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if not str(p).startswith("function-")) or None
        if first.get("type") == "missing":
            raise bad_request(f"{where} is required", where) from None
        raise bad_request(f"{where}: {first.get('msg')}", where) from None


# --- structured output -----------------------------------------------------------------------------------
def _schema_text(value: Any, param: str) -> str:
    """A JSON schema given as an object or as its text, as the text the wire carries."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise bad_request(f"{param} is not JSON: {e}", param) from None
    if not isinstance(value, (dict, bool)):
        raise bad_request(f"{param} must be a JSON schema (an object), not {type(value).__name__}", param)
    return json.dumps(value, ensure_ascii=False)


def _text_field(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"{param} must be a non-empty string", param)
    return value


def ebnf_literal(text: str) -> str:
    """``text`` as a string literal of xgrammar's EBNF."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def choice_grammar(choices: Any, param: str) -> str:
    """vLLM's ``guided_choice``: the answer is one of the strings, exactly."""
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise bad_request(f"{param} must be a non-empty list of non-empty strings", param)
    return "root ::= " + " | ".join(ebnf_literal(c) for c in dict.fromkeys(choices))


def _response_format(fmt: dict[str, Any]) -> tuple[str, str] | None:
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json", ""
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise bad_request("response_format json_schema needs json_schema.schema: the JSON schema of the answer",
                              "response_format")
        if not isinstance(spec.get("strict", False), (bool, type(None))):
            raise bad_request("response_format.json_schema.strict must be true or false", "response_format")
        return "json_schema", _schema_text(spec["schema"], "response_format.json_schema.schema")
    raise unsupported("response_format", f"type {kind!r}: send text, json_object or json_schema")


def guide(req: _Common) -> tuple[str, str] | None:
    """The request's guide as the wire's (guided_decoding_guide_type, guided_decoding_guide); at most one."""
    found: list[tuple[str, tuple[str, str] | None]] = []
    if req.response_format is not None:
        if not isinstance(req.response_format, dict):
            raise bad_request("response_format must be an object", "response_format")
        found.append(("response_format", _response_format(req.response_format)))
    if req.guided_json is not None:
        found.append(("guided_json", ("json_schema", _schema_text(req.guided_json, "guided_json"))))
    if req.guided_regex is not None:
        found.append(("guided_regex", ("regex", _text_field(req.guided_regex, "guided_regex"))))
    if req.guided_choice is not None:
        found.append(("guided_choice", ("ebnf_grammar", choice_grammar(req.guided_choice, "guided_choice"))))
    if req.guided_grammar is not None:
        found.append(("guided_grammar", ("ebnf_grammar", _text_field(req.guided_grammar, "guided_grammar"))))
    for key, value in (req.structured_outputs or {}).items():
        param = f"structured_outputs.{key}"
        if value is None or value is False:
            continue
        if key == "json":
            found.append((param, ("json_schema", _schema_text(value, param))))
        elif key == "json_object":
            found.append((param, ("json", "")))
        elif key == "regex":
            found.append((param, ("regex", _text_field(value, param))))
        elif key == "choice":
            found.append((param, ("ebnf_grammar", choice_grammar(value, param))))
        elif key == "grammar":
            found.append((param, ("ebnf_grammar", _text_field(value, param))))
        elif key == "structural_tag":
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            found.append((param, ("structural_tag", text)))
        elif key not in ("disable_fallback", "disable_any_whitespace", "disable_additional_properties",
                         "whitespace_pattern", "backend", "backend_was_auto"):
            raise unsupported(param, "send json, json_object, regex, choice, grammar or structural_tag")
    guides = [(param, g) for param, g in found if g is not None]
    if len(guides) > 1:
        raise bad_request(f"send one kind of structured output, not {guides[0][0]} and {guides[1][0]}",
                          guides[1][0])
    return guides[0][1] if guides else None


# --- the wire request -----------------------------------------------------------------------------------
@dataclass
class WireRequest:
    """One generation as the ensemble takes it: input name -> (value, Triton dtype)."""

    text: str
    max_tokens: int
    stream: bool
    scalars: dict[str, tuple[Any, str]] = field(default_factory=dict)
    stop_words: list[str] = field(default_factory=list)
    logprobs: bool = False
    guide: tuple[str, str] | None = None  # (guided_decoding_guide_type, guided_decoding_guide)


def _finite(name: str, value: float | None, low: float | None = None, high: float | None = None) -> None:
    if value is None:
        return
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        span = f" between {low:g} and {high:g}" if low is not None and high is not None else (
            f" of at least {low:g}" if low is not None else "")
        raise bad_request(f"{name} must be a number{span}, got {value}", name)


def sampling(req: _Common) -> dict[str, tuple[Any, str]]:
    """OpenAI's sampling fields as wire inputs (see the module's docstring for the rule)."""
    _finite("temperature", req.temperature, 0.0, 2.0)
    _finite("top_p", req.top_p, 0.0, 1.0)
    _finite("presence_penalty", req.presence_penalty, -2.0, 2.0)
    _finite("frequency_penalty", req.frequency_penalty, -2.0, 2.0)
    _finite("repetition_penalty", req.repetition_penalty, 0.0)
    if req.repetition_penalty is not None and req.repetition_penalty <= 0:
        raise bad_request(f"repetition_penalty must be above 0 (1 is off), got {req.repetition_penalty}",
                          "repetition_penalty")
    if req.top_k is not None and req.top_k < -1:
        raise bad_request(f"top_k must be -1 or 0 (no limit) or positive, got {req.top_k}", "top_k")
    out: dict[str, tuple[Any, str]] = {}
    temperature = 1.0 if req.temperature is None else req.temperature
    if temperature == 0 or req.top_k == 1:
        out["top_k"] = (1, "INT32")
    else:
        out["temperature"] = (temperature, "FP32")
        out["top_p"] = (1.0 if req.top_p is None else req.top_p, "FP32")
        out["top_k"] = (max(req.top_k or 0, 0), "INT32")
    if req.seed is not None:
        out["seed"] = (req.seed % UINT64, "UINT64")
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        value = getattr(req, name)
        if value is not None:
            out[name] = (value, "FP32")
    return out


def token_limit(req: _Common, asked: int | None, default: int, limit: int | None, param: str) -> int:
    value = default if asked is None else asked
    if value < 1:
        raise bad_request(f"{param} is {value}: ask for at least 1 token (prompt log-probs are not returned)", param)
    if limit is not None and value > limit:
        raise bad_request(f"{param} is {value}, more than this model's limit of {limit} tokens: ask for fewer", param)
    if req.min_tokens is not None and not 0 <= req.min_tokens <= value:
        raise bad_request(f"min_tokens must be between 0 and {param} ({value}), got {req.min_tokens}", "min_tokens")
    return value


def wire_request(req: _Common, text: str, tokens: int, *, add_special_tokens: bool, logprobs: bool) -> WireRequest:
    scalars = sampling(req)
    if req.min_tokens:
        scalars["min_tokens"] = (req.min_tokens, "INT32")
    if not add_special_tokens:
        scalars["add_special_tokens"] = (False, "BOOL")
    if logprobs:
        scalars["return_log_probs"] = (True, "BOOL")
    return WireRequest(text=text, max_tokens=tokens, stream=bool(req.stream), scalars=scalars,
                       stop_words=req.stops(), logprobs=logprobs, guide=guide(req))


# --- finish reasons and stop strings --------------------------------------------------------------------
def finish_reason(engine_reason: str | None, output_tokens: int | None, max_tokens: int) -> str:
    """OpenAI's finish_reason: ``length`` when the token limit ended the answer, else ``stop``.

    The engine says why (``finish_reason`` output: length, end, stop, cancelled); an ensemble without that
    output is judged by its token count.
    """
    if engine_reason:
        return "length" if engine_reason == "length" else "stop"
    return "length" if output_tokens is not None and output_tokens >= max_tokens else "stop"


class StopMatcher:
    """OpenAI's stop strings on the text: the answer ends before the first one, which is not returned.

    The engine stops on the stop words' tokens too (and keeps them in its output, as TensorRT-LLM does);
    matching the text here removes them and also catches a stop string the model spelled with other
    tokens. While streaming, text that could be the start of a stop string is held back until it is not.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text safe to send after ``piece``; sets ``stopped`` when a stop string was found."""
        if not self.stops:
            return piece
        if self.stopped:
            return ""
        text = self.pending + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.pending = ""
            return text[:cut]
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        self.pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return "" if self.stopped else rest


@dataclass
class TokenLogprobs:
    """The log-probs of the tokens sent so far, each with its text."""

    tokens: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    def extend(self, tokens: list[str], logprobs: list[float]) -> None:
        n = min(len(tokens), len(logprobs))
        self.tokens.extend(tokens[:n])
        self.logprobs.extend(float(x) for x in logprobs[:n])

    def cut(self, text_length: int) -> None:
        """Keeps the tokens whose text starts within the first ``text_length`` characters."""
        at = 0
        for i, token in enumerate(self.tokens):
            if at >= text_length and token:
                del self.tokens[i:], self.logprobs[i:]
                return
            at += len(token)

    def completion(self, offset: int, top: int) -> dict[str, Any]:
        """The completions API's ``logprobs`` (``top_logprobs`` lists the chosen token alone: the engine
        returns no other token's log-prob)."""
        offsets, at = [], offset
        for token in self.tokens:
            offsets.append(at)
            at += len(token)
        top_logprobs = [{t: lp} for t, lp in zip(self.tokens, self.logprobs)] if top else None
        return {"tokens": list(self.tokens), "token_logprobs": list(self.logprobs), "top_logprobs": top_logprobs,
                "text_offset": offsets}

    def chat(self, top: int) -> list[dict[str, Any]]:
        """The chat API's ``logprobs.content`` (``top_logprobs``: the chosen token alone, as above)."""
        out = []
        for token, lp in zip(self.tokens, self.logprobs):
            raw = list(token.encode("utf-8"))
            out.append({"token": token, "logprob": lp, "bytes": raw,
                        "top_logprobs": [{"token": token, "logprob": lp, "bytes": raw}] if top else []})
        return out

