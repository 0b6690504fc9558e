"""optax-gradflow: a gradient flow stabilizer as a pure optax transformation.

Adaptive clipping learned from the gradient-norm history, explosion /
vanishing / non-finite detection, dynamic loss scaling and an emergency
intervention, all in immutable, jit-friendly state. SPEC.md is the state
machine; README.md shows how to use it.

The names below are imported on first use, so that ``import
optax_gradflow.torch`` (the PyTorch adapter) does not import JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "EventCounts": "optax_gradflow.report",
    "EventLogger": "optax_gradflow.events",
    "GradientFlowState": "optax_gradflow.state",
    "Monitor": "optax_gradflow.monitor",
    "NormStatistics": "optax_gradflow.report",
    "Ring": "optax_gradflow.state",
    "StabilityReport": "optax_gradflow.report",
    "StabilizedState": "optax_gradflow.state",
    "StabilizerConfig": "optax_gradflow.config",
    "StateVersionError": "optax_gradflow.constants",
    "ThresholdStore": "optax_gradflow.store",
    "ThresholdStoreError": "optax_gradflow.store",
    "ThresholdStoreWarning": "optax_gradflow.store",
    "build_report": "optax_gradflow.report",
    "find_states": "optax_gradflow.loss_scaling",
    "fingerprint": "optax_gradflow.store",
    "loss_scale": "optax_gradflow.loss_scaling",
    "metrics": "optax_gradflow.report",
    "periodic_target_update": "optax_gradflow.rl",
    "plot": "optax_gradflow.plotting",
    "scale_loss": "optax_gradflow.loss_scaling",
    "stability_report": "optax_gradflow.report",
    "stability_reports": "optax_gradflow.report",
    "stabilize": "optax_gradflow.transform",
    "stabilized": "optax_gradflow.transform",
}
_SUBMODULES = ("constants", "presets", "rl")

__all__ = (
    "EventCounts",
    "EventLogger",
    "GradientFlowState",
    "Monitor",
    "NormStatistics",
    "Ring",
    "StabilityReport",
    "StabilizedState",
    "StabilizerConfig",
    "StateVersionError",
    "ThresholdStore",
    "ThresholdStoreError",
    "ThresholdStoreWarning",
    "build_report",
    "constants",
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


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f"optax_gradflow.{name}")
    elif name in _EXPORTS:
        module = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'optax_gradflow' has no attribute {name!r}")
    globals()[name] = module
    return module


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # Static analysers see the eager imports.
    from optax_gradflow import constants, presets, rl
    from optax_gradflow.config import StabilizerConfig
    from optax_gradflow.constants import StateVersionError
    from optax_gradflow.events import EventLogger
    from optax_gradflow.loss_scaling import find_states, loss_scale, scale_loss
    from optax_gradflow.monitor import Monitor
    from optax_gradflow.plotting import plot
    from optax_gradflow.report import (
        EventCounts,
        NormStatistics,
        StabilityReport,
        build_report,
        metrics,
        stability_report,
        stability_reports,
    )
    from optax_gradflow.rl import periodic_target_update
    from optax_gradflow.state import GradientFlowState, Ring, StabilizedState
    from optax_gradflow.store import (
        ThresholdStore,
        ThresholdStoreError,
        ThresholdStoreWarning,
        fingerprint,
    )
    from optax_gradflow.transform import stabilize, stabilized
