"""optax_gradflow.rl: periodic target updates and the auction simulator, by hand."""

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


# --- The auction simulator -----------------------------------------------------------

# A small market with round numbers; competitor_sigma = 0 makes every
# competitor bid exactly competitor_median * channel_competition[channel].
MARKET = rl.AuctionConfig(
    horizon=10,
    budget=3.0,
    bid_levels=(0.0, 0.5, 1.0, 2.0),
    creative_fit=((1.0, 0.25), (0.5, 1.0)),
    channel_fit=((1.0, 0.5), (0.75, 1.0)),
    channel_competition=(1.0, 0.5),
    num_competitors=2,
    competitor_median=0.5,
    competitor_sigma=0.0,
    value_scale=2.0,
)


def _state(budget=3.0, time_left=10, quality=1.5, segment=0):
    return rl.AuctionState(
        budget=jnp.float32(budget),
        time_left=jnp.int32(time_left),
        quality=jnp.float32(quality),
        segment=jnp.int32(segment),
    )


def _action(bid, creative, channel):
    return rl.AuctionAction(jnp.int32(bid), jnp.int32(creative), jnp.int32(channel))


KEY = jax.random.PRNGKey(0)


def test_reward_of_a_won_auction_by_hand():
    # Bid 1.0 on channel 1: the competitors bid 0.5 * 0.5 = 0.25, so the bidder
    # wins and pays 0.25. Value = 2.0 * quality 1.5 * creative_fit[0][0] = 1.0
    # * channel_fit[0][1] = 0.5 = 1.5. Reward = 1.5 - 0.25 = 1.25.
    state, reward, done, info = rl.step(_state(), _action(2, 0, 1), KEY, MARKET)
    assert bool(info["won"])
    np.testing.assert_allclose(float(info["highest_competitor_bid"]), 0.25, rtol=1e-6)
    np.testing.assert_allclose(float(info["price"]), 0.25, rtol=1e-6)
    np.testing.assert_allclose(float(info["value"]), 1.5, rtol=1e-6)
    np.testing.assert_allclose(float(reward), 1.25, rtol=1e-6)
    np.testing.assert_allclose(float(state.budget), 2.75, rtol=1e-6)
    assert int(state.time_left) == 9 and not bool(done)


def test_a_tie_or_a_lower_bid_loses_and_pays_nothing():
    # Channel 0: the competitors bid 0.5; a bid of 0.5 ties and loses.
    for bid in (0, 1):
        state, reward, _, info = rl.step(_state(), _action(bid, 0, 0), KEY, MARKET)
        assert not bool(info["won"])
        assert float(reward) == 0.0 and float(info["price"]) == 0.0
        assert float(state.budget) == 3.0 and int(state.time_left) == 9


def test_the_bid_is_capped_at_the_budget():
    # Bid level 2.0 with 0.2 left bids 0.2 < 0.25: lost. With 0.3 left: won, pays 0.25.
    _, reward, _, info = rl.step(_state(budget=0.2), _action(3, 0, 1), KEY, MARKET)
    assert not bool(info["won"]) and float(reward) == 0.0
    state, reward, done, info = rl.step(_state(budget=0.3), _action(3, 0, 1), KEY, MARKET)
    assert bool(info["won"])
    np.testing.assert_allclose(float(state.budget), 0.05, rtol=1e-5)
    np.testing.assert_allclose(float(reward), 1.5 - 0.25, rtol=1e-6)
    assert not bool(done)


def test_episode_ends_and_a_done_episode_stays_put():
    state, _, done, _ = rl.step(_state(time_left=1), _action(2, 0, 1), KEY, MARKET)
    assert bool(done) and int(state.time_left) == 0
    again, reward, done_again, info = rl.step(state, _action(3, 0, 1), KEY, MARKET)
    assert bool(done_again) and float(reward) == 0.0 and not bool(info["won"])
    assert all(np.array_equal(a, b) for a, b in zip(again, state, strict=True))
    # The price is below the bid and the bid at most the budget, so a win never
    # spends the budget down to 0: 0.26 left, pays 0.25, 0.01 left, not done.
    broke, _, done, _ = rl.step(_state(budget=0.26), _action(3, 0, 1), KEY, MARKET)
    np.testing.assert_allclose(float(broke.budget), 0.01, rtol=1e-4)
    assert not bool(done)
    # A state without money is done and stays put.
    empty = _state(budget=0.0)
    after, reward, done, _ = rl.step(empty, _action(3, 0, 1), KEY, MARKET)
    assert bool(done) and float(reward) == 0.0 and int(after.time_left) == 10


def test_reset_and_step_are_deterministic_for_a_fixed_key():
    a, b = rl.reset(KEY), rl.reset(KEY)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    action = _action(4, 1, 2)
    out1 = rl.step(a, action, jax.random.PRNGKey(5))
    out2 = jax.jit(rl.step)(a, action, jax.random.PRNGKey(5))
    for x, y in zip(jax.tree.leaves(out1), jax.tree.leaves(out2), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    other = rl.step(a, action, jax.random.PRNGKey(6))
    assert float(other[0].quality) != float(out1[0].quality)


def test_reset_starts_a_full_episode():
    state = rl.reset(KEY, MARKET)
    assert float(state.budget) == 3.0 and int(state.time_left) == 10
    assert 0.5 <= float(state.quality) < 1.5 and 0 <= int(state.segment) < 2


def test_observation_by_hand():
    obs = rl.observation(_state(budget=1.5, time_left=4, quality=1.25, segment=1), MARKET)
    np.testing.assert_allclose(np.asarray(obs), [0.5, 0.4, 1.25, 0.0, 1.0], rtol=1e-6)
    assert obs.shape == (MARKET.observation_size,) and obs.dtype == jnp.float32


def test_competitor_bids_follow_the_channel_factor():
    bids = rl.competitor_bids(KEY, jnp.int32(1), MARKET)
    np.testing.assert_allclose(np.asarray(bids), [0.25, 0.25], rtol=1e-6)
    # Log-normal spread: the median of many draws is the median times the factor.
    draws = jax.vmap(lambda k: rl.competitor_bids(k, jnp.int32(0)))(jax.random.split(KEY, 4000))
    expected = rl.DEFAULT_AUCTION.competitor_median * rl.DEFAULT_AUCTION.channel_competition[0]
    np.testing.assert_allclose(np.median(np.asarray(draws)), expected, rtol=0.05)  # sampling


def test_vmapped_episodes_run_in_lockstep():
    n = 16
    states = jax.vmap(rl.reset)(jax.random.split(KEY, n))
    actions = rl.AuctionAction(
        bid=jnp.full((n,), 5, jnp.int32), creative=states.segment, channel=states.segment
    )

    @jax.jit
    def run(states, key):
        def body(states, key):
            keys = jax.random.split(key, n)
            states, reward, done, _ = jax.vmap(rl.step)(states, actions, keys)
            return states, (reward, done)

        return jax.lax.scan(body, states, jax.random.split(key, 60))

    final, (rewards, done) = run(states, jax.random.PRNGKey(1))
    assert rewards.shape == (60, n) and done.shape == (60, n)
    # 60 steps > horizon 50: every episode is done, and rewards after the end are 0.
    assert bool(np.all(np.asarray(done[-1])))
    assert np.all(np.asarray(final.time_left) >= 0)
    first_done = np.argmax(np.asarray(done), axis=0)
    for i in range(n):
        assert np.all(np.asarray(rewards)[first_done[i] + 1 :, i] == 0.0)


def test_config_is_validated():
    with pytest.raises(ValueError, match="one entry per channel"):
        rl.AuctionConfig(channel_competition=(1.0, 1.0))
    with pytest.raises(ValueError, match="budget"):
        rl.AuctionConfig(budget=0.0)
    with pytest.raises(ValueError, match="horizon"):
        rl.AuctionConfig(horizon=0)
