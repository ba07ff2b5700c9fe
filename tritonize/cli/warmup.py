"""`tritonize warmup REPO`: compile what the engine compiles at start, once, into the repository."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import TritonizeError
from ..repository.warm import warm_up_repository

_EPILOG = """\b
Examples:
  tritonize warmup ./repo                      # every engine model version, on this machine's GPU
  tritonize warmup ./repo -n tiny --model-version 2

\b
Run it on a machine with the GPU, torch, triton and tritonize version the servers use: it loads each
engine once (as the server would, warm-up request included) with an empty Triton kernel cache and keeps
what was compiled in <name>_engine/<version>/warm/, listed and hashed in tritonize.json. A server whose
GPU, torch, triton and runtime code match copies the kernels into its Triton cache at load ("using warm
artifacts from ..."); any other compiles as before ("warm artifacts are for X, this is Y: compiling").
On a CPU nothing is compiled: the folder holds its metadata only. TRITONIZE_WARM_ARTIFACTS=off on the
server ignores the folder.
"""


@click.command("warmup", epilog=_EPILOG)
@click.argument("repo", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-n", "--model-name", "model", default=None, help="Only this model (default: every model of REPO).")
@click.option("--model-version", "version", type=click.IntRange(min=1), default=None,
              help="Only this version (default: every version).")
def warmup(repo: Path, model: str | None, version: int | None) -> None:
    """Write the kernels the engine compiles at start into REPO, so that servers start warm."""
    try:
        done = warm_up_repository(repo, model=model, version=version, note=lambda line: click.echo(line, err=True))
    except TritonizeError as e:
        raise click.ClickException(str(e)) from None
    for item in done:
        where = item.folder.relative_to(Path(repo).resolve().parent)
        if item.kernels:
            click.echo(f"wrote {where}: {item.kernels} compiled kernels ({item.size / 1e6:.1f} MB) for {item.device}, "
                       f"listed in tritonize.json (the engine loaded in {item.load_s:.1f} s)")
        else:
            click.echo(f"wrote {where}: nothing is compiled on {item.device}, so it holds its metadata only "
                       f"(a server on this kind of machine recognises it); listed in tritonize.json")
