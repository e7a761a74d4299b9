# Sourced by the release scripts: train_release NAME meta-trains release NAME with the caller's
# COMMON flags and EXTRA[NAME], writing runs/NAME.out and copying the run's log to
# training/logs/NAME.jsonl.
train_release() {
  local name=$1
  mkdir -p runs
  # shellcheck disable=SC2086
  .venv/bin/python -m training train --name "$name" "${COMMON[@]}" ${EXTRA[$name]} \
    > "runs/$name.out" 2>&1
  cp "runs/$name/log.jsonl" "training/logs/$name.jsonl"
}
