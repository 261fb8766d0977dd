#!/usr/bin/env bash
# The whole study, end to end, on the built-in synthetic data (offline, minutes on a CPU):
#   1. pretrain a model from random init on `shapes` (a natural-image-like stand-in for ImageNet)
#   2. fine-tune it on `synthetic` (fundus-like grading) with WT-ST-n/m for several n, 2 seeds,
#      plus a random-init (RI) baseline
#   3. run every analysis on every run (CKA of WT against ST with --ref)
#   4. write the figures and the table.
# Safe to re-run: finished runs are skipped (--resume), killed ones continue.
# Settings (environment variables): MODEL, SIZE, NS, SEEDS, RUNS, FIGURES, PY, EPOCHS.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
MODEL=${MODEL:-resnet18}
SIZE=${SIZE:-32}
NS=${NS:-"0 3 6"}          # WT-ST-n/m: n groups transferred (resnet18 has N = 6)
SEEDS=${SEEDS:-"0 1"}
EPOCHS=${EPOCHS:-3}
RUNS=${RUNS:-runs/study}
FIGURES=${FIGURES:-figures}
COMMON="--img-size $SIZE --batch-size 32 --warmup 50 --patience 4 --device cpu"

echo "== 1/4 pretraining $MODEL on shapes"
$PY train.py --model "$MODEL" --data shapes --init ri --epochs "$EPOCHS" $COMMON --lr 1e-3 \
    --out "$RUNS/pretrain-$MODEL-shapes" --resume

echo "== 2/4 fine-tuning on synthetic: n in {$NS}, seeds {$SEEDS}, and RI"
for seed in $SEEDS; do
  for n in $NS; do
    $PY train.py --model "$MODEL" --data synthetic --n "$n" --weights "$RUNS/pretrain-$MODEL-shapes/best.pt" \
        --epochs "$EPOCHS" --seed "$seed" $COMMON --out "$RUNS/$MODEL-synthetic-n$n-s$seed" --resume
  done
  $PY train.py --model "$MODEL" --data synthetic --init ri --epochs "$EPOCHS" --seed "$seed" $COMMON \
      --out "$RUNS/$MODEL-synthetic-ri-s$seed" --resume
done

echo "== 3/4 analyses"
first=${NS%% *}; last=${NS##* }
for seed in $SEEDS; do
  for n in $NS; do
    ref=()
    [ "$n" = "$last" ] && ref=(--ref "$RUNS/$MODEL-synthetic-n$first-s$seed")  # WT vs ST
    $PY analyze.py --run "$RUNS/$MODEL-synthetic-n$n-s$seed" --metric all "${ref[@]}" --device cpu
  done
  $PY analyze.py --run "$RUNS/$MODEL-synthetic-ri-s$seed" --metric all --device cpu
done

echo "== 4/4 figures"
$PY plots.py --runs "$RUNS" --out "$FIGURES"
echo "figures: $(cd "$FIGURES" && pwd)"
