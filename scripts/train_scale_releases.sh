#!/usr/bin/env bash
# Meta-train the L2O-Scale releases on this machine, all five at once (one CPU thread each; on two
# cores each gets about half of one). Every run starts from the same freshly initialised update
# rule (seed 0) with the step size of every coordinate at 1e-3 (log 1e-3 + 1, the learned offset
# starting at -1), and only the regularizer differs.
# Each run checkpoints every epoch in runs/NAME; rerunning this script resumes where it stopped.
# Output: runs/NAME.out; each run's log is copied to training/logs/NAME.jsonl. Then evaluate with
#   .venv/bin/python -m training evaluate scale scale-hessian-trace ... --threads 1
# Usage: bash scripts/train_scale_releases.sh [NAME ...]
set -euo pipefail
cd "$(dirname "$0")/.."

COMMON=(--architecture scale --optimizee scale-cnn --meta-optimizer rmsprop
        --meta-objective log-loss-ratio --unroll-lengths exponential --initial-log-lr -5.9078
        --imitation-epochs 0 --meta-lr 1e-3 --curriculum 100 200 500 --meta-epochs 20
        --validate-every 2 --stage-patience 2 --step-scales 2 1 0.5 --calibration-steps 500
        --threads 1)

declare -A EXTRA=(
  [scale]=""
  [scale-hessian-trace]="--regularizer hessian-trace --reg-lambda 5e-5"
  [scale-hessian-ev]="--regularizer hessian-ev --reg-lambda 5e-5"
  [scale-jacobian-trace]="--regularizer jacobian-trace --reg-lambda 5e-5"
  [scale-entropy]="--regularizer entropy --reg-lambda 1e3"
)

# shellcheck source=scripts/release_run.sh
source scripts/release_run.sh

mkdir -p runs
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  names=(scale scale-hessian-trace scale-hessian-ev scale-jacobian-trace scale-entropy)
fi
for name in "${names[@]}"; do train_release "$name" & done
wait
