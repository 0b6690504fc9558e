"""The host step traced once per config into one straight-line Python function.

:class:`~optax_gradflow.torch.host.HostOps` runs the arithmetic of
:mod:`optax_gradflow.arithmetic` on NumPy scalars through an object: every
operation is a method call, every state field an attribute read. Here the
same arithmetic is run once with :class:`Tracer`, whose values are symbols:
each operation writes one line of Python (``v12 = v7 * v3``), a conditional
writes an ``if``, the state is read once at the top and written once at the
bottom, and fields that the step leaves as they were are not written at all.
The lines become one function, compiled once per (config, with or without a
loss) and kept: what runs per step is that function, with the operations the
interpreted host path would run, in the same order, on the same NumPy types
(:func:`function_for`; the tests hold the two bit for bit).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from optax_gradflow import arithmetic
from optax_gradflow.config import StabilizerConfig
from optax_gradflow.constants import RINGS, SCALARS
from optax_gradflow.torch import host

_F32 = np.float32
_I32 = np.int32


class Sym:
    """A value of the traced step: the name of a local of the generated function.

    ``size`` is the length of a 1-d array, None for a scalar.
    """

    __slots__ = ("name", "size", "tracer")
    __hash__ = object.__hash__

    def __init__(self, name: str, size: int | None, tracer: Tracer):
        self.name = name
        self.size = size
        self.tracer = tracer

    @property
    def shape(self) -> tuple[int, ...]:
        if self.size is None:
            raise TypeError(f"{self.name} is a scalar")
        return (self.size,)

    def __bool__(self):
        raise TypeError("the arithmetic branched in Python on a traced value")

    def _op(self, other, op: str, reverse: bool = False) -> Sym:
        return (
            self.tracer.binary(other, self, op) if reverse else self.tracer.binary(self, other, op)
        )

    def __add__(self, o):
        return self._op(o, "+")

    def __radd__(self, o):
        return self._op(o, "+", True)

    def __sub__(self, o):
        return self._op(o, "-")

    def __rsub__(self, o):
        return self._op(o, "-", True)

    def __mul__(self, o):
        return self._op(o, "*")

    def __rmul__(self, o):
        return self._op(o, "*", True)

    def __truediv__(self, o):
        return self._op(o, "/")

    def __rtruediv__(self, o):
        return self._op(o, "/", True)

    def __mod__(self, o):
        return self._op(o, "%")

    def __and__(self, o):
        return self._op(o, "&")

    def __rand__(self, o):
        return self._op(o, "&", True)

    def __or__(self, o):
        return self._op(o, "|")

    def __ror__(self, o):
        return self._op(o, "|", True)

    def __lt__(self, o):
        return self._op(o, "<")

    def __le__(self, o):
        return self._op(o, "<=")

    def __gt__(self, o):
        return self._op(o, ">")

    def __ge__(self, o):
        return self._op(o, ">=")

    def __eq__(self, o):  # type: ignore[override]
        return self._op(o, "==")

    def __ne__(self, o):  # type: ignore[override]
        return self._op(o, "!=")

    def __neg__(self):
        return self.tracer.emit(f"-{self.name}", self.size)

    def __invert__(self):
        # Logical not of a boolean (a NumPy ufunc on a scalar costs 0.3 us).
        if self.size is not None:
            return self.tracer.emit(f"np.logical_not({self.name})", self.size)
        return self.tracer.emit(f"not {self.name}", None)


class SymRing(NamedTuple):
    """A ring of the traced state: its values (the tensor's NumPy view), index and count."""

    values: Sym
    index: Sym
    count: Sym

    def newest(self) -> Sym:
        t, v = self.values.tracer, self.values
        return t.emit(f"{v.name}[(int({self.index.name}) - 1) % {v.size}]", None)

    def chronological(self, window: int) -> tuple[Sym, Sym]:
        t = self.values.tracer
        recent, valid = t.fresh(window), t.fresh(window)
        args = f"{self.values.name}, {self.index.name}, {self.count.name}, {window}"
        t.line(f"{recent.name}, {valid.name} = _chronological({args})")
        return recent, valid


class _State:
    """The traced state: each field read once, in the function's first lines."""

    def __init__(self, tracer: Tracer, sizes: dict[str, int]):
        self._tracer = tracer
        self._sizes = sizes
        self._read: dict[str, Any] = {}
        self.keys: set[str] = set()  # the flat keys the step reads

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        read = self._read
        if name not in read:
            t = self._tracer
            if name in RINGS:
                values = t.fresh(self._sizes[name], prologue=f"V[{name!r}]")
                index = t.fresh(None, prologue=f"V[{name + '_index'!r}][()]")
                count = t.fresh(None, prologue=f"V[{name + '_count'!r}][()]")
                read[name] = SymRing(values, index, count)
                t.ring_of[values.name] = name
                self.keys.update((name, name + "_index", name + "_count"))
            elif name in SCALARS:
                read[name] = t.fresh(None, prologue=f"V[{name!r}][()]")
                self.keys.add(name)
            else:
                raise AttributeError(name)
        return read[name]


def _chronological(values, index, count, window):
    return host.HostRing(values, index, count).chronological(window)


class Tracer(arithmetic.Ops):
    """:class:`optax_gradflow.arithmetic.Ops` that writes the step as Python source."""

    def __init__(self):
        self.prologue: list[str] = []
        self.body: list[str] = []
        self.constants: dict[str, Any] = {}
        self._const_names: dict[tuple[type, str], Sym] = {}
        self._indent = 1
        self._names = itertools.count()
        self.ring_of: dict[str, str] = {}  # a ring's values (local name) -> its field
        self.written: set[str] = set()  # the flat keys the step may write

    # --- writing lines ---------------------------------------------------------
    def line(self, text: str) -> None:
        self.body.append("    " * self._indent + text)

    def fresh(self, size: int | None, prologue: str | None = None) -> Sym:
        sym = Sym(f"v{next(self._names)}", size, self)
        if prologue is not None:
            self.prologue.append(f"    {sym.name} = {prologue}")
        return sym

    def emit(self, expr: str, size: int | None) -> Sym:
        sym = self.fresh(size)
        self.line(f"{sym.name} = {expr}")
        return sym

    def const(self, value: Any) -> Sym:
        """A constant of the function (a NumPy scalar or array), bound once."""
        # Arrays (the cached aranges) by identity: a long array's repr is abridged.
        key = ("array", id(value)) if isinstance(value, np.ndarray) else (type(value), repr(value))
        if key not in self._const_names:
            size = value.size if isinstance(value, np.ndarray) else None
            sym = Sym(f"k{len(self._const_names)}", size, self)
            self.constants[sym.name] = value
            self._const_names[key] = sym
        return self._const_names[key]

    def text(self, x: Any) -> str:
        """``x`` in the source: a local's name, a Python number, or a constant."""
        if isinstance(x, Sym):
            return x.name
        if isinstance(x, (bool, int)) or (isinstance(x, float) and math.isfinite(x)):
            return repr(x)
        return self.const(x).name

    @staticmethod
    def _size(*xs: Any) -> int | None:
        for x in xs:
            if isinstance(x, Sym) and x.size is not None:
                return x.size
        return None

    def binary(self, a: Any, b: Any, op: str) -> Sym:
        return self.emit(f"{self.text(a)} {op} {self.text(b)}", self._size(a, b))

    def call(self, fn: str, *args: Any, size: int | None = None) -> Sym:
        return self.emit(f"{fn}({', '.join(self.text(a) for a in args)})", size)

    # --- the Ops ---------------------------------------------------------------
    def f32(self, value):
        return self.const(_F32(value))

    def i32(self, value):
        return self.const(_I32(value))

    def false(self):
        return self.const(np.False_)

    def to_f32(self, x):
        if x.size is not None:
            return self.emit(f"{x.name}.astype(F32)", x.size)
        return self.call("F32", x)

    def to_i32(self, x):
        if x.size is not None:
            return self.emit(f"{x.name}.astype(I32)", x.size)
        return self.call("I32", x)

    def log_f32(self, value):
        return self.const(np.log(_F32(value)))

    def where(self, cond, a, b):
        size = self._size(cond, a, b)
        if size is not None:
            return self.call("np.where", cond, a, b, size=size)
        return self.emit(f"{self.text(a)} if {self.text(cond)} else {self.text(b)}", None)

    def _extremum(self, a, b, ge: str, lt: str, ufunc: str):
        size = self._size(a, b)
        if size is not None:
            return self.call(ufunc, a, b, size=size)
        x, y = self.text(a), self.text(b)
        # HostOps.maximum / minimum: the ufunc's NaN propagation, as an expression.
        return self.emit(
            f"{x} if {x} {ge} {y} else ({y} if {x} {lt} {y} else ({x} if {x} != {x} else {y}))",
            None,
        )

    def maximum(self, a, b):
        return self._extremum(a, b, ">=", "<", "np.maximum")

    def minimum(self, a, b):
        return self._extremum(a, b, "<=", ">", "np.minimum")

    def clip(self, x, lo, hi):
        return self.minimum(self.maximum(x, lo), hi)

    def exp(self, x):
        return self.call("np.exp", x, size=self._size(x))

    def log(self, x):
        return self.call("np.log", x, size=self._size(x))

    def sqrt(self, x):
        return self.call("np.sqrt", x, size=self._size(x))

    def abs(self, x):
        # The builtin on a NumPy scalar is NumPy's absolute value, without the ufunc call.
        return self.call("abs" if x.size is None else "np.abs", x, size=x.size)

    def floor(self, x):
        return self.call("np.floor", x, size=self._size(x))

    def isfinite(self, x):
        d = self.binary(x, x, "-")
        return self.binary(d, 0, "==")

    def arange(self, size):
        return self.const(host._arange(size))

    def sort(self, values):
        return self.call("np.sort", values, size=values.size)

    def take(self, values, index):
        return self.emit(f"{values.name}[int({self.text(index)})]", None)

    def sum(self, values):
        return self.emit(f"{values.name}.sum(dtype={values.name}.dtype)", None)

    def push_all(self, rings, items, wheres):
        out = []
        for ring, item, where in zip(rings, items, wheres, strict=True):
            self.written.add(self.ring_of[ring.values.name])
            index, count = self.fresh(None), self.fresh(None)
            args = f"{ring.values.name}, {ring.index.name}, {ring.count.name}, {self.text(item)}"
            if where is None:
                self.line(f"{index.name}, {count.name} = _push({args})")
            else:
                self.line(f"if {self.text(where)}:")
                self.line(f"    {index.name}, {count.name} = _push({args})")
                self.line("else:")
                self.line(f"    {index.name}, {count.name} = {ring.index.name}, {ring.count.name}")
            out.append(SymRing(ring.values, index, count))
        return out

    def cond(self, pred, true_fn, false_fn, possible=True):
        if not possible:
            return false_fn()
        self.line(f"if {self.text(pred)}:")
        self._indent += 1
        taken = true_fn()
        leaves_t, tree = _flatten(taken)
        outs = [self.fresh(getattr(x, "size", None)) for x in leaves_t]
        for o, x in zip(outs, leaves_t, strict=True):
            self.line(f"{o.name} = {self.text(x)}")
        self._indent -= 1
        self.line("else:")
        self._indent += 1
        other = false_fn()
        leaves_f, tree_f = _flatten(other)
        if tree_f != tree:
            raise TypeError(f"the branches of a conditional differ: {tree} and {tree_f}")
        for o, x in zip(outs, leaves_f, strict=True):
            self.line(f"{o.name} = {self.text(x)}")
        self._indent -= 1
        return _unflatten(tree, iter(outs))

    def sum_of_squares(self, updates):
        return self.emit("_sum_of_squares(leaves)", None)

    def rescale(self, updates, factor, divisor, finite):
        by = "None" if divisor is None else self.text(divisor)
        return self.emit(f"_rescale(leaves, {self.text(factor)}, {by}, {self.text(finite)})", None)

    def loss(self, value):
        if value is None:
            return None
        return self.fresh(None, prologue="_loss(value)")

    def store(self, state: _State, fields: dict[str, Any]) -> None:
        for name, value in fields.items():
            old = getattr(state, name)
            if isinstance(value, SymRing):
                for part in ("index", "count"):
                    new = getattr(value, part)
                    if new is not getattr(old, part):
                        self.line(f"V[{name + '_' + part!r}][...] = {new.name}")
                        self.written.add(f"{name}_{part}")
            elif value is not old:
                self.line(f"V[{name!r}][...] = {self.text(value)}")
                self.written.add(name)


def _flatten(tree: Any) -> tuple[list[Any], Any]:
    """The leaves of a tree of tuples (NamedTuples and SymRings included) and None."""
    if tree is None:
        return [], None
    if isinstance(tree, tuple):
        leaves, structure = [], []
        for item in tree:
            sub, st = _flatten(item)
            leaves += sub
            structure.append(st)
        return leaves, (type(tree), tuple(structure))
    return [tree], "leaf"


def _unflatten(structure: Any, leaves) -> Any:
    if structure is None:
        return None
    if structure == "leaf":
        return next(leaves)
    kind, parts = structure
    items = [_unflatten(p, leaves) for p in parts]
    return kind(*items) if hasattr(kind, "_fields") else kind(items)


def _sizes(config: StabilizerConfig) -> dict[str, int]:
    return {name: getattr(config, size_field) for name, (size_field, _) in RINGS.items()}


@functools.lru_cache(maxsize=64)
def function_for(
    config: StabilizerConfig, with_loss: bool
) -> Callable[
    [dict[str, np.ndarray], list[torch.Tensor], Any, Callable, Callable], list[torch.Tensor]
]:
    """The step of ``config`` as one Python function ``(views, leaves, value,
    sum_of_squares, rescale) -> new leaves``, traced and compiled once.

    ``views`` maps the flat state's keys to NumPy views of its CPU tensors;
    the function reads and writes the state through them. Its ``reads`` and
    ``writes`` are the flat keys it reads and may write (the views it needs),
    ``source`` its text.
    """
    tracer = Tracer()
    state = _State(tracer, _sizes(config))
    rule = arithmetic.rule_for(config)
    value = object() if with_loss else None
    new_leaves, _, _ = arithmetic.step(tracer, "leaves", state, config, rule, value=value)
    tracer.line(f"return {new_leaves.name}")
    source = "\n".join(
        ["def step(V, leaves, value, _sum_of_squares, _rescale):", *tracer.prologue, *tracer.body]
    )
    namespace: dict[str, Any] = {
        "np": np,
        "F32": _F32,
        "I32": _I32,
        "_push": host.push,
        "_chronological": _chronological,
        "_loss": host.HostOps.loss,
        **tracer.constants,
    }
    exec(compile(source, f"<optax_gradflow host step {id(config):x}>", "exec"), namespace)
    fn = namespace["step"]
    fn.source = source
    fn.reads = frozenset(state.keys)
    fn.writes = frozenset(tracer.written)
    return fn


def step(
    leaves: list[torch.Tensor],
    state: host.HostState,
    *,
    value: Any,
    config: StabilizerConfig,
    rescale: Callable[..., list[torch.Tensor]],
    process_group: Any = None,
    inplace: bool = False,
    function: Callable[..., list[torch.Tensor]] | None = None,
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """One step on the host (``function``, by default :func:`function_for` of
    ``config``): writes the next state into ``state``'s tensors and returns
    ``(new leaves, the state dict)``. The same operations as
    :func:`optax_gradflow.torch.host.step`."""
    xp = host.HostOps(rescale, process_group=process_group, inplace=inplace)
    fn = function_for(config, value is not None) if function is None else function
    # Overflow to inf and invalid operations (inf - inf) are values here, as
    # they are in the tensors of the device path.
    with np.errstate(all="ignore"):
        new_leaves = fn(state.views, leaves, value, xp.sum_of_squares, xp.rescale)
    return new_leaves, state.flat


__all__ = ("Sym", "SymRing", "Tracer", "function_for", "step")
