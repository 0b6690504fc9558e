"""The training tasks of the stability suite's selection set, each generated from fixed seeds.

``sets.py`` runs each at two or three learning rates; ``tasks_more.py`` holds
the validation set's tasks, ``gym_tasks.py`` the gymnax RL tasks.

Unstable on purpose (``stable=False``):

- ``rnn_adding``: a vanilla tanh RNN on the adding problem (Hochreiter &
  Schmidhuber 1997) over long sequences, SGD with momentum;
- ``deep_mlp``: a deep ReLU MLP without normalisation at a high learning rate;
- ``heavy_tail``: regression whose targets carry Student-t noise and, in a few
  batches, 100x outliers; the loss reported is the error against the clean
  targets;
- ``transformer``: a tiny post-LN transformer language model on an induction
  task (a random half sequence, repeated with 25% of its tokens resampled),
  Adam at a learning rate at the edge of stability, no warm-up;
- ``fp16``: an MLP computed in float16 (float32 master weights) with a
  sum-reduced loss whose unscaled gradients overflow float16;
- ``rl_auction``: a DQN-style bidder (value + advantage heads) on the auction
  simulator of ``examples/auction.py``, with a hard target-network copy every
  quarter of the run (every 1000 steps in the full suite): each copy moves
  the TD targets at once, and the TD loss and the gradient norm jump. Its
  loss, the TD loss, does not rank methods (``compare_losses=False``): the
  task counts for divergences and for the stabilizer's emergencies per copy.

Stable (``stable=True``), trained the standard way, where a stabilizer should
change nothing:

- ``transformer_preln``: the induction task with a pre-LN transformer, Adam
  at 1e-3 with a linear warm-up;
- ``mlp_layernorm``: an MLP with LayerNorm on a noisy-label teacher
  classification problem, Adam at 1e-3.

A task is ``loss(params, batch) -> (loss to differentiate, loss to report)``
with ``batch(key)`` drawing one batch; a task that needs more than that (the
RL task: a target network, environments and a replay buffer) carries a state
through the run with ``init_state`` / ``collect`` / ``after_update``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

# The RL task's environment is the examples' auction simulator (the driver
# puts the repository root on sys.path).
from examples import auction
from optax_gradflow.rl import periodic_target_update


@dataclasses.dataclass(frozen=True)
class Task:
    """A training problem.

    ``loss(params, batch)`` returns ``(loss to differentiate, loss to report)``,
    both float32 scalars; ``batch(key)`` draws one batch.

    A task may carry a state through the run (a target network, environments,
    a replay buffer): ``init_state(params, key)`` makes it from the initial
    parameters; each step ``collect(state, params, key, step, steps)`` returns
    ``(state, batch)`` in place of ``batch(key)`` (``steps`` is the run's
    length, a Python int), and after the update ``after_update(state, params,
    step, steps)`` returns the next state. All three are traced under ``jit``.

    ``stable``: the task trains well without clipping (a stabilizer should
    change nothing). ``loss_scaling``: the stabilizer methods turn loss scaling
    on here (float16 gradients). ``target_period(steps)``: steps between hard
    target-network copies in a run of ``steps`` steps (the RL task), for
    "emergencies per target copy".
    ``compare_losses``: whether a lower final loss means a better run; the
    tables of final-loss ratios and "good runs" leave the other tasks out.
    ``learning_rate``: the rate given to ``base`` (and to the stabilizer);
    nothing else in a task may depend on it: the suite's entries are copies
    that differ in ``learning_rate`` and ``name`` only (``sets.py``).
    """

    name: str
    description: str
    init: Callable[[jax.Array], Any]
    loss: Callable[[Any, Any], tuple[jax.Array, jax.Array]]
    batch: Callable[[jax.Array], Any] | None
    base: Callable[[float], optax.GradientTransformation]
    base_name: str
    learning_rate: float
    steps: int
    quick_steps: int
    stable: bool = False
    loss_scaling: bool = False
    init_state: Callable[[Any, jax.Array], Any] | None = None
    collect: Callable[[Any, Any, jax.Array, jax.Array, int], tuple[Any, Any]] | None = None
    after_update: Callable[[Any, Any, jax.Array, int], Any] | None = None
    target_period: Callable[[int], int] | None = None
    compare_losses: bool = True
    # What the per-step report is: "loss" (lower is better) or "return" (the
    # mean undiscounted return of the episodes finished lately: higher is
    # better; RL tasks are scored on it, never on their TD or PPO loss).
    metric: str = "loss"
    # The mean return of uniformly random play (metric "return"): the zero of
    # the normalised score (R - R_random) / (R_best - R_random).
    random_return: float | None = None

    def __post_init__(self):
        if self.batch is None and self.collect is None:
            raise ValueError(f"task {self.name!r} needs batch or collect")
        if self.metric not in ("loss", "return"):
            raise ValueError(f"task {self.name!r}: metric must be 'loss' or 'return'")


# ----------------------------------------------------------------------------
# RNN on the adding problem.

RNN_T = 60
RNN_HIDDEN = 64
RNN_BATCH = 32


class _AddingRNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        cell = nn.SimpleCell(
            RNN_HIDDEN, recurrent_kernel_init=nn.initializers.orthogonal(scale=1.0)
        )
        h = nn.RNN(cell)(x)
        return nn.Dense(1)(h[:, -1])[:, 0]


def adding_problem(kv, k1, k2, batch: int, length: int):
    """The adding problem (Hochreiter & Schmidhuber 1997): ``batch`` sequences
    of ``length`` (value, marker) pairs, one marker in each half; the target
    is the sum of the two marked values. ``kv`` draws the values, ``k1`` and
    ``k2`` the markers."""
    values = jax.random.uniform(kv, (batch, length))
    first = jax.random.randint(k1, (batch,), 0, length // 2)
    second = jax.random.randint(k2, (batch,), length // 2, length)
    pos = jnp.arange(length)
    marks = ((pos == first[:, None]) | (pos == second[:, None])).astype(jnp.float32)
    return jnp.stack([values, marks], axis=-1), jnp.sum(values * marks, axis=1)


def _adding_batch(key):
    kv, km = jax.random.split(key)
    k1, k2 = jax.random.split(km)
    return adding_problem(kv, k1, k2, RNN_BATCH, RNN_T)


def _rnn_task() -> Task:
    model = _AddingRNN()

    def init(key):
        return model.init(key, jnp.zeros((1, RNN_T, 2)))

    def loss(params, batch):
        x, y = batch
        mse = jnp.mean((model.apply(params, x) - y) ** 2)
        return mse, mse

    return Task(
        name="rnn_adding",
        description=f"tanh RNN, {RNN_HIDDEN} units, adding problem T={RNN_T}, SGD momentum 0.9",
        init=init,
        loss=loss,
        batch=_adding_batch,
        base=lambda lr: optax.sgd(lr, momentum=0.9),
        base_name="sgd(momentum=0.9)",
        learning_rate=0.05,
        steps=1500,
        quick_steps=150,
    )


# ----------------------------------------------------------------------------
# Deep MLP without normalisation.

MLP_DEPTH = 16
MLP_WIDTH = 64
MLP_IN = 32
MLP_BATCH = 64


class _DeepMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(MLP_DEPTH - 1):
            x = nn.relu(nn.Dense(MLP_WIDTH, kernel_init=nn.initializers.he_normal())(x))
        return nn.Dense(1)(x)[:, 0]


def _teacher(key, x, width=32):
    k1, k2 = jax.random.split(key)
    w1 = jax.random.normal(k1, (x.shape[-1], width)) / math.sqrt(x.shape[-1])
    w2 = jax.random.normal(k2, (width,)) / math.sqrt(width)
    return jnp.tanh(x @ w1) @ w2


TEACHER_KEY = jax.random.PRNGKey(1234)


def _deep_mlp_task() -> Task:
    model = _DeepMLP()

    def init(key):
        return model.init(key, jnp.zeros((1, MLP_IN)))

    def batch(key):
        x = jax.random.normal(key, (MLP_BATCH, MLP_IN))
        return x, _teacher(TEACHER_KEY, x)

    def loss(params, batch):
        x, y = batch
        mse = jnp.mean((model.apply(params, x) - y) ** 2)
        return mse, mse

    return Task(
        name="deep_mlp",
        description=f"{MLP_DEPTH}-layer ReLU MLP, width {MLP_WIDTH}, no normalisation, "
        "teacher regression, SGD momentum 0.9",
        init=init,
        loss=loss,
        batch=batch,
        base=lambda lr: optax.sgd(lr, momentum=0.9),
        base_name="sgd(momentum=0.9)",
        learning_rate=0.05,
        steps=1500,
        quick_steps=150,
    )


# ----------------------------------------------------------------------------
# Heavy-tailed regression.

HT_IN = 16
HT_BATCH = 32
HT_DF = 1.5
HT_OUTLIER_P = 0.02
HT_OUTLIER_SCALE = 100.0


class _SmallMLP(nn.Module):
    width: int = 64

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(self.width)(x))
        return nn.Dense(1)(x)[:, 0]


def _heavy_tail_task() -> Task:
    model = _SmallMLP()

    def init(key):
        return model.init(key, jnp.zeros((1, HT_IN)))

    def batch(key):
        kx, kn, ko = jax.random.split(key, 3)
        x = jax.random.normal(kx, (HT_BATCH, HT_IN))
        clean = _teacher(TEACHER_KEY, x)
        noise = 0.1 * jax.random.t(kn, HT_DF, (HT_BATCH,))
        # A few batches carry targets off by 100x their scale.
        outlier = jax.random.bernoulli(ko, HT_OUTLIER_P)
        noisy = clean + noise + jnp.where(outlier, HT_OUTLIER_SCALE * jnp.abs(clean).mean(), 0.0)
        return x, noisy, clean

    def loss(params, batch):
        x, noisy, clean = batch
        pred = model.apply(params, x)
        return jnp.mean((pred - noisy) ** 2), jnp.mean((pred - clean) ** 2)

    return Task(
        name="heavy_tail",
        description=f"MLP regression, Student-t (df={HT_DF}) target noise and "
        f"{HT_OUTLIER_SCALE:g}x outlier batches (p={HT_OUTLIER_P}); loss vs clean targets; SGD",
        init=init,
        loss=loss,
        batch=batch,
        base=lambda lr: optax.sgd(lr),
        base_name="sgd",
        learning_rate=0.05,
        steps=2000,
        quick_steps=200,
    )


# ----------------------------------------------------------------------------
# Tiny transformer language models on an induction task.

LM_VOCAB = 16
LM_LEN = 24
LM_DIM = 32
LM_HEADS = 2
LM_LAYERS = 2
LM_BATCH = 16
LM_NOISE = 0.25


def _induction_batch(key):
    """A random first half, repeated: the second half is predictable only by attending back.

    Each repeated token is replaced by a random one with probability
    ``LM_NOISE``, so that the loss has a floor well above zero. Returns
    ``(LM_BATCH, LM_LEN + 1)`` tokens (inputs and shifted labels).
    """
    k_half, k_noise, k_mask = jax.random.split(key, 3)
    half = jax.random.randint(k_half, (LM_BATCH, LM_LEN // 2), 0, LM_VOCAB)
    noise = jax.random.randint(k_noise, half.shape, 0, LM_VOCAB)
    repeat = jnp.where(jax.random.bernoulli(k_mask, LM_NOISE, half.shape), noise, half)
    return jnp.concatenate([half, repeat, half[:, :1]], axis=1)


def _lm_loss(model):
    def loss(params, tokens):
        logits = model.apply(params, tokens[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        # Only the repeated half is predictable; the first half is uniform noise.
        ce = ce[:, LM_LEN // 2 - 1 :].mean()
        return ce, ce

    return loss


class _PostLNBlock(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        # Post-LN, as in the original transformer: the variant that needs warm-up.
        h = nn.MultiHeadDotProductAttention(num_heads=LM_HEADS, deterministic=True)(x, x, mask=mask)
        x = nn.LayerNorm()(x + h)
        h = nn.Dense(LM_DIM)(nn.gelu(nn.Dense(4 * LM_DIM)(x)))
        return nn.LayerNorm()(x + h)


class _PreLNBlock(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        # Pre-LN (GPT-2 and later): the residual stream itself is never normalised.
        y = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=LM_HEADS, deterministic=True)(
            y, y, mask=mask
        )
        y = nn.LayerNorm()(x)
        return x + nn.Dense(LM_DIM)(nn.gelu(nn.Dense(4 * LM_DIM)(y)))


class _TinyLM(nn.Module):
    pre_ln: bool = False

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(LM_VOCAB, LM_DIM)(tokens)
        pos = self.param("pos", nn.initializers.normal(0.02), (LM_LEN, LM_DIM))
        x = x + pos[: tokens.shape[1]]
        mask = nn.make_causal_mask(tokens)
        block = _PreLNBlock if self.pre_ln else _PostLNBlock
        for _ in range(LM_LAYERS):
            x = block()(x, mask)
        if self.pre_ln:
            x = nn.LayerNorm()(x)
        return nn.Dense(LM_VOCAB)(x)


def _transformer_task() -> Task:
    model = _TinyLM()

    def init(key):
        return model.init(key, jnp.zeros((1, LM_LEN), jnp.int32))

    return Task(
        name="transformer",
        description=f"post-LN transformer LM, {LM_LAYERS} layers, d={LM_DIM}, "
        "induction task (random half, repeated with 25% noise), Adam, no warm-up",
        init=init,
        loss=_lm_loss(model),
        batch=_induction_batch,
        base=lambda lr: optax.adam(lr),
        base_name="adam",
        learning_rate=1.4e-2,
        steps=1000,
        quick_steps=100,
    )


PRELN_WARMUP = 100


def _transformer_preln_task() -> Task:
    model = _TinyLM(pre_ln=True)

    def init(key):
        return model.init(key, jnp.zeros((1, LM_LEN), jnp.int32))

    return Task(
        name="transformer_preln",
        description=f"pre-LN transformer LM, {LM_LAYERS} layers, d={LM_DIM}, the same "
        f"induction task, Adam with a {PRELN_WARMUP}-step linear warm-up",
        init=init,
        loss=_lm_loss(model),
        batch=_induction_batch,
        # The stabilizer gets the peak learning rate (the schedule starts at 0).
        base=lambda lr: optax.adam(optax.linear_schedule(0.0, lr, PRELN_WARMUP)),
        base_name=f"adam, linear warm-up {PRELN_WARMUP} steps",
        learning_rate=1e-3,
        steps=1000,
        quick_steps=100,
        stable=True,
    )


# ----------------------------------------------------------------------------
# MLP with LayerNorm on a noisy-label classification problem.

LN_IN = 32
LN_WIDTH = 128
LN_DEPTH = 4
LN_CLASSES = 10
LN_BATCH = 128
LN_LABEL_NOISE = 0.1


class _LayerNormMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(LN_DEPTH):
            x = nn.relu(nn.LayerNorm()(nn.Dense(LN_WIDTH)(x)))
        return nn.Dense(LN_CLASSES)(x)


def _mlp_layernorm_task() -> Task:
    model = _LayerNormMLP()
    k1, k2 = jax.random.split(jax.random.PRNGKey(4321))
    w1 = jax.random.normal(k1, (LN_IN, 64)) / math.sqrt(LN_IN)
    w2 = jax.random.normal(k2, (64, LN_CLASSES)) / math.sqrt(64)

    def init(key):
        return model.init(key, jnp.zeros((1, LN_IN)))

    def batch(key):
        kx, kn, kl = jax.random.split(key, 3)
        x = jax.random.normal(kx, (LN_BATCH, LN_IN))
        labels = jnp.argmax(jnp.tanh(x @ w1) @ w2, axis=-1)
        # A share of the labels resampled uniformly: a loss floor above zero.
        noisy = jax.random.bernoulli(kn, LN_LABEL_NOISE, (LN_BATCH,))
        labels = jnp.where(noisy, jax.random.randint(kl, (LN_BATCH,), 0, LN_CLASSES), labels)
        return x, labels

    def loss(params, batch):
        x, labels = batch
        ce = optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), labels).mean()
        return ce, ce

    return Task(
        name="mlp_layernorm",
        description=f"{LN_DEPTH}-layer MLP with LayerNorm, width {LN_WIDTH}, teacher "
        f"classification ({LN_CLASSES} classes, {LN_LABEL_NOISE:.0%} label noise), Adam",
        init=init,
        loss=loss,
        batch=batch,
        base=lambda lr: optax.adam(lr),
        base_name="adam",
        learning_rate=1e-3,
        steps=1500,
        quick_steps=150,
        stable=True,
    )


# ----------------------------------------------------------------------------
# Float16 compute that overflows without loss scaling.

FP_IN = 64
FP_WIDTH = 128
FP_OUT = 32
FP_BATCH = 256
FP_INPUT_SCALE = 30.0


class _Fp16MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(3):
            x = nn.relu(nn.Dense(FP_WIDTH, dtype=jnp.float16)(x))
        return nn.Dense(FP_OUT, dtype=jnp.float16)(x)


def _fp16_task() -> Task:
    model = _Fp16MLP()

    def init(key):
        return model.init(key, jnp.zeros((1, FP_IN), jnp.float16))

    def batch(key):
        x = jax.random.normal(key, (FP_BATCH, FP_IN))
        w = jax.random.normal(jax.random.PRNGKey(99), (FP_IN, FP_OUT)) / math.sqrt(FP_IN)
        # Unnormalised features (as raw sensor or pixel values often are).
        return (FP_INPUT_SCALE * x).astype(jnp.float16), x @ w

    def loss(params, batch):
        x, y = batch
        # float32 master weights, float16 compute: the Dense layers cast.
        pred = model.apply(params, x).astype(jnp.float32)
        sq = (pred - y) ** 2
        # A sum over the batch (a log-likelihood); reported as a relative MSE.
        return 0.5 * jnp.sum(sq), jnp.mean(sq) / jnp.mean(y**2)

    return Task(
        name="fp16",
        description=f"float16-compute MLP (float32 master weights), sum-reduced loss over "
        f"batch {FP_BATCH}, unnormalised inputs (scale {FP_INPUT_SCALE:g}): unscaled gradients "
        "overflow float16; the stabilizer methods opt in to loss scaling here "
        "(loss_scaling=True)",
        init=init,
        loss=loss,
        batch=batch,
        base=lambda lr: optax.adam(lr),
        base_name="adam",
        learning_rate=1e-3,
        steps=800,
        quick_steps=80,
        loss_scaling=True,
    )


# ----------------------------------------------------------------------------
# DQN-style bidder on the auction simulator, with hard target-network copies.

# Notebook 03's market: a budget that binds only at the margin.
RL_MARKET = dataclasses.replace(auction.DEFAULT_AUCTION, budget=25.0)
RL_OBS = RL_MARKET.observation_size
RL_BRANCHES = (RL_MARKET.num_bids, RL_MARKET.num_creatives, RL_MARKET.num_channels)
RL_HIDDEN = 64
RL_ENVS = 32  # auctions stepped in parallel per training step
RL_BATCH = 128  # transitions per gradient step
RL_CAPACITY = 8192  # replay buffer (256 steps of RL_ENVS transitions)
RL_COPIES = 3  # target copies during a run: every steps // (RL_COPIES + 1) steps
RL_EXPLORE = 0.3  # epsilon decays from 1 to 0.05 over this share of the run


class _MLP(nn.Module):
    outputs: int

    @nn.compact
    def __call__(self, x):
        for _ in range(2):
            x = nn.relu(nn.Dense(RL_HIDDEN)(x))
        return nn.Dense(self.outputs)(x)


class _BranchingQ(nn.Module):
    """Notebook 03's factored Q-function in one network: ``Q_d = V + A_d - mean A_d``.

    A value MLP and one advantage MLP per decision (bid, creative, channel).
    """

    @nn.compact
    def __call__(self, obs):
        value = _MLP(1, name="value")(obs)
        out = []
        for name, n in zip(("bid", "creative", "channel"), RL_BRANCHES, strict=True):
            advantage = _MLP(n, name=name)(obs)
            out.append(value + advantage - advantage.mean(-1, keepdims=True))
        return tuple(out)


def rl_target_period(steps: int) -> int:
    """Steps between two target copies in a run of ``steps`` steps (1000 for 4000)."""
    return max(1, steps // (RL_COPIES + 1))


def _rl_auction_task() -> Task:
    model = _BranchingQ()
    observe = jax.vmap(lambda s: auction.observation(s, RL_MARKET))
    env_step = jax.vmap(lambda s, a, k: auction.step(s, a, k, RL_MARKET))
    env_reset = jax.vmap(lambda k: auction.reset(k, RL_MARKET))

    def init(key):
        return model.init(key, jnp.zeros((1, RL_OBS)))

    def init_state(params, key):
        buffer = (
            jnp.zeros((RL_CAPACITY, RL_OBS)),
            jnp.zeros((RL_CAPACITY, len(RL_BRANCHES)), jnp.int32),
            jnp.zeros((RL_CAPACITY,)),
            jnp.zeros((RL_CAPACITY, RL_OBS)),
            jnp.zeros((RL_CAPACITY,)),
        )
        envs = env_reset(jax.random.split(key, RL_ENVS))
        # The target network starts as a copy of the online one.
        return params, envs, buffer, jnp.int32(0), jnp.int32(0)

    def collect(state, params, key, step, steps):
        """One epsilon-greedy step of every auction, into the buffer; a batch with its targets."""
        target, envs, buffer, position, size = state
        k_explore, k_use, k_env, k_reset, k_batch = jax.random.split(key, 5)
        epsilon = jnp.maximum(0.05, 1.0 - step / (RL_EXPLORE * steps))
        obs = observe(envs)
        q = model.apply(params, obs)
        choices = []
        for i, (qb, kx, ku) in enumerate(
            zip(
                q,
                jax.random.split(k_explore, len(q)),
                jax.random.split(k_use, len(q)),
                strict=True,
            )
        ):
            greedy = jnp.argmax(qb, -1)
            explore = jax.random.randint(kx, greedy.shape, 0, RL_BRANCHES[i])
            use = jax.random.uniform(ku, greedy.shape) < epsilon
            choices.append(jnp.where(use, explore, greedy).astype(jnp.int32))
        actions = auction.AuctionAction(*choices)
        stepped, reward, done, _ = env_step(envs, actions, jax.random.split(k_env, RL_ENVS))
        next_obs = observe(stepped)
        fresh = env_reset(jax.random.split(k_reset, RL_ENVS))
        envs = jax.tree.map(lambda f, s: jnp.where(done, f, s), fresh, stepped)

        rows = (obs, jnp.stack(choices, -1), reward, next_obs, done.astype(jnp.float32))
        slots = (position + jnp.arange(RL_ENVS)) % RL_CAPACITY
        buffer = jax.tree.map(lambda d, x: d.at[slots].set(x), buffer, rows)
        size = jnp.minimum(size + RL_ENVS, RL_CAPACITY)
        position = (position + RL_ENVS) % RL_CAPACITY
        rows = jax.random.randint(k_batch, (RL_BATCH,), 0, size)
        b_obs, b_act, b_rew, b_next, b_done = jax.tree.map(lambda d: d[rows], buffer)

        # Double-DQN targets averaged over the branches, no discount (episodes
        # are 50 auctions and the observation holds the time left), as in
        # notebook 03: the online network picks, the target network values.
        q_next = model.apply(params, b_next)
        q_target = model.apply(target, b_next)
        best = [
            jnp.take_along_axis(qt, jnp.argmax(qo, -1)[:, None], -1)[:, 0]
            for qo, qt in zip(q_next, q_target, strict=True)
        ]
        y = jax.lax.stop_gradient(b_rew + (1.0 - b_done) * jnp.mean(jnp.stack(best), 0))
        return (target, envs, buffer, position, size), (b_obs, b_act, y)

    def loss(params, batch):
        obs, actions, y = batch
        q = model.apply(params, obs)
        td = [
            optax.huber_loss(jnp.take_along_axis(qb, actions[:, i : i + 1], -1)[:, 0], y).mean()
            for i, qb in enumerate(q)
        ]
        td = sum(td) / len(td)
        return td, td

    def after_update(state, params, step, steps):
        target, *rest = state
        # A hard copy after every period: at steps P - 1, 2P - 1, ...
        target, _ = periodic_target_update(params, target, step + 1, rl_target_period(steps))
        return (target, *rest)

    return Task(
        name="rl_auction",
        description=f"DQN bidder on the examples/auction.py auction (notebook 03, budget "
        f"{RL_MARKET.budget:g}): value + 3 advantage MLPs ({RL_HIDDEN}x2), double-DQN Huber TD "
        f"loss, {RL_ENVS} auctions per step, replay {RL_CAPACITY}, batch {RL_BATCH}, hard "
        f"target copy every steps/{RL_COPIES + 1} steps (1000 in the full suite); loss = TD loss",
        init=init,
        loss=loss,
        batch=None,
        base=lambda lr: optax.adam(lr),
        base_name="adam",
        learning_rate=1e-3,
        steps=4000,
        quick_steps=400,
        init_state=init_state,
        collect=collect,
        after_update=after_update,
        target_period=rl_target_period,
        # A lower TD loss is not a better agent (a method that learns more
        # slowly moves its targets less at each copy): no loss ratios here.
        compare_losses=False,
    )


TASKS: dict[str, Callable[[], Task]] = {
    "rnn_adding": _rnn_task,
    "deep_mlp": _deep_mlp_task,
    "heavy_tail": _heavy_tail_task,
    "transformer": _transformer_task,
    "fp16": _fp16_task,
    "transformer_preln": _transformer_preln_task,
    "mlp_layernorm": _mlp_layernorm_task,
    "rl_auction": _rl_auction_task,
}
