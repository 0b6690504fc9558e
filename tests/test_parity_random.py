"""Randomized parity: the JAX transformation and the PyTorch adapter, step by step.

Hypothesis draws a small configuration (short intervals, so that warm-up,
adaptation, emergencies and diagnostics all fire within a few hundred steps)
and a seed; the gradients come from that seed, with NaN, +-inf, huge (1e30,
whose square overflows float32), tiny (1e-12) and all-zero injections and
bursts of explosions. After every step every state field must agree: floats
within rtol 1e-5 (different summation orders; ``norm_trend`` also atol 1e-6,
a slope of nearly flat logarithms; ``variance_history`` also atol 1e-6 times
the largest norm squared, the variance of nearly equal norms being
ill-conditioned), counters, flags and booleans exactly.

Four examples of 500 to 700 steps: at least 2000 steps in all.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import optax_gradflow as og  # noqa: E402
import optax_gradflow.torch as ogt  # noqa: E402
from optax_gradflow.config import StabilizerConfig  # noqa: E402

RTOL = 1e-5
TREND_ATOL = 1e-6
VARIANCE_ATOL = 1e-6
SHAPES = [(3,), (2, 2), (1,)]
MIN_STEPS, MAX_STEPS = 500, 700
EXAMPLES = 4


@st.composite
def configs(draw) -> StabilizerConfig:
    history = draw(st.integers(4, 48))
    min_scale = draw(st.sampled_from([0.1, 1.0]))
    max_scale = draw(st.sampled_from([64.0, 1024.0]))
    return StabilizerConfig(
        min_threshold=draw(st.sampled_from([0.01, 0.1])),
        max_threshold=draw(st.sampled_from([float("inf"), 50.0])),
        warmup_steps=draw(st.integers(0, 12)),
        warmup_multiplier=draw(st.sampled_from([1.0, 2.0, 2.5])),
        adaptation_interval=draw(st.sampled_from([0, 3, 7, 16])),
        adaptation_rule=draw(st.sampled_from(["percentile", "median_mad", "mean_std"])),
        adaptation_percentile=draw(st.sampled_from([50.0, 90.0, 100.0, 33.0])),
        adaptation_k=draw(st.sampled_from([0.0, 1.0, 3.0])),
        norm_history_size=history,
        threshold_history_size=draw(st.integers(1, 6)),
        explosion_factor=draw(st.sampled_from([1.5, 3.0, 10.0])),
        vanishing_norm=draw(st.sampled_from([0.0, 1e-7, 1e-3])),
        loss_scaling=draw(st.booleans()),
        initial_loss_scale=1.0,
        min_loss_scale=min_scale,
        max_loss_scale=max_scale,
        growth_interval=draw(st.sampled_from([0, 5, 13])),
        loss_scale_history_size=draw(st.integers(1, 6)),
        emergency_patience=draw(st.sampled_from([0, 2, 4])),
        emergency_history_size=draw(st.integers(1, 4)),
        diagnostics_interval=draw(st.sampled_from([0, 5, 11])),
        diagnostics_window=draw(st.integers(2, history)),
        variance_history_size=draw(st.integers(1, 4)),
        event_history_size=draw(st.integers(1, 8)),
    )


def _gradient_stream(seed: int, steps: int):
    """Yields (leaves as float32 arrays, loss) with injected trouble."""
    rng = np.random.default_rng(seed)
    burst = 0
    for _ in range(steps):
        magnitude = float(np.exp(rng.normal(0.0, 1.5)))
        if burst > 0:
            magnitude *= 1e3
            burst -= 1
        elif rng.random() < 0.02:
            burst = int(rng.integers(2, 7))
        leaves = [(rng.normal(size=s) * magnitude).astype(np.float32) for s in SHAPES]
        u = rng.random()
        leaf = leaves[int(rng.integers(len(leaves)))].reshape(-1)
        if u < 0.03:
            leaf[int(rng.integers(leaf.size))] = np.nan
        elif u < 0.05:
            leaf[int(rng.integers(leaf.size))] = np.inf * rng.choice([-1.0, 1.0])
        elif u < 0.07:
            leaf[int(rng.integers(leaf.size))] = np.float32(1e30)
        elif u < 0.12:
            leaves = [(x * np.float32(1e-12)).astype(np.float32) for x in leaves]
        elif u < 0.14:
            leaves = [np.zeros_like(x) for x in leaves]
        yield leaves, float(rng.normal())


def _compare(step: int, j_out, t_out, j_state, t_state, flags: list[int]) -> None:
    where = f"step {step} (recent event flags {flags[-8:]})"
    for i, (a, b) in enumerate(zip(j_out, t_out, strict=True)):
        np.testing.assert_allclose(
            b.numpy(), np.asarray(a), rtol=RTOL, atol=0, err_msg=f"{where}: output {i}"
        )
    for name in ogt.FIELDS:
        expected = np.asarray(getattr(j_state, name))
        actual = t_state[name].numpy()
        assert actual.dtype == expected.dtype, f"{where}: dtype of {name}"
        if expected.dtype == np.float32:
            atol = 0.0
            if name == "norm_trend":
                atol = TREND_ATOL
            elif name == "variance_history":
                # The variance of nearly equal norms is ill-conditioned: an ulp
                # of difference in the norms is a large relative difference in
                # it, so the tolerance scales with the largest norm squared.
                atol = VARIANCE_ATOL * float(np.max(j_state.norm_history, initial=0.0)) ** 2
            np.testing.assert_allclose(
                actual, expected, rtol=RTOL, atol=atol, equal_nan=True, err_msg=f"{where}: {name}"
            )
        else:
            np.testing.assert_array_equal(actual, expected, err_msg=f"{where}: {name}")


def _run_both(config: StabilizerConfig, kwargs: dict, seed: int, steps: int) -> list[int]:
    """Feeds one gradient stream to both; returns the event flags of every step."""
    tx = og.stabilize(config=config, **kwargs)
    params = [jnp.zeros(s, jnp.float32) for s in SHAPES]
    j_state = tx.init(params)
    t_state = ogt.init_state(config=config, **kwargs)
    _compare(-1, [], [], j_state, t_state, [])
    update = jax.jit(tx.update)
    flags: list[int] = []
    for k, (leaves, loss) in enumerate(_gradient_stream(seed, steps)):
        j_out, j_state = update(
            [jnp.asarray(x) for x in leaves], j_state, params, value=jnp.float32(loss)
        )
        t_out, t_state = ogt.update(
            [torch.from_numpy(x) for x in leaves], t_state, value=loss, config=config
        )
        j_state = jax.device_get(j_state)
        ring = j_state.event_flags
        flags.append(int(ring[(int(j_state.event_flags_index) - 1) % len(ring)]))
        _compare(k, jax.device_get(j_out), t_out, j_state, t_state, flags)
    return flags


def test_every_event_fires_and_both_agree():
    # A fixed run in which every event bit occurs, so the comparison covers
    # each branch of "Per-step order".
    config = StabilizerConfig(
        warmup_steps=10,
        adaptation_interval=7,
        norm_history_size=32,
        diagnostics_interval=9,
        diagnostics_window=16,
        trend_limit=0.005,
        variance_limit=0.3,
        emergency_patience=3,
        growth_interval=11,
        event_history_size=16,
    )
    flags = _run_both(config, {}, seed=1234, steps=400)
    seen = 0
    for f in flags:
        seen |= f
    assert seen == 127, f"event bits seen: {seen:07b}"


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True)
@given(
    config=configs(),
    seed=st.integers(0, 2**32 - 1),
    steps=st.integers(MIN_STEPS, MAX_STEPS),
    init=st.sampled_from(["learning_rate", "data", "explicit"]),
)
def test_jax_and_torch_agree_step_by_step(config, seed, steps, init):
    kwargs = {
        "learning_rate": {"learning_rate": 1e-2},
        "data": {},
        "explicit": {
            "initial_threshold": max(config.min_threshold, min(2.0, config.max_threshold))
        },
    }[init]
    _run_both(config, kwargs, seed, steps)


@pytest.mark.parametrize("clip", ["adaptive_scaling", "mean", "percentile"])
@pytest.mark.parametrize("reference_variance", [True, False])
def test_zscore_rule_agrees_step_by_step(clip, reference_variance):
    # The zscore rule with the rest of the machinery on (loss scaling,
    # explosions measured against the spike boundary, emergencies).
    config = StabilizerConfig(
        adaptation_rule="zscore",
        warmup_steps=8,
        norm_history_size=16,
        diagnostics_window=8,
        diagnostics_interval=9,
        zscore_clip=clip,
        zscore_reference_variance=reference_variance,
        zscore_skip_spikes=clip == "mean",
        max_threshold=500.0,
        emergency_patience=3,
    )
    flags = _run_both(config, {}, seed=77, steps=300)
    assert any(f & 1 for f in flags)  # some steps were clipped
