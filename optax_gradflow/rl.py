"""Reinforcement-learning helpers: periodic target-network updates.

* :func:`periodic_target_update`: the hard target-network copy of DQN-style
  training, jit-compatible, with a measure of how far the online network has
  drifted from its target (SPEC.md, "Target network updates").

The ad-auction simulator that notebook 03 trains on lives with the examples
that use it (``examples/auction.py``), not in the library.

Examples:
  >>> import jax.numpy as jnp
  >>> from optax_gradflow.rl import periodic_target_update
  >>> online, target = {"w": jnp.ones(2)}, {"w": jnp.zeros(2)}
  >>> new_target, drift = periodic_target_update(online, target, step=0, period=100)
  >>> new_target["w"].tolist(), float(drift)
  ([1.0, 1.0], 1.0)
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# --- Target network updates -------------------------------------------------------


def _sum_of_squares(leaves: list[jax.Array]) -> jax.Array:
    # Accumulated in float32 (or wider): squares of low-precision weights
    # lose too much in their own dtype.
    return functools.reduce(
        operator.add,
        [
            jnp.sum(jnp.square(jnp.abs(x).astype(jnp.promote_types(x.dtype, jnp.float32))))
            for x in leaves
        ],
        jnp.float32(0.0),
    )


def tree_divergence(online: Any, target: Any) -> jax.Array:
    r"""Relative L2 distance between two parameter trees of one structure.

    .. math::  d = \|\theta_{online} - \theta_{target}\|_2 / \|\theta_{online}\|_2

    with global L2 norms over every floating leaf (integer and boolean leaves
    are left out), accumulated in float32. ``d = 0`` when the trees are equal
    (also when both are all zeros); ``d = inf`` when ``online`` is all zeros
    and ``target`` is not.

    Returns:
      A float32 scalar array (no host transfer).
    """
    if jax.tree.structure(online) != jax.tree.structure(target):
        raise ValueError(
            "online and target must have the same tree structure, got "
            f"{jax.tree.structure(online)} and {jax.tree.structure(target)}."
        )
    pairs = [
        (jnp.asarray(a), jnp.asarray(b))
        for a, b in zip(jax.tree.leaves(online), jax.tree.leaves(target), strict=True)
        if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.inexact)
    ]
    diff = jnp.sqrt(_sum_of_squares([a - b for a, b in pairs]))
    norm = jnp.sqrt(_sum_of_squares([a for a, _ in pairs]))
    ratio = diff / jnp.where(norm > 0, norm, 1.0)
    return jnp.where(norm > 0, ratio, jnp.where(diff > 0, jnp.inf, 0.0)).astype(jnp.float32)


def periodic_target_update(
    online: Any, target: Any, step: int | jax.Array, period: int
) -> tuple[Any, jax.Array]:
    """Copies ``online`` into ``target`` every ``period`` steps (DQN's hard update).

    At a step with ``step % period == 0`` (step 0 included, so a target made
    at step 0 starts as a copy) the new target is ``online``; at the other
    steps it is ``target`` unchanged. The divergence is
    :func:`tree_divergence` ``(online, target)`` measured before the copy, at
    every step: at a sync step it is the drift accumulated over the period
    that just ended, in between it is the drift so far (SPEC.md, "Target
    network updates"). Pure and jit-compatible: ``step`` may be a traced
    integer; the copy is a ``jnp.where`` per leaf, leaf dtypes are kept.

    Args:
      online: the online network's parameters (any pytree).
      target: the target network's parameters, same structure, shapes and
        dtypes.
      step: the training step, a Python int or an integer array (traced or
        not).
      period: steps between copies, a Python int >= 1 (static).

    Returns:
      ``(new_target, divergence)``, ``divergence`` a float32 scalar array.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_gradflow.rl import periodic_target_update
      >>> online, target = {"w": jnp.array([3.0, 4.0])}, {"w": jnp.array([3.0, 0.0])}
      >>> new, d = periodic_target_update(online, target, step=10, period=5)
      >>> new["w"].tolist(), round(float(d), 6)
      ([3.0, 4.0], 0.8)
    """
    if isinstance(period, bool) or not isinstance(period, (int, np.integer)) or period < 1:
        raise ValueError(f"period must be an int >= 1, got {period!r}.")
    step = jnp.asarray(step)
    if not jnp.issubdtype(step.dtype, jnp.integer) or step.shape != ():
        raise ValueError(f"step must be an integer scalar, got {step.dtype}{list(step.shape)}.")
    for a, b in zip(jax.tree.leaves(online), jax.tree.leaves(target), strict=False):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(
                f"online and target leaves differ in shape: {jnp.shape(a)} and {jnp.shape(b)}."
            )
    divergence = tree_divergence(online, target)
    sync = step % period == 0
    new_target = jax.tree.map(
        lambda a, b: jnp.where(sync, jnp.asarray(a).astype(jnp.result_type(b)), b),
        online,
        target,
    )
    return new_target, divergence
