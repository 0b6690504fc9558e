"""The methods of the stability suite: baselines, paper re-implementations, the stabilizer.

Baselines: no clipping; ``optax.clip_by_global_norm`` at fixed thresholds,
alone and inside ``optax.apply_if_finite`` (optax's standard answer to NaN
batches; run only where a fixed clip met a non-finite gradient, elsewhere
it is the fixed clip exactly); AGC (``optax.adaptive_grad_clip``); ZClip
and AutoClip, written below from their papers as optax transformations; on
the float16 tasks the usual dynamic loss scaling (``grad_scaler``, as
``torch.amp.GradScaler``).

The stabilizer: ``stabilized(base(lr), lr)`` ("stabilizer") and
``stabilized(base(lr))`` ("stabilizer (data)"), both with one
``StabilizerConfig`` (the default, or the driver's ``--stab-config``); on a
task with ``loss_scaling=True`` (the float16 tasks) with loss scaling turned on. The rule
methods (``--rules``) run the stabilizer under each threshold adaptation
rule, and the ``presets.seed()`` config, in both modes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import optax_gradflow

if TYPE_CHECKING:
    from tasks import Task

FIXED_THRESHOLDS = (0.1, 0.5, 1.0, 5.0)
AGC_CLIPPING = 0.01
# apply_if_finite gives up (applies a non-finite update) after this many
# non-finite steps in a row: never, in these runs.
APPLY_IF_FINITE_MAX_ERRORS = 1_000_000


# ----------------------------------------------------------------------------
# Baselines written from their papers.


class ZClipState(NamedTuple):
    """State of :func:`zclip`: step count, warm-up sums, EMA mean and variance."""

    count: jax.Array
    warmup_sum: jax.Array
    warmup_sum_sq: jax.Array
    mean: jax.Array
    var: jax.Array


def zclip(
    alpha: float = 0.97, z_threshold: float = 2.5, warmup_steps: int = 25, eps: float = 1e-6
) -> optax.GradientTransformation:
    """ZClip (Kumar et al. 2025, https://arxiv.org/abs/2504.02507), z-score mode.

    The first ``warmup_steps`` norms are not clipped; their mean and population
    variance initialise the statistics. Afterwards a norm ``g`` with
    ``z = (g - mean) / std > z_threshold`` is clipped to
    ``mean + z_threshold**2 / z * std`` (the paper's reciprocal rule), and the
    EMAs (rate ``1 - alpha``) are updated with the norm after clipping.
    """

    def init_fn(params):
        del params
        zero = jnp.zeros((), jnp.float32)
        return ZClipState(jnp.zeros((), jnp.int32), zero, zero, zero, zero)

    def update_fn(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        in_warmup = state.count < warmup_steps
        std = jnp.sqrt(state.var)
        z = (norm - state.mean) / (std + eps)
        spike = ~in_warmup & (z > z_threshold)
        target = state.mean + (z_threshold**2 / jnp.maximum(z, eps)) * std
        clipped_norm = jnp.where(spike, target, norm)
        factor = jnp.where(spike, target / norm, 1.0)
        updates = jax.tree.map(lambda g: (g * factor).astype(g.dtype), updates)

        warm_sum = state.warmup_sum + jnp.where(in_warmup, norm, 0.0)
        warm_sq = state.warmup_sum_sq + jnp.where(in_warmup, norm**2, 0.0)
        ends = state.count == warmup_steps - 1
        n = jnp.float32(warmup_steps)
        init_mean = warm_sum / n
        init_var = jnp.maximum(warm_sq / n - init_mean**2, 0.0)
        ema_mean = alpha * state.mean + (1.0 - alpha) * clipped_norm
        ema_var = alpha * state.var + (1.0 - alpha) * (clipped_norm - ema_mean) ** 2
        mean = jnp.where(in_warmup, jnp.where(ends, init_mean, state.mean), ema_mean)
        var = jnp.where(in_warmup, jnp.where(ends, init_var, state.var), ema_var)
        # A non-finite norm must not poison the statistics for ever.
        finite = jnp.isfinite(norm)
        mean = jnp.where(finite, mean, state.mean)
        var = jnp.where(finite, var, state.var)
        count = jnp.minimum(state.count + 1, jnp.int32(2**30))
        return updates, ZClipState(count, warm_sum, warm_sq, mean, var)

    return optax.GradientTransformation(init_fn, update_fn)


class AutoClipState(NamedTuple):
    """State of :func:`autoclip`: the finite norms seen, in arrival order and sorted."""

    history: jax.Array
    ordered: jax.Array
    count: jax.Array
    position: jax.Array


def autoclip(percentile: float = 10.0, max_history: int = 10_000) -> optax.GradientTransformation:
    """AutoClip (Seetharaman et al. 2020, https://arxiv.org/abs/2007.14469).

    Each step adds the gradient norm to the history of all (finite) norms
    seen so far, then clips to the ``percentile``-th percentile of that
    history (linear interpolation). ``max_history`` bounds the buffer (the
    oldest norm leaves first); the suite sizes it to the run's length so that
    no norm is ever forgotten. The history is also kept sorted, one insertion
    a step, so that a step costs O(max_history), not a sort.
    """

    def init_fn(params):
        del params
        return AutoClipState(
            jnp.zeros((max_history,), jnp.float32),
            jnp.full((max_history,), jnp.inf, jnp.float32),
            jnp.zeros((), jnp.int32),
            jnp.zeros((), jnp.int32),
        )

    def update_fn(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates).astype(jnp.float32)
        finite = jnp.isfinite(norm)
        idx = jnp.arange(max_history)
        tail = jnp.full((1,), jnp.inf, jnp.float32)
        ordered = state.ordered
        # A full history lets its oldest norm go: shift the rest down over it.
        oldest = jnp.searchsorted(ordered, state.history[state.position], side="left")
        without = jnp.where(idx < oldest, ordered, jnp.concatenate([ordered[1:], tail]))
        ordered = jnp.where(finite & (state.count >= max_history), without, ordered)
        # The new norm goes in at its rank.
        at = jnp.searchsorted(ordered, norm, side="right")
        moved = jnp.concatenate([tail, ordered[:-1]])
        inserted = jnp.where(idx < at, ordered, jnp.where(idx == at, norm, moved))
        ordered = jnp.where(finite, inserted, ordered)
        history = jnp.where(finite, state.history.at[state.position].set(norm), state.history)
        position = jnp.where(finite, (state.position + 1) % max_history, state.position)
        count = jnp.where(finite, jnp.minimum(state.count + 1, max_history), state.count)

        pos = percentile / 100.0 * (jnp.maximum(count, 1) - 1).astype(jnp.float32)
        lo = jnp.floor(pos).astype(jnp.int32)
        hi = jnp.minimum(lo + 1, jnp.maximum(count - 1, 0))
        clip = ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])
        factor = jnp.where(norm > clip, clip / norm, 1.0)
        updates = jax.tree.map(lambda g: (g * factor).astype(g.dtype), updates)
        return updates, AutoClipState(history, ordered, count, position.astype(jnp.int32))

    return optax.GradientTransformation(init_fn, update_fn)


class GradScalerState(NamedTuple):
    """State of :func:`grad_scaler`: the loss scale, finite steps in a row, the inner state."""

    scale: jax.Array
    good_steps: jax.Array
    inner_state: Any


def grad_scaler(
    inner: optax.GradientTransformation,
    init_scale: float = 2.0**16,
    backoff: float = 0.5,
    growth: float = 2.0,
    growth_interval: int = 2000,
) -> optax.GradientTransformation:
    """The usual dynamic loss scaling of mixed-precision training (Micikevicius et al. 2018).

    The loss is multiplied by ``scale`` before differentiation (the training
    loop reads it from the state); gradients are divided by it. A step with a
    non-finite gradient is skipped (inner state untouched) and halves the
    scale; ``growth_interval`` finite steps in a row double it. The defaults
    are those of ``torch.amp.GradScaler``.
    """

    def init_fn(params):
        return GradScalerState(
            jnp.asarray(init_scale, jnp.float32), jnp.zeros((), jnp.int32), inner.init(params)
        )

    def update_fn(updates, state, params=None):
        updates = jax.tree.map(lambda g: (g / state.scale).astype(g.dtype), updates)
        finite = jnp.isfinite(optax.tree.norm(updates))
        new_updates, inner_state = inner.update(updates, state.inner_state, params)
        inner_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), inner_state, state.inner_state
        )
        new_updates = jax.tree.map(lambda u: jnp.where(finite, u, 0.0), new_updates)
        good = jnp.where(finite, state.good_steps + 1, 0)
        grow = good >= growth_interval
        scale = jnp.where(finite, jnp.where(grow, state.scale * growth, state.scale), state.scale)
        scale = jnp.where(finite, scale, state.scale * backoff)
        good = jnp.where(grow, 0, good).astype(jnp.int32)
        return new_updates, GradScalerState(scale, good, inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def grad_scaler_state(opt_state) -> GradScalerState | None:
    """The :class:`GradScalerState` inside ``opt_state``, if there is one."""
    found = [
        x
        for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, GradScalerState))
        if isinstance(x, GradScalerState)
    ]
    return found[0] if found else None


# ----------------------------------------------------------------------------
# Methods.


@dataclasses.dataclass(frozen=True)
class Method:
    """A clipping method. ``make(task, hparam, steps)`` builds the optimizer.

    ``hparams`` run in one compiled program (the fixed thresholds); ``labels``
    name each of them. ``applies_to(task)`` restricts a method to some tasks. A method
    with ``alias_of`` is not run: its rows are those of the method of that
    label (a rule whose config is the stabilizer's own, say).
    """

    name: str
    make: Callable[[Task, Any, int], optax.GradientTransformation]
    hparams: tuple[float, ...] | None = None
    labels: tuple[str, ...] | None = None
    kind: str = "baseline"
    applies_to: Callable[[Task], bool] | None = None
    alias_of: str | None = None
    same_if_finite: str | None = None


def parse_stab_config(text: str | None) -> optax_gradflow.StabilizerConfig:
    """``StabilizerConfig(**fields)`` from a JSON object (``None`` or ``""``: the default)."""
    if not text:
        return optax_gradflow.StabilizerConfig()
    fields = json.loads(text)
    if not isinstance(fields, dict):
        raise ValueError(f"the stabilizer config must be a JSON object, got {text!r}")
    return optax_gradflow.StabilizerConfig(**fields)


def config_for(task: Task, config: optax_gradflow.StabilizerConfig):
    """The stabilizer's config on ``task``: loss scaling on where the task needs it (fp16)."""
    if task.loss_scaling and not config.loss_scaling:
        return dataclasses.replace(config, loss_scaling=True)
    return config


def _stabilizer(config: optax_gradflow.StabilizerConfig, with_lr: bool):
    def make(t, h, n):
        lr = t.learning_rate if with_lr else None
        return optax_gradflow.stabilized(t.base(t.learning_rate), lr, config=config_for(t, config))

    return make


def base_methods(config: optax_gradflow.StabilizerConfig | None = None) -> list[Method]:
    """Every baseline, then the stabilizer with ``config`` (default: the default config)."""
    config = optax_gradflow.StabilizerConfig() if config is None else config
    return [
        Method("no clipping", lambda t, h, n: t.base(t.learning_rate)),
        Method(
            "fixed clip",
            lambda t, h, n: optax.chain(optax.clip_by_global_norm(h), t.base(t.learning_rate)),
            hparams=FIXED_THRESHOLDS,
            labels=tuple(f"clip {c:g}" for c in FIXED_THRESHOLDS),
        ),
        Method(
            "finite+clip",
            lambda t, h, n: optax.apply_if_finite(
                optax.chain(optax.clip_by_global_norm(h), t.base(t.learning_rate)),
                max_consecutive_errors=APPLY_IF_FINITE_MAX_ERRORS,
            ),
            hparams=FIXED_THRESHOLDS,
            labels=tuple(f"finite+clip {c:g}" for c in FIXED_THRESHOLDS),
            same_if_finite="fixed clip",
        ),
        Method(
            f"AGC {AGC_CLIPPING:g}",
            lambda t, h, n: optax.chain(
                optax.adaptive_grad_clip(AGC_CLIPPING), t.base(t.learning_rate)
            ),
        ),
        Method("ZClip", lambda t, h, n: optax.chain(zclip(), t.base(t.learning_rate))),
        Method(
            "AutoClip p10",
            lambda t, h, n: optax.chain(autoclip(10.0, max_history=n), t.base(t.learning_rate)),
        ),
        Method(
            "GradScaler + clip 1",
            lambda t, h, n: grad_scaler(
                optax.chain(optax.clip_by_global_norm(1.0), t.base(t.learning_rate))
            ),
            kind="fp16 baseline",
            applies_to=lambda t: t.loss_scaling,
        ),
        Method("stabilizer", _stabilizer(config, with_lr=True), kind="stabilizer"),
        Method("stabilizer (data)", _stabilizer(config, with_lr=False), kind="stabilizer"),
    ]


# The adaptation rules compared by --rules: fields replaced in the stabilizer's config.
RULES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("track", {"adaptation_rule": "track"}),
    ("median_mad k3", {"adaptation_rule": "median_mad", "adaptation_k": 3.0}),
    ("median_mad k2", {"adaptation_rule": "median_mad", "adaptation_k": 2.0}),
    ("percentile 50", {"adaptation_rule": "percentile", "adaptation_percentile": 50.0}),
    ("percentile 75", {"adaptation_rule": "percentile", "adaptation_percentile": 75.0}),
    ("percentile 90", {"adaptation_rule": "percentile", "adaptation_percentile": 90.0}),
    ("mean_std k3", {"adaptation_rule": "mean_std", "adaptation_k": 3.0}),
    ("zscore", {"adaptation_rule": "zscore"}),
)
# The zscore rule always runs its data warm-up (the learning rate plays no
# part), so its data-mode row is its learning-rate row.
LR_INDEPENDENT_RULES = ("zscore",)


def _preset_rules() -> list[tuple[str, optax_gradflow.StabilizerConfig]]:
    """Whole configs compared by --rules: ``presets.seed()``, the original behaviour."""
    seed = getattr(optax_gradflow.presets, "seed", None)
    return [("seed preset", seed())] if seed is not None else []


def rule_methods(config: optax_gradflow.StabilizerConfig | None = None) -> list[Method]:
    """The stabilizer under each adaptation rule, with the learning rate and in data mode.

    Each rule replaces its fields in ``config``; a rule that leaves ``config``
    as it is gets the rows of "stabilizer" and "stabilizer (data)" (not run
    twice), labelled "(default)".
    """
    config = optax_gradflow.StabilizerConfig() if config is None else config
    variants = [(label, dataclasses.replace(config, **fields)) for label, fields in RULES]
    methods = []
    for label, cfg in variants + _preset_rules():
        same = cfg == config
        name = f"{label} (default)" if same else label
        methods.append(
            Method(
                f"rule: {name}",
                _stabilizer(cfg, with_lr=True),
                kind="rule",
                alias_of="stabilizer" if same else None,
            )
        )
        if label in LR_INDEPENDENT_RULES:
            alias = f"rule: {name}"
        else:
            alias = "stabilizer (data)" if same else None
        methods.append(
            Method(
                f"rule (data): {name}",
                _stabilizer(cfg, with_lr=False),
                kind="rule (data)",
                alias_of=alias,
            )
        )
    return methods
