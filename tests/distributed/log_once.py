"""Counts the in-graph event lines of one explosion under pmap over 4 devices (axis_name).

Prints a JSON line {"explosion_lines": N, "devices": D}.
"""

import json
import logging
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax
import jax.numpy as jnp

import optax_gradflow as og

lines = []


class Collect(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())


logger = logging.getLogger("optax_gradflow")
logger.addHandler(Collect())
logger.setLevel(logging.DEBUG)

n = jax.device_count()
tx = og.stabilize(1e-2, log_events=True, axis_name="d")  # threshold 1
params = {"w": jnp.zeros(4 * n)}
state = tx.init(params)
states = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), state)
# Each device holds a shard of 4 entries; the whole gradient has norm 100:
# an explosion (100 > 3 * 1).
grads = {"w": jnp.full((n, 4), 100.0 / (2.0 * n**0.5))}
step = jax.pmap(lambda g, s: tx.update(g, s), axis_name="d")
_, states = step(grads, states)
jax.block_until_ready(states)
jax.effects_barrier()
print(
    json.dumps(
        {
            "explosion_lines": sum("xplosion" in line for line in lines),
            "devices": n,
            "explosions": int(states.explosion_count[0]),
        }
    )
)
