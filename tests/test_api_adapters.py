"""Adapters through the Python API: NeMo's ``TensorRTLLM(model_dir, lora_ckpt_list=...)``, ``add_prompt_table``
and ``forward(lora_uids=..., task_ids=...)`` on `Exporter`, and a `Deployment` that serves the same adapters.

References are transformers + peft (greedy, float32) on the same weights; p-tuned prompts run transformers
on ``inputs_embeds`` with the task's table before the prompt's token embeddings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from deploy_source import LIMITS, PROMPTS, nemo2_llama
from fixtures.adapters import peft_lora
from safetensors.torch import save_file
from tokenizers import Tokenizer

from tritonize import Deployment, Exporter
from tritonize.deploy import DeployError
from tritonize.serving.client import GenerateOptions, grpc_generate
from tritonize.serving.server import free_ports

N = 8
N_VIRTUAL = 3


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    work = tmp_path_factory.mktemp("api-adapters")
    source = nemo2_llama(work)
    lora = peft_lora(source.model, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], r=4, lora_alpha=8,
                     seed=11, b_std=0.3)
    lora.save_pretrained(work / "peft-lora")
    table = torch.randn(N_VIRTUAL, source.model.config.hidden_size, generator=torch.Generator().manual_seed(5)) * 0.3
    save_file({"table": table}, str(work / "task.safetensors"))

    exporter = Exporter(work / "model_dir", lora_ckpt_list=[work / "peft-lora"])
    exporter.export(nemo_checkpoint_path=source.path, model_type="llama", dtype="float32", max_lora_rank=8,
                    use_lora_plugin="float32", max_prompt_embedding_table_size=4, **LIMITS)
    task_id = exporter.add_prompt_table("summarize", work / "task.safetensors")
    yield {"exporter": exporter, "source": source, "work": work, "models": {None: source.model, 0: lora},
           "table": table, "task_id": task_id}
    exporter.close()


def _reference(setup, prompt: str, lora: int | None, task: bool, table: torch.Tensor | None = None) -> str:
    """Greedy continuation by transformers (+ peft), the task's table before the prompt's embeddings."""
    source, model = setup["source"], setup["models"][lora]
    tok = Tokenizer.from_file(str(source.tokenizer_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    ids, new = tok.encode(prompt).ids, []
    with torch.no_grad():
        for _ in range(N):
            embeds = model.get_input_embeddings()(torch.tensor(ids + new))
            if task or table is not None:
                embeds = torch.cat([setup["table"] if table is None else table, embeds])
            token = int(model(inputs_embeds=embeds[None]).logits[0, -1].argmax())
            if token == eos:
                break
            new.append(token)
    whole, head = tok.decode(ids + new, skip_special_tokens=True), tok.decode(ids, skip_special_tokens=True)
    return whole[len(head):]


def test_mixed_lora_and_task_prompts_in_one_call_equal_transformers_and_peft(tuned):
    exporter = tuned["exporter"]
    assert exporter.task_ids == {"summarize": tuned["task_id"]} and tuned["task_id"] == 0
    jobs = [(PROMPTS[0], 0, False), (PROMPTS[1], None, True), (PROMPTS[0], None, False), (PROMPTS[1], 0, True),
            (PROMPTS[0], None, True)]
    texts = exporter.forward([p for p, _, _ in jobs], max_output_token=N,
                             lora_uids=["0" if lora == 0 else "-1" for _, lora, _ in jobs],
                             task_ids=["summarize" if task else None for _, _, task in jobs])
    assert texts == [_reference(tuned, p, lora, task) for p, lora, task in jobs]
    # each adapter changes the answer, else the comparison above proves nothing
    assert len({texts[0], texts[2], texts[4]}) == 3
    # a single entry applies to every prompt; the numeric task id works as well as the name
    assert exporter.forward(PROMPTS, max_output_token=N, lora_uids=["0"], task_ids=[str(tuned["task_id"])]) == \
        [_reference(tuned, p, 0, True) for p in PROMPTS]


def test_unknown_adapters_and_per_call_tables_are_clear_errors(tuned):
    exporter = tuned["exporter"]
    with pytest.raises(DeployError, match=r"lora_uids has '3', which is no LoRA adapter of this model \(it serves: 0\)"):
        exporter.forward(PROMPTS, max_output_token=N, lora_uids=["3", "0"])
    with pytest.raises(DeployError, match=r"task_ids has 'translate', .* \(it serves: summarize \(task_id 0\)\)"):
        exporter.forward(PROMPTS, max_output_token=N, task_ids=["translate"])
    with pytest.raises(DeployError, match="lora_uids has 3 entries for 2 prompts"):
        exporter.forward(PROMPTS, max_output_token=N, lora_uids=["0", "0", "0"])
    with pytest.raises(DeployError, match="give task_ids or a per-call prompt table, not both"):
        exporter.forward(PROMPTS, max_output_token=N, task_ids=["summarize"],
                         prompt_embeddings_table=np.zeros((2, 64), np.float32))
    with pytest.raises(DeployError, match=r"the prompt table has shape \(5, 64\): give \[n, 64\] with 1 <= n <= "
                                          r"max_prompt_embedding_table_size \(4\)"):
        exporter.forward(PROMPTS, max_output_token=N, prompt_embeddings_table=np.zeros((5, 64), np.float32))
    with pytest.raises(DeployError, match="task 'summarize' is already added"):
        exporter.add_prompt_table("summarize", tuned["work"] / "task.safetensors")
    with pytest.raises(TypeError, match="'lora_ckpt'.*lora_ckpt_list"):
        Exporter(tuned["work"] / "other").export(tuned["work"] / "missing.nemo", lora_ckpt=["x"])


def test_a_second_exporter_on_the_directory_serves_the_same_adapters(tuned):
    reloaded = Exporter(tuned["exporter"].model_dir, **LIMITS)
    try:
        assert reloaded.task_ids == {"summarize": 0}
        assert reloaded.lora_ckpt_list == [str(tuned["work"] / "peft-lora")]
        got = reloaded.forward(PROMPTS, max_output_token=N, lora_uids=["0", "-1"], task_ids=[None, "summarize"])
    finally:
        reloaded.close()
    assert got == [_reference(tuned, PROMPTS[0], 0, False), _reference(tuned, PROMPTS[1], None, True)]


@pytest.mark.e2e
def test_deployment_serves_the_exporters_adapters(tuned):
    exporter, work = tuned["exporter"], tuned["work"]
    http, grpc, metrics = free_ports(3)
    deployment = Deployment(model=exporter, triton_model_name="tuned", http_port=http, grpc_port=grpc,
                            metrics_port=metrics, model_repository=work / "repo")
    try:
        deployment.run()
        endpoint = deployment.server.grpc_endpoint
        served_lora = grpc_generate(endpoint, "tuned", PROMPTS[0], GenerateOptions(max_tokens=N, lora_task_id=0)).text
        served_task = grpc_generate(endpoint, "tuned", PROMPTS[1],
                                    GenerateOptions(max_tokens=N, task_id=exporter.task_ids["summarize"])).text
    finally:
        deployment.stop()
    assert served_lora == exporter.forward([PROMPTS[0]], max_output_token=N, lora_uids=["0"])[0]
    assert served_task == exporter.forward([PROMPTS[1]], max_output_token=N, task_ids=["summarize"])[0]
    assert served_lora != exporter.forward([PROMPTS[0]], max_output_token=N)[0]
    adapters = work / "repo" / "tuned_engine" / "1" / "adapters"
    assert [p.name for p in (adapters / "lora").iterdir()] == ["0"]
    assert [p.name for p in (adapters / "ptuning").iterdir()] == ["0"]


def test_a_per_call_prompt_table_applies_to_every_prompt(tuned):
    """NeMo's forward(prompt_embeddings_table=...) / (prompt_embeddings_checkpoint_path=...)."""
    table = torch.randn(2, 64, generator=torch.Generator().manual_seed(8)) * 0.3
    expected = [_reference(tuned, p, None, False, table) for p in PROMPTS]
    assert tuned["exporter"].forward(PROMPTS, max_output_token=N, prompt_embeddings_table=table.numpy()) == expected
    save_file({"table": table}, str(tuned["work"] / "call.safetensors"))
    assert tuned["exporter"].forward(PROMPTS, max_output_token=N, lora_uids=["0"],
                                     prompt_embeddings_checkpoint_path=tuned["work"] / "call.safetensors") == \
        [_reference(tuned, p, 0, False, table) for p in PROMPTS]
    assert expected != [_reference(tuned, p, None, False) for p in PROMPTS]
