"""Scenario tests of the stabilizer: each expected number is derived by hand from SPEC.md."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import run_steps, vec

import optax_gradflow as og
from optax_gradflow import presets
from optax_gradflow.config import INT32_MAX
from optax_gradflow.constants import Event

RTOL = 1e-6

# The original design (SPEC.md, "Presets": seed): the median_mad rule,
# min_threshold 0.1, loss scaling on. The hand-derived numbers of the original
# behaviour (the emergency's halving, the x0.8 / x0.5 / x1.5 scale rule, the
# warm-up at twice the median) are checked against it; the default's "track"
# rule has its own hand-derived tests in test_track_rule.py.
SEED = presets.seed()


def flow(state):
    return og.find_states(state)[0][1]


# --- Initial threshold ("Initial threshold") ---------------------------------


def test_learning_rate_1e_2_gives_threshold_1():
    # 0.1 * sqrt(1 / 0.01) = 0.1 * 10 = 1.
    state = og.stabilize(1e-2).init({"w": jnp.zeros(3)})
    assert float(state.clip_threshold) == pytest.approx(1.0, rel=RTOL)
    assert int(state.warmup_steps_left) == 0


def test_schedule_is_read_at_step_zero():
    # A schedule starting at 1e-4: 0.1 * sqrt(1e4) = 10.
    sched = optax.exponential_decay(1e-4, transition_steps=10, decay_rate=0.5)
    state = og.stabilize(sched).init({"w": jnp.zeros(3)})
    assert float(state.clip_threshold) == pytest.approx(10.0, rel=RTOL)


def test_large_learning_rate_is_floored_at_min_threshold():
    # presets.seed(): 0.1 * sqrt(1 / 10) = 0.0316 < min_threshold 0.1.
    state = og.stabilize(10.0, config=SEED).init({"w": jnp.zeros(3)})
    assert float(state.clip_threshold) == pytest.approx(0.1, rel=RTOL)


def test_large_learning_rate_is_not_floored_by_default():
    # The default floor 1e-30 only protects the arithmetic: 0.1 * sqrt(1 / 10).
    state = og.stabilize(10.0).init({"w": jnp.zeros(3)})
    assert float(state.clip_threshold) == pytest.approx(0.1 * math.sqrt(0.1), rel=RTOL)


def test_explicit_threshold_wins_over_learning_rate():
    state = og.stabilize(1e-2, initial_threshold=7.0).init({"w": jnp.zeros(3)})
    assert float(state.clip_threshold) == 7.0


class _FakeStore:
    def __init__(self, value):
        self.value = value
        self.calls = []

    def lookup(self, params, label=None):
        self.calls.append(label)
        return self.value


def test_store_wins_over_learning_rate_and_loses_to_explicit():
    params = {"w": jnp.zeros(3)}
    store = _FakeStore(4.0)
    state = og.stabilize(1e-2, store=store, label="net").init(params)
    assert float(state.clip_threshold) == 4.0 and store.calls == ["net"]
    state = og.stabilize(1e-2, initial_threshold=2.0, store=store).init(params)
    assert float(state.clip_threshold) == 2.0
    # A store without a record falls through to the learning rate.
    state = og.stabilize(1e-2, store=_FakeStore(None)).init(params)
    assert float(state.clip_threshold) == pytest.approx(1.0, rel=RTOL)


def test_data_mode_starts_in_warmup():
    # presets.seed(): a warm-up of warmup_steps = 100; the placeholder is
    # min_threshold = 0.1.
    state = og.stabilize(config=SEED).init({"w": jnp.zeros(3)})
    assert int(state.warmup_steps_left) == 100
    assert float(state.clip_threshold) == pytest.approx(0.1, rel=RTOL)


def test_data_mode_of_the_track_rule_waits_for_one_finite_norm():
    # Default ("track"): warmup_steps_left = 1 whatever warmup_steps says; with
    # all-zero parameters there is no cap: clip_threshold = max_threshold (inf).
    state = og.stabilize().init({"w": jnp.zeros(3)})
    assert int(state.warmup_steps_left) == 1
    assert float(state.clip_threshold) == math.inf


def test_data_mode_caps_the_first_threshold_by_the_parameters():
    # SPEC.md, "Initial threshold" 4: |[3, 4]| = 5, cap = 0.05 * 5 = 0.25.
    params = {"w": jnp.array([3.0, 4.0])}
    opt = og.stabilize()
    state = opt.init(params)
    assert int(state.warmup_steps_left) == 1
    assert float(state.clip_threshold) == pytest.approx(0.25, rel=RTOL)
    # A first norm of 50 (|[30, 40]|) is clipped to the cap: g * 0.25 / 50,
    # and starts the tracker at lnf(min(50, 0.25)) = ln 0.25 (d = 0, t' = 0.25).
    out, state = jax.jit(opt.update)({"w": jnp.array([30.0, 40.0])}, state, params)
    np.testing.assert_allclose(out["w"], [0.15, 0.2], rtol=RTOL)
    assert float(state.ema_mean) == pytest.approx(math.log(0.25), rel=RTOL)
    assert float(state.clip_threshold) == pytest.approx(0.25, rel=RTOL)
    # A first norm under the cap (0.05 = |[0.03, 0.04]|) is not clipped and
    # starts the tracker at its own level, as without a cap.
    out, state = jax.jit(opt.update)({"w": jnp.array([0.03, 0.04])}, opt.init(params), params)
    np.testing.assert_allclose(out["w"], [0.03, 0.04], rtol=RTOL)
    assert float(state.clip_threshold) == pytest.approx(0.05, rel=RTOL)
    # param_threshold_scale = 0: no cap, the first norm is not clipped.
    free = og.stabilize(config=og.StabilizerConfig(param_threshold_scale=0.0))
    assert float(free.init(params).clip_threshold) == math.inf
    # A learning rate wins over the cap: 0.1 * sqrt(1 / 1e-2) = 1.
    assert float(og.stabilize(1e-2).init(params).clip_threshold) == pytest.approx(1.0, rel=RTOL)


# --- Classification and output ("Per-step order" 3-4) ----------------------


def test_clipping_rescales_to_the_threshold():
    # |[3, 4]| = 5 > t = 2 (and 5 <= 3 * 2: no explosion): g * 2 / 5.
    (out,), (state,) = run_steps(og.stabilize(initial_threshold=2.0), [vec(3.0, 4.0)])
    np.testing.assert_allclose(out["w"], [1.2, 1.6], rtol=RTOL)
    assert int(state.clip_count) == 1 and int(state.explosion_count) == 0
    assert int(state.event_flags.values[0]) == Event.CLIPPED
    assert float(state.loss_scale) == 1.0


def test_norm_exactly_at_threshold_is_not_clipped():
    (out,), (state,) = run_steps(og.stabilize(initial_threshold=5.0), [vec(3.0, 4.0)])
    np.testing.assert_array_equal(out["w"], [3.0, 4.0])
    assert int(state.clip_count) == 0 and int(state.event_flags.values[0]) == 0


def test_explosion_is_clipped_counted_and_backs_off_the_scale():
    # |[30, 40]| = 50 > 3 * 2: explosion; output 2 * [0.6, 0.8]; scale 1 * 0.8
    # (presets.seed(): loss scaling on).
    opt = og.stabilize(config=SEED, initial_threshold=2.0)
    (out,), (state,) = run_steps(opt, [vec(30.0, 40.0)])
    np.testing.assert_allclose(out["w"], [1.2, 1.6], rtol=RTOL)
    assert int(state.explosion_count) == 1 and int(state.clip_count) == 1
    assert int(state.consecutive_explosions) == 1
    assert int(state.event_flags.values[0]) == Event.CLIPPED | Event.EXPLOSION
    assert float(state.loss_scale) == pytest.approx(0.8, rel=RTOL)
    # Explosions stay out of the history.
    assert int(state.norm_history.count) == 0


def test_loss_scale_divides_out_of_gradients_and_norm():
    opt = og.stabilize(config=SEED, initial_threshold=10.0)
    state = opt.init({"w": jnp.zeros(2)})._replace(loss_scale=jnp.float32(4.0))
    # Scaled grads [12, 16]: raw norm 20, unscaled norm 5 < 10: output g / 4.
    out, state = jax.jit(opt.update)(vec(12.0, 16.0), state)
    np.testing.assert_allclose(out["w"], [3.0, 4.0], rtol=RTOL)
    assert float(state.last_grad_norm) == pytest.approx(5.0, rel=RTOL)
    # With t = 2.5 the unscaled norm 5 is clipped: g * 2.5 / 20.
    state = opt.init({"w": jnp.zeros(2)})._replace(
        loss_scale=jnp.float32(4.0), clip_threshold=jnp.float32(2.5)
    )
    out, state = jax.jit(opt.update)(vec(12.0, 16.0), state)
    np.testing.assert_allclose(out["w"], [1.5, 2.0], rtol=RTOL)


@pytest.mark.parametrize("cfg, scale", [(None, 1.0), (SEED, 1.5)], ids=["default", "seed"])
def test_all_zero_gradients_are_vanishing_and_stay_zero(cfg, scale):
    # Vanishing grows the scale x1.5 with loss scaling on (seed); the default
    # leaves it at 1.
    opt = og.stabilize(config=cfg, initial_threshold=1.0)
    (out,), (state,) = run_steps(opt, [vec(0.0, 0.0)])
    np.testing.assert_array_equal(out["w"], [0.0, 0.0])
    assert int(state.vanishing_count) == 1
    assert int(state.event_flags.values[0]) == Event.VANISHING
    assert float(state.loss_scale) == scale


def test_nonfinite_step_outputs_zeros_and_halves_the_scale():
    grads = [vec(1.0, jnp.nan), vec(jnp.inf, 1.0)]
    outs, states = run_steps(og.stabilize(config=SEED, initial_threshold=1.0), grads)
    for out in outs:
        np.testing.assert_array_equal(out["w"], [0.0, 0.0])
    assert [float(s.loss_scale) for s in states] == [0.5, 0.25]
    assert int(states[-1].nonfinite_count) == 2
    assert int(states[-1].consecutive_explosions) == 2
    assert int(states[-1].event_flags.values[1]) == Event.NONFINITE
    assert int(states[-1].norm_history.count) == 0


def test_float32_overflow_of_squares_counts_as_nonfinite():
    # 1e20 ** 2 overflows float32: SPEC "Per-step order" 1.
    (out,), (state,) = run_steps(og.stabilize(initial_threshold=1.0), [vec(1e20, 0.0)])
    np.testing.assert_array_equal(out["w"], [0.0, 0.0])
    assert int(state.nonfinite_count) == 1


# --- Loss scale rule --------------------------------------------------------


def test_vanishing_run_grows_scale_to_exactly_64_and_no_further():
    grads = [vec(1e-9, 0.0)] * 14
    _, states = run_steps(og.stabilize(config=SEED, initial_threshold=1.0), grads)
    scales = [float(s.loss_scale) for s in states]
    # 1.5 ** k for k = 1..10 (exact in float32: 3**k / 2**k), then 1.5 ** 11 =
    # 86.49 is clamped to 64.
    assert scales[:10] == [1.5**k for k in range(1, 11)]
    assert scales[10:] == [64.0] * 4
    assert int(states[-1].vanishing_count) == 14


def test_growth_interval_doubles_after_n_finite_steps_and_resets_on_overflow():
    cfg = og.StabilizerConfig(
        loss_scaling=True,
        explosion_backoff=1.0,
        vanishing_growth=1.0,
        growth_interval=3,
        initial_loss_scale=8.0,
        max_loss_scale=1024.0,
        emergency_patience=0,
    )
    grads = [vec(1.0)] * 3 + [vec(jnp.nan)] + [vec(1.0)] * 3
    _, states = run_steps(og.stabilize(config=cfg, initial_threshold=10.0), grads)
    # Finite steps 1, 2, 3 -> x2 on the third; NaN -> x0.5; three more -> x2.
    assert [float(s.loss_scale) for s in states] == [8, 8, 16, 8, 8, 8, 16]
    assert [int(s.loss_scale_growth_count) for s in states] == [1, 2, 0, 0, 1, 2, 0]


def test_scale_never_grows_to_inf():
    cfg = og.StabilizerConfig(
        loss_scaling=True,
        explosion_backoff=1.0,
        vanishing_growth=1.0,
        growth_interval=1,
        initial_loss_scale=2.0**127,
        min_loss_scale=1.0,
        max_loss_scale=math.inf,
    )
    _, states = run_steps(og.stabilize(config=cfg, initial_threshold=10.0), [vec(1.0)] * 2)
    # 2 ** 128 overflows float32: the scale stays 2 ** 127.
    assert [float(s.loss_scale) for s in states] == [2.0**127] * 2


def test_loss_scaling_off_keeps_scale_one():
    cfg = og.StabilizerConfig(loss_scaling=False)
    grads = [vec(jnp.nan), vec(1e-9), vec(100.0)]
    outs, states = run_steps(og.stabilize(config=cfg, initial_threshold=1.0), grads)
    assert [float(s.loss_scale) for s in states] == [1.0, 1.0, 1.0]
    np.testing.assert_array_equal(outs[1]["w"], np.float32([1e-9]))


def test_scale_loss_and_loss_scale_find_the_state_in_a_chain():
    stab = og.stabilize(1e-2, config=SEED)
    opt = optax.chain(optax.add_decayed_weights(1e-4), stab, optax.adam(1e-3))
    state = opt.init({"w": jnp.zeros(2)})
    assert float(og.loss_scale(state)) == 1.0
    _, state = opt.update(vec(100.0, 0.0), state, {"w": jnp.zeros(2)})
    # Norm 100 > 3 * 1: explosion, scale 0.8 (loss scaling on).
    assert float(og.scale_loss(jnp.float32(2.0), state)) == pytest.approx(1.6, rel=RTOL)
    assert og.scale_loss(jnp.bfloat16(2.0), state).dtype == jnp.bfloat16


def test_loss_scale_refuses_to_guess_between_several_stabilizers():
    opt = optax.partition({"a": og.stabilize(1e-2), "b": og.stabilize(1e-3)}, {"x": "a", "y": "b"})
    state = opt.init({"x": jnp.zeros(2), "y": jnp.zeros(2)})
    assert len(og.find_states(state)) == 2
    with pytest.raises(ValueError, match="Found 2"):
        og.loss_scale(state)
    with pytest.raises(ValueError, match="No GradientFlowState"):
        og.loss_scale(optax.adam(1e-3).init({"x": jnp.zeros(2)}))


# --- Emergency intervention -------------------------------------------------


def test_five_consecutive_explosions_fire_one_emergency():
    # SPEC.md, "Emergency intervention": the worked example with presets.seed().
    grads = [vec(100.0)] * 6
    _, states = run_steps(og.stabilize(1e-2, config=SEED), grads)
    # t = 1; each norm-100 step explodes; scale 0.8 ** k until the fifth step
    # fires: t = 0.5, s = max(0.8 ** 5 * 0.1, 0.1) = 0.1.
    for k, s in enumerate(states[:4], start=1):
        assert float(s.loss_scale) == pytest.approx(0.8**k, rel=RTOL)
        assert float(s.clip_threshold) == pytest.approx(1.0, rel=RTOL)
        assert int(s.consecutive_explosions) == k
    fifth = states[4]
    assert float(fifth.clip_threshold) == pytest.approx(0.5, rel=RTOL)
    assert float(fifth.loss_scale) == pytest.approx(0.1, rel=RTOL)
    assert int(fifth.emergency_count) == 1
    assert int(fifth.consecutive_explosions) == 0
    assert int(fifth.emergency_steps.values[0]) == 4
    assert int(fifth.event_flags.values[4]) & Event.EMERGENCY
    # The sixth explosion starts a new run of one: no second emergency.
    sixth = states[5]
    assert int(sixth.emergency_count) == 1 and int(sixth.consecutive_explosions) == 1
    assert float(sixth.clip_threshold) == pytest.approx(0.5, rel=RTOL)


def test_emergency_scale_factor_exact_above_the_floor():
    cfg = dataclasses.replace(SEED, min_loss_scale=1e-3)
    _, states = run_steps(og.stabilize(1e-2, config=cfg), [vec(100.0)] * 5)
    # 0.8 ** 5 * 0.1 = 0.032768.
    assert float(states[-1].loss_scale) == pytest.approx(0.032768, rel=RTOL)


def test_nonfinite_steps_take_the_scale_under_min_loss_scale_and_nothing_else_does():
    # Default floors: min_loss_scale 0.1, nonfinite_min_loss_scale 2**-24.
    # Six NaN steps halve the scale from 1 to 2**-6, past 0.1 (the fifth fires
    # the emergency, whose x0.1 is floored at min(0.1, 2**-5) = 2**-5); an
    # explosion (x0.8) and the emergency cannot lower it further, a calm step
    # keeps it (unscaled norm 0.001 / 2**-6 = 0.064), a vanishing step grows it
    # x1.5; the interval growth (2000 steps) is far off.
    cfg = og.StabilizerConfig(loss_scaling=True)
    grads = [vec(jnp.nan)] * 6 + [vec(100.0), vec(0.001), vec(0.0)]
    _, states = run_steps(og.stabilize(1e-2, config=cfg), grads)
    scales = [float(s.loss_scale) for s in states]
    assert scales == [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.015625, 0.015625, 0.0234375]
    assert int(states[4].emergency_count) == 1
    assert int(states[6].explosion_count) == int(states[8].explosion_count) == 1
    assert int(states[8].vanishing_count) == 1


def test_the_default_scale_doubles_back_after_2000_finite_steps():
    # growth_interval 2000 (GradScaler's and jmp's period), growth_factor 2:
    # three NaN steps take the scale from 1 to 0.125; the 2000th finite step
    # in a row after them doubles it to 0.25, the 1999th has not.
    cfg = og.StabilizerConfig(loss_scaling=True)
    opt = og.stabilize(1e-2, config=cfg)
    params = vec(0.0)
    update = jax.jit(opt.update)
    state = opt.init(params)
    for _ in range(3):
        _, state = update(vec(jnp.nan), state, params)
    assert float(state.loss_scale) == 0.125

    def finite(state, _):
        return update(vec(0.05), state, params)[1], None

    state, _ = jax.lax.scan(finite, state, None, length=1999)
    assert float(state.loss_scale) == 0.125
    assert int(state.loss_scale_growth_count) == 1999
    _, state = update(vec(0.05), state, params)
    assert float(state.loss_scale) == 0.25
    assert int(state.loss_scale_growth_count) == 0


def test_nonfinite_steps_stop_at_their_own_floor():
    cfg = og.StabilizerConfig(loss_scaling=True, nonfinite_min_loss_scale=0.05)
    _, states = run_steps(og.stabilize(1e-2, config=cfg), [vec(jnp.inf)] * 6)
    f32 = float(np.float32(0.05))
    assert [float(s.loss_scale) for s in states] == [0.5, 0.25, 0.125, 0.0625, f32, f32]
    # With both floors equal (presets.seed(), presets.mixed_precision()) the
    # scale never goes under min_loss_scale, as before the second floor.
    cfg = og.StabilizerConfig(loss_scaling=True, nonfinite_min_loss_scale=1.0)
    _, states = run_steps(og.stabilize(1e-2, config=cfg), [vec(jnp.inf)] * 6)
    assert float(states[-1].loss_scale) == float(np.float32(0.1))


def test_nonfinite_steps_count_toward_the_emergency():
    grads = [vec(100.0), vec(jnp.nan), vec(100.0), vec(jnp.inf), vec(100.0)]
    _, states = run_steps(og.stabilize(1e-2), grads)
    assert int(states[-1].emergency_count) == 1


def test_a_clean_step_resets_the_consecutive_count():
    grads = [vec(100.0)] * 4 + [vec(0.5)] + [vec(100.0)] * 4
    _, states = run_steps(og.stabilize(1e-2), grads)
    assert int(states[-1].emergency_count) == 0
    assert int(states[-1].consecutive_explosions) == 4


def test_emergency_threshold_is_floored_at_min_threshold():
    # presets.seed(): max(0.15 * 0.5, 0.1) = 0.1.
    opt = og.stabilize(config=SEED, initial_threshold=0.15)
    _, states = run_steps(opt, [vec(100.0)] * 5)
    assert float(states[-1].clip_threshold) == pytest.approx(0.1, rel=RTOL)


# --- Warm-up and adaptation -------------------------------------------------


def test_data_warmup_thresholds_follow_the_running_median():
    # Loss scaling off, so the explosion's backoff does not rescale later norms.
    cfg = og.StabilizerConfig(
        warmup_steps=4,
        adaptation_rule="percentile",
        adaptation_percentile=50.0,
        loss_scaling=False,
    )
    grads = [vec(5.0), vec(100.0), vec(7.0), vec(1.0), vec(2.0)]
    outs, states = run_steps(og.stabilize(config=cfg), grads)
    # Step 0: empty history, t = 5 (its own norm): not clipped.
    np.testing.assert_array_equal(outs[0]["w"], [5.0])
    assert float(states[0].clip_threshold) == 5.0
    # Step 1: t = 2 * median{5} = 10; 100 > 30 explodes, clipped to 10.
    np.testing.assert_allclose(outs[1]["w"], [10.0], rtol=RTOL)
    assert int(states[1].explosion_count) == 1 and int(states[1].norm_history.count) == 1
    # Step 2: t = 10 again (history {5}); 7 passes.
    np.testing.assert_array_equal(outs[2]["w"], [7.0])
    # Step 3 is the last warm-up step: t = 2 * median{5, 7} = 12; then the
    # rule (median) over {5, 7, 1} = 5 becomes the threshold.
    assert int(states[3].warmup_steps_left) == 0
    assert float(states[3].clip_threshold) == pytest.approx(5.0, rel=RTOL)
    assert int(states[3].event_flags.values[3]) == Event.ADAPTED
    # Step 4 uses it: 2 < 5.
    assert float(states[4].clip_threshold) == pytest.approx(5.0, rel=RTOL)


def test_warmup_never_leaves_a_step_after_the_first_unclipped():
    cfg = dataclasses.replace(SEED, warmup_steps=10)
    grads = [vec(1.0)] + [vec(2.5)] * 5
    outs, _ = run_steps(og.stabilize(config=cfg), grads)
    # Step 1: t = 2 * median{1} = 2, so 2.5 is clipped to 2 (no explosion:
    # 2.5 < 6) and pushed; step 2: t = 2 * median{1, 2.5} = 3.5, 2.5 passes.
    np.testing.assert_allclose(outs[1]["w"], [2.0], rtol=RTOL)
    np.testing.assert_array_equal(outs[2]["w"], [2.5])


def _adaptation_run(n_steps):
    cfg = og.StabilizerConfig(
        adaptation_rule="percentile", adaptation_percentile=50.0, adaptation_interval=100
    )
    # Norms 0.1, 0.2, ... (k % 10 + 1) / 10: all below t = 5, none explode.
    grads = [vec((k % 10 + 1) / 10) for k in range(n_steps)]
    return run_steps(og.stabilize(config=cfg, initial_threshold=5.0), grads)


def test_adaptation_boundaries_99_100_101():
    _, states = _adaptation_run(102)
    # After steps 0..98 the threshold is still the initial one.
    assert float(states[98].clip_threshold) == 5.0
    # Step 99 (the 100th) adapts: median of ten copies each of 0.1 .. 1.0 is
    # (0.5 + 0.6) / 2 = 0.55.
    assert float(states[99].clip_threshold) == pytest.approx(0.55, rel=RTOL)
    assert int(states[99].event_flags.values[99 % 100]) & Event.ADAPTED
    assert int(states[99].threshold_history.count) == 1
    # Step 100 uses it: its norm 0.1 passes; step 101 too.
    assert float(states[100].clip_threshold) == pytest.approx(0.55, rel=RTOL)
    assert float(states[101].clip_threshold) == pytest.approx(0.55, rel=RTOL)
    assert int(states[101].threshold_history.count) == 1


# History {1, 2, 3, 4, 100} (explosion_factor 1000 keeps 100 in it).
_HISTORY = np.array([1.0, 2.0, 3.0, 4.0, 100.0])


@pytest.mark.parametrize(
    "rule, k, expected",
    [
        # q = 90: pos = 0.9 * 4 = 3.6 -> 4 + 0.6 * (100 - 4).
        ("percentile", 0.0, 4.0 + 0.6 * 96.0),
        # median 3; |deviations| {2, 1, 0, 1, 97} have median 1.
        ("median_mad", 2.0, 3.0 + 2.0 * 1.4826 * 1.0),
        # mean 22, population std over five values.
        ("mean_std", 1.0, 22.0 + math.sqrt(((_HISTORY - 22.0) ** 2).sum() / 5)),
    ],
)
def test_adaptation_rules_by_hand(rule, k, expected):
    cfg = og.StabilizerConfig(
        adaptation_rule=rule, adaptation_k=k, adaptation_interval=5, explosion_factor=1000.0
    )
    grads = [vec(float(v)) for v in _HISTORY]
    _, states = run_steps(og.stabilize(config=cfg, initial_threshold=1.0), grads)
    assert float(states[-1].clip_threshold) == pytest.approx(expected, rel=1e-5)


def test_explosions_cannot_drag_the_threshold_up():
    cfg = og.StabilizerConfig(
        adaptation_interval=10,
        adaptation_rule="mean_std",
        emergency_patience=0,
        loss_scaling=False,
    )
    # Half the steps explode at norm 1000 against t = 1.
    grads = [vec(1000.0 if k % 2 else 0.5) for k in range(10)]
    _, states = run_steps(og.stabilize(config=cfg, initial_threshold=1.0), grads)
    # Only the five 0.5 norms are in the history: mean 0.5, std 0.
    assert int(states[-1].norm_history.count) == 5
    assert float(states[-1].clip_threshold) == pytest.approx(0.5, rel=RTOL)


def test_norm_history_keeps_the_latest_entries():
    cfg = og.StabilizerConfig(norm_history_size=3, diagnostics_window=2)
    grads = [vec(float(v)) for v in (1, 2, 3, 4)]
    _, states = run_steps(og.stabilize(config=cfg, initial_threshold=10.0), grads)
    s = states[-1]
    # Slots after 4 pushes into a ring of 3: [4, 2, 3], next write at 1.
    np.testing.assert_array_equal(s.norm_history.values, [4.0, 2.0, 3.0])
    assert int(s.norm_history.index) == 1 and int(s.norm_history.count) == 3


# --- Diagnostics ------------------------------------------------------------


def test_diagnostics_trend_and_variance_by_hand():
    cfg = og.StabilizerConfig(diagnostics_interval=5, diagnostics_window=5, trend_limit=0.05)
    norms = [math.exp(0.1 * j) for j in range(5)]
    _, states = run_steps(
        og.stabilize(config=cfg, initial_threshold=100.0), [vec(n) for n in norms]
    )
    s = states[-1]
    # log-norms 0, 0.1, ..., 0.4 on positions 0..4: slope 0.1 exactly.
    assert float(s.norm_trend) == pytest.approx(0.1, rel=1e-5)
    assert bool(s.early_warning)  # 0.1 > 0.05
    assert int(s.warning_count) == 1
    assert float(s.variance_history.values[0]) == pytest.approx(np.var(norms), rel=1e-5)
    assert int(s.variance_history.count) == 1
    # Not run on steps 0..3.
    assert int(states[3].variance_history.count) == 0 and float(states[3].norm_trend) == 0.0


def test_diagnostics_quiet_run_raises_no_warning():
    cfg = og.StabilizerConfig(diagnostics_interval=4, diagnostics_window=4)
    grads = [vec(v) for v in (1.0, 1.1, 0.9, 1.0)]
    _, states = run_steps(og.stabilize(config=cfg, initial_threshold=100.0), grads)
    # Relative variance 0.005 / 1 and slope ~ -0.01: both under the limits.
    assert not bool(states[-1].early_warning) and int(states[-1].warning_count) == 0


# --- Counters ---------------------------------------------------------------


def test_counters_saturate():
    opt = og.stabilize(initial_threshold=1.0)
    state = opt.init({"w": jnp.zeros(1)})
    state = state._replace(
        stabilizer_step=jnp.int32(INT32_MAX),
        explosion_count=jnp.int32(INT32_MAX),
        clip_count=jnp.int32(INT32_MAX),
        stable_streak=jnp.int32(INT32_MAX),
    )
    _, state = jax.jit(opt.update)(vec(100.0), state)
    assert int(state.stabilizer_step) == INT32_MAX
    assert int(state.explosion_count) == INT32_MAX
    assert int(state.clip_count) == INT32_MAX
    assert int(state.stable_streak) == 0  # reset by the explosion
    _, state = jax.jit(opt.update)(vec(0.5), state)
    assert int(state.stable_streak) == 1


def test_counters_add_up_over_a_mixed_run():
    grads = [vec(0.5), vec(2.0), vec(100.0), vec(jnp.nan), vec(1e-9), vec(0.5)]
    _, states = run_steps(og.stabilize(1e-2, config=SEED), grads)
    s = states[-1]
    assert int(s.stabilizer_step) == 6
    assert int(s.clip_count) == 2  # 2.0 and 100.0
    assert int(s.explosion_count) == 1
    assert int(s.nonfinite_count) == 1
    assert int(s.vanishing_count) == 1
    assert int(s.norm_history.count) == 4  # 0.5, 2.0, 1e-9, 0.5
    assert int(s.stable_streak) == 2
    # Scale: 1 -> 0.8 (explosion) -> 0.4 (NaN) -> 0.6 (vanishing); the last
    # raw norm 0.5 unscales to 0.5 / 0.6.
    assert float(s.loss_scale) == pytest.approx(0.6, rel=RTOL)
    assert float(s.last_grad_norm) == pytest.approx(0.5 / 0.6, rel=RTOL)


def test_value_is_recorded_as_last_loss():
    opt = og.stabilize(1e-2)
    state = opt.init({"w": jnp.zeros(1)})
    _, state = jax.jit(opt.update)(vec(0.5), state, value=jnp.float32(3.5))
    assert float(state.last_loss) == 3.5
    _, state = jax.jit(opt.update)(vec(0.5), state)
    assert float(state.last_loss) == 3.5


# --- Wrapper form -----------------------------------------------------------


def test_wrapper_nan_step_leaves_params_and_inner_state_bit_identical():
    opt = og.stabilized(optax.adam(1e-2), 1e-2)
    params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
    state = opt.init(params)
    update = jax.jit(opt.update)
    updates, state = update({"w": jnp.array([0.3, 0.1]), "b": jnp.array(0.2)}, state, params)
    params = optax.apply_updates(params, updates)
    before_params, before_inner = params, state.inner_state
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        grads = {"w": jnp.array([bad, 0.1]), "b": jnp.array(0.2)}
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    chex_equal = jax.tree.map(lambda a, b: np.array_equal(a, b), before_params, params)
    assert all(jax.tree.leaves(chex_equal))
    inner_equal = jax.tree.map(np.array_equal, before_inner, state.inner_state)
    assert all(jax.tree.leaves(inner_equal))
    assert int(state.flow.nonfinite_count) == 3


def test_chained_form_also_keeps_nan_out_of_params():
    opt = optax.chain(og.stabilize(1e-2), optax.adam(1e-2))
    params = {"w": jnp.ones(2)}
    state = opt.init(params)
    updates, state = jax.jit(opt.update)({"w": jnp.array([jnp.nan, 1.0])}, state, params)
    assert np.all(np.isfinite(optax.apply_updates(params, updates)["w"]))


def test_wrapper_records_update_ratio():
    opt = og.stabilized(optax.sgd(0.1), initial_threshold=100.0)
    params = {"w": jnp.array([3.0, 4.0])}
    state = opt.init(params)
    _, state = jax.jit(opt.update)({"w": jnp.array([1.0, 0.0])}, state, params)
    # Update -0.1 * [1, 0]: |u| = 0.1, |p| = 5: ratio 0.02.
    assert int(state.update_ratio_history.count) == 1
    assert float(state.update_ratio_history.values[0]) == pytest.approx(0.02, rel=RTOL)
    update = jax.jit(opt.update)
    # Steps 1 to 9 are not recorded (one record every UPDATE_RATIO_INTERVAL = 10
    # steps); step 10 is, unless it is skipped.
    for _ in range(9):
        _, state = update({"w": jnp.array([1.0, 0.0])}, state, params)
    assert int(state.update_ratio_history.count) == 1
    _, skipped = update({"w": jnp.array([jnp.nan, 0.0])}, state, params)
    assert int(skipped.update_ratio_history.count) == 1  # skipped steps record nothing
    _, applied = update({"w": jnp.array([0.0, 2.0])}, state, params)
    # Update -0.1 * [0, 2]: |u| = 0.2, |p| = 5: ratio 0.04.
    assert int(applied.update_ratio_history.count) == 2
    assert float(applied.update_ratio_history.values[1]) == pytest.approx(0.04, rel=RTOL)


def test_wrapper_passes_value_to_the_inner_optimizer():
    inner = optax.chain(optax.sgd(1.0), optax.contrib.reduce_on_plateau(patience=1))
    opt = og.stabilized(inner, 1e-2)
    params = {"w": jnp.ones(2)}
    state = opt.init(params)
    update = jax.jit(opt.update)
    for _ in range(4):
        _, state = update({"w": jnp.full(2, 0.1)}, state, params, value=jnp.float32(1.0))
    plateau = optax.tree.get(state, "scale")
    assert float(plateau) < 1.0  # the plateau was seen, so value reached it
    assert float(state.flow.last_loss) == 1.0


# --- Bad input --------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("min_threshold", 0.0),
        ("min_threshold", float("nan")),
        ("max_threshold", 1e-31),
        ("explosion_factor", 1.0),
        ("nonfinite_backoff", 1.0),
        ("explosion_backoff", 1.5),
        ("vanishing_growth", 0.5),
        ("growth_factor", 1.0),
        ("min_loss_scale", 100.0),
        ("initial_loss_scale", 1000.0),
        ("norm_history_size", 0),
        ("event_history_size", 0),
        ("diagnostics_window", 1),
        ("adaptation_rule", "mean"),
        ("adaptation_percentile", 101.0),
        ("emergency_patience", -1),
    ],
)
def test_config_rejects_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        og.StabilizerConfig(**{field: value})


def test_config_rejects_wrong_types():
    with pytest.raises(TypeError, match="norm_history_size"):
        og.StabilizerConfig(norm_history_size=10.0)
    with pytest.raises(TypeError, match="loss_scaling"):
        og.StabilizerConfig(loss_scaling=1)


def test_replace_validates_again():
    with pytest.raises(ValueError, match="warmup_multiplier"):
        dataclasses.replace(og.StabilizerConfig(), warmup_multiplier=0.5)


@pytest.mark.parametrize("lr", [-1e-3, float("nan"), float("inf")])
def test_bad_learning_rate(lr):
    # 0 is not an error: it starts from the data, with a warning
    # (tests/test_learning_rate.py).
    with pytest.raises(ValueError, match="learning_rate"):
        og.stabilize(lr)


def test_bad_schedule_value_at_zero():
    with pytest.raises(ValueError, match="learning_rate"):
        og.stabilize(optax.constant_schedule(-1.0))


@pytest.mark.parametrize("thr", [0.0, -1.0, float("nan"), 1e-31])
def test_bad_initial_threshold(thr):
    # 1e-31 is under the default min_threshold 1e-30.
    with pytest.raises(ValueError, match="initial_threshold"):
        og.stabilize(initial_threshold=thr)


def test_initial_threshold_under_the_seed_floor():
    # presets.seed(): min_threshold 0.1, so 0.05 is out of [min, max].
    with pytest.raises(ValueError, match="initial_threshold"):
        og.stabilize(initial_threshold=0.05, config=SEED)


def test_bad_config_type():
    with pytest.raises(TypeError, match="StabilizerConfig"):
        og.stabilize(config={"min_threshold": 0.1})


def test_state_of_another_configuration_is_refused():
    small = og.stabilize(
        1e-2, config=og.StabilizerConfig(norm_history_size=10, diagnostics_window=5)
    )
    state = small.init({"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match=r"norm_history.*different configuration"):
        og.stabilize(1e-2).update(vec(1.0, 1.0), state)


def test_gradient_structure_must_match_params():
    # SPEC.md, "Errors": the gradients are checked against the params passed
    # to the same update call.
    opt = og.stabilize(1e-2)
    params = {"w": jnp.zeros(2)}
    state = opt.init(params)
    with pytest.raises(ValueError, match="tree structure"):
        opt.update({"w": jnp.zeros(2), "b": jnp.zeros(1)}, state, params)
