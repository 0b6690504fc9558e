"""The learning rate an initial threshold is derived from (SPEC.md, "Initial threshold" 3).

A learning rate is a number or a schedule ``step -> lr``. A schedule is read
where it is positive: its largest value over steps ``0 .. SCHEDULE_STEPS - 1``.
That is the peak of a warm-up (``warmup_cosine_decay_schedule(0.0, peak,
...)`` reads ``peak``), the start of a decay, and the value of a constant, so
a schedule that starts at 0 is read as the rate the optimizer trains at. A
learning rate that is never positive where it is read (0, or a schedule that
stays at 0) gives no threshold: the caller falls back to the data start.

This module imports neither JAX nor PyTorch: both front ends read learning
rates with it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

# Steps over which a schedule is read: long enough for the warm-ups in use
# (a few thousand steps), short enough to evaluate in one vectorised call.
SCHEDULE_STEPS = 10_000


def _as_number(value: Any, what: str) -> float:
    """``value`` as a float, if it is a real scalar (a Python, numpy, JAX or torch one)."""
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (str, bytes)):
        raise TypeError(f"{what} must be a number or a schedule, got {value!r}.")
    if isinstance(value, numbers.Real):
        return float(value)
    shape = getattr(value, "shape", None)
    if shape is not None and tuple(shape) != ():
        raise TypeError(f"{what} must be a scalar, got an array of shape {tuple(shape)}.")
    dtype = getattr(value, "dtype", None)
    if dtype is not None and not _is_real_dtype(dtype):
        raise TypeError(f"{what} must be a real number, got {value!r} of dtype {dtype}.")
    if not hasattr(value, "__float__"):
        raise TypeError(
            f"{what} must be a number or a schedule (a callable step -> lr), "
            f"got {value!r} (a {type(value).__name__})."
        )
    return float(value)


def _is_real_dtype(dtype: Any) -> bool:
    # numpy and JAX dtypes convert with np.dtype; torch dtypes say is_floating_point.
    if hasattr(dtype, "is_floating_point") and hasattr(dtype, "is_complex"):
        return not dtype.is_complex and str(dtype) != "torch.bool"
    try:
        kind = np.dtype(dtype).kind
    except TypeError:
        return True
    return kind in "fiu"


def _schedule_values(schedule: Callable[[Any], Any], steps: int) -> np.ndarray:
    """The schedule's values at steps ``0 .. steps - 1``, as float64.

    One call on the array of steps when the schedule computes elementwise (the
    optax schedules do); else one call per step.
    """
    try:
        values = np.asarray(schedule(np.arange(steps, dtype=np.int32)), dtype=np.float64)
    except Exception:  # a schedule written for one step at a time (Python branches)
        values = None
    if values is None or values.shape not in ((), (steps,)):
        values = np.array(
            [_as_number(schedule(k), f"learning_rate({k})") for k in range(steps)],
            dtype=np.float64,
        )
    return np.broadcast_to(values, (steps,))


def read(learning_rate: Any, *, steps: int = SCHEDULE_STEPS) -> float | None:
    """The learning rate the initial threshold is derived from, or None.

    Args:
      learning_rate: a non-negative number, or a schedule ``step -> lr`` (an
        optax schedule, any callable of the step).
      steps: a schedule is read over steps ``0 .. steps - 1``.

    Returns:
      The number itself, or the schedule's largest value over the steps read;
      None when that is 0 (the caller then starts from the data).

    Raises:
      TypeError: not a number nor a callable (a string, an array of several
        values, a complex number).
      ValueError: a negative, NaN or infinite value (for a schedule, the first
        step where it has one is named).

    Examples:
      >>> import optax
      >>> from optax_gradflow import learning_rate
      >>> peak = learning_rate.read(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 20, 300))
      >>> round(peak, 6)  # 1e-2, rounded to float32 by the schedule
      0.01
      >>> learning_rate.read(optax.constant_schedule(0.0)) is None
      True
    """
    if callable(learning_rate):
        values = _schedule_values(learning_rate, steps)
        bad = ~np.isfinite(values) | (values < 0)
        if bad.any():
            k = int(np.argmax(bad))
            raise ValueError(
                f"learning_rate must be >= 0 and finite at every step, but the schedule "
                f"gives {float(values[k])!r} at step {k}."
            )
        peak = float(values.max())
    else:
        peak = _as_number(learning_rate, "learning_rate")
        if math.isnan(peak) or math.isinf(peak) or peak < 0:
            raise ValueError(f"learning_rate must be >= 0 and finite, got {learning_rate!r}.")
    return peak if peak > 0 else None


def no_threshold_message(learning_rate: Any) -> str:
    """The warning given when ``read(learning_rate)`` is None."""
    if callable(learning_rate):
        where = f"the learning-rate schedule is 0 over its first {SCHEDULE_STEPS} steps"
    else:
        where = "the learning rate is 0"
    return (
        f"{where}, so it gives no initial threshold; the threshold starts from the first "
        "finite gradient norm instead (SPEC.md, 'Initial threshold'). Pass the peak learning "
        "rate or initial_threshold= to choose it."
    )
