"""The step's scalar logic on the host, for gradients on the CPU.

On the CPU, reading a value of a tensor waits for nothing, so the step's
scalar logic (SPEC.md's rules: the threshold, classification, the loss gate,
the emergency, the counters and the rings) need not be dozens of tiny tensor
operations, each with the dispatcher's fixed cost: :class:`HostOps` runs the
same arithmetic (:mod:`optax_gradflow.arithmetic`, written once for both
frameworks) on NumPy float32 / int32 scalars, with the state's tensors read
and written in place through NumPy views of their memory. The gradients are
read twice, as on the device path: the sum of squares (``vecdot`` per leaf)
and one fused multiplication per dtype.

What it computes is the device path's arithmetic, operation for operation in
float32; NumPy's ``exp`` and ``log`` may differ from PyTorch's by an ulp, as
XLA's do (SPEC.md, "PyTorch adapter notes", "Where the scalar logic runs").
Conditionals are Python ``if``: the periodic work and the event-only records
run only on the steps that need them.

The adapter runs these operations traced once per config into one Python
function (:mod:`optax_gradflow.torch.traced`), without the method calls;
:func:`step` runs them one by one through :class:`HostOps`, and is their
reference (the tests hold the two bit for bit).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from optax_gradflow import arithmetic
from optax_gradflow.constants import RINGS, SCALARS, flat_name
from optax_gradflow.torch import distributed
from optax_gradflow.torch.state import State, sum_of_squares

_F32 = np.float32
_I32 = np.int32
_F32_CONSTANTS: dict[float, np.float32] = {}
_I32_CONSTANTS: dict[int, np.int32] = {}


class HostRing(NamedTuple):
    """A ring of the state (SPEC.md, "Ring buffers") as a NumPy view of its
    tensor, with its index and count read as scalars."""

    values: np.ndarray
    index: np.int32
    count: np.int32

    def newest(self) -> Any:
        return self.values[(int(self.index) - 1) % self.values.shape[0]]

    def chronological(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        size = self.values.shape[0]
        j = _arange(window)
        positions = (int(self.index) - window + j) % size
        valid = j >= window - min(int(self.count), window)
        return self.values[positions], valid


def push(values: np.ndarray, index: Any, count: Any, item: Any) -> tuple[np.int32, np.int32]:
    """Writes ``item`` into slot ``index`` of a ring's values, in place (the
    state's tensor, one slot); returns the ring's next (index, count)."""
    values[index] = item
    size = values.shape[0]
    return _I32((int(index) + 1) % size), _I32(min(int(count) + 1, size))


@functools.lru_cache(maxsize=64)
def _arange(size: int) -> np.ndarray:
    out = np.arange(size, dtype=_I32)
    out.flags.writeable = False
    return out


class HostState:
    """The flat state of CPU tensors, read by attribute through NumPy views:
    scalars as NumPy scalars (read once per step, :meth:`read`), rings as
    :class:`HostRing`. Writes go into the tensors' own memory
    (:meth:`HostOps.store`)."""

    def __init__(self, flat: State, names: Any = None):
        self.flat = flat
        # Only the fields a traced step uses, when it says which (``names``).
        keys = flat.keys() if names is None else names
        self.views = {name: flat[name].numpy() for name in keys}
        self._scalars = [(name, self.views[name]) for name in SCALARS if name in self.views]

    def read(self) -> HostState:
        """Reads every scalar once, for one step (an attribute each)."""
        for name, view in self._scalars:
            setattr(self, name, view[()])
        return self


def _ring_property(name: str) -> property:
    index, count = _RING_KEYS[name]
    return property(lambda s: HostRing(s.views[name], s.views[index][()], s.views[count][()]))


_RING_KEYS = {name: (flat_name(name, "index"), flat_name(name, "count")) for name in RINGS}
for _name in RINGS:
    setattr(HostState, _name, _ring_property(_name))
del _name


class HostOps(arithmetic.Ops):
    """:class:`optax_gradflow.arithmetic.Ops` on NumPy scalars, for one step on the CPU.

    ``rescale`` is given the function that rescales the gradients (the
    device path's, so that both paths write the same products).
    """

    def __init__(
        self,
        rescale: Callable[..., list[torch.Tensor]],
        *,
        process_group: Any = None,
        inplace: bool = False,
    ):
        self._rescale = rescale
        self.process_group = process_group
        self.inplace = inplace

    @staticmethod
    def f32(value):
        try:
            return _F32_CONSTANTS[value]
        except KeyError:
            if value == 0 or value != value:  # -0.0 == 0.0, NaN != NaN: not cached
                return _F32(value)
            return _F32_CONSTANTS.setdefault(value, _F32(value))

    @staticmethod
    def i32(value):
        try:
            return _I32_CONSTANTS[value]
        except KeyError:
            return _I32_CONSTANTS.setdefault(value, _I32(value))

    @staticmethod
    def false():
        return np.False_

    @staticmethod
    def to_f32(x):
        return x.astype(_F32) if isinstance(x, np.ndarray) else _F32(x)

    @staticmethod
    def to_i32(x):
        return x.astype(_I32) if isinstance(x, np.ndarray) else _I32(x)

    @staticmethod
    def log_f32(value):
        return _log_f32(float(value))

    @staticmethod
    def where(cond, a, b):
        if type(cond) is np.ndarray:
            return np.where(cond, a, b)
        return a if cond else b

    # NumPy's ufuncs cost half a microsecond on a scalar: the scalar forms are
    # written out, with the ufuncs' NaN propagation (a comparison with NaN is
    # false either way).
    @staticmethod
    def maximum(a, b):
        if type(a) is np.ndarray or type(b) is np.ndarray:
            return np.maximum(a, b)
        if a >= b:
            return a
        if a < b:
            return b
        return a if a != a else b

    @staticmethod
    def minimum(a, b):
        if type(a) is np.ndarray or type(b) is np.ndarray:
            return np.minimum(a, b)
        if a <= b:
            return a
        if a > b:
            return b
        return a if a != a else b

    @classmethod
    def clip(cls, x, lo, hi):
        return cls.minimum(cls.maximum(x, lo), hi)

    exp = staticmethod(np.exp)
    log = staticmethod(np.log)
    sqrt = staticmethod(np.sqrt)
    abs = staticmethod(np.abs)
    floor = staticmethod(np.floor)

    @staticmethod
    def isfinite(x):
        # x - x is 0 for a finite x, NaN for inf and NaN.
        return (x - x) == 0

    @staticmethod
    def arange(size):
        return _arange(size)

    sort = staticmethod(np.sort)

    @staticmethod
    def take(values, index):
        return values[int(index)]

    @staticmethod
    def sum(values):
        return values.sum(dtype=values.dtype)

    @staticmethod
    def push_all(
        rings: Sequence[HostRing], items: Sequence[Any], wheres: Sequence[Any]
    ) -> list[HostRing]:
        out = []
        for ring, item, where in zip(rings, items, wheres, strict=True):
            if where is not None and not where:
                out.append(ring)
                continue
            out.append(HostRing(ring.values, *push(ring.values, ring.index, ring.count, item)))
        return out

    @staticmethod
    def cond(pred, true_fn, false_fn, possible=True):
        return true_fn() if possible and pred else false_fn()

    @staticmethod
    def only_if(pred, fn, otherwise):
        # A calm step leaves the event-only fields as they are: nothing to write.
        return fn() if pred else None

    def sum_of_squares(self, updates):
        device = torch.device("cpu")
        total = distributed.global_sum_of_squares(
            updates, device, self.process_group, sum_of_squares
        )
        return _F32(total.item())

    def rescale(self, updates, factor, divisor, finite):
        local = distributed.local_shards(updates)
        if not finite:
            return self._rescale(local, None, False, inplace=self.inplace, divide_by=None)
        factor_t = torch.tensor(float(factor), dtype=torch.float32)
        divisor_t = None if divisor is None else torch.tensor(float(divisor), dtype=torch.float32)
        return self._rescale(local, factor_t, True, inplace=self.inplace, divide_by=divisor_t)

    @staticmethod
    def loss(value):
        if value is None:
            return None
        if isinstance(value, torch.Tensor):
            return _F32(value.detach().reshape(()).item())
        return _F32(value)

    @staticmethod
    def store(state: HostState, fields: dict[str, Any]) -> State:
        views = state.views
        for name, value in fields.items():
            if type(value) is HostRing:
                # The values were written in place by the push.
                index, count = _RING_KEYS[name]
                views[index][...] = value.index
                views[count][...] = value.count
            else:
                views[name][...] = value
        return state.flat


@functools.lru_cache(maxsize=64)
def _log_f32(value: float) -> np.float32:
    return np.log(_F32(value))


def step(
    leaves: list[torch.Tensor],
    state: HostState,
    *,
    value: Any,
    config: Any,
    rule: arithmetic.Rule,
    rescale: Callable[..., list[torch.Tensor]],
    process_group: Any = None,
    inplace: bool = False,
) -> tuple[list[torch.Tensor], State]:
    """One step on the host, the arithmetic run through :class:`HostOps`
    operation by operation: writes the next state into ``state``'s tensors and
    returns ``(new leaves, the state dict)``.

    The adapter runs the same operations traced into one function
    (:func:`optax_gradflow.torch.traced.step`); this form is their reference.
    """
    xp = HostOps(rescale, process_group=process_group, inplace=inplace)
    # Overflow to inf and invalid operations (inf - inf) are values here, as
    # they are in the tensors of the device path.
    with np.errstate(all="ignore"):
        new_leaves, new_state, _ = arithmetic.step(
            xp, leaves, state.read(), config, rule, value=value
        )
    return new_leaves, new_state


__all__ = ("HostOps", "HostRing", "HostState", "step")
