"""Several models and versions in one repository: added beside each other, served under explicit control.

Version 1 and version 2 of ``tiny`` hold different weights (two random seeds) and ``other`` sits beside
them; every answer is checked against transformers on the weights that version was made from.
"""

from __future__ import annotations

import json
import os
import queue
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from tritonize.errors import RenderError
from tritonize.export.demo_model import write_demo_checkpoint
from tritonize.repository.build import build_repository
from tritonize.repository.spec import RepoSpec
from tritonize.repository.validate import validate_repository
from tritonize.runtime.packed import unpack
from tritonize.serving.client import GenerateOptions, grpc_generate

transformers = pytest.importorskip("transformers")

PROMPT = "What is the color of a banana?"
MAX_NEW = 8


def _spec(name: str, version: int, **kw) -> RepoSpec:
    options = {"max_batch_size": 4, "max_input_len": 32, "max_output_len": 16, "device": "cpu", "dtype": "float32"}
    return RepoSpec(name=name, version=version, **{**options, **kw})


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {"a": write_demo_checkpoint(root / "a", seed=3), "b": write_demo_checkpoint(root / "b", seed=4)}


@pytest.fixture(scope="module")
def repo(ckpts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("repo") / "repo"
    build_repository(ckpts["a"], out, _spec("tiny", 1), force=False, progress=False)
    build_repository(ckpts["b"], out, _spec("tiny", 2), force=False, progress=False)
    build_repository(ckpts["a"], out, _spec("other", 1), force=False, progress=False)
    return out


@pytest.fixture(scope="module")
def greedy(ckpts):
    """transformers' greedy ids for PROMPT on each checkpoint, with the ids the SentencePiece model gives."""
    out = {}
    for key, path in ckpts.items():
        model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
        ids = [sp.bos_id(), *sp.encode(PROMPT)]
        with torch.no_grad():
            new = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=2,
                                 pad_token_id=2)[0, len(ids):].tolist()
        new = new[: new.index(2)] if 2 in new else new
        whole, head = sp.decode(ids + new), sp.decode(ids)
        out[key] = {"ids": ids, "new": new, "text": whole[len(head):]}
    assert out["a"]["new"] != out["b"]["new"], "the two seeds must give different answers for the test to mean much"
    return out


def test_adding_a_version_leaves_the_others_untouched(ckpts, tmp_path):
    out = tmp_path / "repo"
    build_repository(ckpts["a"], out, _spec("tiny", 1), force=False, progress=False)
    before = _snapshot(out)
    build_repository(ckpts["b"], out, _spec("tiny", 2), force=False, progress=False)
    after = _snapshot(out)
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert changed == ["tritonize.json"]
    assert all((out / folder / "2").is_dir() for folder in ("tiny", "tiny_engine", "tiny_sync"))
    entry = json.loads((out / "tritonize.json").read_text())["models"]["tiny"]
    assert sorted(entry["versions"]) == ["1", "2"]
    assert entry["versions"]["1"]["checkpoint"]["path"] == str(ckpts["a"].resolve())
    assert entry["versions"]["2"]["checkpoint"]["path"] == str(ckpts["b"].resolve())
    assert (out / "tiny_engine" / "config.pbtxt").read_text().count("version_policy: { all { } }") == 1

    # The same version again needs --force, and then replaces only that version.
    with pytest.raises(RenderError, match="already exists and holds version 2 of 'tiny'"):
        build_repository(ckpts["a"], out, _spec("tiny", 2), force=False, progress=False)
    v1 = {k: v for k, v in _snapshot(out).items() if "/1" in k or k.endswith("config.pbtxt")}
    build_repository(ckpts["a"], out, _spec("tiny", 2), force=True, progress=False)
    assert {k: v for k, v in _snapshot(out).items() if k in v1} == v1
    entry = json.loads((out / "tritonize.json").read_text())["models"]["tiny"]
    assert entry["versions"]["2"]["checkpoint"]["path"] == str(ckpts["a"].resolve())

    # Versions share one config.pbtxt in Triton: a version with other limits is refused, naming them.
    with pytest.raises(RenderError, match=r"tiny_preprocessing/config.pbtxt: version 3 .*max_input_len '32' vs '64'"):
        build_repository(ckpts["a"], out, _spec("tiny", 3, max_input_len=64), force=False, progress=False)
    # A model whose folders would collide with another model's is refused.
    with pytest.raises(RenderError, match="belongs to model 'tiny'"):
        build_repository(ckpts["a"], out, _spec("tiny_engine", 1), force=False, progress=False)
    assert validate_repository(out).problems == []
    assert sorted(os.listdir(tmp_path)) == ["repo"]


def test_two_models_and_two_versions_validate(repo):
    report = validate_repository(repo)
    assert report.problems == []
    assert report.models == {"tiny": ["1", "2"], "other": ["1"]}


def _engine_ids(endpoint: str, version: str, ids: list[int]) -> list[int]:
    """Greedy ids straight from one version of the engine model, over a gRPC stream."""
    import tritonclient.grpc as grpcclient

    def tensor(name: str, array: np.ndarray, dtype: str):
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    empty = np.array([[[0], [-1]]], dtype=np.int32)
    inputs = [
        tensor("input_ids", np.array([ids], dtype=np.int32), "INT32"),
        tensor("input_lengths", np.array([[len(ids)]], dtype=np.int32), "INT32"),
        tensor("request_output_len", np.array([[MAX_NEW]], dtype=np.int32), "INT32"),
        tensor("end_ids", np.array([[2]], dtype=np.int32), "INT32"),
        tensor("pad_id", np.array([[2]], dtype=np.int32), "INT32"),
        tensor("stop_words_list", empty, "INT32"),
        tensor("bad_words_list", empty, "INT32"),
        tensor("exclude_input_in_output", np.array([[True]]), "BOOL"),
    ]
    responses: queue.Queue = queue.Queue()
    got: list[int] = []
    with grpcclient.InferenceServerClient(endpoint) as client:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer("tiny_engine", inputs, model_version=version, enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=60)
            assert error is None, error
            packed = result.as_numpy("packed")
            if packed is not None:
                got += unpack(packed).delta
            if result.get_response(as_json=True)["parameters"].get("triton_final_response", {}).get("bool_param"):
                break
        client.stop_stream()
    return got


@pytest.mark.e2e
def test_explicit_model_control_loads_and_unloads_models_and_versions(triton_server, repo, greedy):
    import tritonclient.grpc as grpcclient

    server = triton_server(repo, model_control_mode="explicit", extra_args=["--load-model=other"])
    with grpcclient.InferenceServerClient(server.grpc_endpoint) as client:
        assert client.is_model_ready("other") and not client.is_model_ready("tiny")
        client.load_model("tiny")
        client.load_model("tiny_sync")
        assert client.is_model_ready("tiny_engine", "1") and client.is_model_ready("tiny_engine", "2")

    # Each engine version answers with its own weights; the ensemble routes to the newest.
    assert _engine_ids(server.grpc_endpoint, "1", greedy["a"]["ids"]) == greedy["a"]["new"]
    assert _engine_ids(server.grpc_endpoint, "2", greedy["b"]["ids"]) == greedy["b"]["new"]
    ask = GenerateOptions(max_tokens=MAX_NEW)
    assert grpc_generate(server.grpc_endpoint, "tiny", PROMPT, ask).text == greedy["b"]["text"]
    assert grpc_generate(server.grpc_endpoint, "other", PROMPT, ask).text == greedy["a"]["text"]

    with grpcclient.InferenceServerClient(server.grpc_endpoint) as client:
        # Pin version 1 (a rollback): the ensemble follows, version 2 goes away.
        for folder in ("tiny_preprocessing", "tiny_engine", "tiny_postprocessing"):
            config = client.get_model_config(folder, as_json=True)["config"]
            config["version_policy"] = {"specific": {"versions": [1]}}
            client.load_model(folder, config=json.dumps(config))
        assert client.is_model_ready("tiny_engine", "1") and not client.is_model_ready("tiny_engine", "2")
        assert grpc_generate(server.grpc_endpoint, "tiny", PROMPT, ask).text == greedy["a"]["text"]

        client.unload_model("other")
        assert not client.is_model_ready("other")
        assert grpc_generate(server.grpc_endpoint, "tiny", PROMPT, ask).text == greedy["a"]["text"]
