#!/usr/bin/env bash
# Which timing settings make repeated default benchmarks agree? Three invocations of each setting, interleaved
# in time (A B C A B C ...). Prints one line per invocation:
#   name  train_speedup  infer_speedup  train_ips_original  train_ips_decomposed  duration_s
#   bash experiments/timing_studies/repeatability_study.sh [NAME=override,override ...]   (default: the settings below;
#   overrides are split at commas, so list values such as rank.include=[a,b] cannot be given here)
# R = 12 rounds of 4 steps, one untimed step after each switch (the default before 2026-11-28, session 4);
# S = one step per round, no untimed step after a switch (the default since: bench.rounds=null).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
RUNS=${RUNS_DIR:-multirun/repeatability_study}
one() {  # one NAME overrides...
  local name=$1; shift
  "$PY" run.py task=benchmark logger=csv "$@" "hydra.run.dir=$RUNS/$name" > /dev/null 2>&1
  "$PY" -c "import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[2], round(r['train_speedup'], 3), round(r['infer_speedup'], 3), round(r['train_ips_original']), round(r['train_ips_decomposed']), r['duration_s'])" "$RUNS/$name/result.json" "$name"
}
settings=("$@"); [ ${#settings[@]} -eq 0 ] && settings=("R=bench.rounds=12,bench.switch_warmup=1" "S=bench.rounds=null,bench.switch_warmup=0")
for i in 1 2 3; do
  for s in "${settings[@]}"; do
    name=${s%%=*}; IFS=, read -r -a ov <<< "${s#*=}"
    one "$name$i" "${ov[@]}"
  done
done
