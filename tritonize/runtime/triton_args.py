"""What Triton hands a Python model's ``initialize``, read once for every model file of a repository.

Everything that differs between repositories reaches a model through its config.pbtxt parameters;
its files (tokenizer, weights, adapters) sit in its version folder, which Triton names in the
arguments, so a model file works the same wherever it is loaded from.
"""

from __future__ import annotations

import json
import os


def model_args(args: dict[str, str]) -> tuple[dict, dict[str, str], str]:
    """(the model's config, its parameters as strings, its version folder)."""
    config = json.loads(args["model_config"])
    params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
    return config, params, os.path.join(args["model_repository"], args["model_version"])
