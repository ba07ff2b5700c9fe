"""How many tritonserver processes a repository needs, and the command line that starts them.

A TensorRT-LLM engine split over tensor x pipeline parallel GPUs runs one MPI rank per GPU. Two
launches exist, as in tensorrtllm_backend:

* leader mode (``multi_gpu_mode`` "leader", the default): ``mpirun`` starts one tritonserver per rank,
  as tensorrtllm_backend's ``scripts/launch_triton_server.py`` does. Rank 0 serves the whole repository
  on the ports; every other rank loads only the engine model(s) (explicit model control), serves no
  endpoint, and joins rank 0's executor. Each rank has its own Python backend shared-memory prefix.
* orchestrator mode: a single tritonserver with ``TRTLLM_ORCHESTRATOR=1``; the executor in the engine
  model spawns its worker ranks itself (MPI comm spawn of TensorRT-LLM's ``executorWorker``).

The world size is read from the repository (each trtllm-engine ``*_engine`` model's parameters), never
asked again. The ``trtllm`` runtime (LLM API) starts its own ranks from one process: one server for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import LaunchError
from ..runtime.choices import MULTI_GPU_MODES

__all__ = ["LaunchPlan", "mpi_leader_command", "repository_launch"]

ORCHESTRATOR_ENV = {"TRTLLM_ORCHESTRATOR": "1"}
# Flags of the single-server command that only rank 0 may carry: the others serve no endpoint.
_RANK0_ONLY = ("--http-port", "--grpc-port", "--metrics-port", "--http-address", "--grpc-address",
               "--metrics-address", "--model-control-mode", "--load-model", "--log-file",
               "--backend-config=python,shm-region-prefix-name")



@dataclass(frozen=True)
class LaunchPlan:
    world_size: int
    mode: str  # "leader" | "orchestrator"
    engine_models: tuple[str, ...]  # the engine models that need world_size ranks

    @property
    def needs_mpirun(self) -> bool:
        return self.world_size > 1 and self.mode == "leader"

    @property
    def env(self) -> dict[str, str]:
        return dict(ORCHESTRATOR_ENV) if self.world_size > 1 and self.mode == "orchestrator" else {}


def _engine_parameters(config_path: Path) -> dict[str, str]:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        config = text_format.Parse(config_path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
    except (OSError, text_format.ParseError) as e:
        raise LaunchError(f"cannot read {config_path} ({e}): regenerate the repository") from None
    return {key: value.string_value for key, value in config.parameters.items()}


def repository_launch(repo: str | Path) -> LaunchPlan:
    """The launch a repository needs, from the parameters generate wrote into its engine models."""
    sizes: dict[str, tuple[int, str]] = {}
    for config_path in sorted(Path(repo).glob("*_engine/config.pbtxt")):
        params = _engine_parameters(config_path)
        if params.get("runtime") != "trtllm-engine":
            continue  # the torch runtime (tp.py) and the LLM API start their own ranks from one server
        tp = int(params.get("tensor_parallel_size") or 1)
        pp = int(params.get("pipeline_parallel_size") or 1)
        mode = params.get("multi_gpu_mode") or "leader"
        if mode not in MULTI_GPU_MODES:
            raise LaunchError(f"{config_path}: multi_gpu_mode {mode!r} is not one of {', '.join(MULTI_GPU_MODES)}")
        sizes[config_path.parent.name] = (tp * pp, mode)
    multi = {name: size for name, size in sizes.items() if size[0] > 1}
    if not multi:
        return LaunchPlan(1, "leader", ())
    others = sorted(p.parent.name for p in Path(repo).glob("*_engine/config.pbtxt") if p.parent.name not in sizes)
    if len(set(multi.values())) > 1:
        described = ", ".join(f"{name}: {w} GPUs ({m})" for name, (w, m) in sorted(multi.items()))
        raise LaunchError(f"the engine models need different launches ({described}): serve them from separate "
                          "repositories")
    if len(multi) != len(sizes) or others:
        single = ", ".join(sorted(set(sizes) - set(multi)) + others)
        raise LaunchError(f"{single} runs on one GPU but {', '.join(sorted(multi))} on several: serve them from "
                          "separate repositories")
    world, mode = next(iter(multi.values()))
    return LaunchPlan(world, mode, tuple(sorted(multi)))


def _rank0_only(arg: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for flag in _RANK0_ONLY)


def _without_values(args: Sequence[str]) -> list[str]:
    """``args`` without the flags only rank 0 takes (``--flag=value`` and ``--flag value`` forms)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if _rank0_only(arg):
            skip = "=" not in arg  # the value is the next argument
            continue
        out.append(arg)
    return out


def mpi_leader_command(single: Sequence[str], plan: LaunchPlan, shm_prefix: str, mpirun: str = "mpirun") -> list[str]:
    """The ``mpirun`` line for leader mode, from the command one tritonserver would run.

    ``single`` is binary + arguments with no shm-region-prefix-name: each rank gets ``{shm_prefix}r{rank}_``.
    """
    if plan.world_size < 2:
        return list(single)
    binary, args = single[0], list(single[1:])
    cmd = [mpirun, "--allow-run-as-root"]
    for rank in range(plan.world_size):
        if rank:
            cmd.append(":")
        cmd += ["-n", "1", binary]
        if rank == 0:
            cmd += args
        else:
            cmd += _without_values(args)
            cmd += ["--allow-http=false", "--allow-grpc=false", "--allow-metrics=false",
                    "--model-control-mode=explicit", *[f"--load-model={name}" for name in plan.engine_models]]
        cmd.append(f"--backend-config=python,shm-region-prefix-name={shm_prefix}r{rank}_")
    return cmd
