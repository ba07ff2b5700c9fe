"""Stateless streaming detokenization: streamed pieces concatenate to the whole text."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from tritonize.export.demo_model import mistral_tokenizer_model
from tritonize.runtime.tokenizer import STREAM_CONTEXT_TOKENS, Tokenizer, detokenize_delta

FIXTURE_HF = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "nemo2-llama" / "hf"
TEXTS = [
    "Hello world, this is a test.",
    "Ünïcödé: 日本語のテキスト 🍌🍌 and emoji 👩‍👩‍👧 mixed with   spaces\tand\nnewlines.",
    "  leading spaces and trailing  ",
    "数学 ∑∫√ ≠ ∞ – “quotes” — ok",
    "🍌🍌🍌🍌🍌 a long run of byte tokens 👩‍👩‍👧‍👦👩‍👩‍👧‍👦",
]


@pytest.fixture(scope="module", params=["sentencepiece", "tokenizers"])
def tokenizer(request, tmp_path_factory) -> Tokenizer:
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "sentencepiece":
        shutil.copy(mistral_tokenizer_model(), d / "tokenizer.model")
    else:
        if not (FIXTURE_HF / "tokenizer.json").is_file():
            pytest.skip("the shared NeMo 2 fixture is not beside this checkout")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(FIXTURE_HF / name, d / name)
    tok = Tokenizer(d)
    assert tok.kind == request.param
    return tok


def _stream(tok: Tokenizer, prompt: list[int], generated: list[int], step: int) -> list[str]:
    pieces = []
    done: list[int] = []
    for start in range(0, len(generated), step):
        delta = generated[start : start + step]
        prefix = (prompt + done)[-STREAM_CONTEXT_TOKENS:]
        final = start + step >= len(generated)
        pieces.append(detokenize_delta(tok, prefix, delta, final))
        done += delta
    return pieces


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 2, 3])
def test_stream_concatenates_to_whole_text(tokenizer, text, step):
    prompt = tokenizer.encode("Say:")
    generated = tokenizer.encode(text, add_special_tokens=False)
    whole = detokenize_delta(tokenizer, prompt[-STREAM_CONTEXT_TOKENS:], generated, final=True)
    pieces = _stream(tokenizer, prompt, generated, step)
    assert "".join(pieces) == whole
    # The whole text is what the full decode adds after the prompt: spaces and characters intact.
    full = tokenizer.decode(prompt + generated)
    assert full.endswith(whole)
    assert whole.strip() == text.strip()
    assert all("\ufffd" not in p for p in pieces)


def test_delta_alone_loses_what_the_prefix_keeps():
    """Decoding each token alone (the known tensorrtllm_backend bug) drops spaces; ours does not."""
    d = Path(mistral_tokenizer_model()).parent
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model.v1"))
    ids = sp.encode("the color of a banana")
    naive = "".join(sp.decode([i]) for i in ids)
    assert naive == "thecolorofabanana"


def test_sentencepiece_adds_bos_as_declared(tmp_path):
    shutil.copy(mistral_tokenizer_model(), tmp_path / "tokenizer.model")
    tok = Tokenizer(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert tok.encode("The capital") == [sp.bos_id(), *sp.encode("The capital")]
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": false}')
    assert Tokenizer(tmp_path).encode("The capital") == sp.encode("The capital")


def test_fixture_tokenizer_json_is_served_as_declared():
    """The NeMo 2 fixture's tokenizer.json has no dummy prefix: 'The' is 1014, not 415."""
    if not (FIXTURE_HF / "tokenizer.json").is_file():
        pytest.skip("the shared NeMo 2 fixture is not beside this checkout")
    tok = Tokenizer(FIXTURE_HF)
    assert tok.kind == "tokenizers"
    assert tok.encode("The capital of France is") == [1, 1014, 5565, 302, 4843, 349]
