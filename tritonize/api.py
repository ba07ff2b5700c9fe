"""The Python API of NeMo's export/deploy workflow: `Exporter` (TensorRTLLM) and `Deployment` (DeployPyTriton).

Code written against ``TensorRTLLM(model_dir).export(...)``, ``.forward(...)`` and
``DeployPyTriton(model=..., triton_model_name=...).deploy() / serve() / run() / stop()`` ports by
changing the two class names. The engine is tritonize's torch runtime; what only TensorRT-LLM can
honour (parallelism, p-tuning, LoRA, FP8, TensorRT build switches) is refused by name.

`Exporter.forward` decodes exactly as the served repository does (the prompt's last tokens as the
detokenizer's prefix), so in-process text equals what a client of the deployed model receives.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .generator.deploy import UNSUPPORTED, DeployError, carry_out, plan_deploy, refuse_unsupported
from .generator.spec import RepoSpec

# TensorRTLLM.export / forward arguments that change nothing on the torch runtime: accepted and ignored
# because they only tune TensorRT (plugins, profiles) or name the default behaviour.
_NEUTRAL_EXPORT = {"gpus_per_node", "use_embedding_sharing", "paged_context_fmha", "multiple_profiles",
                   "gpt_attention_plugin", "gemm_plugin", "max_seq_len", "reduce_fusion", "fp8_kvcache_type"}
_EXPORT_ALIASES = {"fp8_quantized": "export_fp8_quantized", "fp8_kvcache": "use_fp8_kv_cache",
                   "paged_kv_cache": "no_paged_kv_cache", "remove_input_padding": "disable_remove_input_padding"}


def _refuse_seed_kwargs(kwargs: dict[str, Any], neutral: set[str], what: str) -> None:
    options: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in neutral:
            continue
        name = _EXPORT_ALIASES.get(key, key)
        if key in ("paged_kv_cache", "remove_input_padding"):  # the seed's positive spelling of a switch
            value = value is False
        elif key in ("fp8_quantized", "fp8_kvcache"):
            value = "auto" if value is None else str(value).lower()
        if name not in UNSUPPORTED:
            raise TypeError(f"{what}() got an unexpected keyword argument {key!r}")
        options[name] = tuple(value) if isinstance(value, list) else value
    refuse_unsupported(options)


class Exporter:
    """An HF-format export directory and, once loaded, the in-process torch engine that runs it."""

    def __init__(self, model_dir: str | Path, *, load_model: bool = True, device: str = "auto",
                 dtype: str = "auto", max_batch_size: int = 8, max_input_len: int = 256,
                 max_output_len: int = 256, max_num_tokens: int | None = None) -> None:
        self.model_dir = Path(model_dir).expanduser().absolute()
        self.device = device
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.max_input_len = max_input_len
        self.max_output_len = max_output_len
        self.max_num_tokens = max_num_tokens
        self.model_type: str | None = None
        self.source: Path | None = None
        self.export_dtype: str | None = None
        self._engine = None
        self._tokenizer = None
        self._end_ids: list[int] = []
        self._lock = threading.Lock()
        if load_model and (self.model_dir / "config.json").is_file():
            self._load()

    def export(self, nemo_checkpoint_path: str | Path, model_type: str | None = None, *,
               delete_existing_files: bool = True, tensor_parallelism_size: int = 1,
               pipeline_parallelism_size: int = 1, max_input_len: int = 256, max_output_len: int = 256,
               max_batch_size: int = 8, max_num_tokens: int | None = None, dtype: str | None = None,
               load_model: bool = True, **seed_options: Any) -> None:
        """Exports a .nemo / NeMo 2 / .qnemo / HF checkpoint into `model_dir` (HF format), then loads it."""
        _refuse_seed_kwargs({"tensor_parallelism_size": tensor_parallelism_size,
                             "pipeline_parallelism_size": pipeline_parallelism_size, **seed_options},
                            _NEUTRAL_EXPORT, "export")
        from .generator.export import export_checkpoint

        self.close()
        export_checkpoint(Path(nemo_checkpoint_path), self.model_dir, model_type=model_type, dtype=dtype,
                          force=delete_existing_files, progress=False)
        self.source = Path(nemo_checkpoint_path).expanduser().resolve()
        self.model_type = model_type
        self.max_input_len, self.max_output_len, self.max_batch_size = max_input_len, max_output_len, max_batch_size
        self.max_num_tokens = max_num_tokens
        self.export_dtype = dtype
        if dtype is not None:
            self.dtype = dtype
        if load_model:
            self._load()

    def _load(self) -> None:
        from .backend.engine import Engine
        from .backend.tokenizer import Tokenizer
        from .generator.checkpoint import inspect_checkpoint

        ckpt = inspect_checkpoint(self.model_dir)  # the same end ids the generated repository uses
        self._end_ids = list(ckpt.end_ids)
        self._tokenizer = Tokenizer(self.model_dir)
        # The served engine's budget: max_num_tokens 0 / None means one whole prompt per step.
        self._engine = Engine(self.model_dir, device=self.device, dtype=self.dtype,
                              max_batch_size=self.max_batch_size,
                              max_seq_len=self.max_input_len + self.max_output_len,
                              max_num_tokens=self.max_num_tokens or self.max_input_len)

    def forward(self, input_texts: Sequence[str], max_output_token: int = 64, top_k: int = 1, top_p: float = 0.0,
                temperature: float = 1.0, stop_words_list: Sequence[str] | None = None,
                bad_words_list: Sequence[str] | None = None, random_seed: int | None = None,
                task_ids: Sequence[str] | None = None, lora_uids: Sequence[str] | None = None,
                prompt_embeddings_table: Any = None, prompt_embeddings_checkpoint_path: str | None = None,
                **_neutral: Any) -> list[str]:
        """Generated text for each prompt (the prompt excluded), as the served model would send it.

        The seed's defaults (top_k 1, top_p 0) are greedy; top_p 0 and top_k 0 mean "off".
        """
        for name, value in (("task_ids", task_ids), ("lora_uids", lora_uids),
                            ("prompt_embeddings_table", prompt_embeddings_table),
                            ("prompt_embeddings_checkpoint_path", prompt_embeddings_checkpoint_path)):
            if value is not None:
                raise DeployError(f"{name} needs the trtllm runtime or adapters support, not available in this build")
        if self._engine is None:
            raise DeployError(f"{self.model_dir} is not loaded: call export(...) first, or point model_dir at an "
                              "exported HF-format directory")
        from .backend.sampling import SamplingParams
        from .backend.tokenizer import STREAM_CONTEXT_TOKENS, detokenize_delta

        if max_output_token < 1 or max_output_token > self.max_output_len:
            raise ValueError(f"max_output_token is {max_output_token}: ask for 1 to {self.max_output_len} tokens")
        prompts = [self._tokenizer.encode(text) for text in input_texts]
        for text, ids in zip(input_texts, prompts):
            if len(ids) > self.max_input_len:
                raise ValueError(f"the prompt {text[:30]!r}... is {len(ids)} tokens, more than max_input_len "
                                 f"{self.max_input_len}: shorten it, or export with a larger max_input_len")
        sampling = SamplingParams(temperature=temperature, top_k=top_k or None, top_p=top_p or None, seed=random_seed)
        encode = self._tokenizer.encode
        stops = [encode(w, add_special_tokens=False) for w in stop_words_list or ()]
        bads = [encode(w, add_special_tokens=False) for w in bad_words_list or ()]
        with self._lock:
            outputs = self._engine.generate(prompts, max_new_tokens=max_output_token, sampling=sampling,
                                            end_ids=self._end_ids, stop_sequences=stops, bad_sequences=bads)
        return [detokenize_delta(self._tokenizer, ids[-STREAM_CONTEXT_TOKENS:], out, True)
                for ids, out in zip(prompts, outputs)]

    def close(self) -> None:
        """Stops the in-process engine's thread and frees its weights."""
        if self._engine is not None:
            self._engine.shutdown()
        self._engine = None


class Deployment:
    """A generated repository for an `Exporter`'s model, served by a stock tritonserver."""

    def __init__(self, model: Exporter | None = None, triton_model_name: str = "model", triton_model_version: int = 1,
                 max_batch_size: int | None = None, http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, address: str = "127.0.0.1",
                 model_repository: str | Path | None = None, checkpoint_path: str | Path | None = None,
                 device: str | None = None, dtype: str | None = None, force: bool = False,
                 tritonserver: str | Path | None = None, startup_timeout: float = 600) -> None:
        self.model = model
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.triton_model_name = triton_model_name
        self.triton_model_version = triton_model_version
        self.max_batch_size = max_batch_size
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.address = address
        self.device = device
        self.dtype = dtype
        self.force = force
        self.tritonserver = tritonserver
        self.startup_timeout = startup_timeout
        self._temporary: Path | None = None
        if model_repository is None:
            self._temporary = Path(tempfile.mkdtemp(prefix="tritonize-deployment-"))
            model_repository = self._temporary / "repo"
        self.model_repository = Path(model_repository).expanduser().absolute()
        self.server = None
        self._deployed = False

    def _spec(self) -> RepoSpec:
        m = self.model
        return RepoSpec(
            name=self.triton_model_name, version=self.triton_model_version,
            max_batch_size=self.max_batch_size or (m.max_batch_size if m else 8),
            max_input_len=m.max_input_len if m else 256, max_output_len=m.max_output_len if m else 256,
            max_num_tokens=(m.max_num_tokens or 0) if m else 0,
            device=self.device or (m.device if m else "auto"), dtype=self.dtype or (m.dtype if m else "auto"),
        )

    def deploy(self) -> Path:
        """Writes the repository (or checks that the one there was made by the same request)."""
        if self.model is None:
            plan = plan_deploy(self.model_repository, self._spec(), source=None)
        else:
            source = self.checkpoint_path or self.model.model_dir
            plan = plan_deploy(self.model_repository, self._spec(), source=source, force=self.force,
                               model_type=None if self.checkpoint_path is None else self.model.model_type,
                               export_dtype=None if self.checkpoint_path is None else self.model.export_dtype)
        out = carry_out(plan)
        self._deployed = True
        return out

    def run(self) -> None:
        """Starts tritonserver in the background and returns once every model is ready."""
        from .generator.server import TritonServer

        if not self._deployed:
            self.deploy()
        self.server = TritonServer(self.model_repository, http_port=self.http_port, grpc_port=self.grpc_port,
                                   metrics_port=self.metrics_port, address=self.address,
                                   tritonserver=self.tritonserver)
        self.server.start(timeout=self.startup_timeout)

    def serve(self) -> None:
        """Runs tritonserver until it exits or the process is interrupted (Ctrl-C), then stops it."""
        self.run()
        try:
            while self.server.wait(timeout=1.0) is None:
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def stop(self) -> None:
        """Stops the server and removes the repository if it was a temporary one."""
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None
