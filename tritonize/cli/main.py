"""The `tritonize` command line.

Each command lives in its own module of this package; this module only assembles the group
and turns tritonize's own errors into one-line messages with a non-zero exit.
"""

from __future__ import annotations

import importlib

import click

from ..version import __version__

# Each command's module is imported when the command runs (or help lists it): `tritonize serve` and
# `tritonize query` then start and exit without loading torch, which the export and generate paths need.
# Command name -> its module in this package (each module defines the command under the same name).
COMMANDS = ("generate", "serve", "openai", "query", "demo", "validate", "bench", "k8s", "deploy", "export")


class _Commands(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        return getattr(importlib.import_module(f".{name}", __package__), name)


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
