#!/usr/bin/env bash
# The QAT runs behind benchmarks/qat_table.py: benchmarks/qat_runs.sh MODEL ROW... (one thread each; two queues share
# the 2 cores). Rows: qat, qat_fr_person, qat_kd, qat_kd_fr_person, qat_seed1, qat_fr_person_seed1, w4a8_qat,
# w4a8_qat_fr_person, w2a4_qat, w2a4_qat_fr_person (and _fr_hurt for each), and the distillation rows of issue 14:
# qat_drd, qat_aq, qat_drd_aq (names compose: _kd, _drd, _aq select --distill methods; _kd is KD with --kd-boxes all,
# the first implementation, _kdfg KD with --kd-boxes foreground, today's default; _drdw<λ> is DRD with --drd-weight λ,
# qat_drdw0 distribution alignment alone); _fr_hurt is the regularizer with L_F on issue 13's critical set (a): the 5
# categories uniform 4-4-8 PTQ hurts most on the validation images (RESULTS.md, QAT); _every<K> makes the
# regularizer lazy (--fisher-every K: every K steps at K·λ); _stage<N> is Q-DETR's two-stage schedule (--float-stage N:
# the encoder and decoder float for the first N steps).
# Environment: RUNS (default runs/qat), STEPS (default 250) and EPOCHS (default 1; training stops at whichever
# of STEPS and EPOCHS·500 steps comes first, the cosine schedule spanning it): the 2000-step table of this session
# ran with RUNS=runs/qat2k STEPS=2000 EPOCHS=4. Every run is resumable: rerunning continues
# unfinished runs and skips finished ones. The 250-step tables ran
#   benchmarks/qat_runs.sh detr_tiny qat qat_fr_person qat_kd qat_kd_fr_person qat_seed1 qat_fr_person_seed1
#   benchmarks/qat_runs.sh deformable_detr_tiny qat qat_fr_person qat_kd w2a4_qat
# and for issue 14
#   benchmarks/qat_runs.sh detr_tiny qat qat_drd qat_aq qat_drd_aq qat_kd
#   benchmarks/qat_runs.sh deformable_detr_tiny qat qat_drd_aq qat_drd qat_aq qat_kd
# and the 2000-step table
#   RUNS=runs/qat2k STEPS=2000 EPOCHS=4 benchmarks/qat_runs.sh detr_tiny qat_kd qat qat_fr_hurt qat_seed1
#   RUNS=runs/qat2k STEPS=2000 EPOCHS=4 benchmarks/qat_runs.sh detr_tiny qat_fr_hurt_seed1
#   RUNS=runs/qat2k STEPS=2000 EPOCHS=4 benchmarks/qat_runs.sh deformable_detr_tiny qat
#   RUNS=runs/qat2k STEPS=2000 EPOCHS=4 benchmarks/qat_runs.sh deformable_detr_tiny qat_fr_hurt_seed1 w4a8_qat
#   RUNS=runs/qat2k STEPS=2000 EPOCHS=4 benchmarks/qat_runs.sh deformable_detr_tiny w4a8_qat_fr_hurt
#   RUNS=runs/qat2k STEPS=2000 EPOCHS=4 benchmarks/qat_runs.sh deformable_detr_tiny w2a4_qat
#   RUNS=runs/qat2k STEPS=2000 EPOCHS=4 benchmarks/qat_runs.sh deformable_detr_tiny w2a4_qat_fr_hurt
#   RUNS=runs/qat2k STEPS=2000 EPOCHS=4 benchmarks/qat_runs.sh deformable_detr_tiny qat_fr_hurt_every8_seed1
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1; shift
RUNS=${RUNS:-runs/qat}
COMMON=(--data runs/synth --steps "${STEPS:-250}" --batch-size 8 --lr 1e-4 --lr-backbone 1e-5 --lr-quant 1e-3
        --warmup 20 --critical person --threads 1 --no-progress --epochs "${EPOCHS:-1}")
FR=(--fisher-reg 1e-3 --fisher-warmup 50)
case $MODEL in
  detr_tiny) HURT=("green square" "red circle" "green x" "purple hexagon" "orange inverted triangle") ;;
  *) HURT=("orange semicircle" "green square" "purple hexagon" "orange inverted triangle" "yellow star") ;;
esac
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
  # _kdfg: KD with the box terms weighted by the teacher's foreground probability (--kd-boxes foreground, today's
  # default); _kd: the first implementation's KD, box terms over all queries alike (--kd-boxes all)
  if [[ $name == *_kdfg* ]]; then methods=(kd "${methods[@]}"); args+=(--kd-boxes foreground); fi
  if [[ $name == *_kd_* || $name == *_kd ]]; then args+=(--kd-boxes all); fi
  if (( ${#methods[@]} )); then args+=(--distill "$(IFS=+; echo "${methods[*]}")"); fi
  [[ $name == *fr_person* ]] && args+=("${FR[@]}")
  [[ $name == *fr_hurt* ]] && args+=("${FR[@]}" --critical "${HURT[@]}")
  [[ $name =~ _every([0-9]+) ]] && args+=(--fisher-every "${BASH_REMATCH[1]}")
  [[ $name =~ _stage([0-9]+) ]] && args+=(--float-stage "${BASH_REMATCH[1]}")
  out="$RUNS/$MODEL/$name"
  if [[ -f "$out/eval.json" ]]; then echo "skip $out"; continue; fi
  resume=(); [[ -d "$out" ]] && resume=(--overwrite)  # a run cut off before its first checkpoint starts over
  [[ -f "$out/checkpoint.pt" ]] && resume=(--resume)
  echo "== $out: fxq qat $MODEL ${COMMON[*]} ${args[*]}"
  .venv/bin/fxq qat "$MODEL" "${COMMON[@]}" "${args[@]}" "${resume[@]}" --out "$out"
done
