"""Every constant of the stabilizer, in one frozen, validated dataclass.

This module imports neither JAX nor PyTorch: the JAX transformation and the
PyTorch adapter read the very same :class:`StabilizerConfig`. Each field is
described in SPEC.md, section "Hyperparameters"; the defaults are the values
given there.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple

from optax_gradflow import constants
from optax_gradflow.constants import INT32_MAX, Event  # noqa: F401  (re-exported)

AdaptationRule = Literal["track", "percentile", "median_mad", "mean_std", "zscore"]
ADAPTATION_RULES: tuple[str, ...] = ("track", "percentile", "median_mad", "mean_std", "zscore")
ZSCORE_CLIPS: tuple[str, ...] = ("adaptive_scaling", "mean", "percentile")


@dataclasses.dataclass(frozen=True)
class StabilizerConfig:
    """Hyperparameters of the gradient flow stabilizer (SPEC.md, "Hyperparameters").

    All fields are plain Python numbers, strings or bools. Sizes of buffers and
    windows are structural: they fix the shapes of the state. The config is
    frozen and hashable; derive variants with :func:`dataclasses.replace`, which
    validates again. Each field below gives its meaning, its unit ("norm": an
    unscaled global L2 gradient norm; "entries": slots of a ring), its default,
    its valid range and the SPEC.md section that uses it.

    Examples:
      >>> import dataclasses
      >>> from optax_gradflow import StabilizerConfig
      >>> cfg = dataclasses.replace(StabilizerConfig(), explosion_factor=4.0)
      >>> cfg.explosion_factor
      4.0
    """

    # Threshold ("Initial threshold", "Threshold adaptation").
    initial_threshold: float | None = None
    # A floor that only protects the arithmetic: the default path has no
    # absolute scale (presets.seed() restores the original 0.1).
    min_threshold: float = 1e-30
    max_threshold: float = math.inf
    lr_threshold_scale: float = 0.1
    param_threshold_scale: float = 0.05
    warmup_steps: int = 100
    warmup_multiplier: float = 2.0
    adaptation_interval: int = 100
    adaptation_rule: AdaptationRule = "track"
    adaptation_percentile: float = 90.0
    adaptation_k: float = 3.0
    norm_history_size: int = 1000
    threshold_history_size: int = 100

    # The "track" rule ("Tracking rule"): a bounded-rate tracker of the
    # log-norm's centre and spread.
    track_rate: float = 0.05
    track_max_rise: float = 0.02
    track_max_fall: float = 0.1
    track_k: float = 1.0
    track_loss_k: float = 1.0
    track_loss_cut_k: float = 1.5
    track_loss_rise_rate: float = 0.002
    track_loss_rel: float = 0.2
    track_accept_steps: int = 50
    track_max_cut: float = 10.0
    track_quantile: float = 0.95
    track_quantile_rate: float = 0.1

    # The "zscore" rule ("Z-score rule"): ZClip's EMA of the norm.
    zscore_alpha: float = 0.97
    zscore_threshold: float = 2.5
    zscore_eps: float = 1e-6
    zscore_clip: str = "adaptive_scaling"
    zscore_clip_factor: float = 1.0
    zscore_skip_spikes: bool = False
    zscore_reference_variance: bool = True

    # Classification ("Classification").
    explosion_factor: float = 3.0
    vanishing_norm: float = 1e-7

    # Output ("Per-step order" 4): x * (t / r), or optax's (x / r) * t.
    exact_clip: bool = False

    # Loss scaling ("Loss scale rule").
    # Opt-in: it needs the user's cooperation (gradients of scale_loss(...)).
    loss_scaling: bool = False
    initial_loss_scale: float = 1.0
    min_loss_scale: float = 0.1
    # A scale at which every gradient overflows is never kept: non-finite steps
    # back it off past ``min_loss_scale``, down to float16's smallest positive
    # value (a float16 loss scaled by less is 0).
    nonfinite_min_loss_scale: float = 2.0**-24
    max_loss_scale: float = 64.0
    nonfinite_backoff: float = 0.5
    explosion_backoff: float = 0.8
    vanishing_growth: float = 1.5
    growth_interval: int = 2000
    growth_factor: float = 2.0
    loss_scale_history_size: int = 100

    # Emergency intervention ("Emergency intervention").
    emergency_patience: int = 5
    emergency_threshold_factor: float = 0.5
    emergency_loss_scale_factor: float = 0.1
    emergency_history_size: int = 32
    emergency_hold_steps: int = 50
    emergency_rearm_steps: int = 400

    # Diagnostics ("Diagnostics").
    diagnostics_interval: int = 500
    diagnostics_window: int = 100
    trend_limit: float = 0.01
    variance_limit: float = 1.0
    variance_history_size: int = 200

    # Windowed event rates ("Event flags").
    event_history_size: int = 100

    def __post_init__(self):
        _validate(self)

    def as_dict(self) -> dict[str, object]:
        """The config as a plain dict (JSON-serialisable; ``inf`` stays a float)."""
        return dataclasses.asdict(self)


def _fail(name: str, value: object, why: str) -> None:
    raise ValueError(f"StabilizerConfig.{name} {why}, got {value!r}.")


def check_initial_threshold(value: Any, config: StabilizerConfig) -> float:
    """An explicit initial threshold as a float (SPEC.md, "Initial threshold" 1).

    Raises:
      TypeError: ``value`` is not a number.
      ValueError: it is not positive (``inf`` is allowed: a threshold that
        never clips), or lies outside ``[min_threshold, max_threshold]``.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"initial_threshold must be a number, got {value!r}.") from None
    if math.isnan(number) or number <= 0.0:
        raise ValueError(f"initial_threshold must be positive, got {value!r}.")
    if not config.min_threshold <= number <= config.max_threshold:
        raise ValueError(
            "initial_threshold must lie in [config.min_threshold, config.max_threshold] = "
            f"[{config.min_threshold}, {config.max_threshold}], got {value!r}."
        )
    return number


def _check_bool(cfg: StabilizerConfig, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, bool):
        raise TypeError(f"StabilizerConfig.{name} must be a bool, got {value!r}.")


def _check_int(cfg: StabilizerConfig, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"StabilizerConfig.{name} must be an int, got {value!r}.")
    if value < minimum:
        _fail(name, value, f"must be >= {minimum}")


def _check_float(
    cfg: StabilizerConfig,
    name: str,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
    allow_inf: bool = False,
) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"StabilizerConfig.{name} must be a number, got {value!r}.")
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        _fail(name, value, "must be finite")
    if above is not None and not value > above:
        _fail(name, value, f"must be > {above}")
    if at_least is not None and not value >= at_least:
        _fail(name, value, f"must be >= {at_least}")
    if below is not None and not value < below:
        _fail(name, value, f"must be < {below}")
    if at_most is not None and not value <= at_most:
        _fail(name, value, f"must be <= {at_most}")


def _validate(cfg: StabilizerConfig) -> None:
    """Raises TypeError / ValueError naming the first bad field and its value."""
    _check_float(cfg, "min_threshold", above=0.0)
    if cfg.initial_threshold is not None:
        _check_float(cfg, "initial_threshold", above=0.0, allow_inf=True)
    _check_float(cfg, "max_threshold", above=0.0, allow_inf=True)
    if cfg.max_threshold < cfg.min_threshold:
        _fail(
            "max_threshold",
            cfg.max_threshold,
            f"must be >= min_threshold ({cfg.min_threshold})",
        )
    if cfg.initial_threshold is not None and not (
        cfg.min_threshold <= cfg.initial_threshold <= cfg.max_threshold
    ):
        _fail(
            "initial_threshold",
            cfg.initial_threshold,
            f"must lie in [min_threshold, max_threshold] = "
            f"[{cfg.min_threshold}, {cfg.max_threshold}]",
        )
    _check_float(cfg, "lr_threshold_scale", above=0.0)
    _check_float(cfg, "param_threshold_scale", at_least=0.0)
    _check_int(cfg, "warmup_steps", 0)
    _check_float(cfg, "warmup_multiplier", at_least=1.0)
    _check_int(cfg, "adaptation_interval", 0)
    if cfg.adaptation_rule not in ADAPTATION_RULES:
        _fail("adaptation_rule", cfg.adaptation_rule, f"must be one of {ADAPTATION_RULES}")
    _check_float(cfg, "adaptation_percentile", at_least=0.0, at_most=100.0)
    _check_float(cfg, "adaptation_k", at_least=0.0)
    _check_int(cfg, "norm_history_size", 1)
    _check_int(cfg, "threshold_history_size", 1)
    _check_float(cfg, "track_rate", above=0.0, at_most=1.0)
    _check_float(cfg, "track_max_rise", above=0.0)
    _check_float(cfg, "track_max_fall", above=0.0)
    _check_float(cfg, "track_k", at_least=0.0)
    _check_float(cfg, "track_loss_k", at_least=0.0, allow_inf=True)
    _check_float(cfg, "track_loss_cut_k", at_least=0.0, allow_inf=True)
    _check_float(cfg, "track_loss_rise_rate", above=0.0, at_most=1.0)
    _check_float(cfg, "track_loss_rel", at_least=0.0)
    _check_int(cfg, "track_accept_steps", 0)
    _check_float(cfg, "track_max_cut", at_least=1.0)
    _check_float(cfg, "track_quantile", at_least=0.0, below=1.0)
    _check_float(cfg, "track_quantile_rate", above=0.0)
    _check_float(cfg, "zscore_alpha", above=0.0, below=1.0)
    _check_float(cfg, "zscore_threshold", above=0.0)
    _check_float(cfg, "zscore_eps", at_least=0.0)
    if cfg.zscore_clip not in ZSCORE_CLIPS:
        _fail("zscore_clip", cfg.zscore_clip, f"must be one of {ZSCORE_CLIPS}")
    _check_float(cfg, "zscore_clip_factor", above=0.0)
    _check_bool(cfg, "zscore_skip_spikes")
    _check_bool(cfg, "zscore_reference_variance")
    if cfg.adaptation_rule == "zscore":
        # The EMA starts from the norms of the warm-up, which the history keeps.
        if cfg.warmup_steps < 1:
            _fail("warmup_steps", cfg.warmup_steps, "must be >= 1 with the zscore rule")
        if cfg.norm_history_size < cfg.warmup_steps:
            _fail(
                "norm_history_size",
                cfg.norm_history_size,
                f"must be >= warmup_steps ({cfg.warmup_steps}) with the zscore rule",
            )

    _check_float(cfg, "explosion_factor", above=1.0, allow_inf=True)
    _check_float(cfg, "vanishing_norm", at_least=0.0)

    _check_bool(cfg, "loss_scaling")
    _check_bool(cfg, "exact_clip")
    _check_float(cfg, "min_loss_scale", above=0.0)
    _check_float(cfg, "nonfinite_min_loss_scale", above=0.0)
    _check_float(cfg, "max_loss_scale", above=0.0, allow_inf=True)
    if cfg.max_loss_scale < cfg.min_loss_scale:
        _fail(
            "max_loss_scale",
            cfg.max_loss_scale,
            f"must be >= min_loss_scale ({cfg.min_loss_scale})",
        )
    _check_float(cfg, "initial_loss_scale", above=0.0)
    if not cfg.min_loss_scale <= cfg.initial_loss_scale <= cfg.max_loss_scale:
        _fail(
            "initial_loss_scale",
            cfg.initial_loss_scale,
            f"must lie in [min_loss_scale, max_loss_scale] = "
            f"[{cfg.min_loss_scale}, {cfg.max_loss_scale}]",
        )
    if not cfg.loss_scaling and cfg.initial_loss_scale != 1.0:
        _fail("initial_loss_scale", cfg.initial_loss_scale, "must be 1.0 when loss_scaling=False")
    _check_float(cfg, "nonfinite_backoff", above=0.0, below=1.0)
    _check_float(cfg, "explosion_backoff", above=0.0, at_most=1.0)
    _check_float(cfg, "vanishing_growth", at_least=1.0)
    _check_int(cfg, "growth_interval", 0)
    _check_float(cfg, "growth_factor", above=1.0)
    _check_int(cfg, "loss_scale_history_size", 1)

    _check_int(cfg, "emergency_patience", 0)
    _check_float(cfg, "emergency_threshold_factor", above=0.0, at_most=1.0)
    _check_float(cfg, "emergency_loss_scale_factor", above=0.0, at_most=1.0)
    _check_int(cfg, "emergency_history_size", 1)
    _check_int(cfg, "emergency_hold_steps", 0)
    _check_int(cfg, "emergency_rearm_steps", 0)

    _check_int(cfg, "diagnostics_interval", 0)
    _check_int(cfg, "diagnostics_window", 2)
    if cfg.diagnostics_window > cfg.norm_history_size:
        _fail(
            "diagnostics_window",
            cfg.diagnostics_window,
            f"must be <= norm_history_size ({cfg.norm_history_size})",
        )
    _check_float(cfg, "trend_limit", above=0.0, allow_inf=True)
    _check_float(cfg, "variance_limit", above=0.0, allow_inf=True)
    _check_int(cfg, "variance_history_size", 1)
    _check_int(cfg, "event_history_size", 1)


# --- What each field means ------------------------------------------------------


class FieldDoc(NamedTuple):
    """The description of one config field (SPEC.md, "Hyperparameters")."""

    meaning: str
    unit: str
    valid: str
    section: str


# One entry per field: the meaning and the valid range are SPEC.md's
# "Hyperparameters" table word for word (tests/test_config_docs.py checks
# both); the class docstring's Attributes section is generated from it.
FIELD_DOCS: dict[str, FieldDoc] = {
    "initial_threshold": FieldDoc(
        "an explicit initial threshold carried by the config (presets use it); `inf` never clips",
        "norm",
        "None, or > 0 within [min, max]; may be inf",
        "Initial threshold",
    ),
    "min_threshold": FieldDoc(
        "floor of the clip threshold; it only protects the arithmetic (`presets.seed()`: 0.1)",
        "norm",
        "> 0, finite",
        "Initial threshold",
    ),
    "max_threshold": FieldDoc(
        "ceiling of the clip threshold",
        "norm",
        ">= `min_threshold`",
        "Initial threshold",
    ),
    "lr_threshold_scale": FieldDoc(
        "`c` in `c * sqrt(1 / lr)`",
        "norm x sqrt(lr)",
        "> 0",
        "Initial threshold",
    ),
    "param_threshold_scale": FieldDoc(
        "`track`, data mode: the first threshold is at most this times the parameters' global "
        "norm (0: no cap)",
        "share of the parameters' norm",
        ">= 0, finite",
        "Tracking rule",
    ),
    "warmup_steps": FieldDoc(
        "length of the data warm-up",
        "steps",
        "int >= 0",
        "Warm-up threshold",
    ),
    "warmup_multiplier": FieldDoc(
        "warm-up threshold is this times the history median",
        "x median norm",
        ">= 1",
        "Warm-up threshold",
    ),
    "adaptation_interval": FieldDoc(
        "steps between adaptations; 0 disables (`track`: steps between records of the moving "
        "threshold)",
        "steps",
        "int >= 0",
        "Per-step order",
    ),
    "adaptation_rule": FieldDoc(
        '`"track"`, `"percentile"`, `"median_mad"`, `"mean_std"` or `"zscore"`',
        "name",
        "one of those; `zscore` needs `1 <= warmup_steps <= H`",
        "Threshold adaptation",
    ),
    "track_rate": FieldDoc(
        "`r`, EMA rate of the `track` rule's centre, spread and loss levels",
        "EMA weight per step",
        "(0, 1]",
        "Tracking rule",
    ),
    "track_max_rise": FieldDoc(
        "most the centre rises in one step (log units: x1.02)",
        "log-norm per step",
        "> 0",
        "Tracking rule",
    ),
    "track_max_fall": FieldDoc(
        "most the centre falls in one step (log units: x0.905)",
        "log-norm per step",
        "> 0",
        "Tracking rule",
    ),
    "track_k": FieldDoc(
        "threshold = `exp(centre + track_k * spread)`",
        "spreads (log-norm)",
        ">= 0",
        "Tracking rule",
    ),
    "track_loss_k": FieldDoc(
        "the gate closes (the centre may not rise) when the loss centre exceeds its reference by "
        "this many units (see Loss gate)",
        "loss gate units",
        ">= 0, may be inf",
        "Loss gate",
    ),
    "track_loss_cut_k": FieldDoc(
        "an explosion cuts the centre when the loss centre exceeds its reference by this many "
        "units (see Loss gate)",
        "loss gate units",
        ">= 0, may be inf",
        "Tracking rule",
    ),
    "track_loss_rise_rate": FieldDoc(
        "rate at which the loss reference moves, except towards a lower calm loss",
        "EMA weight per step",
        "(0, 1]",
        "Loss gate",
    ),
    "track_loss_rel": FieldDoc(
        "the loss gate's smallest unit, a share of the reference's magnitude",
        "share of |loss reference|",
        "[0, inf)",
        "Loss gate",
    ),
    "track_accept_steps": FieldDoc(
        "every this many explosions of an unbroken run, the loss gate accepts the loss level "
        "(0: never)",
        "steps",
        ">= 0",
        "Tracking rule",
    ),
    "track_max_cut": FieldDoc(
        "an explosion in progress may lower the centre at most this factor under its anchor",
        "x (ratio of thresholds)",
        ">= 1",
        "Tracking rule",
    ),
    "track_quantile": FieldDoc(
        "an explosion must also be a norm over this quantile of the stream's own norms, "
        "tracked (0: a norm over `explosion_factor * t` is one)",
        "share of steps",
        "[0, 1)",
        "Tracking rule",
    ),
    "track_quantile_rate": FieldDoc(
        "the quantile tracker's step: up by `rate * q` after a norm over it, down by "
        "`rate * (1 - q)` after one under it",
        "log units per step",
        "(0, inf)",
        "Tracking rule",
    ),
    "adaptation_percentile": FieldDoc(
        "`q` of the `percentile` rule",
        "percent",
        "[0, 100]",
        "Threshold adaptation",
    ),
    "adaptation_k": FieldDoc(
        "`k` of the `median_mad` and `mean_std` rules",
        "standard deviations",
        ">= 0",
        "Threshold adaptation",
    ),
    "norm_history_size": FieldDoc(
        "`H`, ring of norms",
        "entries",
        "int >= 1",
        "State",
    ),
    "zscore_alpha": FieldDoc(
        "EMA weight of the `zscore` rule",
        "EMA weight",
        "(0, 1)",
        "Z-score rule",
    ),
    "zscore_threshold": FieldDoc(
        "z-score above which a norm is a spike",
        "standard deviations",
        "> 0",
        "Z-score rule",
    ),
    "zscore_eps": FieldDoc(
        "added to the std in the z-score",
        "norm",
        ">= 0",
        "Z-score rule",
    ),
    "zscore_clip": FieldDoc(
        '`"adaptive_scaling"`, `"mean"` or `"percentile"` (see "Z-score rule")',
        "name",
        "one of those",
        "Z-score rule",
    ),
    "zscore_clip_factor": FieldDoc(
        "multiplies the adaptive-scaling target",
        "x target",
        "> 0",
        "Z-score rule",
    ),
    "zscore_skip_spikes": FieldDoc(
        "a spike does not move the EMA",
        "flag",
        "bool",
        "Z-score rule",
    ),
    "zscore_reference_variance": FieldDoc(
        "the variance uses the updated mean, as the zclip package",
        "flag",
        "bool",
        "Z-score rule",
    ),
    "threshold_history_size": FieldDoc(
        "`T`, ring of thresholds",
        "entries",
        "int >= 1",
        "State",
    ),
    "explosion_factor": FieldDoc(
        "explosion when norm > this times the threshold; `inf` disables the class",
        "x threshold",
        "> 1, may be inf",
        "Per-step order",
    ),
    "vanishing_norm": FieldDoc(
        "vanishing when norm < this",
        "norm",
        ">= 0",
        "Per-step order",
    ),
    "exact_clip": FieldDoc(
        "clip as `(x / r) * t`, the form of `optax.clip_by_global_norm`, instead of `x * (t / "
        'r)` ("Per-step order" 4)',
        "flag",
        "bool",
        "Per-step order",
    ),
    "loss_scaling": FieldDoc(
        "opt-in: the gradients must then come from `scale_loss`; false: the scale stays 1 and no "
        "rule touches it",
        "flag",
        "bool",
        "Loss scale rule",
    ),
    "initial_loss_scale": FieldDoc(
        "scale at init",
        "x loss",
        "in [min, max]; 1.0 if `loss_scaling` is false",
        "Loss scale rule",
    ),
    "min_loss_scale": FieldDoc(
        "floor of the scale for explosions, emergencies and the clamp",
        "x loss",
        "> 0",
        "Loss scale rule",
    ),
    "nonfinite_min_loss_scale": FieldDoc(
        "floor of the scale on a non-finite step, which may take it under "
        "`min_loss_scale` (the floor is the smaller of the two)",
        "x loss",
        "> 0",
        "Loss scale rule",
    ),
    "max_loss_scale": FieldDoc(
        "ceiling of the scale",
        "x loss",
        ">= `min_loss_scale`, may be inf",
        "Loss scale rule",
    ),
    "nonfinite_backoff": FieldDoc(
        "scale factor on a non-finite step",
        "x scale",
        "(0, 1)",
        "Loss scale rule",
    ),
    "explosion_backoff": FieldDoc(
        "scale factor on an explosion",
        "x scale",
        "(0, 1]",
        "Loss scale rule",
    ),
    "vanishing_growth": FieldDoc(
        "scale factor on a vanishing step",
        "x scale",
        ">= 1",
        "Loss scale rule",
    ),
    "growth_interval": FieldDoc(
        "grow by `growth_factor` after this many finite steps in a row; 0 disables",
        "steps",
        "int >= 0",
        "Loss scale rule",
    ),
    "growth_factor": FieldDoc(
        "interval growth factor",
        "x scale",
        "> 1",
        "Loss scale rule",
    ),
    "loss_scale_history_size": FieldDoc(
        "`L`, ring of loss scales",
        "entries",
        "int >= 1",
        "State",
    ),
    "emergency_patience": FieldDoc(
        "consecutive explosions that trigger an emergency; 0 disables",
        "steps",
        "int >= 0",
        "Emergency intervention",
    ),
    "emergency_threshold_factor": FieldDoc(
        "threshold factor of an emergency",
        "x threshold",
        "(0, 1]",
        "Emergency intervention",
    ),
    "emergency_loss_scale_factor": FieldDoc(
        "scale factor of an emergency",
        "x scale",
        "(0, 1]",
        "Emergency intervention",
    ),
    "emergency_history_size": FieldDoc(
        "`M`, ring of emergency steps",
        "entries",
        "int >= 1",
        "State",
    ),
    "emergency_hold_steps": FieldDoc(
        "`track`: steps an emergency keeps the centre from rising and explosions "
        "measured before its cut",
        "steps",
        "int >= 0",
        "Tracking rule",
    ),
    "emergency_rearm_steps": FieldDoc(
        "`track`: steps after an emergency before another may fire",
        "steps",
        "int >= 0",
        "Tracking rule",
    ),
    "diagnostics_interval": FieldDoc(
        "steps between diagnostics; 0 disables",
        "steps",
        "int >= 0",
        "Diagnostics",
    ),
    "diagnostics_window": FieldDoc(
        "`W`, most recent history entries the diagnostics read",
        "entries",
        "2 <= W <= H",
        "Diagnostics",
    ),
    "trend_limit": FieldDoc(
        "early warning when the log-norm slope exceeds this",
        "log-norm per history entry",
        "> 0",
        "Diagnostics",
    ),
    "variance_limit": FieldDoc(
        "early warning when variance / mean^2 exceeds this",
        "variance / mean^2",
        "> 0",
        "Diagnostics",
    ),
    "variance_history_size": FieldDoc(
        "`V`, ring of windowed variances",
        "entries",
        "int >= 1",
        "State",
    ),
    "event_history_size": FieldDoc(
        '`E`, ring of per-step event flags (the "recent window")',
        "steps",
        "int >= 1",
        "Event flags",
    ),
}


_UNDESCRIBED = FieldDoc("(not described yet)", "?", "?", "Hyperparameters")


def field_descriptions() -> str:
    """The ``Attributes:`` section of :class:`StabilizerConfig`'s docstring."""
    lines = ["Attributes:"]
    for field in dataclasses.fields(StabilizerConfig):
        doc = FIELD_DOCS.get(field.name, _UNDESCRIBED)
        lines.append(
            f"  {field.name}: {doc.meaning}. Unit: {doc.unit}. Default: {field.default!r}. "
            f'Valid: {doc.valid}. SPEC.md, "{doc.section}".'
        )
    return "\n".join(lines)


def _with_attributes(doc: str) -> str:
    # The section goes before the Examples, in the docstring's indentation.
    head, example = doc.split("    Examples:", 1)
    section = "\n".join(f"    {line}" for line in field_descriptions().splitlines())
    return f"{head}{section}\n\n    Examples:{example}"


StabilizerConfig.__doc__ = _with_attributes(StabilizerConfig.__doc__ or "")


def __getattr__(name: str) -> int:
    # The former plain-int event flags (FLAG_CLIPPED, ...): constants.Event now.
    return constants.legacy_flag(__name__, name)
