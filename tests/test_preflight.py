"""Before tritonserver starts: the Python its Python models will run on is checked (numpy < 2, every module the
repository's models import), so `serve` and `validate --load` refuse in one line, saying what to run, instead
of a server whose models fail as "Stub process ... is not healthy".

The environments are real interpreters: a virtual environment whose numpy is 2 (installed from the package
index) and everything else this one's, and a bare virtual environment that has none of the packages.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tritonize.errors import PythonEnvironmentError
from tritonize.export.demo_model import write_demo_checkpoint
from tritonize.repository.build import build_repository
from tritonize.repository.spec import RepoSpec
from tritonize.serving.server import check_stub_python, free_ports, server_environment

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("preflight")
    ckpt = write_demo_checkpoint(work / "ckpt", hidden=32, layers=1, seed=1)
    spec = RepoSpec(name="tiny", max_batch_size=2, max_input_len=16, max_output_len=8, device="cpu")
    return build_repository(ckpt, work / "repo", spec, force=False, progress=False)


def _venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, capture_output=True)
    return path / "bin" / "python"


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def numpy2_python(tmp_path_factory) -> Path:
    """A virtual environment with numpy 2 and, behind it, every package of this one (tritonize included)."""
    python = _venv(tmp_path_factory.mktemp("numpy2") / "venv")
    site = _site_packages(python)
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                              "numpy==2.0.2"], capture_output=True, text=True)
    if install.returncode != 0:
        pytest.skip(f"numpy 2 cannot be installed here: {install.stderr.strip().splitlines()[-1:]}")
    ours = sysconfig.get_paths()["purelib"]
    (site / "zz_this_environment.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    check = subprocess.run([str(python), "-c", "import numpy, tritonize; print(numpy.__version__)"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert check.stdout.strip() == "2.0.2", check.stderr
    return python


def _run(python: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run([str(python), "-m", "tritonize.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_serve_refuses_numpy_2_in_one_line_saying_what_to_run(numpy2_python, repo):
    http, grpc, metrics = free_ports(3)
    result = _run(numpy2_python, "serve", str(repo), "--http-port", str(http), "--grpc-port", str(grpc),
                  "--metrics-port", str(metrics))
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    python3 = numpy2_python.parent / "python3"
    assert line == (f"Error: {python3} has numpy 2.0.2, and Triton 2.51's Python backend needs numpy < 2 (under "
                    f"numpy 2 it mis-reads text tensors): run `{python3} -m pip install 'numpy<2'`")
    assert "ready" not in result.stdout  # no server was started


def test_validate_load_refuses_numpy_2_the_same_way(numpy2_python, repo):
    result = _run(numpy2_python, "validate", str(repo), "--load")
    assert result.returncode == 1
    assert "has numpy 2.0.2" in result.stdout and "-m pip install 'numpy<2'" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_a_python_without_the_repositorys_packages_is_refused_naming_them(repo, tmp_path):
    bare = _venv(tmp_path / "bare")
    env = server_environment()
    env["PATH"] = os.pathsep.join([str(bare.parent), env["PATH"]])
    with pytest.raises(PythonEnvironmentError) as refused:
        check_stub_python(repo, env)
    error = refused.value
    python3 = bare.parent / "python3"
    assert error.python == str(python3)
    # the demo's tokenizer is SentencePiece; the torch runtime reads safetensors weights
    assert error.problem == f"{python3} lacks numpy, safetensors, sentencepiece, torch, which this repository's models import"
    assert error.fix == f"run `{python3} -m pip install 'numpy<2' safetensors sentencepiece torch`"
    assert "\n" not in str(error)


def test_this_environment_passes(repo):
    check_stub_python(repo, server_environment())
