"""One stabilizer step on a list of PyTorch gradients: ``update(grads, state)``.

The state is a dict keyed by :data:`optax_gradflow.constants.FLAT_FIELDS`.
The per-step rules of SPEC.md are written once, for both frameworks, in
:mod:`optax_gradflow.arithmetic` (its stages carry the names of
:data:`optax_gradflow.constants.STAGES`); :class:`TorchOps` supplies what is
PyTorch's own:

- the sum of squares of the gradients (one ``vecdot`` per leaf, in float32)
  and, for sharded gradients, one scalar all-reduce;
- the rescale: one fused multi-tensor kernel per dtype, in place when asked;
- ring writes, whose indices and counts move as one vector, and the counters,
  as one vector too;
- conditionals: both branches are computed and selected with
  ``torch.where`` (a :class:`Due` from the caller skips the periodic work
  where it is not due);
- the state's storage, a dict of flat keys.

Every value that depends on the gradients stays a tensor on their device and
every data-dependent choice is a ``torch.where``: no ``.item()``, no
``bool(tensor)``, with one exception on the CPU, where reading a value waits for
nothing: the rescale reads ``finite`` there to zero a skipped step's gradients
instead of selecting (see :func:`rescale_leaves`).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch

from optax_gradflow import arithmetic
from optax_gradflow.arithmetic import (
    ALL_DUE,
    Due,
    HistoryRule,
    Rule,
    TrackRule,
    ZScoreRule,
)
from optax_gradflow.config import INT32_MAX, StabilizerConfig
from optax_gradflow.constants import RINGS, SCALARS, flat_name
from optax_gradflow.torch import distributed, host, traced
from optax_gradflow.torch.state import (
    State,
    _check_config,
    check_state,
    is_float,
    sum_of_squares,
)

__all__ = (
    "Due",
    "HistoryRule",
    "Ring",
    "TorchOps",
    "TrackRule",
    "ZScoreRule",
    "host_path",
    "rescale_leaves",
    "rule_for",
    "step",
    "update",
)

_F32 = torch.float32
_I32 = torch.int32

# Devices whose tensors the step may read on the host: reading a CPU tensor
# waits for nothing. On any other device nothing is read.
_HOST_READ_DEVICES: tuple[str, ...] = ("cpu",)


def _device_of(grads: Sequence[torch.Tensor | None], state: State) -> torch.device:
    """The one device of the gradients and the state; ValueError otherwise."""
    device = state["loss_scale"].device
    first = None
    for i, g in enumerate(grads):
        if g is None:
            continue
        if first is None:
            first = (i, g.device)
        elif g.device != first[1]:
            raise ValueError(
                f"All gradients must be on one device: gradient {first[0]} is on {first[1]}, "
                f"gradient {i} on {g.device}."
            )
    if first is not None and first[1] != device:
        raise ValueError(
            f"The gradients are on {first[1]} but the stabilizer state is on {device}; move "
            "the state first: {k: v.to(device) for k, v in state.items()}."
        )
    return device


def float_gradients(
    grads: Sequence[torch.Tensor | None],
) -> tuple[list[int], list[torch.Tensor]]:
    """(positions, tensors) of the floating-point gradients: the ones the norm
    counts and the step rescales (``None`` and integer entries pass through)."""
    positions = [i for i, g in enumerate(grads) if g is not None and is_float(g)]
    return positions, [grads[i] for i in positions]  # type: ignore[misc]


def check_value(value: Any) -> None:
    """Raises unless ``value`` (the loss given as ``value=``) is one real number.

    Shapes are metadata: nothing is read from the device.
    """
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"value= must be the loss, one number; got a tensor of shape "
                f"{tuple(value.shape)} (pass the mean loss, e.g. losses.mean())."
            )
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"value= must be a real number, got a tensor of dtype {value.dtype}.")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"value= must be the loss, a number or a one-element tensor; got {value!r} "
            f"(a {type(value).__name__})."
        )


# --- Constants and small helpers -----------------------------------------------


@functools.lru_cache(maxsize=512)
def _cached(value: float | int | bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full((), value, dtype=dtype, device=device)


def _const(value: float | int | bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-d constant, made once per device (never written to, never put in a state).

    ``float32`` constants are rounded to float32 once, here.
    """
    if torch.compiler.is_compiling():
        return torch.full((), value, dtype=dtype, device=device)
    return _cached(value, dtype, device)


@functools.lru_cache(maxsize=64)
def _cached_arange(size: int, device: torch.device) -> torch.Tensor:
    return torch.arange(size, device=device, dtype=_I32)


def _arange(size: int, device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.arange(size, device=device, dtype=_I32)
    return _cached_arange(size, device)


def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # gather, not values[index]: indexing with a 0-d tensor reads it on the host.
    return values.gather(0, index.reshape(1).to(torch.int64)).reshape(())


class Ring(NamedTuple):
    """One ring buffer of the state (SPEC.md, "Ring buffers"): three flat keys."""

    values: torch.Tensor
    index: torch.Tensor
    count: torch.Tensor

    @classmethod
    def read(cls, state: State, name: str) -> Ring:
        return cls(state[name], state[flat_name(name, "index")], state[flat_name(name, "count")])

    def fields(self, name: str) -> dict[str, torch.Tensor]:
        """The ring as its flat state keys."""
        return {
            name: self.values,
            flat_name(name, "index"): self.index,
            flat_name(name, "count"): self.count,
        }

    def push(self, item: torch.Tensor, where: torch.Tensor | None = None) -> Ring:
        """Pushes ``item`` (only where ``where``, a 0-d bool tensor); no host read."""
        (ring,) = _push_all([self], [item], [where])
        return ring

    def newest(self) -> torch.Tensor:
        """The entry pushed last (garbage on an empty ring: select it away)."""
        size = self.values.shape[0]
        return _gather(self.values, (self.index - 1) % size)

    def chronological(self, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the last ``window`` pushes oldest first, which of them are valid)
        (SPEC.md, "Ring buffers")."""
        size = self.values.shape[0]
        j = _arange(window, self.values.device)
        positions = ((self.index - window + j) % size).to(torch.int64)
        valid = j >= window - torch.clamp(self.count, max=window)
        return self.values.gather(0, positions), valid


def _push_all(
    rings: Sequence[Ring],
    items: Sequence[torch.Tensor],
    wheres: Sequence[torch.Tensor | None],
) -> list[Ring]:
    """Pushes onto several rings at once: their indices and counts move as one vector."""
    if not rings:
        return []
    device = rings[0].values.device
    values = []
    for ring, item, where in zip(rings, items, wheres, strict=True):
        slot = _arange(ring.values.shape[0], device) == ring.index
        if where is not None:
            slot = slot & where
        values.append(torch.where(slot, item.to(ring.values.dtype), ring.values))
    if len(rings) == 1:
        (ring,), (where,) = rings, wheres
        size = ring.values.shape[0]
        index = (ring.index + 1) % size
        count = torch.clamp(ring.count + 1, max=size)
        if where is not None:
            index = torch.where(where, index, ring.index)
            count = torch.where(where, count, ring.count)
        return [Ring(values[0], index, count)]
    sizes = tuple(r.values.shape[0] for r in rings)
    size_t = _sizes(sizes, device)
    index = torch.stack([r.index for r in rings])
    count = torch.stack([r.count for r in rings])
    new_index = (index + 1) % size_t
    new_count = torch.minimum(count + 1, size_t)
    if any(w is not None for w in wheres):
        true = _const(True, torch.bool, device)
        do = torch.stack([true if w is None else w for w in wheres])
        new_index = torch.where(do, new_index, index)
        new_count = torch.where(do, new_count, count)
    return [
        Ring(v, i, c)
        for v, i, c in zip(values, new_index.unbind(), new_count.unbind(), strict=True)
    ]


@functools.lru_cache(maxsize=64)
def _cached_sizes(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(sizes, dtype=_I32, device=device)


def _sizes(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.tensor(sizes, dtype=_I32, device=device)
    return _cached_sizes(sizes, device)


_REAL_OF_COMPLEX = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16 / bfloat16 are rescaled in float32 so that tiny or huge
    # coefficients of loss scaling neither underflow nor overflow.
    return torch.promote_types(dtype, _F32)


def rescale_leaves(
    leaves: list[torch.Tensor],
    factor: torch.Tensor,
    finite: torch.Tensor,
    *,
    inplace: bool = False,
    divide_by: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """The rescale on torch: every leaf times ``factor``, in its
    ``promote(dtype, float32)``; 0 if not ``finite``.

    The clip is ``x * (t / r)``, one multiplication per element, within 2
    ulps of ``(x / r) * t`` (SPEC.md, "Per-step order" 4); ``x * (1 / s)`` is
    bit for bit. With ``divide_by`` (``exact_clip``) each leaf is first divided
    by it: ``(x / r) * t`` exactly, one more pass. Leaves are
    grouped by dtype, each group one fused multi-tensor kernel, in place when
    ``inplace`` (float16 / bfloat16 leaves go through float32 and are written
    back). A non-finite step must give exact zeros, and ``NaN * 0`` is NaN:
    on the CPU the flag is read (it waits for nothing) and the leaves are
    zeroed; on other devices nothing is read and the product is followed by
    ``torch.where(finite, y, 0)`` in place, one more pass over the gradients.
    """
    if not leaves:
        return []
    device = leaves[0].device
    host = device.type in _HOST_READ_DEVICES and not torch.compiler.is_compiling()
    if host and not bool(finite):
        if inplace:
            torch._foreach_zero_(leaves)
            return leaves
        return [torch.zeros_like(x) for x in leaves]
    dtype = leaves[0].dtype
    if all(x.dtype == dtype for x in leaves):
        out: list[torch.Tensor | None] = list(
            _rescale_group(leaves, dtype, factor, divide_by, inplace)
        )
    else:
        out = [None] * len(leaves)
        groups: dict[torch.dtype, list[int]] = {}
        for i, x in enumerate(leaves):
            groups.setdefault(x.dtype, []).append(i)
        for dtype, members in groups.items():
            xs = [leaves[i] for i in members]
            ys = _rescale_group(xs, dtype, factor, divide_by, inplace)
            for i, y in zip(members, ys, strict=True):
                out[i] = y
    if not host:
        # where, not a multiplication by 0: 0 * NaN is NaN.
        for i, y in enumerate(out):
            if inplace:
                zero = _const(0, y.dtype, device)  # type: ignore[union-attr]
                torch.where(finite, y, zero, out=y)  # type: ignore[arg-type]
            else:
                out[i] = torch.where(finite, y, 0.0)  # type: ignore[arg-type]
    return out  # type: ignore[return-value]


def _rescale_group(
    xs: list[torch.Tensor],
    dtype: torch.dtype,
    coef: torch.Tensor,
    divide_by: torch.Tensor | None,
    inplace: bool,
) -> list[torch.Tensor]:
    """:func:`rescale_leaves` of leaves of one ``dtype``: one fused kernel in that dtype."""
    cd = _compute_dtype(dtype)
    real_cd = _REAL_OF_COMPLEX.get(cd, cd)
    factor = coef if real_cd == _F32 else coef.to(real_cd)
    div = None
    if divide_by is not None:
        div = divide_by if real_cd == _F32 else divide_by.to(real_cd)
    if cd == dtype:
        if inplace:
            if div is not None:
                torch._foreach_div_(xs, div)
            torch._foreach_mul_(xs, factor)
            return xs
        if div is not None:
            ys = torch._foreach_div(xs, div)
            torch._foreach_mul_(ys, factor)
            return ys
        return torch._foreach_mul(xs, factor)
    ys = [torch.mul(x.to(cd) if div is None else x.to(cd) / div, factor) for x in xs]
    if inplace:
        for x, y in zip(xs, ys, strict=True):
            x.copy_(y)
        return xs
    return [y.to(dtype) for y in ys]


# --- The framework's part of the arithmetic -------------------------------------------


def _where_tree(pred: torch.Tensor, a: Any, b: Any) -> Any:
    """``torch.where(pred, a, b)`` leaf by leaf over equal tuples (None stays None)."""
    if a is None:
        return None
    if isinstance(a, tuple):
        return type(a)(*(_where_tree(pred, x, y) for x, y in zip(a, b, strict=True)))
    if a is b:
        return a
    return torch.where(pred, a, b)


class TorchOps(arithmetic.Ops):
    """:class:`optax_gradflow.arithmetic.Ops` with torch, for one step on ``device``."""

    def __init__(self, device: torch.device, *, process_group: Any = None, inplace: bool = False):
        self.device = device
        self.process_group = process_group
        self.inplace = inplace

    def f32(self, value):
        return _const(float(value), _F32, self.device)

    def i32(self, value):
        return _const(int(value), _I32, self.device)

    def false(self):
        return _const(False, torch.bool, self.device)

    def to_f32(self, x):
        return x.to(_F32)

    def to_i32(self, x):
        return x.to(_I32)

    def log_f32(self, value):
        return _log_constant(value, self.device)

    where = staticmethod(torch.where)
    maximum = staticmethod(torch.maximum)
    minimum = staticmethod(torch.minimum)
    clip = staticmethod(torch.clamp)
    exp = staticmethod(torch.exp)
    log = staticmethod(torch.log)
    sqrt = staticmethod(torch.sqrt)
    abs = staticmethod(torch.abs)
    floor = staticmethod(torch.floor)

    @staticmethod
    def isfinite(x):
        # |x| < inf: false for NaN, two operations.
        return torch.abs(x) < math.inf

    def arange(self, size):
        return _arange(size, self.device)

    @staticmethod
    def sort(values):
        return torch.sort(values).values

    @staticmethod
    def take(values, index):
        return _gather(values, index)

    @staticmethod
    def sum(values):
        return values.sum()

    def push_all(self, rings, items, wheres):
        return _push_all(rings, items, wheres)

    def count_all(self, counters, increments):
        if not counters:
            return []
        counted = torch.stack(list(counters))
        inc = torch.stack(list(increments)).to(_I32)
        return list(torch.where(counted >= INT32_MAX, counted, counted + inc).unbind())

    def cond(self, pred, true_fn: Callable[[], Any], false_fn: Callable[[], Any], possible=True):
        if not possible:
            return false_fn()
        return _where_tree(pred, true_fn(), false_fn())

    def only_if(self, pred, fn, otherwise):
        # Selecting fn() against otherwise() would change nothing.
        return fn()

    def sum_of_squares(self, updates):
        return distributed.global_sum_of_squares(
            updates, self.device, self.process_group, sum_of_squares
        )

    def rescale(self, updates, factor, divisor, finite):
        local = distributed.local_shards(updates)
        return rescale_leaves(local, factor, finite, inplace=self.inplace, divide_by=divisor)

    def loss(self, value):
        if value is None:
            return None
        if isinstance(value, torch.Tensor):
            return value.detach().to(device=self.device, dtype=_F32).reshape(())
        return torch.full((), value, dtype=_F32, device=self.device)

    def store(self, state: StateView, fields: dict[str, Any]) -> State:
        new_state: State = dict(state.flat)
        for name, value in fields.items():
            if isinstance(value, Ring):
                new_state.update(value.fields(name))
            else:
                new_state[name] = value
        return new_state


class StateView:
    """A flat state dict read by attribute, as the arithmetic reads a state:
    scalars by their names, rings as :class:`Ring` objects (one property per
    field, generated below)."""

    __slots__ = ("flat",)

    def __init__(self, flat: State):
        self.flat = flat


def _view_property(name: str) -> property:
    if name in RINGS:
        return property(lambda view: Ring.read(view.flat, name))
    return property(lambda view: view.flat[name])


for _name in (*SCALARS, *RINGS):
    setattr(StateView, _name, _view_property(_name))
del _name


def _log_constant(value: float, device: torch.device) -> torch.Tensor:
    """``log(f32(value))`` in float32, as the step computed it: once per device."""
    if torch.compiler.is_compiling():
        return torch.log(torch.full((), value, dtype=_F32, device=device))
    return _cached_log(float(value), device)


@functools.lru_cache(maxsize=64)
def _cached_log(value: float, device: torch.device) -> torch.Tensor:
    return torch.log(torch.full((), value, dtype=_F32, device=device))


Path = Literal["auto", "host", "device"]
PATHS: tuple[str, ...] = ("auto", "host", "device")


def host_path(path: str, device: torch.device) -> bool:
    """Whether a step on ``device`` runs its scalar logic on the host, for ``path``."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}.")
    if path == "device" or torch.compiler.is_compiling():
        return False
    on_cpu = device.type in _HOST_READ_DEVICES
    if path == "host" and not on_cpu:
        raise ValueError(
            f'path="host" reads the state on the host: it needs the gradients and the '
            f'state on the CPU, not on {device}; use path="device" or "auto".'
        )
    return on_cpu


def rule_for(config: StabilizerConfig) -> Rule:
    """The rule object of ``config.adaptation_rule``, chosen once per config
    (built anew while ``torch.compile`` traces: its cache is not traced)."""
    if torch.compiler.is_compiling():
        return arithmetic.make_rule(config)
    return arithmetic.rule_for(config)


# --- The step ----------------------------------------------------------------------


def update(
    grads: Sequence[torch.Tensor | None],
    state: State,
    params: Any = None,
    *,
    value: torch.Tensor | float | None = None,
    config: StabilizerConfig | None = None,
    process_group: Any = None,
    due: Due | None = None,
    inplace: bool = False,
    validate: bool = True,
    path: Path = "auto",
) -> tuple[list[torch.Tensor | None], State]:
    """One stabilizer step (SPEC.md, "Per-step order"); pure unless ``inplace``.

    Args:
      grads: gradients of the scaled loss ``loss * loss_scale``. ``None``
        entries and integer / boolean tensors are passed through untouched and
        are not part of the norm.
      state: a dict from :func:`init_state` (or :func:`from_jax_state`), on the
        gradients' device. It is not modified.
      params: unused; accepted for symmetry with optax.
      value: the loss, one number (a float or a one-element tensor), recorded
        as ``last_loss`` and fed to the loss gate (SPEC.md, "Loss gate"); a
        missing or non-finite loss leaves the gate as it is.
      config: the :class:`~optax_gradflow.StabilizerConfig` the state was built
        with; the defaults if None.
      process_group: the ``torch.distributed`` group over which plain-tensor
        gradients are sharded (each rank holds a part); their squared norm is
        all-reduced over it. DTensor gradients (FSDP2) need nothing: they are
        reduced over their own mesh. Leave it None for DDP, whose gradients are
        already identical on every rank. See SPEC.md, "Distributed".
      due: which periodic work this step may need (:class:`Due`), from the
        caller's count of steps; None computes all of it and selects. A False
        field that is wrong gives a wrong step: pass it only from the state's
        own ``stabilizer_step`` and ``warmup_steps_left``.
      inplace: write the new gradients into ``grads`` (the floating-point
        ones) and return them; otherwise new tensors are returned.
      validate: check the state's keys, shapes and dtypes (metadata only).
      path: where the step's scalar logic runs (the same arithmetic either
        way): ``"host"``, on NumPy scalars read from the CPU (gradients and
        state on the CPU only); ``"device"``, as tensor operations on the
        gradients' device, with no read on the host; ``"auto"``, the host on
        the CPU (outside ``torch.compile``) and the device elsewhere. See
        :mod:`optax_gradflow.torch.host`.

    Returns:
      ``(new_grads, new_state)``: the unscaled, clipped gradients (zeros on a
      non-finite step), in the input dtypes, and the next state.

    Raises:
      ValueError: gradients on several devices, or not on the state's device;
        a state whose keys, shapes or dtypes do not match ``config``; a
        ``value`` of more than one element; ``path="host"`` off the CPU, or
        an unknown ``path``.
      StateVersionError: a state of another layout (one without
        ``"state_version"``: layout 1).
    """
    del params
    config = _check_config(config)
    if validate:
        check_state(state, config, read_version=False)
    check_value(value)
    device = _device_of(grads, state)
    on_host = host_path(path, device)
    float_idx, leaves = float_gradients(grads)
    if on_host:
        # update is pure: the host step writes into copies of the tensors it
        # may write; the others are shared with the new state, as on the device.
        fn = traced.function_for(config, value is not None)
        work = dict(state)
        for name in fn.writes:
            work[name] = state[name].clone()
        new_leaves, new_state = traced.step(
            leaves,
            host.HostState(work, fn.reads | fn.writes),
            value=value,
            config=config,
            rescale=rescale_leaves,
            process_group=process_group,
            inplace=inplace,
            function=fn,
        )
    else:
        new_leaves, new_state = step(
            leaves,
            state,
            device,
            value=value,
            config=config,
            rule=rule_for(config),
            process_group=process_group,
            due=ALL_DUE if due is None else due,
            inplace=inplace,
        )
    new_grads: list[torch.Tensor | None] = list(grads)
    if not inplace:
        for i, g in zip(float_idx, new_leaves, strict=True):
            new_grads[i] = distributed.like(grads[i], g)  # type: ignore[arg-type]
    return new_grads, new_state


def step(
    leaves: list[torch.Tensor],
    state: State,
    device: torch.device,
    *,
    value: torch.Tensor | float | None,
    config: StabilizerConfig,
    rule: Rule,
    process_group: Any,
    due: Due,
    inplace: bool,
) -> tuple[list[torch.Tensor], State]:
    """:func:`optax_gradflow.arithmetic.step` with :class:`TorchOps`, on checked
    inputs: ``(new leaves, new state)``.

    ``leaves`` are the floating-point gradients only, on ``device`` (the
    state's); ``value`` is checked and ``rule`` is ``rule_for(config)``. The
    caller has done :func:`update`'s checks, so a caller that keeps these
    from one step to the next (``GradientFlowStabilizer``) skips them.
    """
    xp = TorchOps(device, process_group=process_group, inplace=inplace)
    new_leaves, new_state, _ = arithmetic.step(
        xp, leaves, StateView(state), config, rule, value=value, due=due
    )
    return new_leaves, new_state
