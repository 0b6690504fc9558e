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
    ax_norm, ax_scale = fig.axes
    labels = set(ax_norm.get_legend_handles_labels()[1])
    assert {
        "gradient norm",
        "clip threshold",
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
    # An emergency in the window: critical; score 1 - (3 + 1) / 9 = 0.56.
    # The state keeps a recent window only (E = 100 steps, 9 so far): said so.
    assert ax_norm.get_title() == "[0]: critical, score 0.56, step 9; recent window: last 9 steps"
    assert "recent window" in ax_norm.get_xlabel()
    assert ax_scale.get_ylabel() == "loss scale"


def test_plot_accepts_a_report_and_one_axes():
    rep = stability_report(eventful_state())
    fig, ax = plt.subplots()
    assert plot(rep, ax=ax) is fig
    assert len(fig.axes) == 1
    assert "loss scale 1" in ax.get_title()


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
    # The emergency at step 5 pushed 0.5, the only push: used from step 6 on. The
    # threshold before it is not in the state, so the line starts at 0.5 too.
    rep = stability_report(eventful_state())
    xs, ys = threshold_path(rep, 0)
    assert xs == [0, 6, 9]
    assert ys == [0.5, 0.5, 0.5]


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
    assert len(fig.axes) == 2


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
    assert len(fig.axes) == 4
    for ax in fig.axes:
        assert ax.get_xlim() == (0, 150)
        for line in ax.get_lines():
            assert min(line.get_xdata()) >= 0 and max(line.get_xdata()) <= 150
    ax_norm, ax_events, ax_scale, ax_loss = fig.axes
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    # The norm band, the events and the threshold span steps 0 to 150.
    for label in ("norm median", "norm max", "clip threshold", "loss scale"):
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
    assert ax_scale.get_ylabel() == "loss scale"


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
    assert len(fig.axes) == 8
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
    outer = plt.figure()
    assert plot(monitor, ax=outer.subfigures(2, 1)[1]) is outer
    assert len(outer.axes) == 4
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
    assert "recent window" in fig.axes[0].get_title() or any(
        "recent window" in ax.get_xlabel() for ax in fig.axes
    )
