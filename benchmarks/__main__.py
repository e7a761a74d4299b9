"""Command line: ``python -m benchmarks {run,speed} [options]``."""

import argparse
import json
import pathlib
import sys

import torch
from tqdm import tqdm

import flatopt

from .run import OPTIMIZEES, format_table, run_benchmark, write_outputs
from .speed import DEFAULT_SIZES, format_speed_table, step_costs


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    try:
        _run(parser, argv)
    except KeyboardInterrupt:
        parser.exit(130, "\ninterrupted\n")
    except (ValueError, OSError) as exc:  # unknown optimizer names, missing data or weights
        parser.exit(2, f"error: {exc}\n")


def _run(parser, argv):
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train meta-test optimizees with several optimizers")
    run.add_argument(
        "--optimizers",
        nargs="+",
        default=None,
        help="sgd, adam and/or learned-optimizer weights (default: sgd, adam and every "
        "bundled release)",
    )
    run.add_argument("--optimizee", default="mlp-relu", choices=sorted(OPTIMIZEES))
    run.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    run.add_argument("--steps", type=positive_int, default=1000)
    run.add_argument("--seeds", type=positive_int, default=3)
    run.add_argument("--eval-every", type=positive_int, default=100)
    run.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)"
    )
    run.add_argument("--out", default="results", help="folder for the JSON and PNG outputs")
    speed = commands.add_parser("speed", help="time the learned optimizer's step against Adam's")
    speed.add_argument("--sizes", type=positive_int, nargs="+", default=list(DEFAULT_SIZES))
    speed.add_argument("--repeats", type=positive_int, default=5)
    speed.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)"
    )
    speed.add_argument("--out", default="results", help="folder for speed.json")
    args = parser.parse_args(argv)

    if args.command == "speed":
        if args.threads:
            torch.set_num_threads(args.threads)
        report = step_costs(args.sizes, repeats=args.repeats)
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "speed.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(format_speed_table(report))
        print(f"\nwrote {out / 'speed.json'}")
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    optimizers = args.optimizers or ["sgd", "adam", *flatopt.list_pretrained()]

    def progress(description, total):
        bar = tqdm(total=total, desc=f"{description:>16}", leave=False, file=sys.stderr)
        return lambda step: (bar.update(1), bar.close() if step == total else None)

    report = run_benchmark(
        optimizers, args.optimizee, args.dataset, args.steps, args.seeds, args.eval_every, progress
    )
    json_path, png_path = write_outputs(report, args.out)
    print(format_table(report))
    print(f"\nwrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
