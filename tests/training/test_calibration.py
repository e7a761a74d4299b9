"""Step-scale calibration: the factor on the read-out that validates best on held-out images."""

import dataclasses
import json

import pytest
import torch

import flatopt
from training.__main__ import main
from training.meta import (
    MetaTrainer,
    Recipe,
    calibrate_step_scale,
    mnist_tasks,
    scaled_update_rule,
)
from training.release import export_release

# A factor this small leaves the optimizee practically at its initial weights (loss near log 10),
# so a working rule at factor 1 must beat it by far.
TINY = 1e-3


def _uncalibrated_release(rule, config, folder, name):
    """Export ``rule`` as release ``name`` with ``config``'s recipe and no calibration."""
    recipe = {**config["provenance"]["recipe"], "step_scales": [], "calibration_steps": 0}
    validation = {"loss": 1.0, "accuracy": 0.5, "epoch": 1, "phase": "meta", "steps": 500}
    command = f"python -m training train --name {name}"
    return export_release(
        rule, folder, name, recipe, command, "0" * 40, 1.0, validation, {}, "A trial release."
    )


def test_the_factor_with_the_lowest_validation_loss_is_kept(mnist):
    rule, _ = flatopt.load_release("dm")
    task = mnist_tasks(mnist, "sigmoid", 128)

    for factors in ([TINY, 1.0], [1.0, TINY]):
        chosen, records = calibrate_step_scale(rule, task, 40, [10_000], factors)

        assert [r["scale"] for r in records] == factors
        by_factor = {r["scale"]: r["loss"] for r in records}
        assert by_factor[TINY] > 2.0 and by_factor[1.0] < 1.5, by_factor
        assert chosen.output_scale == pytest.approx(rule.output_scale)
        for name, tensor in rule.state_dict().items():
            assert torch.equal(chosen.state_dict()[name], tensor), name

    scaled, _ = calibrate_step_scale(rule, task, 40, [10_000], [TINY])
    assert scaled.output_scale == pytest.approx(rule.output_scale * TINY)
    assert rule.output_scale == 0.1  # the rule calibrated is left as it was


def test_the_trainer_calibrates_at_the_end_and_logs_it(mnist, tmp_path):
    recipe = Recipe(
        imitation_epochs=1,
        imitation_unrolls=1,
        meta_epochs=0,
        unroll_length=3,
        validation_steps=30,
        validation_seeds=1,
        init_weights="dm",
        step_scales=[TINY, 1.0],
    )
    trainer = MetaTrainer(recipe, mnist, tmp_path, progress=False)
    trainer.run()
    rule, calibration = trainer.calibrated_update_rule()

    assert calibration["chosen"] == 1.0 and calibration["steps"] == 30
    assert rule.output_scale == pytest.approx(recipe.output_scale)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["event"] == "step-scale calibration"
    assert [r["scale"] for r in log[-1]["scores"]] == [TINY, 1.0]

    plain = MetaTrainer(dataclasses.replace(recipe, step_scales=[]), mnist, tmp_path / "plain")
    plain.progress = False
    plain.run()
    assert plain.calibrated_update_rule()[1] is None


def test_calibrate_command_rewrites_a_release_once(mnist, tmp_path, capsys):
    rule, config = flatopt.load_release("dm")
    folder = _uncalibrated_release(rule, config, tmp_path / "release", "trial")
    command = ["calibrate", str(folder), "--step-scales", "1", str(TINY)]
    settings = ["--calibration-steps", "30", "--eval-steps", "10", "--eval-seeds", "1"]
    main([*command, *settings])

    assert "kept 1;" in capsys.readouterr().out
    calibrated, config = flatopt.load_release(folder)
    calibration = config["provenance"]["step_scale_calibration"]
    assert calibration["chosen"] == 1.0 and calibration["steps"] == 30
    assert calibration["command"] == "python -m training " + " ".join([*command, *settings])
    assert config["provenance"]["command"] == "python -m training train --name trial"
    assert config["provenance"]["recipe"]["step_scales"] == [1.0, TINY]
    assert config["evaluation"]["mnist-mlp-relu"]["steps"] == 10
    assert (
        "Step scale: the read-out scale was multiplied by 1" in (folder / "README.md").read_text()
    )
    for name, tensor in rule.state_dict().items():
        assert torch.equal(calibrated.state_dict()[name], tensor), name

    # A second calibration would compound factors: refused, with the release untouched.
    before = (folder / "config.json").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main([*command, *settings])
    assert exit_info.value.code == 2
    assert "calibrated already" in capsys.readouterr().err
    assert (folder / "config.json").read_bytes() == before


def test_calibrate_command_moves_a_scale_release_step_size_offset(mnist, tmp_path, capsys):
    shipped, config = flatopt.load_release("scale")
    assert "step_scale_calibration" in config["provenance"]  # calibrated when it was made
    torch.manual_seed(0)
    rule = flatopt.ScaleUpdateRule.from_config(shipped.config())
    folder = _uncalibrated_release(rule, config, tmp_path / "release", "trial-scale")
    settings = ["--calibration-steps", "20", "--eval-steps", "10", "--eval-seeds", "1"]

    main(["calibrate", str(folder), "--step-scales", str(TINY), "1", *settings])

    assert "kept 1;" in capsys.readouterr().out
    calibrated, config = flatopt.load_release(folder)
    calibration = config["provenance"]["step_scale_calibration"]
    assert calibration["chosen"] == 1.0
    assert calibration["optimizee"] == "mnist-scale-cnn"  # the Scale recipe's own optimizee
    assert "Step scale: the step size was multiplied by 1" in (folder / "README.md").read_text()
    for name, tensor in rule.state_dict().items():
        assert torch.equal(calibrated.state_dict()[name], tensor), name

    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", str(folder), "--step-scales", "1", "2", *settings])
    assert exit_info.value.code == 2
    assert "calibrated already" in capsys.readouterr().err


def test_calibrate_command_refuses_bad_input_before_any_work(tmp_path, capsys):
    rule, config = flatopt.load_release("dm")
    bare = flatopt.save_release(rule, tmp_path / "bare", name="bare")
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", str(bare), "--step-scales", "1", "0.5"])
    assert exit_info.value.code == 2
    assert "records no meta-training recipe" in capsys.readouterr().err

    metadata = {k: v for k, v in config.items() if k not in ("format_version", "update_rule")}
    made = flatopt.save_release(rule, tmp_path / "made", **metadata)
    with pytest.raises(SystemExit):
        main(["calibrate", str(made), "--step-scales", "1", "-0.5"])
    assert "step_scales must be positive" in capsys.readouterr().err


def test_warm_start_from_a_calibrated_release_needs_its_read_out_scale(mnist, tmp_path):
    rule, _ = flatopt.load_release("dm")
    folder = flatopt.save_release(scaled_update_rule(rule, 0.5), tmp_path / "half", name="half")
    recipe = Recipe(init_weights=str(folder), imitation_epochs=0, meta_epochs=0)

    with pytest.raises(ValueError, match="--output-scale 0.05"):
        MetaTrainer(recipe, mnist, tmp_path / "run", progress=False)

    matching = dataclasses.replace(recipe, output_scale=0.05)
    trainer = MetaTrainer(matching, mnist, tmp_path / "run", progress=False)
    for name, tensor in rule.state_dict().items():
        assert torch.equal(trainer.update_rule.state_dict()[name], tensor), name


@pytest.mark.parametrize("factors", [["0.5"], ["1", "1"]])
def test_calibration_needs_two_different_factors(tmp_path, capsys, factors):
    rule, config = flatopt.load_release("dm")
    metadata = {k: v for k, v in config.items() if k not in ("format_version", "update_rule")}
    folder = flatopt.save_release(rule, tmp_path / "release", **metadata)
    before = (folder / "config.json").read_bytes()

    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", str(folder / "config.json"), "--step-scales", *factors])

    assert exit_info.value.code == 2
    assert "at least two different factors" in capsys.readouterr().err
    assert (folder / "config.json").read_bytes() == before


def test_a_release_file_path_names_its_folder(mnist, tmp_path, capsys):
    rule, config = flatopt.load_release("dm")
    metadata = {k: v for k, v in config.items() if k not in ("format_version", "update_rule")}
    folder = flatopt.save_release(rule, tmp_path / "release", **metadata)
    settings = ["--calibration-steps", "20", "--eval-steps", "10", "--eval-seeds", "1"]

    main(["calibrate", str(folder / "model.safetensors"), "--step-scales", "1", "0.5", *settings])

    assert f"rewrote {folder}" in capsys.readouterr().out
    assert "step_scale_calibration" in flatopt.load_release(folder)[1]["provenance"]
    assert not list(folder.glob("*.tmp"))


def test_lstm_settings_are_refused_for_the_scale_rule():
    with pytest.raises(ValueError, match="apply to the LSTM only"):
        Recipe(architecture="scale", optimizee="scale-cnn", output_scale=0.05)
