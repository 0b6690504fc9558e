"""The whole optimizer state round-trips through Orbax and msgpack; resuming is bit-exact."""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_gradflow as og
from optax_gradflow.config import StabilizerConfig
from optax_gradflow.state import FLAG_ADAPTED, FLAG_EMERGENCY

STEPS = 30
RESUME_AT = 14  # inside the burst: 2 of its 5 explosions are still to come
BURST = range(12, 17)  # five huge gradients: the fifth (step 16) fires the emergency

CONFIG = StabilizerConfig(adaptation_interval=10, warmup_steps=0)


def optimizers():
    return {
        "chain": optax.chain(og.stabilize(config=CONFIG, initial_threshold=1.0), optax.adam(1e-2)),
        "wrapper": og.stabilized(optax.adam(1e-2), config=CONFIG, initial_threshold=1.0),
    }


def init_params():
    return {"w": jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32), "b": jnp.ones(2, jnp.float32)}


def make_step(opt):
    def loss_fn(params, k):
        target = jnp.sin(k.astype(jnp.float32) + jnp.arange(6, dtype=jnp.float32))
        loss = 0.05 * jnp.sum((params["w"] - target) ** 2) + 0.01 * jnp.sum(params["b"] ** 2)
        # Huge gradients in the burst; a tiny perturbation keeps the rest varied.
        return jnp.where((k >= BURST.start) & (k < BURST.stop), 1e4, 1.0) * loss

    @jax.jit
    def step(params, state, k):
        # The gradient of the scaled loss, as a user of loss scaling computes it.
        loss, grads = jax.value_and_grad(lambda p: og.scale_loss(loss_fn(p, k), state))(params)
        updates, state = opt.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    return step


_COMPILED = {}


def compiled(kind):
    """(optimizer, jitted step), built once per kind so that the tests share compilations."""
    if kind not in _COMPILED:
        opt = optimizers()[kind]
        _COMPILED[kind] = (opt, make_step(opt))
    return _COMPILED[kind]


def train(step, params, state, start, stop):
    for k in range(start, stop):
        params, state = step(params, state, jnp.int32(k))
    return params, state


def assert_bitwise_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        # Compare the bytes: exact, and NaN (last_loss before any value) equals NaN.
        assert x.tobytes() == y.tobytes()


def orbax_round_trip(tree, directory):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "ckpt", tree)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    restored = checkpointer.restore(directory / "ckpt", abstract)
    checkpointer.close()
    return restored


def msgpack_round_trip(tree, directory):
    del directory
    data = flax.serialization.to_bytes(tree)
    blank = jax.tree.map(jnp.zeros_like, tree)  # the target gives only the structure
    return flax.serialization.from_bytes(blank, data)


ROUND_TRIPS = {"orbax": orbax_round_trip, "msgpack": msgpack_round_trip}


@pytest.mark.parametrize("kind", ["chain", "wrapper"])
@pytest.mark.parametrize("fmt", ["orbax", "msgpack"])
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(kind, fmt, tmp_path):
    opt, step = compiled(kind)
    params0 = init_params()
    state0 = opt.init(params0)

    full_params, full_state = train(step, params0, state0, 0, STEPS)
    flow = og.find_states(full_state)[0][1]
    # The run is worth resuming: an emergency and adaptations after RESUME_AT.
    flags = np.asarray(flow.event_flags.values)[:STEPS]
    assert int(flow.emergency_count) == 1
    assert np.asarray(flow.emergency_steps.values)[0] == BURST[-1] > RESUME_AT
    assert [k for k in range(STEPS) if flags[k] & FLAG_ADAPTED] == [9, 19, 29]
    assert [k for k in range(STEPS) if flags[k] & FLAG_EMERGENCY] == [16]

    mid_params, mid_state = train(step, params0, state0, 0, RESUME_AT)
    mid_flow = og.find_states(mid_state)[0][1]
    assert int(mid_flow.consecutive_explosions) == 2  # steps 12 and 13
    restored = ROUND_TRIPS[fmt]({"params": mid_params, "opt_state": mid_state}, tmp_path)
    assert_bitwise_equal(restored, {"params": mid_params, "opt_state": mid_state})
    assert isinstance(og.find_states(restored["opt_state"])[0][1], og.GradientFlowState)

    resumed_params, resumed_state = train(
        step, restored["params"], restored["opt_state"], RESUME_AT, STEPS
    )
    assert_bitwise_equal(resumed_params, full_params)
    assert_bitwise_equal(resumed_state, full_state)


@pytest.mark.parametrize("fmt", ["orbax", "msgpack"])
def test_round_trip_keeps_types_and_dtypes(fmt, tmp_path):
    opt = optimizers()["wrapper"]
    state = opt.init(init_params())
    restored = ROUND_TRIPS[fmt](state, tmp_path)
    assert isinstance(restored, og.StabilizedState)
    assert isinstance(restored.flow, og.GradientFlowState)
    assert restored.flow.early_warning.dtype == jnp.bool_
    assert restored.flow.stabilizer_step.dtype == jnp.int32
    assert np.isnan(np.asarray(restored.flow.last_grad_norm))
    assert_bitwise_equal(restored, state)
