"""Outside ``jit``, ``update`` compiles its step once, not on every call."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradflow as og


class _Compilations(logging.Handler):
    """Counts the compilations ``jax.log_compiles`` reports."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.count = 0

    def emit(self, record):
        if "Finished XLA compilation" in record.getMessage():
            self.count += 1


def _count_compilations(fn):
    handler = _Compilations()
    log = logging.getLogger("jax")
    log.addHandler(handler)
    try:
        with jax.log_compiles():
            fn()
    finally:
        log.removeHandler(handler)
    return handler.count


FORMS = {
    "stabilize": lambda: og.stabilize(1e-2),
    "stabilized": lambda: og.stabilized(optax.adam(1e-2), 1e-2),
    "chain": lambda: optax.chain(og.stabilize(1e-2), optax.adam(1e-2)),
    "log_events": lambda: og.stabilized(optax.sgd(1e-2), 1e-2, log_events=True),
}


@pytest.mark.parametrize("form", FORMS)
def test_ten_eager_calls_compile_nothing_after_the_first(form):
    opt = FORMS[form]()
    params = {"w": jnp.ones(64), "b": jnp.zeros(())}
    state = opt.init(params)
    grads = [{"w": jnp.full(64, 0.01 * (k + 1)), "b": jnp.float32(k)} for k in range(11)]
    # A NaN step and an explosion take the conditionals' other branches.
    grads[3] = {"w": jnp.full(64, jnp.nan), "b": jnp.float32(0.0)}
    grads[6] = {"w": jnp.full(64, 1e3), "b": jnp.float32(0.0)}
    _, state = opt.update(grads[0], state, params, value=1.0)

    def ten_calls():
        nonlocal state
        for k in range(1, 11):
            _, state = opt.update(grads[k], state, params, value=1.0 / k)

    assert _count_compilations(ten_calls) == 0
    flow = og.find_states(state)[0][1]
    assert int(flow.stabilizer_step) == 11
    assert int(flow.nonfinite_count) == 1


def test_the_count_sees_compilations():
    # The counter itself: a fresh jitted function compiles once.
    x = jnp.ones(5)
    assert _count_compilations(lambda: jax.jit(lambda x: x * 3.0 + 1.0)(x)) == 1


def test_eager_and_jitted_calls_give_the_same_result():
    opt = og.stabilized(optax.adam(1e-2), 1e-2)
    params = {"w": jnp.ones(8)}
    grads = [{"w": jnp.full(8, g)} for g in (0.1, 5.0, jnp.nan, 0.2)]
    eager_state = jitted_state = opt.init(params)
    update = jax.jit(opt.update)
    for g in grads:
        eager_out, eager_state = opt.update(g, eager_state, params, value=0.5)
        jitted_out, jitted_state = update(g, jitted_state, params, value=0.5)
        np.testing.assert_array_equal(eager_out["w"], jitted_out["w"])
    for a, b in zip(jax.tree.leaves(eager_state), jax.tree.leaves(jitted_state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_errors_are_raised_on_every_eager_call():
    # The checks run before the compiled step, so a cached compilation does
    # not hide a bad call.
    opt = og.stabilize(1e-2)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    for _ in range(2):
        with pytest.raises(ValueError, match="value= must be the loss"):
            opt.update(params, state, params, value=jnp.ones(4))
