"""Meta-training on real MNIST: the meta-loss falls, checkpoints resume exactly, releases export."""

import dataclasses
import json
import math

import pytest
import torch

import flatopt
from tests.training.meta_cases import SCALE, assert_resume_matches_straight_run
from training.meta import MetaTrainer, Recipe, lambda_search, meta_unroll, mnist_tasks
from training.release import export_release

SHORT = dict(
    imitation_epochs=6,
    imitation_unrolls=3,
    meta_epochs=2,
    meta_unrolls=2,
    validate_every=1,
    validation_steps=30,
    validation_seeds=1,
)


def fixed_unroll_loss(rule, mnist, steps=60):
    """Mean MNIST-MLP training loss over one fixed unroll: the meta-loss on a fixed task."""
    task = mnist_tasks(mnist, "sigmoid", 128)
    params = task.init_params(seed=777)
    state = rule.initial_state(sum(p.numel() for p in params.values()))
    loss, _, _, _ = meta_unroll(
        rule, task, params, state, torch.Generator().manual_seed(777), steps
    )
    return loss.item()


def test_short_meta_training_lowers_the_meta_loss(mnist, tmp_path):
    trainer = MetaTrainer(Recipe(**SHORT), mnist, tmp_path, progress=False)
    before = fixed_unroll_loss(trainer.update_rule, mnist)
    best = trainer.run()
    after = fixed_unroll_loss(trainer.best_update_rule(), mnist)

    # A random LSTM barely trains the MLP (loss near log 10 = 2.30); a few epochs of imitation
    # followed by meta-training must cut the unrolled loss by at least a third.
    assert before > 2.0
    assert after < before * (2 / 3), (before, after)
    assert math.isfinite(best["loss"]) and best["epoch"] is not None

    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == SHORT["imitation_epochs"] + SHORT["meta_epochs"]
    first_imitation, last_imitation = log[0]["loss"], log[SHORT["imitation_epochs"] - 1]["loss"]
    assert last_imitation < 0.5 * first_imitation, (first_imitation, last_imitation)


def test_resumed_run_equals_uninterrupted_run(mnist, tmp_path):
    recipe = Recipe(
        imitation_epochs=2,
        imitation_unrolls=1,
        meta_epochs=2,
        meta_unrolls=1,
        unroll_length=5,
        validate_every=1,
        validation_steps=5,
        validation_seeds=1,
    )
    assert_resume_matches_straight_run(recipe, mnist, tmp_path, until=3)


def test_resume_with_another_recipe_is_refused(mnist, tmp_path):
    recipe = Recipe(
        imitation_epochs=1,
        imitation_unrolls=1,
        meta_epochs=0,
        unroll_length=3,
        validation_steps=5,
        validation_seeds=1,
    )
    MetaTrainer(recipe, mnist, tmp_path, progress=False).run()
    changed = dataclasses.replace(recipe, teacher_lr=0.5)
    with pytest.raises(ValueError, match="teacher_lr"):
        MetaTrainer(changed, mnist, tmp_path, progress=False).run()


def test_exported_release_loads_with_provenance(tmp_path):
    torch.manual_seed(0)
    rule = flatopt.LSTMUpdateRule()
    evaluation = {
        "mnist-mlp-relu": {
            "steps": 10,
            "seeds": 1,
            "test_accuracy_mean": 0.5,
            "test_accuracy_std": 0.0,
            "test_accuracies": [0.5],
        }
    }
    validation = {"loss": 1.0, "accuracy": 0.5, "epoch": 3, "phase": "imitation", "steps": 20}
    folder = export_release(
        rule,
        tmp_path / "rel",
        "trial",
        dataclasses.asdict(Recipe()),
        "python -m training train",
        "0" * 40,
        12.5,
        validation,
        evaluation,
        "A trial release.",
    )
    loaded, config = flatopt.load_release(folder)
    assert config["name"] == "trial"
    assert config["provenance"]["seed"] == 0
    assert config["provenance"]["recipe"]["imitation_epochs"] == Recipe().imitation_epochs
    assert "A trial release." in (folder / "README.md").read_text()
    for name, tensor in rule.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])


@pytest.mark.parametrize(
    "regularizer, options",
    [
        ("hessian-trace", {"reg_probes": 2}),
        ("hessian-ev", {"reg_iterations": 3}),
        ("jacobian-trace", {}),
        ("entropy", {"entropy_gamma": 1.0, "entropy_steps": 3}),
    ],
)
@pytest.mark.parametrize("rule", [{}, {**SCALE, "unroll_lengths": "fixed"}], ids=["lstm", "scale"])
def test_each_regularizer_reaches_the_update_rule_weights(
    mnist, tmp_path, regularizer, options, rule
):
    settings = {"unroll_length": 5, **rule}
    recipe = Recipe(
        **settings,
        imitation_epochs=0,
        meta_epochs=1,
        meta_unrolls=1,
        regularizer=regularizer,
        reg_lambda=1.0,
        **options,
    )
    plain = MetaTrainer(
        dataclasses.replace(recipe, regularizer="none"), mnist, tmp_path / "plain", progress=False
    )
    regularized = MetaTrainer(recipe, mnist, tmp_path / "reg", progress=False)
    regularized.update_rule.load_state_dict(plain.update_rule.state_dict())

    plain.train_epoch(0)
    record = regularized.train_epoch(0)

    # Same optimizee, minibatches and starting weights: only the regularizer differs.
    assert record["regularizer"] == regularizer and math.isfinite(record["regularizer_value"])
    assert record["regularizer_grad_ratio"] > 1e-3, record
    changed = [
        not torch.equal(a, b)
        for a, b in zip(plain.update_rule.parameters(), regularized.update_rule.parameters())
    ]
    assert any(changed)


def test_curriculum_advances_on_improvement_and_stops_without(mnist, tmp_path, monkeypatch):
    recipe = Recipe(
        imitation_epochs=1,
        imitation_unrolls=1,
        unroll_length=5,
        curriculum=[10, 20],
        meta_epochs=20,
        validate_every=1,
        stage_patience=1,
        validation_seeds=1,
    )
    trainer = MetaTrainer(recipe, mnist, tmp_path, progress=False)
    # Scripted validation losses: stage 0 baseline, an improvement, a stale validation (the stage
    # ends and advances), stage 1 baseline, a stale validation (the stage ends: no improvement).
    scores = iter([1.0, 0.9, 0.95, 0.8, 0.85])
    horizons, snapshots = [], []

    def scripted_score():
        horizons.append((trainer.meta_unrolls(), trainer.validation_steps()))
        snapshots.append({k: v.clone() for k, v in trainer.update_rule.state_dict().items()})
        return {"loss": next(scores), "accuracy": 0.5}

    monkeypatch.setattr(trainer, "_score", scripted_score)
    trainer.run()

    assert trainer.finished and trainer.epoch == 1 + 3
    assert horizons == [(2, 20), (2, 20), (2, 20), (4, 40), (4, 40)]
    assert trainer.best["loss"] == 0.9
    decisions = [
        json.loads(line).get("validation", {}).get("decision")
        for line in (tmp_path / "log.jsonl").read_text().splitlines()
    ]
    assert [d for d in decisions if d] == [
        "stage improved; advancing to stage 1",
        "stage did not improve; stopping",
    ]
    # Both the next stage and the final update rule start from the best weights, not the latest.
    for name, tensor in snapshots[1].items():
        assert torch.equal(snapshots[3][name], tensor)
        assert torch.equal(trainer.update_rule.state_dict()[name], tensor)


def test_stage_imitation_probabilities_choose_each_stages_epochs(mnist, tmp_path, monkeypatch):
    recipe = Recipe(
        imitation_epochs=0,
        imitation_unrolls=1,
        unroll_length=5,
        curriculum=[10, 20],
        stage_imitation_probabilities=[1.0, 0.0],
        meta_epochs=4,
        validate_every=1,
        stage_patience=1,
        validation_seeds=1,
    )
    trainer = MetaTrainer(recipe, mnist, tmp_path, progress=False)
    # Stage 0: baseline, an improvement, a stale validation (advance); stage 1 runs to the end.
    scores = iter([1.0, 0.9, 0.95, 0.8, 0.7, 0.6])
    monkeypatch.setattr(trainer, "_score", lambda: {"loss": next(scores), "accuracy": 0.5})
    trainer.run()

    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    phases = [(r["stage"], r["phase"]) for r in records if "phase" in r]
    assert phases == [(0, "imitation"), (0, "imitation"), (1, "meta"), (1, "meta")]


def test_stage_imitation_probabilities_need_one_value_per_stage():
    with pytest.raises(ValueError, match="one value per curriculum stage"):
        Recipe(curriculum=[10, 20], stage_imitation_probabilities=[0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Recipe(curriculum=[10], stage_imitation_probabilities=[1.5])


def test_a_users_own_optimizee_is_meta_trained_without_editing_the_trainer(fashion_mnist, tmp_path):
    from torch import nn

    from training.optimizees import holdout_task

    def small_convnet():
        return nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),
            nn.Conv2d(1, 4, 5, stride=3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 8 * 8, 10),
        )

    seen = []

    def make_task(activation):
        seen.append(activation)
        return holdout_task(small_convnet, fashion_mnist, "small-convnet", batch_size=32)

    recipe = Recipe(
        init_weights="dm",
        imitation_epochs=0,
        meta_epochs=2,
        meta_unrolls=2,
        unroll_length=5,
        validate_every=1,
        validation_steps=10,
        validation_seeds=1,
    )
    trainer = MetaTrainer(recipe, None, tmp_path, progress=False, make_task=make_task)
    start = {k: v.clone() for k, v in trainer.update_rule.state_dict().items()}
    trainer.run()

    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {r["optimizee"] for r in records} == {"fashion-mnist-small-convnet"}
    assert all(math.isfinite(r["loss"]) for r in records)
    assert seen and set(seen) == {"sigmoid"}
    assert math.isfinite(trainer.best["loss"])
    moved = trainer.update_rule.state_dict()
    assert any(not torch.equal(moved[k], start[k]) for k in start)


def test_lambda_search_logs_a_gradient_share_proportional_to_lambda(mnist, tmp_path):
    recipe = Recipe(
        imitation_epochs=0,
        meta_epochs=1,
        meta_unrolls=1,
        unroll_length=5,
        regularizer="jacobian-trace",
        validation_steps=5,
        validation_seeds=1,
    )
    results = lambda_search(recipe, mnist, [0.1, 1.0], tmp_path, progress=False)

    # Same start, same minibatches: the regularizer's gradient scales with lambda, the loss's does not.
    small, large = results
    assert large["grad_ratio"] == pytest.approx(10 * small["grad_ratio"], rel=1e-4)
    assert small["regularizer_value"] == pytest.approx(large["regularizer_value"])
    saved = json.loads((tmp_path / "lambda_search.json").read_text())
    assert [r["lambda"] for r in saved["results"]] == [0.1, 1.0]
