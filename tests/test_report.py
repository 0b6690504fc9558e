"""Stability report and metrics: expected numbers worked out by hand from SPEC.md."""

import dataclasses
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import run_steps, vec

import optax_gradflow as og
from optax_gradflow import presets
from optax_gradflow import report as report_lib
from optax_gradflow.config import StabilizerConfig
from optax_gradflow.report import StabilityReport, metrics, stability_report, stability_reports
from optax_gradflow.state import Ring, from_flat, to_flat
from optax_gradflow.transform import init_state

RTOL = 1e-6


def hand_state(config=None, **fields):
    """A fresh state of ``config`` with some fields replaced by hand."""
    config = config or StabilizerConfig(
        event_history_size=10, norm_history_size=8, diagnostics_window=2
    )
    flat = to_flat(init_state(1.0, 0, config))
    for name, value in fields.items():
        old = flat[name]
        flat[name] = jnp.asarray(value, old.dtype)
        assert flat[name].shape == old.shape, name
    return from_flat(flat)


def window(flags, size=10):
    """Event-flag ring fields for ``flags`` written from slot 0 (not wrapped)."""
    ring = list(flags) + [0] * (size - len(flags))
    return {
        "event_flags": ring,
        "event_flags_index": len(flags) % size,
        "event_flags_count": len(flags),
        "stabilizer_step": len(flags),
    }


# --- Score, efficiency, counts ----------------------------------------------


def test_score_efficiency_and_window_counts_from_flags():
    # 10 steps: 3 explosions (clipped too: 2 + 1 = 3), 2 clipped only, 1
    # vanishing, 4 quiet. Score = 1 - 3/10 = 0.7; clipped = 5 -> efficiency 0.5.
    flags = [0, 3, 1, 0, 3, 4, 1, 3, 0, 0]
    state = hand_state(**window(flags), explosion_count=7, clip_count=20, vanishing_count=2)
    rep = stability_report(state)
    assert rep.window_steps == 10
    assert rep.stability_score == pytest.approx(0.7, rel=RTOL)
    assert rep.flow_efficiency == pytest.approx(0.5, rel=RTOL)
    assert rep.window.explosions == 3
    assert rep.window.clipped == 5
    assert rep.window.vanishing == 1
    assert rep.window.nonfinite == 0
    # Totals come from the counters, not from the window.
    assert rep.total.explosions == 7
    assert rep.total.clipped == 20
    assert rep.total.vanishing == 2
    assert rep.total.adaptations is None
    assert rep.event_flags == tuple(flags)


def test_nonfinite_steps_lower_the_score_too():
    # 2 non-finite (8) and 1 explosion (3) in 6 steps: score 1 - 3/6 = 0.5.
    rep = stability_report(hand_state(**window([8, 0, 3, 0, 8, 0])))
    assert rep.stability_score == pytest.approx(0.5, rel=RTOL)
    assert rep.window.nonfinite == 2


def test_wrapped_event_ring_is_read_oldest_first():
    # E = 4, five pushes a..e: slots hold [e, b, c, d], index 1, count 4.
    cfg = StabilizerConfig(event_history_size=4)
    state = hand_state(
        cfg,
        event_flags=[32, 2, 4, 1],  # e=32, b=2, c=4, d=1
        event_flags_index=1,
        event_flags_count=4,
        stabilizer_step=5,
    )
    rep = stability_report(state)
    assert rep.event_flags == (2, 4, 1, 32)
    assert rep.window_start_step == 1
    assert rep.window.adaptations == 1


def test_empty_window_is_healthy_with_score_one():
    rep = stability_report(hand_state())
    assert rep.window_steps == 0
    assert rep.stability_score == 1.0
    assert rep.flow_efficiency == 1.0
    assert rep.status == "healthy"
    assert rep.grad_norm.count == 0
    assert rep.grad_norm.mean is None and rep.grad_norm.p99 is None


# --- Status rules and precedence --------------------------------------------


@pytest.mark.parametrize(
    ("flags", "extra", "expected"),
    [
        # 1 explosion in 10: 0.9 > 0.8.
        ([3] + [0] * 9, {}, "healthy"),
        # 2 in 10: exactly 0.8 is not above 0.8.
        ([3, 3] + [0] * 8, {}, "unstable"),
        # 5 in 10: exactly 0.5 is not below 0.5.
        ([3] * 5 + [0] * 5, {}, "unstable"),
        # 6 in 10: 0.4 < 0.5.
        ([3] * 6 + [0] * 4, {}, "critical"),
        # An emergency in the window is critical whatever the score (0.9 here).
        ([3 + 16] + [0] * 9, {}, "critical"),
        # The early warning of the last diagnostics run: unstable at score 1.
        ([0] * 10, {"early_warning": True}, "unstable"),
        # 1 vanishing step in 10: rate 0.1 >= 0.1.
        ([4] + [0] * 9, {}, "vanishing_risk"),
        # 1 vanishing step in 11 (E = 20 below): 0.0909 < 0.1.
        ([4] + [0] * 10, {}, "healthy"),
        # Vanishing but also unstable: unstable comes first.
        ([4, 4, 3, 3, 3] + [0] * 5, {}, "unstable"),
        # Vanishing and an emergency: critical comes first.
        ([4, 4, 19] + [0] * 7, {}, "critical"),
    ],
)
def test_status_rules(flags, extra, expected):
    cfg = StabilizerConfig(event_history_size=20)
    state = hand_state(cfg, **window(flags, size=20), **extra)
    assert stability_report(state).status == expected


def test_every_status_is_documented_in_spec():
    text = (pathlib.Path(__file__).parents[1] / "SPEC.md").read_text(encoding="utf-8")
    section = text.split("## Stability report", 1)[1]
    for status in report_lib.STATUSES:
        assert f"`{status}`" in section


# --- Norm statistics and histories --------------------------------------------


def test_norm_statistics_by_hand():
    # History [1, 2, 3, 4] (4 of 8 slots). Mean 2.5; population variance
    # (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25; p50 at position 1.5 -> 2.5;
    # p90 at 2.7 -> 3.7; p99 at 2.97 -> 3.97.
    state = hand_state(
        norm_history=[1, 2, 3, 4, 0, 0, 0, 0], norm_history_index=4, norm_history_count=4
    )
    stats = stability_report(state).grad_norm
    assert stats.count == 4
    assert stats.mean == pytest.approx(2.5, rel=RTOL)
    assert stats.std == pytest.approx(math.sqrt(1.25), rel=RTOL)
    assert (stats.min, stats.max) == (1.0, 4.0)
    assert stats.p50 == pytest.approx(2.5, rel=RTOL)
    assert stats.p90 == pytest.approx(3.7, rel=RTOL)
    assert stats.p99 == pytest.approx(3.97, rel=RTOL)


def test_histories_are_chronological():
    cfg = StabilizerConfig(
        loss_scale_history_size=3,
        threshold_history_size=3,
        emergency_history_size=2,
        variance_history_size=3,
    )
    # Loss scales 1, 0.5, 0.25, 0.125 pushed onto L = 3: [0.125, 0.5, 0.25], index 1.
    # Thresholds 4, 2 pushed onto T = 3: [4, 2, 0], index 2, count 2.
    # Emergencies at steps 7, 9, 12 onto M = 2: [12, 9], index 1.
    # Variances 1, 2, 3 onto V = 3 (full, index 0): slope 1 per run.
    state = hand_state(
        cfg,
        loss_scale=0.125,
        loss_scale_history=[0.125, 0.5, 0.25],
        loss_scale_history_index=1,
        loss_scale_history_count=3,
        clip_threshold=2.0,
        threshold_history=[4, 2, 0],
        threshold_history_index=2,
        threshold_history_count=2,
        emergency_steps=[12, 9],
        emergency_steps_index=1,
        emergency_steps_count=2,
        emergency_count=3,
        variance_history=[1, 2, 3],
        variance_history_index=0,
        variance_history_count=3,
    )
    rep = stability_report(state)
    assert rep.loss_scale_history == (0.5, 0.25, 0.125)
    assert rep.threshold_history == (4.0, 2.0)
    assert rep.emergency_steps == (9, 12)
    assert rep.total.emergencies == 3
    assert rep.variance_history == (1.0, 2.0, 3.0)
    assert rep.variance_trend == pytest.approx(1.0, rel=RTOL)
    assert rep.clip_threshold == 2.0 and rep.loss_scale == 0.125


def test_variance_trend_needs_two_runs_and_can_be_negative():
    one = hand_state(variance_history=jnp.zeros(200).at[0].set(5.0), variance_history_count=1)
    assert stability_report(one).variance_trend is None
    # [4, 2]: slope -2 per run.
    two = hand_state(
        variance_history=jnp.zeros(200).at[0].set(4.0).at[1].set(2.0),
        variance_history_index=2,
        variance_history_count=2,
    )
    assert stability_report(two).variance_trend == pytest.approx(-2.0, rel=RTOL)


# --- A scripted run -------------------------------------------------------------


def scripted_run(opt, explosion_steps, steps=10):
    # Threshold 1 (explicit), explosion above 3: norm 0.5 is quiet, 10 explodes.
    grads = [vec(10.0 if k in explosion_steps else 0.5) for k in range(steps)]
    return run_steps(opt, grads, params=vec(1.0))


def test_ten_steps_with_three_explosions_score_point_seven():
    cfg = StabilizerConfig(
        loss_scaling=False, event_history_size=10, emergency_patience=0, adaptation_interval=0
    )
    opt = optax.chain(og.stabilize(config=cfg, initial_threshold=1.0), optax.sgd(0.1))
    _, states = scripted_run(opt, {2, 5, 8})
    rep = stability_report(states[-1])
    assert rep.step == 10
    assert rep.stability_score == pytest.approx(0.7, rel=RTOL)
    assert rep.flow_efficiency == pytest.approx(0.7, rel=RTOL)
    assert rep.total.explosions == 3 and rep.window.explosions == 3
    assert rep.status == "unstable"
    assert (rep.lr_recommendation, rep.lr_factor) == ("decrease", 0.5)
    # Explosions stay out of the history: 7 norms of 0.5.
    assert rep.grad_norm.count == 7
    assert rep.grad_norm.p50 == pytest.approx(0.5, rel=RTOL)
    # Not the wrapper form: no update ratio.
    assert rep.update_ratio_last is None and rep.update_ratio_count is None


# --- Update ratio and learning-rate recommendation ------------------------------


def wrapper_state(ratios, flow=None):
    ring = np.zeros(100, np.float32)
    ring[: len(ratios)] = ratios
    return og.StabilizedState(
        inner_state=optax.EmptyState(),
        flow=flow if flow is not None else hand_state(**window([0] * 10)),
        update_ratio_history=Ring(
            jnp.asarray(ring), jnp.int32(len(ratios) % 100), jnp.int32(len(ratios))
        ),
    )


@pytest.mark.parametrize(
    ("ratios", "flags", "expected"),
    [
        # Median 3e-2 > 1e-2 although healthy.
        ([2e-2, 5e-2, 3e-2], [0] * 10, ("decrease", 0.5)),
        # Median 1e-6 < 1e-5 and healthy.
        ([1e-6, 2e-6, 5e-7], [0] * 10, ("increase", 2.0)),
        # In between.
        ([1e-3, 2e-3, 1e-4], [0] * 10, ("keep", 1.0)),
        # Tiny ratio but critical (score 0.4): decrease wins.
        ([1e-6], [3] * 6 + [0] * 4, ("decrease", 0.5)),
        # Tiny ratio but vanishing risk: only a healthy run is sped up.
        ([1e-6], [4] + [0] * 9, ("keep", 1.0)),
        # No ratio recorded yet, healthy.
        ([], [0] * 10, ("keep", 1.0)),
    ],
)
def test_learning_rate_recommendation(ratios, flags, expected):
    state = wrapper_state(ratios, flow=hand_state(**window(flags)))
    rep = stability_report(state)
    assert (rep.lr_recommendation, rep.lr_factor) == expected
    assert rep.lr_reason


# Flags: 8 non-finite, 2 explosion (+ clipped: 3), 16 emergency.
@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        # Every step non-finite; the fifth fired an emergency (critical): the
        # cause is the NaN gradients, which a smaller rate does not cure.
        ([8, 8, 8, 8, 24, 8, 8, 8, 8, 8], ("keep", 1.0)),
        # Three non-finite steps (score 0.7: unstable), no explosion.
        ([8, 0, 8, 0, 8, 0, 0, 0, 0, 0], ("keep", 1.0)),
        # Two non-finite and two explosions: the explosions alone leave
        # 1 - 2/10 = 0.8, not above 0.8, so they make it unstable: decrease.
        ([8, 3, 8, 3, 0, 0, 0, 0, 0, 0], ("decrease", 0.5)),
        # One non-finite, one explosion (0.9 without the NaN): keep.
        ([8, 0, 3, 0, 0, 0, 0, 0, 0, 0], ("keep", 1.0)),
        # An emergency after a run of explosions and NaN, plus NaN elsewhere:
        # the explosions took part in the emergency: decrease.
        ([8, 8, 8, 3, 8, 24, 0, 0, 0, 0], ("decrease", 0.5)),
        # Explosions only (score 0.4): decrease.
        ([3] * 6 + [0] * 4, ("decrease", 0.5)),
    ],
)
def test_no_learning_rate_cut_for_non_finite_gradients(flags, expected):
    rep = stability_report(wrapper_state([1e-3], flow=hand_state(**window(flags))))
    assert rep.status in ("critical", "unstable")
    assert (rep.lr_recommendation, rep.lr_factor) == expected
    if expected[0] == "keep":
        assert "non-finite" in rep.lr_reason and "does not cure" in rep.lr_reason
        assert "x0.5" not in rep.summary()


def test_a_run_of_nan_batches_advises_no_cut():
    # The stabilizer itself, every step NaN: the track rule's emergency
    # fires on the fifth (critical), but the advice is not a cut.
    opt = og.stabilized(optax.adam(1e-2), 1e-2)
    grads = [{"w": jnp.full(3, jnp.nan)}] * 12
    _, states = run_steps(opt, grads, params={"w": jnp.ones(3)})
    rep = stability_report(states[-1])
    assert rep.status == "critical" and rep.window.nonfinite == 12
    assert rep.lr_recommendation == "keep"
    assert "12 non-finite gradient steps" in rep.lr_reason


def test_update_ratio_last_and_median():
    # Ratios pushed in order 3, 1, 2 (x 1e-3): last 2e-3, median 2e-3.
    rep = stability_report(wrapper_state([3e-3, 1e-3, 2e-3]))
    assert rep.update_ratio_last == pytest.approx(2e-3, rel=RTOL)
    assert rep.update_ratio_median == pytest.approx(2e-3, rel=RTOL)
    assert rep.update_ratio_count == 3


def test_update_ratio_of_a_real_wrapper_step():
    # |p| = |(1, 1, 1, 1)| = 2; g = 0.1 each (norm 0.2 < threshold 1, kept);
    # sgd(0.05): u = -0.005 each, |u| = 0.01; ratio 0.005.
    opt = og.stabilized(optax.sgd(0.05), initial_threshold=1.0)
    params = {"w": jnp.ones(4)}
    _, states = run_steps(opt, [{"w": jnp.full(4, 0.1)}], params=params)
    rep = stability_report(states[-1])
    assert rep.update_ratio_last == pytest.approx(0.005, rel=1e-5)  # f32 norms of f32 sums
    assert rep.lr_recommendation == "keep"


# --- Several stabilizers ------------------------------------------------------


def partitioned():
    opt = optax.partition(
        {
            "a": og.stabilized(optax.sgd(0.1), initial_threshold=2.0),
            "b": optax.chain(og.stabilize(initial_threshold=3.0), optax.sgd(0.1)),
        },
        {"x": "a", "y": "b"},
    )
    params = {"x": jnp.ones(2), "y": jnp.ones(3)}
    return opt, params


def test_several_stabilizers_give_a_dict_keyed_by_path():
    opt, params = partitioned()
    grads = {"x": jnp.full(2, 0.1), "y": jnp.full(3, 0.1)}
    _, states = run_steps(opt, [grads], params=params)
    reports = stability_reports(states[-1])
    paths = [path for path, _ in og.find_states(states[-1])]
    assert isinstance(reports, dict) and list(reports) == paths
    by_threshold = {rep.clip_threshold: rep for rep in reports.values()}
    assert set(by_threshold) == {2.0, 3.0}
    # The ratio belongs to the wrapper around the first one only.
    assert by_threshold[2.0].update_ratio_count == 1
    assert by_threshold[3.0].update_ratio_count is None
    for path, rep in reports.items():
        assert rep.path == path


def test_report_reads_the_device_once(monkeypatch):
    opt, params = partitioned()
    state = opt.init(params)
    calls = []
    real = jax.device_get

    def counting(x):
        calls.append(1)
        return real(x)

    monkeypatch.setattr(jax, "device_get", counting)
    stability_reports(state)
    assert len(calls) == 1


def test_one_report_or_a_dict_never_depending_on_the_count():
    """stability_report always returns one report; stability_reports always a dict."""
    opt, params = partitioned()
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"2 stabilizers.*stability_reports"):
        stability_report(state)
    single = og.stabilize(1e-2)
    one = single.init({"w": jnp.ones(2)})
    assert isinstance(stability_report(one), StabilityReport)
    reports = stability_reports(one)
    assert isinstance(reports, dict) and list(reports) == [""]
    assert reports[""].as_dict() == stability_report(one).as_dict()  # NaN fields: compare as dicts


def test_no_stabilizer_is_an_error():
    with pytest.raises(ValueError, match="No GradientFlowState"):
        stability_report(optax.sgd(0.1).init({"w": jnp.ones(2)}))


# --- JSON ---------------------------------------------------------------------


def test_as_dict_is_strict_json_without_null_fields():
    # A fresh state: last_grad_norm and last_loss are NaN, the history empty.
    rep = stability_report(hand_state(last_grad_norm=jnp.inf))
    assert isinstance(rep, StabilityReport)
    assert dataclasses.is_dataclass(rep)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rep.status = "x"
    plain = rep.as_dict()
    text = json.dumps(plain, allow_nan=False)
    back = json.loads(text)
    # Every field has a value or is left out (SPEC.md, "Stability report").
    assert "last_grad_norm" not in back  # inf
    assert "last_loss" not in back  # NaN: no loss given
    assert back["grad_norm"] == {"count": 0}  # empty history: only the count
    assert "adaptations" not in back["total"]  # not counted by the state
    assert back["window"]["adaptations"] == 0
    assert "update_ratio_median" not in back and "variance_trend" not in back

    def nulls(value):
        if isinstance(value, dict):
            return sum(nulls(v) for v in value.values()) + sum(v is None for v in value.values())
        return 0

    assert nulls(back) == 0
    assert back["total"]["explosions"] == 0
    assert back["loss_scale_history"] == [1.0]
    assert back["status"] == "healthy"
    assert isinstance(back["event_flags"], list)


def test_as_dict_keeps_finite_values():
    flags = [0, 3, 1, 0, 3, 4, 1, 3, 0, 0]
    plain = stability_report(hand_state(**window(flags))).as_dict()
    assert plain["stability_score"] == pytest.approx(0.7, rel=RTOL)
    assert plain["event_flags"] == flags
    assert plain["window"]["clipped"] == 5
    assert "unstable" in stability_report(hand_state(**window(flags))).summary()


# --- Metrics ------------------------------------------------------------------


def test_metrics_inside_jit_without_host_transfer():
    # presets.seed() (the median_mad rule) with adaptation_interval 0: the
    # threshold stays at its explicit 1 (the default "track" rule would move it).
    cfg = dataclasses.replace(
        presets.seed(),
        loss_scaling=False,
        event_history_size=10,
        emergency_patience=0,
        adaptation_interval=0,
    )
    opt = optax.chain(og.stabilize(config=cfg, initial_threshold=1.0), optax.sgd(0.1))
    _, states = scripted_run(opt, {2, 5, 8})
    fn = jax.jit(metrics)
    with jax.transfer_guard_device_to_host("disallow"):
        out = fn(states[-1])
    assert all(isinstance(v, jax.Array) and v.shape == () for v in out.values())
    got = {k: float(v) for k, v in out.items()}
    assert got["gradflow/step"] == 10
    assert got["gradflow/explosion_count"] == 3
    assert got["gradflow/clip_count"] == 3
    assert got["gradflow/explosion_rate"] == pytest.approx(0.3, rel=RTOL)
    assert got["gradflow/clip_rate"] == pytest.approx(0.3, rel=RTOL)
    assert got["gradflow/stability_score"] == pytest.approx(0.7, rel=RTOL)
    assert got["gradflow/flow_efficiency"] == pytest.approx(0.7, rel=RTOL)
    assert got["gradflow/clip_threshold"] == 1.0
    assert got["gradflow/loss_scale"] == 1.0
    assert got["gradflow/grad_norm"] == pytest.approx(0.5, rel=RTOL)
    assert got["gradflow/window_steps"] == 10
    assert "gradflow/update_ratio" not in got


def test_metrics_of_several_stabilizers_are_prefixed_by_path():
    opt, params = partitioned()
    state = opt.init(params)
    out = jax.jit(metrics)(state)
    paths = [path for path, _ in og.find_states(state)]
    for path in paths:
        assert f"gradflow/{path}/clip_threshold" in out
    thresholds = sorted(float(out[f"gradflow/{p}/clip_threshold"]) for p in paths)
    assert thresholds == [2.0, 3.0]
    # update_ratio only for the wrapper, NaN before the first step.
    ratio_keys = [k for k in out if k.endswith("/update_ratio")]
    assert len(ratio_keys) == 1 and math.isnan(float(out[ratio_keys[0]]))
    # An empty window: score 1.
    assert all(float(out[f"gradflow/{p}/stability_score"]) == 1.0 for p in paths)


def test_metrics_and_report_read_a_flax_nnx_optimizer_state():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, og.stabilized(optax.adam(1e-3), 1e-3), wrt=nnx.Param)
    grads = nnx.state(model, nnx.Param)
    optimizer.update(model, jax.tree.map(jnp.ones_like, grads))
    metrics = og.metrics(optimizer.opt_state)
    # One step of nine unit gradients: norm 3 < 0.1 * sqrt(1 / 1e-3) = 3.16,
    # not clipped.
    assert float(metrics["gradflow/clip_rate"]) == 0.0
    assert og.stability_report(optimizer.opt_state).update_ratio_last is not None
