"""Megatron-Bridge checkpoints: ``iter_NNNNNNN/`` directories of Megatron-Core torch_dist weights.

Layout (Megatron-Bridge 0.3 ``training/checkpointing.py``, ``training/utils/checkpoint_utils.py``,
``training/model_load_save.py``; the same tracker file and directory names as Megatron-LM)::

    ROOT/latest_checkpointed_iteration.txt    the newest iteration ("20"), or "release"
    ROOT/latest_train_state.pt
    ROOT/iter_0000020/                        (``release/`` for a release checkpoint)
        .metadata, __R_I.distcp               torch_dist weights; keys without a prefix
        common.pt, metadata.json              ("decoder.layers.self_attention.linear_qkv.weight", stacked [L, ...]),
                                              optimizer state under ``optimizer.*`` in training checkpoints
        run_config.yaml                       ``ConfigContainer.to_dict()``: ``model`` is the model provider
                                              (``_target_`` its class, then every TransformerConfig field),
                                              ``tokenizer`` the TokenizerConfig (type and ``tokenizer_model``)
        train_state.pt
        tokenizer/                            the tokenizer's files (``save_tokenizer_assets``), when saved

The architecture comes from the provider's class where it names one (``LlamaModelProvider``,
``Llama31ModelProvider8B``, ``MistralModelProvider``, ``GemmaModelProvider``, ``NemotronModelProvider``, ...),
otherwise (``GPTModelProvider``, which Megatron-Bridge's AutoBridge writes for Llama, Mistral and Nemotron
imports) from the fields: experts, normalization, gating, activation, position embedding.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from ..errors import ExportError
from . import nemo_config, tokenizer_files
from .canonical import MODEL_TYPES
from .nemo_config import MegatronConfig
from .tokenizer_files import TokenizerFiles
from .tree import DirTree, Tree

TRACKER = "latest_checkpointed_iteration.txt"
RUN_CONFIG = "run_config.yaml"
_ITER = re.compile(r"^iter_(\d{7,})$")

#: Megatron-Bridge provider classes (by name prefix, first match wins) -> tritonize model type; None: refused.
_PROVIDERS: tuple[tuple[str, str | None], ...] = (
    ("Llama4", None),  # interleaved MoE + chunked attention
    ("LlamaNemotron", None),  # heterogeneous (DeciLM) blocks
    ("Llama", "llama"),
    ("CodeLlama", "llama"),
    ("Ministral3", None),
    ("Mistral", "mistral"),
    ("Gemma2", None),  # logit soft-capping, alternating sliding windows
    ("Gemma3", None),
    ("CodeGemma", "gemma"),
    ("Gemma", "gemma"),
    ("NemotronH", None),  # hybrid Mamba
    ("NemotronNano", None),
    ("Nemotron", "nemotron"),
)
#: provider classes that say nothing about the architecture: the fields decide
_GENERIC = ("GPTModelProvider", "GPTProvider")

#: Megatron-Bridge's families that tritonize serves, for the docs and error messages
FAMILIES = "Llama 2/3/3.1/3.2 and Code Llama, Mistral, Gemma, Nemotron 3/4, and GPT-style providers " \
    "(Llama/Mistral/Mixtral/Nemotron/GPT shapes)"


def _is_iteration(tree: Tree, rel: str = "") -> bool:
    base = f"{rel}/" if rel else ""
    return tree.is_file(f"{base}{RUN_CONFIG}") and (tree.is_file(f"{base}.metadata") or tree.is_file(
        f"{base}metadata.json"))


def _iteration_dirs(tree: Tree) -> list[str]:
    names = [n for n in tree.list("") if (_ITER.match(n) or n == "release") and tree.is_dir(n)]
    return sorted(names, key=lambda n: (n != "release", int(n[5:]) if n != "release" else -1))


def is_bridge(tree: Tree) -> bool:
    """A Megatron-Bridge checkpoint root (tracker file or ``iter_*`` dirs) or one of its iteration dirs."""
    if _is_iteration(tree):
        return True
    if tree.is_file(TRACKER):
        return True
    return any(_is_iteration(tree, n) for n in _iteration_dirs(tree))


def iteration_dir(tree: Tree) -> tuple[Tree, str]:
    """The iteration to export: ``tree`` itself if it is one, else the one the tracker file names."""
    what = tree.name
    if _is_iteration(tree):
        return tree, ""
    dirs = _iteration_dirs(tree)
    if tree.is_file(TRACKER):
        text = tree.read_text(TRACKER).strip()
        if text == "release":
            name = "release"
        elif text.isdigit():
            name = f"iter_{int(text):07d}"
        else:
            raise ExportError(f"{what}/{TRACKER} says {text[:40]!r}, not an iteration number; pass one "
                              "iter_NNNNNNN directory instead")
        if not tree.is_dir(name):
            have = ", ".join(dirs[-3:]) or "none"
            raise ExportError(f"{what}/{TRACKER} names iteration {text} but {name}/ is missing (iterations here: "
                              f"{have}); pass one iter_NNNNNNN directory instead")
    elif dirs:
        name = dirs[-1]
    else:
        raise ExportError(f"{what}: no iter_NNNNNNN directories; not a Megatron-Bridge checkpoint")
    if not _is_iteration(tree, name):
        missing = RUN_CONFIG if not tree.is_file(f"{name}/{RUN_CONFIG}") else ".metadata"
        raise ExportError(f"{what}/{name} has no {missing}; not a complete Megatron-Bridge checkpoint")
    return tree.sub(name), name


def _target_class(node: Any) -> str:
    return str(node.get("_target_", "")).rsplit(".", 1)[-1] if isinstance(node, dict) else ""


def _model_type_from_fields(m: dict[str, Any]) -> str | None:
    norm = str(m.get("normalization") or "LayerNorm").lower()
    act = _activation_target(m).rsplit(".", 1)[-1].lower()
    gated = bool(m.get("gated_linear_unit"))
    position = str(m.get("position_embedding_type") or "learned_absolute")
    if int(m.get("num_moe_experts") or 0):
        return "mixtral" if "rms" in norm and gated else None
    if "rms" in norm and gated and m.get("layernorm_zero_centered_gamma"):
        return "gemma"
    if "rms" in norm and gated and act in ("silu", "swish"):
        return "mistral" if m.get("window_size") else "llama"
    if "rms" not in norm and act == "squared_relu" and not gated:
        return "nemotron"
    if "rms" not in norm and position in ("rope", "learned_absolute") and not gated:
        return "gpt"
    return None


def model_type(model: dict[str, Any], forced: str | None) -> str:
    if forced:
        if forced.lower() not in MODEL_TYPES:
            raise ExportError(f"unknown --model-type {forced!r}; use one of {', '.join(MODEL_TYPES)}")
        return forced.lower()
    cls = _target_class(model)
    if not cls.endswith(_GENERIC):
        for prefix, mt in _PROVIDERS:
            if cls.startswith(prefix):
                if mt is None:
                    raise ExportError(f"run_config.yaml: the model provider {cls} has no tritonize family (Megatron-"
                                      f"Bridge families tritonize exports: {FAMILIES})")
                return mt
        if cls and not cls.endswith("ModelProvider") and "Provider" not in cls:
            raise ExportError(f"run_config.yaml: model._target_ {model.get('_target_')!r} is not a Megatron-Bridge "
                              "model provider")
        if cls and not cls.startswith("GPT"):
            raise ExportError(f"run_config.yaml: the model provider {cls} has no tritonize family (Megatron-Bridge "
                              f"families tritonize exports: {FAMILIES}); pass --model-type to force one")
    mt = _model_type_from_fields(model)
    if mt is None:
        raise ExportError(f"run_config.yaml: cannot tell the architecture of this {cls or 'GPT'} model from its "
                          "fields; pass --model-type")
    return mt


def _activation_target(m: dict[str, Any]) -> str:
    act = m.get("activation_func")
    if isinstance(act, dict):
        return str(act.get("_target_") or "torch.nn.functional.gelu")
    return str(act or "torch.nn.functional.gelu")


def _rope_scaling(m: dict[str, Any]) -> dict[str, Any] | None:
    """Megatron-Core's RotaryEmbedding(rope_scaling=True) is Llama 3.1's scaling with its fixed constants."""
    if m.get("rope_scaling") is True:
        return {"rope_type": "llama3", "factor": float(m.get("rope_scaling_factor") or 8.0), "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if m.get("seq_len_interpolation_factor"):
        return {"rope_type": "linear", "factor": float(m["seq_len_interpolation_factor"])}
    return None


def megatron_config(model: dict[str, Any], forced_type: str | None) -> MegatronConfig:
    """The ``model`` section of run_config.yaml as the facts the Megatron weight mapping needs."""
    if not isinstance(model, dict):
        raise ExportError("run_config.yaml has no 'model' mapping (the model provider)")
    mt = model_type(model, forced_type)
    nemo_config._check_common(model, "run_config.yaml model")
    if model.get("multi_latent_attention"):
        raise ExportError("run_config.yaml: multi-latent attention models are not supported")
    if model.get("rotary_interleaved"):
        raise ExportError("run_config.yaml: interleaved rotary embeddings (rotary_interleaved: true) are not supported")
    if str(model.get("position_embedding_type")) in ("yarn", "mrope", "relative", "none"):
        raise ExportError(f"run_config.yaml: position_embedding_type {model.get('position_embedding_type')!r} is not "
                          "supported (rope or learned_absolute)")
    norm = str(model.get("normalization") or "LayerNorm").lower()
    add_bias = bool(model.get("add_bias_linear", True))
    return nemo_config._finish(
        model,
        vocab_size=int(model["vocab_size"]) if model.get("vocab_size") else None,
        normalization="rmsnorm" if "rms" in norm else "layernorm",
        zero_centered_gamma=bool(model.get("layernorm_zero_centered_gamma", False)),
        gated=bool(model.get("gated_linear_unit", False)),
        activation=nemo_config._act_from_target(_activation_target(model)),
        add_bias_linear=add_bias,
        add_qkv_bias=bool(model.get("add_qkv_bias", False)) or add_bias,
        rotary_percent=float(model.get("rotary_percent", 1.0)),
        rope_scaling=_rope_scaling(model),
        max_position_embeddings=int(model.get("seq_length") or model.get("max_position_embeddings") or 4096),
        share_embeddings=bool(model.get("share_embeddings_and_output_weights", True)),
        parallel_attention=bool(model.get("parallel_attention", False)),
        new_decoder_architecture=False,
        model_type=mt,
    )


def tokenizer(it: Tree, root: Path | None, run: dict[str, Any], what: str) -> TokenizerFiles:
    """The tokenizer the checkpoint holds or names, or a one-line error saying what to pass.

    Looked for in order: ``iter_*/tokenizer/`` (Megatron-Bridge's ``save_tokenizer_assets``), a ``tokenizer/``
    directory beside the iterations (``root``), then what run_config.yaml's ``tokenizer.tokenizer_model`` (or
    the provider's ``hf_model_id``) names when that is a directory (or a SentencePiece model) on this machine.
    """
    cfg = run.get("tokenizer") if isinstance(run.get("tokenizer"), dict) else {}
    kind = str(cfg.get("tokenizer_type") or "HuggingFaceTokenizer")
    dirs: list[Tree] = [it.sub("tokenizer")] if it.is_dir("tokenizer") else []
    if root is not None and (root / "tokenizer").is_dir():
        dirs.append(DirTree(root / "tokenizer"))
    for sub in dirs:
        if kind == "TikTokenizer" and sub.is_file("tokenizer.json"):
            return tokenizer_files.tiktoken(sub.read_bytes("tokenizer.json"), f"{sub.name}/tokenizer.json",
                                            vocab_size=cfg.get("vocab_size"),
                                            num_special=cfg.get("tiktoken_num_special_tokens"),
                                            special_tokens=cfg.get("tiktoken_special_tokens"),
                                            pattern=cfg.get("tiktoken_pattern"))
        return tokenizer_files.huggingface(sub, sub.name)
    if kind == "NullTokenizer":
        raise ExportError(f"{what}: the run used NullTokenizer (token ids only); pass --tokenizer DIR with the "
                          "tokenizer the model should serve")
    ref = cfg.get("tokenizer_model") or (run.get("model") or {}).get("hf_model_id")
    if isinstance(ref, str) and ref.strip():
        path = Path(ref).expanduser()
        if not path.is_absolute() and root is not None and not ref.startswith("~"):
            path = root / path
        if path.is_dir():
            return tokenizer_files.from_user_dir(path)
        if path.is_file() and kind.endswith(("SentencePieceTokenizer", "Llama2Tokenizer")):
            return tokenizer_files.sentencepiece(path.read_bytes(), str(path))
        where = "a path that is not on this machine" if ref.startswith(("/", ".", "~")) else "a Hugging Face hub id"
        raise ExportError(f"{what} holds no tokenizer files and its run_config.yaml names the tokenizer {ref!r} "
                          f"({where}); pass --tokenizer DIR with that tokenizer's files (tokenizer.json, "
                          "tokenizer_config.json, ...)")
    raise ExportError(f"{what} holds no tokenizer files and its run_config.yaml names none; pass --tokenizer DIR")


def read_run_config(it: Tree, what: str) -> dict[str, Any]:
    try:
        run = yaml.safe_load(it.read_text(RUN_CONFIG))
    except yaml.YAMLError as e:
        raise ExportError(f"{what}/{RUN_CONFIG} is not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise ExportError(f"{what}/{RUN_CONFIG} is not UTF-8 text") from None
    if not isinstance(run, dict) or not isinstance(run.get("model"), dict):
        raise ExportError(f"{what}/{RUN_CONFIG} has no 'model' section; not a Megatron-Bridge run configuration")
    return run
