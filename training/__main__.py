"""Command line: ``python -m training {data,train} [options]``.

``data`` fetches and verifies the real datasets; ``train`` meta-trains an update rule (resuming from
the output folder's checkpoint if there is one) and exports it as a release.
"""

import argparse
import dataclasses
import shlex
import sys

import torch

from .data import load_dataset
from .meta import MetaTrainer, Recipe
from .release import evaluate_release, export_release, git_commit

DESCRIPTIONS = {
    "dm": "L2O-DM: the coordinate-wise two-layer LSTM optimizer, warm-started by imitating Adam and "
          "then meta-trained on the unrolled training loss of an MNIST MLP, without flatness "
          "regularization. The release is the checkpoint with the best validation loss, from "
          "whichever phase produced it (see below).",
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="fetch and verify the real datasets")
    data.add_argument("names", nargs="*", default=["mnist", "fashion-mnist"])

    train = commands.add_parser("train", help="meta-train an update rule and export a release")
    train.add_argument("--name", default="dm", help="release name (default: dm)")
    train.add_argument("--out", default=None, help="run folder for checkpoints and logs (default: runs/NAME)")
    train.add_argument("--export", default=None, help="release folder to write (default: flatopt/pretrained/NAME)")
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    train.add_argument("--eval-seeds", type=int, default=3, help="seeds of the release's evaluation")
    for recipe_field in dataclasses.fields(Recipe):
        if recipe_field.type in (int, float, str):
            train.add_argument(f"--{recipe_field.name.replace('_', '-')}", type=recipe_field.type, default=None)
    args = parser.parse_args(argv)

    if args.command == "data":
        for name in args.names:
            dataset = load_dataset(name)
            print(f"{name}: {len(dataset.train_labels)} training and {len(dataset.test_labels)} test images, verified")
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)
                 if getattr(args, f.name, None) is not None}
    recipe = Recipe(**overrides)
    dataset = load_dataset("mnist")
    trainer = MetaTrainer(recipe, dataset, args.out or f"runs/{args.name}", commit=git_commit())
    best = trainer.run()
    print(f"best validation: {best}")

    rule = trainer.best_update_rule()
    print(f"evaluating on the MNIST test set over {args.eval_seeds} seeds ...", flush=True)
    evaluation = evaluate_release(rule, dataset, seeds=args.eval_seeds)
    for task, result in evaluation.items():
        print(f"  {task}: {100 * result['test_accuracy_mean']:.2f}% ± {100 * result['test_accuracy_std']:.2f}")
    folder = export_release(
        rule, args.export or f"flatopt/pretrained/{args.name}", args.name, dataclasses.asdict(recipe),
        "python -m training " + shlex.join(sys.argv[1:] if argv is None else argv), trainer.commit,
        trainer.elapsed, {**best, "phase": trainer.best_phase()}, evaluation, DESCRIPTIONS.get(args.name, f"flatopt release {args.name}."),
    )
    print(f"exported {folder}")


if __name__ == "__main__":
    main()
