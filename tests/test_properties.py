"""Property tests on random gradient sequences with NaN, Inf, huge and tiny injections."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import optax_gradflow as og
from optax_gradflow import presets
from optax_gradflow.constants import Event

SHORT = dict(
    adaptation_interval=7,
    diagnostics_interval=11,
    diagnostics_window=5,
    norm_history_size=16,
    event_history_size=64,
    emergency_patience=3,
)
# The default ("track" rule, no loss scaling; short emergency periods so that
# re-arming happens within a run) and the original design (presets.seed():
# median_mad, loss scaling on).
CONFIGS = {
    "default": og.StabilizerConfig(**SHORT, emergency_hold_steps=4, emergency_rearm_steps=10),
    "seed": dataclasses.replace(presets.seed(), **SHORT),
}
N_STEPS = 40
SIZE = 6

# One injection per step: what happens to the gradient vector.
INJECTIONS = ("calm", "scaled", "nan", "inf", "huge", "tiny", "zero")


def _make_grad(kind, magnitude, base):
    g = base * magnitude
    if kind == "nan":
        g = g.at[0].set(jnp.nan)
    elif kind == "inf":
        g = g.at[1].set(-jnp.inf)
    elif kind == "huge":
        g = g.at[2].set(1e25)  # its square overflows float32
    elif kind == "tiny":
        g = base * 1e-12
    elif kind == "zero":
        g = jnp.zeros_like(base)
    elif kind == "calm":
        g = base * 0.1
    return {"w": g}


_OPTS = {name: og.stabilized(optax.sgd(0.1), 1e-2, config=cfg) for name, cfg in CONFIGS.items()}
_UPDATES = {name: jax.jit(opt.update) for name, opt in _OPTS.items()}

# The loss passed as value= (the "track" rule's loss gate): sometimes
# climbing, sometimes missing (NaN), sometimes huge.
losses = st.one_of(st.floats(1e-3, 1e3), st.just(float("nan")), st.just(1e30))

sequences = st.lists(
    st.tuples(st.sampled_from(INJECTIONS), st.floats(1e-3, 1e3), st.integers(0, 2**16), losses),
    min_size=N_STEPS,
    max_size=N_STEPS,
)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seq=sequences)
def test_random_sequences_keep_invariants(name, seq):
    cfg, opt, update = CONFIGS[name], _OPTS[name], _UPDATES[name]
    params = {"w": jnp.linspace(-1.0, 1.0, SIZE)}
    state = opt.init(params)
    expected_nonfinite = 0
    for kind, magnitude, seed, loss in seq:
        base = jax.random.normal(jax.random.PRNGKey(seed), (SIZE,))
        grads = _make_grad(kind, magnitude, base)
        before = state.flow
        updates, state = update(grads, state, params, value=jnp.float32(loss))
        params = optax.apply_updates(params, updates)
        flow = state.flow
        # No NaN or Inf ever reaches the parameters.
        assert np.all(np.isfinite(params["w"]))
        expected_nonfinite += kind in ("nan", "inf", "huge")
        # The stabilized gradient never exceeds the threshold of its step
        # (outside warm-up, the threshold held in the state before the step).
        # sgd(0.1) makes the update -0.1 times the stabilized gradient.
        out_norm = float(jnp.linalg.norm(updates["w"])) / 0.1
        assert out_norm <= float(before.clip_threshold) * (1 + 1e-5)
        # The scale stays within its bounds; only non-finite steps take it
        # under min_loss_scale.
        floor = min(cfg.nonfinite_min_loss_scale, cfg.min_loss_scale)
        assert floor <= float(flow.loss_scale) <= cfg.max_loss_scale
        if expected_nonfinite == 0:
            assert float(flow.loss_scale) >= cfg.min_loss_scale
        assert cfg.min_threshold <= float(flow.clip_threshold) < float("inf")
    flow = state.flow
    flags = np.asarray(flow.event_flags.values)[: int(flow.event_flags.count)]
    # Counters add up: the totals equal the per-step flags (the window holds
    # every step of this short run) and the injections.
    assert int(flow.stabilizer_step) == N_STEPS == len(flags)
    assert int(flow.nonfinite_count) == expected_nonfinite
    assert int(flow.nonfinite_count) == np.sum(flags & Event.NONFINITE > 0)
    assert int(flow.explosion_count) == np.sum(flags & Event.EXPLOSION > 0)
    assert int(flow.vanishing_count) == np.sum(flags & Event.VANISHING > 0)
    assert int(flow.clip_count) == np.sum(flags & Event.CLIPPED > 0)
    assert int(flow.clip_count) >= int(flow.explosion_count)
    if cfg.adaptation_rule == "track":
        # An emergency fires at most once per emergency_rearm_steps.
        steps = np.sort(np.asarray(flow.emergency_steps.values)[: int(flow.emergency_steps.count)])
        assert int(flow.emergency_count) == len(steps)
        assert np.all(np.diff(steps) >= cfg.emergency_rearm_steps)
    assert int(flow.norm_history.count) == min(
        cfg.norm_history_size, N_STEPS - expected_nonfinite - int(flow.explosion_count)
    )
