"""What the stability suite concludes, per set: comparisons, RL scores, targets, tables, plots.

Everything here is computed from :class:`metrics.TaskResult` records, and
each set (selection, validation) is summarised apart: :func:`summarise`
gives a :class:`SetSummary`, :func:`format_set` its tables.

- *Loss tasks*: the unstable entries with metric "loss" whose loss ranks
  methods (``compare_losses``) and whose best fixed clip (in hindsight: the
  lowest median final loss among ``clip c``) is finite. Each method's ratio
  is its median final loss over that best; a *good run* is a seed whose final
  loss is at most ``GOOD_RUN_FACTOR`` x that median.
- *RL entries* with metric "return": each method's normalised return
  ``(R - R_random) / (R_best - R_random)``, ``R`` its median final return over
  the seeds, ``R_best`` the best such median among ``RL_REFERENCES`` (no
  clipping, the fixed clips, AGC), ``R_random`` the task's random play.
- *Healthy entries* (``stable``): final loss over no clipping's.
- The targets: the rows of ``TARGETS``, each measured for both stabilizer
  modes from the data, with its comparison and bound (a bound set by the
  peers is measured too).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from baselines import AGC_CLIPPING
from metrics import TaskResult

MODES = ("stabilizer", "stabilizer (data)")
# The peers the stabilizer must beat on the loss tasks.
PEERS = (f"AGC {AGC_CLIPPING:g}", "AutoClip p10", "ZClip")
GOOD_RUN_FACTOR = 1.10
TARGET_GEOMEAN = 1.10
TARGET_MAX_RATIO = 1.5
TARGET_HEALTHY_RATIO = 1.01
TARGET_RL_MEAN = 1.0
TARGET_RL_MIN = 0.8
TARGET_THRESHOLD_TO_NORM = 0.1
TARGET_EMERGENCIES_PER_COPY = 1.0


def is_rl_reference(label: str) -> bool:
    """The methods whose best median return is ``R_best``: no clipping, fixed clips, AGC."""
    return label == "no clipping" or label.startswith("clip ") or label == PEERS[0]


# ----------------------------------------------------------------------------
# Summaries.


@dataclasses.dataclass
class BestFixed:
    label: str
    final: float
    good_bar: float


@dataclasses.dataclass
class GoodRuns:
    total: int
    runs: int
    per_task: dict[str, int]


@dataclasses.dataclass
class LossComparison:
    """Final-loss ratios to the best fixed clip and good runs, per method, on the loss tasks."""

    tasks: list[str]
    skipped: dict[str, str]
    best_fixed: dict[str, BestFixed]
    ratios: dict[str, dict[str, float]]
    geomean: dict[str, float | None]
    good_runs: dict[str, GoodRuns]


@dataclasses.dataclass
class RLEntry:
    """One RL entry with metric "return": the reference and each method's normalised return."""

    task: str
    random_return: float | None
    best_label: str | None
    best_return: float | None
    returns: dict[str, float]
    normalised: dict[str, float | None]
    note: str = ""


@dataclasses.dataclass
class StabilizerRow:
    """The stabilizer's own figures on one entry in one mode (median / extreme over seeds)."""

    task: str
    mode: str
    explosion_fraction: float
    clip_fraction: float
    emergencies_max: int
    nonfinite_max: int
    threshold_to_norm_median: float
    threshold_to_norm_min: float
    emergencies_per_copy_max: float | None
    copies: int


@dataclasses.dataclass
class RankRow:
    method: str
    mean_rank: float
    diverged_runs: int
    geomean_ratio_to_best: float


@dataclasses.dataclass
class TargetResult:
    key: str
    mode: str
    description: str
    goal: str
    figure: float | None
    bound: float | None
    met: bool | None
    text: str
    # Whether the bound was measured (the peers' figure) rather than fixed.
    bound_from_data: bool = False


@dataclasses.dataclass
class SetSummary:
    set: str
    tasks: list[str]
    comparison: LossComparison
    rl: list[RLEntry]
    healthy: dict[str, dict[str, float]]
    stabilizer: list[StabilizerRow]
    targets: list[TargetResult]
    ranking: list[RankRow]
    rule_ranking: list[RankRow] = dataclasses.field(default_factory=list)
    rule_ranking_data_mode: list[RankRow] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def best_fixed(tr: TaskResult) -> tuple[str, float]:
    """The plain fixed clip with the lowest median final loss (in hindsight)."""
    fixed = {label: m.median for label, m in tr.methods.items() if label.startswith("clip ")}
    if not fixed:
        return "-", math.inf
    label = min(fixed, key=lambda k: fixed[k])
    return label, fixed[label]


def geomean(values: Sequence[float]) -> float | None:
    if not values:
        return None
    if any(not math.isfinite(v) for v in values):
        return math.inf
    return float(np.exp(np.mean(np.log(values))))


def _ratio(num: float | None, den: float) -> float:
    if num is None or not math.isfinite(num):
        return math.inf
    return num / den if den > 0 else math.inf


def loss_comparison(results: dict[str, TaskResult]) -> LossComparison:
    tasks, best, skipped = [], {}, {}
    for name, tr in results.items():
        if tr.stable or tr.metric != "loss":
            continue
        if not tr.compare_losses:
            skipped[name] = "its loss does not rank methods"
            continue
        label, final = best_fixed(tr)
        if not (math.isfinite(final) and final > 0):
            skipped[name] = "every fixed clip diverged"
            continue
        tasks.append(name)
        best[name] = BestFixed(label, final, GOOD_RUN_FACTOR * final)
    methods: list[str] = []
    for name in tasks:
        methods += [m for m in results[name].methods if m not in methods]
    ratios, good = {}, {}
    for method in methods:
        ran = [n for n in tasks if method in results[n].methods]
        ratios[method] = {n: _ratio(results[n].methods[method].median, best[n].final) for n in ran}
        counts = {
            n: int(sum(x <= best[n].good_bar for x in results[n].methods[method].final))
            for n in ran
        }
        runs = sum(results[n].methods[method].seeds for n in ran)
        good[method] = GoodRuns(sum(counts.values()), runs, counts)
    return LossComparison(
        tasks=tasks,
        skipped=skipped,
        best_fixed=best,
        ratios=ratios,
        geomean={
            m: geomean(list(r.values())) if len(r) == len(tasks) else None
            for m, r in ratios.items()
        },
        good_runs=good,
    )


def rl_entries(results: dict[str, TaskResult]) -> list[RLEntry]:
    """Normalised returns of every method on each entry with metric "return"."""
    out = []
    for name, tr in results.items():
        if tr.metric != "return":
            continue
        returns = {label: m.median for label, m in tr.methods.items()}
        refs = {label: r for label, r in returns.items() if is_rl_reference(label)}
        best_label = max(refs, key=lambda k: refs[k]) if refs else None
        best = refs[best_label] if best_label else None
        rnd = tr.random_return
        note = ""
        if rnd is None:
            note = "no random return"
        elif best is None:
            note = "no reference run"
        elif not best > rnd:
            note = "no reference beat random play"
        normalised = {
            label: (r - rnd) / (best - rnd) if not note else None for label, r in returns.items()
        }
        out.append(RLEntry(name, rnd, best_label, best, returns, normalised, note))
    return out


def healthy_ratios(results: dict[str, TaskResult]) -> dict[str, dict[str, float]]:
    """Final loss / no clipping's, per healthy entry and stabilizer mode."""
    out = {}
    for name, tr in results.items():
        if not tr.stable or "no clipping" not in tr.methods:
            continue
        ref = tr.methods["no clipping"].median
        out[name] = {m: _ratio(tr.methods[m].median, ref) for m in MODES if m in tr.methods}
    return out


def stabilizer_rows(results: dict[str, TaskResult]) -> list[StabilizerRow]:
    rows = []
    for name, tr in results.items():
        for mode in MODES:
            m = tr.methods.get(mode)
            if m is None or m.stabilizer is None:
                continue
            s = m.stabilizer
            ratio = [x for x in s.threshold_to_norm if math.isfinite(x)] or [math.nan]
            per_copy = s.emergencies_per_copy
            rows.append(
                StabilizerRow(
                    task=name,
                    mode=mode,
                    explosion_fraction=float(np.median(s.explosion_fraction)),
                    clip_fraction=float(np.median(s.clip_fraction)),
                    emergencies_max=max(s.emergencies),
                    nonfinite_max=max(s.nonfinite),
                    threshold_to_norm_median=float(np.median(ratio)),
                    threshold_to_norm_min=float(min(ratio)),
                    emergencies_per_copy_max=max(per_copy) if per_copy else None,
                    copies=s.copies,
                )
            )
    return rows


def rank_methods(results: dict[str, TaskResult], kinds: Sequence[str]) -> list[RankRow]:
    """Mean rank (1 = best) of the methods of ``kinds`` over the entries whose score ranks them.

    Loss entries rank by (diverged runs, median final loss), return entries
    by (diverged runs, minus the median final return); ties share their mean
    rank. The geometric mean of final / best is over the loss entries.
    """
    ranked = [tr for tr in results.values() if tr.compare_losses or tr.metric == "return"]
    names: list[str] = []
    for tr in ranked:
        names += [k for k, m in tr.methods.items() if m.kind in kinds and k not in names]
    ranks: dict[str, list[float]] = {n: [] for n in names}
    diverged = dict.fromkeys(names, 0)
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for tr in ranked:
        ms = tr.methods
        present = [n for n in names if n in ms]
        if not present:
            continue
        sign = 1.0 if tr.metric == "loss" else -1.0
        key = {n: (ms[n].diverged_count, sign * ms[n].median) for n in present}
        for n in present:
            below = sum(key[m] < key[n] for m in present)
            tied = sum(key[m] == key[n] for m in present)
            ranks[n].append(below + (tied + 1) / 2)
            diverged[n] += ms[n].diverged_count
        if tr.metric == "loss":
            # The reference: the best median among the runs that never diverged.
            clean = [n for n in present if ms[n].diverged_count == 0] or present
            best = min(ms[n].median for n in clean)
            for n in present:
                ratios[n].append(_ratio(ms[n].median, best))
    table = [
        RankRow(n, float(np.mean(ranks[n])), diverged[n], geomean(ratios[n]) or math.nan)
        for n in names
        if ranks[n]
    ]
    return sorted(table, key=lambda row: (row.diverged_runs, row.mean_rank))


# ----------------------------------------------------------------------------
# Targets: each row is measured from the data.


@dataclasses.dataclass(frozen=True)
class Measure:
    figure: float | None
    text: str
    # A bound set by the data (the peers' figures); None: the target's own.
    bound: float | None = None


@dataclasses.dataclass(frozen=True)
class Target:
    """A target: ``figure op bound``; ``bound`` None means the peers' figure, measured."""

    key: str
    description: str
    op: str
    bound: float | None
    measure: Callable[[SetSummary, dict[str, TaskResult], str], Measure]
    goal: str = ""

    def evaluate(self, summary: SetSummary, results: dict[str, TaskResult], mode: str):
        m = self.measure(summary, results, mode)
        bound = self.bound if self.bound is not None else m.bound
        met = None
        if m.figure is not None and bound is not None:
            met = bool(OPS[self.op](m.figure, bound))
        goal = self.goal or f"{self.op} {self.bound:g}"
        return TargetResult(
            self.key, mode, self.description, goal, m.figure, bound, met, m.text, self.bound is None
        )


OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq}
NA = Measure(None, "n/a")


def _divergences(summary, results, mode):
    ran = [tr.methods[mode] for tr in results.values() if mode in tr.methods]
    if not ran:
        return NA
    diverged = sum(m.diverged_count for m in ran)
    where = [n for n, tr in results.items() if tr.methods.get(mode) and tr.methods[mode].diverged]
    where = [n for n in where if results[n].methods[mode].diverged_count]
    text = f"{diverged} of {sum(m.seeds for m in ran)} runs"
    return Measure(diverged, text + (f" ({', '.join(where)})" if where else ""))


def _rl_scores(summary, mode) -> dict[str, float]:
    return {
        e.task: e.normalised[mode]
        for e in summary.rl
        if e.normalised.get(mode) is not None and math.isfinite(e.normalised[mode])
    }


def _rl_mean(summary, results, mode):
    scores = _rl_scores(summary, mode)
    if not scores:
        return Measure(None, "n/a (no RL entry with a return to normalise)")
    mean = float(np.mean(list(scores.values())))
    return Measure(mean, f"{mean:.3f} over {len(scores)} entries")


def _rl_min(summary, results, mode):
    scores = _rl_scores(summary, mode)
    if not scores:
        return Measure(None, "n/a (no RL entry with a return to normalise)")
    worst = min(scores, key=lambda n: scores[n])
    return Measure(scores[worst], f"{scores[worst]:.3f} ({worst})")


def _rl_threshold(summary, results, mode):
    rows = [
        r
        for r in summary.stabilizer
        if r.mode == mode and results[r.task].rl and math.isfinite(r.threshold_to_norm_min)
    ]
    if not rows:
        return Measure(None, "n/a (no RL entry)")
    worst = min(rows, key=lambda r: r.threshold_to_norm_min)
    return Measure(worst.threshold_to_norm_min, f"{worst.threshold_to_norm_min:.3g} ({worst.task})")


def _rl_emergencies(summary, results, mode):
    rows = [r for r in summary.stabilizer if r.mode == mode]
    rows = [r for r in rows if r.emergencies_per_copy_max is not None]
    if not rows:
        return Measure(None, "n/a (no entry with target copies)")
    worst = max(rows, key=lambda r: r.emergencies_per_copy_max)
    return Measure(
        worst.emergencies_per_copy_max,
        f"{worst.emergencies_per_copy_max:.2f} ({worst.task}, {worst.copies} copies)",
    )


def _good_runs(summary, results, mode):
    good = summary.comparison.good_runs
    if not summary.comparison.tasks or mode not in good:
        return Measure(None, "n/a (no loss task)")
    peers = {p: good[p].total for p in PEERS if p in good}
    ours = good[mode].total
    text = f"{ours} of {good[mode].runs}; " + ", ".join(f"{p} {v}" for p, v in peers.items())
    return Measure(ours, text, max(peers.values()) if peers else None)


def _geomean_ratio(summary, results, mode):
    g = summary.comparison.geomean.get(mode)
    if g is None:
        return Measure(None, "n/a (no loss task)")
    return Measure(g, f"{g:.3f} over {len(summary.comparison.tasks)} entries")


def _geomean_vs_peers(summary, results, mode):
    geo = summary.comparison.geomean
    if geo.get(mode) is None:
        return Measure(None, "n/a (no loss task)")
    peers = {p: geo[p] for p in PEERS if geo.get(p) is not None}
    text = f"{geo[mode]:.3f}; " + ", ".join(f"{p} {v:.3f}" for p, v in peers.items())
    return Measure(geo[mode], text, min(peers.values()) if peers else None)


def _max_ratio(summary, results, mode):
    ratios = summary.comparison.ratios.get(mode, {})
    if not ratios:
        return Measure(None, "n/a (no loss task)")
    worst = max(ratios, key=lambda n: ratios[n])
    return Measure(ratios[worst], f"{ratios[worst]:.3f} ({worst})")


def _healthy(summary, results, mode):
    ratios = {n: r[mode] for n, r in summary.healthy.items() if mode in r}
    if not ratios:
        return Measure(None, "n/a (no healthy entry)")
    worst = max(ratios, key=lambda n: ratios[n])
    return Measure(ratios[worst], f"{ratios[worst]:.4f} ({worst})")


TARGETS: tuple[Target, ...] = (
    Target("divergences", "divergences, every entry and seed", "==", 0, _divergences),
    Target(
        "rl_return_mean", "RL: normalised return, mean over entries", ">=", TARGET_RL_MEAN, _rl_mean
    ),
    Target(
        "rl_return_min", "RL: normalised return, min over entries", ">=", TARGET_RL_MIN, _rl_min
    ),
    Target(
        "rl_threshold_to_norm",
        "RL: final threshold / median gradient norm, worst seed",
        ">=",
        TARGET_THRESHOLD_TO_NORM,
        _rl_threshold,
    ),
    Target(
        "rl_emergencies_per_copy",
        "emergencies per target-network copy, worst seed",
        "<=",
        TARGET_EMERGENCIES_PER_COPY,
        _rl_emergencies,
    ),
    Target(
        "good_runs",
        f"loss tasks: good runs (final <= {GOOD_RUN_FACTOR:g}x best fixed clip's median)",
        ">",
        None,
        _good_runs,
        goal="more than each of " + ", ".join(PEERS),
    ),
    Target(
        "geomean_ratio",
        "loss tasks: geomean of final loss / best fixed clip's",
        "<=",
        TARGET_GEOMEAN,
        _geomean_ratio,
    ),
    Target(
        "geomean_vs_peers",
        "loss tasks: that geomean against the peers'",
        "<",
        None,
        _geomean_vs_peers,
        goal="below each of " + ", ".join(PEERS),
    ),
    Target(
        "max_ratio",
        "loss tasks: final loss / best fixed clip's, worst entry",
        "<=",
        TARGET_MAX_RATIO,
        _max_ratio,
    ),
    Target(
        "healthy_ratio",
        "healthy tasks: final loss / no clipping's, worst entry",
        "<=",
        TARGET_HEALTHY_RATIO,
        _healthy,
    ),
)


def summarise(set_name: str, results: dict[str, TaskResult], rules: bool = False) -> SetSummary:
    """Comparisons, RL scores, the stabilizer's figures, rankings and targets of one set."""
    summary = SetSummary(
        set=set_name,
        tasks=list(results),
        comparison=loss_comparison(results),
        rl=rl_entries(results),
        healthy=healthy_ratios(results),
        stabilizer=stabilizer_rows(results),
        targets=[],
        ranking=rank_methods(results, ("baseline", "stabilizer")),
    )
    if rules:
        summary.rule_ranking = rank_methods(results, ("rule",))
        summary.rule_ranking_data_mode = rank_methods(results, ("rule (data)",))
    for mode in MODES:
        if any(mode in tr.methods for tr in results.values()):
            summary.targets += [t.evaluate(summary, results, mode) for t in TARGETS]
    return summary


# ----------------------------------------------------------------------------
# Tables.


def _fmt(x: float | None, digits: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return ("inf" if x > 0 else "-inf") if math.isinf(x) else format(x, digits)


def _median_max(values: Sequence[float], digits: str = "g") -> str:
    return f"{format(float(np.median(values)), digits)} / {format(float(max(values)), digits)}"


def format_task_tables(results: dict[str, TaskResult]) -> str:
    lines = []
    for name, tr in results.items():
        best_label, _ = best_fixed(tr)
        group = "healthy" if tr.stable else tr.kind
        extra = ""
        if tr.target_copies:
            extra = f", target copied every {tr.target_period} steps ({tr.target_copies}x)"
        lines.append(
            f"\n#### {name} ({group}): {tr.description} ({tr.base_optimizer}, lr "
            f"{tr.learning_rate:g}, {tr.steps} steps, {tr.seeds} seeds{extra})\n"
        )
        score = "final loss" if tr.metric == "loss" else "final return"
        lines += [
            f"| method | diverged | {score} (median) | worst seed | spikes (mean) "
            "| emergencies | explosions (share of steps) | clips (share) | non-finite "
            "| threshold / median norm |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label, m in tr.methods.items():
            mark = " (best fixed)" if label == best_label and tr.metric == "loss" else ""
            alias = f" (= {m.alias_of})" if m.alias_of and m.kind == "baseline" else ""
            spikes = f"{np.mean(m.spikes):.1f}" if m.spikes is not None else "-"
            s = m.stabilizer
            if s is None:
                stats = " | ".join("-" for _ in range(5))
            else:
                ratio = [x for x in s.threshold_to_norm if math.isfinite(x)] or [math.nan]
                stats = " | ".join(
                    [
                        _median_max(s.emergencies),
                        _median_max(s.explosion_fraction, ".3f"),
                        _median_max(s.clip_fraction, ".3f"),
                        _median_max(s.nonfinite),
                        f"{np.median(ratio):.3g} (min {min(ratio):.3g})",
                    ]
                )
            lines.append(
                f"| {label}{mark}{alias} | {m.diverged_count}/{m.seeds} | {m.median:.4g} "
                f"| {m.worst:.4g} | {spikes} | {stats} |"
            )
    lines.append(
        "\n(stabilizer figures: median / max over seeds, of its first state; (= x): the rows "
        "of x, which this method repeats exactly here)"
    )
    return "\n".join(lines)


def format_comparison(comparison: LossComparison) -> str:
    if not comparison.tasks:
        return "(no loss task with a finite best fixed clip)"
    shown = [m for m in (*MODES, *PEERS) if m in comparison.ratios]
    lines = [
        "| entry | best fixed | its median | " + " | ".join(shown) + " |",
        "|---|---|---|" + "---|" * len(shown),
    ]
    for name in comparison.tasks:
        b = comparison.best_fixed[name]
        cells = [_fmt(comparison.ratios[m].get(name)) for m in shown]
        lines.append(f"| {name} | {b.label} | {b.final:.4g} | " + " | ".join(cells) + " |")
    geo = comparison.geomean
    lines.append("| **geomean** | | | " + " | ".join(_fmt(geo.get(m)) for m in shown) + " |")
    lines.append(
        "| **max** | | | "
        + " | ".join(_fmt(max(comparison.ratios[m].values(), default=None)) for m in shown)
        + " |"
    )
    if comparison.skipped:
        lines.append(
            "\nleft out: " + "; ".join(f"{n} ({why})" for n, why in comparison.skipped.items())
        )
    return "\n".join(lines)


def format_good_runs(comparison: LossComparison) -> str:
    tasks = comparison.tasks
    if not tasks:
        return "(no loss task with a finite best fixed clip)"
    lines = [
        "| method | good runs | " + " | ".join(tasks) + " |",
        "|---|---|" + "---|" * len(tasks),
        f"| *bar ({GOOD_RUN_FACTOR:g} x best fixed median)* | | "
        + " | ".join(f"{comparison.best_fixed[n].good_bar:.4g}" for n in tasks)
        + " |",
    ]
    good = comparison.good_runs
    for method in sorted(good, key=lambda m: -good[m].total):
        g = good[method]
        cells = [str(g.per_task.get(n, "-")) for n in tasks]
        lines.append(f"| {method} | {g.total}/{g.runs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_healthy(results: dict[str, TaskResult], healthy: dict[str, dict[str, float]]) -> str:
    if not healthy:
        return "(no healthy entry)"
    lines = [
        "| entry | no clipping diverged | no clipping final | "
        + " | ".join(f"{m} final | ratio" for m in MODES)
        + " |",
        "|---|---|---|" + "---|---|" * len(MODES),
    ]
    for name, ratios in healthy.items():
        ms = results[name].methods
        ref = ms["no clipping"]
        cells = [
            f"{_fmt(ms[m].median if m in ms else None, '.4g')} | {_fmt(ratios.get(m), '.4f')}"
            for m in MODES
        ]
        lines.append(
            f"| {name} | {ref.diverged_count}/{ref.seeds} | {ref.median:.4g} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def format_rl(summary: SetSummary) -> str:
    if not summary.rl:
        return "(no RL entry with a return)"
    shown = [m for m in (*MODES, *PEERS[1:]) if any(m in e.normalised for e in summary.rl)]
    lines = [
        "| entry | random | best reference (median) | "
        + " | ".join(f"{m}: return | normalised" for m in shown)
        + " |",
        "|---|---|---|" + "---|---|" * len(shown),
    ]
    for e in summary.rl:
        ref = f"{e.best_label} ({_fmt(e.best_return, '.4g')})" if e.best_label else "-"
        cells = [f"{_fmt(e.returns.get(m), '.4g')} | {_fmt(e.normalised.get(m))}" for m in shown]
        note = f" ({e.note})" if e.note else ""
        lines.append(
            f"| {e.task}{note} | {_fmt(e.random_return, '.4g')} | {ref} | "
            + " | ".join(cells)
            + " |"
        )
    for label, fn in (("mean", np.mean), ("min", np.min)):
        cells = []
        for m in shown:
            v = [
                e.normalised[m]
                for e in summary.rl
                if e.normalised.get(m) is not None and math.isfinite(e.normalised[m])
            ]
            cells.append(f" | {_fmt(float(fn(v))) if v else '-'}")
        lines.append(f"| **{label}** | | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_stabilizer(summary: SetSummary, results: dict[str, TaskResult]) -> str:
    if not summary.stabilizer:
        return "(no stabilizer run)"
    lines = [
        "| entry | mode | explosions (share of steps) | clips (share) | emergencies (max) "
        "| per target copy (max) | non-finite (max) | threshold / median norm (median, min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary.stabilizer:
        per_copy = (
            f"{r.emergencies_per_copy_max:.2f} ({r.copies} copies)"
            if r.emergencies_per_copy_max is not None
            else "-"
        )
        rl = " (RL)" if results[r.task].rl else ""
        lines.append(
            f"| {r.task}{rl} | {r.mode} | {r.explosion_fraction:.3f} | {r.clip_fraction:.3f} "
            f"| {r.emergencies_max} | {per_copy} | {r.nonfinite_max} "
            f"| {_fmt(r.threshold_to_norm_median, '.3g')}, {_fmt(r.threshold_to_norm_min, '.3g')} |"
        )
    return "\n".join(lines)


def format_ranking(ranking: list[RankRow]) -> str:
    lines = [
        "| method | mean rank | diverged runs | geomean final loss / best |",
        "|---|---|---|---|",
    ]
    for row in ranking:
        lines.append(
            f"| {row.method} | {row.mean_rank:.2f} | {row.diverged_runs} "
            f"| {_fmt(row.geomean_ratio_to_best)} |"
        )
    return "\n".join(lines)


VERDICT = {True: "met", False: "MISSED", None: "n/a"}


def format_targets(targets: list[TargetResult]) -> str:
    """One row per target, a figure and a verdict per stabilizer mode."""
    modes = [m for m in MODES if any(t.mode == m for t in targets)]
    rows: dict[str, dict[str, TargetResult]] = {}
    for t in targets:
        rows.setdefault(t.key, {})[t.mode] = t
    lines = [
        "| target | goal | " + " | ".join(f"{m} | verdict" for m in modes) + " |",
        "|---|---|" + "---|---|" * len(modes),
    ]
    for by_mode in rows.values():
        first = next(iter(by_mode.values()))
        cells = []
        for m in modes:
            t = by_mode.get(m)
            if t is None:
                cells.append("- | -")
                continue
            # A bound set by the peers is shown with the figure.
            bound = f" (bound {t.bound:.4g})" if t.bound_from_data and t.bound is not None else ""
            cells.append(f"{t.text}{bound} | {VERDICT[t.met]}")
        lines.append(f"| {first.description} | {first.goal} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_set(summary: SetSummary, results: dict[str, TaskResult], rules: bool = False) -> str:
    """Every table of one set, under its own heading."""
    parts = [
        f"\n## {summary.set} set ({len(summary.tasks)} entries)",
        format_task_tables(results),
        "\n### Loss tasks: final loss / best fixed clip's (median over seeds)\n",
        format_comparison(summary.comparison),
        f"\n### Good runs: seeds with final loss <= {GOOD_RUN_FACTOR:g}x the best fixed "
        "clip's median\n",
        format_good_runs(summary.comparison),
        "\n### Healthy tasks: final loss against no clipping\n",
        format_healthy(results, summary.healthy),
        "\n### RL: normalised return (R - R_random) / (R_best - R_random), R_best the best "
        "median among no clipping, the fixed clips and AGC\n",
        format_rl(summary),
        "\n### The stabilizer's own figures\n",
        format_stabilizer(summary, results),
    ]
    if rules:
        parts += [
            "\n### Adaptation rules, threshold from the learning rate (mean rank)\n",
            format_ranking(summary.rule_ranking),
            "\n### Adaptation rules, data mode (mean rank)\n",
            format_ranking(summary.rule_ranking_data_mode),
        ]
    parts += [
        "\n### All methods (mean rank)\n",
        format_ranking(summary.ranking),
        f"\n### Targets, {summary.set} set\n",
        format_targets(summary.targets),
    ]
    return "\n".join(parts)


# ----------------------------------------------------------------------------
# Plot.


def plot(results: dict[str, TaskResult], path, title: str = "") -> None:
    """Median curves per entry: no clipping, the best fixed clip, the stabilizer (both modes).

    Loss entries on a log scale stopped at 3x the largest initial loss (a
    diverging curve leaves the plot instead of flattening the others);
    return entries on a linear scale. Grey verticals: target copies.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    if not n:
        return
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (name, tr) in zip(axes.flat, results.items(), strict=False):
        label_best, final_best = best_fixed(tr)
        lines = [("no clipping", "no clipping", dict(color="0.6", lw=1.0))]
        if math.isfinite(final_best):
            lines.append((label_best, f"{label_best} (best fixed)", dict(color="tab:blue", lw=1.2)))
        if "GradScaler + clip 1" in tr.curves:
            lines.append(("GradScaler + clip 1", "GradScaler + clip 1", dict(color="tab:green")))
        lines.append(("stabilizer", "stabilizer", dict(color="tab:red", lw=1.4)))
        lines.append(
            ("stabilizer (data)", "stabilizer (data)", dict(color="tab:red", lw=1.0, ls="--"))
        )
        top = 0.0
        for label, legend, style in lines:
            if label not in tr.curves:
                continue
            curve = np.asarray(tr.curves[label], dtype=float)
            finite = curve[np.isfinite(curve)]
            if finite.size:
                top = max(top, float(finite[0]))
            ax.plot(np.arange(curve.size) * tr.curve_stride, curve, label=legend, **style)
        for k in range(1, tr.target_copies + 1):
            ax.axvline(k * tr.target_period, color="0.8", lw=0.8, zorder=0)
        if tr.metric == "loss":
            ax.set_yscale("log")
            if top > 0:
                ax.set_ylim(top=3 * top)
        ax.set_ylabel("loss" if tr.metric == "loss" else "return")
        healthy = ", healthy" if tr.stable else ""
        ax.set_title(f"{name} ({tr.base_optimizer}{healthy})", fontsize=8)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
