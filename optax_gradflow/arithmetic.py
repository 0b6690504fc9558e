"""SPEC.md's per-step arithmetic, written once for both frameworks.

The stages of one step (SPEC.md, "Per-step order"), the adaptation rules, the
loss-scale rule, the loss gate, the emergency, the diagnostics and the
counters are written here once, over named scalars. Neither JAX nor PyTorch is
imported: each framework passes an :class:`Ops`, which supplies only what
genuinely differs between them:

- array operations on 0-d scalars and small vectors (``where``, ``log``,
  ``sort``, ...) and constants rounded to float32 once;
- the sum of squares of the gradients and its all-reduce, and the rescale;
- ring writes (:meth:`Ops.push_all`) and saturating counters
  (:meth:`Ops.count_all`), which PyTorch vectorises;
- conditionals (:meth:`Ops.cond`, :meth:`Ops.only_if`): ``lax.cond`` under
  JAX, compute-and-select on a PyTorch device;
- how the state is read (attributes named as the state's fields, rings as
  objects with ``values``, ``index``, ``count``, ``newest()`` and
  ``chronological(window)``) and stored (:meth:`Ops.store`).

``optax_gradflow.pipeline`` (JAX) and ``optax_gradflow.torch.functional``
(PyTorch) hold their :class:`Ops`; :func:`step` runs the stages in SPEC.md's
order for both. The stage functions carry the names of
:data:`optax_gradflow.constants.STAGES`. What differs between adaptation rules
lives in a rule object chosen once (:func:`rule_for`): the step never compares
the rule's name.

Constants of the config enter the arithmetic through ``xp.f32``: computed in
Python (float64) where SPEC.md says so, then rounded to float32 once.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from optax_gradflow.config import INT32_MAX, StabilizerConfig
from optax_gradflow.constants import DIAGNOSTICS_LOG_FLOOR, LOG_FLOOR, MAD_TO_STD, Event

Array = Any  # a 0-d or 1-d array of the framework at hand


class Ops:
    """What a framework supplies to the arithmetic (the methods below).

    A subclass implements every method that raises ``NotImplementedError``;
    the others have a generic form written with the rest.
    """

    # --- constants and casts -------------------------------------------------
    def f32(self, value: float) -> Array:
        """A float32 constant: ``value`` rounded to float32 once."""
        raise NotImplementedError

    def i32(self, value: int) -> Array:
        raise NotImplementedError

    def false(self) -> Array:
        """A 0-d boolean False."""
        raise NotImplementedError

    def to_f32(self, x: Array) -> Array:
        raise NotImplementedError

    def to_i32(self, x: Array) -> Array:
        raise NotImplementedError

    def log_f32(self, value: float) -> Array:
        """``log(f32(value))`` in float32 (a constant: may be cached)."""
        return self.log(self.f32(value))

    # --- elementwise ---------------------------------------------------------
    def where(self, cond: Array, a: Array | float, b: Array | float) -> Array:
        raise NotImplementedError

    def maximum(self, a: Array, b: Array) -> Array:
        raise NotImplementedError

    def minimum(self, a: Array, b: Array) -> Array:
        raise NotImplementedError

    def clip(self, x: Array, lo: Array, hi: Array) -> Array:
        raise NotImplementedError

    def exp(self, x: Array) -> Array:
        raise NotImplementedError

    def log(self, x: Array) -> Array:
        raise NotImplementedError

    def sqrt(self, x: Array) -> Array:
        raise NotImplementedError

    def abs(self, x: Array) -> Array:
        raise NotImplementedError

    def floor(self, x: Array) -> Array:
        raise NotImplementedError

    def isfinite(self, x: Array) -> Array:
        raise NotImplementedError

    # --- small vectors (the rings) ---------------------------------------------
    def arange(self, size: int) -> Array:
        """``[0, size)`` as int32."""
        raise NotImplementedError

    def sort(self, values: Array) -> Array:
        raise NotImplementedError

    def take(self, values: Array, index: Array) -> Array:
        """``values[index]`` for a 0-d integer ``index``, read on the device."""
        raise NotImplementedError

    def sum(self, values: Array) -> Array:
        raise NotImplementedError

    def push_all(
        self, rings: Sequence[Any], items: Sequence[Array], wheres: Sequence[Array | None]
    ) -> list[Any]:
        """Pushes ``items[i]`` onto ``rings[i]`` where ``wheres[i]`` (None: always)."""
        raise NotImplementedError

    def count_all(self, counters: Sequence[Array], increments: Sequence[Array]) -> list[Array]:
        """``counter + increment`` for int32 counters, stopping at 2**31 - 1."""
        return [
            saturating_increment(self, n, inc) for n, inc in zip(counters, increments, strict=True)
        ]

    # --- conditionals ----------------------------------------------------------
    def cond(
        self,
        pred: Array,
        true_fn: Callable[[], Any],
        false_fn: Callable[[], Any],
        possible: bool = True,
    ) -> Any:
        """``true_fn()`` where ``pred``, else ``false_fn()`` (tuples of arrays).

        ``possible=False`` is the caller's promise that ``pred`` is false.
        """
        raise NotImplementedError

    def only_if(self, pred: Array, fn: Callable[[], Any], otherwise: Callable[[], Any]) -> Any:
        """``fn()``, which equals ``otherwise()`` whenever ``pred`` is false: a
        framework may skip it then (or always run it). A framework that can
        branch on ``pred`` may return None for "``otherwise()``, unchanged":
        the fields ``fn`` computes are then left as the state holds them."""
        return self.cond(pred, fn, otherwise)

    # --- the gradients and the state ---------------------------------------------
    def sum_of_squares(self, updates: Any) -> Array:
        """The float32 sum of squares of every floating gradient, all-reduced."""
        raise NotImplementedError

    def rescale(self, updates: Any, factor: Array, divisor: Array | None, finite: Array) -> Any:
        """Every floating gradient ``x`` becomes ``(x / divisor) * factor``
        (``x * factor`` without divisor), and 0 where not ``finite``."""
        raise NotImplementedError

    def loss(self, value: Any) -> Array | None:
        """``value`` (the loss) as a float32 scalar; None when none was given."""
        raise NotImplementedError

    def store(self, state: Any, fields: dict[str, Any]) -> Any:
        """The next state, from ``state`` and every field's new value (rings as rings)."""
        raise NotImplementedError


def saturating_increment(xp: Ops, counter: Array, increment: Array | None = None) -> Array:
    """``counter + increment`` (default 1) for an int32 counter, stopping at 2**31 - 1."""
    step = counter + 1 if increment is None else counter + xp.to_i32(increment)
    return xp.where(counter >= INT32_MAX, counter, step)


def _either(a: Array | None, b: Array | None) -> Array | None:
    """``a | b`` where None is a statically false flag."""
    if a is None:
        return b
    if b is None:
        return a
    return a | b


# --- Thresholds ---------------------------------------------------------------------


def clamp_threshold(xp: Ops, threshold: Array, config: StabilizerConfig) -> Array:
    """Clamps into ``[min_threshold, max_threshold]``."""
    return xp.clip(threshold, xp.f32(config.min_threshold), xp.f32(config.max_threshold))


def log_floored(xp: Ops, x: Array) -> Array:
    """``lnf(x) = ln(max(x, 2^-126))`` in float32 (SPEC.md, "Tracking rule")."""
    return xp.log(xp.maximum(x, xp.f32(LOG_FLOOR)))


def percentile(xp: Ops, values: Array, count: Array, q: float) -> Array:
    """The ``q``-th percentile of the first ``count`` ring slots (numpy's "linear").

    With the valid values sorted as ``a[0] <= ... <= a[n-1]``:
    ``pos = q / 100 * (n - 1)``, ``lo = floor(pos)``, ``hi = min(lo + 1, n - 1)``,
    result ``a[lo] + (pos - lo) * (a[hi] - a[lo])``. NaN for ``count == 0``.
    """
    size = values.shape[0]
    valid = xp.arange(size) < count
    ordered = xp.sort(xp.where(valid, values, xp.f32(math.inf)))
    pos = xp.f32(q / 100.0) * (xp.to_f32(count) - 1.0)
    lo = xp.floor(pos)
    frac = pos - lo
    last = xp.i32(size - 1)
    lo_i = xp.clip(xp.to_i32(lo), xp.i32(0), last)
    hi_i = xp.clip(xp.minimum(lo_i + 1, count - 1), xp.i32(0), last)
    a_lo = xp.take(ordered, lo_i)
    a_hi = xp.take(ordered, hi_i)
    return xp.where(count > 0, a_lo + frac * (a_hi - a_lo), xp.f32(math.nan))


def mean_var(xp: Ops, values: Array, count: Array) -> tuple[Array, Array]:
    """Mean and population variance of the first ``count`` ring slots."""
    valid = xp.arange(values.shape[0]) < count
    n = xp.to_f32(xp.maximum(count, xp.i32(1)))
    zero = xp.f32(0.0)
    mean = xp.sum(xp.where(valid, values, zero)) / n
    deviation = values - mean
    var = xp.sum(xp.where(valid, deviation * deviation, zero)) / n
    return mean, var


def _statistic_percentile(xp: Ops, values, count, config: StabilizerConfig) -> Array:
    """AutoClip: the ``adaptation_percentile``-th percentile of the history."""
    return percentile(xp, values, count, config.adaptation_percentile)


def _statistic_median_mad(xp: Ops, values, count, config: StabilizerConfig) -> Array:
    """``median + adaptation_k * 1.4826 * MAD`` of the history."""
    median = percentile(xp, values, count, 50.0)
    mad = percentile(xp, xp.abs(values - median), count, 50.0)
    return median + xp.f32(config.adaptation_k * MAD_TO_STD) * mad


def _statistic_mean_std(xp: Ops, values, count, config: StabilizerConfig) -> Array:
    """``mean + adaptation_k * std`` (population std) of the history."""
    mean, var = mean_var(xp, values, count)
    return mean + xp.f32(config.adaptation_k) * xp.sqrt(var)


STATISTICS: dict[str, Callable[..., Array]] = {
    "percentile": _statistic_percentile,
    "median_mad": _statistic_median_mad,
    "mean_std": _statistic_mean_std,
}


# --- The loss gate (SPEC.md, "Loss gate"), run under every rule -----------------------


def learning_steps(config: StabilizerConfig) -> int:
    """``N = min(round(1 / track_rate), 2**31 - 1)`` (Python's round, half to even)."""
    return min(round(1.0 / config.track_rate), INT32_MAX)


def _loss_above(xp: Ops, centre, reference, spread, k: float, rel: float) -> Array:
    """``centre > reference + k * max(spread, rel * |reference|)``; false while
    either level is unknown (NaN)."""
    known = xp.isfinite(centre) & xp.isfinite(reference)
    unit = xp.maximum(spread, xp.f32(rel) * xp.abs(reference))
    return known & (centre > reference + xp.f32(k) * unit)


def loss_rising(xp: Ops, centre, reference, spread, config: StabilizerConfig) -> Array:
    """The gate is closed: the loss centre above ``reference + track_loss_k * u``,
    ``u = max(spread, track_loss_rel * |reference|)``.

    The unit is at least a share of the loss's own level: a loss whose batch
    noise was learned while it was tiny (a TD loss before the returns grow)
    cannot hold the gate shut once its level has moved.
    """
    return _loss_above(xp, centre, reference, spread, config.track_loss_k, config.track_loss_rel)


def loss_climbing(xp: Ops, centre, reference, spread, config: StabilizerConfig) -> Array:
    """The loss clearly climbing: above ``reference + track_loss_cut_k * u``.

    The explosion cut needs this wider margin than the hold: batch noise
    never reaches it, a diverging loss does at once.
    """
    return _loss_above(
        xp, centre, reference, spread, config.track_loss_cut_k, config.track_loss_rel
    )


def loss_gate(
    xp: Ops,
    loss: Array,
    calm: Array,
    gate: tuple[Array, Array, Array],
    count: Array,
    config: StabilizerConfig,
) -> tuple[Array, Array, Array]:
    """The gate's three levels after the loss ``loss`` (SPEC.md, "Loss gate").

    ``gate`` is ``(loss_centre, loss_reference, loss_spread)`` on entry,
    ``count`` the step on entry, ``calm`` "finite and not an explosion" of
    this step's norm.

    ``centre``: EMA of the loss at ``track_rate``. ``reference``: the calm
    level; it falls towards a lower calm loss at ``track_rate`` but otherwise
    moves at only ``track_loss_rise_rate``, so an explosion's climbing loss
    stays above it while a loss that settles at a new level is caught up with
    in time. ``spread``: EMA of ``|loss - centre|``, the batch noise, learned
    only while the gate is open, so that an explosion cannot widen the gate.
    The first finite loss starts all three; a non-finite loss changes nothing.
    During the first ``N = round(1 / track_rate)`` steps every loss teaches
    the reference and the spread, at the rate of running means: a gate that
    had learned nothing could otherwise close on batch noise and lock a bad
    start in.
    """
    centre, reference, spread = gate
    rate = xp.f32(config.track_rate)
    given = xp.isfinite(loss)
    first = ~xp.isfinite(centre)
    open_gate = ~loss_rising(xp, centre, reference, spread, config)
    # The first N steps: running means, a = max(r, 1 / (step + 1)) in float32.
    early = count < learning_steps(config)
    a = xp.maximum(rate, 1.0 / (xp.to_f32(count) + 1.0))
    # After them, bounded influence: one loss moves the centre by at most
    # Bc = max(10 * spread, b * |centre|), b = max(10 * track_loss_rel, 0.001),
    # a share of the level as the gate's own unit is, so that a loss that
    # jumps far above the level its spread was learned at (a target-network
    # copy) is followed in tens of steps, not hundreds; the spread's deviation
    # is at most B = max(3 * spread, 0.001 * |centre|), so that a loss that
    # was constant at first (spread 0) can still move the levels.
    level = xp.abs(centre)
    bound = xp.maximum(spread * 3.0, level * 1e-3)
    centre_bound = xp.maximum(
        spread * 10.0, xp.f32(max(10.0 * config.track_loss_rel, 1e-3)) * level
    )
    # During the first N steps, with e = max(b, 1) (at least the level
    # itself), max(10 * spread, e * |centre|) bounds the running mean and
    # max(3 * spread, e * |centre|) the spread's deviation: one outlier loss
    # among them (1e7 times the usual) cannot widen the gate for hundreds of
    # steps. A level of exactly 0 with no spread gives no scale: such a loss
    # is taken as it is.
    scaled = (centre != 0.0) | (spread > 0.0)
    inf = xp.f32(math.inf)
    early_share = xp.f32(max(10.0 * config.track_loss_rel, 1e-3, 1.0)) * level
    early_bound = xp.where(scaled, xp.maximum(spread * 10.0, early_share), inf)
    limit = xp.where(early, early_bound, centre_bound)
    diff = loss - centre
    level_rate = xp.where(early, a, rate)
    new_centre = centre + level_rate * xp.clip(diff, -limit, limit)
    gap = new_centre - reference
    # The reference falls with a calm loss at the centre's rate and rises at
    # track_loss_rise_rate; on other steps (explosions, non-finite norms) it
    # still moves at track_loss_rise_rate: were it frozen there, a loss that
    # settled higher while every step counted as an explosion (a threshold
    # cut far under the norms) would hold the gate shut for good.
    ref_rate = xp.where(calm & (gap <= 0), rate, xp.f32(config.track_loss_rise_rate))
    new_reference = reference + xp.where(early, a, ref_rate) * gap
    early_dev_bound = xp.where(scaled, xp.maximum(spread * 3.0, early_share), inf)
    deviation = xp.minimum(xp.abs(diff), xp.where(early, early_dev_bound, bound))
    learn = (open_gate & calm) | early
    new_spread = xp.where(learn, spread + level_rate * (deviation - spread), spread)
    return (
        xp.where(given, xp.where(first, loss, new_centre), centre),
        xp.where(given, xp.where(first, loss, new_reference), reference),
        xp.where(given, xp.where(first, xp.f32(0.0), new_spread), spread),
    )


# --- The loss-scale rule (SPEC.md, "Loss scale rule") -------------------------------


def next_loss_scale(
    xp: Ops,
    scale: Array,
    growth_count: Array,
    nonfinite: Array,
    explosion: Array,
    vanishing: Array,
    config: StabilizerConfig,
) -> tuple[Array, Array]:
    """One step of the rule: (scale, growth_count); unchanged without ``loss_scaling``.

    At most one of the three events holds on a step. A step that would carry
    the scale to a non-finite value keeps the old scale (GradScaler's "never
    grow to inf"), then the result is clamped into [floor, max]. The floor is
    ``min(nonfinite_min_loss_scale, min_loss_scale)`` on a non-finite step, so
    that a scale at which every gradient overflows is not kept; on any other
    step ``min(min_loss_scale, scale)``: nothing else lowers a scale past
    ``min_loss_scale``, nor lifts one that a non-finite step put under it.
    """
    if not config.loss_scaling:
        return scale, growth_count
    factor = xp.where(
        nonfinite,
        xp.f32(config.nonfinite_backoff),
        xp.where(
            explosion,
            xp.f32(config.explosion_backoff),
            xp.where(vanishing, xp.f32(config.vanishing_growth), xp.f32(1.0)),
        ),
    )
    new_scale = scale * factor
    growth_count = xp.where(nonfinite, xp.i32(0), saturating_increment(xp, growth_count))
    if config.growth_interval > 0:
        grow = growth_count >= config.growth_interval
        new_scale = xp.where(grow, new_scale * xp.f32(config.growth_factor), new_scale)
        growth_count = xp.where(grow, xp.i32(0), growth_count)
    new_scale = xp.where(xp.isfinite(new_scale), new_scale, scale)
    floor = xp.where(
        nonfinite,
        xp.f32(min(config.nonfinite_min_loss_scale, config.min_loss_scale)),
        xp.minimum(xp.f32(config.min_loss_scale), scale),
    )
    new_scale = xp.clip(new_scale, floor, xp.f32(config.max_loss_scale))
    return new_scale, growth_count


def emergency_loss_scale(xp: Ops, scale: Array, fired: Array, config: StabilizerConfig) -> Array:
    """``max(scale * emergency_loss_scale_factor, min(min_loss_scale, scale))`` where ``fired``."""
    if not config.loss_scaling:
        return scale
    reduced = xp.maximum(
        scale * xp.f32(config.emergency_loss_scale_factor),
        xp.minimum(xp.f32(config.min_loss_scale), scale),
    )
    return xp.where(fired, reduced, scale)


# --- Diagnostics (SPEC.md, "Diagnostics") -----------------------------------------------


def diagnostics(
    xp: Ops, recent: Array, valid: Array, config: StabilizerConfig
) -> tuple[Array, Array, Array]:
    """(trend, variance, warning) of the last ``diagnostics_window`` norms.

    ``recent`` holds them oldest first, ``valid`` which of them exist. The
    trend is the least-squares slope of ``log(max(norm, floor))`` against the
    position (0 with fewer than two norms), ``floor = max(vanishing_norm,
    1e-30)``; the variance is the population variance of the norms; the
    warning is raised when the trend exceeds ``trend_limit`` or ``variance /
    mean**2`` exceeds ``variance_limit``.
    """
    zero, one = xp.f32(0.0), xp.f32(1.0)
    w = xp.to_f32(valid)
    total = xp.sum(w)
    safe_total = xp.maximum(total, one)
    x = xp.to_f32(xp.arange(recent.shape[0]))
    floor = xp.f32(max(config.vanishing_norm, DIAGNOSTICS_LOG_FLOOR))
    y = xp.where(valid, xp.log(xp.maximum(recent, floor)), zero)
    x_mean = xp.sum(w * x) / safe_total
    y_mean = xp.sum(w * y) / safe_total
    dx = x - x_mean
    sxx = xp.sum(w * (dx * dx))
    sxy = xp.sum(w * dx * (y - y_mean))
    trend = xp.where(total >= 2.0, sxy / xp.where(sxx > 0, sxx, one), zero)
    norms = xp.where(valid, recent, zero)
    mean = xp.sum(w * norms) / safe_total
    dn = norms - mean
    variance = xp.sum(w * (dn * dn)) / safe_total
    relative = xp.where(mean > 0, variance / xp.where(mean > 0, mean * mean, one), zero)
    warning = (trend > config.trend_limit) | (relative > config.variance_limit)
    return trend, variance, warning


# --- The stages' records ------------------------------------------------------------------


class Due(NamedTuple):
    """Which periodic work a step may need; each False is a promise that it does not.

    Computed by the caller from the step counter (deterministic, so it needs
    no read of the state): ``warmup``: the state may be in its warm-up
    (``warmup_steps_left > 0``); ``adapt``: a periodic adaptation may be due;
    ``diagnose``: ``stabilizer_step + 1`` is a multiple of
    ``diagnostics_interval``. The default assumes all three.
    """

    warmup: bool = True
    adapt: bool = True
    diagnose: bool = True


ALL_DUE = Due()


class Measured(NamedTuple):
    """Stage ``measure``."""

    raw_norm: Array  # r = ||g||, of the scaled gradients
    norm: Array  # n = r / s
    finite: Array  # isfinite(n)
    loss: Array | None  # the loss as float32; None when none was given


class StepThreshold(NamedTuple):
    """Stage ``threshold``."""

    clip: Array  # t, the threshold this step clips at
    reference: Array  # what explosions are measured against (t, but zscore)
    in_warmup: Array  # warmup_steps_left > 0 on entry
    spike: Array | None = None  # zscore: a spike
    target: Array | None = None  # zscore: the spike's clip target
    above: Array | None = None  # track: lnf(n) above the tracked quantile u (None: no quantile)


class Classes(NamedTuple):
    """Stage ``classify``."""

    nonfinite: Array
    explosion: Array
    vanishing: Array
    clipped: Array
    calm: Array  # finite and not an explosion
    high: Array  # finite and n > explosion_factor * reference (the explosion test without u)


class Scale(NamedTuple):
    """Stage ``loss_scale``."""

    scale: Array
    growth_count: Array


class Periodic(NamedTuple):
    """The work only some steps need: the history rules' statistic and the diagnostics."""

    adapt_due: Array | None  # the history rule adapts this step (None: it cannot)
    from_history: Array  # the rule's threshold from the history (history rules)
    trend: Array
    variance: Array
    warning: Array
    diagnosed: Array | None  # the diagnostics ran this step (None: they cannot)


class Adapted(NamedTuple):
    """Stage ``adapt``."""

    threshold: Array  # t'
    ema_mean: Array
    ema_var: Array
    centre_anchor: Array
    warmup_left: Array
    adapted: Array | None  # the "adapted" flag (None: statically false)
    norm_quantile: Array  # the track rule's u (the others: the state's, unchanged)


class Emergency(NamedTuple):
    """Stage ``emergency``."""

    threshold: Array
    ema_mean: Array
    scale: Array
    consecutive: Array
    hold_left: Array
    fired: Array


# --- The adaptation rules ----------------------------------------------------------------


class Rule:
    """What an adaptation rule decides; one instance per config.

    ``periodic`` says whether the rule needs the sorted history on some steps
    (the history rules); its ``from_history`` then runs under the step's one
    periodic conditional.
    """

    periodic: bool = False

    def __init__(self, config: StabilizerConfig):
        self.config = config

    # --- the start (SPEC.md, "Initial threshold") ---------------------------------
    def fixed_start(self, xp: Ops) -> tuple[Array, int] | None:
        """(threshold, warm-up steps) of a start that ignores explicit, stored and
        learning-rate thresholds; None for the usual order."""
        return None

    def data_start(self, xp: Ops, param_sum_of_squares: Array) -> tuple[Array, int]:
        """(threshold, warm-up steps) of a data warm-up; the threshold is a placeholder."""
        return xp.f32(self.config.min_threshold), self.config.warmup_steps

    def initial_levels(self, xp: Ops, threshold: Array) -> tuple[Array, Array, Array]:
        """(ema_mean, centre_anchor, norm_quantile) of a fresh state."""
        return xp.f32(0.0), xp.f32(0.0), xp.f32(0.0)

    # --- the step ---------------------------------------------------------------------
    def step_threshold(self, xp: Ops, m: Measured, state: Any, due: Due) -> StepThreshold:
        raise NotImplementedError

    def adapt_due(self, xp: Ops, norms: Any, step_after: Array, state: Any) -> Array:
        """Whether this step needs ``from_history`` (history rules only)."""
        raise NotImplementedError

    def from_history(self, xp: Ops, norms: Any) -> Array:
        raise NotImplementedError

    def adapt(
        self,
        xp: Ops,
        m: Measured,
        t: StepThreshold,
        c: Classes,
        norms: Any,
        step_after: Array,
        state: Any,
        periodic: Periodic,
    ) -> Adapted:
        raise NotImplementedError

    def emergency(self, xp: Ops, c: Classes, s: Scale, a: Adapted, state: Any) -> Emergency:
        """The seed's emergency: after ``emergency_patience`` unstable steps in a
        row, the threshold is multiplied by ``emergency_threshold_factor`` and
        the count restarts (SPEC.md, "Emergency intervention")."""
        config = self.config
        consecutive = _consecutive(xp, c, state)
        if config.emergency_patience > 0:
            fired = consecutive >= config.emergency_patience
        else:
            fired = xp.false()
        cut = xp.maximum(
            a.threshold * xp.f32(config.emergency_threshold_factor), xp.f32(config.min_threshold)
        )
        return Emergency(
            threshold=xp.where(fired, cut, a.threshold),
            ema_mean=a.ema_mean,
            scale=emergency_loss_scale(xp, s.scale, fired, config),
            consecutive=xp.where(fired, xp.i32(0), consecutive),
            hold_left=state.emergency_hold_left,
            fired=fired,
        )

    def gate_reference(
        self, xp: Ops, fired: Array, consecutive: Array, loss_centre: Array, loss_reference: Array
    ) -> Array:
        """The loss gate's reference after the emergency (the track rule moves it)."""
        return loss_reference


def _consecutive(xp: Ops, c: Classes, state: Any) -> Array:
    """The run of unstable steps, this one included."""
    return xp.where(
        c.nonfinite | c.explosion,
        saturating_increment(xp, state.consecutive_explosions),
        xp.i32(0),
    )


class HistoryRule(Rule):
    """``percentile``, ``median_mad``, ``mean_std``: a statistic of the norm
    history, every ``adaptation_interval`` steps after a data warm-up (SPEC.md,
    "Threshold adaptation")."""

    periodic = True

    def __init__(self, config: StabilizerConfig):
        super().__init__(config)
        self._statistic = STATISTICS[config.adaptation_rule]

    def step_threshold(self, xp, m, state, due) -> StepThreshold:
        config = self.config
        # The gate is the state's counter, not the config, so that a resumed
        # warm-up finishes whatever the config says.
        in_warmup = state.warmup_steps_left > 0

        def warm() -> Array:
            # warmup_multiplier * median(history) once the history holds a
            # norm; with an empty history, the step's own norm if finite
            # (nothing to compare it with, so it is not clipped); else the
            # previous threshold.
            hist = state.norm_history
            median = percentile(xp, hist.values, hist.count, 50.0)
            from_history = clamp_threshold(xp, xp.f32(config.warmup_multiplier) * median, config)
            first = xp.where(m.finite, clamp_threshold(xp, m.norm, config), state.clip_threshold)
            return xp.where(hist.count > 0, from_history, first)

        # A conditional: the warm-up median sorts the history, work that only
        # warm-up steps need.
        thr = xp.cond(in_warmup, warm, lambda: state.clip_threshold, possible=due.warmup)
        return StepThreshold(thr, thr, in_warmup)

    def adapt_due(self, xp, norms, step_after, state) -> Array:
        left = state.warmup_steps_left
        due = left == 1
        if self.config.adaptation_interval > 0:
            left_after = xp.maximum(left - 1, xp.i32(0))
            due = due | ((step_after % self.config.adaptation_interval == 0) & (left_after == 0))
        return due & (norms.count > 0)

    def from_history(self, xp, norms) -> Array:
        return clamp_threshold(
            xp, self._statistic(xp, norms.values, norms.count, self.config), self.config
        )

    def adapt(self, xp, m, t, c, norms, step_after, state, periodic) -> Adapted:
        due = periodic.adapt_due
        threshold = t.clip if due is None else xp.where(due, periodic.from_history, t.clip)
        return Adapted(
            threshold=threshold,
            ema_mean=state.ema_mean,
            ema_var=state.ema_var,
            centre_anchor=state.centre_anchor,
            norm_quantile=state.norm_quantile,
            warmup_left=xp.maximum(state.warmup_steps_left - 1, xp.i32(0)),
            adapted=due,
        )


class ZScoreRule(Rule):
    """ZClip's rule: an EMA of the norm and of its variance (SPEC.md, "Z-score rule")."""

    def fixed_start(self, xp) -> tuple[Array, int]:
        # ZClip's warm-up always runs: the EMA starts from its norms, and until
        # then only max_threshold clips.
        config = self.config
        return clamp_threshold(xp, xp.f32(config.max_threshold), config), config.warmup_steps

    def _spike(self, xp, norm, finite, mean, var) -> tuple[Array, Array, Array]:
        """(threshold, spike, target) of a step after the warm-up.

        A finite norm is a spike when its z-score ``(n - mean) / (std + eps)``
        exceeds ``zscore_threshold`` (``percentile`` clip: when ``n > mean +
        zscore_threshold * std``); a spike is clipped to ``target``, any other
        step only at ``max_threshold``.
        """
        config = self.config
        zt = xp.f32(config.zscore_threshold)
        std = xp.sqrt(var)
        if config.zscore_clip == "percentile":
            target = mean + zt * std
            spike = finite & (norm > target)
        else:
            z = (norm - mean) / (std + xp.f32(config.zscore_eps))
            spike = finite & (z > zt)
            if config.zscore_clip == "adaptive_scaling":
                # Larger outliers are cut harder: the allowance shrinks by z / zt.
                target = (mean + (zt * std) / (z / zt)) * xp.f32(config.zscore_clip_factor)
            else:
                target = mean
        threshold = clamp_threshold(xp, xp.where(spike, target, xp.f32(math.inf)), self.config)
        return threshold, spike, target

    def _ema(self, xp, mean, var, x) -> tuple[Array, Array]:
        """One EMA step of mean and variance towards ``x``.

        With ``zscore_reference_variance`` the variance uses the already updated
        mean, as the zclip package does; otherwise the incremental form of Finch
        (2009), ``var' = alpha * (var + (1 - alpha) * (x - mean)**2)``.
        """
        a = xp.f32(self.config.zscore_alpha)
        b = 1.0 - a  # in float32, as both packages compute it
        new_mean = a * mean + b * x
        if self.config.zscore_reference_variance:
            d = x - new_mean
            new_var = a * var + b * (d * d)
        else:
            d = x - mean
            new_var = a * (var + b * (d * d))
        return new_mean, new_var

    def _boundary(self, xp, mean, var) -> Array:
        """The norm above which the next step is a spike: the reported threshold."""
        config = self.config
        std = xp.sqrt(var)
        zt = xp.f32(config.zscore_threshold)
        if config.zscore_clip == "percentile":
            boundary = mean + zt * std
        else:
            boundary = mean + zt * (std + xp.f32(config.zscore_eps))
        return clamp_threshold(xp, boundary, config)

    def step_threshold(self, xp, m, state, due) -> StepThreshold:
        config = self.config
        in_warmup = state.warmup_steps_left > 0
        spike_thr, spike, target = self._spike(xp, m.norm, m.finite, state.ema_mean, state.ema_var)
        # As ZClip: the warm-up collects norms and clips only at max_threshold.
        warm = clamp_threshold(xp, xp.f32(config.max_threshold), config)
        # Explosions are measured against the spike boundary held in the state.
        return StepThreshold(
            clip=xp.where(in_warmup, warm, spike_thr),
            reference=xp.where(in_warmup, warm, state.clip_threshold),
            in_warmup=in_warmup,
            spike=spike & ~in_warmup,
            target=target,
        )

    def adapt(self, xp, m, t, c, norms, step_after, state, periodic) -> Adapted:
        config = self.config
        left = state.warmup_steps_left
        ends_warmup = left == 1
        warmup_left = xp.maximum(left - 1, xp.i32(0))
        # The EMA needs a norm to start from: the warm-up waits for one.
        warmup_left = xp.where(ends_warmup & (norms.count == 0), xp.i32(1), warmup_left)
        start = ends_warmup & (norms.count > 0)
        start_mean, start_var = mean_var(xp, norms.values, norms.count)
        moved_mean, moved_var = self._ema(
            xp, state.ema_mean, state.ema_var, xp.where(t.spike, t.target, m.norm)
        )
        move = m.finite & ~t.in_warmup
        if config.zscore_skip_spikes:
            move = move & ~t.spike
        ema_mean = xp.where(start, start_mean, xp.where(move, moved_mean, state.ema_mean))
        ema_var = xp.where(start, start_var, xp.where(move, moved_var, state.ema_var))
        threshold = xp.where(t.in_warmup & ~start, t.clip, self._boundary(xp, ema_mean, ema_var))
        return Adapted(
            threshold,
            ema_mean,
            ema_var,
            state.centre_anchor,
            warmup_left,
            start,
            state.norm_quantile,
        )


class TrackRule(Rule):
    """The default: a bounded tracker of the log-norm gated by the loss
    (SPEC.md, "Tracking rule" and "Loss gate")."""

    def data_start(self, xp, param_sum_of_squares) -> tuple[Array, int]:
        """The parameters' cap on the first threshold (SPEC.md, "Initial
        threshold" 4): ``clamp(param_threshold_scale * P)``, ``P`` the
        parameters' global norm, or ``max_threshold`` where that is not finite
        and positive; the tracker waits for the first finite, positive norm
        (one warm-up step, however many it takes)."""
        config = self.config
        cap = xp.f32(config.param_threshold_scale) * xp.sqrt(param_sum_of_squares)
        usable = xp.isfinite(cap) & (cap > 0)
        return xp.where(usable, clamp_threshold(xp, cap, config), xp.f32(config.max_threshold)), 1

    def initial_levels(self, xp, threshold) -> tuple[Array, Array, Array]:
        # The tracker starts from the initial threshold: c = anchor = lnf(t0),
        # u = c + ln(explosion_factor) (in data mode placeholders, replaced by
        # the first norm). The centre and the anchor are one value here: the
        # callers store each level apart (JAX stacks them into its vector of
        # floats, PyTorch clones each into a tensor of its own).
        centre = log_floored(xp, threshold)
        return centre, centre, self.quantile_start(xp, centre)

    def quantile_start(self, xp: Ops, centre: Array) -> Array:
        """``u`` at the tracker's start: ``c + ln(explosion_factor)`` (``c``
        where the factor is infinite: no step is an explosion then)."""
        if self.config.explosion_factor == math.inf:
            return centre
        return centre + xp.log_f32(self.config.explosion_factor)

    def quantile_step(self, xp: Ops, u: Array, above: Array) -> Array:
        """One step of the quantile tracker: ``u + rate * q`` after a log-norm
        above ``u``, ``u - rate * (1 - q)`` otherwise (SPEC.md, "Tracking rule")."""
        config = self.config
        # Both steps computed in float64 and rounded to float32 once.
        up = xp.f32(config.track_quantile_rate * config.track_quantile)
        down = xp.f32(config.track_quantile_rate * (1.0 - config.track_quantile))
        return xp.where(above, u + up, u - down)

    def levels_threshold(self, xp: Ops, centre: Array, spread: Array) -> Array:
        """``clamp(exp(centre + track_k * spread))``: the threshold of the next step."""
        return clamp_threshold(
            xp, xp.exp(centre + xp.f32(self.config.track_k) * spread), self.config
        )

    def move(self, xp: Ops, centre, spread, x, hold) -> tuple[Array, Array]:
        """One step of the tracker towards the log-norm ``x``.

        The deviation ``d = x - centre`` is clamped to ``[-max_fall / rate,
        max_rise / rate]`` before it enters either EMA: one norm, however far
        off, moves the centre by at most ``max_rise`` (up) or ``max_fall``
        (down) in log units. During a hold (an emergency's, or the loss
        gate's) the centre does not rise, and falls only towards a norm more
        than ``spread`` under it: were every norm under the centre to pull it
        down while none above could lift it, steady, noisy norms would drag it
        under their own level, step after step.
        """
        config = self.config
        rate = xp.f32(config.track_rate)
        # The bounds are computed in float64 and rounded to float32 once.
        lo = xp.f32(-config.track_max_fall / config.track_rate)
        hi = xp.f32(config.track_max_rise / config.track_rate)
        d = xp.clip(x - centre, lo, hi)
        step = xp.where(hold, xp.minimum(d + spread, xp.f32(0.0)), d)
        return centre + rate * step, spread + rate * (xp.abs(d) - spread)

    def step_threshold(self, xp, m, state, due) -> StepThreshold:
        in_warmup = state.warmup_steps_left > 0
        # Waiting for the first finite, positive norm: it has nothing to be
        # compared with but the parameters' cap (held in clip_threshold) and
        # is clipped only above it; it starts the tracker. A non-finite step
        # while waiting uses the cap (and is skipped anyway).
        first = xp.minimum(clamp_threshold(xp, m.norm, self.config), state.clip_threshold)
        thr = xp.where(in_warmup & m.finite, first, state.clip_threshold)
        # During an emergency's hold, explosions are measured against the
        # threshold with the emergency's cut undone: the cut tightens the
        # clip, it does not make the ordinary norms after it explosions.
        uncut = thr / xp.f32(self.config.emergency_threshold_factor)
        reference = xp.where(state.emergency_hold_left > 0, uncut, thr)
        # Whether the log-norm is above the tracked quantile u: an explosion
        # must be (track_quantile 0: no quantile).
        above = None
        if self.config.track_quantile > 0 and self.config.explosion_factor != math.inf:
            above = log_floored(xp, m.norm) > state.norm_quantile
        return StepThreshold(thr, reference, in_warmup, above=above)

    def adapt(self, xp, m, t, c, norms, step_after, state, periodic) -> Adapted:
        config = self.config
        centre, spread = state.ema_mean, state.ema_var
        # The gate is the state's on entry. The centre does not rise during an
        # emergency hold, nor while the loss climbs above its own recent
        # level: a higher norm level with a steady loss is followed, an
        # explosion in progress is not.
        gate = (state.loss_centre, state.loss_reference, state.loss_spread)
        rising = loss_rising(xp, *gate, config)
        hold = (state.emergency_hold_left > 0) | rising
        moved, moved_spread = self.move(xp, centre, spread, log_floored(xp, m.norm), hold)
        if config.explosion_factor != math.inf:
            # An explosion while the loss climbs is an explosion in progress:
            # the centre is pulled down at track_max_fall, but never below
            # track_max_cut times under where it stood when the loss began to
            # climb (the anchor), so that it cannot ratchet down.
            floor = state.centre_anchor - xp.log_f32(config.track_max_cut)
            tightened = xp.maximum(
                xp.minimum(moved, centre - xp.f32(config.track_max_fall)),
                xp.minimum(floor, centre),
            )
            climbing = loss_climbing(xp, *gate, config)
            # The cut acts on every norm over explosion_factor * t, in the
            # quantile or not: a loss that climbs with such norms is followed down.
            moved = xp.where(climbing & c.high, tightened, moved)
        # A zero norm (an all-zero gradient) has no level to start from.
        start = t.in_warmup & m.finite & (m.norm > 0)
        move = m.finite & ~t.in_warmup
        x_start = log_floored(xp, xp.minimum(m.norm, state.clip_threshold))
        ema_mean = xp.where(start, x_start, xp.where(move, moved, centre))
        ema_var = xp.where(start, xp.f32(0.0), xp.where(move, moved_spread, spread))
        # The anchor follows the centre on steps under explosion_factor * t
        # while the loss does not climb: norms over it never move it, so one
        # climb cannot re-anchor lower.
        low = m.finite & ~c.high
        anchor = xp.where(start | (low & ~rising), ema_mean, state.centre_anchor)
        # A step that neither starts nor moves the tracker keeps the threshold
        # (while waiting: the parameters' cap, not the zero norm's clamp(0)).
        threshold = xp.where(
            start | move, self.levels_threshold(xp, ema_mean, ema_var), state.clip_threshold
        )
        # The threshold moves every step; "adapted" marks the start and then
        # every adaptation_interval steps, so that the threshold history
        # records its course.
        adapted = start
        if config.adaptation_interval > 0:
            adapted = adapted | ((step_after % config.adaptation_interval == 0) & ~t.in_warmup)
        warmup_left = xp.where(t.in_warmup & ~start, xp.i32(1), xp.i32(0))
        # The quantile u: restarted with the tracker, one step on every step
        # that moves it.
        u = state.norm_quantile
        if t.above is not None:
            u = xp.where(
                start,
                self.quantile_start(xp, ema_mean),
                xp.where(move, self.quantile_step(xp, u, t.above), u),
            )
        return Adapted(threshold, ema_mean, ema_var, anchor, warmup_left, adapted, u)

    def emergency(self, xp, c, s, a, state) -> Emergency:
        """Fires once per unbroken run of explosions, at most once per
        ``emergency_rearm_steps``; cuts the centre once and holds its rise
        (SPEC.md, "Tracking rule", "Emergency")."""
        config = self.config
        # The run keeps counting, so a lasting rise costs one emergency.
        consecutive = _consecutive(xp, c, state)
        # The hold counts down whatever emergency_patience.
        hold_left = xp.maximum(state.emergency_hold_left - 1, xp.i32(0))
        if config.emergency_patience == 0:
            return Emergency(a.threshold, a.ema_mean, s.scale, consecutive, hold_left, xp.false())
        steps = state.emergency_steps
        armed = (steps.count == 0) | (
            state.stabilizer_step - steps.newest() >= config.emergency_rearm_steps
        )
        fired = (consecutive == config.emergency_patience) & armed
        hold_left = xp.where(fired, xp.i32(config.emergency_hold_steps), hold_left)
        # The centre drops by emergency_threshold_factor (at most once per
        # re-arm period, so it cannot compound into a ratchet), after the
        # adaptation and after the anchor.
        cut = a.ema_mean + xp.log_f32(config.emergency_threshold_factor)
        ema_mean = xp.where(fired, cut, a.ema_mean)
        threshold = xp.where(fired, self.levels_threshold(xp, ema_mean, a.ema_var), a.threshold)
        return Emergency(
            threshold=threshold,
            ema_mean=ema_mean,
            scale=emergency_loss_scale(xp, s.scale, fired, config),
            consecutive=consecutive,
            hold_left=hold_left,
            fired=fired,
        )

    def gate_reference(self, xp, fired, consecutive, loss_centre, loss_reference) -> Array:
        # An emergency accepts the loss level it fires at as the new
        # reference: a loss that keeps climbing closes the gate again within
        # a few steps, while a loss that only settled higher no longer holds
        # the threshold down. So does every track_accept_steps-th step of an
        # unbroken run of explosions: a loss that keeps climbing while every
        # step is clipped is not climbing because of the steps (a TD loss
        # whose targets grow), and an emergency fires at most once per run.
        accept = fired
        n = self.config.track_accept_steps
        if n > 0:
            accept = accept | ((consecutive > 0) & (consecutive % n == 0))
        return xp.where(accept & xp.isfinite(loss_centre), loss_centre, loss_reference)


def make_rule(config: StabilizerConfig) -> Rule:
    """A new rule object of ``config.adaptation_rule``."""
    if config.adaptation_rule == "track":
        return TrackRule(config)
    if config.adaptation_rule == "zscore":
        return ZScoreRule(config)
    return HistoryRule(config)


@functools.lru_cache(maxsize=64)
def rule_for(config: StabilizerConfig) -> Rule:
    """The rule object of ``config.adaptation_rule``, chosen once per config."""
    return make_rule(config)


def start(
    xp: Ops,
    rule: Rule,
    *,
    explicit: Any = None,
    stored: Callable[[], Any] | None = None,
    learning_rate: Any = None,
    param_sum_of_squares: Callable[[], Array],
    on_data_start: Callable[[], None] | None = None,
) -> tuple[Array, int]:
    """(threshold, warm-up steps) of a fresh state (SPEC.md, "Initial threshold").

    First match wins: the rule's own start (the z-score rule's warm-up), an
    explicit threshold (checked by the caller), a stored one (``stored()``,
    None when the store has none), one from the learning rate
    (``clamp(lr_threshold_scale * sqrt(1 / lr))``, every operation in
    float32), else the rule's data start from the parameters' sum of squares
    (``param_sum_of_squares()``, computed only then, after ``on_data_start()``).
    """
    config = rule.config
    fixed = rule.fixed_start(xp)
    if fixed is not None:
        return fixed
    if explicit is not None:
        return clamp_threshold(xp, xp.to_f32(explicit), config), 0
    found = None if stored is None else stored()
    if found is not None:
        return clamp_threshold(xp, xp.to_f32(found), config), 0
    if learning_rate is not None:
        scaled = xp.f32(config.lr_threshold_scale) * xp.sqrt(xp.f32(1.0) / xp.to_f32(learning_rate))
        return clamp_threshold(xp, scaled, config), 0
    if on_data_start is not None:
        on_data_start()
    return rule.data_start(xp, param_sum_of_squares())


# --- The stages, in SPEC.md's order -------------------------------------------------------


def measure(xp: Ops, updates: Any, state: Any, value: Any) -> Measured:
    """1. The global norm of the scaled gradients, then unscaled."""
    raw_norm = xp.sqrt(xp.sum_of_squares(updates))
    norm = raw_norm / state.loss_scale
    return Measured(raw_norm, norm, xp.isfinite(norm), xp.loss(value))


def threshold(xp: Ops, rule: Rule, m: Measured, state: Any, due: Due = ALL_DUE) -> StepThreshold:
    """2. The threshold this step clips at (the rule's)."""
    return rule.step_threshold(xp, m, state, due)


def classify(xp: Ops, m: Measured, t: StepThreshold, config: StabilizerConfig) -> Classes:
    """3. Non-finite, explosion, vanishing, clipped."""
    if config.explosion_factor == math.inf:
        # n > inf * t never holds (inf * 0 is NaN, and n > NaN is false too).
        high = explosion = xp.false()
        calm = m.finite
    else:
        high = m.finite & (m.norm > xp.f32(config.explosion_factor) * t.reference)
        # The track rule: an explosion is also a norm the stream itself rarely
        # produces, above the tracked quantile of its own log-norms.
        explosion = high if t.above is None else high & t.above
        calm = m.finite & ~explosion
    return Classes(
        nonfinite=~m.finite,
        explosion=explosion,
        vanishing=calm & (m.norm < xp.f32(config.vanishing_norm)),
        clipped=m.finite & (m.norm > t.clip),
        calm=calm,
        high=high,
    )


def coefficient(
    xp: Ops, m: Measured, t: StepThreshold, c: Classes, scale: Array, config: StabilizerConfig
) -> tuple[Array, Array | None]:
    """(factor, divisor) of the rescale: each gradient ``x`` becomes ``x * factor``,
    or ``(x / divisor) * factor`` with a divisor.

    The factor is ``t / r`` when clipped, ``1 / s`` otherwise (1 without loss
    scaling): one multiplication per element, within 2 ulps of ``(x / r) *
    t``, the form of ``optax.clip_by_global_norm``; ``x * (1 / s)`` is bit for
    bit SPEC.md's form. ``exact_clip`` computes ``(x / r) * t`` itself: the
    divisor is ``r`` when clipped, else 1 (``x / 1`` is exact), at the cost of
    a division per element.
    """
    one = xp.f32(1.0)
    keep = one / scale if config.loss_scaling else one
    if not config.exact_clip:
        return xp.where(c.clipped, t.clip / m.raw_norm, keep), None
    return xp.where(c.clipped, t.clip, keep), xp.where(c.clipped, m.raw_norm, one)


def rescale(
    xp: Ops,
    updates: Any,
    m: Measured,
    t: StepThreshold,
    c: Classes,
    state: Any,
    config: StabilizerConfig,
) -> Any:
    """4. Every floating gradient times one scalar coefficient, in one pass;
    zeros on a non-finite step."""
    factor, divisor = coefficient(xp, m, t, c, state.loss_scale, config)
    return xp.rescale(updates, factor, divisor, m.finite)


def loss_scale(xp: Ops, c: Classes, state: Any, config: StabilizerConfig) -> Scale:
    """5. The loss-scale rule (nothing without ``loss_scaling``)."""
    scale, growth = next_loss_scale(
        xp,
        state.loss_scale,
        state.loss_scale_growth_count,
        c.nonfinite,
        c.explosion,
        c.vanishing,
        config,
    )
    return Scale(scale, growth)


def history(xp: Ops, m: Measured, c: Classes, state: Any) -> Any:
    """6. Push ``n`` unless non-finite or an explosion (explosions would drag
    the threshold up; vanishing norms are genuine and stay in)."""
    (ring,) = xp.push_all([state.norm_history], [m.norm], [c.calm])
    return ring


def periodic_work(
    xp: Ops,
    rule: Rule,
    norms: Any,
    step_after: Array,
    state: Any,
    config: StabilizerConfig,
    due: Due = ALL_DUE,
) -> Periodic:
    """The history rule's statistic and the diagnostics, under one conditional.

    Most steps need neither: the sort of the history and the trend's window
    run only on the steps that use them.
    """
    adapt_due = None
    if rule.periodic and due.adapt:
        adapt_due = rule.adapt_due(xp, norms, step_after, state)
    diag_due = None
    if config.diagnostics_interval > 0 and due.diagnose:
        diag_due = (step_after % config.diagnostics_interval == 0) & (norms.count >= 2)
    idle = Periodic(
        adapt_due=adapt_due,
        from_history=state.clip_threshold,
        trend=state.norm_trend,
        variance=xp.f32(0.0),
        warning=state.early_warning,
        diagnosed=None if diag_due is None else xp.false(),
    )
    dues = [d for d in (adapt_due, diag_due) if d is not None]
    if not dues:
        return idle

    def work() -> Periodic:
        out = idle
        if adapt_due is not None:
            out = out._replace(from_history=rule.from_history(xp, norms))
        if diag_due is not None:
            recent, valid = norms.chronological(config.diagnostics_window)
            trend, variance, warning = diagnostics(xp, recent, valid, config)
            out = out._replace(
                trend=xp.where(diag_due, trend, idle.trend),
                variance=xp.where(diag_due, variance, idle.variance),
                warning=xp.where(diag_due, warning, idle.warning),
                diagnosed=diag_due,
            )
        return out

    return xp.cond(functools.reduce(operator.or_, dues), work, lambda: idle)


def adapt(
    xp: Ops,
    rule: Rule,
    m: Measured,
    t: StepThreshold,
    c: Classes,
    norms: Any,
    step_after: Array,
    state: Any,
    periodic: Periodic,
) -> Adapted:
    """7. The rule's next threshold and levels, after the push."""
    return rule.adapt(xp, m, t, c, norms, step_after, state, periodic)


def emergency(xp: Ops, rule: Rule, c: Classes, s: Scale, a: Adapted, state: Any) -> Emergency:
    """8. The emergency intervention, after the adaptation so that it cannot be undone."""
    return rule.emergency(xp, c, s, a, state)


def diagnose(periodic: Periodic) -> tuple[Array, Array, Array, Array | None]:
    """9. (trend, variance, early_warning, warned) of this step; the
    computation itself ran in :func:`periodic_work`."""
    warned = None if periodic.diagnosed is None else periodic.diagnosed & periodic.warning
    return periodic.trend, periodic.variance, periodic.warning, warned


def event_flags(xp: Ops, bits: Sequence[tuple[Array | None, Event]]) -> Array:
    """The step's entry of the event-flag ring (SPEC.md, "Event flags"): the
    sum of the flags that hold (None: statically false)."""
    total = xp.i32(0)
    for on, flag in bits:
        if on is not None:
            total = total + xp.where(on, xp.i32(int(flag)), xp.i32(0))
    return total


# The counters, each with the event flag that adds one to it.
COUNTERS: tuple[tuple[str, Event], ...] = (
    ("clip_count", Event.CLIPPED),
    ("explosion_count", Event.EXPLOSION),
    ("vanishing_count", Event.VANISHING),
    ("nonfinite_count", Event.NONFINITE),
    ("emergency_count", Event.EMERGENCY),
    ("warning_count", Event.WARNING),
)


def record(
    xp: Ops,
    rule: Rule,
    m: Measured,
    c: Classes,
    s: Scale,
    norms: Any,
    a: Adapted,
    e: Emergency,
    periodic: Periodic,
    step_after: Array,
    state: Any,
    config: StabilizerConfig,
) -> dict[str, Any]:
    """10. The loss gate, the rings and the counters: every field of the next state.

    The event counters and the rings that only events push (variances,
    thresholds, loss scales, emergencies, exploding norms) change only on a
    step with an event (:meth:`Ops.only_if`). A ring that the config can never
    push (no emergencies, no loss scaling, ...) is not touched at all.
    """
    trend, variance, warning, warned = diagnose(periodic)
    gate = (state.loss_centre, state.loss_reference, state.loss_spread)
    if m.loss is not None:
        # Without a loss the gate keeps its levels: nothing to compute.
        gate = loss_gate(xp, m.loss, c.calm, gate, state.stabilizer_step, config)
    loss_centre, loss_reference, loss_spread = gate
    loss_reference = rule.gate_reference(xp, e.fired, e.consecutive, loss_centre, loss_reference)
    bits = {
        Event.CLIPPED: c.clipped,
        Event.EXPLOSION: c.explosion,
        Event.VANISHING: c.vanishing,
        Event.NONFINITE: c.nonfinite,
        Event.EMERGENCY: e.fired,
        Event.ADAPTED: a.adapted,
        Event.WARNING: warned,
    }
    flags = event_flags(xp, [(on, flag) for flag, on in bits.items()])
    # A diagnostics run pushes its variance even when it raises no flag.
    event = _either(flags != 0, periodic.diagnosed)
    if config.loss_scaling:
        event = event | (e.scale != state.loss_scale)
    # The records: the threshold when adapted or on an emergency, the scale
    # when it changed, the variance of a diagnostics run, the step of an
    # emergency, the norm of an explosion.
    pushes: list[tuple[str, Array, Array]] = []
    threshold_pushed = _either(a.adapted, None if config.emergency_patience == 0 else e.fired)
    if threshold_pushed is not None:
        pushes.append(("threshold_history", e.threshold, threshold_pushed))
    if config.loss_scaling:
        pushes.append(("loss_scale_history", e.scale, e.scale != state.loss_scale))
    if periodic.diagnosed is not None:
        pushes.append(("variance_history", variance, periodic.diagnosed))
    if config.emergency_patience > 0:
        pushes.append(("emergency_steps", state.stabilizer_step, e.fired))
    if config.explosion_factor != math.inf:
        pushes.append(("explosion_norms", m.norm, c.explosion))
    counted = [(name, bits[bit]) for name, bit in COUNTERS if bits[bit] is not None]
    names = [name for name, _ in counted] + [name for name, _, _ in pushes]

    def after_event() -> tuple[Any, ...]:
        counters = xp.count_all([getattr(state, n) for n, _ in counted], [b for _, b in counted])
        rings = xp.push_all(
            [getattr(state, n) for n, _, _ in pushes],
            [item for _, item, _ in pushes],
            [where for _, _, where in pushes],
        )
        return tuple(counters) + tuple(rings)

    def calm() -> tuple[Any, ...]:
        return tuple(getattr(state, name) for name in names)

    events = xp.only_if(event, after_event, calm) if names else None
    unstable = c.nonfinite | c.explosion
    (event_ring,) = xp.push_all([state.event_flags], [flags], [None])
    fields = {
        "stabilizer_step": step_after,
        "clip_threshold": e.threshold,
        "loss_scale": e.scale,
        "loss_scale_growth_count": s.growth_count,
        "warmup_steps_left": a.warmup_left,
        "consecutive_explosions": e.consecutive,
        "emergency_hold_left": e.hold_left,
        "stable_streak": xp.where(
            unstable, xp.i32(0), saturating_increment(xp, state.stable_streak)
        ),
        "last_grad_norm": m.norm,
        "last_loss": state.last_loss if m.loss is None else m.loss,
        "loss_centre": loss_centre,
        "loss_reference": loss_reference,
        "loss_spread": loss_spread,
        "norm_trend": trend,
        "early_warning": warning,
        "ema_mean": e.ema_mean,
        "ema_var": a.ema_var,
        "centre_anchor": a.centre_anchor,
        "norm_quantile": a.norm_quantile,
        "norm_history": norms,
        "event_flags": event_ring,
    }
    if events is not None:
        fields.update(zip(names, events, strict=True))
    return fields


def step(
    xp: Ops,
    updates: Any,
    state: Any,
    config: StabilizerConfig,
    rule: Rule,
    *,
    value: Any = None,
    due: Due = ALL_DUE,
) -> tuple[Any, Any, Array]:
    """One step, stage by stage: (the rescaled updates, the next state, the
    threshold clipped at).

    ``state`` is read by attribute (its fields' names, rings as ring objects)
    and the next state is ``xp.store(state, fields)``.
    """
    m = measure(xp, updates, state, value)
    t = threshold(xp, rule, m, state, due)
    c = classify(xp, m, t, config)
    new_updates = rescale(xp, updates, m, t, c, state, config)
    s = loss_scale(xp, c, state, config)
    norms = history(xp, m, c, state)
    step_after = saturating_increment(xp, state.stabilizer_step)
    periodic = periodic_work(xp, rule, norms, step_after, state, config, due)
    a = adapt(xp, rule, m, t, c, norms, step_after, state, periodic)
    e = emergency(xp, rule, c, s, a, state)
    fields = record(xp, rule, m, c, s, norms, a, e, periodic, step_after, state, config)
    return new_updates, xp.store(state, fields), t.clip
