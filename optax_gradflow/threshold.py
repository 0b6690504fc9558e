"""The JAX factory's check of an initial threshold (SPEC.md, "Initial threshold").

The start rule itself (explicit, stored, learning rate, data) and the
per-step rules are in :mod:`optax_gradflow.arithmetic`, written once for
both frameworks.
"""

from __future__ import annotations

import math

import jax


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
