"""Trend and variance diagnostics over the norm history (SPEC.md, "Diagnostics").

Pure functions of the ring buffer; the transformation runs them every
``diagnostics_interval`` steps and the report reuses them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optax_gradflow.config import StabilizerConfig
from optax_gradflow.constants import DIAGNOSTICS_LOG_FLOOR
from optax_gradflow.state import Ring


def log_norm_trend(recent: jax.Array, valid: jax.Array, floor: float) -> jax.Array:
    """Least-squares slope of ``log(max(norm, floor))`` against entry position.

    Positions are 0, 1, ... over the window; invalid entries carry no weight.
    Zero when fewer than two entries are valid.
    """
    w = valid.astype(jnp.float32)
    n = jnp.sum(w)
    x = jnp.arange(recent.shape[0], dtype=jnp.float32)
    y = jnp.log(jnp.maximum(recent, jnp.float32(floor)))
    y = jnp.where(valid, y, 0.0)
    safe_n = jnp.maximum(n, 1.0)
    x_mean = jnp.sum(w * x) / safe_n
    y_mean = jnp.sum(w * y) / safe_n
    sxx = jnp.sum(w * jnp.square(x - x_mean))
    sxy = jnp.sum(w * (x - x_mean) * (y - y_mean))
    return jnp.where(n >= 2, sxy / jnp.where(sxx > 0, sxx, 1.0), 0.0)


def windowed_mean_variance(recent: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and population variance of the valid entries (0 when none)."""
    w = valid.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    mean = jnp.sum(w * jnp.where(valid, recent, 0.0)) / n
    var = jnp.sum(w * jnp.square(jnp.where(valid, recent, 0.0) - mean)) / n
    return mean, var


def diagnose(norms: Ring, config: StabilizerConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (trend, variance, early_warning) over the recent window.

    The warning is raised when the trend exceeds ``trend_limit`` or the relative
    variance ``variance / mean**2`` exceeds ``variance_limit``.
    """
    recent, valid = norms.chronological(config.diagnostics_window)
    # The floor keeps log() finite for zero norms even when vanishing_norm is 0.
    trend = log_norm_trend(recent, valid, max(config.vanishing_norm, DIAGNOSTICS_LOG_FLOOR))
    mean, var = windowed_mean_variance(recent, valid)
    relative = jnp.where(mean > 0, var / jnp.where(mean > 0, jnp.square(mean), 1.0), 0.0)
    warning = (trend > config.trend_limit) | (relative > config.variance_limit)
    return trend.astype(jnp.float32), var.astype(jnp.float32), warning
