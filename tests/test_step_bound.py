"""The step bound (SPEC.md, "Step bound"), with numbers worked out by hand.

With a learning rate ``lr`` and ``param_step_bound = b``, a step clips at
``min(t, b * ||params|| / lr)``. Parameters ``[1, 1, 1, 1]`` have norm 2; at
``lr = 1e-2`` and ``b = 1e-3`` the bound is ``0.1 * 2 = 0.2``, while the
learning rate's threshold is ``0.1 * sqrt(1 / 1e-2) = 1``.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradflow as og
from optax_gradflow import learning_rate as learning_rate_lib
from optax_gradflow import transform
from optax_gradflow.constants import Event

CFG = og.StabilizerConfig(param_step_bound=1e-3)
PARAMS = {"w": jnp.ones(4)}


def _grads(value):
    return {"w": jnp.full(4, value, jnp.float32)}


def test_the_default_has_no_bound():
    assert og.StabilizerConfig().param_step_bound == 0.0
    tx = og.stabilize(1e-2)
    state = tx.init(PARAMS)
    out, _ = tx.update(_grads(0.25), state, PARAMS)  # norm 0.5 < t = 1
    np.testing.assert_allclose(optax.tree.norm(out), 0.5, rtol=1e-6)


def test_a_norm_under_the_threshold_is_clipped_at_the_bound():
    tx = og.stabilize(1e-2, config=CFG)
    state = tx.init(PARAMS)
    # norm 0.5: under t = 1, over the bound 0.2.
    out, new = tx.update(_grads(0.25), state, PARAMS)
    np.testing.assert_allclose(optax.tree.norm(out), 0.2, rtol=1e-6)
    np.testing.assert_allclose(out["w"], np.full(4, 0.1), rtol=1e-6)  # 0.25 * 0.2 / 0.5
    assert int(new.clip_count) == 1
    assert int(new.explosion_count) == 0
    assert int(new.event_flags.newest()) & Event.CLIPPED


def test_the_bound_moves_neither_the_tracker_nor_the_counts_of_explosions():
    bounded, plain = og.stabilize(1e-2, config=CFG), og.stabilize(1e-2)
    b_state, p_state = bounded.init(PARAMS), plain.init(PARAMS)
    # 0.5 (calm), 2.0 (clipped by t = 1), 4.0 (an explosion: over 3 * t).
    for value in (0.25, 1.0, 2.0):
        b_out, b_state = bounded.update(_grads(value), b_state, PARAMS)
        _, p_state = plain.update(_grads(value), p_state, PARAMS)
        np.testing.assert_allclose(optax.tree.norm(b_out), 0.2, rtol=1e-6)
    for name in ("clip_threshold", "ema_mean", "ema_var", "centre_anchor", "explosion_count"):
        np.testing.assert_array_equal(getattr(b_state, name), getattr(p_state, name), err_msg=name)
    assert int(b_state.explosion_count) == 1
    assert int(b_state.clip_count) == 3 and int(p_state.clip_count) == 2


def test_the_bound_follows_the_parameters_and_the_learning_rate():
    tx = og.stabilize(1e-3, config=CFG)  # t = 0.1 * sqrt(1000) = 3.16
    params = {"w": jnp.full(4, 3.0)}  # norm 6: bound 1e-3 / 1e-3 * 6 = 6
    state = tx.init(params)
    out, _ = tx.update(_grads(5.0), state, params)  # norm 10: clipped at t
    np.testing.assert_allclose(optax.tree.norm(out), np.sqrt(1000.0) * 0.1, rtol=1e-6)
    small = {"w": jnp.full(4, 0.5)}  # norm 1: bound 1
    out, _ = tx.update(_grads(5.0), state, small)
    np.testing.assert_allclose(optax.tree.norm(out), 1.0, rtol=1e-6)


def test_a_schedule_gives_its_peak():
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 20, 300)
    tx = og.stabilize(schedule, config=CFG)
    state = tx.init(PARAMS)
    out, _ = tx.update(_grads(0.25), state, PARAMS)
    np.testing.assert_allclose(optax.tree.norm(out), 0.2, rtol=1e-5)


def test_no_bound_without_a_learning_rate_or_with_zero_parameters():
    # Data mode (no learning rate; no parameters' cap on the first norm either).
    tx = og.stabilize(config=dataclasses.replace(CFG, param_threshold_scale=0.0))
    state = tx.init(PARAMS)
    out, _ = tx.update(_grads(0.25), state, PARAMS)  # the first norm starts the tracker
    np.testing.assert_allclose(optax.tree.norm(out), 0.5, rtol=1e-6)
    tx = og.stabilize(1e-2, config=CFG)
    zeros = {"w": jnp.zeros(4)}
    state = tx.init(zeros)
    out, _ = tx.update(_grads(0.25), state, zeros)  # 0 * P: no bound, not a zero clip
    np.testing.assert_allclose(optax.tree.norm(out), 0.5, rtol=1e-6)


def test_without_params_the_bound_is_off_with_a_warning():
    tx = og.stabilize(1e-2, config=CFG)
    state = tx.init(PARAMS)
    with pytest.warns(UserWarning, match="without params"):
        out, _ = tx.update(_grads(0.25), state)
    np.testing.assert_allclose(optax.tree.norm(out), 0.5, rtol=1e-6)
    # No warning when there is no bound to lose.
    plain = og.stabilize(1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.update(_grads(0.25), plain.init(PARAMS))


def test_jitted_in_a_chain_and_under_inject_hyperparams():
    opt = optax.chain(og.stabilize(1e-2, config=CFG), optax.sgd(1e-2))
    state = opt.init(PARAMS)
    out, _ = jax.jit(opt.update)(_grads(0.25), state, PARAMS)
    # The SGD step is at most 1e-3 of the parameters' norm: 1e-2 * 0.2 = 0.002.
    np.testing.assert_allclose(optax.tree.norm(out), 2e-3, rtol=1e-6)

    # A traced learning rate: the bound follows it (lr 1e-2 here).
    injected = optax.inject_hyperparams(
        lambda learning_rate: og.stabilize(learning_rate, config=CFG)
    )(learning_rate=1e-2)
    state = injected.init(PARAMS)
    out, _ = jax.jit(injected.update)(_grads(0.25), state, PARAMS)
    np.testing.assert_allclose(optax.tree.norm(out), 0.2, rtol=1e-6)


def test_the_pure_step_takes_params_and_the_learning_rate():
    state = og.stabilize(1e-2, config=CFG).init(PARAMS)
    out, _ = transform.step(_grads(0.25), state, CFG, params=PARAMS, learning_rate=1e-2)
    np.testing.assert_allclose(optax.tree.norm(out), 0.2, rtol=1e-6)
    out, _ = transform.step(_grads(0.25), state, CFG)
    np.testing.assert_allclose(optax.tree.norm(out), 0.5, rtol=1e-6)


def test_the_stabilized_wrapper_bounds_too():
    opt = og.stabilized(optax.sgd(1e-2), 1e-2, config=CFG)
    state = opt.init(PARAMS)
    out, _ = opt.update(_grads(0.25), state, PARAMS)
    np.testing.assert_allclose(optax.tree.norm(out), 2e-3, rtol=1e-6)


def test_bound_scale_and_config_checks():
    assert float(learning_rate_lib.bound_scale(1e-2, 1e-3)) == float(np.float32(0.1))
    assert learning_rate_lib.bound_scale(1e-2, 0.0) is None
    assert learning_rate_lib.bound_scale(None, 1e-3) is None
    with pytest.raises(ValueError, match="param_step_bound"):
        dataclasses.replace(CFG, param_step_bound=-1.0)
    with pytest.raises(ValueError, match="param_step_bound"):
        dataclasses.replace(CFG, param_step_bound=float("inf"))


# --- PyTorch: the same numbers -------------------------------------------------------


def test_torch_clips_at_the_bound():
    torch = pytest.importorskip("torch")
    import optax_gradflow.torch as ogt

    w = torch.nn.Parameter(torch.ones(4))
    w.grad = torch.full((4,), 0.25)
    stab = ogt.GradientFlowStabilizer(1e-2, config=CFG)
    norm = stab.clip_gradients([w])
    assert float(norm) == pytest.approx(0.5, rel=1e-6)  # the norm before the clip
    np.testing.assert_allclose(w.grad.numpy(), np.full(4, 0.1), rtol=1e-6)
    assert int(stab.state["clip_count"]) == 1 and int(stab.state["explosion_count"]) == 0

    # Through an optimizer given as optimizer=: its lr (1e-2) sets the bound.
    opt = torch.optim.SGD([w], lr=1e-2)
    stab = ogt.GradientFlowStabilizer(optimizer=opt, config=CFG)
    w.grad = torch.full((4,), 0.25)
    stab.clip_gradients([w])
    np.testing.assert_allclose(w.grad.norm().item(), 0.2, rtol=1e-6)


def test_torch_functional_update_takes_the_learning_rate():
    torch = pytest.importorskip("torch")
    import optax_gradflow.torch as ogt

    state = ogt.init_state(1e-2, config=CFG)
    grads = [torch.full((4,), 0.25)]
    out, _ = ogt.update(grads, state, [torch.ones(4)], config=CFG, learning_rate=1e-2)
    np.testing.assert_allclose(out[0].norm().item(), 0.2, rtol=1e-6)
    out, _ = ogt.update(grads, state, [torch.ones(4)], config=CFG)  # no learning rate
    np.testing.assert_allclose(out[0].norm().item(), 0.5, rtol=1e-6)
