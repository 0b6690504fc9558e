"""Pictures of a stabilizer (needs matplotlib: the ``plot`` extra).

``plot(monitor)`` draws a whole run recorded by :class:`~optax_gradflow.Monitor`;
``plot(opt_state)`` the recent window the state itself keeps (the last
``event_history_size`` steps). matplotlib is imported on the first call only,
so that the rest of the library does not depend on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from optax_gradflow.monitor import Interval, Monitor
from optax_gradflow.report import StabilityReport, stability_reports
from optax_gradflow.state import (
    FLAG_ADAPTED,
    FLAG_CLIPPED,
    FLAG_EMERGENCY,
    FLAG_EXPLOSION,
    FLAG_NONFINITE,
    FLAG_VANISHING,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_EXCLUDED = FLAG_EXPLOSION | FLAG_NONFINITE  # steps that push no norm (SPEC.md, step 6)
_THRESHOLD_PUSH = FLAG_ADAPTED | FLAG_EMERGENCY


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(
            "optax_gradflow.plot needs matplotlib; install it with "
            "`pip install 'optax-gradflow[plot]'`."
        ) from err
    return plt


def norm_steps(report: StabilityReport) -> list[int]:
    """The step of each ``norm_history`` entry, oldest first.

    In the event window each step without explosion or non-finite norm pushed
    exactly one norm, so the newest entries get their exact steps. Older
    entries are placed one per step before the window: exact unless a step
    before the window was excluded from the history.
    """
    steps: list[int] = []
    remaining = len(report.norm_history)
    for offset in range(report.window_steps - 1, -1, -1):
        if remaining == 0:
            break
        if not report.event_flags[offset] & _EXCLUDED:
            steps.append(report.window_start_step + offset)
            remaining -= 1
    steps.extend(report.window_start_step - 1 - j for j in range(remaining))
    return steps[::-1]


def threshold_path(report: StabilityReport, start: int) -> tuple[list[int], list[float]]:
    """A step function (``where="post"``) of the threshold from ``start`` to the last step.

    Pushes in the event window line up with the newest entries of the
    threshold history; a threshold set by step ``k`` is used from ``k + 1``.
    """
    pushes = [
        report.window_start_step + offset
        for offset, f in enumerate(report.event_flags)
        if f & _THRESHOLD_PUSH
    ]
    history = list(report.threshold_history)
    pushes = pushes[len(pushes) - min(len(pushes), len(history)) :]
    values = history[len(history) - len(pushes) :]
    before = history[len(history) - len(pushes) - 1] if len(history) > len(pushes) else None
    first = before if before is not None else (values[0] if values else report.clip_threshold)
    xs, ys = [start], [first]
    for step, value in zip(pushes, values, strict=True):
        xs.append(step + 1)
        ys.append(value)
    xs.append(max(report.step, start))
    ys.append(ys[-1])
    return xs, ys


def plot(source: Any, ax: Any = None) -> Figure:
    """Draws a stabilizer's gradient norms, threshold, events and loss scale.

    Given a :class:`~optax_gradflow.Monitor`, the whole run it recorded, with
    the step on every x axis and one column per stabilizer (e.g. one per
    sub-tree under ``optax.partition``). Rows: the norm band (median and
    maximum of each interval's norms) with the clip threshold as a step line;
    the clipped, exploding, skipped (non-finite) and emergency steps of each
    interval; the loss scale; the loss (``value=`` given to update). No device
    read: the monitor holds host values.

    Given an optimizer state holding one stabilizer, a PyTorch
    ``GradientFlowStabilizer`` (its report) or a :class:`StabilityReport`,
    the recent window only (the last
    ``event_history_size`` steps the state keeps): the norm history against
    the step, the clip threshold as a step line, clipped steps (orange dots),
    vanishing steps (blue triangles), and vertical lines at explosions (red),
    non-finite steps (black, dashed) and emergency interventions (purple,
    thick); below, the loss-scale history, one point per change. Costs one
    device read when given an optimizer state (see :func:`stability_reports`).

    Args:
      source: a ``Monitor``, an optimizer state holding one stabilizer, a
        PyTorch ``GradientFlowStabilizer``, or a ``StabilityReport``.
      ax: None (a new figure). For a monitor: a ``Figure`` or ``SubFigure`` to
        draw in, four Axes (norms, events, loss scale, loss) with one
        stabilizer, or one such sequence per stabilizer. For a state or
        report: a pair of Axes (norms, loss scale), or one Axes (norms only;
        the loss scale goes in its title).

    Returns:
      The matplotlib ``Figure`` drawn on.

    Raises:
      ImportError: matplotlib is missing (install the ``plot`` extra).
      ValueError: a monitor with no records yet; a state with several
        stabilizers (plot a monitor, or one report, ``report[path]``).
    """
    if isinstance(source, Monitor):
        return _plot_monitor(source, ax)
    plt = _pyplot()
    report = source
    if not isinstance(report, StabilityReport) and hasattr(report, "get_stability_report"):
        report = report.get_stability_report()  # a PyTorch GradientFlowStabilizer
    if not isinstance(report, StabilityReport):
        reports = stability_reports(report)
        if len(reports) > 1:
            raise ValueError(
                f"The state holds {len(reports)} stabilizers ({', '.join(reports)}); plot "
                "one of them: plot(stability_reports(opt_state)[path]), or all of them over "
                "the whole run with an optax_gradflow.Monitor."
            )
        (report,) = reports.values()
    if ax is None:
        fig, (ax_norm, ax_scale) = plt.subplots(
            2, 1, figsize=(9, 6), gridspec_kw={"height_ratios": [3, 1]}, layout="constrained"
        )
    elif isinstance(ax, (tuple, list)):
        ax_norm, ax_scale = ax
        fig = ax_norm.figure
    else:
        ax_norm, ax_scale, fig = ax, None, ax.figure

    _draw_norms(ax_norm, report)
    title = (
        f"{report.path or 'stabilizer'}: {report.status}, score {report.stability_score:.2f}, "
        f"step {report.step}; recent window: last {report.window_steps} steps"
    )
    if ax_scale is None:
        title += f", loss scale {report.loss_scale:.4g}"
    else:
        _draw_loss_scale(ax_scale, report)
    ax_norm.set_title(title)
    return fig


def _draw_norms(ax: Any, report: StabilityReport) -> None:
    norms = list(report.norm_history)
    steps = norm_steps(report)
    start = min([report.window_start_step, *steps])
    xs, ys = threshold_path(report, start)
    ax.plot(steps, norms, color="tab:gray", linewidth=1.0, label="gradient norm")
    ax.step(xs, ys, where="post", color="tab:green", linewidth=1.5, label="clip threshold")

    norm_at = dict(zip(steps, norms, strict=True))

    def marked(flag: int, exclude: int = 0) -> list[int]:
        return [
            report.window_start_step + offset
            for offset, f in enumerate(report.event_flags)
            if f & flag and not f & exclude
        ]

    clipped = [k for k in marked(FLAG_CLIPPED, exclude=FLAG_EXPLOSION) if k in norm_at]
    if clipped:
        ax.scatter(
            clipped, [norm_at[k] for k in clipped], color="tab:orange", s=16, label="clipped"
        )
    vanishing = [k for k in marked(FLAG_VANISHING) if k in norm_at]
    if vanishing:
        ax.scatter(
            vanishing,
            [norm_at[k] for k in vanishing],
            color="tab:blue",
            marker="v",
            s=20,
            label="vanishing",
        )
    for flag, style in (
        (FLAG_EXPLOSION, {"color": "tab:red", "alpha": 0.5, "label": "explosion"}),
        (FLAG_NONFINITE, {"color": "black", "linestyle": "--", "label": "non-finite"}),
        (FLAG_EMERGENCY, {"color": "tab:purple", "linewidth": 2.5, "label": "emergency"}),
    ):
        for j, k in enumerate(marked(flag)):
            ax.axvline(k, **(style if j == 0 else {**style, "label": None}))

    positive = [v for v in [*norms, *ys] if v > 0]
    if positive and len(positive) == len(norms) + len(ys):
        ax.set_yscale("log")
    if not norms and report.window_steps == 0:
        ax.text(0.5, 0.5, "no steps yet", transform=ax.transAxes, ha="center")
    ax.set_xlabel(
        f"step (recent window: the last {report.window_steps} steps; a Monitor records the "
        "whole run)"
    )
    ax.set_ylabel("unscaled gradient norm")
    ax.legend(loc="best", fontsize="small")


def _draw_loss_scale(ax: Any, report: StabilityReport) -> None:
    history = list(report.loss_scale_history)
    ax.step(range(len(history)), history, where="post", color="tab:brown", marker=".")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("loss-scale change in the recent history (oldest to newest)")
    ax.set_ylabel("loss scale")


# --- A whole run, from a Monitor --------------------------------------------------

_ROWS = ("norm", "events", "loss scale", "loss")
_EVENT_STYLES = (
    ("clipped", "clipped", {"color": "tab:orange"}),
    ("explosions", "explosions", {"color": "tab:red"}),
    ("nonfinite", "skipped (non-finite)", {"color": "black", "linestyle": "--"}),
    ("emergencies", "emergencies", {"color": "tab:purple", "linewidth": 2.0}),
)


def _monitor_axes(ax: Any, columns: int, plt: Any) -> tuple[Any, list[list[Any]]]:
    """(figure, one list of four Axes per column) for ``plot(monitor, ax=...)``."""
    ratios = {"height_ratios": [3, 2, 1, 2]}
    if ax is None:
        fig, grid = plt.subplots(
            len(_ROWS),
            columns,
            figsize=(4 + 5 * columns, 9),
            sharex="col",
            squeeze=False,
            gridspec_kw=ratios,
            layout="constrained",
        )
        return fig, [list(grid[:, c]) for c in range(columns)]
    if hasattr(ax, "subplots") and not hasattr(ax, "plot"):  # a Figure or SubFigure
        grid = ax.subplots(len(_ROWS), columns, sharex="col", squeeze=False, gridspec_kw=ratios)
        return ax.figure, [list(grid[:, c]) for c in range(columns)]
    if isinstance(ax, Sequence) and len(ax) and not isinstance(ax[0], Sequence):
        ax = [ax]
    if (
        not isinstance(ax, Sequence)
        or len(ax) != columns
        or any(not isinstance(col, Sequence) or len(col) != len(_ROWS) for col in ax)
    ):
        raise ValueError(
            f"plot(monitor, ax=...) takes a Figure, a SubFigure, or {len(_ROWS)} Axes "
            f"({', '.join(_ROWS)}) for each of the monitor's {columns} stabilizer(s)."
        )
    return ax[0][0].figure, [list(col) for col in ax]


def _plot_monitor(monitor: Monitor, ax: Any):
    plt = _pyplot()
    paths = [p for p in monitor.paths if monitor.records[p]]
    if not paths:
        raise ValueError(
            "The monitor has no records yet: call monitor.update(opt_state) once per step; "
            "each read after the first closes an interval."
        )
    fig, columns = _monitor_axes(ax, len(paths), plt)
    for path, axes in zip(paths, columns, strict=True):
        _draw_run(axes, monitor, path)
    return fig


def _band(records: Sequence[Interval], values: Sequence[float]) -> tuple[list, list]:
    """A ``where="post"`` step function: each value over its interval's steps."""
    xs = [r.start for r in records] + [records[-1].stop]
    return xs, [*values, values[-1]]


def _at_reads(
    records: Sequence[Interval], values: Sequence[float], origin: tuple[int, float]
) -> tuple[list, list]:
    """Values read at the end of each interval, from the origin's when it is known."""
    xs, ys = [r.stop for r in records], list(values)
    if math.isfinite(origin[1]):
        xs, ys = [origin[0], *xs], [origin[1], *ys]
    return xs, ys


def _draw_run(axes: list[Any], monitor: Monitor, path: str) -> None:
    ax_norm, ax_events, ax_scale, ax_loss = axes
    records = monitor.records[path]
    origin_step, origin_threshold, origin_scale = monitor.origin(path)
    first, last = records[0].start, records[-1].stop
    name = path or "stabilizer"

    # Norms and threshold.
    xs, medians = _band(records, [r.norm_median for r in records])
    _, maxima = _band(records, [r.norm_max for r in records])
    ax_norm.fill_between(xs, medians, maxima, step="post", color="tab:gray", alpha=0.25)
    ax_norm.step(xs, maxima, where="post", color="tab:gray", linewidth=0.8, label="norm max")
    ax_norm.step(xs, medians, where="post", color="black", linewidth=1.0, label="norm median")
    txs, tys = _at_reads(records, [r.threshold for r in records], (origin_step, origin_threshold))
    ax_norm.step(txs, tys, where="post", color="tab:green", linewidth=1.5, label="clip threshold")
    finite = [v for v in [*medians, *maxima, *tys] if math.isfinite(v)]
    if finite and min(finite) > 0:
        ax_norm.set_yscale("log")
    ax_norm.set_ylabel("unscaled gradient norm")
    ax_norm.legend(
        loc="best",
        fontsize="small",
        title="per interval: norms of its non-exploding steps and of its last step",
        title_fontsize="x-small",
    )
    steps_per = sorted({r.steps for r in records[:-1]} or {records[-1].steps})
    size = f"{steps_per[0]}" if len(steps_per) == 1 else f"{steps_per[0]}-{steps_per[-1]}"
    ax_norm.set_title(
        f"{name}: whole run, steps {first}-{last}, {len(records)} intervals of {size} steps"
    )

    # Events per interval.
    totals = monitor.totals(path)
    for field, label, style in _EVENT_STYLES:
        xs, counts = _band(records, [getattr(r, field) for r in records])
        ax_events.step(xs, counts, where="post", label=f"{label} ({totals[field]} in all)", **style)
    ax_events.set_ylabel("steps per interval")
    ax_events.legend(loc="best", fontsize="small")

    # Loss scale.
    sxs, sys_ = _at_reads(records, [r.loss_scale for r in records], (origin_step, origin_scale))
    ax_scale.step(sxs, sys_, where="post", color="tab:brown", label="loss scale")
    if all(math.isfinite(v) and v > 0 for v in sys_):
        ax_scale.set_yscale("log", base=2)
    ax_scale.set_ylabel("loss scale")

    # Loss.
    losses = [r.loss for r in records]
    ax_loss.plot(
        [r.stop for r in records],
        losses,
        color="tab:blue",
        marker="." if len(records) <= 50 else None,
        label="loss",
    )
    finite_losses = [v for v in losses if math.isfinite(v)]
    if not finite_losses:
        ax_loss.text(
            0.5,
            0.5,
            "no loss recorded: pass value=loss to update",
            transform=ax_loss.transAxes,
            ha="center",
            va="center",
        )
    elif min(finite_losses) > 0:
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss (at each read)")
    ax_loss.set_xlabel("step")
    for ax in axes:
        ax.set_xlim(min(first, *txs, *sxs), last)
