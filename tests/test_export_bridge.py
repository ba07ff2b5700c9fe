"""Megatron-Bridge checkpoints and megatron-core 0.15's ``MCoreMetadata``, exported and checked against transformers.

The fixtures in ``tests/fixtures/bridge/`` were saved by real megatron-core (0.15.3: ``MCoreMetadata``; 0.16.1:
plain ``Metadata``) from the tiny Hugging Face models beside them (see ``make_bridge_fixtures.py``). Each export
must hold exactly those Hugging Face weights, and transformers must compute the same logits on it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from fixtures.hostile import _Payload
from fixtures.mcore_metadata import read_mcore_metadata, rewrite_mcore_metadata
from safetensors.torch import load_file

from tritonize.cli.main import cli
from tritonize.export import ExportError, bridge, export_checkpoint
from tritonize.export import safe_pickle as sp
from tritonize.export.dcp import read_metadata
from tritonize.export.tree import DirTree

FIXTURES = Path(__file__).parent / "fixtures" / "bridge"
LLAMA, MIXTRAL, NEMO2 = FIXTURES / "bridge-llama", FIXTURES / "bridge-mixtral", FIXTURES / "nemo2-llama-mcore015"
REFERENCE = json.loads((FIXTURES / "reference.json").read_text())


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _same_weights(export: Path, hf: Path) -> None:
    got, want = _weights(export), _weights(hf)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name].to(torch.float32), tensor.to(torch.float32)), name


def _transformers_logits(directory: Path) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([REFERENCE["prompt_ids"]])).logits[0, -1]


def assert_refused(src: Path, out: Path, match: str, **kw) -> str:
    before = set(out.parent.iterdir()) if out.parent.exists() else set()
    with pytest.raises(ExportError, match=match) as info:
        export_checkpoint(src, out, progress=False, **kw)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    assert not out.exists()
    assert (set(out.parent.iterdir()) if out.parent.exists() else set()) == before
    return message


def test_fixture_metadata_is_what_each_megatron_core_writes():
    """0.15.3 pickles MCoreMetadata with mcore_data; 0.16.1 torch's Metadata with all_local_plans."""
    mcore = read_mcore_metadata(LLAMA / "iter_0000020")
    assert isinstance(mcore.mcore_data, dict) and "decoder.layers.self_attention.linear_qkv.weight" in mcore.mcore_data
    ours = read_metadata(DirTree(LLAMA / "iter_0000020"), "llama")
    assert type(ours) is sp.MCoreMetadata and isinstance(ours, sp.Metadata)
    assert type(ours.all_local_plans[0]) is sp.MCoreSavePlan
    plain = read_metadata(DirTree(MIXTRAL / "iter_0000000"), "mixtral")
    assert type(plain) is sp.Metadata and type(plain.all_local_plans[0]) is sp.SavePlan
    assert getattr(plain, "mcore_data", None) is None


@pytest.mark.parametrize("source", ["root", "iteration"])
def test_llama_export_holds_the_hf_weights(source, tmp_path):
    src = LLAMA if source == "root" else LLAMA / "iter_0000020"
    result = export_checkpoint(src, tmp_path / "out", progress=False, verify=True)
    assert (result.source_kind, result.model_type, result.architecture) == (
        "megatron-bridge", "llama", "LlamaForCausalLM")
    assert result.dtype == "bfloat16" and result.verify["passed"]
    _same_weights(tmp_path / "out", FIXTURES / "hf-llama")
    manifest = result.manifest["source"]
    assert manifest["iteration"] == "iter_0000020"
    assert manifest["bridge_provider"] == "megatron.bridge.models.gpt_provider.GPTModelProvider"
    # the tokenizer saved in iter_0000020/tokenizer/ is the one served
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (FIXTURES / "hf-llama" / "tokenizer.json").read_bytes()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["num_key_value_heads"], config["num_attention_heads"], config["intermediate_size"]) == (2, 4, 64)
    got = _transformers_logits(tmp_path / "out")
    assert float((got - torch.tensor(REFERENCE["llama"]["last_logits"])).abs().max()) < 1e-4


def test_nemo2_checkpoint_with_mcore_metadata(tmp_path):
    assert type(read_metadata(DirTree(NEMO2 / "weights"), "nemo2")) is sp.MCoreMetadata
    result = export_checkpoint(NEMO2, tmp_path / "out", progress=False, verify=True)
    assert (result.source_kind, result.architecture) == ("nemo2", "LlamaForCausalLM") and result.verify["passed"]
    _same_weights(tmp_path / "out", FIXTURES / "hf-llama")


def test_mixtral_names_only_a_hub_id_then_takes_tokenizer(tmp_path):
    message = assert_refused(MIXTRAL, tmp_path / "out", "pass --tokenizer DIR")
    assert "'mistralai/Mixtral-8x7B-v0.1' (a Hugging Face hub id)" in message
    result = export_checkpoint(MIXTRAL, tmp_path / "out", progress=False, verify=True,
                               tokenizer=FIXTURES / "hf-mixtral")
    assert (result.model_type, result.architecture) == ("mixtral", "MixtralForCausalLM") and result.verify["passed"]
    assert result.manifest["source"]["hf_model_id"] == "mistralai/Mixtral-8x7B-v0.1"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    got = _transformers_logits(tmp_path / "out")
    assert float((got - torch.tensor(REFERENCE["mixtral"]["last_logits"])).abs().max()) < 1e-4


def test_mixtral_tokenizer_named_by_a_local_path(tmp_path):
    """``tokenizer_model`` naming a directory on this machine (relative to the checkpoint root) is used."""
    root = shutil.copytree(MIXTRAL, tmp_path / "ckpt")
    shutil.copytree(FIXTURES / "hf-mixtral", root / "hf", ignore=shutil.ignore_patterns("*.safetensors"))
    run_config = root / "iter_0000000" / "run_config.yaml"
    run = yaml.safe_load(run_config.read_text())
    run["tokenizer"]["tokenizer_model"] = "hf"
    run_config.write_text(yaml.safe_dump(run))
    result = export_checkpoint(root, tmp_path / "out", progress=False)
    assert result.tokenizer == "huggingface"


def test_cli_one_line_error_then_export(tmp_path):
    out = tmp_path / "engine"
    refused = CliRunner().invoke(cli, ["export", str(MIXTRAL), "--output", str(out), "--quiet"])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert refused.output.count("\n") == 1 and "--tokenizer DIR" in refused.output
    assert not out.exists()
    ok = CliRunner().invoke(cli, ["export", str(MIXTRAL), "--output", str(out), "--quiet",
                                  "--tokenizer", str(FIXTURES / "hf-mixtral")])
    assert ok.exit_code == 0, ok.output
    assert "exported megatron-bridge mixtral -> MixtralForCausalLM" in ok.output


def test_the_tracker_file_picks_the_iteration(tmp_path):
    root = shutil.copytree(LLAMA, tmp_path / "ckpt")
    # an older iteration whose weights are unreadable: only the tracker's iteration may be read
    old = shutil.copytree(root / "iter_0000020", root / "iter_0000010")
    for f in old.glob("*.distcp"):
        f.write_bytes(b"\0" * 16)
    assert export_checkpoint(root, tmp_path / "a", progress=False).manifest["source"]["iteration"] == "iter_0000020"
    (root / "latest_checkpointed_iteration.txt").write_text("10")
    assert_refused(root, tmp_path / "b", "iter_0000010")
    (root / "latest_checkpointed_iteration.txt").write_text("30")
    message = assert_refused(root, tmp_path / "c", "names iteration 30 but iter_0000030/ is missing")
    assert "iter_0000020" in message
    (root / "latest_checkpointed_iteration.txt").unlink()  # without a tracker: the newest iteration
    shutil.rmtree(old)
    assert export_checkpoint(root, tmp_path / "d", progress=False).manifest["source"]["iteration"] == "iter_0000020"


@pytest.mark.parametrize("payload", ["os.system", "open"])
def test_hostile_mcore_data_is_refused(payload, tmp_path):
    root = shutil.copytree(LLAMA, tmp_path / "ckpt")
    marker = tmp_path / "pwned"

    def plant(meta):
        meta.mcore_data["decoder.layers.self_attention.linear_qkv.weight"] = {"hook": _Payload(marker, payload)}

    rewrite_mcore_metadata(root / "iter_0000020", plant)
    message = assert_refused(root, tmp_path / "outs" / "out", "refusing to unpickle")
    assert ".metadata" in message and not marker.exists()
    refused = CliRunner().invoke(cli, ["export", str(root), "--output", str(tmp_path / "outs" / "cli"), "--quiet"])
    assert refused.exit_code == 1 and refused.output.count("\n") == 1 and "refusing to unpickle" in refused.output
    assert not marker.exists() and not (tmp_path / "outs" / "cli").exists()


def test_mcore_data_that_is_not_a_mapping_or_marks_a_weight_flattened(tmp_path):
    root = shutil.copytree(LLAMA / "iter_0000020", tmp_path / "iter_0000020")
    rewrite_mcore_metadata(root, lambda meta: setattr(meta, "mcore_data", [1, 2]))
    assert_refused(root, tmp_path / "outs" / "a", "mcore_data is a list")

    def flatten(meta):
        meta.mcore_data = {"embedding.word_embeddings.weight": {"nd_reformulated_orig_global_shape": (300, 32)}}

    rewrite_mcore_metadata(root, flatten)
    assert_refused(root, tmp_path / "outs" / "b", "embedding.word_embeddings.weight is stored N-D flattened")


def test_named_provider_classes_decide_the_family(tmp_path):
    root = shutil.copytree(LLAMA, tmp_path / "ckpt")
    run_config = root / "iter_0000020" / "run_config.yaml"
    original = yaml.safe_load(run_config.read_text())
    for target, expected in [("megatron.bridge.models.llama.llama_provider.Llama32ModelProvider1B", "llama"),
                             ("megatron.bridge.models.mistral.mistral_provider.MistralModelProvider", "mistral")]:
        run = json.loads(json.dumps(original))
        run["model"]["_target_"] = target
        run_config.write_text(yaml.safe_dump(run))
        result = export_checkpoint(root, tmp_path / expected, progress=False)
        assert result.model_type == expected
    run = json.loads(json.dumps(original))
    run["model"]["_target_"] = "megatron.bridge.models.gemma.gemma3_provider.Gemma3ModelProvider1B"
    run_config.write_text(yaml.safe_dump(run))
    assert_refused(root, tmp_path / "outs" / "g3", "Gemma3ModelProvider1B has no tritonize family")
    assert export_checkpoint(root, tmp_path / "forced", progress=False, model_type="llama").model_type == "llama"


@pytest.mark.parametrize(("fields", "expected"), [
    ({"_target_": "megatron.bridge.models.llama.llama_provider.Llama31ModelProvider8B"}, "llama"),
    ({"_target_": "megatron.bridge.models.llama.llama_provider.CodeLlamaModelProvider7B"}, "llama"),
    ({"_target_": "megatron.bridge.models.gemma.gemma_provider.CodeGemmaModelProvider2B"}, "gemma"),
    ({"_target_": "megatron.bridge.models.nemotron.nemotron_provider.Nemotron4ModelProvider15B"}, "nemotron"),
    ({"_target_": "megatron.bridge.models.gpt_provider.GPTModelProvider", "normalization": "RMSNorm",
      "gated_linear_unit": True, "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
      "num_moe_experts": 8}, "mixtral"),
    ({"_target_": "megatron.bridge.models.gpt_provider.GPTModelProvider", "normalization": "RMSNorm",
      "gated_linear_unit": True, "layernorm_zero_centered_gamma": True,
      "activation_func": {"_target_": "megatron.core.activations.fast_gelu", "_call_": False}}, "gemma"),
    ({"_target_": "megatron.bridge.models.gpt_provider.GPTModelProvider", "normalization": "LayerNorm",
      "activation_func": {"_target_": "megatron.core.activations.squared_relu", "_call_": False},
      "layernorm_zero_centered_gamma": True}, "nemotron"),
    ({"_target_": "megatron.bridge.models.gpt_provider.GPTModelProvider", "normalization": "RMSNorm",
      "gated_linear_unit": True, "window_size": [4095, 0],
      "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False}}, "mistral"),
])
def test_provider_to_model_type(fields, expected):
    assert bridge.model_type(fields, None) == expected


@pytest.mark.parametrize("target", ["megatron.bridge.models.qwen.qwen_provider.Qwen3ModelProvider8B",
                                    "megatron.bridge.models.llama.llama_provider.Llama4Experts16ModelProvider",
                                    "megatron.bridge.models.nemotronh.nemotron_h_provider.NemotronHModelProvider"])
def test_families_tritonize_does_not_serve_are_refused(target):
    with pytest.raises(ExportError, match="has no tritonize family"):
        bridge.model_type({"_target_": target}, None)


def test_llama31_rope_scaling_from_the_provider():
    model = {"_target_": "megatron.bridge.models.llama.llama_provider.Llama31ModelProvider8B", "num_layers": 2,
             "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 2, "ffn_hidden_size": 64,
             "normalization": "RMSNorm", "gated_linear_unit": True, "add_bias_linear": False,
             "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
             "position_embedding_type": "rope", "rotary_base": 500000, "rope_scaling": True,
             "rope_scaling_factor": 8.0, "seq_length": 8192, "share_embeddings_and_output_weights": False}
    cfg = bridge.megatron_config(model, None)
    assert cfg.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert (cfg.rotary_base, cfg.num_query_groups, cfg.head_dim, cfg.model_type) == (500000.0, 2, 8, "llama")


def test_not_a_bridge_checkpoint(tmp_path):
    (tmp_path / "ckpt" / "iter_0000003").mkdir(parents=True)
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("3")
    assert_refused(tmp_path / "ckpt", tmp_path / "outs" / "a", "iter_0000003 has no run_config.yaml")
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("latest")
    assert_refused(tmp_path / "ckpt", tmp_path / "outs" / "b", "not an iteration number")


def test_training_checkpoint_with_optimizer_state_and_tp2_fused_norms(tmp_path):
    """A Bridge iteration written from Megatron-Core's documented layout (TP=2 chunks, TE's fused norm names,
    Adam moments under ``optimizer.state.*``) with the fixture's run_config.yaml: only the model is read."""
    import transformers
    from fixtures.canonical import from_hf
    from fixtures.dist_ckpt import write_torch_dist
    from fixtures.megatron import megatron_state
    from fixtures.nemo2 import _optimizer_tensors

    model = transformers.AutoModelForCausalLM.from_pretrained(FIXTURES / "hf-llama", dtype=torch.float32)
    tensors, objects = megatron_state(from_hf(model), tp_size=2, fused_norms=True, dtype=torch.bfloat16)
    tensors = tensors + _optimizer_tensors(tensors, seed=0)
    it = tmp_path / "run" / "iter_0000100"
    write_torch_dist(it, tensors, objects, {"checkpoint_version": 3.0, "iteration": 100})
    shutil.copyfile(LLAMA / "iter_0000020" / "run_config.yaml", it / "run_config.yaml")
    shutil.copytree(LLAMA / "iter_0000020" / "tokenizer", it / "tokenizer")
    (tmp_path / "run" / "latest_checkpointed_iteration.txt").write_text("100")
    assert any(k.startswith("optimizer.state.exp_avg.") for k in read_metadata(DirTree(it), "it").state_dict_metadata)
    result = export_checkpoint(tmp_path / "run", tmp_path / "out", progress=False)
    assert result.architecture == "LlamaForCausalLM"
    _same_weights(tmp_path / "out", FIXTURES / "hf-llama")
