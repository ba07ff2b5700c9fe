"""Tokenization for the preprocessing and postprocessing models.

The served tokenizer must be the one the checkpoint declares, so the choice follows what
transformers' AutoTokenizer would load: ``tokenizer.json`` when present (a "fast" tokenizer),
otherwise SentencePiece's ``tokenizer.model``, otherwise a GPT-2 style ``vocab.json`` +
``merges.txt``. Only ``tokenizers`` / ``sentencepiece`` are needed at serving time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)

#: tokens of context sent before each streamed delta; a UTF-8 character is at most 4 byte tokens
STREAM_CONTEXT_TOKENS = 8


class TokenizerError(Exception):
    """A tokenizer directory that cannot be served; the message says what is missing."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read {path.name}: {e}") from None


class Tokenizer:
    """encode / decode over one of the three on-disk formats, without transformers."""

    def __init__(self, directory: str | Path):
        d = Path(directory)
        self.directory = d
        cfg = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
        self._sp = None
        self._hf = None
        if (d / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self._hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
            except Exception as e:  # noqa: BLE001 - the library raises bare Exceptions
                raise TokenizerError(f"cannot load tokenizer.json: {e}") from None
            self.kind = "tokenizers"
        elif (d / "tokenizer.model").is_file():
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor()
            try:
                self._sp.Load(str(d / "tokenizer.model"))
            except Exception as e:  # noqa: BLE001
                raise TokenizerError(f"cannot load tokenizer.model: {e}") from None
            self.kind = "sentencepiece"
        elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            from tokenizers import Tokenizer as HFTokenizer
            from tokenizers import decoders, models, pre_tokenizers

            bpe = models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt"))
            self._hf = HFTokenizer(bpe)
            self._hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            self._hf.decoder = decoders.ByteLevel()
            self.kind = "gpt2-bpe"
        else:
            raise TokenizerError(
                f"no tokenizer in {d}: expected tokenizer.json, tokenizer.model, or vocab.json + merges.txt"
            )
        # SentencePiece files carry no post-processor: BOS follows tokenizer_config (llama default: on).
        self.add_bos = bool(cfg.get("add_bos_token", self.kind == "sentencepiece"))
        self._continuation_bytes = self._find_continuation_bytes()
        self.bos_id = self._special_id(cfg.get("bos_token"), "bos")
        self.eos_id = self._special_id(cfg.get("eos_token"), "eos")
        self._sp_specials, self._sp_special_re = self._sentencepiece_specials(cfg)

    def _special_id(self, token: object, which: str) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        if self._sp is not None:
            value = self._sp.bos_id() if which == "bos" else self._sp.eos_id()
            if isinstance(token, str) and self._sp.piece_to_id(token) != self._sp.unk_id():
                value = self._sp.piece_to_id(token)
            return value if value >= 0 else None
        if isinstance(token, str):
            return self._hf.token_to_id(token)
        return None

    def _sentencepiece_specials(self, cfg: dict) -> tuple[dict[str, int], re.Pattern | None]:
        """SentencePiece reads ``<s>`` in a text as three characters; transformers' tokenizers (and the
        tokenizer.json path here) read it as the token. The special tokens written in a text (a prompt
        rendered by a chat template carries ``bos_token``) are looked for first, as transformers does."""
        if self._sp is None:
            return {}, None
        specials = {}
        for i in (self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id()):
            if 0 <= i < self._sp.GetPieceSize():
                specials[self._sp.IdToPiece(i)] = i
        for key, token in (cfg.get("added_tokens_decoder") or {}).items():
            if isinstance(token, dict) and token.get("special") and str(key).isdigit():
                if int(key) < self._sp.GetPieceSize() and token.get("content"):
                    specials[token["content"]] = int(key)
        if not specials:
            return {}, None
        pattern = "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))
        return specials, re.compile(f"({pattern})")

    def _sp_encode(self, text: str) -> list[int]:
        if self._sp_special_re is None or not self._sp_special_re.search(text):
            return list(self._sp.EncodeAsIds(text))
        ids: list[int] = []
        for i, part in enumerate(self._sp_special_re.split(text)):
            if i % 2:
                ids.append(self._sp_specials[part])
            elif part:
                ids.extend(self._sp.EncodeAsIds(part))
        return ids

    def _find_continuation_bytes(self) -> frozenset[int]:
        """Ids of byte-fallback tokens <0x80>..<0xBF>: a stream context must not start on one."""
        pattern = re.compile(r"^<0x([89AB][0-9A-F])>$")
        if self._sp is not None:
            pieces = ((i, self._sp.IdToPiece(i)) for i in range(self._sp.GetPieceSize()) if self._sp.IsByte(i))
        else:
            pieces = ((i, piece) for piece, i in self._hf.get_vocab().items() if piece.startswith("<0x"))
        return frozenset(i for i, piece in pieces if pattern.match(piece))

    def is_continuation_byte(self, token_id: int) -> bool:
        return token_id in self._continuation_bytes

    @property
    def vocab_size(self) -> int:
        if self._sp is not None:
            return self._sp.GetPieceSize()
        return self._hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._sp is not None:
            ids = self._sp_encode(text)
            if add_special_tokens and self.add_bos and self.bos_id is not None:
                ids = [self.bos_id, *ids]
            return ids
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int]) -> str:
        """Decodes with special tokens skipped and no clean-up of spaces: streaming relies on
        decode(a + b) starting with decode(a), which clean-up would break."""
        ids = [int(i) for i in ids]
        if self._sp is not None:
            specials = {self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()}
            return self._sp.DecodeIds([i for i in ids if i not in specials and 0 <= i < self.vocab_size])
        return self._hf.decode(ids, skip_special_tokens=True)


def decode_complete(tokenizer: Tokenizer, ids: list[int]) -> str:
    """Decodes ``ids`` less a trailing incomplete UTF-8 character (at most 3 byte tokens).

    The tokens are dropped before decoding rather than the U+FFFD after it, because byte-fallback
    decoders turn a whole run of byte tokens into U+FFFD when its end is incomplete, complete
    characters before it included.
    """
    text = tokenizer.decode(ids)
    for cut in range(1, min(4, len(ids)) + 1):
        if not text.endswith("\ufffd"):
            break
        text = tokenizer.decode(ids[: len(ids) - cut])
    return text


def response_ids(prompt: list[int], generated: list[int], new: list[int], *, stream: bool,
                 exclude_input: bool) -> tuple[list[int], list[int]]:
    """(delta, prefix) of the engine model's response carrying ``new``, the last tokens of ``generated``.

    ``detokenize_delta(tokenizer, prefix, delta, final)`` is then the response's text: a streamed
    response decodes its new tokens after the few before them; the single response of a request that
    does not stream decodes everything generated after the prompt's last tokens (or, with the prompt in
    the output, the whole sequence).
    """
    if stream:  # the last STREAM_CONTEXT_TOKENS of prompt + generated before ``new``, without copying them all
        end = len(generated) - len(new)
        before = generated[max(0, end - STREAM_CONTEXT_TOKENS):end]
        if len(before) < STREAM_CONTEXT_TOKENS and prompt:
            before = prompt[max(0, len(prompt) - (STREAM_CONTEXT_TOKENS - len(before))):] + before
        return list(new), before
    if exclude_input:
        return list(generated), prompt[-STREAM_CONTEXT_TOKENS:]
    return prompt + generated, []


def detokenize_delta(tokenizer: Tokenizer, prefix: list[int], delta: list[int], final: bool) -> str:
    """The text that ``delta`` adds after ``prefix``, computed without state.

    Decoding ``prefix + delta`` and ``prefix`` and keeping the difference keeps the spaces that
    SentencePiece / byte-level BPE attach to a token and the multi-byte characters that span
    tokens; decoding ``delta`` alone loses both. Text is only ever emitted once complete, so the
    pieces of a stream concatenate to the text of the whole sequence. The prefix is cut to start
    on a character boundary so that no orphan byte joins the first decoded run.
    """
    start = 0
    while start < len(prefix) and tokenizer.is_continuation_byte(prefix[start]):
        start += 1
    prefix = prefix[start:]
    before = decode_complete(tokenizer, prefix) if prefix else ""
    full = tokenizer.decode(prefix + delta) if final else decode_complete(tokenizer, prefix + delta)
    if full.startswith(before):
        return full[len(before) :]
    # A decoder that rewrites earlier text: emit what differs from the common part.
    common = 0
    for a, b in zip(before, full):
        if a != b:
            break
        common += 1
    return full[common:]


def token_texts(tokenizer: Tokenizer, before: list[int], ids: list[int], final: bool) -> list[str]:
    """The text each of ``ids`` adds after the tokens ``before`` it (and the ones of ``ids`` before it).

    Each token is decoded after the few tokens that precede it, as streamed text is, so the pieces
    concatenate to the text of the whole; a token that ends inside a multi-byte character adds "" and
    the token that completes it adds the character.
    """
    context = list(before)
    texts = []
    for i, token in enumerate(ids):
        texts.append(detokenize_delta(tokenizer, context[-STREAM_CONTEXT_TOKENS:], [token],
                                      final and i == len(ids) - 1))
        context.append(token)
    return texts
