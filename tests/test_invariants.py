"""Invariants every configuration passes: jit, no recompilation, dtypes, wrappers, no host sync."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradflow as og
from optax_gradflow import presets

SHORT = og.StabilizerConfig(
    adaptation_interval=3,
    adaptation_rule="percentile",
    diagnostics_interval=4,
    diagnostics_window=4,
    norm_history_size=8,
    warmup_steps=2,
    event_history_size=8,
    threshold_history_size=4,
    loss_scale_history_size=4,
    variance_history_size=4,
    emergency_history_size=2,
    emergency_patience=2,
)

# The default "track" rule with short periods: the emergency (patience 2)
# fires, re-arms, and its hold runs out within the nine steps of a test.
SHORT_TRACK = og.StabilizerConfig(
    adaptation_interval=3,
    diagnostics_interval=4,
    diagnostics_window=4,
    norm_history_size=8,
    event_history_size=8,
    threshold_history_size=4,
    loss_scale_history_size=4,
    variance_history_size=4,
    emergency_history_size=2,
    emergency_patience=2,
    emergency_hold_steps=2,
    emergency_rearm_steps=3,
)

CONFIGS = {
    # The default config (the "track" rule, no loss scaling).
    "default_learning_rate": lambda: og.stabilize(1e-3),
    "default_data_mode": lambda: og.stabilize(),
    "default_explicit": lambda: og.stabilize(initial_threshold=1.0),
    "track_short_loss_scaling": lambda: og.stabilize(
        1e-2, config=dataclasses.replace(SHORT_TRACK, loss_scaling=True)
    ),
    # The original design, literally.
    "seed_learning_rate": lambda: og.stabilize(1e-3, config=presets.seed()),
    "seed_data_warmup": lambda: og.stabilize(config=presets.seed()),
    "seed_wrapper_adam": lambda: og.stabilized(optax.adam(1e-3), 1e-3, config=presets.seed()),
    # Other rules.
    "short_intervals": lambda: og.stabilize(config=SHORT),
    "mean_std_growth": lambda: og.stabilize(
        1e-2,
        config=og.StabilizerConfig(
            adaptation_rule="mean_std", loss_scaling=True, growth_interval=2
        ),
    ),
    "wrapper_adam": lambda: og.stabilized(optax.adam(1e-3), 1e-3),
    "chain_adam": lambda: optax.chain(og.stabilize(1e-3), optax.adam(1e-3)),
}


def _params(dtype=jnp.float32):
    return {
        "dense": {"kernel": jnp.ones((3, 4), dtype), "bias": jnp.zeros((4,), dtype)},
        "scalar": jnp.asarray(0.5, dtype),
    }


def _grads(k, dtype=jnp.float32):
    # A mix of calm, clipped, exploding, vanishing and non-finite steps.
    scale = [0.1, 1.0, 50.0, 1e-9, 0.3, float("nan"), 2.0][k % 7]
    base = _params(jnp.float32)
    leaves = jax.tree.map(lambda p: jnp.full(p.shape, scale, jnp.float32), base)
    return jax.tree.map(lambda g: g.astype(dtype), leaves)


def _state_signature(state):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), state)


@pytest.fixture(params=sorted(CONFIGS))
def opt(request):
    return CONFIGS[request.param]()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes_and_state_structure_are_preserved(opt, dtype):
    params = _params(dtype)
    state = opt.init(params)
    signature = _state_signature(state)
    update = jax.jit(opt.update)
    for k in range(9):
        updates, state = update(_grads(k, dtype), state, params)
        assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(updates))
        assert _state_signature(state) == signature
        assert jax.tree.structure(state) == jax.tree.structure(opt.init(params))


def test_float64_gradients_keep_their_dtype_with_x64(opt):
    with jax.enable_x64(True):
        params = _params(jnp.float64)
        state = opt.init(params)
        signature = _state_signature(state)
        updates, state = jax.jit(opt.update)(_grads(2, jnp.float64), state, params)
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(updates))
        assert _state_signature(state) == signature
        flow = og.find_states(state)[0][1]
        assert flow.clip_threshold.dtype == jnp.float32


def test_second_call_does_not_recompile(opt):
    params = _params()
    state = opt.init(params)
    update = jax.jit(opt.update)
    for k in range(5):
        _, state = update(_grads(k), state, params)
    assert update._cache_size() == 1


def test_value_every_step_keeps_one_compilation_and_finite_state(opt):
    # The loss (value=) feeds the "track" rule's loss gate: a climbing, then a
    # non-finite loss must neither recompile nor put NaN into the thresholds.
    params = _params()
    state = opt.init(params)
    update = jax.jit(opt.update)
    losses = [1.0, 2.0, 4.0, 8.0, float("nan"), 16.0, 1.0, 1.0, 1.0]
    for k, loss in enumerate(losses):
        _, state = update(_grads(k), state, params, value=jnp.float32(loss))
    assert update._cache_size() == 1
    flow = og.find_states(state)[0][1]
    assert int(flow.stabilizer_step) == len(losses)
    assert np.isfinite(float(flow.clip_threshold)) and float(flow.clip_threshold) > 0
    assert np.all(np.isfinite(np.asarray(flow.threshold_history.values)))


def test_extra_args_are_accepted(opt):
    params = _params()
    state = opt.init(params)
    updates, _ = jax.jit(opt.update)(
        _grads(1), state, params, value=jnp.float32(0.3), unrelated=jnp.ones(2)
    )
    assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_inside_multisteps(opt):
    ms = optax.MultiSteps(opt, every_k_schedule=2)
    params = _params()
    state = ms.init(params)
    update = jax.jit(ms.update)
    for k in range(6):
        updates, state = update(_grads(k), state, params)
        assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
    flow = og.find_states(state)[0][1]
    # Six micro-steps, every second one reaches the stabilizer.
    assert int(flow.stabilizer_step) == 3


def test_inject_hyperparams():
    opt = optax.inject_hyperparams(og.stabilize)(learning_rate=1e-2)
    params = _params()
    state = opt.init(params)
    assert float(og.loss_scale(state)) == 1.0
    assert float(og.find_states(state)[0][1].clip_threshold) == pytest.approx(1.0, rel=1e-6)
    update = jax.jit(opt.update)
    for k in range(4):
        _, state = update(_grads(k), state, params)
    assert update._cache_size() == 1
    assert int(og.find_states(state)[0][1].stabilizer_step) == 4


def test_inject_hyperparams_with_jitted_init():
    opt = optax.inject_hyperparams(og.stabilize)(learning_rate=1e-2)
    state = jax.jit(opt.init)(_params())
    assert float(og.find_states(state)[0][1].clip_threshold) == pytest.approx(1.0, rel=1e-6)


def test_no_host_transfer_in_twenty_jitted_steps(opt):
    params = _params()
    state = opt.init(params)
    update = jax.jit(opt.update)
    grads = [jax.device_put(_grads(k)) for k in range(20)]
    params = jax.device_put(params)
    update(grads[0], state, params)  # compile outside the guard
    with jax.transfer_guard("disallow"):
        for g in grads:
            _, state = update(g, state, params)
    assert int(og.find_states(state)[0][1].stabilizer_step) == 20


def test_vmap_over_independent_runs():
    opt = og.stabilize(1e-2)
    params = {"w": jnp.zeros((3, 2))}  # three runs of a 2-vector
    state = jax.vmap(opt.init)(params)
    grads = {"w": jnp.array([[0.1, 0.1], [30.0, 40.0], [jnp.nan, 1.0]])}
    out, state = jax.jit(jax.vmap(opt.update))(grads, state)
    np.testing.assert_allclose(out["w"][0], [0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(out["w"][1], [0.6, 0.8], rtol=1e-6)  # clipped to t = 1
    np.testing.assert_array_equal(out["w"][2], [0.0, 0.0])
    np.testing.assert_array_equal(state.explosion_count, [0, 1, 0])
    np.testing.assert_array_equal(state.nonfinite_count, [0, 0, 1])


def test_none_leaves_empty_trees_and_scalars():
    opt = og.stabilize(initial_threshold=1.0)
    params = {"a": None, "s": jnp.float32(0.0), "w": jnp.zeros(2)}
    state = opt.init(params)
    grads = {"a": None, "s": jnp.float32(3.0), "w": jnp.array([4.0, 0.0])}
    out, state = jax.jit(opt.update)(grads, state)
    assert out["a"] is None
    # Norm 5 > 1: clipped by 1 / 5.
    np.testing.assert_allclose(out["s"], 0.6, rtol=1e-6)
    np.testing.assert_allclose(out["w"], [0.8, 0.0], rtol=1e-6)
    assert float(state.last_grad_norm) == pytest.approx(5.0, rel=1e-6)

    empty = og.stabilize(1e-2)
    state = empty.init({})
    out, state = jax.jit(empty.update)({}, state)
    assert out == {} and int(state.vanishing_count) == 1


def test_a_fresh_state_can_be_donated():
    opt = og.stabilize(1e-2)
    params = _params()
    update = jax.jit(opt.update, donate_argnums=(1,))
    _, state = update(_grads(1), opt.init(params), params)
    assert int(og.find_states(state)[0][1].stabilizer_step) == 1
