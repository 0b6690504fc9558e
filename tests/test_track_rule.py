"""The default config's "track" rule (SPEC.md, "Tracking rule", "Loss gate").

Each expected value is derived by hand from SPEC.md in the comments. The
streams are fed to a jitted ``lax.scan`` over ``update`` of a single-leaf
gradient ``[n]``, whose global norm is ``|n|``.

Notation: r = track_rate, rise = track_max_rise, fall = track_max_fall. The
deviation ``e = x - c`` of the log-norm ``x`` from the centre ``c`` is clamped
to [-fall / r, rise / r], so one step moves ``c`` by at most +rise or -fall,
and the spread ``d`` by at most ``r * max(rise / r, fall / r)``. The threshold
is ``exp(c + k * d)``, k = track_k. Emergency after 5 explosions in a row:
``c + ln 0.5``, a 100-step hold on the centre's rise, re-armed 400 steps after
the last emergency; track_max_cut 10; explosion_factor 3.

The behavioural tests run the default config as it is. The exact checks of the
formulas pin the constants they use in ``HAND`` (r = 0.05, rise = 0.02, fall
= 0.05, loss rise rate 0.005, cut margin 1.5, loss unit share 0.2, a 100-step
hold, ...), so that
their hand-derived numbers do not depend on the current tuning of the
defaults; every other field is the default's.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import CUT_EMERGENCY_STEP, INJECTED_STEPS, LOUD_STEPS, injected_norms

import optax_gradflow as og
from optax_gradflow import arithmetic, presets
from optax_gradflow.constants import Event
from optax_gradflow.pipeline import JaxOps

LN10 = math.log(10.0)
LN2 = math.log(2.0)
RTOL32 = 1e-5  # a few float32 roundings of values of order 1
PARAMS = {"w": jnp.zeros(1)}

DEFAULT = og.StabilizerConfig()
# r = 0.05, so e is clamped to [-0.05 / 0.05, 0.02 / 0.05] = [-1, 0.4]. Every
# number the hand computations use is pinned here.
HAND = dataclasses.replace(
    DEFAULT,
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
    # No quantile: these hand computations pin the threshold, the cut and the
    # emergency; the quantile's own tests below use the default.
    track_quantile=0.0,
)


def run(norms, values=None, *, config=None, initial_threshold=None, learning_rate=None, c=1.0):
    """Feeds gradients ``[c * n]`` (and ``value=`` if given) through one jitted scan.

    Returns the final state and per-step numpy records: ``t`` the threshold the
    step clipped at (the state's ``clip_threshold`` on entry; the track rule
    uses it outside the wait for the first norm), ``out`` the output, ``thr``
    the threshold after the step, the tracker's ``centre`` / ``spread`` /
    ``anchor``, the loss gate's levels, counters and flags.
    """
    tx = og.stabilize(learning_rate, config=config, initial_threshold=initial_threshold)
    state = jax.jit(tx.init)(PARAMS)
    norms = jnp.asarray(norms, jnp.float32)
    with_value = values is not None
    values = jnp.asarray(values if with_value else np.zeros(len(norms)), jnp.float32)

    def body(s, inputs):
        n, v = inputs
        grads = {"w": (n * jnp.float32(c))[None]}
        kwargs = {"value": v} if with_value else {}
        out, new = tx.update(grads, s, PARAMS, **kwargs)
        flags = new.event_flags.newest()
        rec = {
            "t": s.clip_threshold,
            "out": out["w"][0],
            "thr": new.clip_threshold,
            "centre": new.ema_mean,
            "spread": new.ema_var,
            "anchor": new.centre_anchor,
            "loss_centre": new.loss_centre,
            "loss_reference": new.loss_reference,
            "loss_spread": new.loss_spread,
            "flags": flags,
            "emergencies": new.emergency_count,
            "hold": new.emergency_hold_left,
            "consecutive": new.consecutive_explosions,
            "scale": new.loss_scale,
        }
        return new, rec

    state, recs = jax.jit(lambda s, n, v: jax.lax.scan(body, s, (n, v)))(state, norms, values)
    recs = {k: np.asarray(v) for k, v in recs.items()}
    recs["clipped"] = (recs["flags"] & Event.CLIPPED) > 0
    recs["explosion"] = (recs["flags"] & Event.EXPLOSION) > 0
    return state, recs


def one_step(state, norm, value=None, config=HAND):
    """One jitted update of ``state`` with the gradient ``[norm]``."""
    tx = og.stabilize(config=config, initial_threshold=1.0)
    kwargs = {} if value is None else {"value": jnp.float32(value)}
    return jax.jit(tx.update)({"w": jnp.array([norm], jnp.float32)}, state, PARAMS, **kwargs)


def fresh(**fields):
    """A fresh HAND state with initial_threshold 1 (c = anchor = 0, d = 0), edited."""
    state = og.stabilize(config=HAND, initial_threshold=1.0).init(PARAMS)
    return state._replace(**{k: jnp.asarray(v, getattr(state, k).dtype) for k, v in fields.items()})


def lognormal(n, seed, sigma=0.3):
    """Norms exp(N(0, sigma^2)): median 1."""
    return np.exp(np.random.default_rng(seed).normal(0.0, sigma, n)).astype(np.float32)


def ratio_to_median(norms, thresholds, window=100):
    """thresholds[k] / median(norms[k - window + 1 .. k])."""
    medians = np.array(
        [np.median(norms[max(0, k - window + 1) : k + 1]) for k in range(len(norms))]
    )
    return thresholds / medians


def within(ratios, lo=0.3, hi=3.0):
    return bool(np.all((ratios >= lo) & (ratios <= hi)))


# --- Exact checks of the formulas (HAND: the default with pinned rates) ------


def test_centre_spread_and_threshold_by_hand():
    # initial_threshold 1: c0 = lnf(1) = 0, d0 = 0; no loss, so no gate.
    _, r = run([2.0, 0.5, math.exp(-3.0)], config=HAND, initial_threshold=1.0)
    # Step 0: t = 1; n = 2 > 1 is clipped (2 < 3: no explosion) to norm 1.
    # x = ln 2 = 0.693147, e = clip(0.693147, -1, 0.4) = 0.4:
    # c1 = 0 + 0.05 * 0.4 = 0.02; d1 = 0 + 0.05 * (0.4 - 0) = 0.02;
    # t1 = exp(0.04) = 1.0408108.
    assert r["t"][0] == 1.0 and r["clipped"][0] and not r["explosion"][0]
    assert r["out"][0] == pytest.approx(1.0, rel=1e-6)
    assert r["centre"][0] == pytest.approx(0.02, rel=RTOL32)
    assert r["spread"][0] == pytest.approx(0.02, rel=RTOL32)
    assert r["thr"][0] == pytest.approx(1.0408108, rel=RTOL32)
    # Step 1: n = 0.5 < t1, not clipped (output 0.5 exactly).
    # x = -0.693147, e = -0.693147 - 0.02 = -0.713147 (inside the clamp):
    # c2 = 0.02 - 0.05 * 0.713147 = -0.0156574;
    # d2 = 0.02 + 0.05 * (0.713147 - 0.02) = 0.0546574;
    # t2 = exp(c2 + d2) = exp(0.039) = 1.0397705.
    assert not r["clipped"][1] and r["out"][1] == 0.5
    assert r["centre"][1] == pytest.approx(-0.0156574, rel=RTOL32)
    assert r["spread"][1] == pytest.approx(0.0546574, rel=RTOL32)
    assert r["thr"][1] == pytest.approx(1.0397705, rel=RTOL32)
    # Step 2: n = e^-3, x = -3, e = -3 + 0.0156574 = -2.984 -> clamped to -1:
    # c3 = -0.0156574 - 0.05 = -0.0656574 (the most it falls in one step);
    # d3 = 0.0546574 + 0.05 * (1 - 0.0546574) = 0.1019245;
    # t3 = exp(0.0362671) = 1.0369328.
    assert r["centre"][2] == pytest.approx(-0.0656574, rel=RTOL32)
    assert r["spread"][2] == pytest.approx(0.1019245, rel=RTOL32)
    assert r["thr"][2] == pytest.approx(1.0369328, rel=RTOL32)
    # Without a loss the gate is shut: the anchor follows the centre.
    np.testing.assert_array_equal(r["anchor"], r["centre"])
    # Adapted flag: the threshold history records every 100th step only.
    assert not np.any(r["flags"] & Event.ADAPTED)


def test_loss_gate_learns_running_means_during_the_first_steps():
    # N = round(1 / 0.05) = 20: steps 0-19 are early, a = max(r, 1 / (step + 1)).
    # Calm norms 1 (t = 1) for steps 0-2, then an explosion (100 > 3 t).
    _, r = run([1.0, 1.0, 1.0, 100.0], [2.0, 4.0, 1.0, 10.0], config=HAND, initial_threshold=1.0)
    # Step 0, the first loss: centre = reference = 2, spread = 0.
    assert (r["loss_centre"][0], r["loss_reference"][0], r["loss_spread"][0]) == (2.0, 2.0, 0.0)
    # Step 1, v = 4, a = 1/2: centre' = 2 + (4 - 2) / 2 = 3; gap = 1:
    # reference' = 2 + 1 / 2 = 2.5; dev = |4 - 2| = 2: spread' = 0 + 2 / 2 = 1.
    assert r["loss_centre"][1] == pytest.approx(3.0, rel=RTOL32)
    assert r["loss_reference"][1] == pytest.approx(2.5, rel=RTOL32)
    assert r["loss_spread"][1] == pytest.approx(1.0, rel=RTOL32)
    # Step 2, v = 1, a = 1/3: centre' = 3 - 2 / 3 = 7 / 3 (the mean of 2, 4,
    # 1); gap = 7/3 - 2.5 = -1/6: reference' = 2.5 - 1/18 = 2.4444444;
    # dev = |1 - 3| = 2: spread' = 1 + (2 - 1) / 3 = 4 / 3.
    assert r["loss_centre"][2] == pytest.approx(7.0 / 3.0, rel=RTOL32)
    assert r["loss_reference"][2] == pytest.approx(2.5 - 1.0 / 18.0, rel=RTOL32)
    assert r["loss_spread"][2] == pytest.approx(4.0 / 3.0, rel=RTOL32)
    # Step 3, v = 10, a = 1/4, an explosion, but early: everything learns,
    # within the early bounds (e = max(10 * 0.2, 1) = 2). The centre's,
    # max(10 * 4/3, 2 * 7/3) = 40/3, does not bind:
    # centre' = 7/3 + (10 - 7/3) / 4 = 17 / 4 = 4.25; gap = 4.25 - 2.4444444 =
    # 1.8055556: reference' = 2.4444444 + 1.8055556 / 4 = 2.8958333;
    # dev = min(10 - 7/3, max(3 * 4/3, 2 * 7/3)) = 14/3 (the deviation's
    # bound binds): spread' = 4/3 + (14/3 - 4/3) / 4 = 13 / 6.
    assert r["explosion"][3]
    assert r["loss_centre"][3] == pytest.approx(4.25, rel=RTOL32)
    assert r["loss_reference"][3] == pytest.approx(2.8958333, rel=RTOL32)
    assert r["loss_spread"][3] == pytest.approx(13.0 / 6.0, rel=RTOL32)


# After the first N = 20 steps: the influence of one loss is bounded by
# Bc = max(10 * spread, 0.001 * |centre|) (centre) and B = max(3 * spread,
# 0.001 * |centre|) (spread).
LATE = {"stabilizer_step": 20, "loss_reference": 1.0}


@pytest.mark.parametrize(
    "norm, centre0, spread0, value, centre, reference, spread, rel",
    [
        # Centre 1, spread 0.1, track_loss_rel 0.2: Bc = max(10 * 0.1, 10 *
        # 0.2 * 1) = 2, B = max(0.3, 0.001) = 0.3. Calm (norm 1 = t: not
        # clipped), v = 11, open (the unit max(0.1, 0.2 * |1|) = 0.2, and
        # 1 > 1 + 1 * 0.2 is false). centre' = 1 + 0.05 * clip(10, -2, 2) =
        # 1.1; gap = 0.1 > 0: reference' = 1 + 0.005 * 0.1 = 1.0005;
        # dev = min(10, 0.3): spread' = 0.1 + 0.05 * 0.2 = 0.11.
        (1.0, 1.0, 0.1, 11.0, 1.1, 1.0005, 0.11, 0.2),
        # The same loss on an explosion (norm 100 > 3): not calm, so the
        # spread stays; the reference still moves, at the rise rate (not calm):
        # gap = 0.1, reference' = 1 + 0.005 * 0.1 = 1.0005.
        (100.0, 1.0, 0.1, 11.0, 1.1, 1.0005, 0.1, 0.2),
        # The same with track_loss_rel 0: Bc = max(1, 0.001 * 1) = 1 (the
        # spread's bound): centre' = 1 + 0.05 * 1 = 1.05, gap = 0.05,
        # reference' = 1 + 0.005 * 0.05 = 1.00025.
        (1.0, 1.0, 0.1, 11.0, 1.05, 1.00025, 0.11, 0.0),
        # A falling loss on an explosion: centre' = 0.975 as on a calm step, but
        # not calm, so the reference falls at the rise rate, not at r: gap =
        # -0.025, reference' = 1 - 0.005 * 0.025 = 0.999875; the spread stays.
        (100.0, 1.0, 0.1, 0.5, 0.975, 0.999875, 0.1, 0.2),
        # Calm, the loss falls (v = 0.5): centre' = 1 + 0.05 * clip(-0.5, -2, 2)
        # = 0.975; gap = -0.025 <= 0: reference' = 1 - 0.05 * 0.025 = 0.99875;
        # dev = min(0.5, 0.3): spread' = 0.11.
        (1.0, 1.0, 0.1, 0.5, 0.975, 0.99875, 0.11, 0.2),
        # A loss that was constant (spread 0) at level 1: Bc = 10 * 0.2 * 1 = 2,
        # B = 0.001: v = 2 moves the centre by 0.05 * 1: centre' = 1.05, gap =
        # 0.05: reference' = 1 + 0.005 * 0.05 = 1.00025; spread' = 0.05 *
        # min(1, 0.001) = 0.00005.
        (1.0, 1.0, 0.0, 2.0, 1.05, 1.00025, 0.00005, 0.2),
        # The same with track_loss_rel 0: Bc = B = 0.001, so v = 2 still moves
        # it: centre' = 1 + 0.05 * 0.001 = 1.00005, gap = 0.00005: reference' =
        # 1 + 0.005 * 0.00005 = 1.00000025; spread' = 0.00005.
        (1.0, 1.0, 0.0, 2.0, 1.00005, 1.00000025, 0.00005, 0.0),
        # A non-finite loss changes nothing.
        (1.0, 1.0, 0.1, float("nan"), 1.0, 1.0, 0.1, 0.2),
    ],
)
def test_loss_gate_after_the_first_steps(
    norm, centre0, spread0, value, centre, reference, spread, rel
):
    config = dataclasses.replace(HAND, track_loss_rel=rel)
    state = fresh(**LATE, loss_centre=centre0, loss_spread=spread0)
    _, new = one_step(state, norm, value=value, config=config)
    assert int(new.explosion_count) == (norm == 100.0)
    assert float(new.loss_centre) == pytest.approx(centre, rel=RTOL32)
    assert float(new.loss_reference) == pytest.approx(reference, rel=RTOL32)
    assert float(new.loss_spread) == pytest.approx(spread, rel=RTOL32)


# rising (track_loss_k 1): loss_centre 2 > loss_reference 1 + 1 * 0.5, and
# climbing (track_loss_cut_k 1.5): 2 > 1 + 1.5 * 0.5 = 1.75.
RISING = {"loss_centre": 2.0, "loss_reference": 1.0, "loss_spread": 0.5}
# rising but not climbing: 1.6 > 1.5, 1.6 > 1.75 is false.
ONLY_RISING = {"loss_centre": 1.6, "loss_reference": 1.0, "loss_spread": 0.5}


def test_rising_loss_holds_the_centre_and_freezes_the_anchor():
    # Norm 1.5 (clipped at t = 1, no explosion): e = ln 1.5 = 0.405 -> 0.4.
    # Gate shut: c' = 0.02. Rising: hold, c' = 0 + 0.05 * min(0.4 + d, 0) = 0
    # (d = 0, the spread on entry); the
    # spread still learns: d' = 0.02; t' = exp(0.02); the anchor stays 0.
    _, free = one_step(fresh(), 1.5)
    assert float(free.ema_mean) == pytest.approx(0.02, rel=RTOL32)
    _, held = one_step(fresh(centre_anchor=0.3, **RISING), 1.5)
    assert float(held.ema_mean) == 0.0
    assert float(held.ema_var) == pytest.approx(0.02, rel=RTOL32)
    assert float(held.clip_threshold) == pytest.approx(math.exp(0.02), rel=RTOL32)
    assert float(held.centre_anchor) == pytest.approx(0.3, rel=RTOL32)
    # The emergency hold does the same without a loss, and counts down
    # whatever emergency_patience is.
    for patience in (5, 0):
        cfg = dataclasses.replace(HAND, emergency_patience=patience)
        _, held = one_step(fresh(emergency_hold_left=3), 1.5, config=cfg)
        assert float(held.ema_mean) == 0.0 and int(held.emergency_hold_left) == 2


@pytest.mark.parametrize(
    "centre, expected",
    [
        # Above the floor: c' = max(min(0, 0 - 0.05), min(-ln 10, 0)) = -0.05.
        (0.0, -0.05),
        # Near it: c - 0.05 = -2.33 < -ln 10 = -2.302585: stops at the floor.
        (-2.28, -LN10),
        # Below it (after an emergency): max(-3.05, min(-2.302585, -3)) = -3,
        # never raised.
        (-3.0, -3.0),
    ],
)
def test_explosion_in_progress_tightens_down_to_the_floor(centre, expected):
    # Climbing loss and an explosion (norm 1e4 > 3 t): e clamps to 0.4, the
    # hold gives c1 = c, d' = 0 + 0.05 * 0.4 = 0.02; anchor 0, floor 0 - ln 10.
    t = math.exp(centre)
    state = fresh(ema_mean=centre, clip_threshold=t, **RISING)
    _, new = one_step(state, 1e4)
    assert int(new.explosion_count) == 1
    assert float(new.ema_mean) == pytest.approx(expected, abs=1e-5)
    assert float(new.clip_threshold) == pytest.approx(math.exp(expected + 0.02), rel=RTOL32)
    assert float(new.centre_anchor) == 0.0


def test_an_explosion_with_a_loss_rising_but_not_climbing_is_only_held():
    # Rising (hold: c1 = c + 0.05 * min(0.4 + 0, 0) = c, d = 0) but under the cut
    # margin: no tightening, c' = 0, d' = 0.02, t' = exp(0.02).
    _, new = one_step(fresh(**ONLY_RISING), 1e4)
    assert int(new.explosion_count) == 1
    assert float(new.ema_mean) == 0.0
    assert float(new.clip_threshold) == pytest.approx(math.exp(0.02), rel=RTOL32)


def test_a_hold_lets_the_centre_fall_only_beyond_its_spread():
    # Spread on entry d = 0.3, c = 0, t = 1; the hold's step is r * min(e + d, 0).
    # n = e^-0.2 (e = -0.2, e + d = 0.1): c' = 0.05 * min(0.1, 0) = 0;
    #   d' = 0.3 + 0.05 * (0.2 - 0.3) = 0.295.
    # n = e^-0.5 (e = -0.5, e + d = -0.2): c' = 0.05 * -0.2 = -0.01;
    #   d' = 0.3 + 0.05 * (0.5 - 0.3) = 0.31.
    # Without a hold (no loss, no emergency): c' = r * e = -0.01 and -0.025.
    cases = [(-0.2, 0.0, 0.295, -0.01), (-0.5, -0.01, 0.31, -0.025)]
    holds = [RISING, {"emergency_hold_left": 3}]
    for e, held_c, d1, free_c in cases:
        for hold in holds:
            _, new = one_step(fresh(ema_var=0.3, **hold), math.exp(e))
            assert float(new.ema_mean) == pytest.approx(held_c, abs=1e-6), (e, hold)
            assert float(new.ema_var) == pytest.approx(d1, rel=RTOL32)
            want = math.exp(held_c + d1)
            assert float(new.clip_threshold) == pytest.approx(want, rel=RTOL32)
        _, free = one_step(fresh(ema_var=0.3), math.exp(e))
        assert float(free.ema_mean) == pytest.approx(free_c, abs=1e-6)


@pytest.mark.parametrize(
    "centre, rising",
    # Spread 0, reference 1: the unit is max(0, 0.2 * |1|) = 0.2 and the gate
    # closes above 1 + 1 * 0.2 = 1.2 (it would be above 1 + 0 were the unit
    # the spread). Then the centre holds: n = 1.5 (e = 0.4) leaves c = 0
    # instead of c' = 0.05 * 0.4 = 0.02.
    [(1.15, False), (1.25, True)],
)
def test_the_loss_gate_unit_is_a_share_of_the_reference(centre, rising):
    levels = (jnp.float32(centre), jnp.float32(1.0), jnp.float32(0.0))
    assert bool(arithmetic.loss_rising(JaxOps(), *levels, HAND)) == rising
    # Climbing needs 1 + 1.5 * 0.2 = 1.3: neither is.
    assert not bool(arithmetic.loss_climbing(JaxOps(), *levels, HAND))
    gate = {"loss_centre": centre, "loss_reference": 1.0, "loss_spread": 0.0}
    _, new = one_step(fresh(**{**LATE, **gate}), 1.5)
    assert float(new.ema_mean) == pytest.approx(0.0 if rising else 0.02, abs=1e-6)
    # track_loss_rel = 0: the unit is the spread, 0, and 1.15 is above 1.
    rel0 = dataclasses.replace(HAND, track_loss_rel=0.0)
    assert bool(arithmetic.loss_rising(JaxOps(), *levels, rel0))


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
    state = fresh(**LATE, loss_centre=1.0, loss_spread=0.1)
    for k, (centre, reference) in enumerate(expected):
        _, state = one_step(state, 1e4, value=2.0)
        assert int(state.explosion_count) == k + 1
        assert float(state.loss_centre) == pytest.approx(centre, rel=RTOL32)
        assert float(state.loss_reference) == pytest.approx(reference, rel=RTOL32)
        assert float(state.loss_spread) == pytest.approx(0.1, rel=RTOL32)
    assert int(state.emergency_count) == 0


# --- Emergency ----------------------------------------------------------------


def test_emergency_once_per_run_then_hold_then_rearm():
    # HAND's rates. t0 = 1, norm 100 explodes every step (x = 4.6 > c + 0.4
    # always: e = 0.4).
    # Steps 0-4: c = 0.02 (k + 1), d_k = 0.4 (1 - 0.95^k). The fifth explosion
    # (step 4) fires: c = 0.1 + ln 0.5 = -0.5931472, d5 = 0.0904876,
    # t = exp(-0.5026596) = 0.6049197; hold 100.
    norms = [100.0] * 110
    _, r = run(norms, config=HAND, initial_threshold=1.0)
    assert list(r["emergencies"][:6]) == [0, 0, 0, 0, 1, 1]
    assert r["centre"][4] == pytest.approx(0.1 - LN2, rel=RTOL32)
    assert r["spread"][4] == pytest.approx(0.0904876, rel=RTOL32)
    assert r["thr"][4] == pytest.approx(0.6049197, rel=RTOL32)
    # The run goes on unbroken: consecutive keeps counting, no second firing.
    assert r["consecutive"][-1] == 110 and r["emergencies"][-1] == 1
    # Hold: steps 5..104 enter with hold 100..1, so the centre cannot rise;
    # step 105 enters with 0 and rises by 0.02.
    assert r["hold"][4] == 100 and r["hold"][104] == 0
    np.testing.assert_array_equal(r["centre"][5:105], r["centre"][4])
    assert r["centre"][105] == pytest.approx(0.1 - LN2 + 0.02, rel=RTOL32)


def test_emergency_rearms_after_400_steps():
    # Runs of 5 explosions (norm 1e4 against t ~ 1) separated by calm steps of
    # norm 0.5: the run at steps 0-4 fires at step 4; the one at 6-10 reaches
    # 5 at step 10, but 10 - 4 < 400; the one at 405-409 fires at step 409
    # (409 - 4 >= 400).
    norms = np.full(420, 0.5, np.float32)
    for start in (0, 6, 405):
        norms[start : start + 5] = 1e4
    _, r = run(norms, initial_threshold=1.0)
    assert r["explosion"][[0, 4, 6, 10, 405, 409]].all()
    fired = np.flatnonzero(np.diff(r["emergencies"], prepend=0))
    assert list(fired) == [4, 409]


def test_eleven_injected_batches_are_eleven_explosions():
    # The construction and its derivation: _helpers.injected_norms. The loud
    # norms during the emergency's hold are clipped at the cut threshold but
    # measured against the threshold before the cut.
    state, r = run(injected_norms(), learning_rate=1e-2)
    assert list(np.flatnonzero(r["explosion"])) == list(INJECTED_STEPS)
    assert list(np.flatnonzero(np.diff(r["emergencies"], prepend=0))) == [CUT_EMERGENCY_STEP]
    held = [k for k in LOUD_STEPS if CUT_EMERGENCY_STEP < k <= CUT_EMERGENCY_STEP + 50]
    assert held and all(r["clipped"][k] for k in held)
    total = og.stability_report(state).total
    assert (total.explosions, total.emergencies) == (11, 1)


# --- Start: from a learning-rate guess, or from the data --------------------------


@pytest.mark.parametrize("start", [0.01, 100.0])
def test_a_start_100x_off_is_overruled_by_the_data(start):
    # Norms lognormal around 1. From 100: c falls by `fall` a step, ln 100 /
    # fall steps. From 0.01: explosions, one emergency (c - ln 2, 100 steps of
    # hold), then c rises by `rise` a step, (ln 100 + ln 2) / rise steps, fewer
    # in threshold terms as the spread grows towards rise / r. The bound asked
    # for: within 400 steps, and stays there.
    norms = lognormal(800, seed=0)
    _, r = run(norms, initial_threshold=start)
    ratios = ratio_to_median(norms, r["thr"])
    assert within(ratios[400:])
    assert r["emergencies"][-1] <= 1


def test_data_mode_first_finite_norm_is_not_clipped_and_starts_the_tracker():
    # No learning rate, no initial threshold: the step waits for a norm.
    state = jax.jit(og.stabilize().init)(PARAMS)
    assert int(state.warmup_steps_left) == 1
    _, r = run([3.0, 300.0, 2.0])
    # Step 0: t = clamp(3) = 3, 3 > 3 is false: the output is the input; then
    # c = ln 3, d = 0, t' = 3, the adapted flag.
    assert r["out"][0] == 3.0 and r["flags"][0] == Event.ADAPTED
    assert r["centre"][0] == pytest.approx(math.log(3.0), rel=RTOL32)
    assert r["spread"][0] == 0.0 and r["thr"][0] == pytest.approx(3.0, rel=RTOL32)
    # Step 1: a x100 spike against t = 3: clipped to norm 3, an explosion.
    assert r["t"][1] == pytest.approx(3.0, rel=RTOL32)
    assert r["flags"][1] == Event.CLIPPED | Event.EXPLOSION
    assert r["out"][1] == pytest.approx(3.0, rel=RTOL32)


def test_data_mode_zero_norm_keeps_waiting():
    _, r = run([0.0, 5.0, 50.0])
    # Step 0: an all-zero gradient has no level to start from: t = clamp(0) =
    # 1e-30, 0 > t is false, the output is 0, vanishing; still waiting.
    assert r["out"][0] == 0.0 and r["flags"][0] == Event.VANISHING
    # Step 1 starts the tracker unclipped, step 2 (50 > 3 * 5) is clipped to 5.
    assert r["out"][1] == 5.0 and r["flags"][1] == Event.ADAPTED
    assert r["flags"][2] == Event.CLIPPED | Event.EXPLOSION
    assert r["out"][2] == pytest.approx(5.0, rel=RTOL32)


def test_data_mode_nan_first_step_keeps_waiting():
    _, r = run([float("nan"), 5.0, 50.0])
    # Step 0: skipped, still waiting; the threshold is the cap, here none
    # (all-zero parameters): max_threshold, inf.
    assert r["out"][0] == 0.0 and r["flags"][0] == Event.NONFINITE
    assert r["thr"][0] == math.inf
    # Step 1: the first finite norm starts the tracker unclipped.
    assert r["out"][1] == 5.0 and r["flags"][1] == Event.ADAPTED
    assert r["thr"][1] == pytest.approx(5.0, rel=RTOL32)
    # Step 2: 50 > 3 * 5: clipped to 5.
    assert r["flags"][2] == Event.CLIPPED | Event.EXPLOSION
    assert r["out"][2] == pytest.approx(5.0, rel=RTOL32)


# --- Spikes and level shifts --------------------------------------------------


def test_a_single_x100_spike_is_clipped_and_barely_moves_the_threshold():
    norms = lognormal(400, seed=1)
    norms[300] *= 100.0
    _, r = run(norms, initial_threshold=1.0)
    # Clipped to the step's threshold, and an explosion (t ~ 1.3 x median).
    assert r["clipped"][300] and r["explosion"][300]
    assert r["out"][300] == pytest.approx(r["t"][300], rel=1e-6)
    # e <= rise / r: c rises <= rise, d' - d = r (|e| - d) <= rise, so
    # t' / t <= exp(2 k rise) (1.03 with rise 0.015, k 1: under the 25% asked).
    bound = math.exp(2 * DEFAULT.track_k * DEFAULT.track_max_rise)
    assert bound < 1.25
    move = r["thr"][300] / r["thr"][299]
    assert 1.0 / 1.25 < move <= bound * (1 + RTOL32)
    assert r["emergencies"][-1] == 0


def test_a_lasting_x10_rise_with_a_steady_loss_is_absorbed():
    # 400 steps around 1, then 600 around 10, loss 1.0 every step: the loss
    # centre, reference (1) and spread (0) never move, so the gate stays shut.
    before, n = 400, 1000
    norms = lognormal(n, seed=2)
    norms[before:] *= 10.0
    _, r = run(norms, np.ones(n), initial_threshold=1.0)
    # The rise explodes (10 > 3 x ~1.3): one emergency (5th explosion; the run
    # is then unbroken or within the 400-step re-arm), its 100-step hold, then
    # c climbs by `rise` a step (ln 10 / rise steps): absorbed within 400.
    assert r["explosion"][before : before + 5].all()
    assert r["emergencies"][before - 1] == 0 and r["emergencies"][-1] == 1
    ratios = ratio_to_median(norms, r["thr"])
    assert within(ratios[before + 400 :])
    assert not r["explosion"][before + 300 : before + 400].any()
    # Never tightened below 0.3 x the old level: the emergency halves t once
    # (~1.3 -> ~0.65), and the hold stops the centre from rising, not falling,
    # while the norms above it give e > 0.
    assert r["thr"][before:].min() >= 0.3 * np.median(norms[before - 100 : before])
    assert (r["loss_centre"] == 1.0).all() and (r["loss_spread"] == 0.0).all()


def test_a_lasting_x10_fall_is_followed():
    # c falls by `fall` a step: ln 10 / fall steps (23 with fall 0.1).
    before, n = 400, 1000
    norms = lognormal(n, seed=3)
    norms[before:] /= 10.0
    _, r = run(norms, np.ones(n), initial_threshold=1.0)
    ratios = ratio_to_median(norms, r["thr"])
    assert within(ratios[before + 400 :])
    assert r["emergencies"][-1] == 0


@pytest.mark.parametrize("c", [1e-3, 1e3])
def test_scale_free(c):
    # Everything is in log ratios: ln(c n) - ln(c m) = ln n - ln m. In data
    # mode (no absolute number at all) gradients times c give the same clips
    # and thresholds times c. Stream: lognormal, x100 spikes every 97 steps, a
    # x10 rise at step 500.
    norms = lognormal(1000, seed=4)
    norms[::97] *= 100.0
    norms[500:] *= 10.0
    _, ref = run(norms)
    _, got = run(norms, c=c)
    assert ref["clipped"].sum() > 50  # the clip rate is not trivially 0
    np.testing.assert_array_equal(got["clipped"], ref["clipped"])
    np.testing.assert_array_equal(got["explosion"], ref["explosion"])
    # threshold / median norm: the medians scale by c, so compare thr / c.
    np.testing.assert_allclose(got["thr"] / np.float32(c), ref["thr"], rtol=1e-4)


# --- The quantile: an explosion is a norm the stream itself rarely produces --


def bimodal(periods: int) -> np.ndarray:
    """Norms 1, 1, 1, 100, repeated: a quarter of the steps in an upper mode
    100x over the rest (as PPO's first rollouts give)."""
    return np.tile(np.float32([1.0, 1.0, 1.0, 100.0]), periods)


def test_a_regular_upper_mode_stops_counting_as_explosions():
    # Default config, t0 = 1: c = 0, u = ln 3 = 1.0986 (SPEC.md, "Tracking
    # rule"). A norm of 1 is under u: u falls by 0.1 * 0.05 = 0.005; a norm of
    # 100 (lnf = 4.6052) over u: u rises by 0.1 * 0.95 = 0.095. The threshold
    # stays near 1.4 (c near 0.13, spread near 0.2), so every 100 is over
    # 3 * t: an explosion exactly while it is above u. The j-th 100 (step
    # 4j + 3) enters with u = 1.0986 - 0.015 + 0.08 j, above 4.6052 from j = 45
    # on: steps 3, 7, ..., 179 are the explosions of the start. The 45th
    # (j = 44, u = 4.6036) leaves u at 4.6986; the next periods enter with
    # 4.6836, 4.6636, 4.6436, 4.6236, and j = 49 with 4.6036 again: step 199
    # is the next explosion.
    _, r = run(bimodal(500), initial_threshold=1.0)
    hundreds = np.arange(3, 2000, 4)
    assert (r["thr"] * 3 < 100).all()
    first = np.flatnonzero(r["explosion"][:180])
    np.testing.assert_array_equal(first, hundreds[:45])
    assert np.flatnonzero(r["explosion"][180:])[0] + 180 == 199
    # From then on u falls by 4 * 0.005 = 0.02 a period and rises by 0.095 on
    # each explosion, so explosions come 4 or 5 periods (16 or 20 steps)
    # apart: between 80 and 100 of the 1600 steps from 400 on, about 5% (1 -
    # track_quantile); never two in a row, so no emergency.
    late = np.flatnonzero(r["explosion"][400:]) + 400
    assert 80 <= len(late) <= 100
    assert set(np.diff(late)) <= {16, 20}
    assert r["emergencies"][-1] == 0
    # The report's clip count still sees every 100: each is clipped.
    assert r["clipped"][hundreds].all()


def test_a_lone_spike_and_a_divergence_are_still_explosions():
    # After the bimodal stream u sits at the upper mode, lnf(100) = 4.6: a
    # norm 100x over it (lnf 9.2) is above u and over 3 * t.
    spike = np.concatenate([bimodal(500), np.float32([1e4]), bimodal(10)])
    _, r = run(spike, initial_threshold=1.0)
    assert r["explosion"][2000]
    # A calm stream of norm 1 (c = 0, spread 0, t = 1; u falls 0.005 a step
    # from ln 3 to 0.5986 after 100 steps), then norms 1.5^k, k = 1, 2, ...:
    # k = 1 (lnf 0.405) is under u, k = 2 (0.811) above it. From k = 3 each
    # log-norm grows 0.405 a step, u at most 0.095, and the threshold by at
    # most e^0.04 (track_max_rise, and a spread step of at most 0.05 * 0.4):
    # 1.5^3 = 3.375 > 3 * 1.08 (t after k = 2: e^(0.04 + 0.039)), so every
    # step from k = 3 on is an explosion, and the fifth in a row (k = 7,
    # step 106) fires the emergency.
    norms = np.concatenate([np.ones(100, np.float32), np.float32(1.5) ** np.arange(1, 13)])
    _, r = run(norms, initial_threshold=1.0)
    assert not r["explosion"][:102].any()
    assert r["explosion"][102:].all()
    assert list(np.flatnonzero(np.diff(r["emergencies"], prepend=0))) == [106]


def test_track_quantile_zero_counts_every_norm_over_three_thresholds():
    # track_quantile = 0: no quantile; every 100 of the bimodal stream is over
    # 3 * t, so each is an explosion.
    config = dataclasses.replace(DEFAULT, track_quantile=0.0)
    _, r = run(bimodal(100), config=config, initial_threshold=1.0)
    np.testing.assert_array_equal(np.flatnonzero(r["explosion"]), np.arange(3, 400, 4))


def test_a_norm_over_three_thresholds_under_the_quantile_is_cut_but_not_counted():
    # The cut and the anchor act on every norm over 3 * t, counted or not:
    # the case (0.0, -0.05) of the test above with u = 20 on entry (lnf(1e4)
    # = 9.21 under it). No explosion is counted, the centre is cut to -0.05
    # as there, the anchor stays 0, and u falls by 0.1 * 0.05 = 0.005.
    config = dataclasses.replace(HAND, track_quantile=0.95)
    state = fresh(norm_quantile=20.0, **RISING)
    _, new = one_step(state, 1e4, config=config)
    assert int(new.explosion_count) == 0 and int(new.consecutive_explosions) == 0
    assert float(new.ema_mean) == pytest.approx(-0.05, abs=1e-5)
    assert float(new.centre_anchor) == 0.0
    assert float(new.norm_quantile) == pytest.approx(19.995, rel=RTOL32)


# --- The loss gate: a climbing loss marks an explosion in progress ----------


def test_an_explosion_with_a_climbing_loss_is_tightened_within_the_floor():
    calm, climb, settle = 400, 100, 600
    n = calm + climb + settle
    norms = lognormal(n, seed=5)
    loss = (1.0 + 0.02 * np.random.default_rng(6).normal(size=n)).astype(np.float32)
    k = np.arange(climb)
    norms[calm : calm + climb] *= 1.1**k  # up to 1.1^99 ~ 1.25e4
    loss[calm : calm + climb] = 100.0 ** (k / (climb - 1))  # 1 -> 100
    _, r = run(norms, loss, initial_threshold=1.0)
    end = calm + climb
    # The gate, as SPEC.md defines it, on the state after each step: the unit
    # is max(spread, track_loss_rel * |reference|) (track_loss_k = 1).
    unit = np.maximum(
        r["loss_spread"], np.float32(DEFAULT.track_loss_rel) * abs(r["loss_reference"])
    )
    rising = r["loss_centre"] > r["loss_reference"] + unit
    assert not rising[calm - 1] and rising[end - 1]
    first = np.argmax(rising[calm:]) + calm  # the first step that leaves the gate rising
    # The gate stays shut through the climb, except for the steps right after
    # the emergency, which takes the loss centre as the new reference. The
    # still-climbing loss closes it again once the centre is a unit above it,
    # u = 0.2 |reference|: the loss is far above the centre, so the centre
    # rises by r * Bc a step, Bc = 10 spreads (the spread is not learned while
    # the gate is shut or on explosions, so it stays as on entry), and the
    # reference itself drifts up by only 0.002 of the gap. So the gate is open
    # for at most ceil(u / (r * Bc)) + 1 steps after the emergency. Each
    # track_accept_steps-th explosion of the unbroken run accepts the loss
    # level in the same way: in a window of W steps at most ceil(W / 50) of
    # them, each reopening the gate for as long.
    fire = int(np.argmax(r["emergencies"][first:end] > r["emergencies"][first - 1])) + first
    u = DEFAULT.track_loss_rel * abs(r["loss_reference"][fire])
    per_step = DEFAULT.track_rate * 10 * r["loss_spread"][fire]
    reopened = math.ceil(u / per_step) + 1
    # Short against the climb (18 steps here). The norms grow by 1.1x a step
    # with noise, about as fast as the quantile u rises (0.095 a step), so a
    # few of them fall under u and break the run of explosions: the
    # emergency fires at step 431 (423 without the quantile), at a higher
    # loss reference and so a larger unit u.
    assert reopened < climb // 5
    accepts = 1 + math.ceil((end - first) / DEFAULT.track_accept_steps)
    assert rising[first:end].sum() >= (end - first) - accepts * reopened
    # From then on every step is an explosion or enters with the gate rising:
    # the anchor ("calm steps while not rising") stays frozen.
    anchor = r["anchor"][first]
    np.testing.assert_array_equal(r["anchor"][first:end], anchor)
    # What SPEC.md guarantees: the tightening never takes c below
    # anchor - ln(track_max_cut) (nor raises it); the only other cut is an
    # emergency's ln 0.5, at most once per 400 steps; the tracker itself only
    # moves c down towards norms under it (none here: the norms are above).
    # So on every step from the climb until the loss settles:
    #   t = exp(c + d) >= exp(anchor - ln 10 - E ln 2 + d), E emergencies so far.
    emergencies = r["emergencies"][first:end] - r["emergencies"][first - 1]
    assert emergencies[-1] <= 1
    floor = np.exp(anchor - LN10 - emergencies * LN2 + r["spread"][first:end])
    assert (r["thr"][first:end] >= floor * (1 - RTOL32)).all()
    # Here the emergency came early in the climb (the 5th explosion, with c
    # still far above the floor), so the tightening reaches the floor, c =
    # anchor - ln 10; only a reopening of the gate by an accepted loss level
    # (the 50th, 100th explosion of the run) can lift it again, by at most
    # track_max_rise a step for the `reopened` steps the gate stays open, too
    # close to the end of the climb for the cut to take it back down.
    lift = reopened * DEFAULT.track_max_rise
    assert anchor - LN10 - 1e-5 <= r["centre"][end - 1] <= anchor - LN10 + lift + 1e-5
    assert r["thr"][end - 1] < r["thr"][calm - 1] / 5
    assert r["thr"][first:end].min() >= math.exp(anchor) / 10 * (1 - RTOL32)
    # Once the loss settles back to ~1, the loss centre sinks under the gate,
    # the centre rises again, and the tracker recovers within 400 steps.
    ratios = ratio_to_median(norms, r["thr"])
    assert within(ratios[end + 400 :])
    assert not r["explosion"][end + 300 : end + 400].any()


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
    state, r = run(norms, losses, config=DEFAULT, learning_rate=learning_rate)
    ratios = ratio_to_median(norms, r["thr"])
    assert ratios[400:].min() >= 0.3
    assert int(state.explosion_count) <= 0.05 * n


# --- Correct gradients without scale_loss ------------------------------------


def test_default_needs_no_scale_loss_after_a_burst_of_explosions():
    # Ten plain gradients of norm 100 (explosions against t ~ 1), then a calm
    # one of norm 0.01.
    norms = [100.0] * 10 + [0.01]
    state, r = run(norms, initial_threshold=1.0)
    # Default: one emergency (once per unbroken run), t stays ~0.5-0.7, and
    # with loss scaling off the calm gradient passes unchanged.
    assert r["explosion"][:10].all() and r["emergencies"][-1] == 1
    assert not r["clipped"][10] and r["out"][10] == np.float32(0.01)
    assert float(og.loss_scale(state)) == 1.0 and (r["scale"] == 1.0).all()
    # presets.seed() divides by a scale the plain gradient never got: the
    # fifth explosion fires (t 1 -> 0.5, s = max(0.8^5 * 0.1, 0.1) = 0.1), the
    # next five (s stays at its floor 0.1) fire again (t -> 0.25), and the
    # calm step's unscaled norm 0.01 / 0.1 = 0.1 < 0.25 comes out as
    # 0.01 / 0.1 = 10 x the input: its gradients must come from scale_loss.
    state, r = run(norms, learning_rate=1e-2, config=presets.seed())
    assert r["emergencies"][-1] == 2 and r["thr"][9] == pytest.approx(0.25, rel=1e-6)
    assert float(og.loss_scale(state)) == pytest.approx(0.1, rel=1e-6)
    assert not r["clipped"][10] and r["out"][10] == pytest.approx(0.1, rel=1e-6)


# --- presets.seed(): the original worked example ---------------------------------


def test_seed_reproduces_the_worked_emergency_example():
    # SPEC.md, "Emergency intervention": lr 1e-2 (t = 1), five steps of norm
    # 100 (the gradients of scale_loss: raw 100 * s, unscaled 100). Each
    # explodes; s = 1 -> 0.8 -> 0.64 -> 0.512 -> 0.4096 -> 0.32768, and the
    # fifth fires: t = 0.5, s = max(0.032768, 0.1) = 0.1, consecutive 0.
    tx = og.stabilize(1e-2, config=presets.seed())
    state = jax.jit(tx.init)(PARAMS)
    assert float(state.clip_threshold) == pytest.approx(1.0, rel=1e-6)

    def body(s, _):
        _, s = tx.update({"w": jnp.float32(100.0) * s.loss_scale[None]}, s, PARAMS)
        return s, (s.clip_threshold, s.loss_scale, s.last_grad_norm)

    state, (thr, scale, norm) = jax.jit(lambda s: jax.lax.scan(body, s, None, length=5))(state)
    np.testing.assert_allclose(norm, 100.0, rtol=1e-6)
    np.testing.assert_allclose(thr, [1.0, 1.0, 1.0, 1.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(scale, [0.8, 0.64, 0.512, 0.4096, 0.1], rtol=1e-6)
    assert int(state.explosion_count) == 5
    assert int(state.consecutive_explosions) == 0
    assert int(state.emergency_count) == 1
