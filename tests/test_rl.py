"""optax_gradflow.rl: periodic target updates, by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_gradflow import rl

# --- periodic_target_update ----------------------------------------------------------

ONLINE = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[0.0]])}
TARGET = {"a": jnp.array([0.0, 4.0]), "b": jnp.array([[4.0]])}


def _same(x, y):
    return all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True)
    )


@pytest.mark.parametrize(
    ("step", "synced"),
    [(0, True), (1, False), (4, False), (5, True), (6, False), (9, False), (10, True)],
)
def test_copies_exactly_at_multiples_of_the_period(step, synced):
    # period 5: steps 0, period - 1 = 4, period = 5 and 2 * period = 10, and between.
    new_target, _ = rl.periodic_target_update(ONLINE, TARGET, step, period=5)
    assert _same(new_target, ONLINE if synced else TARGET)


def test_divergence_by_hand():
    # |online - target| = sqrt(3^2 + 0^2 + 4^2) = 5; |online| = sqrt(3^2 + 4^2 + 0^2) = 5.
    _, d = rl.periodic_target_update(ONLINE, TARGET, 3, period=5)
    np.testing.assert_allclose(float(d), 1.0, rtol=1e-6)
    # Measured before the copy, at a sync step too.
    _, d_sync = rl.periodic_target_update(ONLINE, TARGET, 5, period=5)
    np.testing.assert_allclose(float(d_sync), 1.0, rtol=1e-6)
    # |[3, 4] - [3, 0]| / |[3, 4]| = 4 / 5.
    _, d = rl.periodic_target_update(
        {"w": jnp.array([3.0, 4.0])}, {"w": jnp.array([3.0, 0.0])}, 1, 5
    )
    np.testing.assert_allclose(float(d), 0.8, rtol=1e-6)
    assert d.dtype == jnp.float32 and d.shape == ()


def test_divergence_edge_cases():
    zero = {"w": jnp.zeros(3)}
    assert float(rl.tree_divergence(ONLINE, ONLINE)) == 0.0
    assert float(rl.tree_divergence(zero, zero)) == 0.0
    assert float(rl.tree_divergence(zero, {"w": jnp.ones(3)})) == np.inf


def test_integer_leaves_are_copied_but_not_measured():
    online = {"w": jnp.array([1.0, 0.0]), "count": jnp.array(7, jnp.int32)}
    target = {"w": jnp.array([1.0, 0.0]), "count": jnp.array(2, jnp.int32)}
    new_target, d = rl.periodic_target_update(online, target, 0, period=3)
    assert float(d) == 0.0
    assert int(new_target["count"]) == 7 and new_target["count"].dtype == jnp.int32


def test_leaf_dtypes_are_kept():
    online = {"w": jnp.array([1.0, 2.0], jnp.bfloat16)}
    target = {"w": jnp.array([0.5, 2.0], jnp.bfloat16)}
    for step in (0, 1):
        new_target, d = rl.periodic_target_update(online, target, step, period=2)
        assert new_target["w"].dtype == jnp.bfloat16
        # |[0.5, 0]| / |[1, 2]| = 0.5 / sqrt(5); bfloat16 holds these values exactly.
        np.testing.assert_allclose(float(d), 0.5 / np.sqrt(5.0), rtol=1e-6)


def test_works_under_jit_with_a_traced_step():
    update = jax.jit(rl.periodic_target_update, static_argnames="period")
    for step, synced in ((8, True), (9, False), (12, True)):
        new_target, d = update(ONLINE, TARGET, jnp.int32(step), period=4)
        assert _same(new_target, ONLINE if synced else TARGET)
        np.testing.assert_allclose(float(d), 1.0, rtol=1e-6)
    assert update._cache_size() == 1  # one compilation for every step value


def test_in_a_scan_the_target_follows_the_period():
    # Online weights w_k = k at step k; period 4: the target holds w at the last sync.
    def body(target, k):
        online = {"w": jnp.full((2,), k, jnp.float32)}
        target, d = rl.periodic_target_update(online, target, k, period=4)
        return target, (target["w"][0], d)

    _, (held, divergence) = jax.lax.scan(body, {"w": jnp.zeros(2)}, jnp.arange(10))
    np.testing.assert_array_equal(np.asarray(held), [0, 0, 0, 0, 4, 4, 4, 4, 8, 8])
    # Before each step's copy: step 0 compares 0 with 0; step k > 0, |k - last sync| / k.
    last_sync = np.array([0, 0, 0, 0, 0, 4, 4, 4, 4, 8])
    k = np.arange(10, dtype=np.float64)
    expected = np.where(k > 0, np.abs(k - last_sync) / np.maximum(k, 1), 0.0)
    np.testing.assert_allclose(np.asarray(divergence), expected, rtol=1e-6)


@pytest.mark.parametrize("period", [0, -3, 2.5, True, None])
def test_bad_period_raises(period):
    with pytest.raises(ValueError, match="period must be an int >= 1"):
        rl.periodic_target_update(ONLINE, TARGET, 0, period)


def test_mismatched_trees_raise():
    with pytest.raises(ValueError, match="same tree structure"):
        rl.periodic_target_update(ONLINE, {"a": TARGET["a"]}, 0, 2)
    with pytest.raises(ValueError, match="differ in shape"):
        rl.periodic_target_update({"w": jnp.ones(2)}, {"w": jnp.ones(3)}, 0, 2)
    with pytest.raises(ValueError, match="integer scalar"):
        rl.periodic_target_update(ONLINE, TARGET, jnp.float32(1.0), 2)
