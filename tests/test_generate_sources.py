"""`tritonize generate -c` takes every source `export` reads: NeMo checkpoints go straight into a repository.

The repository's engine weights and tokenizer, run by the torch runtime, must give transformers' greedy
text of the NeMo checkpoint's source model; the temporary export is gone afterwards.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from deploy_source import MAX_TOKENS, PROMPTS, nemo2_llama
from fixtures import write_nemo1

from tritonize.cli.main import cli
from tritonize.runtime.engine import Engine
from tritonize.runtime.request import SamplingParams
from tritonize.runtime.tokenizer import Tokenizer

LIMITS = ["--max-input-len", "32", "--max-output-len", "16", "--max-batch-size", "2", "--device", "cpu",
          "--dtype", "float32"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return nemo2_llama(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="module")
def nemo1_file(source, tmp_path_factory):
    """The same model as a NeMo 1 .nemo tar (torch_dist weights)."""
    return write_nemo1(source.model, source.tokenizer_dir, tmp_path_factory.mktemp("nemo1") / "llama.nemo")


def _served_text(repo, name: str, prompt: str) -> str:
    """What the repository's engine and tokenizer generate for ``prompt`` (greedy)."""
    tokenizer = Tokenizer(repo / f"{name}_preprocessing" / "1" / "tokenizer")
    ids = tokenizer.encode(prompt)
    end_ids = json.loads((repo / "tritonize.json").read_text())["models"][name]["checkpoint"]["end_ids"]
    with Engine(repo / f"{name}_engine" / "1" / "weights", device="cpu", dtype="float32", max_batch_size=2,
                max_seq_len=48) as engine:
        [new] = engine.generate([ids], max_new_tokens=MAX_TOKENS, sampling=SamplingParams(), end_ids=end_ids)
    whole, head = tokenizer.decode(ids + new), tokenizer.decode(ids)
    return whole[len(head):]


@pytest.mark.parametrize("which", ["nemo2", "nemo1"])
def test_a_nemo_checkpoint_goes_straight_into_a_repository(source, nemo1_file, tmp_path, which):
    checkpoint = source.path if which == "nemo2" else nemo1_file
    repo = tmp_path / "repo"
    result = CliRunner().invoke(cli, ["generate", "-c", str(checkpoint), "-o", str(repo), "-n", "tiny", *LIMITS])
    assert result.exit_code == 0, result.output
    assert f"exporting {checkpoint}" in result.output  # said before the export starts
    assert "wrote" in result.output and (repo / "tiny_engine" / "1" / "weights" / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["repo"], "the temporary export is removed"
    for prompt in PROMPTS:
        assert _served_text(repo, "tiny", prompt) == source.greedy_text(prompt), prompt


def test_what_is_no_checkpoint_is_one_line_and_leaves_nothing(tmp_path):
    stray = tmp_path / "notes"
    stray.mkdir()
    (stray / "README.txt").write_text("not a model\n")
    result = CliRunner().invoke(cli, ["generate", "-c", str(stray), "-o", str(tmp_path / "repo"), *LIMITS])
    assert result.exit_code == 1
    assert result.output.startswith("Error:") and result.output.count("\n") == 1, result.output
    assert "is not a recognised checkpoint" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
    missing = CliRunner().invoke(cli, ["generate", "-c", str(tmp_path / "nope"), "-o", str(tmp_path / "repo")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
