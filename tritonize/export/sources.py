"""Recognising a checkpoint and reading it into a canonical model plus its tokenizer.

Kinds, by what the tree holds:
- Hugging Face: ``config.json`` with ``architectures``/``model_type`` and safetensors or ``.bin`` weights;
- TRT-LLM checkpoint / ``.qnemo``: ``config.json`` with ``architecture`` and ``rank0.safetensors``;
- NeMo 2: ``context/`` (``model.yaml``) and ``weights/`` (torch_dist);
- NeMo 1 ``.nemo``: ``model_config.yaml`` and ``model_weights/`` (torch_dist or zarr, per its
  ``metadata.json``), or a single-rank ``model_weights.ckpt``;
- Megatron-Bridge: ``latest_checkpointed_iteration.txt`` and ``iter_NNNNNNN/`` directories, or one of them
  (``run_config.yaml`` beside torch_dist weights); see ``bridge.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ExportError
from . import bridge, dcp, hf_config, hf_layout, megatron, nemo_config, tokenizer_files, trtllm_read
from .canonical import Model
from .fp8 import hf_fp8_block
from .lazy import Region
from .nemo_config import MegatronConfig
from .stored import StoredTensor
from .tokenizer_files import TokenizerFiles
from .tree import DirTree, Tree
from .weight_files import read_bin, read_safetensors
from .zarr_store import read_zarr


@dataclass
class Loaded:
    kind: str  # "nemo1" | "nemo2" | "megatron-bridge" | "trtllm" | "hf"
    model: Model
    tokenizer: TokenizerFiles | None
    generation_config: dict[str, Any] | None = None
    hf_config: dict[str, Any] | None = None  # an HF source's own config.json, kept as the base
    facts: dict[str, Any] = field(default_factory=dict)
    megatron: MegatronConfig | None = None  # NeMo sources: for the reference forward
    megatron_tensors: dict[str, StoredTensor] | None = None


def _yaml(tree: Tree, rel: str) -> Any:
    try:
        return yaml.safe_load(tree.read_text(rel))
    except yaml.YAMLError as e:
        raise ExportError(f"{tree.name}/{rel} is not valid YAML ({str(e).splitlines()[0]})") from None


def _json(tree: Tree, rel: str) -> Any:
    try:
        return json.loads(tree.read_text(rel))
    except ValueError as e:
        raise ExportError(f"{tree.name}/{rel} is not valid JSON ({e})") from None


def detect(tree: Tree) -> str:
    """The kind of checkpoint ``tree`` is, or a one-line error saying what is missing."""
    if tree.is_file("config.json"):
        cfg = _json(tree, "config.json")
        if isinstance(cfg, dict) and "architecture" in cfg:
            if not tree.is_file("rank0.safetensors"):
                raise ExportError(f"{tree.name}: TRT-LLM config.json found but rank0.safetensors is missing")
            return "trtllm"
        if isinstance(cfg, dict) and ("architectures" in cfg or "model_type" in cfg):
            names = tree.list("")
            if not any(n.endswith(".safetensors") or (n.startswith("pytorch_model") and n.endswith(".bin"))
                       for n in names):
                raise ExportError(f"{tree.name}: Hugging Face config.json found but no *.safetensors or "
                                  "pytorch_model*.bin weights")
            return "hf"
    if tree.is_dir("context") or tree.is_dir("weights"):
        if not tree.is_dir("weights"):
            raise ExportError(f"{tree.name}: NeMo 2 checkpoint without weights/ directory")
        if not (tree.is_file("context/model.yaml") or tree.is_file("context/io.json")):
            raise ExportError(f"{tree.name}: NeMo 2 checkpoint without context/model.yaml")
        return "nemo2"
    if tree.is_file("nemo_context/model.yaml") and tree.is_file("rank0.safetensors"):
        raise ExportError(f"{tree.name}: .qnemo without the TRT-LLM config.json")
    if tree.is_file("model_config.yaml"):
        if not (tree.is_dir("model_weights") or tree.is_file("model_weights.ckpt")
                or tree.is_file("mp_rank_00/model_weights.ckpt")):
            raise ExportError(f"{tree.name}: model_config.yaml found but no model_weights/ (the .nemo has no weights)")
        return "nemo1"
    if tree.is_dir("model_weights") or tree.is_file("model_weights.ckpt"):
        raise ExportError(f"{tree.name}: model_weights found but model_config.yaml is missing; not a complete .nemo")
    if bridge.is_bridge(tree):
        return "megatron-bridge"
    raise ExportError(
        f"{tree.name} is not a recognised checkpoint: expected a .nemo (model_config.yaml), a NeMo 2 directory "
        "(context/ + weights/), a Megatron-Bridge checkpoint (latest_checkpointed_iteration.txt + iter_*/, or one "
        "iter_*/ with run_config.yaml), a TRT-LLM checkpoint / .qnemo (config.json + rank0.safetensors) or a "
        "Hugging Face directory (config.json + *.safetensors)"
    )


def _vocab(cfg_vocab: int | None, tok: TokenizerFiles | None, rows: int, what: str) -> int:
    if tok is not None and tok.vocab_size:
        if cfg_vocab is not None and tok.vocab_size > cfg_vocab:
            raise ExportError(f"{what}: the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                              f"{cfg_vocab}; the tokenizer does not belong to this checkpoint")
        return tok.vocab_size
    return cfg_vocab or rows


def _megatron_load(tensors: dict[str, StoredTensor], cfg: MegatronConfig, tok: TokenizerFiles | None,
                   what: str) -> tuple[Model, dict[str, StoredTensor]]:
    stripped: dict[str, StoredTensor] = {}
    for key, t in tensors.items():
        if megatron.is_weight_key(key):
            stripped[megatron.strip_prefix(key)] = t
    emb = stripped.get("embedding.word_embeddings.weight")
    rows = emb.shape[0] if emb is not None else 0
    vocab = _vocab(cfg.vocab_size, tok, rows, what)
    return megatron.megatron_model(stripped, cfg, vocab, what), stripped


def _apply_special_ids(model: Model, tok: TokenizerFiles | None, gen: dict[str, Any] | None) -> None:
    spec = model.spec
    eos: list[int] = []
    if gen and gen.get("eos_token_id") is not None:
        e = gen["eos_token_id"]
        eos = [int(x) for x in (e if isinstance(e, list) else [e])]
    if tok is not None:
        eos += [i for i in tok.eos_ids if i not in eos]
    if eos:
        spec.eos_token_ids = eos
    bos = (gen or {}).get("bos_token_id")
    if bos is None and tok is not None:
        bos = tok.bos_id
    if bos is not None:
        spec.bos_token_id = int(bos)
    pad = (gen or {}).get("pad_token_id")
    if pad is None and tok is not None:
        pad = tok.pad_id
    if pad is not None and not isinstance(pad, list):
        spec.pad_token_id = int(pad)


def load_nemo1(tree: Tree, model_type: str | None, user_tok: TokenizerFiles | None) -> Loaded:
    what = tree.name
    cfg_raw = _yaml(tree, "model_config.yaml")
    if isinstance(cfg_raw, dict) and isinstance(cfg_raw.get("model"), dict) and "num_layers" not in cfg_raw:
        cfg_raw = cfg_raw["model"]
    cfg = nemo_config.from_nemo1(cfg_raw, model_type)
    tok = user_tok or tokenizer_files.from_nemo1(tree, cfg_raw.get("tokenizer"), what)
    facts: dict[str, Any] = {}
    if tree.is_dir("model_weights"):
        wt = tree.sub("model_weights")
        backend = "torch_dist"
        if wt.is_file("metadata.json"):
            backend = str(_json(wt, "metadata.json").get("sharded_backend", "torch_dist"))
        if backend == "torch_dist":
            tensors = dcp.read_dcp(wt, f"{what}/model_weights", megatron.is_weight_key)
            dcp.read_common(wt, f"{what}/model_weights")  # refuses a hostile common.pt even if unused
        elif backend == "zarr":
            tensors = read_zarr(wt, f"{what}/model_weights", megatron.is_weight_key)
        else:
            raise ExportError(f"{what}: sharded_backend {backend!r} is not supported (torch_dist or zarr)")
        facts["weights_backend"] = backend
    elif tree.is_file("model_weights.ckpt"):
        tensors = read_bin(tree, "model_weights.ckpt")
        facts["weights_backend"] = "ckpt"
    else:
        raise ExportError(f"{what}: tensor-parallel legacy checkpoints (mp_rank_XX/model_weights.ckpt) are not "
                          "supported; re-save the model as a distributed checkpoint")
    if not tensors:
        raise ExportError(f"{what}: model_weights holds no tensors")
    model, stripped = _megatron_load(dict(tensors.items()), cfg, tok, what)
    gen = None
    _apply_special_ids(model, tok, gen)
    return Loaded("nemo1", model, tok, gen, None, facts, cfg, stripped)


def load_nemo2(tree: Tree, model_type: str | None, user_tok: TokenizerFiles | None) -> Loaded:
    what = tree.name
    ctx = tree.sub("context")
    if not ctx.is_file("model.yaml"):
        raise ExportError(f"{what}: context/model.yaml is missing")
    model_yaml = _yaml(ctx, "model.yaml")
    if not isinstance(model_yaml, dict):
        raise ExportError(f"{what}: context/model.yaml is not a mapping")
    cfg = nemo_config.from_nemo2(model_yaml, model_type)
    tok = user_tok or tokenizer_files.from_nemo2_context(ctx, model_yaml, f"{what}/context")
    wt = tree.sub("weights")
    meta = _json(wt, "metadata.json") if wt.is_file("metadata.json") else {"sharded_backend": "torch_dist"}
    backend = str(meta.get("sharded_backend", "torch_dist"))
    if backend == "zarr":
        tensors = read_zarr(wt, f"{what}/weights", megatron.is_weight_key)
    elif backend == "torch_dist":
        tensors = dcp.read_dcp(wt, f"{what}/weights", megatron.is_weight_key)
        dcp.read_common(wt, f"{what}/weights")
    else:
        raise ExportError(f"{what}: sharded_backend {backend!r} is not supported")
    gen = _json(ctx, "artifacts/generation_config.json") if ctx.is_file("artifacts/generation_config.json") else None
    model, stripped = _megatron_load(dict(tensors.items()), cfg, tok, what)
    _apply_special_ids(model, tok, gen)
    facts = {"weights_backend": backend, "nemo_target": model_yaml.get("_target_")}
    return Loaded("nemo2", model, tok, gen, None, facts, cfg, stripped)


def load_trtllm(tree: Tree, model_type: str | None, user_tok: TokenizerFiles | None) -> Loaded:
    what = tree.name
    model = trtllm_read.read_trtllm(tree, model_type, what)
    tok = user_tok
    gen = None
    if tok is None:
        if tree.is_dir("nemo_context"):
            ctx = tree.sub("nemo_context")
            my = _yaml(ctx, "model.yaml") if ctx.is_file("model.yaml") else {}
            tok = tokenizer_files.from_nemo2_context(ctx, my if isinstance(my, dict) else {}, f"{what}/nemo_context")
            if ctx.is_file("artifacts/generation_config.json"):
                gen = _json(ctx, "artifacts/generation_config.json")
        elif tree.is_dir("huggingface_tokenizer"):
            tok = tokenizer_files.huggingface(tree.sub("huggingface_tokenizer"), f"{what}/huggingface_tokenizer")
        elif any(tree.is_file(n) for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            tok = tokenizer_files.huggingface(tree, what)
        elif tree.is_file("tokenizer_config.yaml"):
            tok = tokenizer_files.from_nemo1(tree, _yaml(tree, "tokenizer_config.yaml"), what)
    if gen is None and tree.is_file("generation_config.json"):
        gen = _json(tree, "generation_config.json")
    if tok is not None and tok.vocab_size > model.spec.vocab_size:
        raise ExportError(f"{what}: the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                          f"{model.spec.vocab_size}")
    _apply_special_ids(model, tok, gen)
    cfg = trtllm_read.read_config(tree, what)
    facts = {"trtllm_architecture": cfg.get("architecture"),
             "quantization": (cfg.get("quantization") or {}).get("quant_algo"),
             "mapping": cfg.get("mapping")}
    return Loaded("trtllm", model, tok, gen, None, facts)


def hf_tensors(tree: Tree) -> dict[str, StoredTensor]:
    names = tree.list("")
    st = sorted(n for n in names if n.endswith(".safetensors"))
    out: dict[str, StoredTensor] = {}
    if st:
        for n in st:
            out.update(read_safetensors(tree, n))
        return out
    for n in sorted(n for n in names if n.startswith("pytorch_model") and n.endswith(".bin")):
        out.update(read_bin(tree, n))
    return out


def load_hf(tree: Tree, model_type: str | None, user_tok: TokenizerFiles | None) -> Loaded:
    what = tree.name
    cfg = _json(tree, "config.json")
    spec = hf_config.spec_from_hf_config(cfg, model_type)
    tensors = hf_tensors(tree)
    quant = _json(tree, "hf_quant_config.json") if tree.is_file("hf_quant_config.json") else None
    model = hf_layout.from_hf(spec, lambda n: Region(tensors[n]), set(tensors), fp8_block=hf_fp8_block(cfg, quant))
    tok = user_tok
    if tok is None and any(tree.is_file(n) for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        tok = tokenizer_files.huggingface(tree, what)
    gen = _json(tree, "generation_config.json") if tree.is_file("generation_config.json") else None
    if tok is not None and tok.vocab_size > spec.vocab_size:
        raise ExportError(f"{what}: the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                          f"{spec.vocab_size}")
    if model.embed.shape[0] != spec.vocab_size:
        raise ExportError(f"{what}: the embedding has {model.embed.shape[0]} rows, config.json says "
                          f"vocab_size {spec.vocab_size}")
    _apply_special_ids(model, None, gen)
    facts = {"hf_architecture": spec.arch}
    qc = cfg.get("quantization_config") or ((quant or {}).get("quantization") if quant else None)
    if isinstance(qc, dict):
        facts["quantization"] = qc.get("quant_method") or qc.get("quant_algo") or "modelopt"
    return Loaded("hf", model, tok, gen, cfg, facts)


def load_bridge(tree: Tree, model_type: str | None, user_tok: TokenizerFiles | None) -> Loaded:
    """A Megatron-Bridge checkpoint (root or ``iter_*``): its run configuration read by bridge.py, its
    weights by the same Megatron converter as NeMo's."""
    it, name = bridge.iteration_dir(tree)
    what = it.name
    run = bridge.read_run_config(it, what)
    cfg = bridge.megatron_config(run["model"], model_type)
    backend = "torch_dist"
    if it.is_file("metadata.json"):
        meta = _json(it, "metadata.json")
        backend = str(meta.get("sharded_backend", "torch_dist")) if isinstance(meta, dict) else "torch_dist"
    if backend != "torch_dist":
        raise ExportError(f"{what}: sharded_backend {backend!r} is not supported in a Megatron-Bridge checkpoint "
                          "(torch_dist)")
    tensors = dcp.read_dcp(it, what, megatron.is_weight_key)
    dcp.read_common(it, what)  # refuses a hostile common.pt even though nothing in it is needed
    if not tensors:
        raise ExportError(f"{what}: the checkpoint holds no model tensors")
    root = None
    if isinstance(tree, DirTree):  # the directory holding the iterations
        root = tree.root if name else tree.root.parent
    tok = user_tok or bridge.tokenizer(it, root, run, what)
    model, stripped = _megatron_load(dict(tensors.items()), cfg, tok, what)
    _apply_special_ids(model, tok, None)
    facts = {"weights_backend": backend, "iteration": name or it.name,
             "bridge_provider": (run["model"] or {}).get("_target_"),
             "hf_model_id": (run["model"] or {}).get("hf_model_id")}
    return Loaded("megatron-bridge", model, tok, None, None, facts, cfg, stripped)


LOADERS = {"nemo1": load_nemo1, "nemo2": load_nemo2, "megatron-bridge": load_bridge, "trtllm": load_trtllm,
           "hf": load_hf}


def load(tree: Tree, model_type: str | None, tokenizer_dir: Path | None = None) -> Loaded:
    kind = detect(tree)
    user_tok = tokenizer_files.from_user_dir(tokenizer_dir) if tokenizer_dir else None
    return LOADERS[kind](tree, model_type, user_tok)
