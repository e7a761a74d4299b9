"""The Markdown report, generated from a small results file whose numbers are chosen by hand."""

import json

import pytest

from benchmarks.__main__ import main
from benchmarks.report import render_report, write_report

# Per optimizer: test accuracy on mlp-relu by seed, forward+backward and step seconds, state bytes
# per parameter, and the Hessian's top eigenvalue by seed. Conv-MNIST adds 0.05 to the accuracies.
RUNS = {
    "sgd": ([0.88, 0.90], 0.001, 0.00005, 0.0, [10.0, 10.0]),
    "adam": ([0.90, 0.92], 0.001, 0.0001, 8.0003, [19.0, 21.0]),
    "dm": ([0.93, 0.93], 0.001, 0.01, 320.0, [40.0, 40.0]),
    "entropy-sgd": ([0.89, 0.91], None, 0.022, 0.0, [5.0, 5.0]),
}
EVALUATIONS = {"sgd": 1, "adam": 1, "dm": 1, "entropy-sgd": 20}
LRS = {
    "sgd": {"mlp-relu": 0.1, "conv-mnist": 0.3},
    "adam": {"mlp-relu": 0.001, "conv-mnist": 0.003},
}


def recorded_results():
    runs = []
    for optimizee, shift in (("mlp-relu", 0.0), ("conv-mnist", 0.05)):
        for name, (accuracies, forward_backward, step, state, eigenvalues) in RUNS.items():
            for seed in (0, 1):
                # SGD's second seed diverges on Conv-MNIST.
                diverged = optimizee == "conv-mnist" and name == "sgd" and seed == 1
                accuracy = 0.098 if diverged else accuracies[seed] + shift
                runs.append(
                    {
                        "optimizee": optimizee,
                        "optimizer": name,
                        "seed": seed,
                        "lr": LRS.get(name, {}).get(
                            optimizee, 33.3 if name == "entropy-sgd" else None
                        ),
                        "test_accuracy": accuracy,
                        "test_loss": None if diverged else 0.3,
                        "final_train_loss": None if diverged else 0.3,
                        "diverged": diverged,
                        "train_loss_window": 1,
                        "train_loss": [2.3, 1.0, None] if diverged else [2.3, 1.0, 0.5],
                        "eval_steps": [2, 3],
                        "eval_loss": [0.5, None if diverged else 0.3],
                        "eval_accuracy": [accuracy - 0.01, accuracy],
                        "time": {
                            "forward_backward_s": forward_backward,
                            "step_s": step,
                            "iterations": 3,
                        },
                        "gradient_evaluations_per_step": EVALUATIONS[name],
                        "state_bytes_per_parameter": state,
                        "sharpness": None
                        if diverged
                        else {
                            "hessian_top_eigenvalue": eigenvalues[seed],
                            "hessian_trace": 10 * eigenvalues[seed],
                        },
                        "wall_s": 1.0,
                    }
                )
    baseline = {"kind": "baseline", "lr": "tuned", "hyperparameters": {}}
    return {
        "format": 1,
        "preset": "default",
        "overrides": {"steps": 3},
        "settings": {
            "steps": 3,
            "eval_every": 2,
            "batch_size": 128,
            "lr_grids": {"adam": [0.001, 0.003], "sgd": [0.1, 0.3]},
            "tune_seeds": 1,
            "sharpness": {"batch": 64, "iterations": 3, "probes": 4},
            "threads": 2,
        },
        "sessions": [
            {
                "started": "2026-12-03T10:00:00Z",
                "preset": "default",
                "overrides": {"steps": 3},
                "git": {"commit": "abcdef1234567890", "dirty": True},
                "machine": {
                    "platform": "Linux-test",
                    "processor": "x86_64",
                    "cpu_count": 2,
                    "cpu_threads": 2,
                    "cuda": None,
                },
                "torch": "2.13.0+cpu",
                "flatopt": "0.1.0",
            }
        ],
        "optimizees": {
            "mlp-relu": {"dataset": "mnist", "status": "ok", "parameters": 15910},
            "conv-mnist": {"dataset": "mnist", "status": "ok", "parameters": 18122},
            "conv-cifar": {
                "dataset": "cifar10",
                "status": "skipped",
                "reason": "CIFAR-10 is not available: /data/cifar-10-batches-py does not exist.",
            },
        },
        "optimizers": {
            "sgd": {**baseline, "description": "SGD", "gradient_evaluations_per_step": 1},
            "adam": {**baseline, "description": "Adam", "gradient_evaluations_per_step": 1},
            "dm": {
                "kind": "learned",
                "description": "L2O-DM.",
                "lr": None,
                "hyperparameters": {},
                "gradient_evaluations_per_step": 1,
                "meta_training_horizon": 500,
            },
            "entropy-sgd": {
                "kind": "closure",
                "description": "Entropy-SGD",
                "lr": 33.3,
                "hyperparameters": {"inner_steps": 20, "gamma": 0.03},
                "gradient_evaluations_per_step": 20,
            },
        },
        "tuning": {
            optimizee: {
                "sgd": {
                    "lr": LRS["sgd"][optimizee],
                    "steps": 3,
                    "seeds": 1,
                    "grid": {
                        "0.1": 0.9 if optimizee == "mlp-relu" else 0.5,
                        "0.3": 0.8 if optimizee == "mlp-relu" else 0.95,
                    },
                },
                "adam": {
                    "lr": LRS["adam"][optimizee],
                    "steps": 3,
                    "seeds": 1,
                    "grid": {
                        "0.001": 0.91 if optimizee == "mlp-relu" else 0.6,
                        "0.003": 0.85 if optimizee == "mlp-relu" else 0.96,
                    },
                },
            }
            for optimizee in ("mlp-relu", "conv-mnist")
        },
        "runs": runs,
    }


def test_accuracy_table_has_mean_and_std_per_optimizer_and_optimizee():
    report = render_report(recorded_results())
    assert "| optimizer | mlp-relu | conv-mnist |" in report
    assert "| adam | 91.00 ± 1.41 | 96.00 ± 1.41 |" in report
    assert "| dm | 93.00 ± 0.00 | 98.00 ± 0.00 |" in report
    # The diverged seed counts at the accuracy it had, and is flagged.
    assert "| sgd | 89.00 ± 1.41 | 51.40 ± 58.83 † |" in report


def test_time_table_is_relative_to_adam_with_the_forward_backward_and_step_split():
    report = render_report(recorded_results())
    section = report.split("## Time per iteration")[1].split("## Cost")[0]
    mlp = section.split("### mlp-relu")[1].split("### conv-mnist")[0]
    assert "| adam | 1 | 1.00× | 1.00× | 1.00× | 1.10 |" in mlp
    assert "| sgd | 1 | 1.00× | 0.50× | 0.95× | 1.05 |" in mlp
    assert "| dm | 1 | 1.00× | 100× | 10.0× | 11.00 |" in mlp
    # Entropy-SGD runs its 20 forward and backward passes inside its step.
    assert "| entropy-sgd | 20 | in step | 220× | 20.0× | 22.00 |" in mlp


def test_cost_sharpness_divergence_and_learning_rate_tables():
    report = render_report(recorded_results())
    cost = report.split("## Cost against Adam")[1].split("## Sharpness")[0]
    assert "| dm | 1 | 320.0 | 10.0× | 10.0× |" in cost
    assert "| adam | 1 | 8.0 | 1.00× | 1.00× |" in cost
    sharpness = report.split("## Sharpness")[1].split("## Divergence")[0]
    assert "| adam | 20 ± 1.4 | 20 ± 1.4 |" in sharpness
    assert "| sgd | 10 ± 0 | 10 ± 0 |" in sharpness  # the diverged run is left out
    assert "| adam | 200 ± 14 | 200 ± 14 |" in sharpness
    divergence = report.split("## Divergence")[1].split("## Learning rates")[0]
    assert "1 run(s) diverged." in divergence and "| sgd | 0 / 2 | 1 / 2 |" in divergence
    rates = report.split("## Learning rates")[1].split("## Optimizers")[0]
    assert (
        "| sgd | 0.1 | 0.3 |" in rates and "| entropy-sgd | 33.3 (fixed) | 33.3 (fixed) |" in rates
    )
    assert "- mlp-relu, sgd: **0.1 → 90.0%**, 0.3 → 80.0%" in rates


def test_header_and_limits_state_where_the_numbers_come_from_and_what_they_miss():
    report = render_report(recorded_results())
    assert "| preset | default (overrides: steps 3) |" in report
    assert "| commit | abcdef123456 (with uncommitted changes) |" in report
    assert "| date | 2026-12-03 |" in report
    assert "x86_64, 2 CPUs, torch threads: 2" in report
    limits = report.split("## Limits")[1]
    assert "dm 500" in limits and "stay within them" in limits
    assert "trajectories of up to 500 steps" in limits

    results = recorded_results()
    results["optimizers"]["scale"] = {**results["optimizers"]["dm"], "meta_training_horizon": 100}
    limits = render_report(results).split("## Limits")[1]
    assert "trajectories of up to 100 to 500 steps" in limits and "scale 100" in limits

    assert "ResNet-20 is the only optimizee with batch norm" in limits
    assert "mlp-relu 15,910, conv-mnist 18,122" in limits
    assert "**Data skipped.** conv-cifar: CIFAR-10 is not available" in limits


def test_sessions_with_different_loads_are_flagged_in_the_header():
    results = recorded_results()
    first = results["sessions"][0]
    results["sessions"] = [{**first, "workers": 2}, {**first, "workers": 2}]
    header = render_report(results).split("![")[0]
    assert "Linux-test, 2 runs at once in separate processes |" in header
    assert "| note |" not in header

    results["sessions"].append({**first, "workers": 1})
    header = render_report(results).split("![")[0]
    assert "| machine | x86_64, 2 CPUs, torch threads: 2, Linux-test |" in header
    assert "measured in 3 sessions with 2, 2, 1 runs at once" in header
    assert "different machines" not in header

    other = {**first, "machine": {**first["machine"], "processor": "arm64"}}
    results["sessions"].append(other)
    assert "runs were measured on different machines" in render_report(results)


def test_report_command_regenerates_the_report_from_json(tmp_path, capsys):
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(recorded_results()))
    out = tmp_path / "docs" / "RESULTS.md"

    main(["report", str(results_path), "--out", str(out)])
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.read_text() == render_report(recorded_results())

    (tmp_path / "results.png").write_bytes(b"\x89PNG")
    write_report(results_path, out)
    assert "](../results.png)" in out.read_text()


def test_report_command_refuses_a_file_that_is_not_results(tmp_path, capsys):
    path = tmp_path / "other.json"
    path.write_text("[]")
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(path)])
    assert exit_info.value.code == 2
    assert "is not a benchmark results file" in capsys.readouterr().err
