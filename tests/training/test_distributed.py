"""Meta-training under torchrun: two gloo processes compute what one process computes.

The two-process parts are real ``torchrun`` launches (``python -m torch.distributed.run``) on real
MNIST, of this file run as a script (``JOB`` below) or of ``python -m training train``. Every
process runs one torch thread, as does the single-process reference in the test process, so the
arithmetic is the same everywhere and the comparisons can be exact.
"""

import json
import os
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
if __name__ == "__main__":  # run by torchrun as a job: the checkout is appended, as in conftest
    sys.path.append(str(ROOT))

from tests.launch import run_job  # noqa: E402
from tests.training.meta_cases import log_records  # noqa: E402
from training.meta import MetaTrainer, Recipe  # noqa: E402

# Three optimizees per meta-step over two processes: process 0 unrolls optimizees 0 and 2,
# process 1 optimizee 1, so the split is uneven and the average must weight it correctly. The
# gradient clip is out of reach so that the weights' .grad after a step is the raw average.
GRADIENT_RECIPE = Recipe(
    tasks_per_step=3,
    imitation_epochs=1,
    imitation_unrolls=1,
    meta_epochs=1,
    meta_unrolls=1,
    unroll_length=5,
    max_grad_norm=1e6,
    regularizer="hessian-trace",
    reg_lambda=1e-2,
    reg_probes=2,
)
# A curriculum (stage decisions travel through the checkpoint), two validation seeds (split
# across the processes) and a Hessian-trace regularizer (random probes from each optimizee's seed).
RESUME_SETTINGS = {
    "tasks_per_step": 2,
    "imitation_epochs": 1,
    "imitation_unrolls": 1,
    "meta_epochs": 3,
    "unroll_length": 5,
    "curriculum": [10, 20],
    "validate_every": 1,
    "validation_seeds": 2,
    "regularizer": "hessian-trace",
    "reg_lambda": 1e-2,
    "reg_probes": 2,
}
RESUME_RECIPE = Recipe(**RESUME_SETTINGS)
RESUME_AT = 2  # epochs run before the switch in the number of processes
TIMEOUT_S = 240  # per launch; one takes about 10 s on two busy cores

pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="this torch build has no torch.distributed with the gloo backend",
    ),
    pytest.mark.skipif(sys.platform == "win32", reason="the launches run in a POSIX session"),
]

# ``python -m training`` would put the working directory first on sys.path; the checkout is
# appended instead, so that flatopt comes from its installed wheel as in the rest of the tests.
LAUNCH = f"import sys; sys.path.append({str(ROOT)!r}); from training.__main__ import main; main()"


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchrun(arguments, cwd):
    """Run ``torchrun --standalone --nproc_per_node 2 ARGUMENTS``; fail the test if it fails."""
    env = dict(os.environ)
    # gloo connects through the interface of the host name, which a container may not route to.
    if sys.platform == "linux":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    return run_job([*command, "2", *arguments], cwd, TIMEOUT_S, "the launch", env)


def assert_same_tensors(actual, expected, what):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), f"{what}: {name} differs"


def test_two_processes_average_to_the_single_process_meta_gradient(mnist, tmp_path, one_thread):
    torchrun([__file__, "gradients", str(tmp_path)], tmp_path)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]

    single = MetaTrainer(GRADIENT_RECIPE, mnist, tmp_path / "single", progress=False)
    expected = []
    for epoch in range(2):  # an imitation epoch, then a regularized meta-training one
        record = single.train_epoch(epoch)
        grads = {n: w.grad.clone() for n, w in single.update_rule.named_parameters()}
        expected.append({"record": record, "grads": grads})

    count = GRADIENT_RECIPE.tasks_per_step
    for epoch, reference in enumerate(expected):
        # (a) The meta-gradient both processes step with is the single process's, and so are
        # the logged loss, gradient norm and regularizer share.
        for rank, result in enumerate(ranks):
            got = result["epochs"][epoch]
            assert_same_tensors(got["grads"], reference["grads"], f"epoch {epoch}, rank {rank}")
            assert got["record"] == reference["record"]

        # (b) The processes split the optimizees: each filled only its own rows of the shared
        # buffer before the sum, and their shares of the meta-gradient differ.
        shares = []
        for rank, result in enumerate(ranks):
            rows = result["epochs"][epoch]["rows"]  # (optimizee, loss and regularizer, weights)
            filled = [i for i in range(count) if rows[i].abs().sum() > 0]
            assert filled == list(range(rank, count, 2)), (epoch, rank, filled)
            shares.append(rows.sum(dim=(0, 1)) / count)
        assert not torch.allclose(shares[0], shares[1], rtol=0.1, atol=0.0)
        total = torch.cat([g.reshape(-1) for g in reference["grads"].values()])
        torch.testing.assert_close(shares[0] + shares[1], total, rtol=1e-5, atol=1e-8)

    # Both processes stepped with the same update: they hold the single process's weights.
    weights = single.update_rule.state_dict()
    for rank, result in enumerate(ranks):
        assert_same_tensors(result["weights"], weights, f"weights of rank {rank}")


def test_checkpoints_resume_under_another_number_of_processes(mnist, tmp_path, one_thread):
    straight = MetaTrainer(RESUME_RECIPE, mnist, tmp_path / "straight", progress=False)
    straight.run()
    expected_log = log_records(tmp_path / "straight")
    assert len([r for r in expected_log if "epoch" in r]) == RESUME_RECIPE.meta_epochs + 1

    # Two processes, then one: the run stops after RESUME_AT epochs, checkpointed by process 0
    # alone (the log holds each epoch once), and a single process finishes it.
    two_then_one = tmp_path / "two-then-one"
    torchrun([__file__, "run", str(two_then_one), str(RESUME_AT)], tmp_path)
    checkpoint = torch.load(two_then_one / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == RESUME_AT
    assert log_records(two_then_one) == expected_log[: len(log_records(two_then_one))]
    assert [r["epoch"] for r in log_records(two_then_one) if "epoch" in r] == [0, 1]
    resumed = MetaTrainer(RESUME_RECIPE, mnist, two_then_one, progress=False)
    resumed.run()
    assert resumed.epoch == straight.epoch
    assert_same_tensors(
        resumed.update_rule.state_dict(), straight.update_rule.state_dict(), "two, then one"
    )
    assert resumed.best == straight.best
    assert log_records(two_then_one) == expected_log

    # One process, then two through the command line, which also exports the release.
    one_then_two = tmp_path / "one-then-two"
    MetaTrainer(RESUME_RECIPE, mnist, one_then_two / "run", progress=False).run(until=RESUME_AT)
    flags = []
    for name, value in RESUME_SETTINGS.items():
        values = value if isinstance(value, list) else [value]
        flags += [f"--{name.replace('_', '-')}", *map(str, values)]
    torchrun(
        [
            *("--no-python", sys.executable, "-c", LAUNCH, "train", "--name", "trial"),
            *("--out", str(one_then_two / "run"), "--export", str(one_then_two / "release")),
            *("--threads", "1", "--eval-seeds", "1", "--eval-steps", "20", *flags),
        ],
        one_then_two,
    )
    from safetensors.torch import load_file

    released = load_file(one_then_two / "release" / "model.safetensors")
    assert_same_tensors(released, straight.best_update_rule().state_dict(), "one, then two")
    assert log_records(one_then_two / "run") == expected_log
    config = json.loads((one_then_two / "release" / "config.json").read_text())
    assert config["provenance"]["best_validation"]["loss"] == straight.best["loss"]


def _gradients_job(out_dir, dataset):
    """Two meta-steps, recording the rows each process adds to the sum, its .grad and weights."""
    trainer = MetaTrainer(GRADIENT_RECIPE, dataset, out_dir / "unused", progress=False)
    contributions = []
    sum_over_processes = trainer.processes.sum

    def recording_sum(tensor):
        if tensor.dtype == torch.float32:  # the meta-gradient rows, not the float64 losses
            contributions.append(tensor.clone())
        return sum_over_processes(tensor)

    trainer.processes.sum = recording_sum
    epochs = []
    for epoch in range(2):
        record = trainer.train_epoch(epoch)
        grads = {n: w.grad.clone() for n, w in trainer.update_rule.named_parameters()}
        epochs.append({"record": record, "grads": grads, "rows": contributions.pop()})
        assert not contributions, "one meta-step per epoch expected"
    result = {"epochs": epochs, "weights": trainer.update_rule.state_dict()}
    torch.save(result, out_dir / f"rank{trainer.processes.rank}.pt")


if __name__ == "__main__":
    from training import distributed
    from training.data import load_dataset

    torch.set_num_threads(1)
    mode, folder = sys.argv[1], pathlib.Path(sys.argv[2])
    mnist_dataset = load_dataset("mnist")
    try:
        if mode == "gradients":
            _gradients_job(folder, mnist_dataset)
        else:
            MetaTrainer(RESUME_RECIPE, mnist_dataset, folder, progress=False).run(
                until=int(sys.argv[3])
            )
    finally:
        distributed.leave()
