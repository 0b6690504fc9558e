"""optax-gradflow: a gradient flow stabilizer as a pure optax transformation.

Adaptive clipping learned from the gradient-norm history, explosion /
vanishing / non-finite detection, dynamic loss scaling and an emergency
intervention, all in immutable, jit-friendly state. SPEC.md is the state
machine; README.md shows how to use it.
"""

from optax_gradflow import presets
from optax_gradflow import rl
from optax_gradflow.config import StabilizerConfig
from optax_gradflow.events import EventLogger
from optax_gradflow.loss_scaling import find_states
from optax_gradflow.loss_scaling import loss_scale
from optax_gradflow.loss_scaling import scale_loss
from optax_gradflow.monitor import Monitor
from optax_gradflow.plotting import plot
from optax_gradflow.report import EventCounts
from optax_gradflow.report import NormStatistics
from optax_gradflow.report import StabilityReport
from optax_gradflow.report import build_report
from optax_gradflow.report import metrics
from optax_gradflow.report import stability_report
from optax_gradflow.report import stability_reports
from optax_gradflow.rl import periodic_target_update
from optax_gradflow.state import GradientFlowState
from optax_gradflow.store import ThresholdStore
from optax_gradflow.store import ThresholdStoreError
from optax_gradflow.store import ThresholdStoreWarning
from optax_gradflow.store import fingerprint
from optax_gradflow.transform import StabilizedState
from optax_gradflow.transform import stabilize
from optax_gradflow.transform import stabilized

__version__ = "0.1.0"

__all__ = (
    "EventCounts",
    "EventLogger",
    "GradientFlowState",
    "Monitor",
    "NormStatistics",
    "StabilityReport",
    "StabilizedState",
    "StabilizerConfig",
    "ThresholdStore",
    "ThresholdStoreError",
    "ThresholdStoreWarning",
    "build_report",
    "find_states",
    "fingerprint",
    "loss_scale",
    "metrics",
    "periodic_target_update",
    "plot",
    "presets",
    "rl",
    "scale_loss",
    "stability_report",
    "stability_reports",
    "stabilize",
    "stabilized",
)
