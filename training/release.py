"""Turn a meta-trained update rule into a release: weights, config with provenance, model card."""

import dataclasses
import datetime
import json
import pathlib
import platform
import statistics
import subprocess

import torch

import flatopt

from .meta import (
    Recipe,
    calibrate_step_scale,
    calibration_record,
    calibration_scores,
    final_validation_steps,
    mnist_tasks,
    validation_seeds,
)
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


REGULARIZER_PHRASES = {
    "hessian-trace": "the Hessian trace of the optimizee's loss (Hutchinson's estimator, {reg_probes} "
    "Rademacher probes)",
    "hessian-ev": "the Hessian eigenvalue of largest magnitude of the optimizee's loss (power "
    "iteration, {reg_iterations} iterations)",
    "jacobian-trace": "the Jacobian trace of the optimizee's loss (its squared gradient norm)",
    "entropy": "the negative local entropy of the optimizee's loss (Entropy-SGD's, through a "
    "surrogate whose gradient is gamma (theta - mu), mu the mean of a {entropy_steps}-step Langevin "
    "chain; gamma = {entropy_gamma:g})",
}


OPTIMIZEE_PHRASES = {
    "mlp": "an MNIST 784-20({meta_activation})-10 MLP",
    "scale-cnn": "L2O-Scale's small MNIST convnet (conv 8 3x3, conv 8 5x5, linear; ReLU)",
}
META_OPTIMIZER_NAMES = {"adam": "Adam", "rmsprop": "RMSProp"}
META_OBJECTIVE_PHRASES = {
    "mean-loss": "the mean optimizee loss",
    "log-loss-ratio": "the mean log ratio of the optimizee loss to its initial value",
}


def describe(name, recipe):
    """One paragraph saying what the release ``name`` meta-trained with ``recipe`` (a dict) is."""
    if recipe.get("architecture", "lstm") == "scale":
        return _describe_scale(recipe)
    if name == "dm":
        return (
            "L2O-DM: the coordinate-wise two-layer LSTM optimizer, warm-started by imitating Adam "
            "and then meta-trained on the unrolled training loss of an MNIST MLP, without flatness "
            "regularization. The release is the checkpoint with the best validation loss, from "
            "whichever phase produced it (see below)."
        )
    if not recipe["curriculum"]:
        return f"flatopt release {name}."
    start = f"the `{recipe['init_weights']}` release" if recipe["init_weights"] else "scratch"
    text = (
        "L2O-DM-CL: the coordinate-wise two-layer LSTM optimizer, meta-trained from "
        f"{start} with a curriculum of growing unrolled horizons "
        f"({', '.join(str(h) for h in recipe['curriculum'])} optimizee steps of an MNIST "
        f"784-20({recipe['meta_activation']})-10 MLP), each stage validated at the next horizon, "
        "and epochs of imitating Adam mixed in"
    )
    return text + _regularization_sentence(recipe, "the LSTM's weights")


def _describe_scale(recipe):
    # Settings added to the recipe after a release was made count as their defaults.
    recipe = {**dataclasses.asdict(Recipe()), **recipe}
    start = f"the `{recipe['init_weights']}` release" if recipe["init_weights"] else "scratch"
    optimizee = OPTIMIZEE_PHRASES[recipe["optimizee"]].format(**recipe)
    if recipe["unroll_lengths"] == "exponential":
        lengths = (
            f"{recipe['min_unroll_length']} steps plus an exponentially distributed number, "
            f"{recipe['unroll_length']} on average"
        )
    else:
        lengths = f"{recipe['unroll_length']} steps"
    text = (
        "L2O-Scale: the hierarchical RNN optimizer (per-parameter, per-tensor and global GRUs; "
        f"Wichrowska et al. 2017), meta-trained from {start} on {optimizee}. The meta-loss is "
        f"{META_OBJECTIVE_PHRASES[recipe['meta_objective']]} over truncated unrolls ({lengths}), "
        f"minimised by {META_OPTIMIZER_NAMES[recipe['meta_optimizer']]}"
    )
    if recipe["imitation_epochs"]:
        text += f" after {recipe['imitation_epochs']} epoch(s) of imitating Adam"
    if recipe["curriculum"]:
        text += (
            ", with a curriculum of growing horizons "
            f"({', '.join(str(h) for h in recipe['curriculum'])} optimizee steps)"
        )
    return text + _regularization_sentence(recipe, "the RNNs' weights")


def _regularization_sentence(recipe, weights):
    """How the recipe's flatness regularizer enters the meta-loss, ending a description."""
    if recipe["regularizer"] == "none":
        return ", without flatness regularization."
    phrase = REGULARIZER_PHRASES[recipe["regularizer"]].format(**recipe)
    return (
        f". At the end of every truncated unroll, {phrase}, taken at the parameters the update "
        f"rule produced, is added to the meta-loss with weight lambda = "
        f"{recipe['reg_lambda']:g} and differentiated back into {weights}."
    )


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
    calibration=None,
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
        calibration: The step-scale calibration record (see
            :func:`training.meta.calibration_record`), or ``None``.
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
    if calibration is not None:
        provenance["step_scale_calibration"] = calibration
    return _write_release(update_rule, folder, name, description, provenance, evaluation)


def calibrate_release(folder, factors, steps, dataset, command, eval_steps=1000, eval_seeds=3):
    """Choose an exported release's step scale and rewrite the release with it.

    The same calibration as ``train --step-scales`` at the end of a run, for a release exported
    without it: the release's own recipe gives the optimizee, validation seeds and horizon.
    The release's evaluation and model card are redone; its provenance keeps the original
    command and records this one.

    Args:
        folder: The release folder, rewritten in place.
        factors: Factors tried on the read-out scale.
        steps: Optimizee steps of each validation run; 0 for the recipe's final validation
            horizon.
        dataset: The MNIST dataset.
        command: This calibration's command line, recorded.
        eval_steps: Optimizee steps of the release's evaluation.
        eval_seeds: Seeds of the release's evaluation.

    Returns:
        The calibration record.

    Raises:
        ValueError: If the release records no recipe, was calibrated already, or the factors
            are not positive.
    """
    folder = pathlib.Path(folder)
    update_rule, config = flatopt.load_release(folder)
    provenance = config.get("provenance") or {}
    if "recipe" not in provenance:
        raise ValueError(f"{folder} records no meta-training recipe to calibrate with")
    missing = [key for key in ("name", "description") if not isinstance(config.get(key), str)]
    if missing:
        raise ValueError(f"{folder}/config.json lacks the release's {' and '.join(missing)}")
    if "step_scale_calibration" in provenance:
        raise ValueError(
            f"{folder} was calibrated already (factor "
            f"{provenance['step_scale_calibration']['chosen']:g}); calibrate the uncalibrated "
            "release instead of compounding factors"
        )
    unknown = set(provenance["recipe"]) - {f.name for f in dataclasses.fields(Recipe)}
    if unknown:
        raise ValueError(
            f"{folder}'s recipe has settings this trainer does not know ({sorted(unknown)}); "
            "calibrate it with the flatopt version that made it"
        )
    recipe = Recipe(
        **{**provenance["recipe"], "step_scales": list(factors), "calibration_steps": steps}
    )
    task = mnist_tasks(
        dataset, recipe.meta_activation, recipe.batch_size, optimizee=recipe.optimizee
    )
    steps = steps or final_validation_steps(recipe)
    seeds = validation_seeds(recipe)
    rule, records = calibrate_step_scale(update_rule, task, steps, seeds, recipe.step_scales)
    calibration = {**calibration_record(rule, records, task, steps, seeds), "command": command}
    provenance = {
        **provenance,
        "recipe": dataclasses.asdict(recipe),
        "step_scale_calibration": {**calibration, "date": datetime.date.today().isoformat()},
    }
    evaluation = evaluate_release(rule, dataset, steps=eval_steps, seeds=eval_seeds)
    _write_release(rule, folder, config["name"], config["description"], provenance, evaluation)
    return calibration


def _write_release(update_rule, folder, name, description, provenance, evaluation):
    # The model card is written beside its final name first, so that a failure (a full disk)
    # leaves the old release whole rather than new weights with an old card.
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    card = folder / "README.md.tmp"
    card.write_text(
        model_card(name, description, update_rule.config(), provenance, evaluation),
        encoding="utf-8",
    )
    folder = flatopt.save_release(
        update_rule,
        folder,
        name=name,
        description=description,
        license=LICENSE,
        provenance=provenance,
        evaluation=evaluation,
    )
    card.replace(folder / "README.md")
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
    optimizee = provenance["recipe"].get("optimizee", "mlp")
    trained_on = "small MNIST MLPs" if optimizee == "mlp" else "L2O-Scale's small MNIST convnet"
    return f"""# flatopt release `{name}`

{description}

Use it with `flatopt.LearnedOptimizer(model.parameters(), "{name}")`.

## Architecture
{_architecture_lines(architecture)}

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
{_calibration_lines(provenance.get("step_scale_calibration"))}
Recipe:
{recipe}

## License
{LICENSE}, like the flatopt code.

## Limits
Meta-trained on {trained_on} only; how far it carries to other models is measured by the
benchmarks, not promised here.
"""


def _architecture_lines(architecture):
    if architecture["architecture"] == "scale":
        sizes = architecture["hidden_sizes"]
        return (
            f"Hierarchical RNN (scale): GRUs of {sizes[0]} units per parameter, {sizes[1]} per "
            f"tensor and {sizes[2]} for the whole model;\n{architecture['num_timescales']} "
            f"gradient timescales, initial log step size {architecture['initial_log_lr']:.4g} (a "
            "coordinate's step is exp(log step size + a learned offset))."
        )
    preprocess = architecture["preprocess"]
    return (
        f"Coordinate-wise {architecture['num_layers']}-layer LSTM ({architecture['architecture']}) "
        f"with\n{architecture['hidden_size']} units per layer, gradient preprocessing "
        f"`{preprocess['kind']}` with\np = {preprocess['p']}, output scale "
        f"{architecture['output_scale']}."
    )


def _calibration_lines(calibration):
    if calibration is None:
        return ""
    scores = calibration_scores(calibration)
    if "output_scale" in calibration:
        what = "the read-out scale was"
        setting = f"output scale {calibration['output_scale']:g}"
    else:
        what = "the step size was"
        setting = f"step-size offset {calibration['step_size_offset']:.4g}"
    lines = (
        f"- Step scale: {what} multiplied by {calibration['chosen']:g} ({setting}), "
        f"the factor with the lowest validation loss of "
        f"{calibration['optimizee']} after {calibration['steps']} steps on the same held-out "
        f"images, over {len(calibration['seeds'])} seeds (loss by factor: {scores})."
    )
    if "command" in calibration:
        lines += f"\n- Calibrated afterwards by: `{calibration['command']}`"
    return lines + "\n"


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
