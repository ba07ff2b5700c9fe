"""Corrupt and hostile checkpoints: one clear line, a non-zero exit, no output, no code run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from fixtures import (
    UNKNOWN_TARGET,
    shrink_vocab,
    tiny_model,
    truncated_tar,
    write_nemo1,
    write_nemo2,
    write_pickle_bomb,
    write_shape_mismatch,
    write_unknown_target,
)
from transformers import AutoModelForCausalLM

from tritonize.cli.export import export as export_command
from tritonize.export import ExportError, export_checkpoint


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=300, bos_token_id=0, eos_token_id=0)


def assert_refused(src: Path, out: Path, match: str, **kw) -> str:
    """Exports ``src``, expects ExportError matching ``match``, and checks nothing was left next to ``out``."""
    before = set(out.parent.iterdir()) if out.parent.exists() else set()
    with pytest.raises(ExportError, match=match) as info:
        export_checkpoint(src, out, progress=False, **kw)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    assert not out.exists()
    assert (set(out.parent.iterdir()) if out.parent.exists() else set()) == before  # no temp dirs either
    return message


@pytest.mark.parametrize("where", [".metadata", "common.pt"])
@pytest.mark.parametrize("layout", ["nemo2", "nemo1"])
@pytest.mark.parametrize("payload", ["open", "os.system"])
def test_pickle_that_would_run_code_is_refused(where, layout, payload, model, bpe_dir, tmp_path):
    marker = tmp_path / "pwned"
    src = write_pickle_bomb(model, bpe_dir, tmp_path / ("bomb.nemo" if layout == "nemo1" else "bomb"), marker,
                            where=where, layout=layout, payload=payload)
    message = assert_refused(src, tmp_path / "outs" / "out", "refusing to unpickle")
    assert where in message
    assert not marker.exists()


def test_truncated_tar(model, bpe_dir, tmp_path):
    nemo = write_nemo1(model, bpe_dir, tmp_path / "m.nemo")
    for fraction in (0.3, 0.9):
        cut = truncated_tar(nemo, tmp_path / f"cut{fraction}.nemo", keep_fraction=fraction)
        assert_refused(cut, tmp_path / "outs" / "out", "truncated|corrupt")
    gz = write_nemo1(model, bpe_dir, tmp_path / "gz.nemo", gzip=True)
    assert_refused(truncated_tar(gz, tmp_path / "cut.gz.nemo", keep_fraction=0.6), tmp_path / "outs" / "out",
            "truncated|corrupt")


def test_missing_parts(model, bpe_dir, tmp_path):
    src = write_nemo1(model, bpe_dir, tmp_path / "a", tar=False)
    (src / "model_config.yaml").unlink()
    assert_refused(src, tmp_path / "outs" / "out", "model_config.yaml is missing")
    src = write_nemo1(model, bpe_dir, tmp_path / "b", tar=False)
    shutil.rmtree(src / "model_weights")
    assert_refused(src, tmp_path / "outs" / "out", "no model_weights")
    src = write_nemo2(model, bpe_dir, tmp_path / "c")
    for f in (src / "weights").glob("*.distcp"):
        f.unlink()
    assert_refused(src, tmp_path / "outs" / "out", "distcp is missing")
    assert_refused(tmp_path / "nothing-here", tmp_path / "outs" / "out", "does not exist")


def test_unknown_target(model, bpe_dir, tmp_path):
    src = write_unknown_target(model, bpe_dir, tmp_path / "ckpt")
    message = assert_refused(src, tmp_path / "outs" / "out", "unknown NeMo 2 model _target_")
    assert UNKNOWN_TARGET in message and "--model-type" in message
    # the override is the documented way out: the same llama forced as llama exports to the same model
    forced = export_checkpoint(src, tmp_path / "outs" / "forced", model_type="llama", progress=False)
    assert forced.architecture == "LlamaForCausalLM"
    exported = AutoModelForCausalLM.from_pretrained(forced.output, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["nemo1", "nemo2", "trtllm"])
def test_shape_mismatch(layout, model, bpe_dir, tmp_path):
    src = write_shape_mismatch(model, None if layout == "trtllm" else bpe_dir,
                               tmp_path / ("m.nemo" if layout == "nemo1" else "ckpt"), layout=layout)
    assert_refused(src, tmp_path / "outs" / "out", "qkv")


def test_vocab_smaller_than_tokenizer(bpe_dir, tmp_path):
    small = shrink_vocab(tiny_model("llama", vocab_size=300, bos_token_id=0, eos_token_id=0), 200)
    assert_refused(write_nemo2(small, bpe_dir, tmp_path / "a"), tmp_path / "outs" / "out", "tokenizer has 300 tokens")
    assert_refused(write_nemo1(small, bpe_dir, tmp_path / "b.nemo"), tmp_path / "outs" / "out", "tokenizer has 300 tokens")


def test_wrong_dtype_in_zarr(model, bpe_dir, tmp_path):
    src = write_nemo1(model, bpe_dir, tmp_path / "z", backend="zarr", tar=False)
    zarray = src / "model_weights" / "model.decoder.final_layernorm.weight" / ".zarray"
    meta = json.loads(zarray.read_text())
    meta["dtype"] = "<f2"  # the chunk files hold float32
    zarray.write_text(json.dumps(meta))
    assert_refused(src, tmp_path / "outs" / "out", "wrong dtype or truncated")


def test_not_a_checkpoint_and_bad_arguments(model, bpe_dir, tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hello")
    assert_refused(tmp_path / "junk", tmp_path / "outs" / "out", "not a recognised checkpoint")
    (tmp_path / "junk.nemo").write_bytes(b"definitely not a tar archive " * 200)
    assert_refused(tmp_path / "junk.nemo", tmp_path / "outs" / "out", "neither a directory nor a tar")
    src = write_nemo2(model, bpe_dir, tmp_path / "ok")
    assert_refused(src, tmp_path / "outs" / "out", "unknown model type", model_type="bert")
    assert_refused(src, tmp_path / "outs" / "out", "trtllm-checkpoint only", tp_size=2)
    assert_refused(src, src / "inside", "must not overlap")


def test_existing_output_needs_force(model, bpe_dir, tmp_path):
    src = write_nemo2(model, bpe_dir, tmp_path / "ckpt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="--force"):
        export_checkpoint(src, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    export_checkpoint(src, out, progress=False, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


def test_cli_reports_one_line_and_fails(model, bpe_dir, tmp_path):
    marker = tmp_path / "pwned"
    src = write_pickle_bomb(model, bpe_dir, tmp_path / "bomb", marker)
    result = CliRunner().invoke(export_command, [str(src), "--output", str(tmp_path / "out"), "-q"])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "refusing to unpickle" in lines[0]
    assert not marker.exists() and not (tmp_path / "out").exists()
