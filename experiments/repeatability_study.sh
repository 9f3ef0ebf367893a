#!/usr/bin/env bash
# Which timing settings make repeated default benchmarks agree? Three invocations of each setting, interleaved
# in time (A B C A B C ...), then three with one intra-op thread. Prints one line per invocation:
#   name  train_speedup  infer_speedup  train_ips_original  train_ips_decomposed  duration_s
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RUNS=${RUNS_DIR:-multirun/repeatability_study}
one() {  # one NAME overrides...
  local name=$1; shift
  "$PY" run.py task=benchmark logger=csv "$@" "hydra.run.dir=$RUNS/$name" > /dev/null 2>&1
  "$PY" -c "import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[2], round(r['train_speedup'], 3), round(r['infer_speedup'], 3), round(r['train_ips_original']), round(r['train_ips_decomposed']), r['duration_s'])" "$RUNS/$name/result.json" "$name"
}
for i in 1 2 3; do
  one "A$i" bench.rounds=6 bench.switch_warmup=1
  one "B$i" bench.rounds=12 bench.switch_warmup=0
  one "C$i" bench.rounds=12 bench.switch_warmup=1
done
for i in 1 2 3; do OMP_NUM_THREADS=1 one "T$i"; done
