"""Test set-up: flatopt must come from its installed wheel, training and benchmarks from the checkout."""

import os
import pathlib
import sys

import pytest

import flatopt

ROOT = pathlib.Path(__file__).resolve().parent.parent

if pathlib.Path(flatopt.__file__).resolve().parent == ROOT / "flatopt":
    raise pytest.UsageError(
        f"flatopt was imported from the checkout ({flatopt.__file__}), not from its installed wheel. "
        "Run scripts/setup.sh, then the tests with .venv/bin/pytest (not python -m pytest)."
    )
# Appended, not prepended: the checkout's flatopt folder must never shadow the installed one.
sys.path.append(str(ROOT))


def _real_dataset(name):
    """Load a real dataset, skipping the test where it cannot be had, except under CI=true."""
    from training.data import DatasetUnavailableError, load_dataset

    try:
        return load_dataset(name)
    except DatasetUnavailableError as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"real {name} unavailable: {exc}")


@pytest.fixture(scope="session")
def mnist():
    """Real MNIST (skips where unavailable, fails under CI=true)."""
    return _real_dataset("mnist")


@pytest.fixture(scope="session")
def fashion_mnist():
    """Real Fashion-MNIST (skips where unavailable, fails under CI=true)."""
    return _real_dataset("fashion-mnist")
