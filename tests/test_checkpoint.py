"""The whole optimizer state round-trips through Orbax and msgpack; resuming is bit-exact;
a checkpoint of the previous layout (2) is migrated (SPEC.md, "Layout version")."""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_gradflow as og
from optax_gradflow import constants
from optax_gradflow.config import StabilizerConfig
from optax_gradflow.constants import Event, StateVersionError
from optax_gradflow.state import (
    GradientFlowState,
    Ring,
    from_restored,
    to_flat,
)

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
    assert [k for k in range(STEPS) if flags[k] & Event.ADAPTED] == [9, 19, 29]
    assert [k for k in range(STEPS) if flags[k] & Event.EMERGENCY] == [16]

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


# --- A checkpoint of layout 2 or 3 --------------------------------------------


def map_flows(fn, tree):
    """``tree`` with ``fn`` applied to each GradientFlowState in it."""
    return jax.tree.map(
        lambda x: fn(x) if isinstance(x, GradientFlowState) else x,
        tree,
        is_leaf=lambda x: isinstance(x, GradientFlowState),
    )


def as_layout(flow, version):
    """``flow`` as an earlier release saved it: one leaf per scalar and a
    record per ring under their names, no ``norm_quantile`` (layouts 2 and
    3), no ring of exploding norms (layout 2), ``state_version`` ``version``."""
    dropped = {"norm_quantile"} if version < 4 else set()
    dropped |= {"explosion_norms"} if version == 2 else set()
    fields = {
        name: value._asdict() if isinstance(value, Ring) else value
        for name, value in flow.fields().items()
        if name not in dropped
    }
    fields["state_version"] = jnp.int32(version)
    return fields


def migrated(flow, version):
    """``flow`` as SPEC.md's migration of layout ``version`` rebuilds it: the
    quantile at the centre (layouts 2 and 3), and (layout 2) the ring of
    exploding norms empty; layout 4 only regrouped into this one."""
    if version < 4:
        flow = flow._replace(norm_quantile=flow.ema_mean)
    if version == 2:
        flow = flow._replace(explosion_norms=Ring.empty(CONFIG.event_history_size, jnp.float32))
    return flow


def save_orbax(tree, directory):
    path = directory / "ckpt"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    checkpointer.close()
    return path


def restore_orbax(path, target=None):
    checkpointer = ocp.StandardCheckpointer()
    restored = checkpointer.restore(path) if target is None else checkpointer.restore(path, target)
    checkpointer.close()
    return restored


def save_msgpack(tree, directory):
    del directory
    return flax.serialization.msgpack_serialize(flax.serialization.to_state_dict(tree))


def restore_msgpack(data, target=None):
    if target is None:
        return flax.serialization.msgpack_restore(data)
    return flax.serialization.from_bytes(target, data)


SAVES = {"orbax": (save_orbax, restore_orbax), "msgpack": (save_msgpack, restore_msgpack)}


@pytest.mark.parametrize("version", [2, 3, 4])
@pytest.mark.parametrize("kind", ["chain", "wrapper"])
@pytest.mark.parametrize("fmt", ["orbax", "msgpack"])
def test_an_earlier_layout_checkpoint_is_migrated_and_resumes_bit_for_bit(
    kind, fmt, version, tmp_path
):
    save, restore = SAVES[fmt]
    opt, step = compiled(kind)
    params0 = init_params()
    params, state = train(step, params0, opt.init(params0), 0, RESUME_AT)
    flow = og.find_states(state)[0][1]
    assert int(flow.explosion_norms.count) == 2  # steps 12 and 13: the ring to be lost
    # The quantile to be lost (layouts 2 and 3) is not the centre it restarts from.
    assert float(flow.norm_quantile) != float(flow.ema_mean)
    old = map_flows(lambda f: as_layout(f, version), state)
    saved = save({"params": params, "opt_state": old}, tmp_path)
    target = jax.eval_shape(lambda: {"params": params0, "opt_state": opt.init(params0)})

    # A target of this layout does not match the saved tree: Orbax and flax refuse it.
    with pytest.raises(ValueError):
        restore(saved, target)
    restored = from_restored(restore(saved), target)

    restored_flow = og.find_states(restored["opt_state"])[0][1]
    kept = flow.norm_quantile if version == 4 else flow.ema_mean
    assert float(restored_flow.norm_quantile) == float(kept)
    ring = restored_flow.explosion_norms
    if version == 2:
        np.testing.assert_array_equal(ring.values, np.zeros(CONFIG.event_history_size, np.float32))
        assert (int(ring.index), int(ring.count)) == (0, 0)
    else:
        assert int(ring.count) == 2
    # Everything else bit for bit, state_version 5 (as in the source).
    expected = {
        "params": params,
        "opt_state": map_flows(lambda f: migrated(f, version), state),
    }
    assert_bitwise_equal(restored, expected)
    assert int(restored_flow.state_version) == 5 == constants.STATE_VERSION

    # Resumed, the migrated state runs as the source with its ring emptied.
    got = train(step, restored["params"], restored["opt_state"], RESUME_AT, STEPS)
    want = train(step, expected["params"], expected["opt_state"], RESUME_AT, STEPS)
    assert_bitwise_equal(got, want)


@pytest.mark.parametrize("fmt", ["orbax", "msgpack"])
def test_a_checkpoint_of_layout_1_or_of_a_newer_layout_is_refused(fmt, tmp_path):
    save, restore = SAVES[fmt]
    opt = optimizers()["chain"]
    state = opt.init(init_params())
    target = jax.eval_shape(opt.init, init_params())

    def layout_1(flow):
        # Each ring as three flat fields, no state_version.
        flat = to_flat(flow)
        del flat["state_version"], flat["explosion_norms"], flat["norm_quantile"]
        del flat["explosion_norms_index"], flat["explosion_norms_count"]
        return flat

    old = save(map_flows(layout_1, state), tmp_path / "old")
    with pytest.raises(StateVersionError, match=r"layout version 1.*layout version 5"):
        from_restored(restore(old), target)
    newer = save(map_flows(lambda f: as_layout(f, version=6), state), tmp_path / "newer")
    with pytest.raises(StateVersionError, match="newer release"):
        from_restored(restore(newer), target)
