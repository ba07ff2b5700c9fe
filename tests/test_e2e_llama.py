"""End to end: a Llama checkpoint served by a real tritonserver answers as transformers does.

The served greedy text must equal transformers `generate` on the same weights and token ids
(float32, CPU), over every door a client can use: gRPC streaming (streamed or not), HTTP
/generate and /generate_stream, and HTTP /infer on the non-decoupled ``_sync`` model.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from tritonize.export.demo_model import write_demo_checkpoint
from tritonize.repository.build import build_repository
from tritonize.repository.spec import RepoSpec
from tritonize.serving.client import GenerateOptions, QueryError, grpc_generate, http_generate

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.e2e

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "nemo2-llama"
PROMPTS = [
    "What is the color of a banana?",
    "Once upon a time",
    "The quick brown fox jumps over the lazy dog and then",
    "1, 2, 3,",
    "Ünïcödé 日本語 🍌",
    "def fibonacci(n):",
    "A",
    "In the beginning God created the heavens and the earth. And the earth was without form",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_demo_checkpoint(tmp_path_factory.mktemp("llama") / "ckpt", hidden=64, layers=2, seed=3)


@pytest.fixture(scope="module")
def repo(ckpt, tmp_path_factory) -> Path:
    spec = RepoSpec(name="tiny", max_batch_size=8, max_input_len=48, max_output_len=24, device="cpu",
                    dtype="float32")
    return build_repository(ckpt, tmp_path_factory.mktemp("repo") / "repo", spec, force=False, progress=False)


@pytest.fixture(scope="module")
def server(triton_server, repo):
    return triton_server(repo)


@pytest.fixture(scope="module")
def reference(ckpt):
    """transformers on the same weights, fed the same ids the SentencePiece model gives."""
    model = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))

    def generate(prompt: str, max_new: int) -> tuple[list[int], list[int]]:
        ids = [sp.bos_id(), *sp.encode(prompt)]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=2, pad_token_id=2)
        new = out[0, len(ids):].tolist()
        if 2 in new:
            new = new[: new.index(2)]
        return ids, new

    def text(ids: list[int], new: list[int]) -> str:
        whole, head = sp.decode(ids + new), sp.decode(ids)
        assert whole.startswith(head)
        return whole[len(head):]

    return generate, text


def _expected(reference, prompt: str, max_new: int) -> str:
    generate, text = reference
    ids, new = generate(prompt, max_new)
    return text(ids, new)


def test_greedy_matches_transformers_over_grpc(server, reference):
    for prompt in PROMPTS[:4]:
        got = grpc_generate(server.grpc_endpoint, "tiny", prompt, GenerateOptions(max_tokens=16))
        assert got.text == _expected(reference, prompt, 16), prompt
        generate, _ = reference
        ids, new = generate(prompt, 16)
        assert got.num_input_tokens == len(ids)
        assert got.num_output_tokens == len(new)


def test_stream_pieces_concatenate_to_the_same_text(server, reference):
    for prompt in (PROMPTS[0], PROMPTS[4]):
        streamed = grpc_generate(server.grpc_endpoint, "tiny", prompt, GenerateOptions(max_tokens=20), stream=True)
        assert "".join(streamed.pieces) == _expected(reference, prompt, 20)
        # one response per token, or several tokens in one when the sender falls behind the engine
        assert 1 < len(streamed.pieces) <= streamed.num_output_tokens


def test_http_generate_endpoints(server, reference):
    expected = _expected(reference, PROMPTS[1], 12)
    got = http_generate(server.http_endpoint, "tiny", PROMPTS[1], GenerateOptions(max_tokens=12))
    assert got.text == expected
    streamed = http_generate(server.http_endpoint, "tiny", PROMPTS[1], GenerateOptions(max_tokens=12), stream=True)
    assert "".join(streamed.pieces) == expected and len(streamed.pieces) > 1


def test_genai_perf_shaped_request_on_http_infer(server, reference):
    """genai-perf / perf_analyzer without streaming: HTTP /infer on the non-decoupled door."""
    import tritonclient.http as httpclient

    def tensor(name, value, dtype):
        t = httpclient.InferInput(name, [1, 1], dtype)
        t.set_data_from_numpy(np.array([[value]], dtype=np.object_ if dtype == "BYTES" else None))
        return t

    inputs = [
        tensor("text_input", PROMPTS[2].encode(), "BYTES"),
        tensor("max_tokens", np.int32(10), "INT32"),
        tensor("exclude_input_in_output", True, "BOOL"),
        tensor("stream", False, "BOOL"),
        tensor("min_length", np.int32(1), "INT32"),
    ]
    with httpclient.InferenceServerClient(server.http_endpoint) as client:
        result = client.infer("tiny_sync", inputs)
    text = result.as_numpy("text_output").reshape(-1)[0].decode()
    assert text == _expected(reference, PROMPTS[2], 10)
    with httpclient.InferenceServerClient(server.http_endpoint) as client:
        from tritonclient.utils import InferenceServerException

        with pytest.raises(InferenceServerException, match="decoupled"):
            client.infer("tiny", inputs)


def test_include_prompt_in_output(server, reference):
    got = grpc_generate(server.grpc_endpoint, "tiny", PROMPTS[0],
                        GenerateOptions(max_tokens=8, exclude_input_in_output=False))
    assert got.text == PROMPTS[0] + _expected(reference, PROMPTS[0], 8)


def test_concurrent_requests_each_get_their_own_answer(server, reference):
    lengths = [5, 24, 9, 17, 3, 12, 20, 7]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            stream = i % 2 == 0
            got = grpc_generate(server.grpc_endpoint, "tiny", PROMPTS[i], GenerateOptions(max_tokens=lengths[i]),
                                stream=stream)
            results[i] = got.text
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in range(8):
        assert results[i] == _expected(reference, PROMPTS[i], lengths[i]), PROMPTS[i]


def test_sampling_is_reproducible_per_seed(server, reference):
    def ask(**kw):
        return grpc_generate(server.grpc_endpoint, "tiny", PROMPTS[0], GenerateOptions(max_tokens=16, **kw)).text

    a = ask(temperature=1.0, top_k=50, seed=7)
    assert ask(temperature=1.0, top_k=50, seed=7) == a
    others = {ask(temperature=1.0, top_k=50, seed=s) for s in (8, 9, 10)}
    assert others != {a}
    assert ask(top_k=1, temperature=1.0, seed=3) == _expected(reference, PROMPTS[0], 16)
    assert ask(temperature=0.0) == _expected(reference, PROMPTS[0], 16)


def test_stop_words_and_end_id(server, reference):
    generate, text = reference
    ids, new = generate(PROMPTS[3], 16)
    sp = spm.SentencePieceProcessor(model_file=str(server.repo / "tiny_preprocessing" / "1" / "tokenizer" /
                                                   "tokenizer.model"))
    # A stop word: the first later token that is a whole word (starts with the SentencePiece space).
    k = next(i for i in range(2, len(new)) if sp.id_to_piece(new[i]).startswith("\u2581") and
             len(sp.id_to_piece(new[i])) > 1)
    word = sp.id_to_piece(new[k])[1:]
    stop_ids = sp.encode(word)
    cut = next(j for j in range(len(new)) if new[max(0, j - len(stop_ids) + 1): j + 1] == stop_ids)
    got = grpc_generate(server.grpc_endpoint, "tiny", PROMPTS[3], GenerateOptions(max_tokens=16, stop_words=[word]))
    assert got.text == text(ids, new[: cut + 1])
    got = grpc_generate(server.grpc_endpoint, "tiny", PROMPTS[3], GenerateOptions(max_tokens=16, end_id=new[k]))
    first = new.index(new[k])
    assert got.text == text(ids, new[:first])
    assert got.num_output_tokens == first


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "message"),
    [
        ("word " * 100, 8, "max_input_len of 48"),
        ("hello", 25, "max_output_len of 24"),
        ("hello", 0, "at least 1 token"),
        ("", 8, "empty"),
    ],
)
def test_limits_give_clear_errors_and_the_server_stays_up(server, reference, prompt, max_tokens, message):
    with pytest.raises(QueryError, match=message):
        grpc_generate(server.grpc_endpoint, "tiny", prompt, GenerateOptions(max_tokens=max_tokens))
    with pytest.raises(QueryError, match=message):
        http_generate(server.http_endpoint, "tiny", prompt, GenerateOptions(max_tokens=max_tokens))
    assert grpc_generate(server.grpc_endpoint, "tiny", "ok", GenerateOptions(max_tokens=2)).num_output_tokens == 2


def test_beam_width_above_one_is_refused(server):
    import tritonclient.grpc as grpcclient

    from tritonize.serving.client import grpc_inputs

    inputs = grpc_inputs("hello", GenerateOptions(max_tokens=4), stream=False)
    beam = grpcclient.InferInput("beam_width", [1, 1], "INT32")
    beam.set_data_from_numpy(np.array([[2]], dtype=np.int32))
    with grpcclient.InferenceServerClient(server.grpc_endpoint) as client:
        from tritonclient.utils import InferenceServerException

        with pytest.raises(InferenceServerException, match="beam_width 2 is not supported"):
            client.infer("tiny_sync", [*inputs, beam])


@pytest.fixture(scope="module")
def fixture_repo(tmp_path_factory) -> Path:
    if not (FIXTURE / "hf" / "config.json").is_file():
        pytest.skip("the shared NeMo 2 fixture is not beside this checkout")
    hf = tmp_path_factory.mktemp("fixture") / "hf"
    shutil.copytree(FIXTURE / "hf", hf)
    spec = RepoSpec(name="fixture", max_batch_size=4, max_input_len=32, max_output_len=16, device="cpu",
                    dtype="float32")
    return build_repository(hf, tmp_path_factory.mktemp("frepo") / "repo", spec, force=False, progress=False)


def test_real_fixture_with_tokenizer_json_matches_its_reference_outputs(triton_server, fixture_repo):
    """The NeMo 2 fixture's Hugging Face source, with its tokenizer.json: ids and greedy text as recorded."""
    reference = json.loads((FIXTURE / "reference_outputs.json").read_text())
    server = triton_server(fixture_repo)
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(FIXTURE / "hf" / "tokenizer.json"))
    for case in reference["prompts"]:
        got = grpc_generate(server.grpc_endpoint, "fixture", case["prompt"], GenerateOptions(max_tokens=16))
        assert got.num_input_tokens == len(case["input_ids"])
        ids, new = case["input_ids"], case["greedy_new_ids"]
        expected = tok.decode(ids + new, skip_special_tokens=True)[len(tok.decode(ids, skip_special_tokens=True)):]
        assert got.text == expected
        assert got.num_output_tokens == len(new)
