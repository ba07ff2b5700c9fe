"""The tokenizer a checkpoint declares, as files the preprocessing model can serve.

Sources: a Hugging Face tokenizer directory (``tokenizer.json`` and friends, copied unchanged, so
the served ids are the ones the checkpoint's own tokenizer produces), a SentencePiece model, a
GPT-2 byte-level BPE (``vocab.json`` + ``merges.txt``), or NeMo's tiktoken vocabulary (converted to
``tokenizer.json``). NeMo 1 names its artefacts ``nemo:<hex>_<name>``; NeMo 2 keeps them in
``context/``. The tokenizer's real size is what the padded Megatron vocabulary is trimmed to.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ExportError
from . import tiktoken_convert
from .tree import DirTree, Tree

#: the files of a Hugging Face tokenizer directory worth carrying over
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class TokenizerFiles:
    kind: str  # "huggingface" | "sentencepiece" | "gpt2-bpe" | "tiktoken"
    files: dict[str, bytes] = field(default_factory=dict)
    vocab_size: int = 0
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)
    pad_id: int | None = None
    origin: str = ""

    def write(self, out_dir: Path) -> None:
        for name, data in self.files.items():
            (out_dir / name).write_bytes(data)


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as e:
        raise ExportError(f"{what} is not valid JSON ({e})") from None


def _token_content(tok: Any) -> str | None:
    if isinstance(tok, dict):
        tok = tok.get("content")
    return tok if isinstance(tok, str) else None


def _hf_ids(tok_json: dict, config: dict) -> tuple[int, dict[str, int]]:
    """(vocabulary size, token -> id) of a tokenizer.json, added tokens included."""
    model = tok_json.get("model") or {}
    vocab = model.get("vocab") or {}
    ids: dict[str, int] = {}
    if isinstance(vocab, dict):
        ids.update({str(k): int(v) for k, v in vocab.items()})
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        ids.update({str(p[0]): i for i, p in enumerate(vocab)})
    for added in tok_json.get("added_tokens") or []:
        ids[str(added.get("content"))] = int(added.get("id"))
    size = max(ids.values()) + 1 if ids else 0
    return size, ids


def huggingface(tree: Tree, origin: str) -> TokenizerFiles:
    files = {n: tree.read_bytes(n) for n in HF_TOKENIZER_FILES if tree.is_file(n)}
    config = _json(files["tokenizer_config.json"], f"{origin}/tokenizer_config.json") \
        if "tokenizer_config.json" in files else {}
    special = _json(files["special_tokens_map.json"], f"{origin}/special_tokens_map.json") \
        if "special_tokens_map.json" in files else {}
    if "tokenizer.json" in files:
        size, ids = _hf_ids(_json(files["tokenizer.json"], f"{origin}/tokenizer.json"), config)
        for added in (config.get("added_tokens_decoder") or {}).items():
            ids.setdefault(str(_token_content(added[1])), int(added[0]))
            size = max(size, int(added[0]) + 1)

        def lookup(name: str) -> int | None:
            tok = _token_content(config.get(name)) or _token_content(special.get(name))
            return ids.get(tok) if tok else None

        tf = TokenizerFiles("huggingface", files, size, lookup("bos_token"),
                            [i for i in [lookup("eos_token")] if i is not None], lookup("pad_token"), origin)
        return tf
    if "tokenizer.model" in files:
        tf = sentencepiece(files["tokenizer.model"], origin)
        tf.files.update(files)
        return tf
    if "vocab.json" in files and "merges.txt" in files:
        tf = gpt2_bpe(files["vocab.json"], files["merges.txt"], origin)
        tf.files.update(files)
        return tf
    raise ExportError(f"{origin}: no tokenizer.json, tokenizer.model or vocab.json + merges.txt")


def sentencepiece(model: bytes, origin: str) -> TokenizerFiles:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model)
    except Exception as e:  # noqa: BLE001 - sentencepiece raises bare RuntimeErrors/OSErrors
        raise ExportError(f"{origin}: not a SentencePiece model ({e})") from None

    def piece(i: int) -> str | None:
        return sp.IdToPiece(i) if i >= 0 else None

    bos, eos, pad, unk = sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": bos >= 0,
        "add_eos_token": False,
        "bos_token": piece(bos),
        "eos_token": piece(eos),
        "unk_token": piece(unk),
        "pad_token": piece(pad),
        "legacy": True,
    }
    files = {"tokenizer.model": model, "tokenizer_config.json": _dump(config)}
    return TokenizerFiles("sentencepiece", files, sp.GetPieceSize(), bos if bos >= 0 else None,
                          [eos] if eos >= 0 else [], pad if pad >= 0 else None, origin)


def gpt2_bpe(vocab: bytes, merges: bytes, origin: str) -> TokenizerFiles:
    table = _json(vocab, f"{origin} vocab file")
    if not isinstance(table, dict) or not table:
        raise ExportError(f"{origin}: the GPT-2 vocab file is not a JSON object of token -> id")
    eos = table.get("<|endoftext|>")
    config = {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": False, "bos_token": "<|endoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    files = {"vocab.json": vocab, "merges.txt": merges, "tokenizer_config.json": _dump(config)}
    return TokenizerFiles("gpt2-bpe", files, max(int(v) for v in table.values()) + 1, eos,
                          [eos] if eos is not None else [], None, origin)


def tiktoken(vocab: bytes, origin: str, *, vocab_size: int | None = None, num_special: int | None = None,
             special_tokens: list[str] | None = None, pattern: str | None = None) -> TokenizerFiles:
    num_special = int(num_special or tiktoken_convert.DEFAULT_NUM_SPECIAL)
    vocab_size = int(vocab_size or tiktoken_convert.DEFAULT_VOCAB_SIZE)
    ranks = tiktoken_convert.load_ranks(vocab, limit=vocab_size - num_special)
    text = tiktoken_convert.tokenizer_json(ranks, num_special=num_special, special_tokens=special_tokens,
                                           pattern=pattern or tiktoken_convert.PATTERN_TIKTOKEN)
    specials = list(special_tokens or tiktoken_convert.SPECIAL_TOKENS)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "add_bos_token": False, "model_max_length": 1 << 30}
    files = {"tokenizer.json": text.encode("utf-8"), "tokenizer_config.json": _dump(config)}
    return TokenizerFiles("tiktoken", files, num_special + len(ranks), specials.index("<s>"),
                          [specials.index("</s>")], None, origin)


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


# --------------------------------------------------------------------------------------------------
# where each checkpoint kind keeps its tokenizer
# --------------------------------------------------------------------------------------------------


def _resolve(tree: Tree, ref: Any, search: tuple[str, ...] = ("",)) -> str | None:
    """A file a config refers to (``nemo:<hex>_name``, a relative or a foreign absolute path)."""
    if not isinstance(ref, str) or not ref:
        return None
    name = ref.removeprefix("nemo:")
    candidates = [name.lstrip("./")] if not name.startswith("/") else []
    base = posixpath.basename(name.rstrip("/"))
    candidates += [posixpath.join(d, base) if d else base for d in search]
    for c in candidates:
        try:
            if tree.is_file(c):
                return c
        except ExportError:
            continue
    return None


def from_nemo1(tree: Tree, tok_cfg: Any, origin: str) -> TokenizerFiles | None:
    """``tokenizer:`` of a NeMo 1 ``model_config.yaml`` (library sentencepiece / megatron / huggingface / tiktoken)."""
    if not isinstance(tok_cfg, dict):
        return None
    lib = str(tok_cfg.get("library", "")).lower()
    model = _resolve(tree, tok_cfg.get("model"))
    vocab = _resolve(tree, tok_cfg.get("vocab_file"))
    merges = _resolve(tree, tok_cfg.get("merge_file"))
    if lib == "sentencepiece" or (model and model.endswith(".model") and lib != "huggingface"):
        if not model:
            raise ExportError(f"{origin}: tokenizer model {tok_cfg.get('model')!r} is not in the checkpoint")
        return sentencepiece(tree.read_bytes(model), origin)
    if lib == "tiktoken":
        if not vocab:
            raise ExportError(f"{origin}: tiktoken vocab {tok_cfg.get('vocab_file')!r} is not in the checkpoint")
        return tiktoken(tree.read_bytes(vocab), origin, vocab_size=tok_cfg.get("vocab_size"),
                        num_special=tok_cfg.get("num_special_tokens"), special_tokens=tok_cfg.get("special_tokens"),
                        pattern=tok_cfg.get("pattern"))
    if vocab and merges:
        return gpt2_bpe(tree.read_bytes(vocab), tree.read_bytes(merges), origin)
    if lib == "huggingface":
        for d in ("huggingface_tokenizer", "tokenizer", "nemo_tokenizer"):
            if tree.is_dir(d):
                return huggingface(tree.sub(d), f"{origin}/{d}")
        raise ExportError(
            f"{origin}: the tokenizer is the Hugging Face model {tok_cfg.get('type')!r}, which the checkpoint does "
            "not contain; pass --tokenizer DIR with its tokenizer files"
        )
    return None


def from_nemo2_context(context: Tree, model_yaml: dict, origin: str) -> TokenizerFiles | None:
    """The tokenizer of a NeMo 2 ``context/`` (AutoTokenizer dir, SentencePiece model or tiktoken vocab)."""
    tok = model_yaml.get("tokenizer") if isinstance(model_yaml, dict) else None
    target = str((tok or {}).get("_target_", "")) if isinstance(tok, dict) else ""
    search = ("", "nemo_tokenizer", "artifacts", "tokenizer")
    if isinstance(tok, dict) and "tiktoken" in target.lower():
        vocab = _resolve(context, tok.get("vocab_file"), search)
        if not vocab:
            raise ExportError(f"{origin}: tiktoken vocab {tok.get('vocab_file')!r} is not in context/")
        return tiktoken(context.read_bytes(vocab), origin, vocab_size=tok.get("vocab_size"),
                        num_special=tok.get("num_special_tokens"), special_tokens=tok.get("special_tokens"),
                        pattern=tok.get("pattern"))
    if isinstance(tok, dict) and "sentencepiece" in target.lower():
        model = _resolve(context, tok.get("model_path") or tok.get("tokenizer_path"), search)
        if not model:
            raise ExportError(f"{origin}: SentencePiece model {tok.get('model_path')!r} is not in context/")
        return sentencepiece(context.read_bytes(model), origin)
    if isinstance(tok, dict) and "auto_tokenizer" in target.lower():
        name = str(tok.get("pretrained_model_name") or "nemo_tokenizer")
        name = name if context.is_dir(name.strip("/")) and not name.startswith("/") else "nemo_tokenizer"
        if context.is_dir(name):
            return huggingface(context.sub(name), f"{origin}/{name}")
    for d in ("nemo_tokenizer", "huggingface_tokenizer", "tokenizer"):
        if context.is_dir(d):
            return huggingface(context.sub(d), f"{origin}/{d}")
    for n in context.list(""):
        if n.endswith(".model") and context.is_file(n):
            return sentencepiece(context.read_bytes(n), f"{origin}/{n}")
    return None


def from_user_dir(path: Path) -> TokenizerFiles:
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"--tokenizer {path} is not a directory")
    return huggingface(DirTree(path), str(path))
