"""The OpenAI front without a server: chat templates rendered as transformers renders them, OpenAI's sampling
defaults on the wire, stop strings, finish reasons, refusals by name, the models a repository serves."""

from __future__ import annotations

import json

import pytest

from tritonize.export.demo_model import CHAT_TEMPLATE, write_demo_checkpoint
from tritonize.repository.build import build_repository
from tritonize.repository.chat_template import ChatTemplateError, render_chat
from tritonize.repository.spec import RepoSpec
from tritonize.serving.openai.catalog import catalog_from_repository
from tritonize.serving.openai.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    StopMatcher,
    TokenLogprobs,
    choice_grammar,
    finish_reason,
    guide,
    parse,
    sampling,
    token_limit,
)

transformers = pytest.importorskip("transformers")

CHATML = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# loop controls, namespace, tojson with non-ASCII and HTML characters, whitespace control
FANCY = (
    "{%- set ns = namespace(n=0) -%}\n"
    "{%- for m in messages -%}\n"
    "  {%- if m.role == 'tool' %}{% continue %}{% endif -%}\n"
    "  {%- set ns.n = ns.n + 1 -%}\n"
    "  [{{ ns.n }}] {{ m | tojson }}\n"
    "  {%- if ns.n > 3 %}{% break %}{% endif %}\n"
    "{% endfor -%}\n"
    "{{ bos_token }}{% if add_generation_prompt %}>>{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "Be brief <b>&</b>."},
    {"role": "user", "content": "Ünïcödé 日本語 🍌?"},
    {"role": "assistant", "content": "Yes."},
    {"role": "tool", "content": "ignored"},
    {"role": "user", "content": "  And then?  "},
]


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, CHATML, FANCY], ids=["mistral", "chatml", "fancy"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_templates_render_as_transformers_renders_them(template, generation_prompt):
    from transformers.utils.chat_template_utils import render_jinja_template

    # Mistral's template takes alternating user / assistant turns only
    messages = [m for m in MESSAGES if template is not CHAT_TEMPLATE or m["role"] != "tool"]
    tokens = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    expected, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                        add_generation_prompt=generation_prompt, **tokens)
    assert render_chat(template, messages, add_generation_prompt=generation_prompt, tokens=tokens) == expected[0]


def test_a_template_that_refuses_says_why():
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat(CHAT_TEMPLATE, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                    tokens={"bos_token": "<s>", "eos_token": "</s>"})
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render_chat("{% for %}", [{"role": "user", "content": "a"}])
    with pytest.raises(ChatTemplateError, match="unsafe"):  # the sandbox forbids attribute tricks
        render_chat("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "a"}])


def test_openai_sampling_defaults_are_sent_explicitly():
    def wire(**kw):
        return sampling(CompletionRequest(model="m", prompt="p", **kw))

    # OpenAI's defaults (temperature 1, top_p 1) sample: every knob is sent so the engine samples too
    assert wire() == {"temperature": (1.0, "FP32"), "top_p": (1.0, "FP32"), "top_k": (0, "INT32")}
    assert wire(temperature=0.7, top_p=0.9, top_k=40, seed=-1)["seed"] == ((1 << 64) - 1, "UINT64")
    assert wire(temperature=0.7, top_k=-1)["top_k"] == (0, "INT32")
    # temperature 0 (or top_k 1) is greedy: top_k 1 alone, whatever else was sent
    assert wire(temperature=0, top_p=0.5) == {"top_k": (1, "INT32")}
    assert wire(top_k=1) == {"top_k": (1, "INT32")}
    assert wire(temperature=0, presence_penalty=0.5, repetition_penalty=1.2) == {
        "top_k": (1, "INT32"), "presence_penalty": (0.5, "FP32"), "repetition_penalty": (1.2, "FP32")}
    for bad in ({"temperature": 3}, {"top_p": 1.5}, {"presence_penalty": 9}, {"repetition_penalty": 0},
                {"top_k": -2}, {"temperature": float("nan")}):
        with pytest.raises(ApiError) as caught:
            wire(**bad)
        assert caught.value.status == 400 and caught.value.param == next(iter(bad))


def test_token_limits_name_the_parameter():
    req = ChatRequest(model="m", messages=[{"role": "user", "content": "x"}], min_tokens=5)
    assert token_limit(req, None, 24, 24, "max_tokens") == 24
    for asked, words in ((0, "at least 1"), (25, "limit of 24"), (4, "min_tokens")):
        with pytest.raises(ApiError) as caught:
            token_limit(req, asked, 24, 24, "max_completion_tokens")
        assert words in caught.value.message
        assert caught.value.param == ("min_tokens" if asked == 4 else "max_completion_tokens")


@pytest.mark.parametrize("body, param", [
    ({"n": 2}, "n"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"guided_whitespace_pattern": "[ ]*"}, "guided_whitespace_pattern"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
])
def test_unsupported_chat_parameters_are_refused_by_name(body, param):
    req = parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}], **body})
    with pytest.raises(ApiError) as caught:
        req.refuse_unsupported()
        req.plain_messages()
    assert caught.value.status == 400 and caught.value.param == param
    assert caught.value.body()["error"]["param"] == param


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize("body, wire", [
    ({}, None),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, ("json", "")),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     ("json_schema", json.dumps(SCHEMA))),
    ({"guided_json": SCHEMA}, ("json_schema", json.dumps(SCHEMA))),
    ({"guided_json": json.dumps(SCHEMA)}, ("json_schema", json.dumps(SCHEMA))),
    ({"guided_regex": "[a-z]+"}, ("regex", "[a-z]+")),
    ({"guided_choice": ["yes", 'say "no"', "yes"]}, ("ebnf_grammar", 'root ::= "yes" | "say \\"no\\""')),
    ({"guided_grammar": 'root ::= "a"'}, ("ebnf_grammar", 'root ::= "a"')),
    ({"structured_outputs": {"regex": "[0-9]+"}}, ("regex", "[0-9]+")),
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}}, ("json_schema", json.dumps(SCHEMA))),
])
def test_structured_output_becomes_the_wire_s_guide(body, wire):
    for kind, extra in ((ChatRequest, {"messages": [{"role": "user", "content": "x"}]}), (CompletionRequest,
                                                                                         {"prompt": "x"})):
        req = parse(kind, {"model": "m", **extra, **body})
        req.refuse_unsupported()
        assert guide(req) == wire


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format", "type 'yaml'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": "{x"}}},
     "response_format.json_schema.schema", "is not JSON"),
    ({"guided_json": [1]}, "guided_json", "must be a JSON schema"),
    ({"guided_choice": []}, "guided_choice", "non-empty list"),
    ({"guided_regex": ""}, "guided_regex", "non-empty string"),
    ({"guided_regex": "a", "guided_json": SCHEMA}, "guided_regex", "one kind of structured output"),
    ({"response_format": {"type": "json_object"}, "guided_grammar": "root ::= \"a\""}, "guided_grammar",
     "not response_format and guided_grammar"),
    ({"structured_outputs": {"xml": "x"}}, "structured_outputs.xml", "send json"),
])
def test_structured_output_mistakes_name_the_parameter(body, param, words):
    req = parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}], **body})
    with pytest.raises(ApiError) as caught:
        guide(req)
    assert caught.value.status == 400 and caught.value.param == param and words in caught.value.message


def test_choices_are_exact_strings_of_a_grammar():
    xgrammar = pytest.importorskip("xgrammar")
    choices = ['a"b\\c', "two\nlines", "日本 🍌", "tab\there\x01"]
    grammar = xgrammar.Grammar.from_ebnf(choice_grammar(choices, "guided_choice"))
    info = xgrammar.TokenizerInfo([chr(c) for c in range(32, 127)] + ["\n", "\t", "\x01"] + list("日本🍌"))
    compiled = xgrammar.GrammarCompiler(info).compile_grammar(grammar)
    for text in choices + ["a", "two"]:
        matcher = xgrammar.GrammarMatcher(compiled, terminate_without_stop_token=True)
        assert (matcher.accept_string(text) and matcher.is_completed()) == (text in choices), text


def test_requests_that_do_not_validate_name_the_field():
    for body, param in (({"model": "m"}, "prompt"), ({"prompt": "x"}, "model"), ({"model": "m", "prompt": "x",
                        "max_tokens": "many"}, "max_tokens")):
        with pytest.raises(ApiError) as caught:
            parse(CompletionRequest, body)
        assert caught.value.status == 400 and caught.value.param == param, caught.value.message
    with pytest.raises(ApiError, match="token ids"):
        parse(CompletionRequest, {"model": "m", "prompt": [1, 2, 3]}).prompts()
    parts = parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert parts.plain_messages() == [{"role": "user", "content": "ab"}]


def test_stop_strings_are_cut_and_held_back_while_streaming():
    text = "Hello world. Stop here please"
    for size in (1, 2, 3, 5, len(text)):
        matcher = StopMatcher(["Stop", "never"])
        out = "".join(matcher.feed(text[i:i + size]) for i in range(0, len(text), size))
        assert out == "Hello world. " and matcher.stopped, size
    matcher = StopMatcher(["never"])
    out = "".join(matcher.feed(c) for c in "a nev")
    assert out == "a " and matcher.flush() == "nev" and not matcher.stopped


def test_finish_reasons():
    assert finish_reason("length", 16, 16) == "length"
    for engine in ("end", "stop", "cancelled"):
        assert finish_reason(engine, 16, 16) == "stop"
    # an ensemble without the finish_reason output: judged by the token count
    assert finish_reason(None, 16, 16) == "length" and finish_reason(None, 3, 16) == "stop"


def test_logprobs_shapes():
    lp = TokenLogprobs()
    lp.extend([" Hel", "lo", "", "🍌"], [-0.5, -1.0, -2.0, -3.0])
    completion = lp.completion(offset=5, top=1)
    assert completion["text_offset"] == [5, 9, 11, 11] and completion["top_logprobs"][1] == {"lo": -1.0}
    assert lp.completion(0, 0)["top_logprobs"] is None
    chat = lp.chat(top=2)
    assert chat[3]["bytes"] == list("🍌".encode()) and chat[0]["top_logprobs"][0]["token"] == " Hel"
    lp.cut(len(" Hello"))
    assert lp.tokens == [" Hel", "lo", ""]


def test_a_repository_says_what_it_serves(tmp_path):
    ckpt = write_demo_checkpoint(tmp_path / "ckpt", hidden=32, layers=1)
    spec = RepoSpec(name="tiny", max_batch_size=2, max_input_len=40, max_output_len=12, device="cpu")
    repo = build_repository(ckpt, tmp_path / "repo", spec, force=False, progress=False)
    catalog = catalog_from_repository(repo)
    model, lora = catalog.resolve("tiny")
    assert (model.max_input_len, model.max_output_len, lora) == (40, 12, None)
    assert model.chat_template == CHAT_TEMPLATE and model.special_tokens["bos_token"] == "<s>"
    with pytest.raises(ApiError) as caught:
        catalog.resolve("tiny/1")
    assert caught.value.status == 404 and "served here: tiny" in caught.value.message
    # the tokenizer folder is a Hugging Face tokenizer directory that carries the template
    config = json.loads((repo / "tiny_preprocessing" / "1" / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE


def test_the_openai_command_says_what_is_wrong_in_one_line(tmp_path):
    import socket

    from click.testing import CliRunner

    from tritonize.cli.openai import openai as openai_command
    from tritonize.serving.server import free_port

    runner = CliRunner()
    (tmp_path / "not-a-repo").mkdir()
    result = runner.invoke(openai_command, ["--repository", str(tmp_path / "not-a-repo"), "--port", str(free_port())])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "tritonize repository" in result.output
    assert len(result.output.strip().splitlines()) == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(openai_command, ["--port", str(port)])
    assert result.exit_code == 1 and result.output.strip() == (
        f"Error: port {port} on 127.0.0.1 is in use: pass another --openai-port / --port, or stop what listens there")
