"""The PyTorch adapter: functional core, GradientFlowStabilizer, state interchange.

Expected numbers are derived by hand from SPEC.md; parity with JAX over long
runs is in test_parity_golden.py and test_parity_random.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import optax_gradflow as og  # noqa: E402
import optax_gradflow.torch as ogt  # noqa: E402
from optax_gradflow import StabilityReport, presets  # noqa: E402
from optax_gradflow.config import INT32_MAX, StabilizerConfig  # noqa: E402
from optax_gradflow.torch import functional as ogt_functional  # noqa: E402
from optax_gradflow.torch.state import expected_specs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
F32 = np.float32
SMALL = StabilizerConfig(
    norm_history_size=16,
    diagnostics_window=8,
    threshold_history_size=8,
    loss_scale_history_size=8,
    event_history_size=8,
    emergency_history_size=4,
    variance_history_size=4,
    adaptation_interval=3,
    diagnostics_interval=4,
    warmup_steps=2,
)
# The original design (presets.seed(): median_mad, floor 0.1, loss scaling on),
# for the tests of its behaviour; SMALL above runs the default track rule.
SEED = presets.seed()
SMALL_SEED = dataclasses.replace(
    SMALL, min_threshold=0.1, adaptation_rule="median_mad", loss_scaling=True
)


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def _same_bits(a, b) -> bool:
    """Bitwise equality (NaN payloads included) of two tensors."""
    return a.dtype == b.dtype and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


def _flag(state) -> int:
    return int(
        state["event_flags"][(int(state["event_flags_index"]) - 1) % len(state["event_flags"])]
    )


def _vec(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


# --- Import hygiene -------------------------------------------------------------


def test_importing_the_package_does_not_import_torch():
    result = _python("import sys, optax_gradflow; print('torch' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_torch_subpackage_modules_do_not_import_jax():
    # The parent package's __init__ is replaced by an empty module, so that only
    # optax_gradflow.config and the torch subpackage are executed.
    result = _python(
        """
        import sys, types
        pkg = types.ModuleType("optax_gradflow")
        pkg.__path__ = ["optax_gradflow"]
        sys.modules["optax_gradflow"] = pkg
        import optax_gradflow.torch as ogt
        state = ogt.init_state(1e-2)
        import torch
        ogt.update([torch.ones(3)], state)
        print(sorted(m for m in sys.modules if m == "jax" or m.startswith("jax.")))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- State ----------------------------------------------------------------------


def test_fields_match_the_jax_state():
    from optax_gradflow.constants import FLAT_FIELDS
    from optax_gradflow.state import GradientFlowState, to_flat
    from optax_gradflow.state import expected_shapes as jax_shapes

    assert ogt.FIELDS == FLAT_FIELDS
    assert tuple(to_flat(og.stabilize(1e-2).init(np.zeros(3)))) == FLAT_FIELDS
    assert len(GradientFlowState._fields) < len(FLAT_FIELDS)  # rings are records there
    for config in (StabilizerConfig(), SMALL, SEED, SMALL_SEED):
        jax_spec = jax_shapes(config)
        for name, (shape, dtype) in expected_specs(config).items():
            j_shape, j_dtype = jax_spec[name]
            assert shape == j_shape, name
            assert str(dtype).removeprefix("torch.") == np.dtype(j_dtype).name, name


def test_initial_state_values():
    s = ogt.init_state(1e-2, config=SMALL)
    assert s["clip_threshold"].item() == 1.0  # 0.1 * sqrt(1 / 0.01)
    assert s["warmup_steps_left"].item() == 0
    assert s["loss_scale"].item() == 1.0
    assert math.isnan(s["last_grad_norm"].item()) and math.isnan(s["last_loss"].item())
    assert s["loss_scale_history"].tolist()[:2] == [1.0, 0.0]
    assert s["loss_scale_history_index"].item() == 1 and s["loss_scale_history_count"].item() == 1
    assert s["early_warning"].dtype == torch.bool and not s["early_warning"].item()
    for name, (shape, dtype) in expected_specs(SMALL).items():
        assert tuple(s[name].shape) == shape and s[name].dtype == dtype, name
    # The loss gate knows no loss yet; no emergency hold.
    assert math.isnan(s["loss_centre"].item()) and math.isnan(s["loss_reference"].item())
    assert s["loss_spread"].item() == 0.0 and s["emergency_hold_left"].item() == 0


def test_initial_track_state():
    # SPEC.md, "State" and "Tracking rule": c = centre_anchor = lnf(t0), d = 0.
    s = ogt.init_state(1e-4)  # t0 = 0.1 * sqrt(1e4) = 10
    assert s["ema_mean"].item() == float(np.log(F32(10.0)))
    assert s["centre_anchor"].item() == s["ema_mean"].item()
    assert s["ema_var"].item() == 0.0
    # Data mode without parameters: no cap (max_threshold, inf), waiting for
    # one norm; c = lnf(inf) = inf until it comes.
    s = ogt.init_state()
    assert s["warmup_steps_left"].item() == 1
    assert s["clip_threshold"].item() == math.inf
    assert s["ema_mean"].item() == math.inf
    # With parameters: |[3, 4]| = 5, the cap 0.05 * 5 = 0.25 (SPEC.md,
    # "Initial threshold" 4); a module's parameters are read the same way.
    s = ogt.init_state(params=[torch.tensor([3.0, 4.0])])
    assert s["clip_threshold"].item() == pytest.approx(0.25, rel=1e-6)
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0]]))
    assert ogt.init_state(params=layer)["clip_threshold"].item() == pytest.approx(0.25, rel=1e-6)
    # Complex parameters count as in the norm of step 1: |3 + 4i| = 5, cap 0.25.
    s = ogt.init_state(params=[torch.tensor([3.0 + 4.0j])])
    assert s["clip_threshold"].item() == pytest.approx(0.25, rel=1e-6)
    # The other rules leave both at 0.
    s = ogt.init_state(1e-4, config=SEED)
    assert s["ema_mean"].item() == 0.0 and s["centre_anchor"].item() == 0.0


@pytest.mark.parametrize(
    "kwargs, threshold, warmup",
    [
        ({"learning_rate": 1.0}, float(F32(0.1)), 0),
        ({"learning_rate": 10.0}, float(F32(0.1)), 0),  # 0.0316 floored
        ({"learning_rate": 1e-4}, 10.0, 0),
        ({"learning_rate": lambda step: 1e-4 * 0.5**step}, 10.0, 0),  # a decay: its peak, step 0
        ({"learning_rate": 1e-2, "initial_threshold": 7.0}, 7.0, 0),  # explicit wins
        ({}, float(F32(0.1)), 100),  # data mode: placeholder and the default warm-up
    ],
)
def test_initial_threshold_rules_of_the_seed(kwargs, threshold, warmup):
    lr = kwargs.pop("learning_rate", None)
    s = ogt.init_state(lr, config=SEED, **kwargs)
    assert s["clip_threshold"].item() == threshold
    assert s["warmup_steps_left"].item() == warmup


@pytest.mark.parametrize(
    "kwargs, threshold, warmup",
    [
        ({"learning_rate": 1.0}, float(F32(0.1)), 0),
        ({"learning_rate": 10.0}, float(F32(0.1) * np.sqrt(F32(0.1))), 0),  # floor 1e-30
        ({"learning_rate": 1e-2, "initial_threshold": 7.0}, 7.0, 0),
        ({}, math.inf, 1),  # data mode: waits for the first finite norm, no cap
        ({"config": StabilizerConfig(warmup_steps=0)}, math.inf, 1),
    ],
)
def test_initial_threshold_rules_of_the_default(kwargs, threshold, warmup):
    lr = kwargs.pop("learning_rate", None)
    s = ogt.init_state(lr, **kwargs)
    assert s["clip_threshold"].item() == threshold
    assert s["warmup_steps_left"].item() == warmup


class _Store:
    def __init__(self, value):
        self.value = value
        self.calls = []

    def lookup(self, params, *, label=None):
        self.calls.append((params, label))
        return self.value


def test_store_between_explicit_and_learning_rate():
    store = _Store(2.5)
    s = ogt.init_state(1e-2, store=store, params="p", label="mlp")
    assert s["clip_threshold"].item() == 2.5 and s["warmup_steps_left"].item() == 0
    assert store.calls == [("p", "mlp")]
    # Clamped into [min, max].
    cfg = StabilizerConfig(max_threshold=2.0)
    assert ogt.init_state(store=_Store(9.0), config=cfg)["clip_threshold"].item() == 2.0
    # A store that knows nothing falls through to the learning rate.
    assert ogt.init_state(1e-4, store=_Store(None))["clip_threshold"].item() == 10.0
    # An explicit threshold wins without reading the store.
    unread = _Store(2.5)
    assert ogt.init_state(initial_threshold=3.0, store=unread)["clip_threshold"].item() == 3.0
    assert unread.calls == []


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_bad_learning_rate_raises(bad):
    # 0 starts from the data, with a warning (tests/test_learning_rate.py).
    with pytest.raises(ValueError, match="learning_rate"):
        ogt.init_state(bad)


def test_bad_initial_threshold_and_config_raise():
    with pytest.raises(ValueError, match="initial_threshold"):
        ogt.init_state(initial_threshold=0.01, config=SEED)  # below min_threshold 0.1
    with pytest.raises(ValueError, match="initial_threshold"):
        ogt.init_state(initial_threshold=-1.0)
    with pytest.raises(TypeError, match="StabilizerConfig"):
        ogt.init_state(1e-2, config={"min_threshold": 0.1})
    with pytest.raises(ValueError, match="explosion_factor"):
        StabilizerConfig(explosion_factor=0.5)  # validation is the shared dataclass's


# --- Functional update ---------------------------------------------------------


def test_clip_and_unscale_formulas():
    # t = 1 (lr 1e-2). Norm 5 > 3 t: clipped and an explosion, (x / 5) * 1.
    s = ogt.init_state(1e-2, config=SEED)
    out, s = ogt.update([_vec(3.0, 4.0)], s, config=SEED)
    assert out[0].tolist() == [float(F32(3.0) / F32(5.0)), float(F32(4.0) / F32(5.0))]
    assert _flag(s) == 3 and s["loss_scale"].item() == float(F32(0.8))
    # Without loss scaling (the default) the scale stays 1.
    out, s = ogt.update([_vec(3.0, 4.0)], ogt.init_state(1e-2))
    assert _flag(s) == 3 and s["loss_scale"].item() == 1.0
    # Unclipped at s = 3: x * (1 / s) with 1 / s rounded to float32, not x / s.
    cfg = dataclasses.replace(SEED, initial_loss_scale=3.0)
    x = [0.3, 0.6]
    out, _ = ogt.update([_vec(*x)], ogt.init_state(1e-2, config=cfg), config=cfg)
    inverse = F32(1.0) / F32(3.0)
    assert out[0].tolist() == [float(F32(v) * inverse) for v in x]
    assert [float(F32(v) * inverse) for v in x] != [float(F32(v) / F32(3.0)) for v in x]


def test_none_and_integer_leaves_pass_through():
    ints = torch.tensor([7, 8], dtype=torch.int32)
    s = ogt.init_state(1e-2)
    out, s = ogt.update([None, _vec(0.3, 0.4), ints, None], s)
    assert out[0] is None and out[3] is None
    assert out[2] is ints
    assert s["last_grad_norm"].item() == pytest.approx(0.5, rel=1e-6)  # ints not in the norm


def test_all_none_is_an_empty_tree():
    # SPEC.md "Boundary cases": n = 0, vanishing, the scale grows by 1.5.
    out, s = ogt.update([None, None], ogt.init_state(1e-2, config=SEED), config=SEED)
    assert out == [None, None]
    assert s["last_grad_norm"].item() == 0.0 and _flag(s) == 4
    assert s["loss_scale"].item() == 1.5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients(dtype):
    # Squares of 300 and 400 overflow float16 (max 65504) but not float32: the
    # norm is accumulated in float32. With s = 1024 the unscaled norm is
    # 500 / 1024 < t = 1, so the output is x * (1 / 1024), exact in both dtypes.
    cfg = dataclasses.replace(SEED, initial_loss_scale=1024.0, max_loss_scale=4096.0)
    s = ogt.init_state(1e-2, config=cfg)
    g = _vec(300.0, 400.0, dtype=dtype)
    out, s = ogt.update([g], s, config=cfg)
    assert out[0].dtype == dtype
    assert out[0].tolist() == [300.0 / 1024, 400.0 / 1024]
    assert s["last_grad_norm"].item() == 500.0 / 1024
    # Clipped: (x / r) * t computed in float32, cast back.
    s = ogt.init_state(1e-2)
    out, _ = ogt.update([_vec(3.0, 4.0, dtype=dtype)], s)
    assert out[0].dtype == dtype
    assert out[0].tolist() == [
        torch.tensor(0.6).to(dtype).item(),
        torch.tensor(0.8).to(dtype).item(),
    ]


def test_bfloat16_squares_overflowing_float32_are_non_finite():
    # bfloat16 holds 1e20, whose square overflows float32: n = inf, a skipped step.
    s = ogt.init_state(1e-2, config=SEED)
    g = _vec(1e20, 1.0, dtype=torch.bfloat16)
    out, s = ogt.update([g, _vec(0.5)], s, config=SEED)
    assert out[0].tolist() == [0.0, 0.0] and out[1].tolist() == [0.0]
    assert out[0].dtype == torch.bfloat16
    assert s["last_grad_norm"].item() == math.inf and _flag(s) == 8
    assert s["nonfinite_count"].item() == 1 and s["loss_scale"].item() == 0.5


def test_complex_gradients():
    # |3 + 4i| = 5 > t = 1: clipped to (x / 5) * 1.
    s = ogt.init_state(1e-2)
    out, s = ogt.update([torch.tensor([3.0 + 4.0j], dtype=torch.complex64)], s)
    assert s["last_grad_norm"].item() == 5.0
    assert out[0].dtype == torch.complex64
    assert out[0].tolist() == [complex(float(F32(0.6)), float(F32(0.8)))]


def test_float64_leaves_are_scaled_in_float64():
    cfg = dataclasses.replace(SEED, initial_loss_scale=3.0)
    s = ogt.init_state(1e-2, config=cfg)
    out, _ = ogt.update([torch.tensor([0.3], dtype=torch.float64)], s, config=cfg)
    assert out[0].dtype == torch.float64
    # 1 / s is rounded to float32 (SPEC.md), then the product is float64.
    assert out[0].item() == 0.3 * float(F32(1.0) / F32(3.0))


def test_update_does_not_modify_its_inputs():
    s = ogt.init_state(1e-2, config=SMALL)
    before = {k: v.clone() for k, v in s.items()}
    g = _vec(30.0, 40.0)
    g_before = g.clone()
    ogt.update([g], s, config=SMALL)
    assert torch.equal(g, g_before)
    for name in s:
        assert torch.equal(s[name], before[name]) or (
            s[name].isnan().all() and before[name].isnan().all()
        ), name


def test_value_is_recorded_as_last_loss():
    s = ogt.init_state(1e-2)
    _, s = ogt.update([_vec(0.1)], s, value=0.1)
    assert s["last_loss"].item() == float(F32(0.1))
    _, s = ogt.update([_vec(0.1)], s, value=torch.tensor(2.5, dtype=torch.float16))
    assert s["last_loss"].item() == 2.5 and s["last_loss"].dtype == torch.float32
    _, s = ogt.update([_vec(0.1)], s)
    assert s["last_loss"].item() == 2.5  # unchanged when none is given


def test_value_moves_the_loss_gate():
    # SPEC.md, "Loss gate", under every rule (r = 0.05, rise rate 0.005 pinned).
    rates = {"track_rate": 0.05, "track_loss_rise_rate": 0.005}
    for config in (StabilizerConfig(**rates), dataclasses.replace(SEED, **rates)):
        s = ogt.init_state(1e-2, config=config)
        _, s = ogt.update([_vec(0.1)], s, value=2.0, config=config)
        # The first finite loss starts it: centre = reference = 2, spread = 0.
        assert s["loss_centre"].item() == s["loss_reference"].item() == 2.0
        assert s["loss_spread"].item() == 0.0
        _, s = ogt.update([_vec(0.1)], s, value=3.0, config=config)
        # Step 1 < N = round(1 / 0.05) = 20: running means, a = max(0.05,
        # 1 / 2) = 0.5: centre = 2 + 0.5 * (3 - 2) = 2.5; gap = 0.5: reference =
        # 2 + 0.5 * 0.5 = 2.25; dev = |3 - 2| = 1: spread = 0 + 0.5 * 1 = 0.5.
        assert s["loss_centre"].item() == 2.5
        assert s["loss_reference"].item() == 2.25
        assert s["loss_spread"].item() == 0.5
        before = {k: s[k].clone() for k in ("loss_centre", "loss_reference", "loss_spread")}
        for value in (None, math.nan, math.inf):
            _, s = ogt.update([_vec(0.1)], s, value=value, config=config)
            for k, v in before.items():
                assert torch.equal(s[k], v), (value, k)
        # After the first N steps (stabilizer_step 20) an explosion (norm
        # 50 > 3 t) is not calm: the centre moves, by r * clip(4 - 2.5, -Bc,
        # Bc) with Bc = max(10 * 0.5, 0.001 * 2.5) = 5: 2.5 + 0.05 * 1.5 =
        # 2.575; the reference moves at the rise rate only: gap = 2.575 - 2.25
        # = 0.325, 2.25 + 0.005 * 0.325 = 2.251625; the spread does not move.
        s["stabilizer_step"] = torch.tensor(20, dtype=torch.int32)
        _, s = ogt.update([_vec(30.0, 40.0)], s, value=4.0, config=config)
        assert _flag(s) & 2
        assert s["loss_centre"].item() == pytest.approx(2.575, rel=1e-6)
        assert s["loss_reference"].item() == pytest.approx(2.251625, rel=1e-6)
        assert torch.equal(s["loss_spread"], before["loss_spread"])


def test_gradients_on_different_devices_raise():
    # The "meta" device stands in for a second device; nothing is computed.
    s = ogt.init_state(1e-2)
    with pytest.raises(ValueError, match=r"one device.*gradient 0 is on cpu.*gradient 2 on meta"):
        ogt.update([_vec(1.0), None, torch.empty(2, device="meta")], s)
    meta_state = {k: v.to("meta") for k, v in s.items()}
    with pytest.raises(ValueError, match="state is on meta"):
        ogt.update([_vec(1.0)], meta_state)


def test_state_built_by_another_config_raises():
    s = ogt.init_state(1e-2, config=SMALL)
    with pytest.raises(ValueError, match=r"'norm_history'.*different configuration"):
        ogt.update([_vec(1.0)], s)  # default config: H = 1000, not 16
    bad = dict(s)
    del bad["clip_count"]
    with pytest.raises(ValueError, match="clip_count"):
        ogt.update([_vec(1.0)], bad, config=SMALL)
    bad = dict(s, extra=torch.zeros(()))
    with pytest.raises(ValueError, match="extra"):
        ogt.update([_vec(1.0)], bad, config=SMALL)
    bad = dict(s, loss_scale=torch.ones((), dtype=torch.float64))
    with pytest.raises(ValueError, match="loss_scale"):
        ogt.update([_vec(1.0)], bad, config=SMALL)


def test_counters_saturate():
    s = ogt.init_state(1e-2, config=SMALL)
    s["stabilizer_step"] = torch.tensor(INT32_MAX, dtype=torch.int32)
    s["clip_count"] = torch.tensor(INT32_MAX, dtype=torch.int32)
    _, s = ogt.update([_vec(3.0, 4.0)], s, config=SMALL)
    assert s["stabilizer_step"].item() == INT32_MAX
    assert s["clip_count"].item() == INT32_MAX
    assert s["explosion_count"].item() == 1


def _compile_and_compare(backend: str, steps: int = 8, cfg: StabilizerConfig = SMALL) -> None:
    def fn(grads, state, value):
        return ogt.update(grads, state, value=value, config=cfg)

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    rng = np.random.default_rng(0)
    eager_state = ogt.init_state(config=cfg)
    comp_state = dict(eager_state)
    for k in range(steps):
        a = rng.normal(size=3).astype(np.float32) * (50.0 if k == 5 else 1.0)
        if k == 3:
            a[1] = np.nan
        grads = [torch.from_numpy(a), None, torch.from_numpy(rng.normal(size=2)).half()]
        value = torch.tensor(1.0 + 0.1 * k)
        out_e, eager_state = fn(grads, eager_state, value)
        out_c, comp_state = compiled(grads, comp_state, value)
        assert out_c[1] is None
        for e, c in zip(out_e, out_c, strict=True):
            if e is not None:
                assert c.dtype == e.dtype
                np.testing.assert_allclose(c.float().numpy(), e.float().numpy(), rtol=1e-5)
        for name, e in eager_state.items():
            c = comp_state[name]
            assert c.dtype == e.dtype, name
            if e.is_floating_point():
                # Fused kernels may reorder reductions: ulp-level differences.
                np.testing.assert_allclose(c.numpy(), e.numpy(), rtol=1e-5, atol=1e-7, err_msg=name)
            else:
                assert torch.equal(c, e), name


@pytest.mark.parametrize("cfg", [SMALL, SMALL_SEED], ids=["track", "seed"])
def test_functional_update_compiles_with_fullgraph(cfg):
    # fullgraph=True fails on any graph break; aot_eager runs the captured
    # graph through AOTAutograd and functionalization without generating code.
    _compile_and_compare("aot_eager", cfg=cfg)


@pytest.mark.skipif(
    os.environ.get("OPTAX_GRADFLOW_TEST_INDUCTOR") != "1",
    reason="Inductor's C++ compile takes about 35 s on a 2-core CPU; set "
    "OPTAX_GRADFLOW_TEST_INDUCTOR=1 to run it.",
)
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_functional_update_compiles_with_inductor():
    # Inductor imports a deprecated torch.jit helper of its own; not our warning.
    _compile_and_compare("inductor")


# --- GradientFlowStabilizer ----------------------------------------------------------


def _model_and_data(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(16, 4)
    y = torch.randn(16, 1)
    return model, x, y


def _backward(stab, model, x, y, *, poison=False):
    loss = torch.nn.functional.mse_loss(model(x), y)
    stab.get_scaled_loss(loss).backward()
    if poison:
        model[0].weight.grad[0, 0] = float("nan")
    return loss


GradientFlowStabilizer = ogt.GradientFlowStabilizer


def test_get_scaled_loss_multiplies_in_the_loss_dtype():
    stab = GradientFlowStabilizer(1e-2, config=dataclasses.replace(SEED, initial_loss_scale=4.0))
    loss = torch.tensor(1.5, dtype=torch.float16)
    scaled = stab.get_scaled_loss(loss)
    assert scaled.dtype == torch.float16 and scaled.item() == 6.0


def test_unscale_matches_the_functional_update_and_is_idempotent():
    cfg = dataclasses.replace(SEED, initial_loss_scale=4.0)
    model, x, y = _model_and_data()
    stab = GradientFlowStabilizer(1e-2, config=cfg)
    loss = _backward(stab, model, x, y)
    raw = [p.grad.clone() for p in model.parameters()]
    expected, expected_state = ogt.update(
        raw, ogt.init_state(1e-2, config=cfg), value=loss.detach(), config=cfg
    )
    stab.unscale_gradients(model.parameters())
    stab.unscale_gradients(model.parameters())  # a no-op
    norm = stab.clip_gradients(model.parameters())  # a no-op too: returns the norm
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p.grad, e)
    assert stab.state["stabilizer_step"].item() == 1
    assert torch.equal(norm, expected_state["last_grad_norm"])
    assert stab.state["last_loss"].item() == loss.item()


def test_new_backward_starts_a_new_step_without_step_call():
    model, x, y = _model_and_data()
    stab = GradientFlowStabilizer(1e-2)
    _backward(stab, model, x, y)
    stab.clip_gradients(model.parameters())
    _backward(stab, model, x, y)  # accumulates into .grad: a new version
    stab.clip_gradients(model.parameters())
    assert stab.state["stabilizer_step"].item() == 2
    # The step number starts a new step even with untouched gradients.
    stab.clip_gradients(model.parameters(), step=7)
    stab.clip_gradients(model.parameters(), step=7)
    assert stab.state["stabilizer_step"].item() == 3


def test_several_optimizers_and_frozen_parameters():
    model, x, y = _model_and_data()
    model[2].bias.requires_grad_(False)  # frozen: its grad stays None
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    second = torch.optim.SGD([model[2].weight], lr=0.1)
    stab = GradientFlowStabilizer(1e-2)
    _backward(stab, model, x, y)
    assert model[2].bias.grad is None
    stab.clip_gradients(model.parameters())
    stab.step(first)
    stab.step(second)  # the same stabilizer step: nothing is processed twice
    assert stab.state["stabilizer_step"].item() == 1
    first.zero_grad()
    second.zero_grad()
    _backward(stab, model, x, y)
    stab.step(first)  # without clip_gradients: processes first's parameters only
    with pytest.raises(ValueError, match="same parameters"):
        stab.clip_gradients(model.parameters())


def test_partly_processed_parameters_raise():
    model, x, y = _model_and_data()
    stab = GradientFlowStabilizer(1e-2)
    _backward(stab, model, x, y)
    stab.clip_gradients(model[0].parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="same parameters"):
        stab.step(opt)


def test_a_late_loss_is_the_steps_value_for_the_loss_gate():
    # unscale_gradients first, the loss afterwards through clip_gradients: the
    # gate ends as if the loss had been given to update (SPEC.md, "Loss gate").
    p = torch.nn.Parameter(torch.zeros(2))
    stab = GradientFlowStabilizer(1e-2)
    state = ogt.init_state(1e-2)
    for g, loss in (([0.3, 0.4], 2.0), ([0.1, 0.2], 3.0), ([30.0, 40.0], 4.0)):
        p.grad = torch.tensor(g)
        stab.unscale_gradients([p])
        stab.clip_gradients([p], loss=torch.tensor(loss))
        _, state = ogt.update([torch.tensor(g)], state, value=loss)
        for name in ("last_loss", "loss_centre", "loss_reference", "loss_spread"):
            assert torch.equal(stab.state[name], state[name]), (loss, name)
    assert stab.state["stabilizer_step"].item() == 3
    # Steps 0-2 are among the loss gate's first N = 20: running means, which
    # every loss teaches, the explosion's (norm 50) too. Step 1 (a = 1/2):
    # centre 2.5, reference 2 + (2.5 - 2) / 2 = 2.25; step 2 (a = 1/3):
    # centre 2.5 + (4 - 2.5) / 3 = 3, reference 2.25 + (3 - 2.25) / 3 = 2.5.
    assert stab.state["loss_centre"].item() == pytest.approx(3.0, rel=1e-6)
    assert stab.state["loss_reference"].item() == pytest.approx(2.5, rel=1e-6)


def test_clip_gradients_returns_the_preclip_norm_and_clips():
    model, _, _ = _model_and_data()
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    stab = GradientFlowStabilizer(1e-2)  # t = 1
    n_elems = sum(p.numel() for p in model.parameters())
    norm = stab.clip_gradients(model.parameters(), loss=torch.tensor(3.0))
    assert isinstance(norm, torch.Tensor)
    assert norm.item() == pytest.approx(10.0 * math.sqrt(n_elems), rel=1e-6)
    total = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()))
    assert total == pytest.approx(1.0, rel=1e-6)
    assert stab.state["last_loss"].item() == 3.0


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _opt_state(opt):
    return [
        {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
        for group in opt.param_groups
        for p in group["params"]
    ]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize(
    "make_opt, skip_mode",
    [
        (lambda ps: torch.optim.Adam(ps, lr=1e-2), "sync"),
        (lambda ps: torch.optim.Adam(ps, lr=1e-2), "auto"),
        (lambda ps: torch.optim.Adam(ps, lr=1e-2), "restore"),
        (lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1), "restore"),
        (lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True), "found_inf"),
        (lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True), "auto"),
    ],
    ids=["adam-sync", "adam-auto", "adam-restore", "sgd-restore", "fused-found_inf", "fused-auto"],
)
def test_step_skips_non_finite_steps_exactly(make_opt, skip_mode):
    model, x, y = _model_and_data()
    opt = make_opt(model.parameters())
    stab = GradientFlowStabilizer(1e-2, skip_mode=skip_mode)
    # A finite first step creates the optimizer state (restore needs it).
    _backward(stab, model, x, y)
    stab.step(opt)
    opt.zero_grad()
    params, state = _params(model), _opt_state(opt)
    _backward(stab, model, x, y, poison=True)
    stab.step(opt)
    opt.zero_grad()
    assert stab.state["nonfinite_count"].item() == 1
    assert _same(_params(model), params), "parameters moved on a skipped step"
    assert _same(_opt_state(opt), state), "optimizer state moved on a skipped step"
    # A finite step afterwards moves them again.
    _backward(stab, model, x, y)
    stab.step(opt)
    assert not _same(_params(model), params)


def test_restore_refuses_state_it_cannot_restore():
    model, x, y = _model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    stab = GradientFlowStabilizer(1e-2, skip_mode="restore")
    _backward(stab, model, x, y)
    stab.step(opt)  # the first step has no state to restore: it reads the flag
    opt.state[model[0].weight]["evaluations"] = 3
    _backward(stab, model, x, y)
    with pytest.raises(ValueError, match="'evaluations' is a int"):
        stab.step(opt)
    with pytest.raises(ValueError, match="skip_mode"):
        GradientFlowStabilizer(skip_mode="sometimes")
    fused = GradientFlowStabilizer(skip_mode="found_inf")
    with pytest.raises(ValueError, match="fused=True"):
        fused.step(torch.optim.SGD(model.parameters(), lr=1e-2))


def test_step_matches_a_manual_loop():
    # stab.step(opt) == functional update + opt.step() when finite.
    model_a, x, y = _model_and_data(1)
    model_b, _, _ = _model_and_data(1)
    opt_a = torch.optim.Adam(model_a.parameters(), lr=1e-2)
    opt_b = torch.optim.Adam(model_b.parameters(), lr=1e-2)
    stab = GradientFlowStabilizer(1e-2)
    state = ogt.init_state(1e-2)
    for _ in range(3):
        _backward(stab, model_a, x, y)
        stab.step(opt_a)
        opt_a.zero_grad()
        loss = torch.nn.functional.mse_loss(model_b(x), y) * state["loss_scale"]
        loss.backward()
        ps = list(model_b.parameters())
        new, state = ogt.update([p.grad for p in ps], state)
        for p, g in zip(ps, new, strict=True):
            p.grad = g
        opt_b.step()
        opt_b.zero_grad()
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)


class _NoHostRead:
    """Makes every way of reading a tensor on the host raise.

    On the CPU, where a read waits for nothing, the rescale reads the finite
    flag to zero a skipped step; the guard runs the step as on an accelerator,
    where nothing is read.
    """

    def __init__(self, monkeypatch):
        def boom(*args, **kwargs):
            raise AssertionError("host read of a tensor on the hot path")

        for name in ("item", "__bool__", "tolist", "__float__", "__int__"):
            monkeypatch.setattr(torch.Tensor, name, boom)
        monkeypatch.setattr(ogt_functional, "_HOST_READ_DEVICES", ())


def test_hot_path_has_no_host_reads(monkeypatch):
    model, x, y = _model_and_data()
    stab = GradientFlowStabilizer(1e-2, config=SMALL)
    # One full step first, so that the state is on the gradients' device.
    _backward(stab, model, x, y)
    stab.step(torch.optim.SGD(model.parameters(), lr=1e-2))
    for p in model.parameters():
        p.grad = None
    loss = torch.nn.functional.mse_loss(model(x), y)
    with monkeypatch.context() as m:
        _NoHostRead(m)
        scaled = stab.get_scaled_loss(loss)
    scaled.backward()
    model[0].weight.grad[0, 0] = float("nan")  # exercise the skip branch too
    with monkeypatch.context() as m:
        _NoHostRead(m)
        stab.unscale_gradients(model.parameters())
        stab.unscale_gradients(model.parameters())
        norm = stab.clip_gradients(model.parameters(), loss=loss)
    # The guard is real: the same patch makes a host read fail.
    with monkeypatch.context() as m:
        _NoHostRead(m)
        with pytest.raises(AssertionError, match="host read"):
            norm.item()
    assert math.isnan(norm.item())
    assert all((p.grad == 0).all() for p in model.parameters())


@pytest.mark.parametrize("skip_mode", ["restore", "found_inf"])
def test_skipping_step_has_no_host_reads(monkeypatch, skip_mode):
    # SGD with momentum reads nothing on the host itself, so once its state
    # exists the whole step, skip included, runs under the guard.
    model, x, y = _model_and_data()
    fused = skip_mode == "found_inf"
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, fused=fused)
    stab = GradientFlowStabilizer(1e-2, skip_mode=skip_mode)
    _backward(stab, model, x, y)
    stab.step(opt)
    opt.zero_grad()
    params, state = _params(model), _opt_state(opt)
    _backward(stab, model, x, y, poison=True)
    with monkeypatch.context() as m:
        _NoHostRead(m)
        stab.step(opt)
    assert stab.state["stabilizer_step"].item() == 2
    assert _same(_params(model), params) and _same(_opt_state(opt), state)


def test_stability_report_counts_and_score():
    stab = GradientFlowStabilizer(1e-2, config=SEED)  # t = 1
    p = torch.nn.Parameter(torch.zeros(2))
    # Raw norms 0.5, 50, NaN, 0.2; the last at scale 0.4 is n = 0.5 < t.
    for g in ([0.3, 0.4], [30.0, 40.0], [math.nan, 0.0], [0.12, 0.16]):
        p.grad = torch.tensor(g)
        stab.clip_gradients([p])
    report = stab.get_stability_report()
    assert isinstance(report, StabilityReport)
    assert report.step == 4
    assert report.total.explosions == 1 and report.total.nonfinite == 1
    assert report.total.clipped == 1
    assert report.window_steps == 4 and report.window.explosions == 1
    assert report.window.nonfinite == 1
    assert report.stability_score == 0.5  # 2 of 4 steps neither exploded nor non-finite
    # Score 0.5 is not below 0.5 (critical) but <= 0.8: unstable; halve the rate.
    assert report.status == "unstable"
    assert (report.lr_recommendation, report.lr_factor) == ("decrease", 0.5)
    # 1 -> 0.8 (explosion) -> 0.4 (non-finite)
    assert report.loss_scale == float(F32(F32(0.8) * F32(0.5)))
    assert report.clip_threshold == 1.0
    assert report.update_ratio_count is None  # the optax wrapper form records it
    assert "at step 4: unstable" in report.summary()
    assert GradientFlowStabilizer().get_stability_report().stability_score == 1.0


def test_the_report_is_the_same_on_both_sides_of_a_moved_run():
    """One builder serves both frameworks: a state moved across gives the same report."""
    stab = GradientFlowStabilizer(1e-2)
    p = torch.nn.Parameter(torch.zeros(2))
    for g in ([0.3, 0.4], [30.0, 40.0], [math.nan, 0.0], [0.12, 0.16], [3.0, 4.0]):
        p.grad = torch.tensor(g)
        stab.clip_gradients([p], loss=torch.tensor(1.0))
    torch_report = stab.get_stability_report().as_dict()
    jax_report = og.stability_report(ogt.to_jax_state(stab.state)).as_dict()
    torch_report.pop("path"), jax_report.pop("path")
    assert torch_report == jax_report


def _run_stab(stab, grads_seq):
    p = torch.nn.Parameter(torch.zeros(3))
    outs = []
    for g in grads_seq:
        p.grad = torch.tensor(g)
        stab.clip_gradients([p])
        outs.append(p.grad.clone())
    return outs


GRADS = [[0.1, 0.2, 0.3], [3.0, 4.0, 0.0], [math.nan, 1.0, 1.0], [0.2, 0.1, 0.0], [1e-9, 0, 0]] * 3


def test_state_dict_round_trip_is_exact():
    a = GradientFlowStabilizer(config=SMALL)
    _run_stab(a, GRADS[:7])
    sd = a.state_dict()
    assert set(sd) == set(ogt.FIELDS)
    b = GradientFlowStabilizer(1.0, config=SMALL)
    b.load_state_dict(sd)
    for name, value in a.state_dict().items():
        assert _same_bits(b.state_dict()[name], value), name
    # Both continue identically.
    for out_a, out_b in zip(_run_stab(a, GRADS[7:]), _run_stab(b, GRADS[7:]), strict=True):
        assert torch.equal(out_a, out_b)
    # The state dict is a copy.
    sd["clip_count"] += 5
    assert a.state_dict()["clip_count"].item() != sd["clip_count"].item()


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda sd: sd.pop("norm_history"), "norm_history"),
        (lambda sd: sd.__setitem__("surplus", torch.zeros(())), "surplus"),
        (
            lambda sd: sd.__setitem__("event_flags", torch.zeros(9, dtype=torch.int32)),
            "event_flags",
        ),
        (lambda sd: sd.__setitem__("clip_count", torch.zeros((), dtype=torch.int64)), "clip_count"),
        (lambda sd: sd.__setitem__("early_warning", torch.zeros(())), "early_warning"),
        (lambda sd: sd.__setitem__("loss_scale", 1.0), "loss_scale"),
    ],
    ids=["missing", "extra", "shape", "dtype", "bool-dtype", "not-a-tensor"],
)
def test_load_state_dict_rejects_and_loads_nothing(edit, key):
    src = GradientFlowStabilizer(config=SMALL)
    _run_stab(src, GRADS[:4])
    sd = src.state_dict()
    edit(sd)
    dst = GradientFlowStabilizer(1e-2, config=SMALL)
    before = dst.state_dict()
    with pytest.raises(ValueError, match=repr(key)):
        dst.load_state_dict(sd)
    after = dst.state_dict()
    for name in ogt.FIELDS:
        assert _same_bits(after[name], before[name]), name


# --- State interchange ------------------------------------------------------------------


def _jax_run(config, grads_seq):
    import jax
    import jax.numpy as jnp

    import optax_gradflow as og

    tx = og.stabilize(config=config)
    params = jnp.zeros(3)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads_seq:
        _, state = update(jnp.asarray(g, jnp.float32), state, params, value=jnp.float32(1.5))
    return tx, state


def _bits(x) -> np.ndarray:
    a = np.asarray(x)
    return a.view(np.int8) if a.dtype == np.bool_ else a.view(f"u{a.itemsize}")


@pytest.mark.parametrize("cfg", [SMALL, SMALL_SEED], ids=["track", "seed"])
def test_state_interchange_is_exact_both_ways(cfg):
    from optax_gradflow.state import GradientFlowState, to_flat

    _, jax_state = _jax_run(cfg, GRADS)
    t_state = ogt.from_jax_state(jax_state)
    ogt.check_state(t_state, cfg)
    flat = to_flat(jax_state)
    assert tuple(flat) == ogt.FIELDS
    for name in ogt.FIELDS:
        assert (
            t_state[name].dtype
            == {
                "float32": torch.float32,
                "int32": torch.int32,
                "bool": torch.bool,
            }[np.asarray(flat[name]).dtype.name]
        ), name
        np.testing.assert_array_equal(_bits(t_state[name].numpy()), _bits(flat[name]))
    back = ogt.to_jax_state(t_state)
    assert isinstance(back, GradientFlowState)
    back_flat = to_flat(back)
    for name in ogt.FIELDS:
        a, b = np.asarray(back_flat[name]), np.asarray(flat[name])
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(_bits(a), _bits(b))
    # NaN survives (last_grad_norm is NaN only before the first step; last_loss here).
    fresh = ogt.init_state(config=cfg)
    back = ogt.to_jax_state(fresh)
    assert math.isnan(float(back.last_grad_norm)) and math.isnan(float(back.loss_centre))


@pytest.mark.parametrize("cfg", [SMALL, SMALL_SEED], ids=["track", "seed"])
def test_a_converted_state_continues_like_jax(cfg):
    import jax.numpy as jnp

    tx, jax_state = _jax_run(cfg, GRADS[:6])
    t_state = ogt.from_jax_state(jax_state)
    for k, g in enumerate(GRADS[6:]):
        loss = 1.5 + 0.25 * k
        j_out, jax_state = tx.update(
            jnp.asarray(g, jnp.float32), jax_state, jnp.zeros(3), value=jnp.float32(loss)
        )
        t_out, t_state = ogt.update([torch.tensor(g)], t_state, value=loss, config=cfg)
        np.testing.assert_allclose(t_out[0].numpy(), np.asarray(j_out), rtol=1e-6)
    from optax_gradflow.state import to_flat

    flat = to_flat(jax_state)
    for name in ogt.FIELDS:
        # The log-domain centre can be near 0: an absolute tolerance too.
        np.testing.assert_allclose(
            t_state[name].numpy(),
            np.asarray(flat[name]),
            rtol=1e-6,
            atol=1e-6
            if name in ("ema_mean", "centre_anchor", "norm_quantile", "loss_spread")
            else 0,
            err_msg=name,
        )


def test_interchange_rejects_bad_input():
    s = ogt.init_state(config=SMALL)
    bad = dict(s)
    del bad["stable_streak"]
    with pytest.raises(ValueError, match="stable_streak"):
        ogt.to_jax_state(bad)
    bad = dict(s, clip_threshold=torch.zeros((), dtype=torch.float64))
    with pytest.raises(ValueError, match="clip_threshold"):
        ogt.to_jax_state(bad)
    with pytest.raises(ValueError, match="stabilizer_step"):
        ogt.from_jax_state(object())


# --- CUDA ---------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.filterwarnings("ignore:This instance was constructed with capturable=True")
def test_cuda_step_has_no_synchronisation(fused):
    # fused=True skips through found_inf; capturable Adam through the restore.
    model, x, y = _model_and_data()
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused, capturable=not fused)
    stab = GradientFlowStabilizer(1e-2, config=SMALL)
    for _ in range(3):  # warm-up: moves the state, creates the optimizer state
        _backward(stab, model, x, y)
        stab.step(opt)
        opt.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(4):
            loss = torch.nn.functional.mse_loss(model(x), y)
            stab.get_scaled_loss(loss).backward()
            if k == 2:
                model[0].weight.grad[0, 0] = float("nan")
            stab.clip_gradients(model.parameters(), loss=loss)
            stab.step(opt)
            opt.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert stab.get_stability_report().total.nonfinite == 1


@cuda
def test_cpu_state_dict_loads_onto_cuda():
    cpu = GradientFlowStabilizer(config=SMALL)
    _run_stab(cpu, GRADS[:6])
    gpu = GradientFlowStabilizer(config=SMALL)
    p = torch.nn.Parameter(torch.zeros(3, device="cuda"))
    p.grad = torch.ones(3, device="cuda")
    gpu.clip_gradients([p])  # the state now lives on the GPU
    gpu.load_state_dict(cpu.state_dict())
    assert all(v.device.type == "cuda" for v in gpu.state.values())
    for name, value in cpu.state_dict().items():
        assert _same_bits(gpu.state_dict()[name].cpu(), value), name
    # And back: a CUDA state dict loads into a CPU stabilizer.
    back = GradientFlowStabilizer(config=SMALL)
    back.load_state_dict(gpu.state_dict())
    assert all(v.device.type == "cpu" for v in back.state.values())
    cpu_out = _run_stab(cpu, GRADS[6:])
    p.grad = None
    gpu_outs = []
    for g in GRADS[6:]:
        p.grad = torch.tensor(g, device="cuda")
        gpu.clip_gradients([p])
        gpu_outs.append(p.grad.cpu())
    for a, b in zip(cpu_out, gpu_outs, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6)


def test_config_is_the_shared_dataclass():
    stab = GradientFlowStabilizer(config=SMALL)
    assert stab.config is SMALL
    assert dataclasses.is_dataclass(stab.config)
