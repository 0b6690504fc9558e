"""``stabilize()`` and ``stabilized()``: one step, in SPEC.md's order.

Each stage is a small pure function in its own module (threshold.py,
loss_scaling.py, diagnostics.py, state.py); this module strings them together
in the order of SPEC.md, "Per-step order".
"""

from __future__ import annotations

import functools
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_gradflow import events, loss_scaling
from optax_gradflow import threshold as threshold_lib
from optax_gradflow.config import StabilizerConfig
from optax_gradflow.diagnostics import diagnose
from optax_gradflow.state import (
    FLAG_ADAPTED,
    FLAG_CLIPPED,
    FLAG_EMERGENCY,
    FLAG_EXPLOSION,
    FLAG_NONFINITE,
    FLAG_VANISHING,
    FLAG_WARNING,
    RINGS,
    GradientFlowState,
    check_state,
    ring_push,
    saturating_increment,
)

UPDATE_RATIO_HISTORY_SIZE = 100


def _is_float_leaf(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def sum_of_squares(tree: Any) -> jax.Array:
    """Sum of squares of every floating leaf, accumulated in float32.

    Low-precision gradients are upcast first: the squares of float16 gradients
    of a scaled loss overflow float16 long before float32 (SPEC.md, "Global
    norm"). Leaves are summed one by one in tree order, starting from 0.
    Integer, boolean and float0 leaves are not part of the norm.
    """
    sums = []
    for leaf in jax.tree.leaves(tree):
        if not _is_float_leaf(leaf):
            continue
        x = jnp.asarray(leaf)
        if jnp.iscomplexobj(x):
            sq = jnp.square(jnp.real(x).astype(jnp.float32)) + jnp.square(
                jnp.imag(x).astype(jnp.float32)
            )
        else:
            sq = jnp.square(x.astype(jnp.float32))
        sums.append(jnp.sum(sq))
    return functools.reduce(operator.add, sums, jnp.float32(0.0))


def _compute_dtype(dtype) -> jnp.dtype:
    # float16 / bfloat16 leaves are scaled in float32 so that the tiny or huge
    # coefficients of loss scaling do not underflow or overflow; float32 and
    # float64 leaves are scaled in their own dtype.
    return jnp.promote_types(dtype, jnp.float32)


def _rescale_leaf(g, *, raw_norm, threshold, inv_scale, clipped, finite, unscale):
    if not _is_float_leaf(g):
        return g
    cd = _compute_dtype(g.dtype)
    x = g.astype(cd)
    # Written as (g / n) * t, the form of optax.clip_by_global_norm, so that the
    # clip-only preset reproduces it bit for bit.
    clipped_value = (x / raw_norm.astype(cd)) * threshold.astype(cd)
    kept_value = x * inv_scale.astype(cd) if unscale else x
    out = jnp.where(clipped, clipped_value, kept_value)
    # jnp.where, not multiplication by 0: 0 * NaN is NaN.
    out = jnp.where(finite, out, jnp.zeros((), cd))
    return out.astype(g.dtype)


def _event_flags(**bits: jax.Array) -> jax.Array:
    values = {
        "clipped": FLAG_CLIPPED,
        "explosion": FLAG_EXPLOSION,
        "vanishing": FLAG_VANISHING,
        "nonfinite": FLAG_NONFINITE,
        "emergency": FLAG_EMERGENCY,
        "adapted": FLAG_ADAPTED,
        "warning": FLAG_WARNING,
    }
    total = jnp.int32(0)
    for name, flag in bits.items():
        total = total + jnp.where(flag, jnp.int32(values[name]), jnp.int32(0))
    return total


def _structure_signature(tree: Any) -> tuple[tuple[int, ...], ...]:
    # Leaf shapes, not the treedef: frameworks such as flax.nnx initialise with
    # wrapped parameters (nnx.Param) and update with plain arrays.
    return tuple(tuple(jnp.shape(leaf)) for leaf in jax.tree.leaves(tree))


def _same_structure(got, expected, *, sharded: bool) -> bool:
    # With axis_name, update sees per-device shards of the parameters init saw
    # (init usually runs outside shard_map / pmap): only the leaf count must match.
    return len(got) == len(expected) if sharded else got == expected


def init_state(
    threshold, warmup_steps: int | jax.Array, config: StabilizerConfig
) -> GradientFlowState:
    """A fresh state (SPEC.md, "Initial state")."""
    # One buffer per field: a shared zero could not be donated to a jitted step.
    fields: dict[str, jax.Array] = {
        name: jnp.zeros((), jnp.int32) for name in GradientFlowState._fields
    }
    fields.update(
        clip_threshold=jnp.asarray(threshold, jnp.float32),
        loss_scale=jnp.asarray(config.initial_loss_scale, jnp.float32),
        warmup_steps_left=jnp.asarray(warmup_steps, jnp.int32),
        last_grad_norm=jnp.asarray(jnp.nan, jnp.float32),
        last_loss=jnp.asarray(jnp.nan, jnp.float32),
        loss_centre=jnp.asarray(jnp.nan, jnp.float32),
        loss_reference=jnp.asarray(jnp.nan, jnp.float32),
        loss_spread=jnp.zeros((), jnp.float32),
        norm_trend=jnp.zeros((), jnp.float32),
        early_warning=jnp.zeros((), jnp.bool_),
        ema_mean=jnp.zeros((), jnp.float32),
        ema_var=jnp.zeros((), jnp.float32),
        centre_anchor=jnp.zeros((), jnp.float32),
    )
    if config.adaptation_rule == "track":
        # The tracker starts from the initial threshold (ignored in data mode,
        # where the first finite norm starts it).
        fields["ema_mean"] = threshold_lib.log_norm(fields["clip_threshold"])
        fields["centre_anchor"] = threshold_lib.log_norm(fields["clip_threshold"])
    for ring, (size_field, dtype) in RINGS.items():
        fields[ring] = jnp.zeros((getattr(config, size_field),), dtype)
    # The loss-scale history starts with the initial scale.
    fields["loss_scale_history"] = fields["loss_scale_history"].at[0].set(config.initial_loss_scale)
    fields["loss_scale_history_index"] = jnp.asarray(1 % config.loss_scale_history_size, jnp.int32)
    fields["loss_scale_history_count"] = jnp.ones((), jnp.int32)
    return GradientFlowState(**fields)


def _initial_threshold(
    params, learning_rate, initial_threshold, store, label, config
) -> tuple[jax.Array, int]:
    """(threshold, warm-up steps): explicit > stored > learning rate > data."""
    if config.adaptation_rule == "zscore":
        # ZClip's warm-up always runs: the EMA starts from its norms, and until
        # then only max_threshold clips.
        return threshold_lib.clamp_threshold(config.max_threshold, config), config.warmup_steps
    if initial_threshold is None:
        initial_threshold = config.initial_threshold
    if initial_threshold is not None:
        return threshold_lib.clamp_threshold(initial_threshold, config), 0
    if store is not None:
        stored = store.lookup(params, label=label)
        if stored is not None:
            return threshold_lib.clamp_threshold(stored, config), 0
    if learning_rate is not None:
        lr = threshold_lib.learning_rate_at_start(learning_rate)
        return threshold_lib.threshold_from_learning_rate(lr, config), 0
    if config.adaptation_rule == "track":
        # The tracker waits for the first finite norm (SPEC.md, "Tracking rule").
        return jnp.float32(config.min_threshold), 1
    return jnp.float32(config.min_threshold), config.warmup_steps


def _check_factory_args(learning_rate, config, initial_threshold) -> StabilizerConfig:
    if config is None:
        config = StabilizerConfig()
    if not isinstance(config, StabilizerConfig):
        raise TypeError(
            f"config must be an optax_gradflow.StabilizerConfig, got {type(config).__name__}."
        )
    if learning_rate is not None:
        threshold_lib.validate_positive(
            "learning_rate", threshold_lib.learning_rate_at_start(learning_rate)
        )
    threshold_lib.validate_positive("initial_threshold", initial_threshold, allow_inf=True)
    if (
        initial_threshold is not None
        and not isinstance(initial_threshold, jax.core.Tracer)
        and not config.min_threshold <= float(initial_threshold) <= config.max_threshold
    ):
        raise ValueError(
            f"initial_threshold must lie in [config.min_threshold, config.max_threshold] = "
            f"[{config.min_threshold}, {config.max_threshold}], got {initial_threshold!r}."
        )
    return config


def stabilize(
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    config: StabilizerConfig | None = None,
    initial_threshold: float | None = None,
    store: Any = None,
    label: str | None = None,
    axis_name: str | None = None,
    log_events: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Adaptive gradient clipping with dynamic loss scaling and an emergency policy.

  Each step, on the gradients ``g`` of the scaled loss ``loss * s``
  (see :func:`scale_loss`), with threshold ``t``:

  .. math::

    n = \|g\|_2 / s, \qquad
    g' = \begin{cases} 0 & n \text{ not finite (step skipped)} \\
    g \cdot t / \|g\|_2 & n > t \\ g / s & \text{otherwise} \end{cases}

  ``n > explosion_factor * t`` is an explosion, ``n < vanishing_norm`` a
  vanishing step. With the default ``"track"`` rule, ``t = exp(c + k d)``
  follows a robust centre ``c`` and spread ``d`` of ``log n`` at a bounded
  rate (at most +2% / -10% a step), so no start and no level shift can
  lock it in; with the loss passed as ``value=``, a norm explosion while the
  loss climbs is clipped tighter instead of followed. After
  ``emergency_patience`` consecutive explosions the threshold is halved once
  and held from rising (at most once per ``emergency_rearm_steps``). Loss
  scaling (``s``) is opt-in: ``s = 1`` unless ``config.loss_scaling``. The
  full state machine is SPEC.md.

  The initial threshold is, first match wins: ``initial_threshold``; the
  record ``store.lookup(params, label=label)`` finds at ``init`` (one host
  read of the store file, at init only; under ``jax.jit(init)`` at trace
  time); ``lr_threshold_scale * sqrt(1 / learning_rate)`` when
  ``learning_rate`` (a float or a schedule, read at step 0) is given;
  otherwise the first finite norm. It only starts the tracker.

  No step transfers anything to the host (with ``log_events``, only steps
  with an event do). A non-finite step outputs zeros:
  in a chain the next transformation still sees that zero update, so prefer
  :func:`stabilized` to leave an inner optimizer's state untouched.

  Args:
    learning_rate: the optimizer's learning rate or schedule, used only for
      the initial threshold.
    config: a :class:`StabilizerConfig`; the defaults of SPEC.md if None.
    initial_threshold: an explicit initial threshold; wins over the rest.
    store: an object with ``lookup(params, label=...) -> float | None``, such
      as :class:`ThresholdStore`, consulted at ``init``.
    label: the user label of the model fingerprint for ``store``.
    axis_name: under ``pmap`` / ``shard_map`` with gradients sharded over
      this axis, the squared norm is summed across it (one all-reduce of one
      float32 scalar per step), so every device takes the same decision.
      Not for gradients that are already whole on every device (averaged
      with ``pmean``): they would be counted once per device. Under ``jit``
      with sharded arrays it is not needed: XLA does the reduction.
    log_events: log explosions, non-finite and vanishing steps, adaptations,
      emergencies and early warnings through the ``"optax_gradflow"`` logger
      (see :mod:`optax_gradflow.events`). Only a step with such an event
      calls back to the host (``jax.debug.callback`` behind a ``lax.cond``);
      the other steps transfer nothing.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`GradientFlowState`. ``update`` accepts the loss as ``value=``
    (optional, recorded as ``last_loss``) and ignores other extra args.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_gradflow
    >>> tx = optax_gradflow.stabilize(1e-2)  # starts at t = 0.1 * sqrt(1 / 1e-2) = 1
    >>> params = {"w": jnp.ones(3)}
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.full(3, 10.0)}  # norm 17.3: clipped to 1
    >>> updates, state = tx.update(grads, state, params, value=jnp.float32(1.0))
    >>> round(float(optax.tree.norm(updates)), 4)
    1.0
    >>> # The centre rose by its bounded step 0.02 (ln 17.3 - 0 is clamped to
    >>> # 0.02 / 0.05 = 0.4, times the rate 0.05), the spread to 0.05 * 0.4:
    >>> round(float(state.clip_threshold), 4)  # exp(0.02 + 1.0 * 0.02)
    1.0408

  References:
    Pascanu et al., `On the difficulty of training recurrent neural networks
    <https://arxiv.org/abs/1211.5063>`_, 2013.
    Seetharaman et al., `AutoClip: Adaptive gradient clipping for source
    separation networks <https://arxiv.org/abs/2007.14469>`_, 2020.
    Kumar et al., `ZClip: Adaptive spike mitigation for LLM pre-training
    <https://arxiv.org/abs/2504.02507>`_, 2025.
    Micikevicius et al., `Mixed precision training
    <https://arxiv.org/abs/1710.03740>`_, 2018.
  """
    config = _check_factory_args(learning_rate, config, initial_threshold)
    emitter = events.InGraphEmitter(config, name=label) if log_events else None

    # The closures capture hyperparameters only: one instance serves any
    # number of parameter trees and init calls (optax.partition may route two
    # sub-trees to it; a notebook may re-run init on another model).
    def init_fn(params):
        thr, warmup = _initial_threshold(
            params, learning_rate, initial_threshold, store, label, config
        )
        return init_state(thr, warmup, config)

    def update_fn(updates, state, params=None, *, value=None, **extra_args):
        del extra_args
        check_state(state, config)
        # What can be checked comes from this call's arguments: the gradients
        # must match the parameters passed along with them.
        if params is not None and not _same_structure(
            _structure_signature(updates),
            _structure_signature(params),
            sharded=axis_name is not None,
        ):
            raise ValueError(
                "The gradients' tree structure does not match the parameters passed to "
                f"update: leaf shapes {list(_structure_signature(updates))}, expected "
                f"{list(_structure_signature(params))}."
            )
        new_updates, new_state, threshold = _step(
            updates, state, config, value=value, axis_name=axis_name
        )
        if emitter is not None:
            events.emit_in_graph(state, new_state, emitter, threshold, axis_name)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def step(
    updates: Any,
    state: GradientFlowState,
    config: StabilizerConfig,
    *,
    value: jax.Array | None = None,
    axis_name: str | None = None,
) -> tuple[Any, GradientFlowState]:
    """One stabilizer step (SPEC.md, "Per-step order"); pure, jit-able."""
    new_updates, new_state, _ = _step(updates, state, config, value=value, axis_name=axis_name)
    return new_updates, new_state


def _step(
    updates: Any,
    state: GradientFlowState,
    config: StabilizerConfig,
    *,
    value: jax.Array | None,
    axis_name: str | None,
) -> tuple[Any, GradientFlowState, jax.Array]:
    """:func:`step`, also returning the threshold the step clipped at."""
    # 1-2. Global norm of the scaled gradients, then unscale it.
    sq = sum_of_squares(updates)
    if axis_name is not None:
        sq = jax.lax.psum(sq, axis_name)
    raw_norm = jnp.sqrt(sq)
    scale = state.loss_scale
    norm = raw_norm / scale
    finite = jnp.isfinite(norm)

    if value is None:
        loss_value = jnp.float32(jnp.nan)
    else:
        loss_value = jnp.asarray(value).astype(jnp.float32).reshape(())

    # 3. The threshold this step clips at, and the one explosions are measured
    # against (the same, except under the zscore rule).
    in_warmup = state.warmup_steps_left > 0
    if config.adaptation_rule == "zscore":
        zscore_thr, spike, target = threshold_lib.zscore_step_threshold(
            norm, finite, state.ema_mean, state.ema_var, config
        )
        # As ZClip: the warm-up collects norms and clips only at max_threshold.
        warm_thr = threshold_lib.clamp_threshold(config.max_threshold, config)
        thr = jnp.where(in_warmup, warm_thr, zscore_thr)
        spike = spike & ~in_warmup
        reference = jnp.where(in_warmup, warm_thr, state.clip_threshold)
    elif config.adaptation_rule == "track":
        # Waiting for the first finite, positive norm: it has nothing to be
        # compared with and is not clipped; it starts the tracker.
        first = jnp.where(finite, threshold_lib.clamp_threshold(norm, config), state.clip_threshold)
        thr = jnp.where(in_warmup, first, state.clip_threshold)
        reference = thr
    else:
        # lax.cond, not jnp.where: the warm-up median sorts the history, work
        # that only warm-up steps need. The gate is the state's counter, not the
        # config, so that a resumed warm-up finishes whatever the config says.
        thr = jax.lax.cond(
            in_warmup,
            lambda: threshold_lib.warmup_threshold(
                state.norm_history, state.norm_history_count, norm, state.clip_threshold, config
            ),
            lambda: state.clip_threshold,
        )
        reference = thr

    # 4. Classification.
    nonfinite = ~finite
    explosion = finite & (norm > jnp.float32(config.explosion_factor) * reference)
    vanishing = finite & ~explosion & (norm < jnp.float32(config.vanishing_norm))
    clipped = finite & (norm > thr)

    # 5. Unscale, clip or zero: one pass over the gradients.
    inv_scale = jnp.float32(1.0) / scale
    new_updates = jax.tree.map(
        functools.partial(
            _rescale_leaf,
            raw_norm=raw_norm,
            threshold=thr,
            inv_scale=inv_scale,
            clipped=clipped,
            finite=finite,
            unscale=config.loss_scaling,
        ),
        updates,
    )

    # 6. Loss-scale rule.
    new_scale, growth_count = loss_scaling.next_loss_scale(
        scale,
        state.loss_scale_growth_count,
        nonfinite=nonfinite,
        explosion=explosion,
        vanishing=vanishing,
        config=config,
    )

    # 7. History. Explosions stay out of it, so that they cannot drag the
    # threshold up; vanishing norms are genuine and stay in.
    norm_hist, norm_idx, norm_cnt = ring_push(
        state.norm_history,
        state.norm_history_index,
        state.norm_history_count,
        norm,
        finite & ~explosion,
    )

    # 8. Adaptation: at the end of the warm-up, then every adaptation_interval
    # steps once the warm-up is over (the zscore rule: every step).
    step_after = saturating_increment(state.stabilizer_step, True)
    warmup_left = jnp.maximum(state.warmup_steps_left - 1, 0).astype(jnp.int32)
    ends_warmup = state.warmup_steps_left == 1
    ema_mean, ema_var = state.ema_mean, state.ema_var
    centre_anchor = state.centre_anchor
    if config.adaptation_rule == "zscore":
        # The EMA needs a norm to start from: the warm-up waits for one.
        warmup_left = jnp.where(ends_warmup & (norm_cnt == 0), 1, warmup_left).astype(jnp.int32)
        adapt = ends_warmup & (norm_cnt > 0)
        start_mean, start_var = threshold_lib.history_mean_var(norm_hist, norm_cnt)
        moved_mean, moved_var = threshold_lib.zscore_ema_update(
            ema_mean, ema_var, jnp.where(spike, target, norm), config
        )
        move = finite & ~in_warmup
        if config.zscore_skip_spikes:
            move = move & ~spike
        ema_mean = jnp.where(adapt, start_mean, jnp.where(move, moved_mean, ema_mean))
        ema_var = jnp.where(adapt, start_var, jnp.where(move, moved_var, ema_var))
        new_thr = jnp.where(
            in_warmup & ~adapt, thr, threshold_lib.zscore_boundary(ema_mean, ema_var, config)
        )
    elif config.adaptation_rule == "track":
        x = threshold_lib.log_norm(norm)
        # The centre does not rise during an emergency hold, nor while the
        # loss climbs above its own recent level: a higher norm level with a
        # steady loss is followed, an explosion in progress is not.
        rising = threshold_lib.loss_rising(
            state.loss_centre, state.loss_reference, state.loss_spread, config
        )
        hold = (state.emergency_hold_left > 0) | rising
        moved_centre, moved_spread = threshold_lib.track_update(ema_mean, ema_var, x, hold, config)
        # An explosion while the loss climbs is an explosion in progress: the
        # centre is pulled down at track_max_fall, but never below
        # track_max_cut times under where it stood when the loss began to
        # climb (the anchor), so that it cannot ratchet down.
        floor = state.centre_anchor - jnp.log(jnp.float32(config.track_max_cut))
        tightened = jnp.maximum(
            jnp.minimum(moved_centre, ema_mean - jnp.float32(config.track_max_fall)),
            jnp.minimum(floor, ema_mean),
        )
        climbing = threshold_lib.loss_climbing(
            state.loss_centre, state.loss_reference, state.loss_spread, config
        )
        moved_centre = jnp.where(climbing & explosion, tightened, moved_centre)
        # A zero norm (an all-zero gradient) has no level to start from.
        start = in_warmup & finite & (norm > 0)
        move = finite & ~in_warmup
        ema_mean = jnp.where(start, x, jnp.where(move, moved_centre, ema_mean))
        ema_var = jnp.where(start, 0.0, jnp.where(move, moved_spread, ema_var))
        # The anchor follows the centre on calm steps while the loss does not
        # climb: explosions never move it, so one climb cannot re-anchor lower.
        calm_open = ~rising & finite & ~explosion
        centre_anchor = jnp.where(start | calm_open, ema_mean, state.centre_anchor)
        warmup_left = jnp.where(in_warmup & ~start, 1, 0).astype(jnp.int32)
        new_thr = jnp.where(
            start | move, threshold_lib.track_threshold(ema_mean, ema_var, config), thr
        )
        # The threshold moves every step; "adapted" marks the start and then
        # every adaptation_interval steps, so that the threshold history
        # records its course.
        adapt = start
        if config.adaptation_interval > 0:
            adapt = adapt | ((step_after % config.adaptation_interval == 0) & ~in_warmup)
    else:
        adapt = ends_warmup
        if config.adaptation_interval > 0:
            periodic = (step_after % config.adaptation_interval == 0) & (warmup_left == 0)
            adapt = adapt | periodic
        adapt = adapt & (norm_cnt > 0)
        # lax.cond: the rule sorts the history, which most steps do not need.
        new_thr = jax.lax.cond(
            adapt,
            lambda: threshold_lib.adapted_threshold(norm_hist, norm_cnt, config),
            lambda: thr,
        )

    # 9. Emergency intervention.
    consecutive = jnp.where(
        nonfinite | explosion, saturating_increment(state.consecutive_explosions, True), 0
    ).astype(jnp.int32)
    hold_left = state.emergency_hold_left
    if config.adaptation_rule == "track":
        hold_left = jnp.maximum(hold_left - 1, 0).astype(jnp.int32)
    if config.emergency_patience > 0 and config.adaptation_rule == "track":
        # Once per unbroken run of explosions: the run keeps counting, so a
        # lasting rise costs one emergency, and the action (a hold on the
        # centre's rise) is set, not compounded.
        last = state.emergency_steps[
            (state.emergency_steps_index - 1) % config.emergency_history_size
        ]
        armed = (state.emergency_steps_count == 0) | (
            state.stabilizer_step - last >= config.emergency_rearm_steps
        )
        fire = (consecutive == config.emergency_patience) & armed
        hold_left = jnp.where(fire, jnp.int32(config.emergency_hold_steps), hold_left)
    elif config.emergency_patience > 0:
        fire = consecutive >= config.emergency_patience
    else:
        fire = jnp.zeros((), jnp.bool_)
    if config.adaptation_rule == "track":
        # The emergency also tightens once: the centre drops by
        # emergency_threshold_factor (at most once per re-arm period, so it
        # cannot compound into a ratchet; calm steps undo it).
        cut = jnp.log(jnp.float32(config.emergency_threshold_factor))
        ema_mean = jnp.where(fire, ema_mean + cut, ema_mean)
        new_thr = jnp.where(fire, threshold_lib.track_threshold(ema_mean, ema_var, config), new_thr)
    else:
        new_thr = jnp.where(
            fire,
            jnp.maximum(
                new_thr * jnp.float32(config.emergency_threshold_factor),
                jnp.float32(config.min_threshold),
            ),
            new_thr,
        )
        consecutive = jnp.where(fire, 0, consecutive).astype(jnp.int32)
    new_scale = loss_scaling.emergency_loss_scale(new_scale, fire, config)

    # 10. Diagnostics every diagnostics_interval steps.
    if config.diagnostics_interval > 0:
        run_diag = (step_after % config.diagnostics_interval == 0) & (norm_cnt >= 2)
        trend, variance, warning = jax.lax.cond(
            run_diag,
            lambda: diagnose(norm_hist, norm_idx, norm_cnt, config),
            lambda: (state.norm_trend, jnp.zeros((), jnp.float32), state.early_warning),
        )
    else:
        run_diag = jnp.zeros((), jnp.bool_)
        trend, variance, warning = state.norm_trend, jnp.zeros((), jnp.float32), state.early_warning
    var_hist, var_idx, var_cnt = ring_push(
        state.variance_history,
        state.variance_history_index,
        state.variance_history_count,
        variance,
        run_diag,
    )

    # 11. Records and counters.
    thr_hist, thr_idx, thr_cnt = ring_push(
        state.threshold_history,
        state.threshold_history_index,
        state.threshold_history_count,
        new_thr,
        adapt | fire,
    )
    ls_hist, ls_idx, ls_cnt = ring_push(
        state.loss_scale_history,
        state.loss_scale_history_index,
        state.loss_scale_history_count,
        new_scale,
        new_scale != scale,
    )
    flags = _event_flags(
        clipped=clipped,
        explosion=explosion,
        vanishing=vanishing,
        nonfinite=nonfinite,
        emergency=fire,
        adapted=adapt,
        warning=run_diag & warning,
    )
    ev_hist, ev_idx, ev_cnt = ring_push(
        state.event_flags, state.event_flags_index, state.event_flags_count, flags
    )
    em_hist, em_idx, em_cnt = ring_push(
        state.emergency_steps,
        state.emergency_steps_index,
        state.emergency_steps_count,
        state.stabilizer_step,
        fire,
    )
    unstable = nonfinite | explosion
    if value is None:
        last_loss = state.last_loss
    else:
        last_loss = jnp.asarray(value).astype(jnp.float32).reshape(())

    loss_centre, loss_reference, loss_spread = threshold_lib.loss_update(
        state.loss_centre,
        state.loss_reference,
        state.loss_spread,
        loss_value,
        state.stabilizer_step,
        finite & ~explosion,
        config,
    )
    if config.adaptation_rule == "track":
        # An emergency accepts the loss level it fires at as the new
        # reference: a loss that keeps climbing closes the gate again within
        # a few steps, while a loss that only settled higher (a target-network
        # copy, a new task) no longer holds the threshold down.
        loss_reference = jnp.where(fire & jnp.isfinite(loss_centre), loss_centre, loss_reference)
    new_state = GradientFlowState(
        stabilizer_step=step_after,
        clip_threshold=new_thr.astype(jnp.float32),
        loss_scale=new_scale,
        loss_scale_growth_count=growth_count,
        warmup_steps_left=warmup_left,
        consecutive_explosions=consecutive,
        emergency_hold_left=hold_left,
        explosion_count=saturating_increment(state.explosion_count, explosion),
        vanishing_count=saturating_increment(state.vanishing_count, vanishing),
        nonfinite_count=saturating_increment(state.nonfinite_count, nonfinite),
        clip_count=saturating_increment(state.clip_count, clipped),
        emergency_count=saturating_increment(state.emergency_count, fire),
        warning_count=saturating_increment(state.warning_count, run_diag & warning),
        stable_streak=jnp.where(
            unstable, 0, saturating_increment(state.stable_streak, True)
        ).astype(jnp.int32),
        last_grad_norm=norm.astype(jnp.float32),
        last_loss=last_loss,
        loss_centre=loss_centre,
        loss_reference=loss_reference,
        loss_spread=loss_spread,
        norm_trend=trend,
        early_warning=warning,
        ema_mean=ema_mean.astype(jnp.float32),
        ema_var=ema_var.astype(jnp.float32),
        centre_anchor=centre_anchor.astype(jnp.float32),
        norm_history=norm_hist,
        norm_history_index=norm_idx,
        norm_history_count=norm_cnt,
        variance_history=var_hist,
        variance_history_index=var_idx,
        variance_history_count=var_cnt,
        loss_scale_history=ls_hist,
        loss_scale_history_index=ls_idx,
        loss_scale_history_count=ls_cnt,
        threshold_history=thr_hist,
        threshold_history_index=thr_idx,
        threshold_history_count=thr_cnt,
        event_flags=ev_hist,
        event_flags_index=ev_idx,
        event_flags_count=ev_cnt,
        emergency_steps=em_hist,
        emergency_steps_index=em_idx,
        emergency_steps_count=em_cnt,
    )
    return new_updates, new_state, thr


class StabilizedState(NamedTuple):
    """State of :func:`stabilized` (SPEC.md, "Wrapper form").

    Attributes:
      inner_state: the inner optimizer's state, untouched on skipped steps.
      flow: the stabilizer's :class:`GradientFlowState`.
      update_ratio_history: f32[100], ring of ``|update| / |params|`` (global
        L2 norms) of applied steps.
      update_ratio_index: i32[], next write position.
      update_ratio_count: i32[], valid entries.
    """

    inner_state: Any
    flow: GradientFlowState
    update_ratio_history: jax.Array
    update_ratio_index: jax.Array
    update_ratio_count: jax.Array


def stabilized(
    inner: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    config: StabilizerConfig | None = None,
    initial_threshold: float | None = None,
    store: Any = None,
    label: str | None = None,
    axis_name: str | None = None,
    track_update_ratio: bool = True,
    log_events: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that it only ever sees stabilized gradients.

    Like ``optax.chain(stabilize(...), inner)``, except that on a skipped
    (non-finite) step the inner optimizer is not stepped at all: its state is
    left bit-identical and the update is zero, for ever, with no give-up
    counter (unlike ``optax.apply_if_finite``). It also records ``|update| /
    |params|`` for the stability report.

    Args:
      inner: the optimizer to protect, e.g. ``optax.adam(1e-3)``.
      learning_rate: as in :func:`stabilize`; typically the inner's.
      config: as in :func:`stabilize`.
      initial_threshold: as in :func:`stabilize`.
      store: as in :func:`stabilize`.
      label: as in :func:`stabilize`.
      axis_name: as in :func:`stabilize`; the parameters and updates are then
        sharded like the gradients, and the update-ratio norms are summed
        across the axis too.
      track_update_ratio: record ``|update| / |params|`` each applied step;
        costs two extra reductions over the updates and the parameters (and,
        with ``axis_name``, one all-reduce of two scalars).
      log_events: as in :func:`stabilize`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`StabilizedState`.
      Extra args (``value=`` included) are passed on to ``inner``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_gradflow
      >>> opt = optax_gradflow.stabilized(optax.adam(1e-2), 1e-2)
      >>> params = {"w": jnp.ones(3)}
      >>> state = opt.init(params)
      >>> bad = {"w": jnp.array([1.0, jnp.nan, 0.0])}
      >>> updates, new_state = opt.update(bad, state, params)
      >>> float(abs(updates["w"]).sum())
      0.0
    """
    flow = stabilize(
        learning_rate,
        config=config,
        initial_threshold=initial_threshold,
        store=store,
        label=label,
        axis_name=axis_name,
        log_events=log_events,
    )
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return StabilizedState(
            inner_state=inner.init(params),
            flow=flow.init(params),
            update_ratio_history=jnp.zeros((UPDATE_RATIO_HISTORY_SIZE,), jnp.float32),
            update_ratio_index=jnp.zeros((), jnp.int32),
            update_ratio_count=jnp.zeros((), jnp.int32),
        )

    def update_fn(updates, state, params=None, *, value=None, **extra_args):
        clean, flow_state = flow.update(updates, state.flow, params, value=value)
        skip = ~jnp.isfinite(flow_state.last_grad_norm)
        if value is not None:
            extra_args = dict(extra_args, value=value)
        inner_updates, inner_state = inner.update(clean, state.inner_state, params, **extra_args)
        # Select, leaf by leaf: the inner state of a skipped step is the old one.
        inner_state = jax.tree.map(
            lambda new, old: jnp.where(skip, old, new), inner_state, state.inner_state
        )
        new_updates = jax.tree.map(
            lambda u: jnp.where(skip, jnp.zeros((), u.dtype), u) if _is_float_leaf(u) else u,
            inner_updates,
        )
        ratio_hist, ratio_idx, ratio_cnt = (
            state.update_ratio_history,
            state.update_ratio_index,
            state.update_ratio_count,
        )
        if track_update_ratio and params is not None:
            param_sq, update_sq = sum_of_squares(params), sum_of_squares(new_updates)
            if axis_name is not None:
                # The parameters and updates are sharded like the gradients: one
                # more all-reduce, of these two scalars.
                param_sq, update_sq = jax.lax.psum((param_sq, update_sq), axis_name)
            param_norm = jnp.sqrt(param_sq)
            ratio = jnp.sqrt(update_sq) / param_norm
            ratio_hist, ratio_idx, ratio_cnt = ring_push(
                ratio_hist,
                ratio_idx,
                ratio_cnt,
                ratio,
                ~skip & (param_norm > 0) & jnp.isfinite(ratio),
            )
        return new_updates, StabilizedState(
            inner_state=inner_state,
            flow=flow_state,
            update_ratio_history=ratio_hist,
            update_ratio_index=ratio_idx,
            update_ratio_count=ratio_cnt,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
