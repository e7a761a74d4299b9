"""What a benchmark run measures besides its curves: iteration time, optimizer memory, sharpness.

- :class:`IterationTimer` splits each training iteration's wall time into the forward and backward
  pass and the optimizer's step, through module and optimizer hooks, so the training loop itself
  stays unchanged;
- :func:`state_bytes_per_parameter`: the memory an optimizer keeps between steps;
- :func:`sharpness`: the Hessian's top eigenvalue and trace at the final parameters, with the
  estimators of :mod:`training.flatness`.
"""

import statistics
import time

import torch
from torch import nn
from torch.func import functional_call

from training.flatness import hessian_top_eigenvalue, hessian_trace


class IterationTimer:
    """Times the forward+backward pass and the optimizer step of every training iteration.

    The forward+backward time runs from the start of the model's last forward pass with gradients
    enabled to the start of ``optimizer.step``, so evaluations (run without gradients) are left out.
    An optimizer that evaluates the loss itself through a closure (SAM, Entropy-SGD, the
    Hessian-trace penalty) runs every forward and backward pass inside its step: all of its time
    counts as step time, and no forward+backward time is recorded.

    Args:
        model: The module being trained.
        optimizer: Its ``torch.optim`` optimizer.
    """

    def __init__(self, model, optimizer):
        self.forward_backward_s = []
        self.step_s = []
        self._forward_started = None
        self._step_started = None
        self._handles = [
            model.register_forward_pre_hook(self._on_forward),
            optimizer.register_step_pre_hook(self._on_step_start),
            optimizer.register_step_post_hook(self._on_step_end),
        ]

    def summary(self):
        """Median seconds per iteration, leaving out the first (it allocates the state).

        Returns:
            ``{"forward_backward_s", "step_s", "iterations"}``; ``forward_backward_s`` is ``None``
            for an optimizer that does its own forward and backward passes.
        """
        return {
            "forward_backward_s": _median_after_first(self.forward_backward_s),
            "step_s": _median_after_first(self.step_s),
            "iterations": len(self.step_s),
        }

    def remove(self):
        """Detaches the hooks."""
        for handle in self._handles:
            handle.remove()

    def _on_forward(self, module, args):
        if self._step_started is None and torch.is_grad_enabled():
            self._forward_started = time.perf_counter()

    def _on_step_start(self, optimizer, args, kwargs):
        now = time.perf_counter()
        if self._forward_started is not None:
            self.forward_backward_s.append(now - self._forward_started)
            self._forward_started = None
        self._step_started = now

    def _on_step_end(self, optimizer, args, kwargs):
        self.step_s.append(time.perf_counter() - self._step_started)
        self._step_started = None


def state_bytes_per_parameter(optimizer):
    """Bytes of the tensors an optimizer keeps in ``optimizer.state``, per parameter coordinate.

    Only the state kept between steps counts, not buffers a step allocates and frees (SAM's copy of
    the weights, Entropy-SGD's anchor and average).
    """
    parameters = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    return _tensor_bytes(list(optimizer.state.values())) / parameters


def sharpness(model, images, labels, iterations, probes, seed=0):
    """The Hessian's top eigenvalue and trace of the cross-entropy on a fixed batch, at ``model``.

    Args:
        model: The trained model (left unchanged, apart from batch-norm running statistics).
        images: The fixed batch's inputs.
        labels: Its labels.
        iterations: Power iterations of :func:`training.flatness.hessian_top_eigenvalue`.
        probes: Rademacher probes of :func:`training.flatness.hessian_trace`.
        seed: Seeds the start direction and the probes, so every run is measured alike.

    Returns:
        ``{"hessian_top_eigenvalue", "hessian_trace"}`` as floats.
    """
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]

    def loss_fn(values):
        logits = functional_call(model, dict(zip(names, values)), (images,))
        return nn.functional.cross_entropy(logits, labels)

    eigenvalue = hessian_top_eigenvalue(
        loss_fn, params, iterations, torch.Generator().manual_seed(seed), create_graph=False
    )
    trace = hessian_trace(
        loss_fn, params, probes, torch.Generator().manual_seed(seed), create_graph=False
    )
    return {"hessian_top_eigenvalue": eigenvalue.item(), "hessian_trace": trace.item()}


def _median_after_first(times):
    if not times:
        return None
    return statistics.median(times[1:] or times)


def _tensor_bytes(value):
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0
