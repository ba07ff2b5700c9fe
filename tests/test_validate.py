"""`tritonize validate`: a generated repository passes; each kind of damage is one line naming the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from tritonize.cli.main import cli
from tritonize.export.demo_model import write_demo_checkpoint
from tritonize.repository.checkpoint import inspect_checkpoint
from tritonize.repository.render import write_repository
from tritonize.repository.spec import RepoSpec


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    ckpt = write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt")
    spec = RepoSpec(name="tiny", max_batch_size=4, max_input_len=32, max_output_len=8, device="cpu",
                    dtype="float32")
    return write_repository(spec, inspect_checkpoint(ckpt), tmp_path_factory.mktemp("r") / "repo", progress=False)


@pytest.fixture
def repo(pristine, tmp_path) -> Path:
    """A private copy (real bytes, not links to the checkpoint) that a test may damage."""
    return Path(shutil.copytree(pristine, tmp_path / "repo"))


def _validate(repo: Path, *args: str):
    return CliRunner().invoke(cli, ["validate", str(repo), *args])


def _lines(result) -> list[str]:
    return [ln for ln in result.output.splitlines() if ln.strip()]


def test_a_generated_repository_passes(repo):
    result = _validate(repo)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK:") and "tiny (versions 1)" in result.output


def test_tampered_weights_are_reported(repo):
    weights = repo / "tiny_engine" / "1" / "weights" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = _validate(repo)
    assert result.exit_code == 1
    assert _lines(result) == [
        "tiny_engine/1/weights/model.safetensors: sha256 differs from tritonize.json (changed or truncated) — "
        "copy it again from the checkpoint or run `tritonize generate` again",
        "1 problem(s) in " + str(repo.resolve()),
    ]


def test_deleted_tokenizer_file_is_reported(repo):
    (repo / "tiny_postprocessing" / "1" / "tokenizer" / "tokenizer.model").unlink()
    result = _validate(repo)
    assert result.exit_code == 1
    lines = _lines(result)
    assert lines[0].startswith("tiny_postprocessing/1/tokenizer/tokenizer.model: tokenizer file is missing — ")
    assert len(lines) == 2


def test_broken_config_is_reported(repo):
    path = repo / "tiny_preprocessing" / "config.pbtxt"
    path.write_text(path.read_text().replace("max_batch_size:", "max_batch_sise:"))
    result = _validate(repo)
    assert result.exit_code == 1
    lines = _lines(result)
    assert lines[0].startswith("tiny_preprocessing/config.pbtxt: does not parse as Triton's ModelConfig")
    # the ensemble now names a step that is not there
    assert any(ln.startswith("tiny/config.pbtxt: step model 'tiny_preprocessing'") for ln in lines)


def test_mismatched_max_batch_size_is_reported(repo):
    path = repo / "tiny_engine" / "config.pbtxt"
    path.write_text(path.read_text().replace("max_batch_size: 4", "max_batch_size: 2"))
    result = _validate(repo)
    assert result.exit_code == 1
    assert _lines(result)[:-1] == [
        "tiny_engine/config.pbtxt: max_batch_size 2 but tritonize.json and the other models of 'tiny' have 4 — "
        "set max_batch_size: 4 in every model of 'tiny' or run `tritonize generate` again",
    ]


def test_parameters_must_agree_with_the_manifest(repo):
    path = repo / "tiny_preprocessing" / "config.pbtxt"
    path.write_text(path.read_text().replace('string_value: "32"', 'string_value: "64"'))
    result = _validate(repo)
    assert result.exit_code == 1
    assert "tiny_preprocessing/config.pbtxt: parameter max_input_len is '64' but tritonize.json says 32" in result.output


def test_not_a_repository(tmp_path):
    result = _validate(tmp_path)
    assert result.exit_code == 1
    assert result.output.startswith("tritonize.json: missing: this is not a tritonize repository")


@pytest.mark.e2e
def test_load_serves_one_request(pristine):
    result = _validate(pristine, "--load")
    assert result.exit_code == 0, result.output
    assert "(loaded and answered)" in result.output
