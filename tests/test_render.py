"""Rendered repositories: every config parses as Triton's ModelConfig and the ensemble is wired."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2

from tritonize.errors import RenderError
from tritonize.export.demo_model import CHAT_TEMPLATE
from tritonize.repository.checkpoint import inspect_checkpoint
from tritonize.repository.render import parse_config, write_repository
from tritonize.repository.spec import RepoSpec
from tritonize.repository.validate import ensemble_problems

DT = model_config_pb2.DataType


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory) -> Path:
    from tritonize.export.demo_model import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt")


@pytest.fixture(scope="module")
def repo(demo_ckpt, tmp_path_factory) -> Path:
    spec = RepoSpec(name="tiny", max_batch_size=4, max_input_len=100, max_output_len=50, device="cpu")
    return write_repository(spec, inspect_checkpoint(demo_ckpt), tmp_path_factory.mktemp("r") / "repo",
                            progress=False)


def _configs(repo: Path) -> dict[str, model_config_pb2.ModelConfig]:
    return {p.parent.name: parse_config(p.read_text()) for p in repo.glob("*/config.pbtxt")}


def test_every_config_parses_and_is_complete(repo):
    configs = _configs(repo)
    assert set(configs) == {"tiny", "tiny_preprocessing", "tiny_engine", "tiny_postprocessing", "tiny_sync"}
    template = configs["tiny_preprocessing"].parameters["chat_template"].string_value
    assert template == CHAT_TEMPLATE  # the checkpoint's, carried as it is (Jinja syntax included)
    for folder, cfg in configs.items():
        text = (repo / folder / "config.pbtxt").read_text().replace(json.dumps(template), "")
        assert "${" not in text and "{{" not in text
        assert cfg.name == folder
        assert cfg.max_batch_size == 4
    assert configs["tiny"].platform == "ensemble"
    assert configs["tiny_engine"].model_transaction_policy.decoupled
    assert not configs["tiny_sync"].model_transaction_policy.decoupled
    for folder in ("tiny_preprocessing", "tiny_engine", "tiny_postprocessing", "tiny_sync"):
        assert configs[folder].backend == "python"
        assert (repo / folder / "1" / "model.py").is_file()
    params = {k: v.string_value for k, v in configs["tiny_engine"].parameters.items()}
    assert params["max_input_len"] == "100" and params["max_output_len"] == "50"
    assert params["device"] == "cpu"
    assert configs["tiny_engine"].instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


# tensorrtllm_backend's ensemble (all_models/inflight_batcher_llm/ensemble/config.pbtxt at c1e1963): every
# input and output it declares, with its type and dims (logits in its default FP32).
REFERENCE_INPUTS = {
    "text_input": (DT.TYPE_STRING, [1]), "decoder_text_input": (DT.TYPE_STRING, [1]),
    "max_tokens": (DT.TYPE_INT32, [1]), "num_return_sequences": (DT.TYPE_INT32, [1]),
    "bad_words": (DT.TYPE_STRING, [-1]), "stop_words": (DT.TYPE_STRING, [-1]),
    "exclude_input_in_output": (DT.TYPE_BOOL, [1]), "end_id": (DT.TYPE_INT32, [1]), "pad_id": (DT.TYPE_INT32, [1]),
    "top_k": (DT.TYPE_INT32, [1]), "top_p": (DT.TYPE_FP32, [1]), "temperature": (DT.TYPE_FP32, [1]),
    "length_penalty": (DT.TYPE_FP32, [1]), "repetition_penalty": (DT.TYPE_FP32, [1]),
    "min_length": (DT.TYPE_INT32, [1]), "presence_penalty": (DT.TYPE_FP32, [1]),
    "frequency_penalty": (DT.TYPE_FP32, [1]), "random_seed": (DT.TYPE_UINT64, [1]),
    "return_log_probs": (DT.TYPE_BOOL, [1]), "return_context_logits": (DT.TYPE_BOOL, [1]),
    "return_generation_logits": (DT.TYPE_BOOL, [1]), "return_perf_metrics": (DT.TYPE_BOOL, [1]),
    "beam_width": (DT.TYPE_INT32, [1]), "stream": (DT.TYPE_BOOL, [1]),
    "prompt_embedding_table": (DT.TYPE_FP16, [-1, -1]), "prompt_table_extra_id": (DT.TYPE_UINT64, [1]),
    "prompt_vocab_size": (DT.TYPE_INT32, [1]), "embedding_bias_words": (DT.TYPE_STRING, [-1]),
    "embedding_bias_weights": (DT.TYPE_FP32, [-1]), "lora_task_id": (DT.TYPE_UINT64, [1]),
    "lora_weights": (DT.TYPE_FP16, [-1, -1]), "lora_config": (DT.TYPE_INT32, [-1, 3]),
    "guided_decoding_guide_type": (DT.TYPE_STRING, [1]), "guided_decoding_guide": (DT.TYPE_STRING, [1]),
}
REFERENCE_OUTPUTS = {
    "text_output": (DT.TYPE_STRING, [-1]), "cum_log_probs": (DT.TYPE_FP32, [-1]),
    "output_log_probs": (DT.TYPE_FP32, [-1, -1]), "context_logits": (DT.TYPE_FP32, [-1, -1]),
    "generation_logits": (DT.TYPE_FP32, [-1, -1, -1]), "batch_index": (DT.TYPE_INT32, [1]),
    "sequence_index": (DT.TYPE_INT32, [1]), "kv_cache_alloc_new_blocks": (DT.TYPE_INT32, [1]),
    "kv_cache_reused_blocks": (DT.TYPE_INT32, [1]), "kv_cache_alloc_total_blocks": (DT.TYPE_INT32, [1]),
    "arrival_time_ns": (DT.TYPE_INT64, [1]), "first_scheduled_time_ns": (DT.TYPE_INT64, [1]),
    "first_token_time_ns": (DT.TYPE_INT64, [1]), "last_token_time_ns": (DT.TYPE_INT64, [1]),
    "acceptance_rate": (DT.TYPE_FP32, [1]), "total_accepted_draft_tokens": (DT.TYPE_INT32, [1]),
    "total_draft_tokens": (DT.TYPE_INT32, [1]),
}


def test_wire_interface_matches_tensorrtllm_backend(repo):
    ens = _configs(repo)["tiny"]
    assert ens.max_batch_size > 0
    inputs = {t.name: t for t in ens.input}
    for name, (dtype, dims) in REFERENCE_INPUTS.items():
        assert (inputs[name].data_type, list(inputs[name].dims)) == (dtype, dims), name
        # text_input and max_tokens too: a request without one reaches preprocessing, which names it
        assert inputs[name].optional, name
    ours = {"min_tokens": DT.TYPE_INT32, "seed": DT.TYPE_UINT64, "return_num_input_tokens": DT.TYPE_BOOL,
            "return_num_output_tokens": DT.TYPE_BOOL, "task_id": DT.TYPE_UINT64, "add_special_tokens": DT.TYPE_BOOL}
    assert {name: inputs[name].data_type for name in set(inputs) - set(REFERENCE_INPUTS)} == ours
    outputs = {t.name: (t.data_type, list(t.dims)) for t in ens.output}
    for name, expected in REFERENCE_OUTPUTS.items():
        assert outputs[name] == expected, name
    assert set(outputs) - set(REFERENCE_OUTPUTS) == {"num_input_tokens", "num_output_tokens", "finish_reason",
                                                     "output_tokens"}


def test_ensemble_steps_are_wired(repo):
    """Every step input comes from a client input or an earlier step, with the same type and dims."""
    configs = _configs(repo)
    assert ensemble_problems("tiny", configs) == []
    # The check can fail: a step fed a tensor of another type is reported.
    broken = {k: type(v).FromString(v.SerializeToString()) for k, v in configs.items()}
    broken["tiny_engine"].input[0].data_type = DT.TYPE_INT64
    assert any("TYPE_INT64" in p.problem for p in ensemble_problems("tiny", broken))
    ens = configs["tiny"]
    sync = configs["tiny_sync"]
    assert [(t.name, t.data_type, list(t.dims)) for t in sync.input] == [
        (t.name, t.data_type, list(t.dims)) for t in ens.input
    ]


def test_repository_is_self_contained(repo, demo_ckpt):
    for folder in ("tiny_preprocessing", "tiny_engine", "tiny_postprocessing"):
        pkg = repo / folder / "1" / "tritonize_backend"
        assert (pkg / "tokenizer.py").is_file() and (pkg / "engine.py").is_file()
        for source in pkg.glob("*.py"):
            imports = [ln for ln in source.read_text().splitlines() if ln.lstrip().startswith(("import ", "from "))]
            assert not [ln for ln in imports if "tritonize" in ln.split()[1]], source
    assert (repo / "tiny_preprocessing" / "1" / "tokenizer" / "tokenizer.model").is_file()
    weights = repo / "tiny_engine" / "1" / "weights"
    assert (weights / "model.safetensors").stat().st_size == (demo_ckpt / "model.safetensors").stat().st_size
    manifest = json.loads((repo / "tritonize.json").read_text())
    entry = manifest["models"]["tiny"]
    assert entry["options"]["max_input_len"] == 100
    assert entry["checkpoint"]["architecture"] == "LlamaForCausalLM"
    assert set(entry["hashes"]["engine"]) >= {"model.safetensors", "config.json"}
    assert all(len(h) == 64 for h in entry["hashes"]["tokenizer"].values())


@pytest.mark.parametrize("name", ["has space", "semi;colon", 'quote"', "", "..", "slash/name"])
def test_bad_model_names_are_refused(demo_ckpt, tmp_path, name):
    with pytest.raises(RenderError, match="characters Triton does not accept"):
        write_repository(RepoSpec(name=name), inspect_checkpoint(demo_ckpt), tmp_path / "repo", progress=False)
    assert not (tmp_path / "repo").exists()


def test_existing_output_needs_force_and_failure_leaves_nothing(demo_ckpt, tmp_path):
    ckpt = inspect_checkpoint(demo_ckpt)
    out = tmp_path / "repo"
    write_repository(RepoSpec(name="a"), ckpt, out, progress=False)
    # A directory that is not a tritonize repository is replaced only with force.
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(RenderError, match="not a tritonize repository"):
        write_repository(RepoSpec(name="b"), ckpt, other, progress=False)
    write_repository(RepoSpec(name="b"), ckpt, other, force=True, progress=False)
    assert (other / "b").is_dir()
    # The same version of a model already there needs force.
    with pytest.raises(RenderError, match="already exists and holds version 1"):
        write_repository(RepoSpec(name="a"), ckpt, out, progress=False)
    # A failure half-way (an unreadable weight file) leaves the repository as it was and no temporary dirs.
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")}
    ckpt.weight_files.append(demo_ckpt / "missing.safetensors")
    with pytest.raises(FileNotFoundError):
        write_repository(RepoSpec(name="a"), ckpt, out, force=True, progress=False)
    with pytest.raises(FileNotFoundError):
        write_repository(RepoSpec(name="c"), ckpt, out, progress=False)
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert sorted(os.listdir(tmp_path)) == ["other", "repo"]


@pytest.mark.parametrize("made_by", ["spec", "options"])
def test_the_tokenizer_models_get_four_instances_off_the_cpu_whoever_makes_the_spec(made_by, demo_ckpt, tmp_path):
    """A GPU's streams outrun one detokenizing process: a spec made directly (the Python API, the benchmarks) gets the
    same default as one made from generate's options, and the rendered configs carry it."""
    def spec(**fields):  # noqa: ANN202
        return RepoSpec(name="t", **fields) if made_by == "spec" else RepoSpec.from_options({"name": "t", **fields})

    assert spec(device="cpu").tokenizer_instance_count == 1
    assert spec(device="cuda").tokenizer_instance_count == 4
    assert spec(device="auto").tokenizer_instance_count == 4
    assert spec(device="cuda", tokenizer_instance_count=2).tokenizer_instance_count == 2
    out = write_repository(spec(device="cuda", max_batch_size=4, max_input_len=32, max_output_len=16),
                           inspect_checkpoint(demo_ckpt), tmp_path / "repo", progress=False)
    configs = _configs(out)
    assert configs["t_preprocessing"].instance_group[0].count == 4
    assert configs["t_postprocessing"].instance_group[0].count == 4
