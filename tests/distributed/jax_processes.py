"""One of several JAX processes on 127.0.0.1, one CPU device each, gloo collectives.

Usage: ``python jax_processes.py PROCESS_ID NUM_PROCESSES PORT``. Run by
tests/test_distributed_jax.py. The global gradients of tests/distributed/
scenario.py are sharded along their leading axis over the processes' devices;
each process holds only its own rows. Two steps are compiled: ``jit`` with
NamedSharding (XLA inserts the reduction) and ``shard_map`` with
``stabilize(axis_name=...)``. Prints one JSON object on the last line of
stdout: this process's copy of the state after each step, its rows of each
output, and the collectives of each compiled step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenario
from jax_devices import collectives

import optax_gradflow as og
from optax_gradflow.state import to_flat

try:
    from jax import shard_map
except ImportError:  # older JAX
    from jax.experimental.shard_map import shard_map

AXIS = "d"


def main() -> None:
    process_id, num_processes, port = (int(a) for a in sys.argv[1:4])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
        shutdown_timeout_seconds=30,
    )
    assert jax.device_count() == num_processes, jax.devices()
    assert jax.local_device_count() == 1, jax.local_devices()
    mesh = Mesh(np.array(jax.devices()), (AXIS,))
    sharded, replicated = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())

    def local_rows(x: np.ndarray) -> np.ndarray:
        rows = x.shape[0] // num_processes
        return x[process_id * rows : (process_id + 1) * rows]

    def global_grads(k: int):
        return {
            name: jax.make_array_from_process_local_data(sharded, local_rows(g), g.shape)
            for name, g in scenario.gradients(k).items()
        }

    def global_replicated(tree):
        # Every process holds the whole (identical) value.
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(replicated, np.asarray(x)), tree
        )

    def local(tree):
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)).tolist(), tree)

    config = og.StabilizerConfig(**scenario.CONFIG)
    plain = og.stabilize(config=config)
    along_axis = og.stabilize(config=config, axis_name=AXIS)
    grad_specs = {name: P(AXIS) for name in scenario.SHAPES}

    steps = {
        "jit": jax.jit(
            lambda g, s, v: plain.update(g, s, value=v),
            out_shardings=(sharded, replicated),
        ),
        "shard_map": jax.jit(
            shard_map(
                lambda g, s, v: along_axis.update(g, s, value=v),
                mesh=mesh,
                in_specs=(grad_specs, P(), P()),
                out_specs=(grad_specs, P()),
            )
        ),
    }
    report = {"process_id": process_id, "devices": jax.device_count()}
    for name, step in steps.items():
        opt = plain if name == "jit" else along_axis
        state = global_replicated(opt.init(scenario.gradients(0)))
        compiled = None
        outs, states = [], []
        for k in range(scenario.STEPS):
            args = (global_grads(k), state, global_replicated(np.float32(k)))
            if compiled is None:
                compiled = step.lower(*args).compile()
                report[f"{name}_hlo"] = collectives(compiled.as_text())
            out, state = compiled(*args)
            outs.append(local(out))
            states.append(local(to_flat(state)))
        report[name] = {"updates": outs, "states": states}
    print(json.dumps(report))
    sys.stdout.flush()
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
