"""Turn a meta-trained update rule into a release: weights, config with provenance, model card."""

import datetime
import json
import pathlib
import platform
import statistics
import subprocess

import torch

import flatopt

from .optimizees import mlp, test_task, train_and_evaluate

LICENSE = "MIT"
EVALUATION_OPTIMIZEES = {"mlp-relu": "relu", "mlp-sigmoid": "sigmoid"}


def evaluate_release(update_rule, dataset, steps=1000, seeds=3):
    """Train the MNIST MLPs with the update rule and report final test accuracy over seeds.

    Returns:
        ``{optimizee: {"steps", "seeds", "test_accuracy_mean", "test_accuracy_std",
        "test_accuracies"}}``.
    """
    results = {}
    for name, activation in EVALUATION_OPTIMIZEES.items():
        task = test_task(lambda a=activation: mlp(20, a), dataset, name)
        accuracies = []
        for seed in range(seeds):
            curves = train_and_evaluate(
                task, lambda p: flatopt.LearnedOptimizer(p, update_rule), steps, seed
            )
            accuracies.append(curves["eval_accuracy"][-1])
        results[f"{dataset.name}-{name}"] = {
            "steps": steps,
            "seeds": seeds,
            "test_accuracy_mean": statistics.fmean(accuracies),
            "test_accuracy_std": statistics.stdev(accuracies) if seeds > 1 else 0.0,
            "test_accuracies": accuracies,
        }
    return results


def export_release(
    update_rule,
    folder,
    name,
    recipe,
    command,
    commit,
    wall_time_s,
    validation,
    evaluation,
    description,
):
    """Write the release folder: ``model.safetensors``, ``config.json`` and ``README.md``.

    Args:
        update_rule: The trained update rule.
        folder: Destination folder.
        name: Release name.
        recipe: The :class:`training.meta.Recipe` as a dict.
        command: The command line that reproduces the run.
        commit: The code's commit when meta-training started (see :func:`git_commit`).
        wall_time_s: Meta-training wall time in seconds.
        validation: The best validation record.
        evaluation: Output of :func:`evaluate_release`.
        description: One paragraph saying what this release is.
    """
    provenance = {
        "command": command,
        "recipe": recipe,
        "seed": recipe["seed"],
        "commit": commit,
        "meta_training_wall_time_s": round(wall_time_s, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "best_validation": validation,
    }
    folder = flatopt.save_release(
        update_rule,
        folder,
        name=name,
        description=description,
        license=LICENSE,
        provenance=provenance,
        evaluation=evaluation,
    )
    (folder / "README.md").write_text(
        model_card(name, description, update_rule.config(), provenance, evaluation),
        encoding="utf-8",
    )
    return folder


def model_card(name, description, architecture, provenance, evaluation):
    """The release's model card, in Markdown."""
    rows = "\n".join(
        f"| {task} | {r['steps']} | {r['seeds']} | {100 * r['test_accuracy_mean']:.2f}% "
        f"± {100 * r['test_accuracy_std']:.2f} |"
        for task, r in evaluation.items()
    )
    recipe = "\n".join(f"- `{k}`: `{json.dumps(v)}`" for k, v in provenance["recipe"].items())
    best = provenance["best_validation"]
    total_epochs = provenance["recipe"]["imitation_epochs"] + provenance["recipe"]["meta_epochs"]
    preprocess = architecture["preprocess"]
    return f"""# flatopt release `{name}`

{description}

Use it with `flatopt.LearnedOptimizer(model.parameters(), "{name}")`.

## Architecture
Coordinate-wise {architecture['num_layers']}-layer LSTM ({architecture['architecture']}) with
{architecture['hidden_size']} units per layer, gradient preprocessing `{preprocess['kind']}` with
p = {preprocess['p']}, output scale {architecture['output_scale']}.

## Evaluation (test accuracy after training fresh models with this optimizer alone)
| optimizee | steps | seeds | test accuracy (mean ± std) |
|---|---|---|---|
{rows}

## How it was made
- Command: `{provenance['command']}`
- Commit: `{provenance['commit']}`
- Meta-training wall time: {provenance['meta_training_wall_time_s']} s on {provenance['machine']},
  torch {provenance['torch']}, {provenance['date']}
- Selected checkpoint: epoch {best['epoch']} of {total_epochs}, from the {best['phase']} phase, with
  the lowest validation loss ({best['loss']:.4f}, accuracy {100 * best['accuracy']:.2f}%) on 10,000
  images held out of the MNIST training set after {best.get('steps', provenance['recipe']['validation_steps'])}
  optimizee steps.

Recipe:
{recipe}

## License
{LICENSE}, like the flatopt code.

## Limits
Meta-trained on small MNIST MLPs only; how far it carries to other models is measured by the
benchmarks, not promised here.
"""


def git_commit():
    """The checkout's commit, marked when tracked files had uncommitted changes; or ``"unknown"``."""
    try:
        root = pathlib.Path(__file__).resolve().parent.parent
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return commit + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
