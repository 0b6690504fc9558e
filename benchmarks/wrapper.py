"""The wrapper form's cost against chain() and optax.apply_if_finite, at 10M parameters.

Run: python benchmarks/wrapper.py. Jitted update + apply_updates, interleaved
round-robin in one process, median of 15 rounds each, ratio to
clip_by_global_norm + adam. No buffer donation.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import optax

import optax_gradflow as og

n = 10_000_000 // 4
p = {f"l{i}": jnp.zeros(n) for i in range(4)}
g = {f"l{i}": jnp.full(n, 0.001) for i in range(4)}
variants = {
    "clip+adam": optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
    "chain(stab,adam)": optax.chain(og.stabilize(initial_threshold=1.0), optax.adam(1e-3)),
    "stabilized(adam)": og.stabilized(
        optax.adam(1e-3), initial_threshold=1.0, track_update_ratio=False
    ),
    "apply_if_finite(clip+adam)": optax.apply_if_finite(
        optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)), 10**9
    ),
}
fns = {}
states = {}
for k, v in variants.items():

    def f(g, s, p, v=v):
        u, s = v.update(g, s, p)
        return optax.apply_updates(p, u), s

    fns[k] = jax.jit(f)
    states[k] = v.init(p)
    fns[k](g, states[k], p)[0]["l0"].block_until_ready()
ts = {k: [] for k in variants}
for _ in range(15):
    for k in variants:
        a = time.perf_counter()
        out = fns[k](g, states[k], p)
        jax.block_until_ready(out)
        ts[k].append(time.perf_counter() - a)
base = statistics.median(ts["clip+adam"])
for k in variants:
    print(k, round(statistics.median(ts[k]) * 1e3, 1), round(statistics.median(ts[k]) / base, 2))
