"""The prompt and output limits of a repository, taken from the checkpoint when they are not given.

A checkpoint says how many positions its model handles: ``max_position_embeddings`` (``n_positions`` for
GPT-2 and StarCoder 1). A sliding window does not limit the context (attention looks back a window, the
positions go on), so it plays no part. When neither ``--max-input-len`` nor ``--max-output-len`` is given,
the positions are split evenly between them; when one is given, the other takes the rest. Explicit values
are left as they are: the checks that follow (``build._write``) refuse what does not fit.

A long context must not make every step that long: when the derived prompt limit is above
``STEP_TOKENS_CAP`` and ``--max-num-tokens`` was not given, steps take that many tokens and longer
prompts are prefilled in chunks (the engine already does so for any prompt longer than a step).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tritonize.runtime.config import ModelArgs, UnsupportedModelError

from ..errors import TritonizeError

STEP_TOKENS_CAP = 8192
FIXED_DEFAULT = 256  # what a trtllm-engine repository gets when not told (its engine is built for them)


@dataclass(frozen=True)
class Positions:
    count: int
    architecture: str
    source: str  # where the number comes from, as a user reads it


def checkpoint_positions(checkpoint: str | Path) -> Positions | None:
    """The positions an HF-format checkpoint's model handles; None when its config cannot tell (the
    checkpoint checks that follow say why in one line)."""
    path = Path(checkpoint) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        args = ModelArgs.from_hf_config(config)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnsupportedModelError):
        return None
    key = "n_positions" if "n_positions" in config and args.positions == "learned" else "max_position_embeddings"
    source = f"config.json's {key}" if key in config else f"the {args.architecture} default, config.json names none"
    return Positions(int(args.max_position_embeddings), args.architecture, source)


def derive_limits(checkpoint: str | Path, options: Mapping[str, Any], runtime: str) -> tuple[dict[str, Any], str | None]:
    """``options`` with ``max_input_len`` / ``max_output_len`` filled in where they are None, and the line
    that says where they came from (None when both were given)."""
    values = dict(options)
    given_in, given_out = values.get("max_input_len"), values.get("max_output_len")
    if given_in is not None and given_out is not None:
        return values, None
    if runtime == "trtllm-engine":  # the checkpoint may be a TensorRT-LLM one; its engine is built for them
        values["max_input_len"] = FIXED_DEFAULT if given_in is None else given_in
        values["max_output_len"] = FIXED_DEFAULT if given_out is None else given_out
        return values, (f"limits: prompt {values['max_input_len']} + output {values['max_output_len']} tokens "
                        "(trtllm-engine's defaults; pass --max-input-len / --max-output-len to build for others)")
    positions = checkpoint_positions(checkpoint)
    if positions is None:  # the checkpoint checks that follow refuse it with their own line
        values["max_input_len"] = FIXED_DEFAULT if given_in is None else given_in
        values["max_output_len"] = FIXED_DEFAULT if given_out is None else given_out
        return values, None
    total = positions.count
    if given_in is None and given_out is None:
        values["max_output_len"] = total // 2
        values["max_input_len"] = total - total // 2
    elif given_in is None:
        values["max_input_len"] = total - int(given_out)
    else:
        values["max_output_len"] = total - int(given_in)
    derived = [flag for flag, given in (("--max-input-len", given_in), ("--max-output-len", given_out))
               if given is None]
    if given_in is not None and values["max_output_len"] < 1:
        raise TritonizeError(f"--max-input-len {given_in} leaves no room for an output in the {total} positions of "
                             f"this {positions.architecture}: lower it, or give --max-output-len too")
    if given_out is not None and values["max_input_len"] < 1:
        raise TritonizeError(f"--max-output-len {given_out} leaves no room for a prompt in the {total} positions of "
                             f"this {positions.architecture}: lower it, or give --max-input-len too")
    line = (f"limits: prompt {values['max_input_len']} + output {values['max_output_len']} tokens = the {total} "
            f"positions of this {positions.architecture} ({positions.source}; {' and '.join(derived)} from the "
            "checkpoint)")
    if (values["max_input_len"] > STEP_TOKENS_CAP and not values.get("max_num_tokens")):
        values["max_num_tokens"] = STEP_TOKENS_CAP
        line += f"; {STEP_TOKENS_CAP} tokens per step, longer prompts are prefilled in chunks"
    return values, line
