"""End to end, every model family: NeMo checkpoint -> export -> repository -> one tritonserver -> text.

Each family starts as a tiny random transformers model, is written in a NeMo layout (NeMo 2 where the
family has a NeMo 2 model class, NeMo 1 ``.nemo`` for GPT, Nemotron's older releases and Falcon),
exported with ``export_checkpoint`` and rendered with ``build_repository`` under its own model name.
All repositories are merged into one directory so that a single server (started once) serves every
family side by side. The served greedy text must equal transformers ``generate`` on the original
model, fed the ids the source tokenizer gives (SentencePiece or byte-level BPE, not tritonize's own
tokenizer code), and decoded the same way.

Each engine runs with a KV pool of three 16-token blocks and a 4-token step budget: prompts are prefilled
in chunks, concurrent requests outgrow the pool and are preempted and computed again, and repeated
prompts take their prefix blocks from the cache. None of it may change a single token.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fixtures import gpt2_bpe_tokenizer_dir, sentencepiece_tokenizer_dir, tiny_model, write_nemo1, write_nemo2

from tritonize.export import export_checkpoint
from tritonize.repository.build import build_repository
from tritonize.repository.spec import RepoSpec
from tritonize.serving.client import GenerateOptions, grpc_generate

pytestmark = pytest.mark.e2e

BPE_VOCAB = 300
MAX_TOKENS = 8
WEIGHT_STD = 0.3
PROMPTS = ["The capital of France is", "def main():\n    return"]
# a pool of 3 blocks of 16 tokens and 4 tokens a step: chunked prefill, preemption and prefix reuse at once
ENGINE_LIMITS = dict(max_batch_size=4, max_num_tokens=4, kv_cache_tokens=48)


@dataclass(frozen=True)
class Case:
    """How one family is built: fixture family, NeMo layout, tokenizer and config overrides."""

    family: str
    layout: str  # "nemo1" | "nemo2"
    tokenizer: str = "bpe"  # "bpe" | "sentencepiece"
    overrides: tuple[tuple[str, object], ...] = ()


# Served model name -> how it is made. Names are distinct so every family sits in one repository.
CASES: dict[str, Case] = {
    "llama": Case("llama", "nemo2"),
    "mistral": Case("mistral", "nemo2", tokenizer="sentencepiece"),
    "mixtral": Case("mixtral", "nemo2"),
    "gemma": Case("gemma", "nemo2"),
    "gpt2": Case("gpt", "nemo1"),
    "starcoder": Case("starcoder", "nemo2"),
    "starcoder2": Case("starcoder2", "nemo2"),
    "falcon": Case("falcon", "nemo1", overrides=(("new_decoder_architecture", True), ("num_kv_heads", 2))),
    "nemotron": Case("gptnext", "nemo1"),
}


@dataclass
class Reference:
    """The original transformers model and the source tokenizer it was written with."""

    model: torch.nn.Module
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    eos_id: int

    def generate(self, prompt: str, max_new: int) -> tuple[list[int], list[int]]:
        ids = self.encode(prompt)
        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=max_new, do_sample=False, eos_token_id=self.eos_id,
                                      pad_token_id=self.eos_id)
        new = out[0, len(ids):].tolist()
        if self.eos_id in new:
            new = new[: new.index(self.eos_id)]
        return ids, new

    def text(self, ids: list[int], new: list[int]) -> str:
        whole, head = self.decode(ids + new), self.decode(ids)
        assert whole.startswith(head)
        return whole[len(head):]


def _sentencepiece_reference(model: torch.nn.Module, tok_dir: Path) -> Reference:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    return Reference(model, lambda text: [sp.bos_id(), *sp.encode(text)], sp.decode, sp.eos_id())


def _bpe_reference(model: torch.nn.Module, tok_dir: Path) -> Reference:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    return Reference(model, lambda text: tok.encode(text).ids,
                     lambda ids: tok.decode(ids, skip_special_tokens=True), eos)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Large random weights, and norm weights / biases moved off their 1 / 0 initial values.

    At the default init (std 0.02, tied embeddings) most families just repeat the last prompt token,
    whatever their attention does: such a reference could not catch a wrong layer.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * WEIGHT_STD)
            else:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    return model


def _build_case(name: str, case: Case, seed: int, tok_dirs: dict[str, Path], work: Path) -> tuple[Path, Reference]:
    """Writes ``case`` in its NeMo layout, exports it and renders a repository named ``name``."""
    tok_dir = tok_dirs[case.tokenizer]
    if case.tokenizer == "bpe":
        model = _randomize(tiny_model(case.family, vocab_size=BPE_VOCAB, bos_token_id=0, eos_token_id=0,
                                      **dict(case.overrides)), seed=seed)
        reference = _bpe_reference(model, tok_dir)
    else:
        model = _randomize(tiny_model(case.family, **dict(case.overrides)), seed=seed)
        reference = _sentencepiece_reference(model, tok_dir)
    if case.layout == "nemo1":
        source = write_nemo1(model, tok_dir, work / f"{name}.nemo")
    else:
        source = write_nemo2(model, tok_dir, work / f"{name}-nemo2",
                             tokenizer="sentencepiece" if case.tokenizer == "sentencepiece" else None)
    exported = work / f"{name}-hf"
    export_checkpoint(source, exported, progress=False)
    spec = RepoSpec(name=name, max_input_len=32, max_output_len=16, device="cpu", dtype="float32", **ENGINE_LIMITS)
    repo = build_repository(exported, work / f"{name}-repo", spec, force=False, progress=False)
    return repo, reference


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> tuple[Path, dict[str, Reference]]:
    """One repository holding every family's models, and each family's reference."""
    work = tmp_path_factory.mktemp("families")
    tok_dirs = {
        "bpe": gpt2_bpe_tokenizer_dir(work / "bpe-tokenizer", vocab_size=BPE_VOCAB),
        "sentencepiece": sentencepiece_tokenizer_dir(work / "sp-tokenizer"),
    }
    combined = work / "repo"
    combined.mkdir()
    references = {}
    for seed, (name, case) in enumerate(CASES.items()):
        repo, references[name] = _build_case(name, case, seed, tok_dirs, work)
        # Only what a gRPC-streaming client reaches: the ensemble and its three steps. The per-repository
        # tritonize.json and the non-streaming `_sync` door (covered by test_e2e_llama.py) stay behind,
        # which spares the server nine Python model processes at startup.
        for folder in repo.iterdir():
            if folder.is_dir() and folder.name != f"{name}_sync":
                shutil.move(str(folder), combined / folder.name)
    return combined, references


@pytest.fixture(scope="module")
def server(triton_server, families):
    repo, _ = families
    return triton_server(repo, timeout=300)


@pytest.mark.parametrize("name", list(CASES))
def test_family_greedy_text_matches_transformers(name, server, families):
    _, references = families
    reference = references[name]
    seen: set[int] = set()
    expected = {}
    for prompt in PROMPTS:
        ids, new = reference.generate(prompt, MAX_TOKENS)
        seen.update(new)
        expected[prompt] = (len(ids), len(new), reference.text(ids, new))
    # alone first, then all at once twice over (the pool holds fewer than four requests' tokens)
    asks = PROMPTS + PROMPTS * 4
    alone = [grpc_generate(server.grpc_endpoint, name, p, GenerateOptions(max_tokens=MAX_TOKENS)) for p in PROMPTS]
    with ThreadPoolExecutor(len(asks) - len(PROMPTS)) as pool:
        crowded = list(pool.map(lambda p: grpc_generate(server.grpc_endpoint, name, p,
                                                         GenerateOptions(max_tokens=MAX_TOKENS)), asks[len(PROMPTS):]))
    for prompt, got in zip(asks, alone + crowded, strict=True):
        assert (got.num_input_tokens, got.num_output_tokens, got.text) == expected[prompt], (name, prompt)
    assert len(seen) > 3, f"{name}: the reference output is too uniform to tell a wrong model apart"
