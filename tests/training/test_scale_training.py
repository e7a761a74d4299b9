"""Meta-training the hierarchical RNN (L2O-Scale) on real MNIST, with the LSTM's own trainer."""

import dataclasses
import functools
import json
import math

import pytest
import torch

import flatopt
from tests.training.meta_cases import SCALE, assert_resume_matches_straight_run
from training.meta import (
    MetaTrainer,
    Recipe,
    calibration_record,
    draw_unroll_lengths,
    initial_rule_state,
    log_loss_ratio,
    mean_loss,
    meta_unroll,
    mnist_tasks,
    scaled_update_rule,
)
from training.release import describe, export_release

# The L2O-Scale recipe at test size.


def fixed_unroll_loss(rule, mnist, steps=20):
    """Mean scale-cnn training loss over one fixed unroll: the meta-loss of a fixed task."""
    task = mnist_tasks(mnist, "relu", 128, optimizee="scale-cnn")
    params = task.init_params(seed=777)
    state = initial_rule_state(rule, [p.numel() for p in params.values()])
    loss, _, _, _ = meta_unroll(
        rule, task, params, state, torch.Generator().manual_seed(777), steps
    )
    return loss.item()


def test_scale_cnn_is_the_l2o_scale_convnet(mnist):
    task = mnist_tasks(mnist, "sigmoid", 128, optimizee="scale-cnn")
    params = task.init_params(seed=0)

    # Conv 8 3x3 and conv 8 5x5 without biases, "same" padding and no pooling, then linear.
    assert {n: tuple(p.shape) for n, p in params.items()} == {
        "1.weight": (8, 1, 3, 3),
        "3.weight": (8, 8, 5, 5),
        "6.weight": (10, 8 * 28 * 28),
        "6.bias": (10,),
    }
    assert task.name == "mnist-scale-cnn"
    weights = torch.cat([p.reshape(-1) for p in params.values()])
    assert weights.std().item() == pytest.approx(0.01, rel=0.05)


def test_log_loss_ratio_of_a_scripted_loss_sequence():
    losses = [torch.tensor(value, requires_grad=True) for value in (2.0, 1.0, 0.5)]
    initial = 2.0

    value = log_loss_ratio(losses, initial)

    # (1/3) [log(2/2) + log(1/2) + log(0.5/2)] = (1/3) (0 - log 2 - 2 log 2) = -log 2,
    # up to the epsilon 1e-6 in the denominator and inside the log.
    assert value.item() == pytest.approx(-math.log(2.0), abs=2e-6)
    eps = 1e-6
    exact = sum(math.log(x / (initial + eps) + eps) for x in (2.0, 1.0, 0.5)) / 3
    assert value.item() == pytest.approx(exact, rel=1e-6)
    # d/dl_t = 1 / (3 (l_t + eps (l_0 + eps))): each step's loss weighs by its inverse.
    value.backward()
    for loss in losses:
        assert loss.grad.item() == pytest.approx(1 / (3 * loss.item()), rel=1e-5)


def test_log_loss_ratio_is_taken_against_the_loss_at_the_initial_weights(mnist, tmp_path):
    recipe = Recipe(**SCALE, imitation_epochs=0, meta_epochs=1)
    trainer = MetaTrainer(recipe, mnist, tmp_path, progress=False)
    task = trainer.make_task(recipe.meta_activation)
    optimizee = trainer._new_optimizee(task, 0, 0)
    start = {n: p.clone() for n, p in optimizee.params.items()}

    first, _, _, _ = meta_unroll(
        trainer.update_rule,
        task,
        optimizee.params,
        optimizee.rule_state,
        optimizee.generator,
        1,
        objective=mean_loss,
    )

    # The reference is the first step's minibatch loss at the initial weights, and drawing it
    # left the optimizee's own minibatches where they were.
    assert optimizee.initial_loss == first.item()
    assert optimizee.initial_loss > 2.0  # near log 10 at the convnet's small initial weights
    again, _, _, _ = meta_unroll(
        trainer.update_rule,
        task,
        start,
        initial_rule_state(trainer.update_rule, [p.numel() for p in start.values()]),
        torch.Generator().manual_seed(optimizee.generator.initial_seed()),
        1,
        objective=functools.partial(log_loss_ratio, initial_loss=optimizee.initial_loss),
    )
    assert again.item() == pytest.approx(0.0, abs=1e-5)


def test_short_scale_meta_training_lowers_the_meta_loss(mnist, tmp_path):
    recipe = Recipe(
        **SCALE,
        imitation_epochs=6,
        imitation_unrolls=2,
        imitation_meta_lr=3e-2,
        meta_epochs=2,
        meta_unrolls=2,
        meta_lr=1e-2,
        validate_every=2,
        validation_steps=5,
        validation_seeds=1,
    )
    trainer = MetaTrainer(recipe, mnist, tmp_path, progress=False)
    start = {k: v.clone() for k, v in trainer.update_rule.state_dict().items()}
    before = fixed_unroll_loss(trainer.update_rule, mnist)
    trainer.run()
    after = fixed_unroll_loss(trainer.best_update_rule(), mnist)

    # The untrained rule's steps (about 4e-5 per coordinate) leave the convnet near log 10; a few
    # epochs of imitation and meta-training must take a sixth off the unrolled loss.
    assert before > 2.2
    assert after < before * (5 / 6), (before, after)
    weights = trainer.update_rule.state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(not torch.equal(weights[k], start[k]) for k in start)

    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    meta = [r for r in log if r["phase"] == "meta"]
    assert len(meta) == 2 and all(r["optimizee"] == "mnist-scale-cnn" for r in log)
    # A log loss ratio below zero: the optimizee's loss fell below its initial value.
    assert all(math.isfinite(r["loss"]) for r in meta) and meta[-1]["loss"] < 0


def test_unroll_lengths_are_drawn_from_the_seed():
    recipe = Recipe(unroll_lengths="exponential", unroll_length=50, min_unroll_length=10)

    def draw(seed, count=2000):
        return draw_unroll_lengths(recipe, count, torch.Generator().manual_seed(seed))

    lengths = draw(0)
    assert lengths == draw(0)
    assert lengths != draw(1)
    assert min(lengths) >= 10 and max(lengths) > 100
    assert sum(lengths) / len(lengths) == pytest.approx(50, rel=0.1)

    fixed = Recipe(unroll_length=7)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert draw_unroll_lengths(fixed, 3, generator) == [7, 7, 7]
    assert torch.equal(generator.get_state(), state)  # nothing drawn: old runs stay as they were


def test_resumed_scale_run_equals_uninterrupted_run(mnist, tmp_path):
    recipe = Recipe(
        **SCALE,
        imitation_epochs=1,
        imitation_unrolls=1,
        meta_epochs=2,
        meta_unrolls=2,
        validate_every=1,
        validation_steps=5,
        validation_seeds=1,
    )
    records = assert_resume_matches_straight_run(recipe, mnist, tmp_path, until=2)

    lengths = [r["unroll_lengths"] for r in records]
    assert [len(drawn) for drawn in lengths] == [1, 2, 2]
    assert min(min(drawn) for drawn in lengths) >= 2
    assert lengths[1] != lengths[2]  # drawn anew each epoch


def test_the_recipe_chooses_the_update_rule_and_meta_optimizer(mnist, tmp_path):
    scale = MetaTrainer(Recipe(**SCALE), mnist, tmp_path / "scale", progress=False)
    assert isinstance(scale.update_rule, flatopt.ScaleUpdateRule)
    assert scale.update_rule.config() == flatopt.ScaleUpdateRule().config()
    assert isinstance(scale.meta_optimizer, torch.optim.RMSprop)
    assert scale.meta_optimizer.defaults["alpha"] == 0.9
    assert isinstance(scale.best_update_rule(), flatopt.ScaleUpdateRule)

    started = MetaTrainer(
        Recipe(**SCALE, initial_log_lr=-6.5), mnist, tmp_path / "started", progress=False
    )
    assert started.update_rule.config()["initial_log_lr"] == -6.5
    first = started.update_rule.initial_state(3)
    assert torch.all(first["coordinate_state"][:, -3] == -6.5)  # (..., log_lr, two decays)

    default = MetaTrainer(Recipe(), mnist, tmp_path / "default", progress=False)
    assert isinstance(default.update_rule, flatopt.LSTMUpdateRule)
    assert isinstance(default.meta_optimizer, torch.optim.Adam)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"architecture": "transformer"}, "unknown architecture"),
        ({"optimizee": "resnet"}, "unknown optimizee"),
        ({"meta_optimizer": "sgd"}, "unknown meta_optimizer"),
        ({"meta_objective": "final-loss"}, "unknown meta_objective"),
        ({"unroll_lengths": "uniform"}, "unknown unroll_lengths"),
        ({"min_unroll_length": 0}, "min_unroll_length must be at least 1"),
        (
            {"unroll_lengths": "exponential", "unroll_length": 5, "min_unroll_length": 6},
            "exceeds the mean unroll_length",
        ),
        ({"initial_log_lr": -6.0}, "hierarchical RNN only"),
        ({**SCALE, "initial_log_lr": 40.0}, "initial_log_lr must lie in"),
        ({**SCALE, "initial_log_lr": math.nan}, "initial_log_lr must lie in"),
    ],
)
def test_bad_scale_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        Recipe(**settings)


def test_a_warm_start_must_match_the_architecture(mnist, tmp_path):
    with pytest.raises(ValueError, match="--architecture lstm"):
        MetaTrainer(Recipe(**SCALE, init_weights="dm"), mnist, tmp_path, progress=False)

    torch.manual_seed(3)
    release = flatopt.save_release(flatopt.ScaleUpdateRule(), tmp_path / "scale", name="scale")
    with pytest.raises(ValueError, match="--architecture scale"):
        MetaTrainer(Recipe(init_weights=str(release)), mnist, tmp_path / "run", progress=False)
    trainer = MetaTrainer(
        Recipe(**SCALE, init_weights=str(release)), mnist, tmp_path / "run", progress=False
    )
    started = flatopt.load_release(release)[0].state_dict()
    for name, tensor in trainer.update_rule.state_dict().items():
        assert torch.equal(tensor, started[name]), name


def test_step_scale_of_the_scale_rule_moves_its_step_size_offset():
    torch.manual_seed(0)
    rule = flatopt.ScaleUpdateRule()
    grad = torch.randn(50)
    state, global_state = rule.initial_state(50), rule.initial_global_state()

    scaled = scaled_update_rule(rule, 0.5)

    with torch.no_grad():
        update, _ = rule.tensor_step(grad, state, global_state)
        halved, _ = scaled.tensor_step(grad, state, global_state)
    torch.testing.assert_close(halved, 0.5 * update)
    assert scaled.step_size_offset.item() == pytest.approx(
        rule.step_size_offset.item() + math.log(0.5)
    )
    assert rule.step_size_offset.item() == -1.0  # the rule scaled is left as it was

    task = type("Task", (), {"name": "trial"})()
    record = calibration_record(scaled, [{"scale": 0.5, "loss": 1.0}], task, 10, [1])
    assert record["step_size_offset"] == pytest.approx(-1.0 + math.log(0.5))
    assert "output_scale" not in record


def test_exported_scale_release_loads_and_describes_itself(tmp_path):
    torch.manual_seed(0)
    rule = flatopt.ScaleUpdateRule()
    recipe = dataclasses.asdict(Recipe(**SCALE))
    validation = {"loss": 1.0, "accuracy": 0.5, "epoch": 3, "phase": "meta", "steps": 20}
    description = describe("scale", recipe)
    folder = export_release(
        rule,
        tmp_path / "rel",
        "scale",
        recipe,
        "python -m training train --architecture scale",
        "0" * 40,
        12.5,
        validation,
        {},
        description,
    )

    loaded, config = flatopt.load_release(folder)
    assert isinstance(loaded, flatopt.ScaleUpdateRule)
    assert config["update_rule"]["architecture"] == "scale"
    for name, tensor in rule.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert description.startswith("L2O-Scale: the hierarchical RNN optimizer")
    assert "RMSProp" in description and "log ratio" in description and "convnet" in description
    card = (folder / "README.md").read_text()
    assert "Hierarchical RNN (scale)" in card and "small MNIST convnet" in card
    assert f"initial log step size {math.log(1e-4):.4g} (a coordinate's step is exp(" in card


def test_a_checkpoint_without_the_scale_settings_resumes(mnist, tmp_path):
    recipe = Recipe(imitation_epochs=1, meta_epochs=0)
    trainer = MetaTrainer(recipe, mnist, tmp_path, progress=False)
    trainer.save_checkpoint(tmp_path / "checkpoint.pt")
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    new = ("architecture", "optimizee", "meta_optimizer", "meta_objective", "unroll_lengths")
    for key in (*new, "min_unroll_length"):
        del payload["recipe"][key]
    payload["epoch"] = 1
    torch.save(payload, tmp_path / "checkpoint.pt")

    resumed = MetaTrainer(recipe, mnist, tmp_path, progress=False)
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed.epoch == 1
