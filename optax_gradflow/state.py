"""The stabilizer's state and the ring-buffer helpers (SPEC.md, "State")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_gradflow import constants
from optax_gradflow.config import StabilizerConfig
from optax_gradflow.constants import (  # noqa: F401  (host_chronological: a ring helper)
    RING_PARTS,
    SCALARS,
    VERSION_FIELD,
    flat_name,
    host_chronological,
)

RINGS = constants.RINGS


class Ring(NamedTuple):
    """A ring buffer (SPEC.md, "Ring buffers"): the latest ``size`` items.

    Attributes:
      values: [size], the slots; written from slot 0.
      index: i32[], the next write position.
      count: i32[], the number of valid slots (<= size).
    """

    values: jax.Array
    index: jax.Array
    count: jax.Array

    def push(self, item: jax.Array, do_push: jax.Array | bool = True) -> Ring:
        """Writes ``item`` at ``index`` when ``do_push``; one slot, in place.

        The slot is rewritten with its own value when ``do_push`` is false, so
        the write is one ``dynamic_update_slice`` of one element, which XLA
        does in place on a donated buffer; the rest of the ring is not copied.
        """
        size = self.values.shape[0]
        do_push = jnp.asarray(do_push)
        item = jnp.asarray(item).astype(self.values.dtype)
        slot = self.values[self.index]
        # .at[].set, not dynamic_update_slice: it also takes an item that
        # carries a sharding (a norm of sharded gradients under explicit
        # sharding). XLA makes it a one-element dynamic-update-slice.
        values = self.values.at[self.index].set(jnp.where(do_push, item, slot))
        index = jnp.where(do_push, (self.index + 1) % size, self.index).astype(jnp.int32)
        count = jnp.where(do_push, jnp.minimum(self.count + 1, size), self.count)
        return Ring(values, index, count.astype(jnp.int32))

    def newest(self) -> jax.Array:
        """The latest item (meaningless while ``count == 0``)."""
        size = self.values.shape[0]
        return jax.lax.dynamic_index_in_dim(self.values, (self.index - 1) % size, keepdims=False)

    def valid(self) -> jax.Array:
        """bool[size]: the valid slots ``[0, count)``."""
        return jnp.arange(self.values.shape[0], dtype=jnp.int32) < self.count

    def chronological(self, window: int) -> tuple[jax.Array, jax.Array]:
        """(the last ``window`` pushes oldest first, which of them are valid).

        Entry ``j`` holds the item written ``window - j`` pushes ago (SPEC.md,
        "Ring buffers"); it is valid when ``j >= window - min(count, window)``.
        """
        size = self.values.shape[0]
        positions = (self.index - window + jnp.arange(window, dtype=jnp.int32)) % size
        valid = jnp.arange(window, dtype=jnp.int32) >= window - jnp.minimum(self.count, window)
        return self.values[positions], valid

    @classmethod
    def empty(cls, size: int, dtype) -> Ring:
        return cls(jnp.zeros((size,), dtype), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


class RingValues(NamedTuple):
    """The slots of each ring of a :class:`GradientFlowState` (their indices
    and counts are slots of its ``counters``)."""

    norm_history: jax.Array
    variance_history: jax.Array
    loss_scale_history: jax.Array
    threshold_history: jax.Array
    event_flags: jax.Array
    emergency_steps: jax.Array
    explosion_norms: jax.Array


class _Storage(NamedTuple):
    # The leaves of a GradientFlowState (SPEC.md, "Storage of the JAX state").
    stabilizer_step: jax.Array
    clip_threshold: jax.Array
    loss_scale: jax.Array
    last_grad_norm: jax.Array
    floats: jax.Array
    counters: jax.Array
    rings: RingValues
    state_version: jax.Array


_FLOAT_SLOT = {name: k for k, name in enumerate(constants.PACKED_FLOATS)}
_COUNTER_SLOT = {name: k for k, name in enumerate(constants.PACKED_COUNTERS)}
# Every field by name, in SPEC.md's order: the scalars, the rings, the version.
FIELDS: tuple[str, ...] = (*SCALARS, *RINGS, VERSION_FIELD)


class GradientFlowState(_Storage):
    """State of :func:`optax_gradflow.stabilize` (SPEC.md, "State").

    Every field below is read by name (``state.ema_mean``, ``state.norm_history``).
    The state is stored packed (SPEC.md, "Storage of the JAX state"): the
    leaves are ``stabilizer_step``, ``clip_threshold``, ``loss_scale`` and
    ``last_grad_norm``, which ``optax.tree.get(opt_state, "clip_threshold")``
    finds anywhere in a chain; ``floats``, one float32 vector of the other
    float32 scalars; ``counters``, one int32 vector of the other int32 and
    bool scalars and of each ring's index and count; ``rings``, each ring's
    slots (:class:`RingValues`); and ``state_version``. Build one from its
    fields with :meth:`of`; ``_replace`` takes any field by name.
    :func:`to_flat` and :func:`from_flat` give and take the flat form (one
    key per array, the PyTorch adapter's state dict), which checks the
    layout version. Scalars are 0-d arrays. ``f32`` is float32,
    ``i32`` int32 (counters saturate at 2**31 - 1). ``H`` = norm_history_size,
    ``V`` = variance_history_size, ``L`` = loss_scale_history_size,
    ``T`` = threshold_history_size, ``E`` = event_history_size,
    ``M`` = emergency_history_size.

    Attributes:
      stabilizer_step: i32[], number of updates processed.
      clip_threshold: f32[], the threshold the next step clips at.
      loss_scale: f32[], the current dynamic loss scale.
      loss_scale_growth_count: i32[], consecutive finite steps since the last
        interval growth or non-finite step.
      warmup_steps_left: i32[], steps of data warm-up still to run (0 when the
        threshold came from an explicit value, a store or a learning rate).
      consecutive_explosions: i32[], explosions and non-finite steps in a row.
      emergency_hold_left: i32[], steps during which the "track" rule's
        centre may not rise and explosions are measured against the
        threshold before the emergency's cut (set by an emergency; 0
        otherwise).
      explosion_count: i32[], total explosions (SPEC.md, "Counters").
      vanishing_count: i32[], total vanishing steps.
      nonfinite_count: i32[], total non-finite (skipped) steps.
      clip_count: i32[], total clipped steps (explosions included).
      emergency_count: i32[], total emergency interventions.
      warning_count: i32[], diagnostics runs that raised the early warning.
      stable_streak: i32[], steps in a row without explosion or non-finite norm.
      last_grad_norm: f32[], unscaled global norm of the latest step (may be
        non-finite).
      last_loss: f32[], the latest ``value=`` passed to update (NaN if none).
      loss_centre: f32[], EMA of the finite ``value=`` losses (NaN before the
        first); with ``loss_reference`` and ``loss_spread``, the "track"
        rule's loss gate.
      loss_reference: f32[], the calm loss level: falls like ``loss_centre``,
        rises slowly (NaN before the first loss).
      loss_spread: f32[], EMA of the losses' deviation from ``loss_centre``.
      norm_trend: f32[], slope of log-norm per history entry at the last
        diagnostics run.
      early_warning: bool[], whether the last diagnostics run crossed a limit.
      ema_mean: f32[], the "track" rule: centre of the log-norm; the "zscore"
        rule: EMA of the norm; 0 otherwise.
      ema_var: f32[], the "track" rule: spread of the log-norm; the "zscore"
        rule: EMA of the norm's variance; 0 otherwise.
      centre_anchor: f32[], the "track" rule: the centre when the loss last
        did not climb; the floor of the tightening is this minus
        ``ln(track_max_cut)``.
      norm_quantile: f32[], the "track" rule: ``u``, the tracked
        ``track_quantile`` quantile of the log-norms; an explosion's log-norm
        is above it. 0 for the other rules.
      norm_history: :class:`Ring` of f32[H], finite, non-exploding unscaled norms.
      variance_history: :class:`Ring` of f32[V], windowed norm variances.
      loss_scale_history: :class:`Ring` of f32[L], loss-scale values, pushed on
        change.
      threshold_history: :class:`Ring` of f32[T], thresholds, pushed on
        adaptation or emergency.
      event_flags: :class:`Ring` of i32[E], per-step event bit flags.
      emergency_steps: :class:`Ring` of i32[M], the step indices of emergencies.
      explosion_norms: :class:`Ring` of f32[E], the unscaled norms of the
        explosions, pushed on each: with ``norm_history``, every finite norm.
      state_version: i32[], the layout of this state,
        :data:`optax_gradflow.constants.STATE_VERSION`.
    """

    __slots__ = ()

    @classmethod
    def of(cls, **fields: Any) -> GradientFlowState:
        """A state from every field by name (:data:`FIELDS`: each scalar, each
        ring as a :class:`Ring`, ``state_version``), packed into its storage."""
        unknown = sorted(set(fields) - set(FIELDS))
        missing = [name for name in FIELDS if name not in fields]
        if unknown or missing:
            raise ValueError(
                f"A GradientFlowState takes every field by name: missing {missing}, "
                f"unknown {unknown}."
            )
        return cls(
            *(fields[name] for name in constants.NAMED_SCALARS),
            _pack(fields, constants.PACKED_FLOATS, jnp.float32),
            _pack(_counter_items(fields), constants.PACKED_COUNTERS, jnp.int32),
            RingValues(*(fields[ring].values for ring in RINGS)),
            fields[VERSION_FIELD],
        )

    def fields(self) -> dict[str, Any]:
        """Every field by name (:data:`FIELDS`), each ring as a :class:`Ring`."""
        return {name: getattr(self, name) for name in FIELDS}

    def _replace(self, **changes: Any) -> GradientFlowState:
        """This state with the given fields (any of :data:`FIELDS`, or a leaf
        of the storage) replaced."""
        storage = {name: changes.pop(name) for name in _Storage._fields if name in changes}
        state = super()._replace(**storage) if storage else self
        if not changes:
            return state
        return GradientFlowState.of(**{**state.fields(), **changes})


def _counter_items(fields: dict[str, Any]) -> dict[str, Any]:
    items = dict(fields)
    for ring in RINGS:
        r = fields[ring]
        items[flat_name(ring, "index")] = r.index
        items[flat_name(ring, "count")] = r.count
    return items


def _pack(fields: dict[str, Any], names: tuple[str, ...], dtype) -> jax.Array:
    """One vector of ``dtype`` from the scalars ``fields[name]`` (a batch of
    them: each scalar's leading axes are kept, the slots last)."""
    return jnp.stack([jnp.asarray(fields[name]).astype(dtype) for name in names], axis=-1)


def _float_field(name: str) -> property:
    k = _FLOAT_SLOT[name]
    return property(lambda self: self.floats[..., k], doc=f"``{name}``: slot {k} of ``floats``.")


def _counter_field(name: str) -> property:
    k = _COUNTER_SLOT[name]
    doc = f"``{name}``: slot {k} of ``counters``."
    if SCALARS.get(name) == "bool":
        return property(lambda self: self.counters[..., k] != 0, doc=doc)
    return property(lambda self: self.counters[..., k], doc=doc)


def _ring_field(ring: str) -> property:
    index, count = _COUNTER_SLOT[flat_name(ring, "index")], _COUNTER_SLOT[flat_name(ring, "count")]
    return property(
        lambda self: Ring(
            getattr(self.rings, ring), self.counters[..., index], self.counters[..., count]
        ),
        doc=f"``{ring}``: a :class:`Ring` of ``rings.{ring}`` and two slots of ``counters``.",
    )


for _name in constants.PACKED_FLOATS:
    setattr(GradientFlowState, _name, _float_field(_name))
for _name in constants.PACKED_COUNTERS:
    if _name in SCALARS:
        setattr(GradientFlowState, _name, _counter_field(_name))
for _name in RINGS:
    setattr(GradientFlowState, _name, _ring_field(_name))
del _name


class StabilizedState(NamedTuple):
    """State of :func:`optax_gradflow.stabilized` (SPEC.md, "Wrapper form").

    Attributes:
      inner_state: the inner optimizer's state, untouched on skipped steps.
      flow: the stabilizer's :class:`GradientFlowState`.
      update_ratio_history: a :class:`Ring` of f32[100], ``|update| / |params|``
        (global L2 norms) of applied steps, one every
        ``optax_gradflow.transform.UPDATE_RATIO_INTERVAL`` steps.
    """

    inner_state: Any
    flow: GradientFlowState
    update_ratio_history: Ring


def expected_shapes(config: StabilizerConfig) -> dict[str, tuple[tuple[int, ...], jnp.dtype]]:
    """Flat key (see :func:`to_flat`) -> (shape, dtype) of a state built from ``config``."""
    return {
        name: (shape, jnp.dtype(dtype))
        for name, (shape, dtype) in constants.flat_specs(config).items()
    }


def to_flat(state: GradientFlowState) -> dict[str, Any]:
    """The flat form of a state: one key per array (``norm_history``,
    ``norm_history_index``, ``norm_history_count``, ...), the keys of
    :data:`optax_gradflow.constants.FLAT_FIELDS`. No copy, no host transfer."""
    if not isinstance(state, GradientFlowState):
        raise TypeError(f"Expected a GradientFlowState, got {type(state).__name__}.")
    flat: dict[str, Any] = {name: getattr(state, name) for name in SCALARS}
    for ring in RINGS:
        r = getattr(state, ring)
        for part in RING_PARTS:
            flat[flat_name(ring, part)] = getattr(r, part)
    flat[VERSION_FIELD] = state.state_version
    return flat


def from_flat(
    flat: Mapping[str, Any], *, where: str = "The given state", array: Any = None
) -> GradientFlowState:
    """A :class:`GradientFlowState` from its flat form (:func:`to_flat`).

    Also takes the nested form, each ring a mapping of ``values``, ``index``
    and ``count``: what a checkpoint read without a target holds for the
    state (see :func:`from_restored`): one entry per field (layouts 2 to 4),
    or this layout's storage (``floats``, ``counters`` and ``rings``, read
    slot by slot). A state of layout 2, 3 or 4 is migrated (SPEC.md, "Layout
    version"): layout 2 gains an empty ``explosion_norms`` ring, sized like
    ``event_flags`` (both are E long), layouts 2 and 3 gain
    ``norm_quantile``, a copy of ``ema_mean``, and every other field is kept
    bit for bit. Reads ``state_version`` on the host.

    Raises:
      StateVersionError: the flat state was written with a layout this
        release does not read: layout 1 (one without ``state_version``) or a
        newer one.
      ValueError: keys are missing or unknown.
    """
    if not isinstance(flat, Mapping):
        raise TypeError(f"{where} must be a mapping of field names, got {type(flat).__name__}.")
    # ``array`` converts each value (``jnp.asarray`` by default; ``numpy.asarray``
    # for a host copy).
    array = jnp.asarray if array is None else array
    flat = constants.migrate_flat(
        _flatten_rings(_unpack_storage(flat)),
        lambda shape, value, dtype: array(np.full(shape, value, dtype)),
    )
    constants.check_version(flat.get(VERSION_FIELD), where)
    missing = [k for k in constants.FLAT_FIELDS if k not in flat]
    unknown = [k for k in flat if k not in constants.FLAT_FIELDS]
    if missing or unknown:
        raise ValueError(
            f"{where} does not have the fields of a GradientFlowState: missing {missing}, "
            f"unknown {unknown}."
        )
    fields: dict[str, Any] = {name: array(flat[name]) for name in SCALARS}
    for ring in RINGS:
        fields[ring] = Ring(*(array(flat[flat_name(ring, part)]) for part in RING_PARTS))
    fields[VERSION_FIELD] = array(flat[VERSION_FIELD])
    state = GradientFlowState.of(**fields)
    if array is not jnp.asarray:
        # A host copy stays on the host: the packed vectors as ``array`` makes them.
        state = state._replace(
            floats=array(np.asarray(state.floats)),
            counters=array(np.asarray(state.counters)),
        )
    return state


def _unpack_storage(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """The fields by name of the nested form of a packed state (what a
    checkpoint of this layout restores to without a target: ``floats``,
    ``counters`` and ``rings``, read slot by slot); any other mapping as it is."""
    if "floats" not in state or "counters" not in state or "rings" not in state:
        return state
    floats, counters, rings = state["floats"], state["counters"], state["rings"]
    for name, vector, names in (
        ("floats", floats, constants.PACKED_FLOATS),
        ("counters", counters, constants.PACKED_COUNTERS),
    ):
        if np.shape(vector) != (len(names),):
            raise ValueError(
                f"The state's {name!r} has shape {np.shape(vector)}, but this layout packs "
                f"{len(names)} slots there."
            )
    fields = {k: v for k, v in state.items() if k not in ("floats", "counters", "rings")}
    fields.update({name: floats[k] for k, name in enumerate(constants.PACKED_FLOATS)})
    for k, name in enumerate(constants.PACKED_COUNTERS):
        value = counters[k]
        fields[name] = (value != 0) if SCALARS.get(name) == "bool" else value
    if isinstance(rings, Mapping):
        fields.update({ring: rings[ring] for ring in RINGS if ring in rings})
    else:
        fields.update(dict(zip(RINGS, rings, strict=False)))
    return fields


def _flatten_rings(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with each ring given as a mapping of its parts spread into flat keys."""
    flat: dict[str, Any] = {}
    for name, value in state.items():
        if name in RINGS and isinstance(value, Mapping):
            flat.update({flat_name(name, part): part_value for part, part_value in value.items()})
        else:
            flat[name] = value
    return flat


def from_restored(restored: Any, target: Any) -> Any:
    """``target``'s tree, its leaves read from ``restored``: a checkpoint read without a target.

    Orbax's ``restore(path)`` and ``flax.serialization.msgpack_restore`` give
    the saved tree as nested dicts and lists (a NamedTuple as a dict of its
    fields, a tuple as a list or as a dict keyed ``"0"``, ``"1"``, ...). Each
    leaf of ``target`` is looked up there by its path, and each
    :class:`GradientFlowState` in it is rebuilt by :func:`from_flat`, so a
    stabilizer state of layout 2, 3 or 4 is migrated on the way (SPEC.md,
    "Layout version"). This is the way to read a checkpoint of layout 2 to 4:
    a restore into a target of this layout fails inside Orbax or flax, whose
    trees differ by the new fields. The arrays are copied to the default
    device.

    Args:
      restored: the tree a checkpoint restored without a target.
      target: a tree of the optimizer state's structure; its leaves may be
        ``jax.ShapeDtypeStruct``: ``jax.eval_shape(tx.init, params)``
        computes nothing.

    Returns:
      A tree of ``target``'s structure with the restored arrays.

    Raises:
      StateVersionError: a stabilizer state of layout 1 or of a newer layout.
      ValueError: ``restored`` lacks a part of ``target``.

    Example:
      >>> import flax.serialization, jax, jax.numpy as jnp, optax
      >>> import optax_gradflow
      >>> from optax_gradflow.state import from_restored
      >>> tx = optax_gradflow.stabilized(optax.adam(1e-2), 1e-2)
      >>> params = {"w": jnp.ones(3)}
      >>> data = flax.serialization.to_bytes(tx.init(params))
      >>> raw = flax.serialization.msgpack_restore(data)
      >>> state = from_restored(raw, jax.eval_shape(tx.init, params))
      >>> int(state.flow.state_version)
      5
    """

    def fill(path, like):
        node = _lookup(restored, path)
        if isinstance(like, GradientFlowState):
            return from_flat(node, where=f"The restored state at {jax.tree_util.keystr(path)}")
        return jnp.asarray(node)

    return jax.tree_util.tree_map_with_path(
        fill, target, is_leaf=lambda x: isinstance(x, GradientFlowState)
    )


def _lookup(tree: Any, path: tuple[Any, ...]) -> Any:
    """The node of a restored tree (dicts and lists) at a pytree key path."""
    node = tree
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey):
            name = key.name
        elif isinstance(key, jax.tree_util.SequenceKey):
            name = key.idx
        else:  # DictKey, FlattenedIndexKey
            name = key.key
        if isinstance(node, (list, tuple)):
            found = isinstance(name, int) and 0 <= name < len(node)
        elif isinstance(node, Mapping):
            if name not in node:
                name = str(name)  # msgpack keys every dict and sequence by a string
            found = name in node
        else:
            found = False
        if not found:
            raise ValueError(
                f"The restored tree has no {jax.tree_util.keystr(path)}: it was saved from "
                "another optimizer state than the target's."
            )
        node = node[name]
    return node


def check_state(state: GradientFlowState, config: StabilizerConfig) -> None:
    """Raises unless ``state`` is a state of this layout built for ``config``.

    Shapes and dtypes are static, so this runs at trace time and costs nothing
    per step. A state from a config that differs only in a non-structural value
    (a factor, a limit) cannot be told apart and is accepted.
    """
    if not isinstance(state, GradientFlowState):
        if isinstance(state, Mapping):
            # A raw restore (a checkpoint read without a target): refuse
            # another layout by name, and say how to rebuild this one (a
            # layout-2 or layout-3 state is migrated on the way).
            found = state.get(VERSION_FIELD)
            if not isinstance(found, jax.core.Tracer):
                constants.check_version(found, "The state passed to update")
            raise TypeError(
                "Expected a GradientFlowState built by this stabilizer's init, got a mapping; "
                "optax_gradflow.state.from_flat rebuilds one from the flat form, and "
                "optax_gradflow.state.from_restored a whole optimizer state from a checkpoint "
                "restored without a target."
            )
        raise TypeError(
            f"Expected a GradientFlowState built by this stabilizer's init, got "
            f"{type(state).__name__}."
        )
    if not isinstance(state.rings, RingValues):
        constants.check_version(None, "The state passed to update")
    if not isinstance(state.state_version, jax.core.Tracer):
        constants.check_version(state.state_version, "The state passed to update")
    for name, names, dtype in (
        ("floats", constants.PACKED_FLOATS, jnp.float32),
        ("counters", constants.PACKED_COUNTERS, jnp.int32),
    ):
        vector = getattr(state, name)
        if tuple(jnp.shape(vector)) != (len(names),) or jnp.result_type(vector) != dtype:
            raise ValueError(
                f"GradientFlowState.{name} has shape {tuple(jnp.shape(vector))} and dtype "
                f"{jnp.result_type(vector)}, but this layout packs {len(names)} slots of "
                f"{jnp.dtype(dtype)} there."
            )
    flat = to_flat(state)
    for name, (shape, dtype) in expected_shapes(config).items():
        value = flat[name]
        got_shape = tuple(jnp.shape(value))
        got_dtype = jnp.result_type(value)
        if got_shape != shape or got_dtype != dtype:
            raise ValueError(
                f"GradientFlowState.{name} has shape {got_shape} and dtype {got_dtype}, "
                f"but this stabilizer's config expects shape {shape} and dtype "
                f"{jnp.dtype(dtype)}: the state was built by a different configuration."
            )


def __getattr__(name: str) -> int:
    # The former plain-int event flags (FLAG_CLIPPED, ...): constants.Event now.
    return constants.legacy_flag(__name__, name)
