"""Tests for benchmarks/baselines.py: each flat-minima baseline against a closed-form answer.

Every loss here is a function of two parameter tensors whose concatenation ``w`` is the variable of
the formulas, so that norms and Hessians taken "over all parameters" are checked as such. Answers
are computed in float64 with numpy, independently of torch.
"""

import copy

import numpy as np
import pytest
import torch

from benchmarks.baselines import SAM, EntropySGD, HessianTracePenaltySGD, hessian_trace_penalty

# A symmetric positive-definite matrix with eigenvalues 0.5 to 3, and a start point.
_ROTATION, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(5, 5)))
A = _ROTATION @ np.diag([0.5, 1.0, 1.5, 2.0, 3.0]) @ _ROTATION.T
W0 = np.array([1.0, -2.0, 0.5, 3.0, -0.25])


def _split_parameters(w):
    """Two leaf tensors, of 2 and 3 entries, that together hold `w`."""
    w = torch.tensor(w, dtype=torch.float64)
    return [w[:2].clone().requires_grad_(True), w[2:].clone().requires_grad_(True)]


def _joined(params):
    return torch.cat([p.detach() for p in params]).numpy()


def _quadratic_closure(params, backward=False):
    """The loss ``0.5 w^T A w``; the closure calls backward() itself when `backward`."""
    matrix = torch.tensor(A)

    def closure():
        w = torch.cat(params)
        loss = 0.5 * w @ matrix @ w
        if backward:
            loss.backward()
        return loss

    return closure


# --- SAM ----------------------------------------------------------------------------------------

# pytorch-optimizer computes SAM's gradient norm in float32, also for float64 parameters.
SAM_RTOL = 1e-6


def _sam_ascent(w, rho, adaptive):
    gradient = A @ w
    if adaptive:
        return w + rho * w**2 * gradient / np.linalg.norm(np.abs(w) * gradient)
    return w + rho * gradient / np.linalg.norm(gradient)


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_ascent_point_and_update(adaptive):
    rho, lr = 0.3, 0.05
    params = _split_parameters(W0)
    optimizer = SAM(params, torch.optim.SGD, rho=rho, adaptive=adaptive, lr=lr)
    closure = _quadratic_closure(params)
    ascent = _sam_ascent(W0, rho, adaptive)

    closure().backward()
    optimizer.ascent_step()
    np.testing.assert_allclose(_joined(params), ascent, rtol=SAM_RTOL)

    optimizer.zero_grad()
    closure().backward()
    optimizer.descent_step()
    # The base optimizer steps from w with the gradient at the ascent point, A (w + e(w)).
    np.testing.assert_allclose(_joined(params), W0 - lr * A @ ascent, rtol=SAM_RTOL)


@pytest.mark.parametrize("backward", [False, True], ids=["closure-returns", "closure-backwards"])
def test_sam_step_takes_either_kind_of_closure(backward):
    rho, lr = 0.05, 0.1
    params = _split_parameters(W0)
    optimizer = SAM(params, torch.optim.SGD, rho=rho, lr=lr)

    loss = optimizer.step(_quadratic_closure(params, backward))

    assert loss.item() == pytest.approx(0.5 * W0 @ A @ W0, rel=1e-12)
    assert not loss.requires_grad
    expected = W0 - lr * A @ _sam_ascent(W0, rho, adaptive=False)
    np.testing.assert_allclose(_joined(params), expected, rtol=SAM_RTOL)
    assert optimizer.gradient_evaluations == optimizer.gradient_evaluations_per_step == 2


def test_sam_shares_groups_and_state_with_its_base_optimizer():
    params = _split_parameters(W0)
    optimizer = SAM(params, torch.optim.SGD, lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    closure = _quadratic_closure(params)
    optimizer.step(closure)

    # A scheduler on SAM reaches the base optimizer; the momentum buffers are in state_dict().
    scheduler.step()
    assert optimizer.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    # Deep-copied as a checkpoint file would be: state_dict() returns the live buffers.
    saved = copy.deepcopy(optimizer.state_dict())
    assert all("momentum_buffer" in entry for entry in saved["state"].values())

    copies = [p.detach().clone().requires_grad_(True) for p in params]
    resumed = SAM(copies, torch.optim.SGD, lr=1.0, momentum=0.0)
    resumed.load_state_dict(saved)
    optimizer.step(closure)
    resumed.step(_quadratic_closure(copies))
    np.testing.assert_allclose(_joined(copies), _joined(params), rtol=1e-12)
    assert resumed.base_optimizer.param_groups is resumed.param_groups


def test_sam_around_adam_takes_finite_steps():
    params = _split_parameters(W0)
    optimizer = SAM(params, torch.optim.Adam, lr=1e-2)
    closure = _quadratic_closure(params)
    for _ in range(3):
        optimizer.step(closure)
    assert np.all(np.isfinite(_joined(params)))
    assert closure().item() < 0.5 * W0 @ A @ W0


def test_sam_validates_its_arguments():
    params = _split_parameters(W0)
    with pytest.raises(ValueError, match=r"Invalid rho: -0\.1"):
        SAM(params, torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        SAM(params, torch.optim.SGD, lr=-0.1)

    optimizer = SAM(params, torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"SAM\.step\(\) needs a closure"):
        optimizer.step()
    with pytest.raises(ValueError, match="returned 1.5"):
        optimizer.step(lambda: 1.5)
    with pytest.raises(RuntimeError, match="call ascent_step"):
        optimizer.descent_step()


# --- Entropy-SGD --------------------------------------------------------------------------------


def _entropy_sgd_step(x, lr, inner_steps, inner_lr, gamma, alpha):
    """Entropy-SGD's step on ``0.5 x^T A x`` without noise, in closed form.

    The Langevin iterates follow the linear recursion ``x'_k = M x'_{k-1} + inner_lr gamma x``
    with ``M = I - inner_lr (A + gamma I)``, so ``x'_k = x* + M^k (x - x*)`` around its fixed point
    ``x* = gamma (A + gamma I)^-1 x``. Unrolling ``mu_k = (1 - alpha) mu_{k-1} + alpha x'_k`` from
    ``mu_0 = x`` gives ``mu_L = (1 - alpha)^L x + (1 - (1 - alpha)^L) x* + alpha S (x - x*)``,
    where ``S = sum_k (1 - alpha)^(L - k) M^k`` sums a geometric series in each eigenvalue ``m``
    of ``M``, of ratio ``r = m / (1 - alpha)``.
    """
    coupled = A + gamma * np.eye(len(x))
    fixed_point = gamma * np.linalg.solve(coupled, x)
    eigenvalues, eigenvectors = np.linalg.eigh(np.eye(len(x)) - inner_lr * coupled)
    keep = 1 - alpha
    ratio = eigenvalues / keep
    with np.errstate(divide="ignore", invalid="ignore"):
        geometric = np.where(
            np.isclose(ratio, 1), inner_steps, ratio * (1 - ratio**inner_steps) / (1 - ratio)
        )
    series = keep**inner_steps * geometric
    series_matrix = eigenvectors @ np.diag(series) @ eigenvectors.T
    mean = (
        keep**inner_steps * x
        + (1 - keep**inner_steps) * fixed_point
        + alpha * series_matrix @ (x - fixed_point)
    )
    return x - lr * gamma * (x - mean)


# alpha = 0.25 weights the average as the authors' code does; with these settings one eigenvalue
# of M is 0.75, so it also takes the closed form's r = 1 branch.
@pytest.mark.parametrize("alpha", [0.75, 0.25])
def test_entropy_sgd_matches_the_closed_form_without_noise(alpha):
    settings = {"lr": 0.7, "inner_steps": 6, "inner_lr": 0.1, "gamma": 0.5, "alpha": alpha}
    params = _split_parameters(W0)
    optimizer = EntropySGD(params, noise=0.0, **settings)
    calls = []
    closure = _quadratic_closure(params)

    loss = optimizer.step(lambda: calls.append(1) or closure())

    np.testing.assert_allclose(_joined(params), _entropy_sgd_step(W0, **settings), rtol=1e-12)
    assert loss.item() == pytest.approx(0.5 * W0 @ A @ W0, rel=1e-12)  # At x, the chain's start.
    assert len(calls) == optimizer.gradient_evaluations == optimizer.gradient_evaluations_per_step


def test_entropy_sgd_tends_to_sgd_as_gamma_grows():
    lr = 0.1
    sgd_update = -lr * A @ W0

    def update(gamma):
        params = _split_parameters(W0)
        # inner_lr = 1 / gamma makes the chain settle in a step or two, however large gamma is.
        optimizer = EntropySGD(params, lr=lr, gamma=gamma, inner_lr=1 / gamma, noise=0.0)
        optimizer.step(_quadratic_closure(params))
        return _joined(params) - W0

    # The chain settles within A x / gamma of x, so the outer gradient gamma (x - mu) does not
    # vanish as gamma grows but tends to A x: the step tends to SGD's, with a relative error of
    # about (largest eigenvalue of A) / gamma.
    for gamma in (1e2, 1e3):
        error = np.linalg.norm(update(gamma) - sgd_update) / np.linalg.norm(sgd_update)
        assert error < 2 * 3.0 / gamma


def test_entropy_sgd_noise_is_reproducible_and_scaled():
    def run(noise, seed):
        params = _split_parameters(W0)
        optimizer = EntropySGD(
            params, noise=noise, inner_steps=4, generator=torch.Generator().manual_seed(seed)
        )
        optimizer.step(_quadratic_closure(params))
        return _joined(params)

    noiseless = run(0.0, 0)
    np.testing.assert_array_equal(run(1e-2, 1), run(1e-2, 1))
    deviation = np.abs(run(1e-2, 1) - noiseless).max()
    # The chain's noise enters the step as lr * gamma * (average of the noise), of order 1e-5.
    assert 1e-8 < deviation < 1e-3


def test_entropy_sgd_validates_its_arguments():
    params = _split_parameters(W0)
    for bad, message in [
        ({"inner_steps": 0}, "inner_steps: 0"),
        ({"inner_steps": 2.5}, "inner_steps: 2.5"),
        ({"inner_lr": -0.1}, "inner_lr: -0.1"),
        ({"gamma": -1.0}, "gamma: -1.0"),
        ({"noise": float("nan")}, "noise: nan"),
        ({"alpha": 0.0}, r"alpha: 0\.0.*\(0, 1\]"),
        ({"lr": -0.1}, "Invalid learning rate"),
    ]:
        with pytest.raises(ValueError, match=message):
            EntropySGD(params, **bad)
    with pytest.raises(ValueError, match=r"alpha: 2"):
        EntropySGD([{"params": params, "alpha": 2}])
    with pytest.raises(ValueError, match=r"EntropySGD\.step\(\) needs a closure"):
        EntropySGD(params).step()


# --- Hessian-trace penalty ----------------------------------------------------------------------

# loss = sum_i c_i w_i^4 / 12: its Hessian is diagonal, H_ii = c_i w_i^2, so tr(H) = sum c_i w_i^2
# depends on the weights, with gradient 2 c_i w_i; the loss's own gradient is c_i w_i^3 / 3.
C = np.array([1.0, 2.0, 0.5, 4.0, 3.0])


def _quartic_closure(params):
    weights = torch.tensor(C)

    def closure():
        return (weights * torch.cat(params) ** 4).sum() / 12

    return closure


def test_hessian_trace_penalty_value_and_gradient_are_exact_for_a_diagonal_hessian():
    penalty = 0.01
    params = _split_parameters(W0)

    total = hessian_trace_penalty(_quartic_closure(params)(), params, penalty, probes=1)
    total.backward()

    # With Rademacher probes v_i^2 = 1, so v^T H v = tr(H) exactly when H is diagonal.
    assert total.item() == pytest.approx(C @ W0**4 / 12 + penalty * C @ W0**2, rel=1e-12)
    gradient = np.concatenate([p.grad.numpy() for p in params])
    np.testing.assert_allclose(gradient, C * W0**3 / 3 + penalty * 2 * C * W0, rtol=1e-12)


def test_hessian_trace_penalty_of_a_quadratic_is_its_trace_and_adds_no_gradient():
    diagonal = np.array([0.5, 1.0, 2.0, 3.0, 4.0])
    params = _split_parameters(W0)

    loss = 0.5 * (torch.tensor(diagonal) * torch.cat(params) ** 2).sum()
    total = hessian_trace_penalty(loss, params, penalty=0.1, probes=3)
    total.backward()

    assert (total - loss).item() == pytest.approx(0.1 * diagonal.sum(), rel=1e-12)
    gradient = np.concatenate([p.grad.numpy() for p in params])
    np.testing.assert_allclose(gradient, diagonal * W0, rtol=1e-12)


@pytest.mark.parametrize("probes", [1, 4])
def test_hessian_trace_penalty_sgd_step(probes):
    lr, penalty = 0.05, 0.02
    params = _split_parameters(W0)
    optimizer = HessianTracePenaltySGD(params, lr=lr, penalty=penalty, probes=probes)

    loss = optimizer.step(_quartic_closure(params))

    assert loss.item() == pytest.approx(C @ W0**4 / 12, rel=1e-12)
    expected = W0 - lr * (C * W0**3 / 3 + penalty * 2 * C * W0)
    np.testing.assert_allclose(_joined(params), expected, rtol=1e-12)
    assert optimizer.gradient_evaluations == optimizer.gradient_evaluations_per_step
    assert optimizer.gradient_evaluations_per_step == 2 * (1 + probes)


def test_hessian_trace_penalty_sgd_validates_its_arguments_and_closure():
    params = _split_parameters(W0)
    for bad, message in [
        ({"penalty": -1e-3}, "penalty: -0.001"),
        ({"probes": 0}, "probes: 0"),
        ({"probes": 1.5}, "probes: 1.5"),
        ({"lr": -0.1}, "Invalid learning rate"),
    ]:
        with pytest.raises(ValueError, match=message):
            HessianTracePenaltySGD(params, **bad)

    optimizer = HessianTracePenaltySGD(params)
    with pytest.raises(ValueError, match="needs a closure"):
        optimizer.step()
    with pytest.raises(ValueError, match=r"closure called backward\(\); return the loss"):
        optimizer.step(_quadratic_closure(params, backward=True))
    with pytest.raises(ValueError, match="returned tensor"):
        optimizer.step(lambda: torch.tensor(1.0))
    np.testing.assert_array_equal(_joined(params), W0)  # No refused step moved anything.
