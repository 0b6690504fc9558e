"""Reading and writing the golden trace files (``tests/golden/*.json``).

Format of one file::

    {
     "name": ..., "description": ..., "spec_sections": [...],
     "runs": [
      {
       "label": ...,
       "config": {field: value, ...},      # StabilizerConfig overrides
       "init": {"learning_rate": ...} | {"initial_threshold": ...} | {},
       "state_overrides": {field: value},  # optional, applied after init
       "inputs": {"dtypes": [...], "grads": [[leaf, ...], ...]}            # explicit, or
                 {"dtypes": [...], "base": [leaf, ...], "multiplier": "<expr in k>",
                  "steps": N},
       "values": null | [loss per step] | {"expr": "<expr in k>"},
       "initial_state": {scalar fields},
       "steps": [{"k": ..., "out": [leaf, ...], "flags": ..., scalar fields...}, ...],
       "final_state": {every field}
      }
     ]
    }

With a formula, leaf ``j`` of step ``k`` is ``base[j] * multiplier(k)`` computed
in float64 and rounded to the leaf's dtype; ``multiplier`` is a Python
expression in ``k`` that may use ``math``, ``min``, ``max``, ``abs``, ``nan`` and
``inf``. Non-finite
floats are written as the strings "nan", "inf" and "-inf" so that the files are
strict JSON. Floats are the exact values of the float32 (or float16) results.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

GOLDEN_DIR = Path(__file__).parent

# The 0-d fields of the state, in SPEC.md order: recorded after every step.
SCALAR_FIELDS = (
    "stabilizer_step",
    "clip_threshold",
    "loss_scale",
    "loss_scale_growth_count",
    "warmup_steps_left",
    "consecutive_explosions",
    "emergency_hold_left",
    "explosion_count",
    "vanishing_count",
    "nonfinite_count",
    "clip_count",
    "emergency_count",
    "warning_count",
    "stable_streak",
    "last_grad_norm",
    "last_loss",
    "loss_centre",
    "loss_reference",
    "loss_spread",
    "norm_trend",
    "early_warning",
    "ema_mean",
    "ema_var",
    "centre_anchor",
    "norm_quantile",
    "norm_history_index",
    "norm_history_count",
    "variance_history_index",
    "variance_history_count",
    "loss_scale_history_index",
    "loss_scale_history_count",
    "threshold_history_index",
    "threshold_history_count",
    "event_flags_index",
    "event_flags_count",
    "emergency_steps_index",
    "emergency_steps_count",
    "explosion_norms_index",
    "explosion_norms_count",
)
RING_FIELDS = (
    "norm_history",
    "variance_history",
    "loss_scale_history",
    "threshold_history",
    "event_flags",
    "emergency_steps",
    "explosion_norms",
)
FLOAT_FIELDS = frozenset(
    {
        "clip_threshold",
        "loss_scale",
        "last_grad_norm",
        "last_loss",
        "loss_centre",
        "loss_reference",
        "loss_spread",
        "norm_trend",
        "ema_mean",
        "ema_var",
        "centre_anchor",
        "norm_quantile",
        "norm_history",
        "variance_history",
        "loss_scale_history",
        "threshold_history",
        "explosion_norms",
    }
)
DTYPES = {"float32": np.float32, "float16": np.float16}


def encode(x: Any) -> Any:
    """JSON-ready copy: numpy scalars to Python numbers, non-finite floats to strings."""
    if isinstance(x, dict):
        return {k: encode(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [encode(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    return x


def decode(x: Any) -> Any:
    """Inverse of :func:`encode` (numbers stay Python numbers)."""
    if isinstance(x, dict):
        return {k: decode(v) for k, v in x.items()}
    if isinstance(x, list):
        return [decode(v) for v in x]
    if x in ("nan", "inf", "-inf"):
        return float(x)
    return x


def _eval(expr: str, k: int) -> float:
    namespace = {
        "__builtins__": {"min": min, "max": max, "abs": abs},
        "math": math,
        "nan": math.nan,
        "inf": math.inf,
        "k": k,
    }
    return float(eval(expr, namespace))


def expand(run: dict) -> list[tuple[list[np.ndarray], float | None]]:
    """The (gradient leaves, loss value) of every step of a decoded run."""
    inputs = run["inputs"]
    dtypes = [DTYPES[d] for d in inputs["dtypes"]]
    steps = []
    with np.errstate(over="ignore", invalid="ignore"):
        if "grads" in inputs:
            for leaves in inputs["grads"]:
                steps.append(
                    [
                        np.asarray(leaf, np.float64).astype(dt)
                        for leaf, dt in zip(leaves, dtypes, strict=True)
                    ]
                )
        else:
            for k in range(inputs["steps"]):
                m = _eval(inputs["multiplier"], k)
                steps.append(
                    [
                        (np.asarray(leaf, np.float64) * m).astype(dt)
                        for leaf, dt in zip(inputs["base"], dtypes, strict=True)
                    ]
                )
    values = run.get("values")
    if values is None:
        losses = [None] * len(steps)
    elif isinstance(values, dict):
        losses = [_eval(values["expr"], k) for k in range(len(steps))]
    else:
        losses = list(values)
    return list(zip(steps, losses, strict=True))


def load(path: Path) -> dict:
    with open(path) as f:
        return decode(json.load(f))


def dump(scenario: dict, path: Path) -> None:
    """Writes a scenario with indent 1 and one line per step record."""
    data = encode(scenario)
    lines = ["{"]
    keys = list(data)
    for i, key in enumerate(keys):
        comma = "," if i < len(keys) - 1 else ""
        if key != "runs":
            lines.append(f" {json.dumps(key)}: {json.dumps(data[key])}{comma}")
            continue
        lines.append(' "runs": [')
        for r, run in enumerate(data["runs"]):
            lines.append("  {")
            run_keys = list(run)
            for j, rk in enumerate(run_keys):
                rcomma = "," if j < len(run_keys) - 1 else ""
                value = run[rk]
                if rk == "steps" or (rk == "inputs" and "grads" in value):
                    lines.append(f"   {json.dumps(rk)}: " + ("[" if rk == "steps" else "{"))
                    if rk == "steps":
                        rows = [json.dumps(s) for s in value]
                        lines.extend(
                            f"    {row}{',' if n < len(rows) - 1 else ''}"
                            for n, row in enumerate(rows)
                        )
                        lines.append(f"   ]{rcomma}")
                    else:
                        lines.append(f'    "dtypes": {json.dumps(value["dtypes"])},')
                        lines.append('    "grads": [')
                        rows = [json.dumps(g) for g in value["grads"]]
                        lines.extend(
                            f"     {row}{',' if n < len(rows) - 1 else ''}"
                            for n, row in enumerate(rows)
                        )
                        lines.append("    ]")
                        lines.append(f"   }}{rcomma}")
                elif rk == "final_state":
                    lines.append(f"   {json.dumps(rk)}: {{")
                    items = list(value.items())
                    lines.extend(
                        f"    {json.dumps(fk)}: {json.dumps(fv)}{',' if n < len(items) - 1 else ''}"
                        for n, (fk, fv) in enumerate(items)
                    )
                    lines.append(f"   }}{rcomma}")
                else:
                    lines.append(f"   {json.dumps(rk)}: {json.dumps(value)}{rcomma}")
            lines.append("  }" + ("," if r < len(data["runs"]) - 1 else ""))
        lines.append(" ]" + comma)
    lines.append("}")
    text = "\n".join(lines) + "\n"
    json.loads(text)  # The hand-rolled layout must stay valid JSON.
    path.write_text(text)
