"""Checks a generated model repository before it goes into a fleet, without starting a server.

A repository is copied, edited by hand and synced between machines; the checks here catch what breaks
on the way (a config that no longer parses, an ensemble step wired to a tensor that is gone, a weight
file truncated by a copy, limits edited in one config but not the others) and say, per problem, which
file and what to do, so the fix does not need a tritonserver log to find.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tritonize.runtime.config import ModelArgs, UnsupportedModelError
from tritonize.runtime.quantize import read_quantization
from tritonize.runtime.tp import check_split

from .layout import REPOSITORY_MANIFEST, model_folders
from .manifest import hash_tree
from .render import RUNTIME_PACKAGE, RenderError, model_versions, parse_config, read_manifest
from .spec import step_tokens

Config = model_config_pb2.ModelConfig
REGENERATE = "run `tritonize generate` again"
# safetensors dtypes the torch runtime reads: float weights, FP8 (E4M3) linears with float scales, integer tables
RUNTIME_DTYPES = frozenset({"F32", "F16", "BF16", "F8_E4M3", "I64", "I32", "I16", "I8", "U8", "BOOL"})
FP8_SCALES = (".weight_scale", ".weight_scale_inv")


@dataclass(frozen=True)
class Problem:
    file: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}: {self.problem} — {self.fix}"


@dataclass
class Report:
    repo: Path
    problems: list[Problem] = field(default_factory=list)
    models: dict[str, list[str]] = field(default_factory=dict)  # ensemble name -> versions
    adapters: dict[str, dict] = field(default_factory=dict)  # "name/version" -> {"lora": ..., "ptuning": ...}
    configs: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        listed = ", ".join(f"{name} (versions {', '.join(v)})" for name, v in sorted(self.models.items()))
        lines = [f"OK: {self.repo}: {self.configs} configs, {len(self.models)} model(s): {listed or 'none'}"]
        for where, listing in sorted(self.adapters.items()):
            for task, info in listing.get("lora", {}).items():
                lines.append(f"  {where}: LoRA lora_task_id {task}: rank {info.get('rank')}, modules "
                             f"{', '.join(info.get('modules') or [])} (from {info.get('source')})")
            for task, info in listing.get("ptuning", {}).items():
                lines.append(f"  {where}: p-tuning task_id {task}: {info.get('n_virtual')} virtual tokens "
                             f"(from {info.get('source')})")
        return "\n".join(lines)


def _signature(t: model_config_pb2.ModelInput | model_config_pb2.ModelOutput) -> tuple[int, list[int]]:
    return t.data_type, list(t.dims)


def _describe(sig: tuple[int, list[int]]) -> str:
    return f"{model_config_pb2.DataType.Name(sig[0])} {sig[1]}"


def ensemble_problems(folder: str, configs: dict[str, Config]) -> list[Problem]:
    """Each step's inputs come from a client input or an earlier step, with the same type and dims, and
    every ensemble output is produced; ``configs`` maps model folder to its parsed config."""
    ens = configs[folder]
    file = f"{folder}/config.pbtxt"
    problems: list[Problem] = []
    available = {t.name: _signature(t) for t in ens.input}
    for step in ens.ensemble_scheduling.step:
        model = configs.get(step.model_name)
        if model is None:
            problems.append(Problem(file, f"step model {step.model_name!r} is not in the repository",
                                    f"restore {step.model_name}/ or {REGENERATE}"))
            continue
        model_inputs = {t.name: t for t in model.input}
        model_outputs = {t.name: t for t in model.output}
        for key, value in step.input_map.items():
            if key not in model_inputs:
                problems.append(Problem(file, f"step {step.model_name} maps input {key!r}, which it does not have",
                                        f"fix the input_map or {REGENERATE}"))
            elif value not in available:
                problems.append(Problem(file, f"{value!r} feeds {step.model_name} before anything produces it",
                                        f"fix the input_map or {REGENERATE}"))
            elif available[value] != _signature(model_inputs[key]):
                problems.append(Problem(
                    file, f"{value!r} is {_describe(available[value])} but {step.model_name} input {key!r} is "
                          f"{_describe(_signature(model_inputs[key]))}", f"make them agree or {REGENERATE}"))
        required = sorted(n for n, t in model_inputs.items() if not t.optional and n not in step.input_map)
        if required:
            problems.append(Problem(file, f"step {step.model_name} gets no {', '.join(required)}",
                                    f"map them in its input_map or {REGENERATE}"))
        for key, value in step.output_map.items():
            if key not in model_outputs:
                problems.append(Problem(file, f"step {step.model_name} maps output {key!r}, which it does not have",
                                        f"fix the output_map or {REGENERATE}"))
            else:
                available[value] = _signature(model_outputs[key])
    for out in ens.output:
        if out.name not in available:
            problems.append(Problem(file, f"no step produces output {out.name!r}", f"fix the output_map or {REGENERATE}"))
        elif available[out.name] != _signature(out):
            problems.append(Problem(file, f"output {out.name!r} is {_describe(_signature(out))} but its step gives "
                                          f"{_describe(available[out.name])}", f"make them agree or {REGENERATE}"))
    return problems


def _parse_all(repo: Path, report: Report) -> dict[str, Config]:
    configs: dict[str, Config] = {}
    for folder in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        path = folder / "config.pbtxt"
        file = f"{folder.name}/config.pbtxt"
        if not path.is_file():
            report.problems.append(Problem(f"{folder.name}/", "no config.pbtxt",
                                           f"restore it, {REGENERATE}, or move the folder out of the repository"))
            continue
        try:
            config = parse_config(path.read_text(encoding="utf-8"))
        except (text_format.ParseError, UnicodeDecodeError) as e:
            report.problems.append(Problem(file, f"does not parse as Triton's ModelConfig ({e})",
                                           f"fix the syntax or {REGENERATE}"))
            continue
        if config.name and config.name != folder.name:
            report.problems.append(Problem(file, f"names the model {config.name!r} but lives in {folder.name}/",
                                           f"set name: \"{folder.name}\""))
        configs[folder.name] = config
    report.configs = len(configs)
    return configs


def _hash_problems(repo: Path, folder: Path, expected: dict[str, str], what: str) -> list[Problem]:
    rel = folder.relative_to(repo).as_posix()
    if not folder.is_dir():
        return [Problem(f"{rel}/", f"the {what} folder is missing", f"restore it or {REGENERATE}")]
    actual = hash_tree(folder)
    problems = []
    for name, digest in sorted(expected.items()):
        if name not in actual:
            problems.append(Problem(f"{rel}/{name}", f"{what} file is missing", f"restore it or {REGENERATE}"))
        elif actual[name] != digest:
            problems.append(Problem(f"{rel}/{name}", f"sha256 differs from {REPOSITORY_MANIFEST} (changed or truncated)",
                                    f"copy it again from the checkpoint or {REGENERATE}"))
    for name in sorted(set(actual) - set(expected)):
        problems.append(Problem(f"{rel}/{name}", f"not listed in {REPOSITORY_MANIFEST}", f"remove it or {REGENERATE}"))
    return problems


def _safetensors_dtypes(path: Path) -> dict[str, str] | None:
    """Tensor name -> dtype from a safetensors file's header (None: not a readable safetensors file)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 100 << 20:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return None
    return {k: v.get("dtype", "?") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def _weight_dtype_problems(repo: Path, engine_dir: Path, entry: dict) -> list[Problem]:
    """What the torch runtime would refuse in the weights: dtypes it does not read, FP8 weights without their
    scales or without an FP8 quantization_config, and weights that are not what tritonize.json says."""
    rel = engine_dir.relative_to(repo).as_posix()
    dtypes: dict[str, str] = {}
    problems: list[Problem] = []
    for file in sorted(engine_dir.glob("*.safetensors")):
        found = _safetensors_dtypes(file)
        if found is None:
            continue  # a truncated file is reported by the hash check
        for name, dtype in found.items():
            dtypes[name] = dtype
            if dtype not in RUNTIME_DTYPES:
                problems.append(Problem(f"{rel}/{file.name}", f"tensor {name} is {dtype}, which the torch runtime does "
                                        "not read (FP8 weights are F8_E4M3)", f"re-export the checkpoint and {REGENERATE}"))
    fp8 = sorted(n for n, d in dtypes.items() if d == "F8_E4M3")
    for name in fp8:
        prefix = name.removesuffix(".weight")
        if not any(prefix + suffix in dtypes for suffix in FP8_SCALES):
            problems.append(Problem(f"{rel}/", f"FP8 tensor {name} has no {prefix}.weight_scale",
                                    f"re-export the checkpoint and {REGENERATE}"))
    try:
        config = json.loads((engine_dir / "config.json").read_text(encoding="utf-8"))
        extra = engine_dir / "hf_quant_config.json"
        scheme = read_quantization(config, json.loads(extra.read_text(encoding="utf-8")) if extra.is_file() else None)
    except (OSError, ValueError):
        return problems  # a missing or changed config.json is already reported, or the scheme below
    if fp8 and not (scheme and scheme.weights):
        problems.append(Problem(f"{rel}/config.json", f"the weights hold {len(fp8)} FP8 tensors but config.json declares "
                                "no FP8 quantization_config", f"restore config.json or {REGENERATE}"))
    recorded = (entry.get("quantization") or {}).get("weights")
    if recorded == "fp8" and dtypes and not fp8:
        problems.append(Problem(f"{rel}/", f"{REPOSITORY_MANIFEST} records FP8 weights but no tensor is F8_E4M3",
                                f"restore the weights or {REGENERATE}"))
    return problems


def _params(config: Config) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


def _version_problems(repo: Path, name: str, version: str, entry: dict, configs: dict[str, Config]) -> list[Problem]:
    problems: list[Problem] = []
    options = entry.get("options", {})
    hashes = entry.get("hashes", {})
    for folder in model_folders(name):
        vdir = repo / folder / version
        if not vdir.is_dir():
            problems.append(Problem(f"{folder}/{version}/", "version folder is missing", f"restore it or {REGENERATE}"))
            continue
        config = configs.get(folder)
        if config is not None and config.backend == "python" and not (vdir / "model.py").is_file():
            problems.append(Problem(f"{folder}/{version}/model.py", "missing", f"restore it or {REGENERATE}"))
        if folder.endswith(("_preprocessing", "_engine", "_postprocessing")) and not (
            vdir / RUNTIME_PACKAGE / "__init__.py"
        ).is_file():
            problems.append(Problem(f"{folder}/{version}/{RUNTIME_PACKAGE}/", "the runtime package is missing",
                                    REGENERATE))
    engine_dir = repo / f"{name}_engine" / version / "weights"
    problems += _hash_problems(repo, engine_dir, hashes.get("engine", {}), "weights")
    if options.get("runtime", "torch") in ("torch", "auto") and engine_dir.is_dir():
        problems += _weight_dtype_problems(repo, engine_dir, entry)
    adapters_dir = engine_dir.parent / "adapters"
    if "adapters" in hashes or adapters_dir.exists():
        problems += _hash_problems(repo, adapters_dir, hashes.get("adapters", {}), "adapters")
    trtllm_dir = engine_dir.parent / "engine"
    if "trtllm_engine" in hashes or trtllm_dir.exists():
        problems += _hash_problems(repo, trtllm_dir, hashes.get("trtllm_engine", {}), "TensorRT-LLM engine")
    for suffix in ("_preprocessing", "_postprocessing"):
        problems += _hash_problems(repo, repo / f"{name}{suffix}" / version / "tokenizer",
                                   hashes.get("tokenizer", {}), "tokenizer")

    context = int(options.get("max_input_len", 0)) + int(options.get("max_output_len", 0))
    try:
        cfg = json.loads((engine_dir / "config.json").read_text(encoding="utf-8"))
        args = ModelArgs.from_hf_config(cfg)
    except (OSError, ValueError, KeyError, TypeError, UnsupportedModelError):
        args = None  # a missing or changed config.json is already reported by the hash check
    tp = int(options.get("tensor_parallel_size") or 1)
    problem = check_split(args, tp) if args is not None else None
    if problem:
        problems.append(Problem(f"{name}_engine/config.pbtxt", f"tensor parallelism {tp}: {problem}",
                                "generate again with another --tensor-parallelism-size"))
    if args is not None and args.positions == "learned" and context > args.max_position_embeddings:
        problems.append(Problem(
            f"{name}_engine/config.pbtxt", f"max_input_len + max_output_len = {context} exceeds the "
            f"{args.max_position_embeddings} positions the model has learned",
            "generate again with a lower --max-input-len / --max-output-len"))
    return problems


def _limit_problems(name: str, options: dict, configs: dict[str, Config]) -> list[Problem]:
    """The five configs agree on max_batch_size, and the parameters agree with the manifest's options."""
    problems: list[Problem] = []
    present = {f: configs[f] for f in model_folders(name) if f in configs}
    sizes = {f: c.max_batch_size for f, c in present.items()}
    engine = f"{name}_engine"
    want = options.get("max_batch_size", sizes.get(engine))
    for folder, size in sizes.items():
        if size != want:
            problems.append(Problem(f"{folder}/config.pbtxt", f"max_batch_size {size} but {REPOSITORY_MANIFEST} and the "
                                    f"other models of {name!r} have {want}",
                                    f"set max_batch_size: {want} in every model of {name!r} or {REGENERATE}"))
    max_num_tokens = None
    if all(options.get(k) is not None for k in ("max_input_len", "max_batch_size")):
        max_num_tokens = step_tokens(options.get("max_num_tokens") or 0, options["max_input_len"],
                                     options["max_batch_size"], options.get("device") or "auto")
    expected = {
        engine: {"max_batch_size": options.get("max_batch_size"), "max_input_len": options.get("max_input_len"),
                 "max_output_len": options.get("max_output_len"), "max_num_tokens": max_num_tokens,
                 "runtime": options.get("runtime"), "device": options.get("device"), "dtype": options.get("dtype")},
        f"{name}_preprocessing": {"max_input_len": options.get("max_input_len"),
                                  "max_output_len": options.get("max_output_len")},
        f"{name}_sync": {"ensemble_name": name},
    }
    if options.get("runtime") in ("torch", "auto"):  # the torch runtime's ranks (tp.py); absent means 1
        tp = int(options.get("tensor_parallel_size") or 1)
        got = int(_params(present[engine]).get("tensor_parallel_size") or 1) if engine in present else tp
        if got != tp:
            problems.append(Problem(
                f"{engine}/config.pbtxt", f"parameter tensor_parallel_size is {got} but {REPOSITORY_MANIFEST} says {tp}",
                f"set it to \"{tp}\" (or remove it for 1) or {REGENERATE}"))
    if options.get("runtime", "torch") in ("torch", "auto") and engine in present:
        kv = options.get("kv_cache_dtype") or "auto"
        got = _params(present[engine]).get("kv_cache_dtype", "auto")
        if got != kv:
            problems.append(Problem(f"{engine}/config.pbtxt", f"parameter kv_cache_dtype is {got!r} but "
                                    f"{REPOSITORY_MANIFEST} says {kv!r}", f"set it to \"{kv}\" or {REGENERATE}"))
    for folder, values in expected.items():
        if folder not in present:
            continue
        params = _params(present[folder])
        for key, value in values.items():
            if value is None:
                continue
            if params.get(key) != str(value):
                problems.append(Problem(
                    f"{folder}/config.pbtxt", f"parameter {key} is {params.get(key)!r} but {REPOSITORY_MANIFEST} says {value!r}",
                    f"set it to \"{value}\" or {REGENERATE}"))
    return problems


def validate_repository(repo: str | Path) -> Report:
    """Every check that needs no server; the report lists each problem and what the repository serves."""
    root = Path(repo).resolve()
    report = Report(root)
    if not root.is_dir():
        report.problems.append(Problem(str(root), "not a directory", "pass the directory `tritonize generate` wrote"))
        return report
    try:
        manifest = read_manifest(root)
    except RenderError:
        manifest = None
        report.problems.append(Problem(REPOSITORY_MANIFEST, "unreadable, or has no 'models' table", f"restore it or {REGENERATE}"))
    else:
        if manifest is None:
            report.problems.append(Problem(REPOSITORY_MANIFEST, "missing: this is not a tritonize repository",
                                           f"{REGENERATE}, or validate the directory it wrote"))
    configs = _parse_all(root, report)
    for folder, config in configs.items():
        if config.platform == "ensemble":
            report.problems += ensemble_problems(folder, configs)
    for name, entry in (manifest or {}).get("models", {}).items():
        if not (root / name).is_dir():
            report.problems.append(Problem(f"{name}/", f"model {name!r} of {REPOSITORY_MANIFEST} is missing",
                                           f"restore it, or {REGENERATE}"))
            continue
        versions = model_versions(entry)
        report.models[name] = sorted(versions, key=int)
        for version, fields in versions.items():
            report.problems += _version_problems(root, name, version, fields, configs)
            if fields.get("adapters"):
                report.adapters[f"{name}/{version}"] = fields["adapters"]
            report.problems += _limit_problems(name, fields.get("options", {}), configs)
    report.problems = list(dict.fromkeys(report.problems))
    return report
