"""`tritonize demo`: the whole path on a fresh machine, with nothing to download.

A 2-layer Llama with random weights and Mistral's real SentencePiece tokenizer (shipped in the
mistral-common package) goes through the real steps: checkpoint, repository, a stock tritonserver,
one request over gRPC, then one chat request through the OpenAI API in front of the same server
(the checkpoint carries Mistral's chat template). The answers are fluent nonsense; the path is the one
a real model takes.
"""

from __future__ import annotations

import json
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ..errors import QueryError
from ..export.demo_model import write_demo_checkpoint
from ..repository.build import build_repository
from ..repository.spec import RepoSpec
from .client import GenerateOptions, Result, grpc_generate
from .openai.options import FrontOptions
from .server import TritonServer, free_port


def chat_request(base_url: str, model: str, content: str, max_tokens: int, timeout: float = 120.0) -> dict:
    """One non-streamed chat completion, as any OpenAI client sends it."""
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}
    request = urllib.request.Request(f"{base_url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def run_demo(prompt: str, *, max_tokens: int = 16, workdir: Path | None = None, tritonserver: str | None = None,
             say: Callable[[str], None] = print) -> Result:
    """Builds, generates, serves and asks; ``say`` gets one line per step. The server is always stopped."""
    from .openai.runner import OpenAIFront

    with tempfile.TemporaryDirectory(prefix="tritonize-demo-") as tmp:
        root = workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        say(f"1/5 building a tiny random-weight Llama in {root / 'checkpoint'}")
        write_demo_checkpoint(root / "checkpoint")
        say(f"2/5 generating the model repository {root / 'repo'}")
        spec = RepoSpec(name="demo", max_batch_size=4, max_input_len=128, max_output_len=128, device="cpu")
        repo = build_repository(root / "checkpoint", root / "repo", spec, force=True, progress=False)
        ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
        say("3/5 starting tritonserver and the OpenAI API")
        with TritonServer(repo, tritonserver=tritonserver, **ports) as server, \
                OpenAIFront(server.grpc_endpoint, FrontOptions(port=free_port()), repository=repo) as front:
            say(f"    ready: gRPC 127.0.0.1:{ports['grpc_port']}, HTTP 127.0.0.1:{ports['http_port']}, "
                f"OpenAI {front.url}")
            say(f"4/5 asking over gRPC: {prompt}")
            result = grpc_generate(f"127.0.0.1:{ports['grpc_port']}", "demo", prompt,
                                   GenerateOptions(max_tokens=max_tokens))
            say(f"    answer ({result.num_output_tokens} tokens, {result.elapsed:.2f} s):{result.text}")
            say(f"5/5 the same as a chat, POST {front.url}/chat/completions")
            try:
                chat = chat_request(front.url, "demo", prompt, max_tokens)
            except urllib.error.HTTPError as e:
                raise QueryError(f"the OpenAI API answered {e.code}: {e.read().decode('utf-8', 'replace')}") from None
            except OSError as e:
                raise QueryError(f"the OpenAI API at {front.url} did not answer: {e}") from None
            choice = chat["choices"][0]
            say(f"    assistant ({chat['usage']['completion_tokens']} tokens, finish_reason "
                f"{choice['finish_reason']}): {choice['message']['content']}")
            return result
