"""Flatness estimators against dense Hessians and closed forms."""

import math

import pytest
import torch

from training import flatness


@pytest.fixture
def small_model():
    """A tanh MLP on fixed data: a loss whose Hessian is dense and non-diagonal."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 2, (32,), generator=generator)
    w1 = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    w2 = torch.randn(4, 2, generator=generator, dtype=torch.float64)

    def loss_fn(params):
        a, b = params
        return torch.nn.functional.cross_entropy(torch.tanh(x @ a) @ b, y)

    def dense_hessian():
        flat = torch.cat([w1.reshape(-1), w2.reshape(-1)])

        def flat_loss(v):
            return loss_fn([v[:12].view(3, 4), v[12:].view(4, 2)])

        return torch.autograd.functional.hessian(flat_loss, flat)

    return loss_fn, [w1, w2], dense_hessian()


def test_fixture_hessian_is_not_diagonal(small_model):
    _, _, hessian = small_model
    off_diagonal = hessian - torch.diag(torch.diag(hessian))
    assert off_diagonal.abs().max() > 0.1 * hessian.diag().abs().max()


def test_hutchinson_trace_agrees_with_dense_hessian(small_model):
    loss_fn, params, hessian = small_model
    estimate = flatness.hessian_trace(
        loss_fn, params, probes=500, generator=torch.Generator().manual_seed(1), create_graph=False
    )
    # Rademacher probes: variance per probe is 2 * sum of squared off-diagonal entries.
    off = hessian - torch.diag(torch.diag(hessian))
    standard_error = math.sqrt(2 * off.pow(2).sum().item() / 500)
    assert abs(estimate.item() - torch.trace(hessian).item()) < 4 * standard_error


def test_power_iteration_finds_the_largest_magnitude_eigenvalue(small_model):
    loss_fn, params, hessian = small_model
    eigenvalues = torch.linalg.eigvalsh(hessian)
    expected = eigenvalues[eigenvalues.abs().argmax()].item()
    estimate = flatness.hessian_top_eigenvalue(
        loss_fn,
        params,
        iterations=200,
        generator=torch.Generator().manual_seed(2),
        create_graph=False,
    )
    assert estimate.item() == pytest.approx(expected, rel=1e-4)


def test_jacobian_trace_is_the_squared_gradient_norm(small_model):
    loss_fn, params, _ = small_model
    leaves = [p.clone().requires_grad_(True) for p in params]
    grads = torch.autograd.grad(loss_fn(leaves), leaves)
    expected = sum(g.pow(2).sum() for g in grads)
    assert flatness.jacobian_trace(loss_fn, params).item() == pytest.approx(
        expected.item(), rel=1e-12
    )


def test_estimates_are_differentiable_in_the_parameters(small_model):
    loss_fn, params, _ = small_model
    leaves = [p.clone().requires_grad_(True) for p in params]
    for name in ("hessian-trace", "hessian-ev", "jacobian-trace"):
        value = flatness.measure(name, loss_fn, leaves)
        grads = torch.autograd.grad(value, leaves)
        assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_local_entropy_gradient_matches_closed_form_on_a_quadratic():
    # L(theta) = a/2 ||theta - c||^2. Without noise the chain is deterministic:
    # theta'_k = mu* + r^k (theta - mu*), mu* = (a c + gamma theta) / (a + gamma),
    # r = 1 - eta (a + gamma); the gradient is gamma (theta - mean_k theta'_k).
    a, gamma, eta, steps = 2.0, 1.0, 0.1, 7
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    theta = torch.tensor([3.0, 1.0, -1.0], dtype=torch.float64, requires_grad=True)

    def loss_fn(params):
        return 0.5 * a * (params[0] - c).pow(2).sum()

    surrogate = flatness.local_entropy_surrogate(
        loss_fn, [theta], steps=steps, step_size=eta, noise=0.0, gamma=gamma
    )
    (grad,) = torch.autograd.grad(surrogate, [theta])

    fixed = (a * c + gamma * theta.detach()) / (a + gamma)
    r = 1 - eta * (a + gamma)
    mean = fixed + (theta.detach() - fixed) * sum(r**k for k in range(1, steps + 1)) / steps
    expected = gamma * (theta.detach() - mean)
    torch.testing.assert_close(grad, expected)
    assert expected.abs().min() > 0.3  # far from zero: the test can fail


def test_local_entropy_noise_averages_out():
    c = torch.zeros(2, dtype=torch.float64)
    theta = torch.tensor([1.0, -1.0], dtype=torch.float64)

    def loss_fn(params):
        return 0.5 * (params[0] - c).pow(2).sum()

    generator = torch.Generator().manual_seed(3)
    means = torch.stack(
        [
            flatness.langevin_mean(
                loss_fn, [theta], steps=5, step_size=0.1, noise=0.5, gamma=1.0, generator=generator
            )[0]
            for _ in range(2000)
        ]
    )
    deterministic = flatness.langevin_mean(
        loss_fn, [theta], steps=5, step_size=0.1, noise=0.0, gamma=1.0
    )[0]
    torch.testing.assert_close(means.mean(0), deterministic, atol=0.01, rtol=0)


def test_unknown_measure_is_refused():
    with pytest.raises(ValueError, match="hessian-trace"):
        flatness.measure("curvature", lambda p: p[0].sum(), [torch.zeros(1)])
