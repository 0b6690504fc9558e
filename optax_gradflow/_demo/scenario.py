"""The demo's scenario: its numbers and its description (imports no framework).

See :mod:`optax_gradflow._demo` for the scenario in words.
"""

from __future__ import annotations

# The scenario (see the module docstring).
INPUT_DIM = 16
WIDTH = 64
DEPTH = 4
BATCH = 64
EVAL_SIZE = 512
LEARNING_RATE = 3e-3
CLIP_NORM = 1.0
OUTLIER_RATE = 0.02
OUTLIER_FACTOR = 1e4
MISSING_RATE = 0.002
NOISE = 0.05
DIVERGENCE_FACTOR = 10.0

# apply_if_finite gives up (applies a NaN update) after this many non-finite
# steps in a row; large, so that it never does in the demo.
MAX_CONSECUTIVE_ERRORS = 10**6
# Two numbers within this factor of each other are "about equal" in the findings.
TIE_FACTOR = 1.05
# The findings also compare the mean loss over this last share of the steps.
TAIL_SHARE = 0.1

DEFAULT_STEPS = 1000
DEFAULT_OUTPUT = "gradflow_demo.png"
# Steps per jitted chunk (a lax.scan): the progress bar advances, and the
# stabilizer run's Monitor reads the device, once per chunk.
CHUNK = 10

ADAM, AIF, GRADFLOW = "adam", "apply_if_finite", "adam+gradflow"
RUNS = (
    (ADAM, "plain optax.adam"),
    (AIF, f"apply_if_finite(clip_by_global_norm({CLIP_NORM:g}) + adam)"),
    (GRADFLOW, "optax_gradflow.stabilized(adam, lr)"),
)
NAME_WIDTH = max(len(name) for name, _ in RUNS)

# The help text of the ``demo`` command.
DESCRIPTION = (
    f"Trains a {DEPTH}-layer ReLU MLP (Flax NNX) with Adam (lr {LEARNING_RATE:g}) on "
    f"a regression stream in which {OUTLIER_RATE:.0%} of the batches have targets off "
    f"by {OUTLIER_FACTOR:g} and {MISSING_RATE:.1%} carry a NaN target; three runs on "
    "the same batches: plain Adam, optax.apply_if_finite(clip_by_global_norm"
    f"({CLIP_NORM:g}) + Adam), and Adam behind optax_gradflow.stabilized (default "
    "config). Prints a comparison table, which run did best, and the stabilizer's "
    "stability report, logs the stabilizer's events, and writes a PNG of the loss "
    "curves and of the stabilizer's whole run (optax_gradflow.Monitor). Needs flax "
    "and matplotlib; tqdm for a progress bar "
    "(pip install 'optax-gradflow[examples]')."
)
