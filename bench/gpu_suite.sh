#!/usr/bin/env bash
# The GPU benchmarks of bench/RESULTS.md, on a machine with PyTorch + CUDA and no network.
# Needs the Triton kit (.devkit, from shared/tools/devkit.sh) and tritonclient's Python files in .whl/site.
#   bash bench/gpu_suite.sh serve     # generated repository on tritonserver, concurrency 1/16/64
#   bash bench/gpu_suite.sh runtime   # the runtime alone vs roofline, and transformers generate
#   bash bench/gpu_suite.sh fp8       # FP8 on the GPU: its tests on CUDA, then FP8 vs bf16 (bench/fp8_bench.py)
set -uo pipefail
phase=${1:-serve}
out=${OUT:-/tmp/bench-out}; mkdir -p "$out"
source .devkit/env.sh
export PYTHONPATH=$PWD/.whl/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu-$phase.txt"
date -u +%FT%TZ >> "$out/gpu-$phase.txt"
model=/tmp/llama8b
[ -f $model/tokenizer.model ] || python3 bench/make_model.py --shape llama3-8b --out $model --tokenizer .whl/tokenizer.model 2>&1 | tee "$out/make-$phase.log"
case $phase in
  serve)
    python3 bench/serve_load.py --model $model --device cuda --dtype bfloat16 --concurrency 1,16,64 \
      --duration 12 --pa-interval-ms 4000 --workdir /tmp/sb --json "$out/serve.json" 2>&1 | tee "$out/serve.log"
    cp /tmp/sb/server.log "$out/server.log" 2>/dev/null
    tar czf "$out/pa-logs.tgz" -C /tmp/sb $(cd /tmp/sb && ls perf_analyzer_*.log 2>/dev/null) 2>/dev/null ;;
  final)
    python3 bench/engine_bench.py --model $model --batches 1 --prefix-len 0 --hf-batch 1,8,32 \
      --json "$out/transformers.json" 2>&1 | tee "$out/transformers.log"
    python3 bench/serve_load.py --model $model --device cuda --dtype bfloat16 --concurrency 1,64 \
      --duration 10 --pa-interval-ms 4000 --workdir /tmp/sb --json "$out/serve2.json" 2>&1 | tee "$out/serve2.log"
    cp /tmp/sb/server.log "$out/server2.log" 2>/dev/null ;;
  runtime)
    python3 bench/engine_bench.py --model $model --batches 1,16,64,256 --hf-batch 1,8,32 --profile-dir "$out" \
      --json "$out/runtime.json" 2>&1 | tee "$out/runtime.log" ;;
esac
# adapters: the LoRA / p-tuning runtime under CUDA graphs + torch.compile (tests), and what mixed LoRA costs decode.
# Needs .whl/gpu: pytest, peft, accelerate, psutil unpacked (pure Python / abi3) for the GPU box's python.
if [ "$phase" = adapters ]; then
  py=/opt/torch/.venv/bin/python3; [ -x $py ] || py=python3
  PYTHONPATH=$PWD/.whl/gpu:$PWD/.whl/site:$PWD $py -m pytest -q -p no:cacheprovider tests/test_adapters_runtime.py \
    "tests/test_engine.py::test_cuda_graph_decode_matches_eager_and_transformers" 2>&1 | tail -15 | tee "$out/adapters-tests.log"
  PYTHONPATH=$PWD/.whl/gpu:$PWD/.whl/site:$PWD $py bench/lora_decode.py --model $model --device cuda --dtype bfloat16 \
    --batch ${LORA_BATCH:-1,16,64} --adapters 4 --rank 16 ${LORA_FLAGS:-} --json "$out/lora.json" 2>&1 | tee "$out/lora.log"
fi
# fp8: the FP8 tests on CUDA (FP8 GEMMs, the FP8 KV cache in the Triton kernels), then FP8 against bf16 in one run.
if [ "$phase" = fp8 ]; then
  py=/opt/torch/.venv/bin/python3; [ -x $py ] || py=python3
  PYTHONPATH=$PWD/.whl/gpu:$PWD/.whl/site:$PWD $py -m pytest -q -p no:cacheprovider tests/test_fp8_runtime.py \
    tests/test_cuda_kernels.py 2>&1 | tail -15 | tee "$out/fp8-tests.log"
  PYTHONPATH=$PWD/.whl/gpu:$PWD/.whl/site:$PWD $py bench/fp8_bench.py --model $model --out "$out/fp8" 2>&1 \
    | tee "$out/fp8.log"
fi
