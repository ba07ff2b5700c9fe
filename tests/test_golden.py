"""Repositories render as they did before the code moved: file by file against tests/golden/.

The expectations were rendered by tritonize at commit 5f414ff from the cases in golden/cases.py;
the same cases are rendered here by the code under test and written down the same way.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from golden import cases

from tritonize.cli.main import cli
from tritonize.export.demo_model import write_demo_checkpoint

GOLDEN = Path(__file__).resolve().parent / "golden"
# The one intended difference: the engine parameter for rows of a request's own prompt table carries the
# option's name (--max-prompt-embedding-table-size) instead of a second one. Old repositories keep
# working: each reads the key its own copied model.py reads.
RENAMED = ('key: "max_request_table_rows"', 'key: "max_prompt_embedding_table_size"')


def _expected(repo: str) -> dict[str, str]:
    root = GOLDEN / repo
    return {p.relative_to(root).as_posix(): p.read_text().replace(*RENAMED) for p in sorted(root.rglob("*"))
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
