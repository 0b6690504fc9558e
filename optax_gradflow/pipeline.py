"""One stabilizer step as a pipeline of named stages (SPEC.md, "Per-step order").

The stages carry the names of :data:`optax_gradflow.constants.STAGES`, in
that order; the PyTorch adapter (``optax_gradflow.torch.functional``) has
stages of the same names. Each stage is a small pure function that takes and
returns small typed tuples:

========== ========================================================
measure    the global norm ``r``, the unscaled norm ``n``, the loss
threshold  the threshold ``t`` this step clips at (the rule's)
classify   non-finite / explosion / vanishing / clipped
rescale    the gradients times one scalar coefficient
loss_scale the loss-scale rule
history    push ``n`` onto the norm history
adapt      the rule's next threshold and levels
emergency  the emergency intervention (the rule's action)
diagnose   the early-warning diagnostics
record     rings, counters, the loss gate: the next state
========== ========================================================

What differs between adaptation rules (the threshold of a step, the
adaptation, the emergency's action) lives in a rule object chosen once, when
the transformation is built (:func:`rule_for`); the step never compares the
rule's name. Work that only some steps need (the history rules' sort, the
diagnostics) runs under one ``lax.cond``.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_gradflow import loss_scaling
from optax_gradflow import threshold as threshold_lib
from optax_gradflow.config import StabilizerConfig
from optax_gradflow.constants import Event
from optax_gradflow.diagnostics import diagnose as diagnose_history
from optax_gradflow.state import GradientFlowState, Ring, saturating_increment


def _is_float_leaf(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def sum_of_squares(tree: Any) -> jax.Array:
    """Sum of squares of every floating leaf, accumulated in float32.

    Low-precision gradients are upcast first: the squares of float16 gradients
    of a scaled loss overflow float16 long before float32 (SPEC.md, "Global
    norm"). Leaves are summed one by one in tree order, starting from 0.
    Integer, boolean and float0 leaves are not part of the norm.
    """
    sums = []
    for leaf in jax.tree.leaves(tree):
        if not _is_float_leaf(leaf):
            continue
        x = jnp.asarray(leaf)
        if jnp.iscomplexobj(x):
            sq = jnp.square(jnp.real(x).astype(jnp.float32)) + jnp.square(
                jnp.imag(x).astype(jnp.float32)
            )
        else:
            sq = jnp.square(x.astype(jnp.float32))
        sums.append(jnp.sum(sq))
    return functools.reduce(operator.add, sums, jnp.float32(0.0))


# --- The stages' records --------------------------------------------------------


class Measured(NamedTuple):
    """Stage 1, ``measure``."""

    raw_norm: jax.Array  # r = ||g||, of the scaled gradients
    norm: jax.Array  # n = r / s
    finite: jax.Array  # isfinite(n)
    loss: jax.Array  # f32(value), NaN when none was given


class StepThreshold(NamedTuple):
    """Stage 2, ``threshold``."""

    clip: jax.Array  # t, the threshold this step clips at
    reference: jax.Array  # what explosions are measured against (t, but zscore)
    in_warmup: jax.Array  # warmup_steps_left > 0 on entry
    spike: jax.Array  # zscore: a spike (else False)
    target: jax.Array  # zscore: the spike's clip target (else 0)


class Classes(NamedTuple):
    """Stage 3, ``classify``."""

    nonfinite: jax.Array
    explosion: jax.Array
    vanishing: jax.Array
    clipped: jax.Array


class Scale(NamedTuple):
    """Stage 5, ``loss_scale``."""

    scale: jax.Array
    growth_count: jax.Array


class Periodic(NamedTuple):
    """The work only some steps need, computed under one ``lax.cond``."""

    adapt_due: jax.Array  # the history rule adapts this step (else False)
    from_history: jax.Array  # the rule's threshold from the history (history rules)
    trend: jax.Array
    variance: jax.Array
    warning: jax.Array
    diagnosed: jax.Array  # the diagnostics ran this step


class Adapted(NamedTuple):
    """Stage 7, ``adapt``."""

    threshold: jax.Array  # t'
    ema_mean: jax.Array
    ema_var: jax.Array
    centre_anchor: jax.Array
    warmup_left: jax.Array
    adapted: jax.Array  # the "adapted" flag (a threshold-history push)


class Emergency(NamedTuple):
    """Stage 8, ``emergency``."""

    threshold: jax.Array
    ema_mean: jax.Array
    scale: jax.Array
    consecutive: jax.Array
    hold_left: jax.Array
    fired: jax.Array


# --- Adaptation rules ----------------------------------------------------------


class Rule:
    """What an adaptation rule decides; one instance per transformation.

    ``periodic`` says whether the rule needs the sorted history on some steps
    (the history rules); its ``from_history`` then runs under the step's one
    ``lax.cond``.
    """

    periodic: bool = False

    def __init__(self, config: StabilizerConfig):
        self.config = config

    def initial_levels(self, threshold: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(ema_mean, centre_anchor) of a fresh state."""
        return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)

    def data_warmup_steps(self) -> int:
        """``warmup_steps_left`` of a fresh state in data mode."""
        return self.config.warmup_steps

    def data_threshold(self, params: Any) -> jax.Array:
        """``clip_threshold`` of a fresh state in data mode: a placeholder."""
        del params
        return jnp.float32(self.config.min_threshold)

    def fixed_start(self) -> tuple[jax.Array, int] | None:
        """A start that ignores explicit / stored / learning-rate thresholds."""
        return None

    def step_threshold(self, m: Measured, state: GradientFlowState) -> StepThreshold:
        raise NotImplementedError

    def adapt_due(self, norms: Ring, step_after: jax.Array, state: GradientFlowState) -> jax.Array:
        """Whether this step needs ``from_history`` (history rules only)."""
        return jnp.zeros((), jnp.bool_)

    def from_history(self, norms: Ring) -> jax.Array:
        return jnp.zeros((), jnp.float32)

    def adapt(
        self,
        m: Measured,
        t: StepThreshold,
        c: Classes,
        norms: Ring,
        step_after: jax.Array,
        state: GradientFlowState,
        periodic: Periodic,
    ) -> Adapted:
        raise NotImplementedError

    def emergency(self, c: Classes, s: Scale, a: Adapted, state: GradientFlowState) -> Emergency:
        """The seed's emergency: after ``emergency_patience`` unstable steps in a
        row, the threshold is multiplied by ``emergency_threshold_factor`` and
        the count restarts (SPEC.md, "Emergency intervention")."""
        config = self.config
        consecutive = _consecutive(c, state)
        if config.emergency_patience > 0:
            fired = consecutive >= config.emergency_patience
        else:
            fired = jnp.zeros((), jnp.bool_)
        new_thr = jnp.where(
            fired,
            jnp.maximum(
                a.threshold * jnp.float32(config.emergency_threshold_factor),
                jnp.float32(config.min_threshold),
            ),
            a.threshold,
        )
        consecutive = jnp.where(fired, 0, consecutive).astype(jnp.int32)
        return Emergency(
            threshold=new_thr,
            ema_mean=a.ema_mean,
            scale=loss_scaling.emergency_loss_scale(s.scale, fired, config),
            consecutive=consecutive,
            hold_left=state.emergency_hold_left,
            fired=fired,
        )

    def gate_reference(
        self,
        fired: jax.Array,
        consecutive: jax.Array,
        loss_centre: jax.Array,
        loss_reference: jax.Array,
    ) -> jax.Array:
        """The loss gate's reference after the emergency (the track rule moves it)."""
        return loss_reference


def _consecutive(c: Classes, state: GradientFlowState) -> jax.Array:
    return jnp.where(
        c.nonfinite | c.explosion, saturating_increment(state.consecutive_explosions, True), 0
    ).astype(jnp.int32)


class HistoryRule(Rule):
    """``percentile``, ``median_mad``, ``mean_std``: a statistic of the norm
    history, every ``adaptation_interval`` steps after a data warm-up (SPEC.md,
    "Threshold adaptation")."""

    periodic = True

    def __init__(self, config: StabilizerConfig):
        super().__init__(config)
        self._statistic = threshold_lib.ADAPTATION_RULE_FNS[config.adaptation_rule]

    def step_threshold(self, m: Measured, state: GradientFlowState) -> StepThreshold:
        in_warmup = state.warmup_steps_left > 0
        hist = state.norm_history
        # lax.cond, not jnp.where: the warm-up median sorts the history, work
        # that only warm-up steps need. The gate is the state's counter, not the
        # config, so that a resumed warm-up finishes whatever the config says.
        thr = jax.lax.cond(
            in_warmup,
            lambda: threshold_lib.warmup_threshold(
                hist.values, hist.count, m.norm, state.clip_threshold, self.config
            ),
            lambda: state.clip_threshold,
        )
        return StepThreshold(thr, thr, in_warmup, jnp.zeros((), jnp.bool_), jnp.float32(0.0))

    def adapt_due(self, norms: Ring, step_after: jax.Array, state: GradientFlowState) -> jax.Array:
        left_after = jnp.maximum(state.warmup_steps_left - 1, 0)
        due = state.warmup_steps_left == 1
        if self.config.adaptation_interval > 0:
            due = due | ((step_after % self.config.adaptation_interval == 0) & (left_after == 0))
        return due & (norms.count > 0)

    def from_history(self, norms: Ring) -> jax.Array:
        return threshold_lib.clamp_threshold(
            self._statistic(norms.values, norms.count, self.config), self.config
        )

    def adapt(self, m, t, c, norms, step_after, state, periodic) -> Adapted:
        due = periodic.adapt_due
        return Adapted(
            threshold=jnp.where(due, periodic.from_history, t.clip),
            ema_mean=state.ema_mean,
            ema_var=state.ema_var,
            centre_anchor=state.centre_anchor,
            warmup_left=jnp.maximum(state.warmup_steps_left - 1, 0).astype(jnp.int32),
            adapted=due,
        )


class ZScoreRule(Rule):
    """ZClip's rule: an EMA of the norm and of its variance (SPEC.md, "Z-score rule")."""

    def fixed_start(self) -> tuple[jax.Array, int]:
        # ZClip's warm-up always runs: the EMA starts from its norms, and until
        # then only max_threshold clips.
        return (
            threshold_lib.clamp_threshold(self.config.max_threshold, self.config),
            self.config.warmup_steps,
        )

    def step_threshold(self, m: Measured, state: GradientFlowState) -> StepThreshold:
        config = self.config
        in_warmup = state.warmup_steps_left > 0
        zscore_thr, spike, target = threshold_lib.zscore_step_threshold(
            m.norm, m.finite, state.ema_mean, state.ema_var, config
        )
        # As ZClip: the warm-up collects norms and clips only at max_threshold.
        warm_thr = threshold_lib.clamp_threshold(config.max_threshold, config)
        return StepThreshold(
            clip=jnp.where(in_warmup, warm_thr, zscore_thr),
            reference=jnp.where(in_warmup, warm_thr, state.clip_threshold),
            in_warmup=in_warmup,
            spike=spike & ~in_warmup,
            target=target,
        )

    def adapt(self, m, t, c, norms, step_after, state, periodic) -> Adapted:
        config = self.config
        ends_warmup = state.warmup_steps_left == 1
        warmup_left = jnp.maximum(state.warmup_steps_left - 1, 0).astype(jnp.int32)
        # The EMA needs a norm to start from: the warm-up waits for one.
        warmup_left = jnp.where(ends_warmup & (norms.count == 0), 1, warmup_left)
        start = ends_warmup & (norms.count > 0)
        start_mean, start_var = threshold_lib.history_mean_var(norms.values, norms.count)
        moved_mean, moved_var = threshold_lib.zscore_ema_update(
            state.ema_mean, state.ema_var, jnp.where(t.spike, t.target, m.norm), config
        )
        move = m.finite & ~t.in_warmup
        if config.zscore_skip_spikes:
            move = move & ~t.spike
        ema_mean = jnp.where(start, start_mean, jnp.where(move, moved_mean, state.ema_mean))
        ema_var = jnp.where(start, start_var, jnp.where(move, moved_var, state.ema_var))
        new_thr = jnp.where(
            t.in_warmup & ~start, t.clip, threshold_lib.zscore_boundary(ema_mean, ema_var, config)
        )
        return Adapted(
            threshold=new_thr,
            ema_mean=ema_mean,
            ema_var=ema_var,
            centre_anchor=state.centre_anchor,
            warmup_left=warmup_left.astype(jnp.int32),
            adapted=start,
        )


class TrackRule(Rule):
    """The default: a bounded tracker of the log-norm gated by the loss
    (SPEC.md, "Tracking rule" and "Loss gate")."""

    def initial_levels(self, threshold: jax.Array) -> tuple[jax.Array, jax.Array]:
        # The tracker starts from the initial threshold (ignored in data mode,
        # where the first finite norm starts it).
        # Two buffers: one shared buffer could not be donated to a jitted step.
        return threshold_lib.log_norm(threshold), threshold_lib.log_norm(threshold)

    def data_warmup_steps(self) -> int:
        # The tracker waits for the first finite norm.
        return 1

    def data_threshold(self, params: Any) -> jax.Array:
        """The parameters' cap on the first threshold (SPEC.md, "Initial
        threshold" 4): ``clamp(param_threshold_scale * P)``, ``P`` the
        parameters' global norm, or ``max_threshold`` where that is not
        finite and positive."""
        config = self.config
        cap = jnp.float32(config.param_threshold_scale) * jnp.sqrt(sum_of_squares(params))
        usable = jnp.isfinite(cap) & (cap > 0)
        return jnp.where(
            usable,
            threshold_lib.clamp_threshold(cap, config),
            jnp.float32(config.max_threshold),
        )

    def step_threshold(self, m: Measured, state: GradientFlowState) -> StepThreshold:
        in_warmup = state.warmup_steps_left > 0
        # Waiting for the first finite, positive norm: it has nothing to be
        # compared with but the parameters' cap (held in clip_threshold) and
        # is clipped only above it; it starts the tracker.
        first = jnp.where(
            m.finite,
            jnp.minimum(threshold_lib.clamp_threshold(m.norm, self.config), state.clip_threshold),
            state.clip_threshold,
        )
        thr = jnp.where(in_warmup, first, state.clip_threshold)
        # During an emergency's hold, explosions are measured against the
        # threshold with the emergency's cut undone: the cut tightens the
        # clip, it does not make the ordinary norms after it explosions.
        uncut = thr / jnp.float32(self.config.emergency_threshold_factor)
        reference = jnp.where(state.emergency_hold_left > 0, uncut, thr)
        return StepThreshold(thr, reference, in_warmup, jnp.zeros((), jnp.bool_), jnp.float32(0.0))

    def adapt(self, m, t, c, norms, step_after, state, periodic) -> Adapted:
        config = self.config
        ema_mean, ema_var = state.ema_mean, state.ema_var
        x = threshold_lib.log_norm(m.norm)
        # The centre does not rise during an emergency hold, nor while the
        # loss climbs above its own recent level: a higher norm level with a
        # steady loss is followed, an explosion in progress is not.
        gate = (state.loss_centre, state.loss_reference, state.loss_spread)
        rising = threshold_lib.loss_rising(*gate, config)
        hold = (state.emergency_hold_left > 0) | rising
        moved_centre, moved_spread = threshold_lib.track_update(ema_mean, ema_var, x, hold, config)
        # An explosion while the loss climbs is an explosion in progress: the
        # centre is pulled down at track_max_fall, but never below
        # track_max_cut times under where it stood when the loss began to
        # climb (the anchor), so that it cannot ratchet down.
        floor = state.centre_anchor - jnp.log(jnp.float32(config.track_max_cut))
        tightened = jnp.maximum(
            jnp.minimum(moved_centre, ema_mean - jnp.float32(config.track_max_fall)),
            jnp.minimum(floor, ema_mean),
        )
        climbing = threshold_lib.loss_climbing(*gate, config)
        moved_centre = jnp.where(climbing & c.explosion, tightened, moved_centre)
        # A zero norm (an all-zero gradient) has no level to start from.
        start = t.in_warmup & m.finite & (m.norm > 0)
        move = m.finite & ~t.in_warmup
        x_start = threshold_lib.log_norm(jnp.minimum(m.norm, state.clip_threshold))
        ema_mean = jnp.where(start, x_start, jnp.where(move, moved_centre, ema_mean))
        ema_var = jnp.where(start, 0.0, jnp.where(move, moved_spread, ema_var))
        # The anchor follows the centre on calm steps while the loss does not
        # climb: explosions never move it, so one climb cannot re-anchor lower.
        calm_open = ~rising & m.finite & ~c.explosion
        centre_anchor = jnp.where(start | calm_open, ema_mean, state.centre_anchor)
        # A step that neither starts nor moves the tracker keeps the threshold
        # (while waiting: the parameters' cap, not the zero norm's clamp(0)).
        new_thr = jnp.where(
            start | move,
            threshold_lib.track_threshold(ema_mean, ema_var, config),
            state.clip_threshold,
        )
        # The threshold moves every step; "adapted" marks the start and then
        # every adaptation_interval steps, so that the threshold history
        # records its course.
        adapted = start
        if config.adaptation_interval > 0:
            adapted = adapted | ((step_after % config.adaptation_interval == 0) & ~t.in_warmup)
        return Adapted(
            threshold=new_thr,
            ema_mean=ema_mean,
            ema_var=ema_var,
            centre_anchor=centre_anchor,
            warmup_left=jnp.where(t.in_warmup & ~start, 1, 0).astype(jnp.int32),
            adapted=adapted,
        )

    def emergency(self, c, s, a, state) -> Emergency:
        """Fires once per unbroken run of explosions, at most once per
        ``emergency_rearm_steps``; halves the centre once and holds its rise
        (SPEC.md, "Tracking rule", "Emergency")."""
        config = self.config
        # The run keeps counting, so a lasting rise costs one emergency.
        consecutive = _consecutive(c, state)
        hold_left = jnp.maximum(state.emergency_hold_left - 1, 0).astype(jnp.int32)
        if config.emergency_patience > 0:
            steps = state.emergency_steps
            armed = (steps.count == 0) | (
                state.stabilizer_step - steps.newest() >= config.emergency_rearm_steps
            )
            fired = (consecutive == config.emergency_patience) & armed
            hold_left = jnp.where(fired, jnp.int32(config.emergency_hold_steps), hold_left)
        else:
            fired = jnp.zeros((), jnp.bool_)
        # The centre drops by emergency_threshold_factor (at most once per
        # re-arm period, so it cannot compound into a ratchet).
        cut = jnp.log(jnp.float32(config.emergency_threshold_factor))
        ema_mean = jnp.where(fired, a.ema_mean + cut, a.ema_mean)
        new_thr = jnp.where(
            fired, threshold_lib.track_threshold(ema_mean, a.ema_var, config), a.threshold
        )
        return Emergency(
            threshold=new_thr,
            ema_mean=ema_mean,
            scale=loss_scaling.emergency_loss_scale(s.scale, fired, config),
            consecutive=consecutive,
            hold_left=hold_left,
            fired=fired,
        )

    def gate_reference(self, fired, consecutive, loss_centre, loss_reference) -> jax.Array:
        # An emergency accepts the loss level it fires at as the new
        # reference: a loss that keeps climbing closes the gate again within
        # a few steps, while a loss that only settled higher no longer holds
        # the threshold down. So does every track_accept_steps-th step of an
        # unbroken run of explosions: a loss that keeps climbing while every
        # step is clipped is not climbing because of the steps (a TD loss
        # whose targets grow), and an emergency fires at most once per run.
        accept = fired
        n = self.config.track_accept_steps
        if n > 0:
            accept = accept | ((consecutive > 0) & (consecutive % n == 0))
        return jnp.where(accept & jnp.isfinite(loss_centre), loss_centre, loss_reference)


def rule_for(config: StabilizerConfig) -> Rule:
    """The rule object of ``config.adaptation_rule``, chosen once per transformation."""
    if config.adaptation_rule == "track":
        return TrackRule(config)
    if config.adaptation_rule == "zscore":
        return ZScoreRule(config)
    return HistoryRule(config)


# --- The stages ------------------------------------------------------------------


def measure(updates: Any, state: GradientFlowState, value: Any, axis_name: str | None) -> Measured:
    """1. The global norm of the scaled gradients, then unscaled."""
    sq = sum_of_squares(updates)
    if axis_name is not None:
        sq = jax.lax.psum(sq, axis_name)
    raw_norm = jnp.sqrt(sq)
    norm = raw_norm / state.loss_scale
    if value is None:
        loss = jnp.float32(jnp.nan)
    else:
        loss = jnp.asarray(value).astype(jnp.float32).reshape(())
    return Measured(raw_norm, norm, jnp.isfinite(norm), loss)


def threshold(rule: Rule, m: Measured, state: GradientFlowState) -> StepThreshold:
    """2. The threshold this step clips at (the rule's)."""
    return rule.step_threshold(m, state)


def classify(m: Measured, t: StepThreshold, config: StabilizerConfig) -> Classes:
    """3. Non-finite, explosion, vanishing, clipped."""
    explosion = m.finite & (m.norm > jnp.float32(config.explosion_factor) * t.reference)
    return Classes(
        nonfinite=~m.finite,
        explosion=explosion,
        vanishing=m.finite & ~explosion & (m.norm < jnp.float32(config.vanishing_norm)),
        clipped=m.finite & (m.norm > t.clip),
    )


def rescale(
    updates: Any,
    m: Measured,
    t: StepThreshold,
    c: Classes,
    state: GradientFlowState,
    config: StabilizerConfig,
) -> Any:
    """4. Every floating leaf ``x`` times one scalar coefficient, in one pass.

    The coefficient ``k`` is computed once: ``t / r`` when clipped, ``1 / s``
    otherwise (1 without loss scaling); each leaf becomes
    ``where(finite, x * k, 0)``, one multiplication per element, which XLA
    fuses into a following optimizer's loops at no cost. ``x * (1 / s)`` is
    bit for bit SPEC.md's form; ``x * (t / r)`` is within 2 ulps of
    ``(x / r) * t``, the form of ``optax.clip_by_global_norm``, which
    ``exact_clip=True`` (``presets.clip_only``, ``presets.seed``) computes
    instead: the same value bit for bit, at the cost of a division and two
    selects per element (2.2x slower chained with Adam at 10M parameters on
    a CPU).
    """
    one = jnp.float32(1.0)
    keep = one / state.loss_scale if config.loss_scaling else one
    if config.exact_clip:
        # SPEC.md's two branches as written: (x / r) * t or x * (1 / s).
        def scaled(x, cd):
            kept = x * keep.astype(cd) if config.loss_scaling else x
            return jnp.where(c.clipped, (x / m.raw_norm.astype(cd)) * t.clip.astype(cd), kept)

    else:
        coefficient = jnp.where(c.clipped, t.clip / m.raw_norm, keep)

        def scaled(x, cd):
            return x * coefficient.astype(cd)

    def leaf(g):
        if not _is_float_leaf(g):
            return g
        # float16 / bfloat16 leaves are scaled in float32 so that the tiny or
        # huge coefficients of loss scaling neither underflow nor overflow.
        cd = jnp.promote_types(g.dtype, jnp.float32)
        # jnp.where, not multiplication by 0: 0 * NaN is NaN.
        return jnp.where(m.finite, scaled(g.astype(cd), cd), jnp.zeros((), cd)).astype(g.dtype)

    return jax.tree.map(leaf, updates)


def loss_scale(c: Classes, state: GradientFlowState, config: StabilizerConfig) -> Scale:
    """5. The loss-scale rule (nothing without ``loss_scaling``)."""
    scale, growth = loss_scaling.next_loss_scale(
        state.loss_scale,
        state.loss_scale_growth_count,
        nonfinite=c.nonfinite,
        explosion=c.explosion,
        vanishing=c.vanishing,
        config=config,
    )
    return Scale(scale, growth)


def history(m: Measured, c: Classes, state: GradientFlowState) -> Ring:
    """6. Push ``n`` unless non-finite or an explosion (explosions would drag
    the threshold up; vanishing norms are genuine and stay in)."""
    return state.norm_history.push(m.norm, m.finite & ~c.explosion)


def periodic_work(
    rule: Rule,
    norms: Ring,
    step_after: jax.Array,
    state: GradientFlowState,
    config: StabilizerConfig,
) -> Periodic:
    """The history rule's statistic and the diagnostics, under one ``lax.cond``.

    Most steps need neither: the sort of the history and the trend's window
    run only on the steps that use them.
    """
    adapt_due = rule.adapt_due(norms, step_after, state) if rule.periodic else None
    if config.diagnostics_interval > 0:
        diag_due = (step_after % config.diagnostics_interval == 0) & (norms.count >= 2)
    else:
        diag_due = None
    idle = Periodic(
        adapt_due=jnp.zeros((), jnp.bool_) if adapt_due is None else adapt_due,
        from_history=state.clip_threshold,
        trend=state.norm_trend,
        variance=jnp.zeros((), jnp.float32),
        warning=state.early_warning,
        diagnosed=jnp.zeros((), jnp.bool_),
    )
    dues = [d for d in (adapt_due, diag_due) if d is not None]
    if not dues:
        return idle

    def work() -> Periodic:
        out = idle
        if adapt_due is not None:
            out = out._replace(from_history=rule.from_history(norms))
        if diag_due is not None:
            trend, variance, warning = diagnose_history(norms, config)
            out = out._replace(
                trend=jnp.where(diag_due, trend, idle.trend),
                variance=jnp.where(diag_due, variance, idle.variance),
                warning=jnp.where(diag_due, warning, idle.warning),
                diagnosed=diag_due,
            )
        return out

    return jax.lax.cond(functools.reduce(operator.or_, dues), work, lambda: idle)


def adapt(
    rule: Rule,
    m: Measured,
    t: StepThreshold,
    c: Classes,
    norms: Ring,
    step_after: jax.Array,
    state: GradientFlowState,
    periodic: Periodic,
) -> Adapted:
    """7. The rule's next threshold, after the push."""
    return rule.adapt(m, t, c, norms, step_after, state, periodic)


def emergency(rule: Rule, c: Classes, s: Scale, a: Adapted, state: GradientFlowState) -> Emergency:
    """8. The emergency intervention, after the adaptation so that it cannot be undone."""
    return rule.emergency(c, s, a, state)


def diagnose(periodic: Periodic) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """9. (trend, variance, early_warning, warned) of this step; the
    computation itself ran in :func:`periodic_work`."""
    warned = periodic.diagnosed & periodic.warning
    return periodic.trend, periodic.variance, periodic.warning, warned


def event_flags(c: Classes, fired: jax.Array, adapted: jax.Array, warned: jax.Array) -> jax.Array:
    """The step's entry of the event-flag ring (SPEC.md, "Event flags")."""
    bits = (
        (c.clipped, Event.CLIPPED),
        (c.explosion, Event.EXPLOSION),
        (c.vanishing, Event.VANISHING),
        (c.nonfinite, Event.NONFINITE),
        (fired, Event.EMERGENCY),
        (adapted, Event.ADAPTED),
        (warned, Event.WARNING),
    )
    total = jnp.int32(0)
    for on, flag in bits:
        total = total + jnp.where(on, jnp.int32(int(flag)), jnp.int32(0))
    return total


def _overwrite(old: jax.Array, new: jax.Array) -> jax.Array:
    """``new``, written so that the step still reads ``old``.

    A field whose old value the step never reads would be pruned from the
    jitted step's inputs; its donated buffer would then pair with the next
    output of its shape, shifting every pair after it, and XLA would copy
    each of those fields every step. The select is removed by XLA.
    """
    return jax.lax.select(jnp.ones((), jnp.bool_), new, old)


class _Events(NamedTuple):
    """The fields only a step with an event changes."""

    explosion_count: jax.Array
    vanishing_count: jax.Array
    nonfinite_count: jax.Array
    clip_count: jax.Array
    emergency_count: jax.Array
    warning_count: jax.Array
    variance_history: Ring
    loss_scale_history: Ring
    threshold_history: Ring
    emergency_steps: Ring
    explosion_norms: Ring


def record(
    rule: Rule,
    m: Measured,
    c: Classes,
    s: Scale,
    norms: Ring,
    a: Adapted,
    e: Emergency,
    periodic: Periodic,
    step_after: jax.Array,
    value: Any,
    state: GradientFlowState,
    config: StabilizerConfig,
) -> GradientFlowState:
    """10. The rings, the counters and the loss gate: the next state.

    The event counters and the rings that only events push (variances,
    thresholds, loss scales, emergencies, exploding norms) change only on a
    step with an event; a calm step passes them through under one
    ``lax.cond`` instead of recomputing each of them.
    """
    trend, variance, warning, warned = diagnose(periodic)
    new_thr = e.threshold
    loss_centre, loss_reference, loss_spread = threshold_lib.loss_update(
        state.loss_centre,
        state.loss_reference,
        state.loss_spread,
        m.loss,
        state.stabilizer_step,
        m.finite & ~c.explosion,
        config,
    )
    loss_reference = rule.gate_reference(e.fired, e.consecutive, loss_centre, loss_reference)
    unstable = c.nonfinite | c.explosion
    flags = event_flags(c, e.fired, a.adapted, warned)
    # A diagnostics run pushes its variance even when it raises no flag.
    event = (flags != 0) | periodic.diagnosed
    if config.loss_scaling:
        event = event | (e.scale != state.loss_scale)

    def after_event() -> _Events:
        return _Events(
            explosion_count=saturating_increment(state.explosion_count, c.explosion),
            vanishing_count=saturating_increment(state.vanishing_count, c.vanishing),
            nonfinite_count=saturating_increment(state.nonfinite_count, c.nonfinite),
            clip_count=saturating_increment(state.clip_count, c.clipped),
            emergency_count=saturating_increment(state.emergency_count, e.fired),
            warning_count=saturating_increment(state.warning_count, warned),
            variance_history=state.variance_history.push(variance, periodic.diagnosed),
            loss_scale_history=(
                state.loss_scale_history.push(e.scale, e.scale != state.loss_scale)
                if config.loss_scaling
                else state.loss_scale_history
            ),
            threshold_history=state.threshold_history.push(new_thr, a.adapted | e.fired),
            emergency_steps=state.emergency_steps.push(state.stabilizer_step, e.fired),
            explosion_norms=state.explosion_norms.push(m.norm, c.explosion),
        )

    def calm() -> _Events:
        return _Events(*(getattr(state, name) for name in _Events._fields))

    events = jax.lax.cond(event, after_event, calm)
    return GradientFlowState(
        stabilizer_step=step_after,
        clip_threshold=new_thr.astype(jnp.float32),
        loss_scale=e.scale,
        loss_scale_growth_count=s.growth_count,
        warmup_steps_left=a.warmup_left,
        consecutive_explosions=e.consecutive,
        emergency_hold_left=e.hold_left,
        stable_streak=jnp.where(
            unstable, 0, saturating_increment(state.stable_streak, True)
        ).astype(jnp.int32),
        last_grad_norm=_overwrite(state.last_grad_norm, m.norm.astype(jnp.float32)),
        last_loss=state.last_loss if value is None else m.loss,
        loss_centre=loss_centre,
        loss_reference=loss_reference,
        loss_spread=loss_spread,
        norm_trend=trend,
        early_warning=warning,
        ema_mean=e.ema_mean.astype(jnp.float32),
        ema_var=a.ema_var.astype(jnp.float32),
        centre_anchor=a.centre_anchor.astype(jnp.float32),
        norm_history=norms,
        event_flags=state.event_flags.push(flags),
        **events._asdict(),
        state_version=state.state_version,
    )


def step(
    updates: Any,
    state: GradientFlowState,
    config: StabilizerConfig,
    rule: Rule,
    *,
    value: Any = None,
    axis_name: str | None = None,
) -> tuple[Any, GradientFlowState, jax.Array]:
    """One step, stage by stage; returns (updates, state, the threshold clipped at)."""
    m = measure(updates, state, value, axis_name)
    t = threshold(rule, m, state)
    c = classify(m, t, config)
    new_updates = rescale(updates, m, t, c, state, config)
    s = loss_scale(c, state, config)
    norms = history(m, c, state)
    step_after = saturating_increment(state.stabilizer_step, True)
    periodic = periodic_work(rule, norms, step_after, state, config)
    a = adapt(rule, m, t, c, norms, step_after, state, periodic)
    e = emergency(rule, c, s, a, state)
    new_state = record(rule, m, c, s, norms, a, e, periodic, step_after, value, state, config)
    return new_updates, new_state, t.clip
