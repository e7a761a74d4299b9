"""The step-cost benchmark runs and reports consistent ratios (no timing thresholds here)."""

import json

from benchmarks.__main__ import main
from benchmarks.speed import format_speed_table, step_costs


def test_step_costs_report_both_optimizers_per_size():
    report = step_costs(sizes=(100, 2000), repeats=2)
    assert [row["parameters"] for row in report["rows"]] == [100, 2000]
    for row in report["rows"]:
        assert row["adam_s"] > 0 and row["learned_s"] > 0
        assert row["ratio"] == row["learned_s"] / row["adam_s"]
    assert "| 2,000 |" in format_speed_table(report)


def test_speed_command_writes_json(tmp_path, capsys):
    main(["speed", "--sizes", "50", "--repeats", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["rows"][0]["parameters"] == 50
    assert "learned step" in capsys.readouterr().out
