"""Meta-test benchmark: train optimizees the learned optimizers never saw, with every optimizer.

For each optimizee (a model on a dataset), optimizer and seed, a run trains a fresh model for a
preset's number of steps (see :mod:`benchmarks.presets`) and records the training loss, the test
loss and accuracy at evenly spaced steps, whether it diverged, the time of each iteration split
into forward+backward pass and optimizer step (:class:`benchmarks.measures.IterationTimer`), the
gradient evaluations per step, the optimizer's state bytes per parameter and the sharpness of the
final parameters. SGD's and Adam's learning rates are chosen per optimizee on a validation split
held out of the training set (``training.optimizees.tune_learning_rate``), never on the test set.

Every finished run is written to the results file at once, so an interrupted benchmark resumes
where it stopped; a results file is only ever extended with runs of the same settings. The figure
and the Markdown report (:mod:`benchmarks.report`) are generated from that file.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

import flatopt
from training.data import DatasetUnavailableError, load_dataset
from training.optimizees import (
    conv_cifar,
    conv_large_mnist,
    conv_mnist,
    holdout_task,
    mlp,
    resnet20,
    test_task,
    train_and_evaluate,
    tune_learning_rate,
)

from .baselines import SAM, EntropySGD, HessianTracePenaltySGD
from .measures import IterationTimer, sharpness, state_bytes_per_parameter
from .presets import DEFAULT_PRESET, PRESETS, Preset

RESULTS_FILE = "results.json"
FIGURE_FILE = "results.png"
REPORT_FILE = "RESULTS.md"
RESULTS_FORMAT = 1
ROOT = pathlib.Path(__file__).resolve().parent.parent

# Stored training-loss curves keep at most this many points (means over equal windows of steps),
# so that a 10,000-step benchmark's results file stays a few megabytes.
MAX_CURVE_POINTS = 1000
# Python's own cost per gradient evaluation in the time estimate, beyond the measured passes.
_OVERHEAD_S = 3e-4


@dataclass(frozen=True)
class Optimizee:
    """A model and the dataset it is trained and tested on.

    Args:
        dataset: ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"``.
        model: The model's name (the optimizee's name without its dataset).
        make_model: Callable returning a freshly initialised model.
        description: One line for ``--help`` and the report.
        batch_norm: Whether the model has batch-norm layers.
    """

    dataset: str
    model: str
    make_model: Callable[[], nn.Module]
    description: str
    batch_norm: bool = False


_MNIST_MODELS = {
    "mlp-relu": (functools.partial(mlp, 20, "relu"), "MLP 784-20-10 with ReLU"),
    "conv-mnist": (conv_mnist, "conv 16 3x3, pool, conv 32 5x5, pool, linear"),
    "conv-large-mnist": (conv_large_mnist, "two conv 32 3x3, pool, two conv 32 5x5, pool, linear"),
}
# Models trained on their own dataset are named alone; the MNIST models trained on Fashion-MNIST,
# a dataset no learned optimizer was meta-trained on, are the cross-dataset test.
OPTIMIZEES = {
    **{
        name: Optimizee("mnist", name, make, f"{text}, on MNIST")
        for name, (make, text) in _MNIST_MODELS.items()
    },
    "conv-cifar": Optimizee(
        "cifar10", "conv-cifar", conv_cifar, "Conv-MNIST's architecture on CIFAR-10's colour images"
    ),
    "resnet20": Optimizee(
        "cifar10", "resnet20", resnet20, "ResNet-20 (He et al. 2016) on CIFAR-10", batch_norm=True
    ),
    **{
        f"fashion-mnist/{name}": Optimizee(
            "fashion-mnist", name, make, f"{text}, on Fashion-MNIST (cross-dataset)"
        )
        for name, (make, text) in _MNIST_MODELS.items()
    },
}


@dataclass(frozen=True)
class Baseline:
    """A hand-designed optimizer and how its learning rate is set.

    Args:
        description: One line for ``--help`` and the report.
        build: Callable ``(params, lr) -> torch.optim.Optimizer``.
        lr: ``"tuned"`` (chosen per optimizee from the preset's grid), ``"sgd"`` (SGD's chosen
            rate, for optimizers that step with SGD) or a fixed number.
        hyperparameters: Its other settings, recorded in the results.
    """

    description: str
    build: Callable
    lr: object
    hyperparameters: dict = dataclasses.field(default_factory=dict)


def _defaults(cls, *names):
    """The documented default values of ``cls``'s constructor arguments ``names``."""
    parameters = inspect.signature(cls).parameters
    return {name: parameters[name].default for name in names}


_SAM = _defaults(SAM, "rho")
_HESSIAN_TRACE = _defaults(HessianTracePenaltySGD, "penalty", "probes")
_ENTROPY = _defaults(EntropySGD, "inner_steps", "inner_lr", "gamma", "noise", "alpha")

BASELINES = {
    "sgd": Baseline(
        "SGD without momentum", lambda params, lr: torch.optim.SGD(params, lr=lr), "tuned"
    ),
    "adam": Baseline(
        "Adam, torch's default betas", lambda params, lr: torch.optim.Adam(params, lr=lr), "tuned"
    ),
    # Entropy-SGD's default lr (0.1) moves the weights by lr * gamma * (x - mu) = 0.003 (x - mu) a
    # step, too little to train in these horizons (27% MNIST accuracy after 200 MLP-ReLU steps).
    # lr = 1 / gamma moves them onto the Langevin average mu, the step of the authors' code with
    # its lr of 1 (which leaves gamma out of the outer gradient); its other settings are defaults.
    "entropy-sgd": Baseline(
        "Entropy-SGD (Chaudhari et al. 2017), Algorithm 1 with the defaults of "
        "benchmarks.baselines.EntropySGD and lr 1/gamma",
        lambda params, lr: EntropySGD(params, lr=lr),
        1 / _ENTROPY["gamma"],
        _ENTROPY,
    ),
    "sgd-hessian-trace": Baseline(
        "SGD on loss + penalty * Hessian trace (Hutchinson), at SGD's chosen learning rate",
        lambda params, lr: HessianTracePenaltySGD(params, lr=lr),
        "sgd",
        _HESSIAN_TRACE,
    ),
    "sam": Baseline(
        "SAM (Foret et al. 2021) around SGD, at SGD's chosen learning rate",
        lambda params, lr: SAM(params, torch.optim.SGD, lr=lr),
        "sgd",
        _SAM,
    ),
}


class SettingsMismatchError(ValueError):
    """A results file holds runs made with other settings than those asked for."""


def default_optimizers():
    """SGD, Adam, every learned optimizer bundled with the installed flatopt, and the baselines."""
    return ["sgd", "adam", *flatopt.list_pretrained(), "entropy-sgd", "sgd-hessian-trace", "sam"]


def optimizer_record(name):
    """Describe optimizer ``name`` for the results file; fails at once on an unknown name.

    Args:
        name: A key of :data:`BASELINES`, or learned-optimizer weights (a bundled release name, a
            release folder or a Hub id; see ``flatopt.resolve_weights``).

    Returns:
        A JSON-ready dict: ``kind`` (``"baseline"``, ``"closure"`` for optimizers that evaluate
        the loss themselves, or ``"learned"``), ``description``, ``lr``, ``hyperparameters``,
        ``gradient_evaluations_per_step`` and, for learned optimizers, the weights' SHA-256 and
        meta-training horizon.

    Raises:
        ValueError: ``name`` is neither a baseline nor loadable weights.
    """
    if name in BASELINES:
        baseline = BASELINES[name]
        probe = baseline.build([nn.Parameter(torch.zeros(1))], 0.1)
        evaluations = getattr(probe, "gradient_evaluations_per_step", 1)
        return {
            "kind": "closure" if evaluations > 1 else "baseline",
            "description": baseline.description,
            "lr": baseline.lr,
            "hyperparameters": dict(baseline.hyperparameters),
            "gradient_evaluations_per_step": evaluations,
        }
    try:
        folder = flatopt.resolve_weights(name)
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(
            f"unknown optimizer {name!r}: use one of {', '.join(BASELINES)} or learned-optimizer "
            f"weights (bundled: {', '.join(flatopt.list_pretrained()) or 'none'}); flatopt says: "
            f"{exc}"
        ) from exc
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return {
        "kind": "learned",
        "description": config.get("description", "learned optimizer"),
        "lr": None,
        "hyperparameters": {},
        "gradient_evaluations_per_step": 1,
        "weights_sha256": hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest(),
        "meta_training_horizon": _meta_training_horizon(config),
    }


def run_benchmark(
    preset=DEFAULT_PRESET,
    out="results",
    optimizers=None,
    optimizees=None,
    dry_run=False,
    progress=True,
    workers=1,
):
    """Run (or resume) a benchmark and write its results, figure and report into ``out``.

    Args:
        preset: A :class:`benchmarks.presets.Preset` or the name of one; use
            ``dataclasses.replace`` on a preset to override its steps or seeds.
        out: Folder of ``results.json``, ``results.png`` and ``RESULTS.md``. Runs already in its
            results file are skipped; the file must have been written with the same settings.
        optimizers: Optimizer names (see :func:`optimizer_record`); default
            :func:`default_optimizers`.
        optimizees: Keys of :data:`OPTIMIZEES`; default the preset's.
        dry_run: Print the plan and its estimated time, then stop without training.
        progress: Show progress bars on stderr.
        workers: Runs trained at once, each in its own process with the current number of torch
            threads (give each worker one thread and one core). Learning-rate tuning stays in
            this process. Per-iteration times are then measured with ``workers`` runs sharing
            the machine, the same for every optimizer.

    Returns:
        The results, as written to ``results.json``.

    Raises:
        ValueError: An unknown optimizer or optimizee name, or settings that differ from those
            of the results already in ``out`` (:class:`SettingsMismatchError`).
        DatasetUnavailableError: MNIST or Fashion-MNIST is missing under ``CI=true``.
    """
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    optimizers = list(dict.fromkeys(optimizers or default_optimizers()))
    optimizees = list(dict.fromkeys(optimizees or preset.optimizees or OPTIMIZEES))
    unknown = [name for name in optimizees if name not in OPTIMIZEES]
    if unknown:
        raise ValueError(
            f"unknown optimizee {', '.join(map(repr, unknown))}; choose from "
            + ", ".join(OPTIMIZEES)
        )
    records = {name: optimizer_record(name) for name in optimizers}
    for name, record in list(records.items()):
        if record["lr"] == "sgd" and "sgd" not in records:
            records["sgd"] = optimizer_record("sgd")  # SGD's tuning is needed, not its runs
    path = pathlib.Path(out) / RESULTS_FILE
    results = _open_results(path, preset, records)
    tasks = _prepare_optimizees(optimizees, preset, results)

    jobs = [
        (optimizee, seed, optimizer)
        for optimizee in tasks
        for seed in range(preset.seeds)
        for optimizer in optimizers
        if not _finished(results, optimizee, optimizer, seed)
    ]
    tuning = _tuning_jobs(results, tasks, {name: records[name] for name in optimizers})
    plan = _estimate(jobs, tuning, tasks, preset, results, workers)
    print(format_plan(preset, optimizers, optimizees, results, plan, path))
    if dry_run or not (jobs or tuning):
        if not dry_run:
            write_outputs(results, path.parent)
        return results

    _add_session(results, preset, workers)
    _save(results, path)
    for optimizee, name in tuning:
        _tune(results, optimizee, name, tasks[optimizee], preset, progress)
        _save(results, path)

    started, estimated_done = time.perf_counter(), 0.0
    arguments = [
        (optimizee, name, records[name], _learning_rate(results, optimizee, name), seed)
        for optimizee, seed, name in jobs
    ]
    finished = _run_in_workers(arguments, preset, tasks, workers, progress, plan["runs"])
    for index, (position, run) in enumerate(finished, 1):
        results["runs"].append(run)
        _save(results, path)
        estimated_done += plan["runs"][position]
        print(_run_line(index, len(jobs), run, started, estimated_done, sum(plan["runs"])))
    for artefact in write_outputs(results, path.parent):
        print(f"wrote {artefact}")
    return results


def format_plan(preset, optimizers, optimizees, results, plan, path):
    """The plan of a benchmark as printed before it starts: what runs, what is skipped, how long."""
    overrides = _overrides(preset)
    ready = [name for name in optimizees if results["optimizees"][name]["status"] == "ok"]
    skipped = [name for name in optimizees if name not in ready]
    lines = [
        f"Benchmark plan: preset {preset.name}"
        + (
            f" (overrides: {', '.join(f'{k} {v}' for k, v in overrides.items())})"
            if overrides
            else ""
        )
        + f"; {preset.steps} steps of batch {preset.batch_size}, {preset.seeds} seed(s), "
        f"test accuracy every {preset.eval_every} steps",
        textwrap.fill(
            "optimizees: "
            + (
                ", ".join(
                    f"{n} ({results['optimizees'][n]['parameters']:,} parameters)" for n in ready
                )
                or "none with data"
            ),
            100,
            initial_indent="  ",
            subsequent_indent="    ",
        ),
    ]
    for name in skipped:
        lines.append(f"  skipped {name}: {results['optimizees'][name]['reason']}")
    described = []
    for name in optimizers:
        record = results["optimizers"][name]
        lr = record["lr"]
        if lr == "tuned":
            detail = f"lr tuned over {', '.join(f'{v:g}' for v in preset.lr_grids[name])}"
        elif lr == "sgd":
            detail = "SGD's lr"
        elif lr is None:
            detail = "learned"
        else:
            detail = f"lr {lr:.3g}"
        if record["gradient_evaluations_per_step"] > 1:
            detail += f", {record['gradient_evaluations_per_step']} gradients/step"
        described.append(f"{name} ({detail})")
    lines.append(
        textwrap.fill(
            "optimizers: " + ", ".join(described),
            100,
            initial_indent="  ",
            subsequent_indent="    ",
        )
    )
    done = len(results["runs"])
    lines.append(
        f"  to do: {plan['tuning_count']} tuning runs and {len(plan['runs'])} runs "
        f"({done} already in {path})"
    )
    if plan["runs"] or plan["tuning_count"]:
        lines.append(
            f"  estimated time on this machine: {_duration(plan['tuning_s'] + plan['train_s'])} "
            f"(tuning {_duration(plan['tuning_s'])}, runs {_duration(plan['train_s'])}), from "
            "forward, backward and learned steps timed just now"
        )
    return "\n".join(lines)


def summarise(runs):
    """Summary over seeds of one optimizer's runs on one optimizee.

    Returns:
        A dict: ``seeds``; ``test_accuracy_mean`` and ``_std`` and ``test_loss_mean`` (at the last
        step, diverged runs included); ``final_train_loss_mean`` (mean of the last 100 steps);
        ``diverged_runs``; ``forward_backward_s``, ``step_s`` and ``iteration_s`` (medians over
        seeds of each run's median iteration, so that one run slowed by other work on the machine
        does not shift them; ``forward_backward_s`` is ``None`` where the optimizer runs the
        passes in its step); ``gradient_evaluations_per_step``;
        ``state_bytes_per_parameter``; ``hessian_top_eigenvalue_mean`` / ``_std`` and
        ``hessian_trace_mean`` / ``_std`` over the runs that did not diverge (``None`` if all did).
    """
    accuracy = [r["test_accuracy"] for r in runs]
    summary = {
        "seeds": len(runs),
        "test_accuracy_mean": statistics.fmean(accuracy),
        "test_accuracy_std": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
        "test_loss_mean": _mean([r["test_loss"] for r in runs]),
        "final_train_loss_mean": _mean([r["final_train_loss"] for r in runs]),
        "diverged_runs": sum(r["diverged"] for r in runs),
        "forward_backward_s": _median([r["time"]["forward_backward_s"] for r in runs]),
        "step_s": _median([r["time"]["step_s"] for r in runs]),
        "gradient_evaluations_per_step": runs[0]["gradient_evaluations_per_step"],
        "state_bytes_per_parameter": statistics.fmean(r["state_bytes_per_parameter"] for r in runs),
    }
    summary["iteration_s"] = summary["step_s"] + (summary["forward_backward_s"] or 0.0)
    for key in ("hessian_top_eigenvalue", "hessian_trace"):
        values = [r["sharpness"][key] for r in runs if (r["sharpness"] or {}).get(key) is not None]
        summary[f"{key}_mean"] = statistics.fmean(values) if values else None
        summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return summary


def summaries(results):
    """:func:`summarise` per optimizee and optimizer with runs: ``{optimizee: {name: ...}}``."""
    grouped = {}
    for run in results["runs"]:
        grouped.setdefault(run["optimizee"], {}).setdefault(run["optimizer"], []).append(run)
    ordered = {}
    for optimizee in results["optimizees"]:
        if optimizee in grouped:
            ordered[optimizee] = {
                name: summarise(grouped[optimizee][name])
                for name in results["optimizers"]
                if name in grouped[optimizee]
            }
    return ordered


def format_table(results):
    """The test-accuracy and cost tables of the report, for the terminal."""
    from .report import accuracy_table, cost_table

    return "\n\n".join([accuracy_table(results), cost_table(results)])


def plot(results, path):
    """Write the figure: training loss (top row) and test accuracy (bottom row) per optimizee.

    Curves are means over seeds; the training loss is further smoothed over a window of about a
    twentieth of the run. Learned optimizers are drawn solid, the baselines dashed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = {}
    for run in results["runs"]:
        grouped.setdefault(run["optimizee"], {}).setdefault(run["optimizer"], []).append(run)
    columns = [name for name in results["optimizees"] if name in grouped]
    if not columns:
        return None
    names = [name for name in results["optimizers"] if any(name in grouped[c] for c in columns)]
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors
    width = max(3.4 * len(columns), 8.0)
    fig, axes = plt.subplots(2, len(columns), figsize=(width, 6), squeeze=False)
    for column, optimizee in enumerate(columns):
        loss_ax, acc_ax = axes[0][column], axes[1][column]
        for index, name in enumerate(names):
            runs = grouped[optimizee].get(name)
            if not runs:
                continue
            style = {
                "color": colours[index % len(colours)],
                "linestyle": "-" if results["optimizers"][name]["kind"] == "learned" else "--",
                "label": name,
                "linewidth": 1.2,
            }
            window = runs[0]["train_loss_window"]
            loss = _pointwise_mean([r["train_loss"] for r in runs])
            smoothed = _smooth(loss, max(1, len(loss) // 20))
            loss_ax.plot([window * (i + 1) for i in range(len(smoothed))], smoothed, **style)
            by_step = {}
            for run in runs:
                for step, accuracy in zip(run["eval_steps"], run["eval_accuracy"]):
                    by_step.setdefault(step, []).append(100 * accuracy)
            steps = sorted(by_step)
            acc_ax.plot(
                steps,
                [statistics.fmean(by_step[s]) for s in steps],
                marker="o",
                markersize=3,
                **style,
            )
        loss_ax.set_yscale("log")
        loss_ax.set_title(optimizee, fontsize=10)
        acc_ax.set_xlabel("step")
        acc_ax.grid(alpha=0.3)
        loss_ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("training loss")
    axes[1][0].set_ylabel("test accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    columns_of_legend = min(len(labels), int(width // 2.2))
    fig.legend(handles, labels, loc="lower center", ncol=columns_of_legend, frameon=False)
    fig.tight_layout(rect=(0, 0.05 * math.ceil(len(labels) / columns_of_legend), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(results, out_dir):
    """Write ``results.json``, the figure and ``RESULTS.md`` into ``out_dir``; return the paths."""
    from .report import render_report

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / RESULTS_FILE
    _save(results, json_path)
    written = [json_path]
    figure = plot(results, out_dir / FIGURE_FILE)
    if figure is not None:
        written.append(figure)
    report_path = out_dir / REPORT_FILE
    report_path.write_text(
        render_report(results, figure.name if figure is not None else None), encoding="utf-8"
    )
    written.append(report_path)
    return written


def machine_description():
    """A short description of the machine a result was measured on."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def git_commit():
    """The checkout's commit and whether it has uncommitted changes, or ``None`` outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


# ---- the results file ----------------------------------------------------------------------


def _open_results(path, preset, records):
    settings = _json_ready({**preset.settings(), "threads": torch.get_num_threads()})
    if path.exists():
        results = json.loads(path.read_text(encoding="utf-8"))
        _check_compatible(results, settings, records, path)
    else:
        results = {
            "format": RESULTS_FORMAT,
            "preset": preset.name,
            "overrides": _overrides(preset),
            "settings": settings,
            "sessions": [],
            "optimizees": {},
            "optimizers": {},
            "tuning": {},
            "runs": [],
        }
    for name, record in records.items():
        results["optimizers"].setdefault(name, _json_ready(record))
    return results


def _check_compatible(results, settings, records, path):
    if results.get("format") != RESULTS_FORMAT:
        raise SettingsMismatchError(
            f"{path} is in results format {results.get('format')}, this harness writes format "
            f"{RESULTS_FORMAT}; pass another --out or delete the file."
        )
    differences = [
        f"{key}: {results['settings'].get(key)!r} there, {value!r} now"
        for key, value in settings.items()
        if results["settings"].get(key) != value
    ]
    for name, record in records.items():
        stored = results["optimizers"].get(name)
        if stored is None:
            continue
        for key in ("kind", "lr", "hyperparameters", "weights_sha256"):
            if stored.get(key) != _json_ready(record.get(key)):
                differences.append(
                    f"optimizer {name} {key}: {stored.get(key)!r} there, {record.get(key)!r} now"
                )
    if differences:
        raise SettingsMismatchError(
            f"{path} holds runs made with other settings ({'; '.join(differences)}). Results of "
            "different settings are never mixed: pass another --out, or delete that file to "
            "start over."
        )


def _save(results, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    results["updated"] = _now()
    # Written beside the file and renamed over it, so an interruption never leaves half a file.
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    partial.replace(path)


def _add_session(results, preset, workers=1):
    results["sessions"].append(
        {
            "started": _now(),
            "preset": preset.name,
            "workers": workers,
            "overrides": _overrides(preset),
            "git": git_commit(),
            "machine": machine_description(),
            "torch": torch.__version__,
            "flatopt": flatopt.__version__,
        }
    )


def _finished(results, optimizee, optimizer, seed):
    return any(
        r["optimizee"] == optimizee and r["optimizer"] == optimizer and r["seed"] == seed
        for r in results["runs"]
    )


def _overrides(preset):
    base = PRESETS.get(preset.name)
    if base is None:
        return {}
    return {
        field.name: _json_ready(getattr(preset, field.name))
        for field in dataclasses.fields(Preset)
        if getattr(preset, field.name) != getattr(base, field.name)
    }


# ---- optimizees and learning rates ---------------------------------------------------------


def _prepare_optimizees(names, preset, results):
    """Load the data of each optimizee; return ``{name: (test task, validation task)}``."""
    datasets, tasks = {}, {}
    for name in names:
        optimizee = OPTIMIZEES[name]
        if optimizee.dataset not in datasets:
            try:
                datasets[optimizee.dataset] = load_dataset(optimizee.dataset)
            except DatasetUnavailableError as exc:
                if optimizee.dataset != "cifar10" and os.environ.get("CI") == "true":
                    raise
                datasets[optimizee.dataset] = exc
        dataset = datasets[optimizee.dataset]
        if isinstance(dataset, DatasetUnavailableError):
            results["optimizees"][name] = {
                "dataset": optimizee.dataset,
                "description": optimizee.description,
                "status": "skipped",
                "reason": str(dataset),
            }
            continue
        test = test_task(optimizee.make_model, dataset, optimizee.model, preset.batch_size)
        validation = holdout_task(optimizee.make_model, dataset, optimizee.model, preset.batch_size)
        tasks[name] = (test, validation)
        results["optimizees"][name] = {
            "dataset": optimizee.dataset,
            "description": optimizee.description,
            "status": "ok",
            "parameters": sum(p.numel() for p in test.new_model(0).parameters()),
            "batch_norm": optimizee.batch_norm,
        }
    return tasks


def _tuning_jobs(results, tasks, records):
    """The ``(optimizee, optimizer)`` learning-rate searches still to run."""
    needed = []
    for optimizee in tasks:
        done = results["tuning"].get(optimizee, {})
        for name, record in records.items():
            tuned = name if record["lr"] == "tuned" else "sgd" if record["lr"] == "sgd" else None
            if tuned and tuned not in done and (optimizee, tuned) not in needed:
                needed.append((optimizee, tuned))
    return needed


def _tune(results, optimizee, name, tasks, preset, progress):
    grid = preset.lr_grids.get(name)
    if not grid:
        raise ValueError(f"preset {preset.name} has no learning-rate grid for {name}")
    total = len(grid) * preset.tune_seeds * preset.steps
    bar = tqdm(
        total=total,
        desc=f"tune {name} on {optimizee}",
        leave=False,
        file=sys.stderr,
        disable=not progress,
    )
    build = BASELINES[name].build

    def make_optimizer(params, lr):
        optimizer = build(params, lr)
        optimizer.register_step_post_hook(lambda *_: bar.update(1))
        return optimizer

    record = tune_learning_rate(make_optimizer, tasks[1], grid, preset.steps, preset.tune_seeds)
    bar.close()
    results["tuning"].setdefault(optimizee, {})[name] = record
    scores = ", ".join(f"lr {lr}: {100 * acc:.1f}%" for lr, acc in record["grid"].items())
    print(f"tuned {name} on {optimizee}: validation accuracy {scores}; chose lr {record['lr']:g}")


def _learning_rate(results, optimizee, name):
    lr = results["optimizers"][name]["lr"]
    if lr == "tuned":
        return results["tuning"][optimizee][name]["lr"]
    if lr == "sgd":
        return results["tuning"][optimizee]["sgd"]["lr"]
    return lr


# ---- one run -------------------------------------------------------------------------------


def _run_in_workers(arguments, preset, tasks, workers, progress, costs=None):
    """Train each ``(optimizee, optimizer, record, lr, seed)``; yield ``(index, run)`` as done.

    With one worker the runs go in order in this process. With more, each worker process loads
    the datasets once and trains whole runs, so a run's numbers do not depend on the worker
    count; only the machine's load during the timings does. Given each run's estimated cost, the
    workers take the longest runs first, so that no worker is left with a long run at the end
    while the others idle.
    """
    if workers <= 1:
        for index, (optimizee, name, record, lr, seed) in enumerate(arguments):
            yield (
                index,
                _train(tasks[optimizee], optimizee, name, record, lr, seed, preset, progress),
            )
        return
    # Spawned, not forked: a forked child of a process that already ran torch's thread pool
    # can hang in it.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_start_worker,
        initargs=(preset, sorted(tasks), torch.get_num_threads()),
    ) as pool:
        order = range(len(arguments))
        if costs is not None:
            order = sorted(order, key=lambda index: -costs[index])
        futures = {pool.submit(_worker_train, *arguments[index]): index for index in order}
        try:
            for future in concurrent.futures.as_completed(futures):
                yield futures[future], future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


_WORKER_TASKS = {}
_WORKER_PRESET = []


def _start_worker(preset, optimizees, threads):
    torch.set_num_threads(threads)
    _WORKER_PRESET.append(preset)
    scratch = {"optimizees": {}}
    _WORKER_TASKS.update(_prepare_optimizees(optimizees, preset, scratch))


def _worker_train(optimizee, name, record, lr, seed):
    preset = _WORKER_PRESET[0]
    return _train(_WORKER_TASKS[optimizee], optimizee, name, record, lr, seed, preset, False)


def _train(tasks, optimizee, name, record, lr, seed, preset, progress):
    """Train one seed of one optimizer on one optimizee and return its run record."""
    test, _ = tasks
    models = []

    def make_model():
        models.append(test.make_model())
        return models[-1]

    optimizers, timers = [], []

    def make_optimizer(params):
        if record["kind"] == "learned":
            optimizer = flatopt.LearnedOptimizer(params, name)
        else:
            optimizer = BASELINES[name].build(params, lr)
        optimizers.append(optimizer)
        timers.append(IterationTimer(models[-1], optimizer))
        return optimizer

    task = dataclasses.replace(test, make_model=make_model)
    bar = tqdm(
        total=preset.steps,
        desc=f"{optimizee} {name} seed {seed}",
        leave=False,
        file=sys.stderr,
        disable=not progress,
    )
    started = time.perf_counter()
    # Entropy-SGD's noise and the Hessian-trace probes come from torch's global generator: seed it,
    # and restore it afterwards, so that a run repeats exactly whatever ran before it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        curves = train_and_evaluate(
            task, make_optimizer, preset.steps, seed, preset.eval_every, lambda _: bar.update(1)
        )
    wall_s = time.perf_counter() - started
    bar.close()
    timers[0].remove()

    model, optimizer = models[0], optimizers[0]
    measured = None
    if not curves["diverged"]:
        images = test.train_images[: preset.sharpness_batch]
        labels = test.train_labels[: preset.sharpness_batch]
        measured = sharpness(
            model, images, labels, preset.sharpness_iterations, preset.sharpness_probes
        )
        measured = {key: _finite(value) for key, value in measured.items()}
    losses = curves["train_loss"]
    window = max(1, math.ceil(preset.steps / MAX_CURVE_POINTS))
    return {
        "optimizee": optimizee,
        "optimizer": name,
        "seed": seed,
        "lr": lr,
        "test_accuracy": curves["eval_accuracy"][-1],
        "test_loss": _finite(curves["eval_loss"][-1]),
        "final_train_loss": _finite(statistics.fmean(losses[-100:])),
        "diverged": curves["diverged"],
        "train_loss_window": window,
        "train_loss": [
            _finite(statistics.fmean(losses[i : i + window]), digits=5)
            for i in range(0, len(losses), window)
        ],
        "eval_steps": curves["eval_steps"],
        "eval_loss": [_finite(v) for v in curves["eval_loss"]],
        "eval_accuracy": curves["eval_accuracy"],
        "time": timers[0].summary(),
        "gradient_evaluations_per_step": getattr(optimizer, "gradient_evaluations_per_step", 1),
        "state_bytes_per_parameter": state_bytes_per_parameter(optimizer),
        "sharpness": measured,
        "wall_s": wall_s,
    }


# ---- the plan's time estimate --------------------------------------------------------------


def _estimate(jobs, tuning, tasks, preset, results, workers=1):
    """Estimated seconds of each run and of the tuning, from passes timed on this machine.

    ``train_s`` is the wall time of all runs spread over ``workers`` processes, assuming each has
    a core of its own; ``runs`` are the runs' own times.
    """
    if not jobs and not tuning:
        return {"runs": [], "train_s": 0.0, "tuning_s": 0.0, "tuning_count": 0}
    learned = {name for _, _, name in jobs if results["optimizers"][name]["kind"] == "learned"}
    costs = {
        optimizee: _calibrate(tasks[optimizee][0], learned, preset.batch_size)
        for optimizee in {job[0] for job in jobs} | {job[0] for job in tuning}
    }
    evaluations = len(_eval_steps(preset))
    sharpness_passes = 2 * (preset.sharpness_iterations + preset.sharpness_probes + 2)
    runs = []
    for optimizee, _, name in jobs:
        cost, record = costs[optimizee], results["optimizers"][name]
        step = record["gradient_evaluations_per_step"] * (cost["forward_backward_s"] + _OVERHEAD_S)
        step += cost["learned_step_s"].get(name, 0.0)
        runs.append(
            preset.steps * step
            + evaluations * cost["eval_s"]
            + sharpness_passes
            * cost["forward_backward_s"]
            * preset.sharpness_batch
            / preset.batch_size
        )
    tuning_count = sum(len(preset.lr_grids.get(name, ())) * preset.tune_seeds for _, name in tuning)
    tuning_s = sum(
        len(preset.lr_grids.get(name, ()))
        * preset.tune_seeds
        * (preset.steps * (costs[o]["forward_backward_s"] + _OVERHEAD_S) + costs[o]["eval_s"])
        for o, name in tuning
    )
    return {
        "runs": runs,
        "train_s": sum(runs) / max(1, workers),
        "tuning_s": tuning_s,
        "tuning_count": tuning_count,
    }


def _calibrate(task, learned, batch_size):
    """Time a forward+backward pass, a test-set evaluation and each learned step on ``task``."""
    model = task.new_model(0)
    images, labels = task.train_images[:batch_size], task.train_labels[:batch_size]

    def forward_backward():
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), labels).backward()

    forward_backward_s = _median_time(forward_backward, 3)
    sample = min(1000, len(task.eval_labels))
    with torch.no_grad():
        eval_s = _median_time(lambda: model(task.eval_images[:sample]), 1)
    learned_step_s = {}
    for name in learned:
        optimizer = flatopt.LearnedOptimizer(model.parameters(), name)
        learned_step_s[name] = _median_time(optimizer.step, 2)
    return {
        "forward_backward_s": forward_backward_s,
        "eval_s": eval_s * len(task.eval_labels) / sample,
        "learned_step_s": learned_step_s,
    }


def _median_time(function, repeats):
    function()  # warm-up: first calls allocate
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _run_line(index, total, run, started, estimated_done, estimated_total):
    elapsed = time.perf_counter() - started
    remaining = estimated_total - estimated_done
    # Scale the estimate by how far off it has been so far on this machine.
    eta = remaining * elapsed / estimated_done if estimated_done > 0 else remaining
    timing = run["time"]
    iteration_ms = 1000 * (timing["step_s"] + (timing["forward_backward_s"] or 0.0))
    status = "diverged, " if run["diverged"] else ""
    return (
        f"[{index}/{total}] {run['optimizee']} {run['optimizer']} seed {run['seed']}: "
        f"{status}test accuracy {100 * run['test_accuracy']:.2f}%, "
        f"{iteration_ms:.1f} ms/iteration, "
        f"{run['wall_s']:.1f} s; about {_duration(eta)} left"
    )


# ---- small helpers -------------------------------------------------------------------------


def _eval_steps(preset):
    steps = set(range(preset.eval_every, preset.steps + 1, preset.eval_every))
    return sorted(steps | {preset.steps})


def _meta_training_horizon(config):
    recipe = config.get("provenance", {}).get("recipe", {})
    if recipe.get("curriculum"):
        return max(recipe["curriculum"])
    if "unroll_length" in recipe and "meta_unrolls" in recipe:
        return recipe["unroll_length"] * recipe["meta_unrolls"]
    return None


def _json_ready(value):
    return json.loads(json.dumps(value))


def _finite(value, digits=None):
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}") if digits else value


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _median(values):
    """Median of the values that are not ``None``, or ``None`` if there are none."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _pointwise_mean(curves):
    means = []
    for index in range(max(len(c) for c in curves)):
        values = [c[index] for c in curves if index < len(c) and c[index] is not None]
        if not values:
            break
        means.append(statistics.fmean(values))
    return means


def _smooth(values, window):
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _duration(seconds):
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
