"""The LSTM rule's in-place step: same function as its autograd forward, on either implementation.

Every equivalence test runs twice: with the native kernel (skipped where it cannot be built) and
with torch operators only, forced by :func:`flatopt.native_kernel.disabled`.
"""

import contextlib
import copy
import io
import logging
import math
import os
import platform
import subprocess
import sys
import threading
import warnings

import pytest
import torch
from torch.utils import cpp_extension

import flatopt
from flatopt import native_kernel
from flatopt.fused_step import StepWorkspace
from tests.flatopt.rule_cases import make_model, train_steps

# Float32 against a float64 forward: the tolerances of test_update_rule's scalar reference.
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(params=["native", "torch"])
def implementation(request):
    """Run the test body with one implementation of the in-place step."""
    if request.param == "torch":
        with native_kernel.disabled():
            yield request.param
        return
    if native_kernel.load() is None:
        pytest.skip("the native kernel cannot be built here")
    yield request.param


@pytest.fixture
def rule():
    torch.manual_seed(0)
    rule = flatopt.LSTMUpdateRule().requires_grad_(False)
    rule.output_bias.fill_(0.05)  # exercise the bias too
    return rule


def awkward_gradients(size, seed=0):
    """Gradients over many magnitudes, with zeros, both sides of the preprocessing threshold."""
    generator = torch.Generator().manual_seed(seed)
    grad = torch.randn(size, generator=generator) * torch.exp(
        6 * torch.randn(size, generator=generator)
    )
    special = torch.tensor(
        [0.0, -0.0, 1e-30, -1e-40, math.exp(-10), -math.exp(-10) * 0.999, 3e38, -3e38, 1e-6, 40.0]
    )
    grad[: len(special)] = special
    return grad


def random_state(rule, size, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return 0.7 * torch.randn(size, rule.state_size, generator=generator)


def reference(rule, grad, state):
    """The differentiable forward, in float64."""
    with torch.no_grad():
        update, new_state = rule.double()(grad.double(), state.double())
    rule.float()
    return update, new_state


def split(tensor, sizes):
    return list(tensor.split(sizes))


SIZES = [1, 0, 250, 37, 4096 + 3, 1000]  # empty, single and chunk-straddling tensors


def test_inplace_step_matches_forward_over_three_steps(implementation, rule):
    total = sum(SIZES)
    state = random_state(rule, total)
    expected_state = state.double()
    workspace = StepWorkspace()
    for step in range(3):
        grad = awkward_gradients(total, seed=step)
        expected_update, expected_state = reference(rule, grad, expected_state)
        update = torch.full((total,), float("nan"))
        rule.step_inplace(
            split(grad, SIZES),
            split(state, SIZES),
            split(update, SIZES),
            workspace=workspace,
            chunk=300,  # small chunks: tensors span several, and chunks span several tensors
        )
        torch.testing.assert_close(update.double(), expected_update, rtol=RTOL, atol=1e-7)
        torch.testing.assert_close(state.double(), expected_state, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("chunk", [3, 7, 4096, None])
def test_torch_chunking_does_not_change_the_result(rule, chunk):
    total = sum(SIZES)
    grad, state = awkward_gradients(total), random_state(rule, total)
    results = []
    for size in (chunk, 1 << 20):
        new_state, update = state.clone(), torch.empty(total)
        with native_kernel.disabled():
            rule.step_inplace(
                split(grad, SIZES), split(new_state, SIZES), split(update, SIZES), chunk=size
            )
        results.append((update, new_state))
    # BLAS blocks a 3-row product differently from a million-row one, so the sums may round
    # differently: a few float32 ulps, the tolerance of the float64 comparisons above.
    torch.testing.assert_close(results[0], results[1], rtol=RTOL, atol=ATOL)


def test_state_and_update_are_written_where_they_lie(implementation, rule):
    state, update = random_state(rule, 500), torch.zeros(500)
    before, state_address, update_address = state.clone(), state.data_ptr(), update.data_ptr()
    rule.step_inplace([awkward_gradients(500)], [state], [update])
    assert state.data_ptr() == state_address and update.data_ptr() == update_address
    assert not torch.equal(state, before) and update.abs().sum() > 0


def test_updates_alone_leave_the_state_untouched(implementation, rule):
    grad, state = awkward_gradients(777), random_state(rule, 777)
    written, dry = state.clone(), state.clone()
    update, dry_update = torch.empty(777), torch.empty(777)
    rule.step_inplace([grad], [written], [update])
    rule.step_inplace([grad], [dry], [dry_update], write_state=False)
    assert torch.equal(dry, state)
    assert torch.equal(dry_update, update)


def test_maximize_negates_the_gradient(implementation, rule):
    grad, state = awkward_gradients(300), random_state(rule, 300)
    plain, flipped = state.clone(), state.clone()
    update, flipped_update = torch.empty(300), torch.empty(300)
    rule.step_inplace([grad], [plain], [update])
    rule.step_inplace([-grad], [flipped], [flipped_update], maximize=True)
    assert torch.equal(update, flipped_update) and torch.equal(plain, flipped)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_flags_leave_dropped_tensors_untouched(rule, dtype):
    """The accelerator path (masks instead of host-side skips), run here on the CPU."""
    sizes = [100, 200]
    grad, state = awkward_gradients(300), random_state(rule, 300).to(dtype)
    grad[5] = float("nan")  # in the dropped tensor
    expected_state, expected_update = state.clone(), torch.empty(300)
    rule.step_inplace(split(grad, sizes)[1:], [expected_state[100:]], [expected_update[100:]])
    masked_state, update = state.clone(), torch.empty(300)
    rule.step_inplace(
        split(grad, sizes),
        split(masked_state, sizes),
        split(update, sizes),
        keep=[torch.tensor(False), torch.tensor(True)],
        chunk=64,
    )
    assert torch.equal(masked_state[:100], state[:100])
    # The unmasked step may run on the native kernel: bfloat16 roundings may then differ by one.
    rtol = 1 / 128 if dtype == torch.bfloat16 else RTOL
    torch.testing.assert_close(masked_state[100:], expected_state[100:], rtol=rtol, atol=ATOL)
    torch.testing.assert_close(update[100:], expected_update[100:], rtol=RTOL, atol=1e-7)


def test_bfloat16_state_follows_the_float32_computation(implementation, rule):
    grad, state = awkward_gradients(2000), random_state(rule, 2000).to(torch.bfloat16)
    expected_update, expected_state = reference(rule, grad, state.float())
    update = torch.empty(2000)
    rule.step_inplace([grad], [state], [update])
    assert state.dtype == torch.bfloat16
    # The update is computed in float32 from the stored state; only the new state is rounded.
    torch.testing.assert_close(update.double(), expected_update, rtol=RTOL, atol=1e-7)
    torch.testing.assert_close(
        state.double(), expected_state.to(torch.bfloat16).double(), rtol=1 / 128, atol=1e-6
    )


def test_native_and_torch_implementations_agree(rule):
    if native_kernel.load() is None:
        pytest.skip("the native kernel cannot be built here")
    grad = awkward_gradients(5000)
    for dtype in (torch.float32, torch.bfloat16):
        state = random_state(rule, 5000).to(dtype)
        results = []
        for disable in (False, True):
            new_state, update = state.clone(), torch.empty(5000)
            with native_kernel.disabled() if disable else contextlib.nullcontext():
                rule.step_inplace([grad], [new_state], [update])
            results.append((update, new_state.float()))
        tolerance = 1 / 128 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(results[0], results[1], rtol=tolerance, atol=1e-6)


# Narrower instruction sets than this machine's: their tile transposes and vector widths differ.
NARROWER_BUILDS = {"avx2": ["-mno-avx512f"], "sse": ["-mno-avx"]}


@pytest.mark.parametrize("isa", sorted(NARROWER_BUILDS))
def test_native_kernel_built_for_narrower_vectors_matches_forward(rule, isa, monkeypatch):
    if platform.machine().lower() not in ("x86_64", "amd64") or native_kernel.load() is None:
        pytest.skip("narrower x86 builds need an x86 machine that builds the kernel")
    variant = native_kernel._build(NARROWER_BUILDS[isa])
    assert variant is not None
    assert variant.lanes() == {"avx2": 8, "sse": 4}[isa]
    monkeypatch.setattr(native_kernel, "_kernel", variant)
    total = sum(SIZES)
    for dtype in (torch.float32, torch.bfloat16):
        state = random_state(rule, total).to(dtype)
        grad = awkward_gradients(total)
        expected_update, expected_state = reference(rule, grad, state.double())
        update = torch.full((total,), float("nan"))
        rule.step_inplace(split(grad, SIZES), split(state, SIZES), split(update, SIZES))
        rtol = 1 / 128 if dtype == torch.bfloat16 else RTOL
        torch.testing.assert_close(update.double(), expected_update, rtol=RTOL, atol=1e-7)
        torch.testing.assert_close(
            state.double(), expected_state.to(dtype).double(), rtol=rtol, atol=ATOL
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_step_is_the_same_on_any_number_of_threads(rule, dtype):
    # Tiles are independent, so splitting them among threads must not change a bit; the size spans
    # many parallel tasks and ends in a partial tile.
    if native_kernel.load() is None:
        pytest.skip("the native kernel cannot be built here")
    size = 50_000 + 3
    grad, state = awkward_gradients(size), random_state(rule, size).to(dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            new_state, update = state.clone(), torch.empty(size)
            rule.step_inplace([grad], [new_state], [update])
            results.append((update, new_state))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert torch.equal(results[0][0], other[0]) and torch.equal(results[0][1], other[1])


# --- The optimizer on the in-place step -----------------------------------------------------------


def test_bfloat16_state_halves_the_memory_and_trains_alike(implementation):
    model, reference_model = make_model(), make_model()
    opt = flatopt.LearnedOptimizer(model.parameters(), state_dtype=torch.bfloat16)
    reference_opt = flatopt.LearnedOptimizer(reference_model.parameters())
    train_steps(model, opt, 5)
    train_steps(reference_model, reference_opt, 5)
    for p, q in zip(model.parameters(), reference_model.parameters()):
        state, reference_state = opt.state[p]["lstm_state"], reference_opt.state[q]["lstm_state"]
        assert state.dtype == torch.bfloat16 and reference_state.dtype == torch.float32
        assert 2 * state.numel() * state.element_size() == (
            reference_state.numel() * reference_state.element_size()
        )
        torch.testing.assert_close(p, q, rtol=1e-2, atol=2e-3)


def test_bfloat16_state_dict_round_trip_keeps_the_dtype_and_resumes_exactly():
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters(), state_dtype=torch.bfloat16)
    train_steps(model, opt, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_model = make_model(seed=5)
    resumed_model.load_state_dict(saved["model"])
    resumed = flatopt.LearnedOptimizer(resumed_model.parameters(), state_dtype=torch.bfloat16)
    resumed.load_state_dict(saved["opt"])
    for p in resumed_model.parameters():
        assert resumed.state[p]["lstm_state"].dtype == torch.bfloat16

    train_steps(model, opt, 4, seed=2)
    train_steps(resumed_model, resumed, 4, seed=2)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["lstm_state"], resumed.state[b]["lstm_state"])


def test_state_dict_takes_the_loading_optimizers_state_dtype():
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters())
    train_steps(model, opt, 2)
    low = flatopt.LearnedOptimizer(make_model().parameters(), state_dtype=torch.bfloat16)
    low.load_state_dict(opt.state_dict())
    for p, q in zip(model.parameters(), low.param_groups[0]["params"]):
        stored = low.state[q]["lstm_state"]
        assert stored.dtype == torch.bfloat16
        assert torch.equal(stored, opt.state[p]["lstm_state"].to(torch.bfloat16))


@pytest.mark.parametrize("state_dtype", [torch.float16, torch.float64, "bfloat16", None])
def test_unsupported_state_dtype_is_refused(state_dtype):
    with pytest.raises(ValueError, match="state_dtype"):
        flatopt.LearnedOptimizer(make_model().parameters(), state_dtype=state_dtype)


def test_bfloat16_state_is_kept_by_deepcopy_and_shown_by_repr():
    opt = flatopt.LearnedOptimizer(make_model().parameters(), state_dtype=torch.bfloat16)
    assert copy.deepcopy(opt).state_dtype == torch.bfloat16
    assert "state_dtype: torch.bfloat16" in repr(opt)


def test_a_max_update_below_the_bound_computes_updates_first_with_the_same_result(implementation):
    default_model, checked_model = make_model(), make_model()
    default = flatopt.LearnedOptimizer(default_model.parameters())
    bound = default.update_rule.update_bound()
    assert bound < 1.0  # the default max_update needs no extra pass with the bundled weights
    # Below the bound, but above every update these gradients produce.
    checked = flatopt.LearnedOptimizer(checked_model.parameters(), max_update=0.99 * bound)
    train_steps(default_model, default, 3)
    train_steps(checked_model, checked, 3)
    for p, q in zip(default_model.parameters(), checked_model.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(default.state[p]["lstm_state"], checked.state[q]["lstm_state"])


def test_a_diverged_network_never_writes_its_state(implementation, rule, tmp_path):
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters(), rule)
    train_steps(model, opt, 1)
    states = [opt.state[p]["lstm_state"].clone() for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        rule.cell1_weight[0, 0] = float("nan")  # only the first cell: the read-out stays finite
    assert rule.update_bound() == math.inf
    with pytest.warns(RuntimeWarning, match="skipped the update"):
        train_steps(model, opt, 1)
    for p, state, before in zip(model.parameters(), states, params):
        assert torch.equal(opt.state[p]["lstm_state"], state)
        assert torch.equal(p, before)


def test_a_replaced_forward_is_honoured():
    class Doubled(flatopt.LSTMUpdateRule):
        def forward(self, grad, state):
            update, new_state = super().forward(grad, state)
            return 2 * update, new_state

    torch.manual_seed(0)
    plain_rule = flatopt.LSTMUpdateRule()
    doubled_rule = Doubled()
    doubled_rule.load_state_dict(plain_rule.state_dict())
    assert plain_rule.inplace_step_matches_forward
    assert not doubled_rule.inplace_step_matches_forward
    plain = torch.nn.Parameter(torch.zeros(10))
    doubled = torch.nn.Parameter(torch.zeros(10))
    for param, rule in ((plain, plain_rule), (doubled, doubled_rule)):
        param.grad = torch.linspace(-1, 1, 10)
        flatopt.LearnedOptimizer([param], rule).step()
    torch.testing.assert_close(doubled, 2 * plain)


def allocation_records(function):
    """(peak, net) bytes of CPU tensor memory allocated while ``function()`` runs."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        function()
    records = sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    running = peak = 0
    for _, change in records:
        running += change
        peak = max(peak, running)
    return peak, running


def test_steps_allocate_nothing_that_grows_with_the_model(implementation):
    size = 200_000
    param = torch.nn.Parameter(torch.randn(size))
    param.grad = torch.randn(size) * 1e-3
    opt = flatopt.LearnedOptimizer([param])
    opt.step()  # creates the state and the workspace

    def steps():
        for _ in range(3):
            opt.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the profiler's own notices
        peak, net = allocation_records(steps)
    assert net == 0
    # One byte per coordinate would be 200 KB. The torch path's buffers were made by the first
    # step; what remains is e.g. the 14 KB block that torch's transposing copy allocates.
    assert peak < 64_000


def _torch_build_lock(monkeypatch, tmp_path):
    """Create the lock torch makes for a build of "flatopt_lock_test" and return its path."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = cpp_extension._get_build_directory("flatopt_lock_test", False)
    lock = os.path.join(folder, "lock")
    open(lock, "w").close()
    return lock


# Takes flatopt's build lock the way a building process does, then waits to be killed.
_HOLD_BUILD_LOCK = """
import fcntl, os, sys, time
handle = open(os.path.join(sys.argv[1], "flatopt.lock"), "a")
fcntl.flock(handle, fcntl.LOCK_EX)
print("holding", flush=True)
time.sleep(600)
"""


def test_a_lock_left_by_a_killed_build_is_removed(monkeypatch, tmp_path, caplog):
    lock = _torch_build_lock(monkeypatch, tmp_path)
    with (
        caplog.at_level(logging.WARNING, logger="flatopt.native_kernel"),
        native_kernel._build_guard("flatopt_lock_test"),
    ):
        assert not os.path.exists(lock)
    assert "left by an interrupted build" in caplog.text


@pytest.mark.skipif(sys.platform == "win32", reason="the kernel is not built on Windows")
def test_a_build_in_progress_is_waited_for_and_its_lock_cleared_once_it_is_killed(
    monkeypatch, tmp_path, caplog
):
    lock = _torch_build_lock(monkeypatch, tmp_path)
    builder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_BUILD_LOCK, os.path.dirname(lock)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert builder.stdout.readline().strip() == "holding"
        entered = threading.Event()

        def build():
            with native_kernel._build_guard("flatopt_lock_test"):
                entered.set()

        with caplog.at_level(logging.WARNING, logger="flatopt.native_kernel"):
            waiter = threading.Thread(target=build)
            waiter.start()
            # However long the build in progress takes, its lock stays.
            assert not entered.wait(2.0)
            assert os.path.exists(lock)
            builder.kill()  # as kill -9: its lock file stays behind
            builder.wait()
            assert entered.wait(30.0)
            waiter.join()
    finally:
        builder.kill()
        builder.wait()
        builder.stdout.close()
    assert not os.path.exists(lock)
    assert "waiting for another process's build" in caplog.text
    assert "left by an interrupted build" in caplog.text


def test_torch_build_warnings_go_to_the_log_not_the_console(caplog):
    torch_log = logging.getLogger("torch.utils.cpp_extension")
    with caplog.at_level(logging.INFO, logger="flatopt.native_kernel"):
        with native_kernel._quiet_torch_build_log():
            torch_log.warning("Your compiler (%s) is not compatible", "cc")
        torch_log.warning("after the build")
    shown = [r for r in caplog.records if r.name == "torch.utils.cpp_extension"]
    assert [r.getMessage() for r in shown] == ["after the build"]
    assert "torch, building the kernel: Your compiler (cc) is not compatible" in caplog.text


def test_the_kernel_falls_back_silently_without_a_compiler(monkeypatch, caplog):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.delenv("FLATOPT_NATIVE", raising=False)
    monkeypatch.setattr(native_kernel, "_attempted", False)
    monkeypatch.setattr(native_kernel, "_kernel", None)
    monkeypatch.setattr(cpp_extension, "load_inline", no_compiler)
    with caplog.at_level(logging.INFO, logger="flatopt.native_kernel"):
        assert native_kernel.load() is None
    assert "unavailable" in caplog.text
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    train_steps(model, flatopt.LearnedOptimizer(model.parameters()), 2)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_environment_can_switch_the_kernel_off(monkeypatch):
    monkeypatch.setenv("FLATOPT_NATIVE", "0")
    assert native_kernel.load() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_in_place_step_matches_the_cpu(rule):
    grad, state = awkward_gradients(70_000), random_state(rule, 70_000)
    expected_state, expected_update = state.clone(), torch.empty(70_000)
    with native_kernel.disabled():
        rule.step_inplace([grad], [expected_state], [expected_update])
    cuda_rule = rule.cuda()
    for dtype in (torch.float32, torch.bfloat16):
        cuda_state, update = state.to("cuda", dtype), torch.empty(70_000, device="cuda")
        cuda_rule.step_inplace(
            [grad.cuda()], [cuda_state], [update], keep=[torch.tensor(True, device="cuda")]
        )
        tolerance = 1 / 128 if dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(update.cpu(), expected_update, rtol=tolerance, atol=1e-5)
        torch.testing.assert_close(
            cuda_state.float().cpu(), expected_state, rtol=tolerance, atol=1e-5
        )
