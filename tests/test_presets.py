"""Presets against the reference implementations they reproduce (JAX side)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradflow as og
from optax_gradflow import presets

# --- clip_only == optax.clip_by_global_norm --------------------------------


def _random_tree(key, n_leaves, scale):
    keys = jax.random.split(key, n_leaves)
    shapes = [(3,), (2, 5), (), (4, 1, 3), (7,), (1,)]
    return {
        f"leaf{i}": scale * jax.random.normal(k, shapes[i % len(shapes)])
        for i, k in enumerate(keys)
    }


@pytest.mark.parametrize("n_leaves", [1, 2, 6])
@pytest.mark.parametrize("max_norm", [0.05, 1.0, 30.0])
def test_clip_only_equals_clip_by_global_norm_bit_for_bit(n_leaves, max_norm):
    ours = og.stabilize(config=presets.clip_only(max_norm))
    theirs = optax.clip_by_global_norm(max_norm)
    ours_update, theirs_update = jax.jit(ours.update), jax.jit(theirs.update)
    for seed in range(12):
        # Tree norms from 1e-3 to 1e3 times the threshold: clipped and not.
        scale = max_norm * 10.0 ** (seed / 2 - 3)
        tree = _random_tree(jax.random.PRNGKey(seed), n_leaves, scale)
        out, _ = ours_update(tree, ours.init(tree))
        ref, _ = theirs_update(tree, theirs.init(tree))
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
            np.testing.assert_array_equal(a, b)


def test_clip_only_passes_optax_clip_by_global_norm_cases():
    # The cases of optax's own clip_by_global_norm test: updates
    # ([500, 5], [300, 3]) clipped at 1 / i, the clipped result re-clipped at
    # the next threshold, and clipping the original giving the same result.
    # Every seventh of optax's fifty thresholds, to bound compile time.
    original = (jnp.array([500.0, 5.0]), jnp.array([300.0, 3.0]))
    updates = original
    for i in range(1, 51, 7):
        tx = og.stabilize(config=presets.clip_only(1.0 / i))
        update = jax.jit(tx.update)
        updates, _ = update(updates, tx.init(updates))
        assert float(optax.tree.norm(updates)) == pytest.approx(1.0 / i, abs=1e-6)
        again, _ = update(original, tx.init(original))
        for a, b in zip(updates, again, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_clip_only_is_fixed_and_scale_free():
    cfg = presets.clip_only(2.0)
    tx = og.stabilize(config=cfg)
    state = tx.init({"w": jnp.zeros(2)})
    for g in ([300.0, 400.0], [1e-9, 0.0], [3.0, 4.0]):
        _, state = jax.jit(tx.update)({"w": jnp.array(g)}, state)
    assert float(state.clip_threshold) == 2.0
    assert float(state.loss_scale) == 1.0
    assert int(state.explosion_count) == 0 and int(state.emergency_count) == 0


def test_clip_only_skips_nonfinite_where_optax_lets_it_through():
    tree = {"w": jnp.array([jnp.nan, 1.0])}
    ours = og.stabilize(config=presets.clip_only(1.0))
    out, _ = ours.update(tree, ours.init(tree))
    np.testing.assert_array_equal(out["w"], [0.0, 0.0])
    ref, _ = optax.clip_by_global_norm(1.0).update(tree, optax.EmptyState())
    assert np.isnan(ref["w"]).all()


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_clip_only_rejects_bad_max_norm(bad):
    with pytest.raises(ValueError, match="max_norm"):
        presets.clip_only(bad)


def test_presets_compose_with_replace():
    cfg = dataclasses.replace(presets.clip_only(1.0), loss_scaling=True)
    assert cfg.loss_scaling and cfg.initial_threshold == 1.0
    with pytest.raises(ValueError, match="max_threshold"):
        dataclasses.replace(presets.clip_only(1.0), max_threshold=0.5)


# --- autoclip == autoclip.torch.QuantileClip(global_threshold=True) ----------


def _norm_sequence(n, seed=0):
    rng = np.random.default_rng(seed)
    # Heavy-tailed norms with spikes: what AutoClip is for.
    base = np.exp(rng.normal(0.0, 0.5, n)) * np.where(rng.random(n) < 0.05, 30.0, 1.0)
    directions = rng.normal(size=(n, 6))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return (directions * base[:, None]).astype(np.float32)


@pytest.mark.parametrize("percentile, history", [(10.0, 1000), (90.0, 1000), (50.0, 7)])
def test_autoclip_threshold_matches_quantileclip_every_step(percentile, history):
    torch = pytest.importorskip("torch")
    quantile_mod = pytest.importorskip("autoclip.torch")
    grads = _norm_sequence(60)

    param = torch.nn.Parameter(torch.zeros(6))
    clipper = quantile_mod.QuantileClip(
        [param], quantile=percentile / 100.0, history_length=history, global_threshold=True
    )
    tx = og.stabilize(config=presets.autoclip(percentile=percentile, history=history))
    state = tx.init({"w": jnp.zeros(6)})
    update = jax.jit(tx.update)
    for k, g in enumerate(grads):
        # The reference's threshold for this step, read from its history.
        history_t = clipper.state["global_history"]
        ref_threshold = (
            math.inf
            if len(history_t) == 0
            else float(torch.quantile(history_t, percentile / 100.0))
        )
        param.grad = torch.tensor(g)
        clipper.step()
        ref_out = param.grad.numpy()

        out, new_state = update({"w": jnp.asarray(g)}, state)
        if k == 0:
            # First step: no threshold yet, nothing clipped by either.
            assert ref_threshold == math.inf
            np.testing.assert_array_equal(out["w"], g)
        else:
            assert float(state.clip_threshold) == pytest.approx(ref_threshold, rel=1e-5)
            # clip_grad_norm_ divides by (norm + 1e-6): outputs agree to ~1e-6.
            np.testing.assert_allclose(out["w"], ref_out, rtol=2e-5, atol=1e-7)
        state = new_state


# --- mixed_precision == torch.amp.GradScaler == jmp.DynamicLossScale --------


def _finite_pattern(n, seed):
    rng = np.random.default_rng(seed)
    return rng.random(n) > 0.15


def _our_scales(cfg, finite):
    tx = og.stabilize(config=cfg)
    state = tx.init({"w": jnp.zeros(2)})
    update = jax.jit(tx.update)
    scales = []
    for ok in finite:
        g = jnp.array([1.0, 1.0 if ok else jnp.inf])
        _, state = update({"w": g}, state)
        scales.append(float(state.loss_scale))
    return scales


@pytest.mark.parametrize("seed", range(3))
def test_mixed_precision_matches_gradscaler(seed):
    torch = pytest.importorskip("torch")
    finite = _finite_pattern(80, seed)
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    ref = []
    for ok in finite:
        opt.zero_grad()
        scaler.scale(torch.ones(()))  # lets the scaler create its scale tensor
        param.grad = torch.tensor([1.0, 1.0 if ok else math.inf])
        scaler.step(opt)
        scaler.update()
        ref.append(scaler.get_scale())
    # GradScaler has no minimum: give the preset one that never binds here.
    cfg = presets.mixed_precision(growth_interval=3, min_loss_scale=2.0**-60)
    assert _our_scales(cfg, finite) == ref


def test_mixed_precision_never_grows_to_inf_like_gradscaler():
    torch = pytest.importorskip("torch")
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**126, growth_interval=1)
    ref = []
    for _ in range(4):
        scaler.scale(torch.ones(()))
        param.grad = torch.ones(2)
        scaler.step(opt)
        scaler.update()
        ref.append(scaler.get_scale())
    cfg = presets.mixed_precision(initial_scale=2.0**126, growth_interval=1)
    ours = _our_scales(cfg, [True] * 4)
    assert ours == ref == [2.0**127] * 4


def _jmp_scales(finite, min_loss_scale, jit):
    jmp = pytest.importorskip("jmp")
    scale = jmp.DynamicLossScale(
        jnp.float32(2.0**16), period=3, min_loss_scale=jnp.float32(min_loss_scale)
    )
    adjust = jax.jit(lambda s, ok: s.adjust(ok)) if jit else (lambda s, ok: s.adjust(ok))
    out = []
    for ok in finite:
        scale = adjust(scale, jnp.asarray(bool(ok)))
        out.append(float(scale.loss_scale))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_mixed_precision_matches_jmp(seed):
    # Enough overflows to hit the floor of 1 (jmp's default minimum).
    finite = np.concatenate([np.zeros(20, bool), _finite_pattern(60, seed)])
    cfg = presets.mixed_precision(growth_interval=3)
    assert _our_scales(cfg, finite) == _jmp_scales(finite, 1.0, jit=False)


def test_mixed_precision_keeps_its_minimum_where_jmp_loses_it_under_jit():
    # jmp.DynamicLossScale does not flatten min_loss_scale, so through jit the
    # floor falls back to 1. The preset's minimum is static config: it holds.
    finite = np.zeros(25, bool)  # 2**16 halves to 2**-9 without a floor
    floor = 2.0**-5
    eager = _jmp_scales(finite, floor, jit=False)
    jitted = _jmp_scales(finite, floor, jit=True)
    assert min(eager) == floor and min(jitted) == 1.0
    ours = _our_scales(presets.mixed_precision(growth_interval=3, min_loss_scale=floor), finite)
    assert ours == eager


# --- zclip == zclip.ZClip ----------------------------------------------------

ZCLIP_CASES = [
    dict(),  # the package defaults: adaptive scaling, max_grad_norm 1.0
    dict(max_grad_norm=None, clip_option="mean"),
    dict(max_grad_norm=8.0, mode="percentile", z_thresh=2.0),
    dict(max_grad_norm=None, skip_update_on_spike=True, alpha=0.9, warmup_steps=10),
]


def _zclip_reference(kwargs, grads):
    """Runs zclip.ZClip.step; returns per-step (effective threshold, mean, var)."""
    torch = pytest.importorskip("torch")
    zclip_mod = pytest.importorskip("zclip")

    class Recording(zclip_mod.ZClip):
        def _apply_clipping(self, model, clip_val, total_norm):
            self.last_effective = super()._apply_clipping(model, clip_val, total_norm)
            return self.last_effective

    clipper = Recording(**kwargs)
    model = torch.nn.Linear(3, 2, bias=False)  # 6 parameters
    out = []
    for g in grads:
        model.weight.grad = torch.tensor(g.reshape(2, 3))
        clipper.last_effective = None
        clipper.step(model)
        # During ZClip's warm-up only max_grad_norm clips.
        if clipper.last_effective is None:
            effective = math.inf if clipper.max_grad_norm is None else clipper.max_grad_norm
        else:
            effective = clipper.last_effective
        out.append((effective, clipper.mean, clipper.var))
    return out


def _check_against_zclip(out_norm, norm, ref, mean, var, k, warmup):
    effective = ref[k][0]
    # Both clip the norm to the effective threshold (ZClip divides by norm + 1e-6).
    assert out_norm == pytest.approx(min(norm, effective), rel=2e-5)
    if k >= warmup - 1:
        assert mean == pytest.approx(ref[k][1], rel=2e-5)
        assert var == pytest.approx(ref[k][2], rel=1e-4)


@pytest.mark.parametrize("kwargs", ZCLIP_CASES)
def test_zclip_matches_the_zclip_package_every_step(kwargs):
    grads = _norm_sequence(150, seed=3)
    ref = _zclip_reference(kwargs, grads)
    tx = og.stabilize(config=presets.zclip(**kwargs))
    state = tx.init({"w": jnp.zeros(6)})
    update = jax.jit(tx.update)
    warmup = kwargs.get("warmup_steps", 25)
    clipped_steps = 0
    for k, g in enumerate(grads):
        out, state = update({"w": jnp.asarray(g)}, state)
        norm = float(np.linalg.norm(g))
        out_norm = float(jnp.linalg.norm(out["w"]))
        clipped_steps += out_norm < norm * (1 - 1e-4)
        _check_against_zclip(
            out_norm, norm, ref, float(state.ema_mean), float(state.ema_var), k, warmup
        )
    assert clipped_steps > 0  # the sequence exercises the clip


def test_zclip_torch_adapter_matches_the_zclip_package():
    torch = pytest.importorskip("torch")
    from optax_gradflow.torch import functional
    from optax_gradflow.torch import state as torch_state

    kwargs = ZCLIP_CASES[2]
    grads = _norm_sequence(150, seed=4)
    ref = _zclip_reference(kwargs, grads)
    cfg = presets.zclip(**kwargs)
    st = torch_state.init_state(config=cfg)
    for k, g in enumerate(grads):
        (out,), st = functional.update([torch.tensor(g)], st, config=cfg)
        _check_against_zclip(
            float(out.norm()),
            float(np.linalg.norm(g)),
            ref,
            float(st["ema_mean"]),
            float(st["ema_var"]),
            k,
            kwargs.get("warmup_steps", 25),
        )


def test_zclip_variance_fix_is_finch_and_departs_from_the_package():
    # One EMA step by hand after a warm-up of two norms {1, 3}: mean 2, var 1.
    # A norm of 2.5 (z = 0.5, no spike) moves the mean to 0.5 * 2 + 0.5 * 2.5 =
    # 2.25. The package's variance: 0.5 * 1 + 0.5 * (2.5 - 2.25)**2 = 0.53125;
    # Finch's: 0.5 * (1 + 0.5 * (2.5 - 2)**2) = 0.5625.
    common = dict(alpha=0.5, warmup_steps=2, max_grad_norm=None)
    for reference, expected_var in ((True, 0.53125), (False, 0.5625)):
        tx = og.stabilize(config=presets.zclip(reference_variance=reference, **common))
        state = tx.init({"w": jnp.zeros(1)})
        for n in (1.0, 3.0, 2.5):
            _, state = jax.jit(tx.update)({"w": jnp.array([n])}, state)
        assert float(state.ema_mean) == pytest.approx(2.25, rel=1e-6)
        assert float(state.ema_var) == pytest.approx(expected_var, rel=1e-6)


def test_zclip_adaptive_scaling_by_hand():
    # Warm-up {1, 3}: mean 2, std 1. A norm of 12: z = 10 / (1 + 1e-6) > 2.5, so
    # the target is 2 + 2.5 * 1 / (z / 2.5) = 2 + 6.25 / z.
    tx = og.stabilize(config=presets.zclip(warmup_steps=2, max_grad_norm=None))
    state = tx.init({"w": jnp.zeros(1)})
    for n in (1.0, 3.0):
        _, state = jax.jit(tx.update)({"w": jnp.array([n])}, state)
    out, state = jax.jit(tx.update)({"w": jnp.array([12.0])}, state)
    z = 10.0 / (1.0 + 1e-6)
    assert float(out["w"][0]) == pytest.approx(2.0 + 6.25 / z, rel=1e-6)
    assert int(state.clip_count) == 1


# --- seed == the original design ---------------------------------------------

# The defaults of the original design, copied from its SPEC.md table
# ("Hyperparameters", before the "track" rule): seed() must equal them field
# by field. The fields the original did not have (track_*, the emergency's
# hold and re-arm) only act under the "track" rule.
ORIGINAL_DEFAULTS = {
    "initial_threshold": None,
    "min_threshold": 0.1,
    "max_threshold": math.inf,
    "lr_threshold_scale": 0.1,
    "warmup_steps": 100,
    "warmup_multiplier": 2.0,
    "adaptation_interval": 100,
    "adaptation_rule": "median_mad",
    "adaptation_percentile": 90.0,
    "adaptation_k": 3.0,
    "norm_history_size": 1000,
    "zscore_alpha": 0.97,
    "zscore_threshold": 2.5,
    "zscore_eps": 1e-6,
    "zscore_clip": "adaptive_scaling",
    "zscore_clip_factor": 1.0,
    "zscore_skip_spikes": False,
    "zscore_reference_variance": True,
    "threshold_history_size": 100,
    "explosion_factor": 3.0,
    "vanishing_norm": 1e-7,
    "loss_scaling": True,
    "initial_loss_scale": 1.0,
    "min_loss_scale": 0.1,
    "max_loss_scale": 64.0,
    "nonfinite_backoff": 0.5,
    "explosion_backoff": 0.8,
    "vanishing_growth": 1.5,
    "growth_interval": 0,
    "growth_factor": 2.0,
    "loss_scale_history_size": 100,
    "emergency_patience": 5,
    "emergency_threshold_factor": 0.5,
    "emergency_loss_scale_factor": 0.1,
    "emergency_history_size": 32,
    "diagnostics_interval": 500,
    "diagnostics_window": 100,
    "trend_limit": 0.01,
    "variance_limit": 1.0,
    "variance_history_size": 200,
    "event_history_size": 100,
}


def test_seed_is_the_original_design_field_by_field():
    cfg = presets.seed()
    got = {name: getattr(cfg, name) for name in ORIGINAL_DEFAULTS}
    assert got == ORIGINAL_DEFAULTS
    new_fields = {f.name for f in dataclasses.fields(cfg)} - set(ORIGINAL_DEFAULTS)
    assert all(
        name.startswith(("track_", "emergency_"))
        or name in ("exact_clip", "param_threshold_scale", "nonfinite_min_loss_scale")
        for name in new_fields
    ), new_fields
    # The original clipped as (g / r) * t, and had one floor for the scale.
    assert cfg.exact_clip
    assert cfg.nonfinite_min_loss_scale == cfg.min_loss_scale


def test_seed_differs_from_the_default_where_the_redesign_did():
    default, seed = og.StabilizerConfig(), presets.seed()
    changed = {
        f.name
        for f in dataclasses.fields(default)
        if getattr(default, f.name) != getattr(seed, f.name)
    }
    assert changed == {
        "min_threshold",
        "adaptation_rule",
        "loss_scaling",
        "exact_clip",
        "nonfinite_min_loss_scale",
        "growth_interval",
    }
    assert (
        default.min_threshold,
        default.adaptation_rule,
        default.loss_scaling,
        default.exact_clip,
    ) == (1e-30, "track", False, False)


def test_seed_data_mode_warms_up_at_twice_the_median():
    # Warm-up of 100 steps: step 0 (norm 1) is not clipped; step 1's threshold
    # is 2 * median{1} = 2, so norm 2.5 is clipped to 2 (not an explosion:
    # 2.5 < 3 * 2); step 2's is 2 * median{1, 2.5} = 3.5.
    tx = og.stabilize(config=presets.seed())
    params = {"w": jnp.zeros(1)}
    state = tx.init(params)
    assert int(state.warmup_steps_left) == 100
    update = jax.jit(tx.update)
    outs = []
    for g in (1.0, 2.5, 2.5):
        out, state = update({"w": jnp.array([g])}, state, params)
        outs.append(float(out["w"][0]))
    assert outs == pytest.approx([1.0, 2.0, 2.5], rel=1e-6)
    assert int(state.warmup_steps_left) == 97 and float(state.loss_scale) == 1.0
