"""Stability analytics: a typed report for humans and a flat metrics dict for loggers.

SPEC.md, section "Stability report", defines every number here: the window,
the stability score, the flow efficiency, the status rules and their
precedence, and the learning-rate recommendation.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

# This module imports no framework at module level: the PyTorch adapter builds
# its report with build_report too. JAX is imported by the functions that read
# an optax state (stability_reports, metrics).
from optax_gradflow.constants import Event, host_chronological

if TYPE_CHECKING:
    import jax

    from optax_gradflow.state import GradientFlowState


# Status thresholds (SPEC.md, "Stability report").
STABLE_SCORE = 0.8
CRITICAL_SCORE = 0.5
VANISHING_RISK_RATE = 0.1

# Learning-rate recommendation (SPEC.md, "Stability report").
HIGH_UPDATE_RATIO = 1e-2
LOW_UPDATE_RATIO = 1e-5
LR_FACTOR = 2.0

STATUSES = ("healthy", "unstable", "critical", "vanishing_risk")
RECOMMENDATIONS = ("keep", "decrease", "increase")

_UNSTABLE_FLAGS = Event.EXPLOSION | Event.NONFINITE


@dataclasses.dataclass(frozen=True)
class EventCounts:
    """Counts of each kind of event.

    ``adaptations`` is None for the totals (and left out of
    :meth:`StabilityReport.as_dict`): the state counts adaptations only in the
    event window.
    """

    explosions: int
    nonfinite: int
    vanishing: int
    clipped: int
    emergencies: int
    warnings: int
    adaptations: int | None


@dataclasses.dataclass(frozen=True)
class NormStatistics:
    """Statistics of the norm history (finite, non-exploding unscaled norms).

    Computed in float64 on the host; ``std`` is the population standard
    deviation; percentiles use numpy's default linear interpolation. All None
    when the history is empty.
    """

    count: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    p50: float | None
    p90: float | None
    p99: float | None


@dataclasses.dataclass(frozen=True)
class StabilityReport:
    """The state of one stabilizer at one step (SPEC.md, "Stability report").

    Histories are tuples, oldest first. Float fields may be NaN or inf (e.g.
    ``last_grad_norm`` of a non-finite step); :meth:`as_dict` turns those into
    None so that strict JSON accepts the result.

    Attributes:
      path: the stabilizer's key path in the optimizer state ("" at the root).
      status: ``"healthy"``, ``"unstable"``, ``"critical"`` or ``"vanishing_risk"``.
      step: ``stabilizer_step``, updates processed.
      stability_score: share of the window's steps with neither explosion nor
        non-finite norm; 1.0 for an empty window.
      flow_efficiency: 1 - share of the window's steps that were clipped; 1.0
        for an empty window.
      window_steps: steps in the event window (``event_flags_count``).
      window_start_step: step of the oldest entry of the window.
      total: counts over the whole run (the state's counters).
      window: counts over the event window (from the event flags).
      grad_norm: statistics of the norm history.
      last_grad_norm: unscaled norm of the latest step.
      norm_history: the norm history, oldest first.
      event_flags: the event flags of the window, oldest first.
      norm_trend: log-norm slope of the last diagnostics run.
      early_warning: warning of the last diagnostics run.
      variance_history: windowed variances of the diagnostics runs, oldest first.
      variance_trend: least-squares slope of ``variance_history`` against the
        run index (norm^2 per diagnostics run); None with fewer than 2 runs.
      clip_threshold: the threshold of the next step.
      threshold_history: thresholds set by adaptations and emergencies.
      warmup_steps_left: data warm-up steps still to run.
      loss_scale: the current loss scale.
      loss_scale_history: loss scales, starting with the initial one.
      emergency_steps: steps of the emergency interventions still in the ring.
      consecutive_explosions: explosions or non-finite steps in a row.
      stable_streak: steps in a row with neither explosion nor non-finite norm.
      last_loss: the latest ``value=`` given to update (NaN if none).
      update_ratio_last: latest ``|update| / |params|``; None outside
        :func:`optax_gradflow.stabilized` or before the first applied step.
      update_ratio_median: median of the recorded ratios; None likewise.
      update_ratio_count: ratios recorded (None outside the wrapper form).
      lr_recommendation: ``"keep"``, ``"decrease"`` or ``"increase"``.
      lr_factor: multiply the learning rate by this (1.0, 0.5 or 2.0).
      lr_reason: why, in words.
    """

    path: str
    status: str
    step: int
    stability_score: float
    flow_efficiency: float
    window_steps: int
    window_start_step: int
    total: EventCounts
    window: EventCounts
    grad_norm: NormStatistics
    last_grad_norm: float
    norm_history: tuple[float, ...]
    event_flags: tuple[int, ...]
    norm_trend: float
    early_warning: bool
    variance_history: tuple[float, ...]
    variance_trend: float | None
    clip_threshold: float
    threshold_history: tuple[float, ...]
    warmup_steps_left: int
    loss_scale: float
    loss_scale_history: tuple[float, ...]
    emergency_steps: tuple[int, ...]
    consecutive_explosions: int
    stable_streak: int
    last_loss: float
    update_ratio_last: float | None
    update_ratio_median: float | None
    update_ratio_count: int | None
    lr_recommendation: str
    lr_factor: float
    lr_reason: str

    def as_dict(self) -> dict[str, Any]:
        """Plain Python values only: ints, floats, bools, str, lists, dicts.

        Every field has a value or is left out: a field that is None (the
        totals' ``adaptations``, which the state does not count; the update
        ratio outside :func:`optax_gradflow.stabilized`; the norm statistics of
        an empty history) or a non-finite float (``last_loss`` before any loss,
        ``last_grad_norm`` of a skipped step) is omitted. A non-finite entry of
        a list (a history) becomes None, so that the list keeps its length.
        ``json.dumps(report.as_dict(), allow_nan=False)`` succeeds.
        """
        return _plain(dataclasses.asdict(self))

    def summary(self) -> str:
        """A few human-readable lines."""
        stats = self.grad_norm
        median = "n/a" if stats.p50 is None else f"{stats.p50:.4g}"
        return "\n".join(
            [
                f"{self.path or 'stabilizer'} at step {self.step}: {self.status}",
                f"  stability score {self.stability_score:.3f}, flow efficiency "
                f"{self.flow_efficiency:.3f} over {self.window_steps} steps",
                f"  explosions {self.total.explosions} (window {self.window.explosions}), "
                f"non-finite {self.total.nonfinite}, vanishing {self.total.vanishing}, "
                f"emergencies {self.total.emergencies}",
                f"  clip threshold {self.clip_threshold:.4g}, loss scale {self.loss_scale:.4g}, "
                f"median norm {median}",
                f"  learning rate: {self.lr_recommendation} (x{self.lr_factor:g}): "
                f"{self.lr_reason}",
            ]
        )


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items() if not _missing(item)}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --- Host-side computations ---------------------------------------------------


def window_counts(flags: np.ndarray) -> EventCounts:
    """Counts of each event over the given (valid) event flags."""

    def count(flag: int) -> int:
        return int(np.count_nonzero(flags & flag))

    return EventCounts(
        explosions=count(Event.EXPLOSION),
        nonfinite=count(Event.NONFINITE),
        vanishing=count(Event.VANISHING),
        clipped=count(Event.CLIPPED),
        emergencies=count(Event.EMERGENCY),
        warnings=count(Event.WARNING),
        adaptations=count(Event.ADAPTED),
    )


def score_of_flags(flags: np.ndarray) -> float:
    """Share of steps with neither explosion nor non-finite norm; 1.0 if there are none."""
    if flags.size == 0:
        return 1.0
    return 1.0 - int(np.count_nonzero(flags & _UNSTABLE_FLAGS)) / int(flags.size)


def norm_statistics(norms: np.ndarray) -> NormStatistics:
    """Mean, population std, min, max and linear percentiles of ``norms``."""
    values = np.asarray(norms, np.float64)
    if values.size == 0:
        return NormStatistics(0, None, None, None, None, None, None, None)
    p50, p90, p99 = np.percentile(values, [50.0, 90.0, 99.0])
    return NormStatistics(
        count=int(values.size),
        mean=float(values.mean()),
        std=float(values.std()),
        min=float(values.min()),
        max=float(values.max()),
        p50=float(p50),
        p90=float(p90),
        p99=float(p99),
    )


def _slope(values: np.ndarray) -> float | None:
    if values.size < 2:
        return None
    x = np.arange(values.size, dtype=np.float64)
    y = np.asarray(values, np.float64)
    xc = x - x.mean()
    return float(np.sum(xc * (y - y.mean())) / np.sum(xc * xc))


def classify(score: float, window: EventCounts, window_steps: int, early_warning: bool) -> str:
    """The status, first match wins (SPEC.md, "Stability report")."""
    if window.emergencies > 0 or score < CRITICAL_SCORE:
        return "critical"
    if score <= STABLE_SCORE or early_warning:
        return "unstable"
    if window_steps > 0 and window.vanishing / window_steps >= VANISHING_RISK_RATE:
        return "vanishing_risk"
    return "healthy"


def nonfinite_cause(flags: np.ndarray, early_warning: bool) -> bool:
    """Whether the window of event ``flags`` is unstable only because of non-finite steps.

    True when it has non-finite steps and would be stable without them: its
    explosions alone leave a score above ``STABLE_SCORE``, the diagnostics
    raised no warning, and each emergency in it ends a run of unstable steps
    (explosion or non-finite, going back from the emergency's own step) that
    holds no explosion: an emergency that non-finite steps in a row fired.
    """
    flags = np.asarray(flags)
    if early_warning or not np.any(flags & Event.NONFINITE):
        return False
    if 1.0 - np.count_nonzero(flags & Event.EXPLOSION) / flags.size <= STABLE_SCORE:
        return False
    for j in np.flatnonzero(flags & Event.EMERGENCY):
        k = int(j)
        while k >= 0 and flags[k] & _UNSTABLE_FLAGS:
            if flags[k] & Event.EXPLOSION:
                return False
            k -= 1
    return True


def recommend(
    status: str, median_ratio: float | None, *, nonfinite_only: bool = False, nonfinite: int = 0
) -> tuple[str, float, str]:
    """(recommendation, factor, reason), first match wins (SPEC.md, "Stability report").

    ``nonfinite_only`` (see :func:`nonfinite_cause`): the instability is
    non-finite gradients, which a smaller learning rate does not cure, so no
    cut is advised for it.
    """
    if status in ("critical", "unstable") and nonfinite_only:
        return (
            "keep",
            1.0,
            f"status is {status} because of {nonfinite} non-finite gradient steps (skipped); "
            "a smaller learning rate does not cure non-finite gradients: look for their cause "
            "(a bad batch, an overflow in the loss; in float16, loss scaling)",
        )
    if status in ("critical", "unstable"):
        return "decrease", 1.0 / LR_FACTOR, f"status is {status}"
    if median_ratio is not None and median_ratio > HIGH_UPDATE_RATIO:
        return (
            "decrease",
            1.0 / LR_FACTOR,
            f"median |update| / |params| {median_ratio:.3g} > {HIGH_UPDATE_RATIO:g}",
        )
    if status == "healthy" and median_ratio is not None and median_ratio < LOW_UPDATE_RATIO:
        return (
            "increase",
            LR_FACTOR,
            f"healthy and median |update| / |params| {median_ratio:.3g} < {LOW_UPDATE_RATIO:g}",
        )
    if median_ratio is None:
        return "keep", 1.0, f"status is {status}; no update ratio recorded"
    return "keep", 1.0, f"status is {status}; median |update| / |params| {median_ratio:.3g}"


def _ratios(wrapper: Any) -> np.ndarray | None:
    if wrapper is None:
        return None
    history, index, count = wrapper
    return host_chronological(history, index, count)


def build_report(
    state: Mapping[str, Any], path: str = "", update_ratios: Any = None
) -> StabilityReport:
    """The report of one stabilizer state given as plain host arrays (SPEC.md, "Stability report").

    Framework-free: ``state`` maps every ``GradientFlowState`` field name to
    a numpy array (or anything ``numpy.asarray`` takes), so the JAX state
    (``optax_gradflow.state.to_flat(state)`` after ``jax.device_get``) and the PyTorch adapter's
    state dict (tensors moved to the CPU) give the same report.
    ``update_ratios`` is the wrapper's ``(history, index, count)`` ring, or
    None outside :func:`optax_gradflow.stabilized`.
    """
    s = types.SimpleNamespace(**{name: np.asarray(value) for name, value in state.items()})
    ratio_ring = update_ratios
    flags = host_chronological(s.event_flags, s.event_flags_index, s.event_flags_count)
    steps = int(flags.size)
    window = window_counts(flags)
    score = score_of_flags(flags)
    efficiency = 1.0 - window.clipped / steps if steps else 1.0
    norms = host_chronological(s.norm_history, s.norm_history_index, s.norm_history_count)
    variances = host_chronological(
        s.variance_history, s.variance_history_index, s.variance_history_count
    )
    early_warning = bool(s.early_warning)
    status = classify(score, window, steps, early_warning)

    ratios = _ratios(ratio_ring)
    if ratios is None or ratios.size == 0:
        ratio_last = ratio_median = None
    else:
        ratio_last = float(ratios[-1])
        ratio_median = float(np.median(ratios.astype(np.float64)))
    recommendation, factor, reason = recommend(
        status,
        ratio_median,
        nonfinite_only=nonfinite_cause(flags, early_warning),
        nonfinite=window.nonfinite,
    )

    def floats(values: np.ndarray) -> tuple[float, ...]:
        return tuple(float(v) for v in values)

    step = int(s.stabilizer_step)
    return StabilityReport(
        path=path,
        status=status,
        step=step,
        stability_score=float(score),
        flow_efficiency=float(efficiency),
        window_steps=steps,
        window_start_step=step - steps,
        total=EventCounts(
            explosions=int(s.explosion_count),
            nonfinite=int(s.nonfinite_count),
            vanishing=int(s.vanishing_count),
            clipped=int(s.clip_count),
            emergencies=int(s.emergency_count),
            warnings=int(s.warning_count),
            adaptations=None,
        ),
        window=window,
        grad_norm=norm_statistics(norms),
        last_grad_norm=float(s.last_grad_norm),
        norm_history=floats(norms),
        event_flags=tuple(int(f) for f in flags),
        norm_trend=float(s.norm_trend),
        early_warning=early_warning,
        variance_history=floats(variances),
        variance_trend=_slope(variances),
        clip_threshold=float(s.clip_threshold),
        threshold_history=floats(
            host_chronological(
                s.threshold_history, s.threshold_history_index, s.threshold_history_count
            )
        ),
        warmup_steps_left=int(s.warmup_steps_left),
        loss_scale=float(s.loss_scale),
        loss_scale_history=floats(
            host_chronological(
                s.loss_scale_history, s.loss_scale_history_index, s.loss_scale_history_count
            )
        ),
        emergency_steps=tuple(
            int(v)
            for v in host_chronological(
                s.emergency_steps, s.emergency_steps_index, s.emergency_steps_count
            )
        ),
        consecutive_explosions=int(s.consecutive_explosions),
        stable_streak=int(s.stable_streak),
        last_loss=float(s.last_loss),
        update_ratio_last=ratio_last,
        update_ratio_median=ratio_median,
        update_ratio_count=None if ratios is None else int(ratios.size),
        lr_recommendation=recommendation,
        lr_factor=factor,
        lr_reason=reason,
    )


# --- Finding the stabilizers --------------------------------------------------


def _is_wrapper(x: Any) -> bool:
    from optax_gradflow.state import StabilizedState

    return isinstance(x, StabilizedState)


def _located(opt_state: Any) -> list[tuple[str, GradientFlowState, tuple | None]]:
    """(key path, flow state, the wrapper's ratio ring or None) for each stabilizer."""
    import jax
    import jax.numpy as jnp

    from optax_gradflow.loss_scaling import find_states

    found = find_states(opt_state)
    if not found:
        raise ValueError(
            "No GradientFlowState found in the optimizer state: is "
            "optax_gradflow.stabilize (or stabilized) part of this optimizer?"
        )
    # The ratio ring belongs to the wrapper whose own .flow is at that path
    # (key paths concatenate: keystr(a + b) == keystr(a) + keystr(b)).
    ring_of = {}
    flat = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=_is_wrapper)[0]
    for wrapper_path, w in flat:
        if _is_wrapper(w):
            ((flow_path, _),) = find_states(w._replace(inner_state=None))
            # Plain arrays: frameworks may wrap fields (flax.nnx's OptArray).
            ring_of[jax.tree_util.keystr(wrapper_path) + flow_path] = tuple(
                jnp.asarray(part) for part in w.update_ratio_history
            )
    return [(path, state, ring_of.get(path)) for path, state in found]


def stability_reports(opt_state: Any) -> dict[str, StabilityReport]:
    """The report of every stabilizer inside ``opt_state``, keyed by its path.

    Always a dict (one entry per stabilizer, e.g. one per network under
    ``optax.partition``), keyed by the key path :func:`optax_gradflow.find_states`
    gives ("" for a state that is itself a :class:`GradientFlowState`). Costs
    one device-to-host transfer, as :func:`stability_report`.

    Raises:
      ValueError: no stabilizer state in ``opt_state``.
    """
    import jax

    from optax_gradflow.state import to_flat

    located = _located(opt_state)
    host = jax.device_get([(state, ring) for _, state, ring in located])
    return {
        path: build_report(to_flat(state), path, ring)
        for (path, _, _), (state, ring) in zip(located, host, strict=True)
    }


def stability_report(opt_state: Any) -> StabilityReport:
    """Reports on the one stabilizer inside ``opt_state`` (SPEC.md, "Stability report").

    Costs exactly one device-to-host transfer: a single ``jax.device_get`` of
    the stabilizer state (and of the wrapper's update-ratio ring), not of the
    inner optimizer's state. Do not call it inside ``jit``; see :func:`metrics`.

    Args:
      opt_state: any optimizer state holding :func:`optax_gradflow.stabilize`
        or :func:`optax_gradflow.stabilized` state (chains, ``MultiSteps``,
        ``inject_hyperparams``), or a :class:`GradientFlowState` itself.

    Returns:
      A :class:`StabilityReport`, always. With several stabilizers (e.g. one
      per network under ``optax.partition``) use :func:`stability_reports`,
      which returns a dict keyed by path.

    Raises:
      ValueError: no stabilizer state in ``opt_state``, or several of them
        (the message names their paths).

    Examples:
      >>> import jax.numpy as jnp, optax, optax_gradflow
      >>> from optax_gradflow.report import stability_report
      >>> opt = optax_gradflow.stabilized(optax.sgd(1e-2), 1e-2)
      >>> params = {"w": jnp.ones(3)}
      >>> state = opt.init(params)
      >>> _, state = opt.update({"w": jnp.full(3, 0.1)}, state, params)
      >>> report = stability_report(state)
      >>> report.status, report.stability_score
      ('healthy', 1.0)
    """
    located = _located(opt_state)
    if len(located) > 1:
        paths = ", ".join(repr(path) for path, _, _ in located)
        raise ValueError(
            f"The optimizer state holds {len(located)} stabilizers ({paths}); "
            "stability_report returns one report: use stability_reports(opt_state) for a "
            "dict keyed by path, or pass the sub-state of one stabilizer."
        )
    return stability_reports(opt_state)[located[0][0]]


# --- In-graph metrics -----------------------------------------------------------


def _metrics_of(s: GradientFlowState, ring: tuple | None) -> dict[str, jax.Array]:
    import jax.numpy as jnp

    events = s.event_flags
    valid = events.valid()
    steps = events.count.astype(jnp.float32)
    denom = jnp.maximum(steps, 1.0)

    def rate(flag: int) -> jax.Array:
        hits = jnp.sum(valid & ((events.values & flag) != 0)).astype(jnp.float32)
        return jnp.where(steps > 0, hits / denom, 0.0)

    out = {
        "step": s.stabilizer_step,
        "clip_threshold": s.clip_threshold,
        "loss_scale": s.loss_scale,
        "grad_norm": s.last_grad_norm,
        "explosion_count": s.explosion_count,
        "nonfinite_count": s.nonfinite_count,
        "vanishing_count": s.vanishing_count,
        "clip_count": s.clip_count,
        "emergency_count": s.emergency_count,
        "warning_count": s.warning_count,
        "consecutive_explosions": s.consecutive_explosions,
        "stable_streak": s.stable_streak,
        "early_warning": s.early_warning.astype(jnp.int32),
        "norm_trend": s.norm_trend,
        "window_steps": events.count,
        "explosion_rate": rate(Event.EXPLOSION),
        "nonfinite_rate": rate(Event.NONFINITE),
        "vanishing_rate": rate(Event.VANISHING),
        "clip_rate": rate(Event.CLIPPED),
        "stability_score": 1.0 - rate(_UNSTABLE_FLAGS),
        "flow_efficiency": 1.0 - rate(Event.CLIPPED),
    }
    if ring is not None:
        history, index, count = ring
        last = history[(index - 1) % history.shape[0]]
        out["update_ratio"] = jnp.where(count > 0, last, jnp.nan).astype(jnp.float32)
    return out


def metrics(opt_state: Any) -> dict[str, jax.Array]:
    """A flat dict of scalar arrays for metric loggers; works inside ``jax.jit``.

    No host transfer: every value is a 0-d ``jax.Array`` computed from the
    state (reading them on the host later is the caller's transfer). Keys are
    ``"gradflow/<name>"``; with several stabilizers, ``"gradflow/<path>/<name>"``
    with each one's key path. Names: ``step``, ``clip_threshold``,
    ``loss_scale``, ``grad_norm`` (latest unscaled norm), the counters
    (``explosion_count``, ``nonfinite_count``, ``vanishing_count``,
    ``clip_count``, ``emergency_count``, ``warning_count``,
    ``consecutive_explosions``, ``stable_streak``), ``early_warning`` (0/1),
    ``norm_trend``, ``window_steps``, the windowed rates (``explosion_rate``,
    ``nonfinite_rate``, ``vanishing_rate``, ``clip_rate``),
    ``stability_score``, ``flow_efficiency`` and, in the wrapper form,
    ``update_ratio`` (latest ``|update| / |params|``, NaN before the first).

    Examples:
      >>> import jax, jax.numpy as jnp, optax, optax_gradflow
      >>> from optax_gradflow.report import metrics
      >>> opt = optax.chain(optax_gradflow.stabilize(1e-2), optax.sgd(1e-2))
      >>> state = opt.init({"w": jnp.ones(3)})
      >>> float(jax.jit(metrics)(state)["gradflow/clip_threshold"])
      1.0
    """
    located = _located(opt_state)
    several = len(located) > 1
    out: dict[str, jax.Array] = {}
    for path, state, ring in located:
        prefix = f"gradflow/{path}/" if several else "gradflow/"
        for name, value in _metrics_of(state, ring).items():
            out[prefix + name] = value
    return out
