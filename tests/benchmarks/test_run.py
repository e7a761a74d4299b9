"""The meta-test benchmark on real MNIST."""

import json

import pytest

from benchmarks.__main__ import main
from benchmarks.run import format_table, run_benchmark, write_outputs


def test_short_benchmark_writes_json_png_and_table(mnist, tmp_path):
    report = run_benchmark(["sgd", "adam", "dm"], steps=40, seeds=2, eval_every=20)
    json_path, png_path = write_outputs(report, tmp_path)

    saved = json.loads(json_path.read_text())
    assert set(saved["results"]) == {"sgd", "adam", "dm"}
    for result in saved["results"].values():
        assert len(result["runs"]) == 2
        for run in result["runs"]:
            assert len(run["train_loss"]) == 40
            assert run["eval_steps"] == [20, 40]
        # 40 steps already beat chance (10%) clearly for every optimizer.
        assert result["summary"]["test_accuracy_mean"] > 0.3
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(report)
    assert "| dm |" in table and "| adam |" in table


def test_bundled_dm_reaches_90_percent_on_mlp_relu(mnist):
    report = run_benchmark(["dm"], steps=1000, seeds=1, eval_every=1000)
    assert report["results"]["dm"]["summary"]["test_accuracy_mean"] >= 0.90


def test_unknown_optimizer_fails_before_training_with_a_clear_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--optimizers", "sgd", "no-such-optimizer", "--steps", "1"])
    assert exit_info.value.code == 2
    assert "unknown weights 'no-such-optimizer'" in capsys.readouterr().err


def test_non_positive_step_counts_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--steps", "0"])
    assert "must be at least 1" in capsys.readouterr().err
