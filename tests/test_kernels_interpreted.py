"""The engine's Triton kernels against the PyTorch reference on a machine without a GPU.

tests/test_cuda_kernels.py runs them on a CUDA device, or on the CPU through Triton's interpreter when
``TRITON_INTERPRET=1`` is set before Triton is imported. Setting it for the whole suite would make every CPU
engine (and every tritonserver the suite starts) run its attention interpreted, so it is set here for one child
pytest that runs that file alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="test_cuda_kernels.py runs the kernels on the GPU itself")
def test_the_kernels_match_the_reference_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    test_file = Path(__file__).with_name("test_cuda_kernels.py")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
                         env=env, capture_output=True, text=True, timeout=900, cwd=test_file.parent.parent)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary, summary
