"""LearnedOptimizer in data-parallel training: DDP, FSDP2 and ZeroRedundancyOptimizer, on CPU.

Each mode runs ``distributed_job.py`` once, in a subprocess that spawns two ranks over gloo and then
repeats the training in a single process on the union of both ranks' batches. Gradients averaged
over two equal halves of a batch are the gradient of the mean loss over the whole batch, and the
update rule is coordinate-wise, so the distributed runs must reproduce the single-process one.

The job runs with a randomly initialised update rule, which moves parameters but does not learn,
and also with the bundled ``dm`` release where the installed package has it, to check that the loss
falls.
"""

import pathlib
import subprocess
import sys

import pytest
import torch

import flatopt
from tests.launch import run_job

JOB = pathlib.Path(__file__).with_name("distributed_job.py")
MODES = ["ddp", "fsdp2", "zero"]
# The job takes about 10 s on two busy CPU cores; past this it is hung (e.g. a rank waiting on a
# collective that its peer never reaches) and is killed with the ranks it spawned.
JOB_TIMEOUT_S = 180

pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="this torch build has no torch.distributed with the gloo backend",
    ),
    pytest.mark.skipif(sys.platform == "win32", reason="the job is launched in a POSIX session"),
]


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """Release folders to train with, by label: always "random", and "dm" when it is bundled."""
    torch.manual_seed(0)
    random_rule = flatopt.LSTMUpdateRule()
    folder = flatopt.save_release(random_rule, tmp_path_factory.mktemp("random"), name="test")
    folders = {"random": folder}
    if "dm" in flatopt.list_pretrained():
        folders["dm"] = flatopt.resolve_weights("dm")
    return folders


@pytest.fixture(scope="module", params=MODES)
def job(request, releases, tmp_path_factory):
    """Run the two-rank job for one mode; return ``{label: (rank results, single-process result)}``.

    A result is ``{"losses": [float per step], "params": {name: full tensor}}``.
    """
    mode = request.param
    out_dir = tmp_path_factory.mktemp(mode)
    _run_job(mode, out_dir, [str(folder) for folder in releases.values()])
    ranks = [torch.load(out_dir / f"rank{rank}.pt") for rank in range(2)]
    single = torch.load(out_dir / "single.pt")
    return {
        label: ([result[str(folder)] for result in ranks], single[str(folder)])
        for label, folder in releases.items()
    }


def test_every_rank_holds_bit_identical_parameters(job):
    for label, (ranks, _) in job.items():
        first, second = (result["params"] for result in ranks)
        assert first.keys() == second.keys()
        for name in first:
            assert torch.equal(first[name], second[name]), f"{label}: {name} differs between ranks"


def test_distributed_run_matches_single_process_on_the_union_batch(job):
    for label, (ranks, single) in job.items():
        for name, expected in single["params"].items():
            torch.testing.assert_close(
                ranks[0]["params"][name],
                expected,
                rtol=1e-4,
                atol=1e-5,
                msg=lambda message: f"{label}, parameter {name}: {message}",
            )
        # The loss of the union batch is the mean of the two ranks' losses on their halves.
        mean_losses = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
        torch.testing.assert_close(mean_losses, single["losses"], rtol=1e-4, atol=1e-5)


def test_loss_falls_with_the_bundled_release(job):
    if "dm" not in job:
        pytest.skip(
            "the bundled release 'dm' is not in the installed flatopt (meta-training builds it), "
            "and a random update rule does not learn, so there is no loss to expect falling"
        )
    ranks, _ = job["dm"]
    mean_losses = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    first, last = sum(mean_losses[:10]) / 10, sum(mean_losses[-10:]) / 10
    assert last < 0.5 * first, f"mean loss went from {first:.3f} (first 10 steps) to {last:.3f}"


# One process is enough to build DTensors; the step must refuse to pair the coordinates of a
# sharded parameter with those of a replicated gradient.
_MISPLACED_GRADIENT = """
import sys, torch, torch.distributed as dist
from torch.distributed.tensor import DeviceMesh, Replicate, Shard, distribute_tensor
import flatopt
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
mesh = DeviceMesh("cpu", [0])
p = torch.nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)]))
p.grad = distribute_tensor(torch.ones(4, 3), mesh, [Replicate()])
optimizer = flatopt.LearnedOptimizer([p], flatopt.LSTMUpdateRule())
try:
    optimizer.step()
except RuntimeError as error:
    print(error)
assert torch.equal(p.full_tensor(), torch.ones(4, 3)) and not optimizer.state[p]
p.grad = p.grad.redistribute(mesh, p.placements)
optimizer.step()
assert optimizer.state[p]["lstm_state"].shape == (12, optimizer.update_rule.state_size)
"""


def test_gradient_placed_unlike_its_parameter_is_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", _MISPLACED_GRADIENT, str(tmp_path / "rendezvous")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Redistribute the gradient" in result.stdout, result.stdout


def _run_job(mode, out_dir, weights):
    run_job([sys.executable, str(JOB), mode, str(out_dir), *weights], out_dir, JOB_TIMEOUT_S, mode)


@pytest.fixture
def single_process_group():
    """A gloo process group of this process alone, for what needs no second rank."""
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
    )
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def test_zero_state_saved_with_other_weights_is_refused_before_anything_moves(
    single_process_group,
):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from tests.flatopt.rule_cases import make_model, train_steps

    def zero(model, weights):
        return ZeroRedundancyOptimizer(
            model.parameters(), optimizer_class=flatopt.LearnedOptimizer, weights=weights
        )

    model = make_model()
    saving = zero(model, "dm-cl")
    train_steps(model, saving, 2)
    saving.consolidate_state_dict(to=0)
    saved = saving.state_dict()

    loading = zero(model, "dm-cl-entropy")
    train_steps(model, loading, 1)
    before = [p.detach().clone() for p in model.parameters()]
    # ZeroRedundancyOptimizer loads the state around LearnedOptimizer.load_state_dict; the next
    # step checks what it loaded.
    loading.load_state_dict(saved)
    with pytest.raises(ValueError, match="other weights than 'dm-cl-entropy'"):
        train_steps(model, loading, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    same = zero(model, "dm-cl")
    same.load_state_dict(saved)
    train_steps(model, same, 1)


def _stepped_zero(weights="dm-cl"):
    """A model, ZeroRedundancyOptimizer over LearnedOptimizer after one step, and its state dict."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from tests.flatopt.rule_cases import make_model, train_steps

    model = make_model()
    opt = ZeroRedundancyOptimizer(
        model.parameters(), optimizer_class=flatopt.LearnedOptimizer, weights=weights
    )
    train_steps(model, opt, 1)
    opt.consolidate_state_dict(to=0)
    return model, opt, opt.state_dict()


def test_zero_state_with_nan_never_reaches_the_parameters(single_process_group):
    from tests.flatopt.rule_cases import train_steps

    model, opt, saved = _stepped_zero()
    saved["state"][0]["lstm_state"][:] = float("nan")
    opt.load_state_dict(saved)
    first = next(iter(model.parameters()))
    before = first.detach().clone()
    with pytest.warns(RuntimeWarning, match="state itself is not finite"):
        train_steps(model, opt, 1)
    assert torch.equal(first, before)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "key, value",
    [("lr", float("inf")), ("lr", torch.tensor(float("nan"))), ("weight_decay", -1.0)],
)
def test_zero_loaded_group_settings_are_checked_before_anything_moves(
    single_process_group, key, value
):
    from tests.flatopt.rule_cases import train_steps

    model, opt, saved = _stepped_zero()
    saved["param_groups"][0][key] = value
    opt.load_state_dict(saved)  # ZeroRedundancyOptimizer copies the groups' settings in
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=key.replace("lr", "learning rate")):
        train_steps(model, opt, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
