"""One stabilizer step under JAX: the shared arithmetic with ``jax.numpy``.

The per-step rules of SPEC.md are written once, in
:mod:`optax_gradflow.arithmetic`, for both frameworks; :class:`JaxOps` supplies
what is JAX's own:

- the sum of squares of every floating leaf (in float32) and its ``psum``
  over ``axis_name``;
- the rescale: one multiplication per element, which XLA fuses into a
  following optimizer's loops;
- ring writes (one-element in-place updates on donated buffers);
- conditionals: ``lax.cond``, so that the history rules' sort, the
  diagnostics and the event-only records run only on the steps that need
  them;
- the state's storage: :class:`~optax_gradflow.state.GradientFlowState`.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from optax_gradflow import arithmetic
from optax_gradflow.arithmetic import (  # noqa: F401  (the rule objects, for callers)
    HistoryRule,
    Rule,
    TrackRule,
    ZScoreRule,
    rule_for,
)
from optax_gradflow.config import StabilizerConfig
from optax_gradflow.state import GradientFlowState, Ring


def _is_float_leaf(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def sum_of_squares(tree: Any) -> jax.Array:
    """Sum of squares of every floating leaf, accumulated in float32.

    Low-precision gradients are upcast first: the squares of float16 gradients
    of a scaled loss overflow float16 long before float32 (SPEC.md, "Global
    norm"). Leaves are summed one by one in tree order, starting from 0.
    Integer, boolean and float0 leaves are not part of the norm.
    """
    sums = []
    for leaf in jax.tree.leaves(tree):
        if not _is_float_leaf(leaf):
            continue
        x = jnp.asarray(leaf)
        if jnp.iscomplexobj(x):
            sq = jnp.square(jnp.real(x).astype(jnp.float32)) + jnp.square(
                jnp.imag(x).astype(jnp.float32)
            )
        else:
            sq = jnp.square(x.astype(jnp.float32))
        sums.append(jnp.sum(sq))
    return functools.reduce(operator.add, sums, jnp.float32(0.0))


def _overwrite(old: jax.Array, new: jax.Array) -> jax.Array:
    """``new``, written so that the step still reads ``old``.

    A field whose old value the step never reads would be pruned from the
    jitted step's inputs; its donated buffer would then pair with the next
    output of its shape, shifting every pair after it, and XLA would copy
    each of those fields every step. The select is removed by XLA.
    """
    return jax.lax.select(jnp.ones((), jnp.bool_), new, old)


class JaxOps(arithmetic.Ops):
    """:class:`optax_gradflow.arithmetic.Ops` with ``jax.numpy``, for one step."""

    def __init__(self, axis_name: str | None = None):
        self.axis_name = axis_name

    def f32(self, value):
        return jnp.float32(value)

    def i32(self, value):
        return jnp.int32(value)

    def false(self):
        return jnp.zeros((), jnp.bool_)

    def to_f32(self, x):
        return jnp.asarray(x).astype(jnp.float32)

    def to_i32(self, x):
        return jnp.asarray(x).astype(jnp.int32)

    where = staticmethod(jnp.where)
    maximum = staticmethod(jnp.maximum)
    minimum = staticmethod(jnp.minimum)
    clip = staticmethod(jnp.clip)
    exp = staticmethod(jnp.exp)
    log = staticmethod(jnp.log)
    sqrt = staticmethod(jnp.sqrt)
    abs = staticmethod(jnp.abs)
    floor = staticmethod(jnp.floor)
    isfinite = staticmethod(jnp.isfinite)
    sort = staticmethod(jnp.sort)
    sum = staticmethod(jnp.sum)

    def arange(self, size):
        return jnp.arange(size, dtype=jnp.int32)

    def take(self, values, index):
        return values[index]

    def push_all(self, rings: Sequence[Ring], items, wheres) -> list[Ring]:
        return [
            ring.push(item, True if where is None else where)
            for ring, item, where in zip(rings, items, wheres, strict=True)
        ]

    def cond(self, pred, true_fn: Callable[[], Any], false_fn: Callable[[], Any], possible=True):
        if not possible:
            return false_fn()
        return jax.lax.cond(pred, true_fn, false_fn)

    def sum_of_squares(self, updates):
        sq = sum_of_squares(updates)
        if self.axis_name is not None:
            sq = jax.lax.psum(sq, self.axis_name)
        return sq

    def rescale(self, updates, factor, divisor, finite):
        def leaf(g):
            if not _is_float_leaf(g):
                return g
            # float16 / bfloat16 leaves are scaled in float32 so that the tiny
            # or huge coefficients of loss scaling neither underflow nor overflow.
            cd = jnp.promote_types(g.dtype, jnp.float32)
            x = g.astype(cd)
            y = x * factor.astype(cd)
            if divisor is not None:
                # SPEC.md's (x / r) * t as written, where the divisor is r. The
                # select on the element keeps XLA from folding the two scalars
                # into one factor, x * (t / r), which is up to 2 ulps off.
                divided = (x / divisor.astype(cd)) * factor.astype(cd)
                y = jnp.where(divisor != 1, divided, y)
            # jnp.where, not multiplication by 0: 0 * NaN is NaN.
            return jnp.where(finite, y, jnp.zeros((), cd)).astype(g.dtype)

        return jax.tree.map(leaf, updates)

    def loss(self, value):
        if value is None:
            return None
        return jnp.asarray(value).astype(jnp.float32).reshape(())

    def store(self, state: GradientFlowState, fields: dict[str, Any]) -> GradientFlowState:
        out = state.fields()
        for name, value in fields.items():
            old = out[name]
            out[name] = value if isinstance(old, Ring) else jnp.asarray(value).astype(old.dtype)
        out["last_grad_norm"] = _overwrite(state.last_grad_norm, out["last_grad_norm"])
        # A field the config never changes (a ring it never pushes) stays as it is;
        # the packed scalars are written as two vectors (SPEC.md, "Storage of the
        # JAX state").
        return GradientFlowState.of(**out)


def step(
    updates: Any,
    state: GradientFlowState,
    config: StabilizerConfig,
    rule: Rule,
    *,
    value: Any = None,
    axis_name: str | None = None,
) -> tuple[Any, GradientFlowState, jax.Array]:
    """One step (:func:`optax_gradflow.arithmetic.step` with :class:`JaxOps`):
    (updates, state, the threshold clipped at)."""
    return arithmetic.step(JaxOps(axis_name), updates, state, config, rule, value=value)
