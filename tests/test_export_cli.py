"""``tritonize export`` on the command line."""

from __future__ import annotations

import json

from click.testing import CliRunner
from fixtures import gpt2_bpe_tokenizer_dir, tiny_model, write_nemo2

from tritonize.cli.main import cli


def test_help_has_an_example():
    result = CliRunner().invoke(cli, ["export", "--help"])
    assert result.exit_code == 0
    assert "tritonize export ./llama31_8b.nemo --output ./engine" in result.output
    for option in ("--model-type", "--dtype", "--format", "--tensor-parallelism-size",
                   "--pipeline-parallelism-size", "--verify", "--force"):
        assert option in result.output


def test_export_verify_and_trtllm_checkpoint(tmp_path):
    bpe = gpt2_bpe_tokenizer_dir(tmp_path / "bpe", vocab_size=300)
    src = write_nemo2(tiny_model("llama", vocab_size=300, bos_token_id=0, eos_token_id=0), bpe, tmp_path / "ckpt")
    out = tmp_path / "engine"
    args = ["export", str(src), "--output", str(out), "--dtype", "bfloat16", "--verify", "--quiet",
            "--format", "trtllm-checkpoint", "--tensor-parallelism-size", "2", "--pipeline-parallelism-size", "2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "LlamaForCausalLM" in result.output and "verify: largest logit difference" in result.output
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["output"]["dtype"] == "bfloat16" and manifest["verify"]["passed"]
    assert sorted(p.name for p in (out / "trtllm_checkpoint").iterdir()) == [
        "config.json", "rank0.safetensors", "rank1.safetensors", "rank2.safetensors", "rank3.safetensors"]
    again = CliRunner().invoke(cli, args)
    assert again.exit_code != 0 and "--force" in again.output
