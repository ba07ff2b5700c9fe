"""FP8 through the export: FP8 sources kept as FP8 (or dequantized), float sources quantized with --quantization fp8.

Sources are written by the fixture builders: .qnemo / TRT-LLM checkpoints in FP8 (TensorRT-LLM's layout,
tests/fixtures/trtllm.py) and HF FP8 checkpoints in the layouts of transformers / vLLM, compressed-tensors and
ModelOpt (tests/fixtures/fp8.py). What is checked: the FP8 bytes written are the source's (or, quantized here,
what per-channel quantization gives), the scales say the same weight, and the torch runtime's greedy tokens on
the export equal transformers' on the dequantized weights (read back by fixture code, not by tritonize).
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from fixtures import REAL_NEMO2, bpe_model, gpt2_bpe_tokenizer_dir, write_qnemo
from fixtures.fp8 import dequantize_dir, write_fp8_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file

from tritonize.cli.main import cli
from tritonize.export import ExportError, export_checkpoint
from tritonize.export.demo_model import write_demo_checkpoint
from tritonize.runtime.engine import Engine
from tritonize.runtime.quantize import FP8, quantize_per_channel

transformers = pytest.importorskip("transformers")
PROMPTS = [[1, 415, 3607, 302, 264, 9631], [1, 5713, 3714, 264, 727], [1, 330], [1, 9596, 8298, 264, 727, 736]]


def _tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _dtypes(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_slice(k).get_dtype() for k in h.keys()})
    return out


def _greedy(model_dir, prompts=PROMPTS, n=10, **engine):
    engine = Engine(model_dir, device="cpu", max_batch_size=8, max_seq_len=64, **engine)
    return engine.generate(prompts, max_new_tokens=n, end_ids=[])


def _transformers_greedy(model_dir, prompts=PROMPTS, n=10):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            out.append(gen[0, len(ids):].tolist())
    return out


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("float") / "ckpt", hidden=64, layers=2, seed=11)


# ---------------------------------------------------------------------------------------------- .qnemo
@pytest.mark.parametrize("tp", [1, 2])
def test_qnemo_fp8_is_kept_byte_for_byte(tp, tmp_path):
    model = bpe_model("llama")
    src = write_qnemo(model, gpt2_bpe_tokenizer_dir(tmp_path / "bpe"), tmp_path / "q", dtype="float32", fp8=True,
                      tp_size=tp, fp8_kv_cache=True)
    result = export_checkpoint(src, tmp_path / "out", progress=False, verify=True)
    quant = result.manifest["output"]["quantization"]
    assert quant["weights"] == "fp8" and quant["activations"] == "static" and quant["kv_cache_scales"]
    assert quant["strategy"] == ("tensor" if tp == 1 else "channel") and result.verify["passed"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"] and qc["kv_cache_scheme"]
    out = _tensors(tmp_path / "out")
    ranks = [load_file(str(src / f"rank{r}.safetensors")) for r in range(tp)]
    # down_proj (mlp.proj) is split by columns over the ranks: the FP8 bytes of the pieces side by side
    proj = "transformer.layers.1.mlp.proj"
    assert out["model.layers.1.mlp.down_proj.weight"].dtype == FP8
    assert torch.equal(out["model.layers.1.mlp.down_proj.weight"].view(torch.uint8),
                       torch.cat([r[f"{proj}.weight"].view(torch.uint8) for r in ranks], dim=1))
    scale = out["model.layers.1.mlp.down_proj.weight_scale"]
    assert torch.equal(scale.reshape(-1)[0], ranks[0][f"{proj}.weights_scaling_factor"].reshape(()))
    assert torch.equal(out["model.layers.0.self_attn.k_scale"], ranks[0]["transformer.layers.0.attention."
                                                                         "kv_cache_scaling_factor"].reshape(()))
    # the runtime on the kept FP8 export gives transformers' tokens on the dequantized export
    dequantized = export_checkpoint(src, tmp_path / "deq", progress=False, keep_fp8=False)
    assert dequantized.manifest["output"]["quantization"]["weights"] == "dequantized"
    assert "quantization_config" not in json.loads((tmp_path / "deq" / "config.json").read_text())
    prompts = [[5, 17, 42, 99, 3], [250, 7, 1]]
    engine = Engine(tmp_path / "out", device="cpu", max_batch_size=4, max_seq_len=32, kv_cache_dtype="model")
    assert engine.generate(prompts, max_new_tokens=8, end_ids=[]) == _transformers_greedy(tmp_path / "deq", prompts, 8)
    assert Engine(tmp_path / "out", device="cpu", max_batch_size=2, max_seq_len=32).kv_cache_dtype == "fp8"


@pytest.mark.parametrize("family, why", [("falcon", "does not serve FP8 weights of FalconForCausalLM"),
                                         ("mixtral", "does not serve FP8 mixture-of-experts weights")])
def test_fp8_the_runtime_cannot_serve_is_dequantized_with_a_note(family, why, bpe_dir, tmp_path):
    src = write_qnemo(bpe_model(family), bpe_dir, tmp_path / "q", dtype="float32", fp8=True)
    result = export_checkpoint(src, tmp_path / "out", progress=False)
    quant = result.manifest["output"]["quantization"]
    assert quant["weights"] == "dequantized" and why in quant["origin"]
    assert all(d != "F8_E4M3" for d in _dtypes(tmp_path / "out").values())
    with pytest.raises(ExportError, match=f"--keep-fp8: the torch runtime {why}"):
        export_checkpoint(src, tmp_path / "out2", progress=False, keep_fp8=True)


# ---------------------------------------------------------------------------------------------- HF FP8
@pytest.mark.parametrize("layout", ["fp8-tensor-static", "fp8-block", "compressed-tensors", "modelopt"])
def test_hf_fp8_sources_are_read_and_kept(layout, float_ckpt, tmp_path):
    fp8_dir, twin = write_fp8_checkpoint(float_ckpt, tmp_path, layout)
    result = export_checkpoint(fp8_dir, tmp_path / "out", progress=False, verify=True)
    quant = result.manifest["output"]["quantization"]
    assert quant["weights"] == "fp8" and result.verify["passed"]
    assert quant["strategy"] == {"fp8-block": "block", "compressed-tensors": "channel"}.get(layout, "tensor")
    assert quant["kv_cache_scales"] == (layout in ("compressed-tensors", "modelopt"))
    src, out = _tensors(fp8_dir), _tensors(tmp_path / "out")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(out[name].view(torch.uint8), src[name].view(torch.uint8))
    want = _transformers_greedy(twin)
    assert _greedy(tmp_path / "out", kv_cache_dtype="model") == want
    assert _greedy(fp8_dir, kv_cache_dtype="model") == want
    dequantized = export_checkpoint(fp8_dir, tmp_path / "deq", progress=False, keep_fp8=False, dtype="float32")
    assert dequantized.manifest["output"]["quantization"]["weights"] == "dequantized"
    assert torch.equal(_tensors(tmp_path / "deq")[name], _tensors(twin)[name])


# ---------------------------------------------------------------------------------------------- --quantization fp8
def test_quantization_fp8_of_a_float_checkpoint(float_ckpt, tmp_path):
    result = export_checkpoint(float_ckpt, tmp_path / "out", progress=False, quantization="fp8", verify=True)
    quant = result.manifest["output"]["quantization"]
    assert quant == {"weights": "fp8", "origin": "quantized by this export", "quantized_linears": 14, "lm_head": False,
                     "strategy": "channel", "activations": "dynamic", "kv_cache_scales": False, "fp8_linears": 14}
    assert result.verify["passed"] and result.verify["cosine_similarity"] >= 0.99
    dtypes = _dtypes(tmp_path / "out")
    assert dtypes["model.layers.1.mlp.up_proj.weight"] == "F8_E4M3"
    assert dtypes["model.embed_tokens.weight"] == dtypes["lm_head.weight"] == "F32"
    assert "model.layers.1.mlp.up_proj.input_scale" not in dtypes
    out, src = _tensors(tmp_path / "out"), _tensors(float_ckpt)
    q, scale = quantize_per_channel(src["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight_scale"], scale[:, None])
    twin = dequantize_dir(tmp_path / "out", tmp_path / "twin")
    assert _greedy(tmp_path / "out") == _transformers_greedy(twin)


def test_quantization_fp8_with_the_lm_head_and_from_the_cli(float_ckpt, tmp_path):
    run = CliRunner().invoke(cli, ["export", str(float_ckpt), "-o", str(tmp_path / "out"), "--quantization", "fp8",
                                   "--fp8-lm-head", "--dtype", "bfloat16", "-q"])
    assert run.exit_code == 0, run.output
    assert "FP8: fp8 (quantized by this export, channel scales, dynamic activations)" in run.output
    dtypes = _dtypes(tmp_path / "out")
    assert dtypes["lm_head.weight"] == "F8_E4M3" and dtypes["model.embed_tokens.weight"] == "BF16"
    assert dtypes["lm_head.weight_scale"] == "F32"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["ignore"] == []
    engine = Engine(tmp_path / "out", device="cpu", max_batch_size=2, max_seq_len=32)
    assert type(engine.model.output).__name__ == "FP8Linear"
    twin = dequantize_dir(tmp_path / "out", tmp_path / "twin")
    assert engine.generate(PROMPTS[:2], max_new_tokens=6, end_ids=[]) == _transformers_greedy(twin, PROMPTS[:2], 6)
    bad = CliRunner().invoke(cli, ["export", str(float_ckpt), "-o", str(tmp_path / "x"), "--fp8-lm-head"])
    assert bad.exit_code != 0 and "--fp8-lm-head goes with --quantization fp8" in bad.output
    bad = CliRunner().invoke(cli, ["export", str(float_ckpt), "-o", str(tmp_path / "x"), "--quantization", "fp8",
                                   "--no-keep-fp8"])
    assert bad.exit_code != 0 and "drop --no-keep-fp8" in bad.output


def test_quantization_fp8_of_a_nemo2_checkpoint(tmp_path):
    """A real NeMo 2 checkpoint (written by NeMo's importer) exported straight to FP8."""
    if not (REAL_NEMO2 / "nemo2" / "weights" / ".metadata").is_file():
        pytest.skip("the shared NeMo 2 fixture is not here")
    result = export_checkpoint(REAL_NEMO2 / "nemo2", tmp_path / "out", progress=False, quantization="fp8",
                               verify=True)
    assert result.source_kind == "nemo2" and result.verify["passed"]
    assert result.manifest["output"]["quantization"]["quantized_linears"] == 14
    twin = dequantize_dir(tmp_path / "out", tmp_path / "twin")
    assert _greedy(tmp_path / "out") == _transformers_greedy(twin)


def test_quantization_fp8_of_a_mixtral_quantizes_its_attention(tmp_path):
    """Mixture-of-experts layers keep their experts in their dtype; attention runs in FP8."""
    from fixtures import tiny_model

    tiny_model("mixtral").save_pretrained(tmp_path / "mixtral")
    result = export_checkpoint(tmp_path / "mixtral", tmp_path / "out", progress=False, quantization="fp8")
    assert result.manifest["output"]["quantization"]["quantized_linears"] == 2 * 4
    dtypes = _dtypes(tmp_path / "out")
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == "F8_E4M3"
    assert dtypes["model.layers.0.block_sparse_moe.experts.0.w1.weight"] == "F32"
    twin = dequantize_dir(tmp_path / "out", tmp_path / "twin")
    assert _greedy(tmp_path / "out", n=6) == _transformers_greedy(twin, n=6)


def test_quantization_fp8_refuses_what_the_runtime_cannot_serve(bpe_dir, tmp_path):
    from fixtures import save_with_tokenizer, tiny_model

    model = tiny_model("gpt", vocab_size=300, bos_token_id=0, eos_token_id=0)
    save_with_tokenizer(model, tmp_path / "gpt", bpe_dir)
    with pytest.raises(ExportError, match="serves FP8 weights of .*not GPT2LMHeadModel"):
        export_checkpoint(tmp_path / "gpt", tmp_path / "out", progress=False, quantization="fp8")
    assert not (tmp_path / "out").exists()


def test_fp8_parts_follow_row_rearrangements_or_say_they_cannot():
    """Row segments of FP8 weights keep their bytes and scales; block grids only in whole blocks; column pieces only
    with one scale between them."""
    from tritonize.export.lazy import Cat1, Const, Quantized, Rows, fp8_parts

    torch.manual_seed(0)
    w = torch.randn(64, 32).clamp(-448, 448).to(FP8)
    per_row = Quantized(Const(w), Const(torch.rand(64) + 0.5), torch.float32)
    rows = Rows([(per_row, 8, 16), (per_row, 40, 8)])
    parts = fp8_parts(rows)
    assert torch.equal(parts.weight.full().view(torch.uint8), torch.cat([w[8:24], w[40:48]]).view(torch.uint8))
    assert torch.equal(parts.scale.full(), torch.cat([per_row.scale.full()[8:24], per_row.scale.full()[40:48]]))
    assert torch.equal(rows.full(), torch.cat([per_row.full()[8:24], per_row.full()[40:48]]))  # read: dequantized
    block = Quantized(Const(w), Const(torch.rand(4, 2) + 0.5), torch.float32, block=(16, 16))
    assert fp8_parts(Rows([(block, 16, 32)])).scale.full().shape == (2, 2)
    assert fp8_parts(Rows([(block, 8, 16)])) is None  # starts inside a block
    one = Quantized(Const(w), Const(torch.tensor(0.5)), torch.float32)
    assert fp8_parts(Cat1([one, Quantized(Const(w), Const(torch.tensor(0.5)), torch.float32)])) is not None
    assert fp8_parts(Cat1([one, Quantized(Const(w), Const(torch.tensor(0.25)), torch.float32)])) is None
