"""The stability suite's results: one run's scores, one method's rows, one task's table.

Typed records (dataclasses) that the driver fills from the arrays of a run,
and that ``report.py`` reads; each one goes to and comes back from JSON
(``to_json`` / ``from_json``) unchanged, so that ``--from-json`` re-derives
every table without training.

Per run (one method, one seed):

- *final*: the mean of the report over the last 10% of the steps: the final
  loss (metric "loss"; ``inf`` when not finite) or the final return (metric
  "return", higher is better);
- *diverged*: a non-finite final parameter; and, on a loss task, a non-finite
  loss at any step or a final loss above ``DIVERGENCE_FACTOR`` x the initial
  one (the mean of the first 5 finite steps);
- *spikes* (loss tasks): steps whose loss exceeds ``SPIKE_FACTOR`` x the
  median of the previous ``SPIKE_WINDOW`` steps;
- *non-finite gradient steps*: steps whose gradient norm was not finite;
- for a method with a stabilizer in its state: its final counters, its final
  ``clip_threshold`` and the median over the run of its ``last_grad_norm``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np

DIVERGENCE_FACTOR = 10.0
SPIKE_FACTOR = 3.0
SPIKE_WINDOW = 50
FINAL_SHARE = 0.1  # the final score: mean of the report over the last 10% of the steps
INITIAL_STEPS = 5  # the initial loss: mean of the first finite losses among these steps

# The stabilizer's fields read at the end of a run (of its first state), in this order.
STAT_FIELDS = ("emergency_count", "explosion_count", "clip_count", "nonfinite_count")
FINAL_FIELDS = (*STAT_FIELDS, "clip_threshold")


@dataclasses.dataclass
class StabilizerRuns:
    """The stabilizer's own figures at the end of each seed's run (lists over the seeds)."""

    emergencies: list[int]
    explosions: list[int]
    clips: list[int]
    nonfinite: list[int]
    final_threshold: list[float]
    median_norm: list[float]
    steps: int
    # Hard target-network copies after which the run went on (0: none).
    copies: int = 0

    @property
    def explosion_fraction(self) -> list[float]:
        return [x / self.steps for x in self.explosions]

    @property
    def clip_fraction(self) -> list[float]:
        return [x / self.steps for x in self.clips]

    @property
    def threshold_to_norm(self) -> list[float]:
        """Final threshold / median gradient norm over the run, per seed (nan if undefined)."""
        return [
            t / n if (n > 0 and math.isfinite(n) and math.isfinite(t)) else math.nan
            for t, n in zip(self.final_threshold, self.median_norm, strict=True)
        ]

    @property
    def emergencies_per_copy(self) -> list[float] | None:
        if not self.copies:
            return None
        return [e / self.copies for e in self.emergencies]


@dataclasses.dataclass
class MethodResult:
    """One method's runs on one task, over the seeds."""

    label: str
    kind: str
    metric: str
    final: list[float]
    initial: list[float]
    diverged: list[bool]
    nonfinite_grad_steps: list[int]
    spikes: list[int] | None = None
    stabilizer: StabilizerRuns | None = None
    compile_s: float = 0.0
    run_s: float = 0.0
    # The label whose runs these rows are (a run that would repeat it exactly).
    alias_of: str | None = None

    @property
    def seeds(self) -> int:
        return len(self.final)

    @property
    def diverged_count(self) -> int:
        return int(sum(self.diverged))

    @property
    def median(self) -> float:
        """The median over the seeds of the final loss or return."""
        return float(np.median(self.final))

    @property
    def worst(self) -> float:
        """The worst seed: the highest final loss, or the lowest final return."""
        return float(max(self.final) if self.metric == "loss" else min(self.final))

    @property
    def saw_nonfinite(self) -> bool:
        """Whether any seed met a non-finite gradient or reported a non-finite loss."""
        return any(n > 0 for n in self.nonfinite_grad_steps) or not all(
            math.isfinite(x) for x in self.final
        )

    def renamed(self, label: str, kind: str, alias_of: str) -> MethodResult:
        return dataclasses.replace(self, label=label, kind=kind, alias_of=alias_of)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MethodResult:
        data = dict(data)
        stab = data.pop("stabilizer", None)
        return cls(**data, stabilizer=None if stab is None else StabilizerRuns(**stab))


@dataclasses.dataclass
class TaskResult:
    """Every method on one entry of the suite (a task at one learning rate)."""

    name: str
    task: str
    set: str
    kind: str
    description: str
    base_optimizer: str
    learning_rate: float
    steps: int
    seeds: int
    stable: bool
    metric: str
    compare_losses: bool
    random_return: float | None
    target_period: int | None
    stabilizer_loss_scaling: bool
    stabilizer_initial_threshold: float
    methods: dict[str, MethodResult] = dataclasses.field(default_factory=dict)
    # Median curve per label over the seeds (smoothed; every ``curve_stride``-th step).
    curves: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    curve_stride: int = 1

    @property
    def target_copies(self) -> int:
        """Target-network copies after which a run goes on (0 for a task without a target)."""
        if not self.target_period:
            return 0
        return (self.steps - 1) // self.target_period

    @property
    def rl(self) -> bool:
        return self.kind == "RL"

    def to_json(self, curves: bool = False) -> dict[str, Any]:
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("methods", "curves")
        }
        out["methods"] = {label: m.to_json() for label, m in self.methods.items()}
        if curves:
            out["curves"] = self.curves
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], curves: dict[str, list[float]] | None = None):
        data = dict(data)
        methods = {k: MethodResult.from_json(v) for k, v in data.pop("methods").items()}
        data.pop("curves", None)
        return cls(**data, methods=methods, curves=curves or {})


# ----------------------------------------------------------------------------
# Scoring the arrays of a run.


def _tail(steps: int) -> int:
    return max(1, round(steps * FINAL_SHARE))


def score_runs(
    reports: np.ndarray, finite_params: np.ndarray, metric: str
) -> tuple[list[float], list[float], list[bool], list[int] | None]:
    """``(final, initial, diverged, spikes)`` per seed; ``reports`` is [seeds, steps].

    ``finite_params`` [seeds]: whether every final parameter is finite.
    """
    steps = reports.shape[1]
    tail = _tail(steps)
    with np.errstate(invalid="ignore", over="ignore"):
        final = np.mean(reports[:, -tail:], axis=1)
    finite_params = np.asarray(finite_params, dtype=bool)
    if metric == "return":
        final = np.where(np.isfinite(final), final, -np.inf)
        diverged = ~finite_params
        initial = np.mean(reports[:, : min(INITIAL_STEPS, steps)], axis=1)
        return (
            [float(x) for x in final],
            [float(x) for x in initial],
            [bool(x) for x in diverged],
            None,
        )
    head = reports[:, : min(INITIAL_STEPS, steps)]
    with warnings.catch_warnings():
        # A run whose first steps are all non-finite has no initial loss (nan).
        warnings.simplefilter("ignore", RuntimeWarning)
        initial = np.nanmean(np.where(np.isfinite(head), head, np.nan), axis=1)
    final = np.where(np.isfinite(final), final, np.inf)
    with np.errstate(invalid="ignore"):
        too_high = final > DIVERGENCE_FACTOR * initial
    diverged = ~finite_params | ~np.all(np.isfinite(reports), axis=1) | too_high
    return (
        [float(x) for x in final],
        [float(x) for x in initial],
        [bool(x) for x in diverged],
        [int(x) for x in count_spikes(reports)],
    )


def count_spikes(losses: np.ndarray) -> np.ndarray:
    """Steps whose loss exceeds ``SPIKE_FACTOR`` x the median of the previous window, per seed."""
    seeds, steps = losses.shape
    if steps <= SPIKE_WINDOW:
        return np.zeros(seeds, dtype=int)
    windows = np.lib.stride_tricks.sliding_window_view(losses, SPIKE_WINDOW, axis=1)
    with np.errstate(invalid="ignore"):
        ref = np.median(windows[:, :-1], axis=-1)
        cur = losses[:, SPIKE_WINDOW:]
        return np.sum(np.isfinite(cur) & (cur > SPIKE_FACTOR * ref), axis=1)


def stabilizer_runs(final_stats: np.ndarray, norms: np.ndarray, copies: int) -> StabilizerRuns:
    """The stabilizer's figures: ``final_stats`` [seeds, FINAL_FIELDS], ``norms`` [seeds, steps]."""
    steps = norms.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        median_norm = np.nanmedian(np.where(np.isfinite(norms), norms, np.nan), axis=1)
    column = {f: final_stats[:, i] for i, f in enumerate(FINAL_FIELDS)}
    return StabilizerRuns(
        emergencies=[int(x) for x in column["emergency_count"]],
        explosions=[int(x) for x in column["explosion_count"]],
        clips=[int(x) for x in column["clip_count"]],
        nonfinite=[int(x) for x in column["nonfinite_count"]],
        final_threshold=[float(x) for x in column["clip_threshold"]],
        median_norm=[float(x) for x in median_norm],
        steps=steps,
        copies=copies,
    )


def median_curve(reports: np.ndarray, smooth: int) -> np.ndarray:
    """The median over seeds at each step (non-finite values left out), smoothed over ``smooth``."""
    clean = np.where(np.isfinite(reports), reports, np.nan)
    with warnings.catch_warnings():
        # Steps where every seed is non-finite stay NaN (a gap in the plot).
        warnings.simplefilter("ignore", RuntimeWarning)
        curve = np.nanmedian(clean, axis=0)
    if smooth > 1 and curve.size >= smooth:
        kernel = np.ones(smooth) / smooth
        padded = np.concatenate([np.full(smooth - 1, curve[0]), curve])
        curve = np.convolve(padded, kernel, mode="valid")
    return curve
