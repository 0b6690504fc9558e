"""A deliberately plain transcription of SPEC.md: the oracle of the golden traces.

No JAX, no PyTorch, no vectorisation: Python lists and loops, one SPEC.md rule
after the other, in the order of "Per-step order". Float32 values are
``numpy.float32`` scalars, and every operation on them is wrapped in ``f32``
so that it rounds the way SPEC.md's float32 arithmetic does. Constants that are
products of config values (``q / 100``, ``adaptation_k * 1.4826``) are computed
in float64 and rounded once, as numbers written in a config would be; so are
the clip bounds of the ``track`` rule (``track_max_fall / track_rate``, as
SPEC.md says), while its logarithms of config values (``ln(track_max_cut)``,
``ln(emergency_threshold_factor)``) are float32 ``log`` of the float32 value.

The ``track`` rule and the loss gate ("Tracking rule", "Loss gate") follow the
same style: ``lnf``, ``exp`` and ``log`` are numpy's float32 functions, which
may differ from another library's float32 ``exp`` / ``log`` by an ulp or two;
the golden tests give the log-domain fields (``ema_mean``, ``centre_anchor``,
``ema_var`` under ``track``) a small absolute tolerance for that. The
``zscore`` rule is not transcribed (its parity is tested JAX against PyTorch).

Two places are computed in float64 and rounded at the end instead of summed in
float32, because SPEC.md does not fix a summation order there and the exact
sum is the order-free answer: the ``mean_std`` rule and the diagnostics. The
golden tests compare those fields with a documented looser tolerance.

The state is a dict with the ``GradientFlowState`` field names: float32 scalars,
Python ints (int32 counters), a bool, and lists for the rings.
"""

from __future__ import annotations

import math

import numpy as np

INT32_MAX = 2**31 - 1

# SPEC.md, "Hyperparameters", the default column, copied by hand.
DEFAULTS: dict[str, object] = {
    "min_threshold": 1e-30,
    "max_threshold": math.inf,
    "lr_threshold_scale": 0.1,
    "param_threshold_scale": 0.05,
    "warmup_steps": 100,
    "warmup_multiplier": 2.0,
    "adaptation_interval": 100,
    "adaptation_rule": "track",
    "track_rate": 0.05,
    "track_max_rise": 0.02,
    "track_max_fall": 0.1,
    "track_k": 1.0,
    "track_loss_k": 1.0,
    "track_loss_cut_k": 1.5,
    "track_loss_rise_rate": 0.002,
    "track_loss_rel": 0.2,
    "track_accept_steps": 50,
    "track_max_cut": 10.0,
    "track_quantile": 0.95,
    "track_quantile_rate": 0.1,
    "adaptation_percentile": 90.0,
    "adaptation_k": 3.0,
    "norm_history_size": 1000,
    "threshold_history_size": 100,
    "explosion_factor": 3.0,
    "vanishing_norm": 1e-7,
    "exact_clip": False,
    "loss_scaling": False,
    "initial_loss_scale": 1.0,
    "min_loss_scale": 0.1,
    "nonfinite_min_loss_scale": 2.0**-24,
    "max_loss_scale": 64.0,
    "nonfinite_backoff": 0.5,
    "explosion_backoff": 0.8,
    "vanishing_growth": 1.5,
    "growth_interval": 2000,
    "growth_factor": 2.0,
    "loss_scale_history_size": 100,
    "emergency_patience": 5,
    "emergency_threshold_factor": 0.5,
    "emergency_loss_scale_factor": 0.1,
    "emergency_history_size": 32,
    "emergency_hold_steps": 50,
    "emergency_rearm_steps": 400,
    "diagnostics_interval": 500,
    "diagnostics_window": 100,
    "trend_limit": 0.01,
    "variance_limit": 1.0,
    "variance_history_size": 200,
    "event_history_size": 100,
}

# SPEC.md, "Presets", the row of seed(): the original design literally, as
# overrides of the defaults ("median_mad" rule, min_threshold 0.1, loss scaling on).
SEED: dict[str, object] = {
    "min_threshold": 0.1,
    "adaptation_rule": "median_mad",
    "loss_scaling": True,
    "nonfinite_min_loss_scale": 0.1,
    "growth_interval": 0,
    "exact_clip": True,
}

# Ring name -> config field of its size (SPEC.md, "State").
RING_SIZES = {
    "norm_history": "norm_history_size",
    "variance_history": "variance_history_size",
    "loss_scale_history": "loss_scale_history_size",
    "threshold_history": "threshold_history_size",
    "event_flags": "event_history_size",
    "emergency_steps": "emergency_history_size",
    "explosion_norms": "event_history_size",
}

MAD_TO_STD = 1.4826


def f32(x) -> np.float32:
    return np.float32(x)


def config(**overrides) -> dict[str, object]:
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise KeyError(f"unknown config fields {sorted(unknown)}")
    if overrides.get("adaptation_rule", DEFAULTS["adaptation_rule"]) not in (
        "track",
        "percentile",
        "median_mad",
        "mean_std",
    ):
        raise ValueError("the reference does not implement the zscore rule")
    return {**DEFAULTS, **overrides}


def sat(counter: int) -> int:
    """Saturating +1 (SPEC.md, "Counters")."""
    return counter if counter >= INT32_MAX else counter + 1


def clamp(x, lo, hi) -> np.float32:
    return f32(min(max(f32(x), f32(lo)), f32(hi)))


# float32's smallest normal (SPEC.md, "Tracking rule": lnf).
LOG_FLOOR = 2.0**-126


def lnf(x) -> np.float32:
    """``ln(max(x, 2^-126))`` in float32."""
    with np.errstate(divide="ignore"):
        return f32(np.log(f32(max(f32(x), f32(LOG_FLOOR)))))


def push(state: dict, ring: str, item) -> None:
    """SPEC.md, "Ring buffers"."""
    values = state[ring]
    size = len(values)
    values[state[ring + "_index"]] = item
    state[ring + "_index"] = (state[ring + "_index"] + 1) % size
    state[ring + "_count"] = min(state[ring + "_count"] + 1, size)


def history(state: dict) -> list[np.float32]:
    return list(state["norm_history"][: state["norm_history_count"]])


# --- Initial state -----------------------------------------------------------


def init(
    cfg: dict, *, learning_rate=None, initial_threshold=None, stored=None, params=None
) -> dict:
    """SPEC.md, "State" and "Initial threshold" (first match wins).

    ``params``: arrays whose global norm caps the track rule's data start.
    """
    if initial_threshold is not None:
        threshold, warmup = f32(initial_threshold), 0
    elif stored is not None:
        threshold, warmup = clamp(stored, cfg["min_threshold"], cfg["max_threshold"]), 0
    elif learning_rate is not None:
        root = np.sqrt(f32(f32(1.0) / f32(learning_rate)))
        raw = f32(f32(cfg["lr_threshold_scale"]) * root)
        threshold, warmup = clamp(raw, cfg["min_threshold"], cfg["max_threshold"]), 0
    elif cfg["adaptation_rule"] == "track":
        # Data mode under the track rule waits for the first finite, positive
        # norm, capped at param_threshold_scale times the parameters' norm.
        total = f32(0.0)
        for leaf in params or []:
            for x in np.asarray(leaf, np.float32).ravel():
                total = f32(total + f32(x * x))
        cap = f32(f32(cfg["param_threshold_scale"]) * f32(np.sqrt(total)))
        if cfg["param_threshold_scale"] > 0 and np.isfinite(cap) and cap > 0:
            threshold = clamp(cap, cfg["min_threshold"], cfg["max_threshold"])
        else:
            threshold = f32(cfg["max_threshold"])
        warmup = 1
    else:
        threshold, warmup = f32(cfg["min_threshold"]), cfg["warmup_steps"]
    # The track rule starts its centre (and anchor) at lnf(t0); the others
    # leave both at 0.
    centre = lnf(threshold) if cfg["adaptation_rule"] == "track" else f32(0.0)
    # ... and its quantile u at c + ln(explosion_factor) ("Tracking rule").
    quantile = quantile_start(centre, cfg) if cfg["adaptation_rule"] == "track" else f32(0.0)
    state: dict = {
        "stabilizer_step": 0,
        "clip_threshold": threshold,
        "loss_scale": f32(cfg["initial_loss_scale"]),
        "loss_scale_growth_count": 0,
        "warmup_steps_left": warmup,
        "consecutive_explosions": 0,
        "emergency_hold_left": 0,
        "explosion_count": 0,
        "vanishing_count": 0,
        "nonfinite_count": 0,
        "clip_count": 0,
        "emergency_count": 0,
        "warning_count": 0,
        "stable_streak": 0,
        "last_grad_norm": f32(math.nan),
        "last_loss": f32(math.nan),
        "loss_centre": f32(math.nan),
        "loss_reference": f32(math.nan),
        "loss_spread": f32(0.0),
        "norm_trend": f32(0.0),
        "early_warning": False,
        "ema_mean": centre,
        "ema_var": f32(0.0),
        "centre_anchor": centre,
        "norm_quantile": quantile,
    }
    for ring, size_field in RING_SIZES.items():
        size = cfg[size_field]
        zero = 0 if ring in ("event_flags", "emergency_steps") else f32(0.0)
        state[ring] = [zero] * size
        state[ring + "_index"] = 0
        state[ring + "_count"] = 0
    state["loss_scale_history"][0] = f32(cfg["initial_loss_scale"])
    state["loss_scale_history_index"] = 1 % cfg["loss_scale_history_size"]
    state["loss_scale_history_count"] = 1
    return state


# --- Statistics ("Threshold adaptation", "Diagnostics") ----------------------


def percentile(values: list, q: float) -> np.float32:
    a = sorted(f32(v) for v in values)
    m = len(a)
    pos = f32(f32(q / 100.0) * f32(m - 1))
    lo = math.floor(pos)
    hi = min(lo + 1, m - 1)
    frac = f32(pos - f32(lo))
    return f32(a[lo] + f32(frac * f32(a[hi] - a[lo])))


def adaptation_rule(values: list, cfg: dict) -> np.float32:
    rule = cfg["adaptation_rule"]
    if rule == "percentile":
        raw = percentile(values, cfg["adaptation_percentile"])
    elif rule == "median_mad":
        med = percentile(values, 50.0)
        mad = percentile([f32(abs(f32(v - med))) for v in values], 50.0)
        raw = f32(med + f32(f32(cfg["adaptation_k"] * MAD_TO_STD) * mad))
    elif rule == "mean_std":
        m = len(values)
        mean = f32(math.fsum(float(v) for v in values) / m)
        var = f32(math.fsum(float(f32(v - mean)) ** 2 for v in values) / m)
        raw = f32(mean + f32(f32(cfg["adaptation_k"]) * np.sqrt(var)))
    else:
        raise ValueError(rule)
    return clamp(raw, cfg["min_threshold"], cfg["max_threshold"])


def diagnostics(state: dict, cfg: dict) -> tuple[np.float32, np.float32, bool]:
    """(trend, variance, warning) over the last W pushes, oldest first."""
    window = cfg["diagnostics_window"]
    size = len(state["norm_history"])
    index, count = state["norm_history_index"], state["norm_history_count"]
    floor = f32(max(cfg["vanishing_norm"], 1e-30))
    xs, ys, norms = [], [], []
    for j in range(window):
        if j < window - min(count, window):
            continue
        norm = state["norm_history"][(index - window + j) % size]
        xs.append(float(j))
        ys.append(math.log(float(max(norm, floor))))
        norms.append(float(norm))
    n = len(xs)
    if n >= 2:
        xm, ym = math.fsum(xs) / n, math.fsum(ys) / n
        sxx = math.fsum((x - xm) ** 2 for x in xs)
        sxy = math.fsum((x - xm) * (y - ym) for x, y in zip(xs, ys, strict=True))
        trend = sxy / sxx if sxx > 0 else 0.0
    else:
        trend = 0.0
    mean = math.fsum(norms) / max(n, 1)
    variance = math.fsum((v - mean) ** 2 for v in norms) / max(n, 1)
    trend32, var32, mean32 = f32(trend), f32(variance), f32(mean)
    warning = bool(trend32 > f32(cfg["trend_limit"])) or (
        mean32 > 0 and f32(var32 / f32(mean32 * mean32)) > f32(cfg["variance_limit"])
    )
    return trend32, var32, warning


# --- The track rule and the loss gate ("Tracking rule", "Loss gate") ----------


def track_threshold(c, d, cfg: dict) -> np.float32:
    """``threshold(c, d) = clamp(exp(c + k * d))``."""
    with np.errstate(over="ignore"):
        raw = f32(np.exp(f32(c + f32(f32(cfg["track_k"]) * d))))
    return clamp(raw, cfg["min_threshold"], cfg["max_threshold"])


def _loss_above(centre, reference, spread, k, rel) -> bool:
    """``isfinite(centre) and isfinite(reference) and centre > reference + k * u``,
    the unit ``u = max(spread, rel * |reference|)``."""
    if not (np.isfinite(centre) and np.isfinite(reference)):
        return False
    share = f32(f32(rel) * f32(abs(reference)))
    unit = spread if spread >= share else share
    # inf * 0 is NaN (k = inf, a zero unit): never above it.
    return bool(centre > f32(reference + f32(f32(k) * unit)))


def loss_rising(centre, reference, spread, cfg: dict) -> bool:
    """The loss gate is closed: the loss centre above reference + track_loss_k * u."""
    return _loss_above(centre, reference, spread, cfg["track_loss_k"], cfg["track_loss_rel"])


def loss_climbing(centre, reference, spread, cfg: dict) -> bool:
    """``rising`` with track_loss_cut_k in place of track_loss_k (the explosion cut)."""
    return _loss_above(centre, reference, spread, cfg["track_loss_cut_k"], cfg["track_loss_rel"])


def track_adapt(c, d, anchor, n, *, hold: bool, climbing: bool, high: bool, cfg: dict):
    """(c', d') of a finite step after the start ("Tracking rule", "Adaptation")."""
    r = f32(cfg["track_rate"])
    # The bounds: computed in float64, rounded to float32.
    lo = f32(-cfg["track_max_fall"] / cfg["track_rate"])
    hi = f32(cfg["track_max_rise"] / cfg["track_rate"])
    e = f32(min(max(f32(lnf(n) - c), lo), hi))
    # A hold: no rise, and a fall only past the spread on entry (d).
    step = f32(min(f32(e + d), f32(0.0))) if hold else e
    c1 = f32(c + f32(r * step))
    d_new = f32(d + f32(r * f32(abs(e) - d)))
    # An explosion in progress: the loss climbing (track_loss_cut_k) and a norm
    # over explosion_factor * t (in the quantile u or not).
    if climbing and high:
        down = f32(c - f32(cfg["track_max_fall"]))
        floor = f32(anchor - f32(np.log(f32(cfg["track_max_cut"]))))
        c1 = f32(max(min(c1, down), min(floor, c)))
    return c1, d_new


def quantile_start(c, cfg: dict):
    """``u = c + ln(explosion_factor)`` at the tracker's start (``c`` for an infinite factor)."""
    if math.isinf(cfg["explosion_factor"]):
        return c
    return f32(c + f32(np.log(f32(cfg["explosion_factor"]))))


def uses_quantile(cfg: dict) -> bool:
    """Whether the track rule's explosions also need ``lnf(n) > u``."""
    return cfg["track_quantile"] > 0 and not math.isinf(cfg["explosion_factor"])


def quantile_step(u, above: bool, cfg: dict):
    """``u + rate * q`` after a log-norm above u, else ``u - rate * (1 - q)``;
    each step computed in float64 and rounded to float32 once."""
    rate, q = cfg["track_quantile_rate"], cfg["track_quantile"]
    return f32(u + f32(rate * q)) if above else f32(u - f32(rate * (1.0 - q)))


def learning_steps(cfg: dict) -> int:
    """``N = min(round(1 / r), 2^31 - 1)``, Python's round (half to even)."""
    return min(round(1.0 / cfg["track_rate"]), INT32_MAX)


def loss_gate(st: dict, v, *, calm: bool, cfg: dict) -> tuple:
    """(loss_centre', loss_reference', loss_spread') from the state on entry ("Loss gate")."""
    centre, reference, spread = st["loss_centre"], st["loss_reference"], st["loss_spread"]
    if not np.isfinite(v):
        return centre, reference, spread
    if not np.isfinite(centre):
        return v, v, f32(0.0)
    r = f32(cfg["track_rate"])
    count = st["stabilizer_step"]
    gate_open = not loss_rising(centre, reference, spread, cfg)
    early = count < learning_steps(cfg)
    # a = max(r, 1 / (stabilizer_step + 1)) in float32: running means at first.
    a = f32(max(r, f32(f32(1.0) / f32(f32(count) + f32(1.0)))))
    # B = max(3 * spread, 0.001 * |centre|), Bc = max(10 * spread, b * |centre|),
    # b = max(10 * track_loss_rel, 0.001) rounded once to float32.
    floor = f32(f32(0.001) * f32(abs(centre)))
    bound = f32(max(f32(f32(3.0) * spread), floor))
    share = f32(max(10.0 * cfg["track_loss_rel"], 0.001))
    centre_bound = f32(max(f32(f32(10.0) * spread), f32(share * f32(abs(centre)))))
    # Early, with e = max(b, 1): max(10 * spread, e * |centre|) bounds the
    # running mean and max(3 * spread, e * |centre|) the deviation, unless the
    # level is 0 with no spread.
    scaled = centre != 0.0 or spread > 0.0
    early_share = f32(f32(max(10.0 * cfg["track_loss_rel"], 0.001, 1.0)) * f32(abs(centre)))
    early_bound = f32(max(f32(f32(10.0) * spread), early_share))
    diff = f32(v - centre)
    if early:
        step = f32(min(max(diff, f32(-early_bound)), early_bound)) if scaled else diff
        new_centre = f32(centre + f32(a * step))
    else:
        clipped = f32(min(max(diff, f32(-centre_bound)), centre_bound))
        new_centre = f32(centre + f32(r * clipped))
    gap = f32(new_centre - reference)
    # Every step moves the reference: at a early, at r for a calm fall,
    # at track_loss_rise_rate otherwise (a rise, or a step that is not calm).
    if early:
        b = a
    elif calm and gap <= 0:
        b = r
    else:
        b = f32(cfg["track_loss_rise_rate"])
    reference = f32(reference + f32(b * gap))
    dev = f32(abs(diff))
    if not early:
        dev = f32(min(dev, bound))
    elif scaled:
        dev = f32(min(dev, f32(max(f32(f32(3.0) * spread), early_share))))
    if (gate_open and calm) or early:
        rate = a if early else r
        spread = f32(spread + f32(rate * f32(dev - spread)))
    return new_centre, reference, spread


# --- One step ("Per-step order") ---------------------------------------------


def _compute(x, dtype: str):
    # promote(dtype(x), f32): float16 and float32 leaves are computed in float32.
    if dtype not in ("float16", "float32"):
        raise ValueError(dtype)
    return f32(x)


def _cast(x, dtype: str):
    return np.float16(x) if dtype == "float16" else f32(x)


def step(state: dict, leaves: list[list[float]], dtypes: list[str], cfg: dict, value=None):
    """Returns (output leaves as lists of floats, new state); ``state`` is not modified."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _step(state, leaves, dtypes, cfg, value)


def _step(state, leaves, dtypes, cfg, value):
    st = {k: (list(v) if isinstance(v, list) else v) for k, v in state.items()}
    s = st["loss_scale"]

    # 1. Global norm: per-leaf float32 sums of float32 squares, in order, from 0.
    q = f32(0.0)
    for leaf in leaves:
        leaf_sum = f32(0.0)
        for x in leaf:
            x32 = f32(x)
            leaf_sum = f32(leaf_sum + f32(x32 * x32))
        q = f32(q + leaf_sum)
    r = np.sqrt(q)
    n = f32(r / s)
    finite = bool(np.isfinite(n))

    track = cfg["adaptation_rule"] == "track"
    # The loss gate of the state on entry ("Loss gate"), read by the track rule.
    rising = loss_rising(st["loss_centre"], st["loss_reference"], st["loss_spread"], cfg)
    climbing = loss_climbing(st["loss_centre"], st["loss_reference"], st["loss_spread"], cfg)

    # 2. Threshold ("Warm-up threshold"; "Tracking rule": the waiting rule).
    if track:
        if st["warmup_steps_left"] > 0 and finite:
            # Clipped only above the parameters' cap, which clip_threshold holds.
            t = f32(min(clamp(n, cfg["min_threshold"], cfg["max_threshold"]), st["clip_threshold"]))
        else:
            t = st["clip_threshold"]
    elif st["warmup_steps_left"] > 0:
        hist = history(st)
        if hist:
            t = clamp(
                f32(f32(cfg["warmup_multiplier"]) * percentile(hist, 50.0)),
                cfg["min_threshold"],
                cfg["max_threshold"],
            )
        elif finite:
            t = clamp(n, cfg["min_threshold"], cfg["max_threshold"])
        else:
            t = st["clip_threshold"]
    else:
        t = st["clip_threshold"]

    # 3. Classification. "Tracking rule": during an emergency's hold,
    # explosions are measured against t with the emergency's cut undone.
    t_explosion = t
    if track and st["emergency_hold_left"] > 0:
        t_explosion = f32(t / f32(cfg["emergency_threshold_factor"]))
    nonfinite = not finite
    # "high": over explosion_factor times the threshold. Under the track rule
    # an explosion is also above the quantile u of the state on entry.
    high = finite and bool(n > f32(f32(cfg["explosion_factor"]) * t_explosion))
    above = track and uses_quantile(cfg) and bool(lnf(n) > st["norm_quantile"])
    explosion = high and (above if track and uses_quantile(cfg) else True)
    vanishing = finite and not explosion and bool(n < f32(cfg["vanishing_norm"]))
    clipped = finite and bool(n > t)

    # 4. Output.
    inv_s = f32(f32(1.0) / s)
    out = []
    for leaf, dtype in zip(leaves, dtypes, strict=True):
        new_leaf = []
        for x in leaf:
            xc = _compute(x, dtype)
            if nonfinite:
                y = f32(0.0)
            elif clipped and cfg["exact_clip"]:
                y = f32(f32(xc / r) * t)
            elif clipped:
                y = f32(xc * f32(t / r))
            elif cfg["loss_scaling"]:
                y = f32(xc * inv_s)
            else:
                y = xc
            new_leaf.append(float(_cast(y, dtype)))
        out.append(new_leaf)

    # 5. Loss scale rule.
    s_new = s
    if cfg["loss_scaling"]:
        if nonfinite:
            factor = cfg["nonfinite_backoff"]
        elif explosion:
            factor = cfg["explosion_backoff"]
        elif vanishing:
            factor = cfg["vanishing_growth"]
        else:
            factor = 1.0
        s_new = f32(s * f32(factor))
        st["loss_scale_growth_count"] = 0 if nonfinite else sat(st["loss_scale_growth_count"])
        if cfg["growth_interval"] > 0 and st["loss_scale_growth_count"] >= cfg["growth_interval"]:
            s_new = f32(s_new * f32(cfg["growth_factor"]))
            st["loss_scale_growth_count"] = 0
        if not np.isfinite(s_new):
            s_new = s
        # Only a non-finite step takes the scale under min_loss_scale (down to
        # nonfinite_min_loss_scale); no other step lowers it further or lifts it back.
        if nonfinite:
            floor = f32(min(cfg["nonfinite_min_loss_scale"], cfg["min_loss_scale"]))
        else:
            floor = min(f32(cfg["min_loss_scale"]), s)
        s_new = f32(min(max(s_new, floor), f32(cfg["max_loss_scale"])))

    # 6. History.
    if finite and not explosion:
        push(st, "norm_history", n)

    # 7. Adaptation ("Tracking rule", "Adaptation", replaces it for track).
    step_next = sat(st["stabilizer_step"])
    left = st["warmup_steps_left"]
    if track:
        waiting = left > 0
        # Only a finite, positive norm starts the tracker: a zero norm (an
        # all-zero gradient) has no level to start from and keeps waiting.
        started = waiting and finite and bool(n > 0)
        c, d = st["ema_mean"], st["ema_var"]
        if started:
            # The first finite, positive norm starts the tracker.
            c, d = lnf(f32(min(n, st["clip_threshold"]))), f32(0.0)
            t_new = track_threshold(c, d, cfg)
        elif finite and not waiting:
            hold = st["emergency_hold_left"] > 0 or rising
            c, d = track_adapt(
                c,
                d,
                st["centre_anchor"],
                n,
                hold=hold,
                climbing=climbing,
                high=high,
                cfg=cfg,
            )
            t_new = track_threshold(c, d, cfg)
        else:
            # A non-finite step (or a zero norm while waiting) changes neither c nor
            # d, nor the threshold (while waiting: the parameters' cap).
            t_new = st["clip_threshold"]
        if started or (not rising and finite and not high):
            st["centre_anchor"] = c
        if uses_quantile(cfg):
            if started:
                st["norm_quantile"] = quantile_start(c, cfg)
            elif finite and not waiting:
                st["norm_quantile"] = quantile_step(st["norm_quantile"], above, cfg)
        left_next = 1 if (waiting and not started) else 0
        adapted = started or (
            cfg["adaptation_interval"] > 0
            and step_next % cfg["adaptation_interval"] == 0
            and not waiting
        )
    else:
        left_next = max(left - 1, 0)
        periodic = (
            cfg["adaptation_interval"] > 0
            and step_next % cfg["adaptation_interval"] == 0
            and left_next == 0
        )
        adapted = st["norm_history_count"] > 0 and (left == 1 or periodic)
        t_new = adaptation_rule(history(st), cfg) if adapted else t

    # 8. Emergency intervention ("Tracking rule", "Emergency", for track).
    if nonfinite or explosion:
        st["consecutive_explosions"] = sat(st["consecutive_explosions"])
    else:
        st["consecutive_explosions"] = 0
    if track:
        size = cfg["emergency_history_size"]
        newest = st["emergency_steps"][(st["emergency_steps_index"] - 1) % size]
        armed = (
            st["emergency_steps_count"] == 0
            or st["stabilizer_step"] - newest >= cfg["emergency_rearm_steps"]
        )
        emergency = (
            cfg["emergency_patience"] > 0
            and armed
            and st["consecutive_explosions"] == cfg["emergency_patience"]
        )
        if emergency:
            c = f32(c + f32(np.log(f32(cfg["emergency_threshold_factor"]))))
            t_new = track_threshold(c, d, cfg)
            st["emergency_hold_left"] = cfg["emergency_hold_steps"]
        else:
            # Whatever emergency_patience (also 0): the hold counts down.
            st["emergency_hold_left"] = max(st["emergency_hold_left"] - 1, 0)
        st["ema_mean"], st["ema_var"] = c, d
    else:
        emergency = (
            cfg["emergency_patience"] > 0
            and st["consecutive_explosions"] >= cfg["emergency_patience"]
        )
        if emergency:
            t_new = f32(
                max(f32(t_new * f32(cfg["emergency_threshold_factor"])), f32(cfg["min_threshold"]))
            )
            st["consecutive_explosions"] = 0
    if emergency:
        if cfg["loss_scaling"]:
            s_new = f32(
                max(
                    f32(s_new * f32(cfg["emergency_loss_scale_factor"])),
                    min(f32(cfg["min_loss_scale"]), s_new),
                )
            )
        st["emergency_count"] = sat(st["emergency_count"])
        push(st, "emergency_steps", st["stabilizer_step"])

    # 9. Diagnostics.
    warned = False
    if (
        cfg["diagnostics_interval"] > 0
        and step_next % cfg["diagnostics_interval"] == 0
        and st["norm_history_count"] >= 2
    ):
        trend, variance, warning = diagnostics(st, cfg)
        push(st, "variance_history", variance)
        st["norm_trend"] = trend
        st["early_warning"] = warning
        if warning:
            warned = True
            st["warning_count"] = sat(st["warning_count"])

    # 10. Records.
    if adapted or emergency:
        push(st, "threshold_history", t_new)
    if s_new != s:
        push(st, "loss_scale_history", s_new)
    flags = (
        1 * clipped
        + 2 * explosion
        + 4 * vanishing
        + 8 * nonfinite
        + 16 * emergency
        + 32 * adapted
        + 64 * warned
    )
    push(st, "event_flags", int(flags))
    if explosion:
        push(st, "explosion_norms", n)
        st["explosion_count"] = sat(st["explosion_count"])
    if vanishing:
        st["vanishing_count"] = sat(st["vanishing_count"])
    if nonfinite:
        st["nonfinite_count"] = sat(st["nonfinite_count"])
    if clipped:
        st["clip_count"] = sat(st["clip_count"])
    st["stable_streak"] = 0 if (nonfinite or explosion) else sat(st["stable_streak"])
    # The loss gate's levels move under every rule, from the state on entry
    # (the fields read here are not touched above).
    v = f32(math.nan) if value is None else f32(value)
    st["loss_centre"], st["loss_reference"], st["loss_spread"] = loss_gate(
        st, v, calm=finite and not explosion, cfg=cfg
    )
    # "Tracking rule", "Emergency": the emergency takes the loss centre as the
    # new reference; so does each track_accept_steps-th explosion of a run.
    run = st["consecutive_explosions"]
    every = cfg["track_accept_steps"]
    accept = emergency or (every > 0 and run > 0 and run % every == 0)
    if track and accept and np.isfinite(st["loss_centre"]):
        st["loss_reference"] = st["loss_centre"]
    st["last_grad_norm"] = n
    if value is not None:
        st["last_loss"] = f32(value)
    st["warmup_steps_left"] = left_next
    st["stabilizer_step"] = step_next
    st["clip_threshold"] = t_new
    st["loss_scale"] = s_new
    return out, st
