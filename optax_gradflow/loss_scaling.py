"""Finding the loss scale in any optimizer state, and scaling a loss by it.

The loss-scale rule itself (SPEC.md, "Loss scale rule") is in
:mod:`optax_gradflow.arithmetic`, written once for both frameworks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optax_gradflow.state import GradientFlowState


def _is_flow_state(x: Any) -> bool:
    return isinstance(x, GradientFlowState)


def _plain(field: Any) -> Any:
    if isinstance(field, tuple):  # the ring values (a RingValues record)
        return type(field)(*(jnp.asarray(part) for part in field))
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
