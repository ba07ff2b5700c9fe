#!/usr/bin/env bash
# The GPU benchmarks of bench/RESULTS.md, on a machine with PyTorch + CUDA and no network.
# Needs the Triton kit (.devkit, from shared/tools/devkit.sh), tritonclient's Python files in .whl/site
# (and python-rapidjson for Python 3.12 there), and a SentencePiece model in .whl/tokenizer.model.
#   bash bench/gpu_suite.sh engine    # the engine alone (batch 1/16/64/256, prefix reuse, a decode profile),
#                                     # then served through tritonserver: perf_analyzer and tritonize's loader
#                                     # at concurrency 1/16/64/256, served prefix-reuse TTFT, start times
#                                     # (= the phases alone, served and hops, one after the other)
#   bash bench/gpu_suite.sh prefix    # a cached-prefix request against a cold one on the engine alone, profiled
#                                     # (torch.profiler: where each first token's time goes), and with the
#                                     # token buckets before 2026-12-06
#   bash bench/gpu_suite.sh attention # decode at 128- and 2,048-token prompts, batch 1/8/64, with the keys of
#                                     # small steps shared among programs and without (before 2026-12-06)
#   bash bench/gpu_suite.sh closed-loop  # the engine alone holding 16/64/256 requests in flight (replaced as they
#                                     # finish: the served steady state without the server): step budgets 2048 and
#                                     # 512, max batch 256 and 64, requests spread out and in lockstep
#   bash bench/gpu_suite.sh engine-process  # served at concurrency 64 and 256, the engine in the engine model's
#                                     # process, then in its own (TRITONIZE_ENGINE_PROCESS=1): same machine
#   bash bench/gpu_suite.sh baseline  # transformers generate on the same weights (slow: run on its own)
#   bash bench/gpu_suite.sh adapters  # the LoRA / p-tuning tests under CUDA graphs, and mixed-LoRA decode
#   bash bench/gpu_suite.sh openai    # the OpenAI front against gRPC streaming, same server, concurrency 1/64
#                                     # (needs fastapi, uvicorn, httptools and openai in .whl/site too)
#   bash bench/gpu_suite.sh fp8       # FP8 on the GPU: its tests on CUDA, the weight-only kernel's tilings (split-K
#                                     # included: bench/fp8_kernels.py), then FP8 vs bf16 (bench/fp8_bench.py)
#   bash bench/gpu_suite.sh guided    # structured output: 64 streams, 16 guided by a JSON schema, against the
#                                     # same load unguided, on the engine (and with the engine waiting for every
#                                     # step instead); the guided tests under CUDA graphs first
#                                     # (needs xgrammar, apache-tvm-ffi, jsonschema and lark in .whl/site too)
#   bash bench/gpu_suite.sh start     # `tritonize serve` to a first answered request: cold (empty Triton kernel
#                                     # cache), with warm artifacts (`tritonize warmup`), with the host's cache;
#                                     # targets on one H100, 8B shape: cold <= 120 s, warm <= 40 s
# Every figure is written under $OUT (default /tmp/bench-out) with the card's name and the date.
set -uo pipefail
phase=${1:-engine}
out=${OUT:-/tmp/bench-out}; mkdir -p "$out"
[ -x /tmp/dk/venv/bin/python3 ] && [ -d /tmp/dk/np126 ] || rm -rf /tmp/dk
# The tests compare against transformers, which imports under the image's own numpy (2.x) but not under the
# kit's numpy 1.26 that env.sh puts in front for Triton's stubs: they run with the python3 found before it.
test_python=$(command -v python3)
# The tests' and the demo's tokenizer is the SentencePiece model inside mistral-common, which the GPU image lacks: a
# package holding only that file (.whl/tokenizer.model is it) stands in for it, with the version metadata that
# transformers reads when it imports.
if ! python3 -c "import mistral_common" 2> /dev/null && [ -f .whl/tokenizer.model ]; then
  mkdir -p .whl/site/mistral_common/data .whl/site/mistral_common-1.8.5.dist-info
  touch .whl/site/mistral_common/__init__.py
  cp .whl/tokenizer.model .whl/site/mistral_common/data/tokenizer.model.v1
  printf 'Metadata-Version: 2.1\nName: mistral_common\nVersion: 1.8.5\n' \
    > .whl/site/mistral_common-1.8.5.dist-info/METADATA
fi
source .devkit/env.sh
export PYTHONPATH=$PWD/.whl/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; date -u +%FT%TZ;
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  | tee "$out/gpu-$phase.txt"
model=/tmp/llama8b
[ -f $model/config.json ] || python3 bench/make_model.py --shape llama3-8b --out $model \
  --tokenizer .whl/tokenizer.model > "$out/make.log" 2>&1
case $phase in
  engine)
    for p in alone served hops; do bash "$0" $p; done ;;
  alone)
    $test_python -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py \
      "tests/test_engine.py::test_cuda_graph_decode_matches_transformers" 2>&1 | tail -30 | tee "$out/cuda-tests.log"
    python3 bench/engine_bench.py --model $model --batches 1,16,64,256 --closed-loop 16,64,256 --profile-dir "$out" \
      --json "$out/engine.json" 2>&1 | grep -vE "^\s*$|_warn_once|UserWarning" | tee "$out/engine.log" ;;
  served)
    # served: the first start compiles nothing but Triton's kernels; the second reuses ~/.triton
    python3 bench/serve_load.py --model $model --device cuda --dtype bfloat16 --concurrency 1,16,64,256 \
      --duration 12 --pa-interval-ms 4000 --prefix-len 1024 --workdir /tmp/sb --json "$out/serve.json" 2>&1 \
      | grep -E '^\{|ready|rror' | tee "$out/serve.log"
    cp /tmp/sb/server.log "$out/server.log" 2>/dev/null
    tar czf "$out/pa-logs.tgz" -C /tmp/sb $(cd /tmp/sb && ls perf_analyzer_*.log 2>/dev/null) 2>/dev/null ;;
  prefix)
    # a request whose 1,024-token prefix is cached against the same cold, on the engine alone, profiled; then with
    # prompt steps padded to doubling sizes (the CUDA-graph sizes before 2026-12-06)
    for buckets in "" --doubling-token-buckets; do
      python3 bench/engine_bench.py --model $model --batches 1 --prefix-len 1024 --profile-dir "$out/prefix$buckets" \
        $buckets --json "$out/prefix$buckets.json" 2>&1 | grep -E '^\{"(prefix|cold)' | sed "s/^/$buckets /" \
        | tee -a "$out/prefix.log"
    done ;;
  attention)
    # decode with the keys of few tiles shared among programs, and with one program walking each tile's keys (the
    # attention kernel before 2026-12-06): 128- and 2,048-token prompts, batch 1, 8 and 64
    for len in 128 2048; do for s in "" --no-attention-splits; do
      python3 bench/engine_bench.py --model $model --batches 1,8,64 --input-len $len --prefix-len 0 $s \
        --json "$out/attention-$len$s.json" 2>&1 | grep -E '^\{"batch' | sed "s/^/$len $s /" | tee -a "$out/attention.log"
    done; done ;;
  closed-loop)
    # the served steady state without the server: requests spread out (a new prompt every 128/B steps) with max batch
    # 256 at the repository's step budget 2048 and at 512; then max batch 64 alone; then requests in lockstep
    run() { python3 bench/engine_bench.py --model $model --batches "" --prefix-len 0 "$@" 2>&1 \
      | grep closed_loop_conc | sed "s/^/$* /" | tee -a "$out/closed-loop.log"; }
    run --closed-loop 16,64,256 --max-num-tokens 2048
    run --closed-loop 16,64,256 --max-num-tokens 512
    run --closed-loop 64 --max-num-tokens 2048
    run --closed-loop 64,256 --max-num-tokens 2048 --lockstep ;;
  engine-process)
    for on in 0 1; do
      TRITONIZE_ENGINE_PROCESS=$on python3 bench/serve_load.py --model $model --device cuda --dtype bfloat16 \
        --concurrency 64,256 --duration 12 --pa-interval-ms 4000 --prefix-len 0 --workdir /tmp/ep$on \
        --json "$out/serve-engine-process-$on.json" 2>&1 | grep -E '^\{"(conc|tool)' | sed "s/^/process=$on /" \
        | tee -a "$out/engine-process.log"
    done ;;
  hops)
    # what the Triton hops cost per token when the model costs next to nothing
    python3 bench/hops.py --device cuda --concurrency 1,64 --duration 8 --json "$out/hops.json" 2>&1 \
      | grep -E '^\{' | tee "$out/hops.log" ;;
  baseline)
    python3 bench/engine_bench.py --model $model --batches 1 --prefix-len 0 --hf-batch 1,8,32 \
      --json "$out/transformers.json" 2>&1 | tee "$out/transformers.log" ;;
  adapters)
    $test_python -m pytest -q -p no:cacheprovider tests/test_adapters_runtime.py \
      "tests/test_engine.py::test_cuda_graph_decode_matches_transformers" 2>&1 | tail -15 | tee "$out/adapters-tests.log"
    python3 bench/lora_decode.py --model $model --device cuda --dtype bfloat16 \
      --batch ${LORA_BATCH:-1,16,64} --adapters 4 --rank 16 --json "$out/lora.json" 2>&1 | tee "$out/lora.log" ;;
  openai)
    python3 bench/openai_front.py --model $model --device cuda --dtype bfloat16 --concurrency 1,64 \
      --input-len 128 --output-len 128 --duration 15 --rounds 3 --workdir /tmp/ob --json "$out/openai.json" \
      2>&1 | tee "$out/openai.log"
    cp /tmp/ob/server.log "$out/server-openai.log" 2>/dev/null ;;
  guided)
    $test_python -m pytest -q -p no:cacheprovider tests/test_guided.py 2>&1 | tail -3 | tee "$out/guided-tests.log"
    python3 bench/guided.py --model $model --device cuda --dtype bfloat16 --streams 64 --guided 16 \
      --input-len 128 --output-len 128 --duration 15 --rounds 3 --sync-guided --json "$out/guided.json" 2>&1 \
      | grep -vE "^\s*$|_warn_once|UserWarning" | tee "$out/guided.log" ;;
  start)
    # the weights from the page cache, as a restarted replica reads them: read them once first
    cat $model/*.safetensors > /dev/null
    python3 bench/start_time.py --model $model --device cuda --dtype bfloat16 --workdir /tmp/st \
      --json "$out/start.json" 2>&1 | tee "$out/start.log"
    cp /tmp/st/cold.log "$out/server-start-cold.log" 2>/dev/null
    cp /tmp/st/warm.log "$out/server-start-warm.log" 2>/dev/null ;;
  fp8)
    $test_python -m pytest -q -p no:cacheprovider tests/test_fp8_runtime.py tests/test_cuda_kernels.py 2>&1 | tail -15 \
      | tee "$out/fp8-tests.log"
    python3 bench/fp8_kernels.py --json "$out/fp8-kernels.json" 2>&1 | grep -E '^\{' | tee "$out/fp8-kernels.log"
    python3 bench/fp8_bench.py --model $model --out /tmp/fp8 --variants bf16,fp8,fp8-head,fp8-kv 2>&1 | tee "$out/fp8.log"
    mkdir -p "$out/fp8" && cp /tmp/fp8/*.json /tmp/fp8/*.md "$out/fp8/" ;;
  *) echo "usage: bash bench/gpu_suite.sh engine|alone|served|hops|prefix|attention|closed-loop|engine-process|baseline|adapters|openai|fp8|guided|start" >&2; exit 2 ;;
esac
