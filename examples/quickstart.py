"""Quickstart: a deep unnormalised MLP at a high learning rate, with and without the stabilizer.

Run: python examples/quickstart.py
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import optax_gradflow

LEARNING_RATE = 3e-2
STEPS = 300


class DeepMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, depth: int = 8, width: int = 64):
        self.layers = nnx.List(
            [nnx.Linear(16 if i == 0 else width, width, rngs=rngs) for i in range(depth)]
        )
        self.head = nnx.Linear(width, 1, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return self.head(x)


def make_data(key, n=512):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, 16))
    y = jnp.sin(x @ jax.random.normal(kw, (16, 1)))
    return x, y


def train(tx, seed=0):
    model = DeepMLP(nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax_gradflow.stabilized(tx, LEARNING_RATE), wrt=nnx.Param)
    x, y = make_data(jax.random.PRNGKey(seed))

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            loss = jnp.mean((model(x) - y) ** 2)
            # Differentiate the scaled loss; the stabilizer unscales the gradients.
            return optax_gradflow.scale_loss(loss, optimizer.opt_state), loss

        (_, loss), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads, value=loss)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(STEPS)]
    return losses, optimizer


def main():
    plain, _ = train(optax.adam(LEARNING_RATE))
    stable, optimizer = train(optax_gradflow.stabilized(optax.adam(LEARNING_RATE), LEARNING_RATE))
    print(f"{'':>12} {'first loss':>12} {'final loss':>12}")
    print(f"{'adam':>12} {plain[0]:12.4f} {plain[-1]:12.4f}")
    print(f"{'stabilized':>12} {stable[0]:12.4f} {stable[-1]:12.4f}")
    flow = optax_gradflow.find_states(optimizer.opt_state)[0][1]
    print(
        f"threshold {float(flow.clip_threshold):.3f}, loss scale {float(flow.loss_scale):.3f}, "
        f"clipped {int(flow.clip_count)}, explosions {int(flow.explosion_count)}, "
        f"non-finite {int(flow.nonfinite_count)}, emergencies {int(flow.emergency_count)}"
    )


if __name__ == "__main__":
    main()
