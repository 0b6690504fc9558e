"""Bad input gets an error that names what was wrong (SPEC.md, "Errors")."""

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_gradflow as og

PARAMS = {"layer": {"w": jnp.ones(3), "b": jnp.zeros(1)}}


def _forms():
    return {
        "stabilize": og.stabilize(1e-2),
        "stabilized": og.stabilized(optax.adam(1e-2), 1e-2),
        "chain": optax.chain(og.stabilize(1e-2), optax.adam(1e-2)),
    }


@pytest.mark.parametrize("form", ["stabilize", "stabilized", "chain"])
@pytest.mark.parametrize("jit", [False, True])
def test_a_non_scalar_value_is_named(form, jit):
    opt = _forms()[form]
    state = opt.init(PARAMS)
    update = jax.jit(opt.update) if jit else opt.update
    with pytest.raises(ValueError, match=r"value= must be the loss.*shape \(8,\).*jnp.mean"):
        update(PARAMS, state, PARAMS, value=jnp.ones(8))
    # One element is one number: accepted.
    _, state = update(PARAMS, state, PARAMS, value=jnp.ones((1,)))
    assert float(og.find_states(state)[0][1].last_loss) == 1.0


def test_a_complex_value_is_refused():
    opt = og.stabilize(1e-2)
    with pytest.raises(TypeError, match="value= must be a real number"):
        opt.update(PARAMS, opt.init(PARAMS), PARAMS, value=jnp.complex64(1.0))


@pytest.mark.parametrize("form", ["stabilize", "stabilized", "chain"])
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_non_float_parameters_are_named_at_init(form, dtype):
    params = {"layer": {"w": jnp.ones(3), "steps": jnp.zeros((), dtype)}}
    opt = _forms()[form]
    with pytest.raises(TypeError, match=r"parameter at \['layer'\]\['steps'\] has dtype"):
        opt.init(params)


@pytest.mark.parametrize("form", ["stabilize", "stabilized"])
def test_non_float_gradients_are_named_at_update(form):
    opt = _forms()[form]
    state = opt.init(PARAMS)
    grads = {"layer": {"w": jnp.ones(3), "b": jnp.zeros(1, jnp.int32)}}
    with pytest.raises(TypeError, match=r"gradient at \['layer'\]\['b'\] has dtype int32"):
        jax.jit(opt.update)(grads, state, PARAMS)


def test_float0_gradients_are_named():
    # jax.grad of an integer input gives a float0 gradient.
    opt = og.stabilize(1e-2)
    state = opt.init({"w": jnp.ones(3)})
    grads = jax.grad(lambda p: jnp.sum(p["w"]), allow_int=True)({"w": jnp.ones(3), "n": 3})
    with pytest.raises(TypeError, match=r"gradient at \['n'\] has dtype float0"):
        opt.update(grads, state)


@pytest.mark.parametrize("form", ["stabilize", "stabilized"])
def test_a_gradient_of_another_shape_is_named_by_path(form):
    opt = _forms()[form]
    state = opt.init(PARAMS)
    grads = {"layer": {"w": jnp.ones(4), "b": jnp.zeros(1)}}
    with pytest.raises(
        ValueError, match=r"gradient at \['layer'\]\['w'\] has shape \(4,\), the parameter \(3,\)"
    ):
        opt.update(grads, state, PARAMS)


def test_missing_and_extra_gradients_are_named_by_path():
    opt = og.stabilize(1e-2)
    state = opt.init(PARAMS)
    with pytest.raises(ValueError, match=r"parameters without a gradient: \['layer'\]\['b'\]"):
        opt.update({"layer": {"w": jnp.ones(3)}}, state, PARAMS)
    extra = {"layer": {"w": jnp.ones(3), "b": jnp.zeros(1)}, "head": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"gradients without a parameter: \['head'\]"):
        opt.update(extra, state, PARAMS)


@pytest.mark.parametrize(
    "lr, error, message",
    [
        ("1e-3", TypeError, "learning_rate must be a number or a schedule, got '1e-3'"),
        (jnp.ones(3), TypeError, r"learning_rate must be a scalar, got an array of shape \(3,\)"),
    ],
)
def test_a_learning_rate_that_is_not_a_number(lr, error, message):
    with pytest.raises(error, match=message):
        og.stabilize(lr)


def test_a_store_path_that_is_a_directory(tmp_path):
    with pytest.raises(ValueError, match=r"is a directory: give a file in it, e\.g\. .*json"):
        og.ThresholdStore(tmp_path)
    assert og.ThresholdStore(tmp_path / "thresholds.json").path.name == "thresholds.json"


# --- The PyTorch adapter --------------------------------------------------------


def test_torch_non_scalar_value_is_named():
    torch = pytest.importorskip("torch")
    ogt = pytest.importorskip("optax_gradflow.torch")
    grads = [torch.ones(3)]
    with pytest.raises(ValueError, match=r"value= must be the loss.*shape \(8,\).*mean"):
        ogt.update(grads, ogt.init_state(1e-2), value=torch.ones(8))
    with pytest.raises(TypeError, match="value= must be the loss"):
        ogt.update(grads, ogt.init_state(1e-2), value="0.5")
    model = torch.nn.Linear(3, 1)
    stab = ogt.GradientFlowStabilizer(1e-2)
    model(torch.ones(2, 3)).sum().backward()
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        stab.clip_gradients(model.parameters(), loss=torch.ones(2))
    _, state = ogt.update(grads, ogt.init_state(1e-2), value=torch.tensor([0.5]))
    assert state["last_loss"].item() == 0.5
