"""Meta-training of an update rule by truncated backpropagation through unrolls.

Two recipes share this trainer. L2O-DM (Andrychowicz et al. 2016) with the imitation warm start of
L2O-DM-CL (Chen et al. 2020) trains the coordinate-wise LSTM: the update rule first regresses onto
an Adam teacher's steps along the teacher's own trajectory, then is meta-trained on the mean
optimizee loss over truncated unrolls. L2O-Scale (Wichrowska et al. 2017) trains the hierarchical
RNN on the mean log ratio of the optimizee loss to its initial value, over unrolls of randomly drawn
lengths, with RMSProp as the meta-optimizer. Every other part (curriculum, imitation, flatness
regularizers, validation, checkpoints, step-scale calibration) is the same code for both: the
unrolls reach the update rule through :func:`apply_update_rule`, which speaks both rules'
interfaces. In both recipes the optimizee's gradient is treated as a constant input (no second
derivatives through it, as in L2O-DM); the meta-gradient flows through the parameter updates and
the recurrent state.

The trainer writes a checkpoint after every epoch (atomically) and resumes from it exactly, logs one
JSON line per epoch and validation, and keeps the update rule with the best validation score.

An epoch may train several optimizees side by side (``tasks_per_step``), each meta-update averaging
their meta-gradients. Launched by ``torchrun``, the same trainer splits those optimizees and the
validation seeds across the processes (see :mod:`training.distributed`); the combined meta-gradient
and scores do not depend on the number of processes, so a run can resume under another one.
"""

import dataclasses
import functools
import json
import math
import os
import pathlib
import time
from dataclasses import asdict, dataclass, field

import torch

import flatopt

from . import distributed, flatness
from .optimizees import ACTIVATIONS, holdout_task, mlp, scale_cnn, train_and_evaluate

ARCHITECTURES = ("lstm", "scale")
OPTIMIZEES = ("mlp", "scale-cnn")
META_OPTIMIZERS = ("adam", "rmsprop")
META_OBJECTIVES = ("mean-loss", "log-loss-ratio")
UNROLL_LENGTHS = ("fixed", "exponential")
# The L2O-Scale code's epsilon of the log loss ratio.
LOG_RATIO_EPSILON = 1e-6


@dataclass
class Recipe:
    """Everything that determines a meta-training run (recorded in the release's provenance).

    The defaults are the L2O-DM recipe. The L2O-Scale recipe is ``architecture="scale"``,
    ``optimizee="scale-cnn"``, ``meta_optimizer="rmsprop"``, ``meta_objective="log-loss-ratio"``
    and ``unroll_lengths="exponential"``, with ``meta_lr`` and ``unroll_length`` sized to the run.

    Attributes:
        seed: Seed of every random draw of the run.
        architecture: The update rule: ``"lstm"`` (coordinate-wise LSTM, L2O-DM) or ``"scale"``
            (hierarchical RNN, L2O-Scale, with :class:`flatopt.ScaleUpdateRule`'s default sizes).
        hidden_size: LSTM units per layer (LSTM only).
        preprocess_p: Gradient preprocessing constant (LSTM only).
        output_scale: Fixed factor on the update rule's read-out (LSTM only).
        initial_log_lr: Log step size every coordinate starts from (hierarchical RNN only; its
            step is ``exp(log_lr + offset)`` with a learned offset that starts at -1). The
            original's ``log(1e-4)`` is the default.
        optimizee: The MNIST model meta-trained on: ``"mlp"`` (784-20-10, with the activations
            below) or ``"scale-cnn"`` (:func:`training.optimizees.scale_cnn`, always ReLU, so the
            activation settings do not apply).
        batch_size: Optimizee minibatch size.
        unroll_length: Optimizee steps per truncated unroll (one meta-update each); the mean length
            when the lengths are drawn.
        unroll_lengths: ``"fixed"``, every unroll ``unroll_length`` steps; or ``"exponential"``,
            each unroll ``min_unroll_length + round(X)`` steps with ``X`` exponential of mean
            ``unroll_length - min_unroll_length``, as L2O-Scale draws them (50 + Exp(200) there),
            drawn from the run's seed epoch by epoch.
        min_unroll_length: The shortest drawn unroll; the default keeps L2O-Scale's ratio of
            minimum to mean (50 to 250) at the default ``unroll_length``.
        meta_objective: What each unroll minimises: ``"mean-loss"``, the mean optimizee loss over
            the unroll (L2O-DM); or ``"log-loss-ratio"``, the mean over the unroll of
            ``log(loss_t / (loss_0 + 1e-6) + 1e-6)`` with ``loss_0`` the optimizee's loss at its
            initial weights (L2O-Scale; see :func:`log_loss_ratio`).
        meta_optimizer: ``"adam"`` or ``"rmsprop"`` (decay 0.9, as L2O-Scale's) on the update
            rule's weights, in imitation and meta-training alike.
        imitation_epochs: Epochs of regression onto the Adam teacher.
        imitation_unrolls: Unrolls per imitation epoch (a fresh optimizee each epoch).
        imitation_activations: Optimizee activations cycled through epoch by epoch during imitation.
        teacher_lr: Adam teacher's learning rate.
        meta_epochs: Epochs of meta-training on the unrolled optimizee loss.
        meta_unrolls: Unrolls per meta-training epoch (a fresh optimizee each epoch).
        meta_activation: Optimizee activation during meta-training.
        tasks_per_step: Optimizees trained side by side in every epoch, each from its own seed
            (initial weights and minibatches); every meta-update averages their meta-gradients.
            Under several processes this set is split across them, so it must be at least the
            number of processes.
        imitation_meta_lr: Meta-optimizer learning rate on the update rule during imitation.
        meta_lr: Meta-optimizer learning rate on the update rule during meta-training.
        max_grad_norm: Clip of the meta-gradient norm.
        validate_every: Meta-training epochs between validations.
        validation_steps: Optimizee steps of each validation run.
        validation_seeds: Optimizees per validation.
        curriculum: Optimizee horizons (steps per meta-training epoch) of successive stages, e.g.
            ``[100, 200, 500, 1000]``; empty for a single stage of ``meta_unrolls`` unrolls. A
            stage validates at the next stage's horizon (twice its own for the last stage), keeps
            its best weights, and hands them to the next stage only if it beat the weights it
            started from; otherwise training stops there.
        stage_patience: Validations without improvement that end a stage.
        imitation_probability: Chance that a meta-training epoch imitates the Adam teacher instead.
        stage_imitation_probabilities: The same chance per curriculum stage, one value per stage;
            empty to use ``imitation_probability`` in every stage.
        init_weights: Release (anything ``flatopt.load_release`` accepts) to start from instead of
            a random update rule; empty for random.
        regularizer: Flatness measure added to each unroll's meta-loss: ``"none"``,
            ``"hessian-trace"``, ``"hessian-ev"``, ``"jacobian-trace"`` or ``"entropy"``.
        reg_lambda: Its weight lambda.
        reg_probes: Hutchinson probes of the Hessian trace.
        reg_iterations: Power iterations of the Hessian eigenvalue.
        entropy_steps: Langevin chain length of the local entropy.
        entropy_step_size: Langevin step size.
        entropy_noise: Langevin noise scale.
        entropy_gamma: Local-entropy coupling gamma.
        step_scales: Factors tried on the update rule's step once meta-training ends (on the
            LSTM's read-out scale, or on the hierarchical RNN's step size through its step-size
            offset); the one whose rule validates best (lowest held-out loss on the meta-training
            optimizee, never a test set) is kept in the release. Empty to keep the read-out as
            meta-trained.
        calibration_steps: Optimizee steps of those validation runs; 0 for the run's final
            validation horizon (twice the last curriculum horizon, or ``validation_steps``).
    """

    seed: int = 0
    hidden_size: int = 20
    preprocess_p: float = 10.0
    output_scale: float = 0.1
    initial_log_lr: float = flatopt.scale_rule.INITIAL_LOG_LR
    batch_size: int = 128
    unroll_length: int = 20
    imitation_epochs: int = 60
    imitation_unrolls: int = 10
    imitation_activations: list = field(default_factory=lambda: ["sigmoid", "relu"])
    teacher_lr: float = 0.01
    meta_epochs: int = 50
    meta_unrolls: int = 5
    meta_activation: str = "sigmoid"
    tasks_per_step: int = 1
    imitation_meta_lr: float = 3e-3
    meta_lr: float = 1e-4
    max_grad_norm: float = 1.0
    validate_every: int = 5
    validation_steps: int = 500
    validation_seeds: int = 2
    curriculum: list = field(default_factory=list)
    stage_patience: int = 2
    imitation_probability: float = 0.0
    stage_imitation_probabilities: list = field(default_factory=list)
    init_weights: str = ""
    regularizer: str = "none"
    reg_lambda: float = 0.0
    reg_probes: int = 10
    reg_iterations: int = 10
    entropy_steps: int = 5
    entropy_step_size: float = 0.1
    entropy_noise: float = 1e-4
    entropy_gamma: float = 1e-4
    step_scales: list = field(default_factory=list)
    calibration_steps: int = 0
    architecture: str = "lstm"
    optimizee: str = "mlp"
    meta_optimizer: str = "adam"
    meta_objective: str = "mean-loss"
    unroll_lengths: str = "fixed"
    min_unroll_length: int = 4

    def __post_init__(self):
        # Refuse a bad recipe at once, not after an hour of imitation epochs.
        positive = [
            "hidden_size",
            "batch_size",
            "unroll_length",
            "imitation_unrolls",
            "meta_unrolls",
            "tasks_per_step",
            "validate_every",
            "validation_steps",
            "validation_seeds",
            "stage_patience",
            "reg_probes",
            "reg_iterations",
            "entropy_steps",
            "min_unroll_length",
        ]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(
                    f"recipe setting {name} must be at least 1, got {getattr(self, name)}"
                )
        for name in ("imitation_epochs", "meta_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"recipe setting {name} must be >= 0, got {getattr(self, name)}")
        for activation in [*self.imitation_activations, self.meta_activation]:
            if activation not in ACTIVATIONS:
                raise ValueError(
                    f"unknown optimizee activation {activation!r}; choose from {sorted(ACTIVATIONS)}"
                )
        if not self.imitation_activations:
            raise ValueError("imitation_activations must name at least one activation")
        if any(h < 1 for h in self.curriculum) or self.curriculum != sorted(set(self.curriculum)):
            raise ValueError(
                f"curriculum horizons must be positive and increasing, got {self.curriculum}"
            )
        for name in (
            "teacher_lr",
            "meta_lr",
            "imitation_meta_lr",
            "max_grad_norm",
            "entropy_step_size",
        ):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(
                    f"recipe setting {name} must be a positive number, got {getattr(self, name)}"
                )
        for name in ("reg_lambda", "entropy_noise", "entropy_gamma"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(
                    f"recipe setting {name} must be a number >= 0, got {getattr(self, name)}"
                )
        if self.calibration_steps < 0:
            raise ValueError(
                f"recipe setting calibration_steps must be >= 0, got {self.calibration_steps}"
            )
        for scale in self.step_scales:
            if not math.isfinite(scale) or scale <= 0:
                raise ValueError(f"step_scales must be positive numbers, got {self.step_scales}")
        if self.step_scales and (
            len(self.step_scales) < 2 or len(set(self.step_scales)) != len(self.step_scales)
        ):
            raise ValueError(
                "step_scales must list at least two different factors to choose from (include 1 "
                f"to keep the step as meta-trained), got {self.step_scales}"
            )
        if self.architecture == "scale":
            lstm_only = {"hidden_size": 20, "preprocess_p": 10.0, "output_scale": 0.1}
            changed = [name for name, value in lstm_only.items() if getattr(self, name) != value]
            if changed:
                # They would be recorded in the provenance while the rule ignores them.
                raise ValueError(
                    f"recipe settings {changed} apply to the LSTM only; leave them at their "
                    "defaults with architecture 'scale'"
                )
        elif self.initial_log_lr != flatopt.scale_rule.INITIAL_LOG_LR:
            raise ValueError(
                "recipe setting initial_log_lr applies to the hierarchical RNN only; leave it at "
                "its default with architecture 'lstm'"
            )
        if not (
            flatopt.scale_rule.MIN_LOG_LR <= self.initial_log_lr <= flatopt.scale_rule.MAX_LOG_LR
        ):
            raise ValueError(
                f"recipe setting initial_log_lr must lie in [{flatopt.scale_rule.MIN_LOG_LR}, "
                f"{flatopt.scale_rule.MAX_LOG_LR}], got {self.initial_log_lr}"
            )
        for probability in [self.imitation_probability, *self.stage_imitation_probabilities]:
            if not 0.0 <= probability <= 1.0:
                raise ValueError(f"imitation probabilities must lie in [0, 1], got {probability}")
        if self.stage_imitation_probabilities and len(self.stage_imitation_probabilities) != len(
            self.curriculum
        ):
            raise ValueError(
                f"stage_imitation_probabilities needs one value per curriculum stage "
                f"({len(self.curriculum)}), got {self.stage_imitation_probabilities}"
            )
        choices = {
            "architecture": ARCHITECTURES,
            "optimizee": OPTIMIZEES,
            "meta_optimizer": META_OPTIMIZERS,
            "meta_objective": META_OBJECTIVES,
            "unroll_lengths": UNROLL_LENGTHS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"unknown {name} {getattr(self, name)!r}; choose from {list(allowed)}"
                )
        if self.unroll_lengths == "exponential" and self.min_unroll_length > self.unroll_length:
            raise ValueError(
                f"min_unroll_length ({self.min_unroll_length}) exceeds the mean unroll_length "
                f"({self.unroll_length}); lower --min-unroll-length or raise --unroll-length"
            )
        self.flatness_regularizer()  # raises for an unknown regularizer

    def flatness_regularizer(self):
        """The flatness measure as ``(loss_fn, params, generator) -> scalar``, or ``None``.

        ``generator`` draws the measure's random probes, start direction or Langevin noise.
        """
        options = {
            "none": None,
            "hessian-trace": {"probes": self.reg_probes},
            "hessian-ev": {"iterations": self.reg_iterations},
            "jacobian-trace": {},
            "entropy": {
                "steps": self.entropy_steps,
                "step_size": self.entropy_step_size,
                "noise": self.entropy_noise,
                "gamma": self.entropy_gamma,
            },
        }
        if self.regularizer not in options:
            raise ValueError(
                f"unknown regularizer {self.regularizer!r}; choose from {sorted(options)}"
            )
        if options[self.regularizer] is None:
            return None
        # Draws from the global RNG would depend on how often the run was resumed (its state is
        # not checkpointed), so the measures that draw take the run's seeded generator instead.
        draws = self.regularizer != "jacobian-trace"
        return lambda loss_fn, params, generator: flatness.measure(
            self.regularizer,
            loss_fn,
            params,
            **options[self.regularizer],
            **({"generator": generator} if draws else {}),
        )


def mnist_tasks(dataset, activation, batch_size, validation_size=10000, optimizee="mlp"):
    """The MNIST meta-training optimizee, training on the training split minus a held-out part.

    Args:
        dataset: An :class:`training.data.ImageDataset`.
        activation: Hidden activation of the 784-20-10 MLP (unused by the convnet).
        batch_size: Minibatch size.
        validation_size: Training images held out to validate update rules (never the test set).
        optimizee: ``"mlp"`` or ``"scale-cnn"`` (see :class:`Recipe`).

    Returns:
        A :class:`ClassificationTask` scored on the held-out images.
    """
    if optimizee == "scale-cnn":
        return holdout_task(scale_cnn, dataset, "scale-cnn", batch_size, validation_size)
    return holdout_task(
        lambda: mlp(20, activation), dataset, f"mlp-{activation}", batch_size, validation_size
    )


def new_update_rule(recipe):
    """A freshly initialised update rule of the recipe's architecture (drawn from torch's RNG)."""
    if recipe.architecture == "scale":
        return flatopt.ScaleUpdateRule(initial_log_lr=recipe.initial_log_lr)
    return flatopt.LSTMUpdateRule(recipe.hidden_size, recipe.preprocess_p, recipe.output_scale)


def new_meta_optimizer(recipe, weights):
    """The recipe's meta-optimizer on the update rule's ``weights``, at the imitation rate."""
    if recipe.meta_optimizer == "rmsprop":
        # L2O-Scale's decay. Its epsilon, 1e-20, sits under the square root there; torch adds
        # epsilon after the root, so 1e-10 is the same floor. Note: TensorFlow's RMSProp starts
        # its mean square at 1 where torch's starts at 0, so the first meta-updates here are
        # larger (about 1/sqrt(0.1) times the learning rate per weight) than the original's.
        return torch.optim.RMSprop(weights, lr=recipe.imitation_meta_lr, alpha=0.9, eps=1e-10)
    return torch.optim.Adam(weights, lr=recipe.imitation_meta_lr)


def initial_rule_state(update_rule, sizes, device=None):
    """The update rule's state at the start of an optimizee whose tensors have ``sizes`` entries.

    Returns:
        For a coordinate-wise rule, the state of all coordinates as one stream, ``(N,
        state_size)``; otherwise ``(states, global_state)``, one state per tensor and the
        model-wide one (differentiable in the rule's learned initial states, if it has any).
    """
    if _coordinatewise(update_rule):
        return update_rule.initial_state(sum(sizes), device=device)
    states = [update_rule.initial_state(size, device=device) for size in sizes]
    return states, update_rule.initial_global_state(device=device)


def apply_update_rule(update_rule, grads, rule_state):
    """One step of the update rule on an optimizee's gradients, whichever the rule's interface.

    A coordinate-wise rule sees all the coordinates as one stream; a rule that is not (the
    hierarchical RNN) sees one gradient per tensor and carries the model-wide state.

    Args:
        update_rule: The update rule.
        grads: One 1-D gradient per optimizee tensor, in a fixed order.
        rule_state: The state from :func:`initial_rule_state` or the previous step.

    Returns:
        ``(updates, rule_state)``: one 1-D update per tensor, and the next state.
    """
    if _coordinatewise(update_rule):
        update, rule_state = update_rule(torch.cat(grads), rule_state)
        return list(update.split([grad.numel() for grad in grads])), rule_state
    states, global_state = rule_state
    updates, states, global_state = update_rule(grads, states, global_state)
    return updates, (states, global_state)


def detach_rule_state(rule_state):
    """The rule state cut from its history, as a truncated unroll hands it to the next one."""
    if isinstance(rule_state, torch.Tensor):
        return rule_state.detach()
    if isinstance(rule_state, dict):
        return {key: detach_rule_state(value) for key, value in rule_state.items()}
    return type(rule_state)(detach_rule_state(value) for value in rule_state)


def mean_loss(losses):
    """The L2O-DM meta-objective: the mean of an unroll's optimizee losses."""
    return sum(losses) / len(losses)


def log_loss_ratio(losses, initial_loss, epsilon=LOG_RATIO_EPSILON):
    """The L2O-Scale meta-objective: the mean log ratio of the losses to the initial loss.

    With ``epsilon`` the L2O-Scale code's 1e-6, over an unroll's losses ``l_1 .. l_T``::

        (1 / T) sum_t log(l_t / (l_0 + epsilon) + epsilon)

    Dividing by ``l_0`` makes optimizees whose losses differ in scale weigh alike, and the log
    rewards the last factor of progress as much as the first.

    Args:
        losses: The unroll's optimizee losses, 0-dim tensors.
        initial_loss: ``l_0``, the optimizee's loss at its initial weights (a constant).
        epsilon: Keeps the ratio and the log finite.
    """
    return sum(torch.log(loss / (initial_loss + epsilon) + epsilon) for loss in losses) / len(
        losses
    )


def draw_unroll_lengths(recipe, count, generator):
    """Optimizee steps of each of ``count`` truncated unrolls, by the recipe's ``unroll_lengths``.

    Args:
        recipe: The :class:`Recipe`.
        count: Unrolls to draw.
        generator: Draws exponential lengths (left untouched for fixed ones).

    Returns:
        A list of ``count`` positive integers.
    """
    if recipe.unroll_lengths == "fixed":
        return [recipe.unroll_length] * count
    scale = recipe.unroll_length - recipe.min_unroll_length
    uniforms = torch.rand(count, generator=generator, dtype=torch.float64).tolist()
    # Inverse transform: -scale log(1 - U) is exponential with mean ``scale``, unbounded as in
    # L2O-Scale (about one unroll in a hundred is longer than 4.6 times ``scale``).
    return [recipe.min_unroll_length + round(-scale * math.log1p(-u)) for u in uniforms]


def imitation_unroll(update_rule, task, params, teacher, rule_state, generator, steps, teacher_lr):
    """Regress the update rule onto Adam's steps along Adam's own trajectory for ``steps`` steps.

    Args:
        update_rule: The update rule being trained.
        task: The optimizee.
        params: Dict of the teacher's current optimizee parameters (advanced in place).
        teacher: Dict with Adam's ``m``, ``v`` (flat tensors) and ``t`` (int), advanced in place.
        rule_state: The update rule's state (see :func:`initial_rule_state`), detached.
        generator: Draws the minibatches.
        steps: Unroll length.
        teacher_lr: Adam's learning rate.

    Returns:
        ``(loss, rule_state)``: the relative squared error ``sum |u - d|^2 / sum |d|^2`` over the
        unroll (differentiable in the rule's weights; 1 means no better than predicting zero), and
        the new state, detached.
    """
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    error, reference = 0.0, 0.0
    names = list(params)
    for _ in range(steps):
        images, labels = task.sample_batch(generator)
        values = [params[n].requires_grad_(True) for n in names]
        grads = torch.autograd.grad(task.loss(dict(zip(names, values)), images, labels), values)
        grads = [g.reshape(-1) for g in grads]
        grad = torch.cat(grads)

        teacher["t"] += 1
        teacher["m"].mul_(beta1).add_(grad, alpha=1 - beta1)
        teacher["v"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat = teacher["m"] / (1 - beta1 ** teacher["t"])
        v_hat = teacher["v"] / (1 - beta2 ** teacher["t"])
        target = -teacher_lr * m_hat / (v_hat.sqrt() + eps)

        updates, rule_state = apply_update_rule(update_rule, grads, rule_state)
        update = torch.cat(updates)
        error = error + (update - target).pow(2).sum()
        reference = reference + target.pow(2).sum()
        _add_flat_(params, target)
    return error / reference, detach_rule_state(rule_state)


def meta_unroll(
    update_rule,
    task,
    params,
    rule_state,
    generator,
    steps,
    regularizer=None,
    objective=mean_loss,
):
    """Apply the update rule for ``steps`` optimizee steps and return the differentiable meta-loss.

    Args:
        update_rule: The update rule being trained.
        task: The optimizee.
        params: Dict of detached optimizee parameters at the start of the unroll.
        rule_state: The update rule's state (see :func:`initial_rule_state`), detached.
        generator: Draws the minibatches.
        steps: Unroll length.
        regularizer: Optional ``(loss_fn, params, generator) -> scalar`` flatness measure,
            evaluated on the parameters the unroll ends at (``loss_fn`` draws a fresh minibatch at
            each call; the measure's own random draws also come from ``generator``).
        objective: The meta-loss of the unroll's optimizee losses (a list of 0-dim tensors, each
            at the parameters before its step): :func:`mean_loss` by default, or e.g.
            :func:`log_loss_ratio` with its initial loss bound.

    Returns:
        ``(meta_loss, regularization, params, rule_state)``: the objective over the unroll and
        the flatness measure at its end (``None`` without a regularizer), both differentiable in
        the rule's weights, and the detached parameters and state at its end.
    """
    names = list(params)
    current = {n: params[n].detach().requires_grad_(True) for n in names}
    losses = []
    for _ in range(steps):
        images, labels = task.sample_batch(generator)
        loss = task.loss(current, images, labels)
        # The gradient enters as data: no second derivatives, as in L2O-DM.
        grads = torch.autograd.grad(loss, list(current.values()), retain_graph=True)
        updates, rule_state = apply_update_rule(
            update_rule, [g.reshape(-1).detach() for g in grads], rule_state
        )
        current = {n: current[n] + u.view_as(current[n]) for n, u in zip(names, updates)}
        losses.append(loss)

    regularization = None
    if regularizer is not None:

        def loss_fn(values):
            return task.loss(dict(zip(names, values)), *task.sample_batch(generator))

        regularization = regularizer(loss_fn, list(current.values()), generator)
    final = {n: v.detach() for n, v in current.items()}
    return objective(losses), regularization, final, detach_rule_state(rule_state)


def validate(update_rule, task, steps, seeds, processes=None):
    """Score an update rule by training fresh optimizees with it on held-out data.

    Args:
        update_rule: The update rule to score.
        task: The optimizee, scored on its held-out images.
        steps: Optimizee steps of each run.
        seeds: One run per seed.
        processes: The :class:`training.distributed.Processes` sharing the runs (each trains its
            share of the seeds); ``None`` for a single process.

    Returns:
        Dict with the mean final held-out ``loss`` and ``accuracy`` over ``seeds`` (lower loss
        is better; a diverged run scores ``inf``), the same on every process.
    """
    processes = processes or distributed.Processes()
    # One slot per seed, filled by the process that ran it and zero elsewhere: once summed over
    # the processes, every process averages all the seeds in seed order, as one process would.
    results = torch.zeros(2, len(seeds), dtype=torch.float64)
    for index in processes.share(len(seeds)):
        curves = train_and_evaluate(
            task, lambda p: flatopt.LearnedOptimizer(p, update_rule), steps, seeds[index]
        )
        results[0, index] = math.inf if curves["diverged"] else curves["eval_loss"][-1]
        results[1, index] = curves["eval_accuracy"][-1]
    losses, accuracies = processes.sum(results).tolist()
    return {"loss": sum(losses) / len(losses), "accuracy": sum(accuracies) / len(accuracies)}


def validation_seeds(recipe):
    """Seeds of the validation optimizees, apart from every training optimizee's seed."""
    return [10_000 + s for s in range(recipe.validation_seeds)]


def final_validation_steps(recipe):
    """Optimizee steps of the last validation a recipe's run makes."""
    return 2 * recipe.curriculum[-1] if recipe.curriculum else recipe.validation_steps


def scaled_update_rule(update_rule, factor):
    """A copy of ``update_rule`` whose every step, given the same state, is ``factor`` times longer.

    The LSTM's read-out scale is multiplied by ``factor``; the hierarchical RNN, whose step
    ``exp(eta + offset)`` has no fixed scale, gets ``log(factor)`` added to its step-size offset.

    Raises:
        ValueError: For an update rule with neither.
    """
    if hasattr(update_rule, "output_scale"):
        config = {**update_rule.config(), "output_scale": update_rule.output_scale * factor}
        scaled = type(update_rule).from_config(config)
        scaled.load_state_dict(update_rule.state_dict())
    elif hasattr(update_rule, "step_size_offset"):
        scaled = type(update_rule).from_config(update_rule.config())
        scaled.load_state_dict(update_rule.state_dict())
        with torch.no_grad():
            scaled.step_size_offset.add_(math.log(factor))
    else:
        raise ValueError(
            f"cannot scale the steps of a {type(update_rule).__name__}: it has neither a read-out "
            "scale nor a step-size offset; leave step_scales empty for it"
        )
    return scaled.to(next(update_rule.parameters()).device)


def step_setting(update_rule):
    """The setting a step-scale calibration changes, as ``{name: value}`` for the records."""
    if hasattr(update_rule, "output_scale"):
        return {"output_scale": update_rule.output_scale}
    return {"step_size_offset": update_rule.step_size_offset.item()}


def calibrate_step_scale(update_rule, task, steps, seeds, factors, processes=None):
    """Choose the factor on the update rule's read-out scale that validates best.

    Meta-training sets the step the rule takes on unrolls of a few hundred optimizee steps; over
    longer runs a smaller (or larger) step can serve better. Each factor's rule trains fresh
    optimizees of ``task`` and is scored on its held-out images (see :func:`validate`); the
    lowest loss wins, the earlier factor on a tie.

    Args:
        update_rule: The meta-trained update rule.
        task: The optimizee to validate on (the meta-training one, on held-out images).
        steps: Optimizee steps of each validation run.
        seeds: One run per seed and factor.
        factors: The factors to try, e.g. ``[1.0, 0.7, 0.5]``.
        processes: As in :func:`validate`.

    Returns:
        ``(rule, records)``: a copy of ``update_rule`` scaled by the best factor, and one
        ``{"scale", "loss", "accuracy"}`` per factor, in order.
    """
    best_rule, best_loss, records = None, math.inf, []
    for factor in factors:
        rule = scaled_update_rule(update_rule, factor)
        score = validate(rule, task, steps, seeds, processes)
        records.append({"scale": factor, **score})
        if best_rule is None or score["loss"] < best_loss:
            best_rule, best_loss = rule, score["loss"]
    return best_rule, records


def calibration_record(rule, records, task, steps, seeds):
    """What a step-scale calibration tried and kept, as recorded in logs and provenance."""
    chosen = min(records, key=lambda r: r["loss"])["scale"]  # min keeps the first of a tie
    return {
        "optimizee": task.name,
        "steps": steps,
        "seeds": seeds,
        "scores": records,
        "chosen": chosen,
        **step_setting(rule),
    }


def calibration_scores(calibration):
    """A calibration record's validation loss by factor, as text: ``"1: 0.2394, 0.5: 0.2186"``."""
    return ", ".join(f"{r['scale']:g}: {r['loss']:.4f}" for r in calibration["scores"])


def optimizee_seed(seed, epoch, index):
    """Seed of an epoch's ``index``-th optimizee: its initial weights and its minibatches.

    Optimizee 0 takes the epoch's own seed; the others are offset by multiples of 2**32, which
    keeps them clear of every epoch's seed for run seeds below 4,000.
    """
    return seed * 1_000_003 + epoch + index * 2**32


class MetaTrainer:
    """Runs a :class:`Recipe` with checkpoints, logs and best-model selection.

    Args:
        recipe: The run's settings.
        dataset: The image dataset the recipe's MNIST optimizees train on (unused with
            ``make_task``).
        out_dir: Folder for ``checkpoint.pt``, ``best.safetensors`` and ``log.jsonl``.
        progress: Whether to print one line per epoch.
        commit: The code's commit, recorded in the checkpoint at the run's first start and kept
            through resumes.
        make_task: Optional ``activation -> ClassificationTask`` giving the optimizee of an epoch
            in place of the recipe's MNIST MLPs: your own model factory and data, trained on the
            task's training images and validated on its held-out ones. It is called with the
            activation the recipe names for the epoch and may ignore it; the recipe's
            ``optimizee`` is then unused.
        device: Where to train: ``"cpu"``, or ``"cuda"`` (each process's own GPU under torchrun).

    Under torchrun every process builds the trainer alike; it joins the process group (see
    :func:`training.distributed.join`), trains its share of each epoch's optimizees and of the
    validation seeds, and only process 0 writes the checkpoint and the log, and prints.

    Raises:
        ValueError: If the recipe has fewer ``tasks_per_step`` than there are processes, or its
            ``init_weights`` release is of another architecture or size.
    """

    def __init__(
        self,
        recipe,
        dataset,
        out_dir,
        progress=True,
        commit="unknown",
        make_task=None,
        device="cpu",
    ):
        self.recipe = recipe
        self.dataset = dataset
        self.make_task = make_task or (
            lambda activation: mnist_tasks(
                dataset, activation, recipe.batch_size, optimizee=recipe.optimizee
            )
        )
        self.out_dir = pathlib.Path(out_dir)
        self.progress = progress
        self.device = distributed.local_device(device)
        self.processes = distributed.join(self.device)
        if recipe.tasks_per_step < self.processes.world_size:
            raise ValueError(
                f"tasks_per_step is {recipe.tasks_per_step} but {self.processes.world_size} "
                "processes were launched, so some would have no optimizee to train; set "
                f"--tasks-per-step to at least {self.processes.world_size} or launch fewer"
            )
        torch.manual_seed(recipe.seed)
        self.update_rule = new_update_rule(recipe).to(self.device)
        self.meta_optimizer = new_meta_optimizer(recipe, self.update_rule.parameters())
        self.epoch = 0  # epochs finished, imitation and meta-training counted together
        self.best = {"loss": math.inf, "epoch": None}
        self.best_weights = None
        self.elapsed = 0.0
        self.commit = commit
        self.finished = False
        self.stage = _new_stage(0)
        # Bytes of log.jsonl that the state resumed from covers: none for a fresh run, None where
        # a checkpoint does not record it.
        self.log_size = 0
        self.validation_task = self._on_device(self.make_task(recipe.meta_activation))
        if recipe.init_weights:
            self.update_rule.load_state_dict(self._starting_weights())

    def _starting_weights(self):
        # The weights of the recipe's init_weights release, refused unless they are of the very
        # update rule the recipe builds.
        recipe = self.recipe
        start = flatopt.load_release(recipe.init_weights)[0]
        if start.architecture != recipe.architecture:
            raise ValueError(
                f"init_weights {recipe.init_weights!r} is a {start.architecture!r} update rule but "
                f"the recipe's architecture is {recipe.architecture!r}; pass --architecture "
                f"{start.architecture} to start from it"
            )
        if recipe.architecture == "lstm" and start.output_scale != recipe.output_scale:
            # A calibrated release steps with its own read-out scale; silently training it at
            # another would start from a different optimizer than the one named.
            raise ValueError(
                f"init_weights {recipe.init_weights!r} has read-out scale "
                f"{start.output_scale:g} but the recipe's output_scale is "
                f"{recipe.output_scale:g}; pass --output-scale {start.output_scale:g} to "
                "start from it as released"
            )
        if start.config() != self.update_rule.config():
            raise ValueError(
                f"init_weights {recipe.init_weights!r} is the update rule {start.config()}, but "
                f"the recipe builds {self.update_rule.config()}; set the recipe's sizes to match"
            )
        return start.state_dict()

    @property
    def total_epochs(self):
        return self.recipe.imitation_epochs + self.recipe.meta_epochs

    def run(self, until=None):
        """Train until the recipe's last epoch, resuming from ``checkpoint.pt`` if present.

        Args:
            until: Stop after this many epochs instead (the run can be resumed later).

        Returns:
            The best validation record ``{"loss", "accuracy", "epoch"}``.
        """
        main = self.processes.is_main
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._resume()
        if main:
            self._drop_unsaved_log_records()
        while not self.finished and self.epoch < min(self.total_epochs, until or self.total_epochs):
            started = time.perf_counter()
            if self.recipe.curriculum and self.epoch >= self.recipe.imitation_epochs:
                if self.stage["baseline"] is None:
                    self._start_stage()
            record = self.train_epoch(self.epoch)
            self.epoch += 1
            if self.recipe.curriculum:
                if self.epoch > self.recipe.imitation_epochs:
                    self.stage["epochs"] += 1
                    if self.stage["epochs"] % self.recipe.validate_every == 0:
                        record["validation"] = self._validate_stage()
            elif self.epoch >= self.recipe.imitation_epochs and self._validation_due():
                record["validation"] = self.validate_and_keep_best()
            if "validation" in record:
                self._follow_main_decisions()
            self.elapsed += time.perf_counter() - started
            record["elapsed_s"] = round(self.elapsed, 1)
            self._log(record)
            if main:
                self.save_checkpoint(self.out_dir / "checkpoint.pt")
        return self.best

    def train_epoch(self, epoch):
        """One epoch on fresh optimizees: imitation or meta-training by the recipe's schedule.

        The epoch's ``tasks_per_step`` optimizees are unrolled side by side; each meta-update
        averages their meta-gradients. Under several processes each unrolls its share, and the
        update is the same on every process and the same as a single process's.
        """
        recipe = self.recipe
        warm_start = epoch < recipe.imitation_epochs
        # A separate generator, so that the coin and the unroll lengths do not shift the epoch's
        # minibatches; the coin is its first draw, the lengths follow.
        schedule = torch.Generator().manual_seed(recipe.seed * 7_919 + epoch)
        coin = torch.rand((), generator=schedule).item()
        imitation = warm_start or coin < self.imitation_probability()
        if imitation:
            activation = recipe.imitation_activations[epoch % len(recipe.imitation_activations)]
        else:
            activation = recipe.meta_activation
        lr = recipe.imitation_meta_lr if warm_start else recipe.meta_lr
        for group in self.meta_optimizer.param_groups:
            group["lr"] = lr
        task = self._on_device(self.make_task(activation))
        optimizees = [
            self._new_optimizee(task, epoch, index)
            for index in self.processes.share(recipe.tasks_per_step)
        ]

        regularizer = None if imitation else recipe.flatness_regularizer()
        losses, grad_norms, reg_values, reg_ratios = [], [], [], []
        count = recipe.imitation_unrolls if imitation else self.meta_unrolls()
        lengths = draw_unroll_lengths(recipe, count, schedule)
        for steps in lengths:
            values, ratio = self._meta_step(task, optimizees, imitation, regularizer, steps)
            grad_norms.append(
                torch.nn.utils.clip_grad_norm_(
                    self.update_rule.parameters(), recipe.max_grad_norm
                ).item()
            )
            self.meta_optimizer.step()
            losses.append(values[0])
            if regularizer is not None:
                reg_values.append(values[1])
                reg_ratios.append(ratio)
        record = {
            "epoch": epoch,
            "phase": "imitation" if imitation else "meta",
            "stage": None if warm_start or not recipe.curriculum else self.stage["index"],
            "optimizee": task.name,
            "loss": sum(losses) / len(losses),
            "meta_grad_norm": sum(grad_norms) / len(grad_norms),
        }
        if recipe.unroll_lengths != "fixed":
            record["unroll_lengths"] = lengths
        if reg_values:
            record["regularizer"] = recipe.regularizer
            record["regularizer_value"] = sum(reg_values) / len(reg_values)
            record["regularizer_grad_ratio"] = sum(reg_ratios) / len(reg_ratios)
        return record

    def _new_optimizee(self, task, epoch, index):
        # Every optimizee draws its weights and minibatches from (seed, epoch, index), whichever
        # process trains it: resumable exactly, under any number of processes.
        seed = optimizee_seed(self.recipe.seed, epoch, index)
        params = task.init_params(seed=seed)
        sizes = [p.numel() for p in params.values()]
        generator = torch.Generator().manual_seed(seed)
        initial_loss = None
        if self.recipe.meta_objective == "log-loss-ratio":
            # The loss of the first step, on its own minibatch, drawn from a copy of the
            # generator so that the optimizee's minibatches stay as they are.
            first = torch.Generator().set_state(generator.get_state())
            with torch.no_grad():
                initial_loss = task.loss(params, *task.sample_batch(first)).item()
        return _Optimizee(
            index=index,
            params=params,
            rule_state=initial_rule_state(self.update_rule, sizes, device=self.device),
            teacher={
                "m": torch.zeros(sum(sizes), device=self.device),
                "v": torch.zeros(sum(sizes), device=self.device),
                "t": 0,
            },
            generator=generator,
            initial_loss=initial_loss,
        )

    def _meta_step(self, task, optimizees, imitation, regularizer, steps):
        """Unroll this process's optimizees ``steps`` steps and set the meta-gradient over all.

        Returns:
            ``(values, ratio)``: the mean meta-loss and mean flatness measure over all the
            optimizees, and the norm of the regularizer's meta-gradient relative to the loss's
            (``None`` without a regularizer).
        """
        recipe = self.recipe
        weights = list(self.update_rule.parameters())
        size = sum(w.numel() for w in weights)
        count = recipe.tasks_per_step
        # One row per optimizee (its loss's meta-gradient, and its regularizer's apart), filled by
        # the process that unrolled it and zero elsewhere. Summed over the processes every row
        # arrives intact, and the rows are then added up in optimizee order on every process: the
        # meta-gradient is bit for bit the same whatever the number of processes, which is what
        # lets a run resume under another number of them and still end where it would have.
        rows = torch.zeros(count, 1 if regularizer is None else 2, size, device=self.device)
        values = torch.zeros(count, 2, dtype=torch.float64)  # meta-loss, flatness measure
        for optimizee in optimizees:
            loss, regularization = self._unroll(task, optimizee, imitation, regularizer, steps)
            grads = torch.autograd.grad(
                loss, weights, retain_graph=regularization is not None, allow_unused=True
            )
            rows[optimizee.index, 0] = _flatten(grads, weights)
            values[optimizee.index, 0] = loss.item()
            if regularization is not None:
                penalty = recipe.reg_lambda * regularization
                grads = torch.autograd.grad(penalty, weights, allow_unused=True)
                rows[optimizee.index, 1] = _flatten(grads, weights)
                values[optimizee.index, 1] = regularization.item()
        self.processes.sum(rows)
        self.processes.sum(values)

        totals = rows.sum(dim=0)
        loss_grads = _unflatten(totals[0], weights)
        meta_grad = totals.sum(dim=0) if regularizer is not None else totals[0]
        for weight, grad in zip(weights, _unflatten(meta_grad / count, weights)):
            weight.grad = grad
        means = (values.sum(dim=0) / count).tolist()
        if regularizer is None:
            return means, None
        # The two parts' norms are logged apart: a lambda whose ratio is negligible trains nothing.
        penalty_grads = _unflatten(totals[1], weights)
        loss_norm = torch.sqrt(sum(g.pow(2).sum() for g in loss_grads))
        penalty_norm = torch.sqrt(sum(g.pow(2).sum() for g in penalty_grads))
        return means, (penalty_norm / loss_norm.clamp_min(1e-30)).item()

    def _unroll(self, task, optimizee, imitation, regularizer, steps):
        """One truncated unroll of an optimizee; returns ``(meta-loss, flatness measure or None)``."""
        recipe = self.recipe
        if imitation:
            loss, optimizee.rule_state = imitation_unroll(
                self.update_rule,
                task,
                optimizee.params,
                optimizee.teacher,
                optimizee.rule_state,
                optimizee.generator,
                steps,
                recipe.teacher_lr,
            )
            return loss, None
        objective = mean_loss
        if recipe.meta_objective == "log-loss-ratio":
            objective = functools.partial(log_loss_ratio, initial_loss=optimizee.initial_loss)
        loss, regularization, optimizee.params, optimizee.rule_state = meta_unroll(
            self.update_rule,
            task,
            optimizee.params,
            optimizee.rule_state,
            optimizee.generator,
            steps,
            regularizer,
            objective,
        )
        return loss, regularization

    def _on_device(self, task):
        """``task`` with its data and models on the trainer's device (as it is on the CPU)."""
        if self.device.type == "cpu":
            return task
        device = self.device
        return dataclasses.replace(
            task,
            make_model=lambda: task.make_model().to(device),
            train_images=task.train_images.to(device),
            train_labels=task.train_labels.to(device),
            eval_images=task.eval_images.to(device),
            eval_labels=task.eval_labels.to(device),
        )

    def imitation_probability(self):
        """Chance that a meta-training epoch of the current stage imitates the teacher instead."""
        if self.recipe.stage_imitation_probabilities:
            return self.recipe.stage_imitation_probabilities[self.stage["index"]]
        return self.recipe.imitation_probability

    def validate_and_keep_best(self):
        """Validate the current update rule; keep its weights if they are the best so far."""
        score = self._score()
        if score["loss"] < self.best["loss"]:
            self._keep_best(score)
        return {**score, "best_epoch": self.best["epoch"]}

    def meta_unrolls(self):
        """Unrolls per meta-training epoch: the current stage's horizon, or ``meta_unrolls``."""
        if not self.recipe.curriculum:
            return self.recipe.meta_unrolls
        return max(1, self.recipe.curriculum[self.stage["index"]] // self.recipe.unroll_length)

    def validation_steps(self):
        """Optimizee steps of a validation: the next stage's horizon under a curriculum."""
        curriculum = self.recipe.curriculum
        if not curriculum:
            return self.recipe.validation_steps
        index = self.stage["index"]
        return curriculum[index + 1] if index + 1 < len(curriculum) else 2 * curriculum[-1]

    def _score(self):
        return validate(
            self.update_rule,
            self.validation_task,
            self.validation_steps(),
            validation_seeds(self.recipe),
            self.processes,
        )

    def _follow_main_decisions(self):
        # Every process scores the same validation, so they should decide alike; process 0's
        # decisions (best so far, stage advanced or ended, stop) are nevertheless made the only
        # ones, so that no rounding quirk can ever send the processes down different paths.
        state = self.processes.broadcast(
            {"best": self.best, "stage": self.stage, "finished": self.finished}
        )
        self.best, self.stage, self.finished = state["best"], state["stage"], state["finished"]

    def _start_stage(self):
        # The stage's baseline: the weights it starts from, scored at its own validation horizon.
        score = self._score()
        self.stage["baseline"] = self.stage["best"] = score["loss"]
        if self.best_weights is None:
            self._keep_best(score)
        self._log(
            {
                "event": "stage start",
                "stage": self.stage["index"],
                "horizon": self.recipe.curriculum[self.stage["index"]],
                "validation_steps": self.validation_steps(),
                "baseline": score,
                "elapsed_s": round(self.elapsed, 1),
            }
        )

    def _validate_stage(self):
        score = self._score()
        if score["loss"] < self.stage["best"]:
            self.stage["best"], self.stage["stale"] = score["loss"], 0
            self._keep_best(score)
        else:
            self.stage["stale"] += 1
        record = {**score, "steps": self.validation_steps(), "best_epoch": self.best["epoch"]}
        if self.stage["stale"] >= self.recipe.stage_patience:
            record["decision"] = self._end_stage()
        return record

    def _end_stage(self):
        improved = self.stage["best"] < self.stage["baseline"]
        last = self.stage["index"] + 1 >= len(self.recipe.curriculum)
        # The next stage (or the release) starts from the best weights seen, not the latest.
        self.update_rule.load_state_dict(self.best_weights)
        if improved and not last:
            self.stage = _new_stage(self.stage["index"] + 1)
            return f"stage improved; advancing to stage {self.stage['index']}"
        self.finished = True
        return (
            "stage improved; curriculum complete" if improved else "stage did not improve; stopping"
        )

    def _keep_best(self, score):
        self.best = {**score, "epoch": self.epoch, "steps": self.validation_steps()}
        self.best_weights = {
            k: v.detach().clone() for k, v in self.update_rule.state_dict().items()
        }

    def best_phase(self):
        """``"imitation"`` or ``"meta"``: the phase that produced the best validated weights."""
        epoch = self.best["epoch"] or self.epoch
        return "imitation" if epoch <= self.recipe.imitation_epochs else "meta"

    def best_update_rule(self):
        """Return a copy of the update rule with the best validated weights (current ones if none)."""
        rule = new_update_rule(self.recipe)
        rule.load_state_dict(self.best_weights or self.update_rule.state_dict())
        return rule

    def calibrated_update_rule(self):
        """The best update rule with its step scale chosen by the recipe's ``step_scales``.

        Every process takes part (the validation runs are split across them). Without
        ``step_scales`` this is :meth:`best_update_rule` and no calibration record.

        Returns:
            ``(rule, calibration)``: the rule on the CPU, and the calibration record (also
            logged) or ``None``.
        """
        rule = self.best_update_rule()
        if not self.recipe.step_scales:
            return rule, None
        steps = self.recipe.calibration_steps or final_validation_steps(self.recipe)
        seeds = validation_seeds(self.recipe)
        rule, records = calibrate_step_scale(
            rule.to(self.device),
            self.validation_task,
            steps,
            seeds,
            self.recipe.step_scales,
            self.processes,
        )
        calibration = calibration_record(rule, records, self.validation_task, steps, seeds)
        self._log({"event": "step-scale calibration", **calibration})
        return rule.cpu(), calibration

    def save_checkpoint(self, path):
        """Write everything needed to resume, atomically."""
        payload = {
            "recipe": asdict(self.recipe),
            "epoch": self.epoch,
            "update_rule": self.update_rule.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "best": self.best,
            "best_weights": self.best_weights,
            "elapsed": self.elapsed,
            "commit": self.commit,
            "finished": self.finished,
            "stage": self.stage,
            "log_size": self._log_path().stat().st_size if self._log_path().exists() else 0,
        }
        tmp = pathlib.Path(str(path) + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(path)

    def load_checkpoint(self, path):
        """Resume from a checkpoint written by :meth:`save_checkpoint` for the same recipe.

        Raises:
            ValueError: If the checkpoint was written for a different recipe.
        """
        self._restore(torch.load(path, weights_only=True, map_location="cpu"), path)

    def _resume(self):
        # Process 0 alone reads the checkpoint, since the others may run on machines that cannot
        # see its folder, and hands it to them: every process resumes from the same state.
        path = self.out_dir / "checkpoint.pt"
        payload = None
        if self.processes.is_main and path.exists():
            payload = torch.load(path, weights_only=True, map_location="cpu")
        payload = self.processes.broadcast(payload)
        if payload is not None:
            self._restore(payload, path)

    def _restore(self, payload, path):
        # Settings added to the recipe after the checkpoint was written count as their defaults.
        saved = {**asdict(Recipe()), **payload["recipe"]}
        if saved != asdict(self.recipe):
            changed = sorted(k for k in saved if saved[k] != asdict(self.recipe).get(k))
            raise ValueError(
                f"{path} was written for another recipe (differs in {changed}); use a new output "
                "folder or the same settings to resume"
            )
        self.update_rule.load_state_dict(payload["update_rule"])
        self.meta_optimizer.load_state_dict(payload["meta_optimizer"])
        self.epoch = payload["epoch"]
        self.best = payload["best"]
        self.best_weights = payload["best_weights"]
        self.elapsed = payload["elapsed"]
        self.commit = payload["commit"]
        self.finished = payload.get("finished", False)
        self.stage = payload.get("stage", _new_stage(0))
        self.log_size = payload.get("log_size")

    def _validation_due(self):
        since_imitation = self.epoch - self.recipe.imitation_epochs
        return since_imitation % self.recipe.validate_every == 0 or self.epoch == self.total_epochs

    def _log_path(self):
        return self.out_dir / "log.jsonl"

    def _drop_unsaved_log_records(self):
        # A run killed after the last checkpoint may have logged a stage start or a whole epoch
        # that the resumed run redoes and logs again; without this the log would hold them twice.
        log = self._log_path()
        if self.log_size is not None and log.exists() and log.stat().st_size > self.log_size:
            os.truncate(log, self.log_size)

    def _log(self, record):
        if not self.processes.is_main:
            return
        with open(self._log_path(), "a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")
        if not self.progress:
            return
        if record.get("event") == "step-scale calibration":
            scores = calibration_scores(record)
            (setting, value), *_ = (
                (k, record[k]) for k in ("output_scale", "step_size_offset") if k in record
            )
            print(
                f"step scale after {record['steps']} steps: validation loss by factor {scores}; "
                f"kept {record['chosen']:g} ({setting.replace('_', ' ')} {value:g})",
                flush=True,
            )
            return
        if "event" in record:
            print(
                f"{record['event']} {record['stage']}: horizon {record['horizon']} steps, validated at "
                f"{record['validation_steps']}; baseline loss {record['baseline']['loss']:.4f}",
                flush=True,
            )
            return
        line = f"epoch {record['epoch'] + 1}/{self.total_epochs} {record['phase']:9s} loss {record['loss']:.4f}"
        if "regularizer_grad_ratio" in record:
            line += f"  {record['regularizer']} {record['regularizer_value']:.3g} (grad ratio {record['regularizer_grad_ratio']:.3g})"
        if "validation" in record:
            v = record["validation"]
            line += f"  validation loss {v['loss']:.4f} acc {v['accuracy']:.4f} (best at epoch {v['best_epoch']})"
            if "decision" in v:
                line += f"; {v['decision']}"
        print(line + f"  [{record['elapsed_s']:.0f}s]", flush=True)


def lambda_search(recipe, dataset, lambdas, out_dir, progress=True, device="cpu"):
    """Meta-train ``recipe`` once per regularizer weight, from the same start, and compare.

    For each lambda the run logs the regularizer's share of the meta-gradient (the ratio of the
    norms of its gradient and of the loss's gradient in the update rule's weights), so that a
    release's lambda can be chosen where the regularizer is material and validation is best.

    Args:
        recipe: The recipe; its ``regularizer`` must not be ``"none"``. ``reg_lambda`` is replaced.
        dataset: The image dataset.
        lambdas: Regularizer weights to try.
        out_dir: Folder for one run folder per lambda and ``lambda_search.json``.
        progress: Whether the runs print their epochs.
        device: Where to train (see :class:`MetaTrainer`).

    Returns:
        A list of ``{"lambda", "grad_ratio", "regularizer_value", "best_validation"}`` records;
        ``None`` on every process but process 0 under torchrun.
    """
    if recipe.flatness_regularizer() is None:
        raise ValueError("lambda_search needs a recipe with a regularizer")
    out_dir = pathlib.Path(out_dir)
    results, main = [], True
    for weight in lambdas:
        run_dir = out_dir / f"lambda-{weight:g}"
        trainer = MetaTrainer(
            dataclasses.replace(recipe, reg_lambda=weight),
            dataset,
            run_dir,
            progress,
            device=device,
        )
        best = trainer.run()
        main = trainer.processes.is_main
        if not main:
            continue  # process 0 reads the logs and writes the summary
        records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        ratios = [r["regularizer_grad_ratio"] for r in records if "regularizer_grad_ratio" in r]
        values = [r["regularizer_value"] for r in records if "regularizer_value" in r]
        results.append(
            {
                "lambda": weight,
                "grad_ratio": sum(ratios) / len(ratios) if ratios else None,
                "regularizer_value": sum(values) / len(values) if values else None,
                "best_validation": best,
            }
        )
    if not main:
        return None
    summary = {"recipe": asdict(recipe), "results": results}
    (out_dir / "lambda_search.json").write_text(
        json.dumps(summary, indent=1) + "\n", encoding="utf-8"
    )
    return results


@dataclass
class _Optimizee:
    """One optimizee of an epoch, carried from unroll to unroll."""

    index: int
    params: dict
    rule_state: object  # see initial_rule_state
    teacher: dict
    generator: torch.Generator
    initial_loss: float = None  # the log-loss-ratio objective's reference, if it is the objective


def _new_stage(index):
    return {"index": index, "baseline": None, "best": math.inf, "stale": 0, "epochs": 0}


def _zero_if_none(grad, like):
    return torch.zeros_like(like) if grad is None else grad


def _flatten(grads, weights):
    return torch.cat([_zero_if_none(g, w).reshape(-1) for g, w in zip(grads, weights)])


def _unflatten(flat, weights):
    return [part.view_as(w) for part, w in zip(flat.split([w.numel() for w in weights]), weights)]


def _add_flat_(params, flat):
    offset = 0
    with torch.no_grad():
        for name, value in params.items():
            n = value.numel()
            params[name] = (value + flat[offset : offset + n].view_as(value)).detach()
            offset += n


def _coordinatewise(update_rule):
    # A rule that does not say is coordinate-wise, as flatopt.LearnedOptimizer reads it.
    return getattr(update_rule, "coordinatewise", True)
