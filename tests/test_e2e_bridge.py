"""End to end: Megatron-Bridge and NeMo 2 (MCoreMetadata) checkpoints -> export -> repository -> tritonserver.

The checkpoints in ``tests/fixtures/bridge/`` were saved by megatron-core (0.15.3 and 0.16.1) from the tiny
Hugging Face models beside them. Each is exported with ``export_checkpoint``, rendered under its own model
name, and all are served by one tritonserver; the served greedy text must equal transformers ``generate`` on
the Hugging Face model, fed the ids the checkpoint's own tokenizer gives.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from tritonize.export import export_checkpoint
from tritonize.repository.build import build_repository
from tritonize.repository.spec import RepoSpec
from tritonize.serving.client import GenerateOptions, grpc_generate

pytestmark = pytest.mark.e2e

FIXTURES = Path(__file__).parent / "fixtures" / "bridge"
MAX_TOKENS = 8
PROMPTS = ["The capital of France is", "def main():\n    return"]

# served name -> (source, Hugging Face reference, export options)
CASES = {
    "bridge_llama": (FIXTURES / "bridge-llama", FIXTURES / "hf-llama", {}),
    "bridge_mixtral": (FIXTURES / "bridge-mixtral", FIXTURES / "hf-mixtral", {"tokenizer": FIXTURES / "hf-mixtral"}),
    "nemo2_mcore015": (FIXTURES / "nemo2-llama-mcore015", FIXTURES / "hf-llama", {}),
}


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("bridge-e2e")
    combined = work / "repo"
    combined.mkdir()
    for name, (source, _hf, options) in CASES.items():
        exported = work / f"{name}-hf"
        export_checkpoint(source, exported, progress=False, **options)
        spec = RepoSpec(name=name, max_batch_size=2, max_input_len=32, max_output_len=16, device="cpu",
                        dtype="float32")
        repo = build_repository(exported, work / f"{name}-repo", spec, force=False, progress=False)
        for folder in repo.iterdir():  # the streaming door only: one server, few Python processes
            if folder.is_dir() and folder.name != f"{name}_sync":
                shutil.move(str(folder), combined / folder.name)
    return combined


@pytest.fixture(scope="module")
def server(triton_server, repository):
    return triton_server(repository, timeout=300)


def _reference(hf: Path, prompt: str) -> tuple[list[int], str]:
    import transformers

    tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ids = tok.encode(prompt).ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    new = out[0, len(ids):].tolist()
    if eos in new:
        new = new[: new.index(eos)]
    whole, head = tok.decode(ids + new, skip_special_tokens=True), tok.decode(ids, skip_special_tokens=True)
    assert whole.startswith(head)
    return new, whole[len(head):]


@pytest.mark.parametrize("name", list(CASES))
def test_served_greedy_text_matches_transformers(name, server):
    _source, hf, _options = CASES[name]
    seen: set[int] = set()
    for prompt in PROMPTS:
        new, text = _reference(hf, prompt)
        seen.update(new)
        got = grpc_generate(server.grpc_endpoint, name, prompt, GenerateOptions(max_tokens=MAX_TOKENS))
        assert (got.num_output_tokens, got.text) == (len(new), text), (name, prompt)
    assert len(seen) > 3, f"{name}: the reference output is too uniform to tell a wrong model apart"
