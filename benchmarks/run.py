"""Meta-test benchmark: train unseen optimizees with classic and learned optimizers on real data.

Each (optimizee, optimizer, seed) run trains a fresh model for a fixed number of steps, recording the
training loss at every step and the test loss and accuracy at regular intervals. Results go to a
JSON file, a PNG figure (a loss row over an accuracy row) and a printed table.
"""

import json
import pathlib
import platform
import statistics
import time

import torch

import flatopt
from training.data import load_dataset
from training.optimizees import conv_mnist, mlp, test_task, train_and_evaluate

# Baseline learning rates: standard values for these models. Recorded in every result file.
BASELINES = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
}
BASELINE_SETTINGS = {"sgd": {"lr": 0.1}, "adam": {"lr": 1e-3}}

OPTIMIZEES = {
    "mlp-relu": lambda: mlp(20, "relu"),
    "mlp-sigmoid": lambda: mlp(20, "sigmoid"),
    "conv-mnist": conv_mnist,
}


def make_optimizer_factory(name):
    """Return ``params -> optimizer`` for a baseline name or a learned-optimizer weights name."""
    if name in BASELINES:
        return BASELINES[name]
    flatopt.resolve_weights(name)  # fail before any training if the name is wrong
    return lambda params: flatopt.LearnedOptimizer(params, name)


def run_benchmark(
    optimizers,
    optimizee="mlp-relu",
    dataset="mnist",
    steps=1000,
    seeds=3,
    eval_every=100,
    progress=None,
):
    """Train ``optimizee`` with each optimizer for each seed and summarise.

    Args:
        optimizers: Names: ``"sgd"``, ``"adam"``, or learned-optimizer weights.
        optimizee: Key of :data:`OPTIMIZEES`.
        dataset: ``"mnist"`` or ``"fashion-mnist"``.
        steps: Optimizer steps per run.
        seeds: Runs per optimizer, with seeds ``0 .. seeds - 1``.
        eval_every: Steps between test-set evaluations.
        progress: Optional callable ``(description, total_steps) -> step callback``.

    Returns:
        A JSON-serialisable dict: settings, machine, and per optimizer the runs and a summary.
    """
    factories = {name: make_optimizer_factory(name) for name in optimizers}
    task = test_task(OPTIMIZEES[optimizee], load_dataset(dataset), optimizee)
    results = {}
    for name, factory in factories.items():
        runs = []
        for seed in range(seeds):
            on_step = progress(f"{name} seed {seed}", steps) if progress else None
            started = time.perf_counter()
            curves = train_and_evaluate(task, factory, steps, seed, eval_every, on_step)
            curves["seed"] = seed
            curves["wall_s"] = time.perf_counter() - started
            runs.append(curves)
        results[name] = {"runs": runs, "summary": summarise(runs)}
    return {
        "optimizee": optimizee,
        "dataset": dataset,
        "steps": steps,
        "seeds": seeds,
        "batch_size": task.batch_size,
        "baseline_settings": {k: v for k, v in BASELINE_SETTINGS.items() if k in factories},
        "machine": machine_description(),
        "torch": torch.__version__,
        "flatopt": flatopt.__version__,
        "results": results,
    }


def summarise(runs):
    """Mean and standard deviation over seeds of the final test accuracy and losses."""
    accuracy = [r["eval_accuracy"][-1] for r in runs]
    test_loss = [r["eval_loss"][-1] for r in runs]
    # Mean training loss over the last 100 steps: a single minibatch's loss is too noisy.
    train_loss = [statistics.fmean(r["train_loss"][-100:]) for r in runs]
    return {
        "test_accuracy_mean": statistics.fmean(accuracy),
        "test_accuracy_std": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
        "test_loss_mean": statistics.fmean(test_loss),
        "final_train_loss_mean": statistics.fmean(train_loss),
        "diverged_runs": sum(r["diverged"] for r in runs),
        "wall_s_per_step": statistics.fmean(r["wall_s"] / len(r["train_loss"]) for r in runs),
    }


def machine_description():
    """A short description of the machine a result was measured on."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def format_table(report):
    """Render the summary as a Markdown table."""
    lines = [
        f"{report['dataset']} {report['optimizee']}, {report['steps']} steps, batch "
        f"{report['batch_size']}, {report['seeds']} seeds",
        "",
        "| optimizer | test accuracy (mean ± std) | test loss | train loss (last 100 steps) | diverged | ms/step |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in report["results"].items():
        s = result["summary"]
        lines.append(
            f"| {name} | {100 * s['test_accuracy_mean']:.2f}% ± {100 * s['test_accuracy_std']:.2f} "
            f"| {s['test_loss_mean']:.4f} | {s['final_train_loss_mean']:.4f} | {s['diverged_runs']} "
            f"| {1000 * s['wall_s_per_step']:.1f} |"
        )
    return "\n".join(lines)


def plot(report, path):
    """Write the training-loss curves (top) and test-accuracy curves (bottom) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(2, 1, figsize=(6, 7), sharex=True)
    for name, result in report["results"].items():
        runs = result["runs"]
        length = min(len(r["train_loss"]) for r in runs)
        mean_loss = [statistics.fmean(r["train_loss"][i] for r in runs) for i in range(length)]
        loss_ax.plot(range(1, length + 1), _smooth(mean_loss, 20), label=name)
        steps = runs[0]["eval_steps"]
        accuracy = [
            statistics.fmean(r["eval_accuracy"][i] for r in runs) for i in range(len(steps))
        ]
        acc_ax.plot(steps, [100 * a for a in accuracy], marker="o", markersize=3, label=name)
    loss_ax.set_yscale("log")
    loss_ax.set_ylabel("training loss (mean over seeds, smoothed)")
    loss_ax.set_title(f"{report['dataset']} {report['optimizee']}")
    loss_ax.legend()
    acc_ax.set_xlabel("step")
    acc_ax.set_ylabel("test accuracy (%)")
    acc_ax.set_ylim(bottom=max(0.0, acc_ax.get_ylim()[0]))
    acc_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report, out_dir):
    """Write ``<dataset>-<optimizee>.json`` and ``.png`` into ``out_dir``; return their paths."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{report['dataset']}-{report['optimizee']}"
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    json_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    plot(report, png_path)
    return json_path, png_path


def _smooth(values, window):
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
