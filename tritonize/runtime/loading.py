"""Loads a model for serving on one device: the weights (a tensor-parallel rank's shard), the adapters, the
device kernels, and the paged KV pool sized for what is left.

``Engine`` and every tensor-parallel worker (tp_ranks.py) call the same function, so the steps that run
collectives (a GPU's profiling step, agreeing on the pool's size) happen in the same order on every rank.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["CPU_POOL_REQUESTS", "Loaded", "load_for_serving"]

CPU_POOL_REQUESTS = 16  # the default CPU KV pool holds this many requests of max_seq_len
CPU_POOL_MEMORY_SHARE = 0.25  # ... as long as they take at most this share of the memory available


def _available_memory() -> int:
    """Bytes of host memory available now (MemAvailable; the free pages where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 40  # unknown: no cap


@dataclass
class Loaded:
    """A model ready to serve on one device: weights (a tensor-parallel rank's shard), adapters, kernels, KV pool."""

    model: torch.nn.Module
    adapters: Any  # adapters.AdapterSet
    num_blocks: int
    kernels: bool
    graphs: bool
    kv_cache_dtype: str  # "fp8", or the model's dtype
    fp8_linears: int  # FP8 linears running on FP8 tensor cores


def load_for_serving(*, model_dir: str, device: str, dtype: torch.dtype, max_batch_size: int, max_seq_len: int,
                     max_num_tokens: int, cuda_graphs: bool, kernels: bool, adapters_dir: str | None,
                     max_prompt_embedding_table_size: int, kv_cache_tokens: int | None,
                     kv_cache_free_gpu_memory_fraction: float | None, block_size: int, kv_cache_dtype: str = "auto",
                     fp8_matmul: bool | None = None, tp: Any = None) -> Loaded:
    """What ``Engine`` and every tensor-parallel worker (tp.py) load, the same way: the steps that run
    collectives (a GPU's profiling step, the pool's size) happen in the same order on every rank. ``tp`` is
    this rank's ``tp_ranks.Leader`` or worker (None: one device). ``kv_cache_dtype`` "fp8" stores keys and
    values in FP8, "auto" does when the checkpoint declares an FP8 KV cache; ``fp8_matmul`` None runs FP8
    linears on FP8 tensor cores where the GPU has them (quantize.py)."""
    from .adapters import load_adapters
    from .quantize import FP8, fp8_matmul_supported, use_fp8_matmul
    from .weights import load_model

    device_ = torch.device(device)
    shard = tp.shard(model_dir) if tp is not None else None
    weights = WeightsProgress(device_)
    model = load_model(model_dir, device=device_, dtype=dtype, shard=shard, progress=weights)
    weights.done()
    scheme = model.quant_scheme
    fp8_kv = kv_cache_dtype == "fp8" or (kv_cache_dtype == "auto" and scheme is not None and scheme.kv_cache)
    if fp8_kv and device_.type == "cuda" and not fp8_matmul_supported(device_):
        raise ValueError("an FP8 KV cache needs a GPU with FP8 support (compute capability 8.9 or later) here; "
                         "serve with --use-fp8-kv-cache false")
    model.kv_cache_dtype = FP8 if fp8_kv else None
    fp8_linears = 0
    if fp8_matmul_supported(device_) if fp8_matmul is None else fp8_matmul:
        fp8_linears = use_fp8_matmul(model)
    with torch.no_grad():
        adapters = load_adapters(adapters_dir, model.args)
        adapters.install(model, max_batch_size, max_num_tokens,
                         max_prompt_embedding_table_size=max_prompt_embedding_table_size, shard=shard)
        if shard is not None:
            from .tp import parallelize

            parallelize(model, shard, tp.group)
        use_kernels = kernels
        if use_kernels:
            from .kernels import use_triton_kernels

            use_kernels = use_triton_kernels(model)
        if use_kernels:
            log.info("kernels: Triton kernels, compiled at the profiling step and the graph captures "
                     "(cache: %s)", os.environ.get("TRITON_CACHE_DIR") or "~/.triton/cache")
        else:
            log.info("kernels: PyTorch's own on %s, nothing to compile", device_)
        use_graphs = cuda_graphs
        if use_graphs and not use_kernels:
            log.warning("no Triton kernels here: CUDA graphs need them for attention; running eagerly")
            use_graphs = False
        pool = _PoolSizer(model, device_, block_size, max_batch_size, max_seq_len, max_num_tokens)
        num_blocks = pool.blocks(kv_cache_tokens, kv_cache_free_gpu_memory_fraction)
        if tp is not None and device_.type == "cuda":  # every rank's pool holds the same blocks: the smallest
            num_blocks = tp.group.min_int(num_blocks)
        model.setup_caches(num_blocks=num_blocks, block_size=block_size, max_seq_len=max_seq_len)
    kv_name = "fp8" if fp8_kv else str(dtype).removeprefix("torch.")
    return Loaded(model, adapters, num_blocks, use_kernels, use_graphs, kv_name, fp8_linears)


class WeightsProgress:
    """Logs how far the weights are: when loading starts, every ``interval_s``, and when it is done."""

    interval_s = 2.0

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = time.monotonic()
        self.last = self.start
        self.loaded = self.total = 0

    def __call__(self, loaded: int, total: int) -> None:
        if self.total == 0:
            log.info("weights: loading %.2f GB onto %s", total / 1e9, self.device)
        self.loaded, self.total = loaded, total
        now = time.monotonic()
        if now - self.last >= self.interval_s and loaded < total:
            self.last = now
            log.info("weights: %.2f / %.2f GB (%d%%)", loaded / 1e9, total / 1e9, 100 * loaded // max(total, 1))

    def done(self) -> None:
        took = time.monotonic() - self.start
        log.info("weights: loaded %.2f / %.2f GB in %.1f s", self.loaded / 1e9, self.total / 1e9, took)


@dataclass
class _PoolSizer:
    model: torch.nn.Module
    device: torch.device
    block_size: int
    max_batch_size: int
    max_seq_len: int
    max_num_tokens: int

    def blocks(self, tokens: int | None, fraction: float | None) -> int:
        """Blocks of the KV pool (plus block 0, which padding rows point at).

        ``tokens`` sets the size directly. Otherwise on CUDA the pool takes ``fraction`` (default 0.9, as
        TensorRT-LLM's free_gpu_memory_fraction) of the memory that is free once the weights are loaded
        and the largest step's activations are set aside; on CPU it holds ``max_batch_size`` requests of
        ``max_seq_len`` tokens, at most 16 of them (more requests share it: the pool is paged), and at most
        a quarter of the memory available (but one request of ``max_seq_len`` in any case).
        """
        bs = self.block_size
        if tokens:
            return -(-tokens // bs) + 1
        per_request = -(-self.max_seq_len // bs)
        if self.device.type != "cuda":
            blocks = min(self.max_batch_size, CPU_POOL_REQUESTS) * per_request
            budget = int(CPU_POOL_MEMORY_SHARE * _available_memory()) // (self._bytes_per_token() * bs)
            if budget < blocks:  # a long context (e.g. taken from the checkpoint) must not exhaust the host
                capped = max(per_request, budget)
                log.info("KV cache on the CPU: %d blocks instead of %d, a quarter of the available memory "
                         "(--kv-cache-tokens sets it)", capped, blocks)
                blocks = capped
            return blocks + 1
        fraction = 0.9 if fraction is None else fraction
        if not 0 < fraction <= 1:
            raise ValueError(f"kv_cache_free_gpu_memory_fraction must be in (0, 1], got {fraction}")
        per_token = self._bytes_per_token()
        log.info("profiling the largest step (%d tokens)%s", self.max_num_tokens,
                 ": compiling kernels" if getattr(self.model, "device_attention", False) else "")
        started = time.monotonic()
        activations = self._profile_activations()
        log.info("profiled in %.1f s: %.2f GB set aside for a step's activations", time.monotonic() - started,
                 activations / 1e9)
        free, _total = torch.cuda.mem_get_info(self.device)
        usable = max(0, free - activations)
        blocks = int(fraction * usable) // (per_token * bs)
        need = per_request + 1
        if blocks < need:
            raise ValueError(
                f"the GPU has room for {blocks * bs} KV tokens after the weights, less than one request of "
                f"max_seq_len {self.max_seq_len}: lower max_seq_len or use a larger GPU"
            )
        return blocks + 1

    def _bytes_per_token(self) -> int:
        args = self.model.args
        attn = self.model.layers[0].attention  # this rank's key/value heads
        return 2 * args.n_layers * attn.n_kv_heads * attn.head_dim * self._kv_element_size()

    def _kv_element_size(self) -> int:
        """Bytes per cached key or value element: 1 for an FP8 cache (twice the tokens of bfloat16 per byte)."""
        dtype = self.model.kv_cache_dtype or self.model.tok_embeddings.weight.dtype
        return torch.empty((), dtype=dtype).element_size()

    def _profile_activations(self) -> int:
        """Peak memory of the largest step (max_num_tokens tokens, max_batch_size rows of logits)."""
        bs = self.block_size
        n = self.max_num_tokens
        blocks = -(-n // bs) + 1
        self.model.setup_caches(num_blocks=blocks, block_size=bs, max_seq_len=self.max_seq_len)
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        from .attention import AttentionMetadata

        width = min(n, self.max_seq_len)
        seqs = -(-n // width)
        lens = [min(width, n - s * width) for s in range(seqs)]
        dev = self.device
        starts = [0]
        for length in lens:
            starts.append(starts[-1] + length)
        table = torch.zeros(seqs, -(-width // bs), dtype=torch.int64, device=dev)
        rows = min(self.max_batch_size, n)
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(n, dtype=torch.int64, device=dev), block_tables=table,
            seq_lens=torch.tensor(lens, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int64, device=dev),
            logits_indices=torch.arange(rows, device=dev), max_query_len=max(lens),
            seq_lens_host=lens, query_start_host=starts,
        )
        pos = torch.cat([torch.arange(length, device=dev) for length in lens])
        logits = self.model(torch.zeros(n, dtype=torch.int64, device=dev), pos, meta)
        torch.log_softmax(logits, dim=-1)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del logits
        for layer in self.model.layers:
            layer.attention.paged = None
        torch.cuda.empty_cache()
        return int(peak * 1.1) + (256 << 20)  # and room for the CUDA graphs' own pool
