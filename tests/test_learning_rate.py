"""The learning rate an initial threshold comes from (SPEC.md, "Initial threshold" 3).

A schedule is read where it is positive: its largest value over its first
10,000 steps. Each expected threshold is SPEC.md's ``0.1 * sqrt(1 / lr)``
worked out by hand for the schedule's peak.
"""

import math
import warnings

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_gradflow as og
from optax_gradflow import learning_rate as lr_lib

RTOL = 1e-6  # float32 rounding of lr, 1 / lr and the square root
PARAMS = {"w": jnp.zeros(3)}

# (schedule, threshold by hand)
SCHEDULES = {
    # Linear warm-up 0 -> 1e-2 over 20 steps, then a cosine decay: the peak
    # 1e-2 at step 20 gives 0.1 * sqrt(100) = 1.
    "warmup_cosine_from_0": (optax.warmup_cosine_decay_schedule(0.0, 1e-2, 20, 300), 1.0),
    # 0 -> 4e-2 over 100 steps, then constant: 0.1 * sqrt(25) = 0.5.
    "linear_from_0": (optax.linear_schedule(0.0, 4e-2, 100), 0.5),
    # 0 for 10 steps, then 1e-4 decaying to 1e-6: the peak 1e-4 (step 10)
    # gives 0.1 * sqrt(1e4) = 10.
    "join": (
        optax.join_schedules(
            [optax.constant_schedule(0.0), optax.linear_schedule(1e-4, 1e-6, 50)], [10]
        ),
        10.0,
    ),
    # 0.1 * sqrt(1 / 2.5e-3) = 0.1 * sqrt(400) = 2.
    "constant": (optax.constant_schedule(2.5e-3), 2.0),
    # A decay starts at its peak: 0.1 * sqrt(1 / 1e-4) = 10.
    "decay": (optax.exponential_decay(1e-4, transition_steps=10, decay_rate=0.5), 10.0),
    # Python branches cannot take the array of steps: read step by step.
    "python_branches": (lambda step: 0.0 if step < 5 else 1e-2, 1.0),
}


def _stabilize(lr):
    return og.stabilize(lr).init(PARAMS)


# The inner optimizer's own rate plays no part in the threshold (the warm-up
# schedules in both places are stepped in test_the_warmup_from_0_runs_in_both_forms).
def _stabilized(lr):
    return og.stabilized(optax.adamw(1e-3), lr).init(PARAMS).flow


def _chain(lr):
    return og.find_states(optax.chain(og.stabilize(lr), optax.adamw(1e-3)).init(PARAMS))[0][1]


FORMS = {"stabilize": _stabilize, "stabilized": _stabilized, "chain": _chain}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", SCHEDULES)
def test_a_schedule_is_read_at_its_peak(form, name):
    schedule, expected = SCHEDULES[name]
    state = FORMS[form](schedule)
    assert float(state.clip_threshold) == pytest.approx(expected, rel=RTOL)
    assert int(state.warmup_steps_left) == 0
    # The tracker starts there: c = anchor = ln(t0).
    assert float(state.ema_mean) == pytest.approx(math.log(expected), abs=1e-6)


def test_a_schedule_is_read_over_its_first_10000_steps():
    # 0 -> 1e-3 over 20,000 steps: the largest value read is at step 9,999,
    # 1e-3 * 9999 / 20000, so the threshold is 0.1 / sqrt(4.9995e-4).
    state = _stabilize(optax.linear_schedule(0.0, 1e-3, 20_000))
    assert float(state.clip_threshold) == pytest.approx(0.1 / math.sqrt(4.9995e-4), rel=RTOL)


def test_the_warmup_from_0_runs_in_both_forms():
    # The user's report: both forms built and stepped with a warm-up from 0.
    sched = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 20, 300)
    params = {"w": jnp.ones(3)}
    for opt in (
        optax.chain(og.stabilize(sched), optax.adamw(sched)),
        og.stabilized(optax.adamw(sched), sched),
    ):
        state = opt.init(params)
        updates, state = jax.jit(opt.update)({"w": jnp.full(3, 10.0)}, state, params)
        # The first gradient (norm 17.3) is clipped to the threshold 1; the
        # warm-up's step 0 has lr 0, so AdamW moves nothing yet.
        flow = og.find_states(state)[0][1]
        assert int(flow.clip_count) == 1
        assert float(jnp.abs(updates["w"]).max()) == 0.0


@pytest.mark.parametrize("lr", [0.0, optax.constant_schedule(0.0), lambda step: 0.0])
@pytest.mark.parametrize("form", ["stabilize", "stabilized"])
def test_a_learning_rate_never_positive_starts_from_the_data(lr, form):
    with pytest.warns(UserWarning, match="first finite gradient norm"):
        state = FORMS[form](lr)
    # Data mode (SPEC.md, "Initial threshold" 4): the track rule waits for
    # one finite norm, under the parameters' cap: none for these all-zero
    # parameters, so max_threshold (inf).
    assert int(state.warmup_steps_left) == 1
    assert float(state.clip_threshold) == math.inf


def test_no_warning_when_an_explicit_threshold_wins():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = og.stabilize(0.0, initial_threshold=3.0).init(PARAMS)
    assert float(state.clip_threshold) == 3.0


def test_inject_hyperparams_with_a_warmup_from_0():
    # inject_hyperparams passes the schedule's value at step 0 (0) to the
    # factory: the threshold comes from the data, with a warning.
    sched = optax.linear_schedule(0.0, 1e-2, 10)
    opt = optax.inject_hyperparams(og.stabilize)(learning_rate=sched)
    with pytest.warns(UserWarning, match="learning rate is 0"):
        state = opt.init(PARAMS)
    _, state = jax.jit(opt.update)({"w": jnp.ones(3)}, state, PARAMS)
    assert int(state.inner_state.warmup_steps_left) == 0


@pytest.mark.parametrize(
    "lr, error, message",
    [
        ("1e-3", TypeError, "number or a schedule, got '1e-3'"),
        (True, TypeError, "number or a schedule, got True"),
        (jnp.ones(2), TypeError, r"scalar, got an array of shape \(2,\)"),
        (1j, TypeError, "number or a schedule"),
        (-1e-3, ValueError, ">= 0 and finite, got -0.001"),
        (float("nan"), ValueError, ">= 0 and finite, got nan"),
        (float("inf"), ValueError, ">= 0 and finite, got inf"),
        (lambda step: 1e-3 - 1e-4 * step, ValueError, "gives -0.0001.* at step 11"),
        (optax.constant_schedule(-1.0), ValueError, "gives -1.0 at step 0"),
    ],
)
def test_bad_learning_rates_are_named(lr, error, message):
    with pytest.raises(error, match=message):
        og.stabilize(lr)
    with pytest.raises(error, match=message):
        og.stabilized(optax.sgd(1e-3), lr)


def test_read_is_framework_free_and_exact_for_numbers():
    assert lr_lib.read(3e-4) == 3e-4
    assert lr_lib.read(jnp.float32(0.5)) == 0.5
    assert lr_lib.read(0) is None


# --- The PyTorch adapter ------------------------------------------------------


def test_torch_reads_schedules_as_jax_does():
    ogt = pytest.importorskip("optax_gradflow.torch")
    for name, (schedule, expected) in SCHEDULES.items():
        state = ogt.init_state(schedule)
        assert state["clip_threshold"].item() == pytest.approx(expected, rel=RTOL), name
    with pytest.warns(UserWarning, match="first finite gradient norm"):
        state = ogt.init_state(lambda step: 0.0)
    assert state["warmup_steps_left"].item() == 1
    with pytest.raises(TypeError, match="number or a schedule"):
        ogt.GradientFlowStabilizer("1e-3")


def test_torch_reads_the_learning_rate_of_an_optimizer_with_a_scheduler():
    torch = pytest.importorskip("torch")
    ogt = pytest.importorskip("optax_gradflow.torch")
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    # A warm-up from 0: the scheduler has set lr to 0 already, its base rate
    # 1e-2 is in initial_lr: 0.1 * sqrt(100) = 1.
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 20))
    assert opt.param_groups[0]["lr"] == 0.0
    stab = ogt.GradientFlowStabilizer(optimizer=opt)
    assert stab.state["clip_threshold"].item() == pytest.approx(1.0, rel=RTOL)
    assert stab.state["warmup_steps_left"].item() == 0
    # An explicit learning rate wins: 0.1 * sqrt(1 / 4e-2) = 0.5.
    stab = ogt.GradientFlowStabilizer(4e-2, optimizer=opt)
    assert stab.state["clip_threshold"].item() == pytest.approx(0.5, rel=RTOL)
    # OneCycleLR keeps its peak in max_lr: 0.1 * sqrt(1 / 4e-2) = 0.5.
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-2, total_steps=100)
    assert ogt.optimizer_learning_rate(opt) == pytest.approx(4e-2, rel=1e-12)
    # Several groups: the largest rate, 0.1 * sqrt(1 / 1e-2) = 1.
    opt = torch.optim.Adam(
        [{"params": [model.weight], "lr": 1e-4}, {"params": [model.bias], "lr": 1e-2}]
    )
    stab = ogt.GradientFlowStabilizer(optimizer=opt)
    assert stab.state["clip_threshold"].item() == pytest.approx(1.0, rel=RTOL)
    with pytest.raises(TypeError, match="param groups"):
        ogt.optimizer_learning_rate(object())
