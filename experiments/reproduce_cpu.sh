#!/usr/bin/env bash
# Regenerates everything under results/ that this CPU can produce (about 2 hours on 2 cores, half of it the compression sweep).
# Each step is a committed command; provenance (device, date, commit, command) is written beside its output.
#   bash experiments/reproduce_cpu.sh [step ...]
#   steps: paper vit convergence freeze_order compression calibration distill calibration_time attention recipe allocation
#          bench resnet50 advise advise_proxy advise_proxy_calibrated fidelity figures
# (bench: three default benchmark invocations + 60 s of timing_studies/machine_drift.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # experiments import each other (experiments.allocation_check)
RUNS=${RUNS_DIR:-multirun/reproduce}
mkdir -p "$RUNS"  # a step run on its own (tee writes its log there) on a fresh clone
steps=("$@"); [ ${#steps[@]} -eq 0 ] && steps=(paper vit convergence freeze_order compression calibration distill calibration_time attention recipe allocation bench resnet50 advise advise_proxy advise_proxy_calibrated fidelity figures)
export WANDB_MODE=offline WANDB_SILENT=true
TIMING=(device.malloc=tuned)  # careful timing on a noisy host (docs/measurement.md): the allocator keeps its buffers

provenance() {  # provenance DIR COMMAND...
  local dir=$1; shift
  mkdir -p "$dir"
  {
    echo "# Provenance"
    echo "- command: \`$*\`"
    echo "- date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- commit: $(git rev-parse --short=12 HEAD)$(git diff --quiet HEAD -- lrd_exp conf run.py || echo ' (+uncommitted changes)')"
    echo "- device: $($PY -c 'from lrd_exp.devices import resolve_device; print(resolve_device("cpu").name)')"
    echo "- torch: $($PY -c 'import torch; print(torch.__version__)'), threads: $($PY -c 'import torch; print(torch.get_num_threads())')"
  } > "$dir/PROVENANCE.md"
}

sweep() {  # sweep NAME RESULT_DIR overrides...
  local name=$1 dest=$2; shift 2
  local cmd=("$PY" run.py "experiment=$name" "hydra.sweep.dir=$RUNS/$name" "${TIMING[@]}" "$@")
  rm -rf "${RUNS:?}/$name"  # a complete job's result.json would be kept (resume), not re-measured
  "${cmd[@]}"
  provenance "$dest" "${cmd[*]}"
  cp "$RUNS/$name/results.csv" "$RUNS/$name/results.md" "$dest/"
}

for step in "${steps[@]}"; do
  case $step in
    paper) sweep digits_paper results/digits_paper ;;
    vit) sweep digits_vit results/digits_vit ;;
    convergence)
      sweep digits_convergence results/digits_convergence
      rm -f results/digits_convergence/curves_*.csv
      find "$RUNS/digits_convergence" -name curves.csv | while read -r f; do
        v=$(basename "$(dirname "$f")"); cp "$f" "results/digits_convergence/curves_${v//[^A-Za-z0-9_=.-]/_}.csv"; done ;;
    freeze_order) sweep digits_freeze_order results/digits_freeze_order ;;
    compression)  # 90 jobs, 3 seeds each: accuracy and speed against compression (results.md: mean +- 95 % CI),
      # in two single-threaded halves side by side, one per core (resnet18 | the digits ViT), then one table
      dest=results/digits_compression; rm -rf "${RUNS:?}/digits_compression"; mkdir -p "$RUNS/digits_compression"
      for arch in resnet18 vit_tiny_digits; do
        OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$PY" run.py experiment=digits_compression "${TIMING[@]}" \
          "hydra.sweeper.params.arch=$arch" "hydra.sweep.dir=$RUNS/digits_compression/$arch" \
          > "$RUNS/digits_compression/$arch.log" 2>&1 &
      done
      wait
      provenance "$dest" "OMP_NUM_THREADS=1 $PY run.py experiment=digits_compression ${TIMING[*]} hydra.sweeper.params.arch={resnet18|vit_tiny_digits} (the two in parallel)"
      echo "- threads: 1 per half (OMP_NUM_THREADS=1), the two halves side by side, one per core" >> "$dest/PROVENANCE.md"
      $PY -c "import sys; from lrd_exp.results import collect_rows, write_tables; write_tables(collect_rows(sys.argv[1]), sys.argv[2])" "$RUNS/digits_compression" "$dest" ;;
    calibration|distill)  # what the activation fit buys (72 jobs), and distillation at compression 8 (24 jobs):
      # two single-threaded halves side by side, one per core (resnet18 | the digits ViT), then one table
      name=digits_$step; dest=results/$name; rm -rf "${RUNS:?}/$name"; mkdir -p "$RUNS/$name"
      for arch in resnet18 vit_tiny_digits; do
        OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$PY" run.py "experiment=$name" "hydra.sweeper.params.arch=$arch" \
          "hydra.sweep.dir=$RUNS/$name/$arch" "paths.cache_dir=$RUNS/calibration_cache" > "$RUNS/$name/$arch.log" 2>&1 &
      done
      wait
      provenance "$dest" "OMP_NUM_THREADS=1 $PY run.py experiment=$name hydra.sweeper.params.arch={resnet18|vit_tiny_digits} paths.cache_dir=$RUNS/calibration_cache (the two in parallel)"
      echo "- threads: 1 per half (OMP_NUM_THREADS=1), the two halves side by side, one per core" >> "$dest/PROVENANCE.md"
      $PY -c "import sys; from lrd_exp.results import collect_rows, write_tables; write_tables(collect_rows(sys.argv[1]), sys.argv[2])" "$RUNS/$name" "$dest" ;;
    attention)  # torch's own TransformerEncoder on digits: top-1 before fine-tuning, weight vs activation fit
      $PY experiments/attention_fit_check.py --out results/attention_digits/fit_check.md ;;
    recipe)  # fine-tuning recipes for a calibrated start (digits_calibration's starts, 3 seeds) and the main job's config
      dest=results/finetune_recipe; mkdir -p "$dest"
      OMP_NUM_THREADS=1 $PY experiments/finetune_recipe_check.py --cache "$RUNS/calibration_cache" --archs resnet18 \
        --candidates "configured,lr/10+warmup,lr/10+warmup+kd" --csv "$RUNS/recipe_resnet18.csv" &
      OMP_NUM_THREADS=1 $PY experiments/finetune_recipe_check.py --cache "$RUNS/calibration_cache" --archs vit_tiny_digits \
        --candidates "configured,lr/10+warmup,lr/10+warmup+kd" --csv "$RUNS/recipe_vit.csv" &
      wait
      OMP_NUM_THREADS=1 $PY experiments/finetune_recipe_check.py --cache "$RUNS/calibration_cache" --default-job \
        --candidates "configured,lr/10+warmup+kd,lr/10+warmup" --csv "$dest/default_job.csv"
      $PY -c "import pandas as pd, sys; pd.concat(map(pd.read_csv, sys.argv[1:3])).to_csv(sys.argv[3], index=False)" \
        "$RUNS/recipe_resnet18.csv" "$RUNS/recipe_vit.csv" "$dest/rows.csv"
      $PY experiments/finetune_recipe_check.py --report "$dest/rows.csv" --default-rows "$dest/default_job.csv" \
        --winner "lr/10+warmup+kd" --out "$dest/recipe_check.md" ;;
    allocation)  # rank.allocation=global / fastest against uniform on three digits models, before fine-tuning
      dest=results/allocation_digits; mkdir -p "$dest"
      OMP_NUM_THREADS=1 $PY experiments/allocation_check.py --cache "$RUNS/calibration_cache" \
        --rows "$RUNS/allocation_rows.jsonl" --fastest-scales 1,0.25
      $PY experiments/allocation_check.py --cache "$RUNS/calibration_cache" --rows "$RUNS/allocation_rows.jsonl" \
        --report "$dest/results.md"
      pairs=resnet18:2,resnet18:4,resnet18:8,vit_tiny_digits:2,vit_tiny_digits:4,vit_tiny_digits:8,encoder:2,encoder:4,encoder:8
      OMP_NUM_THREADS=1 $PY experiments/allocation_check.py --cache "$RUNS/calibration_cache" \
        --rows "$dest/speed_rows.jsonl" --speed "$pairs" --fastest "$pairs" --fastest-scales 1,0.25
      $PY experiments/allocation_check.py --cache "$RUNS/calibration_cache" --rows "$dest/speed_rows.jsonl" \
        --report "$dest/speeds.md"
      OMP_NUM_THREADS=1 $PY experiments/damage_by_check.py --cache "$RUNS/calibration_cache" --rows "$dest/damage_by.jsonl"
      $PY experiments/damage_by_check.py --cache "$RUNS/calibration_cache" --rows "$dest/damage_by.jsonl" \
        --report "$dest/damage_by.md"
      for way in fisher measured; do  # what finding every layer's damage costs on resnet50 at 224 px
        OMP_NUM_THREADS=1 $PY experiments/allocation_cost_estimate.py --model resnet50 --damage-by "$way" --cuts 3
      done | tee "$dest/damage_cost.log" ;;
    calibration_time)  # resnet50 at 224 px, 256 images: calibrated decomposition time against the weight fit
      $PY experiments/calibration_time.py --model resnet50 --image-size 224 --images 256 --out results/calibration_cpu ;;
    bench)  # three repeated invocations of the default benchmark: run-to-run spread of the medians
      dest=results/benchmark_cpu; mkdir -p "$dest"
      for i in 1 2 3; do
        cmd=("$PY" run.py task=benchmark logger=csv "${TIMING[@]}" "hydra.run.dir=$RUNS/bench_default_$i")
        rm -rf "${RUNS:?}/bench_default_$i"
        "${cmd[@]}"
        cp "$RUNS/bench_default_$i/result.json" "$dest/default_run$i.json"
      done
      provenance "$dest" "${cmd[*]} (x3, run i -> default_run\$i.json)"
      $PY experiments/timing_studies/summarize_repeats.py "$dest"/default_run*.json > "$dest/repeatability.md"
      $PY experiments/timing_studies/machine_drift.py --seconds 60 > "$dest/machine_drift.md" ;;
    resnet50)  # resnet50, batch 16, 128 px: original vs quantized/optimized LRD (ratio 2) with sequential freezing
      dest=results/benchmark_cpu
      cmd=("$PY" run.py task=benchmark logger=csv "${TIMING[@]}" model=resnet50 dataset=synthetic dataset.image_size=128
           dataset.num_classes=1000 bench.batch_size=16 trainer.channels_last=true rank.policy=quantized freeze=sequential
           "bench.variants=[{label: quantized+sequential-cost, freeze: {importance: cost}}, {label: quantized+sequential-size-all, freeze: {importance: size, final_fraction: 1.0}}, {label: quantized-m16+sequential, rank: {multiple: 16}}, {label: optimized+sequential, rank: {policy: optimized}}, {label: optimized+sequential-cost, rank: {policy: optimized}, freeze: {importance: cost}}, {label: quantized, freeze: {schedule: none}}, {label: optimized, rank: {policy: optimized}, freeze: {schedule: none}}, {label: ratio-unquantized, rank: {policy: ratio}, freeze: {schedule: none}}]"
           "hydra.run.dir=$RUNS/bench_resnet50")
      rm -rf "${RUNS:?}/bench_resnet50"  # no stale rank_timings.csv
      "${cmd[@]}" | tee "$RUNS/bench_resnet50.log"
      mkdir -p "$dest/resnet50"
      provenance "$dest/resnet50" "${cmd[*]}"
      $PY -c "import sys; from lrd_exp.results import collect_rows, write_tables; write_tables(collect_rows(sys.argv[1]), sys.argv[2])" "$RUNS/bench_resnet50" "$dest/resnet50"
      cp "$RUNS/bench_resnet50/freeze_stages.csv" "$dest/resnet50/"
      find "$RUNS/bench_resnet50" -name rank_timings.csv -exec cp {} "$dest/resnet50/rank_timings.csv" \; ;;
    advise)  # task=advise on resnet50 at 128 px, batch 16: the whole default grid, from a cold rank-timing cache
      dest=results/advise_cpu
      cmd=("$PY" run.py task=advise logger=csv "${TIMING[@]}" model=resnet50 dataset=synthetic dataset.image_size=128
           dataset.num_classes=1000 bench.batch_size=16 trainer.channels_last=true "paths.cache_dir=$RUNS/advise_cache"
           "hydra.run.dir=$RUNS/advise_resnet50")
      rm -rf "${RUNS:?}/advise_resnet50" "${RUNS:?}/advise_cache"
      "${cmd[@]}" | tee "$RUNS/advise_resnet50.log"
      mkdir -p "$dest"
      provenance "$dest" "${cmd[*]}"
      cp "$RUNS/advise_resnet50/advice.csv" "$RUNS/advise_resnet50/advice.md" "$RUNS/advise_resnet50/advice_frontier.png" "$dest/" ;;
    advise_proxy)  # the accuracy proxy against top-1 after fine-tuning: advise on digits_compression's configurations
      dest=results/advise_digits
      cmd=("$PY" run.py experiment=advise_digits "hydra.sweep.dir=$RUNS/advise_digits")
      rm -rf "${RUNS:?}/advise_digits"
      "${cmd[@]}"
      provenance "$dest" "${cmd[*]}"
      $PY experiments/advise_proxy_check.py "$RUNS/advise_digits" results/digits_compression/results.csv --out "$dest" ;;
    advise_proxy_calibrated)  # the same check for the calibrated decomposition, against digits_calibration's rows of
      # that fit, on its own baselines (the calibration step's cache): run after the calibration step
      dest=results/advise_digits
      cmd=("$PY" run.py experiment=advise_digits "hydra.sweep.dir=$RUNS/advise_digits_calibrated"
           "paths.cache_dir=$RUNS/calibration_cache")  # rank.fit=auto: activations on digits
      rm -rf "${RUNS:?}/advise_digits_calibrated"
      "${cmd[@]}"
      $PY experiments/advise_proxy_check.py "$RUNS/advise_digits_calibrated" results/digits_calibration/results.csv \
        --rank fit=activations --rank recalibrate_bn=true --name calibrated --out "$dest"
      echo "- calibrated check: \`${cmd[*]}\`, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short=12 HEAD)" \
        >> "$dest/PROVENANCE.md" ;;
    fidelity)  # the default training job 4 x, with and without the progress bar: loop vs benchmark, paired
      # (bench.probe_steps is opt-in since 2026-11-29: the paired loop / probe comparison needs it on)
      $PY experiments/timing_studies/fidelity_study.py --runs 4 --out results/fidelity_cpu/fidelity.md \
        --setting default=bench.probe_steps=8 --setting no-progress-bar=bench.probe_steps=8,trainer.enable_progress_bar=false ;;
    figures)
      cmd=("$PY" experiments/paper_figures.py results/digits_paper/results.csv results/benchmark_cpu/resnet50/results.csv
           "$RUNS/digits_convergence" results/benchmark_cpu/resnet50/rank_timings.csv)
      [ -f results/digits_vit/results.csv ] && cmd+=(results/digits_vit/results.csv)
      [ -f results/digits_compression/results.csv ] && cmd+=(results/digits_compression/results.csv)
      cmd+=(--out results/figures)
      "${cmd[@]}"
      provenance results/figures "${cmd[*]}" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
