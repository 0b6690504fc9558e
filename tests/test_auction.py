"""The examples' ad-auction simulator (examples/auction.py), used by notebook 03 and the RL task."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples import auction

# --- The auction simulator -----------------------------------------------------------

# A small market with round numbers; competitor_sigma = 0 makes every
# competitor bid exactly competitor_median * channel_competition[channel].
MARKET = auction.AuctionConfig(
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
    return auction.AuctionState(
        budget=jnp.float32(budget),
        time_left=jnp.int32(time_left),
        quality=jnp.float32(quality),
        segment=jnp.int32(segment),
    )


def _action(bid, creative, channel):
    return auction.AuctionAction(jnp.int32(bid), jnp.int32(creative), jnp.int32(channel))


KEY = jax.random.PRNGKey(0)


def test_reward_of_a_won_auction_by_hand():
    # Bid 1.0 on channel 1: the competitors bid 0.5 * 0.5 = 0.25, so the bidder
    # wins and pays 0.25. Value = 2.0 * quality 1.5 * creative_fit[0][0] = 1.0
    # * channel_fit[0][1] = 0.5 = 1.5. Reward = 1.5 - 0.25 = 1.25.
    state, reward, done, info = auction.step(_state(), _action(2, 0, 1), KEY, MARKET)
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
        state, reward, _, info = auction.step(_state(), _action(bid, 0, 0), KEY, MARKET)
        assert not bool(info["won"])
        assert float(reward) == 0.0 and float(info["price"]) == 0.0
        assert float(state.budget) == 3.0 and int(state.time_left) == 9


def test_the_bid_is_capped_at_the_budget():
    # Bid level 2.0 with 0.2 left bids 0.2 < 0.25: lost. With 0.3 left: won, pays 0.25.
    _, reward, _, info = auction.step(_state(budget=0.2), _action(3, 0, 1), KEY, MARKET)
    assert not bool(info["won"]) and float(reward) == 0.0
    state, reward, done, info = auction.step(_state(budget=0.3), _action(3, 0, 1), KEY, MARKET)
    assert bool(info["won"])
    np.testing.assert_allclose(float(state.budget), 0.05, rtol=1e-5)
    np.testing.assert_allclose(float(reward), 1.5 - 0.25, rtol=1e-6)
    assert not bool(done)


def test_episode_ends_and_a_done_episode_stays_put():
    state, _, done, _ = auction.step(_state(time_left=1), _action(2, 0, 1), KEY, MARKET)
    assert bool(done) and int(state.time_left) == 0
    again, reward, done_again, info = auction.step(state, _action(3, 0, 1), KEY, MARKET)
    assert bool(done_again) and float(reward) == 0.0 and not bool(info["won"])
    assert all(np.array_equal(a, b) for a, b in zip(again, state, strict=True))
    # The price is below the bid and the bid at most the budget, so a win never
    # spends the budget down to 0: 0.26 left, pays 0.25, 0.01 left, not done.
    broke, _, done, _ = auction.step(_state(budget=0.26), _action(3, 0, 1), KEY, MARKET)
    np.testing.assert_allclose(float(broke.budget), 0.01, rtol=1e-4)
    assert not bool(done)
    # A state without money is done and stays put.
    empty = _state(budget=0.0)
    after, reward, done, _ = auction.step(empty, _action(3, 0, 1), KEY, MARKET)
    assert bool(done) and float(reward) == 0.0 and int(after.time_left) == 10


def test_reset_and_step_are_deterministic_for_a_fixed_key():
    a, b = auction.reset(KEY), auction.reset(KEY)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    action = _action(4, 1, 2)
    out1 = auction.step(a, action, jax.random.PRNGKey(5))
    out2 = jax.jit(auction.step)(a, action, jax.random.PRNGKey(5))
    for x, y in zip(jax.tree.leaves(out1), jax.tree.leaves(out2), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    other = auction.step(a, action, jax.random.PRNGKey(6))
    assert float(other[0].quality) != float(out1[0].quality)


def test_reset_starts_a_full_episode():
    state = auction.reset(KEY, MARKET)
    assert float(state.budget) == 3.0 and int(state.time_left) == 10
    assert 0.5 <= float(state.quality) < 1.5 and 0 <= int(state.segment) < 2


def test_observation_by_hand():
    obs = auction.observation(_state(budget=1.5, time_left=4, quality=1.25, segment=1), MARKET)
    np.testing.assert_allclose(np.asarray(obs), [0.5, 0.4, 1.25, 0.0, 1.0], rtol=1e-6)
    assert obs.shape == (MARKET.observation_size,) and obs.dtype == jnp.float32


def test_competitor_bids_follow_the_channel_factor():
    bids = auction.competitor_bids(KEY, jnp.int32(1), MARKET)
    np.testing.assert_allclose(np.asarray(bids), [0.25, 0.25], rtol=1e-6)
    # Log-normal spread: the median of many draws is the median times the factor.
    keys = jax.random.split(KEY, 4000)
    draws = jax.vmap(lambda k: auction.competitor_bids(k, jnp.int32(0)))(keys)
    market = auction.DEFAULT_AUCTION
    expected = market.competitor_median * market.channel_competition[0]
    np.testing.assert_allclose(np.median(np.asarray(draws)), expected, rtol=0.05)  # sampling


def test_vmapped_episodes_run_in_lockstep():
    n = 16
    states = jax.vmap(auction.reset)(jax.random.split(KEY, n))
    actions = auction.AuctionAction(
        bid=jnp.full((n,), 5, jnp.int32), creative=states.segment, channel=states.segment
    )

    @jax.jit
    def run(states, key):
        def body(states, key):
            keys = jax.random.split(key, n)
            states, reward, done, _ = jax.vmap(auction.step)(states, actions, keys)
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
        auction.AuctionConfig(channel_competition=(1.0, 1.0))
    with pytest.raises(ValueError, match="budget"):
        auction.AuctionConfig(budget=0.0)
    with pytest.raises(ValueError, match="horizon"):
        auction.AuctionConfig(horizon=0)
