"""Monitor: the read schedule, step alignment by hand, several stabilizers, merging, export."""

import dataclasses
import itertools
import json
import logging
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import run_steps, vec

import optax_gradflow as og
from optax_gradflow import monitor as monitor_mod
from optax_gradflow import presets
from optax_gradflow.monitor import Interval, Monitor, merge

NAN = float("nan")


def clip_chain(max_norm=1.0, **changes):
    """A fixed threshold (presets.clip_only): clipped exactly when the norm exceeds it."""
    cfg = dataclasses.replace(presets.clip_only(max_norm), **changes)
    return optax.chain(og.stabilize(config=cfg), optax.sgd(0.1))


def states_for(opt, norms, **extra):
    """The optimizer state after each step; step k's gradient has norm ``norms[k]``."""
    params = vec(1.0)
    state0 = opt.init(params)
    _, states = run_steps(opt, [vec(n) for n in norms], params=params, state=state0, **extra)
    return state0, states


def counter(state, name):
    (_, flow) = og.find_states(state)[0]
    return int(getattr(flow, name))


# --- The read schedule ----------------------------------------------------------


def test_reads_the_device_only_every_n_calls(monkeypatch):
    state0, states = states_for(clip_chain(), [0.5] * 25)
    transfers = []
    real_get = jax.device_get

    def counting_get(x):
        transfers.append(x)
        return real_get(x)

    # jax.device_get everywhere (the event logger's too): the monitor's read is the only one.
    monkeypatch.setattr(jax, "device_get", counting_get)
    monitor = Monitor(every=10, log_events=True)
    untouchable = object()  # a non-read call must not even look at its argument
    assert monitor.update(state0) is True
    read_calls = []
    for call, state in enumerate(states, start=2):
        reads = (call - 1) % 10 == 0
        assert monitor.update(state if reads else untouchable) is reads
        if reads:
            read_calls.append(call)
    assert read_calls == [11, 21]
    assert monitor.calls == 26 and monitor.reads == 3
    assert len(transfers) == 3
    # Each transfer holds the stabilizer states only: no inner optimizer state.
    assert all(
        isinstance(t, list) and all(type(s) is og.GradientFlowState for s in t) for t in transfers
    )
    assert [(r.start, r.stop) for r in monitor.records["[0]"]] == [(0, 10), (10, 20)]


def test_a_call_is_also_an_update():
    state0, _ = states_for(clip_chain(), [])
    monitor = Monitor(every=3)
    assert [monitor(state0) for _ in range(4)] == [True, False, False, True]


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="every"):
        Monitor(every=0)
    with pytest.raises(ValueError, match="max_records"):
        Monitor(max_records=1)
    with pytest.raises(ValueError, match="No GradientFlowState"):
        Monitor(every=1).update(optax.adam(1e-3).init(vec(1.0)))


# --- Step alignment by hand ---------------------------------------------------------


def test_intervals_by_hand_with_a_fixed_threshold():
    # Threshold 1 (clip_only): clipped iff norm > 1; a NaN norm is skipped.
    norms = [0.5, 2.0, 0.3, 3.0, NAN, 0.8, 1.5, 0.2, 4.0, 0.6]
    state0, states = states_for(clip_chain(1.0), norms)
    monitor = Monitor(every=4)
    monitor.update(state0)  # call 1 reads step 0: the baseline, no interval
    for state in states:  # calls 2..11: calls 5 and 9 read, after steps 4 and 8
        monitor.update(state)
    monitor.flush(states[-1])  # closes steps 8-9
    (path,) = monitor.paths
    records = monitor.records[path]
    assert [(r.start, r.stop, r.steps) for r in records] == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    # Steps 0-3: 0.5 2 0.3 3 -> 2 clipped; median (0.5 + 2) / 2, max 3.
    # Steps 4-7: NaN 0.8 1.5 0.2 -> 1 skipped, 1 clipped; 3 norms, median 0.8.
    # Steps 8-9: 4 0.6 -> 1 clipped; median 2.3.
    assert [r.clipped for r in records] == [2, 1, 1]
    assert [r.nonfinite for r in records] == [0, 1, 0]
    assert [r.explosions for r in records] == [0, 0, 0]  # clip_only has no explosion class
    assert [r.norms for r in records] == [4, 3, 2]
    assert [r.norm_median for r in records] == pytest.approx([1.25, 0.8, 2.3], rel=1e-6)
    assert [r.norm_max for r in records] == pytest.approx([3.0, 1.5, 4.0], rel=1e-6)
    assert [r.threshold for r in records] == [1.0, 1.0, 1.0]
    assert [r.loss_scale for r in records] == [1.0, 1.0, 1.0]
    assert all(math.isnan(r.loss) for r in records)  # no value= given
    assert monitor.origin(path) == (0, 1.0, 1.0)
    assert monitor.totals(path) == {
        "clipped": 4,
        "explosions": 0,
        "nonfinite": 1,
        "vanishing": 0,
        "emergencies": 0,
    }


def test_every_exploding_norm_counts_in_the_max():
    # Explosion above 2 x threshold 1. An explosion keeps its norm out of the
    # history, in the ring of exploding norms.
    opt = clip_chain(1.0, explosion_factor=2.0)
    state0, states = states_for(opt, [0.5, 5.0, 7.0, 0.4])
    monitor = Monitor(every=2)
    for state in [state0, *states]:
        monitor.update(state)
    monitor.flush(states[-1])
    first, second = monitor.records["[0]"]
    # Steps 0-1: 0.5 and the explosion 5: median 2.75.
    assert (first.explosions, first.clipped, first.norms) == (1, 1, 2)
    assert first.norm_max == pytest.approx(5.0, rel=1e-6)
    assert first.norm_median == pytest.approx(2.75, rel=1e-6)
    # Steps 2-3: the explosion 7 is not the latest step; its norm is kept all the same.
    assert (second.explosions, second.clipped, second.norms) == (1, 1, 2)
    assert second.norm_max == pytest.approx(7.0, rel=1e-6)
    assert second.norm_median == pytest.approx(3.7, rel=1e-6)


# Threshold 1, explosions above 2: step -> norm of the exploding steps of a
# 40-step stream of norm 0.5 (two of them in a row, none the last of its interval).
EXPLODING = {3: 9.0, 7: 2.5, 12: 30.0, 21: 4.0, 22: 6.0, 35: 3.0}


def exploding_stream() -> list[float]:
    return [EXPLODING.get(k, 0.5) for k in range(40)]


def check_exploding_intervals(records) -> None:
    # Reads every 10 steps: intervals 0-9, 10-19, 20-29, 30-39; each interval's
    # maximum is its largest exploding norm, its norms all of its 10 steps'.
    assert [(r.start, r.stop) for r in records] == [(0, 10), (10, 20), (20, 30), (30, 40)]
    assert [r.explosions for r in records] == [2, 1, 2, 1]
    assert [r.norms for r in records] == [10, 10, 10, 10]
    assert [r.norm_max for r in records] == pytest.approx([9.0, 30.0, 6.0, 3.0], rel=1e-6)
    assert [r.norm_median for r in records] == [0.5] * 4


def test_exploding_norms_between_two_reads_are_in_the_max():
    state0, states = states_for(clip_chain(1.0, explosion_factor=2.0), exploding_stream())
    monitor = Monitor(every=10)
    for state in [state0, *states]:
        monitor.update(state)
    check_exploding_intervals(monitor.records["[0]"])


def test_an_interval_keeps_the_latest_event_history_size_exploding_norms():
    # A ring of 2 exploding norms: the interval 0-9 held 2 explosions (9 and
    # 2.5), 20-29 two (4 and 6): all kept; forced to hold 3 of them, it keeps
    # the latest 2.
    opt = clip_chain(1.0, explosion_factor=2.0, event_history_size=2)
    state0, states = states_for(opt, exploding_stream())
    monitor = Monitor(every=10)
    for state in [state0, *states]:
        monitor.update(state)
    assert [r.norm_max for r in monitor.records["[0]"]] == pytest.approx([9.0, 30.0, 6.0, 3.0])
    whole = Monitor(every=40)
    for state in [state0, *states]:
        whole.update(state)
    whole.flush(states[-1])
    (record,) = whole.records["[0]"]
    # 6 explosions, the latest 2 kept (6 and 3): the 34 calm norms and those.
    assert (record.explosions, record.norms, record.norm_max) == (6, 36, 6.0)


def test_losses_and_a_first_read_in_the_middle_of_a_run():
    opt = clip_chain(1.0)
    _, states = states_for(opt, [2.0, 0.5, 2.0, 0.5, 0.5], value=jnp.float32(0.25))
    monitor = Monitor(every=1)
    monitor.update(states[2])  # after 3 steps: one interval from step 0, counters exact
    monitor.update(states[4])
    (path,) = monitor.paths
    records = monitor.records[path]
    assert [(r.start, r.stop, r.clipped) for r in records] == [(0, 3, 2), (3, 5, 0)]
    assert [r.loss for r in records] == [0.25, 0.25]
    step, threshold, scale = monitor.origin(path)
    assert step == 0 and math.isnan(threshold) and math.isnan(scale)


def test_a_restored_earlier_state_drops_the_later_records():
    _, states = states_for(clip_chain(1.0), [2.0, 0.5, 2.0, 0.5, 2.0, 0.5])
    monitor = Monitor(every=1)
    for k in (1, 3, 5):  # steps 2, 4, 6
        monitor.update(states[k])
    monitor.update(states[2])  # back to step 3 (a checkpoint): the (4, 6) record goes
    monitor.update(states[5])
    records = monitor.records["[0]"]
    assert [(r.start, r.stop) for r in records] == [(0, 2), (2, 3), (3, 6)]
    assert sum(r.clipped for r in records) == counter(states[5], "clip_count") == 3


# --- Several stabilizers ------------------------------------------------------------


def test_two_stabilizers_under_partition_give_two_keyed_records():
    opt = optax.partition(
        {
            "a": og.stabilize(config=presets.clip_only(1.0)),
            "b": og.stabilize(config=presets.clip_only(2.0)),
        },
        {"x": "a", "y": "b"},
    )
    params = {"x": jnp.ones(1), "y": jnp.ones(1)}
    state = opt.init(params)
    update = jax.jit(opt.update)
    monitor = Monitor(every=2)
    monitor.update(state)
    for _ in range(4):  # both gradients have norm 1.5: clipped by "a" only
        _, state = update({"x": jnp.full(1, 1.5), "y": jnp.full(1, 1.5)}, state, params)
        monitor.update(state)
    monitor.flush(state)
    paths = [p for p, _ in og.find_states(state)]
    assert monitor.paths == paths and len(paths) == 2
    a, b = (monitor.records[p] for p in paths)
    assert [(r.start, r.stop) for r in a] == [(0, 2), (2, 4)] == [(r.start, r.stop) for r in b]
    assert [r.clipped for r in a] == [2, 2] and [r.clipped for r in b] == [0, 0]
    assert [r.threshold for r in a] == [1.0, 1.0] and [r.threshold for r in b] == [2.0, 2.0]
    assert [r.norm_median for r in a] == pytest.approx([1.5, 1.5])


# --- Bounded memory -------------------------------------------------------------


def test_merging_keeps_memory_bounded_and_counts_exact():
    rng = np.random.default_rng(0)
    norms = np.exp(rng.normal(0.0, 1.0, 203)).astype(np.float32)
    norms[rng.choice(203, 9, replace=False)] = np.nan
    opt = clip_chain(1.0, explosion_factor=4.0)
    params = vec(1.0)
    state = opt.init(params)
    update = jax.jit(opt.update)
    monitor = Monitor(every=1, max_records=4)
    monitor.update(state)
    for n in norms:
        _, state = update(vec(float(n)), state, params)
        monitor.update(state)
        assert len(monitor.records["[0]"]) <= 4
    records = monitor.records["[0]"]
    # The whole run is covered, without gap or overlap.
    assert records[0].start == 0 and records[-1].stop == 203
    assert all(a.stop == b.start for a, b in itertools.pairwise(records))
    assert sum(r.reads for r in records) == 203
    # Counts add up exactly to the state's counters.
    for field, name in monitor_mod.COUNTERS.items():
        assert sum(getattr(r, name) for r in records) == counter(state, field), name
    assert counter(state, "nonfinite_count") == 9 and counter(state, "explosion_count") > 0
    # One read per step: every step is the latest of its interval, so every
    # finite norm is recovered (explosions' too), and the maximum of the
    # maxima is the largest of them.
    finite = norms[np.isfinite(norms)]
    assert sum(r.norms for r in records) == finite.size
    assert max(r.norm_max for r in records) == pytest.approx(float(finite.max()))


def test_merge_by_hand():
    def interval(start, stop, norms, median, peak, threshold, clipped):
        return Interval(
            start, stop, 1, norms, median, peak, threshold, 1.0, 0.5 * stop, clipped, 1, 0, 0, 0
        )

    a = interval(0, 10, 10, 1.0, 3.0, 2.0, 4)
    b = interval(10, 20, 6, 5.0, 2.0, 1.5, 1)
    m = merge(a, b)
    assert (m.start, m.stop, m.reads, m.norms) == (0, 20, 2, 16)
    assert (m.clipped, m.explosions) == (5, 2)
    assert m.norm_max == 3.0
    assert m.norm_median == 1.0  # the median of the record with more norms
    assert (m.threshold, m.loss) == (1.5, 10.0)  # the later read's
    assert merge(a, interval(10, 20, 10, 2.0, 1.0, 1.0, 0)).norm_median == 1.5
    empty = interval(10, 20, 0, NAN, NAN, 1.0, 0)
    assert merge(a, empty).norm_median == 1.0 and merge(empty, a).norm_max == 3.0


# --- Export ---------------------------------------------------------------------


def recorded_monitor():
    opt = clip_chain(1.0)
    state0, states = states_for(opt, [0.5, 2.0, NAN, 0.3, 5.0])
    monitor = Monitor(every=2, max_records=8)
    for state in [state0, *states]:
        monitor.update(state)
    monitor.flush(states[-1])
    return monitor


def test_json_round_trip(tmp_path):
    monitor = recorded_monitor()
    data = monitor.as_dict()
    path = tmp_path / "run.json"
    monitor.to_json(path)

    def no_constants(name):
        raise AssertionError(f"non-strict JSON constant {name}")

    loaded = json.loads(path.read_text(), parse_constant=no_constants)
    assert loaded == data
    (path_key,) = monitor.paths
    saved = loaded["stabilizers"][path_key]
    assert saved["records"][0]["loss"] is None  # NaN -> null
    assert saved["totals"] == monitor.totals(path_key)
    restored = Monitor.from_json(path)
    assert restored.as_dict() == data
    assert [(r.start, r.stop, r.clipped) for r in restored.records[path_key]] == [
        (r.start, r.stop, r.clipped) for r in monitor.records[path_key]
    ]
    assert os.listdir(tmp_path) == ["run.json"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    path.write_text("old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(monitor_mod.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        recorded_monitor().to_json(path)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["run.json"]


def test_flush_without_the_state_is_an_error_while_calls_are_pending():
    state0, states = states_for(clip_chain(1.0), [0.5, 2.0, 0.3])
    monitor = Monitor(every=10)
    monitor.update(state0)  # read: nothing pending
    monitor.flush()
    for state in states:  # three calls, none read
        monitor.update(state)
    with pytest.raises(ValueError, match=r"3 call\(s\) since the last read.*flush\(opt_state\)"):
        monitor.flush()
    monitor.flush(states[-1])
    assert [(r.start, r.stop) for r in monitor.records[monitor.paths[0]]] == [(0, 3)]
    monitor.flush()  # nothing pending any more


# --- Events -----------------------------------------------------------------------


def test_event_lines_come_from_the_same_read(caplog, monkeypatch):
    opt = clip_chain(1.0, explosion_factor=2.0)
    state0, states = states_for(opt, [0.5, 5.0, NAN, 0.5])
    transfers = []
    real_get = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: transfers.append(1) or real_get(x))
    monitor = Monitor(every=2, log_events=True)
    with caplog.at_level(logging.INFO, logger="optax_gradflow"):
        for state in [state0, *states]:
            monitor.update(state)
        monitor.flush()
    kinds = [r.gradflow_kind for r in caplog.records]
    assert kinds == ["explosion", "nonfinite"]
    assert [r.gradflow_step for r in caplog.records] == [1, 2]
    assert len(transfers) == monitor.reads == 3


# --- PyTorch ------------------------------------------------------------------------


def test_a_torch_stabilizer_is_read_the_same_way():
    torch = pytest.importorskip("torch")
    from optax_gradflow.torch import GradientFlowStabilizer

    stab = GradientFlowStabilizer(config=presets.clip_only(1.0))
    weight = torch.nn.Parameter(torch.zeros(1))
    monitor = Monitor(every=2)
    monitor.update(stab)
    for n in [0.5, 2.0, float("nan"), 3.0]:
        weight.grad = torch.full((1,), n)
        stab.clip_gradients([weight])
        monitor.update(stab)
    monitor.flush(stab)
    assert monitor.paths == ["torch"]
    records = monitor.records["torch"]
    assert [(r.start, r.stop) for r in records] == [(0, 2), (2, 4)]
    assert [r.clipped for r in records] == [1, 1]
    assert [r.nonfinite for r in records] == [0, 1]
    assert [r.norm_max for r in records] == pytest.approx([2.0, 3.0])
    both = Monitor(every=1)
    both.update([stab, GradientFlowStabilizer(1e-2)])
    assert both.paths == ["torch[0]", "torch[1]"]
    with pytest.raises(TypeError, match="state_dict"):
        Monitor(every=1).update(torch.optim.SGD([weight], lr=0.1))


def test_a_torch_stabilizer_keeps_the_exploding_norms_between_two_reads():
    torch = pytest.importorskip("torch")
    from optax_gradflow.torch import GradientFlowStabilizer

    config = dataclasses.replace(presets.clip_only(1.0), explosion_factor=2.0)
    stab = GradientFlowStabilizer(config=config)
    weight = torch.nn.Parameter(torch.zeros(1))
    monitor = Monitor(every=10)
    monitor.update(stab)
    for n in exploding_stream():
        weight.grad = torch.full((1,), n)
        stab.clip_gradients([weight])
        monitor.update(stab)
    check_exploding_intervals(monitor.records["torch"])


def test_importing_the_monitor_imports_neither_torch_nor_matplotlib():
    code = (
        "import sys, optax_gradflow.monitor\n"
        "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_files_get_the_mode_of_any_new_file(tmp_path, umask, mode):
    # 0666 less the umask, as open() gives: the monitor's export and the store alike.
    old = os.umask(umask)
    try:
        recorded_monitor().to_json(tmp_path / "run.json")
        store = og.ThresholdStore(tmp_path / "thresholds.json")
        params = {"w": jnp.ones(3)}
        store.save(og.stabilize(initial_threshold=2.0).init(params), params)
    finally:
        os.umask(old)
    assert (tmp_path / "run.json").stat().st_mode & 0o777 == mode
    assert (tmp_path / "thresholds.json").stat().st_mode & 0o777 == mode
