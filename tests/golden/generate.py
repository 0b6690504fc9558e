"""Writes the golden traces ``tests/golden/*.json`` from ``reference.py``.

Run from the repository root::

    python tests/golden/generate.py

Only the plain-Python reference computes expected values here; neither the
JAX nor the PyTorch implementation is imported. Each scenario below says what
it exercises; ``test_parity_golden.py`` replays the inputs through both
implementations and also checks a few numbers derived by hand from SPEC.md.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from golden import golden_io, reference

NAN, INF = math.nan, math.inf
# A two-leaf gradient of global norm 3: [1, 2] and [2].
BASE3 = [[1.0, 2.0], [2.0]]
F32x2 = ["float32", "float32"]


def run(
    label,
    *,
    inputs,
    config=None,
    init=None,
    values=None,
    state_overrides=None,
    note="",
    seed=True,
):
    """One run. ``seed=True``: the config is ``presets.seed()`` (the original design,
    ``reference.SEED`` over the defaults) plus ``config``; ``seed=False``: the
    defaults (the ``track`` rule) plus ``config``. The file records the overrides
    in full, so ``StabilizerConfig(**run["config"])`` rebuilds the config."""
    spec = {"label": label}
    if note:
        spec["note"] = note
    spec["config"] = {**reference.SEED, **(config or {})} if seed else dict(config or {})
    spec["init"] = init or {}
    if state_overrides:
        spec["state_overrides"] = state_overrides
    spec["inputs"] = inputs
    spec["values"] = values
    return spec


def explicit(grads, dtypes=F32x2):
    return {"dtypes": dtypes, "grads": grads}


def formula(multiplier, steps, base=BASE3, dtypes=F32x2):
    return {"dtypes": dtypes, "base": base, "multiplier": multiplier, "steps": steps}


# The track rule's default rates (SPEC.md, "Hyperparameters"), for the descriptions.
RISE = reference.DEFAULTS["track_max_rise"]
FALL = reference.DEFAULTS["track_max_fall"]
HOLD = reference.DEFAULTS["emergency_hold_steps"]
# The loss gate's learning steps N = round(1 / track_rate) ("Loss gate").
LEARN = reference.learning_steps(reference.DEFAULTS)
# A two-leaf gradient of global norm 5: [3] and [4] (the track scenarios).
BASE5 = [[3.0], [4.0]]
# Deterministic lognormal-like noise around 1 (log-sigma about 0.3): golden
# inputs are formulas in k, so the noise is a chaotic sine, not a random draw.
NOISE = "math.exp(0.3 * math.sin(2.4 * k + 0.5 * math.sin(0.37 * k * k)))"


def scale3(*norms):
    """Explicit steps of BASE3 scaled to the given raw global norms."""
    return [[[n / 3.0, 2.0 * n / 3.0], [2.0 * n / 3.0]] for n in norms]


# The scenarios up to "saturation" were written for the original design; they
# run under presets.seed() (run(..., seed=True), the default here) so that they
# keep testing it. The "track_*" scenarios run under the default config.
SCENARIOS = {
    "calm": {
        "description": "Ordinary steps below the threshold: unscaled by x * (1 / s), nothing "
        "else moves. A norm exactly at the threshold is not clipped. The float16 run uses a "
        "loss scale of 1024 with gradients whose squares overflow float16 but not float32.",
        "spec_sections": ["Per-step order", "Classification", "Boundary cases"],
        "runs": [
            run(
                "float32, loss scale 3",
                note="lr 1e-2 gives t = 1; s = 3 so 1 / s is rounded; step 3 has raw norm 3, "
                "n = 1 = t exactly: not clipped.",
                config={"initial_loss_scale": 3.0},
                init={"learning_rate": 0.01},
                inputs=explicit(
                    [
                        [[0.3, -0.6], [0.9]],
                        [[1.2, 0.15], [-0.45]],
                        [[0.0, 0.75], [0.6]],
                        [[1.0, 2.0], [2.0]],
                        [[-0.21, 0.33], [1.7]],
                        [[0.05, 0.05], [0.05]],
                    ]
                ),
                values=[2.5, 2.25, 2.0, 1.875, 1.75, 1.5],
            ),
            run(
                "float16, loss scale 1024",
                note="Raw values up to 900: their squares overflow float16, not float32. "
                "Step 2 has n = 2 > t = 1: clipped.",
                config={
                    "initial_loss_scale": 1024.0,
                    "min_loss_scale": 1.0,
                    "max_loss_scale": 65536.0,
                },
                init={"learning_rate": 0.01},
                inputs=explicit(
                    [
                        [[300.0, -400.0], [500.0]],
                        [[512.0, 256.0], [-128.0]],
                        [[1024.0, 1536.0], [-768.0]],
                        [[900.0, 0.5], [-0.25]],
                    ],
                    dtypes=["float16", "float16"],
                ),
            ),
        ],
    },
    "spike": {
        "description": "One explosion among calm steps (n = 10 > 3 t): clipped to norm t, "
        "the scale backs off to 0.8 and the norm stays out of the history; later a "
        "moderate spike (n = 2) is clipped without being an explosion.",
        "spec_sections": ["Classification", "Per-step order", "Loss scale rule"],
        "runs": [
            run(
                "lr 1e-2, spike at step 3",
                init={"learning_rate": 0.01},
                inputs=explicit(scale3(0.5, 0.6, 0.4, 10.0, 0.4, 0.48, 1.6, 0.32)),
                values={"expr": "1.0 / (k + 1)"},
            )
        ],
    },
    "emergency": {
        "description": "Sustained explosion: five steps of unscaled norm about 100 against "
        "t = 1. The scale goes 1, 0.8, 0.64, 0.512, 0.4096, the fifth step fires the "
        "emergency: t = 0.5, s = max(0.032768, 0.1) = 0.1 (SPEC.md worked example). Then "
        "calm steps.",
        "spec_sections": ["Emergency intervention", "Loss scale rule"],
        "runs": [
            run(
                "lr 1e-2, five explosions",
                init={"learning_rate": 0.01},
                inputs=formula("20.0 * 0.8 ** k if k < 5 else 0.006", 8, base=[[3.0], [4.0]]),
            )
        ],
    },
    "vanishing": {
        "description": "A vanishing run (n < 1e-7) grows the scale by 1.5 per step: "
        "1.5^10 = 57.6650390625 after 10 steps, exactly 64 on the 11th, then it stays. "
        "All-zero gradients are vanishing too and come out exactly 0.",
        "spec_sections": ["Loss scale rule", "Boundary cases"],
        "runs": [
            run(
                "lr 1e-2, tiny gradients",
                init={"learning_rate": 0.01},
                inputs=formula("1e-9", 13, base=[[3.0], [4.0]]),
            ),
            run(
                "all-zero gradients",
                init={"learning_rate": 0.01},
                inputs=formula("0.0", 3),
            ),
        ],
    },
    "nan_inf": {
        "description": "Non-finite steps output zeros and halve the scale: a NaN element, "
        "+inf, -inf and finite values whose squares overflow float32 (1e30). A burst of six "
        "NaN steps fires the emergency on the fifth (non-finite steps count as explosions "
        "for it) and the scale is floored at 0.1 (presets.seed(): one floor for every step).",
        "spec_sections": ["Per-step order", "Emergency intervention", "Loss scale rule"],
        "runs": [
            run(
                "scattered",
                init={"learning_rate": 0.01},
                inputs=explicit(
                    [
                        [[0.3, 0.4], [0.0]],
                        [[NAN, 0.4], [0.0]],
                        [[0.15, 0.2], [0.0]],
                        [[0.3, INF], [0.0]],
                        [[0.3, 0.4], [-INF]],
                        [[1e30, 1e30], [0.0]],
                        [[0.05, 0.1], [0.1]],
                        [[0.02, 0.04], [0.04]],
                    ]
                ),
                values=[1.0, NAN, 1.0, 1.0, INF, 1.0, 0.5, 0.25],
            ),
            run(
                "NaN burst",
                init={"learning_rate": 0.01},
                inputs=formula("0.1 if k == 0 else 0.01 if k == 7 else nan", 8),
            ),
        ],
    },
    "lr_init": {
        "description": "Initial threshold from the learning rate, clamp(0.1 * sqrt(1 / lr), "
        "0.1, inf) in float32: lr 1e-2 -> 1, 1 -> 0.1, 10 -> 0.0316 clamped to 0.1, "
        "1e-4 -> 10, 2e-3 -> 2.236...; an explicit threshold wins over the learning rate. "
        "Each run clips a norm-1.5 step against its threshold.",
        "spec_sections": ["Initial threshold"],
        "runs": [
            run(f"lr {lr}", init={"learning_rate": lr}, inputs=explicit(scale3(1.5, 0.05)))
            for lr in (1e-2, 1.0, 10.0, 1e-4, 2e-3)
        ]
        + [
            run(
                "explicit 7 over lr 1e-2",
                init={"learning_rate": 0.01, "initial_threshold": 7.0},
                inputs=explicit(scale3(1.5, 0.05)),
            ),
            run(
                "max_threshold clamps lr 1e-4",
                config={"max_threshold": 4.0},
                init={"learning_rate": 1e-4},
                inputs=explicit(scale3(1.5, 0.05)),
            ),
        ],
    },
    "warmup": {
        "description": "Data warm-up: the first finite norm is not clipped, later warm-up "
        "steps clip at 2 x the median so far, an explosion during the warm-up stays out of "
        "the history, a non-finite first step uses the placeholder, the last warm-up step "
        "adapts, and then the periodic rule takes over.",
        "spec_sections": ["Initial threshold", "Warm-up threshold", "Per-step order"],
        "runs": [
            run(
                "warmup 6, interval 10",
                config={"warmup_steps": 6, "adaptation_interval": 10},
                inputs=explicit(
                    scale3(2.0, 1.5, 9.0, 30.0, NAN, 2.2, 1.8, 2.5, 12.0, 2.1, 1.9, 2.0)
                ),
            ),
            run(
                "non-finite first step",
                config={"warmup_steps": 3},
                inputs=explicit(scale3(NAN, 1.0, 1.2, 0.9, 1.1)),
            ),
            run(
                "warmup 0 in data mode: the placeholder until the first adaptation",
                config={"warmup_steps": 0, "adaptation_interval": 4},
                inputs=explicit(scale3(0.2, 0.25, 0.15, 0.2, 0.22, 0.3)),
            ),
            run(
                "warm-up left in the state, warmup_steps = 0 in the config",
                note="The warm-up is driven by the state's warmup_steps_left (a checkpoint "
                "resumed with another config): three warm-up steps still run.",
                config={"warmup_steps": 0},
                state_overrides={"warmup_steps_left": 3},
                inputs=explicit(scale3(2.0, 1.0, 5.0, 1.2, 0.5)),
            ),
            run(
                "default warm-up of 100 steps",
                note="Multiplier 1 + 0.25 sin(k), a spike of 20 at step 50; the warm-up ends "
                "(and adapts) at step 99.",
                inputs=formula("20.0 if k == 50 else 1.0 + 0.25 * math.sin(k)", 120),
            ),
        ],
    },
    "adaptation": {
        "description": "Adaptation boundaries with the default interval 100: step 99 "
        "adapts (stabilizer_step + 1 = 100), step 100 is the first to clip at the new "
        "threshold, step 101 does not adapt. One run per rule.",
        "spec_sections": ["Per-step order", "Threshold adaptation"],
        "runs": [
            run(
                f"rule {rule}",
                config={"adaptation_rule": rule},
                init={"learning_rate": 0.01},
                inputs=formula("0.25 + 0.0625 * (k % 7)", 103),
            )
            for rule in ("median_mad", "percentile", "mean_std")
        ],
    },
    "diagnostics": {
        "description": "Diagnostics at stabilizer_step + 1 = 500 with the defaults: the "
        "norms alternate 0.9 / 1.1 around 3 for 400 steps, then grow by e^0.012 per step; "
        "the log-norm slope of the last 100 history entries is about 0.012 > 0.01, so the "
        "early warning fires at step 499. The second run raises the warning through the "
        "relative variance (one step in ten is a 20x spike) with a short window.",
        "spec_sections": ["Diagnostics", "Ring buffers"],
        "runs": [
            run(
                "trend warning at step 500",
                inputs=formula(
                    "(1.0 + 0.1 * (-1) ** k) * (1.0 if k < 400 else math.exp(0.012 * (k - 400)))",
                    501,
                ),
            ),
            run(
                "variance warning",
                config={
                    "adaptation_interval": 0,
                    "diagnostics_interval": 50,
                    "diagnostics_window": 40,
                    "norm_history_size": 64,
                    "variance_history_size": 4,
                },
                init={"learning_rate": 1e-4},
                inputs=formula("20.0 / 3.0 if k % 10 == 3 else 1.0 / 3.0", 101),
            ),
            run(
                "zero norm with vanishing_norm = 0",
                note="The log floor is max(vanishing_norm, 1e-30): a zero norm in the window "
                "gives ln(1e-30), not -inf, so the trend stays finite (and here large: warning).",
                config={
                    "vanishing_norm": 0.0,
                    "diagnostics_interval": 4,
                    "diagnostics_window": 4,
                    "norm_history_size": 8,
                },
                init={"learning_rate": 1e-4},
                inputs=explicit(scale3(1.0, 0.0, 2.0, 1.5)),
            ),
        ],
    },
    "growth_and_no_scaling": {
        "description": "The GradScaler-like preset (backoff 0.5 on non-finite steps only, "
        "x2 after 3 finite steps in a row, clamped at 2^16) and loss_scaling = False, where "
        "the output is x itself and the scale never moves.",
        "spec_sections": ["Loss scale rule"],
        "runs": [
            run(
                "growth interval 3",
                config={
                    "explosion_backoff": 1.0,
                    "vanishing_growth": 1.0,
                    "growth_interval": 3,
                    "initial_loss_scale": 16384.0,
                    "min_loss_scale": 1.0,
                    "max_loss_scale": 65536.0,
                },
                init={"learning_rate": 0.01},
                inputs=formula("nan if k == 7 else 16384.0 * 2 ** min(k // 3, 2) * 0.1", 12),
            ),
            run(
                "loss_scaling off",
                config={"loss_scaling": False},
                init={"learning_rate": 0.01},
                inputs=explicit(
                    [
                        [[0.1, 0.2], [0.2]],
                        [[1e-9, 0.0], [0.0]],
                        [[NAN, 0.0], [0.0]],
                        [[3.0, 4.0], [0.0]],
                        [[0.1, 0.1], [0.1]],
                    ]
                ),
            ),
        ],
    },
    "saturation": {
        "description": "Counters saturate at 2^31 - 1 instead of wrapping, stabilizer_step "
        "included; the periodic rules keep using the saturated value "
        "(2147483647 % 7 == 1, so with interval 7 nothing adapts).",
        "spec_sections": ["Counters"],
        "runs": [
            run(
                "near INT32_MAX",
                config={"adaptation_interval": 7, "diagnostics_interval": 3},
                init={"learning_rate": 0.01},
                state_overrides={
                    "stabilizer_step": reference.INT32_MAX - 2,
                    "clip_count": reference.INT32_MAX - 1,
                    "stable_streak": reference.INT32_MAX - 1,
                    "explosion_count": reference.INT32_MAX,
                },
                inputs=explicit(scale3(2.0, 2.0, 0.5, 0.5)),
            )
        ],
    },
    # --- The default "track" rule (seed=False: the default config) -------------
    "track_spike": {
        "description": "Data mode under the track rule: the first finite norm (5) is not "
        "clipped and starts the tracker (c = ln 5, d = 0, adapted flag); calm lognormal-like "
        "noise (sigma 0.3) around 5 is followed; a single x100 spike at step 60 is clipped "
        "and counted as an explosion, and moves the centre by at most track_max_rise "
        f"= {RISE} (the threshold by under exp(2 * {RISE})). The adapted flag marks every "
        "100th step.",
        "spec_sections": ["Initial threshold", "Tracking rule", "Per-step order"],
        "runs": [
            run(
                "data mode, x100 spike at step 60",
                seed=False,
                inputs=formula(f"{NOISE} * (100.0 if k == 60 else 1.0)", 120, base=BASE5),
            ),
        ],
    },
    "track_bad_start": {
        "description": "An explicit start 100x below the norms (0.05 against ~5): every step "
        f"explodes, the fifth fires the one emergency (centre - ln 2, a hold of {HOLD} steps in "
        f"which the centre cannot rise), then the centre rises by track_max_rise = {RISE} per "
        "step until the threshold is back around the norms. The norms stay over 3x the "
        "threshold all that time, but they are explosions only while above the quantile u, "
        "which climbs from ln 0.05 + ln 3 by track_quantile_rate * track_quantile a step: "
        "the first 40 steps or so, then a few, and none fires a second emergency. A start 100x "
        f"above falls by track_max_fall = {FALL} per step (e is clipped at -track_max_fall / "
        "track_rate).",
        "spec_sections": ["Initial threshold", "Tracking rule"],
        "runs": [
            run(
                "initial threshold 0.05, norms ~5",
                seed=False,
                init={"initial_threshold": 0.05},
                inputs=formula(NOISE, 500, base=BASE5),
            ),
            run(
                "initial threshold 500, norms ~5",
                seed=False,
                init={"initial_threshold": 500.0},
                inputs=formula(NOISE, 150, base=BASE5),
            ),
        ],
    },
    "track_level_shift": {
        "description": "A lasting x10 rise of the norm at step 50 with a steady loss "
        "(value = 1 every step, so the loss gate stays open): one emergency at step 54 "
        f"(centre - ln 2, hold of {HOLD} steps), then the centre follows the new level at {RISE} "
        "per step; the steps of the new level are explosions only until the quantile u reaches "
        "it, and no other emergency fires. A burst of six x100 "
        "explosions at steps 340-345 reaches the patience at step 344, 290 steps after the "
        "emergency: not re-armed (emergency_rearm_steps = 400), no emergency. A second x10 "
        "rise at step 520 (470 steps after the first emergency) fires the second one at "
        "step 524.",
        "spec_sections": ["Tracking rule", "Emergency intervention", "Loss gate"],
        "runs": [
            run(
                "x10 at step 50, x100 burst at 340, x10 again at 520",
                seed=False,
                inputs=formula(
                    f"{NOISE} * (1.0 if k < 50 else 10.0 if k < 520 else 100.0)"
                    " * (100.0 if 340 <= k < 346 else 1.0)",
                    650,
                    base=BASE5,
                ),
                values={"expr": "1.0"},
            ),
        ],
    },
    "track_explosion": {
        "description": "An explosion in progress: after 150 calm steps (norms ~5, loss "
        "1 +- 0.02, so the loss reference and spread are learned), the norm grows x e^0.15 "
        "per step for 40 steps while the loss climbs by 0.05 per step. The loss centre moves "
        "by at most r * 10 spreads a step (bounded influence), yet the gate closes (loss "
        "centre above reference + track_loss_k spreads) within a few steps, before the first "
        "explosion: the centre stops rising and the anchor stays at the last calm centre. "
        "A step later the loss is climbing (above reference + track_loss_cut_k spreads): on "
        "norms over 3x the threshold (explosions, or under the quantile u once it has caught "
        f"up) the centre falls by track_max_fall = {FALL} per step, never below "
        "anchor - ln(track_max_cut), and one emergency fires. After the explosion the loss "
        "falls back, the gate reopens and the tracker climbs back. The second run has loss "
        "scaling on (the emergency also cuts the scale). Both set track_loss_rel = 0, so that "
        "the gate's unit is the spread alone; the third run keeps the default track_loss_rel: "
        "the unit is then 0.2 |reference|, about 15 spreads, so the gate closes only after the "
        "first explosions, and on explosions the loss reference still rises at "
        "track_loss_rise_rate.",
        "spec_sections": ["Tracking rule", "Loss gate", "Emergency intervention"],
        "runs": [
            run(
                label,
                seed=False,
                config=config,
                inputs=formula(
                    f"{NOISE} * (math.exp(0.15 * (k - 149)) if 150 <= k < 190 else 1.0)",
                    steps,
                    base=BASE5,
                ),
                values={
                    "expr": "1.0 + 0.02 * math.sin(1.7 * k)"
                    " + (0.05 * (k - 149) if 150 <= k < 190 else 0.0)"
                },
            )
            for label, config, steps in (
                ("loss climbs with the norm", {"track_loss_rel": 0.0}, 450),
                ("with loss scaling", {"loss_scaling": True, "track_loss_rel": 0.0}, 260),
                ("default track_loss_rel", {}, 260),
            )
        ],
    },
    "track_quantile": {
        "description": "The quantile u of the track rule (start t0 = 1: c = 0, u = ln 3). "
        "Norms 1, 1, 1, 100 repeated: u falls by track_quantile_rate * (1 - track_quantile) "
        "under a 1 and rises by track_quantile_rate * track_quantile over a 100, so every 100 "
        "(over 3x the threshold) is an explosion until u passes lnf(100), then about one in "
        "five; never two in a row, no emergency. At step 300 a single 1e4 is above u and an "
        "explosion. The second run has track_quantile = 0: every 100 is an explosion.",
        "spec_sections": ["Tracking rule", "Per-step order"],
        "runs": [
            run(
                label,
                seed=False,
                config=config,
                init={"initial_threshold": 1.0},
                inputs=formula(
                    "1e4 if k == 300 else 100.0 if k % 4 == 3 else 1.0",
                    320,
                    base=[[1.0]],
                    dtypes=["float32"],
                ),
            )
            for label, config in (
                ("bimodal norms, a 1e4 spike at step 300", {}),
                ("bimodal norms, track_quantile = 0", {"track_quantile": 0.0}),
            )
        ],
    },
    "track_loss_outlier": {
        "description": "A single huge outlier loss (1e7 x the usual 1 +- 1%) during calm "
        "norms (~5). At step 100, after the first N = round(1 / track_rate) = "
        f"{LEARN} steps, the loss centre moves by at most r * 10 spreads (half a spread: "
        "bounded influence) and the spread by r * 2 spreads: the gate does not close, and the "
        "lasting x2 rise of the norm at step 110 is followed at once. At step 5, within the "
        "first N steps, the outlier enters the running means unbounded (loss centre ~1e7 / 6); "
        "the gate stays open (the centre falls under the reference) while the levels decay by "
        "r a step.",
        "spec_sections": ["Loss gate", "Tracking rule"],
        "runs": [
            run(
                f"outlier at step {at}, x2 norm at step 110",
                seed=False,
                inputs=formula(f"{NOISE} * (2.0 if k >= 110 else 1.0)", 250, base=BASE5),
                values={"expr": f"1e7 if k == {at} else 1.0 + 0.01 * math.sin(1.3 * k)"},
            )
            for at in (100, 5)
        ],
    },
    "track_zero_start": {
        "description": "Data mode with all-zero gradients first: a zero norm has no level to "
        "start from, so the step has t = clamp(0) = min_threshold, is vanishing (not clipped, "
        "the output exactly 0) and keeps waiting (warmup_steps_left = 1, the centre at its "
        "placeholder); the first finite, positive norm starts the tracker. The second run "
        "mixes NaN and zero steps while waiting; the third shows a zero norm after the start "
        f"(learning-rate start): e is clipped at -track_max_fall / r, the centre falls by {FALL}.",
        "spec_sections": ["Initial threshold", "Tracking rule", "Boundary cases"],
        "runs": [
            run(
                "two all-zero gradients, then norms ~5",
                seed=False,
                inputs=formula(f"0.0 if k < 2 else {NOISE}", 30, base=BASE5),
                values={"expr": "2.0 - 0.01 * k"},
            ),
            run(
                "NaN, zero, NaN, zero, then finite",
                seed=False,
                inputs=formula("[nan, 0.0, nan, 0.0][k] if k < 4 else 1.0 + 0.1 * (k % 3)", 12),
            ),
            run(
                "zero norms after a learning-rate start",
                seed=False,
                init={"learning_rate": 0.01},
                inputs=formula("0.0 if 3 <= k < 6 else 1.0", 12, base=BASE5),
            ),
        ],
    },
    "track_waiting": {
        "description": "Data mode: non-finite steps while waiting for the first finite, "
        "positive norm (NaN, +inf, squares overflowing float32) are skipped with the "
        "placeholder threshold and keep waiting (warmup_steps_left = 1); the first finite "
        "norm (5, positive) starts the tracker. Non-finite and missing losses leave the loss "
        "gate alone; the first finite loss starts it, and during the first N = "
        f"round(1 / track_rate) = {LEARN} steps the gate's levels are running means. Six NaN "
        "steps in a row fire an emergency while waiting (its hold then outlasts the start).",
        "spec_sections": ["Initial threshold", "Tracking rule", "Loss gate"],
        "runs": [
            run(
                "NaN, inf, overflow, then finite",
                seed=False,
                inputs=formula(
                    "[nan, inf, 1e30, 1.0, 1.2, 0.9, 3.5, 1.1][k] if k < 8"
                    " else 1.0 + 0.1 * (k % 3)",
                    16,
                    base=BASE5,
                ),
                values=[NAN, 2.0, INF, 1.5, 1.4, NAN, 1.3, 1.2] + [1.1] * 8,
            ),
            run(
                "six NaN steps: an emergency while waiting",
                seed=False,
                inputs=formula("nan if k < 6 else 1.0 + 0.1 * (k % 3)", 20, base=BASE5),
            ),
        ],
    },
    "track_loss_scale": {
        "description": "The default config's two floors of the loss scale: non-finite steps "
        "halve it past min_loss_scale (down to nonfinite_min_loss_scale); no other step "
        "lowers it further, and only the interval growth lifts it back.",
        "spec_sections": ["Loss scale rule", "Per-step order"],
        "runs": [
            run(
                "NaN burst, the default floors",
                note="Loss scaling on over the defaults (min_loss_scale 0.1, "
                "nonfinite_min_loss_scale 2**-24): six NaN steps halve the scale to 2**-6, "
                "past 0.1; the emergency on the fifth cannot lower it (floor min(0.1, s)), "
                "nor can the explosion after (its unscaled norm is 300 / 2**-6 = 19200); "
                "a calm step keeps it, a vanishing one grows it x1.5.",
                seed=False,
                config={"loss_scaling": True},
                init={"learning_rate": 0.01},
                inputs=formula(
                    "nan if k < 6 else 100.0 if k == 6 else 0.001 if k == 7 else 0.0", 9
                ),
            ),
            run(
                "recovery by interval growth",
                note="growth_interval 4 in place of the default 2000 (same rule): three NaN "
                "steps take the scale to 0.125; from then on every 4th finite step in a row "
                "doubles it, an explosion (x0.8, floored at min(0.1, s)) included in the count.",
                seed=False,
                config={"loss_scaling": True, "growth_interval": 4},
                init={"learning_rate": 0.01},
                inputs=formula("nan if k < 3 else 100.0 if k == 5 else 0.001", 12),
            ),
        ],
    },
    "track_edges": {
        "description": "Edge cases of the track rule: with emergency_patience = 0 a hold left "
        "in the state still runs down (SPEC.md: 'Otherwise (and whatever emergency_patience) "
        "emergency_hold_left = max(emergency_hold_left - 1, 0)'); track_loss_k = "
        "track_loss_cut_k = inf never closes the gate nor cuts the centre (inf * 0 is NaN: "
        "not above); track_loss_k = inf with the default track_loss_cut_k: a climbing loss "
        "cuts the centre on explosions without ever holding it (the anchor follows the "
        "centre); adaptation_interval = 0 flags only the start; max_threshold and track_k = 0 "
        "clamp the moving threshold. The two climbing-loss runs set track_loss_rel = 0 (the "
        "unit is the spread, 0 at first).",
        "spec_sections": ["Tracking rule", "Loss gate", "Boundary cases"],
        "runs": [
            run(
                "patience 0, hold left 3",
                seed=False,
                config={"emergency_patience": 0},
                init={"learning_rate": 0.01},
                state_overrides={"emergency_hold_left": 3},
                inputs=formula("1.0 + 0.1 * (k % 3)", 6, base=BASE5),
            ),
        ]
        + [
            run(
                label,
                seed=False,
                config={
                    "track_loss_k": INF,
                    "track_loss_rel": 0.0,
                    "emergency_patience": 3,
                    **config,
                },
                init={"learning_rate": 4e-4},
                inputs=formula("1.0 if k < 30 else 30.0", 45, base=BASE5),
                values={"expr": "1.0 + 0.01 * (k % 2) + (0.2 * (k - 29) if k >= 30 else 0.0)"},
            )
            for label, config in (
                ("track_loss_k = track_loss_cut_k = inf, climbing loss", {"track_loss_cut_k": INF}),
                ("track_loss_k = inf, cut at 1.5, climbing loss", {}),
            )
        ]
        + [
            run(
                "interval 0, max_threshold 4, track_k 0",
                seed=False,
                config={"adaptation_interval": 0, "max_threshold": 4.0, "track_k": 0.0},
                inputs=formula("0.5 + 0.5 * (k % 3)", 10, base=BASE5),
            ),
        ],
    },
}


def _reference_init(cfg: dict, init: dict) -> dict:
    return reference.init(
        cfg,
        learning_rate=init.get("learning_rate"),
        initial_threshold=init.get("initial_threshold"),
    )


def evaluate(spec: dict) -> dict:
    """Runs the reference over one run's inputs; returns the run with its expectations."""
    cfg = reference.config(**spec["config"])
    state = _reference_init(cfg, spec["init"])
    for name, value in spec.get("state_overrides", {}).items():
        state[name] = value
    dtypes = spec["inputs"]["dtypes"]
    out = dict(spec)
    out["initial_state"] = {name: state[name] for name in golden_io.SCALAR_FIELDS}
    records = []
    for k, (leaves, value) in enumerate(golden_io.expand(spec)):
        grads, state = reference.step(state, [list(a) for a in leaves], dtypes, cfg, value=value)
        flags = state["event_flags"][(state["event_flags_index"] - 1) % cfg["event_history_size"]]
        record = {"k": k, "out": grads, "flags": flags}
        record.update({name: state[name] for name in golden_io.SCALAR_FIELDS})
        records.append(record)
    out["steps"] = records
    out["final_state"] = {
        name: state[name] for name in golden_io.SCALAR_FIELDS + golden_io.RING_FIELDS
    }
    return out


def main() -> None:
    for name, scenario in SCENARIOS.items():
        data = {
            "name": name,
            "description": scenario["description"],
            "spec_sections": scenario["spec_sections"],
            "generated_by": "tests/golden/generate.py from tests/golden/reference.py",
            "runs": [evaluate(spec) for spec in scenario["runs"]],
        }
        path = golden_io.GOLDEN_DIR / f"{name}.json"
        golden_io.dump(data, path)
        print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")


if __name__ == "__main__":
    main()
