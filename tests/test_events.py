"""Event logging, in-graph and host-side, asserted with caplog."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import optax
import pytest
from _helpers import run_steps, vec

import optax_gradflow as og
from optax_gradflow import events, presets
from optax_gradflow.config import StabilizerConfig
from optax_gradflow.events import BurstFolder, EventLogger

LOGGER = "optax_gradflow"

# Explicit threshold 1, explosion above 3, no loss scaling (the gradients fed
# are the true ones), no adaptation, no diagnostics, no emergency: each test
# switches on what it looks at. The base is presets.seed() (the median_mad
# rule): with adaptation_interval 0 its threshold is fixed, and its emergency
# halves the threshold. The default "track" rule moves the threshold every
# step; test_track_rule_emergency_logged_once_per_run covers it.
QUIET = {
    "loss_scaling": False,
    "adaptation_interval": 0,
    "diagnostics_interval": 0,
    "emergency_patience": 0,
}


def config(**changes):
    return dataclasses.replace(presets.seed(), **{**QUIET, **changes})


def records(caplog, kind=None):
    return [
        r
        for r in caplog.records
        if r.name == LOGGER and (kind is None or getattr(r, "gradflow_kind", None) == kind)
    ]


def run(opt, norms, params=None):
    """One jitted step per norm; each gradient is (norm, 0)."""
    grads = [vec(n, 0.0) for n in norms]
    _, states = run_steps(opt, grads, params=params or vec(1.0, 1.0))
    jax.effects_barrier()
    return states


def scan_run(opt, norms, state=None, params=None):
    """All steps in one jitted lax.scan; returns the final state."""
    params = params or vec(1.0, 1.0)
    state = opt.init(params) if state is None else state

    def body(s, n):
        _, s = opt.update({"w": jnp.stack([n, jnp.float32(0.0)])}, s, params)
        return s, None

    state, _ = jax.jit(lambda s, ns: jax.lax.scan(body, s, ns))(
        state, jnp.asarray(norms, jnp.float32)
    )
    jax.effects_barrier()
    return state


# --- In-graph -----------------------------------------------------------------


def test_explosion_logged_at_error_with_norm_and_threshold(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    opt = og.stabilize(config=config(), initial_threshold=1.0, log_events=True)
    # Step 1: norm 10 > 3 x 1, an explosion; 0.5 is quiet; 2 is only clipped.
    run(opt, [0.5, 10.0, 2.0, 0.5])
    recs = records(caplog)
    assert len(recs) == 1
    (rec,) = recs
    assert rec.levelno == logging.ERROR
    assert rec.gradflow_kind == "explosion" and rec.gradflow_step == 1
    assert "step 1" in rec.getMessage()
    assert "norm 10 " in rec.getMessage()
    assert "threshold 1;" in rec.getMessage()


def test_steps_without_events_make_no_callback(monkeypatch):
    calls = []
    real = events.InGraphEmitter.__call__

    def counting(self, **payload):
        calls.append(int(payload["step"]))
        return real(self, **payload)

    monkeypatch.setattr(events.InGraphEmitter, "__call__", counting)
    opt = og.stabilize(config=config(), initial_threshold=1.0, log_events=True)
    # Quiet, clipped-only (2 > 1 but < 3), explosion, quiet, non-finite, quiet.
    run(opt, [0.5, 2.0, 10.0, 0.5, float("nan"), 0.5])
    assert calls == [2, 4]


def test_log_events_off_adds_no_callback():
    opt = og.stabilize(config=config(), initial_threshold=1.0)
    state = opt.init(vec(1.0, 1.0))
    jaxpr = jax.make_jaxpr(opt.update)(vec(1.0, 0.0), state, vec(1.0, 1.0))
    assert "callback" not in str(jaxpr)


def test_nonfinite_logged_at_error(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    opt = og.stabilize(config=config(), initial_threshold=1.0, log_events=True)
    run(opt, [0.5, float("inf")])
    (rec,) = records(caplog)
    assert rec.levelno == logging.ERROR and rec.gradflow_kind == "nonfinite"
    assert "step 1" in rec.getMessage() and "skipped" in rec.getMessage()


def test_emergency_logged_at_critical_with_full_context(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    # Patience 3, default loss scaling from 1 with x0.8 per explosion. Feeding
    # norm 100 * s keeps the unscaled norm at 100 (> 3): explosions at steps
    # 0, 1, 2 with s = 1, 0.8, 0.64. Step 2 fires: threshold 1 -> 0.5; scale
    # 0.64 * 0.8 = 0.512, then max(0.0512, 0.1) = 0.1.
    cfg = config(loss_scaling=True, emergency_patience=3)
    opt = og.stabilize(config=cfg, initial_threshold=1.0, log_events=True)
    run(opt, [100.0, 80.0, 64.0])
    explosions = records(caplog, "explosion")
    assert [r.gradflow_step for r in explosions] == [0, 1, 2]
    assert all(r.levelno == logging.ERROR for r in explosions)
    (rec,) = records(caplog, "emergency")
    assert rec.levelno == logging.CRITICAL
    msg = rec.getMessage()
    assert "step 2" in msg
    assert "after 3 consecutive" in msg
    assert "norm 100," in msg
    assert "threshold 1 -> 0.5" in msg
    assert "loss scale 0.64 -> 0.1" in msg
    assert "1 emergencies, 3 explosions, 0 non-finite" in msg


def test_track_rule_emergency_logged_once_per_run(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    # The default "track" rule, loss scaling on, patience 3, t0 = 1 (c = d = 0),
    # with its rates pinned for the hand computation: r = 0.05, max rise 0.02,
    # max fall 0.05, so the deviation is clamped to [-0.05 / r, 0.02 / r] =
    # [-1, 0.4].
    # Unscaled norm 100 each step (raw 100 * s), ln 100 = 4.605 -> e = 0.4:
    #   step 0: t = 1;                  c = 0.02, d = 0.05 * 0.4 = 0.02
    #   step 1: t = exp(0.04) = 1.041;  c = 0.04, d = 0.02 + 0.05 * 0.38 = 0.039
    #   step 2: t = exp(0.079) = 1.082; c = 0.06, d = 0.039 + 0.05 * 0.361
    #           = 0.05705, then the emergency: c + ln 0.5, t = 0.5 * exp(0.11705)
    #           = 0.5621; scale 0.64 * 0.8 = 0.512 -> max(0.0512, 0.1) = 0.1.
    # Steps 3-5 (unscaled norm 100 at s = 0.1) keep exploding: the same run,
    # so no second emergency (SPEC.md, "Tracking rule", Emergency).
    cfg = StabilizerConfig(
        track_rate=0.05,
        track_max_rise=0.02,
        track_max_fall=0.05,
        emergency_threshold_factor=0.5,
        loss_scaling=True,
        emergency_patience=3,
        adaptation_interval=0,
        diagnostics_interval=0,
    )
    opt = og.stabilize(config=cfg, initial_threshold=1.0, log_events=True)
    run(opt, [100.0, 80.0, 64.0, 10.0, 10.0, 10.0])
    assert [r.gradflow_step for r in records(caplog, "explosion")] == [0, 1, 2, 3, 4]
    (rec,) = records(caplog, "emergency")
    assert rec.levelno == logging.CRITICAL
    msg = rec.getMessage()
    assert "step 2" in msg and "after 3 consecutive" in msg and "norm 100," in msg
    assert "threshold 1.082 -> 0.5621" in msg
    assert "loss scale 0.64 -> 0.1" in msg
    assert "1 emergencies, 3 explosions, 0 non-finite" in msg


def test_adaptation_logged_at_info(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    # Interval 4: step 3 adapts. History [0.5] * 4: median 0.5, MAD 0 -> 0.5.
    opt = og.stabilize(config=config(adaptation_interval=4), initial_threshold=1.0, log_events=True)
    run(opt, [0.5] * 5)
    (rec,) = records(caplog)
    assert rec.levelno == logging.INFO and rec.gradflow_kind == "adaptation"
    assert rec.getMessage() == "clip threshold adapted at step 3: 1 -> 0.5"


def test_early_warning_logged_at_warning(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    # Diagnostics every 4 steps over the last 2 norms, 4 then 8: log-slope
    # ln 2 = 0.693 > 0.01, so step 3 raises the warning. Threshold 100: no clip.
    cfg = config(diagnostics_interval=4, diagnostics_window=2)
    opt = og.stabilize(config=cfg, initial_threshold=100.0, log_events=True)
    run(opt, [1.0, 2.0, 4.0, 8.0])
    (rec,) = records(caplog)
    assert rec.levelno == logging.WARNING and rec.gradflow_kind == "warning"
    assert "early warning at step 3" in rec.getMessage()
    assert "trend 0.693" in rec.getMessage()


def test_vanishing_logged_at_warning(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    opt = og.stabilize(config=config(), initial_threshold=1.0, log_events=True)
    run(opt, [0.5, 0.0])
    (rec,) = records(caplog)
    assert rec.levelno == logging.WARNING and rec.gradflow_kind == "vanishing"
    assert "step 1" in rec.getMessage()


def test_wrapper_passes_log_events_through(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    opt = og.stabilized(optax.sgd(0.1), config=config(), initial_threshold=1.0, log_events=True)
    run(opt, [10.0])
    (rec,) = records(caplog)
    assert rec.gradflow_kind == "explosion" and rec.gradflow_step == 0


def test_in_graph_burst_of_a_thousand_explosions_is_folded(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    opt = og.stabilize(config=config(), initial_threshold=1.0, log_events=True)
    # Steps 0..1000 all explode. Window 0 (steps 0-999) prints 5 lines and
    # folds 995; the explosion at step 1000 opens window 1, which first
    # writes the summary of window 0, then its own line.
    scan_run(opt, [10.0] * 1001)
    recs = records(caplog, "explosion")
    assert len(recs) == 7
    assert [r.gradflow_step for r in recs[:5]] == [0, 1, 2, 3, 4]
    assert "further explosions in this 1000-step window are folded" in recs[4].getMessage()
    assert recs[5].getMessage() == "... 995 more explosions folded (steps 5-999)"
    assert recs[5].gradflow_folded == 995
    assert recs[6].gradflow_step == 1000


# --- Burst folding, directly ----------------------------------------------------


def test_burst_folder_counts_and_flushes(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    folder = BurstFolder(max_lines=2, window=10)
    for k in range(7):
        folder.emit("explosion", k, f"explosion {k}")
    folder.emit("adaptation", 3, "adapted")  # its own budget
    assert [r.getMessage() for r in records(caplog)] == [
        "explosion 0",
        "explosion 1 [further explosions in this 10-step window are folded into one summary line]",
        "adapted",
    ]
    folder.flush()
    assert records(caplog)[-1].getMessage() == "... 5 more explosions folded (steps 2-6)"
    assert records(caplog)[-1].levelno == logging.ERROR
    folder.flush()  # nothing new folded: nothing written
    assert len(records(caplog)) == 4


def test_burst_folder_rejects_bad_sizes():
    with pytest.raises(ValueError, match="max_lines"):
        BurstFolder(max_lines=0)
    with pytest.raises(ValueError, match="every"):
        EventLogger(every=0)


# --- Host-side EventLogger --------------------------------------------------------


def test_event_logger_reads_the_device_every_n_calls(monkeypatch):
    opt = og.stabilize(config=config(), initial_threshold=1.0)
    state = opt.init(vec(1.0, 1.0))
    calls = []
    real = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: calls.append(1) or real(x))
    logger = EventLogger(every=5)
    read = [logger(state) for _ in range(12)]
    # Calls 1 (the baseline), 6 and 11 read.
    assert len(calls) == 3
    assert read == [True] + [False] * 4 + [True] + [False] * 4 + [True, False]


def test_event_logger_logs_what_changed(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    opt = og.stabilize(config=config(), initial_threshold=1.0)
    update = jax.jit(opt.update)
    params = vec(1.0, 1.0)
    state = opt.init(params)
    logger = EventLogger(every=10)
    norms = [0.5, 0.5, 10.0, 0.5, 0.5, 20.0, 0.5, 0.5, 30.0, 0.5]
    for n in norms:
        _, state = update(vec(n, 0.0), state, params)
        logger(state)
    assert records(caplog) == []  # only call 1 (after the quiet step 0) has read
    logger(state)  # call 11 reads
    recs = records(caplog)
    assert [(r.gradflow_kind, r.gradflow_step) for r in recs] == [
        ("explosion", 2),
        ("explosion", 5),
        ("explosion", 8),
    ]
    assert all(r.levelno == logging.ERROR for r in recs)
    assert "norm > threshold 1;" in recs[0].getMessage()
    # The next read sees nothing new.
    for _ in range(10):
        logger(state)
    assert len(records(caplog)) == 3


def test_event_logger_emergency_context(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    # Patience 3: explosions at steps 3, 4, 5 fire at step 5: threshold 1 -> 0.5.
    opt = og.stabilize(config=config(emergency_patience=3), initial_threshold=1.0)
    states = run(opt, [0.5, 0.5, 0.5, 10.0, 10.0, 10.0, 0.2, 0.2])
    logger = EventLogger(every=7)
    for s in states:  # reads after steps 0 (baseline) and 7
        logger(s)
    kinds = [(r.gradflow_kind, r.gradflow_step) for r in records(caplog)]
    assert kinds == [("explosion", 3), ("explosion", 4), ("explosion", 5), ("emergency", 5)]
    (rec,) = records(caplog, "emergency")
    assert rec.levelno == logging.CRITICAL
    msg = rec.getMessage()
    assert "step 5" in msg and "threshold 1 -> 0.5" in msg
    assert "totals after step 5: 1 emergencies, 3 explosions, 0 non-finite steps" in msg


def test_event_logger_emergency_line_reads_the_state_of_its_step(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    # Patience 3: explosions at 3, 4, 5 fire at step 5; then a calm step, a
    # NaN at 7 and one more explosion at 8 (two in a row: no second
    # emergency). Read after step 9: the state then counts 4 explosions and 1
    # non-finite step, but after step 5 there were 3 and 0.
    opt = og.stabilize(config=config(emergency_patience=3), initial_threshold=1.0)
    states = run(opt, [0.5, 0.5, 0.5, 10.0, 10.0, 10.0, 0.2, float("nan"), 10.0, 0.2])
    assert int(states[-1].explosion_count) == 4 and int(states[-1].nonfinite_count) == 1
    assert int(states[-1].emergency_count) == 1
    logger = EventLogger(every=9)
    for s in states:  # reads after steps 0 (baseline) and 9
        logger(s)
    (rec,) = records(caplog, "emergency")
    msg = rec.getMessage()
    assert "totals after step 5: 1 emergencies, 3 explosions, 0 non-finite steps" in msg
    # The loss scale read after step 9 is not step 5's: not given.
    assert "loss scale" not in msg


def test_event_logger_threshold_adaptation_and_loss_scale(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    # Interval 4 adapts at steps 3 and 7: history of 0.5s -> 0.5 both times.
    # Loss scaling on: the vanishing step 5 (norm 0) grows the scale 1 -> 1.5.
    cfg = config(adaptation_interval=4, loss_scaling=True)
    opt = og.stabilize(config=cfg, initial_threshold=1.0)
    states = run(opt, [0.5] * 5 + [0.0] + [0.75] * 2)
    logger = EventLogger(every=4)
    for s in states:  # reads after steps 0 (baseline) and 4
        logger(s)
    logger.flush(states[-1])  # and now, after step 7
    msgs = [(r.gradflow_kind, r.levelno, r.getMessage()) for r in records(caplog)]
    assert msgs[0] == ("adaptation", logging.INFO, "clip threshold adapted at step 3: 1 -> 0.5")
    assert ("vanishing", logging.WARNING) == msgs[1][:2] and "step 5" in msgs[1][2]
    assert msgs[2][:2] == ("adaptation", logging.INFO) and "step 7: 0.5 -> " in msgs[2][2]
    assert msgs[3] == ("loss_scale", logging.INFO, "loss scale 1 -> 1.5 between steps 5 and 7")


def test_event_logger_unknown_threshold_is_a_question_mark(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    # First read after the adaptation at step 3: the threshold before it was
    # never seen (the initial one is not in the state).
    opt = og.stabilize(config=config(adaptation_interval=4), initial_threshold=1.0)
    EventLogger(every=1)(run(opt, [0.5] * 4)[-1])
    (rec,) = records(caplog)
    assert rec.getMessage() == "clip threshold adapted at step 3: ? -> 0.5"


def test_event_logger_summarises_events_older_than_the_window(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    # E = 4: after 10 steps the window holds steps 6-9. Explosions at 1 and 2
    # are older and summarised; the one at 8 is itemised.
    cfg = config(event_history_size=4)
    opt = og.stabilize(config=cfg, initial_threshold=1.0)
    norms = [0.5, 10.0, 10.0, 0.5, 0.5, 0.5, 0.5, 0.5, 10.0, 0.5]
    state = run(opt, norms)[-1]
    EventLogger(every=1)(state)
    msgs = [r.getMessage() for r in records(caplog, "explosion")]
    assert msgs == [
        "2 explosions in steps 0-5 are older than the event window (4 steps) and not itemised",
        "gradient explosion at step 8: norm > threshold 1; clipped to the threshold "
        "(explosions so far: 3)",
    ]


def test_event_logger_folds_a_thousand_explosions(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    opt = og.stabilize(config=config(), initial_threshold=1.0)
    params = vec(1.0, 1.0)
    state = opt.init(params)
    logger = EventLogger(every=10)
    for _ in range(100):  # 1000 explosions, read every 10 steps
        state = _ten_steps(opt, state, params)
        for _ in range(10):
            logger(state)
    assert len(records(caplog)) == 5
    logger.flush()
    recs = records(caplog)
    assert len(recs) == 6
    assert recs[-1].getMessage() == "... 995 more explosions folded (steps 5-999)"


_TEN = {}


def _ten_steps(opt, state, params):
    if opt not in _TEN:

        def ten(s):
            def body(s, _):
                return opt.update(vec(10.0, 0.0), s, params)[1], None

            return jax.lax.scan(body, s, None, length=10)[0]

        _TEN[opt] = jax.jit(ten)
    return _TEN[opt](state)


def test_one_message_per_kind_leaves_out_what_the_reader_cannot_know():
    totals = dict.fromkeys(events._COUNTED, 0) | {"explosion_count": 2}
    flags = int(og.constants.Event.CLIPPED | og.constants.Event.EXPLOSION)
    known = events.EventContext(7, flags, 1.0, 1.0, totals, norm=12.5, config=config())
    unknown = events.EventContext(7, flags, 1.0, 1.0, totals)
    assert events.event_messages(known) == [
        (
            "explosion",
            "gradient explosion at step 7: norm 12.5 > 3 x threshold 1; clipped to the "
            "threshold (explosions so far: 2)",
        )
    ]
    assert events.event_messages(unknown) == [
        (
            "explosion",
            "gradient explosion at step 7: norm > threshold 1; clipped to the threshold "
            "(explosions so far: 2)",
        )
    ]


def test_event_logger_logs_states_already_on_the_host_without_a_transfer(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger=LOGGER)
    opt = og.stabilize(config=config(), initial_threshold=1.0)
    states = events.read_states(run(opt, [0.5, 10.0, 0.5])[-1])
    monkeypatch.setattr(jax, "device_get", lambda x: pytest.fail("read the device"))
    EventLogger(every=1).log_states(states)
    (rec,) = records(caplog)
    assert rec.gradflow_kind == "explosion" and rec.gradflow_step == 1


def test_event_logger_prefixes_paths_of_several_stabilizers(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    opt = optax.partition(
        {
            "a": og.stabilize(config=config(), initial_threshold=1.0),
            "b": og.stabilize(config=config(), initial_threshold=100.0),
        },
        {"x": "a", "y": "b"},
    )
    params = {"x": jnp.ones(2), "y": jnp.ones(2)}
    grads = {"x": jnp.array([10.0, 0.0]), "y": jnp.array([10.0, 0.0])}
    _, states = run_steps(opt, [grads], params=params)
    EventLogger(every=1)(states[-1])
    (rec,) = records(caplog)  # only "a" explodes: 10 > 3 x 1, not > 3 x 100
    path_a = og.find_states(states[-1])[0][0]
    assert rec.getMessage().startswith(f"[{path_a}] gradient explosion at step 0")


@pytest.mark.distributed
def test_in_graph_events_are_logged_once_under_axis_name():
    """Under pmap with axis_name every device takes the same decision; one line per event."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))
    import launch

    (out,) = launch.run_together([["log_once.py"]], env=launch.environment(), timeout=240)
    assert out["devices"] == 4
    assert out["explosions"] == 1
    assert out["explosion_lines"] == 1
