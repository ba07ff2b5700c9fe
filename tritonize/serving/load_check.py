"""`tritonize validate --load`: the static checks, then one request per ensemble through a real server.

The static checks (``repository.validate``) need no server; this is the part that starts one, on free
ports, so a repository that parses but does not load or answer is caught before it reaches a fleet.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import PythonEnvironmentError, QueryError, ServerError
from ..repository.validate import Problem, Report, validate_repository
from .client import GenerateOptions, grpc_generate
from .server import TritonServer, free_ports


def check_repository(repo: str | Path, *, load: bool = False,
                     tritonserver: Path | None = None) -> tuple[Report, list[Problem]]:
    """The static report and every problem found; with ``load``, also the served ones (if the static
    checks passed: a repository with problems is not worth starting)."""
    report = validate_repository(repo)
    problems = list(report.problems)
    if not problems and load:
        problems += load_check(report.repo, sorted(report.models), tritonserver=tritonserver)
    return report, problems


def load_check(repo: str | Path, models: list[str], *, timeout: float = 180.0, **server_options) -> list[Problem]:
    """Starts tritonserver on free ports and sends one short request to each ensemble in ``models``."""
    http_port, grpc_port, metrics_port = free_ports(3)
    server = TritonServer(repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          **server_options)
    problems: list[Problem] = []
    try:
        server.start(timeout=timeout)
    except PythonEnvironmentError as e:  # found before the server started: its own fix
        return [Problem(e.python, e.problem, e.fix)]
    except ServerError as e:
        return [Problem(str(server.log_path or "tritonserver"), f"the server did not load the repository: {e}",
                        "fix what the server names, then run `tritonize validate --load` again")]
    try:
        for name in models:
            try:
                result = grpc_generate(server.grpc_endpoint, name, "Hello", GenerateOptions(max_tokens=2))
            except (QueryError, OSError) as e:
                problems.append(Problem(f"{name}/config.pbtxt", f"a request failed: {e}",
                                        f"read {server.log_path} for the server's side"))
                continue
            if result.num_output_tokens < 1:
                problems.append(Problem(f"{name}/config.pbtxt", "a request generated no tokens",
                                        f"read {server.log_path}"))
    finally:
        server.stop()
    return problems
