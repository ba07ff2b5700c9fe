"""Adapter converters: PEFT / NeMo LoRA and NeMo p-tuning into tritonize's adapter formats.

PEFT deltas are checked against PEFT's own ``merge_and_unload``; NeMo fixtures are written from
the documented Megatron layout starting from HF-layout matrices, so the expected deltas are those
matrices' products.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from tests.fixtures.adapters import (
    LEGACY_PTUNING_KEY,
    write_hostile_nemo,
    write_nemo1_lora,
    write_nemo2_lora,
    write_nemo_ptuning,
    write_peft_lora,
)
from tests.fixtures.hostile import truncated_tar
from tritonize.cli.main import cli
from tritonize.export.adapters import (
    TRTLLM_TO_CANONICAL,
    AdapterError,
    PromptTable,
    canonical_to_trtllm,
    check_prompt_tables,
    read_lora,
    read_ptuning,
    write_lora,
    write_ptuning,
)
from tritonize.export.demo_model import write_demo_checkpoint
from tritonize.runtime.config import ModelArgs

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
LLAMA_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                 "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def _llama(**over):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**LLAMA, **over})
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model, ModelArgs.from_hf_config({**cfg.to_dict(), "architectures": ["LlamaForCausalLM"]})


def _llama_args(**over) -> ModelArgs:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **LLAMA, **over}
    return ModelArgs.from_hf_config(cfg)


def _merged_deltas(model, out: Path, **lora_kw) -> tuple[dict[str, torch.Tensor], object]:
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = write_peft_lora(model, out, **lora_kw)
    merged = peft_model.merge_and_unload().state_dict()
    return {k: merged[k] - base[k] for k in base if k in merged and k.endswith(".weight")}, peft_model


@pytest.mark.parametrize("lora_kw", [
    {},
    {"use_rslora": True, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 3.0}},
], ids=["plain", "rslora-patterns"])
def test_peft_llama_matches_merge_and_unload(tmp_path, lora_kw):
    model, args = _llama()
    deltas, _ = _merged_deltas(model, tmp_path / "peft", target_modules=[m.split(".")[1] for m in
                                                                         LLAMA_MODULES.values()], **lora_kw)
    adapter = read_lora(tmp_path / "peft", args)
    assert adapter.source_format == "peft" and adapter.n_layers == 2 and adapter.rank == 4
    assert adapter.modules == ["q", "k", "v", "o", "gate", "up", "down"]
    for i in range(2):
        for m, hf in LLAMA_MODULES.items():
            expected = deltas[f"model.layers.{i}.{hf}.weight"]
            assert expected.abs().max() > 1e-3  # the adapter really changes this weight
            torch.testing.assert_close(adapter.delta(i, m), expected, rtol=1e-4, atol=1e-5)
    if lora_kw:
        assert adapter.layers[0]["q"][0][2:].abs().max() == 0  # rank 2 padded up to 4 with zeros


def test_peft_gpt2_conv1d_matches_merge_and_unload(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    args = ModelArgs.from_hf_config({**cfg.to_dict(), "architectures": ["GPT2LMHeadModel"]})
    deltas, _ = _merged_deltas(model, tmp_path / "peft", target_modules=["c_attn", "c_proj", "c_fc"],
                               fan_in_fan_out=True)
    adapter = read_lora(tmp_path / "peft", args)
    assert adapter.modules == ["qkv", "o", "up", "down"]
    names = {"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"}
    for i in range(2):
        for m, hf in names.items():
            conv_delta = deltas[f"transformer.h.{i}.{hf}.weight"]  # Conv1D stores [in, out]
            assert conv_delta.abs().max() > 1e-3
            torch.testing.assert_close(adapter.delta(i, m), conv_delta.T, rtol=1e-4, atol=1e-5)


def _rand(*shape):
    return torch.randn(*shape)


def _nemo_modules(n_layers=2, H=32, nh=4, nkv=2, d=8, F=48, r=4):
    torch.manual_seed(1)
    return [{"qkv": (_rand(r, H), _rand(nh * d, r), _rand(nkv * d, r), _rand(nkv * d, r)),
             "o": (_rand(r, nh * d), _rand(H, r)),
             "fc1": (_rand(r, H), _rand(F, r), _rand(F, r)),
             "fc2": (_rand(r, F), _rand(H, r))} for _ in range(n_layers)]


@pytest.mark.parametrize("tar", [True, False], ids=["tar", "dir"])
def test_nemo1_lora_recovers_hf_deltas(tmp_path, tar):
    layers = _nemo_modules()
    path = write_nemo1_lora(tmp_path / "lora.nemo", layers, heads=4, groups=2, head_dim=8, adapter_dim=4,
                            alpha=8, tar=tar)
    adapter = read_lora(path, _llama_args(), max_lora_rank=4, target_modules=["attn_qkv", "attn_dense",
                                                                               "mlp_h_to_4h", "mlp_4h_to_h"])
    assert adapter.source_format == "nemo" and adapter.modules == ["qkv", "o", "gate_up", "down"]
    scale = 8 / 4
    for i, mods in enumerate(layers):
        a, bq, bk, bv = mods["qkv"]
        torch.testing.assert_close(adapter.delta(i, "qkv"), scale * torch.cat([bq, bk, bv]) @ a)
        torch.testing.assert_close(adapter.delta(i, "o"), scale * mods["o"][1] @ mods["o"][0])
        a, bg, bu = mods["fc1"]
        torch.testing.assert_close(adapter.delta(i, "gate_up"), scale * torch.cat([bg, bu]) @ a)
        torch.testing.assert_close(adapter.delta(i, "down"), scale * mods["fc2"][1] @ mods["fc2"][0])


def test_nemo1_lora_layer_selection(tmp_path):
    full = _nemo_modules()
    layers = [{"qkv": full[0]["qkv"]}, {}]
    plain = write_nemo1_lora(tmp_path / "lora.nemo", layers, heads=4, groups=2, head_dim=8, adapter_dim=4, alpha=4,
                             config_extra={"num_layers": 2})
    with pytest.raises(AdapterError, match="adapts 1 layers but the base model has 2"):
        read_lora(plain, _llama_args())
    selected = write_nemo1_lora(tmp_path / "sel.nemo", layers, heads=4, groups=2, head_dim=8, adapter_dim=4,
                                alpha=4, config_extra={"num_layers": 2}, lora_extra={"layer_selection": [1]})
    adapter = read_lora(selected, _llama_args())
    a, bq, bk, bv = full[0]["qkv"]
    torch.testing.assert_close(adapter.delta(0, "qkv"), torch.cat([bq, bk, bv]) @ a)
    assert adapter.delta(1, "qkv").abs().max() == 0 and adapter.modules == ["qkv"]


def test_nemo2_lora_recovers_hf_deltas(tmp_path):
    layers = _nemo_modules()
    path = write_nemo2_lora(tmp_path / "nemo2_lora", layers, groups=2, head_dim=8, dim=4, alpha=16)
    adapter = read_lora(path, _llama_args())
    assert adapter.source_format == "nemo2" and adapter.modules == ["qkv", "o", "gate_up", "down"]
    for i, mods in enumerate(layers):
        a, bq, bk, bv = mods["qkv"]
        torch.testing.assert_close(adapter.delta(i, "qkv"), 4 * torch.cat([bq, bk, bv]) @ a)
        a, bg, bu = mods["fc1"]
        torch.testing.assert_close(adapter.delta(i, "gate_up"), 4 * torch.cat([bg, bu]) @ a)
        torch.testing.assert_close(adapter.delta(i, "down"), 4 * mods["fc2"][1] @ mods["fc2"][0])


def test_write_lora_round_trip_and_format(tmp_path):
    layers = _nemo_modules()
    path = write_nemo1_lora(tmp_path / "lora.nemo", layers, heads=4, groups=2, head_dim=8, adapter_dim=4, alpha=8)
    adapter = read_lora(path, _llama_args())
    out = write_lora(adapter, tmp_path / "repo" / "adapters" / "lora" / "7")
    meta = json.loads((out / "adapter.json").read_text())
    assert meta == {"format": "tritonize-lora", "format_version": 1, "rank": 4, "n_layers": 2,
                    "modules": ["qkv", "o", "gate_up", "down"], "source": str(path), "source_format": "nemo",
                    "scale_folded": True}
    tensors = load_file(str(out / "adapter.safetensors"))
    assert len(tensors) == 2 * 4 * 2
    for i in range(2):
        for m in meta["modules"]:
            a, b = tensors[f"layers.{i}.{m}.A"], tensors[f"layers.{i}.{m}.B"]
            assert a.dtype == torch.float32 and a.shape[0] == 4 and b.shape[1] == 4
            torch.testing.assert_close(b @ a, adapter.delta(i, m))
    assert sorted(p.name for p in out.parent.iterdir()) == ["7"]


def test_writers_leave_nothing_on_failure(tmp_path, monkeypatch):
    import tritonize.export.adapters.write as write_mod

    adapter = read_lora(write_nemo1_lora(tmp_path / "lora.nemo", _nemo_modules(), heads=4, groups=2, head_dim=8,
                                         adapter_dim=4, alpha=8), _llama_args())

    def broken(*_a, **_k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(write_mod, "save_file", broken)
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(RuntimeError):
        write_lora(adapter, dest / "lora")
    with pytest.raises(RuntimeError):
        write_ptuning(PromptTable(torch.zeros(3, 32), "x"), dest / "pt")
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("key", ["mcore", "legacy"])
def test_nemo_ptuning_table(tmp_path, key):
    table = torch.randn(5, 32)
    path = write_nemo_ptuning(tmp_path / "pt.nemo", table, **({"key": LEGACY_PTUNING_KEY} if key == "legacy" else {}))
    got = read_ptuning(path, 32)
    assert got.n_virtual == 5 and got.hidden == 32
    torch.testing.assert_close(got.table, table)
    out = write_ptuning(got, tmp_path / "ptuning" / "3")
    meta = json.loads((out / "ptuning.json").read_text())
    assert meta == {"format": "tritonize-ptuning", "format_version": 1, "n_virtual": 5, "hidden": 32,
                    "source": str(path)}
    torch.testing.assert_close(load_file(str(out / "table.safetensors"))["table"], table)


def test_plain_table_files(tmp_path):
    table = torch.randn(4, 32)
    save_file({"anything": table}, str(tmp_path / "t.safetensors"))
    np.save(tmp_path / "t.npy", table.numpy())
    torch.testing.assert_close(read_ptuning(tmp_path / "t.safetensors", 32).table, table)
    torch.testing.assert_close(read_ptuning(tmp_path / "t.npy", 32).table, table)


# --- bad adapters -----------------------------------------------------------------------------------------------


def test_rank_above_max(tmp_path):
    path = write_nemo1_lora(tmp_path / "lora.nemo", _nemo_modules(r=16), heads=4, groups=2, head_dim=8,
                            adapter_dim=16, alpha=16)
    with pytest.raises(AdapterError, match=r"rank 16 above --max-lora-rank 8: raise it"):
        read_lora(path, _llama_args(), max_lora_rank=8)


def test_module_outside_target_modules(tmp_path):
    model, args = _llama()
    write_peft_lora(model, tmp_path / "peft", target_modules=["q_proj", "v_proj", "up_proj"])
    read_lora(tmp_path / "peft", args, target_modules=["attn_qkv", "mlp_gate"])  # qkv admits q and v
    with pytest.raises(AdapterError) as e:
        read_lora(tmp_path / "peft", args, target_modules=["attn_q", "mlp_gate"])
    assert "attn_v" in str(e.value) and "--lora-target-modules" in str(e.value)
    with pytest.raises(AdapterError, match="mlp_gate"):
        read_lora(tmp_path / "peft", args, target_modules=["attn_q", "attn_v", "mlp_h_to_4h"])


def test_shape_mismatch_adapter_for_bigger_model(tmp_path):
    path = write_nemo1_lora(tmp_path / "big.nemo", _nemo_modules(H=64, d=16, F=96), heads=4, groups=2,
                            head_dim=16, adapter_dim=4, alpha=8)
    with pytest.raises(AdapterError) as e:
        read_lora(path, _llama_args())
    msg = str(e.value)
    assert "module qkv of layer 0" in msg and "A [4, 64]" in msg and "A [r, 32]" in msg and "another model size" in msg


def test_peft_shape_mismatch(tmp_path):
    model, _ = _llama(hidden_size=64)
    write_peft_lora(model, tmp_path / "peft", target_modules=["o_proj"])
    with pytest.raises(AdapterError) as e:
        read_lora(tmp_path / "peft", _llama_args())
    assert "module o of layer 0" in str(e.value) and "[4, 64]" in str(e.value)


def test_layer_count_mismatch(tmp_path):
    path = write_nemo1_lora(tmp_path / "lora.nemo", _nemo_modules(n_layers=3), heads=4, groups=2, head_dim=8,
                            adapter_dim=4, alpha=8)
    with pytest.raises(AdapterError, match="3-layer model; the base model has 2 layers"):
        read_lora(path, _llama_args())


def test_corrupt_tar(tmp_path):
    good = write_nemo1_lora(tmp_path / "lora.nemo", _nemo_modules(), heads=4, groups=2, head_dim=8,
                            adapter_dim=4, alpha=8)
    bad = truncated_tar(good, tmp_path / "cut.nemo", keep_fraction=0.6)
    with pytest.raises(AdapterError, match="truncated|corrupt|not a readable tar"):
        read_lora(bad, _llama_args())
    with pytest.raises(AdapterError, match="truncated|corrupt|not a readable tar"):
        read_ptuning(bad, 32)


@pytest.mark.parametrize("payload", ["open", "os.system"])
def test_hostile_pickle_is_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = write_hostile_nemo(tmp_path / "evil.nemo", marker, payload=payload)
    with pytest.raises(AdapterError, match="refusing to unpickle"):
        read_lora(path, _llama_args())
    pt = write_hostile_nemo(tmp_path / "evil-pt.nemo", marker, payload=payload, scheme="ptuning")
    with pytest.raises(AdapterError, match="refusing to unpickle"):
        read_ptuning(pt, 32)
    assert not marker.exists()


def test_generate_refuses_a_hostile_adapter_in_one_line_and_writes_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = write_hostile_nemo(tmp_path / "evil.nemo", marker, payload="os.system")
    ckpt = write_demo_checkpoint(tmp_path / "ckpt", hidden=32, layers=2)
    out = tmp_path / "repo"
    result = CliRunner().invoke(cli, ["generate", "-c", str(ckpt), "-o", str(out), "--lora-ckpt", str(evil)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "refusing to unpickle" in lines[0]
    assert not out.exists() and not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "evil.nemo"]


def test_peft_refusals(tmp_path):
    model, args = _llama()
    write_peft_lora(model, tmp_path / "peft", target_modules=["q_proj"])
    cfg_path = tmp_path / "peft" / "adapter_config.json"
    original = json.loads(cfg_path.read_text())
    for change, expected in [({"peft_type": "PREFIX_TUNING"}, "only LoRA"),
                             ({"bias": "all"}, "bias='none'"),
                             ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                             ({"use_dora": True}, "DoRA")]:
        cfg_path.write_text(json.dumps({**original, **change}))
        with pytest.raises(AdapterError, match=expected):
            read_lora(tmp_path / "peft", args)


def test_ptuning_total_above_max_and_width():
    tables = {1: PromptTable(torch.zeros(5, 32), "a"), 2: PromptTable(torch.zeros(7, 32), "b")}
    check_prompt_tables(tables, 12)
    check_prompt_tables(tables, None)
    with pytest.raises(AdapterError) as e:
        check_prompt_tables(tables, 10)
    assert "task 1: 5" in str(e.value) and "task 2: 7" in str(e.value) and "10" in str(e.value)


def test_ptuning_width_mismatch(tmp_path):
    path = write_nemo_ptuning(tmp_path / "pt.nemo", torch.randn(5, 64))
    with pytest.raises(AdapterError, match=r"64 wide but the model's hidden size is 32"):
        read_ptuning(path, 32)


def test_lora_checkpoint_is_not_a_ptuning_table_and_back(tmp_path):
    lora = write_nemo1_lora(tmp_path / "lora.nemo", _nemo_modules(), heads=4, groups=2, head_dim=8,
                            adapter_dim=4, alpha=8)
    with pytest.raises(AdapterError, match="not p-tuning"):
        read_ptuning(lora, 32)
    pt = write_nemo_ptuning(tmp_path / "pt.nemo", torch.randn(5, 32))
    with pytest.raises(AdapterError, match="p-tuning checkpoint"):
        read_lora(pt, _llama_args())


def test_trtllm_names():
    gated, plain = TRTLLM_TO_CANONICAL("gated"), TRTLLM_TO_CANONICAL("plain")
    assert gated["mlp_h_to_4h"] == ("gate", "gate_up") and gated["mlp_gate"] == ("up",)
    assert plain["mlp_h_to_4h"] == ("up",)
    for kind, table in (("gated", gated), ("plain", plain)):
        for name, modules in table.items():
            for m in modules:
                if m not in ("q", "k", "v") or name != "attn_qkv":
                    assert canonical_to_trtllm(m, kind) == name
