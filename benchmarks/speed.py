"""Cost of one optimizer step: the learned optimizer against Adam, measured in one run.

Each size is a single flat parameter with a fixed random gradient; both optimizers are warmed up,
then timed over several steps. Times depend on the machine, so the table reports ratios measured
side by side, never absolute targets.
"""

import statistics
import time

import torch

import flatopt

from .run import machine_description

DEFAULT_SIZES = (16_000, 270_000, 1_000_000)


def time_steps(optimizer, repeats):
    """Median wall time of ``optimizer.step()`` over ``repeats`` calls, after one warm-up step."""
    optimizer.step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def step_costs(sizes=DEFAULT_SIZES, weights=None, repeats=5, seed=0):
    """Time the learned step and Adam's step for each parameter count.

    Returns:
        A JSON-serialisable dict with the machine and, per size, both times and their ratio.
    """
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for size in sizes:
        param = torch.nn.Parameter(torch.randn(size, generator=generator))
        param.grad = torch.randn(size, generator=generator) * 1e-3
        adam = time_steps(torch.optim.Adam([param]), repeats)
        learned = time_steps(flatopt.LearnedOptimizer([param], weights), repeats)
        rows.append(
            {"parameters": size, "adam_s": adam, "learned_s": learned, "ratio": learned / adam}
        )
    return {
        "machine": machine_description(),
        "torch": torch.__version__,
        "repeats": repeats,
        "rows": rows,
    }


def format_speed_table(report):
    """Render :func:`step_costs` as a Markdown table."""
    lines = ["| parameters | Adam step (ms) | learned step (ms) | ratio |", "|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(
            f"| {row['parameters']:,} | {1000 * row['adam_s']:.2f} | {1000 * row['learned_s']:.1f} "
            f"| {row['ratio']:.0f}x |"
        )
    return "\n".join(lines)
