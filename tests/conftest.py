"""Shared fixtures.

`triton_server` starts real tritonservers for end-to-end tests (mark them `@pytest.mark.e2e`):

    def test_generate(triton_server, my_repo):
        server = triton_server(my_repo)            # started, on free ports, ready
        with tritonclient.http.InferenceServerClient(server.http_endpoint) as client:
            ...

Servers are shared across the session per (repository, options), at most a few alive at once, and are
stopped at the end of the session; their logs land in the session's tmp directory (server.log_path).
Close tritonclient clients when done: an open connection delays the server's shutdown.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest

from tritonize.serving.server import TritonServer, free_ports


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, Path):
        return str(value.absolute())
    return value


class ServerPool:
    """Starts TritonServers on free ports and keeps the most recently used ones alive for reuse.

    Each server holds its models in memory (~50 MB + ~46 MB per Python model instance, plus weights),
    so only `max_live` stay up; the least recently used one is stopped to make room.
    """

    def __init__(self, log_dir: Path, *, max_live: int = 2, exit_timeout: int = 10) -> None:
        self.log_dir = log_dir
        self.max_live = max_live
        self.exit_timeout = exit_timeout
        self._servers: OrderedDict[tuple, TritonServer] = OrderedDict()
        self._count = 0

    def __call__(self, repo: str | Path, *, timeout: float = 180, **options: Any) -> TritonServer:
        """A started server for `repo`; `options` are TritonServer keyword arguments (ports excepted)."""
        key = (str(Path(repo).absolute()), _hashable(options))
        server = self._servers.pop(key, None)
        if server is not None and server.is_running:
            self._servers[key] = server
            return server
        if server is not None:
            server.stop()
        while len(self._servers) >= self.max_live:
            _, oldest = self._servers.popitem(last=False)
            oldest.stop()
        http_port, grpc_port, metrics_port = free_ports(3)
        self._count += 1
        options.setdefault("exit_timeout", self.exit_timeout)
        server = TritonServer(
            repo,
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            log_file=self.log_dir / f"{Path(repo).name}-{self._count}.log",
            **options,
        )
        server.start(timeout=timeout)
        self._servers[key] = server
        return server

    def close(self) -> None:
        while self._servers:
            _, server = self._servers.popitem(last=False)
            server.stop()


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real GPT-2 BPE tokenizer cut to the export tests' 300 tokens (read only: shared by all)."""
    from fixtures import BPE_VOCAB, gpt2_bpe_tokenizer_dir

    return gpt2_bpe_tokenizer_dir(tmp_path_factory.mktemp("bpe"), vocab_size=BPE_VOCAB)


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mistral's SentencePiece tokenizer as a tokenizer directory (read only: shared by all)."""
    from fixtures import sentencepiece_tokenizer_dir

    return sentencepiece_tokenizer_dir(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory):
    """Factory: `triton_server(repo, **TritonServer options) -> TritonServer` (started, ready)."""
    pool = ServerPool(tmp_path_factory.mktemp("tritonserver-logs"))
    yield pool
    pool.close()
