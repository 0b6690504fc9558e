"""``stabilize()`` and ``stabilized()``: the optax transformations.

The step itself is :mod:`optax_gradflow.pipeline`, a sequence of named stages
in SPEC.md's order; this module builds the transformations around it: the
initial state, the argument checks, the rule object (chosen once here), the
event log and the wrapper form.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_gradflow import arithmetic, events, pipeline
from optax_gradflow import learning_rate as learning_rate_lib
from optax_gradflow.config import StabilizerConfig, check_initial_threshold
from optax_gradflow.constants import RINGS, STATE_VERSION, UPDATE_RATIO_HISTORY_SIZE
from optax_gradflow.pipeline import sum_of_squares
from optax_gradflow.state import FIELDS as STATE_FIELDS
from optax_gradflow.state import GradientFlowState, Ring, StabilizedState, check_state

__all__ = ("StabilizedState", "init_state", "stabilize", "stabilized", "step", "sum_of_squares")


def _check_floating(tree: Any, what: str) -> None:
    """Raises TypeError naming the first leaf of ``tree`` that is not floating point.

    optax's optimizers cannot update an integer or boolean parameter (their
    moments are floats), and a float0 gradient (``jax.grad`` of an integer
    input) has nothing to clip: such leaves belong outside the optimized tree.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            name = "float0" if dtype == jax.dtypes.float0 else str(dtype)
            raise TypeError(
                f"The {what} at {jax.tree_util.keystr(path) or '(the root)'} has dtype "
                f"{name}: the stabilizer, like optax's optimizers, handles floating-point "
                "parameters only. Keep integer and boolean values out of the optimized tree "
                "(e.g. in a separate state), or give them optax.set_to_zero() with "
                "optax.partition."
            )


def _check_value(value: Any) -> None:
    """Raises unless ``value`` (the loss, ``value=``) is one real number; shapes only."""
    if value is None:
        return
    shape = jnp.shape(value)
    if math.prod(shape) != 1:
        raise ValueError(
            f"value= must be the loss, one number; got an array of shape {shape} (pass the "
            "mean loss, e.g. jnp.mean(losses))."
        )
    dtype = jnp.result_type(value)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"value= must be a real number, got dtype {dtype}.")


def _leaf_shapes(tree: Any) -> list[tuple[str, tuple[int, ...]]]:
    # Leaf shapes, not the treedef: frameworks such as flax.nnx initialise with
    # wrapped parameters (nnx.Param) and update with plain arrays.
    return [
        (jax.tree_util.keystr(path), tuple(jnp.shape(leaf)))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def _check_matching(updates: Any, params: Any, *, sharded: bool) -> None:
    """Raises ValueError, naming the paths, unless the gradients match ``params``.

    The leaf shapes are compared in tree order; with ``sharded`` (``axis_name``:
    ``update`` sees per-device shards of the parameters ``init`` saw) only the
    leaf count.
    """
    got, expected = _leaf_shapes(updates), _leaf_shapes(params)
    if len(got) != len(expected):
        got_paths, expected_paths = [p for p, _ in got], [p for p, _ in expected]
        extra = [p for p in got_paths if p not in expected_paths]
        missing = [p for p in expected_paths if p not in got_paths]
        detail = "; ".join(
            part
            for part in (
                f"gradients without a parameter: {', '.join(extra)}" if extra else "",
                f"parameters without a gradient: {', '.join(missing)}" if missing else "",
            )
            if part
        )
        raise ValueError(
            f"The gradients' tree structure does not match the parameters passed to update: "
            f"{len(got)} gradient leaves, {len(expected)} parameters"
            f"{'; ' + detail if detail else ''}."
        )
    if sharded:
        return
    for (g_path, g_shape), (p_path, p_shape) in zip(got, expected, strict=True):
        if g_shape != p_shape:
            where = g_path if g_path == p_path else f"{g_path} (parameter {p_path})"
            raise ValueError(
                f"The gradients' tree structure does not match the parameters passed to "
                f"update: the gradient at {where} has shape {g_shape}, the parameter "
                f"{p_shape}."
            )


def init_state(
    threshold, warmup_steps: int | jax.Array, config: StabilizerConfig
) -> GradientFlowState:
    """A fresh state (SPEC.md, "State")."""
    # One buffer per named leaf: a shared zero could not be donated to a jitted
    # step (the packed scalars are stacked into vectors of their own).
    fields: dict[str, Any] = {name: jnp.zeros((), jnp.int32) for name in STATE_FIELDS}
    threshold = jnp.asarray(threshold, jnp.float32)
    ema_mean, centre_anchor, norm_quantile = pipeline.rule_for(config).initial_levels(
        pipeline.JaxOps(), threshold
    )
    fields.update(
        clip_threshold=threshold,
        loss_scale=jnp.asarray(config.initial_loss_scale, jnp.float32),
        warmup_steps_left=jnp.asarray(warmup_steps, jnp.int32),
        last_grad_norm=jnp.asarray(jnp.nan, jnp.float32),
        last_loss=jnp.asarray(jnp.nan, jnp.float32),
        loss_centre=jnp.asarray(jnp.nan, jnp.float32),
        loss_reference=jnp.asarray(jnp.nan, jnp.float32),
        loss_spread=jnp.zeros((), jnp.float32),
        norm_trend=jnp.zeros((), jnp.float32),
        early_warning=jnp.zeros((), jnp.bool_),
        ema_mean=ema_mean,
        ema_var=jnp.zeros((), jnp.float32),
        centre_anchor=centre_anchor,
        norm_quantile=norm_quantile,
        state_version=jnp.asarray(STATE_VERSION, jnp.int32),
    )
    for ring, (size_field, dtype) in RINGS.items():
        fields[ring] = Ring.empty(getattr(config, size_field), jnp.dtype(dtype))
    # The loss-scale history starts with the initial scale.
    size = config.loss_scale_history_size
    fields["loss_scale_history"] = Ring(
        jnp.zeros((size,), jnp.float32).at[0].set(config.initial_loss_scale),
        jnp.asarray(1 % size, jnp.int32),
        jnp.ones((), jnp.int32),
    )
    return GradientFlowState.of(**fields)


def _read_learning_rate(learning_rate) -> Any:
    """The learning rate of rule 3 of "Initial threshold": a float, None, or a tracer.

    Read once, when the transformation is built. A traced learning rate
    (``inject_hyperparams`` under ``jit``) cannot be read and is used as is.
    """
    if learning_rate is None or isinstance(learning_rate, jax.core.Tracer):
        return learning_rate
    # Eagerly, even when the transformation is built inside a jitted function:
    # a schedule of constants then still gives numbers.
    with jax.ensure_compile_time_eval():
        return learning_rate_lib.read(learning_rate)


def _initial_threshold(
    params, learning_rate, lr, initial_threshold, store, label, config
) -> tuple[jax.Array, int]:
    """(threshold, warm-up steps): the shared start rule (SPEC.md, "Initial threshold").

    ``lr`` is ``_read_learning_rate(learning_rate)``.
    """
    if initial_threshold is None:
        initial_threshold = config.initial_threshold

    def warn() -> None:
        # A learning rate that reads 0 (a schedule from 0) gives no threshold.
        if learning_rate is not None:
            warnings.warn(learning_rate_lib.no_threshold_message(learning_rate), stacklevel=5)

    return arithmetic.start(
        pipeline.JaxOps(),
        pipeline.rule_for(config),
        explicit=initial_threshold,
        stored=None if store is None else lambda: store.lookup(params, label=label),
        learning_rate=lr,
        param_sum_of_squares=lambda: pipeline.sum_of_squares(params),
        on_data_start=warn,
    )


def _check_factory_args(config, initial_threshold) -> StabilizerConfig:
    if config is None:
        config = StabilizerConfig()
    if not isinstance(config, StabilizerConfig):
        raise TypeError(
            f"config must be an optax_gradflow.StabilizerConfig, got {type(config).__name__}."
        )
    # A traced threshold (inject_hyperparams under jit) cannot be read: it is
    # used as is, as a traced learning rate is.
    if initial_threshold is not None and not isinstance(initial_threshold, jax.core.Tracer):
        check_initial_threshold(initial_threshold, config)
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
  time); ``lr_threshold_scale * sqrt(1 / lr)`` when ``learning_rate`` is
  given, with ``lr`` the number itself or, for a schedule, its largest value
  over its first 10,000 steps (the peak after a warm-up from 0, see
  :func:`optax_gradflow.learning_rate.read`); otherwise, or when that ``lr``
  is 0 (with a warning), the first finite norm, clipped at
  ``config.param_threshold_scale`` times the global norm of the ``params``
  given to ``init`` (SPEC.md, "Initial threshold" 4). It only starts the
  tracker.

  No step transfers anything to the host (with ``log_events``, only steps
  with an event do). A non-finite step outputs zeros:
  in a chain the next transformation still sees that zero update, so prefer
  :func:`stabilized` to leave an inner optimizer's state untouched.

  Args:
    learning_rate: the optimizer's learning rate (a number >= 0) or schedule
      (any optax schedule, warm-ups from 0 included), used only for the
      initial threshold; read once, here.
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

  Examples:
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
    config = _check_factory_args(config, initial_threshold)
    lr = _read_learning_rate(learning_rate)
    rule = pipeline.rule_for(config)
    emitter = events.InGraphEmitter(config, name=label) if log_events else None

    # The closures capture hyperparameters only: one instance serves any
    # number of parameter trees and init calls (optax.partition may route two
    # sub-trees to it; a notebook may re-run init on another model).
    def init_fn(params):
        _check_floating(params, "parameter")
        thr, warmup = _initial_threshold(
            params, learning_rate, lr, initial_threshold, store, label, config
        )
        return init_state(thr, warmup, config)

    def traced_step(updates, state, value):
        new_updates, new_state, threshold = pipeline.step(
            updates, state, config, rule, value=value, axis_name=axis_name
        )
        if emitter is not None:
            events.emit_in_graph(state, new_state, emitter, threshold, axis_name)
        return new_updates, new_state

    # Called outside jit, the step would run op by op and compile each of its
    # conditionals again on every call (a second per call); compiled once
    # per input structure instead. A cache of compiled code, not a memory of
    # earlier calls: any number of models and inits share it.
    eager_step = jax.jit(traced_step)

    def update_fn(updates, state, params=None, *, value=None, **extra_args):
        del extra_args
        check_state(state, config)
        _check_value(value)
        _check_floating(updates, "gradient")
        # What can be checked comes from this call's arguments: the gradients
        # must match the parameters passed along with them.
        if params is not None:
            _check_floating(params, "parameter")
            _check_matching(updates, params, sharded=axis_name is not None)
        eager = axis_name is None and not _any_tracer((updates, state, value))
        return (eager_step if eager else traced_step)(updates, state, value)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _any_tracer(tree: Any) -> bool:
    """Whether any leaf of ``tree`` is being traced (the call is inside ``jit``, ``vmap``...)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def _jittable(tree: Any) -> bool:
    """Whether every leaf of ``tree`` can be a jitted function's argument."""
    return all(
        isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, complex))
        for leaf in jax.tree.leaves(tree)
    )


def step(
    updates: Any,
    state: GradientFlowState,
    config: StabilizerConfig,
    *,
    value: jax.Array | None = None,
    axis_name: str | None = None,
) -> tuple[Any, GradientFlowState]:
    """One stabilizer step (SPEC.md, "Per-step order"); pure, jit-able.

    The stages are :mod:`optax_gradflow.pipeline`'s; :func:`stabilize` chooses
    the rule object once, this convenience chooses it per call.
    """
    check_state(state, config)
    new_updates, new_state, _ = pipeline.step(
        updates, state, config, pipeline.rule_for(config), value=value, axis_name=axis_name
    )
    return new_updates, new_state


# The wrapper records |update| / |params| once every this many steps: the two
# norms are a pass over the parameters and one over the updates, which every
# step would pay for otherwise (SPEC.md, "Wrapper form").
UPDATE_RATIO_INTERVAL = 10


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
      track_update_ratio: record ``|update| / |params|`` on applied steps
        whose ``stabilizer_step`` is a multiple of ``UPDATE_RATIO_INTERVAL``
        (10): two reductions, over the updates and the parameters, on those
        steps only (and, with ``axis_name``, one all-reduce of two scalars).
      log_events: as in :func:`stabilize`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`StabilizedState`.
      Extra args (``value=`` included) are passed on to ``inner``.

    Examples:
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
        _check_floating(params, "parameter")  # before the inner optimizer sees them
        return StabilizedState(
            inner_state=inner.init(params),
            flow=flow.init(params),
            update_ratio_history=Ring.empty(UPDATE_RATIO_HISTORY_SIZE, jnp.float32),
        )

    def update_fn(updates, state, params=None, *, value=None, **extra_args):
        if not _any_tracer((updates, state, params, value, extra_args)) and _jittable(extra_args):
            # Outside jit: one compiled step instead of a compilation of each
            # conditional on every call (see stabilize).
            return eager_update(updates, state, params, value, extra_args)
        return traced_update(updates, state, params, value, extra_args)

    def traced_update(updates, state, params, value, extra_args):
        clean, flow_state = flow.update(updates, state.flow, params, value=value)
        finite = jnp.isfinite(flow_state.last_grad_norm)
        if value is not None:
            extra_args = dict(extra_args, value=value)

        track = track_update_ratio and params is not None
        due = state.flow.stabilizer_step % UPDATE_RATIO_INTERVAL == 0

        def record_ratio(new_updates):
            param_sq, update_sq = sum_of_squares(params), sum_of_squares(new_updates)
            if axis_name is not None:
                # Sharded like the gradients: one all-reduce of two scalars.
                param_sq, update_sq = jax.lax.psum((param_sq, update_sq), axis_name)
            param_norm = jnp.sqrt(param_sq)
            ratio = jnp.sqrt(update_sq) / param_norm
            # A zero update moved nothing (optax.MultiSteps between its emitting
            # steps, a learning rate of 0): it is not a ratio of a step.
            moved = (param_norm > 0) & jnp.isfinite(ratio) & (ratio > 0)
            return state.update_ratio_history.push(ratio, moved)

        def step_inner():
            new_updates, inner_state = inner.update(clean, state.inner_state, params, **extra_args)
            ratios = state.update_ratio_history
            if track:
                # Inside this branch, so that the parameters are read before
                # the caller's apply_updates overwrites their donated buffer.
                ratios = jax.lax.cond(due, record_ratio, lambda _: ratios, new_updates)
            return new_updates, inner_state, ratios

        def skip_inner():
            # The inner state passes through unchanged: with donated buffers
            # XLA aliases it, nothing is copied; the update is zero.
            out, treedef = jax.tree.flatten(jax.eval_shape(step_inner)[0])
            grads = jax.tree.leaves(clean)
            if treedef == jax.tree.structure(clean) and all(
                a.shape == jnp.shape(g) for a, g in zip(out, grads, strict=True)
            ):
                # Zeros like the gradients keep their sharding (and, under
                # shard_map, their varying axes), as the updates would.
                zeros = [jnp.zeros_like(g, a.dtype) for a, g in zip(out, grads, strict=True)]
            else:
                zeros = [jnp.zeros(a.shape, a.dtype) for a in out]
            zeros = jax.tree.unflatten(treedef, zeros)
            return zeros, state.inner_state, state.update_ratio_history

        # One conditional, not a select per leaf: a select would read and
        # write every buffer of the inner state (Adam's two moments) each step.
        new_updates, inner_state, ratios = jax.lax.cond(finite, step_inner, skip_inner)
        return new_updates, StabilizedState(
            inner_state=inner_state, flow=flow_state, update_ratio_history=ratios
        )

    eager_update = jax.jit(traced_update)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
