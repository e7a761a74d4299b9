"""Helpers of the meta-training tests: the Scale recipe's settings and an exact-resume check."""

import json

import torch

from training.meta import MetaTrainer

# The L2O-Scale recipe at test size.
SCALE = {
    "architecture": "scale",
    "optimizee": "scale-cnn",
    "meta_optimizer": "rmsprop",
    "meta_objective": "log-loss-ratio",
    "unroll_lengths": "exponential",
    "unroll_length": 5,
    "min_unroll_length": 2,
}


def log_records(run_dir):
    """A run's log records without their wall times."""
    lines = (run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in lines]


def assert_resume_matches_straight_run(recipe, dataset, tmp_path, until):
    """Run ``recipe`` straight and stopped after ``until`` epochs then resumed; assert they agree.

    Returns:
        The straight run's log records.
    """
    straight = MetaTrainer(recipe, dataset, tmp_path / "straight", progress=False)
    straight.run()

    MetaTrainer(recipe, dataset, tmp_path / "resumed", progress=False).run(until=until)
    resumed = MetaTrainer(recipe, dataset, tmp_path / "resumed", progress=False)
    resumed.run()

    assert resumed.epoch == straight.epoch == recipe.imitation_epochs + recipe.meta_epochs
    for name, tensor in straight.update_rule.state_dict().items():
        assert torch.equal(tensor, resumed.update_rule.state_dict()[name]), name
    assert resumed.best == straight.best
    assert log_records(tmp_path / "resumed") == log_records(tmp_path / "straight")
    return log_records(tmp_path / "straight")
