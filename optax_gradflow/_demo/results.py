"""The demo's results: the verdicts, the table, the findings in words, the figure."""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence

import numpy as np

import optax_gradflow
from optax_gradflow._demo.scenario import (
    ADAM,
    AIF,
    CHUNK,
    CLIP_NORM,
    DIVERGENCE_FACTOR,
    GRADFLOW,
    LEARNING_RATE,
    MISSING_RATE,
    NAME_WIDTH,
    OUTLIER_FACTOR,
    OUTLIER_RATE,
    TAIL_SHARE,
    TIE_FACTOR,
)
from optax_gradflow._demo.training import RunResult, corrupted_steps
from optax_gradflow.monitor import Monitor


def verdict(result: RunResult) -> str:
    """Whether the run diverged: a non-finite loss, or a peak above 10x the initial loss."""
    bad = ~np.isfinite(result.eval_loss)
    if bad.any():
        return f"yes: NaN from step {int(np.argmax(bad))}"
    peak = float(np.max(result.eval_loss))
    if peak > DIVERGENCE_FACTOR * result.initial_loss:
        return f"yes: blow-up to {peak / result.initial_loss:.0f}x"
    return "no"


def counts(result: RunResult) -> tuple[str, str, str, str]:
    """(clipped, explosions, non-finite, skipped) steps; "-" where the optimizer has no
    such notion."""
    finite = np.isfinite(result.grad_norm)
    nonfinite = str(int(np.sum(~finite)))
    if result.name == GRADFLOW:
        flow = optax_gradflow.find_states(result.opt_state)[0][1]
        return (
            str(int(flow.clip_count)),
            str(int(flow.explosion_count)),
            nonfinite,
            str(int(flow.nonfinite_count)),
        )
    if result.name == AIF:
        clipped = int(np.sum(finite & (result.grad_norm > CLIP_NORM)))
        return str(clipped), "-", nonfinite, str(int(result.opt_state.total_notfinite))
    return "-", "-", nonfinite, "0"


def _fmt_loss(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "nan"


def _tail_mean(result: RunResult) -> float:
    """Mean eval loss over the last ``TAIL_SHARE`` of the steps (at least one)."""
    n = max(1, round(TAIL_SHARE * len(result.eval_loss)))
    return float(np.mean(result.eval_loss[-n:]))


def _run_mean(result: RunResult) -> float:
    """Mean eval loss over all the steps (lower: it got there sooner); NaN if it diverged."""
    return float(np.mean(result.eval_loss))


def _and(labels: Sequence[str]) -> str:
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def _peak(result: RunResult) -> float:
    finite = np.isfinite(result.eval_loss)
    return float(np.max(result.eval_loss[finite])) if finite.any() else math.nan


def table(results: Sequence[RunResult]) -> str:
    """The comparison table, one row per run."""
    tail = f"last {TAIL_SHARE:.0%}"
    header = (
        f"{'run':<{NAME_WIDTH}} {'final loss':>10} {tail:>10} {'peak loss':>10} {'clipped':>8} "
        f"{'explosions':>10} {'non-finite':>10} {'skipped':>8}  diverged?"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        clipped, explosions, nonfinite, skipped = counts(r)
        lines.append(
            f"{r.name:<{NAME_WIDTH}} {_fmt_loss(float(r.eval_loss[-1])):>10} "
            f"{_fmt_loss(_tail_mean(r)):>10} {_fmt_loss(_peak(r)):>10} {clipped:>8} "
            f"{explosions:>10} {nonfinite:>10} {skipped:>8}  {verdict(r)}"
        )
    return "\n".join(lines)


def _compare(ours: float, theirs: float) -> str:
    """Whether ``ours`` is "lower", "higher" or "about equal" to ``theirs`` (lower is better)."""
    if not math.isfinite(ours) or not math.isfinite(theirs):
        return "lower" if math.isfinite(ours) else ("higher" if math.isfinite(theirs) else "n/a")
    if max(ours, theirs) <= TIE_FACTOR * min(ours, theirs):
        return "about equal"
    return "lower" if ours < theirs else "higher"


def findings(results: Sequence[RunResult]) -> list[str]:
    """What the numbers say, in words: the best final loss, and the stabilizer against
    ``apply_if_finite`` on each measure (lower is better), with where it wins and loses.

    Computed from ``results``; nothing here names a winner in advance.
    """
    lines = []
    final = {r.name: float(r.eval_loss[-1]) for r in results}
    ranked = sorted((v, n) for n, v in final.items() if math.isfinite(v))
    if ranked:
        best_value, best = ranked[0]
        others = []
        for r in results:
            if r.name == best:
                continue
            value = final[r.name]
            if not math.isfinite(value):
                others.append(f"{r.name} {_fmt_loss(value)} (diverged: {verdict(r)})")
            elif best_value > 0:
                others.append(f"{r.name} {_fmt_loss(value)} ({value / best_value:.2f}x)")
            else:
                others.append(f"{r.name} {_fmt_loss(value)}")
        lines.append(
            f"Best final eval loss: {best} ({_fmt_loss(best_value)}); " + ", ".join(others) + "."
        )
    else:
        lines.append("Every run ended with a non-finite eval loss.")
    by_name = {r.name: r for r in results}
    ours, theirs = by_name.get(GRADFLOW), by_name.get(AIF)
    if ours is None or theirs is None:
        return lines
    measures = (
        ("final loss", float(ours.eval_loss[-1]), float(theirs.eval_loss[-1])),
        (f"mean loss over the last {TAIL_SHARE:.0%}", _tail_mean(ours), _tail_mean(theirs)),
        ("mean loss over the run", _run_mean(ours), _run_mean(theirs)),
    )
    parts, outcomes = [], {"lower": [], "higher": [], "about equal": [], "n/a": []}
    for label, a, b in measures:
        outcome = _compare(a, b)
        parts.append(f"{label} {_fmt_loss(a)} vs {_fmt_loss(b)} ({outcome})")
        outcomes[outcome].append(label)
    lines.append(f"{GRADFLOW} vs {AIF} (lower is better): " + "; ".join(parts) + ".")
    tie = f"within {TIE_FACTOR - 1:.0%}"
    if not outcomes["lower"] and not outcomes["higher"]:
        lines.append(f"So the stabilizer and {AIF} are {tie} of each other on every measure.")
    else:
        summary = [
            f"{verb} on {_and(outcomes[key])}"
            for verb, key in (("wins", "lower"), ("loses", "higher"), (f"is {tie}", "about equal"))
            if outcomes[key]
        ]
        lines.append(f"So, against {AIF}, the stabilizer {'; '.join(summary)}.")
    return lines


def write_plot(
    results: Sequence[RunResult],
    monitor: Monitor,
    path: pathlib.Path,
    *,
    seed: int,
    notes: Sequence[str] = (),
) -> None:
    """Loss curves of the runs (top) and ``optax_gradflow.plot(monitor)`` of the stabilizer."""
    from matplotlib.figure import Figure  # rendered by Agg; no pyplot state is touched

    fig = Figure(figsize=(11, 14), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.1, 2])
    ax_loss = top.subplots()
    colours = {ADAM: "tab:red", AIF: "tab:blue", GRADFLOW: "tab:green"}
    died: dict[int, list[str]] = {}
    for r in results:
        steps = np.arange(1, len(r.eval_loss) + 1)
        ax_loss.plot(steps, r.eval_loss, color=colours[r.name], linewidth=1.2, label=r.name)
        bad = ~np.isfinite(r.eval_loss)
        if bad.any():
            died.setdefault(int(np.argmax(bad)) + 1, []).append(r.name)
    for step, names in died.items():
        ax_loss.axvline(step, color="black", linestyle=":", linewidth=1.2)
        ax_loss.annotate(
            f"{' and '.join(names)}: NaN from here",
            (step, 1.0),
            xycoords=("data", "axes fraction"),
            textcoords="offset points",
            xytext=(4, -14),
            fontsize="small",
        )
    outliers, missing = corrupted_steps(seed, len(results[0].eval_loss))
    rug = {"xycoords": ("data", "axes fraction"), "fontsize": 7, "ha": "center"}
    for k in outliers:
        ax_loss.annotate("|", (k + 1, 0.0), color="tab:gray", **rug)
    for k in missing:
        ax_loss.annotate("|", (k + 1, 0.0), color="black", fontweight="bold", **rug)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel(
        "step  (ticks on the axis: grey, a batch with outlier targets; black, a NaN target)"
    )
    ax_loss.set_ylabel("MSE on clean examples")
    ax_loss.set_title(
        f"Adam, lr {LEARNING_RATE:g}: {OUTLIER_RATE:.0%} of the batches have targets "
        f"x{OUTLIER_FACTOR:g}, {MISSING_RATE:.1%} a NaN target"
    )
    ax_loss.legend(loc="center right", fontsize="small")
    if notes:
        top.suptitle("\n".join(notes), fontsize="small", wrap=True)
    optax_gradflow.plot(monitor, ax=bottom)
    bottom.suptitle(
        f"{GRADFLOW}: the stabilizer over the whole run (optax_gradflow.Monitor, one read "
        f"per {CHUNK} steps)",
        fontsize="medium",
    )
    fig.savefig(path, format="png", dpi=90)
