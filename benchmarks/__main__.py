"""Command line: ``python -m benchmarks run [options]``."""

import argparse
import sys

import torch
from tqdm import tqdm

import flatopt

from .run import OPTIMIZEES, format_table, run_benchmark, write_outputs


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
    run.add_argument("--optimizers", nargs="+", default=None,
                     help="sgd, adam and/or learned-optimizer weights (default: sgd, adam and every "
                          "bundled release)")
    run.add_argument("--optimizee", default="mlp-relu", choices=sorted(OPTIMIZEES))
    run.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    run.add_argument("--steps", type=positive_int, default=1000)
    run.add_argument("--seeds", type=positive_int, default=3)
    run.add_argument("--eval-every", type=positive_int, default=100)
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    run.add_argument("--out", default="results", help="folder for the JSON and PNG outputs")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    optimizers = args.optimizers or ["sgd", "adam", *flatopt.list_pretrained()]

    def progress(description, total):
        bar = tqdm(total=total, desc=f"{description:>16}", leave=False, file=sys.stderr)
        return lambda step: (bar.update(1), bar.close() if step == total else None)

    report = run_benchmark(optimizers, args.optimizee, args.dataset, args.steps, args.seeds,
                           args.eval_every, progress)
    json_path, png_path = write_outputs(report, args.out)
    print(format_table(report))
    print(f"\nwrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
