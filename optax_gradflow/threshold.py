"""Initial threshold discovery and the adaptation rules.

SPEC.md sections "Initial threshold", "Warm-up threshold" and "Threshold
adaptation". Everything here is a pure function of arrays and the config.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from optax_gradflow import constants
from optax_gradflow.config import INT32_MAX, StabilizerConfig

# Scale factor that makes the median absolute deviation a consistent estimator
# of the standard deviation for normal data: 1 / Phi^{-1}(3/4).
MAD_TO_STD = constants.MAD_TO_STD


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def validate_positive(name: str, value, *, allow_inf: bool = False) -> None:
    """Raises if a concrete ``value`` is not a positive, finite number.

    With ``allow_inf``, ``+inf`` is accepted too (a threshold that never clips).

    Traced values (``inject_hyperparams`` under ``jit``) cannot be checked and
    pass through; they were checked when the state was first built.
    """
    if value is None or not _is_concrete(value):
        return
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}.") from None
    if math.isnan(number) or number <= 0.0 or (math.isinf(number) and not allow_inf):
        finite = "" if allow_inf else " and finite"
        raise ValueError(f"{name} must be positive{finite}, got {value!r}.")


def threshold_from_learning_rate(learning_rate, config: StabilizerConfig) -> jax.Array:
    """``max(min_threshold, lr_threshold_scale * sqrt(1 / lr))`` (SPEC.md)."""
    lr = jnp.asarray(learning_rate, dtype=jnp.float32)
    raw = jnp.float32(config.lr_threshold_scale) * jnp.sqrt(jnp.float32(1.0) / lr)
    return clamp_threshold(raw, config)


def clamp_threshold(threshold: jax.Array, config: StabilizerConfig) -> jax.Array:
    """Clamps into ``[min_threshold, max_threshold]``, as float32."""
    threshold = jnp.asarray(threshold, dtype=jnp.float32)
    return jnp.clip(threshold, jnp.float32(config.min_threshold), jnp.float32(config.max_threshold))


def _valid_mask(values: jax.Array, count: jax.Array) -> jax.Array:
    # Rings are written from slot 0, so the valid slots are always [0, count).
    return jnp.arange(values.shape[0], dtype=jnp.int32) < count


def percentile(values: jax.Array, count: jax.Array, q: float) -> jax.Array:
    """The ``q``-th percentile of the first ``count`` ring slots (linear interpolation).

    With the valid values sorted as ``a[0] <= ... <= a[n-1]``:
    ``pos = q / 100 * (n - 1)``, ``lo = floor(pos)``, ``hi = min(lo + 1, n - 1)``,
    result ``a[lo] + (pos - lo) * (a[hi] - a[lo])``; numpy's default method.
    Undefined (NaN) for ``count == 0``.
    """
    valid = _valid_mask(values, count)
    ordered = jnp.sort(jnp.where(valid, values, jnp.inf))
    n = count.astype(jnp.float32)
    pos = jnp.float32(q / 100.0) * (n - 1.0)
    lo = jnp.floor(pos)
    frac = pos - lo
    lo_i = lo.astype(jnp.int32)
    hi_i = jnp.minimum(lo_i + 1, count - 1)
    a_lo = ordered[lo_i]
    a_hi = ordered[hi_i]
    result = a_lo + frac * (a_hi - a_lo)
    return jnp.where(count > 0, result, jnp.nan)


def _mean_var(values: jax.Array, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    valid = _valid_mask(values, count)
    n = jnp.maximum(count, 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, values, 0.0)) / n
    var = jnp.sum(jnp.where(valid, jnp.square(values - mean), 0.0)) / n
    return mean, var


def rule_percentile(values, count, config: StabilizerConfig) -> jax.Array:
    """AutoClip: the ``adaptation_percentile``-th percentile of the history."""
    return percentile(values, count, config.adaptation_percentile)


def rule_median_mad(values, count, config: StabilizerConfig) -> jax.Array:
    """``median + adaptation_k * 1.4826 * MAD`` of the history."""
    median = percentile(values, count, 50.0)
    deviations = jnp.abs(values - median)
    mad = percentile(deviations, count, 50.0)
    return median + jnp.float32(config.adaptation_k * MAD_TO_STD) * mad


def rule_mean_std(values, count, config: StabilizerConfig) -> jax.Array:
    """``mean + adaptation_k * std`` (population std) of the history."""
    mean, var = _mean_var(values, count)
    return mean + jnp.float32(config.adaptation_k) * jnp.sqrt(var)


ADAPTATION_RULE_FNS: dict[str, Callable[..., jax.Array]] = {
    "percentile": rule_percentile,
    "median_mad": rule_median_mad,
    "mean_std": rule_mean_std,
}


def adapted_threshold(values: jax.Array, count: jax.Array, config: StabilizerConfig) -> jax.Array:
    """The configured adaptation rule applied to the norm history, clamped."""
    rule = ADAPTATION_RULE_FNS[config.adaptation_rule]
    return clamp_threshold(rule(values, count, config), config)


def warmup_threshold(
    values: jax.Array,
    count: jax.Array,
    norm: jax.Array,
    previous: jax.Array,
    config: StabilizerConfig,
) -> jax.Array:
    """The threshold a data warm-up step clips at (SPEC.md, "Warm-up threshold").

    ``warmup_multiplier * median(history)`` once the history holds a norm; with
    an empty history, the step's own norm if finite (nothing to compare it with,
    so it is not clipped), both clamped; else the previous threshold, as is.
    """
    median = percentile(values, count, 50.0)
    from_history = clamp_threshold(jnp.float32(config.warmup_multiplier) * median, config)
    # A skipped step keeps the previous threshold as it is.
    first = jnp.where(jnp.isfinite(norm), clamp_threshold(norm, config), previous)
    return jnp.where(count > 0, from_history, first)


# --- The "zscore" rule (SPEC.md, "Z-score rule") -----------------------------


def zscore_step_threshold(
    norm: jax.Array, finite: jax.Array, mean: jax.Array, var: jax.Array, config: StabilizerConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(threshold, spike, target) of a step after the warm-up.

    ZClip's rule: a finite norm is a spike when its z-score
    ``(n - mean) / (std + eps)`` exceeds ``zscore_threshold`` (``percentile``
    clip: when ``n > mean + zscore_threshold * std``); a spike is clipped to
    ``target``, any other step only at ``max_threshold``.
    """
    zt = jnp.float32(config.zscore_threshold)
    std = jnp.sqrt(var)
    if config.zscore_clip == "percentile":
        target = mean + zt * std
        spike = finite & (norm > target)
    else:
        z = (norm - mean) / (std + jnp.float32(config.zscore_eps))
        spike = finite & (z > zt)
        if config.zscore_clip == "adaptive_scaling":
            # Larger outliers are cut harder: the allowance shrinks by z / zt.
            target = (mean + (zt * std) / (z / zt)) * jnp.float32(config.zscore_clip_factor)
        else:
            target = mean
    threshold = clamp_threshold(jnp.where(spike, target, jnp.inf), config)
    return threshold, spike, target


def zscore_ema_update(
    mean: jax.Array, var: jax.Array, x: jax.Array, config: StabilizerConfig
) -> tuple[jax.Array, jax.Array]:
    """One EMA step of mean and variance towards the value ``x``.

    With ``zscore_reference_variance`` the variance uses the already updated
    mean, as the zclip package does; otherwise the incremental form of Finch
    (2009), ``var' = alpha * (var + (1 - alpha) * (x - mean)**2)``.
    """
    a = jnp.float32(config.zscore_alpha)
    new_mean = a * mean + (1 - a) * x
    if config.zscore_reference_variance:
        new_var = a * var + (1 - a) * jnp.square(x - new_mean)
    else:
        new_var = a * (var + (1 - a) * jnp.square(x - mean))
    return new_mean, new_var


def zscore_boundary(mean: jax.Array, var: jax.Array, config: StabilizerConfig) -> jax.Array:
    """The norm above which the next step is a spike: the reported threshold."""
    std = jnp.sqrt(var)
    zt = jnp.float32(config.zscore_threshold)
    if config.zscore_clip == "percentile":
        boundary = mean + zt * std
    else:
        boundary = mean + zt * (std + jnp.float32(config.zscore_eps))
    return clamp_threshold(boundary, config)


def history_mean_var(values: jax.Array, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and population variance of the valid history (the EMA's start)."""
    return _mean_var(values, count)


# --- The "track" rule (SPEC.md, "Tracking rule") -----------------------------

# Smallest norm whose logarithm the tracker takes: an all-zero gradient would
# give log(0) = -inf. Protects the arithmetic only (float32's smallest normal).
TRACK_LOG_FLOOR = constants.LOG_FLOOR


def log_norm(norm: jax.Array) -> jax.Array:
    """``ln(max(n, TRACK_LOG_FLOOR))`` in float32."""
    return jnp.log(jnp.maximum(norm, jnp.float32(TRACK_LOG_FLOOR)))


def track_threshold(centre: jax.Array, spread: jax.Array, config: StabilizerConfig) -> jax.Array:
    """``clamp(exp(centre + track_k * spread))``: the threshold of the next step."""
    return clamp_threshold(jnp.exp(centre + jnp.float32(config.track_k) * spread), config)


def track_update(
    centre: jax.Array, spread: jax.Array, x: jax.Array, hold: jax.Array, config: StabilizerConfig
) -> tuple[jax.Array, jax.Array]:
    """One step of the tracker towards the log-norm ``x``.

    The deviation ``d = x - centre`` is clamped to ``[-max_fall / rate,
    max_rise / rate]`` before it enters either EMA: one norm, however far off,
    moves the centre by at most ``max_rise`` (up) or ``max_fall`` (down) in
    log units. That bounds the influence of a spike and the speed at which the
    threshold can follow an explosion, yet any lasting level is reached in a
    bounded number of steps. During a hold (an emergency's, or the loss
    gate's) the centre does not rise, and falls only towards a norm more than
    ``spread`` under it.
    """
    rate = jnp.float32(config.track_rate)
    lo = jnp.float32(-config.track_max_fall / config.track_rate)
    hi = jnp.float32(config.track_max_rise / config.track_rate)
    d = jnp.clip(x - centre, lo, hi)
    # During a hold the centre falls only towards a norm more than a spread
    # under it: were every norm under the centre to pull it down while none
    # above could lift it, steady, noisy norms would drag it under their own
    # level, step after step, and the threshold with it.
    step = jnp.where(hold, jnp.minimum(d + spread, 0.0), d)
    new_centre = centre + rate * step
    new_spread = spread + rate * (jnp.abs(d) - spread)
    return new_centre, new_spread


def learning_steps(config: StabilizerConfig) -> int:
    """``round(1 / track_rate)`` (Python's rounding), at most 2**31 - 1."""
    return min(round(1.0 / config.track_rate), INT32_MAX)


def _loss_above(
    centre: jax.Array, reference: jax.Array, spread: jax.Array, k: float, rel: float
) -> jax.Array:
    """``centre > reference + k * max(spread, rel * |reference|)``; False while
    either level is unknown."""
    known = jnp.isfinite(centre) & jnp.isfinite(reference)
    unit = jnp.maximum(spread, jnp.float32(rel) * jnp.abs(reference))
    return known & (centre > reference + jnp.float32(k) * unit)


def loss_rising(
    centre: jax.Array, reference: jax.Array, spread: jax.Array, config: StabilizerConfig
) -> jax.Array:
    """The loss gate: the recent loss above ``reference + track_loss_k * u``,
    ``u = max(spread, track_loss_rel * |reference|)``.

    The unit is at least a share of the loss's own level: a loss whose batch
    noise was learned while it was tiny (a TD loss before the returns grow)
    cannot hold the gate shut once its level has moved. False while either
    level is unknown (no loss given yet).
    """
    return _loss_above(centre, reference, spread, config.track_loss_k, config.track_loss_rel)


def loss_climbing(
    centre: jax.Array, reference: jax.Array, spread: jax.Array, config: StabilizerConfig
) -> jax.Array:
    """The loss clearly climbing: above ``reference + track_loss_cut_k * u``.

    The explosion cut needs this wider margin than the hold: batch noise
    never reaches it, a diverging loss does at once.
    """
    return _loss_above(centre, reference, spread, config.track_loss_cut_k, config.track_loss_rel)


def loss_update(
    centre: jax.Array,
    reference: jax.Array,
    spread: jax.Array,
    loss: jax.Array,
    count: jax.Array,
    calm: jax.Array,
    config: StabilizerConfig,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The loss gate's three levels after the loss ``loss`` (SPEC.md, "Tracking rule").

    ``centre``: EMA of the loss at ``track_rate`` (the recent level, smoothed
    over batches). ``reference``: the calm level; it falls towards a lower
    calm loss at ``track_rate`` but otherwise moves at only
    ``track_loss_rise_rate``, so an explosion's climbing loss stays above it
    while a loss that settles at a new level is caught up with in time, on
    calm steps or not.
    ``spread``: EMA of ``|loss - centre|``, the batch noise, learned only
    while the gate is open, so that an explosion cannot widen the gate. The
    first finite loss starts all three; a non-finite or absent loss changes
    nothing. During the first ``round(1 / track_rate)`` steps (``count``,
    the step on entry) every loss teaches the reference and the spread,
    whatever the norm did: a gate that had learned nothing could otherwise
    close on batch noise and lock a bad start in.
    """
    rate = jnp.float32(config.track_rate)
    finite = jnp.isfinite(loss)
    first = finite & ~jnp.isfinite(centre)
    early = count < jnp.int32(learning_steps(config))
    open_gate = ~loss_rising(centre, reference, spread, config)
    # At first running means (rate 1 / (count + 1)), so that the levels are
    # not left at the first, noisy loss when the gate starts to judge.
    early_rate = jnp.maximum(rate, 1.0 / (count.astype(jnp.float32) + 1.0))
    level_rate = jnp.where(early, early_rate, rate)
    # Bounded influence after the first steps: one loss moves the centre by
    # at most 10 spreads' worth (times the rate), so a single outlier batch (a loss 1e7 times
    # the usual) cannot hold the gate shut for hundreds of steps, while a
    # loss that keeps climbing still closes it within a few steps.
    # The bounds are at least 0.001 |centre|, so that a loss that was
    # constant at first (spread 0) can still move the levels.
    # The centre's bound is also a share of the level (the gate's own unit is):
    # a loss that jumps far above the level its spread was learned at (a TD
    # loss at a target-network copy) is followed within tens of steps, not
    # hundreds.
    floor = 1e-3 * jnp.abs(centre)
    bound = jnp.maximum(3.0 * spread, floor)
    level_share = jnp.float32(max(10.0 * config.track_loss_rel, 1e-3))
    centre_bound = jnp.maximum(10.0 * spread, level_share * jnp.abs(centre))
    # During the first steps the running means are bounded by a share of the
    # level, at least the level itself (the spread is still being learned):
    # one outlier loss among them (1e7 times the usual) moves them by at most
    # that share, and the gate protects again within a few dozen steps. A
    # level of exactly 0 with no spread gives no scale: such a loss is taken
    # as it is.
    scaled = (centre != 0.0) | (spread > 0.0)
    early_share = jnp.float32(max(10.0 * config.track_loss_rel, 1e-3, 1.0)) * jnp.abs(centre)
    early_bound = jnp.where(scaled, jnp.maximum(10.0 * spread, early_share), jnp.inf)
    limit = jnp.where(early, early_bound, centre_bound)
    new_centre = centre + level_rate * jnp.clip(loss - centre, -limit, limit)
    gap = new_centre - reference
    # The reference falls with a calm loss at the centre's rate and rises at
    # track_loss_rise_rate; on other steps (explosions, non-finite norms) it
    # still rises and falls at track_loss_rise_rate: were it frozen there, a
    # loss that settled higher while every step counted as an explosion (a
    # threshold cut far under the norms) would hold the gate shut for good.
    ref_rate = jnp.where(calm & (gap <= 0), rate, jnp.float32(config.track_loss_rise_rate))
    ref_rate = jnp.where(early, early_rate, ref_rate)
    new_reference = reference + ref_rate * gap
    # Bounded influence: after the first steps one loss can add at most 3
    # spreads' worth; during them, at most max(3 spreads, the level's share).
    early_dev_bound = jnp.where(scaled, jnp.maximum(3.0 * spread, early_share), jnp.inf)
    deviation = jnp.minimum(jnp.abs(loss - centre), jnp.where(early, early_dev_bound, bound))
    learn = (open_gate & calm) | early
    new_spread = jnp.where(learn, spread + level_rate * (deviation - spread), spread)
    new_centre = jnp.where(first, loss, new_centre)
    new_reference = jnp.where(first, loss, new_reference)
    new_spread = jnp.where(first, 0.0, new_spread)
    keep = ~finite
    return (
        jnp.where(keep, centre, new_centre),
        jnp.where(keep, reference, new_reference),
        jnp.where(keep, spread, new_spread),
    )
