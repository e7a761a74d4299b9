"""Flat-minima baselines that a learned optimizer is compared with, as ``torch.optim`` optimizers.

- :class:`SAM`: sharpness-aware minimisation (Foret et al. 2021, "Sharpness-Aware Minimization for
  Efficiently Improving Generalization"), and its adaptive variant ASAM (Kwon et al. 2021), as
  implemented by the ``pytorch-optimizer`` library;
- :class:`EntropySGD`: Entropy-SGD (Chaudhari et al. 2017, "Entropy-SGD: Biasing Gradient Descent
  Into Wide Valleys"), SGD on the local entropy, estimated by an inner Langevin (SGLD) loop;
- :class:`HessianTracePenaltySGD` and :func:`hessian_trace_penalty`: SGD on the loss plus a
  multiple of the Hessian's trace, estimated with Hutchinson's Rademacher probes.

Each needs several gradient evaluations per step, so each ``step`` takes a closure that evaluates
the loss on the current minibatch at the parameters' current values, as ``torch.optim.LBFGS`` does::

    for images, labels in batches:
        def closure():
            return torch.nn.functional.cross_entropy(model(images), labels)

        loss = optimizer.step(closure)

:class:`SAM` and :class:`EntropySGD` zero the gradients before every call and accept a closure that
calls ``loss.backward()`` itself (the usual ``torch.optim`` closure) or one that leaves it to them;
:class:`HessianTracePenaltySGD` must differentiate the loss twice, so its closure must not call
``backward()``. ``step`` returns the loss at the parameters it started from.

Every optimizer counts the gradients it evaluates in ``gradient_evaluations`` (a running total), and
says what one step costs in ``gradient_evaluations_per_step``, so that benchmarks can compare them
with first-order optimizers at equal cost.

Note: a model with batch norm updates its running statistics at every closure call, so these
optimizers move them more per step than SGD does (twice for SAM, ``inner_steps`` times for
Entropy-SGD), at perturbed parameters.
"""

import functools
import math

import pytorch_optimizer
import torch

from training.flatness import hessian_trace


class _MultiGradientOptimizer(torch.optim.Optimizer):
    """Machinery shared by the baselines: a base optimizer that takes the actual step, and a count.

    The base optimizer is built on this optimizer's parameter groups and both keep one list of
    groups and one state, so that a learning-rate scheduler attached to either acts on both and
    `state_dict` saves the base optimizer's state (its momentum buffers, say). It is a member
    rather than a base class because ``torch.optim`` wraps each optimizer class's ``step`` with
    its hooks, and a subclass calling its base class's ``step`` would run them twice.
    """

    def __init__(self, params, defaults, base_optimizer_cls, base_kwargs):
        super().__init__(params, {**defaults, **base_kwargs})
        self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        # Groups added later get the base optimizer's defaults as well as this one's.
        self.defaults.update(self.base_optimizer.defaults)
        self.gradient_evaluations = 0

    def load_state_dict(self, state_dict):
        """Loads a `state_dict`, keeping the groups and state shared with the base optimizer."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def _parameters(self):
        return [p for group in self.param_groups for p in group["params"]]


class SAM(_MultiGradientOptimizer):
    """Sharpness-aware minimisation (Foret et al. 2021), from the ``pytorch-optimizer`` library.

    Each step evaluates the gradient ``g`` at the weights ``w``, moves to the ascent point
    ``w + e(w)`` with ``e(w) = rho * g / ||g||`` (the norm taken over all parameters together),
    evaluates the gradient there, moves back to ``w`` and lets the base optimizer step with that
    second gradient. The adaptive variant (ASAM, Kwon et al. 2021) uses
    ``e(w) = rho * |w|^2 * g / || |w| * g ||`` element-wise.

    The perturbation and the base step are ``pytorch_optimizer.SAM``'s; this class gives it the
    closure convention of the other baselines (one closure, called twice, that may or may not
    call ``backward()``), returns the loss and counts gradient evaluations. The two halves are
    also available as :meth:`ascent_step` and :meth:`descent_step`, for a loop that computes its
    gradients itself (e.g. with gradient accumulation).

    Args:
        params: Parameters or parameter groups, as for any ``torch.optim`` optimizer; a group may
            set its own ``rho`` and ``adaptive``.
        base_optimizer_cls: The optimizer that takes the actual step, e.g. ``torch.optim.SGD``;
            it is built on the same parameter groups, so learning-rate schedulers attached to
            this optimizer act on it.
        rho: Radius of the neighbourhood; 0.05 is the value Foret et al. use most.
        adaptive: Whether to use the adaptive (ASAM) neighbourhood.
        **base_kwargs: Passed to `base_optimizer_cls`, e.g. ``lr=0.1, momentum=0.9``.

    Raises:
        ValueError: `rho` is negative or not finite.
    """

    def __init__(self, params, base_optimizer_cls, rho=0.05, adaptive=False, **base_kwargs):
        if not (math.isfinite(rho) and rho >= 0):
            raise ValueError(f"Invalid rho: {rho}; the neighbourhood radius must be >= 0.")
        super().__init__(
            params,
            {},
            functools.partial(pytorch_optimizer.SAM, base_optimizer=base_optimizer_cls),
            {"rho": rho, "adaptive": adaptive, **base_kwargs},
        )
        self._at_ascent_point = False

    @property
    def gradient_evaluations_per_step(self):
        """Gradients evaluated by each call of `step`: one at ``w``, one at the ascent point."""
        return 2

    @torch.no_grad()
    def step(self, closure=None):
        """Takes one SAM step.

        Args:
            closure: Re-evaluates the loss on the current minibatch and returns it (see the
                module's docstring); it is called twice.

        Returns:
            The loss at the weights before the step, detached.

        Raises:
            ValueError: No closure was given, or it produced no gradient.
        """
        loss = _evaluate_gradients(self, closure)
        self.ascent_step()
        _evaluate_gradients(self, closure)
        self.descent_step()
        return loss

    def ascent_step(self):
        """Moves the parameters from ``w`` to the ascent point ``w + e(w)``, from their gradients.

        Parameters without a gradient stay where they are.

        Raises:
            RuntimeError: The parameters are at the ascent point already.
        """
        if self._at_ascent_point:
            raise RuntimeError("ascent_step() was called twice; call descent_step() in between.")
        self.base_optimizer.first_step()
        self._at_ascent_point = True

    def descent_step(self):
        """Moves the parameters back to ``w`` and steps the base optimizer with their gradients.

        Call it after the gradients have been evaluated at the ascent point.

        Raises:
            RuntimeError: `ascent_step` was not called first.
        """
        if not self._at_ascent_point:
            raise RuntimeError(
                "descent_step() must follow ascent_step(); call ascent_step() first."
            )
        self.base_optimizer.second_step()
        self._at_ascent_point = False


class EntropySGD(_MultiGradientOptimizer):
    """Entropy-SGD (Chaudhari et al. 2017): SGD on the local entropy around the weights.

    Each step runs ``inner_steps`` steps of stochastic gradient Langevin dynamics from ``x' = x``,

        ``x' <- x' - inner_lr * (grad f(x') + gamma * (x' - x)) + sqrt(inner_lr) * noise * z``,

    with ``z ~ N(0, I)`` and one closure call (a fresh minibatch, if the closure draws one) per
    step. It keeps the exponential average ``mu <- (1 - alpha) * mu + alpha * x'`` (from
    ``mu = x``), moves back to ``x`` and lets SGD step with the gradient of the negative local
    entropy, ``gamma * (x - mu)``: without momentum, ``x <- x - lr * gamma * (x - mu)``. This is
    the paper's Algorithm 1. As ``gamma`` grows, ``x'`` stays near ``x`` and the step tends to an
    SGD step on ``f``.

    Note: the authors' code differs from Algorithm 1: among other things it weights the old average
    by 0.75 (``alpha = 0.25`` here), scales the noise by ``sqrt(2 * inner_lr)`` and leaves
    ``gamma`` out of the outer gradient (so its ``lr`` is this one times ``gamma``). Algorithm 1
    is followed here. The paper also grows ``gamma`` during training ("scoping": ``gamma`` times
    ``(1 + 1e-3)^t`` after ``t`` steps); here it is a per-group hyperparameter, which a schedule
    can change like a learning rate.

    Note: `training.flatness.langevin_mean` runs a similar chain for meta-regularisation, but it
    averages the iterates uniformly rather than exponentially and moves tensors of its own through
    a functional loss, where an optimizer must move the model's parameters that its closure reads;
    so the chain is run here.

    Args:
        params: Parameters or parameter groups; a group may set its own ``gamma``, ``inner_lr``,
            ``noise`` and ``alpha`` as well as SGD's hyperparameters.
        lr: Outer learning rate ``eta``.
        momentum: Outer momentum, as in ``torch.optim.SGD`` (the paper uses Nesterov momentum
            0.9 for its larger networks).
        dampening: As in ``torch.optim.SGD``.
        weight_decay: As in ``torch.optim.SGD``, applied in the outer step only.
        nesterov: As in ``torch.optim.SGD``.
        inner_steps: Langevin steps ``L`` per step, each one gradient evaluation.
        inner_lr: Langevin step size ``eta'``.
        gamma: Coupling ``gamma`` of ``x'`` to ``x``: the inverse width of the neighbourhood whose
            entropy is maximised.
        noise: Thermal noise ``epsilon``; 0 makes the inner loop gradient descent on the coupled
            loss.
        alpha: Weight of the newest iterate in the average ``mu``.
        generator: Optional ``torch.Generator`` for the noise, on the parameters' device.

    Raises:
        ValueError: A hyperparameter is out of range.
    """

    def __init__(
        self,
        params,
        lr=0.1,
        momentum=0.0,
        dampening=0.0,
        weight_decay=0.0,
        nesterov=False,
        *,
        inner_steps=20,
        inner_lr=0.1,
        gamma=0.03,
        noise=1e-4,
        alpha=0.75,
        generator=None,
    ):
        if not (isinstance(inner_steps, int) and inner_steps >= 1):
            raise ValueError(f"Invalid inner_steps: {inner_steps}; use an integer >= 1.")
        sgd = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
        }
        entropy = {"inner_lr": inner_lr, "gamma": gamma, "noise": noise, "alpha": alpha}
        super().__init__(params, entropy, torch.optim.SGD, sgd)
        for group in self.param_groups:
            _check_entropy_hyperparameters(group)
        self.inner_steps = inner_steps
        self.generator = generator

    @property
    def gradient_evaluations_per_step(self):
        """Gradients evaluated by each call of `step`: one per Langevin step."""
        return self.inner_steps

    @torch.no_grad()
    def step(self, closure=None):
        """Takes one Entropy-SGD step.

        Args:
            closure: Re-evaluates the loss on a minibatch and returns it (see the module's
                docstring); it is called `inner_steps` times, at the Langevin iterates.

        Returns:
            The loss at ``x``, the weights before the step (the chain's first point), detached.

        Raises:
            ValueError: No closure was given, or it produced no gradient.
        """
        anchors, averages = {}, {}
        loss = None

        for _ in range(self.inner_steps):
            inner_loss = _evaluate_gradients(self, closure)
            loss = inner_loss if loss is None else loss
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if p not in anchors:
                        anchors[p], averages[p] = p.detach().clone(), p.detach().clone()
                    self._langevin_step(p, anchors[p], group)
                    averages[p].lerp_(p, group["alpha"])

        for group in self.param_groups:
            for p in group["params"]:
                if p in anchors:
                    p.copy_(anchors[p])
                    p.grad = group["gamma"] * (anchors[p] - averages[p])
                else:
                    p.grad = None  # Untouched by the loss: SGD leaves it alone.
        self.base_optimizer.step()
        return loss

    def _langevin_step(self, p, anchor, group):
        p.add_(p.grad + group["gamma"] * (p - anchor), alpha=-group["inner_lr"])
        if group["noise"] > 0:
            draw = torch.randn(p.shape, generator=self.generator, dtype=p.dtype, device=p.device)
            p.add_(draw, alpha=math.sqrt(group["inner_lr"]) * group["noise"])


def _check_entropy_hyperparameters(values):
    for name in ("inner_lr", "gamma", "noise"):
        if not (math.isfinite(values[name]) and values[name] >= 0):
            raise ValueError(f"Invalid {name}: {values[name]}; use a finite value >= 0.")
    if not 0 < values["alpha"] <= 1:
        raise ValueError(
            f"Invalid alpha: {values['alpha']}; the newest iterate's weight in the average must "
            "be in (0, 1]."
        )


def hessian_trace_penalty(loss, params, penalty=1e-3, probes=1, generator=None):
    """The loss plus ``penalty`` times a Hutchinson estimate of its Hessian's trace.

    Its gradient is the loss's plus ``penalty`` times the estimate's, through a second
    differentiation of the loss, so any optimizer can minimise it in a plain training loop::

        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        hessian_trace_penalty(loss, model.parameters()).backward()
        optimizer.step()

    With Rademacher probes the estimate is unbiased, and exact for a diagonal Hessian.

    Args:
        loss: A scalar loss whose graph reaches `params` and has not been backpropagated.
        params: The parameters the Hessian is taken in; those that do not require gradients are
            left out.
        penalty: Weight ``lambda`` of the trace.
        probes: Probe vectors averaged per estimate, each one Hessian-vector product.
        generator: Optional ``torch.Generator`` for the probes.

    Returns:
        The scalar ``loss + penalty * trace``, differentiable in `params`.
    """
    params = [p for p in params if p.requires_grad]
    # The loss is already built, so the estimator's loss function only has to hand it over.
    trace = hessian_trace(lambda _: loss, params, probes, generator, create_graph=True)
    return loss + penalty * trace


class HessianTracePenaltySGD(_MultiGradientOptimizer):
    """SGD on ``loss + penalty * tr(H)``, the trace estimated by Hutchinson's method each step.

    The step is that of `hessian_trace_penalty` followed by ``torch.optim.SGD``'s, so momentum,
    Nesterov and weight decay behave as there. Its closure returns the loss *without* calling
    ``backward()``, since the penalty needs the loss's graph (see the module's docstring).

    Note: the trace is unbounded below wherever the loss has negative curvature, and its gradient
    can dwarf the loss's: at initialisation on random inputs it is about 100 times larger for
    the MNIST MLPs and Conv-MNIST, about 10,000 times for ResNet-20, on which the default
    `penalty` diverges within a few steps. Scale `penalty` to the model.

    Args:
        params: Parameters or parameter groups, as for ``torch.optim.SGD``.
        lr: Learning rate.
        momentum: As in ``torch.optim.SGD``.
        dampening: As in ``torch.optim.SGD``.
        weight_decay: As in ``torch.optim.SGD``.
        nesterov: As in ``torch.optim.SGD``.
        penalty: Weight ``lambda`` of the trace; small, since the trace sums the curvature along
            every parameter and can exceed the loss by orders of magnitude.
        probes: Rademacher probes per step, each adding two backward passes to its cost (see
            `gradient_evaluations_per_step`); the estimate's noise adds to the minibatch's.
        generator: Optional ``torch.Generator`` for the probes.

    Raises:
        ValueError: `penalty` is negative or `probes` is not a positive integer.
    """

    def __init__(
        self,
        params,
        lr=0.1,
        momentum=0.0,
        dampening=0.0,
        weight_decay=0.0,
        nesterov=False,
        *,
        penalty=1e-3,
        probes=1,
        generator=None,
    ):
        if not (math.isfinite(penalty) and penalty >= 0):
            raise ValueError(f"Invalid penalty: {penalty}; the trace's weight must be >= 0.")
        if not (isinstance(probes, int) and probes >= 1):
            raise ValueError(f"Invalid probes: {probes}; use an integer >= 1.")
        sgd = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
        }
        super().__init__(params, {}, torch.optim.SGD, sgd)
        self.penalty = penalty
        self.probes = probes
        self.generator = generator

    @property
    def gradient_evaluations_per_step(self):
        """Backward passes of each call of `step`, counting a Hessian-vector product as one.

        The loss's gradient and the `probes` Hessian-vector products are one pass each, and
        differentiating the penalty passes back through each of them once more.
        """
        return 2 * (1 + self.probes)

    @torch.no_grad()
    def step(self, closure=None):
        """Takes one SGD step on the penalised loss.

        Args:
            closure: Re-evaluates the loss on the current minibatch and returns it, without
                calling ``backward()``.

        Returns:
            The loss (without the penalty) at the weights before the step, detached.

        Raises:
            ValueError: No closure was given, or it called ``backward()`` or returned no graph.
        """
        params = self._parameters()
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = _call_closure(self, closure)
            if any(p.grad is not None for p in params):
                raise ValueError(
                    "HessianTracePenaltySGD's closure called backward(); return the loss without "
                    "calling backward(), the optimizer differentiates it twice itself."
                )
            _check_has_graph(self, loss)
            hessian_trace_penalty(
                loss, params, self.penalty, self.probes, self.generator
            ).backward()
        self.gradient_evaluations += self.gradient_evaluations_per_step
        self.base_optimizer.step()
        return loss.detach()


def _evaluate_gradients(optimizer, closure):
    """Zeroes the gradients, calls the closure and backpropagates its loss unless it did so.

    Returns:
        The closure's loss, detached.
    """
    optimizer.zero_grad(set_to_none=True)
    with torch.enable_grad():
        loss = _call_closure(optimizer, closure)
        if all(p.grad is None for p in optimizer._parameters()):
            _check_has_graph(optimizer, loss)
            loss.backward()
    optimizer.gradient_evaluations += 1
    return loss.detach()


def _call_closure(optimizer, closure):
    name = type(optimizer).__name__
    if closure is None:
        raise ValueError(
            f"{name}.step() needs a closure: it evaluates the gradient more than once per step. "
            "Pass a function that computes the loss on the current minibatch and returns it, "
            "e.g. optimizer.step(lambda: loss_fn(model(inputs), targets))."
        )
    return closure()


def _check_has_graph(optimizer, loss):
    if not (isinstance(loss, torch.Tensor) and loss.requires_grad and loss.dim() == 0):
        raise ValueError(
            f"{type(optimizer).__name__}'s closure returned {loss!r}, and no gradient was "
            "computed; it must return the scalar loss computed from the parameters being "
            "optimised, as a tensor that requires grad."
        )
