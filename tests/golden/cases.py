"""The repositories the golden test renders, and how a rendered repository is written down to compare.

The same cases were rendered once by tritonize at commit 5f414ff (``python tests/golden/cases.py
--write``, run from a checkout of that commit with this file copied in; see README.md here) and are
rendered again by the code under test; ``snapshot`` turns a repository into small text files so the
two compare file by file. What is left out is what legitimately follows the code rather than the
options: the Python model files and the runtime package copied beside them (their source is
tritonize's own code), and the manifest's creation time, library versions and absolute paths.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
HASHED = "<sha256>"
RUNTIME_PACKAGES = ("tritonize_backend", "tritonize_runtime")

# name -> (the repository it writes into, `generate` arguments); {placeholders} are the inputs below.
# Cases that share a repository run in order: the second adds a version to the first's model.
CASES: dict[str, tuple[str, list[str]]] = {
    "torch": ("torch", ["-c", "{ckpt}", "-n", "tiny", "--max-batch-size", "4", "--max-input-len", "100",
                        "--max-output-len", "50", "--device", "cpu"]),
    "torch-version-2": ("torch", ["-c", "{ckpt}", "-n", "tiny", "--model-version", "2", "--max-batch-size", "4",
                                  "--max-input-len", "100", "--max-output-len", "50", "--device", "cpu"]),
    "adapters": ("adapters", ["-c", "{ckpt}", "-n", "ada", "--max-input-len", "64", "--max-output-len", "16",
                              "--lora-ckpt", "{peft}", "--lora-ckpt", "7={peft}", "--max-lora-rank", "8",
                              "--lora-target-modules", "attn_q attn_v", "--ptuning-nemo-checkpoint", "{table}",
                              "--task-ids", "3", "--max-prompt-embedding-table-size", "16",
                              "--max-num-tokens", "32", "--dtype", "bfloat16"]),
    "trtllm": ("trtllm", ["-c", "{ckpt}", "-n", "big", "--runtime", "trtllm", "--device", "cuda", "--dtype",
                          "bfloat16", "--instance-count", "2", "--tensor-parallelism-size", "2",
                          "--pipeline-parallelism-size", "2", "--kv-cache-free-gpu-memory-fraction", "0.5",
                          "--use-fp8-kv-cache", "true", "--max-num-tokens", "64"]),
    "trtllm-engine": ("trtllm-engine", ["-c", "{engine}", "-n", "eng", "--runtime", "trtllm-engine",
                                        "--max-input-len", "16", "--max-output-len", "8",
                                        "--multi-gpu-mode", "orchestrator",
                                        "--kv-cache-free-gpu-memory-fraction", "0.7"]),
}


def write_peft(out: Path, hidden: int = 64, kv: int = 32, layers: int = 2, rank: int = 4) -> Path:
    """A PEFT LoRA directory on q_proj / v_proj of the demo Llama, with fixed weights."""
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(layers):
        for module, fan_out in (("q_proj", hidden), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=g)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def write_engine_dir(export: Path) -> Path:
    """An engine directory in TensorRT-LLM's documented layout inside ``export`` (generate only links it)."""
    engine = export / "engine"
    engine.mkdir()
    pretrained = json.loads((export / "trtllm_checkpoint" / "config.json").read_text())
    config = {"version": "0.17.0", "pretrained_config": pretrained,
              "build_config": {"max_batch_size": 8, "max_input_len": 16, "max_seq_len": 24}}
    (engine / "config.json").write_text(json.dumps(config, sort_keys=True))
    for rank in range(2):
        (engine / f"rank{rank}.engine").write_bytes(bytes([rank]) * 64)
    return engine


def inputs(work: Path, cli: Callable, write_demo_checkpoint: Callable) -> dict[str, str]:
    from click.testing import CliRunner

    ckpt = write_demo_checkpoint(work / "ckpt")
    table = work / "table.npy"
    np.save(table, np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32))
    export = work / "export"
    result = CliRunner().invoke(cli, ["export", str(ckpt), "--output", str(export), "--format",
                                      "trtllm-checkpoint", "--tensor-parallelism-size", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    return {"ckpt": str(ckpt), "peft": str(write_peft(work / "peft")), "table": str(table),
            "engine": str(write_engine_dir(export))}


def render(work: Path, cli: Callable, write_demo_checkpoint: Callable) -> dict[str, Path]:
    """Runs every case through ``cli``; returns repository name -> path."""
    from click.testing import CliRunner

    values = inputs(work, cli, write_demo_checkpoint)
    repos: dict[str, Path] = {}
    for name, (repo, args) in CASES.items():
        out = work / "repos" / repo
        result = CliRunner().invoke(cli, ["generate", "-o", str(out), *(a.format(**values) for a in args)])
        assert result.exit_code == 0, f"{name}: {result.output}"
        repos[repo] = out
    return repos


def _sha256(path: Path) -> str:
    """Of the bytes; an adapter's description file records its source's absolute path: by name only."""
    data = path.read_bytes()
    if path.name in ("adapter.json", "ptuning.json"):
        meta = json.loads(data)
        meta["source"] = Path(meta["source"]).name
        data = json.dumps(meta, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def _mask_hashes(hashes: dict) -> dict:
    return {kind: {file: HASHED for file in sorted(files)} for kind, files in hashes.items()}


def _mask_entry(entry: dict) -> dict:
    out = dict(entry)
    out["checkpoint"] = {**entry["checkpoint"], "path": Path(entry["checkpoint"]["path"]).name}
    out["hashes"] = _mask_hashes(entry["hashes"])
    options = dict(entry["options"])
    options["lora"] = [[task, Path(path).name] for task, path in options["lora"]]
    options["ptuning"] = [[task, Path(path).name] for task, path in options["ptuning"]]
    out["options"] = options
    if "adapters" in entry:
        out["adapters"] = {kind: {task: {**info, "source": Path(info["source"]).name} for task, info in items.items()}
                           for kind, items in entry["adapters"].items()}
    if "versions" in entry:
        out["versions"] = {v: _mask_entry(e) for v, e in entry["versions"].items()}
    return out


def manifest_text(path: Path) -> str:
    """tritonize.json without what follows the machine and the moment: time, versions, paths, hash values."""
    data = json.loads(path.read_text())
    data["created"] = "<created>"
    data["versions"] = {name: "<version>" for name in data["versions"]}
    data["models"] = {name: _mask_entry(entry) for name, entry in data["models"].items()}
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def snapshot(repo: Path) -> dict[str, str]:
    """Relative file name -> text to compare: every config.pbtxt as it is, the masked manifest, and a
    listing of every other file (sha256 of data files; Python files by name only)."""
    files: dict[str, str] = {}
    listing = []
    for path in sorted(p for p in repo.rglob("*") if p.is_file()):
        rel = path.relative_to(repo)
        if any(part in RUNTIME_PACKAGES for part in rel.parts) or "__pycache__" in rel.parts:
            continue
        if rel.name == "config.pbtxt" and len(rel.parts) == 2:
            files[rel.as_posix()] = path.read_text()
        elif rel.as_posix() == "tritonize.json":
            files[rel.as_posix()] = manifest_text(path)
        elif rel.suffix == ".py":
            listing.append(f"{rel.as_posix()}\n")
        else:
            listing.append(f"{rel.as_posix()} {_sha256(path)}\n")
    packages = sorted({p.parent.relative_to(repo).as_posix() for p in repo.glob("*/*/*/__init__.py")
                       if p.parent.name in RUNTIME_PACKAGES})
    listing += [f"{p.rsplit('/', 1)[0]}/<runtime package>\n" for p in packages]
    files["files.txt"] = "".join(sorted(listing))
    return files


def _load(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="write the expectations under tests/golden/")
    parser.add_argument("--cli", default="tritonize.cli.main:cli")
    parser.add_argument("--demo", default="tritonize.export.demo_model:write_demo_checkpoint")
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    repos = render(args.work, _load(args.cli), _load(args.demo))
    for repo, path in repos.items():
        target = HERE / repo
        if args.write:
            shutil.rmtree(target, ignore_errors=True)
        for rel, text in snapshot(path).items():
            if args.write:
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                (target / rel).write_text(text)
            else:
                sys.stdout.write(f"== {repo}/{rel}\n{text}")


if __name__ == "__main__":
    main()
