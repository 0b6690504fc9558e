"""The stabilizer on a healthy problem that neither stability set holds.

A softmax regression on the 8x8 digits that ship with scikit-learn (1797
images, 64 inputs, 10 classes), trained for 300 steps of 64 examples from
zero weights or from small random ones, with plain SGD, SGD with momentum or
Adam. Nothing here needs clipping: the stabilizer must cost nothing. Such a
model's gradient is about as large as its weights (from zero weights,
larger), unlike a deep network's, so a parameter-relative bound on the step
binds on every step here (BENCHMARKS.md, "The step bound").

Columns: the full-data loss after the last step, median over ``--seeds``
seeds, for the optimizer alone and chained after the stabilizer given the
learning rate (``stabilize(lr)``) or told nothing (``stabilize()``), then
the stabilizer's clipped steps and explosions (``stabilize(lr)``, median).

    python benchmarks/softmax_regression.py [--seeds 3] [--steps 300]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import optax_gradflow as og

OPTIMIZERS = {
    "sgd 0.1": (0.1, lambda lr: optax.sgd(lr)),
    "sgd 0.5": (0.5, lambda lr: optax.sgd(lr)),
    "sgd+momentum 0.05": (0.05, lambda lr: optax.sgd(lr, momentum=0.9)),
    "adam 0.01": (0.01, lambda lr: optax.adam(lr)),
}
STARTS = ("zeros", "normal(0, 0.1)")


def _data():
    x, y = load_digits(return_X_y=True)
    return jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y)


def _loss(params, xb, yb):
    logits = xb @ params["w"] + params["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()


def train(tx, x, y, *, start: str, seed: int, steps: int):
    """(final full-data loss, the optimizer state after the last step)."""
    key = jax.random.PRNGKey(seed)
    w = jnp.zeros((64, 10)) if start == "zeros" else 0.1 * jax.random.normal(key, (64, 10))
    params = {"w": w, "b": jnp.zeros(10)}
    state = tx.init(params)

    @jax.jit
    def step(params, state, i):
        idx = jax.random.randint(jax.random.fold_in(key, i), (64,), 0, x.shape[0])
        loss, grads = jax.value_and_grad(_loss)(params, x[idx], y[idx])
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    for i in range(steps):
        params, state = step(params, state, i)
    return float(_loss(params, x, y)), state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    x, y = _data()
    print(
        "| optimizer | start | alone | stabilizer, lr | stabilizer, told nothing "
        "| clipped steps, explosions (lr) |"
    )
    print("|---|---|---|---|---|---|")
    for name, (lr, make) in OPTIMIZERS.items():
        for start in STARTS:
            finals: dict[str, list[float]] = {"alone": [], "lr": [], "data": []}
            clips, explosions = [], []
            for seed in range(args.seeds):
                run = dict(start=start, seed=seed, steps=args.steps)
                finals["alone"].append(train(make(lr), x, y, **run)[0])
                loss, state = train(optax.chain(og.stabilize(lr), make(lr)), x, y, **run)
                finals["lr"].append(loss)
                _, flow = og.find_states(state)[0]
                clips.append(int(flow.clip_count))
                explosions.append(int(flow.explosion_count))
                finals["data"].append(train(optax.chain(og.stabilize(), make(lr)), x, y, **run)[0])
            cells = " | ".join(f"{np.median(v):.3f}" for v in finals.values())
            counts = f"{int(np.median(clips))}, {int(np.median(explosions))}"
            print(f"| {name} | {start} | {cells} | {counts} |", flush=True)


if __name__ == "__main__":
    main()
