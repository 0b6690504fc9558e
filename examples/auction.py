"""An ad-bidding environment in pure JAX (used by notebook 03 and the RL benchmark task).

Each step is one second-price auction for an ad impression; the bidder
picks a bid level, a creative and a channel. :func:`reset`, :func:`step` and
:func:`observation` are pure functions of arrays and a PRNG key, so they
work under ``jit`` and ``vmap`` (many auctions in parallel).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from examples import auction
  >>> state = auction.reset(jax.random.PRNGKey(0))
  >>> action = auction.AuctionAction(
  ...     bid=jnp.int32(4), creative=state.segment, channel=jnp.int32(1)
  ... )
  >>> state, reward, done, info = auction.step(state, action, jax.random.PRNGKey(1))
  >>> int(state.time_left)
  49
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AuctionConfig:
    """The auction market; frozen and hashable, so it can be a static argument.

    Each step is one sealed-bid second-price auction for an impression shown to
    a user of segment ``s`` with ad quality ``q``. If the bidder wins, it gets
    the value ``value_scale * q * creative_fit[s][creative] *
    channel_fit[s][channel]`` and pays the highest competing bid.

    Attributes:
      horizon: auctions per episode.
      budget: money at the start of an episode.
      bid_levels: the bid of each discrete bid action (the first, 0, sits out).
      creative_fit: ``[segment][creative]`` value multipliers.
      channel_fit: ``[segment][channel]`` value multipliers.
      channel_competition: ``[channel]`` multipliers of the competitors' bids.
      num_competitors: competing bidders in each auction.
      competitor_median: median bid of one competitor before the channel factor.
      competitor_sigma: log-normal spread of a competitor's bid (0: every
        competitor bids exactly the median times the channel factor).
      value_scale: value of an impression of quality 1 with perfect fits.
      quality_range: ``(low, high)`` of the uniform draw of each impression's
        quality.
    """

    horizon: int = 50
    budget: float = 8.0
    bid_levels: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.3, 1.6)
    creative_fit: tuple[tuple[float, ...], ...] = (
        (1.0, 0.4, 0.2),
        (0.3, 1.0, 0.4),
        (0.5, 0.3, 1.0),
    )
    channel_fit: tuple[tuple[float, ...], ...] = (
        (1.2, 0.7, 0.5),
        (0.6, 1.2, 0.8),
        (0.9, 0.8, 1.1),
    )
    channel_competition: tuple[float, ...] = (1.4, 1.0, 0.7)
    num_competitors: int = 3
    competitor_median: float = 0.35
    competitor_sigma: float = 0.5
    value_scale: float = 1.2
    quality_range: tuple[float, float] = (0.5, 1.5)

    def __post_init__(self):
        if self.horizon < 1 or self.num_competitors < 1:
            raise ValueError(
                f"horizon and num_competitors must be >= 1, got {self.horizon} and "
                f"{self.num_competitors}."
            )
        if not self.budget > 0 or not self.competitor_median > 0 or self.competitor_sigma < 0:
            raise ValueError(
                "budget and competitor_median must be > 0 and competitor_sigma >= 0, got "
                f"{self.budget}, {self.competitor_median}, {self.competitor_sigma}."
            )
        segments = len(self.creative_fit)
        if len(self.channel_fit) != segments or segments < 1:
            raise ValueError("creative_fit and channel_fit need one row per segment.")
        if len({len(row) for row in self.creative_fit}) != 1:
            raise ValueError("every row of creative_fit needs one entry per creative.")
        if {len(row) for row in self.channel_fit} != {len(self.channel_competition)}:
            raise ValueError("every row of channel_fit needs one entry per channel.")
        if not self.bid_levels or min(self.bid_levels) < 0:
            raise ValueError(f"bid_levels must be non-negative, got {self.bid_levels}.")

    @property
    def num_segments(self) -> int:
        return len(self.creative_fit)

    @property
    def num_bids(self) -> int:
        return len(self.bid_levels)

    @property
    def num_creatives(self) -> int:
        return len(self.creative_fit[0])

    @property
    def num_channels(self) -> int:
        return len(self.channel_competition)

    @property
    def observation_size(self) -> int:
        return 3 + self.num_segments


DEFAULT_AUCTION = AuctionConfig()


class AuctionState(NamedTuple):
    """State of one auction episode; the current impression is part of it.

    Attributes:
      budget: f32[], money left.
      time_left: i32[], auctions left in the episode, the current one included.
      quality: f32[], ad quality of the current impression.
      segment: i32[], user segment of the current impression.
    """

    budget: jax.Array
    time_left: jax.Array
    quality: jax.Array
    segment: jax.Array


class AuctionAction(NamedTuple):
    """One action: three discrete choices (int32 scalars, or arrays under vmap).

    Attributes:
      bid: index into ``AuctionConfig.bid_levels``.
      creative: index of the creative shown.
      channel: index of the channel the bid goes through.
    """

    bid: jax.Array
    creative: jax.Array
    channel: jax.Array


def _impression(key: jax.Array, config: AuctionConfig) -> tuple[jax.Array, jax.Array]:
    k_quality, k_segment = jax.random.split(key)
    low, high = config.quality_range
    quality = jax.random.uniform(k_quality, (), jnp.float32, low, high)
    segment = jax.random.randint(k_segment, (), 0, config.num_segments, jnp.int32)
    return quality, segment


def reset(key: jax.Array, config: AuctionConfig = DEFAULT_AUCTION) -> AuctionState:
    """A new episode: full budget, ``horizon`` auctions, a first impression drawn from ``key``."""
    quality, segment = _impression(key, config)
    return AuctionState(
        budget=jnp.float32(config.budget),
        time_left=jnp.int32(config.horizon),
        quality=quality,
        segment=segment,
    )


def observation(state: AuctionState, config: AuctionConfig = DEFAULT_AUCTION) -> jax.Array:
    """The bidder's view, f32[3 + segments]: budget and time fractions, quality, one-hot segment."""
    return jnp.concatenate(
        [
            jnp.stack(
                [
                    state.budget / jnp.float32(config.budget),
                    state.time_left.astype(jnp.float32) / jnp.float32(config.horizon),
                    state.quality,
                ]
            ),
            jax.nn.one_hot(state.segment, config.num_segments, dtype=jnp.float32),
        ]
    )


def competitor_bids(
    key: jax.Array, channel: jax.Array, config: AuctionConfig = DEFAULT_AUCTION
) -> jax.Array:
    """The competitors' bids in one auction, f32[num_competitors].

    Each is ``competitor_median * exp(competitor_sigma * z) *
    channel_competition[channel]`` with ``z`` standard normal.
    """
    noise = jax.random.normal(key, (config.num_competitors,), jnp.float32)
    factor = jnp.asarray(config.channel_competition, jnp.float32)[channel]
    return jnp.float32(config.competitor_median) * jnp.exp(config.competitor_sigma * noise) * factor


def impression_value(
    state: AuctionState, action: AuctionAction, config: AuctionConfig = DEFAULT_AUCTION
) -> jax.Array:
    """What winning the current impression is worth with this creative and channel."""
    creative_fit = jnp.asarray(config.creative_fit, jnp.float32)[state.segment, action.creative]
    channel_fit = jnp.asarray(config.channel_fit, jnp.float32)[state.segment, action.channel]
    return jnp.float32(config.value_scale) * state.quality * creative_fit * channel_fit


def step(
    state: AuctionState,
    action: AuctionAction,
    key: jax.Array,
    config: AuctionConfig = DEFAULT_AUCTION,
) -> tuple[AuctionState, jax.Array, jax.Array, dict[str, jax.Array]]:
    """One second-price auction.

    The bid is ``bid_levels[action.bid]``, capped at the budget left. The
    bidder wins when its bid is strictly above every competitor's bid (a tie
    loses; a bid of 0 never wins) and then pays the highest competing bid.
    Reward = value won - price paid (0 when it loses). Then the budget drops
    by the price, one auction is used, and the next impression is drawn. An
    episode is done when no auction is left or no money is (the price is below
    the bid and the bid at most the budget, so winning never spends the budget
    down to exactly 0: in practice episodes end at the horizon, with whatever
    money is left unspent). Stepping a done episode changes nothing and gives
    reward 0, so batches of episodes can run in lockstep under ``vmap``.

    Args:
      state: the current :class:`AuctionState`.
      action: an :class:`AuctionAction`.
      key: PRNG key for the competitors' bids and the next impression.
      config: the market; a static, hashable :class:`AuctionConfig`.

    Returns:
      ``(next_state, reward, done, info)``: ``reward`` f32[], ``done`` bool[]
      (of ``next_state``), ``info`` with ``won``, ``price``, ``value`` and
      ``highest_competitor_bid``.
    """
    k_bids, k_next = jax.random.split(key)
    active = (state.time_left > 0) & (state.budget > 0)
    bid = jnp.minimum(jnp.asarray(config.bid_levels, jnp.float32)[action.bid], state.budget)
    highest = jnp.max(competitor_bids(k_bids, action.channel, config))
    won = active & (bid > highest)
    price = jnp.where(won, highest, jnp.float32(0.0))
    value = jnp.where(won, impression_value(state, action, config), jnp.float32(0.0))
    quality, segment = _impression(k_next, config)
    next_state = AuctionState(
        budget=jnp.where(active, state.budget - price, state.budget),
        time_left=jnp.where(active, state.time_left - 1, state.time_left).astype(jnp.int32),
        quality=jnp.where(active, quality, state.quality),
        segment=jnp.where(active, segment, state.segment).astype(jnp.int32),
    )
    done = (next_state.time_left <= 0) | (next_state.budget <= 0)
    info = {"won": won, "price": price, "value": value, "highest_competitor_bid": highest}
    return next_state, value - price, done, info
