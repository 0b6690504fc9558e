"""One stabilizer step on a list of PyTorch gradients: ``update(grads, state)``.

An independent implementation of SPEC.md, "Per-step order", with the same
state (a dict keyed by :data:`optax_gradflow.constants.FLAT_FIELDS`). The step
is a pipeline of small pure stage functions named after
:data:`optax_gradflow.constants.STAGES`, in that order:

========== ==========================================================
measure    the global norm ``r``, the unscaled norm ``n``, ``finite``
threshold  the threshold ``t`` this step clips at (the rule's)
classify   non-finite / explosion / vanishing / clipped
rescale    the gradients times one scalar coefficient
loss_scale the loss-scale rule
history    push ``n`` onto the norm history
adapt      the rule's next threshold and levels
emergency  the emergency intervention (the rule's action)
diagnose   the early-warning diagnostics
record     the loss gate, rings, counters: the next state
========== ==========================================================

:func:`step` runs them in this order on checked inputs; :func:`update` checks
its inputs, then calls it.

Stages take and return small NamedTuples. What differs between adaptation
rules (the threshold of a step, the adaptation, the emergency's action) is a
rule object chosen once from the config (:func:`rule_for`); the step never
compares the rule's name.

Every value that depends on the gradients stays a tensor on their device and
every data-dependent choice is a ``torch.where``: no ``.item()``, no
``bool(tensor)``, with one exception on the CPU, where reading a value waits for
nothing: the rescale reads ``finite`` there to zero a skipped step's gradients
instead of selecting (see :func:`rescale`). Work that only periodic steps need
(the percentile rules' sort, the diagnostics) is computed and selected away on
the other steps, unless the caller passes ``due`` (a :class:`Due` computed from
the step counter, which is deterministic), which skips it where it is not due.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from optax_gradflow.config import INT32_MAX, StabilizerConfig
from optax_gradflow.constants import DIAGNOSTICS_LOG_FLOOR, STAGES, Event, flat_name
from optax_gradflow.torch import distributed
from optax_gradflow.torch.state import (
    MAD_TO_STD,
    State,
    _check_config,
    check_state,
    is_float,
    log_floored,
    sum_of_squares,
)

# The stage names are STAGES (test_torch_pipeline checks that all are here).
__all__ = (
    "STAGES",
    "Due",
    "HistoryRule",
    "Ring",
    "TrackRule",
    "ZScoreRule",
    "adapt",
    "classify",
    "diagnose",
    "emergency",
    "history",
    "loss_scale",
    "measure",
    "record",
    "rescale",
    "rule_for",
    "step",
    "threshold",
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


def _f32_constant(value: float, device: torch.device) -> torch.Tensor:
    return _const(float(value), _F32, device)


@functools.lru_cache(maxsize=64)
def _cached_arange(size: int, device: torch.device) -> torch.Tensor:
    return torch.arange(size, device=device, dtype=_I32)


def _arange(size: int, device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.arange(size, device=device, dtype=_I32)
    return _cached_arange(size, device)


def _isfinite(x: torch.Tensor) -> torch.Tensor:
    """``isfinite`` of a float tensor in two operations (``|x| < inf``: false for NaN)."""
    return torch.abs(x) < math.inf


def _sat_inc(counter: torch.Tensor, increment: torch.Tensor | None = None) -> torch.Tensor:
    """``counter + increment`` (default 1) for an int32 counter, stopping at 2**31 - 1."""
    step = counter + 1 if increment is None else counter + increment.to(_I32)
    return torch.where(counter >= INT32_MAX, counter, step)


def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # gather, not values[index]: indexing with a 0-d tensor reads it on the host.
    return values.gather(0, index.reshape(1).to(torch.int64)).reshape(())


def _clamp_threshold(t: torch.Tensor, config: StabilizerConfig) -> torch.Tensor:
    return torch.clamp(t, min=config.min_threshold, max=config.max_threshold)


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


def _push_all(
    rings: Sequence[Ring],
    items: Sequence[torch.Tensor],
    wheres: Sequence[torch.Tensor | None],
) -> list[Ring]:
    """Pushes onto several rings at once: their indices and counts move as one vector."""
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


# --- Statistics of the history (SPEC.md, "Threshold adaptation", "Diagnostics") ---


def _percentile(values: torch.Tensor, count: torch.Tensor, q: float) -> torch.Tensor:
    """``q``-th percentile of the valid slots ``[0, count)`` (numpy's "linear").

    NaN-free garbage when ``count == 0``; callers select it away.
    """
    size = values.shape[0]
    valid = _arange(size, values.device) < count
    ordered = torch.sort(torch.where(valid, values, math.inf)).values
    # q / 100 is a constant: rounded to float32 once, then used in float32.
    pos = (count.to(_F32) - 1.0) * (q / 100.0)
    lo = torch.floor(pos)
    frac = pos - lo
    lo_i = torch.clamp(lo.to(torch.int64), 0, size - 1)
    hi_i = torch.clamp(torch.minimum(lo_i + 1, count.to(torch.int64) - 1), 0, size - 1)
    a_lo = _gather(ordered, lo_i)
    a_hi = _gather(ordered, hi_i)
    return a_lo + frac * (a_hi - a_lo)


def _history_mean_var(
    values: torch.Tensor, count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    valid = _arange(values.shape[0], values.device) < count
    m = torch.clamp(count, min=1).to(_F32)
    mean = torch.where(valid, values, 0.0).sum() / m
    var = torch.where(valid, torch.square(values - mean), 0.0).sum() / m
    return mean, var


def _percentile_statistic(config: StabilizerConfig):
    q = config.adaptation_percentile

    def statistic(values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        return _percentile(values, count, q)

    return statistic


def _median_mad_statistic(config: StabilizerConfig):
    factor = config.adaptation_k * MAD_TO_STD

    def statistic(values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        median = _percentile(values, count, 50.0)
        mad = _percentile(torch.abs(values - median), count, 50.0)
        return median + mad * factor

    return statistic


def _mean_std_statistic(config: StabilizerConfig):
    k = config.adaptation_k

    def statistic(values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        mean, var = _history_mean_var(values, count)  # population std
        return mean + torch.sqrt(var) * k

    return statistic


_STATISTICS = {
    "percentile": _percentile_statistic,
    "median_mad": _median_mad_statistic,
    "mean_std": _mean_std_statistic,
}


def _diagnose(
    values: torch.Tensor, index: torch.Tensor, count: torch.Tensor, config: StabilizerConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(trend, variance, warning) over the last W pushes (SPEC.md, "Diagnostics")."""
    size = values.shape[0]
    window = config.diagnostics_window
    j = _arange(window, values.device)
    positions = ((index - window + j) % size).to(torch.int64)
    recent = values.gather(0, positions)
    valid = j >= window - torch.clamp(count, max=window)
    w = valid.to(_F32)
    total = w.sum()
    safe_total = torch.clamp(total, min=1.0)
    x = j.to(_F32)
    floor = max(config.vanishing_norm, DIAGNOSTICS_LOG_FLOOR)
    y = torch.where(valid, torch.log(torch.clamp(recent, min=floor)), 0.0)
    x_mean = (w * x).sum() / safe_total
    y_mean = (w * y).sum() / safe_total
    sxx = (w * torch.square(x - x_mean)).sum()
    sxy = (w * (x - x_mean) * (y - y_mean)).sum()
    trend = torch.where(total >= 2.0, sxy / torch.where(sxx > 0, sxx, 1.0), 0.0)
    norms = torch.where(valid, recent, 0.0)
    mean = (w * norms).sum() / safe_total
    variance = (w * torch.square(norms - mean)).sum() / safe_total
    relative = torch.where(mean > 0, variance / torch.where(mean > 0, mean * mean, 1.0), 0.0)
    warning = (trend > config.trend_limit) | (relative > config.variance_limit)
    return trend, variance, warning


# --- The loss gate (SPEC.md, "Loss gate"), run by every rule --------------------


def _loss_above(
    centre: torch.Tensor, reference: torch.Tensor, spread: torch.Tensor, k: float, rel: float
) -> torch.Tensor:
    """``centre > reference + k * max(spread, rel * |reference|)``; false while
    either level is unknown (NaN)."""
    device = centre.device
    known = _isfinite(centre) & _isfinite(reference)
    unit = torch.maximum(spread, _f32_constant(rel, device) * torch.abs(reference))
    return known & (centre > reference + _f32_constant(k, device) * unit)


def _loss_rising(
    centre: torch.Tensor, reference: torch.Tensor, spread: torch.Tensor, config: StabilizerConfig
) -> torch.Tensor:
    """The gate is closed: the loss centre above ``reference + track_loss_k * u``,
    ``u = max(spread, track_loss_rel * |reference|)``."""
    return _loss_above(centre, reference, spread, config.track_loss_k, config.track_loss_rel)


def _loss_climbing(
    centre: torch.Tensor, reference: torch.Tensor, spread: torch.Tensor, config: StabilizerConfig
) -> torch.Tensor:
    """The loss clearly climbing: above ``reference + track_loss_cut_k * u``."""
    return _loss_above(centre, reference, spread, config.track_loss_cut_k, config.track_loss_rel)


def _learning_steps(config: StabilizerConfig) -> int:
    """``N = min(round(1 / track_rate), 2**31 - 1)`` (Python's round, half to even)."""
    return min(round(1.0 / config.track_rate), INT32_MAX)


def _accepted_reference(
    fired: torch.Tensor,
    consecutive: torch.Tensor,
    centre: torch.Tensor,
    reference: torch.Tensor,
    config: StabilizerConfig,
) -> torch.Tensor:
    """The reference after an emergency, or after every ``track_accept_steps``-th
    explosion of an unbroken run (``consecutive``, after the step): the loss
    centre, when there is one."""
    accept = fired
    n = config.track_accept_steps
    if n > 0:
        accept = accept | ((consecutive > 0) & (torch.remainder(consecutive, n) == 0))
    return torch.where(accept & _isfinite(centre), centre, reference)


def _loss_gate(
    loss: torch.Tensor, calm: torch.Tensor, state: State, config: StabilizerConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_centre', loss_reference', loss_spread') after the loss ``loss`` (SPEC.md, "Loss gate").

    ``loss`` is NaN when no ``value=`` was given; ``calm`` is ``finite and not
    explosion`` of this step's norm. Every rule runs it.
    """
    centre, reference, spread = (
        state["loss_centre"],
        state["loss_reference"],
        state["loss_spread"],
    )
    device = loss.device
    rate = _f32_constant(config.track_rate, device)
    given = _isfinite(loss)
    first = ~_isfinite(centre)
    open_gate = ~_loss_rising(centre, reference, spread, config)
    # The first N steps: running means (rate a = max(r, 1 / (step + 1)), in
    # float32), and every finite loss teaches the reference and the spread.
    count = state["stabilizer_step"]
    early = count < _learning_steps(config)
    a = torch.maximum(rate, 1.0 / (count.to(_F32) + 1.0))
    # After them, bounded influence: B = max(3 * spread, 0.001 * |centre|) for
    # the spread, Bc = max(10 * spread, b * |centre|) for the centre, with
    # b = max(10 * track_loss_rel, 0.001): a share of the level, as the gate's
    # unit is, so that a loss that jumps far above the level its spread was
    # learned at (a target-network copy) is followed in tens of steps.
    floor = torch.abs(centre) * 1e-3
    bound = torch.maximum(spread * 3.0, floor)
    level_share = _f32_constant(max(10.0 * config.track_loss_rel, 1e-3), device)
    centre_bound = torch.maximum(spread * 10.0, level_share * torch.abs(centre))
    # During the first N steps, with e = max(b, 1) (at least the level
    # itself), max(10 * spread, e * |centre|) bounds the running mean, and the
    # spread's deviation is at most max(3 * spread, e * |centre|): one outlier
    # among them cannot widen the gate for hundreds of steps. A level of
    # exactly 0 with no spread gives no scale: such a loss is taken as it is.
    scaled = (centre != 0.0) | (spread > 0.0)
    inf = _f32_constant(math.inf, device)
    early_share = _f32_constant(max(10.0 * config.track_loss_rel, 1e-3, 1.0), device) * torch.abs(
        centre
    )
    early_bound = torch.where(scaled, torch.maximum(spread * 10.0, early_share), inf)
    diff = loss - centre
    new_centre = torch.where(
        early,
        centre + a * torch.clamp(diff, min=-early_bound, max=early_bound),
        centre + rate * torch.clamp(diff, min=-centre_bound, max=centre_bound),
    )
    gap = new_centre - reference
    # The reference falls with a calm loss at the centre's rate; otherwise
    # (rising, or on an explosion or a non-finite norm) it moves at
    # track_loss_rise_rate, every step.
    gap_rate = torch.where(
        early,
        a,
        torch.where(calm & (gap <= 0), rate, _f32_constant(config.track_loss_rise_rate, device)),
    )
    new_reference = reference + gap_rate * gap
    early_dev_bound = torch.where(scaled, torch.maximum(spread * 3.0, early_share), inf)
    deviation = torch.minimum(torch.abs(diff), torch.where(early, early_dev_bound, bound))
    # The spread learns only while the gate is open (and always at first).
    new_spread = torch.where(
        (open_gate & calm) | early,
        spread + torch.where(early, a, rate) * (deviation - spread),
        spread,
    )
    # The first finite loss starts all three levels; a missing or non-finite
    # loss changes nothing.
    zero = _f32_constant(0.0, device)
    return (
        torch.where(given, torch.where(first, loss, new_centre), centre),
        torch.where(given, torch.where(first, loss, new_reference), reference),
        torch.where(given, torch.where(first, zero, new_spread), spread),
    )


# --- The stages' records ----------------------------------------------------------


class Due(NamedTuple):
    """Which periodic work a step may need; each False is a promise that it does not.

    Computed by the caller from the step counter (deterministic, so it needs
    no read of the state): ``warmup``: the state may be in its warm-up
    (``warmup_steps_left > 0``); ``adapt``: a periodic adaptation may be due;
    ``diagnose``: ``stabilizer_step + 1`` is a multiple of
    ``diagnostics_interval``. ``update(..., due=None)`` assumes all three.
    """

    warmup: bool = True
    adapt: bool = True
    diagnose: bool = True


ALL_DUE = Due()


class Measured(NamedTuple):
    """Stage ``measure``: the raw norm ``r``, the unscaled norm ``n``, ``isfinite(n)``."""

    raw_norm: torch.Tensor
    norm: torch.Tensor
    finite: torch.Tensor


class StepThreshold(NamedTuple):
    """Stage ``threshold``: ``t``, and what explosions are measured against."""

    clip: torch.Tensor  # t, the threshold this step clips at
    reference: torch.Tensor
    in_warmup: torch.Tensor
    spike: torch.Tensor | None = None  # zscore
    target: torch.Tensor | None = None  # zscore


class Classes(NamedTuple):
    """Stage ``classify`` (SPEC.md, "Per-step order" 3)."""

    finite: torch.Tensor
    nonfinite: torch.Tensor
    explosion: torch.Tensor
    vanishing: torch.Tensor
    clipped: torch.Tensor
    calm: torch.Tensor  # finite and not explosion


class Scale(NamedTuple):
    """Stage ``loss_scale``: the next scale and growth count."""

    scale: torch.Tensor
    growth_count: torch.Tensor


class Adapted(NamedTuple):
    """Stage ``adapt``: the next threshold and levels."""

    threshold: torch.Tensor
    ema_mean: torch.Tensor
    ema_var: torch.Tensor
    centre_anchor: torch.Tensor
    warmup_left: torch.Tensor
    adapted: torch.Tensor


class Emergency(NamedTuple):
    """Stage ``emergency``: after the intervention, or unchanged."""

    threshold: torch.Tensor
    ema_mean: torch.Tensor
    scale: torch.Tensor
    consecutive: torch.Tensor
    hold_left: torch.Tensor
    fired: torch.Tensor


class Diagnosed(NamedTuple):
    """Stage ``diagnose``."""

    trend: torch.Tensor
    variance_history: Ring  # the variance history after this step's push
    warning: torch.Tensor
    warned: torch.Tensor | None  # None: statically not run this step


# --- The adaptation rules -----------------------------------------------------------


class _Rule:
    """What differs between adaptation rules; the rest of the step is shared."""

    def __init__(self, config: StabilizerConfig):
        self.config = config

    def step_threshold(
        self, m: Measured, state: State, due: Due, device: torch.device
    ) -> StepThreshold:
        raise NotImplementedError

    def adapt(
        self,
        m: Measured,
        t: StepThreshold,
        c: Classes,
        norms: Ring,
        step_after: torch.Tensor,
        state: State,
        due: Due,
    ) -> Adapted:
        raise NotImplementedError

    def emergency(
        self, c: Classes, s: Scale, a: Adapted, state: State, device: torch.device
    ) -> Emergency:
        """SPEC.md, "Per-step order" 8: fires after ``emergency_patience`` in a row."""
        config = self.config
        consecutive = torch.where(
            c.nonfinite | c.explosion, _sat_inc(state["consecutive_explosions"]), 0
        )
        if config.emergency_patience > 0:
            fired = consecutive >= config.emergency_patience
        else:
            fired = _const(False, torch.bool, device)
        new_threshold = torch.where(
            fired,
            torch.clamp(a.threshold * config.emergency_threshold_factor, min=config.min_threshold),
            a.threshold,
        )
        consecutive = torch.where(fired, 0, consecutive)
        return Emergency(
            new_threshold,
            a.ema_mean,
            _emergency_scale(s.scale, fired, config),
            consecutive,
            state["emergency_hold_left"],
            fired,
        )

    def gate_reference(
        self,
        fired: torch.Tensor,
        consecutive: torch.Tensor,
        loss_centre: torch.Tensor,
        loss_reference: torch.Tensor,
    ) -> torch.Tensor:
        """The loss reference after the gate moved (the track rule's emergency moves it)."""
        return loss_reference


def _emergency_scale(
    scale: torch.Tensor, fired: torch.Tensor, config: StabilizerConfig
) -> torch.Tensor:
    if not config.loss_scaling:
        return scale
    return torch.where(
        fired,
        torch.clamp(scale * config.emergency_loss_scale_factor, min=config.min_loss_scale),
        scale,
    )


class HistoryRule(_Rule):
    """``percentile``, ``median_mad``, ``mean_std``: periodic, from the history."""

    def __init__(self, config: StabilizerConfig):
        super().__init__(config)
        self.statistic = _STATISTICS[config.adaptation_rule](config)

    def step_threshold(
        self, m: Measured, state: State, due: Due, device: torch.device
    ) -> StepThreshold:
        config = self.config
        threshold = state["clip_threshold"]
        # Driven by the state, not by config.warmup_steps: a state resumed under
        # a config without warm-up finishes the warm-up it started.
        in_warmup = state["warmup_steps_left"] > 0
        if due.warmup:
            hist, count = state["norm_history"], state["norm_history_count"]
            from_history = _percentile(hist, count, 50.0) * config.warmup_multiplier
            warm = torch.where(
                count > 0,
                _clamp_threshold(from_history, config),
                torch.where(m.finite, _clamp_threshold(m.norm, config), threshold),
            )
            threshold = torch.where(in_warmup, warm, threshold)
        return StepThreshold(threshold, threshold, in_warmup)

    def adapt(self, m, t, c, norms, step_after, state, due) -> Adapted:
        config = self.config
        left = state["warmup_steps_left"]
        left_after = torch.clamp(left - 1, min=0)
        new_threshold, adapt = t.clip, None
        if due.adapt:
            adapt = left == 1
            if config.adaptation_interval > 0:
                adapt = adapt | ((step_after % config.adaptation_interval == 0) & (left_after == 0))
            adapt = adapt & (norms.count > 0)
            raw = self.statistic(norms.values, norms.count)
            new_threshold = torch.where(adapt, _clamp_threshold(raw, config), t.clip)
        return Adapted(
            new_threshold,
            state["ema_mean"],
            state["ema_var"],
            state["centre_anchor"],
            left_after,
            adapt,  # type: ignore[arg-type]
        )


class ZScoreRule(_Rule):
    """``zscore``: ZClip's EMA of the norm (SPEC.md, "Z-score rule")."""

    def step_threshold(
        self, m: Measured, state: State, due: Due, device: torch.device
    ) -> StepThreshold:
        config = self.config
        in_warmup = state["warmup_steps_left"] > 0
        zs_threshold, spike, target = _zscore_threshold(m.norm, m.finite, state, config)
        # clamp(max_threshold): max_threshold itself, min <= max being validated.
        warm = _f32_constant(config.max_threshold, device)
        threshold = torch.where(in_warmup, warm, zs_threshold)
        # Explosions are measured against the spike boundary held in the state.
        reference = torch.where(in_warmup, warm, state["clip_threshold"])
        return StepThreshold(threshold, reference, in_warmup, spike & ~in_warmup, target)

    def adapt(self, m, t, c, norms, step_after, state, due) -> Adapted:
        config = self.config
        left = state["warmup_steps_left"]
        left_after = torch.clamp(left - 1, min=0)
        ends = left == 1
        # The EMA needs a norm to start from: the warm-up waits for one.
        left_after = torch.where(ends & (norms.count == 0), 1, left_after)
        adapt = ends & (norms.count > 0)
        start_mean, start_var = _history_mean_var(norms.values, norms.count)
        ema_mean, ema_var = state["ema_mean"], state["ema_var"]
        spike = t.spike
        moved_mean, moved_var = _zscore_ema(
            ema_mean, ema_var, torch.where(spike, t.target, m.norm), config
        )
        move = m.finite & ~t.in_warmup
        if config.zscore_skip_spikes:
            move = move & ~spike
        ema_mean = torch.where(adapt, start_mean, torch.where(move, moved_mean, ema_mean))
        ema_var = torch.where(adapt, start_var, torch.where(move, moved_var, ema_var))
        new_threshold = torch.where(
            t.in_warmup & ~adapt, t.clip, _zscore_boundary(ema_mean, ema_var, config)
        )
        return Adapted(new_threshold, ema_mean, ema_var, state["centre_anchor"], left_after, adapt)


def _zscore_threshold(
    norm: torch.Tensor, finite: torch.Tensor, state: State, config: StabilizerConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(threshold, spike, target) after the warm-up (SPEC.md, "Z-score rule")."""
    mean, std = state["ema_mean"], torch.sqrt(state["ema_var"])
    zt = config.zscore_threshold
    if config.zscore_clip == "percentile":
        target = mean + std * zt
        spike = finite & (norm > target)
    else:
        z = (norm - mean) / (std + config.zscore_eps)
        spike = finite & (z > zt)
        if config.zscore_clip == "adaptive_scaling":
            target = (mean + (std * zt) / (z / zt)) * config.zscore_clip_factor
        else:
            target = mean
    threshold = _clamp_threshold(torch.where(spike, target, math.inf), config)
    return threshold, spike, target


def _zscore_boundary(
    mean: torch.Tensor, var: torch.Tensor, config: StabilizerConfig
) -> torch.Tensor:
    std = torch.sqrt(var)
    if config.zscore_clip == "percentile":
        boundary = mean + std * config.zscore_threshold
    else:
        boundary = mean + (std + config.zscore_eps) * config.zscore_threshold
    return _clamp_threshold(boundary, config)


def _zscore_ema(
    mean: torch.Tensor, var: torch.Tensor, x: torch.Tensor, config: StabilizerConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    # 1 - alpha in float32, as a tensor: a Python float would round differently.
    a = _f32_constant(config.zscore_alpha, mean.device)
    b = 1 - a
    new_mean = a * mean + b * x
    if config.zscore_reference_variance:
        new_var = a * var + b * torch.square(x - new_mean)
    else:
        new_var = a * (var + b * torch.square(x - mean))
    return new_mean, new_var


class TrackRule(_Rule):
    """``track``, the default (SPEC.md, "Tracking rule"): no sort, every step."""

    def step_threshold(
        self, m: Measured, state: State, due: Due, device: torch.device
    ) -> StepThreshold:
        # Waiting for the first finite, positive norm ("Start"): it has nothing
        # to be compared with but the parameters' cap (held in clip_threshold)
        # and is clipped only above it (a zero norm: t = clamp(0), and it
        # keeps waiting); a non-finite step while waiting uses the cap (and
        # is skipped anyway).
        in_warmup = state["warmup_steps_left"] > 0
        first = torch.minimum(_clamp_threshold(m.norm, self.config), state["clip_threshold"])
        threshold = torch.where(in_warmup & m.finite, first, state["clip_threshold"])
        # During an emergency's hold, explosions are measured against the
        # threshold with the emergency's cut undone (SPEC.md, "Tracking rule").
        factor = _f32_constant(self.config.emergency_threshold_factor, threshold.device)
        reference = torch.where(state["emergency_hold_left"] > 0, threshold / factor, threshold)
        return StepThreshold(threshold, reference, in_warmup)

    def _levels(self, centre: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
        """``threshold(c, d) = clamp(exp(c + track_k * d))``."""
        return _clamp_threshold(torch.exp(centre + spread * self.config.track_k), self.config)

    def adapt(self, m, t, c, norms, step_after, state, due) -> Adapted:
        config = self.config
        device = m.norm.device
        centre, spread = state["ema_mean"], state["ema_var"]
        gate = (state["loss_centre"], state["loss_reference"], state["loss_spread"])
        # The gate is the state's on entry: rising (track_loss_k) holds the
        # centre's rise; climbing (track_loss_cut_k) with an explosion cuts it.
        rising = _loss_rising(*gate, config)
        rate = config.track_rate
        hold = (state["emergency_hold_left"] > 0) | rising
        # The bounds are computed in float64 and rounded to float32 once.
        lo = _f32_constant(-config.track_max_fall / rate, device)
        hi = _f32_constant(config.track_max_rise / rate, device)
        x = log_floored(m.norm)
        e = torch.clamp(x - centre, min=lo, max=hi)
        # During a hold the centre does not rise, and falls only towards a
        # norm more than a spread under it.
        moved = centre + torch.where(hold, torch.clamp(e + spread, max=0.0), e) * rate
        new_spread = spread + (torch.abs(e) - spread) * rate
        if config.explosion_factor != math.inf:
            # An explosion in progress (the loss climbing, this step an
            # explosion): the centre falls at the full rate, but not below
            # track_max_cut times under its anchor, nor does this raise it.
            climbing = _loss_climbing(*gate, config)
            floor = state["centre_anchor"] - _log_constant(config.track_max_cut, device)
            tightened = torch.maximum(
                torch.minimum(moved, centre - _f32_constant(config.track_max_fall, device)),
                torch.minimum(floor, centre),
            )
            moved = torch.where(climbing & c.explosion, tightened, moved)
        # Only a finite, positive norm starts the tracker: a zero norm (an
        # all-zero gradient) has no level to start from and keeps waiting.
        in_warmup = t.in_warmup
        start = in_warmup & m.finite & (m.norm > 0)
        move = m.finite & ~in_warmup
        x_start = log_floored(torch.minimum(m.norm, state["clip_threshold"]))
        ema_mean = torch.where(start, x_start, torch.where(move, moved, centre))
        ema_var = torch.where(
            start, _f32_constant(0.0, device), torch.where(move, new_spread, spread)
        )
        # The anchor follows the centre on calm steps while the loss does not climb.
        anchor = torch.where(start | (c.calm & ~rising), ema_mean, state["centre_anchor"])
        left_after = (in_warmup & ~start).to(_I32)
        # A step that neither starts nor moves the tracker keeps the threshold
        # (while waiting: the parameters' cap, not the zero norm's clamp(0)).
        new_threshold = torch.where(
            start | move, self._levels(ema_mean, ema_var), state["clip_threshold"]
        )
        # The threshold moves every step; the adapted flag (and the threshold
        # history) mark the start and every adaptation_interval steps after it.
        adapt = start
        if config.adaptation_interval > 0 and due.adapt:
            adapt = adapt | ((step_after % config.adaptation_interval == 0) & ~in_warmup)
        return Adapted(new_threshold, ema_mean, ema_var, anchor, left_after, adapt)

    def emergency(self, c, s, a, state, device) -> Emergency:
        """SPEC.md, "Tracking rule", "Emergency": once per unbroken run, then re-armed."""
        config = self.config
        consecutive = torch.where(
            c.nonfinite | c.explosion, _sat_inc(state["consecutive_explosions"]), 0
        )
        hold_left = state["emergency_hold_left"]
        if config.emergency_patience == 0:
            # The hold counts down whatever emergency_patience.
            hold_left = torch.clamp(hold_left - 1, min=0)
            fired = _const(False, torch.bool, device)
            return Emergency(a.threshold, a.ema_mean, s.scale, consecutive, hold_left, fired)
        steps = Ring.read(state, "emergency_steps")
        armed = (steps.count == 0) | (
            state["stabilizer_step"] - steps.newest() >= config.emergency_rearm_steps
        )
        fired = (consecutive == config.emergency_patience) & armed
        hold_left = torch.where(
            fired, config.emergency_hold_steps, torch.clamp(hold_left - 1, min=0)
        )
        # The centre drops by the emergency factor, after the adaptation and
        # after the anchor.
        cut_mean = a.ema_mean + _log_constant(config.emergency_threshold_factor, device)
        ema_mean = torch.where(fired, cut_mean, a.ema_mean)
        new_threshold = torch.where(fired, self._levels(ema_mean, a.ema_var), a.threshold)
        return Emergency(
            new_threshold,
            ema_mean,
            _emergency_scale(s.scale, fired, config),
            consecutive,
            hold_left,
            fired,
        )

    def gate_reference(self, fired, consecutive, loss_centre, loss_reference):
        # "Tracking rule", "Emergency": the loss centre becomes the reference.
        return _accepted_reference(fired, consecutive, loss_centre, loss_reference, self.config)


def _log_constant(value: float, device: torch.device) -> torch.Tensor:
    """``log(f32(value))`` in float32, as the step computed it: once per device."""
    if torch.compiler.is_compiling():
        return torch.log(torch.full((), value, dtype=_F32, device=device))
    return _cached_log(float(value), device)


@functools.lru_cache(maxsize=64)
def _cached_log(value: float, device: torch.device) -> torch.Tensor:
    return torch.log(torch.full((), value, dtype=_F32, device=device))


def rule_for(config: StabilizerConfig) -> _Rule:
    """The rule object of ``config.adaptation_rule``, chosen once per config."""
    if torch.compiler.is_compiling():
        return _make_rule(config)
    return _cached_rule(config)


def _make_rule(config: StabilizerConfig) -> _Rule:
    if config.adaptation_rule == "track":
        return TrackRule(config)
    if config.adaptation_rule == "zscore":
        return ZScoreRule(config)
    return HistoryRule(config)


_cached_rule = functools.lru_cache(maxsize=64)(_make_rule)


# --- The stages --------------------------------------------------------------------


def measure(
    leaves: list[torch.Tensor],
    state: State,
    device: torch.device,
    process_group: Any = None,
) -> Measured:
    """Stage 1: the global norm of the scaled gradients, then unscaled.

    Sharded gradients add their ranks' sums with one scalar all-reduce
    (SPEC.md, "Distributed").
    """
    raw_norm = torch.sqrt(
        distributed.global_sum_of_squares(leaves, device, process_group, sum_of_squares)
    )
    norm = raw_norm / state["loss_scale"]
    return Measured(raw_norm, norm, _isfinite(norm))


def threshold(rule: _Rule, m: Measured, state: State, due: Due = ALL_DUE) -> StepThreshold:
    """Stage 2: the threshold of this step (the rule's, SPEC.md, "Warm-up threshold")."""
    return rule.step_threshold(m, state, due, m.norm.device)


def classify(m: Measured, t: StepThreshold, config: StabilizerConfig) -> Classes:
    """Stage 3 (SPEC.md, "Per-step order" 3)."""
    finite, norm = m.finite, m.norm
    if config.explosion_factor == math.inf:
        # n > inf * t never holds (inf * 0 is NaN, and n > NaN is false too).
        explosion = _const(False, torch.bool, norm.device)
        calm = finite
    else:
        explosion = finite & (norm > t.reference * config.explosion_factor)
        calm = finite & ~explosion
    vanishing = calm & (norm < config.vanishing_norm)
    clipped = finite & (norm > t.clip)
    return Classes(finite, ~finite, explosion, vanishing, clipped, calm)


_REAL_OF_COMPLEX = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16 / bfloat16 are rescaled in float32 so that tiny or huge
    # coefficients of loss scaling neither underflow nor overflow.
    return torch.promote_types(dtype, _F32)


def coefficient(
    m: Measured, t: StepThreshold, c: Classes, scale: torch.Tensor, config: StabilizerConfig
) -> torch.Tensor:
    """The one float32 factor of the rescale: ``t / r`` when clipped, else ``1 / s`` (or 1).

    With ``exact_clip``, the factor when clipped is ``t``, after a division by
    :func:`divisor` (``r``): SPEC.md's ``(x / r) * t``.
    """
    if config.loss_scaling:
        keep = 1.0 / scale  # 1 / s rounded to float32
    else:
        keep = _f32_constant(1.0, scale.device)
    clipped = t.clip if config.exact_clip else t.clip / m.raw_norm
    return torch.where(c.clipped, clipped, keep)


def divisor(m: Measured, c: Classes, config: StabilizerConfig) -> torch.Tensor | None:
    """``exact_clip``: ``r`` when clipped, else 1 (``x / 1`` is exact); None otherwise."""
    if not config.exact_clip:
        return None
    return torch.where(c.clipped, m.raw_norm, _f32_constant(1.0, m.raw_norm.device))


def rescale(
    leaves: list[torch.Tensor],
    coef: torch.Tensor,
    finite: torch.Tensor,
    *,
    inplace: bool = False,
    divide_by: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Stage 4: every leaf times ``coef``, in its ``promote(dtype, float32)``; 0 if not ``finite``.

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
            _rescale_group(leaves, dtype, coef, divide_by, inplace)
        )
    else:
        out = [None] * len(leaves)
        groups: dict[torch.dtype, list[int]] = {}
        for i, x in enumerate(leaves):
            groups.setdefault(x.dtype, []).append(i)
        for dtype, members in groups.items():
            xs = [leaves[i] for i in members]
            ys = _rescale_group(xs, dtype, coef, divide_by, inplace)
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
    """:func:`rescale` of leaves of one ``dtype``: one fused kernel when it computes in it."""
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


def loss_scale(c: Classes, state: State, config: StabilizerConfig) -> Scale:
    """Stage 5: the loss-scale rule (skipped when ``loss_scaling`` is false)."""
    scale, growth_count = state["loss_scale"], state["loss_scale_growth_count"]
    if not config.loss_scaling:
        return Scale(scale, growth_count)
    factor = torch.where(
        c.nonfinite,
        config.nonfinite_backoff,
        torch.where(
            c.explosion,
            config.explosion_backoff,
            torch.where(c.vanishing, config.vanishing_growth, 1.0),
        ),
    ).to(_F32)
    new_scale = scale * factor
    growth_count = torch.where(c.nonfinite, 0, _sat_inc(growth_count))
    if config.growth_interval > 0:
        grow = growth_count >= config.growth_interval
        new_scale = torch.where(grow, new_scale * config.growth_factor, new_scale)
        growth_count = torch.where(grow, 0, growth_count)
    # A scale never grows to inf: keep the old one.
    new_scale = torch.where(_isfinite(new_scale), new_scale, scale)
    new_scale = torch.clamp(new_scale, min=config.min_loss_scale, max=config.max_loss_scale)
    return Scale(new_scale, growth_count)


def history(m: Measured, c: Classes, state: State) -> Ring:
    """Stage 6: push ``n`` unless non-finite or an explosion (they would drag it up)."""
    return Ring.read(state, "norm_history").push(m.norm, c.calm)


def adapt(
    rule: _Rule,
    m: Measured,
    t: StepThreshold,
    c: Classes,
    norms: Ring,
    state: State,
    due: Due = ALL_DUE,
) -> tuple[Adapted, torch.Tensor]:
    """Stage 7, after the push: the rule's next threshold; also ``stabilizer_step + 1``."""
    step_after = _sat_inc(state["stabilizer_step"])
    return rule.adapt(m, t, c, norms, step_after, state, due), step_after


def emergency(rule: _Rule, c: Classes, s: Scale, a: Adapted, state: State) -> Emergency:
    """Stage 8, after the adaptation so that an adaptation cannot undo it."""
    return rule.emergency(c, s, a, state, a.threshold.device)


def diagnose(
    norms: Ring,
    step_after: torch.Tensor,
    state: State,
    config: StabilizerConfig,
    due: Due = ALL_DUE,
) -> Diagnosed:
    """Stage 9: every ``diagnostics_interval`` steps with at least 2 norms."""
    variance = Ring.read(state, "variance_history")
    if config.diagnostics_interval == 0 or not due.diagnose:
        return Diagnosed(state["norm_trend"], variance, state["early_warning"], None)
    run = (step_after % config.diagnostics_interval == 0) & (norms.count >= 2)
    trend, var, warning = _diagnose(norms.values, norms.index, norms.count, config)
    return Diagnosed(
        torch.where(run, trend, state["norm_trend"]),
        variance.push(var, run),
        torch.where(run, warning, state["early_warning"]),
        run & warning,
    )


def _loss_value(
    value: Any, state: State, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss as float32, NaN when none; ``last_loss'``)."""
    if value is None:
        return _f32_constant(math.nan, device), state["last_loss"]
    if isinstance(value, torch.Tensor):
        loss = value.detach().to(device=device, dtype=_F32).reshape(())
    else:
        loss = torch.full((), value, dtype=_F32, device=device)
    return loss, loss


_FLAG_WEIGHTS = tuple(int(bit) for bit in Event)

# The loss gate's levels (SPEC.md, "Loss gate").
_GATE_LEVELS = ("loss_centre", "loss_reference", "loss_spread")

# Counters that add one of the step's event bits, and that bit.
_COUNTED = (
    ("clip_count", Event.CLIPPED),
    ("explosion_count", Event.EXPLOSION),
    ("vanishing_count", Event.VANISHING),
    ("nonfinite_count", Event.NONFINITE),
    ("emergency_count", Event.EMERGENCY),
    ("warning_count", Event.WARNING),
)


def record(
    rule: _Rule,
    m: Measured,
    c: Classes,
    s: Scale,
    norms: Ring,
    a: Adapted,
    e: Emergency,
    d: Diagnosed,
    step_after: torch.Tensor,
    value: Any,
    state: State,
    config: StabilizerConfig,
) -> State:
    """Stage 10: the loss gate, the records and the counters: the next state."""
    device = m.norm.device
    false = _const(False, torch.bool, device)
    loss, last_loss = _loss_value(value, state, device)
    # The loss gate moves under every rule (SPEC.md, "Per-step order" 10);
    # without a loss it keeps its levels, so there is nothing to compute.
    if value is None:
        loss_centre, loss_reference, loss_spread = (state[k] for k in _GATE_LEVELS)
    else:
        loss_centre, loss_reference, loss_spread = _loss_gate(loss, c.calm, state, config)
    loss_reference = rule.gate_reference(e.fired, e.consecutive, loss_centre, loss_reference)

    adapted = false if a.adapted is None else a.adapted
    warned = false if d.warned is None else d.warned
    bits = {
        Event.CLIPPED: c.clipped,
        Event.EXPLOSION: c.explosion,
        Event.VANISHING: c.vanishing,
        Event.NONFINITE: c.nonfinite,
        Event.EMERGENCY: e.fired,
        Event.ADAPTED: adapted,
        Event.WARNING: warned,
    }
    # The flags and the counters, each as one vector operation.
    bit_vector = torch.stack(list(bits.values())).to(_I32)
    flags = (bit_vector * _sizes(_FLAG_WEIGHTS, device)).sum().to(_I32)
    counted = torch.stack([state[name] for name, _ in _COUNTED] + [state["stable_streak"]])
    increments = torch.stack(
        [bits[bit] for _, bit in _COUNTED] + [_const(True, torch.bool, device)]
    ).to(_I32)
    counters = torch.where(counted >= INT32_MAX, counted, counted + increments).unbind()
    unstable = c.nonfinite | c.explosion
    streak = torch.where(unstable, 0, counters[-1])

    # The records: the threshold when adapted or on an emergency, the scale when
    # it changed, the flags (every step), the step of an emergency, the norm of
    # an explosion.
    names, items, wheres = ["event_flags"], [flags], [None]
    if not (a.adapted is None and not config.emergency_patience):
        names.append("threshold_history")
        items.append(e.threshold)
        wheres.append(adapted | e.fired)
    if config.loss_scaling:
        names.append("loss_scale_history")
        items.append(e.scale)
        wheres.append(e.scale != state["loss_scale"])
    if config.emergency_patience > 0:
        names.append("emergency_steps")
        items.append(state["stabilizer_step"])
        wheres.append(e.fired)
    if config.explosion_factor != math.inf:
        names.append("explosion_norms")
        items.append(m.norm)
        wheres.append(c.explosion)
    pushed = _push_all([Ring.read(state, n) for n in names], items, wheres)

    new_state: State = dict(state)
    new_state.update(
        {
            "stabilizer_step": step_after,
            "clip_threshold": e.threshold,
            "loss_scale": e.scale,
            "loss_scale_growth_count": s.growth_count,
            "warmup_steps_left": a.warmup_left.to(_I32),
            "consecutive_explosions": e.consecutive.to(_I32),
            "emergency_hold_left": e.hold_left.to(_I32),
            "stable_streak": streak,
            "last_grad_norm": m.norm,
            "last_loss": last_loss,
            "loss_centre": loss_centre,
            "loss_reference": loss_reference,
            "loss_spread": loss_spread,
            "norm_trend": d.trend,
            "early_warning": d.warning,
            "ema_mean": e.ema_mean,
            "ema_var": a.ema_var,
            "centre_anchor": a.centre_anchor,
        }
    )
    for (name, _), counter in zip(_COUNTED, counters, strict=False):
        new_state[name] = counter
    new_state.update(norms.fields("norm_history"))
    new_state.update(d.variance_history.fields("variance_history"))
    for name, ring in zip(names, pushed, strict=True):
        new_state.update(ring.fields(name))
    return new_state


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

    Returns:
      ``(new_grads, new_state)``: the unscaled, clipped gradients (zeros on a
      non-finite step), in the input dtypes, and the next state.

    Raises:
      ValueError: gradients on several devices, or not on the state's device;
        a state whose keys, shapes or dtypes do not match ``config``; a
        ``value`` of more than one element.
      StateVersionError: a state of another layout (one without
        ``"state_version"``: layout 1).
    """
    del params
    config = _check_config(config)
    if validate:
        check_state(state, config, read_version=False)
    check_value(value)
    device = _device_of(grads, state)
    float_idx, leaves = float_gradients(grads)
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
    rule: _Rule,
    process_group: Any,
    due: Due,
    inplace: bool,
) -> tuple[list[torch.Tensor], State]:
    """The stages of :func:`update` in order, on checked inputs: ``(new leaves, new state)``.

    ``leaves`` are the floating-point gradients only, on ``device`` (the
    state's); ``value`` is checked and ``rule`` is ``rule_for(config)``. The
    caller has done :func:`update`'s checks, so a caller that keeps these
    from one step to the next (``GradientFlowStabilizer``) skips them.
    """
    local = distributed.local_shards(leaves)
    m = measure(leaves, state, device, process_group)
    t = threshold(rule, m, state, due)
    c = classify(m, t, config)
    coef = coefficient(m, t, c, state["loss_scale"], config)
    new_leaves = rescale(local, coef, m.finite, inplace=inplace, divide_by=divisor(m, c, config))
    s = loss_scale(c, state, config)
    norms = history(m, c, state)
    a, step_after = adapt(rule, m, t, c, norms, state, due)
    e = emergency(rule, c, s, a, state)
    d = diagnose(norms, step_after, state, config, due)
    new_state = record(rule, m, c, s, norms, a, e, d, step_after, value, state, config)
    return new_leaves, new_state
