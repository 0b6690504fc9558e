"""Reinforcement-learning tasks of the stability suite on standard gymnax environments.

All four are scored on a return (``metric="return"``): the report of
``loss`` is the mean undiscounted return of the last ``RECENT_EPISODES``
episodes finished in any of the parallel environments, a window that starts
filled with the return of uniformly random play (``RANDOM_RETURN``, measured
by ``measure_random_return``). The loss differentiated (the TD or PPO loss)
does not rank methods (``compare_losses=False``).

- ``dqn_cartpole``: DQN on ``CartPole-v1``. Q-network: an MLP with two hidden
  ReLU layers of 64 units. Each step, 4 environments take one epsilon-greedy
  step each (epsilon decays linearly from 1 to 0.05 over the first 25% of
  the run), the 4 transitions go into a ring replay buffer of 10,000, and one
  gradient step is taken on 64 transitions drawn uniformly from it (from the
  first step on). Loss: half the squared TD error against ``r + 0.99 (1 -
  terminated) max_a Q_target(s', a)``, where ``s'`` is the observation the
  action led to (at a time-limit cut the episode is not terminated: its value
  is bootstrapped). The target network is a hard copy every 500 steps. Adam
  at 3e-4; 10,000 steps (40,000 transitions).
- ``dqn_acrobot``: the same DQN on ``Acrobot-v1``, with a target copy every
  100 steps and epsilon decaying over the first 10% of the run. Adam at 1e-3;
  10,000 steps.
- ``ppo_cartpole``: PPO on ``CartPole-v1``. Actor and critic: two MLPs with
  two hidden tanh layers of 64 units (orthogonal initialisation, gains
  sqrt(2), 0.01 for the logits, 1 for the value). A rollout: 8 environments,
  64 steps each, 512 transitions; advantages by GAE (gamma 0.99, lambda 0.95;
  at a time-limit cut the value of the last observation is added to the
  reward), computed with the parameters at rollout time; then 4 epochs of 4
  minibatches of 128, reshuffled every epoch. One step of the task is one
  minibatch update, so a fresh rollout comes every 16 steps. Loss: the
  clipped surrogate (0.2) with advantages normalised per minibatch, plus 0.5
  x the clipped value loss, minus 0.01 x the entropy. Adam (eps 1e-5) at
  1e-3, no gradient clipping of its own; 6,000 steps (375 rollouts).
- ``ppo_acrobot``: the same PPO on ``Acrobot-v1`` (a reward of -1 a step
  until the goal: value targets near -100 at first, a loss that moves with
  every rollout), at 1e-3; 6,000 steps.

Learning rates: a sensible / high / too-high trio for each task, with the
median final return (mean report over the last 10% of the steps) of plain
Adam over 5 seeds at each (random play: 22.6 on CartPole, -499.1 on Acrobot):

================  ==================  ===================  ==================
task              sensible            high                 too high
================  ==================  ===================  ==================
dqn_cartpole      3e-4: 219           3e-3: 151            3e-2: 113
dqn_acrobot       1e-3: -106          1e-2: -161           3e-2: -286
ppo_cartpole      1e-3: 500           1e-2: 500            3e-2: 358
ppo_acrobot       1e-3: -84.5 (3)     1e-2: -85.2          3e-2: -429
================  ==================  ===================  ==================

DQN on CartPole varies from seed to seed (200 to 400 at 3e-4) and is still
rising at the end; at 1e-1 it collapses below random play (11). PPO is
robust up to 1e-2; at 3e-2 some seeds collapse to a deterministic policy
(about 9), and at 5e-2 most do. PPO on Acrobot (3 seeds at 1e-3) holds
at 1e-2 (one seed of 5 falls to -101); at 3e-2, 3 of 5 seeds end at -429 or
worse, with or without a fixed clip (0.1 to 5), and at 1e-1 all 5 stay at
-500 (random play): past 1e-2 no clip helps, so the set takes 1e-3 and 1e-2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tasks import Task

from optax_gradflow.rl import periodic_target_update

GAMMA = 0.99
RECENT_EPISODES = 16  # the report: mean return of this many last finished episodes

# The mean return of uniformly random play, ``measure_random_return(name, 2000, 0)``
# (2000 episodes, seed 0; at most 500 steps an episode).
RANDOM_RETURN = {
    "CartPole-v1": 22.6,
    "Acrobot-v1": -499.1,
}


def measure_random_return(env_name: str, episodes: int = 2000, seed: int = 0) -> float:
    """Mean undiscounted return of ``episodes`` episodes of uniformly random actions.

    Each episode runs from a fresh reset until it terminates or reaches the
    environment's time limit (the first end of each episode counts).
    """
    env, params = gymnax.make(env_name)
    horizon = int(params.max_steps_in_episode)
    num_actions = env.action_space(params).n

    def episode(key):
        k_reset, k_run = jax.random.split(key)
        _, state = env.reset(k_reset, params)

        def body(carry, k):
            state, total, running = carry
            k_act, k_env = jax.random.split(k)
            action = jax.random.randint(k_act, (), 0, num_actions)
            _, state, reward, terminated, truncated, _ = env.step(k_env, state, action, params)
            total = total + jnp.where(running, reward, 0.0)
            running = running & ~(terminated | truncated)
            return (state, total, running), None

        init = (state, jnp.float32(0.0), jnp.bool_(True))
        (_, total, _), _ = jax.lax.scan(body, init, jax.random.split(k_run, horizon))
        return total

    keys = jax.random.split(jax.random.PRNGKey(seed), episodes)
    return float(np.mean(np.asarray(jax.jit(jax.vmap(episode))(keys))))


# ----------------------------------------------------------------------------
# Returns of the finished episodes, carried through a run.


class Returns(NamedTuple):
    """The return of the episode under way in each environment, and of the last finished ones."""

    running: jax.Array  # [envs]
    recent: jax.Array  # [RECENT_EPISODES], a ring
    position: jax.Array  # int32: the next slot of ``recent``

    @staticmethod
    def start(envs: int, random_return: float) -> Returns:
        if envs > RECENT_EPISODES:
            raise ValueError(f"at most {RECENT_EPISODES} environments, got {envs}")
        return Returns(
            jnp.zeros((envs,), jnp.float32),
            jnp.full((RECENT_EPISODES,), random_return, jnp.float32),
            jnp.int32(0),
        )

    def add(self, reward: jax.Array, done: jax.Array) -> Returns:
        """One step of every environment; the episodes that end here enter the ring."""
        running = self.running + reward.astype(jnp.float32)
        ended = done.astype(jnp.int32)
        slots = (self.position + jnp.cumsum(ended) - ended) % RECENT_EPISODES
        # Environments whose episode goes on write out of range: dropped.
        slots = jnp.where(done, slots, RECENT_EPISODES)
        recent = self.recent.at[slots].set(running, mode="drop")
        position = (self.position + ended.sum()) % RECENT_EPISODES
        return Returns(jnp.where(done, 0.0, running), recent, position.astype(jnp.int32))

    def mean(self) -> jax.Array:
        return jnp.mean(self.recent).astype(jnp.float32)


def _vector_env(env_name: str):
    """``(env, params, reset(keys), step(keys, states, actions))``, vectorised over environments."""
    env, params = gymnax.make(env_name)
    reset = jax.vmap(lambda k: env.reset(k, params))
    step = jax.vmap(lambda k, s, a: env.step(k, s, a, params))
    return env, params, reset, step


# ----------------------------------------------------------------------------
# DQN.

DQN_HIDDEN = 64
DQN_ENVS = 4  # environments stepped in parallel per training step
DQN_BATCH = 64  # transitions per gradient step
DQN_CAPACITY = 10_000  # replay buffer (2500 steps of DQN_ENVS transitions)
DQN_EPS_END = 0.05  # epsilon decays linearly from 1 to this, then stays
# Per environment: steps between two hard target copies; the share of the run
# over which epsilon decays.
DQN_CARTPOLE_TARGET_PERIOD = 500
DQN_CARTPOLE_EXPLORE = 0.25
DQN_ACROBOT_TARGET_PERIOD = 100
DQN_ACROBOT_EXPLORE = 0.1


class _QNetwork(nn.Module):
    actions: int

    @nn.compact
    def __call__(self, x):
        for _ in range(2):
            x = nn.relu(nn.Dense(DQN_HIDDEN)(x))
        return nn.Dense(self.actions)(x)


class DQNState(NamedTuple):
    target: Any
    envs: Any
    obs: jax.Array  # [envs, obs]
    buffer: tuple[jax.Array, ...]  # obs, action, reward, next obs, terminated
    position: jax.Array
    size: jax.Array
    returns: Returns


def _dqn_task(
    name: str,
    env_name: str,
    *,
    target_period: int,
    explore: float,
    learning_rate: float,
    steps: int,
    quick_steps: int,
) -> Task:
    env, env_params, env_reset, env_step = _vector_env(env_name)
    num_actions = env.action_space(env_params).n
    obs_size = env.observation_space(env_params).shape[0]
    random_return = RANDOM_RETURN[env_name]
    model = _QNetwork(num_actions)

    def init(key):
        return model.init(key, jnp.zeros((1, obs_size)))

    def init_state(params, key):
        obs, envs = env_reset(jax.random.split(key, DQN_ENVS))
        buffer = (
            jnp.zeros((DQN_CAPACITY, obs_size)),
            jnp.zeros((DQN_CAPACITY,), jnp.int32),
            jnp.zeros((DQN_CAPACITY,)),
            jnp.zeros((DQN_CAPACITY, obs_size)),
            jnp.zeros((DQN_CAPACITY,)),
        )
        # The target network starts as a copy of the online one.
        return DQNState(
            params,
            envs,
            obs,
            buffer,
            jnp.int32(0),
            jnp.int32(0),
            Returns.start(DQN_ENVS, random_return),
        )

    def collect(state, params, key, step, steps):
        """One epsilon-greedy step of every environment, into the buffer; a batch with targets."""
        k_explore, k_use, k_env, k_batch = jax.random.split(key, 4)
        fraction = jnp.asarray(step, jnp.float32) / (explore * steps)
        epsilon = jnp.maximum(DQN_EPS_END, 1.0 - (1.0 - DQN_EPS_END) * fraction)
        greedy = jnp.argmax(model.apply(params, state.obs), -1)
        random_actions = jax.random.randint(k_explore, (DQN_ENVS,), 0, num_actions)
        use = jax.random.uniform(k_use, (DQN_ENVS,)) < epsilon
        actions = jnp.where(use, random_actions, greedy).astype(jnp.int32)
        obs, envs, reward, terminated, truncated, info = env_step(
            jax.random.split(k_env, DQN_ENVS), state.envs, actions
        )
        # The observation the action led to (before the automatic reset).
        rows = (
            state.obs,
            actions,
            reward.astype(jnp.float32),
            info["final_observation"],
            terminated.astype(jnp.float32),
        )
        slots = (state.position + jnp.arange(DQN_ENVS)) % DQN_CAPACITY
        buffer = tuple(d.at[slots].set(x) for d, x in zip(state.buffer, rows, strict=True))
        size = jnp.minimum(state.size + DQN_ENVS, DQN_CAPACITY)
        position = (state.position + DQN_ENVS) % DQN_CAPACITY
        returns = state.returns.add(reward, terminated | truncated)

        picks = jax.random.randint(k_batch, (DQN_BATCH,), 0, size)
        b_obs, b_act, b_rew, b_next, b_term = (d[picks] for d in buffer)
        # A time-limit cut is no terminal state: its value is bootstrapped.
        q_next = jnp.max(model.apply(state.target, b_next), -1)
        y = jax.lax.stop_gradient(b_rew + GAMMA * (1.0 - b_term) * q_next)
        state = DQNState(state.target, envs, obs, buffer, position, size, returns)
        return state, (b_obs, b_act, y, returns.mean())

    def loss(params, batch):
        obs, actions, y, report = batch
        q = jnp.take_along_axis(model.apply(params, obs), actions[:, None], -1)[:, 0]
        return optax.l2_loss(q, y).mean(), report

    def period(steps: int) -> int:
        """Steps between two hard target copies (the same in every run)."""
        del steps
        return target_period

    def after_update(state, params, step, steps):
        # A hard copy after every period: at steps P - 1, 2P - 1, ...
        target, _ = periodic_target_update(params, state.target, step + 1, period(steps))
        return state._replace(target=target)

    return Task(
        name=name,
        description=f"DQN on gymnax {env_name}: MLP {DQN_HIDDEN}x2 ReLU, {DQN_ENVS} envs per "
        f"step, replay {DQN_CAPACITY}, batch {DQN_BATCH}, squared TD loss, gamma {GAMMA}, "
        f"epsilon 1 -> {DQN_EPS_END} over {explore:.0%} of the run, hard target copy "
        f"every {target_period} steps; report = mean return of the last "
        f"{RECENT_EPISODES} episodes",
        init=init,
        loss=loss,
        batch=None,
        base=lambda lr: optax.adam(lr),
        base_name="adam",
        learning_rate=learning_rate,
        steps=steps,
        quick_steps=quick_steps,
        init_state=init_state,
        collect=collect,
        after_update=after_update,
        target_period=period,
        compare_losses=False,
        metric="return",
        random_return=random_return,
    )


def _dqn_cartpole_task() -> Task:
    return _dqn_task(
        "dqn_cartpole",
        "CartPole-v1",
        target_period=DQN_CARTPOLE_TARGET_PERIOD,
        explore=DQN_CARTPOLE_EXPLORE,
        learning_rate=3e-4,
        steps=10_000,
        quick_steps=1000,
    )


def _dqn_acrobot_task() -> Task:
    return _dqn_task(
        "dqn_acrobot",
        "Acrobot-v1",
        target_period=DQN_ACROBOT_TARGET_PERIOD,
        explore=DQN_ACROBOT_EXPLORE,
        learning_rate=1e-3,
        steps=10_000,
        quick_steps=1000,
    )


# ----------------------------------------------------------------------------
# PPO.

PPO_HIDDEN = 64
PPO_ENVS = 8
PPO_HORIZON = 64  # steps of every environment per rollout
PPO_EPOCHS = 4
PPO_MINIBATCHES = 4
PPO_ROLLOUT = PPO_ENVS * PPO_HORIZON
PPO_MINIBATCH = PPO_ROLLOUT // PPO_MINIBATCHES
PPO_LAMBDA = 0.95
PPO_CLIP = 0.2
PPO_VALUE_COEF = 0.5
PPO_ENTROPY_COEF = 0.01


class _ActorCritic(nn.Module):
    actions: int

    @nn.compact
    def __call__(self, x):
        def mlp(h, out, gain):
            for _ in range(2):
                dense = nn.Dense(PPO_HIDDEN, kernel_init=nn.initializers.orthogonal(math.sqrt(2)))
                h = nn.tanh(dense(h))
            return nn.Dense(out, kernel_init=nn.initializers.orthogonal(gain))(h)

        logits = mlp(x, self.actions, 0.01)
        value = mlp(x, 1, 1.0)[..., 0]
        return logits, value


class PPOState(NamedTuple):
    envs: Any
    obs: jax.Array  # [envs, obs]
    # The last rollout, flattened: obs, action, log-probability, value, advantage, value target.
    rollout: tuple[jax.Array, ...]
    order: jax.Array  # [PPO_EPOCHS, PPO_ROLLOUT]: the rollout's order in each epoch
    returns: Returns


def _ppo_task(name: str, env_name: str, learning_rate: float, steps: int) -> Task:
    env, env_params, env_reset, env_step = _vector_env(env_name)
    num_actions = env.action_space(env_params).n
    obs_size = env.observation_space(env_params).shape[0]
    random_return = RANDOM_RETURN[env_name]
    model = _ActorCritic(num_actions)
    updates_per_rollout = PPO_EPOCHS * PPO_MINIBATCHES

    def init(key):
        return model.init(key, jnp.zeros((1, obs_size)))

    def init_state(params, key):
        del params
        obs, envs = env_reset(jax.random.split(key, PPO_ENVS))
        rollout = (
            jnp.zeros((PPO_ROLLOUT, obs_size)),
            jnp.zeros((PPO_ROLLOUT,), jnp.int32),
            *(jnp.zeros((PPO_ROLLOUT,)) for _ in range(4)),
        )
        order = jnp.zeros((PPO_EPOCHS, PPO_ROLLOUT), jnp.int32)
        return PPOState(envs, obs, rollout, order, Returns.start(PPO_ENVS, random_return))

    def rollout(state, params, key):
        """``PPO_HORIZON`` steps of every environment with the current policy; GAE."""
        k_run, k_shuffle = jax.random.split(key)

        def env_step_fn(carry, k):
            envs, obs, returns = carry
            k_act, k_env = jax.random.split(k)
            logits, value = model.apply(params, obs)
            action = jax.random.categorical(k_act, logits).astype(jnp.int32)
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], -1)[:, 0]
            next_obs, envs, reward, terminated, truncated, info = env_step(
                jax.random.split(k_env, PPO_ENVS), envs, action
            )
            reward = reward.astype(jnp.float32)
            done = terminated | truncated
            returns = returns.add(reward, done)
            # A time-limit cut is no terminal state: the value of where it stopped
            # goes into the reward (the trace is cut there all the same).
            _, final_value = model.apply(params, info["final_observation"])
            cut = truncated & ~terminated
            reward = reward + jnp.where(cut, GAMMA * final_value, 0.0)
            out = (obs, action, logp, value, reward, done.astype(jnp.float32))
            return (envs, next_obs, returns), out

        carry = (state.envs, state.obs, state.returns)
        (envs, obs, returns), steps = jax.lax.scan(
            env_step_fn, carry, jax.random.split(k_run, PPO_HORIZON)
        )
        t_obs, t_action, t_logp, t_value, t_reward, t_done = steps
        _, last_value = model.apply(params, obs)

        def gae_step(carry, x):
            advantage, next_value = carry
            reward, value, done = x
            delta = reward + GAMMA * (1.0 - done) * next_value - value
            advantage = delta + GAMMA * PPO_LAMBDA * (1.0 - done) * advantage
            return (advantage, value), advantage

        _, advantage = jax.lax.scan(
            gae_step,
            (jnp.zeros((PPO_ENVS,)), last_value),
            (t_reward, t_value, t_done),
            reverse=True,
        )
        flat = (t_obs, t_action, t_logp, t_value, advantage, advantage + t_value)
        flat = tuple(jax.lax.stop_gradient(x.reshape((PPO_ROLLOUT, *x.shape[2:]))) for x in flat)
        order = jax.vmap(lambda k: jax.random.permutation(k, PPO_ROLLOUT))(
            jax.random.split(k_shuffle, PPO_EPOCHS)
        )
        return PPOState(envs, obs, flat, order.astype(jnp.int32), returns)

    def collect(state, params, key, step, steps):
        """A fresh rollout every ``PPO_EPOCHS * PPO_MINIBATCHES`` steps; this step's minibatch."""
        del steps
        phase = step % updates_per_rollout
        state = jax.lax.cond(phase == 0, rollout, lambda s, p, k: s, state, params, key)
        epoch, index = phase // PPO_MINIBATCHES, phase % PPO_MINIBATCHES
        picks = jax.lax.dynamic_slice(
            state.order, (epoch, index * PPO_MINIBATCH), (1, PPO_MINIBATCH)
        )[0]
        batch = tuple(x[picks] for x in state.rollout)
        return state, (*batch, state.returns.mean())

    def loss(params, batch):
        obs, action, old_logp, old_value, advantage, target, report = batch
        logits, value = model.apply(params, obs)
        log_probs = jax.nn.log_softmax(logits)
        logp = jnp.take_along_axis(log_probs, action[:, None], -1)[:, 0]
        ratio = jnp.exp(logp - old_logp)
        advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
        surrogate = jnp.minimum(
            ratio * advantage, jnp.clip(ratio, 1.0 - PPO_CLIP, 1.0 + PPO_CLIP) * advantage
        )
        clipped_value = old_value + jnp.clip(value - old_value, -PPO_CLIP, PPO_CLIP)
        value_loss = 0.5 * jnp.maximum((value - target) ** 2, (clipped_value - target) ** 2)
        entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, -1)
        total = (
            -surrogate.mean()
            + PPO_VALUE_COEF * value_loss.mean()
            - PPO_ENTROPY_COEF * entropy.mean()
        )
        return total, report

    return Task(
        name=name,
        description=f"PPO on gymnax {env_name}: actor and critic MLPs {PPO_HIDDEN}x2 tanh, "
        f"{PPO_ENVS} envs x {PPO_HORIZON} steps per rollout, GAE (gamma {GAMMA}, lambda "
        f"{PPO_LAMBDA}), {PPO_EPOCHS} epochs x {PPO_MINIBATCHES} minibatches of "
        f"{PPO_MINIBATCH}, clip {PPO_CLIP}, value coef {PPO_VALUE_COEF}, entropy coef "
        f"{PPO_ENTROPY_COEF}; one step = one minibatch update; report = mean return of the "
        f"last {RECENT_EPISODES} episodes",
        init=init,
        loss=loss,
        batch=None,
        base=lambda lr: optax.adam(lr, eps=1e-5),
        base_name="adam(eps=1e-5)",
        learning_rate=learning_rate,
        steps=steps,
        quick_steps=steps // 10,
        init_state=init_state,
        collect=collect,
        compare_losses=False,
        metric="return",
        random_return=random_return,
    )


def _ppo_cartpole_task() -> Task:
    return _ppo_task("ppo_cartpole", "CartPole-v1", learning_rate=1e-3, steps=6000)


def _ppo_acrobot_task() -> Task:
    return _ppo_task("ppo_acrobot", "Acrobot-v1", learning_rate=1e-3, steps=6000)


def gym_tasks() -> dict[str, Callable[[], Task]]:
    """The gymnax tasks, by name, as ``tasks.TASKS``."""
    return {
        "dqn_cartpole": _dqn_cartpole_task,
        "dqn_acrobot": _dqn_acrobot_task,
        "ppo_cartpole": _ppo_cartpole_task,
        "ppo_acrobot": _ppo_acrobot_task,
    }
