#!/usr/bin/env bash
# Tensor parallelism in the torch runtime, on one host with several GPUs (2 for 8b, 4 for 70b), no network.
# Needs what bench/gpu_suite.sh needs: the Triton kit (.devkit, from shared/tools/devkit.sh), tritonclient's
# Python files in .whl/site and a SentencePiece model in .whl/tokenizer.model.
#   bash bench/tp_bench.sh         # check, then 8b, then 70b, each where the GPUs allow
#   bash bench/tp_bench.sh check   # the split engine's greedy tokens equal one GPU's (float32; NCCL, graphs)
#   bash bench/tp_bench.sh 8b      # Llama-3.1-8B shape, bf16, served: TP 1 then TP 2 at concurrency 1
#   bash bench/tp_bench.sh 70b     # Llama-3.1-70B shape (141 GB written to /tmp), bf16, served: TP 4 at 1 and 64
# Served = generate + tritonserver + perf_analyzer --streaming on the ensemble, 128 prompt / 128 output tokens
# (tritonize's own loader runs beside it). Targets: 8B TP2 / TP1 batch-1 decode >= 1.6; 70B TP4 batch 1
# >= 60 tok/s and 64 streams >= 1,500 tok/s. Every figure lands under $OUT (default /tmp/bench-out).
set -uo pipefail
phase=${1:-all}
out=${OUT:-/tmp/bench-out}; mkdir -p "$out"
# NVLink multicast stays off where it is off, and off where nothing says: it can take a shared host's GPUs down.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
[ -x /tmp/dk/venv/bin/python3 ] && [ -d /tmp/dk/np126 ] || rm -rf /tmp/dk
source .devkit/env.sh
export PYTHONPATH=$PWD/.whl/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nvidia-smi topo -m; date -u +%FT%TZ
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'nccl', torch.cuda.nccl.version())"
  env | grep -E '^(NCCL_|TORCH_SYMM|NVSHMEM_)' | sort; } | tee "$out/tp-env.txt"

check() {
  python3 bench/tp_check.py --device cuda --sizes 2,4 2>&1 | grep -E '^\{|rror' | tee "$out/tp-check.log"
  python3 - "$out/tp-check.log" <<'EOF' || return 1
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
sys.exit(0 if rows and all(r["equal"] == r["prompts"] for r in rows) else 1)
EOF
}

serve() {  # model tp concurrency name
  python3 bench/serve_load.py --model "$1" --device cuda --dtype bfloat16 --tensor-parallelism-size "$2" \
    --concurrency "$3" --input-len 128 --output-len 128 --duration 20 --pa-interval-ms 5000 --prefix-len 0 \
    --workdir "/tmp/tp-$4" --json "$out/$4.json" 2>&1 | grep -E '^\{|ready|rror' | tee "$out/$4.log"
  cp "/tmp/tp-$4/server.log" "$out/$4-server.log" 2>/dev/null
}

run_8b() {
  [ "$gpus" -ge 2 ] || { echo "8b: needs 2 GPUs, this host has $gpus" | tee -a "$out/tp-summary.txt"; return; }
  [ -f /tmp/llama8b/config.json ] || python3 bench/make_model.py --shape llama3-8b --out /tmp/llama8b \
    --tokenizer .whl/tokenizer.model > "$out/make-8b.log" 2>&1
  serve /tmp/llama8b 1 1 tp1-8b
  serve /tmp/llama8b 2 1 tp2-8b
}

run_70b() {
  [ "$gpus" -ge 4 ] || { echo "70b: needs 4 GPUs, this host has $gpus" | tee -a "$out/tp-summary.txt"; return; }
  free=$(df --output=avail -B1G /tmp | tail -1)
  [ -f /tmp/llama70b/config.json ] || [ "$free" -ge 150 ] || { echo "70b: 141 GB of weights need 150 GB free in /tmp, $free GB are" | tee -a "$out/tp-summary.txt"; return; }
  [ -f /tmp/llama70b/config.json ] || python3 bench/make_model.py --shape llama3-70b --out /tmp/llama70b \
    --tokenizer .whl/tokenizer.model > "$out/make-70b.log" 2>&1
  serve /tmp/llama70b 4 1,64 tp4-70b
}

summary() {
  python3 - "$out" <<'EOF' | tee -a "$out/tp-summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def tok_s(name, concurrency):
    """perf_analyzer's output tokens/s at ``concurrency`` (tritonize's loader where perf_analyzer did not run)."""
    path = out / f"{name}.json"
    if not path.is_file():
        return None, None
    rows = [r for r in json.loads(path.read_text())["runs"] if r.get("concurrency") == concurrency
            and r.get("output_tokens_per_s")]
    for tool in ("perf_analyzer", "tritonize-loadgen"):
        for r in rows:
            if r["tool"] == tool:
                return r["output_tokens_per_s"], tool
    return None, None
def verdict(ok):
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")
one, tool1 = tok_s("tp1-8b", 1)
two, tool2 = tok_s("tp2-8b", 1)
ratio = two / one if one and two else None
print(f"8B  TP1 batch 1: {one} tok/s ({tool1}); TP2: {two} tok/s ({tool2}); ratio {ratio} (>= 1.6: "
      f"{verdict(None if ratio is None else ratio >= 1.6)})")
b1, tool = tok_s("tp4-70b", 1)
b64, tool64 = tok_s("tp4-70b", 64)
print(f"70B TP4 batch 1: {b1} tok/s ({tool}; >= 60: {verdict(None if b1 is None else b1 >= 60)}); 64 streams: "
      f"{b64} tok/s ({tool64}; >= 1500: {verdict(None if b64 is None else b64 >= 1500)})")
EOF
}

case $phase in
  check) check ;;
  8b) run_8b; summary ;;
  70b) run_70b; summary ;;
  all) check || { echo "the split engine's tokens differ from one GPU's: see $out/tp-check.log" | tee "$out/tp-summary.txt"; exit 1; }
       run_8b; run_70b; summary ;;
  *) echo "usage: bash bench/tp_bench.sh [check|8b|70b|all]" >&2; exit 2 ;;
esac
