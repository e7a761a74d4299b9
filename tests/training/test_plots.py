"""Plots of meta-training logs, through ``python -m training plot``."""

import json

import pytest
from matplotlib.image import imread

from training.__main__ import main
from training.plots import DPI, PANEL_INCHES, read_log


def epoch(index, phase, loss, stage=None, validation=None, regularized=False):
    record = {
        "epoch": index,
        "phase": phase,
        "stage": stage,
        "optimizee": "mnist-mlp-sigmoid",
        "loss": loss,
        "meta_grad_norm": 0.5,
    }
    if regularized:
        record.update(
            regularizer="hessian-trace", regularizer_value=8.0 - index, regularizer_grad_ratio=0.1
        )
    if validation is not None:
        record["validation"] = validation
    return {**record, "elapsed_s": 10.0 * (index + 1)}


def stage_start(stage, horizon, baseline):
    return {
        "event": "stage start",
        "stage": stage,
        "horizon": horizon,
        "validation_steps": 2 * horizon,
        "baseline": {"loss": baseline, "accuracy": 0.9},
        "elapsed_s": 0.0,
    }


def validation(loss, steps, decision=None):
    record = {"loss": loss, "accuracy": 0.9, "steps": steps, "best_epoch": 3}
    return record if decision is None else {**record, "decision": decision}


def curriculum_log(regularized=True):
    """Two imitation epochs, then a stage that advances and one that stops on divergence."""
    advance, stop = "stage improved; advancing to stage 1", "stage did not improve; stopping"
    return [
        epoch(0, "imitation", 1.5),
        epoch(1, "imitation", 0.8),
        stage_start(0, 20, 0.30),
        epoch(2, "meta", 0.50, 0, validation(0.28, 40), regularized),
        epoch(3, "meta", 0.45, 0, validation(0.29, 40, advance), regularized),
        stage_start(1, 40, 0.27),
        # A diverged validation scores inf, which the log holds as Infinity.
        epoch(4, "meta", 0.40, 1, validation(float("inf"), 80, stop), regularized),
    ]


def write_log(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def plot(capsys, *arguments):
    """Run ``python -m training plot``; return its exit status and its output."""
    try:
        main(["plot", *map(str, arguments)])
        status = 0
    except SystemExit as exc:
        status = exc.code
    captured = capsys.readouterr()
    return status, captured.out + captured.err


@pytest.mark.parametrize("regularized, panels", [(True, 4), (False, 2)])
def test_plot_writes_a_png_with_one_panel_per_quantity(tmp_path, capsys, regularized, panels):
    logs = [
        write_log(tmp_path / name / "log.jsonl", curriculum_log(regularized))
        for name in ("lambda-0.01", "lambda-0.1")
    ]
    out = tmp_path / "figures" / "log.png"

    status, output = plot(capsys, *logs, "--out", out)

    assert status == 0, output
    assert out.stat().st_size > 0
    height, width, _ = imread(out).shape
    assert (width, height) == (PANEL_INCHES[0] * DPI, panels * PANEL_INCHES[1] * DPI)


def test_a_line_that_is_not_json_is_one_clear_error(tmp_path, capsys):
    log = tmp_path / "run" / "log.jsonl"
    write_log(log, curriculum_log())
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join([lines[0], '{"epoch": 1, "phase": \n', *lines[1:]]))

    status, output = plot(capsys, log, "--out", tmp_path / "log.png")

    assert status == 2
    assert output.startswith("error: ") and output.count("\n") == 1, output
    assert f"{log}, line 2: not a JSON record" in output
    assert not (tmp_path / "log.png").exists()


def test_a_missing_log_is_one_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "log.jsonl"

    status, output = plot(capsys, missing, "--out", tmp_path / "log.png")

    assert status == 2
    assert output.startswith("error: ") and output.count("\n") == 1, output
    assert str(missing) in output


def test_a_record_of_another_kind_is_refused(tmp_path):
    log = write_log(tmp_path / "log.jsonl", [epoch(0, "meta", 0.5), {"loss": 0.5}])
    with pytest.raises(ValueError, match="line 2: neither an epoch record"):
        read_log(log)


def test_a_line_still_being_written_is_skipped(tmp_path):
    log = write_log(tmp_path / "log.jsonl", curriculum_log())
    with open(log, "a", encoding="utf-8") as file:
        file.write('{"epoch": 5, "pha')  # a running trainer's next record, half written

    epochs, events = read_log(log)

    assert [r["epoch"] for r in epochs] == [0, 1, 2, 3, 4]
    assert [(e["stage"], e["x"]) for e in events] == [(0, 2), (1, 4)]
