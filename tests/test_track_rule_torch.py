"""Properties of the default ``track`` rule, on the PyTorch side (``optax_gradflow.torch``).

Each test drives the functional ``update`` with a single one-element gradient
whose global norm is chosen exactly (``[n]`` has norm ``|n|``), and derives
what it expects from SPEC.md, "Tracking rule" and "Loss gate".

The property tests run the default config, whatever its rates: ``r =
track_rate``, ``RISE = track_max_rise``, ``FALL = track_max_fall`` and
``HOLD = emergency_hold_steps`` below (``e`` is clipped to ``[-FALL / r,
RISE / r]``), with ``track_k = 1``, ``explosion_factor = 3``,
``emergency_patience = 5``, ``emergency_threshold_factor = 0.5``,
``emergency_rearm_steps = 400``, ``track_max_cut = 10``; their comments give
the numbers of the defaults of this writing (``RISE = 0.02``, ``FALL = 0.1``,
``HOLD = 50``). The exact checks pin every constant they use in ``HAND``
(``r = 0.05``, ``RISE = 0.02``, ``FALL = 0.05``, so ``e`` in ``[-1, 0.4]``;
loss reference rise rate 0.005, ``track_loss_k = 1``, ``track_loss_cut_k =
1.5``, a 100-step hold, ...), so that the numbers in their comments hold
whatever the defaults become.

The norms are lognormal around 1 (sigma 0.3, fixed seeds): with ``k = 1`` the
threshold settles near ``exp(median + mean |e|)``, about 1.2 x the median.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from _helpers import CUT_EMERGENCY_STEP, INJECTED_STEPS, LOUD_STEPS, injected_norms

from optax_gradflow.report import build_report

torch = pytest.importorskip("torch")

import optax_gradflow.torch as ogt  # noqa: E402
from optax_gradflow import arithmetic  # noqa: E402
from optax_gradflow.config import StabilizerConfig  # noqa: E402
from optax_gradflow.torch.functional import TorchOps  # noqa: E402

CPU_OPS = TorchOps(torch.device("cpu"))

F32 = np.float32
DEFAULT = StabilizerConfig()
R, RISE, FALL = DEFAULT.track_rate, DEFAULT.track_max_rise, DEFAULT.track_max_fall
HOLD = DEFAULT.emergency_hold_steps
LN2 = math.log(2.0)
# The exact checks: every constant they use pinned, the rest default.
HAND = StabilizerConfig(
    track_rate=0.05,
    track_max_rise=0.02,
    track_max_fall=0.05,
    track_k=1.0,
    track_loss_k=1.0,
    track_loss_cut_k=1.5,
    track_loss_rise_rate=0.005,
    track_loss_rel=0.2,
    track_max_cut=10.0,
    explosion_factor=3.0,
    emergency_patience=5,
    emergency_threshold_factor=0.5,
    emergency_hold_steps=100,
    emergency_rearm_steps=400,
)


def _flag(state) -> int:
    ring = state["event_flags"]
    return int(ring[(int(state["event_flags_index"]) - 1) % len(ring)])


def _noise(seed: int, steps: int, sigma: float = 0.3) -> np.ndarray:
    return np.exp(np.random.default_rng(seed).normal(0.0, sigma, steps)).astype(np.float32)


class Trace:
    """Per step: the norm fed, the threshold the step clipped at, the output
    norm, the flags and the state after the step."""

    def __init__(self):
        self.norms: list[float] = []
        self.used: list[float] = []  # the threshold of the step (the state's on entry)
        self.out: list[float] = []
        self.flags: list[int] = []
        self.after: list[dict] = []

    def threshold(self, k: int) -> float:
        return float(self.after[k]["clip_threshold"])

    def count(self, bit: int, start: int = 0, stop: int | None = None) -> int:
        return sum(1 for f in self.flags[start:stop] if f & bit)


def _drive(norms, *, config=DEFAULT, values=None, state=None, trace=None, **init):
    """Feeds gradients ``[n]`` (float32) to ``ogt.update``; returns (state, trace)."""
    if state is None:
        state = ogt.init_state(config=config, **init)
    trace = trace or Trace()
    for k, n in enumerate(norms):
        value = None if values is None else values[k] if isinstance(values, list) else values
        used = float(state["clip_threshold"])
        out, state = ogt.update(
            [torch.tensor([n], dtype=torch.float32)], state, value=value, config=config
        )
        trace.norms.append(float(n))
        trace.used.append(used)
        trace.out.append(float(out[0].abs().sum()))
        trace.flags.append(_flag(state))
        trace.after.append({name: state[name].clone() for name in ogt.FIELDS})
    return state, trace


def _median_last(trace: Trace, n: int = 100) -> float:
    return float(np.median(trace.norms[-n:]))


def _ratio(trace: Trace) -> float:
    return trace.threshold(len(trace.norms) - 1) / _median_last(trace)


# --- A start 100x off ------------------------------------------------------------


@pytest.mark.parametrize("start", [0.01, 100.0], ids=["100x-below", "100x-above"])
@pytest.mark.parametrize("value", [None, 1.0], ids=["no-loss", "steady-loss"])
def test_a_start_100x_off_is_overruled_within_400_steps(start, value):
    # Below: every step explodes (n ~ 1 > 3 * 0.01); e = RISE / r, the centre
    # rises RISE per step; the 5th fires the one emergency (c - ln 2, a
    # HOLD-step hold), then the centre climbs at RISE a step, its spread d
    # near RISE / r: t = exp(c + d) reaches 0.3 x the median when c + d ~
    # ln 0.3, i.e. after 5 + HOLD + (ln(0.3 / 0.01) + ln 2 - 5 RISE - RISE / r)
    # / RISE steps: 55 + 180 with RISE = 0.02 and HOLD = 50: < 400.
    # Above: n / t ~ 0.01, e = -FALL / r, the centre falls FALL per step:
    # ln(100) / FALL steps (46 with 0.1). A steady loss (v = 1 every step)
    # keeps centre = reference, spread 0: the gate stays open.
    norms = _noise(seed=0, steps=400)
    _, trace = _drive(norms, initial_threshold=start, values=value)
    assert 0.3 <= _ratio(trace) <= 3.0, _ratio(trace)
    assert trace.count(16) <= 1


# --- A single spike ----------------------------------------------------------------


def test_a_single_x100_spike_is_clipped_and_barely_moves_the_threshold():
    norms = _noise(seed=1, steps=200)
    norms[150] *= 100.0
    _, trace = _drive(norms)
    # Clipped to the step's threshold, (x / n) * t, and an explosion (n > 3 t).
    assert trace.flags[150] & 1 and trace.flags[150] & 2
    assert trace.out[150] == pytest.approx(trace.used[150], rel=1e-6)
    # e is clipped at RISE / r: c moves by RISE, d by r (RISE / r - d) <= RISE,
    # so t' / t <= exp(2 RISE) (1.04 with RISE = 0.02), far under the 25%.
    # No loss is given: the gate never closes.
    before, after = trace.threshold(149), trace.threshold(150)
    assert abs(after / before - 1.0) < 0.25
    assert after / before <= math.exp(2 * RISE) * (1 + 1e-6)
    # And it stays out of the norm history.
    assert int(trace.after[150]["norm_history_count"]) == int(
        trace.after[149]["norm_history_count"]
    )


# --- Lasting level shifts -------------------------------------------------------------


def test_a_lasting_x10_rise_with_a_steady_loss_costs_one_emergency():
    calm = _noise(seed=2, steps=200)
    high = _noise(seed=3, steps=400) * F32(10.0)
    _, trace = _drive(np.concatenate([calm, high]), values=1.0)
    median_before = float(np.median(calm[-100:]))
    # The first five x10 steps explode; the fifth fires (c - ln 2, a hold of
    # HOLD steps).
    # The run of explosions stays unbroken until the centre has caught up, so
    # the emergency fires once (== patience, not >=), and it is not re-armed
    # before 400 steps anyway.
    assert trace.count(16) == 1
    fire = trace.flags.index(next(f for f in trace.flags if f & 16))
    assert fire == 204
    assert int(trace.after[fire]["emergency_hold_left"]) == HOLD
    # The hold: the centre does not rise for the next HOLD steps.
    centres = [float(trace.after[k]["ema_mean"]) for k in range(fire, fire + HOLD + 1)]
    assert max(centres) == centres[0]
    # Never under 0.3 x the old median: one cut by 1/2 from ~1.25 x.
    assert min(trace.threshold(k) for k in range(600)) >= 0.3 * median_before
    # Absorbed within 400 steps: within [0.3, 3] x the new median.
    assert 0.3 <= _ratio(trace) <= 3.0


def test_a_lasting_x10_fall_is_followed_within_400_steps():
    calm = _noise(seed=4, steps=200)
    low = _noise(seed=5, steps=400) * F32(0.1)
    _, trace = _drive(np.concatenate([calm, low]), values=1.0)
    # n / t ~ 0.08 after the fall: e = -FALL / r, the centre falls FALL per
    # step: ln(10) / FALL steps (23 with 0.1); no explosion.
    assert trace.count(16) == 0 and trace.count(2, 200) == 0
    assert 0.3 <= _ratio(trace) <= 3.0
    assert 0.3 <= trace.threshold(300) / float(np.median(low[:100])) <= 3.0


def test_eleven_injected_batches_are_eleven_explosions():
    # The construction and its derivation: _helpers.injected_norms. The loud
    # norms during the emergency's hold are clipped at the cut threshold but
    # measured against the threshold before the cut.
    state, trace = _drive(injected_norms(), learning_rate=1e-2)
    assert [k for k, f in enumerate(trace.flags) if f & 2] == list(INJECTED_STEPS)
    assert [k for k, f in enumerate(trace.flags) if f & 16] == [CUT_EMERGENCY_STEP]
    held = [k for k in LOUD_STEPS if CUT_EMERGENCY_STEP < k <= CUT_EMERGENCY_STEP + HOLD]
    assert held and all(trace.flags[k] & 1 for k in held)
    total = build_report({k: v.numpy() for k, v in state.items()}).total
    assert (total.explosions, total.emergencies) == (11, 1)


# --- Scale invariance ---------------------------------------------------------------


def test_scaling_every_gradient_changes_neither_clip_rate_nor_threshold_ratio():
    # Everything is in ratios of norms (SPEC.md, "Tracking rule"): with a data
    # start, ln(c n) - ln(c m) = ln n - ln m, so the same steps clip and t / n
    # is the same, up to float32 rounding of the logarithms.
    norms = _noise(seed=6, steps=500)
    norms[250] *= 100.0
    runs = {}
    for c in (1.0, 1e-3, 1e3):
        _, trace = _drive(norms.astype(np.float64) * c)
        ratios = [trace.threshold(k) / (c * float(norms[k])) for k in range(100, 500)]
        runs[c] = (trace.count(1, 100), np.array(ratios), trace.flags[100:])
    base_rate, base_ratios, base_flags = runs[1.0]
    assert 0 < base_rate < 400
    for c in (1e-3, 1e3):
        rate, ratios, flags = runs[c]
        assert rate == base_rate, c
        assert flags == base_flags, c
        np.testing.assert_allclose(ratios, base_ratios, rtol=1e-4, err_msg=str(c))


# --- Data mode ------------------------------------------------------------------------


def test_data_mode_first_norm_unclipped_then_every_step_clipped_from_data():
    norms = np.concatenate([[np.nan, np.inf], _noise(seed=7, steps=60) * F32(40.0)])
    norms[30] *= 50.0
    _, trace = _drive(norms)
    # Non-finite steps while waiting: skipped, the placeholder, still waiting.
    assert trace.flags[:2] == [8, 8]
    assert [int(trace.after[k]["warmup_steps_left"]) for k in range(3)] == [1, 1, 0]
    # The first finite norm: t = clamp(n), not clipped; c = ln n, d = 0, so
    # t' = exp(ln n) = n (to float32 rounding) and the adapted flag.
    first = float(norms[2])
    assert trace.flags[2] == 32 and trace.out[2] == pytest.approx(first, rel=1e-7)
    assert trace.threshold(2) == pytest.approx(first, rel=1e-6)
    # Every later step is clipped at a threshold from the data (the state's
    # clip_threshold, never the placeholder 1e-30): exactly when n > t, and
    # to norm t; t stays within the range the data span.
    for k in range(3, len(norms)):
        t, n = trace.used[k], float(norms[k])
        assert min(norms[2 : k + 1]) / 3.0 < t < 3.0 * max(norms[2:k]), k
        if n > t:
            assert trace.flags[k] & 1 and trace.out[k] == pytest.approx(t, rel=1e-6), k
        else:
            assert not trace.flags[k] & 1 and trace.out[k] == pytest.approx(n, rel=1e-7), k


# --- Exact values, by hand ------------------------------------------------------------


def test_first_steps_by_hand():
    # initial_threshold = 1: c0 = ln 1 = 0, d0 = 0, anchor 0. No loss given.
    # Step 0, n = 2 (> t = 1: clipped; < 3: no explosion):
    #   e = clip(ln 2 - 0, -1, 0.4) = 0.4 (ln 2 = 0.6931)
    #   c1 = 0 + 0.05 * 0.4 = 0.02;  d1 = 0 + 0.05 * (0.4 - 0) = 0.02
    #   t1 = exp(0.02 + 1 * 0.02) = exp(0.04) = 1.040811
    # Step 1, n = 0.5: e = ln 0.5 - 0.02 = -0.713147 (inside [-1, 0.4])
    #   c2 = 0.02 - 0.05 * 0.713147 = -0.015657
    #   d2 = 0.02 + 0.05 * (0.713147 - 0.02) = 0.054657
    #   t2 = exp(0.039000) = 1.039770
    # Step 2, n = e^-2: e = clip(-2 + 0.015657) = -1 (the fall bound)
    #   c3 = -0.015657 - 0.05 = -0.065657
    #   d3 = 0.054657 + 0.05 * (1 - 0.054657) = 0.101924
    #   t3 = exp(0.036267) = 1.036933
    # Step 3, n = 10 > 3 * 1.036933: an explosion; e = clip(2.368...) = 0.4
    #   c4 = -0.065657 + 0.02 = -0.045657
    #   d4 = 0.101924 + 0.05 * (0.4 - 0.101924) = 0.116828
    #   t4 = exp(0.071171) = 1.073765
    norms = [2.0, 0.5, math.exp(-2.0), 10.0]
    _, trace = _drive(norms, config=HAND, initial_threshold=1.0)
    expected = [
        (0.02, 0.02, 1.040811, 1),
        (-0.015657, 0.054657, 1.039770, 0),
        (-0.065657, 0.101924, 1.036933, 0),
        (-0.045657, 0.116828, 1.073765, 3),
    ]
    for k, (c, d, t, flags) in enumerate(expected):
        after = trace.after[k]
        assert float(after["ema_mean"]) == pytest.approx(c, abs=2e-6), k
        assert float(after["ema_var"]) == pytest.approx(d, abs=2e-6), k
        assert float(after["clip_threshold"]) == pytest.approx(t, abs=2e-6), k
        # No loss: the gate stays open; the anchor follows the centre on
        # calm steps and stays put on the explosion (step 3): c3.
        anchor = expected[2][0] if flags & 2 else c
        assert float(after["centre_anchor"]) == pytest.approx(anchor, abs=2e-6), k
        assert trace.flags[k] == flags, k
    # The same numbers from the formulas, in float64 (a check of the comment).
    c, d = 0.0, 0.0
    for k, n in enumerate(norms):
        e = min(max(math.log(n) - c, -0.05 / 0.05), 0.02 / 0.05)
        c, d = c + 0.05 * e, d + 0.05 * (abs(e) - d)
        assert math.exp(c + d) == pytest.approx(expected[k][2], abs=2e-6)


def test_emergency_by_hand():
    # initial_threshold = 1; five norms of 100: explosions, e = 0.4 each, so
    # c5 = 5 * 0.02 = 0.1 and d_k = 0.4 (1 - 0.95^k): d5 = 0.090488.
    # The fifth (step 4, consecutive_explosions == 5) fires: the anchor
    # stays 0 (explosions never move it), c' = 0.1 + ln 0.5 = -0.593147,
    # t' = exp(-0.593147 + 0.090488) = exp(-0.502660) = 0.604920, hold 100.
    # Step 5 (still exploding): consecutive 6, no second emergency; the hold
    # keeps the centre from rising (c stays), d5 -> d6 = 0.105963.
    state, trace = _drive([100.0] * 6, config=HAND, initial_threshold=1.0)
    fired = trace.after[4]
    assert trace.flags[4] == 1 + 2 + 16
    # Explosions never move the anchor: it is still the start, ln 1 = 0.
    assert float(fired["centre_anchor"]) == 0.0
    assert float(fired["ema_mean"]) == pytest.approx(0.1 - LN2, abs=2e-6)
    assert float(fired["ema_var"]) == pytest.approx(0.4 * (1 - 0.95**5), abs=2e-6)
    assert float(fired["clip_threshold"]) == pytest.approx(0.604920, rel=1e-5)
    assert int(fired["emergency_hold_left"]) == 100
    assert int(fired["consecutive_explosions"]) == 5
    assert trace.flags[5] == 1 + 2
    assert int(state["consecutive_explosions"]) == 6 and int(state["emergency_count"]) == 1
    assert float(state["ema_mean"]) == float(fired["ema_mean"])
    assert float(state["ema_var"]) == pytest.approx(0.4 * (1 - 0.95**6), abs=2e-6)
    assert int(state["emergency_hold_left"]) == 99


def _late_state(**fields) -> dict:
    """A fresh HAND state (initial_threshold 1: c = anchor = 0, d = 0) after the
    loss gate's first N = round(1 / 0.05) = 20 steps (stabilizer_step 20: not
    early, so the bounded-influence rules of "Loss gate" apply), edited."""
    state = ogt.init_state(initial_threshold=1.0, config=HAND)
    state["stabilizer_step"] = torch.tensor(20, dtype=torch.int32)
    for name, value in fields.items():
        state[name] = torch.tensor(value, dtype=state[name].dtype)
    return state


def _gate_state(centre: float, anchor: float, spread: float = 0.1) -> dict:
    # Loss centre 2, reference 1: with spread 0.1 the unit is max(0.1, 0.2 *
    # |1|) = 0.2, so the gate is closed (rising: 2 > 1 + 1 * 0.2) and the loss
    # climbing (2 > 1 + 1.5 * 0.2 = 1.3).
    return _late_state(
        ema_mean=centre,
        centre_anchor=anchor,
        loss_centre=2.0,
        loss_reference=1.0,
        loss_spread=spread,
    )


@pytest.mark.parametrize(
    "centre, expected",
    [
        # Explosion in progress (the loss climbing, n = 1e4 explodes against
        # t = 1): e = 0.4, c1 = c + 0.05 * min(e + d, 0) = c (hold, d = 0), then
        # c' = max(min(c1, c - 0.05), min(anchor - ln 10, c)), anchor = 0.
        (0.0, -0.05),  # max(-0.05, -2.302585): the full fall rate
        (-2.28, -2.302585),  # max(-2.33, -2.302585): stopped at the bound
        (-3.0, -3.0),  # max(-3.05, min(-2.302585, -3)): below the bound, not raised
    ],
)
def test_an_explosion_in_progress_is_cut_within_track_max_cut(centre, expected):
    state = _gate_state(centre, anchor=0.0)
    _, state = ogt.update([torch.tensor([1e4])], state, value=5.0, config=HAND)
    assert _flag(state) & 2
    assert float(state["ema_mean"]) == pytest.approx(expected, abs=2e-6)
    # The gate was closed on entry: the anchor stays.
    assert float(state["centre_anchor"]) == 0.0
    # Not calm: the spread stays. The centre moves by a bounded step: Bc =
    # max(10 * 0.1, 10 * 0.2 * 2) = 4, so 2 + 0.05 * clip(5 - 2, -4, 4) = 2.15.
    # The reference moves too, at the rise rate (not calm): gap = 2.15 - 1 =
    # 1.15, reference = 1 + 0.005 * 1.15 = 1.00575.
    assert float(state["loss_spread"]) == F32(0.1)
    assert float(state["loss_centre"]) == pytest.approx(2.15, rel=1e-6)
    assert float(state["loss_reference"]) == pytest.approx(1.00575, rel=1e-6)


def test_an_explosion_with_a_loss_rising_but_not_climbing_is_only_held():
    # Spread 0.8: rising (2 > 1 + 1 * 0.8 = 1.8) but not climbing (2 > 1 +
    # 1.5 * 0.8 = 2.2 is false). n = 1e4 explodes: e = 0.4, the hold gives
    # c' = c + 0.05 * min(0.4 + 0, 0) = c = -1 (d = 0), and no cut; d' = 0 + 0.05 * 0.4 =
    # 0.02; t' = exp(-1 + 0.02). The anchor stays (rising).
    state = _gate_state(-1.0, anchor=0.5, spread=0.8)
    _, state = ogt.update([torch.tensor([1e4])], state, value=2.0, config=HAND)
    assert _flag(state) & 2
    assert float(state["ema_mean"]) == -1.0
    assert float(state["ema_var"]) == pytest.approx(0.02, rel=1e-6)
    assert float(state["clip_threshold"]) == pytest.approx(math.exp(-0.98), rel=1e-6)
    assert float(state["centre_anchor"]) == 0.5


def test_a_calm_step_with_the_gate_closed_does_not_raise_the_centre():
    # hold = rising: c1 = c + 0.05 * min(e + d, 0), d = 0 here; a norm above
    # the threshold (e > 0) leaves c; one below lowers it as usual. The
    # anchor stays.
    state = _gate_state(0.0, anchor=0.0)
    _, up = ogt.update([torch.tensor([2.0])], state, value=2.0, config=HAND)
    assert float(up["ema_mean"]) == 0.0 and _flag(up) == 1
    _, down = ogt.update([torch.tensor([0.5])], state, value=2.0, config=HAND)
    assert float(down["ema_mean"]) == pytest.approx(0.05 * math.log(0.5), abs=2e-6)
    assert float(down["centre_anchor"]) == 0.0
    # Calm and closed, v = 2 = the loss centre: the centre stays 2; gap =
    # 2 - 1 > 0: the reference rises at 0.005: 1.005; the spread does not
    # move (it learns only while the gate is open).
    assert float(down["loss_centre"]) == 2.0
    assert float(down["loss_reference"]) == pytest.approx(1.005, rel=1e-6)
    assert float(down["loss_spread"]) == F32(0.1)


def test_the_loss_gate_learns_running_means_during_the_first_steps():
    # N = round(1 / 0.05) = 20: steps 0..19 are early, with a = max(0.05,
    # 1 / (step + 1)); every finite loss teaches all three levels, the
    # explosion's too. Norms 1 = t (not clipped, c and d stay 0, t stays 1),
    # then 100 > 3 t: an explosion.
    values = [3.0, 1.0, 2.0, 8.0]
    _, trace = _drive([1.0, 1.0, 1.0, 100.0], config=HAND, values=values, initial_threshold=1.0)
    expected = [
        # Step 0, the first loss: centre = reference = 3, spread = 0.
        (3.0, 3.0, 0.0),
        # Step 1, v = 1, a = 1/2: centre = 3 + (1 - 3) / 2 = 2; gap = 2 - 3 =
        # -1: reference = 3 - 1 / 2 = 2.5; dev = |1 - 3| = 2: spread = 0 + 2 / 2.
        (2.0, 2.5, 1.0),
        # Step 2, v = 2, a = 1/3: centre = 2 + 0 / 3 = 2; gap = -0.5:
        # reference = 2.5 - 0.5 / 3 = 7/3; dev = 0: spread = 1 - 1 / 3 = 2/3.
        (2.0, 7.0 / 3.0, 2.0 / 3.0),
        # Step 3, v = 8, a = 1/4, an explosion (not calm) but early: Bc =
        # max(10 * 2/3, 2 * |2|) = 20/3 > 6, so centre = 2 + 6 / 4 = 3.5; gap =
        # 3.5 - 7/3 = 7/6: reference = 7/3 + 7/24 = 2.625; dev = min(6,
        # max(3 * 2/3, 2 * 2)) = 4: spread = 2/3 + (4 - 2/3) / 4 = 1.5.
        (3.5, 2.625, 1.5),
    ]
    assert trace.flags == [0, 0, 0, 3]
    for k, levels in enumerate(expected):
        after = trace.after[k]
        got = tuple(float(after[f]) for f in ("loss_centre", "loss_reference", "loss_spread"))
        assert got == pytest.approx(levels, rel=1e-6), k


@pytest.mark.parametrize(
    "norm, centre0, spread0, value, centre, reference, spread, rel",
    [
        # Loss centre = reference = 2, spread 0.2, track_loss_rel 0.2: Bc =
        # max(10 * 0.2, 10 * 0.2 * 2) = 4 (the centre's bound), B = max(3 *
        # 0.2, 0.002) = 0.6 (the spread's). Calm (norm 1 = t), v = 12, gate
        # open (the unit max(0.2, 0.2 * 2) = 0.4, 2 > 2.4 is false): centre =
        # 2 + 0.05 * clip(10, -4, 4) = 2.2; gap = 0.2 > 0: reference = 2 +
        # 0.005 * 0.2 = 2.001; dev = min(10, 0.6): spread = 0.2 + 0.05 * (0.6
        # - 0.2) = 0.22.
        (1.0, 2.0, 0.2, 12.0, 2.2, 2.001, 0.22, 0.2),
        # The same loss on an explosion (norm 100 > 3): not calm, so the
        # spread stays, and the reference moves at the rise rate: gap = 0.2,
        # reference = 2 + 0.005 * 0.2 = 2.001.
        (100.0, 2.0, 0.2, 12.0, 2.2, 2.001, 0.2, 0.2),
        # track_loss_rel 0: Bc = max(2, 0.002) = 2: centre = 2 + 0.05 * 2 =
        # 2.1; gap = 0.1: reference = 2 + 0.005 * 0.1 = 2.0005.
        (1.0, 2.0, 0.2, 12.0, 2.1, 2.0005, 0.22, 0.0),
        # A falling loss on an explosion (v = 1.5): centre = 1.975 as on a calm
        # step, but not calm, so the reference falls at the rise rate, not at
        # r: gap = -0.025, reference = 2 - 0.005 * 0.025 = 1.999875; the
        # spread stays.
        (100.0, 2.0, 0.2, 1.5, 1.975, 1.999875, 0.2, 0.2),
        # Calm, the loss falls (v = 1.5): centre = 2 + 0.05 * (-0.5) = 1.975;
        # gap = -0.025 <= 0: reference = 2 - 0.05 * 0.025 = 1.99875;
        # dev = min(0.5, 0.6) = 0.5: spread = 0.2 + 0.05 * 0.3 = 0.215.
        (1.0, 2.0, 0.2, 1.5, 1.975, 1.99875, 0.215, 0.2),
        # A loss that was constant (spread 0) at 4, track_loss_rel 0: Bc = B =
        # 0.001 * 4 = 0.004, so v = 5 still moves the levels: centre = 4 +
        # 0.05 * 0.004 = 4.0002; gap = 0.0002: reference = 4 + 0.005 * 0.0002
        # = 4.000001; spread = 0 + 0.05 * min(1, 0.004) = 0.0002.
        (1.0, 4.0, 0.0, 5.0, 4.0002, 4.000001, 0.0002, 0.0),
        # The same at track_loss_rel 0.2: Bc = 10 * 0.2 * 4 = 8: centre = 4 +
        # 0.05 * 1 = 4.05; gap = 0.05: reference = 4 + 0.005 * 0.05 = 4.00025;
        # B = 0.004 still: spread = 0.0002.
        (1.0, 4.0, 0.0, 5.0, 4.05, 4.00025, 0.0002, 0.2),
        # A non-finite loss changes nothing.
        (1.0, 2.0, 0.2, math.nan, 2.0, 2.0, 0.2, 0.2),
    ],
)
def test_the_loss_gate_after_the_first_steps(
    norm, centre0, spread0, value, centre, reference, spread, rel
):
    config = dataclasses.replace(HAND, track_loss_rel=rel)
    state = _late_state(loss_centre=centre0, loss_reference=centre0, loss_spread=spread0)
    _, state = ogt.update([torch.tensor([norm])], state, value=value, config=config)
    assert bool(_flag(state) & 2) == (norm == 100.0)
    assert float(state["loss_centre"]) == pytest.approx(centre, rel=1e-6)
    assert float(state["loss_reference"]) == pytest.approx(reference, rel=1e-6)
    assert float(state["loss_spread"]) == pytest.approx(spread, rel=1e-5)


def test_a_hold_lets_the_centre_fall_only_beyond_its_spread():
    # Spread on entry d = 0.3, c = 0, t = 1; the hold's step is r * min(e + d, 0).
    # n = e^-0.2 (e = -0.2, e + d = 0.1): c' = 0.05 * min(0.1, 0) = 0;
    #   d' = 0.3 + 0.05 * (0.2 - 0.3) = 0.295.
    # n = e^-0.5 (e = -0.5, e + d = -0.2): c' = 0.05 * -0.2 = -0.01;
    #   d' = 0.3 + 0.05 * (0.5 - 0.3) = 0.31.
    # Without a hold (no loss, no emergency): c' = r * e = -0.01 and -0.025.
    gate = {"loss_centre": 2.0, "loss_reference": 1.0, "loss_spread": 0.1}  # rising
    holds = [gate, {"emergency_hold_left": 3}]
    for e, held_c, d1, free_c in [(-0.2, 0.0, 0.295, -0.01), (-0.5, -0.01, 0.31, -0.025)]:
        for hold in holds:
            state = _late_state(ema_var=0.3, **hold)
            _, state = ogt.update([torch.tensor([math.exp(e)])], state, config=HAND)
            assert float(state["ema_mean"]) == pytest.approx(held_c, abs=1e-6), (e, hold)
            assert float(state["ema_var"]) == pytest.approx(d1, rel=1e-5)
            want = math.exp(held_c + d1)
            assert float(state["clip_threshold"]) == pytest.approx(want, rel=1e-5)
        _, free = ogt.update([torch.tensor([math.exp(e)])], _late_state(ema_var=0.3), config=HAND)
        assert float(free["ema_mean"]) == pytest.approx(free_c, abs=1e-6)


@pytest.mark.parametrize(
    "centre, rising",
    # Spread 0, reference 1: the unit is max(0, 0.2 * |1|) = 0.2 and the gate
    # closes above 1 + 1 * 0.2 = 1.2 (it would be above 1 + 0 were the unit
    # the spread). Then the centre holds: n = 1.5 (e = 0.4) leaves c = 0
    # instead of c' = 0.05 * 0.4 = 0.02.
    [(1.15, False), (1.25, True)],
)
def test_the_loss_gate_unit_is_a_share_of_the_reference(centre, rising):
    levels = (torch.tensor(centre), torch.tensor(1.0), torch.tensor(0.0))
    assert bool(arithmetic.loss_rising(CPU_OPS, *levels, HAND)) == rising
    # Climbing needs 1 + 1.5 * 0.2 = 1.3: neither is.
    assert not bool(arithmetic.loss_climbing(CPU_OPS, *levels, HAND))
    state = _late_state(loss_centre=centre, loss_reference=1.0, loss_spread=0.0)
    _, state = ogt.update([torch.tensor([1.5])], state, config=HAND)
    assert float(state["ema_mean"]) == pytest.approx(0.0 if rising else 0.02, abs=1e-6)
    # track_loss_rel = 0: the unit is the spread, 0, and 1.15 is above 1.
    rel0 = dataclasses.replace(HAND, track_loss_rel=0.0)
    assert bool(arithmetic.loss_rising(CPU_OPS, *levels, rel0))


def test_an_unbroken_run_of_explosions_still_moves_the_reference():
    # After the first N = 20 steps, loss centre = reference = 1, spread 0.1
    # (Bc = max(10 * 0.1, 0.001) = 1), v = 2 on three explosions in a row
    # (n = 1e4 > 3 t; three, under emergency_patience 5). The gate stays open
    # (unit max(0.1, 0.2 * ~1) = ~0.2, the centre stays under 1.2). Not calm:
    # the spread stays 0.1 and the reference moves at 0.005 (the rise rate):
    #   centre 1 + 0.05 * min(1, 1) = 1.05, reference 1 + 0.005 * 0.05 = 1.00025;
    #   centre 1.05 + 0.05 * 0.95 = 1.0975,
    #     reference 1.00025 + 0.005 * (1.0975 - 1.00025) = 1.00073625;
    #   centre 1.0975 + 0.05 * 0.9025 = 1.142625,
    #     reference 1.00073625 + 0.005 * (1.142625 - 1.00073625) = 1.00144569375.
    expected = [(1.05, 1.00025), (1.0975, 1.00073625), (1.142625, 1.00144569375)]
    state = _late_state(loss_centre=1.0, loss_reference=1.0, loss_spread=0.1)
    for k, (centre, reference) in enumerate(expected):
        _, state = ogt.update([torch.tensor([1e4])], state, value=2.0, config=HAND)
        assert int(state["explosion_count"]) == k + 1
        assert float(state["loss_centre"]) == pytest.approx(centre, rel=1e-5)
        assert float(state["loss_reference"]) == pytest.approx(reference, rel=1e-5)
        assert float(state["loss_spread"]) == pytest.approx(0.1, rel=1e-5)
    assert int(state["emergency_count"]) == 0


def _rising_losses(shape: str, n: int, rng) -> np.ndarray:
    """A loss that rises 10x over ``n`` steps with multiplicative noise."""
    t = np.arange(n)
    if shape == "geometric":
        return (10.0 ** (t / n) * np.exp(rng.normal(0.0, 0.1, n))).astype(np.float32)
    return ((1.0 + 9.0 * t / n) * (1.0 + 0.05 * rng.normal(size=n))).astype(np.float32)


@pytest.mark.parametrize("shape", ["geometric", "linear"])
@pytest.mark.parametrize("learning_rate", [None, 1e-3], ids=["data", "learning-rate"])
def test_a_slowly_rising_loss_with_steady_norms_does_not_drag_the_threshold_down(
    shape, learning_rate
):
    # Steady norms (5 e^N(0, 0.3^2)) while the loss rises 10x over 4000 steps
    # (a TD loss as the returns grow): the gate may close, but its unit grows
    # with the loss, its reference follows the loss on every step, and a hold
    # lets the centre fall only past its spread, so the threshold stays with
    # the norms: never under 0.3x their recent median after step 400, and at
    # most 5% of the steps are explosions.
    n = 4000
    rng = np.random.default_rng(11)
    norms = 5.0 * np.exp(rng.normal(0.0, 0.3, n)).astype(np.float32)
    losses = _rising_losses(shape, n, rng)
    state = ogt.init_state(learning_rate=learning_rate)
    thresholds = []
    for k in range(n):
        grads = [torch.tensor([norms[k]], dtype=torch.float32)]
        _, state = ogt.update(grads, state, value=float(losses[k]))
        thresholds.append(float(state["clip_threshold"]))
    for k in range(400, n):
        median = float(np.median(norms[max(0, k - 99) : k + 1]))
        assert thresholds[k] >= 0.3 * median, k
    assert int(state["explosion_count"]) <= 0.05 * n


def test_a_huge_outlier_loss_does_not_shut_the_gate():
    # Calm norms around 1, a loss 1 +- 1%, and at step 200 one loss 1e7 x the
    # usual. After the first N steps its influence is bounded: the loss centre
    # moves by at most r * Bc = r * max(10 spreads, 10 * track_loss_rel *
    # |centre|) = 0.05 * 2 * ~1 = ~0.1 here (the share of the level binds: the
    # spread is ~0.01), under the gate's unit max(spread, 0.2 |reference|) =
    # ~0.2 that closes it; the spread grows by r * (B - spread) = 10%. The
    # gate stays open, and a lasting x2 rise of the norm at step 210 is
    # followed (the centre rises by ~ln 2).
    norms = _noise(seed=8, steps=500)
    norms[210:] *= F32(2.0)
    losses = [float(1.0 + 0.01 * x) for x in np.random.default_rng(9).normal(size=500)]
    losses[200] = 1e7
    _, trace = _drive(norms, values=losses)
    before, hit = trace.after[199], trace.after[200]
    share = 10 * DEFAULT.track_loss_rel * abs(float(before["loss_centre"]))
    assert share > 10 * float(before["loss_spread"])
    assert float(hit["loss_centre"]) - float(before["loss_centre"]) == pytest.approx(
        R * share, rel=1e-3
    )
    for after in trace.after:
        centre, ref, spread = (
            float(after[f]) for f in ("loss_centre", "loss_reference", "loss_spread")
        )
        unit = max(spread, DEFAULT.track_loss_rel * abs(ref))
        assert not centre > ref + DEFAULT.track_loss_k * unit
    rise = float(trace.after[-1]["ema_mean"]) - float(trace.after[199]["ema_mean"])
    assert rise == pytest.approx(math.log(2.0), abs=0.15)


def test_data_mode_zero_norms_keep_waiting():
    # SPEC.md, "Tracking rule", "Start": an all-zero gradient has no level to
    # start from: t = clamp(0) = min_threshold (1e-30), n = 0 is not clipped
    # (and is vanishing), the output is 0, warmup_steps_left stays 1, and the
    # threshold stays the cap (none here: inf) and the centre at lnf(cap); the
    # first positive norm starts it.
    start = ogt.init_state()
    _, trace = _drive([0.0, 0.0, 2.0, 2.0])
    assert trace.flags == [4, 4, 32, 0]
    assert [int(a["warmup_steps_left"]) for a in trace.after] == [1, 1, 0, 0]
    assert trace.out[:2] == [0.0, 0.0] and trace.out[2] == 2.0
    for k in (0, 1):
        assert float(trace.after[k]["clip_threshold"]) == math.inf
        assert float(trace.after[k]["ema_mean"]) == float(start["ema_mean"])
    assert float(trace.after[2]["ema_mean"]) == pytest.approx(math.log(2.0), rel=1e-6)
    assert float(trace.after[2]["clip_threshold"]) == pytest.approx(2.0, rel=1e-6)


def test_the_hold_counts_down_whatever_the_patience():
    # SPEC.md, "Emergency": otherwise (and whatever emergency_patience)
    # emergency_hold_left = max(hold - 1, 0); with patience 0 nothing fires.
    for patience in (5, 0):
        cfg = StabilizerConfig(emergency_patience=patience)
        state = ogt.init_state(initial_threshold=1.0, config=cfg)
        state["emergency_hold_left"] = torch.tensor(3, dtype=torch.int32)
        _, trace = _drive([1.5] * 4, config=cfg, state=state)
        assert [int(a["emergency_hold_left"]) for a in trace.after] == [2, 1, 0, 0], patience
        # Held while hold_left > 0 on entry: the centre stays 0 (e > 0).
        assert [float(a["ema_mean"]) for a in trace.after[:3]] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("loss_seed", range(6))
def test_a_start_100x_below_with_a_noisy_loss_is_overruled(loss_seed):
    # The same norms as the 100x-below case above, with a loss of 1 +- 1%.
    # Every early step explodes, so no step is calm; but during the first
    # N = round(1 / r) steps every loss teaches the gate (running means), so
    # the reference and spread learn the batch noise whatever the norms do,
    # and afterwards the noise stays inside reference + track_loss_k spreads:
    # the gate stays open and the start is overruled as without a loss.
    norms = _noise(seed=0, steps=400)
    rng = np.random.default_rng(loss_seed)
    losses = [float(1.0 + 0.01 * x) for x in rng.normal(size=400)]
    _, trace = _drive(norms, initial_threshold=0.01, values=losses)
    assert 0.3 <= _ratio(trace) <= 3.0, _ratio(trace)
    assert trace.count(16) <= 1


def test_data_mode_caps_the_first_norm_by_the_parameters():
    # SPEC.md, "Initial threshold" 4: the class reads the parameters (given,
    # or the optimizer's): |[3, 4]| = 5, cap = 0.05 * 5 = 0.25. A zero norm
    # first keeps the cap; then a norm of 50 is clipped to it (g * 0.25 / 50)
    # and starts the tracker at ln 0.25.
    weight = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = torch.optim.SGD([weight], lr=0.0)
    with pytest.warns(UserWarning):  # a learning rate of 0 reads as none
        stab = ogt.GradientFlowStabilizer(optimizer=opt)
    assert float(stab.state_dict()["clip_threshold"]) == pytest.approx(0.25, rel=1e-6)
    for grad, expected in (([0.0, 0.0], [0.0, 0.0]), ([30.0, 40.0], [0.15, 0.2])):
        weight.grad = torch.tensor(grad)
        stab.clip_gradients([weight])
        np.testing.assert_allclose(weight.grad.numpy(), expected, rtol=1e-6)
        assert float(stab.state_dict()["clip_threshold"]) == pytest.approx(0.25, rel=1e-6)
    assert float(stab.state_dict()["ema_mean"]) == pytest.approx(math.log(0.25), rel=1e-6)
    # Given explicitly, without an optimizer.
    stab = ogt.GradientFlowStabilizer(params=[weight])
    assert float(stab.state_dict()["clip_threshold"]) == pytest.approx(0.25, rel=1e-6)


# --- The quantile ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["host", "device"])
def test_a_regular_upper_mode_stops_counting_as_explosions(path):
    # Norms 1, 1, 1, 100 repeated from t0 = 1 (the JAX twin in
    # test_track_rule.py derives it): u = ln 3 falls 0.005 under a 1 and rises
    # 0.095 over a 100, so the 100s of steps 3, 7, ..., 179 are explosions
    # (until u passes lnf(100) = 4.6052), then the next is at step 199; that
    # one leaves u where the 45th did (4.6986), so the cycle repeats every 5
    # periods: 219, 239.
    state = ogt.init_state(initial_threshold=1.0)
    explosions = []
    for k, n in enumerate(np.tile(np.float32([1.0, 1.0, 1.0, 100.0]), 60)):
        _, state = ogt.update([torch.tensor([n])], state, path=path)
        if _flag(state) & 2:
            explosions.append(k)
    assert explosions == [*range(3, 180, 4), 199, 219, 239]
    assert int(state["emergency_count"]) == 0
