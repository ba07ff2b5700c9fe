"""The `tritonize` command line.

Each command lives in its own module of this package; this module only assembles the group
and turns tritonize's own errors into one-line messages with a non-zero exit.
"""

from __future__ import annotations

import click

from ..version import __version__
from .bench import bench
from .demo import demo
from .deploy import deploy
from .export import export
from .generate import generate
from .k8s import k8s
from .openai import openai
from .query import query
from .serve import serve
from .validate import validate
from .warmup import warmup


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
      tritonize warmup ./repo                      # on the GPU the servers use: they start warm
      tritonize query -m tiny -p "What is the color of a banana?" --max-tokens 16 --stream
    """


cli.add_command(generate)
cli.add_command(serve)
cli.add_command(openai)
cli.add_command(query)
cli.add_command(demo)
cli.add_command(validate)
cli.add_command(warmup)
cli.add_command(bench)
cli.add_command(k8s)
cli.add_command(deploy)

cli.add_command(export)


def main() -> None:
    cli(prog_name="tritonize")


if __name__ == "__main__":
    main()
