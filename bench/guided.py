"""What structured output costs: throughput of --streams streams, --guided of them guided by a JSON schema,
against the same load without guides, on the torch runtime's engine alone, in one run.

Each stream sends a request and, as soon as it finishes, the next (a closed loop). Rounds alternate between
the two loads (plain, guided, plain, guided, ...); a round counts the tokens generated over --duration seconds
once every stream has its first token, and each load's figure is the median of its rounds. Every request
reads --input-len random prompt tokens and writes exactly --output-len tokens: plain ones through min_tokens,
guided ones also because the default schema (an object holding an array of --items objects with a string
pattern, an integer range and an enum each) cannot be complete sooner. So both loads generate the same
tokens, and what differs is the grammar's work: each matcher taking its token, the masks filled on the host
and applied on the device, and the sampling of a step with guided rows waiting for them. The schema is
compiled once (the engine caches grammars by their text) during a warm-up round that is not counted.

--sync-guided runs the guided load the other way the engine could serve it: a step waits for the previous
step's tokens whenever a guided request runs (as requests with multi-token bad words do), so no forward
overlaps the host's work; the figure shows what keeping the overlap is worth on the device at hand.

    python bench/make_model.py --shape tiny --out /tmp/tiny
    python bench/guided.py --model /tmp/tiny --device cpu --json guided-cpu.json
    python bench/guided.py --model /tmp/llama8b --device cuda --dtype bfloat16 --json guided-h100.json
"""

from __future__ import annotations

import json
import queue
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser  # noqa: E402 - bench/common.py, beside this script

from tritonize.runtime.engine import Engine  # noqa: E402
from tritonize.runtime.grammar import Guide  # noqa: E402
from tritonize.runtime.request import GenerationRequest, SamplingParams  # noqa: E402


def schema(items: int) -> dict:
    item = {"type": "object", "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,12}$"},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
        "tag": {"enum": ["alpha", "beta", "gamma"]}}, "required": ["name", "score", "tag"]}
    return {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999999},
        "status": {"enum": ["ok", "failed", "pending"]},
        "items": {"type": "array", "minItems": items, "maxItems": items, "items": item}},
        "required": ["id", "status", "items"]}


class ClosedLoop:
    """``streams`` streams, each sending its next request when the previous one finishes."""

    def __init__(self, engine: Engine, prompts: list[list[int]], output_len: int) -> None:
        self.engine, self.prompts, self.output_len = engine, prompts, output_len
        self.generated = 0  # tokens delivered (written by the engine's thread only)
        self.first = 0  # streams that had a token this round
        self.finished: queue.SimpleQueue = queue.SimpleQueue()
        self.live: dict[int, str] = {}
        self.serial = 0

    def _submit(self, stream: int, guide: Guide | None, tag: str) -> None:
        self.serial += 1
        rid = f"{tag}-{stream}-{self.serial}"
        self.live[stream] = rid
        started = [False]

        def on_output(out) -> None:  # noqa: ANN001 - the engine's thread
            self.generated += len(out.token_ids)
            if out.token_ids and not started[0]:
                started[0] = True
                self.first += 1
            if out.finished:
                self.finished.put((stream, rid, out.finish_reason))

        self.engine.submit(GenerationRequest(
            request_id=rid, prompt_ids=self.prompts[stream], max_new_tokens=self.output_len,
            sampling=SamplingParams(min_tokens=self.output_len), end_ids=[], stream=True, guide=guide,
            on_output=on_output))

    def round(self, guides: list[Guide | None], duration: float, tag: str) -> dict:
        """One round: every stream runs until ``duration`` seconds after all have their first token."""
        self.first, self.live = 0, {}
        reasons: dict[str, int] = {}
        stats = self.engine.stats
        for stream, guide in enumerate(guides):
            self._submit(stream, guide, tag)
        deadline = time.perf_counter() + 600
        while self.first < len(guides) and time.perf_counter() < deadline:
            time.sleep(0.01)
        t0, n0, c0 = time.perf_counter(), self.generated, time.process_time()
        steps0 = stats["decode_steps"] + stats["mixed_steps"]
        times0 = dict(stats["time_s"])
        end = t0 + duration
        while (now := time.perf_counter()) < end:
            try:
                stream, rid, reason = self.finished.get(timeout=max(0.0, end - now))
            except queue.Empty:
                break
            reasons[reason] = reasons.get(reason, 0) + 1
            if self.live.get(stream) == rid:
                self._submit(stream, guides[stream], tag)
        t1, n1, c1 = time.perf_counter(), self.generated, time.process_time()
        steps = stats["decode_steps"] + stats["mixed_steps"] - steps0
        host_ms = {k: 1000 * (v - times0[k]) / max(steps, 1) for k, v in stats["time_s"].items()}
        for rid in list(self.live.values()):
            self.engine.cancel(rid)
        self.live = {}
        while self.engine.num_running or self.engine.num_waiting:
            time.sleep(0.01)
        while not self.finished.empty():
            self.finished.get()
        return {"tok_s": (n1 - n0) / (t1 - t0), "tok_per_cpu_s": (n1 - n0) / max(c1 - c0, 1e-9), "tokens": n1 - n0,
                "seconds": t1 - t0, "cpu_seconds": c1 - c0, "steps": steps,
                "ms_per_step": 1000 * (t1 - t0) / max(steps, 1), "engine_ms_per_step": host_ms,
                "finished": reasons}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--guided", type=int, default=16, help="streams of the guided load that carry the schema")
    ap.add_argument("--items", type=int, default=64, help="array length of the default schema")
    ap.add_argument("--schema", type=Path, default=None, help="a JSON schema file instead of the default")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds counted per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each load")
    ap.add_argument("--max-num-tokens", type=int, default=2048)
    ap.add_argument("--sync-guided", action="store_true",
                    help="also measure the guided load with the engine waiting for every step while a guide runs")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    per_request = args.input_len + args.output_len
    engine = Engine(args.model, device=args.device, dtype=args.dtype, max_batch_size=args.streams,
                    max_seq_len=per_request, max_num_tokens=max(args.max_num_tokens, args.streams),
                    kv_cache_tokens=args.streams * per_request + 16 * args.streams).start()
    text = args.schema.read_text() if args.schema else json.dumps(schema(args.items))
    guide = Guide("json_schema", text)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, engine.vocab_size - 100, (args.streams, args.input_len), generator=g).tolist()
    loads = {"plain": [None] * args.streams,
             "guided": [guide] * args.guided + [None] * (args.streams - args.guided)}
    loop = ClosedLoop(engine, prompts, args.output_len)
    sync_base = engine._needs_sync

    def waiting_for_guides(on: bool) -> None:
        engine._needs_sync = (lambda: sync_base() or any(s.guide is not None for s in engine.scheduler.running)) \
            if on else sync_base

    t = time.perf_counter()
    loop.round(loads["guided"], min(2.0, args.duration), "warm")  # compiles the schema, captures graphs
    warm_s = time.perf_counter() - t
    order = ["plain", "guided"] + (["guided-sync"] if args.sync_guided else [])
    rounds: list[dict] = []
    for k in range(args.rounds):
        for name in order:
            waiting_for_guides(name == "guided-sync")
            row = {"load": name, "round": k, **loop.round(loads["guided" if name != "plain" else "plain"],
                                                            args.duration, f"{name}{k}")}
            rounds.append(row)
            print(json.dumps({k: row[k] for k in ("load", "round", "tok_s", "tok_per_cpu_s", "ms_per_step",
                                                  "engine_ms_per_step")}), flush=True)
    waiting_for_guides(False)
    dev = engine.device
    median = {name: statistics.median(r["tok_s"] for r in rounds if r["load"] == name) for name in order}
    per_cpu = {name: statistics.median(r["tok_per_cpu_s"] for r in rounds if r["load"] == name) for name in order}
    plain = [r for r in rounds if r["load"] == "plain"]
    paired = [statistics.median(r["tok_s"] / plain[r["round"]]["tok_s"] for r in rounds if r["load"] == name)
              for name in ("guided", "guided-sync") if name in order]  # each round against its plain neighbour
    try:
        from importlib.metadata import version

        xgrammar = version("xgrammar")
    except Exception:  # noqa: BLE001
        xgrammar = None
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "xgrammar": xgrammar,
        "model": str(args.model), "streams": args.streams, "guided": args.guided, "input_len": args.input_len,
        "output_len": args.output_len, "duration_s": args.duration, "warmup_s": warm_s,
        "threads": torch.get_num_threads(), "cuda_graphs": bool(engine.runner.graphs), "median_tok_s": median,
        "ratio": median["guided"] / median["plain"],
        "ratio_sync": median["guided-sync"] / median["plain"] if args.sync_guided else None,
        "median_tok_per_cpu_s": per_cpu, "cpu_ratio": per_cpu["guided"] / per_cpu["plain"],
        "paired_ratio": paired[0], "paired_ratio_sync": paired[1] if len(paired) > 1 else None,
        "rounds": rounds, "command": " ".join(sys.argv),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    engine.shutdown()


if __name__ == "__main__":
    main()
