"""Property tests on random gradient sequences with NaN, Inf, huge and tiny injections."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import optax_gradflow as og
from optax_gradflow.state import FLAG_CLIPPED, FLAG_EXPLOSION, FLAG_NONFINITE, FLAG_VANISHING

CFG = og.StabilizerConfig(
    adaptation_interval=7,
    diagnostics_interval=11,
    diagnostics_window=5,
    norm_history_size=16,
    event_history_size=64,
    emergency_patience=3,
)
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


_opt = og.stabilized(optax.sgd(0.1), 1e-2, config=CFG)
_update = jax.jit(_opt.update)

sequences = st.lists(
    st.tuples(st.sampled_from(INJECTIONS), st.floats(1e-3, 1e3), st.integers(0, 2**16)),
    min_size=N_STEPS,
    max_size=N_STEPS,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequences)
def test_random_sequences_keep_invariants(seq):
    params = {"w": jnp.linspace(-1.0, 1.0, SIZE)}
    state = _opt.init(params)
    expected_nonfinite = 0
    for kind, magnitude, seed in seq:
        base = jax.random.normal(jax.random.PRNGKey(seed), (SIZE,))
        grads = _make_grad(kind, magnitude, base)
        before = state.flow
        updates, state = _update(grads, state, params)
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
        # The scale stays within its bounds.
        assert CFG.min_loss_scale <= float(flow.loss_scale) <= CFG.max_loss_scale
        assert float(flow.clip_threshold) >= CFG.min_threshold
    flow = state.flow
    flags = np.asarray(flow.event_flags)[: int(flow.event_flags_count)]
    # Counters add up: the totals equal the per-step flags (the window holds
    # every step of this short run) and the injections.
    assert int(flow.stabilizer_step) == N_STEPS == len(flags)
    assert int(flow.nonfinite_count) == expected_nonfinite
    assert int(flow.nonfinite_count) == np.sum(flags & FLAG_NONFINITE > 0)
    assert int(flow.explosion_count) == np.sum(flags & FLAG_EXPLOSION > 0)
    assert int(flow.vanishing_count) == np.sum(flags & FLAG_VANISHING > 0)
    assert int(flow.clip_count) == np.sum(flags & FLAG_CLIPPED > 0)
    assert int(flow.clip_count) >= int(flow.explosion_count)
    assert int(flow.norm_history_count) == min(
        CFG.norm_history_size, N_STEPS - expected_nonfinite - int(flow.explosion_count)
    )
