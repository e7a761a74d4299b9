#!/usr/bin/env bash
# Meta-train the five L2O-DM-CL releases on this machine, two at a time (one CPU thread each).
# Each run checkpoints every epoch in runs/NAME; rerunning this script resumes where it stopped.
# Output: runs/NAME.out; each run's log is copied to training/logs/NAME.jsonl. Then evaluate with
#   .venv/bin/python -m training evaluate adam dm-cl dm-cl-hessian-trace ... --threads 1
# Usage: bash scripts/train_releases.sh [NAME ...]
set -euo pipefail
cd "$(dirname "$0")/.."

COMMON=(--init-weights dm --imitation-epochs 0 --curriculum 100 200 500
        --stage-imitation-probabilities 0.2 0.1 0.1 --meta-epochs 30 --validate-every 2
        --stage-patience 3 --step-scales 1 0.7 0.5 0.35 0.25 --threads 1)

declare -A EXTRA=(
  [dm-cl]=""
  [dm-cl-hessian-trace]="--regularizer hessian-trace --reg-lambda 1e-2"
  [dm-cl-hessian-ev]="--regularizer hessian-ev --reg-lambda 3e-2"
  [dm-cl-jacobian-trace]="--regularizer jacobian-trace --reg-lambda 1"
  [dm-cl-entropy]="--regularizer entropy --reg-lambda 1e4"
)

# shellcheck source=scripts/release_run.sh
source scripts/release_run.sh

mkdir -p runs
if [ $# -gt 0 ]; then
  for name in "$@"; do train_release "$name"; done
  exit 0
fi
(train_release dm-cl; train_release dm-cl-jacobian-trace; train_release dm-cl-entropy) &
(train_release dm-cl-hessian-trace; train_release dm-cl-hessian-ev) &
wait
