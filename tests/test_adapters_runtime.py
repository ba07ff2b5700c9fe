"""LoRA and p-tuning in the torch runtime, checked against transformers (+ peft) on the same weights.

Requests with different adapters, and without one, run in one batch: the outputs must equal what each
reference model gives on its own.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tests.fixtures.adapter_dirs import write_lora_from_peft, write_ptuning
from tests.fixtures.adapters import peft_lora
from tritonize.errors import AdapterError
from tritonize.runtime.engine import Engine
from tritonize.runtime.request import GenerationRequest, StepOutput, submit_and_wait

TIMEOUT = 30
PROMPTS = [[1, 17, 42, 99, 7], [1, 250, 3], [1, 60, 61, 62, 63, 64, 65, 66], [1, 5, 5, 8, 200, 31]]


def _peft(base, target_modules, r, alpha, seed, **kw):
    return peft_lora(base, target_modules=target_modules, r=r, lora_alpha=alpha, seed=seed, **kw)


def _hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _run(engine: Engine, jobs: list[tuple[list[int], dict]], n: int) -> list[StepOutput]:
    """Submits every job at once (one batch) and waits for all."""
    requests = [GenerationRequest(request_id=f"r{i}", prompt_ids=prompt, max_new_tokens=n, **kw)
                for i, (prompt, kw) in enumerate(jobs)]
    return submit_and_wait(engine, requests, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.1, eos_token_id=2)
    base = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("llama")
    base.save_pretrained(path)
    adapters = tmp_path_factory.mktemp("adapters")
    attn = _peft(base, ["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=8, seed=1)
    mlp = _peft(base, ["gate_proj", "up_proj", "down_proj", "q_proj"], r=8, alpha=4, seed=2, use_rslora=True)
    write_lora_from_peft(attn, adapters / "lora" / "1")
    write_lora_from_peft(mlp, adapters / "lora" / "7")
    tables = {0: torch.randn(3, 64) * 0.1, 4: torch.randn(5, 64) * 0.1}
    for task, table in tables.items():
        write_ptuning(table, adapters / "ptuning" / str(task))
    return {"path": path, "base": base, "adapters": adapters, "peft": {1: attn, 7: mlp}, "tables": tables}


@pytest.fixture(scope="module")
def engine(llama):
    eng = Engine(llama["path"], device="cpu", max_batch_size=6, max_seq_len=64, max_num_tokens=32,
                 adapters_dir=llama["adapters"]).start()
    yield eng
    eng.shutdown()


def test_mixed_lora_batch_equals_peft(llama, engine):
    n = 12
    jobs = [(PROMPTS[0], {"lora_task_id": 1}), (PROMPTS[1], {"lora_task_id": 7}), (PROMPTS[2], {}),
            (PROMPTS[3], {"lora_task_id": 1}), (PROMPTS[0], {"lora_task_id": 7}), (PROMPTS[0], {})]
    outs = _run(engine, jobs, n)
    for (prompt, kw), out in zip(jobs, outs):
        assert out.finish_reason == "length", out.error
        reference = llama["peft"][kw["lora_task_id"]] if "lora_task_id" in kw else llama["base"]
        assert out.token_ids == _hf_greedy(reference, prompt, n), kw
    # the adapters do change the output (otherwise the comparison above proves nothing)
    assert outs[0].token_ids != outs[5].token_ids != outs[4].token_ids
    assert max(engine.stats["decode_batch_sizes"]) >= 4


def _hf_ptuned_greedy(base, table, prompt, n):
    """transformers on inputs_embeds: the task's virtual embeddings, then the prompt's token embeddings."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            embeds = torch.cat([table, base.get_input_embeddings()(torch.tensor(ids))])[None]
            token = int(base(inputs_embeds=embeds).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
    return out


def test_ptuning_and_lora_in_one_batch(llama, engine):
    n, vocab = 10, 256
    tables = llama["tables"]
    virtual = {task: [vocab + j for j in range(t.shape[0])] for task, t in tables.items()}
    jobs = [(virtual[0] + PROMPTS[0], {"task_id": 0}), (virtual[4] + PROMPTS[1], {"task_id": 4}),
            (virtual[4] + PROMPTS[0], {"task_id": 4}), (PROMPTS[2], {"lora_task_id": 7})]
    outs = _run(engine, jobs, n)
    for (prompt, kw), out in zip(jobs, outs):
        assert out.finish_reason == "length", out.error
        if "task_id" in kw:
            real = [t for t in prompt if t < vocab]
            assert out.token_ids == _hf_ptuned_greedy(llama["base"], tables[kw["task_id"]], real, n)
            assert out.num_input_tokens == len(prompt)
        else:
            assert out.token_ids == _hf_greedy(llama["peft"][7], prompt, n)
    assert outs[0].token_ids != _hf_greedy(llama["base"], PROMPTS[0], n)


@pytest.mark.parametrize("kw, prompt, message", [
    ({"lora_task_id": 3}, PROMPTS[0], "lora_task_id 3 is not loaded (this model serves: 1, 7)"),
    ({"task_id": 2}, PROMPTS[0], "task_id 2 has no p-tuning table here (this model serves: 0, 4)"),
    ({"task_id": 0}, [256, 257, 258, 259, 1, 2], "outside the vocabulary [0, 256) plus task 0's 3 virtual"),
    ({}, [256, 1, 2], "outside the vocabulary [0, 256)"),
])
def test_unknown_adapters_are_clear_errors(engine, kw, prompt, message):
    (out,) = _run(engine, [(prompt, kw)], 4)
    assert out.finish_reason == "error" and message in out.error


def test_engine_without_adapters_refuses_adapter_requests(llama):
    with Engine(llama["path"], device="cpu", max_batch_size=2, max_seq_len=32) as eng:
        (out,) = _run(eng, [(PROMPTS[0], {"lora_task_id": 1})], 3)
        assert "lora_task_id 1 is not loaded (this model serves: none)" in out.error


def test_adapter_for_another_model_is_refused(llama, tmp_path):
    other = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    write_lora_from_peft(_peft(other, ["q_proj"], r=2, alpha=2, seed=0), tmp_path / "lora" / "1")
    with pytest.raises(AdapterError, match=r"layers\.0\.q\.A has shape \(2, 32\), which does not fit this model's q"):
        Engine(llama["path"], device="cpu", max_batch_size=2, max_seq_len=32, adapters_dir=tmp_path)


def test_gpt2_fused_qkv_and_plain_mlp_lora(tmp_path):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)).eval()
    base.save_pretrained(tmp_path / "gpt2")
    tuned = _peft(base, ["c_attn", "c_proj", "c_fc"], r=4, alpha=8, seed=3, fan_in_fan_out=True)
    write_lora_from_peft(tuned, tmp_path / "adapters" / "lora" / "2")
    with Engine(tmp_path / "gpt2", device="cpu", max_batch_size=2, max_seq_len=64,
                adapters_dir=tmp_path / "adapters") as eng:
        outs = _run(eng, [(PROMPTS[0], {"lora_task_id": 2}), (PROMPTS[0], {})], 10)
    assert outs[0].token_ids == _hf_greedy(tuned, PROMPTS[0], 10)
    assert outs[1].token_ids == _hf_greedy(base, PROMPTS[0], 10)
    assert outs[0].token_ids != outs[1].token_ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph decode path needs a GPU")
def test_adapters_under_cuda_graphs(llama):
    """The graph-captured decode step reads each token's adapter: same answers as peft."""
    n = 10
    with Engine(llama["path"], device="cuda", dtype="float32", max_batch_size=6, max_seq_len=64,
                adapters_dir=llama["adapters"]) as eng:
        assert eng.runner.shapes()
        vocab = 256
        jobs = [(PROMPTS[0], {"lora_task_id": 1}), (PROMPTS[1], {"lora_task_id": 7}), (PROMPTS[2], {}),
                ([vocab + j for j in range(5)] + PROMPTS[3], {"task_id": 4, "lora_task_id": 1})]
        outs = _run(eng, jobs, n)
        assert set(eng.runner.graphs) == set(eng.runner.shapes()) and eng.stats["decode_steps"] > 0
    for (prompt, kw), out in zip(jobs[:3], outs[:3]):
        reference = llama["peft"][kw["lora_task_id"]] if "lora_task_id" in kw else llama["base"]
        assert out.token_ids == _hf_greedy(reference, prompt, n), kw
    assert outs[3].token_ids == _hf_ptuned_greedy(llama["peft"][1], llama["tables"][4], PROMPTS[3], n)


def test_nemo_lora_fused_modules_equal_transformers_with_merged_weights(llama, tmp_path):
    """A NeMo LoRA (fused qkv and fc1 = [gate; up]) through the converter and the runtime equals
    transformers whose weights have the documented delta ``alpha / dim * B @ A`` added."""
    from tests.fixtures.adapters import write_nemo1_lora
    from tritonize.export.adapters import read_lora, write_lora
    from tritonize.runtime.config import ModelArgs

    torch.manual_seed(5)
    r, alpha, hidden, ffn = 4, 8, 64, 128

    def rand(*shape):
        return torch.randn(*shape) * 0.15

    layers = [{"qkv": (rand(r, hidden), rand(64, r), rand(32, r), rand(32, r)), "fc1": (rand(r, hidden),
               rand(ffn, r), rand(ffn, r)), "fc2": (rand(r, ffn), rand(hidden, r))} for _ in range(2)]
    nemo = write_nemo1_lora(tmp_path / "lora.nemo", layers, heads=4, groups=2, head_dim=16, adapter_dim=r,
                            alpha=alpha)
    args = ModelArgs.from_hf_config(llama["base"].config.to_dict())
    write_lora(read_lora(nemo, args), tmp_path / "adapters" / "lora" / "3")
    merged = copy.deepcopy(llama["base"])
    scale = alpha / r
    with torch.no_grad():
        for i, mods in enumerate(layers):
            layer = merged.model.layers[i]
            a, bq, bk, bv = mods["qkv"]
            for proj, b in ((layer.self_attn.q_proj, bq), (layer.self_attn.k_proj, bk), (layer.self_attn.v_proj, bv)):
                proj.weight += scale * b @ a
            a, bg, bu = mods["fc1"]
            layer.mlp.gate_proj.weight += scale * bg @ a
            layer.mlp.up_proj.weight += scale * bu @ a
            layer.mlp.down_proj.weight += scale * mods["fc2"][1] @ mods["fc2"][0]
    with Engine(llama["path"], device="cpu", max_batch_size=2, max_seq_len=64,
                adapters_dir=tmp_path / "adapters") as eng:
        outs = _run(eng, [(PROMPTS[0], {"lora_task_id": 3}), (PROMPTS[3], {"lora_task_id": 3})], 10)
    assert outs[0].token_ids == _hf_greedy(merged, PROMPTS[0], 10)
    assert outs[1].token_ids == _hf_greedy(merged, PROMPTS[3], 10)
    assert outs[0].token_ids != _hf_greedy(llama["base"], PROMPTS[0], 10)


def test_request_tables_beside_tasks_in_one_batch(llama):
    """tensorrtllm_backend's prompt_embedding_table: each request's own table, in its slot's rows, next to
    task tables and LoRA in one batch; each equals transformers on inputs_embeds."""
    n, vocab = 8, 256
    torch.manual_seed(9)
    own = [torch.randn(2, 64) * 0.1, torch.randn(4, 64) * 0.1]
    with Engine(llama["path"], device="cpu", max_batch_size=4, max_seq_len=64, max_num_tokens=32,
                adapters_dir=llama["adapters"], max_prompt_embedding_table_size=4) as eng:
        jobs = [([vocab, vocab + 1] + PROMPTS[0], {"prompt_table": own[0]}),
                ([vocab + j for j in range(4)] + PROMPTS[1], {"prompt_table": own[1].numpy().astype("float16")}),
                ([vocab + j for j in range(3)] + PROMPTS[2], {"task_id": 0}),
                ([vocab, vocab + 1] + PROMPTS[3], {"prompt_table": own[0], "lora_task_id": 1})]
        outs = _run(eng, jobs, n)
        problems = _run(eng, [([vocab] * 5 + PROMPTS[0], {"prompt_table": torch.randn(5, 64)}),
                              ([vocab] + PROMPTS[0], {"prompt_table": torch.randn(1, 32)}),
                              ([vocab] + PROMPTS[0], {"prompt_table": own[0], "task_id": 0}),
                              ([vocab + 2] + PROMPTS[0], {"prompt_table": own[0]})], 2)
    half = own[1].half().float()  # the wire's table is float16
    expected = [_hf_ptuned_greedy(llama["base"], own[0], PROMPTS[0], n),
                _hf_ptuned_greedy(llama["base"], half, PROMPTS[1], n),
                _hf_ptuned_greedy(llama["base"], llama["tables"][0], PROMPTS[2], n),
                _hf_ptuned_greedy(llama["peft"][1], own[0], PROMPTS[3], n)]
    assert [o.token_ids for o in outs] == expected
    assert outs[0].token_ids != _hf_greedy(llama["base"], PROMPTS[0], n)
    messages = [o.error for o in problems]
    assert "has 5 rows, more than this model's --max-prompt-embedding-table-size of 4" in messages[0]
    assert "prompt_embedding_table has shape (1, 32); send [1, n, 64]" in messages[1]
    assert "send task_id or prompt_embedding_table, not both" in messages[2]
    assert "plus the request's 2-row prompt table" in messages[3]


def test_request_tables_need_reserved_rows(engine):
    (out,) = _run(engine, [([256] + PROMPTS[0], {"prompt_table": torch.randn(1, 64)})], 2)
    assert "takes no prompt_embedding_table in a request: regenerate the repository with " \
           "--max-prompt-embedding-table-size" in out.error


def test_prefix_blocks_are_never_shared_across_adapters(llama):
    """The same long prompt under two adapters, a p-tuning task and the base model: each reuses only
    its own earlier blocks, and each answer is its own reference's."""
    n = 6
    prompt = [1] + list(range(30, 70))  # 41 tokens: 10 full blocks of 4
    vocab = 256
    virtual = [vocab + j for j in range(llama["tables"][4].shape[0])]
    with Engine(llama["path"], device="cpu", max_batch_size=4, max_seq_len=96, max_num_tokens=64, block_size=4,
                adapters_dir=llama["adapters"]) as eng:
        kinds = [{"lora_task_id": 1}, {"lora_task_id": 7}, {"task_id": 4}, {}]
        for kw in kinds:  # first pass: every prefix is new
            before = eng.pool.stats.prefix_hit_tokens
            ids = virtual + prompt if "task_id" in kw else prompt
            (out,) = _run(eng, [(ids, kw)], n)
            assert out.finish_reason == "length" and eng.pool.stats.prefix_hit_tokens == before, kw
        for kw in kinds:  # second pass: each finds exactly its own blocks
            before = eng.pool.stats.prefix_hit_tokens
            ids = virtual + prompt if "task_id" in kw else prompt
            (out,) = _run(eng, [(ids + [5], kw)], n)
            assert eng.pool.stats.prefix_hit_tokens - before == (len(ids) // 4) * 4, kw
            if "lora_task_id" in kw:
                assert out.token_ids == _hf_greedy(llama["peft"][kw["lora_task_id"]], prompt + [5], n)
            elif "task_id" in kw:
                assert out.token_ids == _hf_ptuned_greedy(llama["base"], llama["tables"][4], prompt + [5], n)
            else:
                assert out.token_ids == _hf_greedy(llama["base"], prompt + [5], n)
