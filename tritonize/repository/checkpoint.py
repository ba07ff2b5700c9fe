"""Reads what a Hugging Face-format checkpoint directory declares, before anything is written.

Everything `generate` needs to know is checked here, so a bad checkpoint fails with one line
before a temporary repository is even started.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tritonize.runtime.config import ModelArgs, UnsupportedModelError
from tritonize.runtime.quantize import QuantScheme, read_quantization
from tritonize.runtime.tokenizer import TOKENIZER_FILES, Tokenizer, TokenizerError

from ..errors import CheckpointError
from .chat_template import check_template, pick_default, read_chat_template

WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass
class Checkpoint:
    path: Path
    config: dict[str, Any]
    architecture: str
    args: ModelArgs
    weight_files: list[Path]
    tokenizer_files: list[Path]
    tokenizer_kind: str
    vocab_size: int
    end_ids: list[int] = field(default_factory=list)
    pad_id: int = 0
    dtype: str | None = None
    # what the checkpoint declares (a string, or transformers' list of named templates); None: no chat
    chat_template: Any = None
    quantization: QuantScheme | None = None  # the FP8 it declares (runtime.quantize.read_quantization)
    quantization_error: str | None = None  # a quantization the torch runtime cannot run (int4, ...), as a message
    extra_files: list[Path] = field(default_factory=list)  # hf_quant_config.json: read with the weights
    converted_from: Path | None = None  # the checkpoint this one was made from at generate time (FP8 conversion)
    conversion: str | None = None  # what was done to it ("quantized to FP8 per channel", "dequantized")

    @property
    def fp8_weights(self) -> bool:
        return self.quantization is not None and self.quantization.weights

    @property
    def fp8_kv_cache(self) -> bool:
        return self.quantization is not None and self.quantization.kv_cache


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path}: {e.strerror}") from None
    except ValueError as e:
        raise CheckpointError(f"{what} {path} is not valid JSON ({e}): re-export the checkpoint") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} is not a JSON object: re-export the checkpoint")
    return data


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [int(v) for v in value if isinstance(v, int)]
    return []


def inspect_checkpoint(path: str | Path) -> Checkpoint:
    """Checks an HF-format directory: config, supported architecture, weights and tokenizer."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"checkpoint {root} does not exist: pass a Hugging Face-format directory")
    if not root.is_dir():
        raise CheckpointError(
            f"checkpoint {root} is a file: pass a Hugging Face-format directory (run `tritonize export` first "
            "for .nemo / .qnemo files)"
        )
    if not (root / "config.json").is_file():
        raise CheckpointError(
            f"{root} has no config.json: pass a Hugging Face-format directory (or `tritonize export` a NeMo one)"
        )
    config = _read_json(root / "config.json", "config")
    try:
        args = ModelArgs.from_hf_config(config)
    except UnsupportedModelError as e:
        raise CheckpointError(str(e)) from None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"config.json in {root} is missing or has a bad field ({e}): fix or re-export it") from None
    architecture = (config.get("architectures") or [config.get("model_type", "?")])[0]

    weights = sorted(p for p in root.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not weights:
        raise CheckpointError(f"{root} has no *.safetensors or *.bin weights")
    if any(p.suffix == ".safetensors" for p in weights):
        weights = [p for p in weights if p.suffix == ".safetensors"]
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weights.append(index)

    try:
        tokenizer = Tokenizer(root)
    except TokenizerError as e:
        raise CheckpointError(f"{e}: the repository needs the tokenizer the checkpoint was trained with") from None
    tokenizer_files = [root / name for name in TOKENIZER_FILES if (root / name).is_file()]
    chat_template = read_chat_template(root)
    if chat_template is not None:
        default = pick_default(chat_template)
        if default is None:
            raise CheckpointError(f"{root}: the chat template is neither a string nor a list holding one named "
                                  "'default': fix it, or pass generate --chat-template FILE")
        check_template(default, f"the chat template of {root}")

    generation = _read_json(root / "generation_config.json", "generation config") if (
        root / "generation_config.json"
    ).is_file() else {}
    end_ids = _as_ids(generation.get("eos_token_id")) or _as_ids(config.get("eos_token_id"))
    if not end_ids and tokenizer.eos_id is not None:
        end_ids = [tokenizer.eos_id]
    pad = _as_ids(generation.get("pad_token_id")) or _as_ids(config.get("pad_token_id"))
    pad_id = pad[0] if pad else (end_ids[0] if end_ids else 0)
    if tokenizer.vocab_size > args.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {args.vocab_size}: "
            "the tokenizer does not belong to this model"
        )
    quant_extra = root / "hf_quant_config.json"
    quantization, quantization_error = None, None
    try:
        quantization = read_quantization(
            config, _read_json(quant_extra, "ModelOpt quantization config") if quant_extra.is_file() else None)
    except UnsupportedModelError as e:
        quantization_error = str(e)
    return Checkpoint(
        path=root,
        config=config,
        architecture=architecture,
        args=args,
        weight_files=weights,
        tokenizer_files=tokenizer_files,
        tokenizer_kind=tokenizer.kind,
        vocab_size=tokenizer.vocab_size,
        end_ids=end_ids,
        pad_id=pad_id,
        dtype=config.get("torch_dtype") or config.get("dtype"),
        chat_template=chat_template,
        quantization=quantization,
        quantization_error=quantization_error,
        extra_files=[quant_extra] if quant_extra.is_file() else [],
    )
