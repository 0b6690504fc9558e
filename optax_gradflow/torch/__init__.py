"""The gradient flow stabilizer for PyTorch.

An independent implementation of SPEC.md over PyTorch tensors, sharing the
:class:`~optax_gradflow.StabilizerConfig` and the state's field names with the
JAX transformation:

* :func:`init_state` and :func:`update`: the functional core, a dict of
  tensors in, a dict of tensors out, no host synchronisation;
* :class:`GradientFlowStabilizer`: a ``torch.amp.GradScaler``-shaped class;
  :func:`optimizer_learning_rate` reads the learning rate it starts from out
  of an optimizer (and its ``lr_scheduler``);
* :func:`from_jax_state` and :func:`to_jax_state`: exact state interchange;
  :func:`migrate_state` reads a state dict of the previous layout.

This subpackage does not import JAX (``to_jax_state`` does, when called).
"""

from optax_gradflow.torch.functional import update
from optax_gradflow.torch.interchange import from_jax_state, to_jax_state
from optax_gradflow.torch.stabilizer import GradientFlowStabilizer, optimizer_learning_rate
from optax_gradflow.torch.state import FIELDS, check_state, init_state, migrate_state

__all__ = (
    "FIELDS",
    "GradientFlowStabilizer",
    "check_state",
    "from_jax_state",
    "init_state",
    "migrate_state",
    "optimizer_learning_rate",
    "to_jax_state",
    "update",
)
