#!/usr/bin/env bash
# The whole study, end to end: WT-ST-n/m sweep, every analysis, the figures and findings.md.
#
# Offline (default, no data, no downloads; measured: under 10 minutes on 2 CPU cores, see the README):
#   1. pretrain each model from random init on `shapes` (the stand-in for ImageNet: 3,840
#      training images, 8 classes = 4 object shapes x dark/light scene, on textured
#      backgrounds), once; its best.pt is the "WT" weights
#   2. fine-tune on `lesions` (the stand-in for a small medical set: 256 dermoscopy-like
#      training images, 4 classes by the lesion's outline) with WT-ST-n/m for n = 0, N/2, N,
#      3 seeds, and random init (RI, first seed); a CNN and a ViT, their jobs shared by 2 workers
#   3. run every analysis on every run (CKA of WT against ST with --ref; re-init, the slowest,
#      on the first seed's WT run only)
#   4. write the figures, table.md and findings.md (which of the paper's findings F1-F4 hold).
# Your own data: DATA=folder DATA_ROOT=/data/mine MODEL=deit_s bash study.sh (or DATA=aptos, ...):
#   the same sweep from the ImageNet weights (WEIGHTS=imagenet, or WEIGHTS=<checkpoint file>),
#   no source pretraining, train.py's recipe (100 epochs with early stopping) unless EPOCHS is set.
# Safe to re-run: finished runs and analyses are skipped (--resume), killed runs continue.
# Settings (environment variables):
#   MODELS   model[:img size[:lr[:source lr[:source epochs[:epochs[:batch]]]]]] entries; empty
#            fields take the defaults (offline default
#            "resnet18:32:2e-3:1e-3:2:5:16 deit_t:48:1e-3:3e-4:5:5:32"; own data "deit_s"); MODEL= one entry
#   SOURCE, TARGET: the offline tasks (default shapes, lesions)
#   NS       n values of WT-ST-n/m (default "0 N/2 N" of each model); SEEDS (default "0 1 2");
#            RI_SEEDS (offline default: the first seed; own data: SEEDS)
#   EPOCHS, SIZE, LR and BATCH (all models, over MODELS), WARMUP, PATIENCE, PLATEAU: fine-tuning
#            settings (offline defaults: per model, then 6, 6, 2; PATIENCE and PLATEAU count validations)
#   SOURCE_EPOCHS: source pretraining epochs (all models); DATA, DATA_ROOT, WEIGHTS: your own data
#   FORMAT   figure formats (offline default png; own data png,pdf)
#   RUNS, FIGURES: output folders; PY: the Python; DEVICE (default cpu offline, else auto)
#   SUBSET: at most this many images per split in every run (quick checks, tests)
#   WORKERS: parallel Python processes sharing the jobs (default: one per model)
#   THREADS: torch threads per worker (default: cores / workers, at least 1)
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
  MODELS=${MODEL:-${MODELS:-"resnet18:32:2e-3:1e-3:2:5:16 deit_t:48:1e-3:3e-4:5:5:32"}}
  DEVICE=${DEVICE:-cpu}
  RI_SEEDS=${RI_SEEDS:-${SEEDS%% *}}   # random init is a reference, not a WT-ST init: one seed
  FORMAT=${FORMAT:-png}
  TUNE=(--warmup "${WARMUP:-6}" --patience "${PATIENCE:-6}" --plateau-patience "${PLATEAU:-2}")
  [ -n "${WEIGHTS:-}" ] && { echo "study.sh: WEIGHTS is for DATA=... runs; the offline study pretrains its own" >&2; exit 2; }
else                                   # your own data: ImageNet (or WEIGHTS) -> DATA
  OFFLINE=0
  MODELS=${MODEL:-${MODELS:-deit_s}}
  WEIGHTS=${WEIGHTS:-imagenet}
  RI_SEEDS=${RI_SEEDS:-$SEEDS}
  FORMAT=${FORMAT:-png,pdf}
  TUNE=()
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
count() {  # $1 names a whole number >= 1, else a one-line error (exit 2)
  [[ ${!1} =~ ^[1-9][0-9]*$ ]] || { echo "study.sh: $1=${!1}: expected a whole number >= 1" >&2; exit 2; }
}
WORKERS=${WORKERS:-$NMODELS}
count WORKERS
THREADS=${THREADS:-$(( CORES / WORKERS > 0 ? CORES / WORKERS : 1 ))}
count THREADS
LOGS=$RUNS/logs

# Every job (source pretraining, target run, analysis) is a line of $LOGS/jobs.tsv: id, model,
# "script.py args", then the ids of the jobs it needs. WORKERS Python processes share that queue:
# each takes the first unclaimed job whose inputs are done (claims/<i> holds the worker's pid,
# claims/<i>.done marks it finished), so a core never idles while another model has work left.
# One process runs many jobs (train.main / analyze.main): torch is imported once, not ~25 times.
# A job's output goes to its model's log; the first failure stops every worker.
RUNNER='
import contextlib, importlib, os, shlex, sys, time, traceback
logs = sys.argv[1]
jobs = [line.rstrip("\n").split("\t") for line in open(os.path.join(logs, "jobs.tsv")) if line.strip()]
index = {job[0]: i for i, job in enumerate(jobs)}
claim = lambda i, what="": os.path.join(logs, "claims", f"{i}{what}")
done = lambda i: os.path.exists(claim(i, ".done"))
failed = os.path.join(logs, "failed")

def alive(i):  # the worker that claimed job i is still running (no pid yet: it is just starting)
    try:
        os.kill(int(open(claim(i)).read() or 0), 0)
        return True
    except (OSError, ValueError):
        return False

def stop(model):  # the first failure: every worker stops; study.sh prints the log of this model
    with open(failed, "w") as f:
        f.write(model)
    sys.exit(1)

def run(i):
    model, line = jobs[i][1], jobs[i][2]
    with open(os.path.join(logs, model + ".log"), "a") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print("$ python " + line.strip(), flush=True)
        try:
            script, *argv = shlex.split(line)
            rc = importlib.import_module(script[:-3]).main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) or e.code is None else 1
        except BaseException:
            traceback.print_exc()
            rc = 1
    if rc:
        stop(model)
    open(claim(i, ".done"), "w").close()

while not os.path.exists(failed):
    todo = [i for i in range(len(jobs)) if not os.path.exists(claim(i))]
    if not todo:
        break
    for i in todo:
        needs = [index[d] for d in jobs[i][3:] if d in index]
        dead = [d for d in needs if os.path.exists(claim(d)) and not done(d) and not alive(d)]
        if dead:
            stop(jobs[dead[0]][1])  # the worker of an input job died without a word (killed)
        if not all(done(d) for d in needs):
            continue
        try:
            fd = os.open(claim(i), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue  # another worker took it
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        run(i)
        break
    else:
        time.sleep(0.2)  # every job left waits for an input that another worker is making
sys.exit(1 if os.path.exists(failed) else 0)
'

model_facts() {  # one line "N attention" per (model, size) pair of arguments: its WT-ST module
                 # groups, and 1 if it has global attention (asks models.py; one torch import for all)
  $PY -c 'import sys, torch, models
args = sys.argv[1:]
for name, size in zip(args[::2], args[1::2]):
    try:
        with torch.device("meta"):
            m = models.create_model(name, num_classes=2, img_size=int(size))
    except ValueError as e:
        sys.exit(print(f"study.sh: MODELS entry {name} at size {size}: {e}", file=sys.stderr) or 2)
    print(len(m.wtst_groups()), int(bool(m.attention_layers())))' "$@"
}

q() { printf '%q ' "$@"; }  # one shell-quoted command
job() {  # one line of jobs.tsv: $1 id, $2 model, $3 command, then the ids of the jobs it needs
  printf '%s\t' "$1" "$2"
  printf '%s' "$3"
  shift 3
  [ $# = 0 ] || printf '\t%s' "$@"
  printf '\n'
}

ri_seed() { [[ " $RI_SEEDS " == *" $1 "* ]]; }  # seed $1 gets an RI run

jobs_for() {  # the jobs.tsv lines of one model: $1 model, $2 image size ("" = the dataset's), $3 lr ("" = train.py's),
              # $4 N, $5 1 if it has attention, $6 source lr, $7 source pretraining epochs,
              # $8 fine-tuning epochs and $9 batch size ("" = train.py's)
  local model=$1 size=$2 lr=$3 N=$4 attn=$5 slr=$6 sepochs=$7 epochs=$8 batch=$9 seed n weights run ref marker
  local img=() opt=() sopt=()
  [ -n "$size" ] && img=(--img-size "$size")
  [ -n "$lr" ] && opt=(--lr "$lr")
  [ -n "$epochs" ] && opt+=(--epochs "$epochs")
  [ -n "$batch" ] && opt+=(--batch-size "$batch")
  [ -n "$slr" ] && sopt=(--lr "$slr")
  local ns=${NS:-"0 $(( N / 2 )) $N"}
  local src=""   # the source pretraining run: every WT-ST run needs its best.pt
  if [ "$OFFLINE" = 1 ]; then
    src="$RUNS/source/$model-$SOURCE"
    job "$src" "$model" "$(q train.py --model "$model" --data "$SOURCE" --init ri "${img[@]}" "${sopt[@]}" \
        --epochs "$sepochs" --batch-size 32 --warmup 30 --patience 10 "${TRAIN[@]}" --out "$src" --resume)"
    weights="$src/best.pt"
  else
    weights=$WEIGHTS
  fi
  for seed in $SEEDS; do
    for n in $ns; do
      run="$RUNS/target/$model-$DATA-n$n-s$seed"
      job "$run" "$model" "$(q train.py --model "$model" "${DATA_ARGS[@]}" --n "$n" --weights "$weights" "${img[@]}" \
          "${opt[@]}" "${TUNE[@]}" --seed "$seed" "${TRAIN[@]}" --out "$run" --resume)" ${src:+"$src"}
    done
    ri_seed "$seed" || continue
    run="$RUNS/target/$model-$DATA-ri-s$seed"
    job "$run" "$model" "$(q train.py --model "$model" "${DATA_ARGS[@]}" --init ri "${img[@]}" "${opt[@]}" "${TUNE[@]}" \
        --seed "$seed" "${TRAIN[@]}" --out "$run" --resume)"
  done
  local first=${ns%% *} last=${ns##* } seed0=${SEEDS%% *} metric
  for seed in $SEEDS; do
    for n in $ns ri; do
      [ "$n" = ri ] && ! ri_seed "$seed" && continue
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
      job "analyze $run" "$model" "$(q analyze.py --run "$run" "${metric[@]}" "${ref[@]}" "${DEV[@]}")" \
          "$run" ${ref[1]:+"${ref[1]}"}
    done
  done
}

if [ "$OFFLINE" = 1 ]; then
  echo "== offline study: source '$SOURCE' (pretraining), target '$DATA'; models {$MODELS}, seeds {$SEEDS}"
else
  echo "== study on '$DATA' from weights '$WEIGHTS': models {$MODELS}, seeds {$SEEDS}"
fi
pairs=() sizes=()                    # each entry's image size (SIZE overrides; "" = the dataset's)
for entry in $MODELS; do
  IFS=: read -r model size _ <<< "$entry"
  sizes+=("${SIZE:-$size}")
  pairs+=("$model" "${sizes[-1]:-224}")
done
FACTS=$(model_facts "${pairs[@]}")   # exits 2 on a bad model name or size, before anything runs
mapfile -t facts <<< "$FACTS"        # "N attention" of each entry
mkdir -p "$LOGS"
: > "$LOGS/jobs.tsv.tmp"
k=0
for entry in $MODELS; do             # model[:size[:lr[:source lr[:source epochs[:epochs[:batch]]]]]]
  IFS=: read -r model _ lr slr sepochs epochs batch <<< "$entry"
  size=${sizes[k]}
  lr=${LR:-$lr}
  epochs=${EPOCHS:-$epochs}
  batch=${BATCH:-$batch}
  [ "$OFFLINE" = 1 ] && epochs=${epochs:-5} batch=${batch:-32}
  slr=${slr:-$lr}
  read -r N attn <<< "${facts[k]}"
  shown_size="the dataset's" dflt="train.py's"
  echo "   $model: N = $N module groups, image size ${size:-$shown_size}, lr ${lr:-$dflt}, epochs ${epochs:-$dflt}, batch ${batch:-$dflt}, log $RUNS/logs/$model.log"
  sepochs=${SOURCE_EPOCHS:-${sepochs:-3}}
  jobs_for "$model" "$size" "$lr" "$N" "$attn" "$slr" "$sepochs" "$epochs" "$batch" >> "$LOGS/jobs.tsv.tmp"
  : > "$LOGS/$model.log"
  k=$(( k + 1 ))
done
mv "$LOGS/jobs.tsv.tmp" "$LOGS/jobs.tsv"
rm -rf "$LOGS/claims" "$LOGS/failed"   # the queue's state from an earlier call (finished jobs are skipped anyway)
mkdir "$LOGS/claims"
echo "   $(wc -l < "$LOGS/jobs.tsv") jobs ($LOGS/jobs.tsv) on $WORKERS workers x $THREADS threads"
pids=()
for k in $(seq "$WORKERS"); do
  OMP_NUM_THREADS=$THREADS $PY -c "$RUNNER" "$LOGS" > "$LOGS/worker$k.log" 2>&1 &
  pids+=($!)
done
fail=0
for pid in "${pids[@]}"; do
  wait "$pid" || fail=1
done
if [ "$fail" = 1 ]; then
  model=$(cat "$LOGS/failed" 2>/dev/null || true)
  if [ -n "$model" ]; then
    echo "study.sh: $model failed; the end of $LOGS/$model.log:" >&2
    tail -n 15 "$LOGS/$model.log" >&2
  else
    echo "study.sh: a worker failed; the end of its log:" >&2
    tail -n 15 "$LOGS"/worker*.log >&2
  fi
  exit 1
fi
echo "   runs and analyses done"

if [ "$OFFLINE" = 1 ]; then
  echo "== figures and findings (source pretraining runs are in $RUNS/source, not plotted)"
else
  echo "== figures and findings"
fi
$PY plots.py --runs "$RUNS/target" --out "$FIGURES" --format "$FORMAT"
echo "figures: $(cd "$FIGURES" && pwd)"
