"""Evaluate an untrained L2O-Scale rule started like the ``scale*`` releases, as their control.

The rule is drawn with seed 0 and every coordinate's initial log step size at -5.9078 (a step of
1e-3), saved to ``runs/scale-untrained`` and evaluated exactly as the releases are (MLP-ReLU and
Conv-MNIST, 1000 and 3000 steps, 3 seeds) into ``training/results/scale-untrained.json``, kept
apart from the release table. Run from the checkout: ``.venv/bin/python
scripts/scale_untrained_control.py`` (about 15 minutes on one core).
"""

import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flatopt  # noqa: E402
from training.data import load_dataset  # noqa: E402
from training.evaluation import evaluate_releases  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rule = flatopt.ScaleUpdateRule(initial_log_lr=-5.9078)
    flatopt.save_release(rule, ROOT / "runs" / "scale-untrained", name="scale-untrained")
    evaluate_releases(
        ["scale-untrained"],
        load_dataset("mnist"),
        ROOT / "training" / "results" / "scale-untrained.json",
        release_root=ROOT / "runs",
    )
