"""Where things are in a generated repository; the standard library only, so that the server side of
tritonize (which must import without the rendering dependencies) can read a repository too."""

from __future__ import annotations

from pathlib import Path

# What made the repository (options, checkpoint, hashes), at its top.
REPOSITORY_MANIFEST = "tritonize.json"
# The models that hold version-specific files (tokenizer, weights); the ensemble and ``_sync`` hold none.
VERSIONED_SUFFIXES = ("_preprocessing", "_engine", "_postprocessing")


def model_folders(name: str) -> list[str]:
    """The folders one generated model owns; the ensemble last, so it appears after what it calls."""
    return [f"{name}{suffix}" for suffix in (*VERSIONED_SUFFIXES, "_sync")] + [name]


def model_names(repo: str | Path) -> list[str]:
    """Models of a repository: its subdirectories that hold a config.pbtxt."""
    root = Path(repo)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.pbtxt").is_file())
