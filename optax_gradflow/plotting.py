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

from optax_gradflow.constants import Event
from optax_gradflow.monitor import Interval, Monitor
from optax_gradflow.report import StabilityReport, stability_reports

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_EXCLUDED = Event.EXPLOSION | Event.NONFINITE  # steps that push no norm (SPEC.md, step 6)
_THRESHOLD_PUSH = Event.ADAPTED | Event.EMERGENCY


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


def threshold_path(report: StabilityReport) -> tuple[list[int], list[float]]:
    """The thresholds whose steps the state knows, as ``(steps, values)``.

    Each push onto the threshold history in the event window (an adaptation or
    an emergency at step ``k``, SPEC.md, "Per-step order" 10) is the threshold
    from step ``k + 1`` on; the threshold in force before the window's first
    push, when the history holds it, is placed at the window's start; the
    current ``clip_threshold`` is placed at ``report.step``, the next step.
    Older pushes carry no step and are left out. Under the ``track`` rule the
    threshold moves every step and these are samples of it.
    """
    pushes = [
        report.window_start_step + offset
        for offset, f in enumerate(report.event_flags)
        if f & _THRESHOLD_PUSH
    ]
    history = list(report.threshold_history)
    pushes = pushes[len(pushes) - min(len(pushes), len(history)) :]
    values = history[len(history) - len(pushes) :]
    xs: list[int] = []
    ys: list[float] = []
    if len(history) > len(pushes) and report.window_steps:
        xs.append(report.window_start_step)
        ys.append(history[len(history) - len(pushes) - 1])
    for step, value in zip(pushes, values, strict=True):
        xs.append(step + 1)
        ys.append(value)
    if not xs or xs[-1] < report.step:
        xs.append(report.step)
        ys.append(report.clip_threshold)
    return xs, ys


def loss_scale_used(report: StabilityReport) -> bool:
    """Whether the loss scale ever left 1 (loss scaling on and at work)."""
    return report.loss_scale != 1.0 or any(v != 1.0 for v in report.loss_scale_history)


def plot(source: Any, ax: Any = None) -> Figure:
    """Draws a stabilizer's gradient norms, threshold, events and loss scale.

    Given a :class:`~optax_gradflow.Monitor`, the whole run it recorded, with
    the step on every x axis and one column per stabilizer (e.g. one per
    sub-tree under ``optax.partition``). Rows: the norm band (median and
    maximum of each interval's finite norms, exploding ones included) with
    the clip threshold as a step line;
    the clipped, exploding, skipped (non-finite) and emergency steps of each
    interval; the loss scale, only when loss scaling is at work (some scale
    left 1); the loss (``value=`` given to update). No device read: the
    monitor holds host values.

    Given an optimizer state holding one stabilizer, a PyTorch
    ``GradientFlowStabilizer`` (its report) or a :class:`StabilityReport`,
    what the state keeps, each over the steps it covers (the title and the
    x label say which): the norm history (its last ``norm_history_size``
    finite, non-exploding norms; their steps are exact within the event
    window and estimated before it), the event window (the last
    ``event_history_size`` steps, shaded) with clipped steps (orange dots),
    vanishing steps (blue triangles) and vertical lines at explosions (red),
    non-finite steps (black, dashed) and emergency interventions (purple,
    thick), and the clip threshold at the steps the state records it
    (:func:`threshold_path`); below, when loss scaling is at work, the
    loss-scale history, one point per change. Costs one device read when
    given an optimizer state (see :func:`stability_reports`).

    Args:
      source: a ``Monitor``, an optimizer state holding one stabilizer, a
        PyTorch ``GradientFlowStabilizer``, or a ``StabilityReport``.
      ax: None (a new figure). For a monitor: a ``Figure`` or ``SubFigure`` to
        draw in, four Axes (norms, events, loss scale, loss) with one
        stabilizer, or one such sequence per stabilizer (a row that is not
        drawn is hidden). For a state or report: a pair of Axes (norms, loss
        scale; the second is hidden when loss scaling is not at work), or one
        Axes (norms only; the loss scale, if at work, goes in its title).

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
    show_scale = loss_scale_used(report)
    if ax is None:
        if show_scale:
            fig, (ax_norm, ax_scale) = plt.subplots(
                2, 1, figsize=(9, 6), gridspec_kw={"height_ratios": [3, 1]}, layout="constrained"
            )
        else:
            fig, ax_norm = plt.subplots(figsize=(9, 4.5), layout="constrained")
            ax_scale = None
    elif isinstance(ax, (tuple, list)):
        ax_norm, ax_scale = ax
        fig = ax_norm.figure
        if not show_scale:
            ax_scale.set_visible(False)  # loss scaling is off: nothing to draw
            ax_scale = None
    else:
        ax_norm, ax_scale, fig = ax, None, ax.figure

    span = _draw_norms(ax_norm, report)
    title = f"{report.path or 'stabilizer'}: {report.status}, score {report.stability_score:.2f}"
    title += f", step {report.step}; {span}"
    if ax_scale is not None:
        _draw_loss_scale(ax_scale, report)
    elif show_scale:
        title += f", loss scale {report.loss_scale:.4g}"
    ax_norm.set_title(title)
    return fig


def _draw_norms(ax: Any, report: StabilityReport) -> str:
    """Draws the norm panel; returns what its x axis covers, in words."""
    norms = list(report.norm_history)
    steps = norm_steps(report)
    window = (report.window_start_step, report.step - 1)
    ax.plot(steps, norms, color="tab:gray", linewidth=1.0, label="gradient norm")
    if report.window_steps:
        ax.axvspan(window[0] - 0.5, window[1] + 0.5, color="tab:blue", alpha=0.06, lw=0)
    xs, ys = threshold_path(report)
    ax.plot(
        xs,
        ys,
        color="tab:green",
        linewidth=1.5,
        marker="o",
        markersize=3,
        drawstyle="steps-post",
        label="clip threshold (where the state records it)",
    )

    norm_at = dict(zip(steps, norms, strict=True))

    def marked(flag: int, exclude: int = 0) -> list[int]:
        return [
            report.window_start_step + offset
            for offset, f in enumerate(report.event_flags)
            if f & flag and not f & exclude
        ]

    clipped = [k for k in marked(Event.CLIPPED, exclude=Event.EXPLOSION) if k in norm_at]
    if clipped:
        ax.scatter(
            clipped, [norm_at[k] for k in clipped], color="tab:orange", s=16, label="clipped"
        )
    vanishing = [k for k in marked(Event.VANISHING) if k in norm_at]
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
        (Event.EXPLOSION, {"color": "tab:red", "alpha": 0.5, "label": "explosion"}),
        (Event.NONFINITE, {"color": "black", "linestyle": "--", "label": "non-finite"}),
        (Event.EMERGENCY, {"color": "tab:purple", "linewidth": 2.5, "label": "emergency"}),
    ):
        for j, k in enumerate(marked(flag)):
            ax.axvline(k, **(style if j == 0 else {**style, "label": None}))

    positive = [v for v in [*norms, *ys] if v > 0]
    if positive and len(positive) == len(norms) + len(ys):
        ax.set_yscale("log")
    if not norms and report.window_steps == 0:
        ax.text(0.5, 0.5, "no steps yet", transform=ax.transAxes, ha="center")
    events = f"events: steps {window[0]}-{window[1]} (shaded)" if report.window_steps else ""
    if not steps:
        ax.set_xlabel(f"step ({events or 'no steps yet'})")
        return events or "no steps yet"
    estimated = steps[0] < report.window_start_step
    first, last = min(steps[0], window[0]), max(steps[-1], window[1])
    ax.set_xlim(first - 0.5, max(last, report.step) + 0.5)
    norms_text = (
        f"norms: the last {len(norms)} finite, non-exploding steps, {steps[0]}-{steps[-1]}"
        + (f" (before step {report.window_start_step}: estimated)" if estimated else "")
    )
    ax.set_xlabel(f"step ({norms_text}; {events})" if events else f"step ({norms_text})")
    ax.set_ylabel("unscaled gradient norm")
    ax.legend(loc="best", fontsize="small")
    return f"steps {first}-{last}"


def _draw_loss_scale(ax: Any, report: StabilityReport) -> None:
    history = list(report.loss_scale_history)
    ax.step(range(len(history)), history, where="post", color="tab:brown", marker=".")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("loss-scale change in the recent history (oldest to newest)")
    ax.set_ylabel("loss scale")


# --- A whole run, from a Monitor --------------------------------------------------

_ROWS = ("norm", "events", "loss scale", "loss")
_ROW_HEIGHTS = {"norm": 3, "events": 2, "loss scale": 1, "loss": 2}
_EVENT_STYLES = (
    ("clipped", "clipped", {"color": "tab:orange"}),
    ("explosions", "explosions", {"color": "tab:red"}),
    ("nonfinite", "skipped (non-finite)", {"color": "black", "linestyle": "--"}),
    ("emergencies", "emergencies", {"color": "tab:purple", "linewidth": 2.0}),
)


def _monitor_rows(monitor: Monitor, paths: Sequence[str]) -> tuple[str, ...]:
    """The rows to draw: the loss-scale row only when some stabilizer's scale left 1."""

    def scaled(path: str) -> bool:
        origin = monitor.origin(path)[2]
        moved_at_origin = math.isfinite(origin) and origin != 1.0
        return moved_at_origin or any(r.loss_scale != 1.0 for r in monitor.records[path])

    if any(scaled(path) for path in paths):
        return _ROWS
    return tuple(row for row in _ROWS if row != "loss scale")


def _monitor_axes(
    ax: Any, columns: int, rows: tuple[str, ...], plt: Any
) -> tuple[Any, list[dict[str, Any]]]:
    """(figure, one dict row -> Axes per column) for ``plot(monitor, ax=...)``.

    Given Axes for all four rows, the rows not drawn are hidden.
    """
    ratios = {"height_ratios": [_ROW_HEIGHTS[row] for row in rows]}
    if ax is None:
        fig, grid = plt.subplots(
            len(rows),
            columns,
            figsize=(4 + 5 * columns, 2.25 * sum(ratios["height_ratios"]) / 2),
            sharex="col",
            squeeze=False,
            gridspec_kw=ratios,
            layout="constrained",
        )
        return fig, [dict(zip(rows, grid[:, c], strict=True)) for c in range(columns)]
    if hasattr(ax, "subplots") and not hasattr(ax, "plot"):  # a Figure or SubFigure
        grid = ax.subplots(len(rows), columns, sharex="col", squeeze=False, gridspec_kw=ratios)
        return ax.figure, [dict(zip(rows, grid[:, c], strict=True)) for c in range(columns)]
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
    out = []
    for col in ax:
        by_row = dict(zip(_ROWS, col, strict=True))
        for row, axes in by_row.items():
            if row not in rows:
                axes.set_visible(False)  # a feature that is off: nothing to draw
        out.append({row: by_row[row] for row in rows})
    return ax[0][0].figure, out


def _plot_monitor(monitor: Monitor, ax: Any):
    plt = _pyplot()
    paths = [p for p in monitor.paths if monitor.records[p]]
    if not paths:
        raise ValueError(
            "The monitor has no records yet: call monitor.update(opt_state) once per step; "
            "each read after the first closes an interval."
        )
    rows = _monitor_rows(monitor, paths)
    fig, columns = _monitor_axes(ax, len(paths), rows, plt)
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


def _draw_run(axes: dict[str, Any], monitor: Monitor, path: str) -> None:
    ax_norm, ax_events, ax_loss = axes["norm"], axes["events"], axes["loss"]
    ax_scale = axes.get("loss scale")
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
        title="per interval: the norms of its finite steps, explosions included",
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

    # Loss scale, when loss scaling is at work.
    sxs: list[int] = []
    if ax_scale is not None:
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
    for ax in axes.values():
        ax.set_xlim(min(first, *txs, *sxs), last)
