"""A meta-training run killed with SIGKILL and rerun ends exactly where an uninterrupted run does.

The runs are real ``python -m training train`` processes on real MNIST, with a curriculum (so the
stage state travels through the checkpoint) and a Hessian-trace regularizer (so random probes
do). Each kill point is found from what the run has written, never from a guess at its speed: a
run is killed right after it logs the start of a curriculum stage (inside the next epoch's first
unroll), a fraction of an epoch after a checkpoint, and the instant an epoch's log record appears
(in or next to the checkpoint write).
"""

import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ROOT = pathlib.Path(__file__).resolve().parents[2]

# ``python -m training`` would put the working directory first on sys.path; the checkout is
# appended instead, so that flatopt comes from its installed wheel as in the rest of the tests.
LAUNCH = f"import sys; sys.path.append({str(ROOT)!r}); from training.__main__ import main; main()"

IMITATION_EPOCHS, META_EPOCHS = 2, 3
TOTAL_EPOCHS = IMITATION_EPOCHS + META_EPOCHS
RECIPE_FLAGS = [
    *("--imitation-epochs", str(IMITATION_EPOCHS), "--imitation-unrolls", "2"),
    *("--meta-epochs", str(META_EPOCHS), "--unroll-length", "10"),
    *("--curriculum", "20", "40", "--validate-every", "1", "--validation-seeds", "1"),
    *("--regularizer", "hessian-trace", "--reg-lambda", "1e-3", "--reg-probes", "2"),
]
TIMEOUT_S = 300  # per wait; generous, since the test machine may be busy with other training


def command(folder):
    return [
        *(sys.executable, "-c", LAUNCH, "train", "--name", "trial"),
        *("--out", str(folder / "run"), "--export", str(folder / "release")),
        *("--threads", "1", "--eval-seeds", "1", "--eval-steps", "20"),
        *RECIPE_FLAGS,
    ]


def start(folder):
    folder.mkdir(exist_ok=True)
    # The output goes to a file, not to a pipe that could fill up and block the run.
    with open(folder / "output.txt", "ab") as output:
        return subprocess.Popen(
            command(folder), cwd=folder, stdout=output, stderr=subprocess.STDOUT
        )


def output(folder):
    return (folder / "output.txt").read_text(errors="replace")


def finish(process, folder):
    returncode = process.wait(timeout=TIMEOUT_S)
    assert returncode == 0, f"the run failed with exit status {returncode}:\n{output(folder)}"


def read_log(folder):
    """The log's complete records (a line still being written is left out)."""
    path = folder / "run" / "log.jsonl"
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    return [json.loads(line) for line in lines]


def epoch_records(records):
    return [r for r in records if "epoch" in r]


def checkpoint_epoch(folder):
    """Epochs finished according to the checkpoint, or 0 without one."""
    path = folder / "run" / "checkpoint.pt"
    if not path.exists():
        return 0
    # The trainer replaces the checkpoint atomically, so a read never sees a half-written file.
    return torch.load(path, weights_only=True)["epoch"]


def wait_until(process, folder, condition, what):
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if process.poll() is not None:
            pytest.fail(
                f"the run exited (status {process.returncode}) before {what}, so it could not be "
                f"killed there:\n{output(folder)}"
            )
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"no {what} within {TIMEOUT_S} s:\n{output(folder)}")
        time.sleep(0.01)


def kill(process, folder):
    """SIGKILL the run and check that the signal, not the end of training, stopped it."""
    process.send_signal(signal.SIGKILL)
    returncode = process.wait(timeout=TIMEOUT_S)
    assert returncode == -signal.SIGKILL, (
        f"the run ended with status {returncode} before the kill arrived; kill it earlier:\n"
        f"{output(folder)}"
    )
    assert not (folder / "release").exists(), "the run got as far as exporting its release"


def without_timing(records):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records]


def test_killed_and_resumed_run_equals_uninterrupted_run(mnist, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    finish(start(straight), straight)

    # Kill 1: the stage start is logged after the stage's baseline validation, just before its
    # first epoch trains, so the run dies in that epoch's first unroll, before its checkpoint.
    process = start(killed)
    wait_until(
        process,
        killed,
        lambda: any(r.get("event") == "stage start" for r in read_log(killed)),
        "the start of the curriculum stage",
    )
    kill(process, killed)
    assert checkpoint_epoch(killed) == IMITATION_EPOCHS
    assert len(epoch_records(read_log(killed))) == IMITATION_EPOCHS

    # Kill 2: a fraction of an epoch after a meta-training epoch's checkpoint, with a stage under
    # way. The epoch's record must be missing afterwards: the kill came before the epoch ended.
    process = start(killed)
    wait_until(
        process,
        killed,
        lambda: checkpoint_epoch(killed) == IMITATION_EPOCHS + 1,
        "the first meta-training checkpoint",
    )
    time.sleep(0.2)
    kill(process, killed)
    finished = checkpoint_epoch(killed)
    assert finished == IMITATION_EPOCHS + 1 < TOTAL_EPOCHS
    assert all(r["epoch"] < finished for r in epoch_records(read_log(killed)))

    # Kill 3: the instant the next epoch's record is logged, which the checkpoint write follows;
    # the atomic write must leave either the old or the new checkpoint, both resumable.
    process = start(killed)
    wait_until(
        process,
        killed,
        lambda: any(r["epoch"] == finished for r in epoch_records(read_log(killed))),
        f"the record of epoch {finished}",
    )
    kill(process, killed)
    assert checkpoint_epoch(killed) in (finished, finished + 1)
    assert checkpoint_epoch(killed) < TOTAL_EPOCHS

    # A kill inside torch.save leaves a truncated temporary file next to the intact checkpoint;
    # make one for certain, since kill 3 only sometimes lands there.
    run = killed / "run"
    intact = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt.tmp").write_bytes(intact[: len(intact) // 2])

    finish(start(killed), killed)

    expected = load_file(straight / "release" / "model.safetensors")
    resumed = load_file(killed / "release" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), f"{name} differs after resuming"

    configs = [json.loads((f / "release" / "config.json").read_text()) for f in (straight, killed)]
    assert (
        configs[0]["provenance"]["best_validation"] == configs[1]["provenance"]["best_validation"]
    )
    assert configs[0]["evaluation"] == configs[1]["evaluation"]

    log = read_log(straight)
    assert len(epoch_records(log)) == TOTAL_EPOCHS
    assert without_timing(read_log(killed)) == without_timing(log)
