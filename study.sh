#!/usr/bin/env bash
# The whole study, end to end: WT-ST-n/m sweep, every analysis, the figures and findings.md.
#
# Offline (default, no data, no downloads; measured: about 1,900 CPU-seconds, see the README):
#   1. pretrain each model from random init on `shapes` (the stand-in for ImageNet: 3,840
#      training images, 16 classes of shapes x textures in random colours), once; its best.pt
#      is the "WT" weights
#   2. fine-tune on `lesions` (the stand-in for a small medical set: 128 dermoscopy-like
#      training images, 4 classes by the lesion's outline) with WT-ST-n/m for n = 0, N/2, N
#      and random init (RI), 3 seeds; a CNN and a ViT, in parallel
#   3. run every analysis on every run (CKA of WT against ST with --ref)
#   4. write the figures, table.md and findings.md (which of the paper's findings F1-F4 hold).
# Your own data: DATA=folder DATA_ROOT=/data/mine MODEL=deit_s bash study.sh (or DATA=aptos, ...):
#   the same sweep from the ImageNet weights (WEIGHTS=imagenet, or WEIGHTS=<checkpoint file>),
#   no source pretraining, train.py's recipe (100 epochs with early stopping) unless EPOCHS is set.
# Safe to re-run: finished runs and analyses are skipped (--resume), killed runs continue.
# Settings (environment variables):
#   MODELS   model[:img size[:lr]] entries, run in parallel (offline default
#            "resnet18:32:1e-3 deit_t:64:2e-4"; own data "deit_s"); MODEL= one entry
#   SOURCE, TARGET: the offline tasks (default shapes, lesions)
#   NS       n values of WT-ST-n/m (default "0 N/2 N" of each model); SEEDS (default "0 1 2")
#   EPOCHS, SIZE and LR (all models), BATCH, WARMUP, PATIENCE: fine-tuning settings
#   SOURCE_EPOCHS: source pretraining epochs; DATA, DATA_ROOT, WEIGHTS: your own data (above)
#   RUNS, FIGURES: output folders; PY: the Python; DEVICE (default cpu offline, else auto)
#   SUBSET: at most this many images per split in every run (quick checks, tests)
#   THREADS: torch threads per parallel model (default: cores / models, at least 1)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
SEEDS=${SEEDS:-"0 1 2"}
RUNS=${RUNS:-runs/study}
FIGURES=${FIGURES:-figures}
if [ -z "${DATA:-}" ]; then            # the offline study
  OFFLINE=1
  SOURCE=${SOURCE:-shapes}
  DATA=${TARGET:-lesions}
  MODELS=${MODEL:-${MODELS:-"resnet18:32:1e-3 deit_t:64:2e-4"}}
  EPOCHS=${EPOCHS:-8}
  SOURCE_EPOCHS=${SOURCE_EPOCHS:-3}
  DEVICE=${DEVICE:-cpu}
  TUNE=(--batch-size "${BATCH:-32}" --warmup "${WARMUP:-10}" --patience "${PATIENCE:-6}")
  [ -n "${WEIGHTS:-}" ] && { echo "study.sh: WEIGHTS is for DATA=... runs; the offline study pretrains its own" >&2; exit 2; }
else                                   # your own data: ImageNet (or WEIGHTS) -> DATA
  OFFLINE=0
  MODELS=${MODEL:-${MODELS:-deit_s}}
  WEIGHTS=${WEIGHTS:-imagenet}
  TUNE=()
  [ -n "${EPOCHS:-}" ] && TUNE+=(--epochs "$EPOCHS")
  [ -n "${BATCH:-}" ] && TUNE+=(--batch-size "$BATCH")
  [ -n "${WARMUP:-}" ] && TUNE+=(--warmup "$WARMUP")
  [ -n "${PATIENCE:-}" ] && TUNE+=(--patience "$PATIENCE")
  if [ "$WEIGHTS" != imagenet ] && [ ! -f "$WEIGHTS" ]; then
    echo "study.sh: WEIGHTS=$WEIGHTS: no such checkpoint file (expected 'imagenet' or a path)" >&2; exit 2
  fi
fi
DATA_ARGS=(--data "$DATA")
[ -n "${DATA_ROOT:-}" ] && DATA_ARGS+=(--data-root "$DATA_ROOT")
DEV=()
[ -n "${DEVICE:-}" ] && DEV=(--device "$DEVICE")
TRAIN=("${DEV[@]}")
[ -n "${SUBSET:-}" ] && TRAIN+=(--subset "$SUBSET")   # quick runs: at most SUBSET images per split
set -- $MODELS
NMODELS=$#
CORES=$(nproc 2>/dev/null || echo 2)
THREADS=${THREADS:-$(( CORES / NMODELS > 0 ? CORES / NMODELS : 1 ))}
mkdir -p "$RUNS/logs"

# Each model's runs go through one Python process reading "script.py args" lines from stdin
# (importing torch once instead of ~25 times saves minutes on a small CPU); stops at a failure.
RUNNER='
import importlib, shlex, sys
for line in sys.stdin:
    if line.strip():
        script, *argv = shlex.split(line)
        print("$ python " + line.strip(), flush=True)
        rc = importlib.import_module(script[:-3]).main(argv)
        if rc:
            sys.exit(rc)
'

groups() {  # N, the number of WT-ST module groups of model $1 at size $2 (asks models.py)
  $PY -c 'import sys, torch, models
with torch.device("meta"):
    print(len(models.create_model(sys.argv[1], num_classes=2, img_size=int(sys.argv[2])).wtst_groups()))' "$1" "$2"
}

q() { printf '%q ' "$@"; }  # one shell-quoted job line

jobs_for() {  # the job lines of one model: $1 model, $2 image size ("" = the dataset's), $3 lr ("" = train.py's), $4 N
  local model=$1 size=$2 lr=$3 N=$4 seed n weights run ref
  local img=() opt=()
  [ -n "$size" ] && img=(--img-size "$size")
  [ -n "$lr" ] && opt=(--lr "$lr")
  local ns=${NS:-"0 $(( N / 2 )) $N"}
  if [ "$OFFLINE" = 1 ]; then
    local src="$RUNS/source/$model-$SOURCE"
    echo "$(q train.py --model "$model" --data "$SOURCE" --init ri "${img[@]}" "${opt[@]}" --epochs "$SOURCE_EPOCHS" \
        --batch-size 32 --warmup 30 --patience 10 "${TRAIN[@]}" --out "$src" --resume)"
    weights="$src/best.pt"
  else
    weights=$WEIGHTS
  fi
  for seed in $SEEDS; do
    for n in $ns; do
      echo "$(q train.py --model "$model" "${DATA_ARGS[@]}" --n "$n" --weights "$weights" "${img[@]}" "${opt[@]}" \
          "${TUNE[@]}" --seed "$seed" "${TRAIN[@]}" --out "$RUNS/target/$model-$DATA-n$n-s$seed" --resume)"
    done
    echo "$(q train.py --model "$model" "${DATA_ARGS[@]}" --init ri "${img[@]}" "${opt[@]}" "${TUNE[@]}" \
        --seed "$seed" "${TRAIN[@]}" --out "$RUNS/target/$model-$DATA-ri-s$seed" --resume)"
  done
  local first=${ns%% *} last=${ns##* }
  for seed in $SEEDS; do
    for n in $ns ri; do
      [ "$n" = ri ] && run="$RUNS/target/$model-$DATA-ri-s$seed" || run="$RUNS/target/$model-$DATA-n$n-s$seed"
      # reinit.json is the last file `--metric all` writes: present = this run's analyses are done
      [ -f "$run/analysis/reinit.json" ] && continue
      ref=()
      [ "$n" = "$last" ] && ref=(--ref "$RUNS/target/$model-$DATA-n$first-s$seed")  # WT vs ST
      echo "$(q analyze.py --run "$run" --metric all "${ref[@]}" "${DEV[@]}")"
    done
  done
}

if [ "$OFFLINE" = 1 ]; then
  echo "== offline study: source '$SOURCE' (pretraining), target '$DATA'; models {$MODELS}, seeds {$SEEDS}"
else
  echo "== study on '$DATA' from weights '$WEIGHTS': models {$MODELS}, seeds {$SEEDS}"
fi
pids=() names=()
for entry in $MODELS; do             # model[:size[:lr]]
  IFS=: read -r model size lr <<< "$entry"
  size=${SIZE:-$size}
  lr=${LR:-$lr}
  N=$(groups "$model" "${size:-224}")
  echo "   $model: N = $N module groups, image size ${size:-the dataset's}, lr ${lr:-train.py's}, log $RUNS/logs/$model.log"
  ( jobs_for "$model" "$size" "$lr" "$N" | OMP_NUM_THREADS=$THREADS $PY -c "$RUNNER" > "$RUNS/logs/$model.log" 2>&1 ) &
  pids+=($!)
  names+=("$model")
done
fail=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then
    echo "   ${names[$i]}: runs and analyses done"
  else
    echo "study.sh: ${names[$i]} failed; the end of $RUNS/logs/${names[$i]}.log:" >&2
    tail -n 15 "$RUNS/logs/${names[$i]}.log" >&2
    fail=1
  fi
done
[ "$fail" = 0 ] || exit 1

if [ "$OFFLINE" = 1 ]; then
  echo "== figures and findings (source pretraining runs are in $RUNS/source, not plotted)"
else
  echo "== figures and findings"
fi
$PY plots.py --runs "$RUNS/target" --out "$FIGURES"
echo "figures: $(cd "$FIGURES" && pwd)"
