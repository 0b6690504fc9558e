"""What the JAX transformation and the PyTorch adapter share, framework-free.

This module imports neither JAX nor PyTorch. It holds the names and numbers
that SPEC.md fixes once for both implementations: the stages of one step, the
event flags (:class:`Event`, their only definition), the state's layout
(field names, rings, their sizes, the layout version, how a ring read to the
host is put in order) and the arithmetic constants. The two step
implementations read them from here and stay otherwise independent.
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

# The stages of one step, in SPEC.md's "Per-step order". Both implementations
# have one function per stage under these names (JAX: optax_gradflow.pipeline,
# PyTorch: optax_gradflow.torch.functional).
STAGES: tuple[str, ...] = (
    "measure",
    "threshold",
    "classify",
    "rescale",
    "loss_scale",
    "history",
    "adapt",
    "emergency",
    "diagnose",
    "record",
)


class Event(enum.IntFlag):
    """Bits of one entry of the per-step event flags (SPEC.md, "Event flags")."""

    CLIPPED = 1
    EXPLOSION = 2
    VANISHING = 4
    NONFINITE = 8
    EMERGENCY = 16
    ADAPTED = 32
    WARNING = 64


def legacy_flag(module: str, name: str) -> int:
    """The value of a former plain-int flag name (``FLAG_CLIPPED``, ...) of ``module``.

    ``optax_gradflow.config``, ``optax_gradflow.state`` and
    ``optax_gradflow.torch.state`` once defined the event flags as plain ints;
    their module ``__getattr__`` sends those names here, which warns and
    returns the flag of :class:`Event` as an int.

    Raises:
      AttributeError: ``name`` is no such flag name.
    """
    member = name.removeprefix("FLAG_")
    if not name.startswith("FLAG_") or member not in Event.__members__:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(
        f"{module}.{name} is deprecated; use optax_gradflow.constants.Event.{member}.",
        DeprecationWarning,
        stacklevel=3,
    )
    return int(Event[member])


# Largest value an int32 counter holds; counters saturate here (SPEC.md,
# "Counters").
INT32_MAX = 2**31 - 1

# 1 / Phi^{-1}(3/4): the median absolute deviation of normal data times this
# estimates its standard deviation (SPEC.md, "Threshold adaptation").
MAD_TO_STD = 1.4826

# float32's smallest normal, 2^-126: the floor under the logarithm of the
# "track" rule, which only keeps ln(0) finite (SPEC.md, "Tracking rule").
LOG_FLOOR = 2.0**-126

# The floor under the norms whose logarithm the diagnostics take, when
# vanishing_norm is smaller (SPEC.md, "Diagnostics").
DIAGNOSTICS_LOG_FLOOR = 1e-30

# Size of the wrapper's ring of |update| / |params| (SPEC.md, "Wrapper form").
UPDATE_RATIO_HISTORY_SIZE = 100

# --- The state's layout (SPEC.md, "State") ------------------------------------

# The layout of the state, raised whenever a field is added, removed or
# regrouped. Layout 1 kept each ring as three flat fields (X, X_index,
# X_count); layout 2 keeps a ring as one (values, index, count) record;
# layout 3 adds the ring of exploding norms; layout 4 the track rule's
# quantile of the log-norms; layout 5 packs the JAX state's scalars by dtype
# (the flat form is layout 4's, under the new version).
STATE_VERSION = 5
VERSION_FIELD = "state_version"

# Scalar fields in SPEC.md's order, with their dtype names.
SCALARS: dict[str, str] = {
    "stabilizer_step": "int32",
    "clip_threshold": "float32",
    "loss_scale": "float32",
    "loss_scale_growth_count": "int32",
    "warmup_steps_left": "int32",
    "consecutive_explosions": "int32",
    "emergency_hold_left": "int32",
    "explosion_count": "int32",
    "vanishing_count": "int32",
    "nonfinite_count": "int32",
    "clip_count": "int32",
    "emergency_count": "int32",
    "warning_count": "int32",
    "stable_streak": "int32",
    "last_grad_norm": "float32",
    "last_loss": "float32",
    "loss_centre": "float32",
    "loss_reference": "float32",
    "loss_spread": "float32",
    "norm_trend": "float32",
    "early_warning": "bool",
    "ema_mean": "float32",
    "ema_var": "float32",
    "centre_anchor": "float32",
    "norm_quantile": "float32",
}

# Ring name -> (the config field holding its size, the dtype name of its values).
RINGS: dict[str, tuple[str, str]] = {
    "norm_history": ("norm_history_size", "float32"),
    "variance_history": ("variance_history_size", "float32"),
    "loss_scale_history": ("loss_scale_history_size", "float32"),
    "threshold_history": ("threshold_history_size", "float32"),
    "event_flags": ("event_history_size", "int32"),
    "emergency_steps": ("emergency_history_size", "int32"),
    # One slot per step of the event window: every explosion in it keeps its norm.
    "explosion_norms": ("event_history_size", "float32"),
}

# The parts of one ring, in order.
RING_PARTS: tuple[str, ...] = ("values", "index", "count")


def host_chronological(values: Any, index: Any, count: Any) -> np.ndarray:
    """The valid entries of a ring read to the host, oldest first (SPEC.md, "Ring buffers").

    ``values``, ``index`` and ``count`` are the ring's three parts (numpy
    arrays or anything ``numpy.asarray`` takes); no device is read here.
    """
    values = np.asarray(values)
    count = int(count)
    positions = (int(index) - count + np.arange(count)) % values.shape[0]
    return values[positions]


def flat_name(ring: str, part: str) -> str:
    """The flat key of one part of a ring: ``norm_history``, ``norm_history_index``, ..."""
    return ring if part == "values" else f"{ring}_{part}"


# The JAX state's storage (SPEC.md, "Storage of the JAX state"): the scalars
# that users read by name (``optax.tree.get(opt_state, "clip_threshold")``)
# are leaves of their own; every other float32 scalar is one slot of one
# float32 vector, every other int32 or bool scalar and each ring's index and
# count one slot of one int32 vector, in these orders; each ring's values are
# a leaf.
NAMED_SCALARS: tuple[str, ...] = (
    "stabilizer_step",
    "clip_threshold",
    "loss_scale",
    "last_grad_norm",
)
PACKED_FLOATS: tuple[str, ...] = tuple(
    name for name, dtype in SCALARS.items() if dtype == "float32" and name not in NAMED_SCALARS
)
PACKED_COUNTERS: tuple[str, ...] = tuple(
    name for name, dtype in SCALARS.items() if dtype != "float32" and name not in NAMED_SCALARS
) + tuple(flat_name(ring, part) for ring in RINGS for part in ("index", "count"))


# The keys of the flat form of a state (the PyTorch state dict, the report's
# input, the interchange format): the scalars, each ring's three parts, the
# layout version last.
FLAT_FIELDS: tuple[str, ...] = (
    *SCALARS,
    *(flat_name(ring, part) for ring in RINGS for part in RING_PARTS),
    VERSION_FIELD,
)


def flat_specs(config) -> dict[str, tuple[tuple[int, ...], str]]:
    """Flat key -> (shape, dtype name) of a state built from ``config``, in
    :data:`FLAT_FIELDS` order; each framework maps the dtype names to its own."""
    specs: dict[str, tuple[tuple[int, ...], str]] = {
        name: ((), dtype) for name, dtype in SCALARS.items()
    }
    for ring, (size_field, dtype) in RINGS.items():
        specs[flat_name(ring, "values")] = ((int(getattr(config, size_field)),), dtype)
        specs[flat_name(ring, "index")] = ((), "int32")
        specs[flat_name(ring, "count")] = ((), "int32")
    specs[VERSION_FIELD] = ((), "int32")
    return specs


def ring_sizes(config) -> dict[str, int]:
    """Ring name -> its size under ``config`` (a StabilizerConfig)."""
    return {ring: int(getattr(config, size_field)) for ring, (size_field, _) in RINGS.items()}


class StateVersionError(ValueError):
    """A state saved with another layout of the state than this library's."""


# The layouts that :func:`migrate_flat` reads, and the keys each lacks.
MIGRATED_VERSIONS = (2, 3, 4)
MIGRATED_RING = "explosion_norms"  # not in layout 2
MIGRATED_SCALAR = "norm_quantile"  # not in layouts 2 and 3


def missing_keys(version: int) -> tuple[str, ...]:
    """The flat keys a state of the migrated layout ``version`` lacks."""
    ring = tuple(flat_name(MIGRATED_RING, part) for part in RING_PARTS)
    return (ring if version == 2 else ()) + ((MIGRATED_SCALAR,) if version < 4 else ())


def migrate_flat(
    flat: Mapping[str, Any], full: Callable[[tuple[int, ...], int, str], Any]
) -> dict[str, Any]:
    """The flat form of a state in this layout (SPEC.md, "Layout version").

    A flat state of layout 2 gains an empty ring of exploding norms (values
    zeros of the size of ``event_flags``, which has the same size E; index 0,
    count 0); a state of layout 2 or 3 gains ``norm_quantile``, a copy of its
    ``ema_mean`` (the track rule's quantile then restarts from the centre and
    climbs to its level within tens of steps); layout 4 has the flat keys of
    this layout (layout 5 regrouped only the JAX state's storage). Its
    ``state_version`` becomes 5; every other key is kept as it is, the same
    objects. Any other state
    comes back unchanged, for :func:`check_version` to judge.
    ``full(shape, value, dtype_name)`` makes one of the framework's arrays
    (``numpy.full`` with the dtype by name); the copy of ``ema_mean`` is
    ``clone()`` for a torch tensor, ``copy()`` otherwise.

    Reads ``state_version`` once (a device-to-host transfer where it is on a
    device).
    """
    found = flat.get(VERSION_FIELD)
    if found is None or int(found) not in MIGRATED_VERSIONS:
        return dict(flat)
    version = int(found)
    lacks = missing_keys(version)
    migrated = {name: value for name, value in flat.items() if name not in lacks}
    if version == 2:
        sized_by = flat_name("event_flags", "values")
        if sized_by not in flat:
            raise ValueError(
                f"A state of layout 2 lacks {sized_by!r}, which sizes the ring it gains."
            )
        size = len(flat[sized_by])
        _, dtype = RINGS[MIGRATED_RING]
        values, index, count = (flat_name(MIGRATED_RING, part) for part in RING_PARTS)
        migrated[values] = full((size,), 0, dtype)
        migrated[index] = full((), 0, "int32")
        migrated[count] = full((), 0, "int32")
    if version < 4:
        if "ema_mean" not in flat:
            raise ValueError(
                f"A state of layout {version} lacks 'ema_mean', from which "
                f"{MIGRATED_SCALAR!r} starts."
            )
        migrated[MIGRATED_SCALAR] = _copy(flat["ema_mean"])
    migrated[VERSION_FIELD] = full((), STATE_VERSION, "int32")
    return {name: migrated[name] for name in sorted(migrated, key=_flat_position)}


def _copy(x: Any) -> Any:
    """A copy of one array of any framework (``clone`` for torch, ``copy`` otherwise)."""
    if hasattr(x, "clone"):
        return x.clone()
    return x.copy() if hasattr(x, "copy") else x


def _flat_position(name: str) -> int:
    """Where ``name`` stands in :data:`FLAT_FIELDS` (unknown keys last, for the caller to name)."""
    return FLAT_FIELDS.index(name) if name in FLAT_FIELDS else len(FLAT_FIELDS)


def check_version(found, where: str) -> None:
    """Raises :class:`StateVersionError` unless ``found`` is :data:`STATE_VERSION`.

    ``found`` is the layout version read from a saved state (None when the
    state has no version field: layout 1, which had none). Layouts 2, 3 and
    4 are read by migration (:func:`migrate_flat`), before this check.
    """
    got = 1 if found is None else int(found)
    if got == STATE_VERSION:
        return
    if got in MIGRATED_VERSIONS:
        if got == 4:
            had = "the JAX state's scalars as one leaf each"
        else:
            had = ("no ring 'explosion_norms' and " if got == 2 else "") + "no 'norm_quantile'"
        advice = (
            f" (layout {got} had {had}). A layout-{got} state is read by "
            "migration, which adds what it lacks: optax_gradflow.state.from_flat for the "
            "flat form, optax_gradflow.state.from_restored for a checkpoint restored without "
            "a target (Orbax's restore(path), flax.serialization.msgpack_restore), and the "
            "PyTorch adapter's load_state_dict or migrate_state."
        )
    elif got < STATE_VERSION:
        advice = (
            " (layout 1 stored each ring as three flat fields and had no 'state_version'). "
            "Start the stabilizer from a fresh init, or load the checkpoint with the release "
            "that wrote it."
        )
    else:
        advice = ": it was written by a newer release."
    raise StateVersionError(
        f"{where} holds a stabilizer state of layout version {got}, but this version of "
        f"optax-gradflow reads layout version {STATE_VERSION}{advice}"
    )
