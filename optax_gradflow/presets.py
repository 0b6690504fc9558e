"""Configs that reproduce the tools people already use (SPEC.md, "Presets").

Each function returns a :class:`StabilizerConfig`; use it as
``stabilize(config=...)`` (JAX) or ``GradientFlowStabilizer(config=...)``
(PyTorch), and turn on more with :func:`dataclasses.replace`.

Where a preset departs from its reference, it is on purpose and tested:
every preset skips non-finite steps (the references let NaN through or, for
the loss scalers, leave the skip to the caller).
"""

from __future__ import annotations

import math

from optax_gradflow.config import StabilizerConfig

# A threshold floor that never binds in practice: the peers have none, and
# StabilizerConfig needs a positive one.
_NO_FLOOR = 1e-30

# What "only clip" means: no loss scaling, no explosion class, no emergency.
# The presets name their adaptation rule (a fixed threshold is the "median_mad"
# rule with adaptation off), so that they do not follow the default's.
_CLIP_ONLY = dict(
    loss_scaling=False,
    explosion_factor=math.inf,
    emergency_patience=0,
)


def clip_only(max_norm: float) -> StabilizerConfig:
    """``optax.clip_by_global_norm(max_norm)``: a fixed threshold and nothing else.

    On finite gradients the output equals optax's bit for bit (same norm,
    same ``(g / norm) * max_norm`` formula through ``exact_clip=True``, same
    ``norm >= max_norm`` / ``norm > max_norm`` boundary up to the identity at
    equality).

    Examples:
      >>> import optax_gradflow
      >>> from optax_gradflow import presets
      >>> tx = optax_gradflow.stabilize(config=presets.clip_only(1.0))
    """
    if not isinstance(max_norm, (int, float)) or not 0 < max_norm < math.inf:
        raise ValueError(f"max_norm must be a positive finite number, got {max_norm!r}.")
    return StabilizerConfig(
        initial_threshold=float(max_norm),
        min_threshold=float(max_norm),
        max_threshold=float(max_norm),
        warmup_steps=0,
        adaptation_interval=0,
        adaptation_rule="median_mad",
        exact_clip=True,
        **_CLIP_ONLY,
    )


def autoclip(percentile: float = 10.0, history: int = 1000) -> StabilizerConfig:
    """AutoClip: clip at the ``percentile``-th percentile of all past norms.

    As ``autoclip.torch.QuantileClip(quantile=percentile / 100,
    history_length=history, global_threshold=True)``: the first step is not
    clipped, each later step is clipped at the percentile (linear
    interpolation) of the last ``history`` pre-clip norms, spikes included.
    Do not pass a learning rate to ``stabilize``: it would set a fixed
    initial threshold instead of AutoClip's unclipped first step.

    Args:
      percentile: in [0, 100]; the paper's recommendation is 10.
      history: the number of past norms kept.

    References:
      Seetharaman et al., `AutoClip: Adaptive gradient clipping for source
      separation networks <https://arxiv.org/abs/2007.14469>`_, 2020.
    """
    return StabilizerConfig(
        min_threshold=_NO_FLOOR,
        warmup_steps=1,
        adaptation_interval=1,
        adaptation_rule="percentile",
        adaptation_percentile=float(percentile),
        norm_history_size=int(history),
        diagnostics_window=min(100, int(history)) if int(history) >= 2 else 2,
        **_CLIP_ONLY,
    )


def mixed_precision(
    initial_scale: float = 2.0**16,
    growth_interval: int = 2000,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    min_loss_scale: float = 1.0,
    max_loss_scale: float = math.inf,
) -> StabilizerConfig:
    """Dynamic loss scaling as ``torch.amp.GradScaler`` and ``jmp.DynamicLossScale`` do it.

    The scale starts at ``initial_scale``, is multiplied by ``growth_factor``
    after ``growth_interval`` finite steps in a row, by ``backoff_factor`` on
    a non-finite step (which is skipped), never grows to inf and never drops
    below ``min_loss_scale`` (the preset sets ``nonfinite_min_loss_scale`` to
    it too). No clipping. GradScaler has no minimum (pass a tiny one); jmp's
    default minimum is 1, which this preset keeps as the default. Unlike jmp,
    the minimum survives jit: it is a static config value, not a pytree field
    that flattening drops.

    References:
      Micikevicius et al., `Mixed precision training
      <https://arxiv.org/abs/1710.03740>`_, 2018.
    """
    return StabilizerConfig(
        initial_threshold=math.inf,
        max_threshold=math.inf,
        warmup_steps=0,
        adaptation_interval=0,
        adaptation_rule="median_mad",
        explosion_factor=math.inf,
        emergency_patience=0,
        loss_scaling=True,
        initial_loss_scale=float(initial_scale),
        min_loss_scale=float(min_loss_scale),
        nonfinite_min_loss_scale=float(min_loss_scale),
        max_loss_scale=float(max_loss_scale),
        nonfinite_backoff=float(backoff_factor),
        explosion_backoff=1.0,
        vanishing_growth=1.0,
        growth_interval=int(growth_interval),
        growth_factor=float(growth_factor),
    )


def zclip(
    alpha: float = 0.97,
    z_thresh: float = 2.5,
    max_grad_norm: float | None = 1.0,
    eps: float = 1e-6,
    warmup_steps: int = 25,
    mode: str = "zscore",
    clip_option: str = "adaptive_scaling",
    clip_factor: float = 1.0,
    skip_update_on_spike: bool = False,
    reference_variance: bool = True,
) -> StabilizerConfig:
    """ZClip: clip the norm's z-score spikes against an EMA of mean and variance.

    As ``zclip.ZClip(alpha, z_thresh, max_grad_norm, eps, warmup_steps, mode,
    clip_option, clip_factor, skip_update_on_spike)``, whose argument names
    and defaults these are: the first ``warmup_steps`` norms are collected
    (clipped only at ``max_grad_norm``) and start the EMA; after that a norm
    whose z-score exceeds ``z_thresh`` is clipped to ``mean + z_thresh * std
    / (z / z_thresh)`` (``clip_option="adaptive_scaling"``, times
    ``clip_factor``) or to the mean (``"mean"``); ``mode="percentile"``
    clips any norm above ``mean + z_thresh * std`` to that value. The EMA then
    moves towards the clipped value. ``max_grad_norm`` caps every step.

    The zclip package updates the variance with the already updated mean
    (``var = a * var + (1 - a) * (x - mean_new)**2``). With
    ``reference_variance=True`` (the default) the preset does the same, so it
    reproduces the package step for step; ``False`` uses the incremental
    form ``var = a * (var + (1 - a) * (x - mean_old)**2)`` (Finch 2009).

    Do not pass a learning rate or initial threshold along with this preset:
    under the zscore rule the warm-up always runs.

    References:
      Kumar et al., `ZClip: Adaptive spike mitigation for LLM pre-training
      <https://arxiv.org/abs/2504.02507>`_, 2025.
      Finch, `Incremental calculation of weighted mean and variance
      <https://fanf2.user.srcf.net/hermes/doc/antiforgery/stats.pdf>`_, 2009.
    """
    modes = {"zscore", "percentile"}
    if mode not in modes:
        raise ValueError(f"mode must be one of {sorted(modes)}, got {mode!r}.")
    if mode == "zscore" and clip_option not in ("adaptive_scaling", "mean"):
        raise ValueError(f"clip_option must be 'adaptive_scaling' or 'mean', got {clip_option!r}.")
    return StabilizerConfig(
        min_threshold=_NO_FLOOR,
        max_threshold=math.inf if max_grad_norm is None else float(max_grad_norm),
        warmup_steps=int(warmup_steps),
        norm_history_size=max(1000, int(warmup_steps)),
        adaptation_rule="zscore",
        zscore_alpha=float(alpha),
        zscore_threshold=float(z_thresh),
        zscore_eps=float(eps),
        zscore_clip="percentile" if mode == "percentile" else clip_option,
        zscore_clip_factor=float(clip_factor),
        zscore_skip_spikes=bool(skip_update_on_spike),
        zscore_reference_variance=bool(reference_variance),
        **_CLIP_ONLY,
    )


def seed() -> StabilizerConfig:
    """The original PyTorch stabilizer's behaviour, literally.

    Loss scaling on (x0.5 on a non-finite step, x0.8 on an explosion, x1.5 on
    a vanishing step, within [0.1, 64]; an emergency cuts it by 10x), a
    threshold floor of 0.1, the learning-rate start ``0.1 * sqrt(1 / lr)``
    (else a 100-step data warm-up at twice the running median), the
    ``median_mad`` adaptation every 100 steps from the history of
    non-exploding norms, and an emergency that halves the threshold after
    every 5 explosions in a row. For porting code written against it; the
    default config is safer (SPEC.md, "Tracking rule").

    With loss scaling on, the gradients must be those of
    :func:`optax_gradflow.scale_loss`: a gradient of the plain loss would be
    divided by a scale it never got.

    Examples:
      >>> import optax_gradflow
      >>> from optax_gradflow import presets
      >>> cfg = presets.seed()
      >>> cfg.min_threshold, cfg.loss_scaling, cfg.adaptation_rule
      (0.1, True, 'median_mad')
    """
    return StabilizerConfig(
        min_threshold=0.1,
        adaptation_rule="median_mad",
        loss_scaling=True,
        nonfinite_min_loss_scale=0.1,
        growth_interval=0,
        exact_clip=True,
    )
