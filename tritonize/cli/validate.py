"""`tritonize validate REPO`: check a model repository, and optionally serve one request from it."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ServerError
from ..serving.load_check import check_repository


@click.command("validate")
@click.argument("repo", type=click.Path(path_type=Path))
@click.option("--load", is_flag=True, help="Then start tritonserver on free ports and send one request per ensemble.")
@click.option("--tritonserver", "tritonserver", type=click.Path(path_type=Path), default=None,
              help="tritonserver binary (or its install dir) for --load.")
def validate(repo: Path, load: bool, tritonserver: Path | None) -> None:
    """Check the model repository REPO that `tritonize generate` wrote.

    \b
    Every config.pbtxt parses as Triton's ModelConfig; each ensemble's steps map to inputs and outputs
    that exist with matching types and dims; model.py, tokenizer, weights and runtime code are present
    and their sha256 match tritonize.json; limits and parameters agree with it. Each problem is one line,
    FILE: problem — fix, and the exit status is 1 if there is any.

    \b
    Example:
      tritonize validate ./repo
      tritonize validate ./repo --load      # also serve one request per ensemble
    """
    try:
        report, problems = check_repository(repo, load=load, tritonserver=tritonserver)
    except ServerError as e:
        raise click.ClickException(str(e)) from None
    for problem in problems:
        click.echo(str(problem))
    if problems:
        click.echo(f"{len(problems)} problem(s) in {report.repo}", err=True)
        raise SystemExit(1)
    click.echo(report.summary() + (" (loaded and answered)" if load else ""))
