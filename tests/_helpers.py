"""Small helpers for driving a stabilizer step by step in tests."""

import jax
import jax.numpy as jnp


def run_steps(opt, grads_seq, params=None, state=None, **extra):
    """Feeds each gradient tree to a jitted ``opt.update``; returns outputs and states."""
    if params is None:
        params = jax.tree.map(jnp.zeros_like, grads_seq[0])
    if state is None:
        state = opt.init(params)
    update = jax.jit(opt.update)
    outs, states = [], []
    for grads in grads_seq:
        out, state = update(grads, state, params, **extra)
        outs.append(out)
        states.append(state)
    return outs, states


def vec(*values, dtype=jnp.float32):
    return {"w": jnp.asarray(values, dtype)}


# --- Short intervals: every event fires within a few hundred steps ---------------

EVENTFUL = dict(
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


# --- Eleven injected batches under the default config ---------------------------

INJECTED_STEPS = (100, 200, 201, 202, 203, 204, 205, 300, 400, 500, 650)
LOUD_STEPS = (50, 150, 206, 210, 230, 250, 350, 600, 700)
CUT_EMERGENCY_STEP = 204


def injected_norms(steps: int = 800) -> list[float]:
    """800 norms, 11 of them injected at 1000x: a run of 6, 5 apart.

    The default config with learning rate 1e-2 (t0 = 1: centre c = 0, spread
    d = 0; r = 0.05, so e in [-2, 0.4]); no loss is given. Ordinary norms
    are 1, and 2.5 on the "loud" steps. By hand (SPEC.md, "Tracking rule"):

    - every ordinary x = ln n >= 0, so c never falls below 0 before the
      emergency and t = exp(c + d) >= 1: a loud norm is under 3 t;
    - an injected norm is over 3 t (and 6 t) throughout: c <= ln 2.5 + 0.02
      per injection, d <= 2, so t < 30;
    - only the run at 200-205 reaches 5 explosions in a row: the emergency
      fires at step 204 (c - ln 2) and holds steps 205-254. During the hold c
      does not fall (every x >= 0 > c), so t >= 0.5 and 3 t / 0.5 >= 3 > 2.5:
      the loud steps 206, 210, 230 and 250 are not explosions against the
      threshold before the cut, though they are against the cut one (at step
      206, t = exp(0.1 - ln 2 + 0.106) = 0.61, 3 t = 1.84 < 2.5);
    - after the hold c only rises (x >= 0 > c): by 0.02 a step from 0.1 - ln
      2 while c < -0.4 (10 steps), then c -> 0.95 c: c >= ln(2.5 / 3) 25 steps
      after the hold, step 280. No loud step lies in 255-279, where 2.5 is
      still an explosion against the lowered threshold.

    So exactly the 11 injected steps are explosions, and one emergency fires.
    """
    norms = [1.0] * steps
    for k in LOUD_STEPS:
        norms[k] = 2.5
    for k in INJECTED_STEPS:
        norms[k] = 1000.0
    return norms
