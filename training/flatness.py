"""Flatness measures of an optimizee's loss at given parameters, usable as meta-regularizers.

Each function takes a scalar-loss callable ``loss_fn(params) -> tensor`` of a list of parameter
tensors and returns a scalar that is differentiable in those tensors (so, inside meta-training,
in the update rule's weights through the unroll that produced them):

- :func:`hessian_trace`: Hutchinson's estimator ``E_v[v^T H v]`` with Rademacher probes
  (Hutchinson 1989);
- :func:`hessian_top_eigenvalue`: the eigenvalue of largest magnitude by power iteration on
  Hessian-vector products, returned as the Rayleigh quotient of the final direction;
- :func:`jacobian_trace`: the squared gradient norm ``||grad L||^2``, the trace of the Gauss-Newton
  style product ``J J^T`` of the loss gradient;
- :func:`local_entropy_surrogate`: Entropy-SGD's local entropy (Chaudhari et al. 2017), which has no
  cheap value but a cheap gradient, ``gamma * (theta - mu)`` with ``mu`` the mean of a Langevin
  (SGLD) chain started at ``theta``; the surrogate ``gamma / 2 * ||theta - mu||^2`` with ``mu``
  held constant has exactly that gradient.

The same estimators measure the sharpness of final parameters in the benchmarks.
"""

import torch


def hessian_trace(loss_fn, params, probes=10, generator=None, create_graph=True):
    """Hutchinson estimate of the Hessian trace, ``mean_k v_k^T H v_k`` with Rademacher ``v_k``.

    Args:
        loss_fn: Callable mapping a list of tensors to a scalar loss.
        params: List of parameter tensors.
        probes: Number of random probe vectors.
        generator: Optional ``torch.Generator`` for the probes.
        create_graph: Whether the estimate is differentiable in ``params``.

    Returns:
        A scalar tensor.
    """
    params = _with_grad(params)
    grads = torch.autograd.grad(loss_fn(params), params, create_graph=True)
    total = 0.0
    for probe in range(probes):
        vectors = [_rademacher(p, generator) for p in params]
        products = _hessian_vector_product(
            grads, params, vectors, create_graph, retain_graph=create_graph or probe < probes - 1
        )
        total = total + _dot(products, vectors)
    return total / probes


def hessian_top_eigenvalue(loss_fn, params, iterations=10, generator=None, create_graph=True):
    """Eigenvalue of largest magnitude of the Hessian, by power iteration.

    The iterations themselves are not differentiated (the direction is a constant); the returned
    Rayleigh quotient ``v^T H v`` at the final unit direction ``v`` is, and its gradient is the
    eigenvalue's gradient when ``v`` has converged to the eigenvector.

    Args:
        loss_fn: Callable mapping a list of tensors to a scalar loss.
        params: List of parameter tensors.
        iterations: Power-iteration steps.
        generator: Optional ``torch.Generator`` for the start direction.
        create_graph: Whether the estimate is differentiable in ``params``.

    Returns:
        A scalar tensor (negative if the dominant eigenvalue is negative).
    """
    params = _with_grad(params)
    grads = torch.autograd.grad(loss_fn(params), params, create_graph=True)
    vectors = _normalised([_gaussian(p, generator) for p in params])
    for _ in range(iterations):
        products = _hessian_vector_product(grads, params, vectors, False, retain_graph=True)
        vectors = _normalised(products)
    products = _hessian_vector_product(
        grads, params, vectors, create_graph, retain_graph=create_graph
    )
    return _dot(products, vectors)


def jacobian_trace(loss_fn, params, create_graph=True):
    """Squared norm of the loss gradient, ``||grad L||^2``.

    Returns:
        A scalar tensor, differentiable in ``params`` when ``create_graph``.
    """
    params = _with_grad(params)
    grads = torch.autograd.grad(loss_fn(params), params, create_graph=create_graph)
    return sum(g.pow(2).sum() for g in grads)


def langevin_mean(loss_fn, params, steps=5, step_size=0.1, noise=1e-4, gamma=1e-4, generator=None):
    """Mean of an SGLD chain around ``params`` on the local-entropy objective (Entropy-SGD's loop).

    The chain follows ``theta' <- theta' - step_size * (grad L(theta') + gamma * (theta' - theta))
    + sqrt(step_size) * noise * N(0, I)``, where ``loss_fn`` may draw a fresh minibatch each call.

    Args:
        loss_fn: Callable mapping a list of tensors to a scalar loss.
        params: List of tensors: the chain's anchor ``theta`` (not modified).
        steps: Chain length.
        step_size: SGLD step size.
        noise: Scale of the Gaussian noise.
        gamma: Coupling strength ``gamma`` to the anchor.
        generator: Optional ``torch.Generator`` for the noise.

    Returns:
        List of detached tensors: the running mean of the chain's iterates.
    """
    anchor = [p.detach() for p in params]
    current = [p.clone() for p in anchor]
    mean = [torch.zeros_like(p) for p in anchor]
    for step in range(1, steps + 1):
        current = [p.requires_grad_(True) for p in current]
        grads = torch.autograd.grad(loss_fn(current), current)
        with torch.no_grad():
            current = [
                p
                - step_size * (g + gamma * (p - a))
                + (step_size**0.5) * noise * _gaussian(p, generator)
                for p, g, a in zip(current, grads, anchor)
            ]
            mean = [m + (p - m) / step for m, p in zip(mean, current)]
    return mean


def local_entropy_surrogate(
    loss_fn, params, steps=5, step_size=0.1, noise=1e-4, gamma=1e-4, generator=None
):
    """A term whose gradient in ``params`` is the negative local entropy's, ``gamma (theta - mu)``.

    Its value, ``gamma / 2 * ||theta - mu||^2``, is not the local entropy itself; only its gradient
    is meaningful. Arguments are those of :func:`langevin_mean`.

    Returns:
        A scalar tensor differentiable in ``params``.
    """
    mean = langevin_mean(loss_fn, params, steps, step_size, noise, gamma, generator)
    return 0.5 * gamma * sum((p - m).pow(2).sum() for p, m in zip(params, mean))


def measure(name, loss_fn, params, **options):
    """Evaluate the flatness measure ``name`` (a key of :data:`REGULARIZERS`) with its options."""
    if name not in REGULARIZERS:
        raise ValueError(f"unknown flatness measure {name!r}; choose from {sorted(REGULARIZERS)}")
    return REGULARIZERS[name](loss_fn, params, **options)


REGULARIZERS = {
    "hessian-trace": hessian_trace,
    "hessian-ev": hessian_top_eigenvalue,
    "jacobian-trace": jacobian_trace,
    "entropy": local_entropy_surrogate,
}


def _hessian_vector_product(grads, params, vectors, create_graph, retain_graph):
    # d/dtheta (grad L . v) = H v: one extra backward pass per product.
    return list(
        torch.autograd.grad(
            _dot(grads, vectors), params, create_graph=create_graph, retain_graph=retain_graph
        )
    )


def _dot(xs, ys):
    return sum((x * y).sum() for x, y in zip(xs, ys))


def _with_grad(params):
    return [p if p.requires_grad else p.detach().requires_grad_(True) for p in params]


def _rademacher(like, generator):
    # Drawn on the generator's device (the CPU for a CPU generator), then moved beside ``like``.
    signs = torch.randint(0, 2, like.shape, generator=generator, device=_device_of(generator))
    return signs.to(device=like.device, dtype=like.dtype) * 2 - 1


def _gaussian(like, generator):
    draws = torch.randn(
        like.shape, generator=generator, dtype=like.dtype, device=_device_of(generator)
    )
    return draws.to(like.device)


def _device_of(generator):
    return generator.device if generator is not None else "cpu"


def _normalised(vectors):
    vectors = [v.detach() for v in vectors]
    norm = torch.sqrt(_dot(vectors, vectors))
    return [v / norm for v in vectors]
