"""`tritonize generate`: a checkpoint directory becomes a model repository."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import TritonizeError
from ..repository.build import generate_repository
from ..repository.spec import DEVICES, DTYPES, QUANTIZATIONS
from ..runtime.choices import MULTI_GPU_MODES, RUNTIMES
from .options import FP8_SWITCH, generate_option


@click.command()
@click.option("--checkpoint", "-c", required=True, type=click.Path(path_type=Path),
              help="Hugging Face-format directory (config.json, *.safetensors, tokenizer), or any source `tritonize "
                   "export` reads (.nemo, NeMo 2, Megatron-Bridge, .qnemo / TRT-LLM checkpoint): exported on the way.")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path),
              help="Model repository to write, or an existing one to add the model or version to.")
@generate_option("name", "-n", default="model", show_default=True, help="Name of the ensemble clients call.")
@generate_option("version", default=1, show_default=True, type=int, help="Version folder of each model; a new version is added beside the others.")
@generate_option("max_batch_size", default=None, type=click.IntRange(min=1),
              help="Most requests in one step (default: 8 with --device cpu, else 256, at most --max-num-tokens). "
                   "Reserves no memory: the KV cache is paged.")
@generate_option("max_input_len", default=256, show_default=True, type=int, help="Longest prompt, in tokens.")
@generate_option("max_output_len", default=256, show_default=True, type=int, help="Most tokens generated per request.")
@generate_option("max_num_tokens", default=0, show_default=True, type=int,
              help="Tokens per scheduler step, decodes and prompt chunks together (0: the larger of "
                   "--max-input-len and --max-batch-size, at least 2048 on a GPU).")
@generate_option("runtime", default="torch", show_default=True, type=click.Choice(RUNTIMES), help="Engine runtime.")
@generate_option("device", default="auto", show_default=True, type=click.Choice(DEVICES),
              help="auto: CUDA when the server has a GPU, else CPU.")
@generate_option("dtype", default="auto", show_default=True, type=click.Choice(DTYPES),
              help="auto: bfloat16 on CUDA, float32 on CPU.")
@generate_option("instance_count", default=1, show_default=True, type=int, help="Engine model instances.")
@generate_option("tokenizer_instance_count", default=None, type=click.IntRange(min=1),
                 help="Instances of the preprocessing and postprocessing models (default: 1 with --device cpu, "
                      "else 4): each detokenizes streamed responses in a process of its own.")
@generate_option("chat_template", default=None, type=click.Path(dir_okay=False, path_type=Path),
                 help="Chat template (.jinja, or a chat_template.json) to serve instead of the checkpoint's; "
                      "without either, chat requests to the OpenAI API are refused.")
@generate_option("lora_ckpt", multiple=True, metavar="[ID=]PATH",
              help="LoRA adapter to serve (PEFT dir, NeMo .nemo or NeMo 2 dir); repeat for several. Requests pick one "
                   "with lora_task_id: ID, or the adapter's position (0, 1, ...).")
@generate_option("lora_target_modules", multiple=True, metavar="MODULE",
              help="Modules adapters may touch (attn_qkv attn_q attn_k attn_v attn_dense mlp_h_to_4h mlp_gate "
                   "mlp_4h_to_h); an adapter with others is refused. Default: any.")
@generate_option("max_lora_rank", default=0, show_default=True, type=int,
              help="Largest adapter rank accepted (0: no limit).")
@generate_option("ptuning_nemo_checkpoint", multiple=True, metavar="PATH",
              help="NeMo p-tuning checkpoint (.nemo) or a [n, hidden] table (.safetensors/.npy); repeat for several.")
@generate_option("task_ids", multiple=True, type=int, metavar="ID",
              help="Task id of each --ptuning-nemo-checkpoint, in order (default 0, 1, ...); requests send task_id.")
@generate_option("max_prompt_embedding_table_size", default=0, show_default=True, type=int,
              help="Most virtual tokens over all p-tuning tasks, and most rows of a prompt_embedding_table "
                   "sent with a request (0: tasks unlimited, request tables refused).")
@click.option("--force", is_flag=True,
              help="Replace this model version if --output holds it (or --output if it is not a tritonize repository).")
@generate_option("tensor_parallel_size", type=click.IntRange(min=1), default=1, show_default=True,
                 help="GPUs the model is split over (per pipeline stage): attention heads, MLP and LM head split, one "
                      "process per GPU (trtllm-engine: from the engine if left at 1).")
@generate_option("pipeline_parallel_size", type=click.IntRange(min=1), default=1, show_default=True,
                 help="TensorRT-LLM runtimes only: pipeline stages.")
@generate_option("kv_cache_free_gpu_memory_fraction", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
                 help="Share of the GPU memory free once the weights are loaded that the KV cache takes "
                      "(default 0.9, as TensorRT-LLM's).")
@generate_option("kv_cache_tokens", type=click.IntRange(min=0), default=0, show_default=True,
                 help="KV cache size in tokens, instead of the memory share (0: the share on a GPU; on a CPU "
                      "room for 16 requests of the longest length).")
@generate_option("prefix_cache", default=True, show_default=True,
                 help="Reuse the keys and values of prompt prefixes seen before (whole blocks of 16 tokens).")
@generate_option("quantization", type=click.Choice(QUANTIZATIONS), default="auto", show_default=True,
                 help="torch: FP8 weights. auto: the checkpoint's as they are (FP8 checkpoints run in FP8); fp8: "
                      "the linear layers quantized to FP8 with one scale per output channel, into the repository's "
                      "weights (embedding, norms and LM head stay); none: an FP8 checkpoint dequantized.")
@generate_option("fp8_lm_head", is_flag=True, help="With --quantization fp8: the LM head too (not when tied).")
@generate_option("use_fp8_kv_cache", type=FP8_SWITCH, default="auto", show_default=True,
                 help="FP8 KV cache, twice the tokens per byte (auto: as the checkpoint says). torch and trtllm; "
                      "trtllm-engine: fixed by the checkpoint.")
@generate_option("multi_gpu_mode", type=click.Choice(MULTI_GPU_MODES), default="leader", show_default=True,
                 help="trtllm-engine over several GPUs: one tritonserver per MPI rank (leader) or one that spawns "
                      "its workers (orchestrator).")
@generate_option("opt_num_tokens", type=click.IntRange(min=1), default=None,
                 help="trtllm-engine build: optimal tokens per step.")
@generate_option("no_paged_kv_cache", is_flag=True,
                 help="trtllm-engine build: a contiguous KV cache instead of the paged one.")
@generate_option("disable_remove_input_padding", is_flag=True, help="trtllm-engine build: keep input padding.")
@generate_option("build_workers", type=click.IntRange(min=1), default=1, show_default=True,
                 help="trtllm-engine build: ranks built in parallel (trtllm-build --workers).")
def generate(checkpoint: Path, output: Path, force: bool, **options: Any) -> None:
    """Write a Triton model repository for a checkpoint.

    \b
    A Hugging Face-format directory is read as it is; a .nemo, NeMo 2, Megatron-Bridge or .qnemo / TRT-LLM
    checkpoint is exported first (as `tritonize export` does, into a temporary directory beside --output
    that is removed afterwards).

    \b
    The repository holds NAME (the ensemble: text in, text out, decoupled for streaming),
    NAME_preprocessing, NAME_engine, NAME_postprocessing, NAME_sync (the same interface for
    clients that cannot stream) and tritonize.json (what made it).

    \b
    An existing repository (one with tritonize.json) gains a new model name or a new --model-version
    beside what it holds, which stays untouched; the versions of one model share its config.pbtxt,
    so they need the same options.

    \b
    Example:
      tritonize generate --checkpoint ./tiny-llama --output ./repo --model-name tiny
      tritonize generate --checkpoint ./llama31_8b.nemo --output ./repo --model-name llama
      tritonize generate --checkpoint ./tiny-llama-v2 --output ./repo --model-name tiny --model-version 2
      tritonserver --model-repository ./repo        # or: tritonize serve ./repo
      tritonize generate -c ./tiny-llama -o ./repo --lora-ckpt ./peft-a --lora-ckpt 7=./lora.nemo \\
          --ptuning-nemo-checkpoint ./ptuning.nemo --task-ids 3
      tritonize generate -c ./llama-bf16 -o ./repo --quantization fp8 --use-fp8-kv-cache true
    """
    try:
        result = generate_repository(checkpoint, output, options, force=force,
                                     note=lambda line: click.echo(line, err=True))
    except TritonizeError as e:
        raise click.ClickException(str(e)) from None
    spec, out = result.spec, result.repository
    click.echo(f"added version {spec.version} of {spec.name} to {out}" if result.added else f"wrote {out}")
    click.echo(f"  models: {spec.name} (ensemble), {spec.name}_preprocessing, {spec.name}_engine, "
               f"{spec.name}_postprocessing, {spec.name}_sync")
    for task, source in spec.lora:
        click.echo(f"  LoRA:   lora_task_id {task} = {source}")
    for task, source in spec.ptuning:
        click.echo(f"  p-tuning: task_id {task} = {source}")
    if spec.tensor_parallel_size > 1 and spec.runtime in ("torch", "auto"):
        where = "processes on the CPU" if spec.device == "cpu" else "one process per GPU"
        click.echo(f"  split:  tensor parallelism {spec.tensor_parallel_size} ({where}, started by {spec.name}_engine)")
    quant = result.quantization
    if quant:
        click.echo(f"  FP8:    weights {quant['weights']} ({quant['origin']}), KV cache {quant['kv_cache']}")
    click.echo(f"  serve:  tritonize serve {out}")
