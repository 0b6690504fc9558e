"""Golden traces: the JAX transformation and the PyTorch adapter replay ``tests/golden/*.json``.

The expected values come from ``tests/golden/reference.py``, a plain-Python
transcription of SPEC.md that imports neither implementation; a few key
numbers are also derived by hand below.

Tolerances: floats rtol 1e-6 (the reference rounds like float32; what is left
is the summation order inside a leaf or over the history). Counters, flags,
booleans, powers of two and zeros are compared exactly, and so are the
outputs of unclipped steps, ``x * (1 / s)``, which do not depend on the norm. Two looser cases,
both because SPEC.md fixes no summation order and the reference sums exactly
(``math.fsum``) while the implementations sum in float32:
``norm_trend`` and ``variance_history`` (rtol 1e-5 and atol 1e-7: the trend
is a difference of nearly equal sums of logarithms, and float32 ``log``
itself is accurate only to an ulp or two), and the ``mean_std`` threshold
(rtol 2e-6, and every float downstream of it).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from golden import generate, golden_io, reference

from optax_gradflow.config import StabilizerConfig

RTOL = 1e-6
DIAG_RTOL, DIAG_ATOL = 1e-5, 1e-7
MEAN_STD_RTOL = 2e-6
DIAG_FIELDS = frozenset({"norm_trend", "variance_history"})

FILES = sorted(golden_io.GOLDEN_DIR.glob("*.json"))
SCENARIOS = {path.stem: golden_io.load(path) for path in FILES}
RUNS = [
    pytest.param(name, i, id=f"{name}[{i}]")
    for name, data in SCENARIOS.items()
    for i in range(len(data["runs"]))
]

# Known disagreements between an implementation and SPEC.md, as
# (implementation, scenario, run index) -> reason. Strict: once fixed, the
# entry must go.
# Cases where an implementation is known not to follow SPEC.md: none.
KNOWN_DISAGREEMENTS: dict[tuple[str, str, int], str] = {}


# --- Drivers -------------------------------------------------------------------


def _config(run: dict) -> StabilizerConfig:
    return StabilizerConfig(**run["config"])


def _jax_trace(run: dict):
    """Yields the initial state, then (outputs, state) of every step, as numpy."""
    import jax
    import jax.numpy as jnp

    import optax_gradflow as og

    steps = golden_io.expand(run)
    tx = og.stabilize(
        run["init"].get("learning_rate"),
        config=_config(run),
        initial_threshold=run["init"].get("initial_threshold"),
    )
    params = [jnp.zeros(a.shape, a.dtype) for a in steps[0][0]]
    state = tx.init(params)
    overrides = {
        name: jnp.asarray(value, getattr(state, name).dtype)
        for name, value in run.get("state_overrides", {}).items()
    }
    state = state._replace(**overrides)
    yield {name: np.asarray(getattr(state, name)) for name in golden_io.SCALAR_FIELDS}
    update = jax.jit(tx.update)
    for leaves, value in steps:
        grads = [jnp.asarray(a) for a in leaves]
        if value is None:
            out, state = update(grads, state, params)
        else:
            out, state = update(grads, state, params, value=jnp.asarray(value, jnp.float32))
        fields = golden_io.SCALAR_FIELDS + golden_io.RING_FIELDS
        yield [np.asarray(o) for o in out], {n: np.asarray(getattr(state, n)) for n in fields}


def _torch_trace(run: dict):
    torch = pytest.importorskip("torch")
    import optax_gradflow.torch as ogt

    config = _config(run)
    state = ogt.init_state(
        run["init"].get("learning_rate"),
        config=config,
        initial_threshold=run["init"].get("initial_threshold"),
    )
    for name, value in run.get("state_overrides", {}).items():
        state[name] = torch.tensor(value, dtype=state[name].dtype)
    yield {name: state[name].numpy() for name in golden_io.SCALAR_FIELDS}
    for leaves, value in golden_io.expand(run):
        grads = [torch.from_numpy(a.copy()) for a in leaves]
        out, state = ogt.update(grads, state, value=value, config=config)
        yield [o.numpy() for o in out], {n: t.numpy() for n, t in state.items()}


TRACES = {"jax": _jax_trace, "torch": _torch_trace}


# --- Comparison ----------------------------------------------------------------


def _check_field(name: str, actual, expected, *, rtol: float, where: str) -> None:
    actual = np.asarray(actual)
    if name in golden_io.FLOAT_FIELDS:
        if name in DIAG_FIELDS:
            rtol, atol = max(rtol, DIAG_RTOL), DIAG_ATOL
        else:
            atol = 0.0
        np.testing.assert_allclose(
            actual.astype(np.float64),
            np.asarray(expected, np.float64),
            rtol=rtol,
            atol=atol,
            equal_nan=True,
            err_msg=f"{where}: field {name}",
        )
    else:
        np.testing.assert_array_equal(
            actual, np.asarray(expected, actual.dtype), err_msg=f"{where}: field {name}"
        )


def _check_run(impl: str, name: str, index: int) -> None:
    run = SCENARIOS[name]["runs"][index]
    rtol = MEAN_STD_RTOL if run["config"].get("adaptation_rule") == "mean_std" else RTOL
    label = f"{impl} {name}[{index}] ({run['label']})"
    trace = TRACES[impl](run)
    initial = next(trace)
    for field in golden_io.SCALAR_FIELDS:
        _check_field(field, initial[field], run["initial_state"][field], rtol=rtol, where=label)
    n_steps = 0
    for record, (out, state) in zip(run["steps"], trace, strict=True):
        where = f"{label} step {record['k']}"
        assert len(out) == len(record["out"]), where
        for j, (leaf, expected) in enumerate(zip(out, record["out"], strict=True)):
            # An unclipped output, x * (1 / s) or 0, does not depend on the norm:
            # it must match bit for bit (this tells x * (1 / s) from x / s).
            out_rtol = rtol if record["flags"] & 1 else 0.0
            np.testing.assert_allclose(
                np.asarray(leaf, np.float64),
                np.asarray(expected, np.float64),
                rtol=out_rtol,
                atol=0.0,
                err_msg=f"{where}: output leaf {j}",
            )
        for field in golden_io.SCALAR_FIELDS:
            _check_field(field, state[field], record[field], rtol=rtol, where=where)
        flags = state["event_flags"][
            (int(state["event_flags_index"]) - 1) % len(state["event_flags"])
        ]
        assert int(flags) == record["flags"], f"{where}: event flags"
        n_steps += 1
    assert n_steps == len(run["steps"])
    for field, expected in run["final_state"].items():
        _check_field(field, state[field], expected, rtol=rtol, where=f"{label} final state")


@pytest.mark.parametrize("name, index", RUNS)
@pytest.mark.parametrize("impl", ["jax", "torch"])
def test_golden(impl, name, index, request):
    reason = KNOWN_DISAGREEMENTS.get((impl, name, index))
    if reason is not None:
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))
    _check_run(impl, name, index)


# --- The golden files themselves -------------------------------------------------


def test_every_listed_scenario_has_a_file():
    expected = {
        "calm",
        "spike",
        "emergency",
        "vanishing",
        "nan_inf",
        "lr_init",
        "warmup",
        "adaptation",
        "diagnostics",
        "growth_and_no_scaling",
        "saturation",
    }
    assert expected <= set(SCENARIOS)


@pytest.mark.parametrize("name", sorted(generate.SCENARIOS))
def test_files_are_what_the_reference_writes(name):
    # A stale file (reference edited, generate.py not rerun) fails here.
    scenario = generate.SCENARIOS[name]
    fresh = golden_io.decode(golden_io.encode([generate.evaluate(s) for s in scenario["runs"]]))
    assert fresh == SCENARIOS[name]["runs"] or _same_with_nans(fresh, SCENARIOS[name]["runs"])


def _same_with_nans(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_with_nans(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_with_nans(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def test_reference_defaults_are_the_config_defaults():
    # reference.DEFAULTS is SPEC.md's table copied by hand; the config may hold
    # more fields than the reference needs, but not different defaults.
    defaults = dataclasses.asdict(StabilizerConfig())
    assert {
        name: defaults.get(name, "missing") for name in reference.DEFAULTS
    } == reference.DEFAULTS


# --- Numbers derived by hand from SPEC.md -----------------------------------------


def _run(name: str, label: str) -> dict:
    (run,) = [r for r in SCENARIOS[name]["runs"] if r["label"] == label]
    return run


F = np.float32


def test_hand_learning_rate_thresholds():
    runs = {r["label"]: r["initial_state"]["clip_threshold"] for r in SCENARIOS["lr_init"]["runs"]}
    assert runs["lr 0.01"] == 1.0  # 0.1 * sqrt(100)
    assert runs["lr 1.0"] == float(F(0.1))  # 0.1 * 1
    assert runs["lr 10.0"] == float(F(0.1))  # 0.0316 floored at min_threshold
    assert runs["lr 0.0001"] == 10.0  # 0.1 * sqrt(1e4)
    assert runs["lr 0.002"] == pytest.approx(0.1 * math.sqrt(500.0), rel=RTOL)
    assert runs["explicit 7 over lr 1e-2"] == 7.0
    assert runs["max_threshold clamps lr 1e-4"] == 4.0
    # Norm 1.5 against t = 1: clipped, not an explosion (1.5 < 3).
    assert _run("lr_init", "lr 0.01")["steps"][0]["flags"] == 1
    # Against t = 0.1: an explosion (1.5 > 0.3).
    assert _run("lr_init", "lr 1.0")["steps"][0]["flags"] == 3


def test_hand_emergency_worked_example():
    steps = _run("emergency", "lr 1e-2, five explosions")["steps"]
    scales = [s["loss_scale"] for s in steps[:4]]
    assert scales == pytest.approx([0.8, 0.64, 0.512, 0.4096], rel=RTOL)
    assert [s["flags"] for s in steps[:4]] == [3, 3, 3, 3]  # clipped + explosion
    fifth = steps[4]
    assert fifth["flags"] == 1 + 2 + 16
    assert fifth["clip_threshold"] == 0.5
    assert fifth["loss_scale"] == float(F(0.1))  # max(0.32768 * 0.1, 0.1)
    assert fifth["emergency_count"] == 1
    assert fifth["consecutive_explosions"] == 0
    assert _run("emergency", "lr 1e-2, five explosions")["final_state"]["emergency_steps"][0] == 4


def test_hand_vanishing_scale_saturates_at_64():
    steps = _run("vanishing", "lr 1e-2, tiny gradients")["steps"]
    assert steps[9]["loss_scale"] == 1.5**10 == 57.6650390625
    assert steps[10]["loss_scale"] == 64.0
    assert steps[12]["loss_scale"] == 64.0
    assert all(s["flags"] == 4 for s in steps)
    zeros = _run("vanishing", "all-zero gradients")["steps"]
    assert all(leaf == [0.0] * len(leaf) for s in zeros for leaf in s["out"])
    assert [s["loss_scale"] for s in zeros] == [1.5, 2.25, 3.375]


def test_hand_spike():
    steps = _run("spike", "lr 1e-2, spike at step 3")["steps"]
    assert [s["flags"] for s in steps] == [0, 0, 0, 3, 0, 0, 1, 0]
    spike = steps[3]
    # Clipped to norm t = 1: (x / r) * t.
    assert math.sqrt(sum(v * v for leaf in spike["out"] for v in leaf)) == pytest.approx(
        1.0, rel=RTOL
    )
    assert spike["loss_scale"] == float(F(0.8))
    assert spike["norm_history_count"] == 3  # the explosion stays out
    assert steps[-1]["clip_count"] == 2 and steps[-1]["explosion_count"] == 1


def test_hand_calm_unscales_with_rounded_inverse():
    run = _run("calm", "float32, loss scale 3")
    inverse = F(1.0) / F(3.0)
    first = [[float(F(x) * inverse) for x in leaf] for leaf in run["inputs"]["grads"][0]]
    assert run["steps"][0]["out"] == first
    # Raw norm 3 at scale 3: n = 1 = t exactly, not clipped.
    assert run["steps"][3]["last_grad_norm"] == 1.0 and run["steps"][3]["flags"] == 0


def test_hand_nan_burst():
    steps = _run("nan_inf", "NaN burst")["steps"]
    assert [s["flags"] for s in steps] == [0, 8, 8, 8, 8, 8 + 16, 8, 0]
    assert [s["loss_scale"] for s in steps[:6]] == [1.0, 0.5, 0.25, 0.125] + [float(F(0.1))] * 2
    assert steps[5]["clip_threshold"] == 0.5
    assert all(v == 0.0 for s in steps[1:7] for leaf in s["out"] for v in leaf)


def test_hand_adaptation_boundaries():
    # n_k = 3 * (0.25 + 0.0625 * (k % 7)) = 0.75 + 0.1875 r, r = k % 7, all exact
    # in float32; over k = 0..99 residues 0 and 1 occur 15 times, the others 14.
    norms = sorted(0.75 + 0.1875 * (k % 7) for k in range(100))
    median = (norms[49] + norms[50]) / 2
    assert median == 1.3125
    mad = sorted(abs(v - median) for v in norms)
    mad = (mad[49] + mad[50]) / 2
    assert mad == 0.375
    mean = sum(norms) / 100
    std = math.sqrt(sum((v - mean) ** 2 for v in norms) / 100)
    expected = {
        "rule median_mad": median + 3.0 * 1.4826 * mad,  # 2.980425
        "rule percentile": 1.875,  # a[89] = a[90]
        "rule mean_std": mean + 3.0 * std,
    }
    for label, threshold in expected.items():
        steps = _run("adaptation", label)["steps"]
        assert [bool(steps[k]["flags"] & 32) for k in (98, 99, 100, 101)] == [
            False,
            True,
            False,
            False,
        ]
        assert steps[98]["clip_threshold"] == 1.0
        assert steps[99]["clip_threshold"] == pytest.approx(threshold, rel=RTOL)
        assert steps[101]["clip_threshold"] == steps[99]["clip_threshold"]
        # n = 1.125 (k % 7 = 2) is clipped at t = 1 (step 93) but not at the
        # adapted threshold (step 100).
        assert steps[93]["flags"] == 1 and steps[100]["flags"] == 0


def test_hand_diagnostics_at_step_500():
    steps = _run("diagnostics", "trend warning at step 500")["steps"]
    assert steps[499]["flags"] & 64
    assert not any(s["flags"] & 64 for s in steps[:499])
    assert steps[499]["warning_count"] == 1 and steps[499]["early_warning"] is True
    # ln(n) grows by 0.012 per entry over the last 100 (the +-10% wobble adds a little).
    assert steps[499]["norm_trend"] == pytest.approx(0.012, rel=0.1)
    assert steps[499]["variance_history_count"] == 1
    var_steps = _run("diagnostics", "variance warning")["steps"]
    # One in ten norms is 20 (n = 20 / 3 * 3), the rest 1: in a window of 40,
    # mean = 2.9, variance = 0.9 * 1.9^2 + 0.1 * 17.1^2 = 32.49: 32.49 / 2.9^2 = 3.9 > 1.
    assert var_steps[49]["flags"] & 64 and var_steps[99]["flags"] & 64
    final = _run("diagnostics", "variance warning")["final_state"]
    assert final["variance_history"][0] == pytest.approx(32.49, rel=1e-5)
