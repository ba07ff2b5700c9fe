"""The Triton model files as Python modules: imported from tritonize with a stand-in for Triton's
``triton_python_backend_utils``, driven through ``initialize`` / ``execute`` on a rendered repository's
own config and files. (The end-to-end tests run the same files inside a real tritonserver.)"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from fixtures import triton_stub
from google.protobuf import json_format

from tritonize.export.demo_model import write_demo_checkpoint
from tritonize.repository.checkpoint import inspect_checkpoint
from tritonize.repository.render import MODEL_FILES, RUNTIME_SRC, parse_config, write_repository
from tritonize.repository.spec import RepoSpec
from tritonize.runtime.packed import METRICS, Packed, pack
from tritonize.runtime.prompt import virtual_tokens
from tritonize.runtime.tokenizer import Tokenizer, response_ids

VOCAB, N_VIRTUAL, TASK = 32000, 5, 3


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("triton-models")
    ckpt = write_demo_checkpoint(work / "ckpt", hidden=32, layers=1, seed=4)
    table = work / "table.npy"
    np.save(table, np.ones((N_VIRTUAL, 32), dtype=np.float32))
    spec = RepoSpec(name="m", max_batch_size=2, max_input_len=24, max_output_len=8, device="cpu",
                    ptuning=[(TASK, str(table))])
    return write_repository(spec, inspect_checkpoint(ckpt), work / "repo", progress=False)


def _load(monkeypatch, repo: Path, folder: str, module: str):
    """A model of ``module`` initialised as Triton would for ``repo/folder`` version 1."""
    triton_stub.install(monkeypatch)
    name = f"tritonize.runtime.triton.{module}"
    monkeypatch.delitem(sys.modules, name, raising=False)
    config = parse_config((repo / folder / "config.pbtxt").read_text())
    args = {"model_config": json_format.MessageToJson(config, preserving_proto_field_name=True),
            "model_repository": str(repo / folder), "model_version": "1", "model_instance_kind": "CPU"}
    model = importlib.import_module(name).TritonPythonModel()
    model.initialize(args)
    return model


def _text(value: str | bytes) -> np.ndarray:
    return np.array([[value.encode() if isinstance(value, str) else value]], dtype=np.object_)


def test_each_model_py_is_its_module_copied_as_it_is(repo):
    for step, file in MODEL_FILES.items():
        assert (repo / f"m_{step}" / "1" / "model.py").read_bytes() == (RUNTIME_SRC / "triton" / file).read_bytes()
    assert not (repo / "m_engine" / "1" / "tritonize_backend" / "triton").exists()


def test_preprocessing_puts_the_tasks_virtual_tokens_before_the_prompt(monkeypatch, repo):
    model = _load(monkeypatch, repo, "m_preprocessing", "preprocessing")
    plain, task = model.execute([
        triton_stub.Request(text_input=_text("Hello world"), max_tokens=np.array([[4]], np.int32)),
        triton_stub.Request(text_input=_text("Hello world"), max_tokens=np.array([[4]], np.int32),
                            task_id=np.array([[TASK]], np.uint64)),
    ])
    ids = Tokenizer(repo / "m_preprocessing" / "1" / "tokenizer").encode("Hello world")
    assert plain.output("input_ids")[0].tolist() == ids
    assert task.output("input_ids")[0].tolist() == virtual_tokens(VOCAB, N_VIRTUAL) + ids
    assert task.output("input_lengths").tolist() == [[N_VIRTUAL + len(ids)]]
    assert task.output("request_output_len").tolist() == [[4]] and task.output("end_ids").tolist() == [[2]]


def test_preprocessing_lays_out_stop_words_as_tensorrtllm_backend(monkeypatch, repo):
    model = _load(monkeypatch, repo, "m_preprocessing", "preprocessing")
    [response] = model.execute([triton_stub.Request(
        text_input=_text("Hi"), max_tokens=np.array([[2]], np.int32),
        stop_words=np.array([[b"world", b"good day"]], dtype=np.object_))])
    tok = Tokenizer(repo / "m_preprocessing" / "1" / "tokenizer")
    first, second = tok.encode("world", add_special_tokens=False), tok.encode("good day", add_special_tokens=False)
    flat, offsets = response.output("stop_words_list")[0].tolist()
    assert flat == first + second
    assert offsets[:2] == [len(first), len(first) + len(second)] and set(offsets[2:]) <= {-1}
    assert response.output("bad_words_list").tolist() == [[[0], [-1]]]


@pytest.mark.parametrize("inputs, message", [
    ({"text_input": _text("Hi"), "max_tokens": np.array([[4]], np.int32), "task_id": np.array([[9]], np.uint64)},
     "task_id 9 has no p-tuning table in this model (it serves: 3)"),
    ({"text_input": _text("word " * 30), "max_tokens": np.array([[4]], np.int32)},
     "more than this model's max_input_len of 24"),
    ({"text_input": _text("Hi"), "max_tokens": np.array([[0]], np.int32)}, "max_tokens is 0: ask for at least 1"),
    ({"text_input": _text(b"\xff\xfe"), "max_tokens": np.array([[1]], np.int32)}, "text_input is not valid UTF-8"),
    ({"text_input": _text("Hi"), "max_tokens": np.array([[1]], np.int32), "task_id": np.array([[TASK]], np.uint64),
      "prompt_embedding_table": np.ones((1, 2, 32), np.float16)}, "send task_id or prompt_embedding_table"),
    ({"text_input": _text("Hi"), "max_tokens": np.array([[1]], np.int32), "guided_decoding_guide_type": _text("xml")},
     "guided_decoding_guide_type 'xml' is not one of json, json_schema, regex, ebnf_grammar, structural_tag"),
    ({"text_input": _text("Hi"), "max_tokens": np.array([[1]], np.int32), "guided_decoding_guide": _text("[a-z]")},
     "guided_decoding_guide was sent without guided_decoding_guide_type"),
    ({"text_input": _text("Hi"), "max_tokens": np.array([[1]], np.int32),
      "guided_decoding_guide_type": _text("json_schema"), "guided_decoding_guide": _text("{oops")},
     "the json_schema guide is not JSON"),
])
def test_preprocessing_refuses_what_the_model_cannot_serve(monkeypatch, repo, inputs, message):
    model = _load(monkeypatch, repo, "m_preprocessing", "preprocessing")
    [response] = model.execute([triton_stub.Request(**inputs)])
    assert response.has_error() and message in response.error().message()


def test_preprocessing_passes_a_well_formed_guide(monkeypatch, repo):
    model = _load(monkeypatch, repo, "m_preprocessing", "preprocessing")
    [response] = model.execute([triton_stub.Request(
        text_input=_text("Hi"), max_tokens=np.array([[2]], np.int32), guided_decoding_guide_type=_text("regex"),
        guided_decoding_guide=_text("[a-z]+"))])
    assert not response.has_error() and response.output("request_output_len").tolist() == [[2]]


def test_postprocessing_streams_text_that_concatenates_to_the_whole(monkeypatch, repo):
    model = _load(monkeypatch, repo, "m_postprocessing", "postprocessing")
    tok = Tokenizer(repo / "m_postprocessing" / "1" / "tokenizer")
    prompt, answer = tok.encode("Say:"), tok.encode("Grüße, 世界! ok", add_special_tokens=False)
    pieces = []
    for i, token in enumerate(answer):
        delta, prefix = response_ids(prompt, answer[: i + 1], [token], stream=True, exclude_input=True)
        final = i == len(answer) - 1
        [response] = model.execute([triton_stub.Request(packed=pack(Packed(
            delta=delta, prefix=prefix, final=final, num_input_tokens=len(prompt), num_output_tokens=i + 1,
            log_probs=[-0.5], cum_log_prob=-0.5 * (i + 1))))])
        pieces.append(response.output("text_output")[0].decode())
        assert response.output("num_output_tokens").tolist() == [[i + 1]]
        assert response.output("output_log_probs").tolist() == [[[-0.5]]]
    whole, head = tok.decode(prompt + answer), tok.decode(prompt)
    assert "".join(pieces) == whole[len(head):]


def test_preprocessing_lays_out_one_row_per_prompt(monkeypatch, repo):
    model = _load(monkeypatch, repo, "m_preprocessing", "preprocessing")
    [response] = model.execute([triton_stub.Request(
        text_input=np.array([[b"Hello world"], [b"Hi"]], dtype=np.object_),
        max_tokens=np.array([[4], [2]], np.int32),
        stop_words=np.array([[b"world", b""], [b"", b""]], dtype=np.object_))])
    tok = Tokenizer(repo / "m_preprocessing" / "1" / "tokenizer")
    long, short = tok.encode("Hello world"), tok.encode("Hi")
    ids = response.output("input_ids")
    assert ids.shape == (2, len(long))
    assert ids[0].tolist() == long and ids[1, : len(short)].tolist() == short
    assert response.output("input_lengths").tolist() == [[len(long)], [len(short)]]
    assert response.output("request_output_len").tolist() == [[4], [2]]
    stops = response.output("stop_words_list")
    world = tok.encode("world", add_special_tokens=False)
    assert stops.shape[:2] == (2, 2) and stops[0, 0, : len(world)].tolist() == world
    assert set(stops[1, 1].tolist()) == {-1}  # the second prompt has no stop word


@pytest.mark.parametrize("missing", ["text_input", "max_tokens"])
def test_preprocessing_names_a_missing_required_input(monkeypatch, repo, missing):
    model = _load(monkeypatch, repo, "m_preprocessing", "preprocessing")
    inputs = {"text_input": _text("Hi"), "max_tokens": np.array([[4]], np.int32), "stream": np.array([[True]])}
    del inputs[missing]
    [response] = model.execute([triton_stub.Request(**inputs)])
    assert response.has_error() and f"{missing} is required and missing" in response.error().message()
    assert response.error().code() == triton_stub.TritonError.INVALID_ARG  # HTTP 400, the client's error


def test_postprocessing_asks_about_cancellation_once_per_interval_per_stream(monkeypatch, repo):
    """Each ``is_cancelled`` is a round trip to the server: a stream is asked once per interval counted from its
    first response, never on the first (its first token waits for no question) nor on every response; a
    cancelled stream is still found (and sent one stop)."""
    model = _load(monkeypatch, repo, "m_postprocessing", "postprocessing")
    module = sys.modules["tritonize.runtime.triton.postprocessing"]
    asked: list[str] = []
    stops: list[str] = []
    monkeypatch.setattr(model, "_stop_engine_request", lambda request, handle: stops.append(request.request_id()))

    class Request(triton_stub.Request):
        def is_cancelled(self) -> bool:
            asked.append(self.request_id())
            return super().is_cancelled()

    def respond(request_id: str, handle: int, final: bool = False, cancelled: bool = False) -> None:
        packed = pack(Packed(delta=[5], prefix=[1], final=final, num_input_tokens=1, num_output_tokens=1,
                             handle=handle))
        [response] = model.execute([Request(request_id, cancelled, packed=packed)])
        assert not response.has_error()

    clock = [100.0]
    monkeypatch.setattr(module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    for _ in range(20):  # two streams, 20 responses each within one interval
        respond("a", 0)
        respond("b", 1)
        clock[0] += module.CANCEL_CHECK_S / 40
    assert asked == []
    clock[0] += module.CANCEL_CHECK_S
    respond("a", 0, cancelled=True)
    assert asked == ["a"] and stops == ["a"]
    respond("b", 1, final=True)  # a final response is never asked about, and the stream is forgotten
    assert asked == ["a"] and ("b", 1) not in model.checked


def test_postprocessing_outputs_as_tensorrtllm_backend_sends_them(monkeypatch, repo):
    model = _load(monkeypatch, repo, "m_postprocessing", "postprocessing")
    tok = Tokenizer(repo / "m_postprocessing" / "1" / "tokenizer")
    ids = tok.encode("Hello", add_special_tokens=False)
    metrics = {k: i + 1 for i, k in enumerate(METRICS)}
    plain, batched = model.execute([
        triton_stub.Request(packed=pack(Packed(delta=ids, final=True))),
        triton_stub.Request(packed=pack(Packed(delta=ids, final=True, batch_index=2, batched=True, sequence_index=1,
                                               sequences=True, perf=True, metrics=metrics))),
    ])
    assert plain.output("text_output").shape == (1,) and plain.output("text_output")[0].decode() == "Hello"
    assert not {"batch_index", "sequence_index", "arrival_time_ns"} & set(plain._tensors)
    assert batched.output("batch_index").tolist() == [[2]] and batched.output("sequence_index").tolist() == [[1]]
    assert batched.output("arrival_time_ns").dtype == np.int64
    assert batched.output("arrival_time_ns").tolist() == [[metrics["arrival_time_ns"]]]
    assert batched.output("kv_cache_reused_blocks").tolist() == [[metrics["kv_cache_reused_blocks"]]]
    assert batched.output("total_draft_tokens").tolist() == [[0]]


def test_cancellation_polls_take_turns_so_every_stream_is_asked_within_a_few_intervals(monkeypatch):
    """With more open requests than one poll asks, the polls take turns: 150 requests, 64 asked per poll,
    every cancelled one is found by the third poll, and none is asked twice before all were asked once."""
    triton_stub.install(monkeypatch)
    name = "tritonize.runtime.triton.engine_model"
    monkeypatch.delitem(sys.modules, name, raising=False)
    module = importlib.import_module(name)
    asked: list[int] = []

    class Sender:
        def __init__(self, i: int) -> None:
            self.i = i

        def is_cancelled(self) -> bool:
            asked.append(self.i)
            return self.i % 3 == 0

    cancelled: list[str] = []
    model = module.TritonPythonModel.__new__(module.TritonPythonModel)
    model.lock, model.poll_turn = __import__("threading").Lock(), 0
    model.engine = type("Engine", (), {"cancel": lambda self, key: cancelled.append(key)})()
    model.streams = {}
    for i in range(150):
        group = module._Group(Sender(i), 1)
        model.streams[f"r{i}/{i}"] = module._Stream(group, [], True, False, i)
    polls = 0
    while len(set(cancelled)) < 50:
        model._poll_cancelled()
        polls += 1
        assert polls <= 3
    assert sorted(asked[:150]) == list(range(150))
    assert set(cancelled) == {f"r{i}/{i}" for i in range(0, 150, 3)}
    assert len(asked) <= 3 * module.CANCEL_POLL_MAX
