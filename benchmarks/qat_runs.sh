#!/usr/bin/env bash
# The QAT runs behind benchmarks/qat_table.py: benchmarks/qat_runs.sh MODEL ROW... (one thread each; two queues
# share the 2 cores). Rows: qat, qat_fr_person, qat_kd, qat_kd_fr_person, qat_seed1, qat_fr_person_seed1,
# w4a8_qat, w4a8_qat_fr_person, w2a4_qat, w2a4_qat_fr_person, and the distillation rows of issue 14: qat_drd,
# qat_aq, qat_drd_aq (names compose: _kd, _drd, _aq select --distill methods; _drdw<λ> is DRD with
# --drd-weight λ, qat_drdw0 distribution alignment alone). Every run is resumable: rerunning continues
# unfinished runs and skips finished ones. This session ran
#   benchmarks/qat_runs.sh detr_tiny qat qat_fr_person qat_kd qat_kd_fr_person qat_seed1 qat_fr_person_seed1
#   benchmarks/qat_runs.sh deformable_detr_tiny qat qat_fr_person qat_kd w2a4_qat
# and for issue 14
#   benchmarks/qat_runs.sh detr_tiny qat qat_drd qat_aq qat_drd_aq qat_kd
#   benchmarks/qat_runs.sh deformable_detr_tiny qat qat_drd_aq qat_drd qat_aq qat_kd
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1; shift
RUNS=${RUNS:-runs/qat}
COMMON=(--data runs/synth --steps 250 --batch-size 8 --lr 1e-4 --lr-backbone 1e-5 --lr-quant 1e-3
        --warmup 20 --critical person --threads 1 --no-progress)
FR=(--fisher-reg 1e-3 --fisher-warmup 50)
for name in "$@"; do
  seed=0; [[ $name == *seed1 ]] && seed=1
  args=(--policy 4-4-8)
  case $name in
    w4a8_*) args=(--policy W4A8) ;;
    w2a4_*) args=(--policy W2A4-Att8) ;;
  esac
  args+=(--seed "$seed")
  methods=()
  for m in kd drd aq; do [[ $name == *_${m}_* || $name == *_${m} ]] && methods+=("$m"); done
  # _drdw<λ>: DRD with λ_DRD = λ (qat_drdw0: distribution alignment alone, no DRD loss)
  if [[ $name =~ _drdw([0-9.]+) ]]; then methods+=(drd); args+=(--drd-weight "${BASH_REMATCH[1]}"); fi
  if (( ${#methods[@]} )); then args+=(--distill "$(IFS=+; echo "${methods[*]}")"); fi
  [[ $name == *fr_person* ]] && args+=("${FR[@]}")
  out="$RUNS/$MODEL/$name"
  if [[ -f "$out/eval.json" ]]; then echo "skip $out"; continue; fi
  resume=(); [[ -d "$out" ]] && resume=(--overwrite)  # a run cut off before its first checkpoint starts over
  [[ -f "$out/checkpoint.pt" ]] && resume=(--resume)
  echo "== $out: fxq qat $MODEL ${COMMON[*]} ${args[*]}"
  .venv/bin/fxq qat "$MODEL" "${COMMON[@]}" "${args[@]}" "${resume[@]}" --out "$out"
done
