#!/usr/bin/env bash
# The QAT runs behind benchmarks/qat_table.py, in two queues of one thread each (2 cores):
#   benchmarks/qat_runs.sh detr_tiny & benchmarks/qat_runs.sh deformable_detr_tiny & wait
# Every run is resumable: rerunning the script continues unfinished runs and skips finished ones.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1; shift
RUNS=${RUNS:-runs/qat}
COMMON=(--data runs/synth --policy 4-4-8 --steps 250 --batch-size 8 --lr 1e-4 --lr-backbone 1e-5 --lr-quant 1e-3
        --warmup 20 --critical person --threads 1 --no-progress)
FR=(--fisher-reg 1e-3 --fisher-warmup 50)
run() {  # run NAME ARGS...
  local name=$1; shift
  local out="$RUNS/$MODEL/$name"
  if [[ -f "$out/eval.json" ]]; then echo "skip $out"; return; fi
  local resume=(); [[ -f "$out/checkpoint.pt" ]] && resume=(--resume)
  echo "== $out: fxq qat $MODEL ${COMMON[*]} $*"
  .venv/bin/fxq qat "$MODEL" "${COMMON[@]}" "$@" "${resume[@]}" --out "$out"
}
run qat --seed 0
run qat_fr_person --seed 0 "${FR[@]}"
run qat_kd --seed 0 --distill kd
run qat_kd_fr_person --seed 0 --distill kd "${FR[@]}"
run qat_seed1 --seed 1
run qat_fr_person_seed1 --seed 1 "${FR[@]}"
