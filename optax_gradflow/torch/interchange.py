"""Moving a stabilizer state between JAX and PyTorch, exactly.

Field by field, by name: a ``GradientFlowState`` and the PyTorch state dict
have the same keys, shapes and dtypes (SPEC.md, "State"). Values are copied
bit for bit through numpy. JAX is imported only inside :func:`to_jax_state`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from optax_gradflow.torch.state import FIELDS, FLOAT_SCALARS, RINGS, State

_NUMPY_DTYPES = {
    torch.float32: np.float32,
    torch.int32: np.int32,
    torch.bool: np.bool_,
}


def _expected_dtype(name: str) -> torch.dtype:
    if name in FLOAT_SCALARS:
        return torch.float32
    if name == "early_warning":
        return torch.bool
    if name in RINGS:
        return RINGS[name][1]
    return torch.int32


def _expected_ndim(name: str) -> int:
    return 1 if name in RINGS else 0


def from_jax_state(state: Any, device: torch.device | str | None = None) -> State:
    """A JAX ``GradientFlowState`` as the PyTorch state dict (a device-to-host copy).

    Args:
      state: a ``GradientFlowState`` (any object with the field names as
        attributes, e.g. ``optax_gradflow.find_states(opt_state)[0][1]``).
      device: where to put the tensors; the CPU if None.

    Returns:
      A dict of tensors keyed by the field names, usable with
      :func:`optax_gradflow.torch.update` and ``load_state_dict``.
    """
    out: State = {}
    for name in FIELDS:
        if not hasattr(state, name):
            raise ValueError(f"The JAX state has no field {name!r}.")
        array = np.array(getattr(state, name))  # a copy: JAX arrays are read-only.
        dtype = _expected_dtype(name)
        if array.dtype != _NUMPY_DTYPES[dtype] or array.ndim != _expected_ndim(name):
            raise ValueError(
                f"Field {name!r} has dtype {array.dtype} and shape {array.shape}; expected "
                f"{np.dtype(_NUMPY_DTYPES[dtype])} with {_expected_ndim(name)} dimension(s)."
            )
        tensor = torch.from_numpy(array)
        out[name] = tensor if device is None else tensor.to(device)
    return out


def to_jax_state(state: Mapping[str, torch.Tensor]) -> Any:
    """The PyTorch state dict as a JAX ``GradientFlowState`` (a device-to-host copy first).

    Imports JAX. Raises ValueError naming the key for a missing or extra key
    or a wrong dtype or rank.
    """
    missing = [name for name in FIELDS if name not in state]
    if missing:
        raise ValueError(f"State is missing key(s) {missing}.")
    extra = sorted(str(name) for name in state if name not in FIELDS)
    if extra:
        raise ValueError(f"State has unexpected key(s) {extra}.")
    import jax.numpy as jnp

    from optax_gradflow.state import GradientFlowState

    fields = {}
    for name in FIELDS:
        value = state[name]
        dtype = _expected_dtype(name)
        if (
            not isinstance(value, torch.Tensor)
            or value.dtype != dtype
            or value.dim() != _expected_ndim(name)
        ):
            got = (
                f"dtype {value.dtype}, shape {tuple(value.shape)}"
                if isinstance(value, torch.Tensor)
                else type(value).__name__
            )
            raise ValueError(
                f"State key {name!r} must be a {dtype} tensor with {_expected_ndim(name)} "
                f"dimension(s), got {got}."
            )
        fields[name] = jnp.asarray(value.detach().cpu().numpy().copy())
    return GradientFlowState(**fields)
