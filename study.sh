#!/usr/bin/env bash
# The whole study, end to end: WT-ST-n/m sweep, every analysis, the figures and findings.md.
#
# Offline (default, no data, no downloads; measured: under 10 minutes on 2 CPU cores, see the README):
#   1. pretrain each model from random init on `shapes` (the stand-in for ImageNet: 3,840
#      training images, 8 classes = 4 object shapes x dark/light scene, on textured
#      backgrounds), once; its best.pt is the "WT" weights
#   2. fine-tune on `lesions` (the stand-in for a small medical set: 256 dermoscopy-like
#      training images, 4 classes by the lesion's outline) with WT-ST-n/m for n = 0, N/2, N,
#      3 seeds, and random init (RI, first seed); a CNN and a ViT, in parallel
#   3. run every analysis on every run (CKA of WT against ST with --ref; re-init, the slowest,
#      on the first seed's WT run only)
#   4. write the figures, table.md and findings.md (which of the paper's findings F1-F4 hold).
# Your own data: DATA=folder DATA_ROOT=/data/mine MODEL=deit_s bash study.sh (or DATA=aptos, ...):
#   the same sweep from the ImageNet weights (WEIGHTS=imagenet, or WEIGHTS=<checkpoint file>),
#   no source pretraining, train.py's recipe (100 epochs with early stopping) unless EPOCHS is set.
# Safe to re-run: finished runs and analyses are skipped (--resume), killed runs continue.
# Settings (environment variables):
#   MODELS   model[:img size[:lr[:source lr[:source epochs]]]] entries, run in parallel
#            (offline default "resnet18:32:2e-3:1e-3:2 deit_t:48:1e-3:3e-4:5"; own data "deit_s");
#            MODEL= one entry
#   SOURCE, TARGET: the offline tasks (default shapes, lesions)
#   NS       n values of WT-ST-n/m (default "0 N/2 N" of each model); SEEDS (default "0 1 2");
#            RI_SEEDS (offline default: the first seed; own data: SEEDS)
#   EPOCHS, SIZE and LR (all models), BATCH, WARMUP, PATIENCE, PLATEAU: fine-tuning settings
#            (offline defaults 5, -, -, 32, 6, 6, 2; PATIENCE and PLATEAU count validations)
#   SOURCE_EPOCHS: source pretraining epochs (all models); DATA, DATA_ROOT, WEIGHTS: your own data
#   FORMAT   figure formats (offline default png; own data png,pdf)
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
  MODELS=${MODEL:-${MODELS:-"resnet18:32:2e-3:1e-3:2 deit_t:48:1e-3:3e-4:5"}}
  EPOCHS=${EPOCHS:-5}
  DEVICE=${DEVICE:-cpu}
  RI_SEEDS=${RI_SEEDS:-${SEEDS%% *}}   # random init is a reference, not a WT-ST init: one seed
  FORMAT=${FORMAT:-png}
  TUNE=(--epochs "$EPOCHS" --batch-size "${BATCH:-32}" --warmup "${WARMUP:-6}" --patience "${PATIENCE:-6}" --plateau-patience "${PLATEAU:-2}")
  [ -n "${WEIGHTS:-}" ] && { echo "study.sh: WEIGHTS is for DATA=... runs; the offline study pretrains its own" >&2; exit 2; }
else                                   # your own data: ImageNet (or WEIGHTS) -> DATA
  OFFLINE=0
  MODELS=${MODEL:-${MODELS:-deit_s}}
  WEIGHTS=${WEIGHTS:-imagenet}
  RI_SEEDS=${RI_SEEDS:-$SEEDS}
  FORMAT=${FORMAT:-png,pdf}
  TUNE=()
  [ -n "${EPOCHS:-}" ] && TUNE+=(--epochs "$EPOCHS")
  [ -n "${BATCH:-}" ] && TUNE+=(--batch-size "$BATCH")
  [ -n "${WARMUP:-}" ] && TUNE+=(--warmup "$WARMUP")
  [ -n "${PATIENCE:-}" ] && TUNE+=(--patience "$PATIENCE")
  [ -n "${PLATEAU:-}" ] && TUNE+=(--plateau-patience "$PLATEAU")
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

model_facts() {  # "N attention": WT-ST module groups of model $1 at size $2, and 1 if it has global attention (asks models.py)
  $PY -c 'import sys, torch, models
with torch.device("meta"):
    m = models.create_model(sys.argv[1], num_classes=2, img_size=int(sys.argv[2]))
print(len(m.wtst_groups()), int(bool(m.attention_layers())))' "$1" "$2"
}

q() { printf '%q ' "$@"; }  # one shell-quoted job line

jobs_for() {  # the job lines of one model: $1 model, $2 image size ("" = the dataset's), $3 lr ("" = train.py's),
              # $4 N, $5 1 if it has attention, $6 source lr, $7 source pretraining epochs
  local model=$1 size=$2 lr=$3 N=$4 attn=$5 slr=$6 sepochs=$7 seed n weights run ref marker
  local img=() opt=() sopt=()
  [ -n "$size" ] && img=(--img-size "$size")
  [ -n "$lr" ] && opt=(--lr "$lr")
  [ -n "$slr" ] && sopt=(--lr "$slr")
  local ns=${NS:-"0 $(( N / 2 )) $N"}
  if [ "$OFFLINE" = 1 ]; then
    local src="$RUNS/source/$model-$SOURCE"
    echo "$(q train.py --model "$model" --data "$SOURCE" --init ri "${img[@]}" "${sopt[@]}" --epochs "$sepochs" \
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
    [[ " $RI_SEEDS " == *" $seed "* ]] || continue
    echo "$(q train.py --model "$model" "${DATA_ARGS[@]}" --init ri "${img[@]}" "${opt[@]}" "${TUNE[@]}" \
        --seed "$seed" "${TRAIN[@]}" --out "$RUNS/target/$model-$DATA-ri-s$seed" --resume)"
  done
  local first=${ns%% *} last=${ns##* } seed0=${SEEDS%% *} metric
  for seed in $SEEDS; do
    for n in $ns ri; do
      [ "$n" = ri ] && [[ " $RI_SEEDS " != *" $seed "* ]] && continue
      [ "$n" = ri ] && run="$RUNS/target/$model-$DATA-ri-s$seed" || run="$RUNS/target/$model-$DATA-n$n-s$seed"
      # re-init (the slowest analysis) on the first seed's WT run only; the marker is the last
      # file analyze.py writes: present = this run's analyses are done
      if [ "$seed" = "$seed0" ] && [ "$n" = "$last" ]; then
        metric=(--metric all) marker=reinit.json
      else
        metric=(--metric all --skip reinit)
        [ "$attn" = 1 ] && marker=attention.json || marker=knn.json
      fi
      [ -f "$run/analysis/$marker" ] && continue
      ref=()
      [ "$n" = "$last" ] && ref=(--ref "$RUNS/target/$model-$DATA-n$first-s$seed")  # WT vs ST
      echo "$(q analyze.py --run "$run" "${metric[@]}" "${ref[@]}" "${DEV[@]}")"
    done
  done
}

if [ "$OFFLINE" = 1 ]; then
  echo "== offline study: source '$SOURCE' (pretraining), target '$DATA'; models {$MODELS}, seeds {$SEEDS}"
else
  echo "== study on '$DATA' from weights '$WEIGHTS': models {$MODELS}, seeds {$SEEDS}"
fi
pids=() names=()
for entry in $MODELS; do             # model[:size[:lr[:source lr[:source epochs]]]]
  IFS=: read -r model size lr slr sepochs <<< "$entry"
  size=${SIZE:-$size}
  lr=${LR:-$lr}
  slr=${slr:-$lr}
  facts=$(model_facts "$model" "${size:-224}")
  read -r N attn <<< "$facts"
  echo "   $model: N = $N module groups, image size ${size:-the dataset's}, lr ${lr:-train.py's}, log $RUNS/logs/$model.log"
  sepochs=${SOURCE_EPOCHS:-${sepochs:-3}}
  ( jobs_for "$model" "$size" "$lr" "$N" "$attn" "$slr" "$sepochs" | OMP_NUM_THREADS=$THREADS $PY -c "$RUNNER" > "$RUNS/logs/$model.log" 2>&1 ) &
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
$PY plots.py --runs "$RUNS/target" --out "$FIGURES" --format "$FORMAT"
echo "figures: $(cd "$FIGURES" && pwd)"
