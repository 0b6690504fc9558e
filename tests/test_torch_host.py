"""The PyTorch host path: the step's scalar logic on NumPy scalars, on the CPU.

Both paths run the same arithmetic (``optax_gradflow.arithmetic``); these
tests hold them together step by step, on streams where every event fires
(non-finite steps, explosions, emergencies, adaptations, warnings, loss-scale
changes), for every rule, through the functional ``update`` and through the
class. The golden tests (tests/test_parity_golden.py) check each path against
the independent reference. Tolerances: NumPy's float32 ``exp`` and ``log`` may
differ from PyTorch's by an ulp, as XLA's do, and the diagnostics' sums are
taken in another order: floats within rtol 1e-5 (the log-domain levels and the
loss gate's also atol 1e-5 / 1e-6, the trend atol 1e-6, the variances atol
1e-6 times the largest norm squared); counters, flags and booleans exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from _helpers import EVENTFUL
from test_parity_random import _gradient_stream

torch = pytest.importorskip("torch")

import optax_gradflow.torch as ogt  # noqa: E402
from optax_gradflow import presets  # noqa: E402
from optax_gradflow.config import StabilizerConfig  # noqa: E402
from optax_gradflow.constants import Event  # noqa: E402
from optax_gradflow.torch import functional, host, traced  # noqa: E402

RTOL = 1e-5
LOG_FIELDS = frozenset({"ema_mean", "ema_var", "centre_anchor", "norm_quantile"})
LOSS_FIELDS = frozenset({"loss_centre", "loss_reference", "loss_spread"})

CONFIGS = {
    "track": StabilizerConfig(
        **EVENTFUL, emergency_hold_steps=10, emergency_rearm_steps=40, loss_scaling=True
    ),
    "seed": dataclasses.replace(presets.seed(), warmup_steps=10, **EVENTFUL),
    "median_mad": StabilizerConfig(adaptation_rule="median_mad", warmup_steps=10, **EVENTFUL),
    "mean_std": StabilizerConfig(adaptation_rule="mean_std", warmup_steps=10, **EVENTFUL),
    "zscore": dataclasses.replace(presets.zclip(), warmup_steps=10, **EVENTFUL),
    "exact_clip": dataclasses.replace(presets.clip_only(0.5), loss_scaling=True),
}


def _close(name: str, actual: np.ndarray, expected: np.ndarray, norms: np.ndarray, where: str):
    assert actual.dtype == expected.dtype, f"{where}: dtype of {name}"
    if expected.dtype != np.float32:
        np.testing.assert_array_equal(actual, expected, err_msg=f"{where}: {name}")
        return
    atol = 0.0
    if name == "norm_trend":
        atol = 1e-6
    elif name in LOG_FIELDS:
        atol = 1e-5
    elif name in LOSS_FIELDS:
        atol = 1e-6
    elif name == "variance_history":
        atol = 1e-6 * float(np.max(norms, initial=0.0)) ** 2
    np.testing.assert_allclose(
        actual, expected, rtol=RTOL, atol=atol, equal_nan=True, err_msg=f"{where}: {name}"
    )


def _compare(step: int, out_a, out_b, state_a, state_b) -> None:
    where = f"step {step}"
    for i, (a, b) in enumerate(zip(out_a, out_b, strict=True)):
        np.testing.assert_allclose(
            a.numpy(), b.numpy(), rtol=RTOL, atol=0, err_msg=f"{where}: output {i}"
        )
    norms = state_b["norm_history"].numpy()
    for name in ogt.FIELDS:
        _close(name, state_a[name].numpy(), state_b[name].numpy(), norms, where)


@pytest.mark.parametrize("rule", sorted(CONFIGS))
def test_the_host_and_device_paths_agree_step_by_step(rule):
    config = CONFIGS[rule]
    kwargs = {"learning_rate": 1e-2} if rule == "track" else {}
    on_host = ogt.init_state(config=config, **kwargs)
    on_device = ogt.init_state(config=config, **kwargs)
    seen = 0
    for k, (leaves, loss) in enumerate(_gradient_stream(seed=7 + len(rule), steps=300)):
        grads = [torch.from_numpy(x) for x in leaves]
        out_h, on_host = ogt.update(grads, on_host, value=loss, config=config, path="host")
        out_d, on_device = ogt.update(grads, on_device, value=loss, config=config, path="device")
        _compare(k, out_h, out_d, on_host, on_device)
        flags = on_host["event_flags"]
        seen |= int(flags[(int(on_host["event_flags_index"]) - 1) % flags.shape[0]])
    # The streams reach the branches: clipped and non-finite steps, and
    # explosions where the config has them.
    required = Event.CLIPPED | Event.NONFINITE
    if config.explosion_factor != float("inf"):
        required |= Event.EXPLOSION
    assert seen & required == required, f"event bits seen: {seen:07b}"


def test_update_on_the_host_is_pure():
    config = CONFIGS["track"]
    state = ogt.init_state(1e-2, config=config)
    before = {name: value.clone() for name, value in state.items()}
    grads = [torch.tensor([3.0, 4.0])]
    _, new = ogt.update(grads, state, value=1.0, config=config, path="host")
    for name, value in state.items():
        assert torch.equal(value, before[name]) or (value.isnan() & before[name].isnan()).all()
    assert new["stabilizer_step"].item() == 1
    assert grads[0].tolist() == [3.0, 4.0]  # not in place unless asked
    # The tensors the step wrote are new ones; the others are shared, as on the device.
    changed = [name for name in state if not torch.equal(new[name], state[name])]
    assert "clip_threshold" in changed and "event_flags" in changed
    assert all(new[name] is not state[name] for name in changed)


def test_auto_is_the_host_on_the_cpu(monkeypatch):
    calls = []
    original = traced.step

    def spy(*args, **kwargs):
        calls.append(True)
        return original(*args, **kwargs)

    monkeypatch.setattr(traced, "step", spy)
    state = ogt.init_state(1e-2)
    ogt.update([torch.tensor([1.0])], state)
    assert calls == [True]
    ogt.update([torch.tensor([1.0])], state, path="device")
    assert calls == [True]


@pytest.mark.parametrize("path", ["gpu", "", None])
def test_an_unknown_path_is_refused_by_name(path):
    state = ogt.init_state(1e-2)
    with pytest.raises(ValueError, match="path must be one of"):
        ogt.update([torch.tensor([1.0])], state, path=path)
    with pytest.raises(ValueError, match="path must be one of"):
        ogt.GradientFlowStabilizer(1e-2, path=path)


def test_host_off_the_cpu_is_refused():
    with pytest.raises(ValueError, match='path="host" reads the state on the host'):
        functional.host_path("host", torch.device("meta"))
    assert not functional.host_path("auto", torch.device("meta"))


def _train(path: str, config: StabilizerConfig, steps: int = 120):
    """A small model trained with the class; returns the norms, the state and the weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    stab = ogt.GradientFlowStabilizer(0.05, config=config, path=path)
    rng = np.random.default_rng(3)
    norms = []
    for k in range(steps):
        x = torch.from_numpy(rng.normal(size=(16, 4)).astype(np.float32))
        y = x[:, :1] * 2.0 + (50.0 if k % 37 == 5 else 0.0)
        if k == 60:
            x[0, 0] = float("nan")
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        stab.get_scaled_loss(loss).backward()
        norms.append(stab.clip_gradients(model.parameters(), loss=loss))
        stab.step(opt)
    weights = [p.detach().clone() for p in model.parameters()]
    return norms, stab.state_dict(), weights


@pytest.mark.parametrize("rule", ["track", "seed"])
def test_the_class_on_the_host_trains_as_on_the_device(rule):
    config = CONFIGS[rule]
    norms_h, state_h, weights_h = _train("host", config)
    norms_d, state_d, weights_d = _train("device", config)
    # Each returned norm is its step's, not overwritten by a later step.
    np.testing.assert_allclose(
        torch.stack(norms_h).numpy(), torch.stack(norms_d).numpy(), rtol=1e-5, equal_nan=True
    )
    assert len({float(n) for n in norms_h if torch.isfinite(n)}) > 100
    norms = state_d["norm_history"].numpy()
    for name in ogt.FIELDS:
        _close(name, state_h[name].numpy(), state_d[name].numpy(), norms, "end")
    assert state_h["nonfinite_count"].item() == 1
    for a, b in zip(weights_h, weights_d, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)


def test_the_class_uses_the_host_on_the_cpu(monkeypatch):
    calls = []
    original = functional.step

    def spy(*args, **kwargs):
        calls.append(True)
        return original(*args, **kwargs)

    monkeypatch.setattr(functional, "step", spy)
    _train("auto", CONFIGS["track"], steps=5)
    assert calls == []
    _train("device", CONFIGS["track"], steps=5)
    assert len(calls) == 5


def test_a_state_dict_taken_before_is_not_written_by_later_steps():
    stab = ogt.GradientFlowStabilizer(1e-2)
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.tensor([3.0, 4.0, 0.0])
    stab.clip_gradients([param], loss=1.0)
    snapshot = stab.state_dict()
    first = snapshot["last_grad_norm"].item()
    for k in range(3):
        param.grad = torch.tensor([1.0 + k, 0.0, 0.0])
        stab.clip_gradients([param], loss=1.0)
    assert snapshot["stabilizer_step"].item() == 1
    assert snapshot["last_grad_norm"].item() == first == 5.0
    assert stab.state["stabilizer_step"].item() == 4


def test_a_loss_given_after_the_step_feeds_the_gate_on_both_paths():
    # unscale_gradients first, then clip_gradients(loss=...): the loss is the
    # step's value, as if given to update, on either path.
    ends = {}
    for path in ("host", "device"):
        stab = ogt.GradientFlowStabilizer(1e-2, path=path)
        param = torch.nn.Parameter(torch.zeros(2))
        for k in range(30):
            param.grad = torch.tensor([1.0 + 0.1 * k, 0.5])
            stab.unscale_gradients([param])
            stab.clip_gradients([param], loss=2.0 - 0.01 * k)
        ends[path] = stab.state_dict()
    for name in ("loss_centre", "loss_reference", "loss_spread", "last_loss"):
        np.testing.assert_allclose(
            ends["host"][name].numpy(), ends["device"][name].numpy(), rtol=1e-6, err_msg=name
        )
    assert np.isfinite(ends["host"]["loss_centre"].item())


def _bits(array: np.ndarray) -> np.ndarray:
    return array.view(np.int32) if array.dtype == np.float32 else array


@pytest.mark.parametrize("rule", sorted(CONFIGS))
@pytest.mark.parametrize("with_loss", [True, False])
def test_the_traced_step_is_the_interpreted_one_bit_for_bit(rule, with_loss):
    # The traced function writes the operations HostOps runs, in its order:
    # every field, every output, bit for bit.
    config = CONFIGS[rule]
    states = [ogt.init_state(config=config) for _ in range(2)]
    views = [host.HostState(state) for state in states]
    for k, (leaves, loss) in enumerate(_gradient_stream(seed=11 + len(rule), steps=250)):
        outs = []
        value = loss if with_loss else None
        grads = [torch.from_numpy(x.copy()) for x in leaves]
        out, _ = host.step(
            grads,
            views[0],
            value=value,
            config=config,
            rule=functional.rule_for(config),
            rescale=functional.rescale_leaves,
        )
        outs.append(out)
        grads = [torch.from_numpy(x.copy()) for x in leaves]
        out, _ = traced.step(
            grads, views[1], value=value, config=config, rescale=functional.rescale_leaves
        )
        outs.append(out)
        for a, b in zip(*outs, strict=True):
            assert np.array_equal(_bits(a.numpy()), _bits(b.numpy())), f"step {k}"
        for name in ogt.FIELDS:
            a, b = (s[name].numpy() for s in states)
            assert np.array_equal(_bits(a), _bits(b)), f"step {k}: {name}"


def test_the_traced_step_is_one_function_per_config():
    config = CONFIGS["track"]
    fn = traced.function_for(config, True)
    assert traced.function_for(config, True) is fn
    assert traced.function_for(config, False) is not fn
    # Straight-line code: no call back into the arithmetic's Python objects.
    assert "arithmetic" not in fn.source and "xp." not in fn.source
    # A step without a loss leaves the loss gate's levels alone: not written.
    assert "V['loss_centre'][...] =" in fn.source
    assert "V['loss_centre'][...] =" not in traced.function_for(config, False).source
