"""The loss-scale rule, and finding the loss scale in any optimizer state.

SPEC.md sections "Loss scale rule" and "Emergency intervention".
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optax_gradflow.config import StabilizerConfig
from optax_gradflow.state import GradientFlowState, Ring, saturating_increment


def next_loss_scale(
    scale: jax.Array,
    growth_count: jax.Array,
    *,
    nonfinite: jax.Array,
    explosion: jax.Array,
    vanishing: jax.Array,
    config: StabilizerConfig,
) -> tuple[jax.Array, jax.Array]:
    """One step of the loss-scale rule; returns (scale, growth_count).

    At most one of the three events holds on a step. A step that would carry
    the scale to a non-finite value keeps the old scale (GradScaler's "never
    grow to inf"), then the result is clamped into [min, max].
    """
    if not config.loss_scaling:
        return scale, growth_count
    factor = jnp.where(
        nonfinite,
        jnp.float32(config.nonfinite_backoff),
        jnp.where(
            explosion,
            jnp.float32(config.explosion_backoff),
            jnp.where(vanishing, jnp.float32(config.vanishing_growth), jnp.float32(1.0)),
        ),
    )
    new_scale = scale * factor
    growth_count = jnp.where(nonfinite, 0, saturating_increment(growth_count, True))
    if config.growth_interval > 0:
        grow = growth_count >= config.growth_interval
        new_scale = jnp.where(grow, new_scale * jnp.float32(config.growth_factor), new_scale)
        growth_count = jnp.where(grow, 0, growth_count)
    new_scale = jnp.where(jnp.isfinite(new_scale), new_scale, scale)
    new_scale = jnp.clip(
        new_scale, jnp.float32(config.min_loss_scale), jnp.float32(config.max_loss_scale)
    )
    return new_scale.astype(jnp.float32), growth_count.astype(jnp.int32)


def emergency_loss_scale(scale: jax.Array, fire: jax.Array, config: StabilizerConfig) -> jax.Array:
    """``max(scale * emergency_loss_scale_factor, min_loss_scale)`` where ``fire``."""
    if not config.loss_scaling:
        return scale
    reduced = jnp.maximum(
        scale * jnp.float32(config.emergency_loss_scale_factor),
        jnp.float32(config.min_loss_scale),
    )
    return jnp.where(fire, reduced, scale)


def _is_flow_state(x: Any) -> bool:
    return isinstance(x, GradientFlowState)


def _plain(field: Any) -> Any:
    if isinstance(field, Ring):
        return Ring(*(jnp.asarray(part) for part in field))
    return jnp.asarray(field)


def find_states(opt_state: Any) -> list[tuple[str, GradientFlowState]]:
    """Every GradientFlowState inside ``opt_state``, with its key path as text.

    Works through chains, ``optax.partition``, ``MultiSteps``,
    ``inject_hyperparams``, the :func:`optax_gradflow.stabilized` wrapper and
    ``flax.nnx.Optimizer.opt_state``. Fields are returned as plain arrays.
    """
    found = []
    leaves_with_path = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=_is_flow_state)[0]
    for path, leaf in leaves_with_path:
        if _is_flow_state(leaf):
            # Frameworks may wrap each field (flax.nnx.Optimizer keeps OptArray
            # variables); hand back plain arrays.
            plain = GradientFlowState(*(_plain(field) for field in leaf))
            found.append((jax.tree_util.keystr(path), plain))
    return found


def find_state(opt_state: Any) -> GradientFlowState:
    """The one GradientFlowState inside ``opt_state``; ValueError if none or several."""
    found = find_states(opt_state)
    if not found:
        raise ValueError(
            "No GradientFlowState found in the optimizer state: is "
            "optax_gradflow.stabilize (or stabilized) part of this optimizer?"
        )
    if len(found) > 1:
        paths = ", ".join(path or "<root>" for path, _ in found)
        raise ValueError(
            f"Found {len(found)} GradientFlowStates (at {paths}); pass the sub-state "
            "of the one you mean."
        )
    return found[0][1]


def loss_scale(opt_state: Any) -> jax.Array:
    """The current loss scale held by the stabilizer inside ``opt_state``.

    A float32 scalar array; reading it on the host is one device-to-host
    transfer, which this function does not do.

    Examples:
      >>> import jax.numpy as jnp, optax, optax_gradflow
      >>> opt = optax.chain(optax_gradflow.stabilize(1e-2), optax.sgd(1e-2))
      >>> float(optax_gradflow.loss_scale(opt.init({"w": jnp.ones(3)})))
      1.0
    """
    return find_state(opt_state).loss_scale


def scale_loss(loss: jax.Array, opt_state: Any) -> jax.Array:
    """``loss * loss_scale``, in the loss's dtype: differentiate this.

    The stabilizer divides the gradients by the same scale in its next update
    (SPEC.md, "Per-step order", step 1).
    """
    loss = jnp.asarray(loss)
    return loss * loss_scale(opt_state).astype(loss.dtype)
