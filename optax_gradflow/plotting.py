"""A picture of a stabilizer's recent history (needs matplotlib: the ``plot`` extra).

matplotlib is imported on the first call only, so that the rest of the
library does not depend on it.
"""

from __future__ import annotations

from typing import Any

from optax_gradflow.report import StabilityReport, stability_report
from optax_gradflow.state import (
    FLAG_ADAPTED,
    FLAG_CLIPPED,
    FLAG_EMERGENCY,
    FLAG_EXPLOSION,
    FLAG_NONFINITE,
    FLAG_VANISHING,
)

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


def plot(opt_state_or_report: Any, ax: Any = None):
    """Draws the norm history, the threshold, the events and the loss scale.

    Top panel: the norm history against the step, the clip threshold as a step
    line, clipped steps (orange dots), vanishing steps (blue triangles), and
    vertical lines at explosions (red), non-finite steps (black, dashed) and
    emergency interventions (purple, thick), from the event window. Bottom
    panel: the loss-scale history, one point per change. Costs one device
    read when given an optimizer state (see :func:`stability_report`).

    Args:
      opt_state_or_report: an optimizer state holding one stabilizer, or a
        :class:`StabilityReport`.
      ax: None (a new figure with both panels), a pair of Axes (norms, loss
        scale), or one Axes (norms only; the loss scale goes in its title).

    Returns:
      The matplotlib ``Figure`` drawn on.

    Raises:
      ImportError: matplotlib is missing (install the ``plot`` extra).
      ValueError: several stabilizers; pass one report, ``report[path]``.
    """
    plt = _pyplot()
    report = opt_state_or_report
    if not isinstance(report, StabilityReport):
        report = stability_report(report)
    if isinstance(report, dict):
        raise ValueError(
            f"The state holds {len(report)} stabilizers ({', '.join(report)}); plot one of "
            "them: plot(stability_report(opt_state)[path])."
        )
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
        f"step {report.step}"
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
    ax.set_xlabel("step")
    ax.set_ylabel("unscaled gradient norm")
    ax.legend(loc="best", fontsize="small")


def _draw_loss_scale(ax: Any, report: StabilityReport) -> None:
    history = list(report.loss_scale_history)
    ax.step(range(len(history)), history, where="post", color="tab:brown", marker=".")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("loss-scale change (oldest to newest)")
    ax.set_ylabel("loss scale")
