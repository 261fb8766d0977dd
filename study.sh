#!/usr/bin/env bash
# The whole study, end to end: WT-ST-n/m sweep, every analysis, the figures, table.md and findings.md.
# A thin wrapper over sweep.py (the plan of jobs and how they run; `python sweep.py --help`):
#   bash study.sh                                            # offline: shapes -> lesions, ResNet18 and DeiT-T
#   DATA=folder DATA_ROOT=/data/mine MODEL=deit_s bash study.sh  # your own data, from ImageNet weights
#   bash study.sh --executor slurm --partition gpu ...       # flags after study.sh go to sweep.py
# The environment knobs of earlier versions are sweep.py's flags (MODELS -> --models, DATA_ROOT ->
# --data-root, RI_SEEDS -> --ri-seeds, ...); empty ones take the defaults: MODELS MODEL NS SEEDS
# RI_SEEDS EPOCHS SIZE LR BATCH SOURCE_EPOCHS WARMUP PATIENCE PLATEAU SOURCE TARGET DATA DATA_ROOT
# WEIGHTS SUBSET RUNS FIGURES FORMAT DEVICE WORKERS THREADS; PY: the Python.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
flags=()
for knob in MODELS MODEL NS SEEDS RI_SEEDS EPOCHS SIZE LR BATCH SOURCE_EPOCHS WARMUP PATIENCE PLATEAU SOURCE TARGET \
            DATA DATA_ROOT WEIGHTS SUBSET RUNS FIGURES FORMAT DEVICE WORKERS THREADS; do
  flag=${knob,,}
  [ -n "${!knob:-}" ] && flags+=("--${flag//_/-}" "${!knob}")
done
exec "$PY" sweep.py "${flags[@]}" "$@"
