"""Meta-training of a coordinate-wise update rule by truncated backpropagation through unrolls.

The recipe follows L2O-DM (Andrychowicz et al. 2016) with the imitation warm start of L2O-DM-CL
(Chen et al. 2020): the update rule first regresses onto an Adam teacher's steps along the teacher's
own trajectory, then is meta-trained on the mean optimizee loss over truncated unrolls. As in L2O-DM,
the optimizee's gradient is treated as a constant input (no second derivatives through it); the
meta-gradient flows through the parameter updates and the recurrent state.

The trainer writes a checkpoint after every epoch (atomically) and resumes from it exactly, logs one
JSON line per epoch and validation, and keeps the update rule with the best validation score.
"""

import dataclasses
import json
import math
import os
import pathlib
import time
from dataclasses import asdict, dataclass, field

import torch

import flatopt

from . import flatness
from .optimizees import ACTIVATIONS, holdout_task, mlp, train_and_evaluate


@dataclass
class Recipe:
    """Everything that determines a meta-training run (recorded in the release's provenance).

    Attributes:
        seed: Seed of every random draw of the run.
        hidden_size: LSTM units per layer.
        preprocess_p: Gradient preprocessing constant.
        output_scale: Fixed factor on the update rule's read-out.
        batch_size: Optimizee minibatch size.
        unroll_length: Optimizee steps per truncated unroll (one meta-update each).
        imitation_epochs: Epochs of regression onto the Adam teacher.
        imitation_unrolls: Unrolls per imitation epoch (a fresh optimizee each epoch).
        imitation_activations: Optimizee activations cycled through epoch by epoch during imitation.
        teacher_lr: Adam teacher's learning rate.
        meta_epochs: Epochs of meta-training on the unrolled optimizee loss.
        meta_unrolls: Unrolls per meta-training epoch (a fresh optimizee each epoch).
        meta_activation: Optimizee activation during meta-training.
        imitation_meta_lr: Adam learning rate on the update rule during imitation.
        meta_lr: Adam learning rate on the update rule during meta-training.
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
    """

    seed: int = 0
    hidden_size: int = 20
    preprocess_p: float = 10.0
    output_scale: float = 0.1
    batch_size: int = 128
    unroll_length: int = 20
    imitation_epochs: int = 60
    imitation_unrolls: int = 10
    imitation_activations: list = field(default_factory=lambda: ["sigmoid", "relu"])
    teacher_lr: float = 0.01
    meta_epochs: int = 50
    meta_unrolls: int = 5
    meta_activation: str = "sigmoid"
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

    def __post_init__(self):
        # Refuse a bad recipe at once, not after an hour of imitation epochs.
        positive = [
            "hidden_size",
            "batch_size",
            "unroll_length",
            "imitation_unrolls",
            "meta_unrolls",
            "validate_every",
            "validation_steps",
            "validation_seeds",
            "stage_patience",
            "reg_probes",
            "reg_iterations",
            "entropy_steps",
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


def mnist_tasks(dataset, activation, batch_size, validation_size=10000):
    """The MNIST MLP optimizee, training on the training split minus a held-out validation part.

    Args:
        dataset: An :class:`training.data.ImageDataset`.
        activation: Hidden activation of the 784-20-10 MLP.
        batch_size: Minibatch size.
        validation_size: Training images held out to validate update rules (never the test set).

    Returns:
        A :class:`ClassificationTask` scored on the held-out images.
    """
    return holdout_task(
        lambda: mlp(20, activation), dataset, f"mlp-{activation}", batch_size, validation_size
    )


def imitation_unroll(update_rule, task, params, teacher, rule_state, generator, steps, teacher_lr):
    """Regress the update rule onto Adam's steps along Adam's own trajectory for ``steps`` steps.

    Args:
        update_rule: The update rule being trained.
        task: The optimizee.
        params: Dict of the teacher's current optimizee parameters (advanced in place).
        teacher: Dict with Adam's ``m``, ``v`` (flat tensors) and ``t`` (int), advanced in place.
        rule_state: The update rule's recurrent state ``(N, state_size)``, detached.
        generator: Draws the minibatches.
        steps: Unroll length.
        teacher_lr: Adam's learning rate.

    Returns:
        ``(loss, rule_state)``: the relative squared error ``sum |u - d|^2 / sum |d|^2`` over the
        unroll (differentiable in the rule's weights; 1 means no better than predicting zero), and
        the new recurrent state, detached.
    """
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    error, reference = 0.0, 0.0
    names = list(params)
    for _ in range(steps):
        images, labels = task.sample_batch(generator)
        values = [params[n].requires_grad_(True) for n in names]
        grads = torch.autograd.grad(task.loss(dict(zip(names, values)), images, labels), values)
        grad = torch.cat([g.reshape(-1) for g in grads])

        teacher["t"] += 1
        teacher["m"].mul_(beta1).add_(grad, alpha=1 - beta1)
        teacher["v"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat = teacher["m"] / (1 - beta1 ** teacher["t"])
        v_hat = teacher["v"] / (1 - beta2 ** teacher["t"])
        target = -teacher_lr * m_hat / (v_hat.sqrt() + eps)

        update, rule_state = update_rule(grad, rule_state)
        error = error + (update - target).pow(2).sum()
        reference = reference + target.pow(2).sum()
        _add_flat_(params, target)
    return error / reference, rule_state.detach()


def meta_unroll(update_rule, task, params, rule_state, generator, steps, regularizer=None):
    """Apply the update rule for ``steps`` optimizee steps and return the differentiable meta-loss.

    Args:
        update_rule: The update rule being trained.
        task: The optimizee.
        params: Dict of detached optimizee parameters at the start of the unroll.
        rule_state: Recurrent state ``(N, state_size)``, detached.
        generator: Draws the minibatches.
        steps: Unroll length.
        regularizer: Optional ``(loss_fn, params, generator) -> scalar`` flatness measure,
            evaluated on the parameters the unroll ends at (``loss_fn`` draws a fresh minibatch at
            each call; the measure's own random draws also come from ``generator``).

    Returns:
        ``(meta_loss, regularization, params, rule_state)``: the mean optimizee loss over the
        unroll and the flatness measure at its end (``None`` without a regularizer), both
        differentiable in the rule's weights, and the detached parameters and state at its end.
    """
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    current = {n: params[n].detach().requires_grad_(True) for n in names}
    total = 0.0
    for _ in range(steps):
        images, labels = task.sample_batch(generator)
        loss = task.loss(current, images, labels)
        # The gradient enters as data: no second derivatives, as in L2O-DM.
        grads = torch.autograd.grad(loss, list(current.values()), retain_graph=True)
        grad = torch.cat([g.reshape(-1) for g in grads]).detach()
        update, rule_state = update_rule(grad, rule_state)
        current = {
            n: current[n] + u.view(shape) for n, u, shape in zip(names, update.split(sizes), shapes)
        }
        total = total + loss

    regularization = None
    if regularizer is not None:

        def loss_fn(values):
            return task.loss(dict(zip(names, values)), *task.sample_batch(generator))

        regularization = regularizer(loss_fn, list(current.values()), generator)
    final = {n: v.detach() for n, v in current.items()}
    return total / steps, regularization, final, rule_state.detach()


def validate(update_rule, task, steps, seeds):
    """Score an update rule by training fresh optimizees with it on held-out data.

    Returns:
        Dict with the mean final held-out ``loss`` and ``accuracy`` over ``seeds`` (lower loss
        is better; a diverged run scores ``inf``).
    """
    losses, accuracies = [], []
    for seed in seeds:
        curves = train_and_evaluate(
            task, lambda p: flatopt.LearnedOptimizer(p, update_rule), steps, seed
        )
        losses.append(math.inf if curves["diverged"] else curves["eval_loss"][-1])
        accuracies.append(curves["eval_accuracy"][-1])
    return {"loss": sum(losses) / len(losses), "accuracy": sum(accuracies) / len(accuracies)}


class MetaTrainer:
    """Runs a :class:`Recipe` with checkpoints, logs and best-model selection.

    Args:
        recipe: The run's settings.
        dataset: The image dataset the MNIST MLP optimizees train on (unused with ``make_task``).
        out_dir: Folder for ``checkpoint.pt``, ``best.safetensors`` and ``log.jsonl``.
        progress: Whether to print one line per epoch.
        commit: The code's commit, recorded in the checkpoint at the run's first start and kept
            through resumes.
        make_task: Optional ``activation -> ClassificationTask`` giving the optimizee of an epoch
            in place of the recipe's MNIST MLPs: your own model factory and data, trained on the
            task's training images and validated on its held-out ones. It is called with the
            activation the recipe names for the epoch and may ignore it.
    """

    def __init__(self, recipe, dataset, out_dir, progress=True, commit="unknown", make_task=None):
        self.recipe = recipe
        self.dataset = dataset
        self.make_task = make_task or (
            lambda activation: mnist_tasks(dataset, activation, recipe.batch_size)
        )
        self.out_dir = pathlib.Path(out_dir)
        self.progress = progress
        torch.manual_seed(recipe.seed)
        self.update_rule = flatopt.LSTMUpdateRule(
            recipe.hidden_size, recipe.preprocess_p, recipe.output_scale
        )
        self.meta_optimizer = torch.optim.Adam(
            self.update_rule.parameters(), lr=recipe.imitation_meta_lr
        )
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
        self.validation_task = self.make_task(recipe.meta_activation)
        if recipe.init_weights:
            self.update_rule.load_state_dict(
                flatopt.load_release(recipe.init_weights)[0].state_dict()
            )

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
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if (self.out_dir / "checkpoint.pt").exists():
            self.load_checkpoint(self.out_dir / "checkpoint.pt")
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
            self.elapsed += time.perf_counter() - started
            record["elapsed_s"] = round(self.elapsed, 1)
            self._log(record)
            self.save_checkpoint(self.out_dir / "checkpoint.pt")
        return self.best

    def train_epoch(self, epoch):
        """One epoch on a fresh optimizee: imitation or meta-training by the recipe's schedule."""
        recipe = self.recipe
        warm_start = epoch < recipe.imitation_epochs
        # A separate generator, so that the coin does not shift the epoch's minibatches.
        coin = torch.rand(
            (), generator=torch.Generator().manual_seed(recipe.seed * 7_919 + epoch)
        ).item()
        imitation = warm_start or coin < self.imitation_probability()
        if imitation:
            activation = recipe.imitation_activations[epoch % len(recipe.imitation_activations)]
        else:
            activation = recipe.meta_activation
        lr = recipe.imitation_meta_lr if warm_start else recipe.meta_lr
        for group in self.meta_optimizer.param_groups:
            group["lr"] = lr
        task = self.make_task(activation)
        # Every epoch draws its own optimizee and minibatches from (seed, epoch): resumable exactly.
        generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + epoch)
        params = task.init_params(seed=recipe.seed * 1_000_003 + epoch)
        size = sum(p.numel() for p in params.values())
        rule_state = self.update_rule.initial_state(size)
        teacher = {"m": torch.zeros(size), "v": torch.zeros(size), "t": 0}

        regularizer = None if imitation else recipe.flatness_regularizer()
        losses, grad_norms, reg_values, reg_ratios = [], [], [], []
        for _ in range(recipe.imitation_unrolls if imitation else self.meta_unrolls()):
            if imitation:
                loss, rule_state = imitation_unroll(
                    self.update_rule,
                    task,
                    params,
                    teacher,
                    rule_state,
                    generator,
                    recipe.unroll_length,
                    recipe.teacher_lr,
                )
                regularization = None
            else:
                loss, regularization, params, rule_state = meta_unroll(
                    self.update_rule,
                    task,
                    params,
                    rule_state,
                    generator,
                    recipe.unroll_length,
                    regularizer,
                )
            self.meta_optimizer.zero_grad(set_to_none=True)
            if regularization is None:
                loss.backward()
            else:
                ratio = self._backward_with_regularizer(loss, recipe.reg_lambda * regularization)
                reg_values.append(regularization.item())
                reg_ratios.append(ratio)
            grad_norms.append(
                torch.nn.utils.clip_grad_norm_(
                    self.update_rule.parameters(), recipe.max_grad_norm
                ).item()
            )
            self.meta_optimizer.step()
            losses.append(loss.item())
        record = {
            "epoch": epoch,
            "phase": "imitation" if imitation else "meta",
            "stage": None if warm_start or not recipe.curriculum else self.stage["index"],
            "optimizee": task.name,
            "loss": sum(losses) / len(losses),
            "meta_grad_norm": sum(grad_norms) / len(grad_norms),
        }
        if reg_values:
            record["regularizer"] = recipe.regularizer
            record["regularizer_value"] = sum(reg_values) / len(reg_values)
            record["regularizer_grad_ratio"] = sum(reg_ratios) / len(reg_ratios)
        return record

    def imitation_probability(self):
        """Chance that a meta-training epoch of the current stage imitates the teacher instead."""
        if self.recipe.stage_imitation_probabilities:
            return self.recipe.stage_imitation_probabilities[self.stage["index"]]
        return self.recipe.imitation_probability

    def _backward_with_regularizer(self, loss, penalty):
        """Set the meta-gradient of ``loss + penalty``; return ``|grad penalty| / |grad loss|``.

        The two parts are differentiated separately so that the regularizer's share of the
        meta-gradient can be logged: a lambda whose ratio is negligible does not train anything.
        """
        weights = list(self.update_rule.parameters())
        loss_grads = torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
        penalty_grads = torch.autograd.grad(penalty, weights, allow_unused=True)
        for weight, a, b in zip(weights, loss_grads, penalty_grads):
            weight.grad = _zero_if_none(a, weight) + _zero_if_none(b, weight)
        loss_norm = torch.sqrt(
            sum(_zero_if_none(g, w).pow(2).sum() for g, w in zip(loss_grads, weights))
        )
        penalty_norm = torch.sqrt(
            sum(_zero_if_none(g, w).pow(2).sum() for g, w in zip(penalty_grads, weights))
        )
        return (penalty_norm / loss_norm.clamp_min(1e-30)).item()

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
        seeds = [10_000 + s for s in range(self.recipe.validation_seeds)]
        return validate(self.update_rule, self.validation_task, self.validation_steps(), seeds)

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
        rule = flatopt.LSTMUpdateRule(
            self.recipe.hidden_size, self.recipe.preprocess_p, self.recipe.output_scale
        )
        rule.load_state_dict(self.best_weights or self.update_rule.state_dict())
        return rule

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
        payload = torch.load(path, weights_only=True)
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
        with open(self._log_path(), "a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")
        if not self.progress:
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


def lambda_search(recipe, dataset, lambdas, out_dir, progress=True):
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

    Returns:
        A list of ``{"lambda", "grad_ratio", "regularizer_value", "best_validation"}`` records.
    """
    if recipe.flatness_regularizer() is None:
        raise ValueError("lambda_search needs a recipe with a regularizer")
    out_dir = pathlib.Path(out_dir)
    results = []
    for weight in lambdas:
        run_dir = out_dir / f"lambda-{weight:g}"
        trainer = MetaTrainer(
            dataclasses.replace(recipe, reg_lambda=weight), dataset, run_dir, progress
        )
        best = trainer.run()
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
    summary = {"recipe": asdict(recipe), "results": results}
    (out_dir / "lambda_search.json").write_text(
        json.dumps(summary, indent=1) + "\n", encoding="utf-8"
    )
    return results


def _new_stage(index):
    return {"index": index, "baseline": None, "best": math.inf, "stale": 0, "epochs": 0}


def _zero_if_none(grad, like):
    return torch.zeros_like(like) if grad is None else grad


def _add_flat_(params, flat):
    offset = 0
    with torch.no_grad():
        for name, value in params.items():
            n = value.numel()
            params[name] = (value + flat[offset : offset + n].view_as(value)).detach()
            offset += n
