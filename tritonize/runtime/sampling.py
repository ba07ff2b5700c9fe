"""Next-token selection for a batch in which every row carries its own sampling parameters.

The order of operations follows TensorRT-LLM's C++ decoding layers (``penaltyKernels.cu``,
``banBadWords.cu``, ``samplingTopKKernels.cu``), because the wire interface is the one of
tensorrtllm_backend and clients moving over expect the same numbers:

1. temperature: ``logits / T`` (before the penalties, as TensorRT-LLM does; transformers applies its
   temperature warper after its processors, which only matters for the additive penalties below);
2. repetition penalty, over every token that occurs in prompt + output so far (the rule of
   transformers' ``RepetitionPenaltyLogitsProcessor`` and of TensorRT-LLM): a positive logit is
   divided by the penalty, a negative one multiplied;
3. presence penalty ``-= presence`` and frequency penalty ``-= frequency * count``, over the same
   prompt + output tokens (TensorRT-LLM counts the prompt; OpenAI counts only the output);
4. bans (``-inf``): the last token of every bad sequence whose prefix ends the sequence so far, and,
   while fewer than ``min_tokens`` tokens were generated, the end ids and the last token of every
   stop sequence whose prefix ends the sequence so far; and for a row guided by a grammar
   (structured output, grammar.py), every token its grammar does not allow next (``allowed``: a
   bitmask per guided row, applied on the device; the other rows are not touched);
5. log-probabilities: ``log_softmax`` of these processed logits, gathered at the chosen token. That is
   TensorRT-LLM's default (un-normalized) ``output_log_probs``: the distribution after temperature,
   penalties and bans, but before top-k / top-p truncation (OpenAI's convention). With none of 1-4 in
   play it is the log-softmax of the raw model logits;
6. choice: greedy rows take the arg-max; sampled rows keep the ``top_k`` best tokens, then the
   smallest prefix of those (renormalised) whose probability mass reaches ``top_p``, and draw from
   what is left with the Gumbel-max trick.

The Gumbel noise is counter-based: a hash of (seed, number of tokens generated so far, token id), made
of integer tensor ops that run the same on CPU and GPU. A request's draws therefore depend only on its
own seed and its own logits, never on which other requests share the batch or in which order they came,
and no per-request ``torch.Generator`` (one kernel launch per row) is needed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

_MASK32 = 0xFFFFFFFF


def to_device(values, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A host list on the device without making the host wait for the device: through pinned memory
    (PyTorch's caching host allocator keeps a pinned block until its copy is done)."""
    t = torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


_MASK64 = (1 << 64) - 1


@dataclass
class SamplingParams:
    """How one request picks its tokens, by TensorRT-LLM's rule (its executor's ``SamplingConfig``).

    Sampling is on only when ``top_k`` > 1 or ``top_p`` > 0 is set: ``top_k`` and ``top_p`` default to 0,
    and ``top_k == 0`` with ``top_p == 0`` is greedy, whatever the temperature. ``temperature`` alone
    therefore does not turn sampling on; it shapes the distribution sampling draws from. ``top_k == 1``
    and ``temperature == 0`` are greedy too. ``top_k`` of None or 0 means "no top-k truncation" and
    ``top_p`` of None, 0 or >= 1 "no top-p truncation" once sampling is on.
    """

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0

    @property
    def greedy(self) -> bool:
        if self.temperature == 0 or self.top_k == 1:
            return True
        return not self.top_k and not self.top_p

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self) -> None:
        """Raise ValueError naming the bad field, so a client gets a one-line reason instead of NaNs."""
        if self.temperature is not None and (not math.isfinite(self.temperature) or self.temperature < 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no top-k), got {self.top_k}")
        if self.top_p is not None and (not math.isfinite(self.top_p) or not 0.0 <= self.top_p <= 1.0):
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")


def sequence_seed(seed: int | None, index: int) -> int | None:
    """The seed of sequence ``index`` of a request that asks for several (``num_return_sequences``).

    Sequence 0 keeps the request's seed, so one sequence is the text the request gives alone; the others
    get seeds derived from it (splitmix64 of seed + index), independent draws that the same request
    reproduces. None stays None: the engine draws a fresh seed for each sequence.
    """
    if seed is None or index == 0:
        return seed
    z = (int(seed) + index * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@dataclass
class SamplingRow:
    """What the sampler needs to know about one row of the batch at this step.

    ``history`` is prompt + generated tokens (bad / stop sequences may start inside the prompt, as in
    TensorRT-LLM); ``step`` is the number of tokens generated so far, the counter of the noise.
    """

    params: SamplingParams
    seed: int
    slot: int
    step: int
    history: Sequence[int]
    end_ids: Sequence[int] = ()
    stop_sequences: Sequence[Sequence[int]] = ()
    bad_sequences: Sequence[Sequence[int]] = ()
    want_log_probs: bool = False


@dataclass
class SampleResult:
    """Device tensors: the chosen token of each row, and its log-probability when a row asked for it."""

    tokens: torch.Tensor  # [B] int64
    log_probs: torch.Tensor | None = field(default=None)  # [B] float32


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


_HASH_MUL = 0x45D9F3B  # below 2**27, so no int64 product of a 32-bit value overflows on any device


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """Thomas Mueller's 32-bit integer hash (a bijection with good avalanche) on int64 tensors.

    Few ops on purpose: in eager mode each op costs a kernel launch, and this runs every step.
    """
    x = (((x >> 16) ^ x) * _HASH_MUL) & _MASK32
    x = (((x >> 16) ^ x) * _HASH_MUL) & _MASK32
    return (x >> 16) ^ x


@functools.lru_cache(maxsize=8)
def _token_hashes(vocab_size: int, device: torch.device) -> torch.Tensor:
    """The per-token half of the noise hash, [1, V]: the same every step, so computed once."""
    return _hash32(torch.arange(vocab_size, dtype=torch.int64, device=device) ^ 0x9E3779B9)[None, :]


def counter_uniform(seeds: Sequence[int], steps: Sequence[int], vocab_size: int, device) -> torch.Tensor:
    """Uniform (0, 1) noise of shape [B, V]; row b is a pure function of (seeds[b], steps[b]).

    (seed, step) goes through splitmix64 on the host; its 32-bit key is mixed with each token's hash.
    """
    keys = [_splitmix64((seed & _MASK64) ^ _splitmix64(step)) & _MASK32 for seed, step in zip(seeds, steps, strict=True)]
    k = to_device(keys, torch.int64, device)[:, None]
    return unit_interval(_hash32(_token_hashes(vocab_size, torch.device(device)) ^ k))


def unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """Map 32-bit values to float32 strictly inside (0, 1): the top 23 bits, centred in their bucket.

    23 bits, not 24: 2**24 - 0.5 is not a float32, so the top bucket would round to 1.0 and its Gumbel
    noise to +inf.
    """
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def top_k_top_p_filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf what top-k (per row; 0 = off) and then top-p (per row; 1 = off) drop.

    Top-p is taken over the top-k survivors, renormalised (TensorRT-LLM's top-k kernel and transformers'
    warper chain agree on this); the most likely token always survives.
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)[:, None]
    drop_sorted = ranks >= k
    sorted_logits = sorted_logits.masked_fill(drop_sorted, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted |= (mass_before >= top_p[:, None]) & (ranks > 0) & (top_p[:, None] < 1.0)
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@dataclass
class TokenMask:
    """The tokens guided rows may choose: ``bitmask[i]`` ([rows, ceil(vocab / 32)] int32 on the CPU, bit ``t``
    of word ``t // 32`` set = token ``t`` allowed) is the mask of batch row ``rows[i]``. ``cpu_kernel``: a
    compiled ``kernel(logits, bitmask)`` that masks in place (the grammar library's), used for CPU logits."""

    rows: Sequence[int]
    bitmask: torch.Tensor
    cpu_kernel: Callable[[torch.Tensor, torch.Tensor], None] | None = None


def apply_token_mask(x: torch.Tensor, mask: TokenMask) -> torch.Tensor:
    """-inf, in place, where a guided row's bit is clear; unguided rows are not touched (nor read)."""
    vocab = x.shape[-1]
    rows = len(mask.rows)
    bitmask = mask.bitmask[:rows]
    if x.device.type == "cuda":
        bitmask = bitmask.pin_memory().to(x.device, non_blocking=True)
    index = to_device(list(mask.rows), torch.int64, x.device)
    if mask.cpu_kernel is not None and x.device.type == "cpu":
        rows_x = x.index_select(0, index)
        mask.cpu_kernel(rows_x, bitmask)
        x.index_put_((index,), rows_x)
        return x
    bits = torch.arange(32, dtype=torch.int32, device=x.device)
    allowed = ((bitmask[:, :, None] >> bits) & 1).to(torch.bool).reshape(rows, -1)[:, :vocab]
    x.index_put_((index,), x.index_select(0, index).masked_fill_(~allowed, float("-inf")))
    return x


def _tail_matches(history: Sequence[int], prefix: Sequence[int]) -> bool:
    n = len(prefix)
    if n == 0:
        return True
    if n > len(history):
        return False
    return list(history[len(history) - n :]) == list(prefix)


def banned_tokens(row: SamplingRow) -> set[int]:
    """Tokens row may not produce now: bad-sequence ends, and end / stop ends before min_tokens."""
    banned: set[int] = set()
    for seq in row.bad_sequences:
        if seq and _tail_matches(row.history, seq[:-1]):
            banned.add(int(seq[-1]))
    if row.step < row.params.min_tokens:
        banned.update(int(e) for e in row.end_ids)
        for seq in row.stop_sequences:
            if seq and _tail_matches(row.history, seq[:-1]):
                banned.add(int(seq[-1]))
    return banned


class Sampler:
    """Picks one token per row; keeps per-slot token counts for the penalties.

    The counts live on the model's device, one row per KV-cache slot, and are allocated on the first
    request that asks for a penalty: [slots, vocab] int32, i.e. bounded like the KV cache.
    """

    def __init__(self, vocab_size: int, num_slots: int, device: torch.device | str) -> None:
        self.vocab_size = vocab_size
        self.num_slots = num_slots
        self.device = torch.device(device)
        self._counts: torch.Tensor | None = None

    def start(self, slot: int, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Reset a slot's token counts to the prompt's, for a request just admitted to it."""
        if not params.uses_penalties:
            return
        if self._counts is None:
            self._counts = torch.zeros(self.num_slots, self.vocab_size, dtype=torch.int32, device=self.device)
        self._counts[slot].zero_()
        ids = to_device(list(prompt_ids), torch.int64, self.device)
        self._counts[slot].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))

    def record(self, rows: Sequence[SamplingRow], tokens: torch.Tensor) -> None:
        """Count tokens [B] of penalised rows; ``sample`` does it for the tokens it picks."""
        penalised = [b for b, r in enumerate(rows) if r.params.uses_penalties]
        if not penalised or self._counts is None:
            return
        index = to_device(penalised, torch.int64, tokens.device)
        slots = to_device([rows[b].slot for b in penalised], torch.int64, self.device)
        toks = tokens.index_select(0, index).to(self.device)
        self._counts.index_put_((slots, toks), torch.ones_like(toks, dtype=torch.int32), accumulate=True)

    def process(self, logits: torch.Tensor, rows: Sequence[SamplingRow], allowed: TokenMask | None = None
                ) -> torch.Tensor:
        """Steps 1-4 of the module docstring: the float32 logits the choice and the log-probs use. The rows of
        ``allowed`` (guided rows) are masked in place: on float32 logits, their rows of ``logits`` too."""
        x = logits.to(torch.float32)
        temps = [r.params.temperature if r.params.temperature else 1.0 for r in rows]
        if any(t != 1.0 for t in temps):
            x = x / to_device(temps, torch.float32, x.device)[:, None]
        if any(r.params.uses_penalties for r in rows) and self._counts is not None:
            x = self._apply_penalties(x, rows)
        bans = [(b, tok) for b, r in enumerate(rows) for tok in banned_tokens(r) if 0 <= tok < x.shape[-1]]
        if bans:
            if x.data_ptr() == logits.data_ptr():
                x = x.clone()
            b_idx = to_device([b for b, _ in bans], torch.int64, x.device)
            t_idx = to_device([t for _, t in bans], torch.int64, x.device)
            # The values are made on the device: ``x[b, t] = float("-inf")`` copies a host scalar to a CUDA
            # ``x`` from pageable memory, which waits for everything queued before it (the step's forward),
            # every step a request bans a token (min_tokens bans the end ids): the host could not run ahead.
            minus_inf = torch.full((len(bans),), float("-inf"), dtype=x.dtype, device=x.device)
            x.index_put_((b_idx, t_idx), minus_inf)
        if allowed is not None and len(allowed.rows):  # in place: only the guided rows are written (and read)
            x = apply_token_mask(x, allowed)
        return x

    def _apply_penalties(self, x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        def column(values: list[float]) -> torch.Tensor:
            return to_device(values, torch.float32, x.device)[:, None]

        slots = to_device([r.slot for r in rows], torch.int64, self.device)
        counts = self._counts.index_select(0, slots).to(x.device)
        # Rows without penalties get neutral values, so their (possibly stale) counts do nothing.
        rep = column([r.params.repetition_penalty if r.params.uses_penalties else 1.0 for r in rows])
        pres = column([r.params.presence_penalty if r.params.uses_penalties else 0.0 for r in rows])
        freq = column([r.params.frequency_penalty if r.params.uses_penalties else 0.0 for r in rows])
        seen = counts > 0
        x = torch.where(seen, torch.where(x < 0, x * rep, x / rep), x)
        return x - pres * seen - freq * counts.to(torch.float32)

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow], allowed: TokenMask | None = None
               ) -> SampleResult:
        """Choose one token for each row of ``logits`` [B, V] (B == len(rows)); nothing waits on the device.
        ``allowed``: the token masks of guided rows (structured output)."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [rows, vocab] with {len(rows)} rows, got {tuple(logits.shape)}")
        x = self.process(logits, rows, allowed)
        tokens = torch.argmax(x, dim=-1)
        sampled = [b for b, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            index = to_device(sampled, torch.int64, x.device)
            sub = x.index_select(0, index)
            top_ks = [rows[b].params.top_k or 0 for b in sampled]
            top_ps = [_effective_top_p(rows[b].params.top_p) for b in sampled]
            if any(k > 0 for k in top_ks) or any(p < 1.0 for p in top_ps):
                top_k = to_device(top_ks, torch.int64, x.device)
                top_p = to_device(top_ps, torch.float32, x.device)
                sub = top_k_top_p_filter(sub, top_k, top_p)
            u = counter_uniform([rows[b].seed for b in sampled], [rows[b].step for b in sampled], x.shape[-1], x.device)
            gumbel = -torch.log(-torch.log(u))
            tokens = tokens.index_copy(0, index, torch.argmax(sub + gumbel, dim=-1))
        self.record(rows, tokens)
        log_probs = None
        if any(r.want_log_probs for r in rows):
            log_probs = torch.log_softmax(x, dim=-1).gather(1, tokens[:, None])[:, 0]
        return SampleResult(tokens=tokens, log_probs=log_probs)

    @staticmethod
    def needs_history(row: SamplingRow) -> bool:
        """Whether choosing this row's token needs its previous tokens on the host (multi-token bad
        sequences, or multi-token stop sequences while min_tokens holds their last token back)."""
        if any(len(s) > 1 for s in row.bad_sequences):
            return True
        return row.step < row.params.min_tokens and any(len(s) > 1 for s in row.stop_sequences)


def _effective_top_p(top_p: float | None) -> float:
    if top_p is None or top_p <= 0.0 or top_p >= 1.0:
        return 1.0
    return float(top_p)
