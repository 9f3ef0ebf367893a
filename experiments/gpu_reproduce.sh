#!/usr/bin/env bash
# The paper's throughput matrix on one GPU, in one run (prepared for an H100 / H200 session; CPU-tested with TINY=1).
#   OUT=results/gpu bash experiments/gpu_reproduce.sh     one GPU run: bf16, channels_last, eager + compiled ViT
#   TINY=1 OUT=/tmp/gpu bash experiments/gpu_reproduce.sh  the same plumbing on the CPU with tiny models/sizes
# Every benchmark is `run.py task=benchmark` (original vs decomposed side by side, every freeze state measured).
# Writes under $OUT: <name>/results.{csv,md}, freeze_stages.csv, rank_timings.csv, figures/, PROVENANCE.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-results/gpu}
RUNS=${RUNS_DIR:-$OUT/runs}
export WANDB_MODE=offline WANDB_SILENT=true
mkdir -p "$OUT"

if [ "${TINY:-0}" = 1 ]; then  # plumbing check on the CPU: small models, 2 timed steps
  DEV=(device=cpu trainer.precision=32-true trainer.channels_last=true bench.warmup=1 bench.steps=2 bench.rounds=1
       rank.window=0.1 rank.step=8)
  R50=(model=resnet18 dataset.image_size=32 bench.batch_size=2)
  VIT=(model=vit_tiny_digits dataset.image_size=32 bench.batch_size=2)
  SAW=(rank.include=[blocks.0.mlp.fc1] rank.window=0.2 rank.step=4)
  COMPILE=false
else
  DEV=(device=cuda trainer.precision=bf16-mixed trainer.channels_last=true bench.warmup=5 bench.steps=12)
  R50=(model=resnet50 dataset.image_size=224 bench.batch_size=256)
  VIT=(model=vit_base_patch16_224 dataset.image_size=224 bench.batch_size=128)
  SAW=(rank.include=[blocks.0.mlp.fc1] rank.window=0.2 rank.step=2)
  COMPILE=true
fi
COMMON=(task=benchmark logger=csv dataset=synthetic dataset.num_classes=1000 dataset.in_chans=3 freeze=sequential)

# the paper's variants; the run's own variant (first row) is quantized ratio 2, multiple 8, sequential freezing
VARIANTS='[{label: quantized-r2-m8, freeze: {schedule: none}},
 {label: unquantized-r2, rank: {policy: ratio, ratio: 2}, freeze: {schedule: none}},
 {label: unquantized-r2+seq, rank: {policy: ratio, ratio: 2}},
 {label: unquantized-r3, rank: {policy: ratio, ratio: 3}, freeze: {schedule: none}},
 {label: unquantized-r3+seq, rank: {policy: ratio, ratio: 3}},
 {label: quantized-r2-m64, rank: {multiple: 64}, freeze: {schedule: none}},
 {label: quantized-r2-m64+seq, rank: {multiple: 64}},
 {label: quantized-r3-m8, rank: {ratio: 3}, freeze: {schedule: none}},
 {label: quantized-r3-m8+seq, rank: {ratio: 3}},
 {label: quantized-r3-m8+seq-cost, rank: {ratio: 3}, freeze: {importance: cost}},
 {label: optimized-r2, rank: {policy: optimized}, freeze: {schedule: none}},
 {label: optimized-r2+seq, rank: {policy: optimized}}]'
VARIANTS=$(echo "$VARIANTS" | tr -d '\n')

bench() {  # bench NAME overrides...
  local name=$1; shift
  local cmd=("$PY" run.py "${COMMON[@]}" "${DEV[@]}" "$@" "hydra.run.dir=$RUNS/$name")
  echo "== $name: ${cmd[*]}" | tee -a "$OUT/commands.txt"
  local started=$SECONDS
  "${cmd[@]}" 2>&1 | tee "$RUNS/$name.log" | grep -E "^(Benchmark|Freeze| +[a-z0-9+-]+ )" || true
  mkdir -p "$OUT/$name"
  "$PY" -c "import sys; from lrd_exp.results import collect_rows, write_tables; write_tables(collect_rows(sys.argv[1]), sys.argv[2])" \
    "$RUNS/$name" "$OUT/$name"
  cp "$RUNS/$name/freeze_stages.csv" "$OUT/$name/" 2>/dev/null || true
  find "$RUNS/$name" -name rank_timings.csv | head -1 | xargs -r -I{} cp {} "$OUT/$name/rank_timings.csv"
  echo "   ($name took $((SECONDS - started)) s)"
}

mkdir -p "$RUNS"
bench resnet50 "${R50[@]}" rank.policy=quantized "bench.variants=$VARIANTS"
bench vit_base "${VIT[@]}" rank.policy=quantized "bench.variants=$VARIANTS"
bench vit_base_compiled "${VIT[@]}" rank.policy=quantized rank.ratio=3 bench.compile=$COMPILE \
  "bench.variants=[{label: unquantized-r3+seq, rank: {policy: ratio}}]"
bench vit_saw_tooth "${VIT[@]}" rank.policy=optimized "${SAW[@]}" freeze=none

"$PY" - "$OUT" <<'PYEOF' > "$OUT/PROVENANCE.md"
import datetime, subprocess, sys, torch
from lrd_exp.devices import resolve_device
dev = resolve_device("auto")
drv = ""
if torch.cuda.is_available():
    try:
        drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
    except OSError:
        drv = "?"
commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
print("# Provenance\n")
print(f"- command: `bash experiments/gpu_reproduce.sh` (each benchmark's full command: commands.txt)")
print(f"- date (UTC): {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
print(f"- commit: {commit}")
print(f"- device: {dev.name}" + (f", driver {drv}" if drv else ""))
print(f"- torch: {torch.__version__}, CUDA {torch.version.cuda}")
PYEOF
"$PY" experiments/paper_figures.py "$OUT/resnet50/results.csv" "$OUT/vit_base/results.csv" \
  "$OUT/vit_saw_tooth/rank_timings.csv" --out "$OUT/figures" || echo "figures failed (tables are kept)"
echo "done: $OUT"
