"""Command line: ``python -m training COMMAND [options]`` (``--help`` lists the commands).

``data`` fetches and verifies the real datasets; ``train`` meta-trains an update rule (resuming from
the output folder's checkpoint if there is one) and exports it as a release; ``calibrate`` chooses
an exported release's step scale afterwards, as ``train --step-scales`` does at a run's end.
``train`` and ``lambda-search`` also run under ``torchrun``, one process per CPU share or GPU;
process 0 writes every file and prints.
"""

import argparse
import dataclasses
import json
import pathlib
import shlex
import sys

import torch

from . import distributed
from .data import load_dataset
from .evaluation import evaluate_releases, render
from .flatness import REGULARIZERS
from .hub import push_command
from .meta import (
    ARCHITECTURES,
    META_OBJECTIVES,
    META_OPTIMIZERS,
    OPTIMIZEES,
    UNROLL_LENGTHS,
    MetaTrainer,
    Recipe,
    calibration_scores,
    lambda_search,
)
from .optimizees import ACTIVATIONS
from .plots import plot_log
from .release import calibrate_release, describe, evaluate_release, export_release, git_commit

# Recipe settings with a fixed set of values, offered as choices by --help.
RECIPE_CHOICES = {
    "architecture": ARCHITECTURES,
    "optimizee": OPTIMIZEES,
    "meta_optimizer": META_OPTIMIZERS,
    "meta_objective": META_OBJECTIVES,
    "unroll_lengths": UNROLL_LENGTHS,
    "meta_activation": sorted(ACTIVATIONS),
    "regularizer": ["none", *REGULARIZERS],
}


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    try:
        _run(parser, argv)
    except KeyboardInterrupt:
        parser.exit(
            130, "\ninterrupted; rerun the same command to resume from the last checkpoint\n"
        )
    except (ValueError, OSError) as exc:  # bad settings, names, files, or data that cannot be had
        parser.exit(2, f"error: {exc}\n")


def _run(parser, argv):
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="fetch and verify the real datasets")
    data.add_argument("names", nargs="*", default=["mnist", "fashion-mnist"])

    train = commands.add_parser("train", help="meta-train an update rule and export a release")
    train.add_argument("--name", default="dm", help="release name (default: dm)")
    train.add_argument(
        "--out", default=None, help="run folder for checkpoints and logs (default: runs/NAME)"
    )
    train.add_argument(
        "--export", default=None, help="release folder to write (default: flatopt/pretrained/NAME)"
    )
    train.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    train.add_argument(
        "--eval-seeds", type=int, default=3, help="seeds of the release's evaluation"
    )
    train.add_argument(
        "--eval-steps",
        type=positive_int,
        default=1000,
        help="optimizee steps of each run of the release's evaluation (default: 1000)",
    )

    search = commands.add_parser("lambda-search", help="compare regularizer weights from one start")
    search.add_argument("--lambdas", type=float, nargs="+", required=True)
    search.add_argument("--out", required=True, help="folder for the runs and lambda_search.json")
    search.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    for command in (train, search):
        command.add_argument(
            "--device",
            default="cpu",
            help="cpu or cuda; under torchrun, cuda is each process's GPU of LOCAL_RANK (default: cpu)",
        )

    calibrate = commands.add_parser(
        "calibrate",
        help="choose an exported release's step scale on its meta-training optimizee's held-out "
        "images, as train --step-scales does at the end of a run",
    )
    calibrate.add_argument("release", help="release folder, or name in flatopt/pretrained")
    calibrate.add_argument(
        "--step-scales", type=float, nargs="+", required=True, help="factors to try, e.g. 1 0.7 0.5"
    )
    calibrate.add_argument(
        "--calibration-steps",
        type=int,
        default=0,
        help="optimizee steps of each validation run (default, or 0: the run's final validation "
        "horizon)",
    )
    calibrate.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    calibrate.add_argument("--eval-seeds", type=positive_int, default=3)
    calibrate.add_argument("--eval-steps", type=positive_int, default=1000)

    plot = commands.add_parser("plot", help="plot meta-training logs into one PNG")
    plot.add_argument("logs", nargs="+", help="log.jsonl files of the runs to compare")
    plot.add_argument("--out", required=True, help="PNG file to write")

    push = commands.add_parser("push", help="publish a release on the Hugging Face Hub")
    push.add_argument("release", help="bundled release name or release folder")
    push.add_argument("--repo-id", required=True, help="Hub model repository, owner/name")
    push.add_argument("--revision", default="main", help="branch to commit to (default: main)")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument(
        "--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)"
    )
    push.add_argument("--message", default=None, help="commit message")
    push.add_argument(
        "--dry-run", metavar="DIR", default=None, help="write the files to DIR, upload nothing"
    )

    evaluation = commands.add_parser(
        "evaluate", help="compare releases and tuned Adam; rewrite model cards and README table"
    )
    evaluation.add_argument("names", nargs="*", help="release names, or adam (tuned)")
    evaluation.add_argument("--steps", type=positive_int, nargs="+", default=[1000, 3000])
    evaluation.add_argument("--seeds", type=positive_int, default=3)
    evaluation.add_argument("--results", default="training/results/releases.json")
    evaluation.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    evaluation.add_argument(
        "--render-only", action="store_true", help="only rewrite the documents from --results"
    )

    for command in (train, search):
        for recipe_field in dataclasses.fields(Recipe):
            flag = f"--{recipe_field.name.replace('_', '-')}"
            if recipe_field.name in RECIPE_CHOICES:
                command.add_argument(flag, choices=RECIPE_CHOICES[recipe_field.name], default=None)
            elif recipe_field.type in (int, float, str):
                command.add_argument(flag, type=recipe_field.type, default=None)
            elif recipe_field.type is list:
                element = {
                    "curriculum": int,
                    "stage_imitation_probabilities": float,
                    "step_scales": float,
                }.get(recipe_field.name, str)
                command.add_argument(flag, type=element, nargs="*", default=None)
    args = parser.parse_args(argv)

    if args.command == "data":
        for name in args.names:
            dataset = load_dataset(name)
            print(
                f"{name}: {len(dataset.train_labels)} training and {len(dataset.test_labels)} test images, verified"
            )
        return

    if args.command == "plot":
        print(f"wrote {plot_log(args.logs, args.out)}")
        return

    if args.command == "push":
        push_command(
            args.release,
            args.repo_id,
            dry_run=args.dry_run,
            revision=args.revision,
            private=args.private,
            token=args.token,
            message=args.message,
        )
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "evaluate":
        _evaluate(args)
        return
    if args.command == "calibrate":
        folder = pathlib.Path(args.release)
        if folder.is_file():  # a release's config.json or model.safetensors names its folder
            folder = folder.parent
        elif not folder.is_dir():
            folder = pathlib.Path(__file__).resolve().parent.parent / "flatopt/pretrained" / folder
        calibration = calibrate_release(
            folder,
            args.step_scales,
            args.calibration_steps,
            load_dataset("mnist"),
            "python -m training " + shlex.join(sys.argv[1:] if argv is None else argv),
            args.eval_steps,
            args.eval_seeds,
        )
        scores = calibration_scores(calibration)
        print(f"validation loss after {calibration['steps']} steps by factor: {scores}")
        print(f"kept {calibration['chosen']:g}; rewrote {folder}")
        return
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Recipe)
        if getattr(args, f.name, None) is not None
    }
    recipe = Recipe(**overrides)
    dataset = load_dataset("mnist")

    try:
        _train(args, argv, recipe, dataset)
    finally:
        distributed.leave()


def _train(args, argv, recipe, dataset):
    if args.command == "lambda-search":
        results = lambda_search(recipe, dataset, args.lambdas, args.out, device=args.device)
        if results is None:
            return  # another process prints the table
        print(f"\n{'lambda':>10}  {'grad ratio':>10}  {'regularizer':>11}  validation loss")
        for r in results:
            ratio = "n/a" if r["grad_ratio"] is None else f"{r['grad_ratio']:.3g}"
            value = "n/a" if r["regularizer_value"] is None else f"{r['regularizer_value']:.3g}"
            print(
                f"{r['lambda']:>10g}  {ratio:>10}  {value:>11}  {r['best_validation']['loss']:.4f}"
            )
        print(f"wrote {args.out}/lambda_search.json")
        return

    trainer = MetaTrainer(
        recipe, dataset, args.out or f"runs/{args.name}", commit=git_commit(), device=args.device
    )
    best = trainer.run()
    rule, calibration = trainer.calibrated_update_rule()
    if not trainer.processes.is_main:
        return  # process 0 evaluates and exports the release
    print(f"best validation: {best}")

    print(f"evaluating on the MNIST test set over {args.eval_seeds} seeds ...", flush=True)
    evaluation = evaluate_release(rule, dataset, steps=args.eval_steps, seeds=args.eval_seeds)
    for task, result in evaluation.items():
        print(
            f"  {task}: {100 * result['test_accuracy_mean']:.2f}% ± {100 * result['test_accuracy_std']:.2f}"
        )
    folder = export_release(
        rule,
        args.export or f"flatopt/pretrained/{args.name}",
        args.name,
        dataclasses.asdict(recipe),
        "python -m training " + shlex.join(sys.argv[1:] if argv is None else argv),
        trainer.commit,
        trainer.elapsed,
        {**best, "phase": trainer.best_phase()},
        evaluation,
        describe(args.name, dataclasses.asdict(recipe)),
        calibration,
    )
    print(f"exported {folder}")


def _evaluate(args):
    results_path = pathlib.Path(args.results)
    root = pathlib.Path(__file__).resolve().parent.parent
    if args.render_only:
        if not results_path.exists():
            raise FileNotFoundError(f"no results file {results_path}; run without --render-only")
        results = json.loads(results_path.read_text(encoding="utf-8"))
    else:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results = evaluate_releases(
            args.names,
            load_dataset("mnist"),
            results_path,
            tuple(args.steps),
            args.seeds,
            release_root=root / "flatopt" / "pretrained",
        )
    render(results, root / "README.md", root / "flatopt" / "pretrained", root / "training" / "logs")
    print(f"wrote {results_path}, the README's release table and the model cards")


if __name__ == "__main__":
    main()
