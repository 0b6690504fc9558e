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
_CLIP_ONLY = dict(
    loss_scaling=False,
    explosion_factor=math.inf,
    emergency_patience=0,
)


def clip_only(max_norm: float) -> StabilizerConfig:
    """``optax.clip_by_global_norm(max_norm)``: a fixed threshold and nothing else.

    On finite gradients the output equals optax's bit for bit (same norm,
    same ``(g / norm) * max_norm`` formula, same ``norm >= max_norm`` /
    ``norm > max_norm`` boundary up to the identity at equality).

    Example:
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
    below ``min_loss_scale``. No clipping. GradScaler has no minimum (pass a
    tiny one); jmp's default minimum is 1, which this preset keeps as the
    default. Unlike jmp, the minimum survives jit: it is a static config
    value, not a pytree field that flattening drops.

    References:
      Micikevicius et al., `Mixed precision training
      <https://arxiv.org/abs/1710.03740>`_, 2018.
    """
    return StabilizerConfig(
        initial_threshold=math.inf,
        max_threshold=math.inf,
        warmup_steps=0,
        adaptation_interval=0,
        explosion_factor=math.inf,
        emergency_patience=0,
        loss_scaling=True,
        initial_loss_scale=float(initial_scale),
        min_loss_scale=float(min_loss_scale),
        max_loss_scale=float(max_loss_scale),
        nonfinite_backoff=float(backoff_factor),
        explosion_backoff=1.0,
        vanishing_growth=1.0,
        growth_interval=int(growth_interval),
        growth_factor=float(growth_factor),
    )
