"""The runtime transformer against transformers running the same weights, family by family.

Each family is a tiny random model built by transformers from a small config, perturbed so that
norm weights and biases are not trivially 1/0, saved with ``save_pretrained`` and loaded back with
``load_model``. transformers' own forward pass and ``generate`` are the reference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.paged import PagedRun  # noqa: E402
from tritonize.runtime.config import ModelArgs, UnsupportedModelError  # noqa: E402
from tritonize.runtime.weights import WeightsError, load_model  # noqa: E402

VOCAB = 256
SMALL = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA_LIKE = dict(SMALL, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
GPT2_LIKE = dict(SMALL, n_embd=64, n_layer=2, n_head=4, n_positions=128)
FALCON = dict(SMALL, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=False,
              max_position_embeddings=128)

FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**LLAMA_LIKE),
    "llama_bias": lambda: transformers.LlamaConfig(**LLAMA_LIKE, attention_bias=True, mlp_bias=True),
    "mistral": lambda: transformers.MistralConfig(**LLAMA_LIKE, sliding_window=8),
    "mixtral": lambda: transformers.MixtralConfig(**LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
    "gemma": lambda: transformers.GemmaConfig(**dict(LLAMA_LIKE, num_key_value_heads=1), head_dim=32),
    "gpt2": lambda: transformers.GPT2Config(**GPT2_LIKE),
    "gpt_bigcode": lambda: transformers.GPTBigCodeConfig(**GPT2_LIKE, multi_query=True),
    "gpt_bigcode_mha": lambda: transformers.GPTBigCodeConfig(**GPT2_LIKE, multi_query=False),
    "starcoder2": lambda: transformers.Starcoder2Config(**LLAMA_LIKE, use_bias=True),
    "falcon_new": lambda: transformers.FalconConfig(**FALCON, new_decoder_architecture=True, num_kv_heads=2),
    "falcon_new_1ln": lambda: transformers.FalconConfig(
        **FALCON, new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1
    ),
    "falcon_old": lambda: transformers.FalconConfig(**FALCON, new_decoder_architecture=False, multi_query=True),
    "falcon_old_seq": lambda: transformers.FalconConfig(
        **FALCON, new_decoder_architecture=False, multi_query=False, parallel_attn=False, bias=True
    ),
    "nemotron": lambda: transformers.NemotronConfig(**LLAMA_LIKE),
}

ATOL = 1e-4


def build_hf(config, path: Path, seed: int = 0, **save_kwargs):
    """A random transformers model, perturbed so every parameter matters, saved to ``path``."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    model.save_pretrained(path, **save_kwargs)
    return model


_CACHE: dict[str, tuple] = {}


@pytest.fixture(params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(hf_model, our_model, model_dir) per family, built once per session."""
    name = request.param
    if name not in _CACHE:
        path = tmp_path_factory.mktemp(name)
        hf = build_hf(FAMILIES[name](), path)
        _CACHE[name] = (hf, load_model(path), path)
    return _CACHE[name]


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def random_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def test_full_sequence_logits(family):
    hf, model, _ = family
    ids = random_ids(40, seed=1)
    run = PagedRun(model)
    ours = run([("a", ids, 0)], every_token=True)
    ref = hf_logits(hf, ids)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=1e-4)
    last = run([("b", ids, 0)])
    assert last.shape == (1, VOCAB)
    torch.testing.assert_close(last[0], ref[-1], atol=ATOL, rtol=1e-4)


def test_chunked_prefill_then_ragged_decode(family):
    """Three sequences of different lengths, prefilled in chunks packed into shared steps over scattered
    (and reused, dirty) blocks, then decoded together with ragged positions: every logit equals
    transformers' on that sequence alone."""
    hf, model, _ = family
    run = PagedRun(model, num_blocks=40, block_size=4, max_seq_len=48)
    prompts = [random_ids(n, seed=10 + n) for n in (13, 7, 21)]
    steps = 5
    continuations = [random_ids(steps, seed=100 + i) for i in range(3)]
    refs = [hf_logits(hf, p + c) for p, c in zip(prompts, continuations, strict=True)]

    # Dirty blocks first, so that stale entries from an earlier request would show up as errors.
    run([("dirty", random_ids(30, seed=7), 0)])
    run.free("dirty")

    chunk = 5
    for start in range(0, max(map(len, prompts)), chunk):
        pieces = [(i, p[start:start + chunk], start) for i, p in enumerate(prompts) if start < len(p)]
        out = run(pieces, every_token=True)
        row = 0
        for i, piece, _ in pieces:
            got = out[row:row + len(piece)]
            torch.testing.assert_close(got, refs[i][start:start + len(piece)], atol=ATOL, rtol=1e-4)
            row += len(piece)

    for step in range(steps):
        out = run([(i, [continuations[i][step]], len(prompts[i]) + step) for i in range(3)])
        assert out.shape == (3, VOCAB)
        for row, (prompt, ref) in enumerate(zip(prompts, refs, strict=True)):
            torch.testing.assert_close(out[row], ref[len(prompt) + step], atol=ATOL, rtol=1e-4)


def test_greedy_matches_generate(family):
    hf, model, _ = family
    prompt = random_ids(6, seed=3)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 6, dtype=torch.long),
                          max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, 6:].tolist()
    assert PagedRun(model, block_size=2).greedy("g", prompt, 8) == ref


def test_moe_dense_and_sparse_paths_agree(tmp_path):
    """Decode-sized token counts take the dense expert path, prefill the sparse one: both match."""
    hf = build_hf(FAMILIES["mixtral"](), tmp_path)
    model = load_model(tmp_path)
    run = PagedRun(model)
    ids = random_ids(40, seed=5)
    ref = hf_logits(hf, ids)
    for key, dense_max_tokens in enumerate((0, 1000)):
        for layer in model.layers:
            layer.feed_forward.dense_max_tokens = dense_max_tokens
        out = run([(key, ids, 0)], every_token=True)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-4)


def test_mixtral_stacked_expert_layout(tmp_path):
    """transformers 5.x's in-memory ``mlp.experts.gate_up_proj`` layout loads to the same model."""
    hf = build_hf(FAMILIES["mixtral"](), tmp_path / "orig")
    hf.save_pretrained(tmp_path / "stacked", save_original_format=False)
    names = set()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "stacked" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    ids = random_ids(20, seed=2)
    for sub in ("orig", "stacked"):
        out = PagedRun(load_model(tmp_path / sub))([(0, ids, 0)], every_token=True)
        torch.testing.assert_close(out, hf_logits(hf, ids), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
])
def test_rope_scaling(tmp_path, rope):
    config = transformers.LlamaConfig(**LLAMA_LIKE, rope_parameters=rope)
    hf = build_hf(config, tmp_path)
    model = load_model(tmp_path)
    assert model.args.rope_type == rope["rope_type"]
    ids = random_ids(60, seed=4)
    out = PagedRun(model)([(0, ids, 0)], every_token=True)
    torch.testing.assert_close(out, hf_logits(hf, ids), atol=ATOL, rtol=1e-4)


def test_transformers4_spellings_read_the_same():
    """4.x writes rope_theta/rope_scaling/torch_dtype; 5.x rope_parameters/dtype: same ModelArgs."""
    common = {"architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 64,
              "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-5}
    v4 = dict(common, torch_dtype="bfloat16", rope_theta=500000.0,
              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    v5 = dict(common, dtype="bfloat16", head_dim=16,
              rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192})
    a, b = ModelArgs.from_hf_config(v4), ModelArgs.from_hf_config(v5)
    assert a == b
    assert (a.rope_theta, a.rope_type, a.rope_factor, a.dtype, a.head_dim) == (500000.0, "llama3", 8.0,
                                                                               "bfloat16", 16)
    old_linear = dict(common, rope_scaling={"type": "linear", "factor": 2.0})
    assert ModelArgs.from_hf_config(old_linear).rope_type == "linear"


def test_bfloat16_smoke(tmp_path):
    hf = build_hf(FAMILIES["llama"](), tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    run = PagedRun(model, max_seq_len=32)
    assert model.layers[0].attention.paged.k_cache.dtype == torch.bfloat16
    ids = random_ids(16, seed=6)
    out = run([(0, ids, 0)], every_token=True)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    ref = hf_logits(hf, ids)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def test_sharded_and_bin_checkpoints(tmp_path):
    hf = build_hf(FAMILIES["llama"](), tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "sharded" / "config.json", tmp_path / "bin" / "config.json")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    ids = random_ids(12, seed=8)
    ref = hf_logits(hf, ids)
    for sub in ("sharded", "bin"):
        out = PagedRun(load_model(tmp_path / sub), max_seq_len=16)([(0, ids, 0)], every_token=True)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-4)


def test_real_nemo2_llama_fixture(tmp_path):
    """The HF source of the NeMo 2 fixture reproduces its recorded reference outputs."""
    root = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "nemo2-llama"
    if not root.exists():
        root = Path("/work/shared/fixtures/nemo2-llama")
    if not (root / "hf").exists():
        pytest.skip("nemo2-llama fixture not available")
    reference = json.loads((root / "reference_outputs.json").read_text())
    model = load_model(root / "hf", dtype=torch.float32)
    run = PagedRun(model)
    for i, case in enumerate(reference["prompts"]):
        ids = case["input_ids"]
        last = run([(("last", i), ids, 0)])[0]
        torch.testing.assert_close(last[:8], torch.tensor(case["last_logits_first8"]), atol=1e-5, rtol=1e-5)
        assert int(last.argmax()) == case["last_logits_argmax"]
        assert run.greedy(("greedy", i), ids, len(case["greedy_new_ids"])) == case["greedy_new_ids"]


# --- bad input -----------------------------------------------------------------------------------

def _write_config(path: Path, **cfg) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_unsupported_architecture_is_one_clear_line(tmp_path):
    with pytest.raises(UnsupportedModelError, match="'BloomForCausalLM'.*supported: LlamaForCausalLM") as err:
        load_model(_write_config(tmp_path, architectures=["BloomForCausalLM"], vocab_size=10))
    assert "\n" not in str(err.value)


def test_falcon_alibi_is_refused():
    cfg = transformers.FalconConfig(**dict(FALCON, alibi=True)).to_dict()
    cfg["architectures"] = ["FalconForCausalLM"]
    with pytest.raises(UnsupportedModelError, match="ALiBi"):
        ModelArgs.from_hf_config(cfg)


def test_unsupported_rope_scaling_is_refused():
    cfg = dict(LLAMA_LIKE, architectures=["LlamaForCausalLM"],
               rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="'dynamic'"):
        ModelArgs.from_hf_config(cfg)


def test_missing_and_misshapen_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    build_hf(FAMILIES["llama"](), tmp_path / "ok")
    state = load_file(tmp_path / "ok" / "model.safetensors")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())

    missing = dict(state)
    del missing["model.layers.1.self_attn.k_proj.weight"]
    _write_config(tmp_path / "missing", **config)
    save_file(missing, tmp_path / "missing" / "model.safetensors")
    with pytest.raises(WeightsError, match="model.layers.1.self_attn.k_proj.weight"):
        load_model(tmp_path / "missing")

    _write_config(tmp_path / "shape", **dict(config, intermediate_size=80))
    save_file(state, tmp_path / "shape" / "model.safetensors")
    with pytest.raises(WeightsError, match="shape"):
        load_model(tmp_path / "shape")

    with pytest.raises(WeightsError, match="no \\*.safetensors"):
        load_model(_write_config(tmp_path / "empty", **config))
    with pytest.raises(WeightsError, match="config.json not found"):
        load_model(tmp_path / "nowhere")
