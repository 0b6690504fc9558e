"""One transformation instance serves many parameter trees (SPEC.md, "Errors")."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import optax_gradflow as og


def _finite_update(tx, params, grads):
    state = jax.jit(tx.init)(params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    return updates, state


@pytest.mark.parametrize("factory", [og.stabilize, lambda lr: og.stabilized(optax.sgd(lr), lr)])
def test_one_instance_under_partition(factory):
    tx = factory(1e-2)
    params = {"x": jnp.ones(3), "y": {"a": jnp.ones((2, 2)), "b": jnp.ones(5)}}
    labels = {"x": "x", "y": {"a": "y", "b": "y"}}
    opt = optax.partition({"x": tx, "y": tx}, labels)
    grads = jax.tree.map(lambda p: 0.01 * p, params)
    updates, state = _finite_update(opt, params, grads)
    # Two independent stabilizer states, one per sub-tree.
    assert len(og.find_states(state)) == 2
    assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_one_instance_under_multi_transform():
    tx = og.stabilize(1e-2)
    params = {"x": jnp.ones(3), "y": jnp.ones((4, 2))}
    opt = optax.multi_transform({"a": tx, "b": tx}, {"x": "a", "y": "b"})
    _finite_update(opt, params, jax.tree.map(jnp.ones_like, params))


def test_init_on_a_second_model_then_update_the_first():
    tx = og.stabilize(1e-2)
    first = {"w": jnp.ones(3)}
    second = {"w": jnp.ones((7, 7)), "b": jnp.ones(7)}
    state_first = tx.init(first)
    tx.init(second)  # a GAN's other network, a re-run notebook cell
    grads = {"w": jnp.full(3, 0.1)}
    updates, _ = tx.update(grads, state_first, first)
    # Norm sqrt(3) * 0.1 ~ 0.17 is below the learning-rate start 1.0: unchanged.
    chex.assert_trees_all_equal(updates, grads)


def test_two_nnx_optimizers_share_one_instance():
    tx = og.stabilized(optax.adam(1e-3), 1e-3)
    models = [nnx.Linear(3, 2, rngs=nnx.Rngs(0)), nnx.Linear(5, 4, rngs=nnx.Rngs(1))]
    optimizers = [nnx.Optimizer(m, tx, wrt=nnx.Param) for m in models]
    for model, optimizer in zip(models, optimizers, strict=True):
        x = jnp.ones((2, model.in_features))
        grads = nnx.grad(lambda m, x=x: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)


def test_mismatch_with_the_params_of_the_same_call_is_an_error():
    tx = og.stabilize(1e-2)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    with pytest.raises(ValueError, match="tree structure"):
        tx.update({"w": jnp.zeros(3)}, state, params)
