"""What the Triton hops cost per token: the same load against the ensemble and against its engine model alone.

A streamed token crosses engine model -> Triton core -> postprocessing model -> Triton core -> client when asked of
the ensemble, and engine model -> Triton core -> client when asked of ``<name>_engine`` directly (token ids in, one
packed tensor out). With a model whose step costs next to nothing (``--shape tiny`` on a GPU) the serving path is
the limit, and the difference between the two is what the postprocessing hop costs. Printed per concurrency:
output tokens/s, TTFT and ITL for both, and for the ensemble with several postprocessing instances.

    python bench/hops.py --device cuda --concurrency 1,64 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_model import SHAPES, write_model  # noqa: E402 - bench/make_model.py, beside this script

from tritonize.repository.build import build_repository  # noqa: E402
from tritonize.repository.spec import RepoSpec  # noqa: E402
from tritonize.runtime.packed import unpack  # noqa: E402
from tritonize.runtime.tokenizer import Tokenizer  # noqa: E402
from tritonize.serving.loadgen import LoadResult, RequestRecord, run_load, synthetic_prompts  # noqa: E402
from tritonize.serving.server import TritonServer, free_ports  # noqa: E402


def _engine_inputs(ids: list[int], output_len: int, end_id: int):  # noqa: ANN202
    import tritonclient.grpc as grpcclient

    def make(name: str, array: np.ndarray, dtype: str):  # noqa: ANN202
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    words = np.array([[[0], [-1]]], dtype=np.int32)
    return [
        make("input_ids", np.array([ids], dtype=np.int32), "INT32"),
        make("input_lengths", np.array([[len(ids)]], dtype=np.int32), "INT32"),
        make("request_output_len", np.array([[output_len]], dtype=np.int32), "INT32"),
        make("end_ids", np.array([[end_id]], dtype=np.int32), "INT32"),
        make("pad_id", np.array([[end_id]], dtype=np.int32), "INT32"),
        make("stop_words_list", words, "INT32"),
        make("bad_words_list", words, "INT32"),
        make("min_tokens", np.array([[output_len]], dtype=np.int32), "INT32"),
        make("stream", np.array([[True]]), "BOOL"),
    ]


async def _engine_load(url: str, model: str, prompts: list[list[int]], output_len: int, concurrency: int,
                       duration: float) -> LoadResult:
    import tritonclient.grpc.aio as aio

    records: list[RequestRecord] = []
    deadline = time.perf_counter() + duration
    start = time.perf_counter()

    async def user(k: int) -> None:
        async with aio.InferenceServerClient(url) as client:
            i = k
            while time.perf_counter() < deadline:
                record = RequestRecord(start=time.perf_counter())
                records.append(record)
                ids = prompts[i % len(prompts)]
                i += concurrency

                async def one(ids: list[int] = ids):  # noqa: ANN202
                    yield {"model_name": model, "inputs": _engine_inputs(ids, output_len, 0),
                           "request_id": uuid.uuid4().hex, "enable_empty_final_response": True}

                async for result, error in client.stream_infer(one()):
                    if error is not None:
                        record.error = str(error)
                        break
                    packed = result.as_numpy("packed")
                    if packed is not None:
                        p = unpack(packed)
                        record.response_times.append(time.perf_counter())
                        record.output_tokens = p.num_output_tokens
                    final = result.get_response().parameters.get("triton_final_response")
                    if final is not None and final.bool_param:
                        break

    await asyncio.gather(*(user(k) for k in range(concurrency)))
    return LoadResult(concurrency, time.perf_counter() - start, records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="HF-format dir (default: a random one of --shape)")
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--concurrency", default="1,64")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--postprocessing-instances", default="1,4", help="instance counts of the tokenizer models")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="tritonize-hops-"))
    model = args.model or write_model(work / "model", SHAPES[args.shape], dtype=_dtype(args.device), tokenizer=None)
    result: dict = {"date": time.strftime("%Y-%m-%d"), "model": str(model), "runs": []}
    for instances in [int(n) for n in args.postprocessing_instances.split(",")]:
        spec = RepoSpec(name="llm", max_batch_size=max(levels), max_input_len=args.input_len + 16,
                        max_output_len=args.output_len, device=args.device, tokenizer_instance_count=instances)
        repo = build_repository(model, work / f"repo{instances}", spec, force=True, progress=False)
        tok_dir = repo / "llm_preprocessing" / "1" / "tokenizer"
        texts = synthetic_prompts(str(tok_dir), args.input_len, count=64)
        ids = [Tokenizer(tok_dir).encode(t) for t in texts]
        http, grpc, metrics = free_ports(3)
        server = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics,
                              log_file=work / f"server{instances}.log", exit_timeout=5)
        server.start(timeout=900)
        url = f"127.0.0.1:{grpc}"
        try:
            run_load(url, "llm", texts, output_len=8, concurrency=max(levels), duration=3.0)  # warm-up
            for c in levels:
                ensemble = run_load(url, "llm", texts, output_len=args.output_len, concurrency=c,
                                    duration=args.duration).summary()
                engine = asyncio.run(_engine_load(url, "llm_engine", ids, args.output_len, c, args.duration)).summary()
                row = {"concurrency": c, "postprocessing_instances": instances, "ensemble": ensemble, "engine": engine,
                       "ensemble_over_engine": (ensemble["output_tokens_per_s"] or 0) / (engine["output_tokens_per_s"] or 1)}
                result["runs"].append(row)
                print(json.dumps({"concurrency": c, "postprocessing_instances": instances,
                                  "ensemble_tok_s": ensemble["output_tokens_per_s"], "engine_tok_s": engine["output_tokens_per_s"],
                                  "ensemble_itl_ms_p50": ensemble["itl_ms_p50"], "engine_itl_ms_p50": engine["itl_ms_p50"],
                                  "ensemble_ttft_ms_p50": ensemble["ttft_ms_p50"], "engine_ttft_ms_p50": engine["ttft_ms_p50"]}),
                      flush=True)
        finally:
            server.stop()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float))


def _dtype(device: str):  # noqa: ANN202
    import torch

    return torch.bfloat16 if device == "cuda" else torch.float32


if __name__ == "__main__":
    main()
