"""The speed benchmark measures what it says and renders it (no timing thresholds here)."""

import json

import pytest
import torch

import flatopt
from benchmarks import speed
from benchmarks.__main__ import main
from benchmarks.speed import render_speed_markdown, step_costs

STEPPERS = ["adam", "learned", "learned_bf16", "learned_torch"]
NAIVE = ["forward_path", "framework_cells"]

# A report as step_costs writes it, trimmed to two sizes and one model.
RECORDED = {
    "machine": {"platform": "Linux-x86_64", "processor": "x86_64", "cpu_count": 2},
    "torch": "2.13.0+cpu",
    "threads": 1,
    "repeats": 5,
    "native_kernel": True,
    "chunk": 4096,
    "method": {
        "time": "median",
        "peak_extra_memory": "profiler allocation records",
        "state_memory": "bytes",
    },
    "steps": [
        {
            "parameters": 270_000,
            "time_s": {
                "adam": 0.0005,
                "learned": 0.045,
                "learned_bf16": 0.040,
                "learned_torch": 0.150,
                "forward_path": 0.360,
                "framework_cells": 0.580,
                "memory_floor": 0.0075,
                "compute_floor": 0.020,
            },
            "peak_extra_bytes": {
                "adam": 2_160_000,
                "learned": 30,
                "learned_bf16": 30,
                "learned_torch": 14_400,
                "forward_path": 120_000_000,
                "framework_cells": 300_000_000,
            },
            "state_bytes": {
                "adam": 2_160_004,
                "learned": 86_400_004,
                "learned_bf16": 43_200_004,
                "learned_torch": 86_400_004,
                "forward_path": 86_400_004,
                "framework_cells": 86_400_000,
            },
        },
        {
            "parameters": 4_000_000,
            "time_s": {
                "adam": 0.012,
                "learned": 0.70,
                "learned_bf16": 0.62,
                "learned_torch": 2.3,
                "memory_floor": 0.11,
                "compute_floor": 0.30,
            },
            "peak_extra_bytes": {"adam": 32_000_000, "learned": 30, "learned_bf16": 30},
            "state_bytes": {"adam": 32_000_004, "learned": 1_280_000_004},
        },
    ],
    "iterations": [
        {
            "model": "conv-mnist",
            "batch_size": 128,
            "parameters": 18_122,
            "adam": {"forward_backward_s": 0.030, "step_s": 0.0004, "total_s": 0.0304},
            "learned": {"forward_backward_s": 0.030, "step_s": 0.004, "total_s": 0.034},
        }
    ],
    "skipped_models": [{"model": "resnet20", "reason": "not in this checkout"}],
}


def test_step_costs_time_every_stepper_and_both_floors():
    report = step_costs(sizes=(100, 2000), repeats=1, naive_max_size=1000, models=())
    small, large = report["steps"]
    assert [small["parameters"], large["parameters"]] == [100, 2000]
    assert sorted(small["time_s"]) == sorted(STEPPERS + NAIVE + ["memory_floor", "compute_floor"])
    assert not set(NAIVE) & set(large["time_s"])  # above naive_max_size
    for row in report["steps"]:
        size = row["parameters"]
        assert all(seconds > 0 for seconds in row["time_s"].values())
        assert all(peak >= 0 for peak in row["peak_extra_bytes"].values())
        # float32 (80 floats) and bfloat16 recurrent state, plus the step counter.
        assert row["state_bytes"]["learned"] == 320 * size + 4
        assert row["state_bytes"]["learned_bf16"] == 160 * size + 4
        assert row["state_bytes"]["adam"] == 8 * size + 4
    assert isinstance(report["native_kernel"], bool) and report["threads"] >= 1
    assert report["iterations"] == [] and report["skipped_models"] == []


def test_iterations_time_forward_backward_and_step_of_a_model():
    report = step_costs(sizes=(), repeats=1, models=("conv-mnist",))
    (row,) = report["iterations"]
    assert row["model"] == "conv-mnist" and row["batch_size"] == 128
    assert row["parameters"] == 18_122
    for optimizer in ("adam", "learned"):
        times = row[optimizer]
        assert times["forward_backward_s"] > 0 and times["step_s"] > 0
        assert times["total_s"] >= times["step_s"]


def test_a_model_missing_from_the_checkout_is_skipped(monkeypatch):
    from training import optimizees

    monkeypatch.delattr(optimizees, "resnet20", raising=False)
    report = step_costs(sizes=(), repeats=1, models=("resnet20",))
    assert report["iterations"] == []
    assert report["skipped_models"][0]["model"] == "resnet20"
    assert "training.optimizees.resnet20" in report["skipped_models"][0]["reason"]


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown models"):
        step_costs(sizes=(), models=("vgg",))


def test_markdown_of_a_recorded_report():
    markdown = render_speed_markdown(RECORDED)
    assert "1 torch thread(s)" in markdown and "Native kernel: yes" in markdown
    step_row = next(line for line in markdown.splitlines() if line.startswith("| 270,000 |"))
    assert "| 0.50 | 45.0 | 40.0 | 150.0 | 360.0 | 580.0 | 7.50 | 20.0 |" in step_row
    ratios = [line for line in markdown.splitlines() if line.startswith("| 270,000 |")][1]
    # x Adam, x memory floor, x compute floor, bf16/f32, torch/native, forward, framework cells
    assert ratios == "| 270,000 | 90x | 6.00x | 2.25x | 0.89x | 3.33x | 8.00x | 13x |"
    large = [line for line in markdown.splitlines() if line.startswith("| 4,000,000 |")]
    assert large[0].count("–") == 2  # no forward path or framework cells at this size
    memory = large[2]
    assert "| 8 B | 320 B | –" in memory and "32.0 MB | 30 B | 30 B" in memory
    assert "| conv-mnist | 18,122 | 128 | 30.0 | 0.40 | 30.4 | 30.0 | 4.00 | 34.0 | 1.12x |" in (
        markdown
    )
    assert "| resnet20 | skipped: not in this checkout |" in markdown


def test_speed_command_writes_json_and_markdown(mnist, tmp_path, capsys):
    main(
        ["speed", "--sizes", "50", "--repeats", "1", "--models", "--out", str(tmp_path)]
        + ["--accuracy-steps", "5", "--accuracy-seeds", "2"]
    )
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["steps"][0]["parameters"] == 50
    assert (tmp_path / "SPEED.md").read_text() == render_speed_markdown(saved)
    rows = saved["state_dtype_accuracy"]
    assert [r["optimizee"] for r in rows] == ["mlp-relu", "conv-mnist"]
    assert all(len(r["float32"]) == len(r["bfloat16"]) == 2 for r in rows)
    meta = saved["meta_training_step"]
    assert meta["rule_forward_s"] > 0 and meta["framework_cells_s"] > 0
    assert "| one product per cell (flatopt) |" in (tmp_path / "SPEED.md").read_text()
    out = capsys.readouterr().out
    assert "## Step time (ms)" in out and "## bfloat16 recurrent state" in out


def test_state_dtype_table_reports_the_difference_in_points():
    report = {
        "state_dtype_accuracy": [
            {
                "optimizee": "mlp-relu",
                "steps": 1000,
                "seeds": 2,
                "float32": [0.93, 0.95],
                "bfloat16": [0.92, 0.94],
            }
        ]
    }
    lines = speed._dtype_table(report["state_dtype_accuracy"])
    assert lines[-1] == "| mlp-relu | 1000 | 2 | 94.00% ± 1.41 | 93.00% ± 1.41 | -1.00 |"


def test_framework_cells_rule_computes_the_same_updates():
    rule = flatopt.load_release(flatopt.DEFAULT_WEIGHTS)[0]
    cells = speed._FrameworkCellsRule(rule)
    generator = torch.Generator().manual_seed(0)
    grad = torch.randn(300, generator=generator) * 1e-2
    state = torch.randn(300, rule.state_size, generator=generator) * 0.1
    with torch.no_grad():
        expected, cells_result = rule(grad, state), cells(grad, state)
    torch.testing.assert_close(cells_result, expected, rtol=1e-5, atol=1e-6)
