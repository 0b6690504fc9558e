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
