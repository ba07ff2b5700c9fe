"""TensorRT-LLM engines for the ``trtllm-engine`` runtime: find them, or build them with ``trtllm-build``.

The runtime serves engines of TensorRT-LLM <= 1.2.x through its executor. An engine directory (its
config.json holds ``build_config`` and ``pretrained_config``, one ``rank{N}.engine`` per GPU) is used as
it is; a TRT-LLM checkpoint directory (config.json with ``architecture`` and ``mapping``, one
``rank{N}.safetensors`` per GPU, what ``tritonize export --format trtllm-checkpoint`` writes) is built.
The command line is one pure function, ``trtllm_build_command``, so every flag is checked without
TensorRT-LLM; running it is a plain subprocess whose output goes to the terminal.

The tokenizer and the Hugging Face config the ensemble's tokenizer models need come from the export
directory the TRT-LLM directory sits in (``<export>/trtllm_checkpoint``), or that holds it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TrtllmBuildError
from ..export.api import EXPORT_MANIFEST, TRTLLM_DIR

__all__ = [
    "BUILD_INSTALL_HINT",
    "BuildOptions",
    "build_options",
    "TrtllmBuildError",
    "TrtllmSource",
    "engine_world_size",
    "is_engine_dir",
    "is_trtllm_checkpoint",
    "link_tree",
    "prepare_engine",
    "resolve_build",
    "resolve_trtllm_source",
    "run_trtllm_build",
    "shard_embedding",
    "trtllm_build_command",
    "stage_engine",
    "trtllm_engine_params",
]

BUILD_INSTALL_HINT = (
    "pip install --extra-index-url https://pypi.nvidia.com 'tensorrt_llm<=1.2' (on a machine with an NVIDIA GPU)"
)
ENGINE_DIR = "engine"  # <name>_engine/<version>/engine in a generated repository
LORA_PLUGIN_DTYPES = ("auto", "float16", "bfloat16", "float32")



@dataclass
class BuildOptions:
    """The engine build options of NeMo's TensorRTLLM.export, as ``trtllm-build`` takes them."""

    max_batch_size: int = 8
    max_input_len: int = 256
    max_output_len: int = 256
    max_num_tokens: int | None = None
    opt_num_tokens: int | None = None
    paged_kv_cache: bool = True
    remove_input_padding: bool = True
    paged_context_fmha: bool = True  # needs the paged KV cache; switched off with it
    lora_plugin: str | None = None  # a dtype, or None for no LoRA
    lora_target_modules: Sequence[str] = ()
    max_lora_rank: int = 64
    lora_dirs: Sequence[Path] = ()
    lora_ckpt_source: str = "hf"
    max_prompt_embedding_table_size: int = 0
    fp8_kv_cache: bool = False  # the checkpoint's KV cache is FP8: FP8 context FMHA on
    fp8_kv_cache_request: str = "auto"  # --use-fp8-kv-cache, checked against the checkpoint by resolve_build
    workers: int = 1
    gemm_plugin: str = "auto"
    gpt_attention_plugin: str = "auto"
    extra: list[str] = field(default_factory=list)

    @property
    def max_seq_len(self) -> int:
        return self.max_input_len + self.max_output_len


def build_options(spec: Any, options: Mapping[str, Any], *, fp8_kv_cache_request: str = "auto") -> BuildOptions:
    """What ``trtllm-build`` gets for ``spec`` and a generate / deploy request's build options (by name)."""
    return BuildOptions(
        max_batch_size=spec.max_batch_size, max_input_len=spec.max_input_len, max_output_len=spec.max_output_len,
        max_num_tokens=spec.max_num_tokens or None, opt_num_tokens=options.get("opt_num_tokens") or None,
        paged_kv_cache=not options.get("no_paged_kv_cache"),
        remove_input_padding=not options.get("disable_remove_input_padding"),
        lora_plugin=options.get("use_lora_plugin") or None, workers=int(options.get("build_workers") or 1),
        fp8_kv_cache_request=fp8_kv_cache_request)


def trtllm_build_command(checkpoint_dir: str | Path, output_dir: str | Path, opts: BuildOptions,
                         executable: str = "trtllm-build") -> list[str]:
    """The ``trtllm-build`` argument list for one checkpoint; raises TrtllmBuildError on a bad combination."""
    if opts.max_batch_size < 1 or opts.max_input_len < 1 or opts.max_output_len < 1:
        raise TrtllmBuildError("--max-batch-size, --max-input-len and --max-output-len must be positive")
    if opts.fp8_kv_cache and not opts.paged_kv_cache:
        raise TrtllmBuildError("an FP8 KV cache needs the paged KV cache: drop --no-paged-kv-cache")
    cmd = [
        executable,
        "--checkpoint_dir", str(checkpoint_dir),
        "--output_dir", str(output_dir),
        "--max_batch_size", str(opts.max_batch_size),
        "--max_input_len", str(opts.max_input_len),
        "--max_seq_len", str(opts.max_seq_len),
        "--max_beam_width", "1",
        "--gemm_plugin", opts.gemm_plugin,
        "--gpt_attention_plugin", opts.gpt_attention_plugin,
        "--kv_cache_type", "paged" if opts.paged_kv_cache else "continuous",
        "--remove_input_padding", "enable" if opts.remove_input_padding else "disable",
        "--use_paged_context_fmha", "enable" if opts.paged_kv_cache and opts.paged_context_fmha else "disable",
    ]
    if opts.max_num_tokens:
        cmd += ["--max_num_tokens", str(opts.max_num_tokens)]
    if opts.opt_num_tokens:
        cmd += ["--opt_num_tokens", str(opts.opt_num_tokens)]
    if opts.lora_plugin:
        if opts.lora_plugin not in LORA_PLUGIN_DTYPES:
            raise TrtllmBuildError(f"--use-lora-plugin {opts.lora_plugin!r} is not one of {', '.join(LORA_PLUGIN_DTYPES)}")
        cmd += ["--lora_plugin", opts.lora_plugin, "--max_lora_rank", str(opts.max_lora_rank)]
        if opts.lora_target_modules:
            cmd += ["--lora_target_modules", *opts.lora_target_modules]
        if opts.lora_dirs:
            cmd += ["--lora_dir", *[str(p) for p in opts.lora_dirs], "--lora_ckpt_source", opts.lora_ckpt_source]
    elif opts.lora_target_modules or opts.lora_dirs:
        raise TrtllmBuildError("--lora-target-modules / --lora-ckpt need --use-lora-plugin (the LoRA plugin dtype)")
    if opts.max_prompt_embedding_table_size:
        cmd += ["--max_prompt_embedding_table_size", str(opts.max_prompt_embedding_table_size)]
    if opts.fp8_kv_cache:
        cmd += ["--use_fp8_context_fmha", "enable"]
    if opts.workers > 1:
        cmd += ["--workers", str(opts.workers)]
    return [*cmd, *opts.extra]


def shard_embedding(checkpoint_dir: str | Path) -> None:
    """Splits the vocabulary embedding of a TRT-LLM checkpoint over its tensor-parallel ranks, in place.

    What TensorRT-LLM's converters do for ``--use_parallel_embedding`` (``embedding_sharding_dim`` 0):
    rank t of the first pipeline stage keeps rows [t * V/tp, (t + 1) * V/tp) of the table, the vocabulary
    zero-padded to a multiple of tp. Each rank file is rewritten beside itself, then renamed over it.
    """
    from safetensors.torch import load_file, save_file

    root = Path(checkpoint_dir)
    config = _config(root)
    if config is None or "mapping" not in config:
        raise TrtllmBuildError(f"{root} is not a TRT-LLM checkpoint: cannot shard its embedding")
    tp, _ = _mapping(config)
    if not config.get("use_parallel_embedding") and tp > 1:
        for tp_rank in range(tp):
            path = root / f"rank{tp_rank}.safetensors"  # pipeline stage 0 holds the embedding
            tensors = load_file(str(path))
            table = tensors.get("transformer.vocab_embedding.weight")
            if table is None:
                raise TrtllmBuildError(f"{path} has no transformer.vocab_embedding.weight to shard")
            rows = -(-table.shape[0] // tp)
            if rows * tp != table.shape[0]:
                import torch

                table = torch.cat([table, table.new_zeros(rows * tp - table.shape[0], table.shape[1])])
            tensors["transformer.vocab_embedding.weight"] = table[tp_rank * rows:(tp_rank + 1) * rows].contiguous()
            staged = path.with_suffix(".tmp")
            save_file(tensors, str(staged), metadata={"format": "pt"})
            os.replace(staged, path)
    config["use_parallel_embedding"] = True
    config["embedding_sharding_dim"] = 0
    staged = root / "config.json.tmp"
    staged.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    os.replace(staged, root / "config.json")


def trtllm_engine_params(spec: Any) -> dict[str, Any]:
    """The engine model's config.pbtxt parameters for the TensorRT-LLM runtimes (none for the others)."""
    if spec.runtime not in ("trtllm", "trtllm-engine"):
        return {}
    params: dict[str, Any] = {
        "tensor_parallel_size": spec.tensor_parallel_size,
        "pipeline_parallel_size": spec.pipeline_parallel_size,
        "kv_cache_dtype": spec.kv_cache_dtype,
        "multi_gpu_mode": spec.multi_gpu_mode,
    }
    if spec.runtime == "trtllm-engine":
        params["engine_dir"] = ENGINE_DIR
    return params


def run_trtllm_build(cmd: Sequence[str], *, echo: Callable[[str], None] = print) -> None:
    """Runs a ``trtllm-build`` command line with its output on this terminal."""
    executable = shutil.which(cmd[0])
    if executable is None:
        raise TrtllmBuildError(f"{cmd[0]} is not on PATH: install TensorRT-LLM with `{BUILD_INSTALL_HINT}`")
    echo("building the TensorRT-LLM engine: " + " ".join(cmd))
    rc = subprocess.run([executable, *cmd[1:]], check=False).returncode
    if rc != 0:
        raise TrtllmBuildError(f"{cmd[0]} exited with code {rc}: its output above says why")


def _config(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_engine_dir(path: str | Path) -> bool:
    """A built engine: config.json with build_config and pretrained_config, and rank*.engine files."""
    path = Path(path)
    config = _config(path) if path.is_dir() else None
    return bool(config and "build_config" in config and "pretrained_config" in config
                and any(path.glob("rank*.engine")))


def is_trtllm_checkpoint(path: str | Path) -> bool:
    """A TRT-LLM checkpoint: config.json with architecture and mapping, and rank*.safetensors files."""
    path = Path(path)
    config = _config(path) if path.is_dir() else None
    return bool(config and "architecture" in config and "mapping" in config
                and any(path.glob("rank*.safetensors")))


def _mapping(config: dict[str, Any]) -> tuple[int, int]:
    mapping = config.get("mapping") or {}
    tp, pp = int(mapping.get("tp_size", 1) or 1), int(mapping.get("pp_size", 1) or 1)
    return tp, pp


def engine_world_size(path: str | Path) -> tuple[int, int]:
    """(tensor parallel, pipeline parallel) of an engine or TRT-LLM checkpoint directory."""
    config = _config(Path(path))
    if config is None:
        raise TrtllmBuildError(f"{path} has no readable config.json: pass a TRT-LLM engine or checkpoint directory")
    return _mapping(config.get("pretrained_config") or config)


@dataclass(frozen=True)
class TrtllmSource:
    hf_dir: Path  # config.json + tokenizer for the ensemble (an export directory)
    trtllm_dir: Path  # an engine or a TRT-LLM checkpoint
    is_engine: bool


def resolve_trtllm_source(path: str | Path) -> TrtllmSource:
    """What ``generate --runtime trtllm-engine --checkpoint PATH`` builds from, and where the tokenizer is."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise TrtllmBuildError(f"--checkpoint {path} is not a directory: pass an export directory written by "
                               "`tritonize export --format trtllm-checkpoint`, or its TRT-LLM checkpoint / engine")
    if is_engine_dir(path) or is_trtllm_checkpoint(path):
        if (path.parent / EXPORT_MANIFEST).is_file():
            return TrtllmSource(path.parent, path, is_engine_dir(path))
        if (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file():
            raise TrtllmBuildError(f"{path} holds no Hugging Face config.json for the tokenizer models: export the "
                                   "source with `tritonize export --format trtllm-checkpoint` and pass that directory")
        raise TrtllmBuildError(f"{path} is not inside a `tritonize export` directory, so there is no tokenizer for it: "
                               "put it (or build it) under the export directory, or pass the export directory")
    trt = path / TRTLLM_DIR
    if (path / EXPORT_MANIFEST).is_file() and (is_trtllm_checkpoint(trt) or is_engine_dir(trt)):
        return TrtllmSource(path, trt, is_engine_dir(trt))
    raise TrtllmBuildError(f"{path} holds no TRT-LLM checkpoint or engine: export it with `tritonize export "
                           f"{path} --output DIR --format trtllm-checkpoint` and pass DIR")


def link_tree(src: Path, dst: Path) -> None:
    """Hard links (copies across file systems) of every file under ``src`` at the same places under ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_dir():
            link_tree(item, dst / item.name)
            continue
        try:
            os.link(item, dst / item.name)
        except OSError:
            shutil.copy2(item, dst / item.name)


def prepare_engine(source: TrtllmSource, dest: Path, opts: BuildOptions, *, parallel: tuple[int, int] | None = None,
                   build: Callable[[Sequence[str]], None] = run_trtllm_build) -> Path:
    """Fills ``dest`` with the engine: linked from an engine directory, or built from a checkpoint."""
    have = engine_world_size(source.trtllm_dir)
    if parallel is not None and tuple(parallel) != have:
        raise TrtllmBuildError(
            f"{source.trtllm_dir} is made for tensor x pipeline parallelism {have[0]} x {have[1]}, not "
            f"{parallel[0]} x {parallel[1]}: export it again with those sizes, or pass matching sizes")
    if source.is_engine:
        link_tree(source.trtllm_dir, dest)
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    build(trtllm_build_command(source.trtllm_dir, dest, opts))
    if not is_engine_dir(dest):
        raise TrtllmBuildError(f"trtllm-build wrote no engine into {dest}: its output above says why")
    return dest


_ALL_LORA_MODULES = ("attn_qkv", "attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h")
_GATED = {"LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "GemmaForCausalLM"}


def resolve_build(opts: BuildOptions, source: TrtllmSource, spec: Any) -> BuildOptions:
    """``opts`` completed from the checkpoint (FP8 KV cache) and the repository's adapters (LoRA, p-tuning)."""
    from .fp8 import detect_fp8_details

    found = detect_fp8_details(source.trtllm_dir)
    request = (opts.fp8_kv_cache_request or "auto").lower()
    if request == "true" and not found.kv_cache:
        raise TrtllmBuildError(
            "--use-fp8-kv-cache true: the TRT-LLM checkpoint's KV cache is not FP8 (quantization.kv_cache_quant_algo); "
            "an engine's KV cache dtype comes from the checkpoint: quantize it with an FP8 KV cache (ModelOpt), or "
            "use --runtime trtllm")
    if request == "false" and found.kv_cache:
        raise TrtllmBuildError(f"--use-fp8-kv-cache false: {found.source} declares an FP8 KV cache, which the build "
                               "cannot turn off: use a checkpoint quantized without it")
    opts.fp8_kv_cache = found.kv_cache and opts.paged_kv_cache
    if getattr(spec, "lora", None) and not opts.lora_plugin:
        config = _config(source.hf_dir) or {}
        arch = (config.get("architectures") or [""])[0]
        opts.lora_plugin = "auto"
        opts.lora_target_modules = list(getattr(spec, "lora_target_modules", None) or
                                        (*_ALL_LORA_MODULES, *(("mlp_gate",) if arch in _GATED else ())))
        opts.max_lora_rank = int(getattr(spec, "max_lora_rank", 0) or opts.max_lora_rank)
    if getattr(spec, "max_prompt_embedding_table_size", 0) and not opts.max_prompt_embedding_table_size:
        # request tables (prompt_embedding_table) need the engine's prompt table too, tasks or not
        opts.max_prompt_embedding_table_size = int(spec.max_prompt_embedding_table_size)
    if getattr(spec, "ptuning", None) and not opts.max_prompt_embedding_table_size:
        size = int(getattr(spec, "max_prompt_embedding_table_size", 0) or 0)
        if not size:
            raise TrtllmBuildError("p-tuning on trtllm-engine needs --max-prompt-embedding-table-size (the engine's "
                                   "prompt table rows for a whole batch)")
        opts.max_prompt_embedding_table_size = size
    return opts


def stage_engine(source: TrtllmSource, spec: Any, work: Path, *, build: BuildOptions | None = None,
                 runner: Callable[[Sequence[str]], None] = run_trtllm_build) -> tuple[Path, tuple[int, int]]:
    """The engine for ``spec`` under ``work`` (linked or built) and its (tensor, pipeline) parallel sizes.

    The sizes come from the engine / checkpoint when none were asked for; sizes that were asked for
    must match it.
    """
    have = engine_world_size(source.trtllm_dir)
    wanted = (spec.tensor_parallel_size, spec.pipeline_parallel_size)
    parallel = None if wanted == (1, 1) else wanted
    opts = resolve_build(build or build_options(spec, {}), source, spec)
    return prepare_engine(source, work / ENGINE_DIR, opts, parallel=parallel, build=runner), have
