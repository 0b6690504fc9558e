"""Does the stabilizer keep unstable training runs alive, untuned?

Five training tasks that are unstable on purpose, each run over several seeds
with every clipping method:

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
  sum-reduced loss whose unscaled gradients overflow float16.

Methods: no clipping; ``optax.clip_by_global_norm`` at fixed thresholds; AGC
(``optax.adaptive_grad_clip``); ZClip and AutoClip, reimplemented below from
their papers as optax transformations; on the fp16 task the usual dynamic loss
scaling; the stabilizer with its defaults (``stabilized(base(lr), lr)``) and in
data mode (``stabilized(base(lr))``). ``--rules`` adds the stabilizer under
each threshold adaptation rule, in both modes.

Everything is generated in the script from fixed seeds. One run of a method is
``jax.jit`` of a ``lax.scan`` over the steps, mapped with ``lax.map`` over the
seeds (and the thresholds of the fixed clips), so each method compiles once
per task.

Metrics per run: diverged (a non-finite loss, or a final loss above 10x the
initial one), final loss (mean of the last 10% of steps; the table quotes the
median over seeds), spikes (steps whose loss exceeds 3x the median of the
previous 50 steps).

Usage::

    python benchmarks/stability.py                  # the full suite
    python benchmarks/stability.py --quick          # a smoke run (CI)
    python benchmarks/stability.py --rules          # also compare adaptation rules
    python benchmarks/stability.py --trace deep_mlp # the stabilizer's state along one run
    python benchmarks/stability.py --from-json      # re-derive tables and plot, no training
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import optax_gradflow  # noqa: E402

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "stability.json"
DEFAULT_PLOT = ROOT / "benchmarks" / "results" / "stability.png"

FIXED_THRESHOLDS = (0.1, 0.5, 1.0, 5.0)
AGC_CLIPPING = 0.05
DIVERGENCE_FACTOR = 10.0
SPIKE_FACTOR = 3.0
SPIKE_WINDOW = 50
TARGET_RATIO = 1.05
SEEDS = 5  # seeds of the full suite


# ----------------------------------------------------------------------------
# Baselines written from their papers.


class ZClipState(NamedTuple):
    """State of :func:`zclip`: step count, warm-up sums, EMA mean and variance."""

    count: jax.Array
    warmup_sum: jax.Array
    warmup_sum_sq: jax.Array
    mean: jax.Array
    var: jax.Array


def zclip(
    alpha: float = 0.97, z_threshold: float = 2.5, warmup_steps: int = 25, eps: float = 1e-6
) -> optax.GradientTransformation:
    """ZClip (Kumar et al. 2025, https://arxiv.org/abs/2504.02507), z-score mode.

    The first ``warmup_steps`` norms are not clipped; their mean and population
    variance initialise the statistics. Afterwards a norm ``g`` with
    ``z = (g - mean) / std > z_threshold`` is clipped to
    ``mean + z_threshold**2 / z * std`` (the paper's reciprocal rule), and the
    EMAs (rate ``1 - alpha``) are updated with the norm after clipping.
    """

    def init_fn(params):
        del params
        zero = jnp.zeros((), jnp.float32)
        return ZClipState(jnp.zeros((), jnp.int32), zero, zero, zero, zero)

    def update_fn(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        in_warmup = state.count < warmup_steps
        std = jnp.sqrt(state.var)
        z = (norm - state.mean) / (std + eps)
        spike = ~in_warmup & (z > z_threshold)
        target = state.mean + (z_threshold**2 / jnp.maximum(z, eps)) * std
        clipped_norm = jnp.where(spike, target, norm)
        factor = jnp.where(spike, target / norm, 1.0)
        updates = jax.tree.map(lambda g: (g * factor).astype(g.dtype), updates)

        warm_sum = state.warmup_sum + jnp.where(in_warmup, norm, 0.0)
        warm_sq = state.warmup_sum_sq + jnp.where(in_warmup, norm**2, 0.0)
        ends = state.count == warmup_steps - 1
        n = jnp.float32(warmup_steps)
        init_mean = warm_sum / n
        init_var = jnp.maximum(warm_sq / n - init_mean**2, 0.0)
        ema_mean = alpha * state.mean + (1.0 - alpha) * clipped_norm
        ema_var = alpha * state.var + (1.0 - alpha) * (clipped_norm - ema_mean) ** 2
        mean = jnp.where(in_warmup, jnp.where(ends, init_mean, state.mean), ema_mean)
        var = jnp.where(in_warmup, jnp.where(ends, init_var, state.var), ema_var)
        # A non-finite norm must not poison the statistics for ever.
        finite = jnp.isfinite(norm)
        mean = jnp.where(finite, mean, state.mean)
        var = jnp.where(finite, var, state.var)
        count = jnp.minimum(state.count + 1, jnp.int32(2**30))
        return updates, ZClipState(count, warm_sum, warm_sq, mean, var)

    return optax.GradientTransformation(init_fn, update_fn)


class AutoClipState(NamedTuple):
    """State of :func:`autoclip`: every norm seen so far and how many."""

    history: jax.Array
    count: jax.Array


def autoclip(percentile: float = 10.0, max_history: int = 10_000) -> optax.GradientTransformation:
    """AutoClip (Seetharaman et al. 2020, https://arxiv.org/abs/2007.14469).

    Each step appends the gradient norm to the history of all norms seen so
    far, then clips to the ``percentile``-th percentile of that history
    (linear interpolation). ``max_history`` bounds the buffer; the suite
    sizes it to the run's length so that no norm is ever forgotten.
    """

    def init_fn(params):
        del params
        return AutoClipState(jnp.zeros((max_history,), jnp.float32), jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        index = state.count % max_history
        history = state.history.at[index].set(norm)
        count = jnp.minimum(state.count + 1, max_history)
        valid = jnp.arange(max_history) < count
        ordered = jnp.sort(jnp.where(valid & jnp.isfinite(history), history, jnp.inf))
        finite_count = jnp.sum(valid & jnp.isfinite(history))
        pos = percentile / 100.0 * (jnp.maximum(finite_count, 1) - 1).astype(jnp.float32)
        lo = jnp.floor(pos).astype(jnp.int32)
        hi = jnp.minimum(lo + 1, jnp.maximum(finite_count - 1, 0))
        clip = ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])
        factor = jnp.where(norm > clip, clip / norm, 1.0)
        updates = jax.tree.map(lambda g: (g * factor).astype(g.dtype), updates)
        return updates, AutoClipState(history, count)

    return optax.GradientTransformation(init_fn, update_fn)


class GradScalerState(NamedTuple):
    """State of :func:`grad_scaler`: the loss scale, finite steps in a row, the inner state."""

    scale: jax.Array
    good_steps: jax.Array
    inner_state: Any


def grad_scaler(
    inner: optax.GradientTransformation,
    init_scale: float = 2.0**16,
    backoff: float = 0.5,
    growth: float = 2.0,
    growth_interval: int = 2000,
) -> optax.GradientTransformation:
    """The usual dynamic loss scaling of mixed-precision training (Micikevicius et al. 2018).

    The loss is multiplied by ``scale`` before differentiation (the training
    loop reads it from the state); gradients are divided by it. A step with a
    non-finite gradient is skipped (inner state untouched) and halves the
    scale; ``growth_interval`` finite steps in a row double it. The defaults
    are those of ``torch.amp.GradScaler``.
    """

    def init_fn(params):
        return GradScalerState(
            jnp.asarray(init_scale, jnp.float32), jnp.zeros((), jnp.int32), inner.init(params)
        )

    def update_fn(updates, state, params=None):
        updates = jax.tree.map(lambda g: (g / state.scale).astype(g.dtype), updates)
        finite = jnp.isfinite(optax.tree.norm(updates))
        new_updates, inner_state = inner.update(updates, state.inner_state, params)
        inner_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), inner_state, state.inner_state
        )
        new_updates = jax.tree.map(lambda u: jnp.where(finite, u, 0.0), new_updates)
        good = jnp.where(finite, state.good_steps + 1, 0)
        grow = good >= growth_interval
        scale = jnp.where(finite, jnp.where(grow, state.scale * growth, state.scale), state.scale)
        scale = jnp.where(finite, scale, state.scale * backoff)
        good = jnp.where(grow, 0, good).astype(jnp.int32)
        return new_updates, GradScalerState(scale, good, inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------
# Tasks.


@dataclasses.dataclass(frozen=True)
class Task:
    """An unstable training problem.

    ``loss(params, batch)`` returns ``(loss to differentiate, loss to report)``,
    both float32 scalars; ``batch(key)`` draws one batch.
    """

    name: str
    description: str
    init: Callable[[jax.Array], Any]
    loss: Callable[[Any, Any], tuple[jax.Array, jax.Array]]
    batch: Callable[[jax.Array], Any]
    base: Callable[[float], optax.GradientTransformation]
    base_name: str
    learning_rate: float
    steps: int
    quick_steps: int


# -- RNN on the adding problem.

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


def _adding_batch(key):
    kv, km = jax.random.split(key)
    values = jax.random.uniform(kv, (RNN_BATCH, RNN_T))
    # One marker in each half of the sequence.
    k1, k2 = jax.random.split(km)
    first = jax.random.randint(k1, (RNN_BATCH,), 0, RNN_T // 2)
    second = jax.random.randint(k2, (RNN_BATCH,), RNN_T // 2, RNN_T)
    pos = jnp.arange(RNN_T)
    marks = ((pos == first[:, None]) | (pos == second[:, None])).astype(jnp.float32)
    x = jnp.stack([values, marks], axis=-1)
    y = jnp.sum(values * marks, axis=1)
    return x, y


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


# -- Deep MLP without normalisation.

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


# -- Heavy-tailed regression.

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


# -- Tiny transformer language model.

LM_VOCAB = 16
LM_LEN = 24
LM_DIM = 32
LM_HEADS = 2
LM_LAYERS = 2
LM_BATCH = 16
LM_NOISE = 0.25


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        # Post-LN, as in the original transformer: the variant that needs warm-up.
        h = nn.MultiHeadDotProductAttention(num_heads=LM_HEADS, deterministic=True)(x, x, mask=mask)
        x = nn.LayerNorm()(x + h)
        h = nn.Dense(LM_DIM)(nn.gelu(nn.Dense(4 * LM_DIM)(x)))
        return nn.LayerNorm()(x + h)


class _TinyLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(LM_VOCAB, LM_DIM)(tokens)
        pos = self.param("pos", nn.initializers.normal(0.02), (LM_LEN, LM_DIM))
        x = x + pos[: tokens.shape[1]]
        mask = nn.make_causal_mask(tokens)
        for _ in range(LM_LAYERS):
            x = _Block()(x, mask)
        return nn.Dense(LM_VOCAB)(x)


def _transformer_task() -> Task:
    model = _TinyLM()

    def init(key):
        return model.init(key, jnp.zeros((1, LM_LEN), jnp.int32))

    def batch(key):
        # A random first half, repeated: the second half is predictable only by
        # attending back (an induction task).
        k_half, k_noise, k_mask = jax.random.split(key, 3)
        half = jax.random.randint(k_half, (LM_BATCH, LM_LEN // 2), 0, LM_VOCAB)
        # Each repeated token is replaced by a random one with probability
        # LM_NOISE, so that the loss has a floor well above zero.
        noise = jax.random.randint(k_noise, half.shape, 0, LM_VOCAB)
        repeat = jnp.where(jax.random.bernoulli(k_mask, LM_NOISE, half.shape), noise, half)
        return jnp.concatenate([half, repeat, half[:, :1]], axis=1)  # (B, LEN + 1)

    def loss(params, tokens):
        logits = model.apply(params, tokens[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        # Only the repeated half is predictable; the first half is uniform noise.
        ce = ce[:, LM_LEN // 2 - 1 :].mean()
        return ce, ce

    return Task(
        name="transformer",
        description=f"post-LN transformer LM, {LM_LAYERS} layers, d={LM_DIM}, "
        "induction task (random half, repeated with 25% noise), Adam, no warm-up",
        init=init,
        loss=loss,
        batch=batch,
        base=lambda lr: optax.adam(lr),
        base_name="adam",
        learning_rate=1.4e-2,
        steps=1000,
        quick_steps=100,
    )


# -- Float16 compute that overflows without loss scaling.

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
        "overflow float16",
        init=init,
        loss=loss,
        batch=batch,
        base=lambda lr: optax.adam(lr),
        base_name="adam",
        learning_rate=1e-3,
        steps=800,
        quick_steps=80,
    )


TASKS: dict[str, Callable[[], Task]] = {
    "rnn_adding": _rnn_task,
    "deep_mlp": _deep_mlp_task,
    "heavy_tail": _heavy_tail_task,
    "transformer": _transformer_task,
    "fp16": _fp16_task,
}


# ----------------------------------------------------------------------------
# Methods.


@dataclasses.dataclass(frozen=True)
class Method:
    """A clipping method. ``make(task, hparam, steps)`` builds the optimizer.

    ``hparams`` run in one compiled program (the fixed thresholds); ``labels``
    name each of them. ``tasks`` restricts a method to some tasks.
    """

    name: str
    make: Callable[[Task, Any, int], optax.GradientTransformation]
    hparams: tuple[float, ...] | None = None
    labels: tuple[str, ...] | None = None
    kind: str = "baseline"
    tasks: tuple[str, ...] | None = None


def _stab_config(**kwargs) -> optax_gradflow.StabilizerConfig:
    return optax_gradflow.StabilizerConfig(**kwargs)


def base_methods() -> list[Method]:
    return [
        Method("no clipping", lambda t, h, n: t.base(t.learning_rate)),
        Method(
            "fixed clip",
            lambda t, h, n: optax.chain(optax.clip_by_global_norm(h), t.base(t.learning_rate)),
            hparams=FIXED_THRESHOLDS,
            labels=tuple(f"clip {c:g}" for c in FIXED_THRESHOLDS),
        ),
        Method(
            f"AGC {AGC_CLIPPING:g}",
            lambda t, h, n: optax.chain(
                optax.adaptive_grad_clip(AGC_CLIPPING), t.base(t.learning_rate)
            ),
        ),
        Method("ZClip", lambda t, h, n: optax.chain(zclip(), t.base(t.learning_rate))),
        Method(
            "AutoClip p10",
            lambda t, h, n: optax.chain(autoclip(10.0, max_history=n), t.base(t.learning_rate)),
        ),
        Method(
            "GradScaler + clip 1",
            lambda t, h, n: grad_scaler(
                optax.chain(optax.clip_by_global_norm(1.0), t.base(t.learning_rate))
            ),
            kind="fp16 baseline",
            tasks=("fp16",),
        ),
        Method(
            "stabilizer",
            lambda t, h, n: optax_gradflow.stabilized(t.base(t.learning_rate), t.learning_rate),
            kind="stabilizer",
        ),
        Method(
            "stabilizer (data)",
            lambda t, h, n: optax_gradflow.stabilized(t.base(t.learning_rate)),
            kind="stabilizer",
        ),
    ]


RULES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("percentile 50", {"adaptation_rule": "percentile", "adaptation_percentile": 50.0}),
    ("percentile 75", {"adaptation_rule": "percentile", "adaptation_percentile": 75.0}),
    ("percentile 90", {"adaptation_rule": "percentile", "adaptation_percentile": 90.0}),
    ("median_mad k2", {"adaptation_rule": "median_mad", "adaptation_k": 2.0}),
    ("mean_std k3", {"adaptation_rule": "mean_std", "adaptation_k": 3.0}),
    ("zscore", {"adaptation_rule": "zscore"}),
)
# The zscore rule always runs its data warm-up (the learning rate plays no
# part), so its data-mode row is its learning-rate row.
LR_INDEPENDENT_RULES = ("zscore",)
# median_mad with k = 3 is the default config: its rows are the "stabilizer"
# and "stabilizer (data)" runs, not run twice.
DEFAULT_RULE_ALIASES = {
    "rule: median_mad k3 (default)": ("stabilizer", "rule"),
    "rule (data): median_mad k3 (default)": ("stabilizer (data)", "rule (data)"),
}


def rule_methods() -> list[Method]:
    """The stabilizer under each adaptation rule, with the learning rate and in data mode."""
    methods = []
    for label, fields in RULES:
        cfg = _stab_config(**fields)
        methods.append(
            Method(
                f"rule: {label}",
                lambda t, h, n, cfg=cfg: optax_gradflow.stabilized(
                    t.base(t.learning_rate), t.learning_rate, config=cfg
                ),
                kind="rule",
            )
        )
        if label in LR_INDEPENDENT_RULES:
            continue
        methods.append(
            Method(
                f"rule (data): {label}",
                lambda t, h, n, cfg=cfg: optax_gradflow.stabilized(
                    t.base(t.learning_rate), config=cfg
                ),
                kind="rule (data)",
            )
        )
    return methods


# ----------------------------------------------------------------------------
# Training.


def _grad_scaler_state(opt_state) -> GradScalerState | None:
    found = [
        x
        for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, GradScalerState))
        if isinstance(x, GradScalerState)
    ]
    return found[0] if found else None


def scaled_loss(loss: jax.Array, opt_state) -> jax.Array:
    """The loss to differentiate: multiplied by the optimizer's loss scale, if it has one.

    The stabilizer (and the GradScaler baseline) divide the gradients by their
    loss scale. Decided at trace time; the other methods get the loss itself.
    """
    if optax_gradflow.find_states(opt_state):
        return optax_gradflow.scale_loss(loss, opt_state)
    scaler = _grad_scaler_state(opt_state)
    if scaler is not None:
        return loss * scaler.scale.astype(loss.dtype)
    return loss


def make_runner(task: Task, method: Method, steps: int):
    """A jitted ``(params [S], data keys [S], hparams [K]) -> losses [K, S, steps]``.

    ``params`` are the initial parameters of the S seeds, stacked; every
    (hparam, seed) pair runs one after another.
    """

    def run_one(params, data_key, hparam):
        opt = optax.with_extra_args_support(method.make(task, hparam, steps))
        opt_state = opt.init(params)

        def train_step(carry, step):
            params, opt_state = carry
            batch = task.batch(jax.random.fold_in(data_key, step))

            def objective(p):
                loss, report = task.loss(p, batch)
                return scaled_loss(loss, opt_state), report

            grads, report = jax.grad(objective, has_aux=True)(params)
            updates, opt_state = opt.update(grads, opt_state, params, value=report)
            params = optax.apply_updates(params, updates)
            return (params, opt_state), report

        _, losses = jax.lax.scan(train_step, (params, opt_state), jnp.arange(steps))
        return losses

    def run_all(params, data_keys, hparams):
        # lax.map, not vmap: under vmap the stabilizer's lax.cond branches
        # would both run every step (a batched predicate becomes a select).
        k, s = hparams.shape[0], data_keys.shape[0]
        grid = (
            jax.tree.map(lambda x: jnp.tile(x, (k,) + (1,) * (x.ndim - 1)), params),
            jnp.tile(data_keys, (k, 1)),
            jnp.repeat(hparams, s),
        )
        losses = jax.lax.map(lambda a: run_one(*a), grid)
        return losses.reshape(k, s, steps)

    return jax.jit(run_all)


# ----------------------------------------------------------------------------
# Metrics.


def run_metrics(losses: np.ndarray) -> dict[str, Any]:
    """Metrics of one method on one task; ``losses`` is [seeds, steps]."""
    seeds, steps = losses.shape
    tail = max(1, steps // 10)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        initial = np.nanmean(np.where(np.isfinite(losses[:, :5]), losses[:, :5], np.nan), axis=1)
    finite_run = np.all(np.isfinite(losses), axis=1)
    final = np.mean(losses[:, -tail:], axis=1)
    final = np.where(np.isfinite(final), final, np.inf)
    diverged = ~finite_run | (final > DIVERGENCE_FACTOR * initial)
    # Spikes: loss above SPIKE_FACTOR x the median of the previous SPIKE_WINDOW steps.
    spikes = np.zeros(seeds, dtype=int)
    if steps > SPIKE_WINDOW:
        windows = np.lib.stride_tricks.sliding_window_view(losses, SPIKE_WINDOW, axis=1)
        with np.errstate(invalid="ignore"):
            ref = np.median(windows[:, :-1], axis=-1)
            cur = losses[:, SPIKE_WINDOW:]
            spikes = np.sum(np.isfinite(cur) & (cur > SPIKE_FACTOR * ref), axis=1)
    return {
        "diverged": int(np.sum(diverged)),
        "seeds": seeds,
        "final_loss_median": float(np.median(final)),
        "final_loss_per_seed": [float(x) for x in final],
        "initial_loss_median": float(np.nanmedian(initial))
        if np.any(np.isfinite(initial))
        else None,
        "spikes_mean": float(np.mean(spikes)),
        "spikes_per_seed": [int(x) for x in spikes],
    }


def _median_curve(losses: np.ndarray, smooth: int) -> np.ndarray:
    clean = np.where(np.isfinite(losses), losses, np.nan)
    with warnings.catch_warnings():
        # Steps where every seed is non-finite stay NaN (a gap in the plot).
        warnings.simplefilter("ignore", RuntimeWarning)
        curve = np.nanmedian(clean, axis=0)
    if smooth > 1 and curve.size >= smooth:
        kernel = np.ones(smooth) / smooth
        padded = np.concatenate([np.full(smooth - 1, curve[0]), curve])
        curve = np.convolve(padded, kernel, mode="valid")
    return curve


# ----------------------------------------------------------------------------
# Suite.


def _git_commit() -> str | None:
    """The commit of the working tree measured, with "+dirty" if it has local changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "optax_gradflow"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": model,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "jax_backend": jax.default_backend(),
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": version("jaxlib"),
            "optax": optax.__version__,
            "flax": version("flax"),
            "optax_gradflow": optax_gradflow.__version__,
            "numpy": np.__version__,
        },
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def run_suite(
    task_names: Sequence[str],
    methods: Sequence[Method],
    seeds: int,
    quick: bool,
    steps_override: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for task_name in task_names:
        task = TASKS[task_name]()
        steps = steps_override or (task.quick_steps if quick else task.steps)
        init_keys, data_keys = jnp.split(jax.random.split(jax.random.PRNGKey(0), 2 * seeds), 2)
        # Initial parameters, once per seed, shared by every method.
        params = jax.jit(jax.vmap(task.init))(init_keys)
        task_result: dict[str, Any] = {
            "description": task.description,
            "base_optimizer": task.base_name,
            "learning_rate": task.learning_rate,
            "steps": steps,
            "seeds": seeds,
            "stabilizer_initial_threshold": float(
                min(max(0.1 * math.sqrt(1.0 / task.learning_rate), 0.1), math.inf)
            ),
            "methods": {},
            "curves": {},
        }
        for method in methods:
            if method.tasks is not None and task_name not in method.tasks:
                continue
            hparams = method.hparams or (0.0,)
            labels = method.labels or (method.name,)
            runner = make_runner(task, method, steps)
            t0 = time.perf_counter()
            h = jnp.asarray(hparams, jnp.float32)
            compiled = runner.lower(params, data_keys, h).compile()
            t1 = time.perf_counter()
            losses = np.asarray(jax.block_until_ready(compiled(params, data_keys, h)))
            t2 = time.perf_counter()
            for i, label in enumerate(labels):
                m = run_metrics(losses[i])
                m.update(
                    kind=method.kind,
                    compile_s=(t1 - t0) / len(labels),
                    run_s=(t2 - t1) / len(labels),
                )
                task_result["methods"][label] = m
                task_result["curves"][label] = _median_curve(losses[i], max(1, steps // 100))
                log(
                    f"[{task_name}] {label:<24s} diverged {m['diverged']}/{seeds}  "
                    f"final {m['final_loss_median']:.4g}  spikes {m['spikes_mean']:.1f}  "
                    f"({t1 - t0:.1f}s compile, {t2 - t1:.1f}s run)"
                )
        results[task_name] = task_result
    return results


def _best_fixed(task_result: dict[str, Any]) -> tuple[str, float]:
    fixed = {
        label: m["final_loss_median"]
        for label, m in task_result["methods"].items()
        if label.startswith("clip ")
    }
    label = min(fixed, key=lambda k: fixed[k])
    return label, fixed[label]


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per task: no divergence of the default stabilizer; final loss within 5% of the best fixed."""
    out = []
    for task_name, tr in results.items():
        ours = tr["methods"].get("stabilizer")
        if ours is None:
            continue
        best_label, best = _best_fixed(tr)
        final = ours["final_loss_median"]
        if math.isfinite(best) and best > 0:
            ratio: float | None = final / best
            within: bool | None = ratio <= TARGET_RATIO
        else:
            # Every fixed threshold diverged: there is nothing to be within 5% of.
            ratio, within = None, None
        out.append(
            {
                "task": task_name,
                "stabilizer_diverged": ours["diverged"],
                "best_fixed": best_label,
                "best_fixed_final": best,
                "stabilizer_final": final,
                "ratio_to_best_fixed": ratio,
                "no_divergence_met": ours["diverged"] == 0,
                "within_5pct_met": within,
            }
        )
    return out


def rank_methods(results: dict[str, Any], kinds: Sequence[str]) -> list[dict[str, Any]]:
    """Mean rank (1 = lowest median final loss) of the methods of ``kinds`` across tasks."""
    names: list[str] = []
    for tr in results.values():
        for label, m in tr["methods"].items():
            if m["kind"] in kinds and label not in names:
                names.append(label)
    ranks: dict[str, list[float]] = {n: [] for n in names}
    diverged: dict[str, int] = dict.fromkeys(names, 0)
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for tr in results.values():
        ms = tr["methods"]
        present = [n for n in names if n in ms]
        # Diverged runs count first as worse, then the median final loss; ties
        # share their average rank.
        key = {n: (ms[n]["diverged"], ms[n]["final_loss_median"]) for n in present}
        # The ratio's reference: the best median among the runs that never
        # diverged (a method that diverged on some seeds may still have a low median).
        clean = [n for n in present if ms[n]["diverged"] == 0] or present
        best = min(ms[n]["final_loss_median"] for n in clean)
        for n in present:
            below = sum(key[m] < key[n] for m in present)
            tied = sum(key[m] == key[n] for m in present)
            ranks[n].append(below + (tied + 1) / 2)
            diverged[n] += ms[n]["diverged"]
            final = ms[n]["final_loss_median"]
            ratios[n].append(final / best if best > 0 and math.isfinite(final) else math.inf)
    table = [
        {
            "method": n,
            "mean_rank": float(np.mean(ranks[n])),
            "diverged_runs": diverged[n],
            "geomean_ratio_to_best": float(np.exp(np.mean(np.log(ratios[n])))),
            "ranks": ranks[n],
        }
        for n in names
    ]
    return sorted(table, key=lambda row: (row["diverged_runs"], row["mean_rank"]))


def format_tables(results: dict[str, Any]) -> str:
    lines = []
    for task_name, tr in results.items():
        best_label, _ = _best_fixed(tr)
        lines.append(
            f"\n### {task_name}: {tr['description']} (lr {tr['learning_rate']:g}, "
            f"{tr['steps']} steps, {tr['seeds']} seeds)\n"
        )
        lines.append("| method | diverged | final loss (median) | worst seed | spikes (mean) |")
        lines.append("|---|---|---|---|---|")
        for label, m in tr["methods"].items():
            mark = " (best fixed)" if label == best_label else ""
            lines.append(
                f"| {label}{mark} | {m['diverged']}/{m['seeds']} "
                f"| {m['final_loss_median']:.4g} | {max(m['final_loss_per_seed']):.4g} "
                f"| {m['spikes_mean']:.1f} |"
            )
    return "\n".join(lines)


def format_targets(targets: list[dict[str, Any]]) -> str:
    lines = [
        "| task | stabilizer diverged | stabilizer final | best fixed | best fixed final "
        "| ratio | no divergence | within 5% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdict = {True: "met", False: "MISSED", None: "n/a (every fixed clip diverged)"}
    for t in targets:
        ratio = t["ratio_to_best_fixed"]
        lines.append(
            f"| {t['task']} | {t['stabilizer_diverged']} | {t['stabilizer_final']:.4g} "
            f"| {t['best_fixed']} | {t['best_fixed_final']:.4g} "
            f"| {'-' if ratio is None else f'{ratio:.3f}'} "
            f"| {'met' if t['no_divergence_met'] else 'MISSED'} "
            f"| {verdict[t['within_5pct_met']]} |"
        )
    return "\n".join(lines)


def format_ranking(ranking: list[dict[str, Any]]) -> str:
    lines = [
        "| method | mean rank | diverged runs | geomean final / best |",
        "|---|---|---|---|",
    ]
    for row in ranking:
        lines.append(
            f"| {row['method']} | {row['mean_rank']:.2f} | {row['diverged_runs']} "
            f"| {row['geomean_ratio_to_best']:.3f} |"
        )
    return "\n".join(lines)


CURVE_POINTS = 300  # points kept per stored loss curve


def compact_curves(results: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """The median curves as stored in the JSON: every ``curve_stride``-th step, 4 digits.

    The curves are already smoothed over 1% of the steps; the stride is saved
    in each task's results.
    """
    out = {}
    for name, tr in results.items():
        if "curve_stride" not in tr:
            tr["curve_stride"] = max(1, math.ceil(tr["steps"] / CURVE_POINTS))
        stride = tr["curve_stride"]
        out[name] = {
            label: [float(f"{x:.4g}") for x in np.asarray(c, dtype=float)[::stride]]
            for label, c in tr["curves"].items()
        }
    return out


def add_rule_aliases(results: dict[str, Any]) -> None:
    """Rows of the rule tables that are runs of another name (not run twice)."""
    aliases = dict(DEFAULT_RULE_ALIASES)
    for label in LR_INDEPENDENT_RULES:
        aliases[f"rule (data): {label}"] = (f"rule: {label}", "rule (data)")
    for tr in results.values():
        for alias, (label, kind) in aliases.items():
            if label in tr["methods"]:
                tr["methods"][alias] = dict(tr["methods"][label], kind=kind)
                tr["curves"][alias] = tr["curves"][label]


def derive(results: dict[str, Any], rules: bool) -> dict[str, Any]:
    """Targets and rankings, computed from the per-method results."""
    return {
        "targets": evaluate_targets(results),
        "rule_ranking": rank_methods(results, ("rule",)) if rules else [],
        "rule_ranking_data_mode": rank_methods(results, ("rule (data)",)) if rules else [],
        "overall_ranking": rank_methods(results, ("baseline", "stabilizer")),
    }


def report(results: dict[str, Any], rules: bool) -> None:
    """Prints the per-task tables, the targets and the rankings."""
    derived = derive(results, rules)
    print(format_tables(results))
    print("\nTargets (default stabilizer vs the best fixed threshold in hindsight):\n")
    print(format_targets(derived["targets"]))
    if rules:
        print("\nAdaptation rules, threshold from the learning rate (mean rank across tasks):\n")
        print(format_ranking(derived["rule_ranking"]))
        print("\nAdaptation rules, data mode (mean rank across tasks):\n")
        print(format_ranking(derived["rule_ranking_data_mode"]))
    print("\nAll methods:\n")
    print(format_ranking(derived["overall_ranking"]))


def plot(results: dict[str, Any], path: pathlib.Path) -> None:
    """Median loss curves per task: no clipping, the best fixed clip, the default stabilizer.

    The y axis stops at 3x the largest initial loss, so that a diverging curve
    leaves the plot instead of flattening the others.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (task_name, tr) in zip(axes.flat, results.items(), strict=False):
        best_label, _ = _best_fixed(tr)
        lines = [
            ("no clipping", "no clipping", dict(color="0.6", lw=1.0)),
            (best_label, f"{best_label} (best fixed)", dict(color="tab:blue", lw=1.2)),
        ]
        if "GradScaler + clip 1" in tr["curves"]:
            lines.append(("GradScaler + clip 1", "GradScaler + clip 1", dict(color="tab:green")))
        lines.append(("stabilizer", "stabilizer (default)", dict(color="tab:red", lw=1.4)))
        top = 0.0
        for label, name, style in lines:
            curve = np.asarray(tr["curves"][label], dtype=float)
            finite = curve[np.isfinite(curve)]
            if finite.size:
                top = max(top, float(finite[0]))
            stride = tr.get("curve_stride", 1) if curve.size < tr["steps"] else 1
            steps = np.arange(curve.size) * stride
            ax.plot(steps, curve, label=name, **style)
        ax.set_yscale("log")
        if top > 0:
            ax.set_ylim(top=3 * top)
        ax.set_title(
            f"{task_name} ({tr['base_optimizer']}, lr {tr['learning_rate']:g})", fontsize=9
        )
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("loss, median over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trace(task_name: str, data_mode: bool = False, seed: int = 0, rows: int = 16) -> list[dict]:
    """The default stabilizer's state along one run of ``task_name`` (the suite's seed ``seed``).

    Prints, at ``rows`` evenly spaced steps: the loss, the unscaled norm, the
    threshold, the loss scale, the explosion / emergency / non-finite counts
    and how many norms the history holds.
    """
    task = TASKS[task_name]()
    # The keys of the full suite's seed ``seed`` (it splits the keys for all its seeds).
    init_keys, data_keys = jnp.split(jax.random.split(jax.random.PRNGKey(0), 2 * SEEDS), 2)
    params = jax.tree.map(lambda x: x[seed], jax.jit(jax.vmap(task.init))(init_keys))
    lr = None if data_mode else task.learning_rate
    opt = optax_gradflow.stabilized(task.base(task.learning_rate), lr)
    fields = (
        "last_grad_norm",
        "clip_threshold",
        "loss_scale",
        "explosion_count",
        "emergency_count",
        "nonfinite_count",
        "norm_history_count",
    )

    def run(params, data_key):
        opt_state = opt.init(params)

        def train_step(carry, step):
            params, opt_state = carry
            batch = task.batch(jax.random.fold_in(data_key, step))

            def objective(p):
                loss, report = task.loss(p, batch)
                return optax_gradflow.scale_loss(loss, opt_state), report

            grads, report = jax.grad(objective, has_aux=True)(params)
            updates, opt_state = opt.update(grads, opt_state, params, value=report)
            flow = opt_state.flow
            return (optax.apply_updates(params, updates), opt_state), (
                report,
                *(getattr(flow, f) for f in fields),
            )

        return jax.lax.scan(train_step, (params, opt_state), jnp.arange(task.steps))[1]

    out = [np.asarray(x) for x in jax.jit(run)(params, data_keys[seed])]
    names = ("loss", "norm", "threshold", "loss scale", "explosions", "emergencies")
    names += ("non-finite", "history")
    steps = sorted({0, 1, 2, 5, 10, *np.linspace(0, task.steps - 1, rows).astype(int).tolist()})
    mode = "data mode" if data_mode else f"lr {task.learning_rate:g}"
    print(f"{task_name}, default stabilizer ({mode}), seed {seed}:\n")
    print("| step | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    records = []
    for i in steps:
        values = [float(o[i]) for o in out]
        records.append({"step": i, **dict(zip(names, values, strict=True))})
        print(f"| {i} | " + " | ".join(f"{v:.4g}" for v in values) + " |")
    return records


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10%% of the steps, 2 seeds")
    parser.add_argument("--rules", action="store_true", help="also run every adaptation rule")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per run (default 5)")
    parser.add_argument("--steps", type=int, default=None, help="override every task's steps")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    parser.add_argument("--methods", default=None, help="comma-separated method names to keep")
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    parser.add_argument("--plot", default=str(DEFAULT_PLOT), help="'' for no plot")
    parser.add_argument(
        "--from-json",
        action="store_true",
        help="train nothing: re-derive the tables, rankings and plot from the results in --json",
    )
    parser.add_argument(
        "--trace", default=None, help="only print the default stabilizer's state along one run"
    )
    parser.add_argument("--trace-data-mode", action="store_true", help="--trace in data mode")
    parser.add_argument("--trace-seed", type=int, default=0, help="--trace this seed (0-4)")
    args = parser.parse_args(argv)
    if args.trace:
        trace(args.trace, data_mode=args.trace_data_mode, seed=args.trace_seed)
        return {}

    seeds = args.seeds or (2 if args.quick else SEEDS)
    task_names = [t for t in args.tasks.split(",") if t]
    for t in task_names:
        if t not in TASKS:
            parser.error(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    methods = base_methods() + (rule_methods() if args.rules else [])
    if args.methods:
        keep = {m.strip() for m in args.methods.split(",")}
        methods = [m for m in methods if m.name in keep or m.name in ("no clipping", "fixed clip")]

    if args.from_json:
        stored = json.loads(pathlib.Path(args.json).read_text())
        results = {
            name: dict(tr, curves=stored["curves"][name]) for name, tr in stored["results"].items()
        }
        report(results, args.rules or bool(stored.get("rule_ranking")))
        derived = derive(results, args.rules or bool(stored.get("rule_ranking")))
        stored.update(derived)
        stored["curves"] = compact_curves(results)
        stored["results"] = {
            name: {k: v for k, v in tr.items() if k != "curves"} for name, tr in results.items()
        }
        pathlib.Path(args.json).write_text(json.dumps(stored, indent=1, allow_nan=True) + "\n")
        if args.plot:
            plot(results, pathlib.Path(args.plot))
        print(
            f"\nre-derived the tables of {args.json}"
            + (f", wrote {args.plot}" if args.plot else "")
        )
        return stored

    start = time.perf_counter()
    results = run_suite(task_names, methods, seeds, args.quick, args.steps)
    wall = time.perf_counter() - start
    if args.rules:
        add_rule_aliases(results)
    report(results, args.rules)
    derived = derive(results, args.rules)

    argv_used = sys.argv[1:] if argv is None else argv
    out = {
        "command": "python benchmarks/stability.py " + " ".join(argv_used),
        "machine": machine_info(),
        "settings": {
            "quick": args.quick,
            "seeds": seeds,
            "fixed_thresholds": FIXED_THRESHOLDS,
            "agc_clipping": AGC_CLIPPING,
            "divergence_factor": DIVERGENCE_FACTOR,
            "spike_factor": SPIKE_FACTOR,
            "spike_window": SPIKE_WINDOW,
            "stabilizer_config": optax_gradflow.StabilizerConfig().as_dict(),
        },
        "curves": compact_curves(results),
        "results": {
            name: {k: v for k, v in tr.items() if k != "curves"} for name, tr in results.items()
        },
        **derived,
        "wall_s": wall,
    }
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, allow_nan=True) + "\n")
    if args.plot:
        plot(results, pathlib.Path(args.plot))
    print(f"\nwrote {path}" + (f" and {args.plot}" if args.plot else "") + f" in {wall:.0f} s")
    return out


if __name__ == "__main__":
    main()
