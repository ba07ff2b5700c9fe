"""FP8 in the torch runtime, up to the GPU: FP8 linears, FP8 checkpoints, the FP8 KV cache.

Checkpoints come from tests/fixtures/fp8.py (quantized here from a float model by code that does not
use tritonize); each has a dequantized twin that transformers loads. On the CPU an FP8 linear runs
weight-only, so greedy tokens must equal transformers' on the twin exactly. The FP8 x FP8 path
(``ScaledMMLinear``: per-token activation quantization + ``torch._scaled_mm``) runs here through
PyTorch's CPU implementation of ``_scaled_mm`` and is held to FP8's accuracy, not exactness.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from fixtures.fp8 import LAYOUTS, write_fp8_checkpoint

from tritonize.export.demo_model import write_demo_checkpoint
from tritonize.runtime.adapters import LoRA, LoRALinear
from tritonize.runtime.attention import AttentionMetadata, PagedAttention
from tritonize.runtime.engine import Engine
from tritonize.runtime.model import prompt_logits
from tritonize.runtime.quantize import (
    FP8,
    FP8Linear,
    ScaledMMLinear,
    dequantize,
    fuse_fp8,
    per_token_fp8,
    quantize_model,
    quantize_per_channel,
    read_quantization,
    to_fp8,
    use_fp8_matmul,
)
from tritonize.runtime.weights import WeightsError, load_model

transformers = pytest.importorskip("transformers")

PROMPTS = [[1, 415, 3607, 302, 264, 9631], [1, 5713, 3714, 264, 727], [1, 28705, 28740, 28725, 28705, 28750],
           [1, 330], [1, 560, 272, 5398, 2499, 3859], [1, 801, 16182, 28732, 28711, 1329],
           [1, 415, 2936, 9060, 285, 1142, 461, 10575, 754], [1, 9596, 8298, 264, 727, 736, 403]]


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("float") / "ckpt", hidden=64, layers=2, seed=5)


@pytest.fixture(scope="module")
def fp8_ckpts(float_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    return {layout: write_fp8_checkpoint(float_ckpt, root, layout) for layout in LAYOUTS}


def _transformers_greedy(model_dir, prompts, n):
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, min_new_tokens=n)
            out.append(gen[0, len(ids):].tolist())
    return out


# ---------------------------------------------------------------------------------------------- linears
def test_per_channel_quantization_and_saturation():
    torch.manual_seed(0)
    w = torch.randn(48, 32) * 0.05
    w[3] = 0.0
    q, scale = quantize_per_channel(w)
    assert q.dtype == FP8 and scale.shape == (48,) and scale[3] == 1.0
    assert torch.equal(q.float().abs().amax(dim=1)[torch.arange(48) != 3], torch.full((47,), 448.0))
    error = (dequantize(q, scale) - w).abs()
    assert error[3].eq(0).all()
    rel = (error / w.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)).max()
    assert 0 < rel <= 2 ** -4  # 3 mantissa bits: within half a step of the row's largest value
    assert to_fp8(torch.tensor([1e4, -1e4, 0.5])).float().tolist() == [448.0, -448.0, 0.5]


def test_fp8_linear_runs_exactly_on_its_dequantized_weight():
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 96, bias=True)
    fp8 = FP8Linear.from_linear(lin)
    x = torch.randn(5, 64)
    want = F.linear(x, fp8.weight.float() * fp8.weight_scale[:, None], lin.bias)
    assert torch.equal(fp8(x), want)
    block = FP8Linear(64, 96, block=(32, 32))
    block.weight.copy_(fp8.weight)
    block.weight_scale.copy_(torch.rand(3, 2) + 0.5)
    full = block.weight_scale.repeat_interleave(32, 0).repeat_interleave(32, 1)
    assert torch.equal(block(x), x @ (block.weight.float() * full).t())


def test_fusing_per_tensor_parts_keeps_each_scale():
    torch.manual_seed(2)
    parts = []
    for rows, s in ((16, 0.5), (8, 2.0), (8, 0.25)):
        parts.append((to_fp8(torch.randn(rows, 32) * 10), torch.full((rows,), s), torch.tensor(s / 10)))
    weight, scale, input_scale = fuse_fp8(parts, None)
    fused = dequantize(weight, scale)
    separate = torch.cat([dequantize(w, s) for w, s, _ in parts])
    assert torch.equal(fused, separate) and input_scale == torch.tensor(0.2)


@pytest.mark.parametrize("static", [False, True])
def test_scaled_mm_path_is_within_fp8_accuracy(static, monkeypatch):
    import tritonize.runtime.quantize as quantize

    monkeypatch.setattr(quantize, "WEIGHT_ONLY_ROWS", 0)  # every step through torch._scaled_mm, small ones included
    monkeypatch.setattr(quantize, "KERNEL_ROWS", 0)
    torch.manual_seed(3)
    lin = torch.nn.Linear(128, 64, bias=True)
    quantized = FP8Linear.from_linear(lin)
    module = FP8Linear(128, 64, bias=True, static_input=static)
    module.load_state_dict({**quantized.state_dict(), **({"input_scale": torch.tensor(0.01)} if static else {})})
    x = torch.randn(7, 128)
    reference = module(x)
    assert use_fp8_matmul(module) == 1 and type(module) is ScaledMMLinear
    try:
        got = module(x)
    except RuntimeError as e:  # a PyTorch build without the CPU kernel of _scaled_mm
        pytest.skip(f"torch._scaled_mm does not run on this CPU build: {e}")
    cos = F.cosine_similarity(got.flatten(), reference.flatten(), dim=0)
    assert got.dtype == x.dtype and cos > 0.998, float(cos)
    xq, xs = per_token_fp8(x)
    assert xs.shape == (7, 1) and torch.equal(xq.float().abs().amax(dim=1), torch.full((7,), 448.0))


def test_block_weights_are_requantized_per_row_for_the_fp8_gemm():
    torch.manual_seed(4)
    module = FP8Linear(64, 64, block=(32, 32))
    module.weight.copy_(to_fp8(torch.randn(64, 64) * 50))
    module.weight_scale.copy_(torch.tensor([[0.01, 0.02], [0.03, 0.005]]))
    before = module.dequantized(torch.float32)
    use_fp8_matmul(module)
    assert module.block is None and module.weight_scale.shape == (64,)
    after = module.weight.float() * module.weight_scale[:, None]
    assert ((after - before).abs() <= before.abs().amax(dim=1, keepdim=True) * 2 ** -4).all()


def test_lora_wraps_an_fp8_linear():
    torch.manual_seed(5)
    base = FP8Linear.from_linear(torch.nn.Linear(32, 48, bias=False))
    a, b = torch.randn(2, 4, 32), torch.randn(2, 48, 4)
    rows = torch.tensor([0, 1, 2, 1])
    wrapped = LoRALinear(base, LoRA(a, b), rows)
    x = torch.randn(4, 32)
    want = base(x) + torch.stack([torch.zeros(48), *(b[i - 1] @ (a[i - 1] @ x[j]) for j, i in
                                                     ((1, 1), (2, 2), (3, 1)))])
    assert torch.allclose(wrapped(x), want, atol=1e-5)


def test_lora_on_an_fp8_checkpoint_equals_peft_on_the_dequantized_twin(fp8_ckpts, tmp_path):
    """The engine wraps FP8 linears with LoRA (attention and MLP): greedy tokens of mixed requests, with and
    without the adapter, equal peft + transformers on the dequantized twin."""
    from fixtures.adapter_dirs import write_lora_from_peft
    from fixtures.adapters import peft_lora

    from tritonize.runtime.request import GenerationRequest, SamplingParams, submit_and_wait

    fp8_dir, twin = fp8_ckpts["compressed-tensors"]
    base = transformers.LlamaForCausalLM.from_pretrained(twin, dtype=torch.float32).eval()
    peft_model = peft_lora(base, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], r=4, seed=3)
    write_lora_from_peft(peft_model, tmp_path / "adapters" / "lora" / "1")
    engine = Engine(fp8_dir, device="cpu", max_batch_size=4, max_seq_len=64, kv_cache_dtype="model",
                    adapters_dir=tmp_path / "adapters").start()
    assert isinstance(engine.model.layers[0].attention.wqkv.base, FP8Linear)
    jobs = [(PROMPTS[0], 1), (PROMPTS[1], None), (PROMPTS[2], 1)]
    outs = submit_and_wait(engine, [GenerationRequest(request_id=f"r{i}", prompt_ids=ids, max_new_tokens=10,
                                                      sampling=SamplingParams(), end_ids=[], lora_task_id=task)
                                    for i, (ids, task) in enumerate(jobs)], timeout=120)
    engine.shutdown()

    def greedy(ids):
        out = peft_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
        return out[0, len(ids):].tolist()

    with torch.no_grad():
        for (ids, task), out in zip(jobs, outs, strict=True):
            if task:
                assert out.token_ids == greedy(ids)
            else:
                with peft_model.disable_adapter():
                    assert out.token_ids == greedy(ids)
        with peft_model.disable_adapter():
            assert outs[0].token_ids != greedy(PROMPTS[0]), "the adapter changes nothing: the test would prove nothing"


# ---------------------------------------------------------------------------------------------- schemes
@pytest.mark.parametrize("config, hf_quant, expected", [
    ({"quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}}, None,
     ("fp8", True, None, True, False)),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}, None,
     ("fp8", True, (128, 128), False, False)),
    ({}, {"quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}}, ("modelopt", True, None, True, True)),
    ({"quantization_config": {"quant_method": "modelopt", "quant_algo": None, "kv_cache_quant_algo": "FP8"}}, None,
     ("modelopt", False, None, True, True)),
])
def test_read_quantization(config, hf_quant, expected):
    s = read_quantization(config, hf_quant)
    assert (s.method, s.weights, s.block, s.static_activations, s.kv_cache) == expected


@pytest.mark.parametrize("qc, message", [
    ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq' is not supported"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}},
     "4-bit int weights are not supported"),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, "quant_algo 'NVFP4' is not supported"),
])
def test_other_quantizations_are_refused(qc, message, float_ckpt, tmp_path):
    with pytest.raises(ValueError, match=message):
        read_quantization({"quantization_config": qc})
    ckpt = tmp_path / "q"
    ckpt.mkdir()
    for f in float_ckpt.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    with pytest.raises(WeightsError, match=message):
        load_model(ckpt)


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fp8_checkpoint_greedy_equals_transformers_on_the_dequantized_twin(layout, fp8_ckpts):
    fp8_dir, twin = fp8_ckpts[layout]
    engine = Engine(fp8_dir, device="cpu", max_batch_size=8, max_seq_len=64, kv_cache_dtype="model")
    linears = [m for m in engine.model.modules() if isinstance(m, FP8Linear)]
    assert len(linears) == 2 * 4  # wqkv, wo, w1, w2 of each layer; the LM head stays float
    assert all(m.weight.dtype == FP8 for m in linears)
    assert (linears[0].block is not None) == (layout == "fp8-block")
    assert (linears[0].input_scale is not None) == (layout in ("fp8-tensor-static", "modelopt"))
    got = engine.generate(PROMPTS, max_new_tokens=12, end_ids=[])
    assert got == _transformers_greedy(twin, PROMPTS, 12)


def test_kv_scales_are_read_from_the_checkpoint(fp8_ckpts):
    for layout in ("compressed-tensors", "modelopt"):
        model = load_model(fp8_ckpts[layout][0])
        assert model.kv_scales_found == 2 and model.quant_scheme.kv_cache
        assert [(layer.attention.k_scale, layer.attention.v_scale) for layer in model.layers] == [
            (pytest.approx(0.05), pytest.approx(0.1))] * 2
    assert load_model(fp8_ckpts["fp8-block"][0]).kv_scales_found == 0


def test_quantize_model_matches_the_per_channel_dequantized_weights(float_ckpt):
    model = load_model(float_ckpt)
    assert quantize_model(model) == 8 and type(model.output) is torch.nn.Linear
    w = model.layers[0].attention.wqkv
    assert isinstance(w, FP8Linear) and w.weight_scale.shape == (w.out_features,)


# ---------------------------------------------------------------------------------------------- KV cache
def _meta(n, bs, blocks):
    pos = torch.arange(n)
    return AttentionMetadata(slot_mapping=pos + bs, block_tables=torch.arange(1, blocks + 1)[None],
                             seq_lens=torch.tensor([n]), query_start_loc=torch.tensor([0, n]), logits_indices=pos,
                             max_query_len=n, seq_lens_host=[n], query_start_host=[0, n])


def test_fp8_cache_stores_scaled_fp8_and_attends_close_to_full_precision():
    torch.manual_seed(6)
    n, bs = 11, 4
    q, k, v = torch.randn(n, 4, 16), torch.randn(n, 2, 16) * 3, torch.randn(n, 2, 16)
    full = PagedAttention(5, bs, 2, 16, 0.25, None, torch.float32, "cpu")
    fp8 = PagedAttention(5, bs, 2, 16, 0.25, None, torch.float32, "cpu", FP8, k_scale=0.02, v_scale=0.01)
    meta = _meta(n, bs, 3)
    want, got = full(q, k, v, meta), fp8(q, k, v, meta)
    assert fp8.k_cache.dtype == FP8 and fp8.k_cache.element_size() == 1
    stored = fp8.k_cache.view(-1, 2, 16)[bs : bs + n]
    assert torch.equal(stored.view(torch.uint8), to_fp8(k / 0.02).view(torch.uint8))
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999


def test_fp8_kv_cache_agrees_with_the_float_cache(float_ckpt, capsys):
    """Greedy agreement of the FP8-cache engine with the float32-cache one on the first 16 tokens of 8 prompts.

    Two figures. Free-running: each engine generates on its own, tokens compared position by position;
    on random weights the top two logits are often a few hundredths apart, so one flip makes every later
    token differ (the same model in bfloat16 against float32 flips as often). Per step (asserted >= 90%):
    at each of the 16 positions of the float32 engine's greedy text, the FP8-cache model reads the same
    history from its FP8 cache and must choose the same next token."""
    common = dict(device="cpu", max_batch_size=8, max_seq_len=64)
    base = Engine(float_ckpt, **common).generate(PROMPTS, max_new_tokens=16, end_ids=[])
    bf16 = Engine(float_ckpt, dtype="bfloat16", **common).generate(PROMPTS, max_new_tokens=16, end_ids=[])
    engine = Engine(float_ckpt, kv_cache_dtype="fp8", **common)
    fp8 = engine.generate(PROMPTS, max_new_tokens=16, end_ids=[])
    assert engine.kv_cache_dtype == "fp8" and engine.model.layers[0].attention.paged.k_cache.dtype == FP8
    assert all(len(x) == 16 and all(0 <= t < 32000 for t in x) for x in fp8)
    total = 16 * len(PROMPTS)

    def same(a, b):
        return sum(x == y for p, q in zip(a, b, strict=True) for x, y in zip(p, q, strict=True))

    per_step = 0
    for prompt, text in zip(PROMPTS, base, strict=True):
        chosen = prompt_logits(engine.model, prompt + text)[len(prompt) - 1 : -1].argmax(dim=-1)
        per_step += int((chosen == torch.tensor(text)).sum())
    with capsys.disabled():
        print(f"\nFP8 KV cache vs float32 cache, 8 prompts x 16 tokens: per step {per_step}/{total} = "
              f"{per_step / total:.1%}; free-running {same(base, fp8)}/{total} = {same(base, fp8) / total:.1%} "
              f"(bfloat16 weights vs float32, free-running: {same(base, bf16) / total:.1%})")
    assert per_step / total >= 0.9


def test_fp8_kv_cache_halves_the_bytes_per_token(float_ckpt):
    common = dict(device="cpu", max_batch_size=2, max_seq_len=64, dtype="bfloat16", kv_cache_tokens=256)
    bf16, fp8 = Engine(float_ckpt, **common), Engine(float_ckpt, kv_cache_dtype="fp8", **common)
    assert bf16.kv_cache_tokens == fp8.kv_cache_tokens
    assert fp8.kv_cache_bytes * 2 == bf16.kv_cache_bytes
    assert (bf16.kv_cache_dtype, fp8.kv_cache_dtype) == ("bfloat16", "fp8")


def test_auto_follows_the_checkpoint(fp8_ckpts):
    common = dict(device="cpu", max_batch_size=2, max_seq_len=64)
    assert Engine(fp8_ckpts["compressed-tensors"][0], **common).kv_cache_dtype == "fp8"
    assert Engine(fp8_ckpts["compressed-tensors"][0], kv_cache_dtype="model", **common).kv_cache_dtype == "float32"
    assert Engine(fp8_ckpts["fp8-block"][0], **common).kv_cache_dtype == "float32"
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        Engine(fp8_ckpts["fp8-block"][0], kv_cache_dtype="int8", **common)


# ---------------------------------------------------------------------------------------------- on a GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_fp8_gemms_run_in_cuda_graphs(fp8_ckpts):
    """FP8 weights and an FP8 KV cache on CUDA: decode steps replayed from CUDA graphs give the eager steps' tokens;
    on FP8 tensor cores (compute capability 8.9+) every linear runs torch._scaled_mm."""
    from tritonize.runtime.quantize import fp8_matmul_supported

    fp8_dir = fp8_ckpts["compressed-tensors"][0]
    # a small pool: the engines of the tests after this one need the card's memory too
    common = dict(device="cuda", dtype="bfloat16", max_batch_size=4, max_seq_len=64, kv_cache_dtype="fp8",
                  kv_cache_tokens=1024)
    with Engine(fp8_dir, **common) as graphs, Engine(fp8_dir, cuda_graphs=False, **common) as eager:
        assert graphs.runner.buckets and graphs.kernels
        assert graphs.fp8_linears == (8 if fp8_matmul_supported(graphs.device) else 0)
        want = eager.generate(PROMPTS[:4], max_new_tokens=12, end_ids=[])
        assert graphs.generate(PROMPTS[:4], max_new_tokens=12, end_ids=[]) == want
        supported = fp8_matmul_supported(graphs.device)
    if supported:  # the FP8 GEMM of an 8B-sized layer (more rows than the weight-only kernel takes) against its
        torch.manual_seed(0)  # weight-only result
        module = FP8Linear.from_linear(torch.nn.Linear(4096, 1024, device="cuda", dtype=torch.bfloat16))
        x = torch.randn(32, 4096, device="cuda", dtype=torch.bfloat16)
        reference = module(x)
        use_fp8_matmul(module)
        got = module(x)
        assert F.cosine_similarity(got.float().flatten(), reference.float().flatten(), dim=0) > 0.998
