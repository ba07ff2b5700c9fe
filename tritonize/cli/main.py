"""The `tritonize` command line.

Each command lives in its own module of this package; this module only assembles the group
and turns tritonize's own errors into one-line messages with a non-zero exit.
"""

from __future__ import annotations

import click

from ..version import __version__


def _generate() -> click.Command:
    from .generate import generate

    return generate


def _serve() -> click.Command:
    from .serve import serve

    return serve


def _query() -> click.Command:
    from .query import query

    return query


def _demo() -> click.Command:
    from .demo import demo

    return demo


def _validate() -> click.Command:
    from .validate import validate

    return validate


def _bench() -> click.Command:
    from .bench import bench

    return bench


def _k8s() -> click.Command:
    from .k8s import k8s

    return k8s


def _deploy() -> click.Command:
    from .deploy import deploy

    return deploy


def _export() -> click.Command:
    from .export import export

    return export


# Each command's module is imported when the command runs (or help lists it): `tritonize serve` and
# `tritonize query` then start and exit without loading torch, which the export and generate paths need.
COMMANDS = {"generate": _generate, "serve": _serve, "query": _query, "demo": _demo, "validate": _validate,
            "bench": _bench, "k8s": _k8s, "deploy": _deploy, "export": _export}


class _Commands(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        load = COMMANDS.get(name)
        return load() if load is not None else None


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tritonize")
def cli() -> None:
    """Turn an LLM checkpoint into a Triton Inference Server model repository.

    \b
    A repository holds an ensemble: tokenizer -> engine -> detokenizer, each a model on Triton's
    Python backend, served by a stock `tritonserver --model-repository DIR`.

    \b
    Quick start:
      tritonize demo
      tritonize generate --checkpoint ./tiny-llama --output ./repo --model-name tiny
      tritonize serve ./repo
      tritonize query -m tiny -p "What is the color of a banana?" --max-tokens 16 --stream
    """


def main() -> None:
    cli(prog_name="tritonize")


if __name__ == "__main__":
    main()
