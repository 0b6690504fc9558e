"""plot(): renders with the Agg backend; the norm / step alignment by hand; a Monitor's run."""

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import matplotlib
import optax
import pytest
from _helpers import run_steps, vec

import optax_gradflow as og
from optax_gradflow import presets
from optax_gradflow.config import StabilizerConfig
from optax_gradflow.plotting import norm_steps, plot, threshold_path
from optax_gradflow.report import stability_report, stability_reports
from optax_gradflow.state import Ring
from optax_gradflow.transform import init_state

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@functools.cache
def eventful_state():
    # Threshold 1 (explicit), explosion above 3, emergency after 3 explosions
    # in a row, no loss scaling. Steps: quiet, clipped (2), vanishing (0),
    # three explosions (the third fires: threshold 0.5), quiet, non-finite.
    # presets.seed() (the median_mad rule): with adaptation_interval 0 the
    # threshold only changes at the emergency, which halves it.
    cfg = dataclasses.replace(
        presets.seed(),
        loss_scaling=False,
        emergency_patience=3,
        adaptation_interval=0,
        diagnostics_interval=0,
    )
    opt = optax.chain(og.stabilize(config=cfg, initial_threshold=1.0), optax.sgd(0.1))
    norms = [0.5, 2.0, 0.0, 10.0, 10.0, 10.0, 0.3, float("nan"), 0.4]
    _, states = run_steps(opt, [vec(n) for n in norms], params=vec(1.0))
    return states[-1]


def test_plot_renders_a_png(tmp_path):
    fig = plot(eventful_state())
    out = tmp_path / "flow.png"
    fig.savefig(out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    # Loss scaling is off: no loss-scale panel.
    (ax_norm,) = fig.axes
    labels = set(ax_norm.get_legend_handles_labels()[1])
    assert {
        "gradient norm",
        "clip threshold (where the state records it)",
        "clipped",
        "vanishing",
        "explosion",
        "non-finite",
        "emergency",
    } <= labels
    # The history holds the 6 finite, non-exploding norms, at their steps.
    (norm_line,) = [line for line in ax_norm.get_lines() if line.get_label() == "gradient norm"]
    assert list(norm_line.get_xdata()) == [0, 1, 2, 6, 8]
    assert list(norm_line.get_ydata()) == pytest.approx([0.5, 2.0, 0.0, 0.3, 0.4], rel=1e-6)
    # Vertical lines: 3 explosions, 1 non-finite step, 1 emergency.
    vertical = [line for line in ax_norm.get_lines() if len(set(line.get_xdata())) == 1]
    assert len(vertical) == 5
    # An emergency in the window: critical; score 1 - (3 + 1) / 9 = 0.56. The
    # panel covers steps 0-8: the norms and the events (all 9 steps in the window).
    assert ax_norm.get_title() == "[0]: critical, score 0.56, step 9; steps 0-8"
    assert "norms: the last 5 finite, non-exploding steps, 0-8" in ax_norm.get_xlabel()
    assert "events: steps 0-8" in ax_norm.get_xlabel()
    assert "estimated" not in ax_norm.get_xlabel()


def test_plot_of_a_long_run_says_what_each_part_covers():
    # 300 calm steps, default config (E = 100, H = 1000, a threshold record
    # every 100 steps): the norms cover steps 0-299 (those before the event
    # window 200-299 placed one per step: estimated), the threshold is drawn
    # at the steps the state knows: the record before the window at its
    # start (200), the one of step 299 from step 300 on.
    opt = optax.chain(og.stabilize(1e-2), optax.sgd(0.01))
    _, states = run_steps(opt, [vec(0.5 + 0.001 * k) for k in range(300)], params=vec(1.0))
    rep = stability_report(states[-1])
    fig = plot(rep)
    (ax,) = fig.axes
    assert ax.get_title().endswith("step 300; steps 0-299")
    label = ax.get_xlabel()
    assert "the last 300 finite, non-exploding steps, 0-299 (before step 200: estimated)" in label
    assert "events: steps 200-299" in label
    (line,) = [li for li in ax.get_lines() if li.get_label().startswith("clip threshold")]
    assert list(line.get_xdata()) == [200, 300]
    history = rep.threshold_history
    assert list(line.get_ydata()) == [history[-2], history[-1]]
    assert history[-1] == rep.clip_threshold
    # The track rule moved the threshold: the two records differ.
    assert history[-2] != history[-1]


def test_plot_accepts_a_report_and_one_axes():
    rep = stability_report(eventful_state())
    fig, ax = plt.subplots()
    assert plot(rep, ax=ax) is fig
    assert len(fig.axes) == 1
    assert "loss scale" not in ax.get_title()  # loss scaling is off


def test_the_loss_scale_panel_only_when_loss_scaling_works():
    # presets.seed(): loss scaling on; an explosion multiplies the scale by 0.8.
    opt = optax.chain(og.stabilize(1e-2, config=presets.seed()), optax.sgd(0.1))
    _, states = run_steps(opt, [vec(0.5), vec(50.0), vec(0.5)], params=vec(1.0))
    fig = plot(states[-1])
    assert [ax.get_ylabel() for ax in fig.axes] == ["unscaled gradient norm", "loss scale"]
    # A pair of Axes given for a run without loss scaling: the second is hidden.
    fig, pair = plt.subplots(2, 1)
    plot(eventful_state(), ax=list(pair))
    assert pair[0].get_visible() and not pair[1].get_visible()


def test_norm_steps_by_hand():
    # E = 5 window over steps 2..6 with flags [0, explosion, 0, non-finite, 0];
    # 5 history entries. Newest first: 6, 4, 2 take the last three; the two
    # older ones go before the window: steps 1 and 0.
    cfg = StabilizerConfig(event_history_size=5, norm_history_size=8, diagnostics_window=2)
    state = init_state(1.0, 0, cfg)._replace(
        stabilizer_step=jnp.int32(7),
        # wrapped: index 2
        event_flags=Ring(jnp.asarray([3, 0, 8, 0, 0], jnp.int32), jnp.int32(2), jnp.int32(5)),
        norm_history=Ring(
            jnp.asarray([1, 2, 3, 4, 5, 0, 0, 0], jnp.float32), jnp.int32(5), jnp.int32(5)
        ),
    )
    rep = stability_report(state)
    assert rep.event_flags == (8, 0, 0, 3, 0)  # steps 2, 3, 4, 5, 6
    # Flags by step: 2 non-finite, 3 quiet, 4 quiet, 5 explosion, 6 quiet.
    # Newest first: 6 -> 5.0, 4 -> 4.0, 3 -> 3.0; then 1, 0 before the window.
    assert norm_steps(rep) == [0, 1, 3, 4, 6]


def test_threshold_path_follows_pushes():
    # The emergency at step 5 pushed 0.5, the only push: used from step 6 on,
    # and still in force at step 9. The threshold before it is not in the
    # state: no point is drawn for it.
    rep = stability_report(eventful_state())
    assert threshold_path(rep) == ([6, 9], [0.5, 0.5])


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"optax-gradflow\[plot\]"):
        plot(eventful_state())


def test_several_stabilizers_must_be_picked():
    opt = optax.partition(
        {"a": og.stabilize(initial_threshold=1.0), "b": og.stabilize(initial_threshold=2.0)},
        {"x": "a", "y": "b"},
    )
    state = opt.init({"x": jnp.ones(2), "y": jnp.ones(2)})
    with pytest.raises(ValueError, match="2 stabilizers"):
        plot(state)
    reports = stability_reports(state)
    fig = plot(next(iter(reports.values())))
    assert len(fig.axes) == 1  # no loss-scale panel: loss scaling is off


# --- plot(monitor): the whole run ------------------------------------------------


def monitored_run(opt, params, grads_of_step, steps, every):
    """Trains ``steps`` steps, calling a Monitor(every) each step; returns it."""
    state = opt.init(params)
    update = jax.jit(opt.update)
    monitor = og.Monitor(every=every)
    monitor.update(state)
    for k in range(steps):
        _, state = update(grads_of_step(k), state, params, value=jnp.float32(1.0 / (k + 1)))
        monitor.update(state)
    monitor.flush(state)
    return monitor


def test_plot_monitor_draws_the_whole_run_against_steps():
    # The default ("track") rule from a learning-rate threshold 1.0; the norms
    # grow tenfold, with a spike every 40 steps: the threshold follows.
    def grads(k):
        return vec(0.2 * 10 ** (k / 150) * (20.0 if k % 40 == 39 else 1.0))

    opt = optax.chain(og.stabilize(1e-2), optax.sgd(0.1))
    monitor = monitored_run(opt, vec(1.0), grads, steps=150, every=7)
    fig = plot(monitor)
    assert len(fig.axes) == 3  # no loss-scale row: loss scaling is off
    for ax in fig.axes:
        assert ax.get_xlim() == (0, 150)
        for line in ax.get_lines():
            assert min(line.get_xdata()) >= 0 and max(line.get_xdata()) <= 150
    ax_norm, ax_events, ax_loss = fig.axes
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    assert "loss scale" not in lines
    # The norm band, the events and the threshold span steps 0 to 150.
    for label in ("norm median", "norm max", "clip threshold"):
        xs = list(lines[label].get_xdata())
        assert (xs[0], xs[-1]) == (0, 150), label
    assert lines["norm median"].axes is ax_norm and lines["loss"].axes is ax_loss
    events = [lab for lab in lines if lab.split(" (")[0] in {"clipped", "explosions"}]
    assert len(events) == 2 and all(lines[lab].axes is ax_events for lab in events)
    # Steps 0-6, 7-13, ...: the band changes at each read.
    assert list(lines["norm max"].get_xdata())[:3] == [0, 7, 14]
    # The threshold moved: more than one value over the run.
    assert len({round(float(v), 6) for v in lines["clip threshold"].get_ydata()}) > 1
    assert "whole run, steps 0-150" in ax_norm.get_title()
    assert ax_loss.get_xlabel() == "step"
    # With loss scaling at work (explosions back the scale off): four rows.
    scaled = optax.chain(
        og.stabilize(1e-2, config=StabilizerConfig(loss_scaling=True)), optax.sgd(0.1)
    )
    fig = plot(monitored_run(scaled, vec(1.0), grads, steps=150, every=7))
    assert len(fig.axes) == 4 and fig.axes[2].get_ylabel() == "loss scale"


def test_plot_monitor_one_column_per_stabilizer(tmp_path):
    opt = optax.partition(
        {"a": og.stabilize(1e-2), "b": og.stabilize(initial_threshold=5.0)},
        {"x": "a", "y": "b"},
    )
    params = {"x": jnp.ones(2), "y": jnp.ones(2)}

    def grads(k):
        return {"x": jnp.full(2, 0.1 * (k + 1)), "y": jnp.full(2, 1.0)}

    monitor = monitored_run(opt, params, grads, steps=30, every=5)
    fig = plot(monitor)
    assert len(fig.axes) == 6  # three rows each: no loss scaling
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 2
    for path, title in zip(monitor.paths, titles, strict=True):
        assert title.startswith(f"{path}: whole run, steps 0-30")
    fig.savefig(tmp_path / "two.png")
    assert (tmp_path / "two.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_monitor_into_given_axes_and_subfigures():
    opt = optax.chain(og.stabilize(config=presets.clip_only(1.0)), optax.sgd(0.1))
    monitor = monitored_run(opt, vec(1.0), lambda k: vec(2.0 if k % 3 else 0.5), 12, every=4)
    fig, axes = plt.subplots(4, 1)
    assert plot(monitor, ax=list(axes)) is fig
    (threshold,) = [line for line in axes[0].get_lines() if line.get_label() == "clip threshold"]
    assert set(threshold.get_ydata()) == {1.0}  # a fixed threshold: one value
    assert not axes[2].get_visible()  # the loss-scale row: loss scaling is off
    outer = plt.figure()
    assert plot(monitor, ax=outer.subfigures(2, 1)[1]) is outer
    assert len(outer.axes) == 3
    with pytest.raises(ValueError, match="4 Axes"):
        plot(monitor, ax=list(axes)[:2])


def test_plot_monitor_without_records_says_so():
    monitor = og.Monitor(every=1)
    monitor.update(optax.chain(og.stabilize(1e-2)).init(vec(1.0)))  # step 0: no interval
    with pytest.raises(ValueError, match="no records yet"):
        plot(monitor)


def test_plot_draws_a_pytorch_stabilizer():
    torch = pytest.importorskip("torch")
    from optax_gradflow.torch import GradientFlowStabilizer

    stab = GradientFlowStabilizer(1e-2)
    p = torch.nn.Parameter(torch.zeros(2))
    for g in ([0.3, 0.4], [30.0, 40.0], [0.12, 0.16]):
        p.grad = torch.tensor(g)
        stab.clip_gradients([p])
    fig = plot(stab)
    # Three steps, the second an explosion (kept out of the norm history).
    assert fig.axes[0].get_title() == "torch: unstable, score 0.67, step 3; steps 0-2"
    assert "the last 2 finite, non-exploding steps" in fig.axes[0].get_xlabel()
