"""The CLI as users run it: one-line errors, --help with examples, and real subprocess runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tritonize.cli.main import COMMANDS, cli
from tritonize.export.demo_model import write_demo_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_demo_checkpoint(tmp_path_factory.mktemp("cli") / "ckpt")


def _run(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help_with_an_example(command):
    result = _run(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Example" in result.output, command
    assert command in _run("--help").output


def test_serve_and_query_do_not_load_torch():
    """They start and exit in a fraction of a second: torch is for the commands that export or generate."""
    code = ("import sys; from tritonize.cli.main import cli\n"
            "for args in (['serve', '--help'], ['query', '--help']):\n"
            "    try:\n        cli(args)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def _broken(ckpt: Path, tmp_path: Path, how: str) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    if how == "no-config":
        (bad / "config.json").unlink()
    elif how == "bad-json":
        (bad / "config.json").write_text("{not json")
    elif how == "unknown-arch":
        cfg = json.loads((bad / "config.json").read_text())
        cfg["architectures"] = ["BertForMaskedLM"]
        (bad / "config.json").write_text(json.dumps(cfg))
    elif how == "no-tokenizer":
        (bad / "tokenizer.model").unlink()
    elif how == "no-weights":
        (bad / "model.safetensors").unlink()
    return bad


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("no-config", "is not a recognised checkpoint"),  # neither Hugging Face format nor any source export reads
        ("bad-json", "is not valid JSON"),
        ("unknown-arch", "unsupported architecture 'BertForMaskedLM'"),
        ("no-tokenizer", "no tokenizer in"),
        ("no-weights", "has no *.safetensors or *.bin weights"),
        ("missing", "does not exist"),
    ],
)
def test_generate_bad_checkpoints_fail_in_one_line(ckpt, tmp_path, how, message):
    source = tmp_path / "nowhere" if how == "missing" else _broken(ckpt, tmp_path, how)
    result = _run("generate", "--checkpoint", str(source), "--output", str(tmp_path / "repo"))
    assert result.exit_code == 1
    assert message in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert not (tmp_path / "repo").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".repo")]


def test_generate_name_and_existing_output(ckpt, tmp_path):
    result = _run("generate", "-c", str(ckpt), "-o", str(tmp_path / "repo"), "--model-name", "bad name")
    assert result.exit_code == 1 and "characters Triton does not accept" in result.output
    ok = _run("generate", "-c", str(ckpt), "-o", str(tmp_path / "repo"), "--model-name", "tiny")
    assert ok.exit_code == 0, ok.output
    again = _run("generate", "-c", str(ckpt), "-o", str(tmp_path / "repo"), "--model-name", "tiny")
    assert again.exit_code == 1 and "already exists" in again.output


def test_learned_positions_limit_is_checked(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64, vocab_size=300)
    model_dir = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(model_dir)
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(vocab_size=280))
    tok.save(str(model_dir / "tokenizer.json"))
    result = _run("generate", "-c", str(model_dir), "-o", str(tmp_path / "repo"))
    assert result.exit_code == 1 and "exceeds the 64 positions" in result.output


def test_query_without_a_server_is_one_clear_line_every_time(tmp_path):
    from tritonize.serving.server import free_port

    port = free_port()
    for _ in range(6):  # gRPC used to answer some of these with "The stream is no longer in valid state"
        result = _run("query", "-m", "tiny", "-p", "hi", "-u", f"127.0.0.1:{port}", "--timeout", "5")
        assert result.exit_code == 1
        assert result.output == (f"Error: cannot reach tritonserver's gRPC endpoint at 127.0.0.1:{port} (connection "
                                 "refused): start it with `tritonize serve REPO`, or pass the right host:port with -u\n")
    for stream in ("--no-stream", "--stream"):
        result = _run("query", "-m", "tiny", "-p", "hi", "-u", f"http://127.0.0.1:{port}", stream)
        assert result.exit_code == 1 and result.output.count("\n") == 1
        assert result.output.startswith(f"Error: cannot reach tritonserver's HTTP endpoint at http://127.0.0.1:{port}")
    unknown = _run("query", "-m", "tiny", "-p", "hi", "-u", "no-such-host.invalid:8001", "--timeout", "5")
    assert unknown.exit_code == 1 and "(the host name does not resolve)" in unknown.output


@pytest.mark.e2e
def test_demo_as_a_user_runs_it(tmp_path):
    """`tritonize demo` in a real subprocess: builds, serves, answers, stops, leaves no server behind."""
    exe = Path(sys.executable).parent / "tritonize"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tritonize.cli.main"]
    proc = subprocess.run([*cmd, "demo", "--max-tokens", "8", "--workdir", str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    answer = [ln for ln in proc.stdout.splitlines() if ln.startswith("    answer (8 tokens")]
    assert answer and len(answer[0].split(":", 1)[1]) > 0
    chat = [ln for ln in proc.stdout.splitlines() if ln.startswith("    assistant (8 tokens, finish_reason length)")]
    assert chat and len(chat[0].split("): ", 1)[1]) > 0, proc.stdout
    assert (tmp_path / "w" / "repo" / "tritonize.json").is_file()
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "w" / "repo")], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""
