"""The stabilizer's state as a dict of tensors, and how a fresh one is built.

SPEC.md, sections "State" and "Initial threshold". The keys are the field
names of the JAX ``GradientFlowState``, with the same shapes and dtypes, so a
state moves between the two frameworks field by field (see ``interchange.py``).
This module imports neither JAX nor anything that does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from optax_gradflow.config import (  # noqa: F401  (the flags are re-exported)
    FLAG_ADAPTED,
    FLAG_CLIPPED,
    FLAG_EMERGENCY,
    FLAG_EXPLOSION,
    FLAG_NONFINITE,
    FLAG_VANISHING,
    FLAG_WARNING,
    StabilizerConfig,
)

# Field names in the order of SPEC.md, "State" (and of the JAX NamedTuple).
FIELDS: tuple[str, ...] = (
    "stabilizer_step",
    "clip_threshold",
    "loss_scale",
    "loss_scale_growth_count",
    "warmup_steps_left",
    "consecutive_explosions",
    "emergency_hold_left",
    "explosion_count",
    "vanishing_count",
    "nonfinite_count",
    "clip_count",
    "emergency_count",
    "warning_count",
    "stable_streak",
    "last_grad_norm",
    "last_loss",
    "loss_centre",
    "loss_reference",
    "loss_spread",
    "norm_trend",
    "early_warning",
    "ema_mean",
    "ema_var",
    "centre_anchor",
    "norm_history",
    "norm_history_index",
    "norm_history_count",
    "variance_history",
    "variance_history_index",
    "variance_history_count",
    "loss_scale_history",
    "loss_scale_history_index",
    "loss_scale_history_count",
    "threshold_history",
    "threshold_history_index",
    "threshold_history_count",
    "event_flags",
    "event_flags_index",
    "event_flags_count",
    "emergency_steps",
    "emergency_steps_index",
    "emergency_steps_count",
)

FLOAT_SCALARS: tuple[str, ...] = (
    "clip_threshold",
    "loss_scale",
    "last_grad_norm",
    "last_loss",
    "loss_centre",
    "loss_reference",
    "loss_spread",
    "norm_trend",
    "ema_mean",
    "ema_var",
    "centre_anchor",
)

# Ring name -> (config field holding its size, dtype).
RINGS: dict[str, tuple[str, torch.dtype]] = {
    "norm_history": ("norm_history_size", torch.float32),
    "variance_history": ("variance_history_size", torch.float32),
    "loss_scale_history": ("loss_scale_history_size", torch.float32),
    "threshold_history": ("threshold_history_size", torch.float32),
    "event_flags": ("event_history_size", torch.int32),
    "emergency_steps": ("emergency_history_size", torch.int32),
}


State = dict[str, torch.Tensor]


def expected_specs(config: StabilizerConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Field name -> (shape, dtype) of a state built from ``config``."""
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        name: ((), torch.int32) for name in FIELDS
    }
    for name in FLOAT_SCALARS:
        specs[name] = ((), torch.float32)
    specs["early_warning"] = ((), torch.bool)
    for ring, (size_field, dtype) in RINGS.items():
        specs[ring] = ((getattr(config, size_field),), dtype)
    return specs


def check_state(state: Mapping[str, Any], config: StabilizerConfig) -> None:
    """Raises ValueError, naming the key, if ``state`` was not built for ``config``.

    Keys, shapes, dtypes and devices are metadata: checking them reads nothing
    from the device.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"The state must be a dict of tensors, got {type(state).__name__}.")
    missing = [name for name in FIELDS if name not in state]
    if missing:
        raise ValueError(f"State is missing key(s) {missing}.")
    extra = sorted(str(name) for name in state if name not in FIELDS)
    if extra:
        raise ValueError(f"State has unexpected key(s) {extra}.")
    device = None
    for name, (shape, dtype) in expected_specs(config).items():
        value = state[name]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"State key {name!r} must be a tensor, got {type(value).__name__}.")
        if tuple(value.shape) != shape or value.dtype != dtype:
            raise ValueError(
                f"State key {name!r} has shape {tuple(value.shape)} and dtype {value.dtype}, "
                f"but the config expects shape {shape} and dtype {dtype}: the state was built "
                "by a different configuration."
            )
        if device is None:
            device = value.device
        elif value.device != device:
            raise ValueError(
                f"State key {name!r} is on {value.device}, the rest of the state on {device}."
            )


def _positive(name: str, value: Any, *, allow_inf: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}.") from None
    if math.isnan(number) or number <= 0.0 or (math.isinf(number) and not allow_inf):
        finite = "" if allow_inf else " and finite"
        raise ValueError(f"{name} must be positive{finite}, got {value!r}.")
    return number


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _clamp_threshold(value: torch.Tensor, config: StabilizerConfig) -> torch.Tensor:
    return torch.clamp(value, min=config.min_threshold, max=config.max_threshold)


# float32's smallest normal, 2^-126: the floor under the logarithm of the
# "track" rule, which only keeps ln(0) finite (SPEC.md, "Tracking rule").
LOG_FLOOR = 2.0**-126


def log_floored(x: torch.Tensor) -> torch.Tensor:
    """``lnf(x) = ln(max(x, 2^-126))`` in float32 (SPEC.md, "Tracking rule")."""
    return torch.log(torch.clamp(x, min=LOG_FLOOR))


def threshold_at_init(
    learning_rate: float | Callable[[int], Any] | None,
    config: StabilizerConfig,
    *,
    initial_threshold: float | None = None,
    store: Any = None,
    params: Any = None,
    label: str | None = None,
) -> tuple[torch.Tensor, int]:
    """(threshold as a float32 CPU scalar, warm-up steps) (SPEC.md, "Initial threshold").

    First match wins: an explicit threshold (the argument, else the config's
    ``initial_threshold`` where the config has one; ``inf`` never clips), a
    stored one, one from the learning rate, else a data warm-up.
    """
    if config.adaptation_rule == "zscore":
        # ZClip's warm-up always runs (SPEC.md, "Z-score rule").
        return _clamp_threshold(_f32(config.max_threshold), config), config.warmup_steps
    if initial_threshold is None:
        initial_threshold = config.initial_threshold
    if initial_threshold is not None:
        value = _positive("initial_threshold", initial_threshold, allow_inf=True)
        if not config.min_threshold <= value <= config.max_threshold:
            raise ValueError(
                "initial_threshold must lie in [config.min_threshold, config.max_threshold] = "
                f"[{config.min_threshold}, {config.max_threshold}], got {initial_threshold!r}."
            )
        return _f32(value), 0
    if store is not None:
        stored = store.lookup(params, label=label)
        if stored is not None:
            return _clamp_threshold(_f32(float(stored)), config), 0
    if learning_rate is not None:
        lr = learning_rate(0) if callable(learning_rate) else learning_rate
        lr = _positive("learning_rate", lr)
        # clamp(c * sqrt(1 / lr)), every operation in float32.
        raw = _f32(config.lr_threshold_scale) * torch.sqrt(_f32(1.0) / _f32(lr))
        return _clamp_threshold(raw, config), 0
    if config.adaptation_rule == "track":
        # The tracker waits for the first finite, positive norm, whatever warmup_steps
        # says (SPEC.md, "Initial threshold" 4 and "Tracking rule").
        return _f32(config.min_threshold), 1
    return _f32(config.min_threshold), config.warmup_steps


def init_state(
    learning_rate: float | Callable[[int], Any] | None = None,
    *,
    config: StabilizerConfig | None = None,
    initial_threshold: float | None = None,
    store: Any = None,
    params: Any = None,
    label: str | None = None,
    device: torch.device | str | None = None,
) -> State:
    """A fresh state (SPEC.md, "State" and "Initial threshold").

    Args:
      learning_rate: a positive float, or a schedule ``step -> lr`` read at 0.
      config: a :class:`~optax_gradflow.StabilizerConfig`; the defaults if None.
      initial_threshold: an explicit initial threshold; wins over the rest.
      store: an object with ``lookup(params, label=...) -> float | None``, read
        once, here.
      params: what ``store.lookup`` is given.
      label: passed to ``store.lookup``.
      device: where the state lives; the CPU if None. Keep it on the
        gradients' device.

    Returns:
      A dict of tensors keyed by the ``GradientFlowState`` field names.
    """
    config = _check_config(config)
    threshold, warmup = threshold_at_init(
        learning_rate,
        config,
        initial_threshold=initial_threshold,
        store=store,
        params=params,
        label=label,
    )
    state: State = {}
    for name, (shape, dtype) in expected_specs(config).items():
        state[name] = torch.zeros(shape, dtype=dtype)
    state["clip_threshold"] = threshold.clone()
    state["loss_scale"] = _f32(config.initial_loss_scale)
    state["warmup_steps_left"] = torch.tensor(warmup, dtype=torch.int32)
    state["last_grad_norm"] = _f32(math.nan)
    state["last_loss"] = _f32(math.nan)
    # The loss gate knows no loss yet (SPEC.md, "Loss gate").
    state["loss_centre"] = _f32(math.nan)
    state["loss_reference"] = _f32(math.nan)
    if config.adaptation_rule == "track":
        # The tracker starts from the initial threshold: c = anchor = lnf(t0)
        # (in data mode a placeholder, replaced by the first finite, positive norm).
        start = log_floored(threshold)
        state["ema_mean"] = start.clone()
        state["centre_anchor"] = start.clone()
    # The loss-scale history starts with the initial scale.
    state["loss_scale_history"][0] = config.initial_loss_scale
    state["loss_scale_history_index"] = torch.tensor(
        1 % config.loss_scale_history_size, dtype=torch.int32
    )
    state["loss_scale_history_count"] = torch.tensor(1, dtype=torch.int32)
    if device is not None:
        state = {name: value.to(device) for name, value in state.items()}
    return state


def _check_config(config: StabilizerConfig | None) -> StabilizerConfig:
    if config is None:
        return StabilizerConfig()
    if not isinstance(config, StabilizerConfig):
        raise TypeError(
            f"config must be an optax_gradflow.StabilizerConfig, got {type(config).__name__}."
        )
    return config
