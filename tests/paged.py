"""Drives model.py's Transformer through the paged KV cache the way the engine does, for model tests.

Blocks are handed out in a shuffled order (so a sequence's blocks are never contiguous), freed blocks
are reused dirty, and the chunks of several sequences are packed into one forward.
"""

from __future__ import annotations

import random

import torch

from tritonize.runtime.attention import AttentionMetadata


class PagedRun:
    def __init__(self, model, num_blocks: int = 96, block_size: int = 4, max_seq_len: int = 64, seed: int = 0):
        self.model = model
        self.block_size = block_size
        self.width = -(-max_seq_len // block_size)
        model.setup_caches(num_blocks=num_blocks, block_size=block_size, max_seq_len=max_seq_len)
        self.free_blocks = list(range(1, num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.tables: dict[object, list[int]] = {}
        self.device = model.tok_embeddings.weight.device

    def free(self, seq) -> None:
        self.free_blocks += self.tables.pop(seq)

    def __call__(self, chunks, every_token: bool = False) -> torch.Tensor:
        """``chunks``: (sequence key, token ids, start position) each; returns float32 logits of every token
        (``every_token``) or of each chunk's last token, in chunk order."""
        bs = self.block_size
        ids, pos, slots, lens, starts, last = [], [], [], [], [0], []
        table = torch.zeros(len(chunks), self.width, dtype=torch.int64)
        for s, (key, tokens, start) in enumerate(chunks):
            blocks = self.tables.setdefault(key, [])
            end = start + len(tokens)
            while len(blocks) * bs < end:
                blocks.append(self.free_blocks.pop())
            for p in range(start, end):
                slots.append(blocks[p // bs] * bs + p % bs)
            ids += list(tokens)
            pos += list(range(start, end))
            table[s, : len(blocks)] = torch.tensor(blocks)
            lens.append(end)
            starts.append(starts[-1] + len(tokens))
            last.append(starts[-1] - 1)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=dev), block_tables=table.to(dev),
            seq_lens=torch.tensor(lens, device=dev), query_start_loc=torch.tensor(starts, device=dev),
            logits_indices=torch.arange(len(ids), device=dev) if every_token else torch.tensor(last, device=dev),
            max_query_len=max(len(c[1]) for c in chunks), seq_lens_host=lens, query_start_host=starts,
        )
        with torch.no_grad():
            return self.model(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), meta)

    def greedy(self, key, prompt: list[int], n: int) -> list[int]:
        out = [int(self([(key, prompt, 0)])[0].argmax())]
        for i in range(n - 1):
            out.append(int(self([(key, [out[-1]], len(prompt) + i)])[0].argmax()))
        return out
