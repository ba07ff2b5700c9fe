"""The wire facts of tensorrtllm_backend's ensemble, through a real tritonserver and tritonclient.

A repository named ``ensemble`` (the name tensorrtllm_backend's clients call by default) of a tiny Llama
is asked the way NVIDIA's ``end_to_end_grpc_client.py`` asks: inputs of shape [1, 1] (or [N, 1] with
``--batch-inputs``), temperature 1.0 and no top-k / top-p (greedy, by TensorRT-LLM's rule), the
outputs that client reads. Text is compared with transformers' greedy generation on the same weights.
"""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request

import numpy as np
import pytest
import sentencepiece as spm
import torch

from tritonize.export.demo_model import write_demo_checkpoint
from tritonize.repository.build import build_repository
from tritonize.repository.spec import RepoSpec

transformers = pytest.importorskip("transformers")
grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
pytestmark = pytest.mark.e2e

PROMPTS = ["What is the color of a banana?", "The capital of France is", "A"]
MAX_TOKENS = 12
PERF = {"kv_cache_alloc_new_blocks": np.int32, "kv_cache_reused_blocks": np.int32,
        "kv_cache_alloc_total_blocks": np.int32, "arrival_time_ns": np.int64, "first_scheduled_time_ns": np.int64,
        "first_token_time_ns": np.int64, "last_token_time_ns": np.int64, "acceptance_rate": np.float32,
        "total_accepted_draft_tokens": np.int32, "total_draft_tokens": np.int32}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("wire") / "ckpt", hidden=64, layers=2, seed=3)


@pytest.fixture(scope="module")
def server(triton_server, ckpt, tmp_path_factory):
    spec = RepoSpec(name="ensemble", max_batch_size=8, max_input_len=48, max_output_len=24, device="cpu",
                    dtype="float32")
    repo = build_repository(ckpt, tmp_path_factory.mktemp("wire-repo") / "repo", spec, force=False, progress=False)
    return triton_server(repo)


@pytest.fixture(scope="module")
def greedy(ckpt):
    """transformers' greedy continuation of a prompt (the text after it), on the same weights and ids."""
    model = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    cache: dict[str, str] = {}

    def text(prompt: str) -> str:
        if prompt not in cache:
            ids = [sp.bos_id(), *sp.encode(prompt)]
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                     eos_token_id=2, pad_token_id=2)
            new = out[0, len(ids):].tolist()
            new = new[: new.index(2)] if 2 in new else new
            whole, head = sp.decode(ids + new), sp.decode(ids)
            cache[prompt] = whole[len(head):]
        return cache[prompt]

    return text


def _tensor(name: str, array: np.ndarray):
    dtype = {np.dtype(np.object_): "BYTES", np.dtype(np.bool_): "BOOL", np.dtype(np.int32): "INT32",
             np.dtype(np.uint64): "UINT64", np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16"}[array.dtype]
    tensor = grpcclient.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def client_inputs(prompts: list[str], *, stream: bool = False, **extra) -> list:
    """What end_to_end_grpc_client.py sends (its defaults: temperature 1.0, beam_width 1, no top-k / top-p),
    one row per prompt, plus ``extra`` inputs ({name: value}, one value for every row)."""
    n = len(prompts)
    arrays = {
        "text_input": np.array([[p.encode()] for p in prompts], dtype=np.object_),
        "max_tokens": np.full((n, 1), MAX_TOKENS, dtype=np.int32),
        "stream": np.full((n, 1), stream, dtype=np.bool_),
        "beam_width": np.ones((n, 1), dtype=np.int32),
        "temperature": np.ones((n, 1), dtype=np.float32),
        "exclude_input_in_output": np.zeros((n, 1), dtype=np.bool_),
    }
    for name, value in extra.items():
        arrays[name] = np.full((n, 1), value, dtype=np.asarray(value).dtype)
    return [_tensor(name, array) for name, array in arrays.items()]


def stream_request(server, inputs, outputs=None, *, timeout: float = 60) -> list:
    """Every response of one request on a gRPC stream, up to the final one: results, or the error message.

    The stream is closed without cancelling (stop_stream), as end_to_end_grpc_client.py closes it.
    """
    responses: queue.Queue = queue.Queue()
    got: list = []
    with grpcclient.InferenceServerClient(server.grpc_endpoint) as client:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        requested = [grpcclient.InferRequestedOutput(name) for name in outputs] if outputs else None
        client.async_stream_infer("ensemble", inputs, outputs=requested, enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=timeout)
            if error is not None:
                got.append(error.message())
                break
            final = result.get_response().parameters["triton_final_response"].bool_param
            if result.get_response().outputs:
                got.append(result)
            else:
                assert final, "a response without outputs that is not the final one"
            if final:
                break
        client.stop_stream()
    return got


def _text(result) -> str:
    out = result.as_numpy("text_output")
    assert out.shape == (1,), out.shape  # one string per response, as tensorrtllm_backend's postprocessing
    return out[0].decode("utf-8")  # what end_to_end_grpc_client.py does with it


def _index(result, name: str) -> int:
    value = result.as_numpy(name)
    if value is None:
        return 0  # what end_to_end_grpc_client.py assumes when the output is absent
    assert value.shape == (1, 1) and value.dtype == np.int32, (name, value.shape, value.dtype)
    return int(value[0][0])


def test_the_clients_defaults_give_the_greedy_text_with_the_prompt(server, greedy):
    [result] = stream_request(server, client_inputs([PROMPTS[0]]))
    assert _text(result) == PROMPTS[0] + greedy(PROMPTS[0])
    assert result.as_numpy("batch_index") is None and result.as_numpy("sequence_index") is None
    [excluded] = stream_request(server, client_inputs([PROMPTS[0]], exclude_input_in_output=True))
    assert _text(excluded) == greedy(PROMPTS[0])
    # -n 1: num_return_sequences is declared and 1 is the request it is without it
    [one] = stream_request(server, client_inputs([PROMPTS[0]], num_return_sequences=np.int32(1)))
    assert _text(one) == _text(result)


def test_streamed_pieces_concatenate_to_the_greedy_text(server, greedy):
    results = stream_request(server, client_inputs([PROMPTS[1]], stream=True))
    assert len(results) > 1
    assert "".join(_text(r) for r in results) == greedy(PROMPTS[1])


def test_batched_inputs_answer_each_prompt_with_its_batch_index(server, greedy):
    for stream in (False, True):
        results = stream_request(server, client_inputs(PROMPTS, stream=stream), ["text_output", "batch_index"])
        texts = {i: "" for i in range(len(PROMPTS))}
        for result in results:
            texts[_index(result, "batch_index")] += _text(result)
        want = {i: (p if not stream else "") + greedy(p) for i, p in enumerate(PROMPTS)}
        assert texts == want, stream
        if not stream:
            assert len(results) == len(PROMPTS)


def test_num_return_sequences_are_independent_seeded_samples(server):
    def ask(n: int, seed: int) -> dict[int, str]:
        inputs = client_inputs([PROMPTS[2]], num_return_sequences=np.int32(n), top_k=np.int32(50),
                               random_seed=np.uint64(seed))
        results = stream_request(server, inputs)
        assert len(results) == n
        return {_index(r, "sequence_index"): _text(r) for r in results}

    three = ask(3, 7)
    assert sorted(three) == [0, 1, 2]
    assert ask(3, 7) == three  # the same seed, the same sequences
    assert len(set(three.values())) > 1  # each sequence draws on its own
    assert ask(1, 7) == {0: three[0]}  # sequence 0 is what the request gives alone


def test_log_probs_have_the_references_shapes(server):
    [result] = stream_request(server, client_inputs([PROMPTS[0]], return_log_probs=True))
    log_probs, cum = result.as_numpy("output_log_probs"), result.as_numpy("cum_log_probs")
    n = int(result.as_numpy("num_output_tokens")[0][0])
    assert log_probs.shape == (1, 1, n) and cum.shape == (1, 1)
    assert (log_probs <= 0).all() and cum[0][0] == pytest.approx(float(log_probs.sum()), rel=1e-4)


def test_perf_metrics_on_every_response(server):
    long_prompt = " ".join(["banana"] * 20)  # 41 tokens: two full KV blocks of 16 and a part
    for stream in (False, True):
        results = stream_request(server, client_inputs([long_prompt], stream=stream, return_perf_metrics=True))
        for result in results:
            for name, dtype in PERF.items():
                value = result.as_numpy(name)
                assert value is not None and value.shape == (1, 1) and value.dtype == dtype, name
        last = {name: results[-1].as_numpy(name)[0][0] for name in PERF}
        assert 0 < last["arrival_time_ns"] <= last["first_scheduled_time_ns"] <= last["first_token_time_ns"]
        assert last["first_token_time_ns"] <= last["last_token_time_ns"]
        assert last["kv_cache_alloc_total_blocks"] == last["kv_cache_alloc_new_blocks"] + last["kv_cache_reused_blocks"]
        assert last["kv_cache_alloc_total_blocks"] >= 3
        assert last["acceptance_rate"] == 0 and last["total_draft_tokens"] == 0
    # The second time the same prompt comes, its full blocks come from the prefix cache.
    assert last["kv_cache_reused_blocks"] >= 2
    [plain] = stream_request(server, client_inputs([PROMPTS[0]]))
    assert all(plain.as_numpy(name) is None for name in PERF)


@pytest.mark.parametrize(("name", "array", "message"), [
    ("return_context_logits", np.array([[True]]), "return_context_logits is not supported"),
    ("return_generation_logits", np.array([[True]]), "return_generation_logits is not supported"),
    ("decoder_text_input", np.array([[b"hello"]], dtype=np.object_), "decoder_text_input is not supported"),
    ("embedding_bias_words", np.array([[b"the"]], dtype=np.object_), "embedding_bias_words is not supported"),
    ("beam_width", np.array([[2]], dtype=np.int32), "beam_width 2 is not supported"),
    ("num_return_sequences", np.array([[0]], dtype=np.int32), "num_return_sequences is 0"),
    ("num_return_sequences", np.array([[9]], dtype=np.int32), "num_return_sequences is 9: ask for 1 to 8"),
])
def test_what_the_repository_cannot_honour_is_refused_by_name(server, name, array, message):
    inputs = [t for t in client_inputs([PROMPTS[0]]) if t.name() != name] + [_tensor(name, array)]
    [answer] = stream_request(server, inputs)
    assert isinstance(answer, str) and message in answer, answer


def test_lora_weights_sent_with_a_request_are_refused_by_name(server):
    inputs = client_inputs([PROMPTS[0]]) + [_tensor("lora_weights", np.ones((1, 2, 8), dtype=np.float16)),
                                            _tensor("lora_config", np.zeros((1, 2, 3), dtype=np.int32))]
    [answer] = stream_request(server, inputs)
    assert isinstance(answer, str) and "lora_weights is not supported" in answer


def test_false_flags_and_empty_texts_are_no_use_of_a_refused_input(server, greedy):
    inputs = client_inputs([PROMPTS[0]], return_context_logits=False, return_generation_logits=False) + [
        _tensor("decoder_text_input", np.array([[b""]], dtype=np.object_))]
    [result] = stream_request(server, inputs)
    assert _text(result) == PROMPTS[0] + greedy(PROMPTS[0])


# --- a request without a required input: an error naming it, on every door ----------------------------


@pytest.mark.parametrize("missing", ["max_tokens", "text_input"])
def test_a_missing_input_is_named_on_the_grpc_stream(server, missing):
    for stream in (False, True):
        inputs = [t for t in client_inputs([PROMPTS[0]], stream=stream) if t.name() != missing]
        [answer] = stream_request(server, inputs)
        assert isinstance(answer, str) and f"{missing} is required and missing" in answer, answer


def _post(server, path: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{server.http_endpoint}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.parametrize("body", [{"text_input": "Hi"}, {"text_input": "Hi", "stream": False},
                                  {"text_input": "Hi", "temperature": 1.0, "exclude_input_in_output": True}])
def test_a_missing_max_tokens_is_an_http_error_on_generate(server, body):
    for endpoint in ("generate", "generate_stream"):
        status, text = _post(server, f"/v2/models/ensemble/{endpoint}", body)
        assert status == 400, (endpoint, status, text)
        assert "max_tokens is required and missing" in text


def test_a_missing_max_tokens_is_an_http_error_on_infer(server):
    body = {"inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": ["Hi"]},
                       {"name": "temperature", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}
    status, text = _post(server, "/v2/models/ensemble_sync/infer", body)
    assert status == 400, (status, text)
    assert "max_tokens is required and missing" in json.loads(text)["error"]


# --- the other doors keep working with the new shapes -----------------------------------------------


def test_http_generate_answers_text(server, greedy):
    status, text = _post(server, "/v2/models/ensemble/generate",
                         {"text_input": PROMPTS[1], "max_tokens": MAX_TOKENS, "temperature": 1.0})
    assert status == 200 and json.loads(text)["text_output"] == PROMPTS[1] + greedy(PROMPTS[1])


def test_the_sync_door_joins_a_batch_in_order(server, greedy):
    with httpclient.InferenceServerClient(server.http_endpoint) as client:
        def make(name, array, dtype):
            tensor = httpclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            return tensor

        inputs = [make("text_input", np.array([[p.encode()] for p in PROMPTS], dtype=np.object_), "BYTES"),
                  make("max_tokens", np.full((len(PROMPTS), 1), MAX_TOKENS, dtype=np.int32), "INT32"),
                  make("exclude_input_in_output", np.ones((len(PROMPTS), 1), dtype=np.bool_), "BOOL")]
        result = client.infer("ensemble_sync", inputs)
    texts = result.as_numpy("text_output")
    assert texts.shape == (len(PROMPTS),)
    assert [t.decode() for t in texts] == [greedy(p) for p in PROMPTS]
    assert result.as_numpy("batch_index").reshape(-1).tolist() == [0, 1, 2]
    assert result.as_numpy("num_output_tokens").shape == (len(PROMPTS), 1)


def test_query_prints_the_servers_message_alone_on_every_door(server):
    from click.testing import CliRunner

    from tritonize.cli.main import cli

    for url in (server.grpc_endpoint, f"http://{server.http_endpoint}"):
        for stream in ("--stream", "--no-stream"):
            result = CliRunner().invoke(cli, ["query", "-m", "ensemble", "-p", "Hi", "-u", url, "--max-tokens", "99",
                                              stream])
            assert result.exit_code == 1
            assert result.output == ("Error: in ensemble 'ensemble', max_tokens is 99, more than this model's "
                                     "max_output_len of 24: ask for fewer, or regenerate the repository with a "
                                     "larger --max-output-len\n"), (url, stream, result.output)
