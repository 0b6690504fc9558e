"""The step bound (SPEC.md, "Step bound") on a problem where it must not bind.

A softmax regression on the 8x8 digits that ship with scikit-learn (1797
images, 64 inputs, 10 classes), trained for 300 steps of 64 examples from
zero weights or from small random ones, with plain SGD, SGD with momentum or
Adam. Such a model's gradient is about as large as its weights, so a step
bound of ``rho * ||w|| / lr`` binds on every SGD step. Columns: the
optimizer alone, chained after the stabilizer with its defaults (no bound),
and with ``param_step_bound`` (default 0.001); the full-data loss after the
last step, median over ``--seeds`` seeds.

    python benchmarks/step_bound.py [--seeds 3] [--steps 300] [--bound 0.001]
"""

from __future__ import annotations

import argparse
import dataclasses

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


def _data():
    x, y = load_digits(return_X_y=True)
    return jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y)


def _loss(params, xb, yb):
    logits = xb @ params["w"] + params["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()


def train(tx, x, y, *, init: str, seed: int, steps: int) -> float:
    key = jax.random.PRNGKey(seed)
    w = jnp.zeros((64, 10)) if init == "zeros" else 0.1 * jax.random.normal(key, (64, 10))
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
    return float(_loss(params, x, y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--bound", type=float, default=1e-3)
    args = parser.parse_args()
    x, y = _data()
    bounded = dataclasses.replace(og.StabilizerConfig(), param_step_bound=args.bound)
    header = f"| optimizer | start | alone | stabilizer | stabilizer, bound {args.bound:g} |"
    print(header)
    print("|---|---|---|---|---|")
    for name, (lr, make) in OPTIMIZERS.items():
        for init in ("zeros", "normal(0, 0.1)"):
            row = []
            for method in ("alone", "stabilizer", "bound"):
                finals = []
                for seed in range(args.seeds):
                    if method == "alone":
                        tx = make(lr)
                    else:
                        config = bounded if method == "bound" else og.StabilizerConfig()
                        tx = optax.chain(og.stabilize(lr, config=config), make(lr))
                    finals.append(train(tx, x, y, init=init, seed=seed, steps=args.steps))
                row.append(float(np.median(finals)))
            cells = " | ".join(f"{v:.3f}" for v in row)
            print(f"| {name} | {init} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
