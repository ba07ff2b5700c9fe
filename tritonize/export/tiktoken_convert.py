"""NeMo's tiktoken vocabulary as a Hugging Face ``tokenizer.json``.

NeMo stores a tiktoken tokenizer as a JSON list of ``{"rank", "token_bytes" (base64), "token_str"}``
and numbers ids as ``rank + num_special_tokens`` after ``<unk>``, ``<s>``, ``</s>`` and
``<SPECIAL_i>`` fillers. Serving needs only the ``tokenizers`` library, which has no tiktoken
model but has byte-level BPE: tiktoken's ranks are BPE merges in rank order, so each multi-byte
token's merge is recovered by running BPE on its bytes with the lower ranks (when that ends in two
parts), and ``ignore_merges`` reproduces tiktoken's lookup of a whole pre-tokenized piece.
"""

from __future__ import annotations

import base64
import json

from ..errors import ExportError

PATTERN_TIKTOKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
DEFAULT_VOCAB_SIZE = 2**17
DEFAULT_NUM_SPECIAL = 1000
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (byte-level BPE vocab spelling)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, (chr(c) for c in chars), strict=False))


def load_ranks(data: bytes, limit: int | None = None) -> dict[bytes, int]:
    try:
        entries = json.loads(data)
    except ValueError as e:
        raise ExportError(f"tiktoken vocabulary is not valid JSON ({e})") from None
    if not isinstance(entries, list):
        raise ExportError("tiktoken vocabulary must be a JSON list of {rank, token_bytes, token_str}")
    if limit is not None:
        entries = entries[:limit]
    ranks: dict[bytes, int] = {}
    for i, e in enumerate(entries):
        try:
            token = base64.b64decode(e["token_bytes"])
            rank = int(e["rank"])
        except (KeyError, TypeError, ValueError):
            raise ExportError(f"tiktoken vocabulary entry {i} is malformed") from None
        if rank != i or (i < 256 and token != bytes([i])):
            raise ExportError(f"tiktoken vocabulary entry {i} is out of order (rank {rank})")
        ranks[token] = rank
    if len(ranks) != len(entries):
        raise ExportError("tiktoken vocabulary has duplicate tokens")
    return ranks


def _split_once(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    parts = [bytes([b]) for b in token]
    while True:
        best, best_i = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best):
                best, best_i = r, i
        if best is None:
            return parts
        parts[best_i: best_i + 2] = [parts[best_i] + parts[best_i + 1]]


def tokenizer_json(ranks: dict[bytes, int], *, num_special: int = DEFAULT_NUM_SPECIAL,
                   special_tokens: list[str] | None = None, pattern: str = PATTERN_TIKTOKEN) -> str:
    """A ``tokenizer.json`` whose ids equal NeMo's TiktokenTokenizer ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = list(special_tokens or SPECIAL_TOKENS)
    specials += [f"<SPECIAL_{i}>" for i in range(len(specials), num_special)]
    if len(specials) != num_special:
        raise ExportError(f"tiktoken tokenizer declares more special tokens than num_special_tokens={num_special}")
    b2u = _bytes_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {tok: i for i, tok in enumerate(specials)}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[spell(token)] = rank + num_special
        if len(token) > 1:
            parts = _split_once(ranks, token, rank)
            if len(parts) == 2:  # a token no merge reaches is still found whole, as tiktoken does
                merges.append((spell(parts[0]), spell(parts[1])))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok.to_str()
