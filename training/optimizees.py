"""Optimizees: the models and data a learned optimizer is meta-trained and evaluated on.

A :class:`ClassificationTask` couples a model factory with an image dataset. Meta-training uses it
functionally (parameters as a dict of tensors, so that an unroll can be differentiated); evaluation
trains a real ``nn.Module`` with any ``torch.optim`` optimizer through :func:`train_and_evaluate`.
Users plug in their own optimizee by building a task from their own factory and dataset.
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}


def mlp(hidden=20, activation="sigmoid", inputs=784, classes=10):
    """The classic L2O optimizee: one hidden layer, e.g. 784-20(sigmoid)-10.

    Args:
        hidden: Hidden units.
        activation: ``"sigmoid"`` or ``"relu"``.
        inputs: Input features.
        classes: Output classes.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
    return nn.Sequential(
        nn.Linear(inputs, hidden), ACTIVATIONS[activation](), nn.Linear(hidden, classes)
    )


def conv_mnist():
    """Conv-MNIST: conv 16 3x3, 2x2 max-pool, conv 32 5x5, 2x2 max-pool, linear; ReLU after convs.

    Takes flattened 28x28 images, like the MLPs.
    """
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 16, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 16, 13, 13)
        nn.Conv2d(16, 32, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 32, 4, 4)
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def scale_cnn():
    """The L2O-Scale meta-training CNN: conv 8 3x3, conv 8 5x5, linear; ReLU after each conv.

    The convnet of the L2O-Scale code's MNIST problem (``ConvNet`` with filters ``[(3, 3, 8),
    (5, 5, 8)]`` and ReLU): stride 1, "same" padding, no pooling and no convolution biases, so the
    linear layer reads all 8 x 28 x 28 activations (64,402 parameters in four tensors). Every
    weight starts from a normal draw with standard deviation 0.01, as there; the original's L2
    penalty on the weights is left out, as for every other optimizee here. Takes flattened 28x28
    images, like the MLPs.
    """
    model = nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 8, 5, padding=2, bias=False),
        nn.ReLU(),  # (B, 8, 28, 28)
        nn.Flatten(),
        nn.Linear(8 * 28 * 28, 10),
    )
    for parameter in model.parameters():
        nn.init.normal_(parameter, 0.0, 0.01)
    return model


def conv_large_mnist():
    """A deeper Conv-MNIST: two conv 32 3x3, 2x2 max-pool, two conv 32 5x5, 2x2 max-pool, linear.

    ReLU follows every convolution; no padding, like :func:`conv_mnist`. Takes flattened 28x28
    images.
    """
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 32, 12, 12)
        nn.Conv2d(32, 32, 5),
        nn.ReLU(),
        nn.Conv2d(32, 32, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 32, 2, 2)
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 10),
    )


def conv_cifar():
    """Conv-MNIST's architecture on colour images: conv 16 3x3, pool, conv 32 5x5, pool, linear.

    Takes flattened 3x32x32 images (3072 features, channel-major as in
    :func:`training.data.load_cifar10`) or ``(B, 3, 32, 32)`` tensors.
    """
    return nn.Sequential(
        _CifarImages(),
        nn.Conv2d(3, 16, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 16, 15, 15)
        nn.Conv2d(16, 32, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 32, 5, 5)
        nn.Flatten(),
        nn.Linear(32 * 5 * 5, 10),
    )


def resnet20(num_classes=10):
    """ResNet-20 for CIFAR (He et al. 2016, section 4.2): 0.27M parameters.

    A 3x3 conv with 16 channels, then three stages of three basic blocks (two 3x3 convs each) with
    16, 32 and 64 channels on 32x32, 16x16 and 8x8 maps, global average pooling and a linear
    classifier; batch norm after every conv. Shortcuts are option A of the paper, the one its CIFAR
    results use: identities, which where a stage halves the map and doubles the channels subsample
    with stride 2 and append zero channels, so shortcuts add no parameters.

    Args:
        num_classes: Outputs of the classifier.

    Returns:
        The model; it takes flattened 3x32x32 images (3072 features, channel-major as in
        :func:`training.data.load_cifar10`) or ``(B, 3, 32, 32)`` tensors.
    """
    stages = []
    in_channels = 16
    for stage, channels in enumerate((16, 32, 64)):
        for block in range(3):
            stride = 2 if stage > 0 and block == 0 else 1
            stages.append(_BasicBlock(in_channels, channels, stride))
            in_channels = channels
    model = nn.Sequential(
        _CifarImages(),
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        *stages,  # (B, 64, 8, 8)
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )
    # The paper initialises as He et al. 2015 ("Delving deep into rectifiers"): variance 2 / fan,
    # where PyTorch's default gives 1 / (3 fan_in). That paper shows scaling by fan-out (which
    # preserves the backward signal) works as well as by fan-in; this is torchvision's choice too.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return model


class _CifarImages(nn.Module):
    """Reshapes flattened CIFAR images to ``(B, 3, 32, 32)``; image-shaped input passes through."""

    def forward(self, images):
        return images.reshape(images.shape[0], 3, 32, 32)


class _BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm, and an option-A identity shortcut (see :func:`resnet20`)."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x):
        shortcut = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            # F.pad's widths run from the last dimension back: (W, W, H, H, C, C).
            shortcut = nn.functional.pad(shortcut, (0, 0, 0, 0, 0, self.extra_channels))
        return torch.relu(self.residual(x) + shortcut)


@dataclass
class ClassificationTask:
    """A model to train on an image-classification dataset with cross-entropy.

    Args:
        make_model: Callable returning a freshly initialised ``nn.Module`` (called under a seeded
            torch RNG, so it should draw its initial weights from the global generator).
        train_images: Float tensor ``(N, ...)`` the optimizee trains on.
        train_labels: Int64 tensor ``(N,)``.
        eval_images: Held-out images used to score the trained model.
        eval_labels: Held-out labels.
        batch_size: Minibatch size of each optimizee step.
        name: Label used in logs.
    """

    make_model: Callable[[], nn.Module]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    eval_images: torch.Tensor
    eval_labels: torch.Tensor
    batch_size: int = 128
    name: str = "task"
    _template: nn.Module = field(default=None, init=False, repr=False)

    def new_model(self, seed):
        """Return a freshly initialised model, its initial weights fixed by ``seed``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.make_model()

    def init_params(self, seed):
        """Return fresh initial parameters as a dict of detached tensors, for functional unrolls."""
        model = self.new_model(seed)
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    def sample_batch(self, generator):
        """Draw a training minibatch ``(images, labels)`` with replacement, from ``generator``."""
        index = torch.randint(len(self.train_labels), (self.batch_size,), generator=generator)
        return self.train_images[index], self.train_labels[index]

    def loss(self, params, images, labels):
        """Cross-entropy of the model with parameters ``params`` (differentiable in them)."""
        if self._template is None:
            # Any instance serves: functional_call swaps in ``params`` for its own weights.
            self._template = self.new_model(0)
        logits = functional_call(self._template, params, (images,))
        return nn.functional.cross_entropy(logits, labels)


def test_task(make_model, dataset, name, batch_size=128):
    """An optimizee trained on a dataset's whole training set and scored on its test set.

    Args:
        make_model: Model factory.
        dataset: An :class:`training.data.ImageDataset`.
        name: Optimizee name, prefixed with the dataset's name in logs.
        batch_size: Minibatch size.
    """
    return ClassificationTask(
        make_model=make_model,
        train_images=dataset.train_images,
        train_labels=dataset.train_labels,
        eval_images=dataset.test_images,
        eval_labels=dataset.test_labels,
        batch_size=batch_size,
        name=f"{dataset.name}-{name}",
    )


def holdout_task(make_model, dataset, name, batch_size=128, validation_size=10000):
    """An optimizee trained on a dataset's training set minus its last images, scored on those.

    Update rules and learning rates are chosen on such a split, never on the test set.

    Args:
        make_model: Model factory.
        dataset: An :class:`training.data.ImageDataset`.
        name: Optimizee name, prefixed with the dataset's name in logs.
        batch_size: Minibatch size.
        validation_size: Training images held out for scoring.
    """
    split = len(dataset.train_labels) - validation_size
    return ClassificationTask(
        make_model=make_model,
        train_images=dataset.train_images[:split],
        train_labels=dataset.train_labels[:split],
        eval_images=dataset.train_images[split:],
        eval_labels=dataset.train_labels[split:],
        batch_size=batch_size,
        name=f"{dataset.name}-{name}",
    )


@torch.no_grad()
def evaluate(model, images, labels, batch_size=10000):
    """Return ``(mean cross-entropy, accuracy)`` of ``model`` on a labelled set."""
    total_loss, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start : start + batch_size])
        target = labels[start : start + batch_size]
        total_loss += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    return total_loss / len(labels), correct / len(labels)


def train_and_evaluate(
    task, make_optimizer, steps, seed, eval_every=None, on_step=None, eval_steps=(), measure=None
):
    """Train a fresh model of ``task`` with a ``torch.optim`` optimizer and record its curves.

    An optimizer that evaluates the gradient more than once per step (one whose
    ``gradient_evaluations_per_step`` is above 1, like the flat-minima baselines of
    ``benchmarks.baselines``) is stepped with a closure that returns the minibatch's loss without
    calling ``backward()``; the optimizer differentiates it as often as it needs. Any other
    optimizer gets the usual forward, backward and argument-less ``step()``.

    Args:
        task: The :class:`ClassificationTask`.
        make_optimizer: Callable ``params -> torch.optim.Optimizer``.
        steps: Optimizer steps, one minibatch each.
        seed: Fixes the model's initial weights and the minibatch order.
        eval_every: Steps between evaluations on the held-out set (the last step is always
            evaluated); ``None`` evaluates only at the end.
        on_step: Optional callable ``(step) -> None`` called after each step, e.g. a progress bar.
        eval_steps: Further steps at which to evaluate.
        measure: Optional callable ``(model) -> dict`` of further measurements taken at every
            evaluation, e.g. a flatness measure.

    Returns:
        A dict with ``train_loss`` (per step), ``eval_steps``, ``eval_loss``, ``eval_accuracy``
        (lists), ``measures`` (a list of ``measure``'s dicts, when given) and ``diverged``
        (whether a training loss was not finite; training stops there).
    """
    model = task.new_model(seed)
    optimizer = make_optimizer(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    curves = {
        "train_loss": [],
        "eval_steps": [],
        "eval_loss": [],
        "eval_accuracy": [],
        "diverged": False,
    }
    if measure is not None:
        curves["measures"] = []
    eval_steps = set(eval_steps)
    needs_closure = getattr(optimizer, "gradient_evaluations_per_step", 1) > 1

    for step in range(1, steps + 1):
        images, labels = task.sample_batch(generator)
        if needs_closure:
            # It returns the loss at the weights it started from, as the plain path records.
            loss = optimizer.step(functools.partial(_minibatch_loss, model, images, labels))
        else:
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        curves["train_loss"].append(loss.item())
        if not math.isfinite(curves["train_loss"][-1]):
            curves["diverged"] = True
        due = step in eval_steps or (eval_every and step % eval_every == 0)
        if step == steps or curves["diverged"] or due:
            eval_loss, accuracy = evaluate(model, task.eval_images, task.eval_labels)
            curves["eval_steps"].append(step)
            curves["eval_loss"].append(eval_loss)
            curves["eval_accuracy"].append(accuracy)
            if measure is not None:
                curves["measures"].append(measure(model))
        if on_step is not None:
            on_step(step)
        if curves["diverged"]:
            break
    return curves


def _minibatch_loss(model, images, labels):
    return nn.functional.cross_entropy(model(images), labels)


def tune_learning_rate(make_optimizer, task, lrs, steps, seeds=2):
    """Pick the learning rate whose runs reach the best mean held-out accuracy after ``steps``.

    Args:
        make_optimizer: Callable ``(params, lr) -> torch.optim.Optimizer``.
        task: A :class:`ClassificationTask` scored on a validation split (see
            :func:`holdout_task`), never on the test set.
        lrs: The grid.
        steps: Optimizer steps of each trial.
        seeds: Trials per learning rate, with seeds ``100 .. 100 + seeds - 1`` (apart from the
            seeds of final runs).

    Returns:
        ``{"lr", "steps", "seeds", "grid": {lr as text: mean accuracy}}``; a diverged trial
        scores zero.
    """
    grid = {}
    for lr in lrs:
        accuracies = []
        for seed in range(100, 100 + seeds):
            curves = train_and_evaluate(task, lambda p, lr=lr: make_optimizer(p, lr), steps, seed)
            accuracies.append(0.0 if curves["diverged"] else curves["eval_accuracy"][-1])
        grid[f"{lr:g}"] = sum(accuracies) / len(accuracies)
    best = max(grid, key=grid.get)
    return {"lr": float(best), "steps": steps, "seeds": seeds, "grid": grid}
