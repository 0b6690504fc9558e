"""Gradient accumulation with NaN micro-batches (SPEC.md, "Gradient accumulation").

The stabilizer in front of ``optax.MultiSteps`` checks each micro-batch
before it is accumulated: training goes on and nothing non-finite reaches the
parameters or Adam's moments. Behind MultiSteps, one NaN micro-batch stays in
optax's accumulator for good (the evidence for the arrangement SPEC.md
documents).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradflow as og

K = 4  # micro-batches per update
MICRO_STEPS = 240
LR = 3e-2
NAN_AT = frozenset(range(5, MICRO_STEPS, 7))  # one micro-batch in 7 is NaN
DIM = 8
W_TRUE = jnp.linspace(-1.0, 1.0, DIM)


def _batch(step):
    x = jax.random.normal(jax.random.PRNGKey(step), (32, DIM))
    return x, x @ W_TRUE


def _loss(w, x, y):
    return jnp.mean((x @ w - y) ** 2)


def _run(opt):
    params = jnp.zeros(DIM)
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, y, poison):
        loss, grads = jax.value_and_grad(_loss)(params, x, y)
        grads = jnp.where(poison, jnp.nan, grads)
        updates, state = opt.update(grads, state, params, value=jnp.where(poison, jnp.nan, loss))
        return optax.apply_updates(params, updates), state

    x0, y0 = _batch(10_000)
    start = float(_loss(params, x0, y0))
    for k in range(MICRO_STEPS):
        x, y = _batch(k)
        params, state = step(params, state, x, y, k in NAN_AT)
        assert np.isfinite(np.asarray(params)).all(), f"non-finite parameters after step {k}"
        for name in ("mu", "nu"):
            for _, moment in optax.tree.get_all_with_path(state, name):
                assert np.isfinite(np.asarray(moment)).all(), f"non-finite Adam {name} at {k}"
    return start, float(_loss(params, x0, y0)), state


GOOD = MICRO_STEPS - len(NAN_AT)


@pytest.mark.parametrize(
    "name, build, updates",
    [
        # A NaN micro-batch is skipped whole: MultiSteps waits for K finite ones.
        ("stabilized(MultiSteps)", lambda: og.stabilized(optax.MultiSteps(optax.adam(LR), K), LR),
         GOOD // K),
        # A NaN micro-batch adds zeros and counts as one of the K.
        ("chain(stabilize, MultiSteps)",
         lambda: optax.chain(og.stabilize(LR), optax.MultiSteps(optax.adam(LR), K)),
         MICRO_STEPS // K),
    ],
)  # fmt: skip
def test_the_stabilizer_in_front_of_multisteps(name, build, updates):
    start, end, state = _run(build())
    # Training goes on: 240 micro-batches reach a loss under 1% of the start.
    assert end < 0.01 * start, name
    multi = optax.tree.get(state, "gradient_step")
    assert int(multi) == updates
    # Every NaN micro-batch was seen and skipped by the stabilizer.
    flow = og.find_states(state)[0][1]
    assert int(flow.nonfinite_count) == len(NAN_AT)
    assert int(flow.stabilizer_step) == MICRO_STEPS


def test_multisteps_own_skip_with_the_stabilizer_behind():
    # The alternative SPEC.md names: optax keeps NaN out of its accumulator,
    # but the stabilizer never sees the NaN micro-batches.
    opt = optax.MultiSteps(
        og.stabilized(optax.adam(LR), LR), K, should_skip_update_fn=optax.skip_not_finite
    )
    start, end, state = _run(opt)
    assert end < 0.01 * start
    assert int(optax.tree.get(state, "gradient_step")) == GOOD // K
    flow = og.find_states(state)[0][1]
    assert int(flow.nonfinite_count) == 0


def test_behind_multisteps_one_nan_stops_training():
    # The arrangement SPEC.md advises against: the first NaN micro-batch (5)
    # poisons the accumulator (optax resets it as acc * 0, and NaN * 0 is NaN);
    # every later update is NaN, skipped, and the parameters stop at the
    # values of the last update before it (after micro-batch 3).
    opt = optax.MultiSteps(og.stabilized(optax.adam(LR), LR), K)
    params = jnp.zeros(DIM)
    state = opt.init(params)
    update = jax.jit(opt.update)
    history = []
    for k in range(40):
        x, y = _batch(k)
        grads = jax.grad(_loss)(params, x, y)
        if k in NAN_AT:
            grads = jnp.full_like(grads, jnp.nan)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    np.testing.assert_array_equal(history[-1], history[3])
    assert not np.isfinite(np.asarray(state.acc_grads)).all()
    flow = og.find_states(state)[0][1]
    # Updates 2 .. 10 (emitted after micro-batches 7, 11, ..., 39) were all NaN.
    assert int(flow.nonfinite_count) == 9


def test_the_update_ratio_counts_only_steps_that_moved():
    # SPEC.md, "Wrapper form": MultiSteps returns zeros between its emitting
    # steps; those zeros are no ratio of a step. Without the rule the ring
    # would hold zeros and the report would advise a higher learning rate.
    _, _, state = _run(og.stabilized(optax.MultiSteps(optax.adam(LR), K), LR))
    rep = og.stability_report(state)
    ring = state.update_ratio_history
    values = np.asarray(ring.values)[: int(ring.count)]
    assert values.size >= 1 and (values > 0).all()
    assert rep.lr_recommendation != "increase"
