"""One process, eight virtual CPU devices: sharded runs next to one-device runs.

Run by tests/test_distributed_jax.py in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the pytest process has
already initialised JAX with one device). Prints one JSON object on the last
line of stdout: for each check, the one-device reference and what the sharded
run gave, per step and per device where devices hold their own copy, plus the
collectives found in compiled HLO. The test makes the comparisons.
"""

from __future__ import annotations

import json
import re
import sys
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenario

import optax_gradflow as og
from optax_gradflow.state import Ring, to_flat

try:
    from jax import shard_map
except ImportError:  # older JAX
    from jax.experimental.shard_map import shard_map

N = 8
AXIS = "d"
CONFIG = og.StabilizerConfig(**scenario.CONFIG)
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")
_INSTRUCTION = re.compile(
    r"=\s*(?P<shape>.+?)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?:-start)?\("
)


def host(tree):
    return jax.tree.map(lambda x: np.asarray(x).tolist(), tree)


def flow_fields(state):
    """The stabilizer's fields (and the wrapper's ratio ring) as a flat dict."""
    if isinstance(state, og.StabilizedState):
        fields = to_flat(state.flow)
        fields.update(
            update_ratio_history=state.update_ratio_history.values,
            update_ratio_index=state.update_ratio_history.index,
            update_ratio_count=state.update_ratio_history.count,
        )
        return fields
    return to_flat(state)


def per_device(fields):
    """A leading axis, so that each device's own copy comes back (out spec P(AXIS))."""
    return {name: value[None] for name, value in fields.items()}


def unstack(fields):
    """{field: [N, ...]} -> N dicts, one per device."""
    fields = {name: np.asarray(value) for name, value in fields.items()}
    return [{name: value[i] for name, value in fields.items()} for i in range(N)]


def collectives(compiled_text: str) -> list[dict]:
    """Every collective instruction of compiled HLO: its kind and result shapes."""
    found = []
    for line in compiled_text.splitlines():
        match = _INSTRUCTION.search(line)
        if match:
            shapes = re.findall(r"[a-z]+[0-9]*\[[0-9,]*\]", match.group("shape"))
            found.append({"op": match.group("op"), "shapes": shapes})
    return found


def compile_with_hlo(fn, *args):
    """``fn`` compiled for ``args``, and its collectives (one compilation for both)."""
    compiled = fn.lower(*args).compile()
    return compiled, collectives(compiled.as_text())


def hlo_collectives(fn, *args):
    return compile_with_hlo(fn, *args)[1]


def global_grads():
    return [scenario.gradients(k) for k in range(scenario.STEPS)]


_REFERENCES: dict[str, dict] = {}


def one_device_run(wrapper: bool):
    """The reference: plain jit on a single device, on the whole gradients."""
    key = "stabilized" if wrapper else "stabilize"
    if key not in _REFERENCES:
        opt = (
            og.stabilized(optax.adam(1e-2), config=CONFIG)
            if wrapper
            else og.stabilize(config=CONFIG)
        )
        params = scenario.params() if wrapper else None
        _REFERENCES[key] = _one_device_run(opt, global_grads(), params)
    return _REFERENCES[key]


def _one_device_run(opt, grads_seq, params):
    device = jax.devices()[0]
    put = lambda tree: jax.device_put(tree, device)
    state = put(opt.init(params if params is not None else grads_seq[0]))
    update = jax.jit(opt.update)
    outs, states = [], []
    for k, grads in enumerate(grads_seq):
        out, state = update(put(grads), state, put(params), value=jnp.float32(k))
        outs.append(host(out))
        states.append(host(flow_fields(state)))
    return {"updates": outs, "states": states}


# --- jit with NamedSharding --------------------------------------------------


def check_jit_fully_sharded(mesh, wrapper: bool):
    """Parameters, gradients and inner state sharded over all devices (FSDP-like)."""
    shard = NamedSharding(mesh, P(AXIS))
    grads_seq = global_grads()
    params = scenario.params() if wrapper else None
    opt = og.stabilized(optax.adam(1e-2), config=CONFIG) if wrapper else og.stabilize(config=CONFIG)
    ref = one_device_run(wrapper)
    sharded_params = jax.device_put(params, shard) if wrapper else None
    state = opt.init(sharded_params if wrapper else jax.device_put(grads_seq[0], shard))
    update = jax.jit(opt.update)
    outs, states, specs = [], [], set()
    for k, grads in enumerate(grads_seq):
        out, state = update(
            jax.device_put(grads, shard), state, sharded_params, value=jnp.float32(k)
        )
        specs.update(str(leaf.sharding.spec) for leaf in jax.tree.leaves(out))
        outs.append(host(out))
        states.append(host(flow_fields(state)))
    return {"reference": ref, "updates": outs, "states": states, "update_specs": sorted(specs)}


def check_jit_data_parallel(mesh):
    """Replicated parameters, batch-sharded data; the gradient all-reduce is XLA's."""
    opt = og.stabilized(optax.sgd(0.05), config=CONFIG)
    rng = np.random.default_rng(3)
    params0 = {
        "w": rng.standard_normal((4, 3)).astype(np.float32),
        "b": np.zeros((3,), np.float32),
    }

    def train_step(params, state, x, y):
        def loss_fn(p):
            return jnp.mean(jnp.square(x @ p["w"] + p["b"] - y))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    def run(put_params, put_batch):
        params = put_params(params0)
        state = put_params(opt.init(params0))
        step = jax.jit(train_step)
        params_seq, states = [], []
        for k in range(scenario.STEPS):
            x, y = scenario.batch(k)
            params, state = step(params, state, put_batch(x), put_batch(y))
            params_seq.append(host(params))
            states.append(host(flow_fields(state)))
        return {"params": params_seq, "states": states}

    device = jax.devices()[0]
    one = lambda tree: jax.device_put(tree, device)
    ref = run(one, one)
    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    got = run(lambda t: jax.device_put(t, replicated), lambda t: jax.device_put(t, batch))
    return {"reference": ref, **got}


def check_hlo_jit(mesh):
    """Collectives of a stabilizer step next to those of optax.clip_by_global_norm."""
    shard = NamedSharding(mesh, P(AXIS))
    grads = jax.device_put(scenario.gradients(0), shard)
    opt = og.stabilize(config=CONFIG)
    state = opt.init(grads)
    clip = optax.clip_by_global_norm(1.0)
    clip_state = clip.init(grads)
    result = {
        "stabilize": hlo_collectives(jax.jit(opt.update), grads, state),
        "clip_by_global_norm": hlo_collectives(jax.jit(clip.update), grads, clip_state),
    }

    # A whole FSDP-like training step: sharded parameters and batch.
    params = jax.device_put(scenario.params(), shard)
    x = jax.device_put(np.ones((32, 4), np.float32), shard)

    def make_step(tx):
        def train_step(params, state, x):
            def loss_fn(p):
                h = x @ p["w"].T  # [32, 16]
                return jnp.mean(jnp.square(h)) + jnp.mean(jnp.square(p["b"]))

            grads = jax.grad(loss_fn)(params)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return jax.jit(train_step), tx.init(params)

    for name, tx in (
        (
            "train_stabilized",
            og.stabilized(optax.sgd(0.1), config=CONFIG, track_update_ratio=False),
        ),
        ("train_clip_by_global_norm", optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))),
    ):
        step, tx_state = make_step(tx)
        result[name] = hlo_collectives(step, params, tx_state, x)
    return result


# --- shard_map and pmap with axis_name ----------------------------------------


def specs_like(tree, spec):
    return jax.tree.map(lambda _: spec, tree)


def check_shard_map(mesh):
    """stabilize and stabilized(adam) with axis_name; each device a shard of the gradients."""
    shard = NamedSharding(mesh, P(AXIS))
    grads_seq = global_grads()
    results = {}
    for name, wrapper in (("stabilize", False), ("stabilized", True)):
        params = scenario.params() if wrapper else None
        if wrapper:
            opt = og.stabilized(optax.adam(1e-2), config=CONFIG, axis_name=AXIS)
        else:
            opt = og.stabilize(config=CONFIG, axis_name=AXIS)
        ref = one_device_run(wrapper)
        # init on the global (unsharded) parameters, outside shard_map.
        state = opt.init(params if wrapper else grads_seq[0])
        if wrapper:
            state_specs = og.StabilizedState(
                inner_state=jax.tree.map(
                    lambda x: P(AXIS) if jnp.ndim(x) else P(), state.inner_state
                ),
                flow=specs_like(state.flow, P()),
                update_ratio_history=Ring(P(), P(), P()),
            )
        else:
            state_specs = specs_like(state, P())
        fields_specs = specs_like(flow_fields(state), P(AXIS))
        grad_specs = specs_like(grads_seq[0], P(AXIS))
        param_specs = specs_like(params, P(AXIS)) if wrapper else None

        def body(grads, state, params, value, opt=opt):
            out, new_state = opt.update(grads, state, params, value=value)
            return out, new_state, per_device(flow_fields(new_state))

        step = jax.jit(
            shard_map(
                body,
                mesh=mesh,
                in_specs=(grad_specs, state_specs, param_specs, P()),
                out_specs=(grad_specs, state_specs, fields_specs),
            )
        )
        sharded_params = jax.device_put(params, shard) if wrapper else None
        outs, devices = [], []
        compiled = hlo = None
        for k, grads in enumerate(grads_seq):
            args = (jax.device_put(grads, shard), state, sharded_params, jnp.float32(k))
            if compiled is None:
                compiled, hlo = compile_with_hlo(step, *args)
            out, state, copies = compiled(*args)
            outs.append(host(out))
            devices.append([host(c) for c in unstack(copies)])
        results[name] = {"reference": ref, "updates": outs, "devices": devices, "hlo": hlo}
    return results


def check_pmap():
    """stabilize with axis_name under pmap; device i holds rows i of each leaf."""
    grads_seq = global_grads()
    opt = og.stabilize(config=CONFIG, axis_name=AXIS)
    ref = one_device_run(wrapper=False)
    split = lambda tree: jax.tree.map(lambda x: x.reshape(N, -1, *x.shape[1:]), tree)
    join = lambda tree: jax.tree.map(lambda x: np.asarray(x).reshape(-1, *x.shape[2:]), tree)
    state = opt.init(grads_seq[0])
    state = jax.tree.map(lambda x: jnp.broadcast_to(x, (N, *x.shape)), state)
    step = jax.pmap(lambda g, s, v: opt.update(g, s, value=v), axis_name=AXIS, in_axes=(0, 0, None))
    outs, devices, compiled, hlo = [], [], None, None
    for k, grads in enumerate(grads_seq):
        args = (split(grads), state, jnp.float32(k))
        if compiled is None:
            compiled, hlo = compile_with_hlo(step, *args)
        out, state = compiled(*args)
        outs.append(host(join(out)))
        devices.append([host(c) for c in unstack(to_flat(state))])
    return {"reference": ref, "updates": outs, "devices": devices, "hlo": hlo}


def main() -> None:
    assert jax.device_count() == N, jax.devices()
    devices = np.array(jax.devices())
    auto_mesh = Mesh(devices, (AXIS,))
    explicit_mesh = jax.make_mesh(
        (N,), (AXIS,), axis_types=(jax.sharding.AxisType.Explicit,), devices=devices
    )
    checks = {
        "jit_fully_sharded": lambda: check_jit_fully_sharded(auto_mesh, wrapper=False),
        "jit_fully_sharded_explicit": lambda: check_jit_fully_sharded(explicit_mesh, wrapper=False),
        "jit_fully_sharded_wrapper": lambda: check_jit_fully_sharded(auto_mesh, wrapper=True),
        "jit_data_parallel": lambda: check_jit_data_parallel(auto_mesh),
        "hlo_jit": lambda: check_hlo_jit(auto_mesh),
        "shard_map": lambda: check_shard_map(auto_mesh),
        "pmap": check_pmap,
    }
    report = {}
    for name, check in checks.items():
        try:
            report[name] = check()
        except Exception:  # reported, so that the other checks still run
            report[name] = {"error": traceback.format_exc()}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
