"""The demo's model, data stream and training runs."""

from __future__ import annotations

import functools
import math
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gradflow
from optax_gradflow._demo.scenario import (
    ADAM,
    AIF,
    BATCH,
    CHUNK,
    CLIP_NORM,
    DEPTH,
    EVAL_SIZE,
    GRADFLOW,
    INPUT_DIM,
    LEARNING_RATE,
    MAX_CONSECUTIVE_ERRORS,
    MISSING_RATE,
    NOISE,
    OUTLIER_FACTOR,
    OUTLIER_RATE,
    WIDTH,
)
from optax_gradflow.monitor import Monitor


class RunResult(NamedTuple):
    """What one training run produced (host arrays)."""

    name: str
    eval_loss: np.ndarray  # clean loss after each step
    grad_norm: np.ndarray  # unscaled global gradient norm of each step
    initial_loss: float
    opt_state: Any
    seconds: float


def _model_class():
    from flax import nnx

    class DeepMLP(nnx.Module):
        """ReLU layers without normalisation, then a linear head."""

        def __init__(self, rngs: nnx.Rngs):
            self.layers = nnx.List(
                [nnx.Linear(INPUT_DIM if i == 0 else WIDTH, WIDTH, rngs=rngs) for i in range(DEPTH)]
            )
            self.head = nnx.Linear(WIDTH, 1, rngs=rngs)

        def __call__(self, x):
            for layer in self.layers:
                x = jax.nn.relu(layer(x))
            return self.head(x)[:, 0]

    return DeepMLP


def _teacher(x: jax.Array) -> jax.Array:
    direction = jax.random.normal(jax.random.PRNGKey(1234), (INPUT_DIM,)) / 4.0
    return jnp.sin(3.0 * (x @ direction))


def _corruption(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(outlier, missing) flags of the batch drawn from ``key``."""
    _, _, ko, km, _ = jax.random.split(key, 5)
    return jax.random.bernoulli(ko, OUTLIER_RATE), jax.random.bernoulli(km, MISSING_RATE)


def _batch(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One batch of the stream: clean, off by OUTLIER_FACTOR, or with a NaN target."""
    kx, kn, _, _, ki = jax.random.split(key, 5)
    outlier, missing = _corruption(key)
    x = jax.random.normal(kx, (BATCH, INPUT_DIM))
    y = _teacher(x) + NOISE * jax.random.normal(kn, (BATCH,))
    y = jnp.where(outlier, OUTLIER_FACTOR * y, y)
    slot = jax.random.randint(ki, (), 0, BATCH)
    return x, jnp.where(missing & (jnp.arange(BATCH) == slot), jnp.nan, y)


def stream_keys(seed: int, steps: int) -> jax.Array:
    """The PRNG key of each step's batch; the three runs share them."""
    return jax.random.split(jax.random.PRNGKey(seed), steps)


def corrupted_steps(seed: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The steps whose batch has outlier targets, and those with a NaN target."""
    outlier, missing = jax.jit(jax.vmap(_corruption))(stream_keys(seed, steps))
    return np.flatnonzero(np.asarray(outlier)), np.flatnonzero(np.asarray(missing))


def _optimizer(name: str) -> optax.GradientTransformation:
    if name == ADAM:
        return optax.adam(LEARNING_RATE)
    if name == AIF:
        return optax.apply_if_finite(
            optax.chain(optax.clip_by_global_norm(CLIP_NORM), optax.adam(LEARNING_RATE)),
            max_consecutive_errors=MAX_CONSECUTIVE_ERRORS,
        )
    return optax_gradflow.stabilized(optax.adam(LEARNING_RATE), LEARNING_RATE)


class _Runner(NamedTuple):
    graphdef: Any
    tx: optax.GradientTransformation
    mse: Any
    run_chunk: Any


@functools.cache
def _runner(name: str) -> _Runner:
    """The jitted chunk of training steps for one optimizer, built once per process."""
    from flax import nnx

    graphdef, _ = nnx.split(_model_class()(nnx.Rngs(0)), nnx.Param)
    tx = _optimizer(name)
    stabilizer = name == GRADFLOW

    def mse(p, x, y):
        return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)

    def train_step(carry, inputs, x_eval, y_eval):
        p, state = carry
        key, active = inputs
        x, y = _batch(key)
        loss, grads = jax.value_and_grad(mse)(p, x, y)
        if stabilizer:
            # The loss feeds the stabilizer's loss gate; no loss scaling (off by default).
            updates, new_state = tx.update(grads, state, p, value=loss)
        else:
            updates, new_state = tx.update(grads, state, p)
        new_p = optax.apply_updates(p, updates)
        # Steps past the end of the run (padding of the last chunk) change nothing.
        new_carry = jax.tree.map(
            lambda new, old: jnp.where(active, new, old), (new_p, new_state), carry
        )
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        return new_carry, (mse(new_carry[0], x_eval, y_eval), norm)

    @jax.jit
    def run_chunk(carry, keys, active, x_eval, y_eval):
        body = functools.partial(train_step, x_eval=x_eval, y_eval=y_eval)
        return jax.lax.scan(body, carry, (keys, active))

    return _Runner(graphdef, tx, jax.jit(mse), run_chunk)


def train(
    name: str,
    *,
    steps: int,
    seed: int,
    bar: Any = None,
    monitor: Monitor | None = None,
) -> RunResult:
    """Trains the MLP with the optimizer ``name``, in jitted chunks of ``CHUNK`` steps.

    ``bar`` (a tqdm bar) advances and ``monitor`` is called once per chunk:
    for the monitor, a chunk is one call, so ``Monitor(every=1)`` reads the
    device once per ``CHUNK`` steps.
    """
    from flax import nnx

    start = time.perf_counter()
    runner = _runner(name)
    _, params = nnx.split(_model_class()(nnx.Rngs(seed)), nnx.Param)
    opt_state = runner.tx.init(params)
    x_eval = jax.random.normal(jax.random.PRNGKey(seed + 10_000), (EVAL_SIZE, INPUT_DIM))
    y_eval = _teacher(x_eval)

    n_chunks = math.ceil(steps / CHUNK)
    keys = stream_keys(seed, n_chunks * CHUNK)
    active = np.arange(n_chunks * CHUNK) < steps
    initial_loss = float(runner.mse(params, x_eval, y_eval))
    carry = (params, opt_state)
    losses, norms = [], []
    if monitor is not None:
        monitor(opt_state)  # the baseline: step 0
    for c in range(n_chunks):
        part = slice(c * CHUNK, (c + 1) * CHUNK)
        carry, (loss, norm) = runner.run_chunk(carry, keys[part], active[part], x_eval, y_eval)
        losses.append(np.asarray(loss))
        norms.append(np.asarray(norm))
        if monitor is not None:
            monitor(carry[1])
        if bar is not None:
            bar.update(min(CHUNK, steps - c * CHUNK))
    if monitor is not None:
        monitor.flush()
    return RunResult(
        name=name,
        eval_loss=np.concatenate(losses)[:steps],
        grad_norm=np.concatenate(norms)[:steps],
        initial_loss=initial_loss,
        opt_state=carry[1],
        seconds=time.perf_counter() - start,
    )
