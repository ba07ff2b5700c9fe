"""``tritonize export``: the click command (registered by the CLI module)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ExportError
from ..export.api import FORMATS, QUANTIZATIONS, export_checkpoint
from ..export.canonical import MODEL_TYPES

_EPILOG = """\b
Examples:
  tritonize export ./llama31_8b.nemo --output ./engine --dtype bfloat16
  tritonize export ./mixtral-qnemo/ --output ./engine
  tritonize export ./megatron-bridge-run/ --output ./engine --tokenizer ./hf-tokenizer
  tritonize export ./hf-gemma/ --output ./engine --verify
  tritonize export ./llama-bf16/ --output ./llama-fp8 --quantization fp8
  tritonize export ./llama-fp8.qnemo/ --output ./engine          # FP8 stays FP8 (--no-keep-fp8: dequantize)
  tritonize export ./nemo2-ckpt/ --output ./engine --format trtllm-checkpoint \\
      --tensor-parallelism-size 2 --pipeline-parallelism-size 1
"""


@click.command("export", epilog=_EPILOG)
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path),
              help="Directory to write (HF format: config.json, *.safetensors, tokenizer, manifest).")
@click.option("--model-type", type=click.Choice(MODEL_TYPES, case_sensitive=False), default=None,
              help="Override the model type detected from the checkpoint.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Weight dtype of the export (default: the source's).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="hf", show_default=True,
              help="trtllm-checkpoint also writes a TRT-LLM checkpoint into OUTPUT/trtllm_checkpoint.")
@click.option("--tensor-parallelism-size", "tp_size", type=click.IntRange(min=1), default=1, show_default=True,
              help="TRT-LLM checkpoint: tensor-parallel ranks.")
@click.option("--pipeline-parallelism-size", "pp_size", type=click.IntRange(min=1), default=1, show_default=True,
              help="TRT-LLM checkpoint: pipeline stages.")
@click.option("--tokenizer", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Tokenizer directory to use when the checkpoint does not contain one.")
@click.option("--keep-fp8/--no-keep-fp8", "keep_fp8", default=None,
              help="FP8 sources (.qnemo / ModelOpt, HF fp8, compressed-tensors FP8): write the FP8 weights and their "
                   "scales as they are (default where the torch runtime serves them, else dequantized with a note), "
                   "or dequantize them to --dtype.")
@click.option("--quantization", type=click.Choice(QUANTIZATIONS), default=None,
              help="fp8: quantize the decoder's linear layers to FP8 with one scale per output channel (embedding, "
                   "norms and LM head stay in --dtype).")
@click.option("--fp8-lm-head", is_flag=True, help="With --quantization fp8: the LM head too (not when tied).")
@click.option("--verify", is_flag=True, help="Compare the export's logits with the source's and report the difference.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def export(source: Path, output: Path, model_type: str | None, dtype: str | None, fmt: str, tp_size: int,
           pp_size: int, tokenizer: Path | None, keep_fp8: bool | None, quantization: str | None, fp8_lm_head: bool,
           verify: bool, force: bool, quiet: bool) -> None:
    """Export SOURCE (.nemo, NeMo 2 dir, Megatron-Bridge checkpoint or iter_* dir, .qnemo / TRT-LLM checkpoint,
    HF dir) to an HF-format directory."""
    try:
        result = export_checkpoint(source, output, model_type=model_type, dtype=dtype, fmt=fmt, tp_size=tp_size,
                                   pp_size=pp_size, force=force, verify=verify, progress=not quiet,
                                   tokenizer=tokenizer, keep_fp8=keep_fp8, quantization=quantization,
                                   fp8_lm_head=fp8_lm_head)
    except ExportError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"exported {result.source_kind} {result.model_type} -> {result.architecture} "
               f"({result.dtype}, {result.num_parameters / 1e6:.1f}M parameters) in {result.seconds:.1f}s: "
               f"{result.output}")
    if result.tokenizer is None:
        click.echo("warning: the checkpoint holds no tokenizer; add one with --tokenizer DIR before `generate`",
                   err=True)
    quant = result.manifest["output"].get("quantization")
    if quant:
        detail = f", {quant['strategy']} scales, {quant['activations']} activations" if quant.get("strategy") else ""
        click.echo(f"FP8: {quant['weights']} ({quant['origin']}{detail})")
    if result.trtllm_checkpoint:
        click.echo(f"TRT-LLM checkpoint (tp={tp_size}, pp={pp_size}): {result.trtllm_checkpoint}")
    if result.verify:
        v = result.verify
        click.echo(f"verify: largest logit difference {v['max_abs_logit_diff']:.3g} "
                   f"(tolerance {v['tolerance']:.3g}, cosine similarity {v['cosine_similarity']:.5f}, "
                   f"argmax agreement {v['argmax_agreement']}; passed by {v['criterion']})")
