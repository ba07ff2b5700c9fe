"""`tritonize generate`: a checkpoint directory becomes a model repository."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import TritonizeError
from ..repository.adapters import lora_pairs, ptuning_pairs, split_modules
from ..repository.build import build_repository
from ..repository.spec import DEVICES, DTYPES, RepoSpec, runtime_warning
from ..runtime.runtime import RUNTIMES
from .trtllm_options import apply_trtllm_options, trtllm_generate_options


@click.command()
@click.option("--checkpoint", "-c", required=True, type=click.Path(path_type=Path),
              help="Hugging Face-format directory (config.json, *.safetensors, tokenizer), e.g. from `tritonize export`.")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path),
              help="Model repository to write, or an existing one to add the model or version to.")
@click.option("--model-name", "-n", default="model", show_default=True, help="Name of the ensemble clients call.")
@click.option("--model-version", default=1, show_default=True, type=int, help="Version folder of each model; a new version is added beside the others.")
@click.option("--max-batch-size", default=8, show_default=True, type=int,
              help="Requests decoded together (KV cache slots).")
@click.option("--max-input-len", default=256, show_default=True, type=int, help="Longest prompt, in tokens.")
@click.option("--max-output-len", default=256, show_default=True, type=int, help="Most tokens generated per request.")
@click.option("--max-num-tokens", default=0, show_default=True, type=int,
              help="Prompt tokens prefilled per scheduler step (0: --max-input-len).")
@click.option("--runtime", default="torch", show_default=True, type=click.Choice(RUNTIMES), help="Engine runtime.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(DEVICES),
              help="auto: CUDA when the server has a GPU, else CPU.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPES),
              help="auto: bfloat16 on CUDA, float32 on CPU.")
@click.option("--instance-count", default=1, show_default=True, type=int, help="Engine model instances.")
@click.option("--lora-ckpt", "lora_ckpt", multiple=True, metavar="[ID=]PATH",
              help="LoRA adapter to serve (PEFT dir, NeMo .nemo or NeMo 2 dir); repeat for several. Requests pick one "
                   "with lora_task_id: ID, or the adapter's position (0, 1, ...).")
@click.option("--lora-target-modules", multiple=True, metavar="MODULE",
              help="Modules adapters may touch (attn_qkv attn_q attn_k attn_v attn_dense mlp_h_to_4h mlp_gate "
                   "mlp_4h_to_h); an adapter with others is refused. Default: any.")
@click.option("--max-lora-rank", default=0, show_default=True, type=int,
              help="Largest adapter rank accepted (0: no limit).")
@click.option("--ptuning-nemo-checkpoint", multiple=True, metavar="PATH",
              help="NeMo p-tuning checkpoint (.nemo) or a [n, hidden] table (.safetensors/.npy); repeat for several.")
@click.option("--task-ids", multiple=True, type=int, metavar="ID",
              help="Task id of each --ptuning-nemo-checkpoint, in order (default 0, 1, ...); requests send task_id.")
@click.option("--max-prompt-embedding-table-size", default=0, show_default=True, type=int,
              help="Most virtual tokens over all p-tuning tasks, and most rows of a prompt_embedding_table "
                   "sent with a request (0: tasks unlimited, request tables refused).")
@click.option("--force", is_flag=True,
              help="Replace this model version if --output holds it (or --output if it is not a tritonize repository).")
@trtllm_generate_options
def generate(checkpoint: Path, output: Path, model_name: str, model_version: int, max_batch_size: int,
             max_input_len: int, max_output_len: int, max_num_tokens: int, runtime: str, device: str, dtype: str,
             instance_count: int, lora_ckpt: tuple[str, ...], lora_target_modules: tuple[str, ...],
             max_lora_rank: int, ptuning_nemo_checkpoint: tuple[str, ...], task_ids: tuple[int, ...],
             max_prompt_embedding_table_size: int, force: bool, **trtllm) -> None:
    """Write a Triton model repository for a Hugging Face-format CHECKPOINT.

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
      tritonize generate --checkpoint ./tiny-llama-v2 --output ./repo --model-name tiny --model-version 2
      tritonserver --model-repository ./repo        # or: tritonize serve ./repo
      tritonize generate -c ./tiny-llama -o ./repo --lora-ckpt ./peft-a --lora-ckpt 7=./lora.nemo \\
          --ptuning-nemo-checkpoint ./ptuning.nemo --task-ids 3
    """
    try:
        spec = RepoSpec(
            name=model_name, version=model_version, max_batch_size=max_batch_size, max_input_len=max_input_len,
            max_output_len=max_output_len, max_num_tokens=max_num_tokens, runtime=runtime, device=device,
            dtype=dtype, instance_count=instance_count, lora=lora_pairs(lora_ckpt),
            ptuning=ptuning_pairs(ptuning_nemo_checkpoint, task_ids), max_lora_rank=max_lora_rank,
            lora_target_modules=split_modules(lora_target_modules),
            max_prompt_embedding_table_size=max_prompt_embedding_table_size,
        )
        build = apply_trtllm_options(spec, trtllm)
    except TritonizeError as e:
        raise click.ClickException(str(e)) from None
    warning = runtime_warning(runtime)
    if warning:
        click.echo(warning, err=True)
    existed = (output / "tritonize.json").is_file()
    try:
        out = build_repository(checkpoint, output, spec, force=force, build=build)
    except TritonizeError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"added version {model_version} of {model_name} to {out}" if existed else f"wrote {out}")
    click.echo(f"  models: {model_name} (ensemble), {model_name}_preprocessing, {model_name}_engine, "
               f"{model_name}_postprocessing, {model_name}_sync")
    for task, source in spec.lora:
        click.echo(f"  LoRA:   lora_task_id {task} = {source}")
    for task, source in spec.ptuning:
        click.echo(f"  p-tuning: task_id {task} = {source}")
    click.echo(f"  serve:  tritonize serve {out}")
