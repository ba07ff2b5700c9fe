"""End to end, tensor parallelism: repositories split over 2 and 4 ranks (gloo on the CPU) on tritonserver.

Llama (grouped-query attention; at 4 ranks each key/value head is replicated on two) with a LoRA adapter,
Mixtral (tensor-parallel experts) and GPT-2 (biases, learned positions, tied head) must give exactly
transformers' greedy text in float32, streamed and not, one by one and all at once. A worker killed under a
running stream fails that stream and every later request at once with one line, which the server log holds;
the server stops without a hang and no worker outlives it.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import peft
import pytest
import torch
from fixtures import gpt2_bpe_tokenizer_dir, randomized, tiny_model
from fixtures.adapters import peft_lora

from tritonize.errors import QueryError
from tritonize.repository.build import build_repository
from tritonize.repository.spec import RepoSpec
from tritonize.serving.client import GenerateOptions, grpc_generate
from tritonize.serving.server import TritonServer, port_in_use

pytestmark = pytest.mark.e2e

VOCAB = 300
MAX_TOKENS = 8
PROMPTS = ["The capital of France is", "def main():\n    return", "1, 2, 3, 4,"]
LORA = 0
# served name -> (fixture family, tensor parallelism, LoRA)
MODELS = {"llama_tp2": ("llama", 2, True), "llama_tp4": ("llama", 4, True), "mixtral_tp2": ("mixtral", 2, False),
          "gpt2_tp4": ("gpt", 4, False)}
KILLED = "llama_tp4"  # served by test_a_killed_worker_is_reported_and_nothing_hangs
LIMITS = dict(max_input_len=32, max_output_len=16, device="cpu", dtype="float32", max_batch_size=4, max_num_tokens=8)


def _lora(base: torch.nn.Module, out: Path) -> torch.nn.Module:
    model = peft_lora(base, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      r=4, lora_alpha=8, seed=3, b_std=0.3)
    model.save_pretrained(out)
    return model


class Reference:
    def __init__(self, tok_dir: Path) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        self.eos = self.tok.token_to_id("<|endoftext|>")

    def text(self, model: torch.nn.Module, prompt: str) -> str:
        ids = self.tok.encode(prompt).ids
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=self.eos,
                                 pad_token_id=self.eos)
        new = out[0, len(ids):].tolist()
        new = new[: new.index(self.eos)] if self.eos in new else new
        whole, head = self.tok.decode(ids + new, skip_special_tokens=True), self.tok.decode(ids, skip_special_tokens=True)
        return whole[len(head):]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One repository holding every split model (their ensembles and steps), and each one's expected texts."""
    work = tmp_path_factory.mktemp("tp-e2e")
    tok_dir = gpt2_bpe_tokenizer_dir(work / "bpe", vocab_size=VOCAB)
    reference = Reference(tok_dir)
    combined = work / "repo"
    combined.mkdir()
    expected: dict[tuple[str, int | None], dict[str, str]] = {}
    bases: dict[str, torch.nn.Module] = {}
    for seed, (name, (family, world, lora)) in enumerate(MODELS.items()):
        base = bases.get(family)
        if base is None:
            base = bases[family] = randomized(tiny_model(family, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0),
                                              seed)
        ckpt = work / f"{family}-hf"
        if not ckpt.exists():
            base.save_pretrained(ckpt)
            for f in tok_dir.iterdir():
                shutil.copy2(f, ckpt / f.name)
        spec_lora = []
        expected[(name, None)] = {p: reference.text(base, p) for p in PROMPTS}
        if lora:
            adapter = work / f"{family}-peft"
            tuned = _lora(base, adapter) if not adapter.exists() else peft.PeftModel.from_pretrained(
                copy.deepcopy(base), adapter).eval()
            spec_lora = [(LORA, str(adapter))]
            expected[(name, LORA)] = {p: reference.text(tuned, p) for p in PROMPTS}
        spec = RepoSpec(name=name, tensor_parallel_size=world, lora=spec_lora, **LIMITS)
        repo = build_repository(ckpt, work / f"{name}-repo", spec, force=False, progress=False)
        options = json.loads((repo / "tritonize.json").read_text())["models"][name]["options"]
        assert options["tensor_parallel_size"] == world
        if name == KILLED:
            continue  # served alone by the test that kills one of its workers
        for folder in repo.iterdir():
            if folder.is_dir() and folder.name != f"{name}_sync":  # the gRPC doors only: fewer processes
                shutil.move(str(folder), combined / folder.name)
    for texts in expected.values():
        assert len(set(texts.values())) == len(PROMPTS), "the reference is too uniform to tell a wrong shard apart"
    assert expected[("llama_tp2", LORA)] != expected[("llama_tp2", None)]
    return work, expected


def _ports(count: int = 3) -> list[int]:
    """Free ports below the kernel's ephemeral range: the ranks' gloo connections take ephemeral ports while the
    models load, before tritonserver binds its own, so a port picked there (free_ports) could be gone by then."""
    rng = random.Random()
    found: list[int] = []
    while len(found) < count:
        port = rng.randrange(20000, 32000)
        if port not in found and not port_in_use("127.0.0.1", port):
            found.append(port)
    return found


def _server(repo: Path, log: Path) -> TritonServer:
    http, grpc, metrics = _ports()
    return TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, log_file=log, exit_timeout=10)


def test_split_models_give_transformers_text_streamed_or_not_alone_or_together(served, tmp_path):
    work, expected = served
    with _server(work / "repo", tmp_path / "log").start(timeout=600) as server:
        _ask_every_model(server, expected)


def _ask_every_model(server: TritonServer, expected: dict) -> None:
    log = server.log_text()
    for name, (_, world, _) in MODELS.items():
        if name != KILLED:
            assert f"tensor parallelism {world} (gloo on the CPU)" in log, name
    expected = {key: texts for key, texts in expected.items() if key[0] != KILLED}

    def ask(job):
        name, lora, prompt, stream = job
        return grpc_generate(server.grpc_endpoint, name, prompt, GenerateOptions(max_tokens=MAX_TOKENS,
                                                                                 lora_task_id=lora), stream=stream)

    jobs = [(name, lora, prompt, stream) for (name, lora) in expected for prompt in PROMPTS for stream in (False, True)]
    for job in jobs[:: len(PROMPTS) * 2]:  # one of each model alone first
        assert ask(job).text == expected[job[:2]][job[2]], job
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, jobs))
    for job, got in zip(jobs, results):
        assert got.text == expected[job[:2]][job[2]], job
        if job[3]:
            assert len(got.pieces) > 1, job  # streamed


# ---------------------------------------------------------------------------- a worker dies


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_worker_is_reported_and_nothing_hangs(served, tmp_path):
    work, expected = served
    server = _server(work / f"{KILLED}-repo", tmp_path / "log").start(timeout=300)
    workers: list[int] = []
    try:
        engine = [pid for pid in server.stub_pids() if f"{KILLED}_engine/" in " ".join(
            Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0"))]
        assert len(engine) == 1
        # the engine model logs its ranks' processes, in rank order
        found = re.search(rf"rank 0 is process {engine[0]}, ranks 1-3 are processes (\d+), (\d+), (\d+)",
                          server.log_text())
        assert found, server.log_text()[-2000:]
        workers = [int(pid) for pid in found.groups()]
        assert sorted(workers) == sorted(_children(engine[0]))
        for lora in (None, LORA):  # each key/value head replicated on two of the four ranks, with LoRA
            got = grpc_generate(server.grpc_endpoint, KILLED, PROMPTS[2], GenerateOptions(max_tokens=MAX_TOKENS,
                                                                                          lora_task_id=lora))
            assert got.text == expected[(KILLED, lora)][PROMPTS[2]], lora
        line = "tritonize: tensor-parallel worker 2 exited (code -9); the engine stops"
        killed: list[float] = []

        def kill_on_first_piece(_piece: str) -> None:
            if not killed:
                killed.append(time.monotonic())
                os.kill(workers[1], signal.SIGKILL)  # rank 2, under a running stream

        with pytest.raises(QueryError, match="tensor-parallel worker 2 exited"):
            grpc_generate(server.grpc_endpoint, KILLED, PROMPTS[0], GenerateOptions(max_tokens=16),
                          stream=True, on_piece=kill_on_first_piece, timeout=60)
        for stream in (False, True):
            started = time.monotonic()
            with pytest.raises(QueryError, match=line.replace("(", r"\(").replace(")", r"\)")):
                grpc_generate(server.grpc_endpoint, KILLED, PROMPTS[1], GenerateOptions(max_tokens=4),
                              stream=stream, timeout=60)
            assert time.monotonic() - started < 5.0
        assert line in server.log_text()
    finally:
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 60
    assert not any(_alive(pid) for pid in workers), "a worker outlived the server"
    assert server.stub_pids() == []

