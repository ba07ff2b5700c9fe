"""`tritonize deploy`: export (or reuse) + generate + serve, with the options of NeMo's deploy_triton.py.

Every option has tritonize's dashed name and the seed's underscore spelling as an alias, so an
existing deploy_triton.py command line runs unchanged once the script name is replaced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..deploy import deploy as run_deploy
from ..errors import TritonizeError
from ..export.canonical import MODEL_TYPES
from ..repository.spec import DEVICES, RepoSpec
from ..runtime.runtime import MULTI_GPU_MODES, RUNTIMES
from ..serving.serve import ServeOptions

_EPILOG = """\b
Examples:
  tritonize deploy --nemo-checkpoint ./llama.nemo --triton-model-name llama --triton-model-repository ./repo
  python -m tritonize.cli.main deploy --nemo_checkpoint ./llama.nemo --triton_model_name llama
  tritonize deploy --triton-model-repository ./repo --triton-model-name llama      # serve as it is

\b
A repository whose tritonize.json records the same request is served without exporting again; one
made with other options is an error naming the option (--force rebuilds). Options that only the
TensorRT-LLM runtimes honour (parallelism, FP8, TensorRT build switches) are refused by name on the
torch runtime; --runtime trtllm takes parallelism and the FP8 KV cache, --runtime trtllm-engine exports
a TRT-LLM checkpoint for the TP x PP given, builds it with trtllm-build and serves it on TP x PP GPUs:
  tritonize deploy --nemo-checkpoint ./llama.nemo --runtime trtllm-engine --tensor-parallelism-size 2
"""


def _option(dashed: str, *more: str, **kwargs: Any):
    """A click option under its dashed name with the seed's underscore spelling as an alias."""
    names = [f"--{dashed}"]
    underscored = f"--{dashed.replace('-', '_')}"
    if underscored != names[0]:
        names.append(underscored)
    return click.option(*names, *more, dashed.replace("-", "_"), **kwargs)


_FP8 = click.Choice(["auto", "true", "false"], case_sensitive=False)


@click.command("deploy", epilog=_EPILOG)
@_option("nemo-checkpoint", type=click.Path(path_type=Path), default=None,
         help="Source to export: .nemo, NeMo 2 dir, .qnemo / TRT-LLM checkpoint, or HF dir.")
@_option("model-type", type=click.Choice(MODEL_TYPES, case_sensitive=False), default=None,
         help="Override the model type detected from the checkpoint.")
@_option("triton-model-name", default="model", show_default=True, help="Name of the ensemble clients call.")
@_option("triton-model-version", type=click.IntRange(min=1), default=1, show_default=True)
@_option("triton-port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="HTTP port.")
@_option("grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@_option("metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@_option("triton-http-address", default="127.0.0.1", show_default=True,
         help="Address to bind (the seed's default was 0.0.0.0: pass it to serve the network).")
@_option("triton-model-repository", type=click.Path(path_type=Path), default=None,
         help="Repository to write or reuse (default: a temporary one, removed at exit).")
@_option("tensor-parallelism-size", type=click.IntRange(min=1), default=1, show_default=True)
@_option("pipeline-parallelism-size", type=click.IntRange(min=1), default=1, show_default=True)
@_option("dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
         help="Weights and compute dtype (default: the checkpoint's weights, float32 compute on CPU).")
@_option("device", type=click.Choice(DEVICES), default="auto", show_default=True)
@_option("runtime", type=click.Choice(RUNTIMES), default="torch", show_default=True,
         help="Engine runtime: torch, trtllm (tensorrt_llm.LLM), trtllm-engine (trtllm-build + executor), auto.")
@_option("kv-cache-free-gpu-memory-fraction", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
         help="TensorRT-LLM runtimes: share of free GPU memory for the KV cache (default 0.9).")
@_option("multi-gpu-mode", type=click.Choice(MULTI_GPU_MODES), default="leader", show_default=True,
         help="trtllm-engine on several GPUs: mpirun with one tritonserver per rank, or one orchestrator.")
@_option("max-input-len", type=click.IntRange(min=1), default=256, show_default=True)
@_option("max-output-len", type=click.IntRange(min=1), default=256, show_default=True)
@_option("max-batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@_option("max-num-tokens", type=click.IntRange(min=0), default=None, help="Prefill tokens per step.")
@_option("opt-num-tokens", type=int, default=None)
@_option("ptuning-nemo-checkpoint", multiple=True, type=click.Path(path_type=Path))
@_option("task-ids", multiple=True)
@_option("max-prompt-embedding-table-size", type=int, default=None)
@_option("lora-ckpt", multiple=True, type=click.Path(path_type=Path))
@_option("use-lora-plugin", default=None)
@_option("lora-target-modules", multiple=True)
@_option("max-lora-rank", type=int, default=None)
@_option("no-paged-kv-cache", is_flag=True)
@_option("disable-remove-input-padding", is_flag=True)
@_option("use-parallel-embedding", is_flag=True)
@_option("export-fp8-quantized", type=_FP8, default="auto", show_default=True)
@_option("use-fp8-kv-cache", type=_FP8, default="auto", show_default=True)
@click.option("--tritonserver", type=click.Path(path_type=Path), default=None, help="tritonserver binary to run.")
@click.option("--startup-timeout", type=click.FloatRange(min=1), default=600, show_default=True)
@click.option("--force", is_flag=True, help="Rebuild the model version even if the repository holds it.")
@click.option("--dry-run", is_flag=True, help="Print what would be done, and do nothing.")
def deploy(nemo_checkpoint: Path | None, model_type: str | None, triton_model_name: str, triton_model_version: int,
           triton_port: int, grpc_port: int, metrics_port: int, triton_http_address: str,
           triton_model_repository: Path | None, dtype: str | None, device: str, runtime: str,
           kv_cache_free_gpu_memory_fraction: float | None, multi_gpu_mode: str, max_input_len: int,
           max_output_len: int, max_batch_size: int, max_num_tokens: int | None, tritonserver: Path | None,
           startup_timeout: float, force: bool, dry_run: bool, **unsupported: Any) -> None:
    """Export a checkpoint, generate its repository and serve it with tritonserver (NeMo's deploy_triton.py)."""
    spec = RepoSpec(name=triton_model_name, version=triton_model_version, max_batch_size=max_batch_size,
                    max_input_len=max_input_len, max_output_len=max_output_len, max_num_tokens=max_num_tokens or 0,
                    device=device, dtype=dtype or "auto", runtime=runtime,
                    kv_cache_free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction or 0.0,
                    multi_gpu_mode=multi_gpu_mode)
    serve = ServeOptions(http_port=triton_port, grpc_port=grpc_port, metrics_port=metrics_port,
                         address=triton_http_address, tritonserver=tritonserver, startup_timeout=startup_timeout)
    try:
        run_deploy(nemo_checkpoint, triton_model_repository, spec, unsupported, model_type=model_type,
                   export_dtype=dtype, force=force, dry_run=dry_run, serve=serve, say=click.echo,
                   note=lambda line: click.echo(line, err=True))
    except TritonizeError as e:
        raise click.ClickException(str(e)) from None
