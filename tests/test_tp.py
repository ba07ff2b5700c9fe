"""Tensor parallelism in the torch runtime, without a server: real gloo groups of 2 and 4 processes on the CPU.

- every family's shard, loaded straight from its files, gives the unsharded model's logits;
- the engine split over ranks (rank 0 schedules and samples, the workers follow each broadcast step) gives
  transformers' greedy tokens, with LoRA, p-tuning tables, a request's own table (sent to the workers when the
  request is admitted), chunked prefill and preemption in one batch;
- a lost worker fails what runs and what comes with one line, at once; a split that cannot be is refused.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from fixtures import tiny_model
from fixtures.adapter_dirs import write_lora_from_peft, write_ptuning
from fixtures.adapters import peft_lora

from tritonize.runtime.config import ModelArgs
from tritonize.runtime.engine import Engine
from tritonize.runtime.model import prompt_logits
from tritonize.runtime.request import GenerationRequest, StepOutput, submit_and_wait
from tritonize.runtime.tp import Shard, TensorParallelError, check_split
from tritonize.runtime.weights import load_model, read_config

VOCAB = 300
IDS = [5, 17, 42, 99, 3, 250, 7, 1, 0, 299, 64, 12]
TIMEOUT = 120
# (fixture family, config overrides): every layout the shard slices differently
FAMILIES = {
    "llama": ("llama", {}),  # grouped-query attention: 4 heads, 2 key/value heads
    "mixtral": ("mixtral", {}),  # tensor-parallel experts
    "gemma": ("gemma", {}),  # one key/value head (replicated), tied head, (1 + w) norms
    "gpt2": ("gpt", {}),  # biases (row-parallel ones added once), learned positions, tied head
    "starcoder": ("starcoder", {}),  # multi-query, fused c_attn
    "starcoder2": ("starcoder2", {}),  # biases on a plain MLP
    "falcon": ("falcon", {}),  # parallel block with one shared norm, multi-query
    "falcon_gqa": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),  # grouped fused qkv, two norms
    "nemotron": ("gptnext", {}),  # squared ReLU, partial rotary, layernorm1p
}


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights large enough that a wrong slice changes the logits everywhere (norms and biases moved too)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * (0.2 if param.ndim >= 2 else 0.1))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp-families")
    out = {}
    for seed, (name, (family, overrides)) in enumerate(FAMILIES.items()):
        model = _randomize(tiny_model(family, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, **overrides), seed)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def _group_logits(world: int, dirs: list[Path]) -> dict[str, tuple]:
    """Starts ``world`` ranks (gloo) that each load their shard of every checkpoint; rank 0's logits back."""
    import tp_shard_rank

    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    ranks = [ctx.Process(target=tp_shard_rank.shard_logits, args=(r, world, store.port, [str(d) for d in dirs],
                                                                  IDS, results)) for r in range(world)]
    for p in ranks:
        p.start()
    got, done = {}, set()
    try:
        while len(got) < len(dirs) or len(done) < world:
            message = results.get(timeout=TIMEOUT)
            if message[0] == "done":
                done.add(message[1])
            else:
                _, model_dir, logits, held, kv_heads = message
                got[Path(model_dir).name] = (torch.from_numpy(logits), held, kv_heads)
        return got
    finally:
        for p in ranks:
            p.join(30)
            if p.is_alive():
                p.kill()
        # Every rank did all its work (it says so after the last collective). What gloo does while the group is
        # torn down is not this test's: a rank whose peer closed first is sometimes aborted there (SIGABRT).
        assert done == set(range(world)), f"ranks {sorted(set(range(world)) - done)} did not finish"
        assert all(p.exitcode in (0, -6) for p in ranks), [p.exitcode for p in ranks]


@pytest.mark.parametrize("world", [2, 4])
def test_each_family_sharded_gives_the_unsharded_logits(checkpoints, world):
    got = _group_logits(world, list(checkpoints.values()))
    for name, path in checkpoints.items():
        full = load_model(path)
        want = prompt_logits(full, IDS)
        logits, held, kv_heads = got[name]
        assert torch.allclose(logits, want, atol=1e-4, rtol=1e-4), (name, (logits - want).abs().max())
        assert want.std() > 0.5, f"{name}: logits too flat to tell a wrong shard apart"
        args = full.args
        assert kv_heads == max(1, args.n_kv_heads // world), name  # its own (or its one replicated) kv heads
        total = sum(t.numel() for t in full.state_dict().values())
        assert held < total, f"{name}: rank 0 holds the whole model"


def test_the_shard_keeps_each_ranks_heads():
    """4 query heads, 2 key/value heads over 4 ranks: each key/value head on the two ranks whose queries read it."""
    args = ModelArgs(architecture="LlamaForCausalLM", vocab_size=10, dim=8, n_layers=1, n_heads=4, n_kv_heads=2,
                     head_dim=2, intermediate_size=8)
    rows = {r: Shard(args, r, 4).qkv_rows().tolist() for r in range(4)}
    # q rows 0..7 (heads of 2), k rows 8..11, v rows 12..15
    assert rows == {0: [0, 1, 8, 9, 12, 13], 1: [2, 3, 8, 9, 12, 13], 2: [4, 5, 10, 11, 14, 15],
                    3: [6, 7, 10, 11, 14, 15]}
    assert Shard(args, 1, 2).mlp_rows().tolist() == [4, 5, 6, 7, 12, 13, 14, 15]  # [gate_1; up_1]
    assert [Shard(args, r, 4).vocab for r in range(4)] == [(0, 3, 3), (3, 6, 3), (6, 9, 3), (9, 10, 3)]


@pytest.mark.parametrize("heads, kv, world, message", [
    (4, 2, 3, "4 attention heads cannot be split over 3 ranks"),
    (12, 4, 6, "4 key/value heads cannot be split over 6 ranks (nor replicated: 6 is not a multiple of 4)"),
    (12, 3, 6, None),  # each key/value head on two ranks
    (8, 8, 8, None),
    (8, 2, 8, None),
])
def test_check_split(heads, kv, world, message):
    args = ModelArgs(architecture="LlamaForCausalLM", vocab_size=10, dim=heads * 2, n_layers=1, n_heads=heads,
                     n_kv_heads=kv, head_dim=2, intermediate_size=16 * world)
    problem = check_split(args, world)
    assert problem == message if message is None else message in problem


# ---------------------------------------------------------------------------- the engine over ranks

LLAMA_PROMPTS = [[1, 17, 42, 99, 7], [1, 250, 3], [1, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71], [1, 5, 8]]


def _greedy(model, prompt: list[int], n: int, table: torch.Tensor | None = None) -> list[int]:
    """transformers, one token at a time (on inputs_embeds with ``table`` before the prompt's embeddings)."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            embeds = model.get_input_embeddings()(torch.tensor(ids))
            if table is not None:
                embeds = torch.cat([table, embeds])
            out.append(int(model(inputs_embeds=embeds[None]).logits[0, -1].argmax()))
            ids.append(out[-1])
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.1, eos_token_id=2)
    base = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tp-llama")
    base.save_pretrained(path)
    adapters = tmp_path_factory.mktemp("tp-adapters")
    loras = {1: peft_lora(base, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, lora_alpha=8, seed=1),
             7: peft_lora(base, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"], r=8, lora_alpha=4,
                          seed=2)}
    for task, model in loras.items():
        write_lora_from_peft(model, adapters / "lora" / str(task))
    table = torch.randn(3, 64) * 0.1
    write_ptuning(table, adapters / "ptuning" / "0")
    return {"path": path, "base": base, "loras": loras, "adapters": adapters, "table": table}


def _run(engine: Engine, requests: list[GenerationRequest]) -> list[StepOutput]:
    return submit_and_wait(engine, requests, timeout=TIMEOUT)


@pytest.mark.parametrize("world", [2, 4])
def test_the_split_engine_gives_transformers_tokens_with_adapters_preemption_and_request_tables(llama, world):
    """One batch mixes LoRA adapters, a p-tuning task, a request's own prompt table and plain requests, in a KV
    pool of 3 blocks with 4-token steps (chunked prefill, preemption, prefix reuse): every step reaches the
    workers by the broadcast, the tokens they feed back by ``last_sampled``; nothing may change a token."""
    n, vocab = 14, 256  # most requests outgrow one block: 3 blocks cannot hold the batch
    own = torch.randn(2, 64) * 0.1
    asks = [
        (LLAMA_PROMPTS[0], {"lora_task_id": 1}, llama["loras"][1], None),
        (LLAMA_PROMPTS[1], {"lora_task_id": 7}, llama["loras"][7], None),
        (LLAMA_PROMPTS[2], {}, llama["base"], None),
        ([vocab, vocab + 1, vocab + 2, *LLAMA_PROMPTS[3]], {"task_id": 0}, llama["base"], llama["table"]),
        ([vocab, vocab + 1, *LLAMA_PROMPTS[0]], {"prompt_table": own}, llama["base"], own),
        (LLAMA_PROMPTS[0], {}, llama["base"], None),
    ]
    with Engine(llama["path"], device="cpu", dtype="float32", max_batch_size=4, max_seq_len=48, max_num_tokens=4,
                kv_cache_tokens=48, adapters_dir=llama["adapters"], max_prompt_embedding_table_size=2,
                tensor_parallel_size=world) as engine:
        requests = [GenerationRequest(request_id=f"r{i}", prompt_ids=prompt, max_new_tokens=n, **kw)
                    for i, (prompt, kw, _, _) in enumerate(asks)]
        outs = _run(engine, requests)
        pool = engine.pool.stats
    for (prompt, kw, model, table), out in zip(asks, outs):
        assert out.finish_reason == "length", out.error
        assert out.token_ids == _greedy(model, [t for t in prompt if t < vocab], n, table), kw
    assert pool.preemptions > 0, "the pool was not pressed as intended"
    assert len({tuple(o.token_ids) for o in outs}) == len(outs), "each adapter and table must change the answer"


@pytest.mark.parametrize("name, world", [("mixtral", 2), ("gpt2", 4)])
def test_the_split_engine_gives_the_one_device_tokens(checkpoints, name, world):
    prompts = [IDS, IDS[:3], [7, 7, 7, 7, 7, 7, 7, 7, 7], [250]]
    limits = dict(device="cpu", dtype="float32", max_batch_size=4, max_seq_len=48, max_num_tokens=8)
    with Engine(checkpoints[name], **limits) as one:
        want = one.generate(prompts, max_new_tokens=10)
    with Engine(checkpoints[name], tensor_parallel_size=world, **limits) as split:
        got = split.generate(prompts, max_new_tokens=10)
    assert got == want
    assert len({tuple(t) for t in want}) > 2


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_a_lost_worker_fails_every_request_with_one_line_and_nothing_hangs(checkpoints, caplog):
    engine = Engine(checkpoints["gpt2"], device="cpu", dtype="float32", max_batch_size=4, max_seq_len=120,
                    tensor_parallel_size=4).start()
    pids = [p.pid for p in engine.tp.processes]
    try:
        streamed: list[StepOutput] = []
        running = GenerationRequest(request_id="long", prompt_ids=IDS, max_new_tokens=100, stream=True,
                                    on_output=streamed.append)
        engine.submit(running)
        deadline = time.monotonic() + TIMEOUT
        while not streamed and time.monotonic() < deadline:  # it is generating
            time.sleep(0.01)
        os.kill(pids[1], signal.SIGKILL)  # rank 2
        while not (streamed and streamed[-1].finished) and time.monotonic() < deadline:
            time.sleep(0.01)
        line = "tritonize: tensor-parallel worker 2 exited (code -9); the engine stops"
        assert streamed[-1].finished and streamed[-1].finish_reason == "error" and streamed[-1].error == line
        assert sum(len(o.token_ids) for o in streamed) < 100
        started = time.monotonic()
        (late,) = _run(engine, [GenerationRequest(request_id="late", prompt_ids=IDS, max_new_tokens=3)])
        assert late.error == line and time.monotonic() - started < 1.0
        assert line in caplog.text
    finally:
        started = time.monotonic()
        engine.shutdown()
        assert time.monotonic() - started < 20
    assert not any(_alive(pid) for pid in pids), "a worker outlived the engine"


def test_splits_that_cannot_be_are_refused_before_any_process_starts(checkpoints):
    with pytest.raises(TensorParallelError, match="tensor parallelism 3: 4 attention heads cannot be split over 3"):
        Engine(checkpoints["llama"], device="cpu", tensor_parallel_size=3)
    args = ModelArgs.from_hf_config(read_config(checkpoints["llama"]))
    assert check_split(args, 2) is None and check_split(args, 4) is None
