"""A tiny NeMo 2 Llama checkpoint and its transformers reference, shared by the deploy and API tests.

Weights are drawn large (std 0.3) so greedy decoding does not just repeat the prompt's last token;
the reference is transformers ``generate`` on the same model with the source tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from fixtures import gpt2_bpe_tokenizer_dir, randomized, tiny_model, write_nemo2

VOCAB = 300
MAX_TOKENS = 8
PROMPTS = ["The capital of France is", "def main():\n    return"]
LIMITS = {"max_input_len": 32, "max_output_len": 16, "max_batch_size": 2}


@dataclass
class Source:
    path: Path
    model: torch.nn.Module
    tokenizer_dir: Path

    def greedy_text(self, prompt: str, max_new: int = MAX_TOKENS) -> str:
        """transformers' greedy continuation of ``prompt``, decoded with the source tokenizer."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(self.tokenizer_dir / "tokenizer.json"))
        eos = tok.token_to_id("<|endoftext|>")
        ids = tok.encode(prompt).ids
        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        new = out[0, len(ids):].tolist()
        if eos in new:
            new = new[: new.index(eos)]
        whole, head = tok.decode(ids + new, skip_special_tokens=True), tok.decode(ids, skip_special_tokens=True)
        assert whole.startswith(head)
        return whole[len(head):]


def nemo2_llama(work: Path) -> Source:
    tok_dir = gpt2_bpe_tokenizer_dir(work / "tokenizer", vocab_size=VOCAB)
    model = tiny_model("llama", vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, seed=3)
    randomized(model, 3)
    return Source(write_nemo2(model, tok_dir, work / "llama-nemo2"), model, tok_dir)
