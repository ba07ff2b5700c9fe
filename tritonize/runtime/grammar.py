"""Structured output: what a guide is, and the grammar engine that enforces it (xgrammar).

A request may carry a guide: tensorrtllm_backend's ``guided_decoding_guide_type`` (``json`` for any JSON
object, ``json_schema``, ``regex``, ``ebnf_grammar``, ``structural_tag``) and ``guided_decoding_guide`` (the
schema, pattern or grammar). ``make_guide`` checks one without the grammar library (preprocessing and the
engine model call it, so a malformed guide is a one-line error before the engine sees it).

``GrammarCompiler`` compiles guides for one model's vocabulary on threads of its own, caching them by
their text: the engine's thread never waits for a compilation. It reads the vocabulary from the
repository's tokenizer files (tokenizer.json, SentencePiece's tokenizer.model, or GPT-2's vocab.json) and
imports xgrammar only when the first guide arrives, so a repository serves without the package until a
guided request comes; that request is then refused with a line that names it.

``GuideState`` is one request's matcher: it takes each accepted token, fills the request's row of the
token bitmask (bit ``t`` of row ``r``: token ``t`` may come next), and says when the grammar is complete
with nothing but an end id allowed after it. JSON is compact (no whitespace between tokens: ``,`` and
``:`` separators), so even a model that knows nothing of JSON closes a small object quickly.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "GUIDE_TYPES",
    "INSTALL_HINT",
    "GrammarCompiler",
    "Guide",
    "GuideError",
    "GuideState",
    "bitmask_words",
    "clear_bit",
    "grammar_library_missing",
    "make_guide",
]

GUIDE_TYPES = ("json", "json_schema", "regex", "ebnf_grammar", "structural_tag")
INSTALL_HINT = "pip install xgrammar"
JSON_SEPARATORS = (",", ":")
_CACHE_SIZE = 256
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_LOG_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")  # xgrammar's "[hh:mm:ss] /path/file.cc:N: "
_CHECK_FAILED = re.compile(r"^Check failed: \(.*?\) is false: ")


class GuideError(ValueError):
    """A guide that cannot be served; the message is one line for the client."""


@dataclass(frozen=True)
class Guide:
    type: str  # one of GUIDE_TYPES
    text: str = ""  # the schema, pattern or grammar ("" for json: any object)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise GuideError("guided decoding inputs must be UTF-8 text") from None
    return str(value)


def make_guide(guide_type: Any, guide: Any) -> Guide | None:
    """The guide of a request's ``guided_decoding_guide_type`` / ``guided_decoding_guide``, or None when it
    has neither. Raises GuideError (one line) for an unknown type, a guide without a type, a type that needs
    a guide and has none, and a schema or structural tag that is not JSON."""
    kind, text = _text(guide_type).strip(), _text(guide)
    if not kind:
        if text:
            raise GuideError("guided_decoding_guide was sent without guided_decoding_guide_type: send the type too "
                             f"({', '.join(GUIDE_TYPES)})")
        return None
    if kind not in GUIDE_TYPES:
        raise GuideError(f"guided_decoding_guide_type {kind!r} is not one of {', '.join(GUIDE_TYPES)}")
    if kind == "json":
        return Guide("json")  # any JSON object; a guide sent with it is ignored, as TensorRT-LLM does
    if not text.strip():
        what = {"json_schema": "the JSON schema", "regex": "the regular expression",
                "ebnf_grammar": "the EBNF grammar", "structural_tag": "the structural tag (JSON)"}[kind]
        raise GuideError(f"guided_decoding_guide_type {kind} needs guided_decoding_guide: send {what}")
    if kind in ("json_schema", "structural_tag"):
        try:
            value = json.loads(text)
        except ValueError as e:
            raise GuideError(f"the {kind} guide is not JSON: {e}") from None
        allowed = (dict, bool) if kind == "json_schema" else (dict,)
        if not isinstance(value, allowed):
            raise GuideError(f"the {kind} guide must be a JSON object, not {type(value).__name__}")
    return Guide(kind, text)


def grammar_library_missing() -> str | None:
    """The one-line refusal of a guided request where xgrammar cannot be imported; None where it can."""
    import importlib.util
    import sys

    try:
        found = sys.modules["xgrammar"] is not None if "xgrammar" in sys.modules else \
            importlib.util.find_spec("xgrammar") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return ("guided decoding needs the xgrammar package in the server's Python, which does not have it: "
                f"{INSTALL_HINT}")
    return None


def _import_xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as e:
        raise GuideError(f"guided decoding needs the xgrammar package in the server's Python ({e}): "
                         f"{INSTALL_HINT}") from None
    return xgrammar


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = _CHECK_FAILED.sub("", _LOG_PREFIX.sub("", lines[0] if lines else type(exc).__name__))
    return text.rstrip(".")


def bitmask_words(vocab_size: int) -> int:
    return -(-vocab_size // 32)


# --- the vocabulary as xgrammar reads it --------------------------------------------------------------------
def _decoder_types(tokenizer_json: dict) -> set[str]:
    """Every decoder type of tokenizer.json, a Sequence's members included; and the Replace of the
    SentencePiece space marker as "Metaspace"."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if not isinstance(node, dict):
            return
        kind = node.get("type")
        if kind == "Replace" and (node.get("pattern") or {}).get("String") == "\u2581":
            kind = "Metaspace"
        if kind:
            found.add(kind)
        for child in node.get("decoders") or ():
            walk(child)

    walk(tokenizer_json.get("decoder"))
    return found


def tokenizer_vocabulary(tokenizer_dir: str | Path, vocab_size: int, special_ids: Sequence[int] = ()
                         ) -> tuple[list[str], str, bool]:
    """(encoded vocabulary of ``vocab_size`` entries, xgrammar vocab type name, add_prefix_space).

    Special tokens (the tokenizer's own and ``special_ids``) get "" so the grammar never allows them as
    text; the end ids are allowed by the matcher as stop tokens. Ids past the tokenizer's vocabulary (a
    padded embedding) are "" too.
    """
    from .tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_dir)
    pieces = [""] * vocab_size
    special = {int(i) for i in special_ids}
    if tok.kind == "sentencepiece":
        sp = tok._sp
        for i in range(min(vocab_size, sp.GetPieceSize())):
            if sp.IsControl(i) or sp.IsUnknown(i):
                special.add(i)
            pieces[i] = sp.IdToPiece(i)
        # SentencePiece marks spaces with U+2581 and spells unknown bytes <0xXX>: xgrammar's byte-fallback
        # decoding reads both (with or without byte pieces in the vocabulary)
        vocab_type = "BYTE_FALLBACK"
        first = tok.encode("a", add_special_tokens=False)[:1]
        prefix = bool(first) and sp.IdToPiece(first[0]).startswith("\u2581")
    else:
        hf = tok._hf
        for piece, i in hf.get_vocab(with_added_tokens=True).items():
            if 0 <= i < vocab_size:
                pieces[i] = piece
        for i, added in getattr(hf, "get_added_tokens_decoder", dict)().items():
            if getattr(added, "special", False):
                special.add(int(i))
        decoders: set[str] = set()
        if tok.kind == "gpt2-bpe":
            decoders = {"ByteLevel"}
        elif (Path(tokenizer_dir) / "tokenizer.json").is_file():
            try:
                decoders = _decoder_types(json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text("utf-8")))
            except ValueError:
                decoders = set()
        byte_pieces = sum(1 for p in pieces if _BYTE_PIECE.match(p))
        if "ByteLevel" in decoders:
            vocab_type, marker = "BYTE_LEVEL", "\u0120"
        elif byte_pieces >= 128 or decoders & {"ByteFallback", "Metaspace"}:
            vocab_type, marker = "BYTE_FALLBACK", "\u2581"
        else:
            vocab_type, marker = "RAW", None
        first = tok.encode("a", add_special_tokens=False)[:1]
        prefix = bool(marker and first and (hf.id_to_token(first[0]) or "").startswith(marker))
    for i in special:
        if 0 <= i < vocab_size:
            pieces[i] = ""
    return pieces, vocab_type, bool(prefix)


class GrammarCompiler:
    """Compiles guides for one model on a small thread pool; compiled grammars are cached by guide.

    ``compile(guide)`` returns a Future at once: of an xgrammar ``CompiledGrammar``, or failing with a
    GuideError whose message is the one line the client gets. The first call imports xgrammar and reads
    the vocabulary, on the pool's thread too.
    """

    def __init__(self, tokenizer_dir: str | Path, vocab_size: int, stop_ids: Sequence[int] = (), *,
                 threads: int = 2, cache_size: int = _CACHE_SIZE) -> None:
        self.tokenizer_dir = Path(tokenizer_dir)
        self.vocab_size = int(vocab_size)
        self.stop_ids = [int(i) for i in stop_ids if 0 <= int(i) < vocab_size]
        self.cache_size = cache_size
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tritonize-grammar")
        self._cache: OrderedDict[Guide, Future] = OrderedDict()
        self._lock = threading.Lock()  # the cache (taken by the engine's thread: held briefly)
        self._init_lock = threading.Lock()  # the library and the vocabulary (pool threads only)
        self._compiler: Any = None
        self._xgr: Any = None
        self.compiled = 0  # compilations run (cache misses), for tests and stats

    def compile(self, guide: Guide) -> Future:
        with self._lock:
            future = self._cache.get(guide)
            if future is not None:
                self._cache.move_to_end(guide)
                return future
            future = self._pool.submit(self._compile, guide)
            self._cache[guide] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return future

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def xgrammar(self) -> Any:
        return self._xgr

    @property
    def cpu_kernel(self) -> Any:
        """xgrammar's compiled in-place mask for CPU logits (``kernel(logits, bitmask)``); None before the
        library is loaded."""
        if self._xgr is None:
            return None
        return lambda logits, bitmask: self._xgr.apply_token_bitmask_inplace(logits, bitmask, backend="cpu")

    def _library(self) -> tuple[Any, Any]:
        with self._init_lock:
            if self._compiler is None:
                xgr = _import_xgrammar()
                if not any(self.tokenizer_dir.glob("tokenizer.*")) and not (self.tokenizer_dir / "vocab.json").is_file():
                    raise GuideError(f"guided decoding needs the model's tokenizer files in {self.tokenizer_dir}: "
                                     "regenerate the repository with tritonize generate")
                try:
                    pieces, vocab_type, prefix = tokenizer_vocabulary(self.tokenizer_dir, self.vocab_size, ())
                    info = xgr.TokenizerInfo(pieces, getattr(xgr.VocabType, vocab_type), vocab_size=self.vocab_size,
                                             stop_token_ids=self.stop_ids or None, add_prefix_space=prefix)
                except GuideError:
                    raise
                except Exception as e:  # noqa: BLE001 - the library's own errors
                    raise GuideError(f"cannot read this model's vocabulary for guided decoding: {_one_line(e)}") from None
                # the cache is ours (bounded, by guide); the library's own would grow with every new guide
                self._compiler = xgr.GrammarCompiler(info, max_threads=self.threads, cache_enabled=False)
                self._xgr = xgr
            return self._xgr, self._compiler

    def _compile(self, guide: Guide) -> Any:
        _, compiler = self._library()
        self.compiled += 1
        try:
            if guide.type == "json":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                    separators=JSON_SEPARATORS, strict_mode=False)
            if guide.type == "json_schema":
                return compiler.compile_json_schema(guide.text, any_whitespace=False, separators=JSON_SEPARATORS)
            if guide.type == "regex":
                return compiler.compile_regex(guide.text)
            if guide.type == "ebnf_grammar":
                return compiler.compile_grammar(guide.text)
            return compiler.compile_structural_tag(guide.text)
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError / its own errors
            raise GuideError(f"the {guide.type} guide does not compile: {_one_line(e)}") from None


class GuideState:
    """One request's grammar matcher: what its output so far allows next.

    ``end_ids`` are the request's end ids: the matcher allows them exactly where the grammar may end. A
    request without end ids cannot end on one: the grammar's own stop tokens are masked out and the request
    ends when the grammar is complete and allows nothing more.
    """

    def __init__(self, xgr: Any, compiled: Any, end_ids: Sequence[int], vocab_size: int,
                 stop_ids: Sequence[int] = ()) -> None:
        ends = sorted({int(e) for e in end_ids if 0 <= int(e) < vocab_size})
        if ends:
            self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=ends)
            self.masked: list[int] = []
        else:
            self.matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
            self.masked = [int(i) for i in stop_ids if 0 <= int(i) < vocab_size]
        self.end_ids = frozenset(ends)
        self.accepted = 0  # tokens of the output the matcher has taken
        self.words = bitmask_words(vocab_size)

    def advance(self, output: Sequence[int]) -> bool:
        """Takes the output's tokens the matcher has not seen; False when one is not allowed.

        A matcher ahead of the output (which never shrinks while a request runs) starts again from the
        beginning, so its state always follows the output it is given.
        """
        if self.accepted > len(output):
            self.matcher.reset()
            self.accepted = 0
        while self.accepted < len(output):
            token = int(output[self.accepted])
            if self.matcher.is_terminated() or not self.matcher.accept_token(token):
                return False
            self.accepted += 1
        return True

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Row ``row`` of ``bitmask`` ([rows, words] int32, on the CPU): the tokens allowed next."""
        if self.matcher.is_terminated():
            bitmask[row].fill_(-1)  # its request is over; this row's token is dropped anyway
            return
        self.matcher.fill_next_token_bitmask(bitmask, row)
        for token in self.masked:
            clear_bit(bitmask, row, token)

    def finished(self, scratch: torch.Tensor) -> bool:
        """Whether the output is complete under the grammar and nothing but an end id may follow
        (``scratch``: a [1, words] int32 tensor to fill)."""
        if self.matcher.is_terminated():
            return True
        if not self.matcher.is_completed():
            return False
        self.fill(scratch, 0)
        for token in self.end_ids:
            clear_bit(scratch, 0, token)
        return not bool(scratch[0].any())


def clear_bit(bitmask: torch.Tensor, row: int, token: int) -> None:
    """Disallow ``token`` in row ``row`` of an int32 bitmask on the CPU (through numpy: one scalar write)."""
    keep = ~(1 << (token % 32)) & 0xFFFFFFFF
    words = bitmask.numpy()
    words[row, token // 32] &= np.int32(keep - (1 << 32) if keep >= 1 << 31 else keep)
