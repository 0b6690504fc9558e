"""The stabilizer's state and the ring-buffer helpers (SPEC.md, "State")."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from optax_gradflow.config import (  # noqa: F401  (the flags are re-exported)
    FLAG_ADAPTED,
    FLAG_CLIPPED,
    FLAG_EMERGENCY,
    FLAG_EXPLOSION,
    FLAG_NONFINITE,
    FLAG_VANISHING,
    FLAG_WARNING,
    INT32_MAX,
    StabilizerConfig,
)


class GradientFlowState(NamedTuple):
    """State of :func:`optax_gradflow.stabilize` (SPEC.md, "State").

    Field names are part of the API: ``optax.tree.get(opt_state, "clip_threshold")``
    finds them anywhere in a chain. Scalars are 0-d arrays. ``f32`` is float32,
    ``i32`` int32 (counters saturate at 2**31 - 1). ``H`` = norm_history_size,
    ``V`` = variance_history_size, ``L`` = loss_scale_history_size,
    ``T`` = threshold_history_size, ``E`` = event_history_size,
    ``M`` = emergency_history_size.

    Attributes:
      stabilizer_step: i32[], number of updates processed.
      clip_threshold: f32[], the threshold the next step clips at.
      loss_scale: f32[], the current dynamic loss scale.
      loss_scale_growth_count: i32[], consecutive finite steps since the last
        interval growth or non-finite step.
      warmup_steps_left: i32[], steps of data warm-up still to run (0 when the
        threshold came from an explicit value, a store or a learning rate).
      consecutive_explosions: i32[], explosions and non-finite steps in a row.
      emergency_hold_left: i32[], steps during which the "track" rule's
        centre may not rise (set by an emergency; 0 otherwise).
      explosion_count: i32[], total explosions.
      vanishing_count: i32[], total vanishing steps.
      nonfinite_count: i32[], total non-finite (skipped) steps.
      clip_count: i32[], total clipped steps (explosions included).
      emergency_count: i32[], total emergency interventions.
      warning_count: i32[], diagnostics runs that raised the early warning.
      stable_streak: i32[], steps in a row without explosion or non-finite norm.
      last_grad_norm: f32[], unscaled global norm of the latest step (may be
        non-finite).
      last_loss: f32[], the latest ``value=`` passed to update (NaN if none).
      loss_centre: f32[], EMA of the finite ``value=`` losses (NaN before the
        first); with ``loss_reference`` and ``loss_spread``, the "track"
        rule's loss gate.
      loss_reference: f32[], the calm loss level: falls like ``loss_centre``,
        rises slowly (NaN before the first loss).
      loss_spread: f32[], EMA of the losses' deviation from ``loss_centre``.
      norm_trend: f32[], slope of log-norm per history entry at the last
        diagnostics run.
      early_warning: bool[], whether the last diagnostics run crossed a limit.
      ema_mean: f32[], the "track" rule: centre of the log-norm; the "zscore"
        rule: EMA of the norm; 0 otherwise.
      ema_var: f32[], the "track" rule: spread of the log-norm; the "zscore"
        rule: EMA of the norm's variance; 0 otherwise.
      centre_anchor: f32[], the "track" rule: the centre when the loss last
        did not climb; the floor of the tightening is this minus
        ``ln(track_max_cut)``.
      norm_history: f32[H], ring of finite, non-exploding unscaled norms.
      norm_history_index: i32[], next write position in ``norm_history``.
      norm_history_count: i32[], valid entries in ``norm_history`` (<= H).
      variance_history: f32[V], ring of windowed norm variances.
      variance_history_index: i32[].
      variance_history_count: i32[].
      loss_scale_history: f32[L], ring of loss-scale values, pushed on change.
      loss_scale_history_index: i32[].
      loss_scale_history_count: i32[].
      threshold_history: f32[T], ring of thresholds, pushed on change after
        warm-up (adaptation or emergency).
      threshold_history_index: i32[].
      threshold_history_count: i32[].
      event_flags: i32[E], ring of per-step event bit flags.
      event_flags_index: i32[].
      event_flags_count: i32[].
      emergency_steps: i32[M], ring of the step indices of emergencies.
      emergency_steps_index: i32[].
      emergency_steps_count: i32[].
    """

    stabilizer_step: jax.Array
    clip_threshold: jax.Array
    loss_scale: jax.Array
    loss_scale_growth_count: jax.Array
    warmup_steps_left: jax.Array
    consecutive_explosions: jax.Array
    emergency_hold_left: jax.Array
    explosion_count: jax.Array
    vanishing_count: jax.Array
    nonfinite_count: jax.Array
    clip_count: jax.Array
    emergency_count: jax.Array
    warning_count: jax.Array
    stable_streak: jax.Array
    last_grad_norm: jax.Array
    last_loss: jax.Array
    loss_centre: jax.Array
    loss_reference: jax.Array
    loss_spread: jax.Array
    norm_trend: jax.Array
    early_warning: jax.Array
    ema_mean: jax.Array
    ema_var: jax.Array
    centre_anchor: jax.Array
    norm_history: jax.Array
    norm_history_index: jax.Array
    norm_history_count: jax.Array
    variance_history: jax.Array
    variance_history_index: jax.Array
    variance_history_count: jax.Array
    loss_scale_history: jax.Array
    loss_scale_history_index: jax.Array
    loss_scale_history_count: jax.Array
    threshold_history: jax.Array
    threshold_history_index: jax.Array
    threshold_history_count: jax.Array
    event_flags: jax.Array
    event_flags_index: jax.Array
    event_flags_count: jax.Array
    emergency_steps: jax.Array
    emergency_steps_index: jax.Array
    emergency_steps_count: jax.Array


# Ring name -> (config field holding its size, dtype). The order is the order
# of the fields above.
RINGS: dict[str, tuple[str, jnp.dtype]] = {
    "norm_history": ("norm_history_size", jnp.float32),
    "variance_history": ("variance_history_size", jnp.float32),
    "loss_scale_history": ("loss_scale_history_size", jnp.float32),
    "threshold_history": ("threshold_history_size", jnp.float32),
    "event_flags": ("event_history_size", jnp.int32),
    "emergency_steps": ("emergency_history_size", jnp.int32),
}


def expected_shapes(config: StabilizerConfig) -> dict[str, tuple[tuple[int, ...], jnp.dtype]]:
    """Field name -> (shape, dtype) that a state built from ``config`` has."""
    spec: dict[str, tuple[tuple[int, ...], jnp.dtype]] = {}
    for name in GradientFlowState._fields:
        spec[name] = ((), jnp.int32)
    for name in (
        "clip_threshold",
        "loss_scale",
        "last_grad_norm",
        "last_loss",
        "loss_centre",
        "loss_reference",
        "loss_spread",
        "norm_trend",
        "ema_mean",
        "ema_var",
        "centre_anchor",
    ):
        spec[name] = ((), jnp.float32)
    spec["early_warning"] = ((), jnp.bool_)
    for ring, (size_field, dtype) in RINGS.items():
        spec[ring] = ((getattr(config, size_field),), dtype)
    return spec


def check_state(state: GradientFlowState, config: StabilizerConfig) -> None:
    """Raises ValueError if ``state`` was not built for ``config``.

    Shapes and dtypes are static, so this runs at trace time and costs nothing
    per step. A state from a config that differs only in a non-structural value
    (a factor, a limit) cannot be told apart and is accepted.
    """
    if not isinstance(state, GradientFlowState):
        raise TypeError(
            f"Expected a GradientFlowState built by this stabilizer's init, got "
            f"{type(state).__name__}."
        )
    for name, (shape, dtype) in expected_shapes(config).items():
        value = getattr(state, name)
        got_shape = tuple(jnp.shape(value))
        got_dtype = jnp.result_type(value)
        if got_shape != shape or got_dtype != dtype:
            raise ValueError(
                f"GradientFlowState.{name} has shape {got_shape} and dtype {got_dtype}, "
                f"but this stabilizer's config expects shape {shape} and dtype "
                f"{jnp.dtype(dtype)}: the state was built by a different configuration."
            )


def saturating_increment(counter: jax.Array, increment: jax.Array) -> jax.Array:
    """``counter + increment`` for an int32 counter, stopping at 2**31 - 1.

    ``increment`` is a bool or a 0/1 int; counters never wrap to negative.
    """
    increment = jnp.asarray(increment).astype(jnp.int32)
    return jnp.where(counter >= INT32_MAX, counter, counter + increment).astype(jnp.int32)


def ring_push(
    values: jax.Array,
    index: jax.Array,
    count: jax.Array,
    item: jax.Array,
    do_push: jax.Array | bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Writes ``item`` at ``index`` when ``do_push``; returns (values, index, count).

    The buffer keeps the latest ``size`` items; ``index`` is the next write
    position and ``count`` the number of valid items (SPEC.md, "Ring buffers").
    """
    size = values.shape[0]
    do_push = jnp.asarray(do_push)
    written = values.at[index].set(item.astype(values.dtype))
    values = jnp.where(do_push, written, values)
    new_index = jnp.where(do_push, (index + 1) % size, index).astype(jnp.int32)
    new_count = jnp.where(do_push, jnp.minimum(count + 1, size), count).astype(jnp.int32)
    return values, new_index, new_count


def ring_chronological(values: jax.Array, index: jax.Array, window: int) -> jax.Array:
    """The last ``window`` slots of a ring, oldest first.

    Slot ``j`` holds the item written ``window - j`` pushes ago; slots older than
    the ring's count hold stale or initial values and must be masked by the
    caller (``j >= window - count``).
    """
    size = values.shape[0]
    positions = (index - window + jnp.arange(window, dtype=jnp.int32)) % size
    return values[positions]
