"""Cost of the learned optimizer's step, against Adam's and against what the machine allows.

For each parameter count, one flat parameter with a fixed random gradient is stepped by:

- Adam, torch's default implementation: the baseline of every ratio;
- the learned optimizer as it runs by default (the native kernel where it builds), with float32 and
  with bfloat16 recurrent state, and with torch operators only (its path without a C++ compiler);
- the learned optimizer through the update rule's autograd ``forward`` (the optimizer's generic
  path, used for update rules without an in-place step), and a naive reference: two
  ``torch.nn.LSTMCell`` over the whole vector, as a framework would write it. Both need gigabytes
  beyond a million parameters, so they run only up to ``naive_max_size``.

Two floors frame the learned step. The memory floor is one in-place read and write of an
``(N, 80)`` float32 tensor, the least traffic any step that updates the recurrent state must cause.
The compute floor is the step's matrix products alone, done by BLAS on chunks of
:data:`flatopt.fused_step.CPU_CHUNK` coordinates: ``[chunk, 22] x [22, 80]`` and
``[chunk, 40] x [40, 80]`` and the read-out ``[chunk, 20] x [20, 1]``.

Whole training iterations (forward, backward, step) of the models in :data:`MODELS` at batch 128,
on random inputs, put the step in context.

Times are medians over ``repeats`` rounds after one warm-up round, each round timing every
variant of a row once in turn, in one process: only their ratios carry over to other machines. See :data:`METHOD` for the memory
figures.

Two further measurements go with the table: what bfloat16 recurrent state does to test accuracy
(:func:`state_dtype_accuracy`), and the time of one unrolled optimizee step in meta-training
(:func:`meta_training_step_time`), which differentiates through the update rule's ``forward`` and
so does not use the fused step.
"""

import datetime
import statistics
import time

import torch

import flatopt
from flatopt import native_kernel
from flatopt.fused_step import CPU_CHUNK
from flatopt.update_rules import preprocess_gradient
from training.optimizees import conv_mnist, mlp, test_task, train_and_evaluate

from .run import git_commit, machine_description

ACCURACY_OPTIMIZEES = {"mlp-relu": lambda: mlp(20, "relu"), "conv-mnist": conv_mnist}

DEFAULT_SIZES = (16_000, 270_000, 1_000_000, 4_000_000)
# Above this, the forward path and the framework cells are skipped (they allocate ~1.5 KB/param).
NAIVE_MAX_SIZE = 1_000_000
BATCH_SIZE = 128
# Whole-iteration models: name -> (factory in training.optimizees, shape of one input example).
# A factory missing from the checkout is reported as skipped, not an error.
MODELS = {
    "conv-mnist": ("conv_mnist", (784,)),
    "resnet20": ("resnet20", (3, 32, 32)),
}
DEFAULT_MODELS = tuple(MODELS)
METHOD = {
    "time": (
        "median wall time over the repeats, after one warm-up call, in one process; each repeat "
        "times every variant of a row once, in turn"
    ),
    "peak_extra_memory": (
        "largest total of CPU tensor allocations alive at once during one step, beyond those "
        "alive before it, from torch.profiler.profile(profile_memory=True) after a warm-up step; "
        "the native kernel's stack (a few KB) is not seen"
    ),
    "state_memory": "bytes of optimizer state per parameter, after the warm-up step",
}
# Column of the step table -> label, in the order shown.
STEP_COLUMNS = {
    "adam": "Adam",
    "learned": "learned",
    "learned_bf16": "learned, bf16 state",
    "learned_torch": "learned, torch operators",
    "forward_path": "learned via forward",
    "framework_cells": "framework LSTM cells",
}


def interleaved_median_times(functions, repeats):
    """Median of each function's times from :func:`interleaved_samples`.

    Returns:
        Name -> median seconds.
    """
    samples = interleaved_samples(functions, repeats)
    return {name: statistics.median(values) for name, values in samples.items()}


def interleaved_samples(functions, repeats):
    """Wall times in seconds of each function over ``repeats`` rounds, after one warm-up round.

    Each round calls every function once, in the given order, so that a machine whose speed drifts
    during the measurement (other tenants, clock changes) moves all of them alike and their ratios
    less.

    Args:
        functions: Name -> callable taking no arguments.
        repeats: Rounds.

    Returns:
        Name -> list of ``repeats`` times.
    """
    for function in functions.values():
        function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
    return times


def peak_extra_bytes(function):
    """Peak bytes of CPU tensor memory that ``function()`` holds at once beyond its starting point.

    Replays the profiler's allocation and free records in time order. (The per-operator memory
    columns of ``key_averages`` cannot give a peak: they charge frees to the enclosing operator.)
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        function()
    records = [
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    running = peak = 0
    for _, change in sorted(records):
        running += change
        peak = max(peak, running)
    return peak


def step_costs(
    sizes=DEFAULT_SIZES,
    weights=None,
    repeats=5,
    seed=0,
    naive_max_size=NAIVE_MAX_SIZE,
    models=DEFAULT_MODELS,
    batch_size=BATCH_SIZE,
):
    """Measure steps for each parameter count and whole iterations for each model.

    Args:
        sizes: Parameter counts.
        weights: Learned-optimizer weights (default: the recommended bundled release).
        repeats: Timed calls per measurement.
        seed: Seed of the parameters, gradients and models.
        naive_max_size: Largest size for the forward path and the framework cells.
        models: Keys of :data:`MODELS` to time whole iterations of.
        batch_size: Examples per training iteration.

    Returns:
        A JSON-serialisable report; :func:`render_speed_markdown` turns it into Markdown.

    Raises:
        ValueError: For an unknown model name.
    """
    unknown = [name for name in models if name not in MODELS]
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {sorted(MODELS)}")
    steps = [_step_row(size, weights, repeats, seed, naive_max_size) for size in sizes]
    iterations, skipped = [], []
    for name in models:
        row = _iteration_row(name, weights, repeats, seed, batch_size)
        if isinstance(row, str):
            skipped.append({"model": name, "reason": row})
        else:
            iterations.append(row)
    return {
        "machine": {**machine_description(), "cpu_model": _cpu_model()},
        "git": git_commit(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "native_kernel": native_kernel.load() is not None,
        "native_kernel_lanes": _native_lanes(),
        "chunk": CPU_CHUNK,
        "method": METHOD,
        "steps": steps,
        "iterations": iterations,
        "skipped_models": skipped,
    }


def _step_row(size, weights, repeats, seed, naive_max_size):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(size, generator=generator)
    grad = torch.randn(size, generator=generator) * 1e-3

    def parameter():
        param = torch.nn.Parameter(values.clone())
        param.grad = grad.clone()
        return param

    steppers = {
        "adam": lambda p: torch.optim.Adam([p]),
        "learned": lambda p: flatopt.LearnedOptimizer([p], weights),
        "learned_bf16": lambda p: flatopt.LearnedOptimizer(
            [p], weights, state_dtype=torch.bfloat16
        ),
        "learned_torch": lambda p: _TorchOperatorsOnly(flatopt.LearnedOptimizer([p], weights)),
    }
    if size <= naive_max_size:
        steppers["forward_path"] = lambda p: flatopt.LearnedOptimizer([p], _forward_rule(weights))
        steppers["framework_cells"] = lambda p: _FrameworkCells(p, weights)

    row = {"parameters": size, "time_s": {}, "peak_extra_bytes": {}, "state_bytes": {}}
    steppers = {name: make(parameter()) for name, make in steppers.items()}
    timed = {name: stepper.step for name, stepper in steppers.items()}
    timed["memory_floor"] = _memory_floor(size)
    timed["compute_floor"] = _compute_floor(size)
    row["time_s"] = interleaved_median_times(timed, repeats)
    for name, stepper in steppers.items():
        row["peak_extra_bytes"][name] = peak_extra_bytes(stepper.step)
        row["state_bytes"][name] = _state_bytes(stepper)
    return row


class _TorchOperatorsOnly:
    """An optimizer stepped with the native kernel disabled."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.state = optimizer.state

    def step(self):
        with native_kernel.disabled():
            self.optimizer.step()


class _ForwardOnlyRule(flatopt.LSTMUpdateRule):
    """The same network with ``forward`` overridden, so the optimizer takes its generic path."""

    def forward(self, grad, state):
        return super().forward(grad, state)


def _forward_rule(weights):
    rule, _ = flatopt.load_release(flatopt.resolve_weights(weights or flatopt.DEFAULT_WEIGHTS))
    copy = _ForwardOnlyRule.from_config(rule.config())
    copy.load_state_dict(rule.state_dict())
    return copy


class _FrameworkCells:
    """The learned step written with ``torch.nn.LSTMCell`` over the whole vector at once."""

    def __init__(self, param, weights):
        rule, _ = flatopt.load_release(flatopt.resolve_weights(weights or flatopt.DEFAULT_WEIGHTS))
        hidden = rule.hidden_size
        self.param, self.rule = param, rule
        self.cells = [torch.nn.LSTMCell(2, hidden), torch.nn.LSTMCell(hidden, hidden)]
        with torch.no_grad():
            for cell, weight, bias in zip(
                self.cells,
                (rule.cell1_weight, rule.cell2_weight),
                (rule.cell1_bias, rule.cell2_bias),
            ):
                inputs = cell.input_size
                cell.weight_ih.copy_(weight[:, :inputs])
                cell.weight_hh.copy_(weight[:, inputs:])
                cell.bias_ih.copy_(bias)
                cell.bias_hh.zero_()
        zeros = torch.zeros(param.numel(), hidden)
        self.state = {"h1": zeros, "c1": zeros, "h2": zeros, "c2": zeros}

    @torch.no_grad()
    def step(self):
        state, rule = self.state, self.rule
        features = preprocess_gradient(self.param.grad.reshape(-1), rule.preprocess_p)
        state["h1"], state["c1"] = self.cells[0](features, (state["h1"], state["c1"]))
        state["h2"], state["c2"] = self.cells[1](state["h1"], (state["h2"], state["c2"]))
        update = torch.nn.functional.linear(state["h2"], rule.output_weight, rule.output_bias)
        self.param.add_(update.view_as(self.param) * rule.output_scale)


def _state_bytes(stepper):
    tensors = []
    for entry in stepper.state.values():
        tensors.extend(entry.values() if isinstance(entry, dict) else [entry])
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _memory_floor(size):
    """One in-place read and write of an (N, 80) float32 tensor, as a callable."""
    state = torch.zeros(size, 80)
    return lambda: state.mul_(1.0)


def _compute_floor(size):
    """The step's matrix products alone, by BLAS on chunks, as a callable."""
    chunk = min(CPU_CHUNK, size)
    cell1_input, cell2_input = torch.randn(chunk, 22), torch.randn(chunk, 40)
    cell1_weight, cell2_weight = torch.randn(80, 22), torch.randn(80, 40)
    top_hidden, output_weight = torch.randn(chunk, 20), torch.randn(1, 20)
    gates, update = torch.empty(chunk, 80), torch.empty(chunk, 1)

    def products():
        for start in range(0, size, chunk):
            n = min(chunk, size - start)
            torch.mm(cell1_input[:n], cell1_weight.t(), out=gates[:n])
            torch.mm(cell2_input[:n], cell2_weight.t(), out=gates[:n])
            torch.mm(top_hidden[:n], output_weight.t(), out=update[:n])

    return products


def _iteration_row(name, weights, repeats, seed, batch_size):
    """Time forward+backward and step of one model with Adam and the learned optimizer.

    Returns the row, or the reason the model was skipped.
    """
    from training import optimizees

    factory_name, example_shape = MODELS[name]
    factory = getattr(optimizees, factory_name, None)
    if factory is None:
        return f"training.optimizees.{factory_name} is not in this checkout"
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch_size, *example_shape, generator=generator)
    labels = torch.randint(0, 10, (batch_size,), generator=generator)
    row = {"model": name, "batch_size": batch_size}
    makers = {
        "adam": lambda params: torch.optim.Adam(params),
        "learned": lambda params: flatopt.LearnedOptimizer(params, weights),
    }
    parts = {}
    for label, make in makers.items():
        torch.manual_seed(seed)
        model = factory()
        optimizer = make(model.parameters())
        row["parameters"] = sum(p.numel() for p in model.parameters())
        parts[label] = _iteration_parts(model, optimizer, inputs, labels)
    # Rounds alternate the optimizers' iterations, so that drift in the machine's speed moves
    # both alike.
    timed = {}
    for label, (forward_backward, step) in parts.items():
        timed[f"{label}.forward_backward_s"] = forward_backward
        timed[f"{label}.step_s"] = step
    seconds = interleaved_samples(timed, repeats)
    for label in parts:
        passes, steps = seconds[f"{label}.forward_backward_s"], seconds[f"{label}.step_s"]
        row[label] = {
            "forward_backward_s": statistics.median(passes),
            "step_s": statistics.median(steps),
            "total_s": statistics.median(p + s for p, s in zip(passes, steps)),
        }
    return row


def _iteration_parts(model, optimizer, inputs, labels):
    """The two halves of a training iteration, as callables, after one warm-up iteration."""

    def forward_backward():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()

    forward_backward()
    optimizer.step()  # creates the optimizer state
    return forward_backward, optimizer.step


def state_dtype_accuracy(dataset, steps=1000, seeds=3, weights=None):
    """Test accuracy with float32 and with bfloat16 recurrent state, on the same seeds.

    Args:
        dataset: The MNIST dataset.
        steps: Optimizer steps per run.
        seeds: Runs per optimizee and state type.
        weights: Learned-optimizer weights (default: the recommended bundled release).

    Returns:
        ``[{"optimizee", "steps", "seeds", "float32": [accuracies], "bfloat16": [accuracies]}]``.
    """
    rows = []
    for name, make_model in ACCURACY_OPTIMIZEES.items():
        task = test_task(make_model, dataset, name)
        row = {"optimizee": name, "steps": steps, "seeds": seeds}
        for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):

            def make_optimizer(params, dtype=dtype):
                return flatopt.LearnedOptimizer(params, weights, state_dtype=dtype)

            row[dtype_name] = [
                train_and_evaluate(task, make_optimizer, steps, seed)["eval_accuracy"][-1]
                for seed in range(seeds)
            ]
        rows.append(row)
    return rows


def meta_training_step_time(dataset, repeats=3, unroll_length=20):
    """Seconds per optimizee step of a meta-training unroll on the MNIST MLP, backward included.

    Times the same unroll twice, from the same weights: with the update rule as meta-training runs
    it (one matrix product per LSTM cell on ``[input, hidden]``), and with the rule written with
    ``torch.nn.LSTMCell``, the framework's cells, as the reference it improves on. Meta-training
    differentiates through ``forward``; the fused in-place step is for running a trained rule only.

    Returns:
        ``{"rule_forward_s", "framework_cells_s"}``: seconds per unrolled optimizee step.
    """
    from training.meta import meta_unroll, mnist_tasks

    rule = flatopt.load_release(flatopt.DEFAULT_WEIGHTS)[0]
    task = mnist_tasks(dataset, "sigmoid", BATCH_SIZE)
    params = task.init_params(seed=0)
    size = sum(p.numel() for p in params.values())

    def unroll_with(update_rule):
        update_rule.requires_grad_(True).train()
        state = update_rule.initial_state(size)

        def unroll():
            loss, _, _, _ = meta_unroll(
                update_rule, task, params, state, torch.Generator().manual_seed(0), unroll_length
            )
            loss.backward()

        return unroll

    seconds = interleaved_median_times(
        {
            "rule_forward_s": unroll_with(rule),
            "framework_cells_s": unroll_with(_FrameworkCellsRule(rule)),
        },
        repeats,
    )
    return {name: value / unroll_length for name, value in seconds.items()}


class _FrameworkCellsRule(flatopt.LSTMUpdateRule):
    """An update rule's network with its cells as ``torch.nn.LSTMCell``, differentiable."""

    def __init__(self, rule):
        super().__init__(rule.hidden_size, rule.preprocess_p, rule.output_scale)
        self.load_state_dict(rule.state_dict())
        hidden = rule.hidden_size
        self.cells = torch.nn.ModuleList(
            [torch.nn.LSTMCell(2, hidden), torch.nn.LSTMCell(hidden, hidden)]
        )
        with torch.no_grad():
            for cell, weight, bias in zip(
                self.cells,
                (rule.cell1_weight, rule.cell2_weight),
                (rule.cell1_bias, rule.cell2_bias),
            ):
                cell.weight_ih.copy_(weight[:, : cell.input_size])
                cell.weight_hh.copy_(weight[:, cell.input_size :])
                cell.bias_ih.copy_(bias)
                cell.bias_hh.zero_()

    def forward(self, grad, state):
        h1, c1, h2, c2 = state.split(self.hidden_size, dim=1)
        features = preprocess_gradient(grad, self.preprocess_p)
        h1, c1 = self.cells[0](features, (h1, c1))
        h2, c2 = self.cells[1](h1, (h2, c2))
        update = torch.nn.functional.linear(h2, self.output_weight, self.output_bias).squeeze(1)
        return update * self.output_scale, torch.cat([h1, c1, h2, c2], dim=1)


def render_speed_markdown(report):
    """Render a :func:`step_costs` report as Markdown.

    Sections: setup, step times, ratios, memory and training iterations.

    Args:
        report: The dictionary returned by :func:`step_costs` (or read back from its JSON).

    Returns:
        The Markdown text.
    """
    machine = report["machine"]
    lanes = report.get("native_kernel_lanes")
    native = "yes" if report["native_kernel"] else "no"
    if report["native_kernel"] and lanes:
        native += f", {lanes} coordinates per SIMD vector"
    cpu = machine.get("cpu_model") or machine.get("processor")
    lines = [
        "# Cost of the learned optimizer's step",
        "",
        (
            f"Measured on {cpu} ({machine.get('cpu_count')} logical CPUs, "
            f"{machine.get('platform')}), torch {report['torch']}, {report['threads']} torch "
            f"thread(s), on {report.get('date', 'an unrecorded date')}"
            f"{_commit_text(report.get('git'))}. Times are medians of {report['repeats']} rounds "
            "after a warm-up round; each round times every variant of a row once, in turn. "
            f"Native kernel: {native}; torch-operator chunk: {report['chunk']:,} coordinates."
        ),
        *(["", f"Command: `{report['command']}`"] if report.get("command") else []),
        "",
        "## Step time (ms)",
        "",
        *_step_time_table(report["steps"]),
        "",
        (
            "The memory floor is one in-place read and write of the (N, 80) float32 state; the "
            "compute floor is the step's matrix products alone, by BLAS in chunks."
        ),
        "",
        "## Learned step relative to",
        "",
        *_ratio_table(report["steps"]),
        "",
        "## Memory",
        "",
        *_memory_table(report["steps"]),
        "",
        f"Peak extra memory: {report['method']['peak_extra_memory']}.",
    ]
    if report["iterations"] or report.get("skipped_models"):
        lines += ["", "## Training iterations (ms)", "", *_iteration_table(report)]
    if report.get("state_dtype_accuracy"):
        lines += [
            "",
            "## bfloat16 recurrent state",
            "",
            *_dtype_table(report["state_dtype_accuracy"]),
        ]
    meta = report.get("meta_training_step")
    if meta is not None:
        lines += [
            "",
            "## Meta-training",
            "",
            (
                f"One unrolled optimizee step of meta-training on the MNIST MLP (784-20-10, batch "
                f"{BATCH_SIZE}): optimizee forward and backward, update rule, and its share of the "
                "meta-backward through the unroll, from the same weights:"
            ),
            "",
            "| update rule written as | ms per unrolled step |",
            "|---|---|",
            f"| `torch.nn.LSTMCell` (framework cells) | {_milliseconds(meta['framework_cells_s'])} |",
            f"| one product per cell (flatopt) | {_milliseconds(meta['rule_forward_s'])} |",
            "",
            (
                f"Speed-up: {_ratio(meta['framework_cells_s'], meta['rule_forward_s'])}. "
                "Meta-training differentiates through the update rule's `forward`; the fused "
                "in-place step, which has no backward, serves trained rules only."
            ),
        ]
    return "\n".join(lines) + "\n"


def _native_lanes():
    kernel = native_kernel.load()
    return kernel.lanes() if kernel is not None else None


def _cpu_model():
    """The processor's model name on Linux (platform.processor() is often just the architecture)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _commit_text(git):
    if not git or not git.get("commit"):
        return ""
    return f", commit {git['commit'][:10]}{' with uncommitted changes' if git['dirty'] else ''}"


def _dtype_table(rows):
    lines = [
        "| optimizee | steps | seeds | float32 state | bfloat16 state | difference (points) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        f32, bf16 = row["float32"], row["bfloat16"]
        difference = 100 * (statistics.fmean(bf16) - statistics.fmean(f32))
        lines.append(
            f"| {row['optimizee']} | {row['steps']} | {row['seeds']} | {_accuracy(f32)} | "
            f"{_accuracy(bf16)} | {difference:+.2f} |"
        )
    return lines


def _accuracy(values):
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.2f}% ± {100 * spread:.2f}"


def _milliseconds(seconds):
    if seconds is None:
        return "–"
    return f"{1000 * seconds:.2f}" if seconds < 0.01 else f"{1000 * seconds:.1f}"


def _ratio(numerator, denominator):
    if numerator is None or denominator is None or denominator <= 0:
        return "–"
    value = numerator / denominator
    return f"{value:.2f}x" if value < 10 else f"{value:.0f}x"


def _bytes(count):
    if count is None:
        return "–"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def _step_time_table(rows):
    columns = {**STEP_COLUMNS, "memory_floor": "memory floor", "compute_floor": "compute floor"}
    lines = [
        "| parameters | " + " | ".join(columns.values()) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for row in rows:
        times = row["time_s"]
        cells = [_milliseconds(times.get(key)) for key in columns]
        lines.append(f"| {row['parameters']:,} | " + " | ".join(cells) + " |")
    return lines


def _ratio_table(rows):
    lines = [
        (
            "| parameters | x Adam | x memory floor | x compute floor | bf16 state x float32 "
            "| torch operators x native | speed-up over forward path "
            "| speed-up over framework cells |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        times = row["time_s"]
        learned = times.get("learned")
        cells = [
            _ratio(learned, times.get("adam")),
            _ratio(learned, times.get("memory_floor")),
            _ratio(learned, times.get("compute_floor")),
            _ratio(times.get("learned_bf16"), learned),
            _ratio(times.get("learned_torch"), learned),
            _ratio(times.get("forward_path"), learned),
            _ratio(times.get("framework_cells"), learned),
        ]
        lines.append(f"| {row['parameters']:,} | " + " | ".join(cells) + " |")
    return lines


def _memory_table(rows):
    state_columns = ("adam", "learned", "learned_bf16", "framework_cells")
    peak_columns = tuple(STEP_COLUMNS)
    lines = [
        "| parameters | "
        + " | ".join(f"state per parameter: {STEP_COLUMNS[name]}" for name in state_columns)
        + " | "
        + " | ".join(f"peak extra in a step: {STEP_COLUMNS[name]}" for name in peak_columns)
        + " |",
        "|---" * (1 + len(state_columns) + len(peak_columns)) + "|",
    ]
    for row in rows:
        size = row["parameters"]
        states = [row["state_bytes"].get(name) for name in state_columns]
        cells = ["–" if state is None else f"{state / size:.0f} B" for state in states]
        cells += [_bytes(row["peak_extra_bytes"].get(name)) for name in peak_columns]
        lines.append(f"| {size:,} | " + " | ".join(cells) + " |")
    return lines


def _iteration_table(report):
    lines = [
        (
            "| model | parameters | batch | Adam: forward+backward | Adam: step | Adam: total "
            "| learned: forward+backward | learned: step | learned: total | learned / Adam |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["iterations"]:
        adam, learned = row["adam"], row["learned"]
        cells = [
            f"{row['parameters']:,}",
            str(row["batch_size"]),
            *(_milliseconds(adam[key]) for key in ("forward_backward_s", "step_s", "total_s")),
            *(_milliseconds(learned[key]) for key in ("forward_backward_s", "step_s", "total_s")),
            _ratio(learned["total_s"], adam["total_s"]),
        ]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    for skipped in report.get("skipped_models", []):
        lines.append(f"| {skipped['model']} | skipped: {skipped['reason']} |" + " |" * 8)
    return lines
