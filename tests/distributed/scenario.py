"""The gradients and config every distributed check replays; numpy only.

The same global gradients are fed to a sharded run (devices, processes or
ranks) and to a one-device run; both must take the same decisions. Each bad
value sits in one shard only, whatever the number of shards (1, 2 or 8 along
the leading axis): the spike and the NaN in the last rows of ``w``, the inf in
the first entry of ``b``.
"""

from __future__ import annotations

import numpy as np

SHAPES = {"b": (8,), "w": (16, 4)}
STEPS = 12
SPIKE_STEP = 5
NAN_STEP = 7
INF_STEP = 8
VANISHING_STEP = 10

# Small rings and intervals, so that twelve steps of the default "track" rule
# go through the data-mode start, records of the moving threshold every 4
# steps, diagnostics runs, an explosion, an emergency (two non-finite steps in
# a row) and a vanishing step.
CONFIG = {
    "warmup_steps": 3,
    "adaptation_interval": 4,
    "norm_history_size": 16,
    "threshold_history_size": 8,
    "loss_scale_history_size": 8,
    "event_history_size": 16,
    "variance_history_size": 4,
    "emergency_history_size": 4,
    "emergency_patience": 2,
    "diagnostics_interval": 4,
    "diagnostics_window": 4,
    # The uncapped data start: the first norm starts the tracker unclipped
    # (some checks init on the first gradient in place of parameters).
    "param_threshold_scale": 0.0,
}


def gradients(step: int) -> dict[str, np.ndarray]:
    """The global float32 gradient of ``step``."""
    rng = np.random.default_rng(1000 + step)
    scale = np.float32(1.0 + 0.1 * step)
    grads = {
        name: rng.standard_normal(shape).astype(np.float32) * scale
        for name, shape in SHAPES.items()
    }
    if step == SPIKE_STEP:
        grads["w"][-2:] *= np.float32(100.0)
    elif step == NAN_STEP:
        grads["w"][-1, 0] = np.nan
    elif step == INF_STEP:
        grads["b"][0] = np.inf
    elif step == VANISHING_STEP:
        grads = {name: g * np.float32(1e-10) for name, g in grads.items()}
    return grads


def params() -> dict[str, np.ndarray]:
    """Parameters for the wrapper form (its update ratio reads them)."""
    rng = np.random.default_rng(7)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def batch(step: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A regression batch ``(x[size, 4], y[size, 3])``; its bad values sit in the last example."""
    rng = np.random.default_rng(2000 + step)
    x = rng.standard_normal((size, 4)).astype(np.float32)
    y = rng.standard_normal((size, 3)).astype(np.float32)
    if step == SPIKE_STEP:
        y[-1] *= np.float32(1000.0)
    elif step == NAN_STEP:
        x[-1, 0] = np.nan
    return x, y
