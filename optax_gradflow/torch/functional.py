"""One stabilizer step on a list of PyTorch gradients: ``update(grads, state)``.

An independent implementation of SPEC.md, "Per-step order", with the same
state (a dict keyed by the ``GradientFlowState`` field names). Every value
that depends on the gradients stays a tensor on their device: no ``.item()``,
no ``bool(tensor)``, no Python branch on a tensor. Branches that JAX takes with
``lax.cond`` (the warm-up median, the adaptation rule, the diagnostics) are
computed every step here and selected with ``torch.where``; they cost a sort
of the norm history, far less than the gradient pass itself, and keep the
step a single graph for ``torch.compile``. The default ``track`` rule (SPEC.md,
"Tracking rule") needs no sort: it moves a centre and a spread of the log-norm
every step, gated by the loss ("Loss gate", which every rule updates).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from optax_gradflow.config import INT32_MAX, StabilizerConfig
from optax_gradflow.torch import distributed
from optax_gradflow.torch.state import (
    FLAG_ADAPTED,
    FLAG_CLIPPED,
    FLAG_EMERGENCY,
    FLAG_EXPLOSION,
    FLAG_NONFINITE,
    FLAG_VANISHING,
    FLAG_WARNING,
    State,
    _check_config,
    check_state,
    log_floored,
)

# 1 / Phi^{-1}(3/4): the median absolute deviation of normal data times this
# estimates its standard deviation (SPEC.md, "Threshold adaptation").
MAD_TO_STD = 1.4826

_F32 = torch.float32
_I32 = torch.int32


def _is_float(x: torch.Tensor) -> bool:
    return x.is_floating_point() or x.is_complex()


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


# --- Small helpers ---------------------------------------------------------


def _sat_inc(counter: torch.Tensor, increment: torch.Tensor | bool = True) -> torch.Tensor:
    """``counter + increment`` for an int32 counter, stopping at 2**31 - 1."""
    if isinstance(increment, bool):
        increment = torch.ones_like(counter) if increment else torch.zeros_like(counter)
    step = increment.to(_I32)
    return torch.where(counter >= INT32_MAX, counter, counter + step)


def _push(
    values: torch.Tensor,
    index: torch.Tensor,
    count: torch.Tensor,
    item: torch.Tensor,
    do_push: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ring push (SPEC.md, "Ring buffers"), only where ``do_push``; no host read."""
    size = values.shape[0]
    slot = torch.arange(size, device=values.device, dtype=_I32) == index
    if do_push is not None:
        slot = slot & do_push
    new_values = torch.where(slot, item.to(values.dtype), values)
    new_index = (index + 1) % size
    new_count = torch.clamp(count + 1, max=size)
    if do_push is not None:
        new_index = torch.where(do_push, new_index, index)
        new_count = torch.where(do_push, new_count, count)
    return new_values, new_index.to(_I32), new_count.to(_I32)


def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # gather, not values[index]: indexing with a 0-d tensor reads it on the host.
    return values.gather(0, index.reshape(1)).reshape(())


def _percentile(values: torch.Tensor, count: torch.Tensor, q: float) -> torch.Tensor:
    """``q``-th percentile of the valid slots ``[0, count)`` (numpy's "linear").

    NaN-free garbage when ``count == 0``; callers select it away.
    """
    size = values.shape[0]
    valid = torch.arange(size, device=values.device, dtype=_I32) < count
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


def _clamp_threshold(t: torch.Tensor, config: StabilizerConfig) -> torch.Tensor:
    return torch.clamp(t, min=config.min_threshold, max=config.max_threshold)


def _adapted_threshold(
    values: torch.Tensor, count: torch.Tensor, config: StabilizerConfig
) -> torch.Tensor:
    """The configured rule over the history, clamped (SPEC.md, "Threshold adaptation")."""
    if config.adaptation_rule == "percentile":
        raw = _percentile(values, count, config.adaptation_percentile)
    elif config.adaptation_rule == "median_mad":
        median = _percentile(values, count, 50.0)
        mad = _percentile(torch.abs(values - median), count, 50.0)
        raw = median + mad * (config.adaptation_k * MAD_TO_STD)
    else:  # "mean_std", population std.
        valid = torch.arange(values.shape[0], device=values.device, dtype=_I32) < count
        m = torch.clamp(count, min=1).to(_F32)
        mean = torch.where(valid, values, 0.0).sum() / m
        var = torch.where(valid, torch.square(values - mean), 0.0).sum() / m
        raw = mean + torch.sqrt(var) * config.adaptation_k
    return _clamp_threshold(raw, config)


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
    a = torch.full((), config.zscore_alpha, dtype=_F32, device=mean.device)
    b = 1 - a
    new_mean = a * mean + b * x
    if config.zscore_reference_variance:
        new_var = a * var + b * torch.square(x - new_mean)
    else:
        new_var = a * (var + b * torch.square(x - mean))
    return new_mean, new_var


def _history_mean_var(
    values: torch.Tensor, count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    valid = torch.arange(values.shape[0], device=values.device, dtype=_I32) < count
    m = torch.clamp(count, min=1).to(_F32)
    mean = torch.where(valid, values, 0.0).sum() / m
    var = torch.where(valid, torch.square(values - mean), 0.0).sum() / m
    return mean, var


def _diagnose(
    values: torch.Tensor, index: torch.Tensor, count: torch.Tensor, config: StabilizerConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(trend, variance, warning) over the last W pushes (SPEC.md, "Diagnostics")."""
    size = values.shape[0]
    window = config.diagnostics_window
    j = torch.arange(window, device=values.device, dtype=_I32)
    positions = ((index - window + j) % size).to(torch.int64)
    recent = values.gather(0, positions)
    valid = j >= window - torch.clamp(count, max=window)
    w = valid.to(_F32)
    total = w.sum()
    safe_total = torch.clamp(total, min=1.0)
    x = j.to(_F32)
    floor = max(config.vanishing_norm, 1e-30)
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


# --- The "track" rule and the loss gate (SPEC.md, "Tracking rule") ----------


def _track_threshold(
    centre: torch.Tensor, spread: torch.Tensor, config: StabilizerConfig
) -> torch.Tensor:
    """``threshold(c, d) = clamp(exp(c + track_k * d))``."""
    return _clamp_threshold(torch.exp(centre + spread * config.track_k), config)


def _f32_constant(value: float, device: torch.device) -> torch.Tensor:
    return torch.full((), value, dtype=_F32, device=device)


def _track_adapt(
    norm: torch.Tensor,
    explosion: torch.Tensor,
    rising: torch.Tensor,
    climbing: torch.Tensor,
    state: State,
    config: StabilizerConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre c', spread d') of a finite step after the start ("Adaptation" of the rule).

    ``rising`` (the gate closed, ``track_loss_k``) holds the centre's rise;
    ``climbing`` (``track_loss_cut_k``) with an explosion cuts it. The callers
    select it away on the other steps.
    """
    centre, spread = state["ema_mean"], state["ema_var"]
    rate = config.track_rate
    hold = (state["emergency_hold_left"] > 0) | rising
    device = centre.device
    # The bounds are computed in float64 and rounded to float32 once.
    lo = _f32_constant(-config.track_max_fall / rate, device)
    hi = _f32_constant(config.track_max_rise / rate, device)
    e = torch.clamp(log_floored(norm) - centre, min=lo, max=hi)
    moved = centre + torch.where(hold, torch.clamp(e, max=0.0), e) * rate
    new_spread = spread + (torch.abs(e) - spread) * rate
    # An explosion in progress (the loss climbing, this step an explosion): the
    # centre falls at the full rate, but not below track_max_cut times under
    # its anchor, nor does this raise it.
    floor = state["centre_anchor"] - torch.log(_f32_constant(config.track_max_cut, device))
    tightened = torch.maximum(
        torch.minimum(moved, centre - _f32_constant(config.track_max_fall, device)),
        torch.minimum(floor, centre),
    )
    moved = torch.where(climbing & explosion, tightened, moved)
    return moved, new_spread


def _loss_above(
    centre: torch.Tensor, reference: torch.Tensor, spread: torch.Tensor, k: float
) -> torch.Tensor:
    """``centre > reference + k * spread``; false while either level is unknown (NaN)."""
    known = torch.isfinite(centre) & torch.isfinite(reference)
    return known & (centre > reference + spread * k)


def _loss_rising(
    centre: torch.Tensor, reference: torch.Tensor, spread: torch.Tensor, config: StabilizerConfig
) -> torch.Tensor:
    """The gate is closed: the loss centre above ``reference + track_loss_k * spread``.

    False while either level is unknown (NaN before the first loss).
    """
    return _loss_above(centre, reference, spread, config.track_loss_k)


def _loss_climbing(
    centre: torch.Tensor, reference: torch.Tensor, spread: torch.Tensor, config: StabilizerConfig
) -> torch.Tensor:
    """``climbing``: ``rising`` with ``track_loss_cut_k`` in place of ``track_loss_k``."""
    return _loss_above(centre, reference, spread, config.track_loss_cut_k)


def _learning_steps(config: StabilizerConfig) -> int:
    """``N = min(round(1 / track_rate), 2**31 - 1)`` (Python's round, half to even)."""
    return min(round(1.0 / config.track_rate), INT32_MAX)


def _emergency_reference(
    fire: torch.Tensor, centre: torch.Tensor, reference: torch.Tensor
) -> torch.Tensor:
    """The reference after an emergency: the loss centre, when there is one."""
    return torch.where(fire & torch.isfinite(centre), centre, reference)


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
    given = torch.isfinite(loss)
    first = ~torch.isfinite(centre)
    open_gate = ~_loss_rising(centre, reference, spread, config)
    # The first N steps: running means (rate a = max(r, 1 / (step + 1)), in
    # float32), and every finite loss teaches the reference and the spread.
    count = state["stabilizer_step"]
    early = count < _learning_steps(config)
    a = torch.maximum(rate, 1.0 / (count.to(_F32) + 1.0))
    # After them, bounded influence: B = max(3 * spread, 0.001 * |centre|) for
    # the spread, Bc = max(10 * spread, 0.001 * |centre|) for the centre (one
    # outlier moves it by at most r * Bc, half a spread).
    floor = torch.abs(centre) * 1e-3
    bound = torch.maximum(spread * 3.0, floor)
    centre_bound = torch.maximum(spread * 10.0, floor)
    diff = loss - centre
    new_centre = torch.where(
        early,
        centre + a * diff,
        centre + rate * torch.clamp(diff, min=-centre_bound, max=centre_bound),
    )
    gap = new_centre - reference
    # The reference falls with the loss at the centre's rate, rises slowly;
    # after the first steps only calm steps move it.
    gap_rate = torch.where(
        early,
        a,
        torch.where(gap <= 0, rate, _f32_constant(config.track_loss_rise_rate, device)),
    )
    new_reference = torch.where(calm | early, reference + gap_rate * gap, reference)
    deviation = torch.abs(diff)
    deviation = torch.where(early, deviation, torch.minimum(deviation, bound))
    # The spread learns only while the gate is open (and always at first).
    new_spread = torch.where(
        (open_gate & calm) | early,
        spread + torch.where(early, a, rate) * (deviation - spread),
        spread,
    )
    # The first finite loss starts all three levels.
    new_centre = torch.where(first, loss, new_centre)
    new_reference = torch.where(first, loss, new_reference)
    new_spread = torch.where(first, torch.zeros_like(spread), new_spread)
    # A missing or non-finite loss changes nothing.
    return (
        torch.where(given, new_centre, centre),
        torch.where(given, new_reference, reference),
        torch.where(given, new_spread, spread),
    )


def _sum_of_squares(leaves: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Per-leaf sums of float32 squares, then their sum (SPEC.md, "Per-step order" 1).

    The squares are taken in float32 on purpose: squares that overflow
    float32 must make the norm infinite (a non-finite step), and float16
    gradients of a scaled loss would overflow in their own dtype. Norm
    kernels (``torch.linalg.vector_norm``, ``get_total_norm``) are not used:
    they return ``sqrt`` of the sum, and squaring it back costs an extra
    rounding per leaf.
    """
    if not leaves:
        return torch.zeros((), dtype=_F32, device=device)
    sums = []
    for x in leaves:
        if x.is_complex():
            x = torch.view_as_real(x)
        flat = (x if x.dtype == _F32 else x.to(_F32)).reshape(-1)
        # One read of the leaf; no tensor of squares is materialised.
        sums.append(torch.linalg.vecdot(flat, flat))
    return torch.stack(sums).sum() if len(sums) > 1 else sums[0]


_REAL_OF_COMPLEX = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16 / bfloat16 are rescaled in float32 so that tiny or huge
    # coefficients of loss scaling neither underflow nor overflow.
    return torch.promote_types(dtype, _F32)


def _rescale(
    leaves: list[torch.Tensor],
    *,
    divisor: torch.Tensor,
    factor: torch.Tensor,
    finite: torch.Tensor,
) -> list[torch.Tensor]:
    """``x * (factor / divisor)`` per leaf, zero where not ``finite``.

    With ``divisor = r, factor = t`` this is the clip, as ``x * (t / r)``:
    one multiplication per element instead of SPEC's ``(x / r) * t``, which it
    matches to an ulp; with ``divisor = 1, factor = 1 / s`` it is ``x * (1 /
    s)`` bit for bit. Leaves are grouped by compute dtype so each group is one
    fused multi-tensor kernel.
    """
    out: list[torch.Tensor | None] = [None] * len(leaves)
    groups: dict[torch.dtype, list[int]] = {}
    for i, x in enumerate(leaves):
        groups.setdefault(_compute_dtype(x.dtype), []).append(i)
    for cd, members in groups.items():
        real_cd = _REAL_OF_COMPLEX.get(cd, cd)
        xs = [leaves[i].to(cd) for i in members]
        ys = torch._foreach_mul(xs, (factor / divisor).to(real_cd))
        for i, y in zip(members, ys, strict=True):
            # where, not a multiplication by 0: 0 * NaN is NaN.
            out[i] = torch.where(finite, y, 0.0).to(leaves[i].dtype)
    return out  # type: ignore[return-value]


# --- The step --------------------------------------------------------------


def update(
    grads: Sequence[torch.Tensor | None],
    state: State,
    params: Any = None,
    *,
    value: torch.Tensor | float | None = None,
    config: StabilizerConfig | None = None,
    process_group: Any = None,
) -> tuple[list[torch.Tensor | None], State]:
    """One stabilizer step (SPEC.md, "Per-step order"); pure, no host transfer.

    Args:
      grads: gradients of the scaled loss ``loss * loss_scale``. ``None``
        entries and integer / boolean tensors are passed through untouched and
        are not part of the norm.
      state: a dict from :func:`init_state` (or :func:`from_jax_state`), on the
        gradients' device. It is not modified.
      params: unused; accepted for symmetry with optax.
      value: the loss, recorded as ``last_loss`` and fed to the loss gate
        (SPEC.md, "Loss gate"); a missing or non-finite loss leaves the gate as
        it is.
      config: the :class:`~optax_gradflow.StabilizerConfig` the state was built
        with; the defaults if None.
      process_group: the ``torch.distributed`` group over which plain-tensor
        gradients are sharded (each rank holds a part); their squared norm is
        all-reduced over it. DTensor gradients (FSDP2) need nothing: they are
        reduced over their own mesh. Leave it None for DDP, whose gradients are
        already identical on every rank. See SPEC.md, "Distributed".

    Returns:
      ``(new_grads, new_state)``: the unscaled, clipped gradients (zeros on a
      non-finite step), in the input dtypes, and the next state.

    Raises:
      ValueError: gradients on several devices, or not on the state's device;
        a state whose keys, shapes or dtypes do not match ``config``.
    """
    del params
    config = _check_config(config)
    check_state(state, config)
    device = _device_of(grads, state)
    float_idx = [i for i, g in enumerate(grads) if g is not None and _is_float(g)]
    leaves = [grads[i] for i in float_idx]

    # 1. Global norm of the scaled gradients, then unscaled; sharded gradients
    # add their ranks' sums with one scalar all-reduce (SPEC.md, "Distributed").
    scale = state["loss_scale"]
    raw_norm = torch.sqrt(
        distributed.global_sum_of_squares(
            leaves,  # type: ignore[arg-type]
            device,
            process_group,
            _sum_of_squares,
        )
    )
    norm = raw_norm / scale
    finite = torch.isfinite(norm)

    # 2. The threshold of this step (SPEC.md, "Warm-up threshold").
    hist = state["norm_history"]
    hist_count = state["norm_history_count"]
    threshold = state["clip_threshold"]
    in_warmup = state["warmup_steps_left"] > 0
    if config.adaptation_rule == "track":
        # Waiting for the first finite, positive norm (SPEC.md, "Tracking rule",
        # "Start"): it has nothing to be compared with and is not clipped (a
        # zero norm: t = clamp(0), and it keeps waiting); a non-finite step
        # while waiting uses the placeholder (and is skipped anyway).
        threshold = torch.where(in_warmup & finite, _clamp_threshold(norm, config), threshold)
    else:
        # Driven by the state, not by config.warmup_steps: a state resumed under
        # a config without warm-up finishes the warm-up it started.
        from_history = _percentile(hist, hist_count, 50.0) * config.warmup_multiplier
        warm = torch.where(
            hist_count > 0,
            _clamp_threshold(from_history, config),
            torch.where(finite, _clamp_threshold(norm, config), threshold),
        )
        threshold = torch.where(in_warmup, warm, threshold)
    # Explosions are measured against this step's threshold, except under the
    # zscore rule: against the spike boundary held in the state.
    reference = threshold
    if config.adaptation_rule == "zscore":
        zs_threshold, spike, target = _zscore_threshold(norm, finite, state, config)
        warm_zs = _clamp_threshold(
            torch.full((), config.max_threshold, dtype=_F32, device=device), config
        )
        threshold = torch.where(in_warmup, warm_zs, zs_threshold)
        spike = spike & ~in_warmup
        reference = torch.where(in_warmup, warm_zs, state["clip_threshold"])

    # 3. Classification.
    nonfinite = ~finite
    explosion = finite & (norm > reference * config.explosion_factor)
    vanishing = finite & ~explosion & (norm < config.vanishing_norm)
    clipped = finite & (norm > threshold)

    # 4. Output: (x / r) * t when clipped, x * (1 / s) otherwise, 0 if non-finite.
    one = torch.ones((), dtype=_F32, device=device)
    keep_factor = one / scale if config.loss_scaling else one
    new_leaves = _rescale(
        [distributed.local_shard(x) for x in leaves],  # type: ignore[arg-type]
        divisor=torch.where(clipped, raw_norm, one),
        factor=torch.where(clipped, threshold, keep_factor),
        finite=finite,
    )
    new_grads: list[torch.Tensor | None] = list(grads)
    for i, g in zip(float_idx, new_leaves, strict=True):
        new_grads[i] = distributed.like(grads[i], g)  # type: ignore[arg-type]

    # 5. Loss-scale rule.
    growth_count = state["loss_scale_growth_count"]
    new_scale = scale
    if config.loss_scaling:
        factor = torch.where(
            nonfinite,
            config.nonfinite_backoff,
            torch.where(
                explosion,
                config.explosion_backoff,
                torch.where(vanishing, config.vanishing_growth, 1.0),
            ),
        ).to(_F32)
        new_scale = scale * factor
        growth_count = torch.where(nonfinite, 0, _sat_inc(growth_count))
        if config.growth_interval > 0:
            grow = growth_count >= config.growth_interval
            new_scale = torch.where(grow, new_scale * config.growth_factor, new_scale)
            growth_count = torch.where(grow, 0, growth_count)
        # A scale never grows to inf: keep the old one.
        new_scale = torch.where(torch.isfinite(new_scale), new_scale, scale)
        new_scale = torch.clamp(new_scale, min=config.min_loss_scale, max=config.max_loss_scale)

    # 6. History. Explosions stay out: they would drag the threshold up.
    norm_hist, norm_idx, norm_cnt = _push(
        hist, state["norm_history_index"], hist_count, norm, finite & ~explosion
    )

    # 7. Adaptation, after the push.
    step_after = _sat_inc(state["stabilizer_step"])
    left = state["warmup_steps_left"]
    left_after = torch.clamp(left - 1, min=0)
    ema_mean, ema_var = state["ema_mean"], state["ema_var"]
    centre_anchor = state["centre_anchor"]
    if config.adaptation_rule == "track":
        # SPEC.md, "Tracking rule": the centre and spread of the log-norm move
        # on every finite step; the gate is the state's on entry.
        gate = (state["loss_centre"], state["loss_reference"], state["loss_spread"])
        rising = _loss_rising(*gate, config)
        climbing = _loss_climbing(*gate, config)
        moved_centre, moved_spread = _track_adapt(norm, explosion, rising, climbing, state, config)
        # Only a finite, positive norm starts the tracker: a zero norm (an
        # all-zero gradient) has no level to start from and keeps waiting.
        start = in_warmup & finite & (norm > 0)
        move = finite & ~in_warmup
        ema_mean = torch.where(start, log_floored(norm), torch.where(move, moved_centre, ema_mean))
        ema_var = torch.where(
            start, torch.zeros_like(ema_var), torch.where(move, moved_spread, ema_var)
        )
        # "Tracking rule": the anchor follows the centre on calm steps while
        # the loss does not climb.
        calm_open = ~rising & finite & ~explosion
        centre_anchor = torch.where(start | calm_open, ema_mean, centre_anchor)
        left_after = torch.where(in_warmup & ~start, 1, 0)
        new_threshold = torch.where(
            start | move, _track_threshold(ema_mean, ema_var, config), threshold
        )
        # The threshold moves every step; the adapted flag (and the threshold
        # history) mark the start and every adaptation_interval steps after it.
        adapt = start
        if config.adaptation_interval > 0:
            adapt = adapt | ((step_after % config.adaptation_interval == 0) & ~in_warmup)
    elif config.adaptation_rule == "zscore":
        ends = left == 1
        # The EMA needs a norm to start from: the warm-up waits for one.
        left_after = torch.where(ends & (norm_cnt == 0), 1, left_after)
        adapt = ends & (norm_cnt > 0)
        start_mean, start_var = _history_mean_var(norm_hist, norm_cnt)
        moved_mean, moved_var = _zscore_ema(
            ema_mean, ema_var, torch.where(spike, target, norm), config
        )
        move = finite & ~in_warmup
        if config.zscore_skip_spikes:
            move = move & ~spike
        ema_mean = torch.where(adapt, start_mean, torch.where(move, moved_mean, ema_mean))
        ema_var = torch.where(adapt, start_var, torch.where(move, moved_var, ema_var))
        new_threshold = torch.where(
            in_warmup & ~adapt, threshold, _zscore_boundary(ema_mean, ema_var, config)
        )
    else:
        adapt = left == 1
        if config.adaptation_interval > 0:
            adapt = adapt | ((step_after % config.adaptation_interval == 0) & (left_after == 0))
        adapt = adapt & (norm_cnt > 0)
        new_threshold = torch.where(
            adapt, _adapted_threshold(norm_hist, norm_cnt, config), threshold
        )

    # 8. Emergency intervention, after the adaptation so that it cannot be undone.
    unstable = nonfinite | explosion
    consecutive = torch.where(unstable, _sat_inc(state["consecutive_explosions"]), 0)
    hold_left = state["emergency_hold_left"]
    no_fire = torch.zeros((), dtype=torch.bool, device=device)
    if config.adaptation_rule == "track":
        # SPEC.md, "Tracking rule", "Emergency": once per unbroken run (the run
        # is not reset), and at most once per emergency_rearm_steps. The hold
        # counts down whatever emergency_patience (also 0).
        if config.emergency_patience > 0:
            size = config.emergency_history_size
            newest = ((state["emergency_steps_index"] - 1) % size).to(torch.int64)
            last = _gather(state["emergency_steps"], newest)
            armed = (state["emergency_steps_count"] == 0) | (
                state["stabilizer_step"] - last >= config.emergency_rearm_steps
            )
            fire = (consecutive == config.emergency_patience) & armed
        else:
            fire = no_fire
        hold_left = torch.where(
            fire, config.emergency_hold_steps, torch.clamp(hold_left - 1, min=0)
        )
        # The centre drops by the emergency factor, after the adaptation and
        # after the anchor.
        cut = torch.log(_f32_constant(config.emergency_threshold_factor, device))
        ema_mean = torch.where(fire, ema_mean + cut, ema_mean)
        new_threshold = torch.where(
            fire, _track_threshold(ema_mean, ema_var, config), new_threshold
        )
    else:
        if config.emergency_patience > 0:
            fire = consecutive >= config.emergency_patience
        else:
            fire = no_fire
        new_threshold = torch.where(
            fire,
            torch.clamp(
                new_threshold * config.emergency_threshold_factor, min=config.min_threshold
            ),
            new_threshold,
        )
        consecutive = torch.where(fire, 0, consecutive)
    if config.loss_scaling:
        new_scale = torch.where(
            fire,
            torch.clamp(new_scale * config.emergency_loss_scale_factor, min=config.min_loss_scale),
            new_scale,
        )

    # 9. Diagnostics.
    trend, warning = state["norm_trend"], state["early_warning"]
    var_hist = state["variance_history"]
    var_idx, var_cnt = state["variance_history_index"], state["variance_history_count"]
    if config.diagnostics_interval > 0:
        run_diag = (step_after % config.diagnostics_interval == 0) & (norm_cnt >= 2)
        d_trend, d_var, d_warning = _diagnose(norm_hist, norm_idx, norm_cnt, config)
        trend = torch.where(run_diag, d_trend, trend)
        warning = torch.where(run_diag, d_warning, warning)
        var_hist, var_idx, var_cnt = _push(var_hist, var_idx, var_cnt, d_var, run_diag)
        warned = run_diag & d_warning
    else:
        warned = torch.zeros((), dtype=torch.bool, device=device)

    # 10. Records and counters.
    thr_hist, thr_idx, thr_cnt = _push(
        state["threshold_history"],
        state["threshold_history_index"],
        state["threshold_history_count"],
        new_threshold,
        adapt | fire,
    )
    ls_hist, ls_idx, ls_cnt = _push(
        state["loss_scale_history"],
        state["loss_scale_history_index"],
        state["loss_scale_history_count"],
        new_scale,
        new_scale != scale,
    )
    flags = (
        clipped.to(_I32) * FLAG_CLIPPED
        + explosion.to(_I32) * FLAG_EXPLOSION
        + vanishing.to(_I32) * FLAG_VANISHING
        + nonfinite.to(_I32) * FLAG_NONFINITE
        + fire.to(_I32) * FLAG_EMERGENCY
        + adapt.to(_I32) * FLAG_ADAPTED
        + warned.to(_I32) * FLAG_WARNING
    )
    ev_hist, ev_idx, ev_cnt = _push(
        state["event_flags"], state["event_flags_index"], state["event_flags_count"], flags
    )
    em_hist, em_idx, em_cnt = _push(
        state["emergency_steps"],
        state["emergency_steps_index"],
        state["emergency_steps_count"],
        state["stabilizer_step"],
        fire,
    )
    if value is None:
        last_loss = state["last_loss"]
        loss = torch.full((), math.nan, dtype=_F32, device=device)
    elif isinstance(value, torch.Tensor):
        last_loss = loss = value.detach().to(device=device, dtype=_F32).reshape(())
    else:
        last_loss = loss = torch.full((), value, dtype=_F32, device=device)
    # The loss gate moves under every rule (SPEC.md, "Per-step order" 10).
    loss_centre, loss_reference, loss_spread = _loss_gate(loss, finite & ~explosion, state, config)
    if config.adaptation_rule == "track":
        # "Tracking rule", "Emergency": the loss centre becomes the reference.
        loss_reference = _emergency_reference(fire, loss_centre, loss_reference)

    new_state: State = {
        "stabilizer_step": step_after,
        "clip_threshold": new_threshold.to(_F32),
        "loss_scale": new_scale.to(_F32),
        "loss_scale_growth_count": growth_count.to(_I32),
        "warmup_steps_left": left_after.to(_I32),
        "consecutive_explosions": consecutive.to(_I32),
        "emergency_hold_left": hold_left.to(_I32),
        "explosion_count": _sat_inc(state["explosion_count"], explosion),
        "vanishing_count": _sat_inc(state["vanishing_count"], vanishing),
        "nonfinite_count": _sat_inc(state["nonfinite_count"], nonfinite),
        "clip_count": _sat_inc(state["clip_count"], clipped),
        "emergency_count": _sat_inc(state["emergency_count"], fire),
        "warning_count": _sat_inc(state["warning_count"], warned),
        "stable_streak": torch.where(unstable, 0, _sat_inc(state["stable_streak"])).to(_I32),
        "last_grad_norm": norm.to(_F32),
        "last_loss": last_loss,
        "loss_centre": loss_centre.to(_F32),
        "loss_reference": loss_reference.to(_F32),
        "loss_spread": loss_spread.to(_F32),
        "norm_trend": trend.to(_F32),
        "early_warning": warning.to(torch.bool),
        "ema_mean": ema_mean.to(_F32),
        "ema_var": ema_var.to(_F32),
        "centre_anchor": centre_anchor.to(_F32),
        "norm_history": norm_hist,
        "norm_history_index": norm_idx,
        "norm_history_count": norm_cnt,
        "variance_history": var_hist,
        "variance_history_index": var_idx,
        "variance_history_count": var_cnt,
        "loss_scale_history": ls_hist,
        "loss_scale_history_index": ls_idx,
        "loss_scale_history_count": ls_cnt,
        "threshold_history": thr_hist,
        "threshold_history_index": thr_idx,
        "threshold_history_count": thr_cnt,
        "event_flags": ev_hist,
        "event_flags_index": ev_idx,
        "event_flags_count": ev_cnt,
        "emergency_steps": em_hist,
        "emergency_steps_index": em_idx,
        "emergency_steps_count": em_cnt,
    }
    return new_grads, new_state
