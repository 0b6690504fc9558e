"""Moving a stabilizer state between JAX and PyTorch, exactly.

Both sides have one flat form, keyed by
:data:`optax_gradflow.constants.FLAT_FIELDS`: the PyTorch state dict is it,
and a JAX ``GradientFlowState`` converts to and from it with
``optax_gradflow.state.to_flat`` / ``from_flat``. Values are copied bit for
bit through numpy. JAX is imported only inside the two functions below.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from optax_gradflow.torch.state import (
    FIELDS,
    State,
    check_version,
    expected_specs,
    migrate_state,
)

_NUMPY_DTYPES = {
    torch.float32: np.float32,
    torch.int32: np.int32,
    torch.bool: np.bool_,
}


def _expected(name: str) -> tuple[torch.dtype, int]:
    """(dtype, number of dimensions) of one flat key, whatever the ring sizes."""
    from optax_gradflow.config import StabilizerConfig

    shape, dtype = expected_specs(StabilizerConfig())[name]
    return dtype, len(shape)


def from_jax_state(state: Any, device: torch.device | str | None = None) -> State:
    """A JAX ``GradientFlowState`` as the PyTorch state dict (a device-to-host copy).

    Args:
      state: a ``GradientFlowState`` (e.g.
        ``optax_gradflow.find_states(opt_state)[0][1]``).
      device: where to put the tensors; the CPU if None.

    Returns:
      A dict of tensors keyed by the flat field names, usable with
      :func:`optax_gradflow.torch.update` and ``load_state_dict``.

    Raises:
      StateVersionError: a state of another layout.
      ValueError: not a state, or a field of the wrong dtype or rank.
    """
    from optax_gradflow.state import GradientFlowState, to_flat

    if not isinstance(state, GradientFlowState):
        raise ValueError(
            "from_jax_state expects an optax_gradflow GradientFlowState, got "
            f"{type(state).__name__} (its stabilizer_step and other fields are missing)."
        )
    flat = to_flat(state)
    check_version(flat, "The JAX state given to from_jax_state")
    out: State = {}
    for name in FIELDS:
        array = np.array(flat[name])  # a copy: JAX arrays are read-only.
        dtype, ndim = _expected(name)
        if array.dtype != _NUMPY_DTYPES[dtype] or array.ndim != ndim:
            raise ValueError(
                f"Field {name!r} has dtype {array.dtype} and shape {array.shape}; expected "
                f"{np.dtype(_NUMPY_DTYPES[dtype])} with {ndim} dimension(s)."
            )
        tensor = torch.from_numpy(array)
        out[name] = tensor if device is None else tensor.to(device)
    return out


def to_jax_state(state: Mapping[str, torch.Tensor]) -> Any:
    """The PyTorch state dict as a JAX ``GradientFlowState`` (a device-to-host copy first).

    Imports JAX.

    A state dict of layout 2, 3 or 4 is migrated first (:func:`migrate_state`;
    SPEC.md, "Layout version").

    Raises:
      StateVersionError: a state dict of layout 1 (without
        ``"state_version"``) or of a newer layout.
      ValueError: naming the key, for a missing or extra key or a wrong dtype
        or rank.
    """
    state = migrate_state(state)
    check_version(state, "The state given to to_jax_state")
    missing = [name for name in FIELDS if name not in state]
    if missing:
        raise ValueError(f"State is missing key(s) {missing}.")
    extra = sorted(str(name) for name in state if name not in FIELDS)
    if extra:
        raise ValueError(f"State has unexpected key(s) {extra}.")
    host = {}
    for name in FIELDS:
        value = state[name]
        dtype, ndim = _expected(name)
        if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.dim() != ndim:
            got = (
                f"dtype {value.dtype}, shape {tuple(value.shape)}"
                if isinstance(value, torch.Tensor)
                else type(value).__name__
            )
            raise ValueError(
                f"State key {name!r} must be a {dtype} tensor with {ndim} dimension(s), got {got}."
            )
        host[name] = value.detach().cpu().numpy().copy()
    from optax_gradflow.state import from_flat

    return from_flat(host, where="The state given to to_jax_state")
