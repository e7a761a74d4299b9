"""Plots of meta-training logs (``log.jsonl``), several runs on one figure for comparison.

One PNG, one panel per quantity, epochs along the shared x axis and one colour per run:

- the meta-training loss of each epoch; imitation epochs are drawn hollow, since their loss is the
  relative error against Adam's steps rather than an optimizee loss;
- the validation loss, with each run's best point starred, the start of each curriculum stage as a
  vertical line labelled by its horizon (its baseline score as a cross) and the stage decisions;
- when a run has a flatness regularizer: its value, and its share of the meta-gradient,
  ``|grad lambda R| / |grad L|``, on a log scale.

The x coordinate of an epoch is the number of epochs finished with it (``epoch + 1``), the
numbering of the trainer's progress lines and of ``best_epoch``.
"""

import json
import math
import pathlib

PANEL_INCHES = (10.0, 3.0)  # width and height of one panel
DPI = 100
# Legends right of their panel, where no curve can hide under them.
OUTSIDE_LEGEND = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": "small"}

# Required fields of the two kinds of record; anything else in a record is optional.
EPOCH_FIELDS = ("epoch", "phase", "loss")
STAGE_START_FIELDS = ("stage", "horizon")


def plot_log(log_paths, out_path):
    """Plot one or more meta-training logs into one PNG.

    Args:
        log_paths: Paths of ``log.jsonl`` files; each run is labelled by its folder's name (by the
            file's own name for a log not called ``log.jsonl``).
        out_path: The PNG to write (its folder is created).

    Returns:
        ``out_path`` as a ``pathlib.Path``.

    Raises:
        OSError: If a log cannot be read.
        ValueError: If a log is empty or has a line that is not a log record; the message names the
            file and the line.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    if not log_paths:
        raise ValueError("no training logs to plot")
    paths = [pathlib.Path(p) for p in log_paths]
    runs = [(name, read_log(path)) for name, path in zip(_run_names(paths), paths)]
    regularized = any("regularizer_value" in r for _, (epochs, _) in runs for r in epochs)

    panels = 4 if regularized else 2
    figure = Figure(figsize=(PANEL_INCHES[0], PANEL_INCHES[1] * panels), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    # Fixed margins rather than a constrained layout: the legends beside the panels are taller
    # than a panel when many runs are compared, and a layout engine would squash the panels.
    figure.subplots_adjust(left=0.1, right=0.74, top=0.96, bottom=0.06, hspace=0.3)

    for index, (name, (epochs, events)) in enumerate(runs):
        colour = f"C{index % 10}"
        _plot_loss(axes[0], epochs, name, colour)
        _plot_validation(axes[1], epochs, events, colour)
        if regularized:
            _plot_regularizer(axes[2], axes[3], epochs, colour)

    axes[0].set_title("meta-training loss per epoch")
    axes[0].set_ylabel("loss")
    axes[0].set_yscale("log")
    phases = [
        Line2D([], [], color="grey", marker="o", markerfacecolor="white", label="imitation epoch"),
        Line2D([], [], color="grey", marker="o", label="meta-training epoch"),
    ]
    run_lines = axes[0].get_legend_handles_labels()[0]
    axes[0].legend(handles=[*run_lines, *phases], **OUTSIDE_LEGEND)
    marks = [
        Line2D([], [], color="grey", marker="*", markersize=12, linestyle="none", label="best"),
        Line2D([], [], color="grey", linestyle="--", label="stage start (horizon)"),
        Line2D([], [], color="grey", marker="x", linestyle="none", label="its baseline"),
        Line2D([], [], color="grey", linestyle=":", label="stage decision"),
        Line2D([], [], color="grey", marker="^", linestyle="none", label="diverged"),
    ]
    axes[1].legend(handles=marks, **OUTSIDE_LEGEND)
    axes[1].set_title("validation loss")
    axes[1].set_ylabel("loss")
    if regularized:
        names = sorted(
            {r["regularizer"] for _, (epochs, _) in runs for r in epochs if "regularizer" in r}
        )
        axes[2].set_title(f"regularizer value ({', '.join(names)})")
        axes[2].set_ylabel("value")
        axes[3].set_title("regularizer's share of the meta-gradient")
        axes[3].set_ylabel("|grad lambda R| / |grad L|")
        axes[3].set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("epochs finished")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))

    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=DPI)
    return out_path


def read_log(path):
    """Read a meta-training log into its epoch records and its events, in order.

    A last line without its newline is being written by a running trainer and is skipped if it
    does not parse yet; any other bad line is an error.

    Args:
        path: The ``log.jsonl`` file.

    Returns:
        ``(epochs, events)``: the epoch records, and the event records, each event with an added
        ``"x"``: the number of epochs finished when it happened.

    Raises:
        OSError: If the file cannot be read.
        ValueError: If a line is not a log record, or the log has no epoch record.
    """
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OSError(f"cannot read the training log {path}: {exc.strerror or exc}") from exc

    lines = data.split(b"\n")
    epochs, events = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:  # not JSON, or not UTF-8
            if number == len(lines):  # only a file not ending in a newline gets here
                continue
            if isinstance(exc, json.JSONDecodeError):
                problem = f"{exc.msg} at column {exc.colno}"
            else:
                problem = "not UTF-8 text"
            raise ValueError(
                f"{path}, line {number}: not a JSON record ({problem}); expected a meta-training "
                "log.jsonl"
            ) from None
        if isinstance(record, dict) and all(k in record for k in EPOCH_FIELDS):
            epochs.append(record)
        elif isinstance(record, dict) and "event" in record:
            if record["event"] == "stage start" and not all(
                k in record for k in STAGE_START_FIELDS
            ):
                raise ValueError(
                    f"{path}, line {number}: a stage start without "
                    f"{', '.join(k for k in STAGE_START_FIELDS if k not in record)}"
                )
            events.append({**record, "x": len(epochs)})
        else:
            raise ValueError(
                f"{path}, line {number}: neither an epoch record (with "
                f"{', '.join(EPOCH_FIELDS)}) nor an event; expected a meta-training log.jsonl"
            )
    if not epochs:
        raise ValueError(f"{path} has no epoch record yet; nothing to plot")
    return epochs, events


def _run_names(paths):
    names = [p.parent.name if p.name == "log.jsonl" else p.stem for p in paths]
    # Folder names tell runs apart in a lambda search, but not two runs named alike elsewhere.
    if len(set(names)) < len(names):
        return [str(p) for p in paths]
    return names


def _plot_loss(ax, epochs, name, colour):
    x = [r["epoch"] + 1 for r in epochs]
    ax.plot(x, [r["loss"] for r in epochs], color=colour, linewidth=1, label=name)
    for phase, face in (("imitation", "white"), ("meta", colour)):
        chosen = [r for r in epochs if r["phase"] == phase]
        ax.plot(
            [r["epoch"] + 1 for r in chosen],
            [r["loss"] for r in chosen],
            linestyle="none",
            marker="o",
            markersize=4,
            color=colour,
            markerfacecolor=face,
        )


def _plot_validation(ax, epochs, events, colour):
    validated = [r for r in epochs if "validation" in r]
    points = {r["epoch"] + 1: r["validation"]["loss"] for r in validated}
    finite = {x: loss for x, loss in points.items() if math.isfinite(loss)}
    ax.plot(list(finite), list(finite.values()), color=colour, marker=".", linewidth=1)
    # A diverged validation scores inf: a mark on the top edge rather than a stretched axis.
    diverged = [x for x, loss in points.items() if not math.isfinite(loss)]
    ax.plot(
        diverged,
        [1.0] * len(diverged),
        color=colour,
        linestyle="none",
        marker="^",
        transform=ax.get_xaxis_transform(),
        clip_on=False,
    )

    for event in events:
        if event["event"] != "stage start":
            continue
        ax.axvline(event["x"], color=colour, linestyle="--", linewidth=1, alpha=0.6)
        _label_line(ax, event["x"], 0.98, f"horizon {event['horizon']}", "top", colour)
        baseline = (event.get("baseline") or {}).get("loss")
        if baseline is not None and math.isfinite(baseline):
            points.setdefault(event["x"], baseline)
            ax.plot(event["x"], baseline, color=colour, marker="x", markersize=7)

    for record in validated:
        decision = record["validation"].get("decision")
        if decision is not None:
            x = record["epoch"] + 1
            ax.axvline(x, color=colour, linestyle=":", linewidth=1.5)
            # "stage improved; advancing to stage 1": the part after the semicolon is the action.
            _label_line(ax, x, 0.02, decision.split("; ")[-1], "bottom", colour)

    # The run's best is the last validation's best_epoch; its score is logged at that epoch or,
    # for a stage's starting weights, as the stage's baseline.
    best_epoch = validated[-1]["validation"].get("best_epoch") if validated else None
    best = points.get(best_epoch)
    if best is not None and math.isfinite(best):
        ax.plot(best_epoch, best, color=colour, marker="*", markersize=14, markeredgecolor="black")


def _label_line(ax, x, y, text, end, colour):
    """Write ``text`` along the vertical line at ``x``, from height ``y`` (axes fraction)."""
    label = ax.text(
        x,
        y,
        f" {text} ",
        transform=ax.get_xaxis_transform(),
        rotation=90,
        verticalalignment=end,
        fontsize="x-small",
        color=colour,
        clip_on=True,
    )
    # A long label would otherwise make the constrained layout shrink every panel to fit it.
    label.set_in_layout(False)


def _plot_regularizer(value_ax, share_ax, epochs, colour):
    regularized = [r for r in epochs if "regularizer_value" in r and "regularizer_grad_ratio" in r]
    if not regularized:
        return
    x = [r["epoch"] + 1 for r in regularized]
    values = [r["regularizer_value"] for r in regularized]
    value_ax.plot(x, values, color=colour, marker=".", linewidth=1)
    # A Hutchinson trace estimate can be negative, which a log scale would drop.
    if all(v > 0 for v in values) and value_ax.get_yscale() != "symlog":
        value_ax.set_yscale("log")
    else:
        value_ax.set_yscale("symlog")
    share_ax.plot(
        x, [r["regularizer_grad_ratio"] for r in regularized], color=colour, marker=".", linewidth=1
    )
