"""The PyTorch step as a pipeline of named stages, and its cost-saving paths.

Expected values come from SPEC.md, from hand derivation or from an independent
reference (``torch.nn.utils.clip_grad_norm_``), never from the adapter itself.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import optax_gradflow.torch as ogt  # noqa: E402
from optax_gradflow import arithmetic, constants, presets  # noqa: E402
from optax_gradflow.config import StabilizerConfig  # noqa: E402
from optax_gradflow.constants import StateVersionError  # noqa: E402
from optax_gradflow.torch import functional, traced  # noqa: E402
from optax_gradflow.torch import stabilizer as stabilizer_module  # noqa: E402
from optax_gradflow.torch.functional import Due  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
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


def _guard_host_reads(monkeypatch):
    """Every way of reading a tensor on the host raises; the step runs as on an accelerator."""

    def boom(*args, **kwargs):
        raise AssertionError("host read of a tensor")

    for name in ("item", "__bool__", "tolist", "__float__", "__int__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    monkeypatch.setattr(functional, "_HOST_READ_DEVICES", ())


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().view(np.uint32)


# --- The stages ------------------------------------------------------------------------


def test_the_torch_step_is_the_shared_arithmetic():
    # The stages are written once (optax_gradflow.arithmetic); the adapter's
    # step runs them with its TorchOps, and update calls step.
    assert "arithmetic.step(" in inspect.getsource(functional.step)
    assert "TorchOps(" in inspect.getsource(functional.step)
    assert "step(" in inspect.getsource(functional.update)
    for name in constants.STAGES:
        assert not hasattr(functional, name) or name == "rescale", name


@pytest.mark.parametrize(
    "rule, cls",
    [
        ("track", functional.TrackRule),
        ("zscore", functional.ZScoreRule),
        ("percentile", functional.HistoryRule),
        ("median_mad", functional.HistoryRule),
        ("mean_std", functional.HistoryRule),
    ],
)
def test_the_rule_object_is_chosen_once_per_config(rule, cls):
    config = StabilizerConfig(
        adaptation_rule=rule, warmup_steps=4, norm_history_size=16, diagnostics_window=8
    )
    chosen = functional.rule_for(config)
    assert type(chosen) is cls
    assert functional.rule_for(config) is chosen  # chosen once, not per step


@pytest.mark.parametrize("path", ["device", "host"])
def test_the_step_is_built_once_per_config(path):
    # The device path chooses the rule object once per config; the host path
    # traces the step once per config (and per with / without a loss).
    config = dataclasses.replace(SMALL, adaptation_rule="median_mad", loss_scaling=True)
    cached = arithmetic.rule_for if path == "device" else traced.function_for
    cached.cache_clear()
    state = ogt.init_state(initial_threshold=1.0, config=config)
    for k in range(5):
        _, state = ogt.update([torch.tensor([3.0, 4.0 * k])], state, config=config, path=path)
    info = cached.cache_info()
    # init_state reads the rule's start and its starting levels from the same
    # rule object (two lookups).
    lookups = 7 if path == "device" else 5
    assert (info.misses, info.hits) == (1, lookups - 1)


def test_ring_reads_and_writes_the_three_flat_keys():
    state = ogt.init_state(1.0, config=SMALL)
    ring = functional.Ring.read(state, "loss_scale_history")
    assert ring.count.item() == 1 and ring.index.item() == 1  # SPEC.md, "State"
    pushed = ring.push(torch.tensor(2.5))
    assert pushed.values[1].item() == 2.5 and pushed.index.item() == 2
    assert pushed.count.item() == 2
    held = ring.push(torch.tensor(9.0), torch.tensor(False))
    assert torch.equal(held.values, ring.values) and held.index.item() == 1
    assert set(pushed.fields("loss_scale_history")) == {
        "loss_scale_history",
        "loss_scale_history_index",
        "loss_scale_history_count",
    }


# --- The periodic work only where due -------------------------------------------------


def _due_of(config: StabilizerConfig, step: int, warmup_left: int) -> Due:
    # Independent of the stabilizer class: SPEC.md, "Per-step order" 7 and 9.
    after = step + 1
    interval = config.adaptation_interval > 0 and after % config.adaptation_interval == 0
    diag = config.diagnostics_interval > 0 and after % config.diagnostics_interval == 0
    history_rule = config.adaptation_rule in ("percentile", "median_mad", "mean_std")
    if history_rule:
        adapt = warmup_left == 1 or (interval and max(warmup_left - 1, 0) == 0)
        return Due(warmup=warmup_left > 0, adapt=adapt, diagnose=diag)
    return Due(warmup=True, adapt=interval, diagnose=diag)


@pytest.mark.parametrize("rule", ["track", "median_mad", "percentile", "mean_std", "zscore"])
def test_due_hint_changes_nothing(rule):
    config = dataclasses.replace(SMALL, adaptation_rule=rule, loss_scaling=rule == "median_mad")
    gen = torch.Generator().manual_seed(0)
    plain = hinted = ogt.init_state(config=config)
    left = int(plain["warmup_steps_left"])
    for k in range(40):
        g = torch.randn(5, generator=gen) * (30.0 if k % 9 == 8 else 1.0)
        if k == 20:
            g[0] = math.nan
        loss = 1.0 + 0.1 * k
        out_a, plain = ogt.update([g], plain, value=loss, config=config)
        due = _due_of(config, k, left)
        out_b, hinted = ogt.update([g], hinted, value=loss, config=config, due=due)
        left = max(left - 1, 0)
        assert np.array_equal(_bits(out_a[0]), _bits(out_b[0])), k
        for name in ogt.FIELDS:
            assert torch.equal(plain[name], hinted[name]) or (
                plain[name].isnan().all() and hinted[name].isnan().all()
            ), (k, name)


@pytest.mark.parametrize("rule", ["track", "median_mad", "zscore"])
def test_a_step_without_a_loss_does_not_compute_the_loss_gate(monkeypatch, rule):
    # SPEC.md, "Loss gate": a missing loss changes none of the three levels.
    config = dataclasses.replace(SMALL, adaptation_rule=rule)
    state = ogt.init_state(initial_threshold=1.0, config=config)
    for k in range(3):
        _, state = ogt.update([torch.tensor([0.3, 0.1 * k])], state, value=2.0 - k, config=config)
    levels = ("loss_centre", "loss_reference", "loss_spread")
    assert all(torch.isfinite(state[name]) for name in levels)

    def refuse(*args, **kwargs):
        raise AssertionError("the loss gate was computed without a loss")

    monkeypatch.setattr(arithmetic, "loss_gate", refuse)
    _, new = ogt.update([torch.tensor([0.3, 0.2])], state, config=config)
    assert new["stabilizer_step"].item() == 4
    for name in levels:
        assert np.array_equal(_bits(new[name]), _bits(state[name])), name


def test_a_calm_step_with_the_hint_reads_nothing_on_the_host(monkeypatch):
    config = dataclasses.replace(SMALL, adaptation_rule="median_mad", warmup_steps=0)
    state = ogt.init_state(initial_threshold=1.0, config=config)
    grads = [torch.tensor([0.3, 0.4]), torch.tensor([[0.0, 0.1]])]
    with monkeypatch.context() as m:
        _guard_host_reads(m)
        out, new = ogt.update(
            grads, state, config=config, due=Due(False, False, False), path="device"
        )
    assert new["stabilizer_step"].item() == 1
    # Norm sqrt(0.26) < t = 1: unchanged (loss scale 1).
    assert torch.equal(out[0], grads[0]) and torch.equal(out[1], grads[1])


def test_the_class_step_reads_nothing_on_the_host(monkeypatch):
    p = torch.nn.Parameter(torch.zeros(3))
    stab = ogt.GradientFlowStabilizer(1e-2, config=SMALL, path="device")
    for k in range(6):
        p.grad = torch.tensor([0.1, 0.2, 0.3 + k])
        with monkeypatch.context() as m:
            _guard_host_reads(m)
            stab.clip_gradients([p])
    assert stab.state["stabilizer_step"].item() == 6


# --- The rescale -------------------------------------------------------------------------


def test_clip_gradients_rescales_in_place():
    ps = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2, 3))]
    ps[0].grad = torch.full((4,), 10.0)
    ps[1].grad = torch.full((2, 3), -10.0)
    grads = [p.grad for p in ps]
    pointers = [g.data_ptr() for g in grads]
    stab = ogt.GradientFlowStabilizer(initial_threshold=1.0)
    norm = stab.clip_gradients(ps)
    assert norm.item() == pytest.approx(10.0 * math.sqrt(10), rel=1e-6)
    assert all(p.grad is g for p, g in zip(ps, grads, strict=True))
    assert [p.grad.data_ptr() for p in ps] == pointers
    total = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in ps))
    assert total == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("host", [True, False], ids=["cpu-read", "device-select"])
@pytest.mark.parametrize("inplace", [True, False])
def test_a_non_finite_step_gives_exact_zeros(monkeypatch, host, inplace):
    if not host:
        monkeypatch.setattr(functional, "_HOST_READ_DEVICES", ())
    grads = [
        torch.tensor([-1.0, math.nan, 2.0]),
        torch.tensor([-3.0, 4.0]),
        torch.tensor([-5.0], dtype=torch.float16),
        torch.tensor([math.inf]),
    ]
    out, state = ogt.update(grads, ogt.init_state(1e-2), inplace=inplace)
    assert state["nonfinite_count"].item() == 1
    for y in out:
        # +0.0 exactly: no NaN, no -0.0 (SPEC.md, "Per-step order" 4).
        assert y.float().abs().sum().item() == 0.0
        assert not torch.signbit(y).any()
    if inplace:
        assert all(y is g for y, g in zip(out, grads, strict=True))


def test_mixed_dtypes_are_rescaled_in_float32_in_place():
    p16 = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))
    pbf = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    p32 = torch.nn.Parameter(torch.zeros(2))
    p16.grad = torch.tensor([30.0, 40.0], dtype=torch.float16)
    pbf.grad = torch.tensor([0.0, 0.0], dtype=torch.bfloat16)
    p32.grad = torch.tensor([0.0, 0.0])
    stab = ogt.GradientFlowStabilizer(initial_threshold=1.0)
    stab.clip_gradients([p16, pbf, p32])
    # Norm 50, t = 1: x * (1 / 50) in float32, then rounded to float16.
    expected = (torch.tensor([30.0, 40.0]) * (torch.tensor(1.0) / torch.tensor(50.0))).half()
    assert p16.grad.dtype == torch.float16 and torch.equal(p16.grad, expected)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    ia = a.detach().numpy().view(np.int32).astype(np.int64)
    ib = b.detach().numpy().view(np.int32).astype(np.int64)
    return int(np.abs(ia - ib).max())


def test_clip_only_matches_clip_grad_norm_within_two_ulps():
    # Leaf norms 15 and 20, global norm 25, all exact in float32 both ways; t = 1.
    # clip_only has exact_clip: SPEC.md's (x / r) * t, bit for bit.
    # clip_grad_norm_ multiplies by fl(t / (r + 1e-6)): each is within an ulp
    # of x * t / r, so within 2 ulps of each other.
    source = [torch.tensor([9.0, -12.0, 0.0]), torch.tensor([[12.0], [16.0]])]
    ours = [torch.nn.Parameter(torch.zeros_like(s)) for s in source]
    ref = [torch.nn.Parameter(torch.zeros_like(s)) for s in source]
    for a, b, s in zip(ours, ref, source, strict=True):
        a.grad, b.grad = s.clone(), s.clone()
    stab = ogt.GradientFlowStabilizer(config=presets.clip_only(1.0))
    assert stab.clip_gradients(ours).item() == 25.0
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    for a, b in zip(ours, ref, strict=True):
        assert _ulps(a.grad, b.grad) <= 2
    for a, s in zip(ours, source, strict=True):
        assert _ulps(a.grad, (s / 25.0) * 1.0) == 0


@pytest.mark.parametrize("seed", range(5))
def test_clip_only_is_close_to_clip_grad_norm_on_random_gradients(seed):
    # The norms are summed in other orders (per-leaf squares here, a norm of
    # per-leaf norms there) and clip_grad_norm_ adds 1e-6 to r: a few ulps.
    gen = torch.Generator().manual_seed(seed)
    shapes = [(257,), (31, 17), (5, 4, 3), (1,)]
    source = [torch.randn(s, generator=gen) * 3.0 for s in shapes]
    ours = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    ref = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for a, b, s in zip(ours, ref, source, strict=True):
        a.grad, b.grad = s.clone(), s.clone()
    stab = ogt.GradientFlowStabilizer(config=presets.clip_only(1.0))
    norm = stab.clip_gradients(ours)
    total = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert norm.item() == pytest.approx(total.item(), rel=2e-7)
    for a, b in zip(ours, ref, strict=True):
        assert _ulps(a.grad, b.grad) <= 4


# --- Versions and checkpoints ----------------------------------------------------------


def test_init_state_carries_the_layout_version():
    state = ogt.init_state(1e-2)
    assert state["state_version"].dtype == torch.int32
    assert state["state_version"].item() == 5 == constants.STATE_VERSION
    assert tuple(state) == constants.FLAT_FIELDS


def test_a_layout_1_state_is_refused_with_both_versions():
    old = ogt.init_state(1e-2)
    del old["state_version"]
    with pytest.raises(StateVersionError) as info:
        ogt.update([torch.ones(2)], old)
    assert "version 1" in str(info.value) and "version 5" in str(info.value)
    stab = ogt.GradientFlowStabilizer(1e-2)
    with pytest.raises(StateVersionError, match="load_state_dict") as info:
        stab.load_state_dict(old)
    assert "version 1" in str(info.value) and "version 5" in str(info.value)
    with pytest.raises(StateVersionError):
        ogt.check_state(old, StabilizerConfig())
    newer = ogt.init_state(1e-2)
    newer["state_version"] = torch.tensor(6, dtype=torch.int32)
    with pytest.raises(StateVersionError, match="6"):
        stab.load_state_dict(newer)
    assert isinstance(StateVersionError("x"), ValueError)


def _with_explosions() -> dict[str, torch.Tensor]:
    """A state after norms 0.5, 50, 0.5, 80 at threshold 1: two explosions in its ring."""
    state = ogt.init_state(config=SMALL, initial_threshold=1.0)
    for g in (0.5, 50.0, 0.5, 80.0):
        _, state = ogt.update([torch.tensor([g])], state, config=SMALL)
    assert state["explosion_norms_count"].item() == 2
    return state


def _layout(state: dict[str, torch.Tensor], version: int = 2) -> dict[str, torch.Tensor]:
    """``state`` as an earlier release saved it, through torch.save: no
    ``norm_quantile`` (layouts 2 and 3), no ring of exploding norms (layout
    2), ``state_version`` ``version``."""
    old = {
        k: v.clone()
        for k, v in state.items()
        if k != "norm_quantile" and not (version == 2 and k.startswith("explosion_norms"))
    }
    old["state_version"] = torch.tensor(version, dtype=torch.int32)
    buffer = io.BytesIO()
    torch.save(old, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _layout_2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _layout(state, 2)


def _emptied(state: dict[str, torch.Tensor], version: int = 2) -> dict[str, torch.Tensor]:
    """``state`` as the migration of layout ``version`` rebuilds it: the
    quantile at the centre and (layout 2) the ring of exploding norms as a
    fresh init has it."""
    fresh = ogt.init_state(config=SMALL, initial_threshold=1.0)
    out = {
        k: (fresh[k] if version == 2 and k.startswith("explosion_norms") else v.clone())
        for k, v in state.items()
    }
    out["norm_quantile"] = state["ema_mean"].clone()
    return out


def _assert_same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert tuple(a) == tuple(b) == constants.FLAT_FIELDS
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].numpy().tobytes() == b[name].numpy().tobytes(), name


def test_a_layout_2_state_dict_is_migrated_by_load_state_dict():
    source = _with_explosions()
    stab = ogt.GradientFlowStabilizer(1.0, config=SMALL)
    stab.load_state_dict(_layout_2(source))
    loaded = stab.state_dict()
    assert loaded["explosion_norms"].dtype == torch.float32
    # Sized like event_flags (E = 8), empty.
    assert torch.equal(loaded["explosion_norms"], torch.zeros(8))
    assert loaded["explosion_norms_index"].item() == loaded["explosion_norms_count"].item() == 0
    assert loaded["norm_quantile"].item() == source["ema_mean"].item()
    assert loaded["state_version"].item() == constants.STATE_VERSION
    _assert_same_bits(loaded, _emptied(source))
    # It steps as a stabilizer loaded with the source, ring emptied.
    other = ogt.GradientFlowStabilizer(1.0, config=SMALL)
    other.load_state_dict(_emptied(source))
    pa, pb = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    for g in (60.0, 0.5, 0.7):
        pa.grad, pb.grad = torch.tensor([g]), torch.tensor([g])
        stab.clip_gradients([pa])
        other.clip_gradients([pb])
        assert pa.grad.numpy().tobytes() == pb.grad.numpy().tobytes()
    _assert_same_bits(stab.state_dict(), other.state_dict())


@pytest.mark.parametrize("version", [2, 3])
def test_the_functional_step_takes_an_old_layout_after_migrate_state(version):
    source = _with_explosions()
    old = _layout(source, version)
    # The step does not migrate: it says where the migration is.
    with pytest.raises(StateVersionError, match=rf"layout version {version}.*migrate_state"):
        ogt.update([torch.tensor([60.0])], old, config=SMALL)
    with pytest.raises(StateVersionError, match=rf"layout version {version}.*migrate_state"):
        ogt.check_state(old, SMALL, read_version=False)
    migrated = ogt.migrate_state(old)
    _assert_same_bits(migrated, _emptied(source, version))
    added = {"state_version", "norm_quantile"}
    for name in migrated:
        if name not in added and not (version == 2 and name.startswith("explosion_norms")):
            assert migrated[name] is old[name], name  # kept, not copied
    ga, sa = ogt.update([torch.tensor([60.0])], migrated, config=SMALL)
    gb, sb = ogt.update([torch.tensor([60.0])], _emptied(source, version), config=SMALL)
    assert ga[0].numpy().tobytes() == gb[0].numpy().tobytes()
    _assert_same_bits(sa, sb)


def test_a_layout_4_state_dict_only_takes_the_new_version():
    # Layout 5 regrouped the JAX state's storage only: a state dict of layout
    # 4 has the same keys and meaning, and every tensor is kept, not copied.
    source = _with_explosions()
    old = dict(source, state_version=torch.tensor(4, dtype=torch.int32))
    with pytest.raises(StateVersionError, match=r"layout version 4.*migrate_state"):
        ogt.check_state(old, SMALL)
    migrated = ogt.migrate_state(old)
    _assert_same_bits(migrated, source)
    for name in migrated:
        if name != "state_version":
            assert migrated[name] is old[name], name
    stab = ogt.GradientFlowStabilizer(1.0, config=SMALL)
    stab.load_state_dict(old)
    _assert_same_bits(stab.state_dict(), source)
    _assert_same_bits(ogt.from_jax_state(ogt.to_jax_state(old)), source)


def test_the_interchange_migrates_a_layout_2_state_dict():
    source = _with_explosions()
    jax_state = ogt.to_jax_state(_layout_2(source))
    assert int(jax_state.explosion_norms.count) == 0
    _assert_same_bits(ogt.from_jax_state(jax_state), _emptied(source))


def test_the_interchange_refuses_a_layout_1_state():
    old = ogt.init_state(1e-2)
    del old["state_version"]
    with pytest.raises(StateVersionError, match="layout version 1"):
        ogt.to_jax_state(old)


def test_state_round_trips_through_torch_save():
    a = ogt.GradientFlowStabilizer(config=SMALL)
    p = torch.nn.Parameter(torch.zeros(3))
    for k in range(7):
        p.grad = torch.tensor([0.1 * k, 0.2, 3.0 if k == 5 else 0.3])
        a.clip_gradients([p], loss=1.0 + k)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["state_version"].item() == constants.STATE_VERSION
    b = ogt.GradientFlowStabilizer(1.0, config=SMALL)
    b.load_state_dict(loaded)
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]) or (
            value.isnan().all() and b.state_dict()[name].isnan().all()
        ), name
    # Both continue identically, periodic steps included (the host-side step
    # count is read back at the load).
    qa, qb = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    for k in range(9):
        g = torch.tensor([0.5, 0.1 * k, 8.0 if k == 3 else 0.2])
        qa.grad, qb.grad = g.clone(), g.clone()
        a.clip_gradients([qa])
        b.clip_gradients([qb])
        assert torch.equal(qa.grad, qb.grad), k
    for name, value in a.state_dict().items():
        other = b.state_dict()[name]
        assert torch.equal(value, other) or (value.isnan().all() and other.isnan().all()), name


# --- Skipping --------------------------------------------------------------------------


def test_auto_never_copies_the_model_and_optimizer_state(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("auto copied the parameters and the optimizer state")

    monkeypatch.setattr(stabilizer_module, "_step_and_restore", refuse)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    stab = ogt.GradientFlowStabilizer(1e-2)
    for poison in (False, False, True, False):
        loss = model(torch.ones(4, 3)).pow(2).mean()
        stab.get_scaled_loss(loss).backward()
        if poison:
            model.weight.grad[0, 0] = math.nan
        stab.step(opt)
        opt.zero_grad()
    assert stab.state["nonfinite_count"].item() == 1


def test_restore_holds_one_copy_of_parameters_and_adam_state(monkeypatch):
    # SPEC.md, "PyTorch adapter notes": "restore" copies the parameters and the
    # optimizer state once per step; with Adam that is 3 float32 numbers per
    # parameter (the parameter, exp_avg, exp_avg_sq) plus a step counter each.
    copied = []
    original = torch.Tensor.clone

    def counting_clone(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        copied.append(out.numel() * out.element_size())
        return out

    model = torch.nn.Linear(100, 10)  # 1010 parameters
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    stab = ogt.GradientFlowStabilizer(1e-2, skip_mode="restore")
    for k in range(2):
        loss = model(torch.ones(4, 100)).pow(2).mean()
        stab.get_scaled_loss(loss).backward()
        if k == 1:
            monkeypatch.setattr(torch.Tensor, "clone", counting_clone)
        stab.step(opt)
        opt.zero_grad()
    n = sum(p.numel() for p in model.parameters())
    assert sum(copied) == 3 * 4 * n + 2 * 4  # two float32 step counters


# --- Imports ---------------------------------------------------------------------------


def test_importing_the_torch_adapter_does_not_import_jax():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = (
        "import sys, optax_gradflow.torch as ogt, torch; "
        "ogt.update([torch.ones(3)], ogt.init_state(1e-2)); "
        "assert 'jax' not in sys.modules, 'jax imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
