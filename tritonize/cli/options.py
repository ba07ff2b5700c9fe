"""Click options spelled as the options table says (``tritonize.repository.options``): not a command.

`generate` gets each option under its own flag; `deploy` under tritonize's flag with the spelling of
NeMo's deploy_triton.py as an alias, so an existing deploy_triton.py command line runs unchanged. Either
way the parameter carries the option's one name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ..repository.options import OPTIONS

FP8_SWITCH = click.Choice(["auto", "true", "false"], case_sensitive=False)


def generate_option(name: str, *short: str, **kwargs: Any) -> Callable:
    option = OPTIONS[name]
    return click.option(option.generate or option.flag, *short, name, **kwargs)


def deploy_option(name: str, **kwargs: Any) -> Callable:
    option = OPTIONS[name]
    aliases = [option.nemo] if option.nemo and option.nemo != option.flag else []
    return click.option(option.flag, *aliases, name, **kwargs)
