"""The stabilizer's state as a dict of tensors, and how a fresh one is built.

SPEC.md, sections "State" and "Initial threshold". The keys are the field
names of the JAX ``GradientFlowState``, with the same shapes and dtypes, so a
state moves between the two frameworks field by field (see ``interchange.py``).
This module imports neither JAX nor anything that does.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from optax_gradflow import arithmetic, constants
from optax_gradflow import learning_rate as learning_rate_lib
from optax_gradflow.config import StabilizerConfig, check_initial_threshold
from optax_gradflow.constants import (  # noqa: F401  (re-exported)
    LOG_FLOOR,
    MAD_TO_STD,
    STATE_VERSION,
    VERSION_FIELD,
    StateVersionError,
)

_TORCH_DTYPES = {"float32": torch.float32, "int32": torch.int32, "bool": torch.bool}

# The state dict's keys, in the order of SPEC.md, "State": the scalars, each
# ring's (values, index, count), then the layout version.
FIELDS: tuple[str, ...] = constants.FLAT_FIELDS

FLOAT_SCALARS: tuple[str, ...] = tuple(
    name for name, dtype in constants.SCALARS.items() if dtype == "float32"
)

# Ring name -> (config field holding its size, dtype of its values).
RINGS: dict[str, tuple[str, torch.dtype]] = {
    ring: (size_field, _TORCH_DTYPES[dtype])
    for ring, (size_field, dtype) in constants.RINGS.items()
}


State = dict[str, torch.Tensor]


def expected_specs(config: StabilizerConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Field name -> (shape, dtype) of a state built from ``config``."""
    return {
        name: (shape, _TORCH_DTYPES[dtype])
        for name, (shape, dtype) in constants.flat_specs(config).items()
    }


def check_version(state: Mapping[str, Any], where: str, *, read: bool = True) -> None:
    """Raises :class:`~optax_gradflow.constants.StateVersionError` for a state of another layout.

    A state without ``"state_version"`` is of layout 1 (before the key
    existed). With ``read=False`` only the key's presence is checked (no host
    read of its value).
    """
    if VERSION_FIELD not in state:
        constants.check_version(None, where)
    if read:
        value = state[VERSION_FIELD]
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        constants.check_version(int(value), where)


def migrate_state(state: Mapping[str, Any]) -> State:
    """``state`` in this layout: a state dict of layout 2 gains an empty ring
    of exploding norms, one of layout 2 or 3 ``norm_quantile``, a copy of its
    ``ema_mean``; one of layout 4 has this layout's keys and only takes the new
    ``state_version`` (SPEC.md, "Layout version").

    The new ring is on the device of ``state["event_flags"]``; every other
    tensor is the one given, not a copy. A state of any other layout comes back
    as a new dict of the same tensors, for :func:`check_version` to judge.
    Reads ``"state_version"`` on the host (one int32).
    """
    device = getattr(state.get("event_flags"), "device", None)

    def full(shape: tuple[int, ...], value: int, dtype: str) -> torch.Tensor:
        return torch.full(shape, value, dtype=_TORCH_DTYPES[dtype], device=device)

    return constants.migrate_flat(state, full)


def check_state(
    state: Mapping[str, Any], config: StabilizerConfig, *, read_version: bool = True
) -> None:
    """Raises ValueError, naming the key, if ``state`` was not built for ``config``.

    Keys, shapes, dtypes and devices are metadata: checking them reads nothing
    from the device. The layout version is checked first
    (:class:`~optax_gradflow.constants.StateVersionError`, a ValueError): its
    presence always, its value unless ``read_version`` is false (the value is
    the one thing read, a single int32).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"The state must be a dict of tensors, got {type(state).__name__}.")
    check_version(state, "The stabilizer state", read=read_version)
    missing = [name for name in FIELDS if name not in state]
    for version in constants.MIGRATED_VERSIONS:
        if missing and set(missing) == set(constants.missing_keys(version)):
            # The keys of layout 2 or 3, told apart without reading the
            # version: the step does not migrate (migrate_state does, before it).
            constants.check_version(version, "The stabilizer state")
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


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


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

    The start rule shared with JAX (:func:`optax_gradflow.arithmetic.start`):
    first match wins: the z-score rule's warm-up, an explicit threshold (the
    argument, else the config's ``initial_threshold`` where the config has
    one; ``inf`` never clips), a stored one, one from the learning rate, else
    the rule's data start (the track rule: the parameters' cap). The learning
    rate is read by :func:`optax_gradflow.learning_rate.read` (a schedule: its
    largest value over its first 10,000 steps); one that reads 0 gives the data
    start, with a warning.
    """
    # Read (and checked) first, whichever rule wins, as the JAX factory does.
    lr = None if learning_rate is None else learning_rate_lib.read(learning_rate)
    if initial_threshold is None:
        initial_threshold = config.initial_threshold
    if initial_threshold is not None:
        check_initial_threshold(initial_threshold, config)

    def warn() -> None:
        if learning_rate is not None:
            warnings.warn(learning_rate_lib.no_threshold_message(learning_rate), stacklevel=6)

    threshold, warmup = arithmetic.start(
        _CpuOps(),
        arithmetic.rule_for(config),
        explicit=initial_threshold,
        stored=None if store is None else lambda: store.lookup(params, label=label),
        learning_rate=lr,
        param_sum_of_squares=lambda: _parameter_sum_of_squares(params),
        on_data_start=warn,
    )
    return threshold.reshape(()).to(torch.float32), int(warmup)


def is_float(x: torch.Tensor) -> bool:
    """A floating or complex tensor: one the norm counts (SPEC.md, "Per-step order" 1)."""
    return x.is_floating_point() or x.is_complex()


def sum_of_squares(leaves: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Per-leaf sums of float32 squares, then their sum (SPEC.md, "Per-step order" 1).

    The squares are taken in float32 on purpose: squares that overflow
    float32 must make the norm infinite (a non-finite step), and float16
    gradients of a scaled loss would overflow in their own dtype. Norm
    kernels (``torch.linalg.vector_norm``, ``get_total_norm``) are not used:
    they return ``sqrt`` of the sum, and squaring it back costs an extra
    rounding per leaf.
    """
    if not leaves:
        return torch.zeros((), dtype=torch.float32, device=device)
    sums = []
    for x in leaves:
        if x.dtype != torch.float32:  # one comparison for the usual float32 leaf
            if x.is_complex():
                x = torch.view_as_real(x)
            if x.dtype != torch.float32:
                x = x.to(torch.float32)
        flat = x.reshape(-1)
        # One read of the leaf; no tensor of squares is materialised.
        sums.append(torch.linalg.vecdot(flat, flat))
    return torch.stack(sums).sum() if len(sums) > 1 else sums[0]


def _float_tensors(params: Any) -> list[torch.Tensor]:
    """The floating (or complex) tensors of a module, a tensor, a mapping or an
    iterable of tensors."""
    if params is None:
        return []
    if isinstance(params, torch.nn.Module):
        params = list(params.parameters())
    elif isinstance(params, torch.Tensor):
        params = [params]
    elif isinstance(params, Mapping):
        params = list(params.values())
    else:
        params = list(params)
    return [p for p in params if isinstance(p, torch.Tensor) and is_float(p)]


def _parameter_sum_of_squares(params: Any) -> torch.Tensor:
    """The parameters' sum of squares on the CPU (as the gradients' in step 1:
    :func:`sum_of_squares`); 0 without parameters. A DTensor shard (FSDP2)
    is gathered: the cap it sets is the whole model's."""
    leaves = [
        (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
        for p in _float_tensors(params)
    ]
    return sum_of_squares(leaves, torch.device("cpu"))


class _CpuOps(arithmetic.Ops):
    """The operations of a state's start, on float32 CPU tensors
    (:func:`optax_gradflow.arithmetic.start`,
    :meth:`optax_gradflow.arithmetic.Rule.initial_levels`)."""

    def f32(self, value):
        return _f32(float(value))

    def to_f32(self, x):
        return torch.as_tensor(x).to(torch.float32)

    def clip(self, x, lo, hi):
        return torch.clamp(x, lo, hi)

    log = staticmethod(torch.log)
    sqrt = staticmethod(torch.sqrt)
    isfinite = staticmethod(torch.isfinite)
    maximum = staticmethod(torch.maximum)
    where = staticmethod(torch.where)


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
      learning_rate: a float >= 0, or a schedule ``step -> lr`` (read over its
        first 10,000 steps, see :func:`optax_gradflow.learning_rate.read`).
      config: a :class:`~optax_gradflow.StabilizerConfig`; the defaults if None.
      initial_threshold: an explicit initial threshold; wins over the rest.
      store: an object with ``lookup(params, label=...) -> float | None``, read
        once, here.
      params: what ``store.lookup`` is given; in data mode (the ``track``
        rule), the model's parameters (a module, a tensor, a mapping or an
        iterable of tensors) also cap the first threshold at
        ``param_threshold_scale`` times their global norm.
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
    # The rule's starting levels (the track rule: c = anchor = lnf(t0), u = c +
    # ln(explosion_factor); in data mode placeholders, replaced by the first
    # finite, positive norm), computed by the shared arithmetic.
    levels = arithmetic.rule_for(config).initial_levels(_CpuOps(), threshold)
    for name, value in zip(("ema_mean", "centre_anchor", "norm_quantile"), levels, strict=True):
        state[name] = torch.as_tensor(value, dtype=torch.float32).clone()
    # The loss-scale history starts with the initial scale.
    state["loss_scale_history"][0] = config.initial_loss_scale
    state["loss_scale_history_index"] = torch.tensor(
        1 % config.loss_scale_history_size, dtype=torch.int32
    )
    state["loss_scale_history_count"] = torch.tensor(1, dtype=torch.int32)
    state[VERSION_FIELD] = torch.tensor(STATE_VERSION, dtype=torch.int32)
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


def __getattr__(name: str) -> int:
    # The former plain-int event flags (FLAG_CLIPPED, ...): constants.Event now.
    return constants.legacy_flag(__name__, name)
