"""optax-gradflow: a gradient flow stabilizer as a pure optax transformation.

Adaptive clipping learned from the gradient-norm history, explosion /
vanishing / non-finite detection, dynamic loss scaling and an emergency
intervention, all in immutable, jit-friendly state. SPEC.md is the state
machine; README.md shows how to use it.
"""

from optax_gradflow.config import StabilizerConfig
from optax_gradflow.loss_scaling import find_states, loss_scale, scale_loss
from optax_gradflow.state import GradientFlowState
from optax_gradflow.transform import StabilizedState, stabilize, stabilized

__version__ = "0.1.0"

__all__ = (
    "GradientFlowState",
    "StabilizedState",
    "StabilizerConfig",
    "find_states",
    "loss_scale",
    "scale_loss",
    "stabilize",
    "stabilized",
)
