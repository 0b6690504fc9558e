"""The step as named stages, the ring pytree, the state's layout version, and
what the compiled step does with its buffers (SPEC.md, "Per-step order",
"State")."""

import dataclasses
import inspect
import re
import subprocess
import sys

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradflow as og
from optax_gradflow import arithmetic, constants, pipeline, presets
from optax_gradflow.config import StabilizerConfig
from optax_gradflow.constants import STATE_VERSION, StateVersionError
from optax_gradflow.state import Ring, check_state, from_flat, to_flat

# --- Stage names -------------------------------------------------------------


def test_the_stages_are_the_spec_order():
    # SPEC.md's per-step order, read from the document itself.
    with open("SPEC.md", encoding="utf-8") as f:
        spec = f.read()
    section = spec[spec.index("## Per-step order") : spec.index("## Threshold adaptation")]
    named = re.findall(r"^\d+\. \*\*[^*]+\*\* \(`(\w+)`[);]", section, flags=re.M)
    assert tuple(named) == constants.STAGES


def test_each_stage_is_a_function_of_the_arithmetic_in_that_order():
    # Written once, for both frameworks: defined and called in SPEC.md's order.
    defined, called = [], []
    source = inspect.getsource(arithmetic.step)
    for name in constants.STAGES:
        stage = getattr(arithmetic, name)
        assert inspect.isfunction(stage) and stage.__module__ == arithmetic.__name__, name
        defined.append(inspect.getsourcelines(stage)[1])
        if name == "diagnose":  # called by record, after the merged conditional
            assert "diagnose(" in inspect.getsource(arithmetic.record)
            continue
        called.append(source.index(f"{name}("))
    assert defined == sorted(defined)
    assert called == sorted(called)


def test_the_jax_step_is_the_shared_arithmetic():
    assert "arithmetic.step(JaxOps(" in inspect.getsource(pipeline.step)


@pytest.mark.parametrize(
    "rule, cls",
    [
        ("track", pipeline.TrackRule),
        ("zscore", pipeline.ZScoreRule),
        ("percentile", pipeline.HistoryRule),
        ("median_mad", pipeline.HistoryRule),
        ("mean_std", pipeline.HistoryRule),
    ],
)
def test_the_rule_object_is_chosen_from_the_config(rule, cls):
    chosen = pipeline.rule_for(StabilizerConfig(adaptation_rule=rule))
    assert type(chosen) is cls


def test_the_step_never_compares_the_rule_name():
    for name in (*constants.STAGES, "step", "periodic_work"):
        assert "adaptation_rule" not in inspect.getsource(getattr(arithmetic, name)), name


# --- The ring ----------------------------------------------------------------


def test_ring_push_writes_one_slot_and_wraps():
    ring = Ring.empty(3, jnp.float32)
    for v in (1.0, 2.0, 3.0, 4.0):
        ring = ring.push(jnp.float32(v))
    # SPEC.md, "Ring buffers": the fourth push overwrites slot 0.
    np.testing.assert_array_equal(ring.values, [4.0, 2.0, 3.0])
    assert (int(ring.index), int(ring.count)) == (1, 3)
    assert float(ring.newest()) == 4.0
    skipped = ring.push(jnp.float32(9.0), False)
    np.testing.assert_array_equal(skipped.values, ring.values)
    assert (int(skipped.index), int(skipped.count)) == (1, 3)
    recent, valid = ring.chronological(3)
    np.testing.assert_array_equal(recent, [2.0, 3.0, 4.0])
    assert valid.all()


def test_ring_push_is_an_in_place_one_element_update():
    # The compiled push of a donated ring is a dynamic-update-slice of one
    # element: no copy of the ring, no select over the whole buffer.
    push = jax.jit(lambda r, x, d: r.push(x, d), donate_argnums=(0,))
    ring = Ring.empty(4096, jnp.float32)
    hlo = push.lower(ring, jnp.float32(1.0), jnp.bool_(True)).compile().as_text()
    assert "dynamic-update-slice" in hlo
    assert not re.search(r"f32\[4096\]\{0\} (copy|select)\(", hlo), hlo


# --- The layout version ----------------------------------------------------


def test_fresh_state_carries_the_layout_version():
    state = og.stabilize(1e-2).init({"w": jnp.ones(3)})
    assert int(state.state_version) == STATE_VERSION == 5
    flat = to_flat(state)
    assert tuple(flat) == constants.FLAT_FIELDS
    back = from_flat(flat)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def _old_layout(state) -> dict:
    """A state of layout 1: every ring as three flat fields, no version."""
    flat = {k: np.asarray(v) for k, v in to_flat(state).items()}
    del flat[constants.VERSION_FIELD]
    return flat


def test_an_old_layout_gets_an_error_naming_both_versions():
    state = og.stabilize(1e-2).init({"w": jnp.ones(3)})
    with pytest.raises(StateVersionError, match=r"layout version 1.*layout version 5"):
        from_flat(_old_layout(state))
    with pytest.raises(StateVersionError, match=r"layout version 1.*layout version 5"):
        check_state(_old_layout(state), StabilizerConfig())
    newer = dict(to_flat(state), state_version=np.int32(6))
    with pytest.raises(StateVersionError, match="newer release"):
        from_flat(newer)


def _with_explosions():
    """(transformation, params, a state whose ring of exploding norms holds two norms)."""
    tx = og.stabilize(config=StabilizerConfig(warmup_steps=0), initial_threshold=1.0)
    params = {"w": jnp.ones(3)}
    update = jax.jit(tx.update)
    state = tx.init(params)
    # Norms 0.5, 50, 0.5, 80: the two large ones exceed 3 x the threshold of 1.
    for g in (0.5, 50.0, 0.5, 80.0):
        _, state = update({"w": jnp.full(3, g / np.sqrt(3.0), jnp.float32)}, state, params)
    assert int(state.explosion_norms.count) == 2
    return tx, params, state


def _layout_2(flat) -> dict:
    """The flat form of ``flat`` as layout 2 had it: no ring of exploding
    norms, no ``norm_quantile``, ``state_version`` 2."""
    old = {k: np.asarray(v) for k, v in _layout_3(flat).items()}
    old = {k: v for k, v in old.items() if not k.startswith("explosion_norms")}
    old[constants.VERSION_FIELD] = np.int32(2)
    return old


def _layout_3(flat) -> dict:
    """The flat form of ``flat`` as layout 3 had it: no ``norm_quantile``,
    ``state_version`` 3."""
    old = {k: np.asarray(v) for k, v in flat.items() if k != "norm_quantile"}
    old[constants.VERSION_FIELD] = np.int32(3)
    return old


def _same_steps(tx, params, a, b):
    """The next step from ``a`` is, bit for bit, the step from ``b``."""
    update = jax.jit(tx.update)
    grads = {"w": jnp.full(3, 60.0, jnp.float32)}
    for x, y in zip(
        jax.tree.leaves(update(grads, a, params)),
        jax.tree.leaves(update(grads, b, params)),
        strict=True,
    ):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def _assert_same_flat(a, b):
    """Every field of ``a`` and ``b``, bit for bit, in the same dtype."""
    flat_a = to_flat(a)
    for name, value in to_flat(b).items():
        got = np.asarray(flat_a[name])
        assert got.dtype == value.dtype and got.tobytes() == np.asarray(value).tobytes(), name


def test_a_layout_3_flat_state_is_migrated_with_the_quantile_at_the_centre():
    tx, params, state = _with_explosions()
    migrated = from_flat(_layout_3(to_flat(state)))
    assert int(migrated.state_version) == STATE_VERSION
    # SPEC.md, "Layout version": u starts from the centre c.
    assert migrated.norm_quantile.dtype == jnp.float32
    assert float(migrated.norm_quantile) == float(state.ema_mean)
    restarted = state._replace(norm_quantile=state.ema_mean)
    _assert_same_flat(migrated, restarted)
    _same_steps(tx, params, migrated, restarted)


def test_a_layout_2_flat_state_is_migrated_with_an_empty_ring_of_exploding_norms():
    tx, params, state = _with_explosions()
    migrated = from_flat(_layout_2(to_flat(state)))
    ring = migrated.explosion_norms
    assert (int(ring.index), int(ring.count)) == (0, 0)
    assert ring.values.dtype == jnp.float32
    # Sized like event_flags: both rings are E = event_history_size long.
    np.testing.assert_array_equal(ring.values, np.zeros(StabilizerConfig().event_history_size))
    assert int(migrated.state_version) == STATE_VERSION
    assert isinstance(migrated, og.GradientFlowState)
    emptied = state._replace(
        explosion_norms=Ring.empty(ring.values.shape[0], jnp.float32),
        norm_quantile=state.ema_mean,
    )
    _assert_same_flat(migrated, emptied)
    # The next step from the migrated state is the step from the emptied one.
    _same_steps(tx, params, migrated, emptied)


def test_from_flat_takes_the_nested_form_of_a_raw_restore():
    _, _, state = _with_explosions()
    nested = flax.serialization.to_state_dict(state)
    back = from_flat(nested)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    # The packed storage (SPEC.md, "Storage of the JAX state") is read by slot.
    assert set(nested) == {*constants.NAMED_SCALARS, "floats", "counters", "rings", "state_version"}
    # An earlier layout's nested form: one entry per field, a record per ring.
    old = {
        name: value._asdict() if isinstance(value, Ring) else value
        for name, value in state.fields().items()
        if name not in ("explosion_norms", "norm_quantile")
    }
    old[constants.VERSION_FIELD] = np.int32(2)
    assert int(from_flat(old).explosion_norms.count) == 0


def test_a_layout_4_state_is_read_bit_for_bit_under_the_new_version():
    # Layout 5 regrouped only the JAX state's storage: the flat form of
    # layout 4 has the same keys, and every value is kept.
    tx, params, state = _with_explosions()
    flat = {k: np.asarray(v) for k, v in to_flat(state).items()}
    flat[constants.VERSION_FIELD] = np.int32(4)
    migrated = from_flat(flat)
    assert int(migrated.state_version) == 5
    _assert_same_flat(migrated, state)
    _same_steps(tx, params, migrated, state)


def test_the_packed_fields_are_read_and_replaced_by_name():
    _, _, state = _with_explosions()
    # Every field by name, from its slot: the flat form holds the same values.
    flat = to_flat(state)
    assert float(state.ema_mean) == float(flat["ema_mean"])
    assert int(state.explosion_count) == int(flat["explosion_count"]) == 2
    assert state.early_warning.dtype == jnp.bool_
    assert int(state.norm_history.count) == int(flat["norm_history_count"])
    # The named leaves are where optax looks for them.
    assert float(optax.tree.get({"s": state}, "clip_threshold")) == float(state.clip_threshold)
    # _replace takes a packed field and leaves every other one as it was.
    changed = state._replace(ema_var=jnp.float32(7.0), explosion_count=jnp.int32(9))
    assert float(changed.ema_var) == 7.0 and int(changed.explosion_count) == 9
    for name, value in to_flat(state).items():
        if name not in ("ema_var", "explosion_count"):
            assert np.asarray(to_flat(changed)[name]).tobytes() == np.asarray(value).tobytes()
    with pytest.raises(ValueError, match="missing"):
        og.GradientFlowState.of(ema_mean=jnp.float32(0.0))


def test_a_layout_2_mapping_given_to_update_is_pointed_to_the_migration():
    tx, params, state = _with_explosions()
    with pytest.raises(StateVersionError, match=r"layout version 2.*from_restored"):
        tx.update({"w": jnp.ones(3)}, _layout_2(to_flat(state)), params)


def test_an_old_layout_restored_from_msgpack_is_refused_by_update():
    tx = og.stabilize(1e-2)
    params = {"w": jnp.ones(3)}
    # What a checkpoint of layout 1 restores to without a target: a dict of
    # flat fields.
    old = flax.serialization.msgpack_restore(
        flax.serialization.msgpack_serialize(_old_layout(tx.init(params)))
    )
    with pytest.raises(StateVersionError, match="layout version 1"):
        tx.update({"w": jnp.ones(3)}, old, params)


def test_a_flat_state_of_this_layout_is_pointed_to_from_flat():
    tx = og.stabilize(1e-2)
    params = {"w": jnp.ones(3)}
    flat = to_flat(tx.init(params))
    with pytest.raises(TypeError, match="from_flat"):
        tx.update({"w": jnp.ones(3)}, flat, params)
    _, state = tx.update({"w": jnp.ones(3)}, from_flat(flat), params)
    assert int(state.stabilizer_step) == 1


def test_state_of_the_new_layout_round_trips_through_msgpack():
    tx = og.stabilize(1e-2)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    _, state = tx.update({"w": jnp.full(3, 0.5)}, state, params)
    data = flax.serialization.to_bytes(state)
    back = flax.serialization.from_bytes(tx.init(params), data)
    assert isinstance(back.norm_history, Ring)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    # The raw restore (no target) is the nested dict; from_flat reads the flat form.
    raw = flax.serialization.msgpack_restore(data)
    assert int(raw["state_version"]) == STATE_VERSION


# --- What the compiled step does with its buffers -------------------------------

SIZE = 1 << 16


def _compiled_text(tx, params):
    state = tx.init(params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params)
    return lowered.compile().as_text()


def _full_size_copies(hlo: str) -> int:
    return len(re.findall(rf"f32\[{SIZE}\]\{{0\}} copy\(", hlo))


def test_the_wrapper_keeps_the_inner_state_without_copying_it():
    params = {"w": jnp.zeros(SIZE, jnp.float32)}
    hlo = _compiled_text(og.stabilized(optax.adam(1e-3), initial_threshold=1.0), params)
    # One conditional steps Adam or passes its state through: with donated
    # buffers no moment is copied.
    assert _full_size_copies(hlo) == 0, hlo
    leafwise = _compiled_text(
        optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)), 9),
        params,
    )
    # The check can fail: optax's select-based wrapper does copy (or select
    # over) full-size buffers.
    assert re.search(rf"f32\[{SIZE}\]\{{0\}} (copy|select)\(", leafwise)


def test_the_periodic_work_is_one_conditional():
    params = {"w": jnp.zeros(8, jnp.float32)}
    for config in (StabilizerConfig(), presets.seed()):
        tx = og.stabilize(config=config, initial_threshold=1.0)
        state = tx.init(params)
        jaxpr = jax.make_jaxpr(lambda s, g, tx=tx: tx.update(g, s, params))(state, params)
        conds = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
        # track: the periodic work (the diagnostics) and the event-only
        # records; seed: also its warm-up median. The seed's adaptation shares
        # the periodic conditional with the diagnostics.
        assert len(conds) == (2 if config.adaptation_rule == "track" else 3), config


def test_clip_only_is_still_the_form_of_clip_by_global_norm():
    # The rescale keeps (x / r) * t (SPEC.md, "Per-step order" 4): one
    # multiplication by t / r would differ from optax by up to 2 ulps.
    x = jax.random.normal(jax.random.PRNGKey(3), (4096,)) * 7.0
    ours = og.stabilize(config=presets.clip_only(0.05))
    out, _ = jax.jit(ours.update)(x, ours.init(x))
    ref, _ = jax.jit(optax.clip_by_global_norm(0.05).update)(x, optax.EmptyState())
    assert np.asarray(out).tobytes() == np.asarray(ref).tobytes()


# --- Imports ----------------------------------------------------------------------


def test_the_shared_constants_and_arithmetic_import_no_framework():
    code = (
        "import sys, optax_gradflow.constants, optax_gradflow.config, "
        "optax_gradflow.arithmetic; "
        "assert 'jax' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_constants_are_the_ones_both_sides_use():
    assert arithmetic.MAD_TO_STD is constants.MAD_TO_STD == 1.4826
    assert np.float32(arithmetic.LOG_FLOOR) == np.float32(2.0**-126)
    assert constants.Event.WARNING == 64
    config_fields = {f.name for f in dataclasses.fields(StabilizerConfig)}
    assert {size for size, _ in constants.RINGS.values()} <= config_fields


def _ulps(a, b) -> np.ndarray:
    a = np.asarray(a, np.float32).view(np.int32).astype(np.int64)
    b = np.asarray(b, np.float32).view(np.int32).astype(np.int64)
    return np.abs(a - b)


def test_the_default_clip_is_one_multiplication_within_two_ulps_of_optax():
    # x * fl(t / r) and fl(fl(x / r) * t) each lie within an ulp of x * t / r,
    # so within 2 ulps of each other; without clipping x * 1 is x exactly.
    tx = og.stabilize(initial_threshold=0.05)
    ref = optax.clip_by_global_norm(0.05)
    worst = 0
    for seed in range(8):
        x = jax.random.normal(jax.random.PRNGKey(seed), (50_000,)) * 10.0 ** (seed - 4)
        out, _ = jax.jit(tx.update)(x, tx.init(x))
        expected, _ = jax.jit(ref.update)(x, optax.EmptyState())
        worst = max(worst, int(_ulps(out, expected).max()))
    assert 1 <= worst <= 2  # not bit for bit, but within 2 ulps
    small = jnp.full(4, 1e-3)
    out, _ = jax.jit(tx.update)(small, tx.init(small))
    assert np.asarray(out).tobytes() == np.asarray(small).tobytes()


def test_the_rescale_is_one_multiply_per_element_in_the_hlo():
    tx = og.stabilize(initial_threshold=1.0)
    x = jnp.ones(4096)
    hlo = jax.jit(tx.update).lower(x, tx.init(x)).compile().as_text()
    body = [line for line in hlo.splitlines() if "f32[4096]" in line and "divide(" in line]
    assert not body, body  # no per-element division
    exact = og.stabilize(config=presets.clip_only(1.0))
    hlo = jax.jit(exact.update).lower(x, exact.init(x)).compile().as_text()
    assert any("f32[4096]" in line and "divide(" in line for line in hlo.splitlines())


def test_a_calm_diagnostics_step_still_pushes_its_variance():
    # Steady norms 1, 2, 1, 2 under a fixed threshold of 10: no step has a
    # flag. Step 4 (step' = 4) runs the diagnostics over [1, 2, 1, 2]:
    # population variance 0.25, pushed although the step is calm.
    config = StabilizerConfig(
        diagnostics_interval=4,
        diagnostics_window=4,
        adaptation_interval=0,
        variance_limit=10.0,
        trend_limit=10.0,
    )
    tx = og.stabilize(config=config, initial_threshold=10.0)
    x = jnp.zeros(1)
    state = tx.init(x)
    update = jax.jit(tx.update)
    for norm in (1.0, 2.0, 1.0, 2.0):
        _, state = update(jnp.full(1, norm), state)
    assert int(state.event_flags.newest()) == 0
    assert int(state.variance_history.count) == 1
    assert float(state.variance_history.values[0]) == pytest.approx(0.25, rel=1e-6)
