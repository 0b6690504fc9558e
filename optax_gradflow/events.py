"""Event logging through Python's ``logging``, logger ``"optax_gradflow"``.

What is logged, at which level (SPEC.md, "Event flags" names the events):

=======================  ========  =============================================
event                    level     context
=======================  ========  =============================================
explosion                ERROR     step, norm, threshold, total explosions
non-finite norm          ERROR     step, loss scale before / after
vanishing norm           WARNING   step, norm, loss scale before / after
early warning            WARNING   step, log-norm trend, windowed variance
emergency intervention   CRITICAL  step, norm, threshold and loss scale before /
                                   after, total counts
threshold adaptation     INFO      step, threshold before / after
loss-scale change        INFO      (host-side logger only) old and new scale
=======================  ========  =============================================

Two ways to get these lines:

* in-graph, ``stabilize(..., log_events=True)``: each step that has an event
  calls back to the host with :func:`jax.debug.callback`, behind a
  ``jax.lax.cond`` so that steps without events transfer nothing. Values are
  exact: the callback sees the step's own norm and thresholds.
* host-side, :class:`EventLogger`: the training loop calls it every step; it
  reads the device only every ``every`` calls and logs what changed since the
  previous read. Zero cost in between, but per-step details older than the
  event window (``event_history_size`` steps) are summarised, not itemised, and
  the norm is only known for the latest step.

Both write one message per kind of event (:func:`event_messages`); a message
leaves out what its reader cannot know. The host-side reader,
:func:`read_states`, is the one :class:`~optax_gradflow.Monitor` uses too.

Both fold bursts: at most ``max_lines`` lines per kind of event in each window
of ``fold_window`` steps (windows aligned to multiples of ``fold_window``); the
rest is counted and summarised in one line ("... 995 more explosions folded
(steps 5-999)", the first and last folded steps) when an event of a later
window arrives, on :meth:`flush`, or at interpreter exit. Each record carries
``gradflow_kind``, ``gradflow_step`` and ``gradflow_folded`` attributes for
structured handlers.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_gradflow.config import StabilizerConfig
from optax_gradflow.constants import Event
from optax_gradflow.loss_scaling import find_states
from optax_gradflow.state import GradientFlowState, host_chronological

logger = logging.getLogger("optax_gradflow")

# Flags worth a log line; a plain clip is routine and is not logged.
LOGGED_FLAGS = (
    Event.EXPLOSION
    | Event.VANISHING
    | Event.NONFINITE
    | Event.EMERGENCY
    | Event.ADAPTED
    | Event.WARNING
)
DEFAULT_MAX_LINES = 5
DEFAULT_FOLD_WINDOW = 1000

# kind -> (level, plural noun used in fold summaries).
KINDS: dict[str, tuple[int, str]] = {
    "explosion": (logging.ERROR, "explosions"),
    "nonfinite": (logging.ERROR, "non-finite steps"),
    "vanishing": (logging.WARNING, "vanishing steps"),
    "adaptation": (logging.INFO, "threshold adaptations"),
    "emergency": (logging.CRITICAL, "emergency interventions"),
    "warning": (logging.WARNING, "early warnings"),
    "loss_scale": (logging.INFO, "loss-scale changes"),
}

# Counter field -> (kind, flag) for the events that have a total counter.
_COUNTED = {
    "explosion_count": ("explosion", Event.EXPLOSION),
    "nonfinite_count": ("nonfinite", Event.NONFINITE),
    "vanishing_count": ("vanishing", Event.VANISHING),
    "emergency_count": ("emergency", Event.EMERGENCY),
    "warning_count": ("warning", Event.WARNING),
}


def _fmt(value: float | None) -> str:
    """``%.4g``, or "?" for a value the reader cannot know (None or NaN)."""
    return "?" if value is None or value != value else f"{value:.4g}"


# --- One message per event kind -----------------------------------------------


class EventContext(NamedTuple):
    """What a reader knows of one step with events; None where it cannot know it.

    The in-graph emitter knows all of its step. The host-side logger reads
    the state after the step, possibly many steps later: it knows the totals
    as they stood after the step and the thresholds (NaN where the threshold
    history no longer holds them), but the norm, the loss scale and the
    diagnostics only for the latest step it read, and the config never. A
    message leaves out what its reader cannot know.

    Attributes:
      step: the step (``stabilizer_step`` on entry).
      flags: its event flags (:class:`optax_gradflow.constants.Event` bits).
      threshold: the threshold the step clipped at.
      threshold_after: the threshold after the step.
      totals: counter field (``explosion_count``, ...) -> its value after the step.
      norm: the step's unscaled global norm.
      scale_before: the loss scale on entry.
      scale_after: the loss scale after the step.
      trend: ``norm_trend`` after the step.
      variance: the windowed norm variance after the step.
      config: the stabilizer's config, for the limits a message quotes.
    """

    step: int
    flags: int
    threshold: float
    threshold_after: float
    totals: Mapping[str, int]
    norm: float | None = None
    scale_before: float | None = None
    scale_after: float | None = None
    trend: float | None = None
    variance: float | None = None
    config: StabilizerConfig | None = None


def event_messages(ctx: EventContext) -> list[tuple[str, str]]:
    """(kind, message) of each logged event of one step, in a fixed order.

    The one catalogue of event lines: the in-graph emitter and the host-side
    logger both write these.
    """
    flags = ctx.flags
    lines = []
    if flags & Event.EXPLOSION:
        lines.append(("explosion", _explosion(ctx)))
    if flags & Event.NONFINITE:
        lines.append(("nonfinite", _nonfinite(ctx)))
    if flags & Event.VANISHING:
        lines.append(("vanishing", _vanishing(ctx)))
    if flags & Event.ADAPTED and not flags & Event.EMERGENCY:
        lines.append(
            (
                "adaptation",
                f"clip threshold adapted at step {ctx.step}: {_fmt(ctx.threshold)} -> "
                f"{_fmt(ctx.threshold_after)}",
            )
        )
    if flags & Event.EMERGENCY:
        lines.append(("emergency", _emergency(ctx)))
    if flags & Event.WARNING:
        lines.append(("warning", _warning(ctx)))
    return lines


def _loss_scale(ctx: EventContext) -> str | None:
    """ "loss scale before -> after", "loss scale after", or None when unknown."""
    if ctx.scale_after is None:
        return None
    if ctx.scale_before is None:
        return f"loss scale {ctx.scale_after:.4g}"
    return f"loss scale {ctx.scale_before:.4g} -> {ctx.scale_after:.4g}"


def _explosion(ctx: EventContext) -> str:
    norm = "norm" if ctx.norm is None else f"norm {ctx.norm:.4g}"
    factor = "" if ctx.config is None else f"{ctx.config.explosion_factor:g} x "
    return (
        f"gradient explosion at step {ctx.step}: {norm} > {factor}threshold "
        f"{_fmt(ctx.threshold)}; clipped to the threshold (explosions so far: "
        f"{ctx.totals['explosion_count']})"
    )


def _nonfinite(ctx: EventContext) -> str:
    scale = _loss_scale(ctx)
    return (
        f"non-finite gradient norm at step {ctx.step}: update skipped"
        f"{'' if scale is None else ', ' + scale} "
        f"(non-finite steps so far: {ctx.totals['nonfinite_count']})"
    )


def _vanishing(ctx: EventContext) -> str:
    details = []
    if ctx.norm is not None:
        limit = "" if ctx.config is None else f" < {ctx.config.vanishing_norm:g}"
        details.append(f"norm {ctx.norm:.3g}{limit}")
    scale = _loss_scale(ctx)
    if scale is not None:
        details.append(scale)
    detail = ": " + "; ".join(details) if details else ""
    return (
        f"vanishing gradient at step {ctx.step}{detail} "
        f"(vanishing steps so far: {ctx.totals['vanishing_count']})"
    )


def _emergency(ctx: EventContext) -> str:
    cause = (
        ""
        if ctx.config is None
        else f" after {ctx.config.emergency_patience} consecutive explosions or non-finite steps"
    )
    adapted = " (adapted in the same step)" if ctx.flags & Event.ADAPTED else ""
    details = [] if ctx.norm is None else [f"norm {ctx.norm:.4g}"]
    details.append(f"threshold {_fmt(ctx.threshold)} -> {_fmt(ctx.threshold_after)}{adapted}")
    scale = _loss_scale(ctx)
    if scale is not None:
        details.append(scale)
    totals = ctx.totals
    return (
        f"emergency intervention at step {ctx.step}{cause}: {', '.join(details)}; totals "
        f"after step {ctx.step}: {totals['emergency_count']} emergencies, "
        f"{totals['explosion_count']} explosions, {totals['nonfinite_count']} non-finite steps"
    )


def _warning(ctx: EventContext) -> str:
    cfg = ctx.config
    details = []
    if ctx.trend is not None:
        limit = "" if cfg is None else f" (limit {cfg.trend_limit:g})"
        details.append(f"log-norm trend {ctx.trend:.3g} per history entry{limit}")
    if ctx.variance is not None:
        limit = "" if cfg is None else f" (limit on variance / mean^2: {cfg.variance_limit:g})"
        details.append(f"norm variance {ctx.variance:.4g}{limit}")
    detail = ": " + ", ".join(details) if details else ""
    return (
        f"early warning at step {ctx.step}{detail}; warnings so far: {ctx.totals['warning_count']}"
    )


# --- Burst folding ------------------------------------------------------------


def check_count(name: str, value: Any) -> None:
    """Raises ValueError unless ``value`` is an int >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}.")


@dataclasses.dataclass
class _KindWindow:
    window_id: int
    lines: int = 0
    folded: int = 0
    first: int = -1
    last: int = -1


class BurstFolder:
    """Writes event lines, at most ``max_lines`` per kind per ``window`` steps.

    Further events of that kind in the same window are counted; one summary
    line per kind reports them once a later window starts, on :meth:`flush`, or
    at interpreter exit.

    Args:
      max_lines: lines per kind per window before folding starts (>= 1).
      window: window length in steps (>= 1); windows are aligned to multiples.
      name: prefix of every line, e.g. the key path of one of several
        stabilizers.
      log: the ``logging.Logger`` to write to; ``"optax_gradflow"`` by default.
    """

    def __init__(
        self,
        max_lines: int = DEFAULT_MAX_LINES,
        window: int = DEFAULT_FOLD_WINDOW,
        *,
        name: str | None = None,
        log: logging.Logger | None = None,
    ):
        check_count("max_lines", max_lines)
        check_count("window", window)
        self.max_lines = max_lines
        self.window = window
        self.name = name
        self.log = logger if log is None else log
        self._kinds: dict[str, _KindWindow] = {}
        _LIVE_FOLDERS.add(self)

    def emit(self, kind: str, step: int, message: str) -> None:
        """Writes ``message`` at the level of ``kind``, or folds it."""
        window_id = step // self.window
        for other, state in self._kinds.items():
            if state.window_id != window_id:
                self._summarise(other, state)
                self._kinds[other] = _KindWindow(window_id)
        state = self._kinds.setdefault(kind, _KindWindow(window_id))
        if state.lines < self.max_lines:
            state.lines += 1
            if state.lines == self.max_lines:
                # No step is named: the window may end after the run does.
                message += (
                    f" [further {KINDS[kind][1]} in this {self.window}-step window are "
                    "folded into one summary line]"
                )
            self._write(kind, step, message, folded=0)
        else:
            state.folded += 1
            state.first = step if state.folded == 1 else state.first
            state.last = step

    def flush(self) -> None:
        """Writes the summary line of every kind with folded events."""
        for kind, state in self._kinds.items():
            self._summarise(kind, state)

    def _summarise(self, kind: str, state: _KindWindow) -> None:
        if state.folded:
            noun = KINDS[kind][1]
            message = f"... {state.folded} more {noun} folded (steps {state.first}-{state.last})"
            self._write(kind, state.last, message, folded=state.folded)
            state.folded = 0

    def _write(self, kind: str, step: int, message: str, *, folded: int) -> None:
        if self.name:
            message = f"[{self.name}] {message}"
        extra = {"gradflow_kind": kind, "gradflow_step": step, "gradflow_folded": folded}
        self.log.log(KINDS[kind][0], message, extra=extra)


_LIVE_FOLDERS: weakref.WeakSet[BurstFolder] = weakref.WeakSet()


@atexit.register
def flush_all() -> None:
    """Writes the pending fold summaries of every live folder (also run at exit)."""
    for folder in list(_LIVE_FOLDERS):
        folder.flush()


# --- In-graph logging ---------------------------------------------------------


class InGraphEmitter:
    """Host half of ``stabilize(..., log_events=True)``.

    Receives one callback per step with an event and writes its lines; it
    keeps the fold counts, so one emitter belongs to one transformation.
    """

    def __init__(
        self,
        config: StabilizerConfig,
        *,
        name: str | None = None,
        max_lines: int = DEFAULT_MAX_LINES,
        fold_window: int = DEFAULT_FOLD_WINDOW,
        log: logging.Logger | None = None,
    ):
        self.config = config
        self.folder = BurstFolder(max_lines, fold_window, name=name, log=log)

    def flush(self) -> None:
        """Writes the pending fold summaries."""
        self.folder.flush()

    def __call__(self, **payload: Any) -> None:
        ctx = {key: np.asarray(value).item() for key, value in payload.items()}
        step = int(ctx["step"])
        event = EventContext(
            step=step,
            flags=int(ctx["flags"]),
            threshold=ctx["threshold"],
            threshold_after=ctx["threshold_after"],
            totals={field: int(ctx[field]) for field in _COUNTED},
            norm=ctx["norm"],
            scale_before=ctx["scale_before"],
            scale_after=ctx["scale_after"],
            trend=ctx["trend"],
            variance=ctx["variance"],
            config=self.config,
        )
        for kind, message in event_messages(event):
            self.folder.emit(kind, step, message)


def emit_in_graph(
    old_state: GradientFlowState,
    new_state: GradientFlowState,
    emitter: InGraphEmitter,
    threshold: jax.Array,
    axis_name: str | None = None,
) -> None:
    """Calls ``emitter`` on the host when the step from ``old_state`` had an event.

    ``threshold`` is the one the step clipped at (see ``transform.step``).
    With ``axis_name`` every device along the axis holds the same state and
    takes the same decision, so only the device at index 0 of the axis calls
    back: each event is logged once, not once per device.

    Traced code: the callback sits in the true branch of a ``jax.lax.cond`` on
    "any logged flag this step", so a step without events does no host
    transfer at all; a step with events transfers a dozen scalars.
    """
    flags = new_state.event_flags.newest()

    def send():
        jax.debug.callback(
            emitter,
            step=old_state.stabilizer_step,
            flags=flags,
            norm=new_state.last_grad_norm,
            threshold=threshold,
            threshold_after=new_state.clip_threshold,
            scale_before=old_state.loss_scale,
            scale_after=new_state.loss_scale,
            explosion_count=new_state.explosion_count,
            nonfinite_count=new_state.nonfinite_count,
            vanishing_count=new_state.vanishing_count,
            emergency_count=new_state.emergency_count,
            warning_count=new_state.warning_count,
            trend=new_state.norm_trend,
            variance=new_state.variance_history.newest(),
        )

    event = (flags & jnp.int32(LOGGED_FLAGS)) != 0
    if axis_name is not None:
        event = event & (jax.lax.axis_index(axis_name) == 0)
    jax.lax.cond(event, send, lambda: None)


# --- Host-side logging ----------------------------------------------------------


def due(calls: int, every: int) -> bool:
    """Whether call number ``calls`` (counted from 1) reads the device: calls 1, 1 + every, ..."""
    return (calls - 1) % every == 0


def read_states(opt_state: Any) -> list[tuple[str, GradientFlowState]]:
    """(key path, host copy) of every stabilizer state in ``opt_state``.

    One ``jax.device_get`` of the stabilizer states only (never of the inner
    optimizer's moments): a device-to-host transfer of a few KiB per
    stabilizer. Paths are those of :func:`optax_gradflow.find_states`.

    Raises:
      ValueError: no stabilizer state in ``opt_state``.
    """
    found = find_states(opt_state)
    if not found:
        raise ValueError(
            "No GradientFlowState found in the optimizer state: is optax_gradflow.stabilize "
            "part of this optimizer?"
        )
    host = jax.device_get([state for _, state in found])
    return [(path, state) for (path, _), state in zip(found, host, strict=True)]


class EventLogger:
    """Logs the stabilizer's events from the host, reading the device every ``every`` calls.

    Call it (or :meth:`update`) once per training step with the optimizer
    state. The first call and then every ``every``-th call (calls 1, 1 +
    every, 1 + 2 every, ...) do one ``jax.device_get`` of the stabilizer
    states (never of the inner optimizer's moments) and log what changed
    since the previous read: each explosion, non-finite, vanishing,
    adaptation, emergency and early-warning step still in the event window
    (the last ``event_history_size`` steps), one summary line per kind for
    older ones, and the loss-scale change. The other calls cost nothing.
    States already on the host (read by a :class:`~optax_gradflow.Monitor`,
    say) are logged with :meth:`log_states`, which reads nothing.

    Exactness: steps and counts are exact. A step's norm, loss scale and
    diagnostics are given for the latest step only (the state keeps the
    norms of explosions in ``explosion_norms``, which this logger does not
    itemise), and the threshold of a step is the one in force outside
    warm-up, rebuilt from the threshold history. ``stabilize(...,
    log_events=True)`` logs exact values from inside the graph instead.

    With several stabilizers (``optax.partition``), each one's lines are
    prefixed by its key path.

    Args:
      every: read the device every this many calls (>= 1).
      max_lines: see the module docstring, burst folding.
      fold_window: see the module docstring, burst folding.
      log: the ``logging.Logger`` to write to; ``"optax_gradflow"`` by default.

    Examples:
      >>> import jax.numpy as jnp, optax, optax_gradflow
      >>> from optax_gradflow.events import EventLogger
      >>> opt = optax.chain(optax_gradflow.stabilize(1e-2), optax.sgd(1e-2))
      >>> state = opt.init({"w": jnp.ones(3)})
      >>> events = EventLogger(every=100)
      >>> events(state)  # the first call reads: the baseline
      True
      >>> events(state)  # the next 99 calls do not
      False
    """

    def __init__(
        self,
        every: int = 100,
        *,
        max_lines: int = DEFAULT_MAX_LINES,
        fold_window: int = DEFAULT_FOLD_WINDOW,
        log: logging.Logger | None = None,
    ):
        check_count("every", every)
        check_count("max_lines", max_lines)
        check_count("fold_window", fold_window)
        self.every = every
        self.max_lines = max_lines
        self.fold_window = fold_window
        self.log = logger if log is None else log
        self._calls = 0
        self._seen: dict[str, GradientFlowState] = {}
        self._folders: dict[str, BurstFolder] = {}

    def update(self, opt_state: Any) -> bool:
        """Counts one call; reads and logs on calls 1, 1 + every, ... Returns whether it read.

        The first call reads too: it sets the baseline (the threshold in force,
        the loss scale) that the next reads compare with.
        """
        self._calls += 1
        if not due(self._calls, self.every):
            return False
        self.read(opt_state)
        return True

    __call__ = update

    def flush(self, opt_state: Any = None) -> None:
        """Reads ``opt_state`` now if given, then writes all pending fold summaries."""
        if opt_state is not None:
            self.read(opt_state)
        for folder in self._folders.values():
            folder.flush()

    def read(self, opt_state: Any) -> None:
        """Reads the device now (one transfer, :func:`read_states`) and logs what changed."""
        self.log_states(read_states(opt_state))

    def log_states(self, states: Sequence[tuple[str, GradientFlowState]]) -> None:
        """Logs what changed in states already on the host; reads no device.

        Args:
          states: (key path, host state) of every stabilizer, as
            :func:`read_states` gives them; each path's state is compared
            with the one logged before under that path.
        """
        several = len(states) > 1
        for path, state in states:
            folder = self._folders.get(path)
            if folder is None:
                folder = BurstFolder(
                    self.max_lines,
                    self.fold_window,
                    name=path if several else None,
                    log=self.log,
                )
                self._folders[path] = folder
            _log_changes(folder, self._seen.get(path), state)
            self._seen[path] = state


def _log_changes(
    folder: BurstFolder, prev: GradientFlowState | None, cur: GradientFlowState
) -> None:
    """Logs the events between the host states ``prev`` (None: none yet) and ``cur``."""
    step = int(cur.stabilizer_step)
    if prev is not None and step < int(prev.stabilizer_step):
        prev = None  # a new run (or a restored earlier checkpoint): start over
    prev_step = 0 if prev is None else int(prev.stabilizer_step)
    flags = host_chronological(*cur.event_flags)
    visible = min(step - prev_step, flags.shape[0])
    flags = [int(f) for f in flags[flags.shape[0] - visible :]]
    first_visible = step - visible

    # Events too old for the event window: one summary line per kind.
    for field, (kind, flag) in _COUNTED.items():
        before = 0 if prev is None else int(getattr(prev, field))
        hidden = int(getattr(cur, field)) - before - sum(1 for f in flags if f & flag)
        if hidden > 0:
            folder.emit(
                kind,
                prev_step,
                f"{hidden} {KINDS[kind][1]} in steps {prev_step}-{first_visible - 1} are "
                f"older than the event window ({cur.event_flags.values.shape[0]} steps) "
                f"and not itemised",
            )

    before_after = _threshold_changes(prev, cur, flags)
    in_force = before_after[0][0] if before_after else float(cur.clip_threshold)
    pushes = iter(before_after)
    for offset, f in enumerate(flags):
        if f & (Event.ADAPTED | Event.EMERGENCY):
            thr_before, thr_after = next(pushes)
        else:
            thr_before = thr_after = in_force
        k = first_visible + offset
        ctx = _host_context(cur, k, f, thr_before, thr_after, flags[offset + 1 :])
        for kind, message in event_messages(ctx):
            folder.emit(kind, k, message)
        in_force = thr_after

    if prev is not None and float(cur.loss_scale) != float(prev.loss_scale):
        folder.emit(
            "loss_scale",
            step - 1,
            f"loss scale {float(prev.loss_scale):.4g} -> {float(cur.loss_scale):.4g} "
            f"between steps {prev_step} and {step - 1}",
        )


def _threshold_changes(
    prev: GradientFlowState | None, cur: GradientFlowState, flags: list[int]
) -> list[tuple[float, float]]:
    # One threshold push per adapted or emergency step (SPEC.md, "Per-step
    # order" 10), so the newest pushes line up with the newest such steps.
    history = host_chronological(*cur.threshold_history).tolist()
    pushes = sum(1 for f in flags if f & (Event.ADAPTED | Event.EMERGENCY))
    fallback = float("nan") if prev is None else float(prev.clip_threshold)
    pairs = []
    for j in range(len(history) - pushes, len(history)):
        after = history[j] if j >= 0 else float("nan")
        before = history[j - 1] if j >= 1 else (fallback if j == 0 else float("nan"))
        pairs.append((before, after))
    return pairs


def _host_context(
    cur: GradientFlowState,
    k: int,
    f: int,
    thr_before: float,
    thr_after: float,
    later: list[int],
) -> EventContext:
    """What the state ``cur``, read after step ``k`` (flags ``f``), tells of that step.

    ``later`` are the flags of the steps between ``k`` and the read: a total
    as it stood after step ``k`` is the state's total less their events, and
    the values only the latest step has (its norm, the loss scale, the
    diagnostics) are given for the latest step only.
    """
    totals = {
        field: int(getattr(cur, field)) - sum(1 for g in later if g & flag)
        for field, (_, flag) in _COUNTED.items()
    }
    if later:
        return EventContext(k, f, thr_before, thr_after, totals)
    variances = host_chronological(*cur.variance_history)
    return EventContext(
        k,
        f,
        thr_before,
        thr_after,
        totals,
        norm=float(cur.last_grad_norm),
        scale_after=float(cur.loss_scale),
        trend=float(cur.norm_trend),
        variance=float(variances[-1]) if variances.size else None,
    )
