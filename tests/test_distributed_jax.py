"""Sharded JAX runs take the decisions of the one-device run (SPEC.md, "Distributed").

Eight virtual CPU devices in one process (``jit`` with ``NamedSharding``,
``shard_map`` and ``pmap``), then two processes joined by
``jax.distributed`` over gloo. Both run in subprocesses, because this process
has already initialised JAX with one device; each is bounded by a timeout and
killed if it runs over. The scripts only report; the comparisons are here.
The gradients are those of tests/distributed/scenario.py: each bad value
(spike, NaN, inf) sits in one device's shard.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradflow as og
from optax_gradflow.state import to_flat

sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))
import launch
import scenario

CONFIG = og.StabilizerConfig(**scenario.CONFIG)
N_DEVICES = 8
FLAG_CLIPPED, FLAG_NONFINITE = 1, 8
SCALAR = "f32[]"
# The wrapper's updates come out of Adam (learning rate 1e-2). A sharded run
# adds the squares in another order, so its norm may differ in the last bit;
# Adam's first moment cancels in places and turns that into a larger relative
# difference of a tiny update. Its updates are compared to 1e-6 of the
# learning rate instead.
ADAM_ATOL = 1e-8
# The "track" rule's centre, spread and anchor are logarithms of norms: a
# float32 rounding of the norm (relative ~6e-8) is an absolute difference in
# them, and the spread, an EMA of differences of logs, is small (~1e-2), so a
# relative tolerance would demand more than float32 gives. They are compared
# with this absolute tolerance too (log units: a relative 1e-7 of the norm).
LOG_FIELDS = ("ema_mean", "ema_var", "centre_anchor", "norm_quantile")
LOG_ATOL = 1e-7
# The diagnostics' windowed variance of the norms, sum (n - mean)^2 / W,
# loses to cancellation: a rounding delta ~6e-8 n of each norm moves it by
# about 2 |n - mean| delta, a relative 2 (mean / std) 6e-8 ~ 2e-6 for these
# norms (mean ~10, std ~1). Compared to 1e-5, relative.
VARIANCE_FIELDS = ("variance_history",)
VARIANCE_RTOL = 1e-5


# --- Comparisons -------------------------------------------------------------


def assert_same(got, want, context: str, *, rtol: float = 1e-6, atol: float = 0.0) -> None:
    """Exact for integers and booleans, ``rtol`` / ``atol`` for floats; NaN equals NaN."""
    if isinstance(want, dict):
        assert set(got) == set(want), context
        for name in want:
            assert_same(got[name], want[name], f"{context}: {name}", rtol=rtol, atol=atol)
        return
    g, w = np.asarray(got), np.asarray(want)
    assert g.shape == w.shape, context
    if context.endswith(tuple(f": {name}" for name in LOG_FIELDS)):
        atol = max(atol, LOG_ATOL)
    if context.endswith(tuple(f": {name}" for name in VARIANCE_FIELDS)):
        rtol = max(rtol, VARIANCE_RTOL)
    if w.dtype.kind == "f":
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, equal_nan=True, err_msg=context)
    else:
        np.testing.assert_array_equal(g, w, err_msg=context)


def assert_identical(got, want, context: str) -> None:
    """Bit for bit (floats included)."""
    if isinstance(want, dict):
        assert set(got) == set(want), context
        for name in want:
            assert_identical(got[name], want[name], f"{context}: {name}")
        return
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=context)


def rows_of_device(x: np.ndarray, device: int, n: int = N_DEVICES) -> np.ndarray:
    rows = x.shape[0] // n
    return x[device * rows : (device + 1) * rows]


# --- One process, eight devices ----------------------------------------------


@pytest.fixture(scope="module")
def devices_run():
    env = launch.environment(XLA_FLAGS=f"--xla_force_host_platform_device_count={N_DEVICES}")
    (report,) = launch.run_together([["jax_devices.py"]], env=env, timeout=240)
    return report


@pytest.fixture
def devices_report(devices_run):
    """The script's report; a check that raised there fails here with its traceback."""

    class Report(dict):
        def __getitem__(self, name):
            result = dict.__getitem__(self, name)
            if "error" in result:
                pytest.fail(f"check {name!r} raised in the 8-device process:\n{result['error']}")
            return result

    return Report(devices_run)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "check", ["jit_fully_sharded", "jit_fully_sharded_explicit", "jit_fully_sharded_wrapper"]
)
def test_jit_with_sharded_gradients_matches_one_device(devices_report, check):
    result = devices_report[check]
    ref = result["reference"]
    atol = ADAM_ATOL if check.endswith("wrapper") else 0.0
    for k in range(scenario.STEPS):
        assert_same(result["states"][k], ref["states"][k], f"{check} step {k} state")
        assert_same(result["updates"][k], ref["updates"][k], f"{check} step {k} updates", atol=atol)
    # The updates stay sharded like the gradients: nothing was gathered.
    assert result["update_specs"] and all("'d'" in spec for spec in result["update_specs"])


@pytest.mark.distributed
def test_jit_data_parallel_matches_one_device(devices_report):
    result = devices_report["jit_data_parallel"]
    ref = result["reference"]
    for k in range(scenario.STEPS):
        # The batch mean is reduced in another order over 8 devices: the
        # parameters differ in the last float32 bits.
        assert_same(result["states"][k], ref["states"][k], f"step {k} state", rtol=1e-5)
        assert_same(result["params"][k], ref["params"][k], f"step {k} params", rtol=1e-5)
    flags = ref["states"][-1]["event_flags"]
    assert flags[scenario.SPIKE_STEP] & FLAG_CLIPPED
    assert flags[scenario.NAN_STEP] & FLAG_NONFINITE


def _per_device_checks(result, name: str, *, updates_atol: float = 0.0) -> None:
    """Every device holds the same state, the one-device run's, step by step."""
    ref = result["reference"]
    for k in range(scenario.STEPS):
        copies = result["devices"][k]
        assert len(copies) == N_DEVICES
        for d, copy in enumerate(copies[1:], start=1):
            assert_identical(copy, copies[0], f"{name} step {k}: device {d} vs device 0")
        assert_same(copies[0], ref["states"][k], f"{name} step {k} state")
        assert_same(
            result["updates"][k], ref["updates"][k], f"{name} step {k} updates", atol=updates_atol
        )


@pytest.mark.distributed
@pytest.mark.parametrize("form", ["stabilize", "stabilized"])
def test_shard_map_every_device_takes_the_one_device_decision(devices_report, form):
    atol = ADAM_ATOL if form == "stabilized" else 0.0
    _per_device_checks(devices_report["shard_map"][form], f"shard_map {form}", updates_atol=atol)


@pytest.mark.distributed
def test_pmap_every_device_takes_the_one_device_decision(devices_report):
    _per_device_checks(devices_report["pmap"], "pmap")


@pytest.mark.distributed
@pytest.mark.parametrize("source", ["shard_map", "pmap"])
def test_one_bad_shard_makes_every_device_clip_or_skip(devices_report, source):
    result = devices_report[source]
    if source == "shard_map":
        result = result["stabilize"]
    for k in range(scenario.STEPS):
        grads = scenario.gradients(k)
        before = result["devices"][k - 1][0] if k else None
        scale = before["loss_scale"] if before else 1.0
        # By hand: the norm every device records is the whole gradient's.
        whole = np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in grads.values()))
        for copy in result["devices"][k]:
            np.testing.assert_allclose(copy["last_grad_norm"], whole / scale, rtol=1e-6)

    # The spike is in the last device's rows only. Device 0's own rows are far
    # below the threshold, yet device 0 clips, by the global norm.
    k = scenario.SPIKE_STEP
    grads = scenario.gradients(k)
    before = result["devices"][k - 1][0]
    own = np.sqrt(sum(np.sum(np.square(rows_of_device(g, 0))) for g in grads.values()))
    assert own / before["loss_scale"] < before["clip_threshold"]
    whole = np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in grads.values()))
    factor = before["clip_threshold"] / whole
    np.testing.assert_allclose(
        rows_of_device(np.asarray(result["updates"][k]["w"]), 0),
        rows_of_device(grads["w"], 0) * factor,
        rtol=1e-5,  # (g / r) * t in float32 against g * (t / r) in float64
    )
    for d, copy in enumerate(result["devices"][k]):
        assert copy["event_flags"][k] & FLAG_CLIPPED, f"device {d}"

    # The NaN (last device) and the inf (device 0) each make every device skip:
    # all rows of the output are zero, every device counts a non-finite step.
    for k in (scenario.NAN_STEP, scenario.INF_STEP):
        for leaf in result["updates"][k].values():
            np.testing.assert_array_equal(np.asarray(leaf), 0.0)
        counts = {copy["nonfinite_count"] for copy in result["devices"][k]}
        before = result["devices"][k - 1][0]["nonfinite_count"]
        assert counts == {before + 1}
        for copy in result["devices"][k]:
            assert copy["event_flags"][k] & FLAG_NONFINITE


@pytest.mark.distributed
def test_hlo_axis_name_adds_one_scalar_all_reduce(devices_report):
    one_scalar = [{"op": "all-reduce", "shapes": [SCALAR]}]
    assert devices_report["shard_map"]["stabilize"]["hlo"] == one_scalar
    assert devices_report["pmap"]["hlo"] == one_scalar
    # The wrapper adds the update-ratio norms: one more all-reduce, of scalars.
    wrapper = devices_report["shard_map"]["stabilized"]["hlo"]
    assert [c["op"] for c in wrapper] == ["all-reduce", "all-reduce"]
    assert all(shape == SCALAR for c in wrapper for shape in c["shapes"])


@pytest.mark.distributed
def test_hlo_jit_adds_no_gradient_sized_collective(devices_report):
    hlo = devices_report["hlo_jit"]
    # The step alone: the partial sums of squares, all-reduced; nothing else.
    assert hlo["stabilize"], "expected the norm's all-reduce"
    assert all(c["op"] == "all-reduce" for c in hlo["stabilize"])
    assert all(shape == SCALAR for c in hlo["stabilize"] for shape in c["shapes"])
    assert hlo["stabilize"] == hlo["clip_by_global_norm"]
    # A whole FSDP-like training step: the collectives of the gradient
    # computation, then exactly those of optax.clip_by_global_norm.
    key = lambda c: (c["op"], tuple(c["shapes"]))
    assert Counter(map(key, hlo["train_stabilized"])) == Counter(
        map(key, hlo["train_clip_by_global_norm"])
    )


# --- Several processes ------------------------------------------------------


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(x).tolist(), tree)


@pytest.fixture(scope="module")
def reference_run():
    """The one-device run of the scenario, in this process."""
    opt = og.stabilize(config=CONFIG)
    update = jax.jit(opt.update)
    state = opt.init(scenario.gradients(0))
    outs, states = [], []
    for k in range(scenario.STEPS):
        out, state = update(scenario.gradients(k), state, value=jnp.float32(k))
        outs.append(_host(out))
        states.append(_host(to_flat(state)))
    return {"updates": outs, "states": states}


@pytest.mark.distributed
def test_two_processes_match_one_process(reference_run):
    n = 2
    port = launch.free_port()
    reports = launch.run_together(
        [["jax_processes.py", str(i), str(n), str(port)] for i in range(n)],
        env=launch.environment(),
        timeout=180,
    )
    assert [r["process_id"] for r in reports] == [0, 1]
    assert all(r["devices"] == n for r in reports)
    for form in ("jit", "shard_map"):
        for k in range(scenario.STEPS):
            states = [r[form]["states"][k] for r in reports]
            assert_identical(states[1], states[0], f"{form} step {k}: process 1 vs 0")
            assert_same(states[0], reference_run["states"][k], f"{form} step {k} state")
            # Each process returns its own rows of the output.
            joined = {
                name: np.concatenate([np.asarray(r[form]["updates"][k][name]) for r in reports])
                for name in scenario.SHAPES
            }
            assert_same(joined, reference_run["updates"][k], f"{form} step {k} updates")
    flags = reports[0]["jit"]["states"][-1]["event_flags"]
    assert flags[scenario.SPIKE_STEP] & FLAG_CLIPPED
    assert flags[scenario.NAN_STEP] & FLAG_NONFINITE and flags[scenario.INF_STEP] & FLAG_NONFINITE
    for r in reports:
        assert r["shard_map_hlo"] == [{"op": "all-reduce", "shapes": [SCALAR]}]
        assert all(c["op"] == "all-reduce" for c in r["jit_hlo"])
        assert all(shape == SCALAR for c in r["jit_hlo"] for shape in c["shapes"])


# --- In this process: a named vmap axis stands in for the devices -------------


def _split(tree, n):
    """Leading axis cut into ``n`` shards; scalars (Adam's count) stay whole."""
    return jax.tree.map(lambda x: x.reshape(n, -1, *x.shape[1:]) if x.ndim else x, tree)


def _join(tree):
    return jax.tree.map(lambda x: np.asarray(x).reshape(-1, *x.shape[2:]), tree)


@pytest.mark.parametrize("wrapper", [False, True], ids=["stabilize", "stabilized"])
def test_axis_name_sums_over_a_named_vmap_axis(wrapper):
    """psum over a named vmap axis: init on the whole parameters, update on shards.

    ``out_axes=None`` for the stabilizer's state makes vmap prove that it is
    the same on every shard (it raises if the state depends on the shard).
    """
    n = 4
    params = {k: jnp.asarray(v) for k, v in scenario.params().items()}
    if wrapper:
        make = lambda **kw: og.stabilized(optax.adam(1e-2), config=CONFIG, **kw)
    else:
        make = lambda **kw: og.stabilize(config=CONFIG, **kw)
    ref_opt, opt = make(), make(axis_name="d")
    ref_state, state = ref_opt.init(params), opt.init(params)
    if wrapper:
        # The inner state is sharded like the parameters; the rest is replicated.
        inner_axes = jax.tree.map(lambda x: 0 if x.ndim else None, state.inner_state)
        state_axes = og.StabilizedState(inner_axes, None, None)
        state = state._replace(inner_state=_split(state.inner_state, n))
    else:
        state_axes = None
    ref_update = jax.jit(ref_opt.update)
    sharded_update = jax.jit(
        jax.vmap(
            lambda g, s, p, v: opt.update(g, s, p, value=v),
            in_axes=(0, state_axes, 0, None),
            out_axes=(0, state_axes),
            axis_name="d",
        )
    )
    for k in range(scenario.STEPS):
        grads = {name: jnp.asarray(g) for name, g in scenario.gradients(k).items()}
        ref_out, ref_state = ref_update(grads, ref_state, params, value=jnp.float32(k))
        out, state = sharded_update(_split(grads, n), state, _split(params, n), jnp.float32(k))
        atol = ADAM_ATOL if wrapper else 0.0
        assert_same(_join(out), _host(ref_out), f"step {k} updates", atol=atol)
        if wrapper:
            assert_same(_host(to_flat(state.flow)), _host(to_flat(ref_state.flow)), f"step {k}")
            for part in ("values", "index", "count"):
                assert_same(
                    _host(getattr(state.update_ratio_history, part)),
                    _host(getattr(ref_state.update_ratio_history, part)),
                    f"step {k} update_ratio_history.{part}",
                )
        else:
            assert_same(_host(to_flat(state)), _host(to_flat(ref_state)), f"step {k}")


def test_axis_name_still_checks_the_number_of_leaves():
    """Shards may have other shapes than the parameters, but not another tree.

    SPEC.md, "Errors": the gradients are checked against the ``params`` passed
    to the same ``update`` call (here per-device shards of them).
    """
    opt = og.stabilize(config=CONFIG, axis_name="d")
    state = opt.init({"b": jnp.zeros(8), "w": jnp.zeros((16, 4))})
    update = jax.vmap(lambda g, p: opt.update(g, state, p)[0], axis_name="d")
    shards = {"b": jnp.zeros((4, 2)), "w": jnp.zeros((4, 4, 4))}
    update({"b": jnp.ones((4, 2)), "w": jnp.ones((4, 4, 4))}, shards)  # shards: accepted
    update({"b": jnp.ones((4, 1)), "w": jnp.ones((4, 2, 2))}, shards)  # other shapes too
    with pytest.raises(ValueError, match="tree structure"):
        update({"w": jnp.ones((4, 4, 4))}, shards)
