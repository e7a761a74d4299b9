#!/usr/bin/env bash
# Set up a checkout from scratch: a virtual environment in .venv with torch (CPU build) and the
# tools, flatopt installed from its freshly built wheel, and the real datasets fetched and verified.
# Safe to run again; it only redoes what is missing, but always rebuilds and reinstalls the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet "torch==${TORCH_VERSION}"
fi
.venv/bin/pip install --quiet -r requirements-dev.txt

# Fashion-MNIST's official files come from Debian's package where a network to the usual mirrors
# is missing; MNIST needs no system package (the loader fetches and verifies it itself).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST will need its files by hand" >&2
fi

rm -rf build dist ./*.egg-info
.venv/bin/pip wheel --quiet --no-deps --no-build-isolation -w dist .
.venv/bin/pip install --quiet --no-deps --force-reinstall dist/flatopt-*.whl

.venv/bin/python -m training data
