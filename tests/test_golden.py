"""Repositories render as the expectations in tests/golden/ say: file by file.

The expectations were rendered by tritonize from the cases in golden/cases.py (first at commit 5f414ff,
to show that moving the code changed no repository; again when the engine's response became one packed
tensor and the KV cache options arrived, which changed the engine's outputs and parameters on purpose, and
when the FP8 options added two fields to tritonize.json);
the same cases are rendered here by the code under test and written down the same way.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from golden import cases

from tritonize.cli.main import cli
from tritonize.export.demo_model import write_demo_checkpoint

GOLDEN = Path(__file__).resolve().parent / "golden"


def _expected(repo: str) -> dict[str, str]:
    root = GOLDEN / repo
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
    return cases.render(tmp_path_factory.mktemp("golden"), cli, write_demo_checkpoint)


@pytest.mark.parametrize("repo", sorted({repo for repo, _ in cases.CASES.values()}))
def test_repository_renders_as_before(rendered, repo):
    got = cases.snapshot(rendered[repo])
    expected = _expected(repo)
    assert sorted(got) == sorted(expected)
    for name, text in expected.items():
        assert got[name] == text, f"{repo}/{name} differs from tests/golden/{repo}/{name}"
