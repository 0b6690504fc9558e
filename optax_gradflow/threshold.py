"""The initial threshold under JAX (SPEC.md, "Initial threshold").

The per-step rules (warm-up, adaptation, the tracker) are in
:mod:`optax_gradflow.arithmetic`, written once for both frameworks.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from optax_gradflow.config import StabilizerConfig


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
