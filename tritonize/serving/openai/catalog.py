"""The models the front serves: names, chat templates, limits and LoRA adapters, read from the repository
or, when there is none at hand, from the running server's model configs.

Both sources say the same thing: ``generate`` writes it into the ``<name>_preprocessing`` model's
parameters (``max_input_len``, ``max_output_len``, ``chat_template``, ``special_tokens``,
``lora_task_ids``), which the server hands out over gRPC. Each tritonize ensemble ``NAME`` is one model;
each LoRA adapter it serves is one more, ``NAME/ID`` (ID the adapter's ``lora_task_id``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...repository.layout import REPOSITORY_MANIFEST
from .protocol import ApiError

ADAPTER_SEPARATOR = "/"


@dataclass(frozen=True)
class ServedModel:
    name: str  # the ensemble
    max_input_len: int | None = None
    max_output_len: int | None = None
    chat_template: str | None = None
    special_tokens: Mapping[str, str] = field(default_factory=dict)
    lora_task_ids: tuple[int, ...] = ()
    created: int = 0

    def ids(self) -> list[str]:
        return [self.name] + [f"{self.name}{ADAPTER_SEPARATOR}{task}" for task in self.lora_task_ids]


def _json(text: str | None, default: Any) -> Any:
    try:
        return json.loads(text) if text else default
    except ValueError:
        return default


def _int(text: str | None) -> int | None:
    return int(text) if text and str(text).isdigit() else None


def model_from_parameters(name: str, params: Mapping[str, str], created: int = 0) -> ServedModel:
    """A served model from its preprocessing model's parameters (strings, as config.pbtxt holds them)."""
    tokens = _json(params.get("special_tokens"), {})
    lora = _json(params.get("lora_task_ids"), [])
    return ServedModel(
        name=name,
        max_input_len=_int(params.get("max_input_len")),
        max_output_len=_int(params.get("max_output_len")),
        chat_template=params.get("chat_template") or None,
        special_tokens={k: v for k, v in tokens.items() if isinstance(v, str)} if isinstance(tokens, dict) else {},
        lora_task_ids=tuple(sorted(int(t) for t in lora if isinstance(t, int))) if isinstance(lora, list) else (),
        created=created,
    )


class Catalog:
    def __init__(self, models: list[ServedModel]) -> None:
        self.models = {m.name: m for m in models}

    def ids(self) -> list[str]:
        return [i for m in self.models.values() for i in m.ids()]

    def resolve(self, model_id: str) -> tuple[ServedModel, int | None]:
        """``NAME`` or ``NAME/ID`` -> (the model, its lora_task_id or None); a 404 for anything else."""
        model = self.models.get(model_id)
        if model is not None:
            return model, None
        name, sep, adapter = model_id.rpartition(ADAPTER_SEPARATOR)
        model = self.models.get(name) if sep else None
        if model is not None and adapter.isdigit() and int(adapter) in model.lora_task_ids:
            return model, int(adapter)
        served = ", ".join(self.ids()) or "none"
        raise ApiError(404, f"The model `{model_id}` does not exist (served here: {served})", param="model",
                       code="model_not_found")


def catalog_from_repository(repo: str | Path) -> Catalog:
    """Every tritonize model of a repository, from its tritonize.json and config files."""
    from ...repository.render import parse_config

    root = Path(repo)
    manifest_path = root / REPOSITORY_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{root} is not a tritonize repository ({manifest_path.name}: {e})") from None
    created = int(manifest_path.stat().st_mtime)
    models = []
    for name in sorted(manifest.get("models") or {}):
        config_path = root / f"{name}_preprocessing" / "config.pbtxt"
        try:
            config = parse_config(config_path.read_text(encoding="utf-8"))
        except Exception as e:  # noqa: BLE001 - a protobuf parse error or a missing file, said in one line
            raise ValueError(f"cannot read {config_path}: {e}") from None
        params = {k: v.string_value for k, v in config.parameters.items()}
        models.append(model_from_parameters(name, params, created))
    return Catalog(models)


async def catalog_from_server(client: Any) -> Catalog:
    """Every ready tritonize ensemble of a running server (a ``tritonclient.grpc.aio`` client)."""
    index = await client.get_model_repository_index(as_json=True)
    ready = {m["name"] for m in index.get("models", []) if m.get("state") == "READY"}
    models = []
    now = int(time.time())
    for name in sorted(ready):
        if f"{name}_preprocessing" not in ready or f"{name}_engine" not in ready:
            continue
        config = await client.get_model_config(f"{name}_preprocessing", as_json=True)
        params = {k: v.get("string_value", "") for k, v in config.get("config", {}).get("parameters", {}).items()}
        models.append(model_from_parameters(name, params, now))
    return Catalog(models)
