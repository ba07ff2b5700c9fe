"""`tritonize deploy`: export (or reuse) + generate + serve, with the options of NeMo's deploy_triton.py.

Every option has tritonize's dashed name and the underscore spelling of NeMo's deploy_triton.py as an
alias, so an existing deploy_triton.py command line runs unchanged once the script name is replaced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..deploy import deploy as run_deploy
from ..errors import TritonizeError
from ..export.canonical import MODEL_TYPES
from ..repository.spec import DEVICES, QUANTIZATIONS
from ..runtime.choices import MULTI_GPU_MODES, RUNTIMES
from .options import FP8_SWITCH, deploy_option

_EPILOG = """\b
Examples:
  tritonize deploy --nemo-checkpoint ./llama.nemo --triton-model-name llama --triton-model-repository ./repo
  python -m tritonize.cli.main deploy --nemo_checkpoint ./llama.nemo --triton_model_name llama
  tritonize deploy --triton-model-repository ./repo --triton-model-name llama      # serve as it is

\b
A repository whose tritonize.json records the same request is served without exporting again; one
made with other options is an error naming the option (--force rebuilds). The torch runtime splits a
model over GPUs with --tensor-parallelism-size (one process per GPU, started by the engine model), and
serves FP8 weights and an FP8 KV cache itself:
  tritonize deploy --nemo-checkpoint ./llama-70b.nemo --tensor-parallelism-size 4
Options that only the TensorRT-LLM runtimes honour (pipeline parallelism, TensorRT build switches) are
refused by name on the torch runtime; --runtime trtllm takes parallelism and the FP8 KV cache,
--runtime trtllm-engine exports a TRT-LLM checkpoint for the TP x PP given, builds it with trtllm-build
and serves it on TP x PP GPUs:
  tritonize deploy --nemo-checkpoint ./llama.nemo --runtime trtllm-engine --tensor-parallelism-size 2
"""


@click.command("deploy", epilog=_EPILOG)
@deploy_option("source", type=click.Path(path_type=Path), default=None,
         help="Source to export: .nemo, NeMo 2 dir, .qnemo / TRT-LLM checkpoint, or HF dir.")
@deploy_option("model_type", type=click.Choice(MODEL_TYPES, case_sensitive=False), default=None,
         help="Override the model type detected from the checkpoint.")
@deploy_option("name", default="model", show_default=True, help="Name of the ensemble clients call.")
@deploy_option("version", type=click.IntRange(min=1), default=1, show_default=True)
@deploy_option("triton_port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="HTTP port.")
@deploy_option("grpc_port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@deploy_option("metrics_port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@deploy_option("triton_http_address", default="127.0.0.1", show_default=True,
         help="Address to bind (deploy_triton.py's default was 0.0.0.0: pass it to serve the network).")
@deploy_option("triton_model_repository", type=click.Path(path_type=Path), default=None,
         help="Repository to write or reuse (default: a temporary one, removed at exit).")
@deploy_option("tensor_parallel_size", type=click.IntRange(min=1), default=1, show_default=True)
@deploy_option("pipeline_parallel_size", type=click.IntRange(min=1), default=1, show_default=True)
@deploy_option("dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
         help="Weights and compute dtype (default: the checkpoint's weights, float32 compute on CPU).")
@deploy_option("device", type=click.Choice(DEVICES), default="auto", show_default=True)
@deploy_option("runtime", type=click.Choice(RUNTIMES), default="torch", show_default=True,
         help="Engine runtime: torch, trtllm (tensorrt_llm.LLM), trtllm-engine (trtllm-build + executor), auto.")
@deploy_option("kv_cache_free_gpu_memory_fraction", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
         help="Share of the GPU memory free after the weights that the KV cache takes (default 0.9).")
@deploy_option("kv_cache_tokens", type=click.IntRange(min=0), default=None,
         help="KV cache size in tokens, instead of the memory share.")
@deploy_option("prefix_cache", default=None, help="Reuse the KV cache of prompt prefixes seen before (default: on).")
@deploy_option("multi_gpu_mode", type=click.Choice(MULTI_GPU_MODES), default="leader", show_default=True,
         help="trtllm-engine on several GPUs: mpirun with one tritonserver per rank, or one orchestrator.")
@deploy_option("max_input_len", type=click.IntRange(min=1), default=256, show_default=True)
@deploy_option("max_output_len", type=click.IntRange(min=1), default=256, show_default=True)
@deploy_option("max_batch_size", type=click.IntRange(min=1), default=None,
         help="Most requests in one step (default: 8 with --device cpu, else 256).")
@deploy_option("max_num_tokens", type=click.IntRange(min=0), default=None,
         help="Tokens per scheduler step (default: the larger of --max-input-len and --max-batch-size, at least "
              "2048 on a GPU).")
@deploy_option("opt_num_tokens", type=int, default=None)
@deploy_option("ptuning_nemo_checkpoint", multiple=True, type=click.Path(path_type=Path))
@deploy_option("task_ids", multiple=True)
@deploy_option("max_prompt_embedding_table_size", type=int, default=None)
@deploy_option("lora_ckpt", multiple=True, type=click.Path(path_type=Path))
@deploy_option("use_lora_plugin", default=None)
@deploy_option("lora_target_modules", multiple=True)
@deploy_option("max_lora_rank", type=int, default=None)
@deploy_option("no_paged_kv_cache", is_flag=True)
@deploy_option("disable_remove_input_padding", is_flag=True)
@deploy_option("use_parallel_embedding", is_flag=True)
@deploy_option("export_fp8_quantized", type=FP8_SWITCH, default="auto", show_default=True,
               help="FP8 weights (auto: as the checkpoint). torch: true is --quantization fp8, false is none.")
@deploy_option("use_fp8_kv_cache", type=FP8_SWITCH, default="auto", show_default=True,
               help="FP8 KV cache (auto: as the checkpoint says).")
@deploy_option("quantization", type=click.Choice(QUANTIZATIONS), default="auto", show_default=True,
               help="torch: FP8 weights as the checkpoint has them (auto), quantized per channel (fp8), or dequantized "
                    "(none).")
@deploy_option("fp8_lm_head", is_flag=True, help="With --quantization fp8: the LM head too.")
@click.option("--tritonserver", type=click.Path(path_type=Path), default=None, help="tritonserver binary to run.")
@click.option("--startup-timeout", type=click.FloatRange(min=1), default=600, show_default=True)
@click.option("--force", is_flag=True, help="Rebuild the model version even if the repository holds it.")
@click.option("--dry-run", is_flag=True, help="Print what would be done, and do nothing.")
def deploy(tritonserver: Path | None, startup_timeout: float, force: bool, dry_run: bool, **options: Any) -> None:
    """Export a checkpoint, generate its repository and serve it with tritonserver (NeMo's deploy_triton.py)."""
    try:
        run_deploy(options, force=force, dry_run=dry_run, tritonserver=tritonserver, startup_timeout=startup_timeout,
                   say=click.echo, note=lambda line: click.echo(line, err=True))
    except TritonizeError as e:
        raise click.ClickException(str(e)) from None
