"""End to end: a repository serving two PEFT LoRA adapters and a p-tuning table, on a real tritonserver.

Requests with different adapters, with a task's virtual tokens, and with neither, are sent at once
(one running batch); each answer must equal transformers + peft (greedy, float32) for its adapter, and
transformers on ``inputs_embeds`` with the task's table prepended for p-tuning.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import transformers
from click.testing import CliRunner
from fixtures.adapters import peft_lora
from safetensors.torch import save_file

from tritonize.cli.main import cli
from tritonize.errors import TritonizeError
from tritonize.export.demo_model import write_demo_checkpoint
from tritonize.repository.build import build_repository
from tritonize.repository.spec import RepoSpec
from tritonize.serving.client import GenerateOptions, QueryError, grpc_generate

pytestmark = pytest.mark.e2e

PROMPTS = ["Once upon a time", "The quick brown fox", "1, 2, 3,", "def fibonacci(n):"]
N = 12


def _adapter(base, out: Path, targets: list[str], r: int, alpha: int, seed: int):
    model = peft_lora(base, target_modules=targets, r=r, lora_alpha=alpha, seed=seed)
    model.save_pretrained(out)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    ckpt = write_demo_checkpoint(root / "ckpt", hidden=64, layers=2, seed=3)
    base = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    models = {
        None: base,
        0: _adapter(base, root / "peft-a", ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"], 4, 8, 1),
        5: _adapter(base, root / "peft-b", ["k_proj", "up_proj"], 8, 16, 2),
    }
    torch.manual_seed(4)
    table = torch.randn(4, 64) * 0.05
    save_file({"table": table}, str(root / "task2.safetensors"))
    spec = RepoSpec(name="tuned", max_batch_size=8, max_input_len=40, max_output_len=N, device="cpu",
                    dtype="float32", lora=[(0, str(root / "peft-a")), (5, str(root / "peft-b"))],
                    ptuning=[(2, str(root / "task2.safetensors"))], max_lora_rank=8,
                    max_prompt_embedding_table_size=6)
    repo = build_repository(ckpt, root / "repo", spec, force=False, progress=False)
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    return {"root": root, "ckpt": ckpt, "repo": repo, "models": models, "table": table, "sp": sp}


def _expected(setup, prompt: str, lora: int | None, task: int | None, table: torch.Tensor | None = None) -> str:
    sp, model = setup["sp"], setup["models"][lora]
    table = setup["table"] if task is not None else table
    ids = [sp.bos_id(), *sp.encode(prompt)]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(N):
            embeds = model.get_input_embeddings()(torch.tensor(ids + new))
            if table is not None:
                embeds = torch.cat([table, embeds])
            token = int(model(inputs_embeds=embeds[None]).logits[0, -1].argmax())
            if token == 2:
                break
            new.append(token)
    whole, head = sp.decode(ids + new), sp.decode(ids)
    return whole[len(head):]


def test_mixed_adapters_in_one_batch_equal_transformers_and_peft(setup, triton_server):
    server = triton_server(setup["repo"])
    jobs = [(p, lora, task) for p in PROMPTS for lora, task in ((None, None), (0, None), (5, None), (None, 2),
                                                                 (5, 2))]

    def ask(job):
        prompt, lora, task = job
        return grpc_generate(server.grpc_endpoint, "tuned", prompt,
                             GenerateOptions(max_tokens=N, lora_task_id=lora, task_id=task))

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(ask, jobs))
    for (prompt, lora, task), got in zip(jobs, results):
        assert got.text == _expected(setup, prompt, lora, task), (prompt, lora, task)
        if task is not None:
            assert got.num_input_tokens == 4 + 1 + len(setup["sp"].encode(prompt))
    texts = {(lora, task): got.text for (p, lora, task), got in zip(jobs, results) if p == PROMPTS[0]}
    assert len(set(texts.values())) == len(texts), "every adapter must change the answer"

    with pytest.raises(QueryError, match="lora_task_id 3 is not loaded .this model serves: 0, 5."):
        grpc_generate(server.grpc_endpoint, "tuned", "hi", GenerateOptions(max_tokens=2, lora_task_id=3))
    with pytest.raises(QueryError, match="task_id 1 has no p-tuning table in this model .it serves: 2."):
        grpc_generate(server.grpc_endpoint, "tuned", "hi", GenerateOptions(max_tokens=2, task_id=1))


def test_manifest_and_validate_list_the_adapters(setup):
    entry = json.loads((setup["repo"] / "tritonize.json").read_text())["models"]["tuned"]
    assert entry["adapters"]["lora"]["0"]["rank"] == 4 and entry["adapters"]["lora"]["5"]["rank"] == 8
    assert entry["adapters"]["ptuning"]["2"]["n_virtual"] == 4
    result = CliRunner().invoke(cli, ["validate", str(setup["repo"])])
    assert result.exit_code == 0, result.output
    assert "tuned/1: LoRA lora_task_id 5: rank 8, modules k, up" in result.output
    assert "tuned/1: p-tuning task_id 2: 4 virtual tokens" in result.output


@pytest.mark.parametrize("change, message", [
    ({"max_lora_rank": 4}, "rank 8 above --max-lora-rank 4"),
    ({"lora_target_modules": ["attn_q", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h"]}, "--lora-target-modules"),
    ({"max_prompt_embedding_table_size": 3}, "--max-prompt-embedding-table-size"),
])
def test_bad_adapter_options_are_refused_and_write_nothing(setup, tmp_path, change, message):
    root = setup["root"]
    options = {"name": "tuned", "max_input_len": 40, "max_output_len": N, "device": "cpu",
               "lora": [(0, str(root / "peft-a")), (5, str(root / "peft-b"))],
               "ptuning": [(2, str(root / "task2.safetensors"))], **change}
    with pytest.raises(TritonizeError, match=message):
        build_repository(setup["ckpt"], tmp_path / "repo", RepoSpec(**options), force=False, progress=False)
    assert not (tmp_path / "repo").exists() and list(tmp_path.iterdir()) == []


def test_cli_generate_with_adapters(setup, tmp_path):
    root = setup["root"]
    result = CliRunner().invoke(cli, [
        "generate", "-c", str(setup["ckpt"]), "-o", str(tmp_path / "repo"), "-n", "m", "--device", "cpu",
        "--max-input-len", "40", "--lora-ckpt", str(root / "peft-a"), "--lora-ckpt", f"9={root / 'peft-b'}",
        "--lora-target-modules", "attn_q attn_k attn_v attn_dense", "--lora-target-modules", "mlp_h_to_4h",
        "--lora-target-modules", "mlp_gate", "--lora-target-modules", "mlp_4h_to_h",
        "--ptuning-nemo-checkpoint", str(root / "task2.safetensors"), "--task-ids", "11"])
    assert result.exit_code == 0, result.output
    adapters = tmp_path / "repo" / "m_engine" / "1" / "adapters"
    assert sorted(p.name for p in (adapters / "lora").iterdir()) == ["0", "9"]
    assert [p.name for p in (adapters / "ptuning").iterdir()] == ["11"]
    result = CliRunner().invoke(cli, [
        "generate", "-c", str(setup["ckpt"]), "-o", str(tmp_path / "repo2"), "--ptuning-nemo-checkpoint",
        str(root / "task2.safetensors"), "--task-ids", "1", "--task-ids", "2"])
    assert result.exit_code == 1 and "--task-ids gives 2 id(s) for 1" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "repo2").exists()


def test_a_request_sends_its_own_prompt_table(setup, triton_server):
    """tensorrtllm_backend's prompt_embedding_table ([1, n, hidden] FP16) on the non-streaming door."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    server = triton_server(setup["repo"])
    torch.manual_seed(11)
    table = (torch.randn(3, 64) * 0.05).half()

    def tensor(name, array, dtype):
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    def ask(lora=None):
        inputs = [tensor("text_input", np.array([[PROMPTS[1].encode()]], dtype=np.object_), "BYTES"),
                  tensor("max_tokens", np.array([[N]], dtype=np.int32), "INT32"),
                  tensor("exclude_input_in_output", np.array([[True]]), "BOOL"),
                  tensor("prompt_embedding_table", table.numpy()[None], "FP16")]
        if lora is not None:
            inputs.append(tensor("lora_task_id", np.array([[lora]], dtype=np.uint64), "UINT64"))
        with grpcclient.InferenceServerClient(server.grpc_endpoint) as client:
            result = client.infer("tuned_sync", inputs)
        return result.as_numpy("text_output").reshape(-1)[0].decode(), int(result.as_numpy("num_input_tokens")[0][0])

    text, n_input = ask()
    assert text == _expected(setup, PROMPTS[1], None, None, table.float())
    assert n_input == 3 + 1 + len(setup["sp"].encode(PROMPTS[1]))
    assert ask(lora=5)[0] == _expected(setup, PROMPTS[1], 5, None, table.float())
    assert text != _expected(setup, PROMPTS[1], None, None)
