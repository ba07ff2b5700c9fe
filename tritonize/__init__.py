"""tritonize: LLM checkpoints to standalone Triton Inference Server model repositories."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .version import __version__

__all__ = ["Deployment", "Exporter", "__version__"]

if TYPE_CHECKING:
    from .api import Deployment, Exporter


def __getattr__(name: str) -> Any:
    # Loaded on first use: `import tritonize` (the CLI, the manifest's version) must not pay for torch.
    if name in ("Exporter", "Deployment"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'tritonize' has no attribute {name!r}")
