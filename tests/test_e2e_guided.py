"""End to end: structured output through a real tritonserver, with a random-weight tiny Llama.

Every guided answer is checked with a parser of its own: ``jsonschema`` for JSON schemas (nested objects,
enums, integer ranges, arrays with bounds), ``re.fullmatch`` for a regex, ``lark`` for an EBNF grammar, and
``json.loads`` for any JSON object; over gRPC streaming (streamed and not), HTTP /generate and
/generate_stream, and the OpenAI API through the ``openai`` client (``response_format`` and vLLM's
``extra_body`` spellings, streamed and not). Unguided requests that share the batch with guided ones still
give transformers' greedy text.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import numpy as np
import pytest
import sentencepiece as spm
import torch

from tests.fixtures.guides import EBNF, GUIDES, LARK, REGEX, SCHEMAS
from tritonize.export.demo_model import write_demo_checkpoint
from tritonize.repository.build import build_repository
from tritonize.repository.spec import RepoSpec
from tritonize.serving.client import GenerateOptions, QueryError, grpc_generate, http_generate
from tritonize.serving.openai.options import FrontOptions
from tritonize.serving.openai.runner import OpenAIFront
from tritonize.serving.server import free_port

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
pytest.importorskip("xgrammar")
pytestmark = pytest.mark.e2e

# This model closes an open JSON object within the budget on these prompts (any string it opens runs on
# until it picks one of the few dozen closing tokens among 32000).
JSON_PROMPTS = ["config", "Hello", "JSON please"]
MAX = 120


def check(kind: str, guide: str, text: str) -> None:
    if kind == "json_schema":
        jsonschema.validate(json.loads(text), json.loads(guide))
    elif kind == "json":
        assert isinstance(json.loads(text), dict), text
    elif kind == "regex":
        assert re.fullmatch(guide, text), text
    else:
        LARK.parse(text)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("guided") / "ckpt", hidden=64, layers=2, seed=3)


@pytest.fixture(scope="module")
def server(triton_server, ckpt, tmp_path_factory):
    spec = RepoSpec(name="tiny", max_batch_size=8, max_input_len=64, max_output_len=200, device="cpu",
                    dtype="float32")
    repo = build_repository(ckpt, tmp_path_factory.mktemp("repo") / "repo", spec, force=False, progress=False)
    return triton_server(repo)


@pytest.fixture(scope="module")
def reference(ckpt):
    model = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))

    def greedy_text(prompt: str, max_new: int) -> str:
        ids = [sp.bos_id(), *sp.encode(prompt)]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=2,
                                 pad_token_id=2)
        new = out[0, len(ids):].tolist()
        new = new[: new.index(2)] if 2 in new else new
        return sp.decode(ids + new)[len(sp.decode(ids)):]

    return greedy_text


def _opts(kind: str | None = None, guide: str | None = None, max_tokens: int = MAX) -> GenerateOptions:
    return GenerateOptions(max_tokens=max_tokens, guide_type=kind, guide=guide if kind != "json" else None)


@pytest.mark.parametrize("door", ["grpc-stream", "grpc", "http-generate", "http-generate-stream"])
def test_every_guided_answer_parses_through_each_door(server, door):
    send = grpc_generate if door.startswith("grpc") else http_generate
    url = server.grpc_endpoint if door.startswith("grpc") else server.http_endpoint
    stream = door.endswith("stream")
    asks = [(p, kind, guide) for p in ("Give me a record:", "Once upon a time") for kind, guide in GUIDES]
    asks += [(p, "json", "") for p in JSON_PROMPTS]
    with ThreadPoolExecutor(8) as pool:  # concurrently: one running batch
        results = list(pool.map(lambda a: send(url, "tiny", a[0], _opts(a[1], a[2]), stream=stream), asks))
    for (prompt, kind, guide), result in zip(asks, results):
        check(kind, guide, result.text)
        assert result.num_output_tokens is None or result.num_output_tokens < MAX, (prompt, kind, result.text)
        if stream and kind != "json":
            assert len([p for p in result.pieces if p]) > 1


def test_unguided_requests_in_a_guided_batch_stay_greedy(server, reference):
    plain = ["What is the color of a banana?", "1, 2, 3,", "Ünïcödé 日本語 🍌"]
    asks = [(p, None, None) for p in plain] + [("Give me a record:", kind, guide) for kind, guide in GUIDES]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda a: grpc_generate(
            server.grpc_endpoint, "tiny", a[0], _opts(a[1], a[2], 24 if a[1] is None else MAX), stream=True), asks))
    for (prompt, kind, guide), result in zip(asks, results):
        if kind is None:
            assert result.text == reference(prompt, 24), prompt
        else:
            check(kind, guide, result.text)


@pytest.mark.parametrize("kind, guide, words", [
    ("yaml", "a: 1", "guided_decoding_guide_type 'yaml' is not one of json, json_schema"),
    (None, "[a-z]+", "guided_decoding_guide was sent without guided_decoding_guide_type"),
    ("json_schema", "{not json", "the json_schema guide is not JSON"),
    ("regex", "a(b", "the regex guide does not compile: Regex parsing error at position 4"),
    ("json_schema", '{"type": "integer", "minimum": "x"}', "the json_schema guide does not compile: Value must be"),
    ("ebnf_grammar", "root ::= nothing", 'Rule "nothing" is not defined'),
])
def test_bad_guides_are_one_line_errors_and_the_server_keeps_serving(server, kind, guide, words):
    options = GenerateOptions(max_tokens=8, guide_type=kind, guide=guide)
    with pytest.raises(QueryError) as caught:
        grpc_generate(server.grpc_endpoint, "tiny", "Hello", options, stream=True)
    assert words in str(caught.value) and "\n" not in str(caught.value)
    check("regex", REGEX, grpc_generate(server.grpc_endpoint, "tiny", "Hello", _opts("regex", REGEX)).text)


# --- the OpenAI API --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(server):
    with OpenAIFront(server.grpc_endpoint, FrontOptions(port=free_port())) as front:
        with openai.OpenAI(base_url=front.url, api_key="unused", max_retries=0, timeout=120) as c:
            yield c


def _chat(client, content: str, stream: bool, **kw) -> tuple[str, str]:
    messages = [{"role": "user", "content": content}]
    if not stream:
        answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX, temperature=0, **kw)
        return answer.choices[0].message.content, answer.choices[0].finish_reason
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX, temperature=0,
                                                 stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1]


@pytest.mark.parametrize("stream", [False, True])
def test_openai_response_format_json_schema_and_json_object(client, stream):
    for name, schema in SCHEMAS.items():
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        for content in ("Give me a record.", "What is the color of a banana?"):
            text, reason = _chat(client, content, stream, response_format=fmt)
            jsonschema.validate(json.loads(text), schema)
            assert reason == "stop"
    for prompt in JSON_PROMPTS:
        kwargs = {"model": "tiny", "prompt": prompt, "max_tokens": MAX, "temperature": 0,
                  "extra_body": {"response_format": {"type": "json_object"}}}
        if stream:
            text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices)
        else:
            text = client.completions.create(**kwargs).choices[0].text
        check("json", "", text)


def test_openai_vllm_guided_fields(client):
    text, _ = _chat(client, "Name a code.", False, extra_body={"guided_regex": REGEX})
    check("regex", REGEX, text)
    choices = ["yes", "no", 'it "depends"']
    for content in ("Is the sky blue?", "Once upon a time", "1, 2, 3,"):
        assert _chat(client, content, True, extra_body={"guided_choice": choices})[0] in choices
    text, _ = _chat(client, "Compute:", True, extra_body={"guided_grammar": EBNF})
    check("ebnf_grammar", EBNF, text)
    text, _ = _chat(client, "Give me a record.", False, extra_body={"guided_json": SCHEMAS["orders"]})
    check("json_schema", json.dumps(SCHEMAS["orders"]), text)


def test_openai_guide_errors_are_400s_naming_what_is_wrong(client):
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(client, "x", False, extra_body={"guided_regex": "a(b"})
    assert "the regex guide does not compile" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(client, "x", False, response_format={"type": "json_schema"})
    assert caught.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(client, "x", True, extra_body={"guided_regex": "a+", "guided_json": {"type": "object"}})
    assert "one kind of structured output" in caught.value.message


def test_triton_s_openai_frontend_inputs_are_served(server):
    """Triton's OpenAI frontend sends guided_decoding_guide_type / guided_decoding_guide as [1, 1] BYTES."""
    import tritonclient.grpc as grpcclient

    def tensor(name, array, dtype):
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    schema = json.dumps(SCHEMAS["ranges"])
    inputs = [tensor("text_input", np.array([[b"Scores:"]], dtype=np.object_), "BYTES"),
              tensor("max_tokens", np.array([[MAX]], dtype=np.int32), "INT32"),
              tensor("stream", np.array([[False]], dtype=np.bool_), "BOOL"),
              tensor("exclude_input_in_output", np.array([[True]], dtype=np.bool_), "BOOL"),
              tensor("guided_decoding_guide_type", np.array([[b"json_schema"]], dtype=np.object_), "BYTES"),
              tensor("guided_decoding_guide", np.array([[schema.encode()]], dtype=np.object_), "BYTES")]
    with grpcclient.InferenceServerClient(server.grpc_endpoint) as c:
        result = c.infer("tiny_sync", inputs)
    text = result.as_numpy("text_output").reshape(-1)[0].decode()
    check("json_schema", schema, text)
    assert result.as_numpy("finish_reason").reshape(-1)[0] == b"stop"
