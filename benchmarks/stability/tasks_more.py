"""More training tasks of the stability suite: further forms of each kind of instability.

Each kind of instability of ``tasks.py`` appears here in other forms (other
architectures, optimizers and data), so that a rule chosen on one form can be
checked on the others. All data is generated from fixed seeds or ships with
an installed package or with Python itself; nothing is downloaded.

Unstable on purpose (``stable=False``):

- ``gru_copy``: a GRU on the delayed-copy task (remember a few symbols across
  a blank stretch, then recall them), SGD with momentum at rates high enough
  to learn it in the run (below 2, SGD leaves the loss at chance);
- ``lstm_adding``: an LSTM on the adding problem at another length than
  ``rnn_adding``'s, SGD with momentum;
- ``tanh_deep``: a 24-layer tanh MLP without normalisation, initialised in the
  chaotic regime (weight gain 1.5), plain SGD;
- ``relu_deep_spike``: a 32-layer ReLU MLP without normalisation, Adam, with
  a few corrupted batches early in the run (inputs 1000x too large, as a
  unit error in a data pipeline): one spike whose gradient fills Adam's
  second moment; the loss reported is the one on the clean inputs;
- ``digits_cnn``: a small CNN on scikit-learn's 8x8 digits with 20% of the
  labels wrong and, now and then, a corrupted batch (saturated pixels, 30x
  the range), SGD with momentum; the loss reported is on the clean images
  with their true labels;
- ``digits_fp16``: an MLP autoencoder of the digits' raw pixel values
  computed in float16 (float32 master weights), with a sum-reduced loss
  whose unscaled gradients overflow float16; the stabilizer methods opt in
  to loss scaling here;
- ``char_lm``: a 2-layer post-LN transformer, byte-level, on the source code
  of Python's standard library (the files that ship with the interpreter),
  Adam at an aggressive rate without warm-up.

Stable (``stable=True``), trained the standard way:

- ``digits_cnn_norm``: the digits CNN with GroupNorm, clean labels, no
  corruption, Adam;
- ``char_lm_warmup``: the character model, pre-LN, with a linear warm-up,
  then a cosine decay, Adam.

The text of ``char_lm`` depends on the Python version (its standard library's
sources): runs on two versions of Python are not comparable on that task.
"""

from __future__ import annotations

import functools
import math
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tasks import Task, adding_problem

# ----------------------------------------------------------------------------
# Recurrent networks on long-memory tasks.

COPY_SYMBOLS = 8  # alphabet of the symbols to remember
COPY_LENGTH = 4  # symbols to remember
COPY_DELAY = 12  # blank steps between the symbols and the recall cue
COPY_HIDDEN = 48
COPY_BATCH = 32
# Inputs: the symbols, a blank and the recall cue.
COPY_INPUTS = COPY_SYMBOLS + 2
COPY_T = COPY_LENGTH + COPY_DELAY + 1 + COPY_LENGTH


def _copy_batch(key):
    """``(one-hot inputs [B, T, S + 2], symbols [B, K])``: recall the K symbols after the cue."""
    symbols = jax.random.randint(key, (COPY_BATCH, COPY_LENGTH), 0, COPY_SYMBOLS)
    blank, cue = COPY_SYMBOLS, COPY_SYMBOLS + 1
    stream = jnp.concatenate(
        [
            symbols,
            jnp.full((COPY_BATCH, COPY_DELAY), blank),
            jnp.full((COPY_BATCH, 1), cue),
            jnp.full((COPY_BATCH, COPY_LENGTH), blank),
        ],
        axis=1,
    )
    return jax.nn.one_hot(stream, COPY_INPUTS), symbols


class _Recurrent(nn.Module):
    """A GRU or an LSTM layer over ``[B, T, I]``, its hidden states ``[B, T, H]``.

    The gates' input projections are computed for every step at once, the
    recurrent ones in one matrix product a step (the cuDNN form: the GRU's
    reset gate multiplies the recurrent projection).
    """

    hidden: int
    cell: str  # "gru" or "lstm"

    @nn.compact
    def __call__(self, x):
        n = {"gru": 3, "lstm": 4}[self.cell]
        h_size = self.hidden
        inputs = nn.Dense(n * h_size)(x)
        recurrent = self.param(
            "recurrent", nn.initializers.orthogonal(column_axis=-1), (h_size, n * h_size)
        )

        def gru(h, xs):
            hh = h @ recurrent
            r = jax.nn.sigmoid(xs[:, :h_size] + hh[:, :h_size])
            z = jax.nn.sigmoid(xs[:, h_size : 2 * h_size] + hh[:, h_size : 2 * h_size])
            cand = jnp.tanh(xs[:, 2 * h_size :] + r * hh[:, 2 * h_size :])
            h = (1.0 - z) * cand + z * h
            return h, h

        def lstm(carry, xs):
            c, h = carry
            i, f, g, o = jnp.split(xs + h @ recurrent, 4, axis=-1)
            # Forget-gate bias 1 (Jozefowicz et al. 2015).
            c = jax.nn.sigmoid(f + 1.0) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (c, h), h

        zeros = jnp.zeros((x.shape[0], h_size), x.dtype)
        step, carry = (gru, zeros) if self.cell == "gru" else (lstm, (zeros, zeros))
        _, hs = jax.lax.scan(step, carry, jnp.swapaxes(inputs, 0, 1))
        return jnp.swapaxes(hs, 0, 1)


class _CopyGRU(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = _Recurrent(COPY_HIDDEN, "gru")(x)
        return nn.Dense(COPY_SYMBOLS)(h[:, -COPY_LENGTH:])


def _gru_copy_task() -> Task:
    model = _CopyGRU()

    def init(key):
        return model.init(key, jnp.zeros((1, COPY_T, COPY_INPUTS)))

    def loss(params, batch):
        x, symbols = batch
        ce = optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), symbols)
        return ce.mean(), ce.mean()

    return Task(
        name="gru_copy",
        description=f"GRU, {COPY_HIDDEN} units, delayed copy ({COPY_LENGTH} of {COPY_SYMBOLS} "
        f"symbols, recalled after {COPY_DELAY} blank steps), SGD momentum 0.9",
        init=init,
        loss=loss,
        batch=_copy_batch,
        base=lambda lr: optax.sgd(lr, momentum=0.9),
        base_name="sgd(momentum=0.9)",
        learning_rate=3.0,
        steps=600,
        quick_steps=60,
    )


ADD_T = 30
ADD_HIDDEN = 32
ADD_BATCH = 32


def _adding_batch(key):
    """The adding problem over ``ADD_T`` steps (its own key split)."""
    return adding_problem(*jax.random.split(key, 3), ADD_BATCH, ADD_T)


class _AddingLSTM(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = _Recurrent(ADD_HIDDEN, "lstm")(x)
        return nn.Dense(1)(h[:, -1])[:, 0]


def _lstm_adding_task() -> Task:
    model = _AddingLSTM()

    def init(key):
        return model.init(key, jnp.zeros((1, ADD_T, 2)))

    def loss(params, batch):
        x, y = batch
        mse = jnp.mean((model.apply(params, x) - y) ** 2)
        return mse, mse

    return Task(
        name="lstm_adding",
        description=f"LSTM, {ADD_HIDDEN} units, adding problem T={ADD_T}, SGD momentum 0.9",
        init=init,
        loss=loss,
        batch=_adding_batch,
        base=lambda lr: optax.sgd(lr, momentum=0.9),
        base_name="sgd(momentum=0.9)",
        learning_rate=0.1,
        steps=600,
        quick_steps=60,
    )


# ----------------------------------------------------------------------------
# Deep MLPs without normalisation.

DEEP_IN = 32
DEEP_BATCH = 64
DEEP_TEACHER_KEY = jax.random.PRNGKey(2468)


def _deep_teacher(x):
    k1, k2 = jax.random.split(DEEP_TEACHER_KEY)
    w1 = jax.random.normal(k1, (DEEP_IN, 32)) / math.sqrt(DEEP_IN)
    w2 = jax.random.normal(k2, (32,)) / math.sqrt(32)
    return jnp.tanh(x @ w1) @ w2


class _DeepNet(nn.Module):
    depth: int
    width: int
    activation: str
    gain: float

    @nn.compact
    def __call__(self, x):
        act = {"tanh": jnp.tanh, "relu": nn.relu}[self.activation]
        # gain**2 / fan_in: gain 1.5 puts a tanh network in the chaotic
        # regime; sqrt(2) is He's for ReLU.
        kernel = nn.initializers.variance_scaling(self.gain**2, "fan_in", "normal")
        for _ in range(self.depth - 1):
            x = act(nn.Dense(self.width, kernel_init=kernel)(x))
        return nn.Dense(1)(x)[:, 0]


TANH_DEPTH = 24
TANH_WIDTH = 48
TANH_GAIN = 1.5


def _tanh_deep_task() -> Task:
    model = _DeepNet(TANH_DEPTH, TANH_WIDTH, "tanh", TANH_GAIN)

    def init(key):
        return model.init(key, jnp.zeros((1, DEEP_IN)))

    def batch(key):
        x = jax.random.normal(key, (DEEP_BATCH, DEEP_IN))
        return x, _deep_teacher(x)

    def loss(params, batch):
        x, y = batch
        mse = jnp.mean((model.apply(params, x) - y) ** 2)
        return mse, mse

    return Task(
        name="tanh_deep",
        description=f"{TANH_DEPTH}-layer tanh MLP, width {TANH_WIDTH}, no normalisation, "
        f"weight gain {TANH_GAIN:g} (chaotic regime), teacher regression, SGD",
        init=init,
        loss=loss,
        batch=batch,
        base=lambda lr: optax.sgd(lr),
        base_name="sgd",
        learning_rate=0.02,
        steps=600,
        quick_steps=60,
    )


RELU_DEPTH = 32
RELU_WIDTH = 32
SPIKE_STEPS = (30, 31, 32)  # the corrupted batches
SPIKE_SCALE = 1000.0


def _relu_deep_spike_task() -> Task:
    model = _DeepNet(RELU_DEPTH, RELU_WIDTH, "relu", math.sqrt(2.0))

    def init(key):
        return model.init(key, jnp.zeros((1, DEEP_IN)))

    def collect(state, params, key, step, steps):
        del params, steps
        x = jax.random.normal(key, (DEEP_BATCH, DEEP_IN))
        corrupted = jnp.isin(step, jnp.asarray(SPIKE_STEPS))
        x_seen = jnp.where(corrupted, SPIKE_SCALE * x, x)
        return state, (x_seen, x, _deep_teacher(x))

    def loss(params, batch):
        x_seen, x, y = batch
        seen = jnp.mean((model.apply(params, x_seen) - y) ** 2)
        clean = jnp.mean((model.apply(params, x) - y) ** 2)
        return seen, clean

    return Task(
        name="relu_deep_spike",
        description=f"{RELU_DEPTH}-layer ReLU MLP, width {RELU_WIDTH}, no normalisation, teacher "
        f"regression, Adam; steps {', '.join(map(str, SPIKE_STEPS))} see inputs "
        f"{SPIKE_SCALE:g}x too large (an early spike); loss on the clean inputs",
        init=init,
        loss=loss,
        batch=None,
        base=lambda lr: optax.adam(lr),
        base_name="adam",
        learning_rate=1e-3,
        steps=600,
        quick_steps=60,
        init_state=lambda params, key: (),
        collect=collect,
    )


# ----------------------------------------------------------------------------
# A small CNN on scikit-learn's 8x8 digits.

DIGITS_BATCH = 32
DIGITS_FEATURES = (8, 16)
DIGITS_HIDDEN = 32
DIGITS_LABEL_NOISE = 0.2
DIGITS_CORRUPT_P = 0.02
DIGITS_CORRUPT_SCALE = 30.0
DIGITS_NOISE_KEY = 97531


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images [N, 8, 8, 1] in [0, 1], true labels [N], labels with 20% wrong [N])."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[..., None]
    labels = data.target.astype(np.int32)
    rng = np.random.default_rng(DIGITS_NOISE_KEY)
    wrong = rng.random(labels.shape) < DIGITS_LABEL_NOISE
    # A wrong label is another class, uniformly.
    shift = rng.integers(1, 10, labels.shape)
    noisy = np.where(wrong, (labels + shift) % 10, labels).astype(np.int32)
    return images, labels, noisy


class _Conv3x3(nn.Module):
    """A 3x3 'same' convolution as one matrix product over the 9 shifted copies of the input.

    The same function as ``nn.Conv(features, (3, 3))``, several times faster
    than XLA's CPU convolution on images this small.
    """

    features: int

    @nn.compact
    def __call__(self, x):
        h, w = x.shape[1:3]
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        patches = [padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)]
        return nn.Dense(self.features)(jnp.concatenate(patches, axis=-1))


class _DigitsCNN(nn.Module):
    norm: bool = False

    @nn.compact
    def __call__(self, x):
        for features in DIGITS_FEATURES:
            x = _Conv3x3(features)(x)
            if self.norm:
                x = nn.GroupNorm(num_groups=4)(x)
            x = nn.relu(x)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(DIGITS_HIDDEN)(x))
        return nn.Dense(10)(x)


def _digits_arrays():
    images, labels, noisy = _digits()
    return jnp.asarray(images), jnp.asarray(labels), jnp.asarray(noisy)


def _digits_cnn_task() -> Task:
    model = _DigitsCNN()
    images, labels, noisy = _digits_arrays()

    def init(key):
        return model.init(key, jnp.zeros((1, 8, 8, 1)))

    def batch(key):
        k_rows, k_corrupt, k_pixels = jax.random.split(key, 3)
        rows = jax.random.randint(k_rows, (DIGITS_BATCH,), 0, images.shape[0])
        x = images[rows]
        # Now and then a corrupted batch: random saturated pixels, 30x the range.
        corrupt = jax.random.bernoulli(k_corrupt, DIGITS_CORRUPT_P)
        garbage = DIGITS_CORRUPT_SCALE * jax.random.uniform(k_pixels, x.shape)
        return jnp.where(corrupt, garbage, x), x, noisy[rows], labels[rows]

    def loss(params, batch):
        x_seen, x, noisy_labels, true_labels = batch
        seen = optax.softmax_cross_entropy_with_integer_labels(
            model.apply(params, x_seen), noisy_labels
        ).mean()
        clean = optax.softmax_cross_entropy_with_integer_labels(
            model.apply(params, x), true_labels
        ).mean()
        return seen, clean

    return Task(
        name="digits_cnn",
        description=f"CNN (3x3 convs {DIGITS_FEATURES[0]}, {DIGITS_FEATURES[1]}, dense "
        f"{DIGITS_HIDDEN}) on the 8x8 digits of scikit-learn, "
        f"{DIGITS_LABEL_NOISE:.0%} wrong labels, corrupted batches (p={DIGITS_CORRUPT_P}, "
        f"saturated pixels {DIGITS_CORRUPT_SCALE:g}x the range); loss on the clean images "
        "with their true labels; SGD momentum 0.9",
        init=init,
        loss=loss,
        batch=batch,
        base=lambda lr: optax.sgd(lr, momentum=0.9),
        base_name="sgd(momentum=0.9)",
        learning_rate=0.05,
        steps=600,
        quick_steps=60,
    )


def _digits_cnn_norm_task() -> Task:
    model = _DigitsCNN(norm=True)
    images, labels, _ = _digits_arrays()

    def init(key):
        return model.init(key, jnp.zeros((1, 8, 8, 1)))

    def batch(key):
        rows = jax.random.randint(key, (DIGITS_BATCH,), 0, images.shape[0])
        return images[rows], labels[rows]

    def loss(params, batch):
        x, y = batch
        ce = optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y).mean()
        return ce, ce

    return Task(
        name="digits_cnn_norm",
        description="the digits CNN with GroupNorm after each convolution, clean labels and "
        "images, Adam",
        init=init,
        loss=loss,
        batch=batch,
        base=lambda lr: optax.adam(lr),
        base_name="adam",
        learning_rate=1e-3,
        steps=600,
        quick_steps=60,
        stable=True,
    )


FP16_DIGITS_SCALE = 255.0 / 16.0  # raw 8-bit pixel values (0-255), unnormalised
FP16_DIGITS_BATCH = 64
FP16_DIGITS_WIDTH = 128
FP16_DIGITS_CODE = 16


class _DigitsAutoencoder(nn.Module):
    """An MLP autoencoder of the 64 pixels, computed in float16 (float32 parameters)."""

    @nn.compact
    def __call__(self, x):
        for width in (FP16_DIGITS_WIDTH, FP16_DIGITS_CODE, FP16_DIGITS_WIDTH):
            x = nn.relu(nn.Dense(width, dtype=jnp.float16)(x))
        return nn.Dense(64, dtype=jnp.float16)(x)


def _digits_fp16_task() -> Task:
    model = _DigitsAutoencoder()
    images, _, _ = _digits_arrays()
    pixels = (16.0 * FP16_DIGITS_SCALE * images.reshape(images.shape[0], 64)).astype(jnp.float16)

    def init(key):
        return model.init(key, jnp.zeros((1, 64), jnp.float16))

    def batch(key):
        return pixels[jax.random.randint(key, (FP16_DIGITS_BATCH,), 0, pixels.shape[0])]

    def loss(params, x):
        err = model.apply(params, x).astype(jnp.float32) - x.astype(jnp.float32)
        # A sum over the batch and the pixels (a log-likelihood); reported as a
        # relative squared error.
        return 0.5 * jnp.sum(err**2), jnp.mean(err**2) / jnp.mean(x.astype(jnp.float32) ** 2)

    return Task(
        name="digits_fp16",
        description=f"MLP autoencoder (64-{FP16_DIGITS_WIDTH}-{FP16_DIGITS_CODE}-"
        f"{FP16_DIGITS_WIDTH}-64) of the digits' raw 8-bit pixels (0-255), float16 compute "
        "(float32 master weights), sum-reduced squared error: unscaled gradients overflow "
        "float16; the stabilizer methods opt in to loss scaling here (loss_scaling=True); "
        "loss: relative squared error; Adam",
        init=init,
        loss=loss,
        batch=batch,
        base=lambda lr: optax.adam(lr),
        base_name="adam",
        learning_rate=1e-3,
        steps=600,
        quick_steps=60,
        loss_scaling=True,
    )


# ----------------------------------------------------------------------------
# A character-level language model on the standard library's own sources.

CHAR_FILES = (
    "argparse.py",
    "collections/__init__.py",
    "dataclasses.py",
    "functools.py",
    "inspect.py",
    "textwrap.py",
    "enum.py",
    "json/decoder.py",
    "json/encoder.py",
    "heapq.py",
    "difflib.py",
    "fractions.py",
)
CHAR_MAX_BYTES = 400_000
CHAR_VOCAB = 128
CHAR_LEN = 32
CHAR_DIM = 32
CHAR_HEADS = 2
CHAR_LAYERS = 2
CHAR_BATCH = 8
CHAR_WARMUP = 60
CHAR_STEPS = 600


@functools.cache
def stdlib_text() -> np.ndarray:
    """The bytes of ``CHAR_FILES`` from this interpreter's standard library (uint8, < 128).

    Files missing from this Python version are skipped; bytes outside ASCII
    become ``?``. At most ``CHAR_MAX_BYTES``.
    """
    root = pathlib.Path(os.__file__).parent
    parts = [(root / f).read_bytes() for f in CHAR_FILES if (root / f).is_file()]
    data = np.frombuffer(b"\n".join(parts)[:CHAR_MAX_BYTES], dtype=np.uint8)
    if data.size < 10 * CHAR_LEN:
        raise RuntimeError(f"too little of the standard library's source found under {root}")
    return np.where(data < CHAR_VOCAB, data, ord("?")).astype(np.uint8)


def _attention(x):
    """Causal multi-head self-attention over ``[B, T, D]``."""
    b, t, d = x.shape
    h = CHAR_HEADS
    q, k, v = jnp.split(nn.Dense(3 * d)(x).reshape(b, t, 3 * h, d // h), 3, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // h)
    causal = jnp.tril(jnp.ones((t, t), bool))
    attn = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
    return nn.Dense(d)(jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, t, d))


class _Block(nn.Module):
    """A transformer block: causal self-attention and a GELU MLP, each residual.

    Post-LN (the original transformer's, which needs warm-up) normalises the
    residual stream after each sum; pre-LN (GPT-2's) normalises each branch's
    input and leaves the stream alone.
    """

    pre_ln: bool

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]

        def mlp(y):
            return nn.Dense(d)(nn.gelu(nn.Dense(4 * d)(y)))

        if self.pre_ln:
            x = x + _attention(nn.LayerNorm()(x))
            return x + mlp(nn.LayerNorm()(x))
        x = nn.LayerNorm()(x + _attention(x))
        return nn.LayerNorm()(x + mlp(x))


class _CharLM(nn.Module):
    pre_ln: bool

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(CHAR_VOCAB, CHAR_DIM)(tokens)
        pos = self.param("pos", nn.initializers.normal(0.02), (CHAR_LEN, CHAR_DIM))
        x = x + pos[: tokens.shape[1]]
        for _ in range(CHAR_LAYERS):
            x = _Block(self.pre_ln)(x)
        if self.pre_ln:
            x = nn.LayerNorm()(x)
        return nn.Dense(CHAR_VOCAB)(x)


def _char_lm(name: str, warmup: bool) -> Task:
    # Without warm-up: post-LN, the form that needs it; with warm-up: pre-LN.
    model = _CharLM(pre_ln=warmup)
    text = jnp.asarray(stdlib_text(), jnp.int32)

    def init(key):
        return model.init(key, jnp.zeros((1, CHAR_LEN), jnp.int32))

    def batch(key):
        starts = jax.random.randint(key, (CHAR_BATCH,), 0, text.shape[0] - CHAR_LEN - 1)
        window = jnp.arange(CHAR_LEN + 1)
        return text[starts[:, None] + window]

    def loss(params, tokens):
        logits = model.apply(params, tokens[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return ce, ce

    common = dict(
        init=init,
        loss=loss,
        batch=batch,
        steps=600,
        quick_steps=60,
    )
    what = (
        f"byte-level {'pre' if warmup else 'post'}-LN transformer LM, {CHAR_LAYERS} layers, "
        f"d={CHAR_DIM}, context {CHAR_LEN}, on {len(CHAR_FILES)} files of Python's standard "
        "library"
    )
    if not warmup:
        return Task(
            name=name,
            description=f"{what}, Adam, no warm-up",
            base=lambda lr: optax.adam(lr),
            base_name="adam",
            learning_rate=1e-2,
            **common,
        )

    def base(lr):
        # The stabilizer gets the peak learning rate (the schedule starts at 0).
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, CHAR_WARMUP, CHAR_STEPS, lr / 10)
        return optax.adam(schedule)

    return Task(
        name=name,
        description=f"{what}, Adam with a {CHAR_WARMUP}-step linear warm-up and a cosine decay",
        base=base,
        base_name=f"adam, warm-up {CHAR_WARMUP} steps, cosine decay",
        learning_rate=1e-3,
        stable=True,
        **common,
    )


TASKS_MORE = {
    "gru_copy": _gru_copy_task,
    "lstm_adding": _lstm_adding_task,
    "tanh_deep": _tanh_deep_task,
    "relu_deep_spike": _relu_deep_spike_task,
    "digits_cnn": _digits_cnn_task,
    "digits_fp16": _digits_fp16_task,
    "char_lm": lambda: _char_lm("char_lm", warmup=False),
    "digits_cnn_norm": _digits_cnn_norm_task,
    "char_lm_warmup": lambda: _char_lm("char_lm_warmup", warmup=True),
}
