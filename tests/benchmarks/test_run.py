"""The benchmark harness end to end on real MNIST, with tiny settings."""

import dataclasses
import json

import pytest
import torch

from benchmarks.__main__ import main
from benchmarks.presets import PRESETS
from benchmarks.run import (
    FIGURE_FILE,
    REPORT_FILE,
    RESULTS_FILE,
    SettingsMismatchError,
    format_table,
    run_benchmark,
    summarise,
)

TINY = dataclasses.replace(
    PRESETS["smoke"],
    steps=5,
    eval_points=2,
    sharpness_batch=32,
    sharpness_iterations=2,
    sharpness_probes=2,
)
OPTIMIZERS = ["sgd", "adam", "dm", "sam"]


@pytest.fixture(scope="module")
def tiny_run(mnist, tmp_path_factory):
    """A 5-step benchmark of MLP-ReLU with a baseline, Adam, a learned and a closure optimizer."""
    out = tmp_path_factory.mktemp("benchmark")
    results = run_benchmark(TINY, out, OPTIMIZERS, ["mlp-relu"], progress=False)
    return out, results


def test_tiny_benchmark_writes_every_measurement(tiny_run):
    out, results = tiny_run
    saved = json.loads((out / RESULTS_FILE).read_text())
    assert saved["runs"] == results["runs"]
    runs = {run["optimizer"]: run for run in saved["runs"]}
    assert sorted(runs) == sorted(OPTIMIZERS)
    for name, run in runs.items():
        assert len(run["train_loss"]) == 5
        assert run["eval_steps"] == [2, 4, 5]
        assert (
            0.0 < run["test_accuracy"] <= 1.0 and run["test_accuracy"] == run["eval_accuracy"][-1]
        )
        assert run["time"]["step_s"] > 0 and run["time"]["iterations"] == 5
        assert run["sharpness"]["hessian_top_eigenvalue"] > 0
        assert run["sharpness"]["hessian_trace"] > 0
        closure = name == "sam"
        assert run["gradient_evaluations_per_step"] == (2 if closure else 1)
        # A closure optimizer's forward and backward passes run inside its step.
        assert (run["time"]["forward_backward_s"] is None) == closure
    assert runs["sgd"]["state_bytes_per_parameter"] == 0.0
    assert 8.0 <= runs["adam"]["state_bytes_per_parameter"] < 8.1  # two float32 moments
    assert runs["dm"]["state_bytes_per_parameter"] >= 320.0  # 80 float32 numbers
    assert (out / FIGURE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / REPORT_FILE).read_text()
    assert "## Test accuracy" in report and "| sam |" in report
    assert "| dm |" in format_table(results)


def test_learning_rate_choice_is_the_grids_best(tiny_run):
    _, results = tiny_run
    tuning = results["tuning"]["mlp-relu"]
    assert set(tuning) == {"sgd", "adam"}
    for name, record in tuning.items():
        assert [float(lr) for lr in record["grid"]] == list(TINY.lr_grids[name])
        assert record["lr"] == float(max(record["grid"], key=record["grid"].get))
    lrs = {run["optimizer"]: run["lr"] for run in results["runs"]}
    assert lrs["sgd"] == lrs["sam"] == tuning["sgd"]["lr"]
    assert lrs["adam"] == tuning["adam"]["lr"]
    assert lrs["dm"] is None


def test_rerun_skips_finished_runs_and_adds_only_new_ones(tiny_run, capsys):
    out, _ = tiny_run
    before = json.loads((out / RESULTS_FILE).read_text())["runs"]

    again = run_benchmark(TINY, out, OPTIMIZERS, ["mlp-relu"], progress=False)
    assert again["runs"] == before
    assert "0 tuning runs and 0 runs (4 already in" in capsys.readouterr().out

    extended = run_benchmark(
        TINY, out, [*OPTIMIZERS, "sgd-hessian-trace"], ["mlp-relu"], progress=False
    )
    assert extended["runs"][:4] == before
    assert [run["optimizer"] for run in extended["runs"][4:]] == ["sgd-hessian-trace"]
    assert extended["runs"][4]["gradient_evaluations_per_step"] == 4


def test_runs_in_worker_processes_give_the_same_numbers(tiny_run, tmp_path):
    _, serial = tiny_run
    optimizers = ["sgd", "dm", "sam"]

    parallel = run_benchmark(TINY, tmp_path, optimizers, ["mlp-relu"], progress=False, workers=2)

    assert parallel["sessions"][-1]["workers"] == 2
    by_optimizer = {run["optimizer"]: run for run in serial["runs"]}
    assert sorted(run["optimizer"] for run in parallel["runs"]) == sorted(optimizers)
    for run in parallel["runs"]:
        expected = by_optimizer[run["optimizer"]]
        for key in ("lr", "train_loss", "eval_accuracy", "eval_loss", "sharpness"):
            assert run[key] == expected[key], (run["optimizer"], key)
    assert (tmp_path / REPORT_FILE).exists()


def test_other_settings_are_refused_before_any_work(tiny_run):
    out, _ = tiny_run
    with pytest.raises(SettingsMismatchError, match="steps: 5 there, 6 now"):
        run_benchmark(
            dataclasses.replace(TINY, steps=6), out, ["sgd"], ["mlp-relu"], progress=False
        )


def test_cifar_optimizees_are_skipped_with_the_reason_when_data_is_absent(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("FLATOPT_CIFAR10_DIR", str(tmp_path / "no-cifar"))
    results = run_benchmark(
        TINY, tmp_path / "out", ["adam"], ["conv-cifar", "resnet20"], progress=False
    )

    assert results["runs"] == []
    for name in ("conv-cifar", "resnet20"):
        record = results["optimizees"][name]
        assert record["status"] == "skipped"
        assert "CIFAR-10 is not available" in record["reason"]
    assert "skipped conv-cifar: CIFAR-10 is not available" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / RESULTS_FILE).read_text())
    assert saved["optimizees"]["resnet20"]["status"] == "skipped"
    assert (
        "**Data skipped.** conv-cifar: CIFAR-10 is not available"
        in (tmp_path / "out" / REPORT_FILE).read_text()
    )


def test_dry_run_prints_the_plan_without_training(mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLATOPT_CIFAR10_DIR", str(tmp_path / "no-cifar"))
    out = tmp_path / "out"
    main(
        [
            "run",
            "--preset",
            "default",
            "--optimizers",
            "adam",
            "dm",
            "entropy-sgd",
            "--optimizees",
            "mlp-relu",
            "conv-cifar",
            "--dry-run",
            "--out",
            str(out),
        ]
    )
    printed = " ".join(capsys.readouterr().out.split())  # the plan's lines are wrapped
    assert "preset default" in printed and "mlp-relu (15,910 parameters)" in printed
    assert "skipped conv-cifar" in printed
    assert "estimated time on this machine" in printed
    assert "entropy-sgd (lr 33.3, 20 gradients/step)" in printed
    assert not out.exists()


def test_help_explains_every_command_preset_optimizee_and_optimizer(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for name in [
        *PRESETS,
        "mlp-relu",
        "conv-large-mnist",
        "resnet20",
        "fashion-mnist/conv-mnist",
        "sgd",
        "adam",
        "dm",
        "entropy-sgd",
        "sgd-hessian-trace",
        "sam",
    ]:
        assert f"\n  {name} " in text or f"\n  {name}\n" in text, name
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("run", "report", "speed"):
        assert f"\n  {command} " in text


def test_bundled_dm_reaches_90_percent_on_mlp_relu(mnist, tmp_path):
    preset = dataclasses.replace(
        PRESETS["quick"],
        seeds=1,
        eval_points=1,
        sharpness_batch=32,
        sharpness_iterations=2,
        sharpness_probes=2,
    )
    # One thread: on a busy two-core machine a second one makes each small step wait for it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = run_benchmark(preset, tmp_path, ["dm"], ["mlp-relu"], progress=False)
    finally:
        torch.set_num_threads(threads)
    assert results["runs"][0]["test_accuracy"] >= 0.90


def test_unknown_optimizer_fails_before_training_with_a_clear_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--optimizers", "sgd", "no-such-optimizer", "--steps", "1"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "unknown optimizer 'no-such-optimizer'" in error
    assert "unknown weights 'no-such-optimizer'" in error


def test_unknown_optimizee_fails_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--optimizees", "mnist/mlp", "--steps", "1"])
    assert exit_info.value.code == 2
    assert "choose from mlp-relu, conv-mnist" in capsys.readouterr().err


def test_non_positive_step_counts_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--steps", "0"])
    assert "must be at least 1" in capsys.readouterr().err


def test_times_over_seeds_ignore_one_run_slowed_by_other_work():
    def run(seed, step_s, forward_backward_s=0.010):
        return {
            "seed": seed,
            "test_accuracy": 0.9,
            "test_loss": 0.3,
            "final_train_loss": 0.3,
            "diverged": False,
            "time": {"forward_backward_s": forward_backward_s, "step_s": step_s},
            "gradient_evaluations_per_step": 1,
            "state_bytes_per_parameter": 8.0,
            "sharpness": None,
        }

    summary = summarise([run(0, 0.002), run(1, 0.009, 0.030), run(2, 0.003)])

    assert summary["step_s"] == 0.003
    assert summary["forward_backward_s"] == 0.010
    assert summary["iteration_s"] == pytest.approx(0.013)
    closure = summarise([run(0, 0.05, None), run(1, 0.06, None)])
    assert closure["forward_backward_s"] is None
    assert closure["iteration_s"] == pytest.approx(0.055)
