"""Command line: ``python -m benchmarks {run,report,speed} [options]``.

commands:
  run      train the benchmark's optimizees with every optimizer, then write results.json, a
           figure (results.png) and a report (RESULTS.md); an interrupted run resumes where it
           stopped. Without --preset it runs `quick`. `run --help` has the options.
  report   regenerate the Markdown report from a results.json.
  speed    time the learned optimizer's step against Adam's.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import shlex
import sys
import textwrap

import torch

import flatopt
from training.data import DatasetUnavailableError, load_dataset

from .presets import DEFAULT_PRESET, PRESETS
from .report import write_report
from .run import (
    BASELINES,
    OPTIMIZEES,
    default_optimizers,
    format_table,
    optimizer_record,
    run_benchmark,
)
from .speed import (
    DEFAULT_MODELS,
    DEFAULT_SIZES,
    MODELS,
    NAIVE_MAX_SIZE,
    meta_training_step_time,
    render_speed_markdown,
    state_dtype_accuracy,
    step_costs,
)


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        epilog=_catalogue(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    try:
        _run(parser, argv)
    except KeyboardInterrupt:
        parser.exit(130, "\ninterrupted\n")
    # Unknown names, settings that clash with earlier results, missing data or weights.
    except (ValueError, OSError, DatasetUnavailableError) as exc:
        parser.exit(2, f"error: {exc}\n")


def _run(parser, argv):
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="train the optimizees with every optimizer; write results, figure and report",
        description="Train each optimizee with each optimizer for each seed, recording loss and "
        "accuracy curves, time per iteration, optimizer memory, sharpness and divergence. Every "
        "finished run is saved at once: rerunning the same command skips the runs already in "
        "the results file, and a results file is never extended with other settings.",
        epilog=_catalogue(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=DEFAULT_PRESET,
        help=f"what to run (default: {DEFAULT_PRESET}; see below)",
    )
    run.add_argument("--steps", type=positive_int, help="override the preset's steps per run")
    run.add_argument("--seeds", type=positive_int, help="override the preset's number of seeds")
    run.add_argument(
        "--optimizers",
        nargs="+",
        metavar="NAME",
        help="optimizers to run (default: all of them, every bundled learned optimizer included); "
        "learned-optimizer weights may also be a release folder or a Hub id",
    )
    run.add_argument(
        "--optimizees",
        nargs="+",
        metavar="NAME",
        help="optimizees to train (default: the preset's)",
    )
    run.add_argument(
        "--out",
        help="folder for results.json, results.png and RESULTS.md (default: results/PRESET); "
        "runs already in its results.json are skipped",
    )
    run.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)"
    )
    run.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="runs trained at once, each in its own process (default: the preset's, at most the "
        "machine's cores); with more than one, each gets one torch thread unless --threads says",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan and its estimated time on this machine, then stop",
    )
    report = commands.add_parser(
        "report",
        help="regenerate RESULTS.md from a results.json",
        description="Write the Markdown report (accuracy, time, cost, sharpness, divergence, "
        "learning-rate and limits sections) of a results file, linking the figure beside it.",
    )
    report.add_argument("results", help="a results.json written by `run`")
    report.add_argument("--out", help="the report's path (default: RESULTS.md beside the results)")
    speed = commands.add_parser(
        "speed",
        help="time the learned optimizer's step against Adam's",
        description="Time the learned step against Adam, the memory and compute floors and a "
        "naive reference for each parameter count, and whole training iterations of small "
        "models; write speed.json and SPEED.md.",
    )
    speed.add_argument("--sizes", type=positive_int, nargs="+", default=list(DEFAULT_SIZES))
    speed.add_argument("--repeats", type=positive_int, default=5)
    speed.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)"
    )
    speed.add_argument(
        "--models",
        nargs="*",
        choices=sorted(MODELS),
        default=list(DEFAULT_MODELS),
        help="models to time whole training iterations of (none: skip)",
    )
    speed.add_argument(
        "--naive-max-size",
        type=positive_int,
        default=NAIVE_MAX_SIZE,
        help="largest size for the forward path and the framework LSTM cells (they need "
        "about 1.5 KB per parameter)",
    )
    speed.add_argument(
        "--accuracy-steps",
        type=int,
        default=1000,
        help="steps of the float32-against-bfloat16-state accuracy runs on MNIST (0: skip)",
    )
    speed.add_argument("--accuracy-seeds", type=positive_int, default=3)
    speed.add_argument(
        "--meta",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time an unrolled meta-training step on the MNIST MLP",
    )
    speed.add_argument(
        "--out",
        default="results",
        help="folder for speed.json and SPEED.md (benchmarks: the committed ones)",
    )
    args = parser.parse_args(argv)

    if args.command == "speed":
        if args.threads:
            torch.set_num_threads(args.threads)
        report = step_costs(
            args.sizes,
            repeats=args.repeats,
            naive_max_size=args.naive_max_size,
            models=args.models,
        )
        given = sys.argv[1:] if argv is None else argv
        report["command"] = shlex.join(["python", "-m", "benchmarks", *given])
        if args.accuracy_steps > 0 or args.meta:
            dataset = load_dataset("mnist")
        if args.accuracy_steps > 0:
            report["state_dtype_accuracy"] = state_dtype_accuracy(
                dataset, args.accuracy_steps, args.accuracy_seeds
            )
        if args.meta:
            report["meta_training_step"] = meta_training_step_time(dataset)
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        markdown = render_speed_markdown(report)
        (out / "speed.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        (out / "SPEED.md").write_text(markdown, encoding="utf-8")
        print(markdown)
        print(f"wrote {out / 'speed.json'} and {out / 'SPEED.md'}")
        return

    if args.command == "report":
        print(f"wrote {write_report(args.results, args.out)}")
        return

    overrides = {"steps": args.steps, "seeds": args.seeds}
    preset = dataclasses.replace(
        PRESETS[args.preset], **{key: value for key, value in overrides.items() if value}
    )
    workers = args.workers or min(preset.workers, os.cpu_count() or 1)
    if args.threads or workers > 1:
        torch.set_num_threads(args.threads or 1)
    out = args.out or pathlib.Path("results") / preset.name
    results = run_benchmark(
        preset, out, args.optimizers, args.optimizees, args.dry_run, workers=workers
    )
    if not args.dry_run and results["runs"]:
        print()
        print(format_table(results))


def _catalogue():
    """The presets, optimizees and optimizers, for the help texts."""
    lines = ["presets:"]
    lines += [_entry(name, preset.summary) for name, preset in PRESETS.items()]
    lines += ["", "optimizees (`fashion-mnist/MODEL` is an MNIST model on Fashion-MNIST):"]
    lines += [_entry(name, optimizee.description) for name, optimizee in OPTIMIZEES.items()]
    lines += ["", "optimizers (default: all of them):"]
    learned = flatopt.list_pretrained()
    for name in default_optimizers():
        if name in BASELINES:
            text = BASELINES[name].description
            if BASELINES[name].lr == "tuned":
                text += "; lr tuned per optimizee on a validation split"
        else:
            horizon = optimizer_record(name)["meta_training_horizon"]
            text = "learned optimizer bundled with flatopt, at its defaults" + (
                f"; meta-trained on horizons up to {horizon} steps" if horizon else ""
            )
        lines.append(_entry(name, text))
    if not learned:
        lines.append("  (no learned optimizer is bundled with the installed flatopt)")
    lines += [
        "",
        "CIFAR-10 optimizees are skipped, and the skip recorded, where CIFAR-10 is absent (see",
        "training.data.load_cifar10); so are MNIST ones without MNIST, except under CI=true.",
    ]
    return "\n".join(lines)


def _entry(name, text, width=100, indent=24):
    """``name`` and its description as an indented, wrapped help entry."""
    head = f"  {name}"
    body = textwrap.fill(text, width, initial_indent=" " * indent, subsequent_indent=" " * indent)
    if len(head) < indent:
        return head.ljust(indent) + body[indent:]
    return head + "\n" + body


if __name__ == "__main__":
    main()
