"""The Python API of NeMo's export/deploy workflow: `Exporter` (TensorRTLLM) and `Deployment` (DeployPyTriton).

Code written against ``TensorRTLLM(model_dir).export(...)``, ``.forward(...)`` and
``DeployPyTriton(model=..., triton_model_name=...).deploy() / serve() / run() / stop()`` ports by
changing the two class names. The engine is tritonize's torch runtime, split over GPUs with
``tensor_parallelism_size``; what only TensorRT-LLM can honour (pipeline parallelism, TensorRT build
switches) is refused by name. NeMo's ``fp8_quantized`` and ``fp8_kvcache`` are honoured: FP8 weights (an FP8
source kept, a float one quantized per channel; False dequantizes) and an FP8 KV cache (None: as the
checkpoint says).

Adapters follow NeMo's API: LoRA checkpoints in ``Exporter(model_dir, lora_ckpt_list=[...])``, p-tuning
tables through ``add_prompt_table(task_name, path)``, and ``forward(lora_uids=..., task_ids=...)`` per
prompt. They are converted by the same code ``tritonize generate`` uses into ``model_dir/adapters/``
(``lora/<lora_task_id>/``, ``ptuning/<task_id>/``), which the in-process engine serves and which
``Deployment`` passes on to the generated repository.

`Exporter.forward` decodes exactly as the served repository does (the prompt's last tokens as the
detokenizer's prefix), so in-process text equals what a client of the deployed model receives.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .deploy import DeployError, carry_out, plan_deploy
from .errors import OptionError
from .repository.options import (
    LORA_OPTIONS,
    OPTIONS,
    PTUNING_OPTIONS,
    from_api,
    lora_pairs,
    split_modules,
)
from .repository.spec import RepoSpec


def _nemo_export_options(kwargs: dict[str, Any], what: str) -> dict[str, Any]:
    """Refuses by name what NeMo's TensorRTLLM.export was asked that the torch runtime cannot honour; the
    keywords are NeMo's (``repository.options`` maps them), and the ones without effect here are accepted.
    Returns the options by tritonize's names."""
    options: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in LORA_OPTIONS | PTUNING_OPTIONS:  # the deploy script's spellings, not TensorRTLLM's
            raise TypeError(f"{what}() got an unexpected keyword argument {key!r}: give LoRA checkpoints as "
                            "Exporter(model_dir, lora_ckpt_list=[...]) and p-tuning tables with "
                            "add_prompt_table(task_name, path), as NeMo's TensorRTLLM takes them")
        try:
            option = from_api(key, value)
        except KeyError:
            raise TypeError(f"{what}() got an unexpected keyword argument {key!r}") from None
        if option is not None:
            name, converted = option
            row = OPTIONS[name]
            if "torch" not in row.runtimes and not row.is_unset(converted):
                raise OptionError(row.api_refusal(key, value))
            options[name] = tuple(converted) if isinstance(converted, list) else converted
    return options


ADAPTERS_DIR = "adapters"
_RECORD = "exporter.json"  # beside lora/ and ptuning/: what the adapters were made from (the engine ignores it)
_NO_ADAPTER = ("-1", "", "none")


@dataclass
class _Adapters:
    """The adapter request of an export: LoRA sources by position, p-tuning tasks by name, and the limits."""

    lora_ckpt_list: list[str] = field(default_factory=list)
    tasks: dict[str, tuple[int, str]] = field(default_factory=dict)  # task name -> (task_id, source)
    max_lora_rank: int = 0
    lora_target_modules: list[str] = field(default_factory=list)
    max_prompt_embedding_table_size: int = 0

    def lora_pairs(self) -> list[tuple[int, str]]:
        return lora_pairs(self.lora_ckpt_list)

    def ptuning_pairs(self) -> list[tuple[int, str]]:
        return sorted(self.tasks.values())

    def spec_fields(self) -> dict[str, Any]:
        """The RepoSpec fields `tritonize generate` would get for the same adapters."""
        return {"lora": self.lora_pairs(), "ptuning": self.ptuning_pairs(), "max_lora_rank": self.max_lora_rank,
                "lora_target_modules": list(self.lora_target_modules),
                "max_prompt_embedding_table_size": self.max_prompt_embedding_table_size}

    def free_task_id(self) -> int:
        used = {task for task, _ in self.tasks.values()}
        return next(i for i in range(len(used) + 1) if i not in used)


class Exporter:
    """An HF-format export directory and, once loaded, the in-process torch engine that runs it."""

    def __init__(self, model_dir: str | Path, lora_ckpt_list: Sequence[str | Path] | None = None, *,
                 load_model: bool = True, device: str = "auto", dtype: str = "auto", max_batch_size: int = 8,
                 max_input_len: int = 256, max_output_len: int = 256, max_num_tokens: int | None = None) -> None:
        """``lora_ckpt_list``: LoRA checkpoints (PEFT directories, NeMo 1 / NeMo 2 LoRA checkpoints, or
        ``ID=PATH``); ``forward(lora_uids=["0"])`` picks the first. None keeps what ``model_dir`` was
        exported with."""
        self.model_dir = Path(model_dir).expanduser().absolute()
        self.device = device
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.max_input_len = max_input_len
        self.max_output_len = max_output_len
        self.max_num_tokens = max_num_tokens
        self.tensor_parallel_size = 1  # export(tensor_parallelism_size=N): the engine's ranks, and the repository's
        self.model_type: str | None = None
        self.source: Path | None = None
        self.export_dtype: str | None = None
        self.kv_cache_dtype = "auto"  # the torch engine's: fp8_kvcache True "fp8", False "model", None "auto"
        self._engine = None
        self._tokenizer = None
        self._end_ids: list[int] = []
        self._lock = threading.Lock()
        self.adapters = self._read_record()
        if lora_ckpt_list is not None:
            self.lora_ckpt_list = [str(p) for p in lora_ckpt_list]
        if load_model and (self.model_dir / "config.json").is_file():
            if lora_ckpt_list is not None:
                self._write_adapters(self.adapters)
            self._load()

    # -- adapters ------------------------------------------------------------------------------
    @property
    def lora_ckpt_list(self) -> list[str]:
        return list(self.adapters.lora_ckpt_list)

    @lora_ckpt_list.setter
    def lora_ckpt_list(self, paths: Sequence[str | Path]) -> None:
        self.adapters.lora_ckpt_list = [str(p) for p in paths]

    @property
    def task_ids(self) -> dict[str, int]:
        """p-tuning task name -> the ``task_id`` a client of the deployed repository sends."""
        return {name: task for name, (task, _) in self.adapters.tasks.items()}

    def _read_record(self) -> _Adapters:
        path = self.model_dir / ADAPTERS_DIR / _RECORD
        if not path.is_file():
            return _Adapters()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return _Adapters(lora_ckpt_list=[str(p) for p in raw["lora_ckpt_list"]],
                             tasks={str(k): (int(v[0]), str(v[1])) for k, v in raw["tasks"].items()},
                             max_lora_rank=int(raw["max_lora_rank"]),
                             lora_target_modules=[str(m) for m in raw["lora_target_modules"]],
                             max_prompt_embedding_table_size=int(raw["max_prompt_embedding_table_size"]))
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise DeployError(f"{path} is unreadable ({e}): export again, or delete {path.parent}") from None

    def _write_adapters(self, wanted: _Adapters) -> None:
        """Converts ``wanted`` into ``model_dir/adapters`` (replacing what is there) and adopts it.

        Everything is read and checked first (prepare_adapters, as `tritonize generate` does), then written
        beside the old folder and swapped in, so a bad adapter leaves the previous set in place.
        """
        from .repository.adapters import prepare_adapters
        from .repository.checkpoint import inspect_checkpoint

        spec = RepoSpec(name="model", max_input_len=self.max_input_len, **wanted.spec_fields())
        prepared = prepare_adapters(spec, inspect_checkpoint(self.model_dir))
        final = self.model_dir / ADAPTERS_DIR
        work = Path(tempfile.mkdtemp(prefix=f".{ADAPTERS_DIR}.", dir=self.model_dir))
        try:
            prepared.write(work, progress=False)
            (work / ADAPTERS_DIR).mkdir(exist_ok=True)
            record = {"lora_ckpt_list": wanted.lora_ckpt_list,
                      "tasks": {name: list(pair) for name, pair in wanted.tasks.items()},
                      "max_lora_rank": wanted.max_lora_rank, "lora_target_modules": wanted.lora_target_modules,
                      "max_prompt_embedding_table_size": wanted.max_prompt_embedding_table_size}
            (work / ADAPTERS_DIR / _RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            if final.exists():
                os.rename(final, work / "old")
            os.rename(work / ADAPTERS_DIR, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self.adapters = wanted

    def add_prompt_table(self, task_name: str, prompt_embeddings_checkpoint_path: str | Path) -> int:
        """Serves a p-tuning table (NeMo p-tuning .nemo, or a [n, hidden] .safetensors / .npy) as ``task_name``.

        Returns its ``task_id`` on the wire: the name itself when it is a number, else the lowest free id.
        The engine is reloaded to take it (its prompt table is built at load time).
        """
        if self._engine is None:
            raise DeployError(f"{self.model_dir} is not loaded: call export(...) before add_prompt_table")
        name = str(task_name)
        if name in self.adapters.tasks:
            raise DeployError(f"task {name!r} is already added: pass a unique task name, or remove_prompt_table "
                              "it first")
        task = int(name) if name.isdigit() else self.adapters.free_task_id()
        taken = [other for other, (t, _) in self.adapters.tasks.items() if t == task]
        if taken:
            raise DeployError(f"task id {task} is already the task {taken[0]!r}: choose another task name")
        source = str(Path(prompt_embeddings_checkpoint_path).expanduser().resolve())
        wanted = replace(self.adapters, tasks={**self.adapters.tasks, name: (task, source)})
        self._write_adapters(wanted)
        self._reload()
        return task

    def remove_prompt_table(self, task_name: str) -> None:
        """Stops serving the p-tuning task ``task_name`` (reloads the engine)."""
        name = str(task_name)
        if name not in self.adapters.tasks:
            raise DeployError(f"no p-tuning task {name!r} (added: {', '.join(self.adapters.tasks) or 'none'})")
        tasks = {k: v for k, v in self.adapters.tasks.items() if k != name}
        self._write_adapters(replace(self.adapters, tasks=tasks))
        self._reload()

    def _reload(self) -> None:
        with self._lock:  # not under a running forward() of another thread
            self.close()
            self._load()

    # -- export and load ---------------------------------------------------------------------
    def export(self, nemo_checkpoint_path: str | Path, model_type: str | None = None, *,
               delete_existing_files: bool = True, tensor_parallelism_size: int = 1,
               pipeline_parallelism_size: int = 1, max_input_len: int = 256, max_output_len: int = 256,
               max_batch_size: int = 8, max_num_tokens: int | None = None, dtype: str | None = None,
               load_model: bool = True, max_prompt_embedding_table_size: int | None = None,
               use_lora_plugin: str | None = None, lora_target_modules: Sequence[str] | None = None,
               max_lora_rank: int | None = None, **nemo_options: Any) -> None:
        """Exports a .nemo / NeMo 2 / .qnemo / HF checkpoint into `model_dir` (HF format), converts the
        ``lora_ckpt_list`` adapters into ``model_dir/adapters``, then loads it.

        ``use_lora_plugin`` is a TensorRT build switch: accepted, the torch runtime needs no plugin.
        ``max_lora_rank`` / ``max_prompt_embedding_table_size`` None mean no limit; ``lora_target_modules``
        (TensorRT-LLM names, e.g. attn_qkv) restricts which modules an adapter may touch.
        """
        del use_lora_plugin
        options = _nemo_export_options({"tensor_parallelism_size": tensor_parallelism_size,
                                        "pipeline_parallelism_size": pipeline_parallelism_size, **nemo_options}, "export")
        fp8_weights = str(options.get("export_fp8_quantized", "auto")).lower()
        quantization = options.get("quantization") or {"true": "fp8", "false": "none"}.get(fp8_weights, "auto")
        if fp8_weights in ("true", "false") and quantization != {"true": "fp8", "false": "none"}[fp8_weights]:
            raise DeployError(f"fp8_quantized={fp8_weights.title()} and quantization={quantization!r} disagree")
        fp8_kv = str(options.get("use_fp8_kv_cache", "auto")).lower()
        from .export import export_checkpoint

        wanted = _Adapters(lora_ckpt_list=self.lora_ckpt_list, max_lora_rank=int(max_lora_rank or 0),
                           lora_target_modules=split_modules(list(lora_target_modules or ())),
                           max_prompt_embedding_table_size=int(max_prompt_embedding_table_size or 0))
        self.close()
        export_checkpoint(Path(nemo_checkpoint_path), self.model_dir, model_type=model_type, dtype=dtype,
                          force=delete_existing_files, progress=False,
                          quantization="fp8" if quantization == "fp8" else None,
                          keep_fp8=False if quantization == "none" else None,
                          fp8_lm_head=bool(options.get("fp8_lm_head")))
        self.kv_cache_dtype = {"true": "fp8", "false": "model"}.get(fp8_kv, "auto")
        self.source = Path(nemo_checkpoint_path).expanduser().resolve()
        self.model_type = model_type
        self.max_input_len, self.max_output_len, self.max_batch_size = max_input_len, max_output_len, max_batch_size
        self.max_num_tokens = max_num_tokens
        self.tensor_parallel_size = int(tensor_parallelism_size)
        self.export_dtype = dtype
        if dtype is not None:
            self.dtype = dtype
        self.adapters = _Adapters()  # the export replaced model_dir: NeMo's prompt tables went with it
        self._write_adapters(wanted)
        if load_model:
            self._load()

    def _load(self) -> None:
        from .repository.checkpoint import inspect_checkpoint
        from .runtime.engine import Engine
        from .runtime.tokenizer import Tokenizer

        ckpt = inspect_checkpoint(self.model_dir)  # the same end ids the generated repository uses
        self._end_ids = list(ckpt.end_ids)
        self._tokenizer = Tokenizer(self.model_dir)
        adapters = self.model_dir / ADAPTERS_DIR
        # The served engine's budget: max_num_tokens 0 / None means one whole prompt (or one row per request) a step.
        self._engine = Engine(self.model_dir, device=self.device, dtype=self.dtype,
                              max_batch_size=self.max_batch_size,
                              max_seq_len=self.max_input_len + self.max_output_len,
                              max_num_tokens=self.max_num_tokens or max(self.max_input_len, self.max_batch_size),
                              adapters_dir=adapters if adapters.is_dir() else None,
                              max_prompt_embedding_table_size=self.adapters.max_prompt_embedding_table_size,
                              tensor_parallel_size=self.tensor_parallel_size, kv_cache_dtype=self.kv_cache_dtype)

    # -- generation ----------------------------------------------------------------------------
    def forward(self, input_texts: Sequence[str], max_output_token: int = 64, top_k: int = 1, top_p: float = 0.0,
                temperature: float = 1.0, stop_words_list: Sequence[str] | None = None,
                bad_words_list: Sequence[str] | None = None, random_seed: int | None = None,
                task_ids: Sequence[str | int | None] | None = None,
                lora_uids: Sequence[str | int | None] | None = None,
                prompt_embeddings_table: Any = None, prompt_embeddings_checkpoint_path: str | None = None,
                **_neutral: Any) -> list[str]:
        """Generated text for each prompt (the prompt excluded), as the served model would send it.

        NeMo's defaults (top_k 1, top_p 0) are greedy; top_p 0 and top_k 0 mean "off".
        ``task_ids`` (task names of add_prompt_table, or their numeric ids) and ``lora_uids`` (a LoRA's
        index in lora_ckpt_list, as a string) hold one entry per prompt, or one for all; "-1" or None
        means none for that prompt.
        """
        if self._engine is None:
            raise DeployError(f"{self.model_dir} is not loaded: call export(...) first, or point model_dir at an "
                              "exported HF-format directory")
        from .runtime.prompt import virtual_tokens
        from .runtime.request import EngineError, GenerationRequest, SamplingParams, submit_and_wait
        from .runtime.tokenizer import detokenize_delta, response_ids

        if max_output_token < 1 or max_output_token > self.max_output_len:
            raise ValueError(f"max_output_token is {max_output_token}: ask for 1 to {self.max_output_len} tokens")
        loras = [self._lora_task(uid) for uid in _per_prompt("lora_uids", lora_uids, len(input_texts))]
        tasks = [self._task(t) for t in _per_prompt("task_ids", task_ids, len(input_texts))]
        table = self._call_table(prompt_embeddings_table, prompt_embeddings_checkpoint_path, tasks)
        texts = [self._tokenizer.encode(text) for text in input_texts]
        prompts = []
        for text, ids, task in zip(input_texts, texts, tasks):
            # The preprocessing model's layout: the task's virtual tokens, then the prompt.
            n_virtual = self._engine.adapters.tasks[task][1] if task is not None else 0
            if table is not None:
                n_virtual = len(table)
            prompt = virtual_tokens(self._engine.vocab_size, n_virtual) + ids
            if len(prompt) > self.max_input_len:
                virtual = f" (with its task's {n_virtual} virtual tokens)" if n_virtual else ""
                raise ValueError(f"the prompt {text[:30]!r}... is {len(prompt)} tokens{virtual}, more than "
                                 f"max_input_len {self.max_input_len}: shorten it, or export with a larger "
                                 "max_input_len")
            prompts.append(prompt)
        sampling = SamplingParams(temperature=temperature, top_k=top_k or None, top_p=top_p or None, seed=random_seed)
        encode = self._tokenizer.encode
        stops = [encode(w, add_special_tokens=False) for w in stop_words_list or ()]
        bads = [encode(w, add_special_tokens=False) for w in bad_words_list or ()]
        requests = [GenerationRequest(request_id=f"forward-{secrets.token_hex(8)}-{i}", prompt_ids=prompt,
                                      max_new_tokens=max_output_token, sampling=sampling, end_ids=self._end_ids,
                                      stop_sequences=stops, bad_sequences=bads, lora_task_id=lora, task_id=task,
                                      prompt_table=table)
                     for i, (prompt, lora, task) in enumerate(zip(prompts, loras, tasks))]
        with self._lock:
            outputs = submit_and_wait(self._engine, requests)
        for out in outputs:
            if out.finish_reason == "error":
                raise EngineError(out.error or "generation failed")
        # What the served engine model and detokenizer do with a request that does not stream, the prompt
        # being the real tokens (virtual ids left out)
        texts_out = []
        for ids, out in zip(texts, outputs):
            delta, prefix = response_ids(ids, list(out.token_ids), list(out.token_ids), stream=False,
                                         exclude_input=True)
            texts_out.append(detokenize_delta(self._tokenizer, prefix, delta, True))
        return texts_out

    def _call_table(self, table: Any, path: str | Path | None, tasks: list[int | None]) -> Any:
        """NeMo's per-call prompt table: one [n, hidden] table for every prompt of this forward call."""
        if table is None and path is None:
            return None
        if table is not None and path is not None:
            raise DeployError("give prompt_embeddings_table or prompt_embeddings_checkpoint_path, not both")
        if any(t is not None for t in tasks):
            raise DeployError("give task_ids or a per-call prompt table, not both")
        rows = self.adapters.max_prompt_embedding_table_size
        if not rows:
            raise DeployError("a per-call prompt table needs export(..., max_prompt_embedding_table_size=N): the "
                              "engine reserves N rows per request for it")
        import torch

        from .export.adapters import read_ptuning

        hidden = self._engine.model.args.dim
        tensor = read_ptuning(Path(path), hidden).table if path is not None else torch.as_tensor(table)
        if tensor.dim() == 3 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.dim() != 2 or tensor.shape[1] != hidden or not 0 < tensor.shape[0] <= rows:
            raise DeployError(f"the prompt table has shape {tuple(tensor.shape)}: give [n, {hidden}] with "
                              f"1 <= n <= max_prompt_embedding_table_size ({rows})")
        return tensor.float()

    def _lora_task(self, uid: str | int | None) -> int | None:
        if uid is None or str(uid).strip().lower() in _NO_ADAPTER:
            return None
        served = sorted(self._engine.adapters.lora)
        text = str(uid).strip()
        if not text.isdigit() or int(text) not in served:
            listed = ", ".join(map(str, served)) or "none: pass lora_ckpt_list to Exporter(...)"
            raise DeployError(f"lora_uids has {uid!r}, which is no LoRA adapter of this model (it serves: {listed}); "
                              "use a lora_ckpt_list index as a string, or \"-1\" for none")
        return int(text)

    def _task(self, task: str | int | None) -> int | None:
        if task is None or str(task).strip().lower() in _NO_ADAPTER:
            return None
        name = str(task).strip()
        if name in self.adapters.tasks:
            return self.adapters.tasks[name][0]
        if name.isdigit() and int(name) in self._engine.adapters.tasks:
            return int(name)
        listed = ", ".join(f"{n} (task_id {t})" for n, (t, _) in sorted(self.adapters.tasks.items())) or \
            "none: add one with add_prompt_table(task_name, path)"
        raise DeployError(f"task_ids has {task!r}, which is no p-tuning task of this model (it serves: {listed})")

    def close(self) -> None:
        """Stops the in-process engine's thread and frees its weights."""
        if self._engine is not None:
            self._engine.shutdown()
        self._engine = None


def _per_prompt(name: str, values: Sequence[Any] | None, n: int) -> list[Any]:
    """NeMo's rule: one entry per prompt, or a single entry for all of them."""
    if values is None:
        return [None] * n
    if isinstance(values, (str, int)):
        values = [values]
    values = list(values)
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise DeployError(f"{name} has {len(values)} entries for {n} prompts: give one per prompt, or one for all")
    return values


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
            tensor_parallel_size=m.tensor_parallel_size if m else 1,
            kv_cache_dtype=m.kv_cache_dtype if m else "auto",
            **(m.adapters.spec_fields() if m else {}),
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
        from .serving.server import TritonServer

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
