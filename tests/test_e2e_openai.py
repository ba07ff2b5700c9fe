"""End to end: the OpenAI API in front of a real tritonserver, driven by the official `openai` client.

The repository serves a tiny Llama whose checkpoint has a chat template and a Hugging Face tokenizer.json,
one LoRA adapter, and a second model without a chat template. Greedy answers must equal transformers on
the same weights: completions on the tokenizer's ids of the prompt, chat on ``apply_chat_template(...,
add_generation_prompt=True)`` of the same messages; with the adapter, transformers + peft.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from tritonize.export.demo_model import CHAT_TEMPLATE, write_demo_checkpoint
from tritonize.repository.build import build_repository
from tritonize.repository.spec import RepoSpec
from tritonize.serving.openai.options import FrontOptions
from tritonize.serving.openai.runner import OpenAIFront
from tritonize.serving.server import free_port

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytestmark = pytest.mark.e2e

TOKENIZER_JSON = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "nemo2-llama" / "hf" / "tokenizer.json"
PROMPTS = ["What is the color of a banana?", "Once upon a time", "Ünïcödé 日本語 🍌", "1, 2, 3,"]
MESSAGES = [{"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "What is the color of a banana? Ünïcödé 日本語"},
            {"role": "assistant", "content": "Yellow."},
            {"role": "user", "content": "And an apple?"}]
LONG = 1500  # max_output_len: a request that would hold its slot for a few seconds
LORA_ID = 3
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fixtures.adapters import peft_lora

    root = tmp_path_factory.mktemp("openai")
    ckpt = write_demo_checkpoint(root / "ckpt", hidden=64, layers=2, seed=3)
    shutil.copy(TOKENIZER_JSON, ckpt / "tokenizer.json")  # what transformers loads here, and what is served
    base = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    lora = peft_lora(base, target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8, seed=1)
    lora.save_pretrained(root / "peft")
    plain = root / "plain"
    shutil.copytree(ckpt, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    limits = {"max_batch_size": 2, "max_input_len": 96, "max_output_len": LONG, "device": "cpu", "dtype": "float32"}
    repo = build_repository(ckpt, root / "repo", RepoSpec(name="tiny", lora=[(LORA_ID, str(root / "peft"))],
                                                          **limits), force=False, progress=False)
    build_repository(plain, repo, RepoSpec(name="plain", **limits), force=False, progress=False)
    return {"ckpt": ckpt, "repo": repo, "models": {None: base, LORA_ID: lora},
            "tok": tokenizers.Tokenizer.from_file(str(ckpt / "tokenizer.json")),
            "hf_tok": transformers.AutoTokenizer.from_pretrained(ckpt)}


@pytest.fixture(scope="module")
def server(triton_server, setup):
    return triton_server(setup["repo"])


@pytest.fixture(scope="module")
def front(server, setup):
    with OpenAIFront(server.grpc_endpoint, FrontOptions(port=free_port()), repository=setup["repo"]) as f:
        yield f


@pytest.fixture(scope="module")
def client(front):
    with openai.OpenAI(base_url=front.url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def greedy(setup, ids: list[int], max_new: int, lora: int | None = None) -> list[int]:
    with torch.no_grad():
        out = setup["models"][lora].generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                             max_new_tokens=max_new, do_sample=False, eos_token_id=2, pad_token_id=2)
    new = out[0, len(ids):].tolist()
    return new[: new.index(2)] if 2 in new else new


def text_of(setup, ids: list[int], new: list[int]) -> str:
    tok = setup["tok"]
    whole, head = tok.decode(ids + new, skip_special_tokens=True), tok.decode(ids, skip_special_tokens=True)
    assert whole.startswith(head)
    return whole[len(head):]


def prompt_ids(setup, prompt: str) -> list[int]:
    return setup["tok"].encode(prompt).ids


def chat_ids(setup, messages) -> list[int]:
    ids = setup["hf_tok"].apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


# --- models, completions, chat -------------------------------------------------------------------------------
def test_models_lists_every_model_and_adapter(client):
    assert {m.id for m in client.models.list()} == {"tiny", f"tiny/{LORA_ID}", "plain"}
    assert client.models.retrieve(f"tiny/{LORA_ID}").id == f"tiny/{LORA_ID}"


def test_completions_give_transformers_greedy_text_streamed_or_not(client, setup):
    for prompt in PROMPTS:
        ids = prompt_ids(setup, prompt)
        new = greedy(setup, ids, 16)
        expected = text_of(setup, ids, new)
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
        assert got.choices[0].text == expected, prompt
        assert got.choices[0].finish_reason == ("length" if len(new) == 16 else "stop")
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), len(new))
        assert got.usage.total_tokens == len(ids) + len(new)

        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        pieces = [c.choices[0].text for c in chunks if c.choices]
        assert "".join(pieces) == expected and len([p for p in pieces if p]) > 1
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == got.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(new)
        assert all(c.usage is None for c in chunks[:-1])


def test_chat_gives_transformers_greedy_text_on_its_chat_template(client, setup):
    ids = chat_ids(setup, MESSAGES)
    assert ids[0] == 1 and ids[1] != 1  # the template's own BOS, and only that one
    new = greedy(setup, ids, 20)
    expected = text_of(setup, ids, new)
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=20, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == expected
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), len(new))
    assert got.choices[0].finish_reason == ("length" if len(new) == 20 else "stop")

    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == expected and len([p for p in pieces if p]) > 1
    assert chunks[-2].choices[0].finish_reason == got.choices[0].finish_reason
    assert chunks[-1].usage.prompt_tokens == len(ids) and chunks[-1].usage.completion_tokens == len(new)


def test_several_prompts_are_several_choices(client, setup):
    got = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=6, temperature=0)
    assert [c.index for c in got.choices] == [0, 1]
    for choice, prompt in zip(got.choices, PROMPTS[:2]):
        ids = prompt_ids(setup, prompt)
        assert choice.text == text_of(setup, ids, greedy(setup, ids, 6))
    streamed = {0: "", 1: ""}
    for chunk in client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=6, temperature=0, stream=True):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == {0: got.choices[0].text, 1: got.choices[1].text}


def test_echo_and_logprobs_of_the_chosen_tokens(client, setup):
    prompt = PROMPTS[0]
    ids = prompt_ids(setup, prompt)
    new = greedy(setup, ids, 8)
    with torch.no_grad():
        logits = setup["models"][None](torch.tensor([ids + new])).logits[0]
    expected = torch.log_softmax(logits[len(ids) - 1: -1], -1).gather(1, torch.tensor(new)[:, None])[:, 0]

    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, echo=True, logprobs=1)
    choice = got.choices[0]
    assert choice.text == prompt + text_of(setup, ids, new)
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text[len(prompt):] and len(lp.tokens) == len(new)
    np.testing.assert_allclose(lp.token_logprobs, expected.numpy(), atol=2e-3)
    assert lp.text_offset[0] == len(prompt) and lp.top_logprobs[0] == {lp.tokens[0]: lp.token_logprobs[0]}

    chat = client.chat.completions.create(model="tiny", messages=MESSAGES[1:2], max_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 1 and t.top_logprobs[0].token == t.token for t in content)
    assert all(bytes(t.bytes).decode() == t.token for t in content)
    streamed = [t for c in client.chat.completions.create(model="tiny", messages=MESSAGES[1:2], max_tokens=8,
                                                          temperature=0, logprobs=True, stream=True)
                if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]


# --- stop strings, sampling, adapters --------------------------------------------------------------------------
def test_stop_strings_end_the_answer_before_them(client, setup):
    prompt = PROMPTS[3]
    ids = prompt_ids(setup, prompt)
    full = text_of(setup, ids, greedy(setup, ids, 16))
    words = full.split()
    stop = next(w for w in words[1:] if len(w) > 1)  # a later whole word of the answer
    expected = full[: full.index(stop)]
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                    stop=["never in this text", stop])
    assert got.choices[0].text == expected and got.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stop=stop,
                                         stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == expected and chunks[-1].choices[0].finish_reason == "stop"
    # a stop string that spans tokens, cut in the middle of one: still cut, on the text
    middle = full[len(expected) + 1: len(expected) + 3]
    if middle.strip():
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stop=middle)
        assert got.choices[0].text == full[: full.index(middle)] and got.choices[0].finish_reason == "stop"


def test_openai_defaults_sample_and_seeds_reproduce(client, setup):
    def ask(**kw):
        return client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, **kw).choices[0].text

    a = ask(seed=7)  # OpenAI's defaults: temperature 1, top_p 1, i.e. sampling
    assert ask(seed=7) == a
    assert len({ask(seed=s) for s in (8, 9, 10)} | {a}) > 1
    assert ask(seed=7, temperature=0.8, top_p=0.9) == ask(seed=7, temperature=0.8, top_p=0.9)
    ids = prompt_ids(setup, PROMPTS[1])
    assert ask(temperature=0, seed=3) == text_of(setup, ids, greedy(setup, ids, 12))
    assert ask(seed=7, extra_body={"top_k": 1}) == text_of(setup, ids, greedy(setup, ids, 12))
    # vLLM's extensions arrive in extra_body
    got = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                    extra_body={"min_tokens": 12, "repetition_penalty": 1.3})
    assert got.usage.completion_tokens == 12


def test_lora_adapters_are_model_names(client, setup):
    for prompt in PROMPTS[:2]:
        ids = prompt_ids(setup, prompt)
        adapted = text_of(setup, ids, greedy(setup, ids, 12, lora=LORA_ID))
        assert adapted != text_of(setup, ids, greedy(setup, ids, 12))
        got = client.completions.create(model=f"tiny/{LORA_ID}", prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == adapted and got.model == f"tiny/{LORA_ID}"
    with pytest.raises(openai.NotFoundError, match="tiny/9"):
        client.completions.create(model="tiny/9", prompt="x", max_tokens=2)


# --- errors, key, limits ---------------------------------------------------------------------------------------
def _error(call):
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    body = caught.value.body
    return caught.value.status_code, body.get("param") if isinstance(body, dict) else None, str(caught.value)


def test_errors_are_openai_shaped_and_name_the_parameter(client):
    chat = client.chat.completions.create
    one = [{"role": "user", "content": "hi"}]
    assert _error(lambda: chat(model="tiny", messages=one, n=2))[:2] == (400, "n")
    assert _error(lambda: chat(model="tiny", messages=one, logit_bias={"5": 2}))[:2] == (400, "logit_bias")
    assert _error(lambda: chat(model="tiny", messages=one, tools=[
        {"type": "function", "function": {"name": "f", "parameters": {}}}]))[:2] == (400, "tools")
    assert _error(lambda: chat(model="tiny", messages=one, max_tokens=LONG + 1))[:2] == (400, "max_tokens")
    assert _error(lambda: chat(model="nope", messages=one))[:2] == (404, "model")
    status, param, text = _error(lambda: chat(model="tiny", messages=one * 2))
    assert (status, param) == (400, "messages") and "alternate" in text
    status, param, text = _error(lambda: chat(model="plain", messages=one))
    assert (status, param) == (400, "messages") and "no chat template" in text
    assert client.completions.create(model="plain", prompt="hi", max_tokens=2, temperature=0).usage.completion_tokens == 2
    status, _, text = _error(lambda: client.completions.create(model="tiny", prompt="word " * 200, max_tokens=2))
    assert status == 400 and "max_input_len of 96" in text
    assert _error(lambda: client.completions.create(model="tiny", prompt=[5, 6], max_tokens=2))[:2] == (400, "prompt")


def _post(url: str, body, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_api_key_body_limit_and_the_server_s_own_configs(server):
    """A second front, as `tritonize openai --url` runs it without a repository: the models come from the
    server's configs; this one requires a key and reads small bodies only."""
    options = FrontOptions(port=free_port(), api_key=KEY, max_request_bytes=4096)
    with OpenAIFront(server.grpc_endpoint, options) as keyed:
        with openai.OpenAI(base_url=keyed.url, api_key="wrong", max_retries=0) as wrong:
            with pytest.raises(openai.AuthenticationError):
                wrong.models.list()
        status, body = _post(f"{keyed.url}/completions", b'{"model": "tiny", "prompt": "x"}')
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        with openai.OpenAI(base_url=keyed.url, api_key=KEY, max_retries=0) as right:
            assert {m.id for m in right.models.list()} == {"tiny", f"tiny/{LORA_ID}", "plain"}
            got = right.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=3, temperature=0)
            assert got.usage.completion_tokens == 3
        auth = {"Authorization": f"Bearer {KEY}"}
        big = json.dumps({"model": "tiny", "prompt": "x" * 5000}).encode()
        status, body = _post(f"{keyed.url}/completions", big, auth)
        assert status == 413 and "4096 bytes" in body["error"]["message"]
        status, body = _post(f"{keyed.url}/completions", iter([big[:3000], big[3000:]]), auth)  # chunked, no length
        assert status == 413 and body["error"]["code"] == "request_too_large"
        status, body = _post(f"{keyed.url}/completions", b"{not json", auth)
        assert status == 400 and "not JSON" in body["error"]["message"]
        with urllib.request.urlopen(keyed.url.removesuffix("/v1") + "/health", timeout=10) as health:
            assert health.status == 200  # no key needed: for load balancers' probes


def test_a_server_that_is_not_up_is_a_503():
    with OpenAIFront(f"127.0.0.1:{free_port()}", FrontOptions(port=free_port())) as front:
        with openai.OpenAI(base_url=front.url, api_key="x", max_retries=0) as c:
            with pytest.raises(openai.APIStatusError) as caught:
                c.completions.create(model="tiny", prompt="x", max_tokens=2)
            assert caught.value.status_code == 503
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(front.url.removesuffix("/v1") + "/health", timeout=10)
        assert caught.value.code == 503


# --- clients that go away ----------------------------------------------------------------------------------------
def _timed_short_request(client) -> float:
    start = time.perf_counter()
    got = client.completions.create(model="tiny", prompt="next please", max_tokens=4, temperature=0)
    assert got.usage.completion_tokens == 4
    return time.perf_counter() - start


def test_clients_that_go_away_free_their_slots(client, front):
    """Both engine slots taken by long answers whose clients leave: the next request is served at once."""
    start = time.perf_counter()
    full = client.completions.create(model="tiny", prompt="how long is this", max_tokens=LONG, temperature=0,
                                     extra_body={"min_tokens": LONG})
    full_time = time.perf_counter() - start
    assert full.usage.completion_tokens == LONG
    _timed_short_request(client)

    # streams closed after a few chunks
    streams = [client.completions.create(model="tiny", prompt=f"leave {i}", max_tokens=LONG, temperature=0,
                                         stream=True, extra_body={"min_tokens": LONG}) for i in range(2)]
    for stream in streams:
        for _, _chunk in zip(range(3), stream):
            pass
    for stream in streams:
        stream.close()
    assert _timed_short_request(client) < full_time / 2

    # requests that do not stream, whose clients time out
    def impatient(i: int) -> None:
        with openai.OpenAI(base_url=front.url, api_key="x", max_retries=0, timeout=full_time / 4) as c:
            with pytest.raises(openai.APITimeoutError):
                c.completions.create(model="tiny", prompt=f"wait {i}", max_tokens=LONG, temperature=0,
                                     extra_body={"min_tokens": LONG})

    threads = [threading.Thread(target=impatient, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    time.sleep(0.2)
    assert _timed_short_request(client) < full_time / 2


# --- what Triton's own OpenAI frontend needs of the repository ---------------------------------------------------
def test_the_repository_answers_triton_s_openai_frontend(server, setup):
    """The requests that frontend makes for TensorRT-LLM models (its inputs, shapes and types), made with
    tritonclient since the frontend itself needs Triton's in-process bindings: one response when not
    streaming, deltas when streaming, refusals by name of what is not served yet."""
    import queue

    import tritonclient.grpc as grpcclient

    def tensor(name, array, dtype):
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    def frontend_inputs(stream: bool, **extra):
        inputs = [
            tensor("text_input", np.array([[PROMPTS[0].encode()]], dtype=np.object_), "BYTES"),
            tensor("stream", np.array([[stream]]), "BOOL"),
            tensor("max_tokens", np.array([[10]], dtype=np.int32), "INT32"),
            tensor("stop_words", np.array([[b"never"]], dtype=np.object_), "BYTES"),
            tensor("top_p", np.array([[1.0]], dtype=np.float32), "FP32"),
            tensor("temperature", np.array([[1.0]], dtype=np.float32), "FP32"),
            tensor("frequency_penalty", np.array([[0.0]], dtype=np.float32), "FP32"),
            tensor("presence_penalty", np.array([[0.0]], dtype=np.float32), "FP32"),
            tensor("seed", np.array([[11]], dtype=np.uint64), "UINT64"),
            tensor("exclude_input_in_output", np.array([[True]]), "BOOL"),
            tensor("lora_task_id", np.array([[LORA_ID]], dtype=np.uint64), "UINT64"),
            tensor("return_num_input_tokens", np.array([[True]]), "BOOL"),
            tensor("return_num_output_tokens", np.array([[True]]), "BOOL"),
        ]
        inputs += [tensor(name, array, dtype) for name, (array, dtype) in extra.items()]
        return inputs

    def responses(inputs):
        answers: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(server.grpc_endpoint)
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer("tiny", inputs, enable_empty_final_response=True)
        got = []
        while True:
            result, error = answers.get(timeout=60)
            if error is not None:
                got.append(error)
                break
            got.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        client.stop_stream()
        client.close()
        return got

    single = responses(frontend_inputs(False))
    assert len(single) == 1 and single[0].as_numpy("text_output") is not None
    text = single[0].as_numpy("text_output").reshape(-1)[0].decode()
    assert single[0].as_numpy("finish_reason").reshape(-1)[0] == b"length"
    assert int(single[0].as_numpy("num_output_tokens").reshape(-1)[0]) == 10
    streamed = responses(frontend_inputs(True))
    assert len(streamed) > 2
    assert "".join(r.as_numpy("text_output").reshape(-1)[0].decode() for r in streamed) == text

    # the frontend renders the chat template (its BOS included) and sends the text as it is: one BOS is kept
    ids = chat_ids(setup, MESSAGES)
    rendered = setup["hf_tok"].apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    chat = responses([tensor("text_input", np.array([[rendered.encode()]], dtype=np.object_), "BYTES"),
                      tensor("max_tokens", np.array([[8]], dtype=np.int32), "INT32"),
                      tensor("stream", np.array([[False]]), "BOOL"),
                      tensor("exclude_input_in_output", np.array([[True]]), "BOOL")])
    assert int(chat[0].as_numpy("num_input_tokens").reshape(-1)[0]) == len(ids)
    assert chat[0].as_numpy("text_output").reshape(-1)[0].decode() == text_of(setup, ids, greedy(setup, ids, 8))

    # structured output as the frontend sends it (json_schema), enforced on this tokenizer.json vocabulary
    guided = {"guided_decoding_guide_type": (np.array([[b"json_schema"]], dtype=np.object_), "BYTES"),
              "guided_decoding_guide": (np.array([[b'{"enum": ["yes", "no"]}']], dtype=np.object_), "BYTES")}
    for stream in (False, True):
        answer = responses(frontend_inputs(stream, **guided))
        assert json.loads("".join(r.as_numpy("text_output").reshape(-1)[0].decode() for r in answer)) in ("yes", "no")
    weights = {"lora_weights": (np.zeros((1, 2, 8), dtype=np.float16), "FP16")}
    assert "lora_weights is not supported" in str(responses(frontend_inputs(False, **weights))[0])

    # its --tokenizer: the repository's tokenizer folder, a Hugging Face tokenizer directory with the template
    folder = setup["repo"] / "tiny_preprocessing" / "1" / "tokenizer"
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf.chat_template == CHAT_TEMPLATE
    assert hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == \
        setup["hf_tok"].apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
