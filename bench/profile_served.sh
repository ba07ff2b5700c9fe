#!/usr/bin/env bash
# Where the engine model, the engine's own process and the postprocessing model spend their time under load: tritonize's loader at
# one concurrency through the generated repository (8B shape, 128/128), py-spy sampling both Python stubs
# meanwhile. Setup as bench/gpu_suite.sh, plus py-spy's wheel in .whl/.
#   bash bench/profile_served.sh [CONCURRENCY]     # default 64; stacks land in $OUT as py-spy's raw format
set -uo pipefail
c=${1:-64}
out=${OUT:-/tmp/bench-out}; mkdir -p "$out"
source .devkit/env.sh
export PYTHONPATH=$PWD/.whl/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ! command -v py-spy > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/pyspy .whl/py_spy-*.whl && export PATH=/tmp/pyspy/bin:$PATH
fi
model=/tmp/llama8b
[ -f $model/config.json ] || python3 bench/make_model.py --shape llama3-8b --out $model \
  --tokenizer .whl/tokenizer.model > "$out/make.log" 2>&1
python3 bench/serve_load.py --model $model --device cuda --dtype bfloat16 --concurrency "$c" --duration 30 \
  --prefix-len 0 --no-perf-analyzer --workdir /tmp/sp --json "$out/profile-load.json" > "$out/profile-load.log" 2>&1 &
load=$!
until grep -q "server ready" "$out/profile-load.log"; do sleep 1; kill -0 $load 2>/dev/null || break; done
sleep 15  # the loader's warm-up round, then the measured load
# the engine model's stub (requests in, responses out), the engine's own process (on a GPU), postprocessing
for model_name in llm_engine engine_process llm_postprocessing; do
  if [ $model_name = engine_process ]; then pid=$(pgrep -f "tritonize_backend.engine_process" | head -1)
  else pid=$(pgrep -f "triton_python_backend_stub.*/$model_name/" | head -1); fi
  [ -n "$pid" ] && py-spy record --pid "$pid" -d 10 -r 200 --threads --nonblocking --format raw \
    -o "$out/stacks-$model_name-c$c.txt" > "$out/py-spy-$model_name.log" 2>&1 &
done
wait $load
cat "$out/profile-load.log" | grep -E '^\{"concurrency' 
cp /tmp/sp/server.log "$out/server-profile.log" 2>/dev/null
