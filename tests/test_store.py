"""ThresholdStore: records, fingerprint, save policy, device reads, locking, corruption."""

import datetime
import json
import logging
import math
import os
import re
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_gradflow as og
from optax_gradflow import store as store_lib
from optax_gradflow.config import StabilizerConfig
from optax_gradflow.state import Ring
from optax_gradflow.store import (
    ThresholdStore,
    ThresholdStoreError,
    ThresholdStoreWarning,
    fingerprint,
)
from optax_gradflow.transform import init_state

RTOL = 1e-6
PARAMS = {"dense": {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}}


def stable_state(
    threshold=1.5, step=1000, streak=600, explosions=0, flags=None, norms=(1.0, 2.0, 3.0, 4.0)
):
    """A hand-built state: event window of 10 steps (``flags``), norm history ``norms``."""
    cfg = StabilizerConfig(event_history_size=10, norm_history_size=8, diagnostics_window=2)
    state = init_state(threshold, 0, cfg)
    flags = [0] * 10 if flags is None else flags
    history = list(norms) + [0.0] * (8 - len(norms))
    return state._replace(
        stabilizer_step=jnp.int32(step),
        stable_streak=jnp.int32(streak),
        explosion_count=jnp.int32(explosions),
        event_flags=Ring(jnp.asarray(flags, jnp.int32), jnp.int32(0), jnp.int32(10)),
        norm_history=Ring(
            jnp.asarray(history, jnp.float32), jnp.int32(len(norms) % 8), jnp.int32(len(norms))
        ),
    )


@pytest.fixture
def path(tmp_path):
    return tmp_path / "sub" / "thresholds.json"


@pytest.fixture
def reads(monkeypatch):
    calls = []
    real = jax.device_get

    def counting(x):
        calls.append(1)
        return real(x)

    monkeypatch.setattr(jax, "device_get", counting)
    return calls


# --- Fingerprint ----------------------------------------------------------------


def test_fingerprint_depends_on_structure_not_values():
    same = {"dense": {"w": jnp.full((3, 2), 7.0), "b": jnp.ones(2)}}
    assert fingerprint(PARAMS) == fingerprint(same)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), PARAMS)
    assert fingerprint(PARAMS) == fingerprint(abstract)
    variants = [
        {"dense": {"w": jnp.ones((2, 3)), "b": jnp.zeros(2)}},  # shape
        {"dense": {"w": jnp.ones((3, 2), jnp.bfloat16), "b": jnp.zeros(2)}},  # dtype
        {"dense": {"v": jnp.ones((3, 2)), "b": jnp.zeros(2)}},  # key
    ]
    prints = {fingerprint(PARAMS), fingerprint(PARAMS, label="run-b")}
    prints |= {fingerprint(v) for v in variants}
    assert len(prints) == 5
    assert all(len(p) == 32 and int(p, 16) >= 0 for p in prints)


def test_fingerprint_inside_jit_and_in_another_process():
    inside = []
    jax.jit(lambda p: inside.append(fingerprint(p)) or 0.0)(PARAMS)
    assert inside == [fingerprint(PARAMS)]
    code = textwrap.dedent(
        """
        import jax.numpy as jnp
        from optax_gradflow.store import fingerprint
        print(fingerprint({"dense": {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}}, label="x"))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=_env()
    )
    assert out.stdout.strip() == fingerprint(PARAMS, label="x")


# --- Save and lookup --------------------------------------------------------------


def test_save_writes_the_documented_record(path, caplog):
    caplog.set_level(logging.INFO, logger="optax_gradflow")
    store = ThresholdStore(path)
    # 2 explosions (3 = clipped + explosion) in the 10-step window: score 0.8.
    state = stable_state(threshold=1.5, step=1234, explosions=7, flags=[3, 3] + [0] * 8)
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    record = store.save(state, PARAMS, label="exp")
    after = datetime.datetime.now(datetime.UTC)
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["format"] == "optax_gradflow.threshold_store"
    assert document["schema_version"] == 1
    key = fingerprint(PARAMS, label="exp")
    assert document["records"] == {key: record}
    assert record["fingerprint"] == key and record["label"] == "exp"
    assert record["threshold"] == 1.5
    # Norms [1, 2, 3, 4]: mean 2.5, population std sqrt(1.25), p50 2.5, p90 3.7.
    assert record["grad_norm"]["mean"] == pytest.approx(2.5, rel=RTOL)
    assert record["grad_norm"]["std"] == pytest.approx(math.sqrt(1.25), rel=RTOL)
    assert record["grad_norm"]["p50"] == pytest.approx(2.5, rel=RTOL)
    assert record["grad_norm"]["p90"] == pytest.approx(3.7, rel=RTOL)
    assert record["steps"] == 1234
    assert record["stability_score"] == pytest.approx(0.8, rel=RTOL)
    assert record["explosion_count"] == 7
    assert record["library_version"] == og.__version__
    assert record["schema_version"] == 1
    saved_at = datetime.datetime.fromisoformat(record["saved_at"])
    assert saved_at.utcoffset() == datetime.timedelta(0)
    assert before <= saved_at <= after
    (rec,) = [r for r in caplog.records if r.name == "optax_gradflow"]
    assert rec.levelno == logging.INFO and "saved clip threshold 1.5" in rec.getMessage()
    assert store.lookup(PARAMS, label="exp") == 1.5
    assert store.lookup(PARAMS) is None  # another label, another fingerprint


def test_save_keeps_other_records_and_replaces_its_own(path):
    store = ThresholdStore(path)
    store.save(stable_state(threshold=1.5), PARAMS, label="a")
    store.save(stable_state(threshold=2.5), PARAMS, label="b")
    store.save(stable_state(threshold=3.5), PARAMS, label="a")
    assert len(store.records()) == 2
    assert store.lookup(PARAMS, label="a") == 3.5
    assert store.lookup(PARAMS, label="b") == 2.5
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_stabilize_starts_from_the_stored_threshold(path):
    store = ThresholdStore(path)
    store.save(stable_state(threshold=2.5), PARAMS, label="m")
    state = og.stabilize(1e-2, store=store, label="m").init(PARAMS)
    assert float(state.clip_threshold) == 2.5  # stored wins over lr (which gives 1)
    assert int(state.warmup_steps_left) == 0
    explicit = og.stabilize(1e-2, store=store, label="m", initial_threshold=4.0).init(PARAMS)
    assert float(explicit.clip_threshold) == 4.0  # explicit wins over stored
    other = og.stabilize(1e-2, store=store, label="other").init(PARAMS)
    assert float(other.clip_threshold) == pytest.approx(1.0, rel=RTOL)  # nothing stored


def test_the_stored_threshold_is_read_visibly_at_trace_time_under_jit(path, caplog):
    """Under jax.jit(opt.init) the lookup runs while tracing, once per compilation.

    SPEC.md, "Threshold store" / "Reuse": the read is logged (INFO) so that it
    can be seen, and a jitted init that is not traced again keeps the value it
    traced with: call init outside jit (or re-jit) after the store changes.
    """
    store = ThresholdStore(path)
    store.save(stable_state(threshold=2.5), PARAMS, label="m")
    calls = []
    real = store.lookup

    def counting(params, label=None):
        calls.append(label)
        return real(params, label=label)

    store.lookup = counting
    init = jax.jit(og.stabilize(1e-2, store=store, label="m").init)
    with caplog.at_level(logging.INFO, logger="optax_gradflow"):
        first = init(PARAMS)
    assert float(first.clip_threshold) == 2.5
    assert calls == ["m"]  # read once, while tracing
    assert any("using stored clip threshold 2.5" in r.getMessage() for r in caplog.records)
    store.save(stable_state(threshold=3.5), PARAMS, label="m")
    assert float(init(PARAMS).clip_threshold) == 2.5  # the compiled init keeps its value
    assert calls == ["m"]  # no second read
    assert float(og.stabilize(1e-2, store=store, label="m").init(PARAMS).clip_threshold) == 3.5


def test_save_refuses_during_warm_up(path):
    opt = og.stabilize()  # data mode: warm-up of 100 steps
    with pytest.raises(ValueError, match="warm-up"):
        ThresholdStore(path).save(opt.init(PARAMS), PARAMS)
    assert not path.exists()


def test_save_needs_one_stabilizer(path):
    opt = optax.partition(
        {"a": og.stabilize(initial_threshold=1.0), "b": og.stabilize(initial_threshold=1.0)},
        {"x": "a", "y": "b"},
    )
    params = {"x": jnp.ones(2), "y": jnp.ones(2)}
    with pytest.raises(ValueError, match="GradientFlowStates"):
        ThresholdStore(path).save(opt.init(params), params)


# --- Save policy and device reads -----------------------------------------------


def test_maybe_save_reads_once_per_period_with_explicit_steps(path, reads):
    store = ThresholdStore(path)
    state = stable_state()
    saved = [k for k in range(3500) if store.maybe_save(state, PARAMS, step=k) is not None]
    # Periods 1, 2 and 3 start at steps 1000, 2000, 3000: one read and one save each.
    assert len(reads) == 3
    assert saved == [1000, 2000, 3000]


def test_maybe_save_counts_calls_itself(path, reads):
    store = ThresholdStore(path, save_every=100, min_stable_steps=5)
    base = stable_state(step=0, streak=0)
    saved = []
    for k in range(1, 351):  # call k follows update k: stabilizer_step == k
        state = base._replace(stabilizer_step=jnp.int32(k), stable_streak=jnp.int32(k))
        if store.maybe_save(state, PARAMS) is not None:
            saved.append(k)
    assert len(reads) == 3
    assert saved == [100, 200, 300]


def test_maybe_save_rejects_a_device_step(path):
    with pytest.raises(TypeError, match="host int"):
        ThresholdStore(path).maybe_save(stable_state(), PARAMS, step=jnp.int32(5))


@pytest.mark.parametrize(
    ("changes", "saved"),
    [
        ({}, True),
        ({"streak": 499}, False),  # fewer than 500 stable steps
        ({"streak": 500}, True),  # exactly 500 is enough
        ({"flags": [3, 3] + [0] * 8}, False),  # score 0.8 is not above 0.8
        ({"flags": [3] + [0] * 9}, True),  # score 0.9
        ({"explosions": 10}, False),  # 10 since the previous check (the start)
        ({"explosions": 9}, True),
    ],
)
def test_save_policy(path, changes, saved):
    store = ThresholdStore(path)
    assert store.maybe_save(stable_state(step=999), PARAMS, step=999) is None  # sets the period
    record = store.maybe_save(stable_state(**changes), PARAMS, step=1000)
    assert (record is not None) == saved
    assert path.exists() == saved


def test_explosions_are_counted_since_the_previous_check(path):
    store = ThresholdStore(path)
    store.maybe_save(stable_state(), PARAMS, step=0)
    # Check 1: 12 explosions since the start: not saved.
    assert store.maybe_save(stable_state(explosions=12), PARAMS, step=1000) is None
    # Check 2: 12 -> 20 is 8 more: saved although the total is 20.
    assert store.maybe_save(stable_state(explosions=20), PARAMS, step=2000) is not None


def test_policy_refuses_during_warm_up(path):
    store = ThresholdStore(path)
    store.maybe_save(stable_state(), PARAMS, step=0)
    warm = stable_state()._replace(warmup_steps_left=jnp.int32(3))
    assert store.maybe_save(warm, PARAMS, step=1000) is None


# --- Concurrency --------------------------------------------------------------


def _env():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


WRITER = textwrap.dedent(
    """
    import sys, time
    import jax.numpy as jnp
    from optax_gradflow.store import ThresholdStore
    from optax_gradflow.transform import init_state
    from optax_gradflow.config import StabilizerConfig

    path, name, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
    state = init_state(1.5, 0, StabilizerConfig())
    params = {"w": jnp.ones(3)}
    store = ThresholdStore(path)
    while time.time() < start:  # both processes begin together
        time.sleep(0.001)
    for i in range(20):
        store.save(state, params, label=f"{name}-{i}")
    """
)


def test_two_processes_lose_no_record(path):
    path.parent.mkdir(parents=True)
    start = str(time.time() + 4.0)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), name, start],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("p", "q")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    records = ThresholdStore(path).records()
    labels = sorted(r["label"] for r in records.values())
    assert labels == sorted([f"p-{i}" for i in range(20)] + [f"q-{i}" for i in range(20)])


# --- Atomicity ---------------------------------------------------------------


def test_a_failed_write_leaves_the_old_file(path, monkeypatch):
    store = ThresholdStore(path)
    store.save(stable_state(threshold=1.5), PARAMS, label="a")
    before = path.read_bytes()

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(store_lib.os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        store.save(stable_state(threshold=9.0), PARAMS, label="b")
    assert path.read_bytes() == before
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


# --- Corrupt, foreign and newer files ------------------------------------------


VALID = '{"format": "optax_gradflow.threshold_store", "schema_version": 1, "records": {}}'


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("{not json", "not valid JSON"),
        (VALID[: len(VALID) // 2], "not valid JSON"),  # truncated
        ("", "not valid JSON"),
        ("[1, 2, 3]", "not a threshold store"),  # foreign: valid JSON
        ('{"thresholds": {"a": 1.0}}', "not a threshold store"),
        (VALID.replace('"records": {}', '"records": []'), "records"),
        (VALID.replace('"schema_version": 1', '"schema_version": 2'), "newer"),
    ],
)
def test_unusable_file_warns_on_lookup_and_is_never_overwritten(path, content, why):
    path.parent.mkdir(parents=True)
    path.write_text(content, encoding="utf-8")
    store = ThresholdStore(path)
    with pytest.warns(ThresholdStoreWarning, match=why):
        assert store.lookup(PARAMS) is None
    with pytest.raises(ThresholdStoreError, match=re.escape(str(path))) as err:
        store.save(stable_state(), PARAMS)
    assert why in str(err.value)
    assert path.read_text(encoding="utf-8") == content


def test_stabilize_with_a_corrupt_store_falls_back_to_the_learning_rate(path):
    path.parent.mkdir(parents=True)
    path.write_text("{oops", encoding="utf-8")
    with pytest.warns(ThresholdStoreWarning):
        state = og.stabilize(1e-2, store=ThresholdStore(path)).init(PARAMS)
    assert float(state.clip_threshold) == pytest.approx(1.0, rel=RTOL)


def test_newer_record_is_refused(path):
    store = ThresholdStore(path)
    store.save(stable_state(threshold=2.0), PARAMS, label="old")
    document = json.loads(path.read_text(encoding="utf-8"))
    key = fingerprint(PARAMS, label="new")
    document["records"][key] = {"schema_version": 2, "threshold": 3.0, "fingerprint": key}
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.warns(ThresholdStoreWarning, match="schema version 2"):
        assert store.lookup(PARAMS, label="new") is None
    assert store.lookup(PARAMS, label="old") == 2.0  # other records still usable
    with pytest.raises(ThresholdStoreError, match="newer"):
        store.save(stable_state(), PARAMS, label="new")
    assert json.loads(path.read_text(encoding="utf-8"))["records"][key]["threshold"] == 3.0


@pytest.mark.parametrize("threshold", [-1.0, 0.0, "big", None])
def test_bad_record_threshold_warns(path, threshold):
    store = ThresholdStore(path)
    store.save(stable_state(), PARAMS)
    document = json.loads(path.read_text(encoding="utf-8"))
    document["records"][fingerprint(PARAMS)]["threshold"] = threshold
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.warns(ThresholdStoreWarning, match="threshold"):
        assert store.lookup(PARAMS) is None


def test_missing_file_is_an_empty_store(path):
    store = ThresholdStore(path)
    assert store.lookup(PARAMS) is None
    assert store.records() == {}
    assert not path.exists()


def test_store_arguments_are_validated(path):
    with pytest.raises(ValueError, match="save_every"):
        ThresholdStore(path, save_every=0)
    with pytest.raises(ValueError, match="min_score"):
        ThresholdStore(path, min_score=1.5)
