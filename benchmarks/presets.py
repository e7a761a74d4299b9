"""Named benchmark settings: how many steps, seeds and learning rates a run spends, and on what.

A preset fixes everything that changes a run's numbers (steps, evaluation schedule, batch size,
learning-rate grids, sharpness estimator); the command line may override the steps, the seeds and
the selection of optimizees and optimizers. Results written under one set of settings are never
mixed with results of another (see :func:`benchmarks.run.run_benchmark`).
"""

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """Settings of a benchmark run.

    Args:
        name: The preset's name on the command line.
        summary: One line for ``--help``.
        optimizees: Names of :data:`benchmarks.run.OPTIMIZEES` to train, or ``None`` for all of them
            (those whose data is missing are skipped and recorded as such).
        steps: Optimizer steps per run, one minibatch each.
        seeds: Runs per optimizee and optimizer, with seeds ``0 .. seeds - 1``.
        eval_points: Test-set evaluations along each run, evenly spaced; the last step is always
            one of them.
        lr_grids: Learning rates tried for each optimizer whose learning rate is tuned (SGD and
            Adam), on a validation split held out of the training set.
        tune_seeds: Runs per learning rate when tuning.
        sharpness_batch: Training images (the first ones, a fixed batch) whose loss the sharpness
            of the final parameters is measured on.
        sharpness_iterations: Power iterations of the Hessian's top-eigenvalue estimate.
        sharpness_probes: Rademacher probes of the Hessian-trace estimate.
        batch_size: Minibatch size of every step.
        workers: Runs trained at once in separate processes, one torch thread each unless told
            otherwise (``python -m benchmarks run --workers``); capped at the machine's cores.
            It changes how long a run takes, not its numbers.
    """

    name: str
    summary: str
    optimizees: tuple = None
    steps: int = 1000
    seeds: int = 3
    eval_points: int = 10
    lr_grids: dict = dataclasses.field(default_factory=dict)
    tune_seeds: int = 1
    sharpness_batch: int = 512
    sharpness_iterations: int = 20
    sharpness_probes: int = 20
    batch_size: int = 128
    workers: int = 1

    @property
    def eval_every(self):
        """Steps between test-set evaluations."""
        return max(1, self.steps // self.eval_points)

    def settings(self):
        """The fields that change a run's numbers, as a JSON-ready dict (a results file's key)."""
        return {
            "steps": self.steps,
            "eval_every": self.eval_every,
            "batch_size": self.batch_size,
            "lr_grids": {name: list(grid) for name, grid in sorted(self.lr_grids.items())},
            "tune_seeds": self.tune_seeds,
            "sharpness": {
                "batch": self.sharpness_batch,
                "iterations": self.sharpness_iterations,
                "probes": self.sharpness_probes,
            },
        }


_SMALL_GRIDS = {"sgd": (0.1, 0.3), "adam": (1e-3, 3e-3)}
_GRIDS = {"sgd": (0.03, 0.1, 0.3, 1.0), "adam": (3e-4, 1e-3, 3e-3, 1e-2)}
_WIDE_GRIDS = {"sgd": (0.01, 0.03, 0.1, 0.3, 1.0), "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)}

PRESETS = {
    preset.name: preset
    for preset in (
        Preset(
            "smoke",
            "checks that everything runs (about a minute): MLP-ReLU on MNIST, 100 steps, 1 seed, "
            "two learning rates per tuned optimizer",
            optimizees=("mlp-relu",),
            steps=100,
            seeds=1,
            eval_points=2,
            lr_grids=_SMALL_GRIDS,
            sharpness_batch=128,
            sharpness_iterations=5,
            sharpness_probes=5,
        ),
        Preset(
            "quick",
            "what `run` does without --preset (a few minutes): MLP-ReLU on MNIST, 1000 steps, "
            "3 seeds",
            optimizees=("mlp-relu",),
            steps=1000,
            seeds=3,
            eval_points=10,
            lr_grids=_GRIDS,
        ),
        # What fits an hour of a 2-core machine, two runs at once: 6 MNIST and Fashion-MNIST
        # optimizees x 11 optimizers x 3 seeds, where Entropy-SGD's 20 gradient evaluations per
        # step on Conv-Large-MNIST (about 0.13 s each on one core) dominate.
        Preset(
            "default",
            "every optimizee whose data is present, 150 steps, 3 seeds, two runs at once (under "
            "an hour on 2 CPU cores; the plan printed first estimates it for this machine)",
            steps=150,
            workers=2,
            seeds=3,
            eval_points=3,
            lr_grids=_GRIDS,
            sharpness_batch=128,
            sharpness_iterations=10,
            sharpness_probes=10,
        ),
        Preset(
            "paper",
            "the paper's horizon: every optimizee, 10,000 steps, 3 seeds, learning rates tuned at "
            "that horizon (days on a CPU)",
            steps=10_000,
            seeds=3,
            eval_points=20,
            lr_grids=_WIDE_GRIDS,
            tune_seeds=2,
            workers=2,
            sharpness_batch=1000,
            sharpness_iterations=20,
            sharpness_probes=30,
        ),
    )
}
DEFAULT_PRESET = "quick"
