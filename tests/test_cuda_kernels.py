"""The Triton kernels against the plain PyTorch modules they replace (attention.py, model.py).

They run on a CUDA device; without one, ``TRITON_INTERPRET=1`` runs them on the CPU through Triton's
interpreter (slow but exact in float32). Skipped where neither is possible (triton not installed).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from tritonize.runtime.attention import AttentionMetadata, PagedAttention
from tritonize.runtime.model import Norm

pytest.importorskip("triton")
if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    pytest.skip("the Triton kernels need a CUDA device (or TRITON_INTERPRET=1)", allow_module_level=True)

from tritonize.runtime.cuda_kernels import paged_attention, rms_norm, silu_mul  # noqa: E402

CASES = [  # heads, kv heads, head dim, block size, query lengths, cached context lengths, window
    (4, 2, 16, 4, [1, 1, 1], [5, 12, 0], 0),  # decode rows
    (4, 2, 16, 4, [7, 1, 13], [0, 9, 3], 0),  # prompt chunks beside decodes, continuing cached prefixes
    (8, 1, 32, 16, [20, 1], [40, 70], 0),  # multi-query
    (4, 4, 24, 4, [5, 3], [2, 0], 0),  # multi-head, head size not a power of two
    (4, 2, 16, 4, [9, 1], [10, 30], 8),  # sliding window
    (6, 2, 16, 8, [33, 1, 1, 2], [0, 5, 60, 7], 0),  # a group of 3 query heads per kv head
    (32, 8, 128, 16, [1] * 5 + [40], [100, 3, 250, 17, 64, 90], 0),  # Llama-3-8B's heads
]


def _step(q_lens, contexts, bs, heads, n_kv, dim, dtype):
    """A step of sequences with ``q_lens`` new tokens after ``contexts`` cached ones, in shuffled blocks of 64:
    its queries, keys and values, and its metadata."""
    free = list(range(1, 64))
    random.Random(1).shuffle(free)
    table = torch.zeros(len(q_lens), 20, dtype=torch.int64)
    lens, starts, slots = [], [0], []
    for s, (q, c) in enumerate(zip(q_lens, contexts, strict=True)):
        blocks = [free.pop() for _ in range(-(-(q + c) // bs))]
        table[s, : len(blocks)] = torch.tensor(blocks)
        slots += [blocks[p // bs] * bs + p % bs for p in range(c, c + q)]
        lens.append(q + c)
        starts.append(starts[-1] + q)
    n = starts[-1]
    q, k, v = (torch.randn(n, h, dim, dtype=dtype, device=DEVICE) for h in (heads, n_kv, n_kv))
    dev = {"device": DEVICE}
    meta = AttentionMetadata(torch.tensor(slots, **dev), table.to(DEVICE), torch.tensor(lens, **dev),
                             torch.tensor(starts, **dev), torch.arange(n, **dev), max(q_lens), lens, starts)
    return q, k, v, meta


@pytest.mark.parametrize("splits", [1, 16, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_paged_attention_matches_the_reference(case, dtype, splits):
    """Whole, and with each query tile's keys shared among 16 programs (flash-decoding; some shares get no keys),
    or as many as the step's shape asks for (None; the FP8 test below shares among 4)."""
    if splits is None and DEVICE == "cpu":
        pytest.skip("the interpreter never shares by shape (programs run one after another): splits 1 above")
    if dtype is torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("the interpreter checks float32")
    heads, n_kv, dim, bs, q_lens, contexts, window = case
    torch.manual_seed(0)
    ref = PagedAttention(64, bs, n_kv, dim, dim**-0.5, window, dtype, DEVICE)
    ref.k_cache.normal_()
    ref.v_cache.normal_()
    q, k, v, meta = _step(q_lens, contexts, bs, heads, n_kv, dim, dtype)
    want = ref(q, k, v, meta)
    got = paged_attention(q, ref.k_cache, ref.v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                          meta.max_query_len, dim**-0.5, window, num_splits=splits)
    tol = 2e-5 if dtype is torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_silu_mul_match_the_modules(dtype):
    if dtype is torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("the interpreter checks float32")
    torch.manual_seed(0)
    x, w, r = (torch.randn(*shape, device=DEVICE, dtype=dtype) for shape in ((5, 64), (64,), (5, 64)))
    tol = 1e-5 if dtype is torch.float32 else 1e-2
    for offset in (0.0, 1.0):
        norm = Norm(64, "rms", 1e-5, offset).to(DEVICE, dtype)
        norm.weight.data = w
        torch.testing.assert_close(rms_norm(x, w, 1e-5, offset), norm(x), atol=tol, rtol=tol)
        out, res = rms_norm(x, w, 1e-5, offset, residual=r)
        torch.testing.assert_close(res, x + r)
        torch.testing.assert_close(out, norm(x + r), atol=tol, rtol=tol)
    h = torch.randn(3, 200, device=DEVICE, dtype=dtype)
    gate, up = h.chunk(2, -1)
    torch.testing.assert_close(silu_mul(h), torch.nn.functional.silu(gate) * up, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, n_kv, dim, rot", [(4, 2, 16, 16), (4, 1, 24, 8), (6, 6, 32, 0)])
def test_rotary_and_cache_match_the_model(heads, n_kv, dim, rot, dtype):
    """The fused kernel against model.apply_rotary + PagedAttention.write on the same tokens."""
    if dtype is torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("the interpreter checks float32")
    from tritonize.runtime.cuda_kernels import rotary_and_cache
    from tritonize.runtime.model import apply_rotary

    torch.manual_seed(0)
    n = 7
    qkv = torch.randn(n, (heads + 2 * n_kv) * dim, device=DEVICE, dtype=dtype)
    slots = torch.tensor([9, 3, 14, 0, 5, 11, 2], device=DEVICE)
    k_cache = torch.zeros(4, 4, n_kv, dim, device=DEVICE, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    q, k, v = qkv.split([heads * dim, n_kv * dim, n_kv * dim], dim=-1)
    q, k, v = q.view(n, heads, dim), k.view(n, n_kv, dim), v.view(n, n_kv, dim)
    rope = None
    if rot:
        angles = torch.randn(n, rot // 2, device=DEVICE)
        cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None].to(dtype)
        sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None].to(dtype)
        rope = (cos, sin)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    got_q = rotary_and_cache(qkv, *(rope or (None, None)), slots, k_cache, v_cache, heads, n_kv, dim)
    tol = 1e-5 if dtype is torch.float32 else 2e-2
    torch.testing.assert_close(got_q, q, atol=tol, rtol=tol)
    torch.testing.assert_close(k_cache.view(-1, n_kv, dim)[slots], k, atol=tol, rtol=tol)
    torch.testing.assert_close(v_cache.view(-1, n_kv, dim)[slots], v)


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma", "gpt2", "falcon_new", "nemotron", "mixtral"])
def test_every_family_with_the_kernels_swapped_in_equals_transformers(name, tmp_path):
    from tests.paged import PagedRun
    from tests.test_model_families import FAMILIES, build_hf, hf_logits, random_ids
    from tritonize.runtime.kernels import use_triton_kernels
    from tritonize.runtime.weights import load_model

    hf = build_hf(FAMILIES[name](), tmp_path)
    model = load_model(tmp_path, device=DEVICE)
    assert use_triton_kernels(model)
    run = PagedRun(model, block_size=4)
    prompt, more = random_ids(13, seed=1), random_ids(4, seed=2)
    ref = hf_logits(hf, prompt + more).to(DEVICE)
    got = run([("a", prompt[:9], 0)], every_token=True)
    got = torch.cat([got, run([("a", prompt[9:], 9), ("b", prompt, 0)], every_token=True)[:4]])
    for i, token in enumerate(more):  # decode rows
        got = torch.cat([got, run([("a", [token], 13 + i)])])
    torch.testing.assert_close(got[:13], ref[:13], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(got[13:], ref[13:], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("max_batch", [4, 32])
def test_padded_steps_give_the_exact_steps_tokens(tmp_path, world, max_batch):
    """The layouts the CUDA graphs replay (steps padded to a token bucket, padding tokens and sequences that
    belong to no request), run eagerly with the kernels: the same greedy text as transformers. Split over two
    ranks, the kernels run on each rank's heads and the workers follow rank 0's padded layouts. With a max
    batch above the smallest token bucket, a prompt step's layout holds as many sequences as its tokens."""
    if DEVICE == "cuda" and torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    from transformers import LlamaConfig, LlamaForCausalLM

    from tritonize.runtime.engine import Engine
    from tritonize.runtime.runner import batch_buckets, token_buckets

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.1)
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    prompts = [[1, 17, 42, 99, 7], [1, 250, 3], [1] + list(range(60, 90)), [1, 5, 5, 5, 8, 200, 31, 64, 2, 9, 11]]
    budget = max(24, max_batch)  # 16 / 24 tokens, or 16 / 32 with a batch of 32
    with Engine(tmp_path, device=DEVICE, dtype="float32", max_batch_size=max_batch, max_seq_len=64,
                max_num_tokens=budget, block_size=4, kernels=True, cuda_graphs=False, tensor_parallel_size=world) as eng:
        assert eng.kernels
        eng.runner.buckets, eng.runner.token_buckets = batch_buckets(max_batch), token_buckets(budget)
        assert {s.seqs for s in eng.runner.shapes() if s.prompt} == {min(t, max_batch) for t in token_buckets(budget)}
        got = eng.generate(prompts, 6, end_ids=[], timeout=120)
    for prompt, out in zip(prompts, got, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
        assert out == ref


# ---------------------------------------------------------------------------------------------- FP8
FP8_CASES = [CASES[1], CASES[2], CASES[4], CASES[6]]  # mixed chunks, multi-query, sliding window, Llama-3-8B's heads


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.03, 0.2)])
@pytest.mark.parametrize("case", FP8_CASES)
def test_paged_attention_over_an_fp8_cache_matches_the_reference(case, scales, splits):
    """An FP8 cache holding k / k_scale and v / v_scale: the kernel reads it as attention.PagedAttention does,
    with the keys of a query tile whole or shared among 4 programs (v_scale applied once, after they are added)."""
    heads, n_kv, dim, bs, q_lens, contexts, window = case
    k_scale, v_scale = scales
    torch.manual_seed(0)
    ref = PagedAttention(64, bs, n_kv, dim, dim**-0.5, window, torch.float32, DEVICE, torch.float8_e4m3fn,
                         k_scale=k_scale, v_scale=v_scale)
    ref.k_cache.copy_((torch.randn(ref.k_cache.shape, device=DEVICE) / k_scale).clamp(-448, 448).to(torch.float8_e4m3fn))
    ref.v_cache.copy_((torch.randn(ref.v_cache.shape, device=DEVICE) / v_scale).clamp(-448, 448).to(torch.float8_e4m3fn))
    q, k, v, meta = _step(q_lens, contexts, bs, heads, n_kv, dim, torch.float32)
    want = ref(q, k, v, meta)  # writes this step's keys and values into the FP8 cache, then attends
    got = paged_attention(q, ref.k_cache, ref.v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                          meta.max_query_len, dim**-0.5, window, k_scale=k_scale, v_scale=v_scale, num_splits=splits)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("heads, n_kv, dim, rot", [(4, 2, 16, 16), (4, 1, 24, 8), (6, 6, 32, 0)])
def test_rotary_and_cache_write_the_same_fp8_bytes_as_the_reference(heads, n_kv, dim, rot):
    """Into an FP8 cache the kernel writes exactly the bytes PagedAttention.write does for the rotated keys
    and the values (both round to nearest even and saturate at 448), sign of zero aside."""
    from tritonize.runtime.cuda_kernels import rotary_and_cache
    from tritonize.runtime.model import apply_rotary

    torch.manual_seed(0)
    n, k_scale, v_scale = 7, 0.004, 0.5
    qkv = torch.randn(n, (heads + 2 * n_kv) * dim, device=DEVICE)
    qkv[0, :] *= 1000  # saturates
    qkv[1, :] *= 2e-5  # subnormal FP8 values
    slots = torch.tensor([9, 3, 14, 0, 5, 11, 2], device=DEVICE)
    ref = PagedAttention(4, 4, n_kv, dim, 1.0, None, torch.float32, DEVICE, torch.float8_e4m3fn,
                         k_scale=k_scale, v_scale=v_scale)
    k_cache, v_cache = torch.zeros_like(ref.k_cache), torch.zeros_like(ref.v_cache)
    q, k, v = qkv.split([heads * dim, n_kv * dim, n_kv * dim], dim=-1)
    q, k, v = q.view(n, heads, dim), k.view(n, n_kv, dim), v.view(n, n_kv, dim)
    rope = None
    if rot:
        angles = torch.randn(n, rot // 2, device=DEVICE)
        cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None]
        sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None]
        rope = (cos, sin)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    meta = AttentionMetadata(slots, torch.zeros(1, 1, dtype=torch.int64, device=DEVICE), torch.ones(1, device=DEVICE),
                             torch.zeros(2, device=DEVICE), torch.zeros(1, device=DEVICE), 1, [], [])
    ref.write(k, v, meta)
    got_q = rotary_and_cache(qkv, *(rope or (None, None)), slots, k_cache, v_cache, heads, n_kv, dim, k_scale, v_scale)
    torch.testing.assert_close(got_q, q, atol=1e-5, rtol=1e-5)
    stored = k_cache.float().abs()
    assert stored.max() == 448.0 and ((stored > 0) & (stored < 2**-6)).any()
    assert torch.equal(k_cache.float(), ref.k_cache.float())
    assert torch.equal(v_cache.float(), ref.v_cache.float())


@pytest.mark.parametrize("static", [False, True])
def test_per_token_fp8_kernel_matches_the_reference(static):
    from tritonize.runtime.cuda_kernels import per_token_fp8 as kernel
    from tritonize.runtime.quantize import per_token_fp8

    torch.manual_seed(0)
    x = torch.randn(5, 300, device=DEVICE) * torch.tensor([1e-4, 1.0, 30.0, 1e3, 0.5], device=DEVICE)[:, None]
    static_scale = torch.tensor(0.01, device=DEVICE) if static else None
    got_q, got_s = kernel(x, static_scale)
    want_q, want_s = per_token_fp8(x, static_scale)
    torch.testing.assert_close(got_s, want_s, rtol=1e-6, atol=0)
    assert torch.equal(got_q.float(), want_q.float())


@pytest.mark.parametrize("layout", ["compressed-tensors", "fp8-block"])
def test_an_fp8_checkpoint_with_an_fp8_cache_runs_the_same_with_the_kernels(layout, tmp_path):
    """The engine on an FP8 checkpoint with an FP8 KV cache (the checkpoint's scales, or 1.0): the Triton kernels
    (attention, rotary + FP8 cache write, norms, SiLU) give the tokens of the PyTorch modules."""
    from tests.fixtures.fp8 import write_fp8_checkpoint
    from tritonize.export.demo_model import write_demo_checkpoint
    from tritonize.runtime.engine import Engine

    src = write_demo_checkpoint(tmp_path / "float", hidden=64, layers=2, seed=5)
    fp8_dir, _ = write_fp8_checkpoint(src, tmp_path, layout)
    prompts = [[1, 415, 3607, 302, 264, 9631], [1, 5713, 3714], [1, 330, 28705, 28740]]
    common = dict(device=DEVICE, dtype="float32", max_batch_size=4, max_seq_len=48, kv_cache_dtype="fp8",
                  cuda_graphs=False, kv_cache_tokens=1024)  # a small pool: later tests need the card's memory too
    with Engine(fp8_dir, kernels=True, **common) as with_kernels, Engine(fp8_dir, kernels=False, **common) as plain:
        assert with_kernels.kernels
        assert with_kernels.model.layers[0].attention.paged.k_cache.dtype == torch.float8_e4m3fn
        assert with_kernels.generate(prompts, max_new_tokens=8) == plain.generate(prompts, max_new_tokens=8)


@pytest.mark.parametrize("split_k", [None, 2, 3])
@pytest.mark.parametrize("m, n, k, block_m", [(1, 48, 96, None), (1, 48, 96, 1), (5, 80, 300, None),
                                              (16, 32, 512, None), (40, 48, 160, None), (64, 32, 96, None)])
def test_fp8_weight_only_kernel_matches_the_dequantized_linear(m, n, k, block_m, split_k):
    """Whole, and with K shared among 2 or 3 programs per output tile (the last to finish adds the shares up):
    the same result, twice in a row (each call leaves the tile counters as it found them). Up to 64 rows, held
    by a program in tiles of 16, 32 or 64; one row also on the CUDA cores (``block_m=1``)."""
    from tritonize.runtime.cuda_kernels import fp8_weight_only_linear
    from tritonize.runtime.quantize import quantize_per_channel

    torch.manual_seed(m)
    weight, scale = quantize_per_channel(torch.randn(n, k) * 0.05)
    x = torch.randn(m, k).to(torch.bfloat16).float()
    want = x @ (weight.float() * scale[:, None]).T
    tiling = {"block_k": 32, "split_k": split_k} if split_k else {}
    tiling.update({"block_m": block_m} if block_m else {})
    got = fp8_weight_only_linear(x.to(DEVICE), weight.to(DEVICE), scale.to(DEVICE), **tiling)
    assert got.shape == (m, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    again = fp8_weight_only_linear(x.to(DEVICE), weight.to(DEVICE), scale.to(DEVICE), **tiling)
    assert torch.equal(again, got)
    if DEVICE == "cuda":  # bfloat16 activations: the products are exact, the sums float32, the result rounded once
        half = fp8_weight_only_linear(x.to(DEVICE, torch.bfloat16), weight.to(DEVICE), scale.to(DEVICE), **tiling)
        torch.testing.assert_close(half.float().cpu(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("split_k", [None, 3])
@pytest.mark.parametrize("m, n, k", [(1, 48, 96), (24, 80, 300), (64, 32, 160), (130, 80, 96), (16, 64, 8192)])
def test_fp8_scaled_kernel_matches_fp8_arithmetic(m, n, k, split_k):
    """FP8 activations with a scale per row times FP8 weights with a scale per output: the products of FP8 values
    are exact and the sums float32 (within a step of K, Hopper's fewer bits), so the result is the float32 product
    of the dequantized operands (what torch._scaled_mm computes) at long K too, for any number of rows (more than 64: several row tiles per weight tile), whole K
    or K shared, twice in a row."""
    from tritonize.runtime.cuda_kernels import fp8_scaled_linear, per_token_fp8
    from tritonize.runtime.quantize import quantize_per_channel

    torch.manual_seed(m + k)
    weight, scale = quantize_per_channel(torch.randn(n, k) * 0.05)
    xq, xs = per_token_fp8(torch.randn(m, k, device=DEVICE) * torch.logspace(-2, 2, m, device=DEVICE)[:, None])
    want = (xq.float() * xs).cpu() @ (weight.float() * scale[:, None]).T
    tiling = {"block_k": 32, "split_k": split_k} if split_k else {}
    got = fp8_scaled_linear(xq, xs, weight.to(DEVICE), scale.to(DEVICE), out_dtype=torch.float32, **tiling)
    assert got.shape == (m, n) and got.dtype == torch.float32
    # Hopper sums a step of K's FP8 products in fewer bits than float32 before adding them to the float32 total:
    # 1e-3 of the largest output (a bfloat16 result rounds at 4e-3); the whole of K in those bits was 2e-4 off at
    # K = 96 and grows with K
    torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    assert torch.equal(fp8_scaled_linear(xq, xs, weight.to(DEVICE), scale.to(DEVICE), out_dtype=torch.float32,
                                         **tiling), got)
    bf16 = fp8_scaled_linear(xq, xs, weight.to(DEVICE), scale.to(DEVICE), **tiling)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float().cpu(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


def test_an_fp8_linear_takes_the_kernel_its_step_size_asks_for(monkeypatch):
    """TRITONIZE_FP8_WEIGHT_ONLY_ROWS (16 unless set, 64 at most): steps of up to that many rows skip the activation
    quantization, and give the dequantized linear's result; TRITONIZE_FP8_KERNEL_ROWS (128 unless set): steps of up
    to that many rows quantize the activations per token for fp8_scaled_linear, larger ones for torch._scaled_mm;
    both within FP8 accuracy, and the kernel's the same as the FP8 arithmetic done in float32."""
    from tritonize.runtime import quantize
    from tritonize.runtime.cuda_kernels import fp8_weight_only_linear

    torch.manual_seed(3)
    linear = torch.nn.Linear(96, 64, bias=True)
    fp8 = quantize.FP8Linear.from_linear(linear).to(DEVICE)
    fp8.__class__ = quantize.ScaledMMLinear
    x = torch.randn(2, 3, 96, device=DEVICE)
    want = torch.nn.functional.linear(x, fp8.dequantized(torch.float32), fp8.bias)
    monkeypatch.setattr(quantize, "WEIGHT_ONLY_ROWS", 8)
    torch.testing.assert_close(fp8(x), want, rtol=1e-4, atol=1e-4)  # 6 rows: the weight-only kernel, exact
    with pytest.raises(ValueError, match="at most 64 rows"):
        fp8_weight_only_linear(torch.zeros(65, 96, device=DEVICE), fp8.weight, fp8.weight_scale)
    monkeypatch.setattr(quantize, "WEIGHT_ONLY_ROWS", 4)
    monkeypatch.setattr(quantize, "KERNEL_ROWS", 6)
    scaled = fp8(x)  # 6 rows > 4: activations quantized per token, FP8 x FP8 in the kernel
    xq, xs = quantize.per_token_fp8(x.reshape(6, 96))
    exact = (xq.float() * xs) @ fp8.dequantized(torch.float32).T + fp8.bias
    torch.testing.assert_close(scaled.reshape(6, 64), exact, rtol=1e-3, atol=1e-3 * float(exact.abs().max()))
    assert torch.nn.functional.cosine_similarity(scaled.flatten(), want.flatten(), dim=0) > 0.99
    monkeypatch.setattr(quantize, "KERNEL_ROWS", 5)
    try:
        by_torch = fp8(x)  # 6 rows > 5: torch._scaled_mm
    except RuntimeError as e:  # a PyTorch build without the CPU kernel of _scaled_mm
        pytest.skip(f"torch._scaled_mm does not run on this CPU build: {e}")
    torch.testing.assert_close(by_torch, scaled, rtol=2e-2, atol=2e-2)
