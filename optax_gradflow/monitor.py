"""A bounded, step-aligned history of a whole run, read from the device every N steps.

:class:`Monitor` keeps, for every stabilizer in an optimizer state (or for a
PyTorch ``GradientFlowStabilizer``), one record per read interval: the steps it
covers, the median and maximum of the gradient norms of those steps, the
threshold, the loss scale and the loss at the read, and the number of clipped,
exploding, non-finite (skipped), vanishing and emergency steps in it. Memory
stays bounded: at ``max_records`` records, adjacent pairs are merged, so a
million-step run is covered whole, at a coarser resolution.
:func:`optax_gradflow.plot` draws it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from optax_gradflow import files
from optax_gradflow.constants import FLAT_FIELDS, VERSION_FIELD
from optax_gradflow.events import (
    DEFAULT_FOLD_WINDOW,
    DEFAULT_MAX_LINES,
    EventLogger,
    check_count,
    due,
    read_states,
)
from optax_gradflow.state import GradientFlowState, Ring, from_flat, host_chronological

DEFAULT_EVERY = 100
DEFAULT_MAX_RECORDS = 2000
TORCH_PATH = "torch"
FORMAT = "optax_gradflow.Monitor/1"

# The saturating counters a record counts over its interval: field -> record attribute.
COUNTERS: dict[str, str] = {
    "clip_count": "clipped",
    "explosion_count": "explosions",
    "nonfinite_count": "nonfinite",
    "vanishing_count": "vanishing",
    "emergency_count": "emergencies",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Interval:
    """What one stabilizer did in steps ``start .. stop - 1``.

    Steps are ``stabilizer_step`` values: step ``k`` is the ``k + 1``-th
    update. Float fields may be NaN (no norm recovered, no loss given).

    Attributes:
      start: first step of the interval (``stabilizer_step`` at the previous read).
      stop: ``stabilizer_step`` at the read that closed the interval.
      reads: device reads merged into this record (1 until records are merged).
      norms: number of finite gradient norms (exploding ones included) the
        two statistics below are taken over.
      norm_median: median of those norms (after a merge: an estimate, the
        median of the record holding more norms, or the mean of the two
        medians when they hold as many).
      norm_max: maximum of those norms: never below an exploding step's norm
        while the interval holds at most ``event_history_size`` explosions.
      threshold: ``clip_threshold`` at the read: the threshold of step ``stop``.
      loss_scale: the loss scale at the read.
      loss: ``last_loss`` at the read: the latest ``value=`` given to update.
      clipped: clipped steps (explosions included).
      explosions: exploding steps.
      nonfinite: non-finite (skipped) steps.
      vanishing: vanishing steps.
      emergencies: emergency interventions.
    """

    start: int
    stop: int
    reads: int
    norms: int
    norm_median: float
    norm_max: float
    threshold: float
    loss_scale: float
    loss: float
    clipped: int
    explosions: int
    nonfinite: int
    vanishing: int
    emergencies: int

    @property
    def steps(self) -> int:
        """Steps in the interval."""
        return self.stop - self.start

    def as_dict(self) -> dict[str, Any]:
        """Plain Python values; non-finite floats become None (strict JSON)."""
        return {
            f.name: _json_float(getattr(self, f.name))
            if isinstance(getattr(self, f.name), float)
            else getattr(self, f.name)
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Interval:
        """The inverse of :meth:`as_dict` (None becomes NaN)."""
        values = {}
        for f in dataclasses.fields(cls):
            value = data[f.name]
            values[f.name] = (
                (math.nan if value is None else float(value)) if f.type == "float" else int(value)
            )
        return cls(**values)


def merge(a: Interval, b: Interval) -> Interval:
    """One record for two adjacent ones (``a`` first): counts add up, the maximum is
    the larger one, threshold, loss scale and loss are ``b``'s; the median is an
    estimate (see :class:`Interval`)."""
    if a.norms > b.norms:
        median = a.norm_median
    elif b.norms > a.norms:
        median = b.norm_median
    else:
        median = (a.norm_median + b.norm_median) / 2 if a.norms else math.nan
    return Interval(
        start=a.start,
        stop=b.stop,
        reads=a.reads + b.reads,
        norms=a.norms + b.norms,
        norm_median=median,
        norm_max=max(a.norm_max, b.norm_max) if a.norms and b.norms else _first_max(a, b),
        threshold=b.threshold,
        loss_scale=b.loss_scale,
        loss=b.loss,
        **{name: getattr(a, name) + getattr(b, name) for name in COUNTERS.values()},
    )


def _first_max(a: Interval, b: Interval) -> float:
    return a.norm_max if a.norms else b.norm_max


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclasses.dataclass
class _Track:
    """The records of one stabilizer and what the next interval starts from."""

    origin_step: int
    origin_threshold: float
    origin_loss_scale: float
    records: list[Interval] = dataclasses.field(default_factory=list)
    # Reads per record: doubled at each merge, so that every record but the
    # newest covers as many reads.
    reads_per_record: int = 1
    # The counters and step at the end of the newest record (the origin's
    # before the first one): the baseline of the next interval.
    step: int = 0
    totals: dict[str, int] = dataclasses.field(default_factory=dict)


class Monitor:
    """Records a whole run, reading the stabilizer states from the device every ``every`` calls.

    Call :meth:`update` (or the monitor itself) once per training step with
    the optimizer state. The first call and then every ``every``-th call
    (calls 1, 1 + every, 1 + 2 every, ...) do one ``jax.device_get`` of the
    stabilizer states found in it (never of the inner optimizer's moments: a
    few KiB per stabilizer); the other calls only count and touch no device
    value, so the cost is one small device-to-host transfer per ``every``
    steps. Each read closes one interval per stabilizer, keyed by its path as
    :func:`optax_gradflow.find_states` gives it (one per sub-tree under
    ``optax.partition``).

    A record (:class:`Interval`) holds the steps it covers, the counts of
    clipped, exploding, non-finite (skipped), vanishing and emergency steps
    (differences of the state's counters: exact), the threshold, loss scale
    and ``last_loss`` at the read, and the median and maximum of the norms of
    the interval's steps that the state still holds: the new entries since
    the last read of the ``norm_history`` ring (every finite, non-exploding
    step pushes its norm) and of the ``explosion_norms`` ring (every
    explosion pushes its norm). These are all of the interval's finite norms
    as long as it has at most ``norm_history_size`` non-exploding steps and
    ``event_history_size`` explosions (1000 and 100 by default): always with
    ``every <= event_history_size`` and one call per step; beyond, only the
    latest of each.

    Memory is bounded: when a stabilizer's records would exceed
    ``max_records``, adjacent pairs are merged (counts add up, the maximum of
    the maxima, an estimate of the median, the later threshold, scale and
    loss), and each record then gathers twice as many reads, so that all but
    the newest cover as many. The whole run stays covered, by ``max_records``
    records at most (a few hundred bytes each).

    A state whose step went back (a restored earlier checkpoint) drops the
    records past that step and goes on from there.

    PyTorch: pass a ``optax_gradflow.torch.GradientFlowStabilizer`` (or a
    list or dict of them) instead of the optimizer state; its
    ``state_dict()`` is read on the same schedule, keyed ``"torch"`` (list:
    ``"torch[i]"``, dict: its keys).

    Args:
      every: read the device every this many calls (>= 1).
      max_records: the most records kept per stabilizer (>= 2).
      log_events: also log the stabilizers' events as
        :class:`~optax_gradflow.EventLogger` does, from the same read.
      max_lines: burst folding of the event lines (see ``EventLogger``).
      fold_window: burst folding of the event lines (see ``EventLogger``).
      log: the ``logging.Logger`` for the event lines; ``"optax_gradflow"`` by
        default.

    Examples:
      >>> import jax.numpy as jnp, optax, optax_gradflow
      >>> opt = optax_gradflow.stabilized(optax.sgd(1e-2), 1e-2)
      >>> params = {"w": jnp.ones(3)}
      >>> state = opt.init(params)
      >>> monitor = optax_gradflow.Monitor(every=10)
      >>> monitor.update(state)  # the first call reads: the baseline
      True
      >>> for step in range(20):
      ...     grads = {"w": jnp.full(3, 0.1 * (step + 1))}
      ...     _, state = opt.update(grads, state, params)
      ...     _ = monitor.update(state)  # reads on calls 11 and 21 only
      >>> monitor.reads
      3
      >>> [(r.start, r.stop, r.norms) for r in monitor.records[".flow"]]
      [(0, 10, 10), (10, 20, 10)]
      >>> print(f"{monitor.records['.flow'][-1].norm_max:.3f}")
      3.464
    """

    def __init__(
        self,
        every: int = DEFAULT_EVERY,
        *,
        max_records: int = DEFAULT_MAX_RECORDS,
        log_events: bool = False,
        max_lines: int = DEFAULT_MAX_LINES,
        fold_window: int = DEFAULT_FOLD_WINDOW,
        log: Any = None,
    ):
        check_count("every", every)
        if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 2:
            raise ValueError(f"max_records must be an int >= 2, got {max_records!r}.")
        self.every = every
        self.max_records = max_records
        # The monitor's reads feed the logger (EventLogger.log_states): one
        # transfer serves both, and the logger's own schedule is never used.
        self.events: EventLogger | None = (
            EventLogger(every=1, max_lines=max_lines, fold_window=fold_window, log=log)
            if log_events
            else None
        )
        self.calls = 0
        self.reads = 0
        self._calls_at_read = 0
        self._tracks: dict[str, _Track] = {}

    # --- Reading ---------------------------------------------------------------

    def update(self, opt_state: Any) -> bool:
        """Counts one call; reads on calls 1, 1 + every, ... Returns whether it read."""
        self.calls += 1
        if not due(self.calls, self.every):
            return False
        self.read(opt_state)
        return True

    __call__ = update

    def read(self, opt_state: Any) -> None:
        """Reads the device now (one transfer) and closes an interval per stabilizer."""
        found = _read_host(opt_state)
        self.reads += 1
        self._calls_at_read = self.calls
        for path, state in found:
            self._record(path, state)
        if self.events is not None:
            self.events.log_states(found)

    def flush(self, opt_state: Any = None) -> None:
        """Reads ``opt_state`` now (closing the last interval), then writes the
        pending event fold summaries. Call it once after the training loop.

        ``opt_state`` may be left out only when no call since the last read
        is pending (the monitor keeps no reference to a state: a donated one
        would be gone by then).

        Raises:
          ValueError: no ``opt_state`` while calls since the last read are
            not recorded yet.
        """
        if opt_state is not None:
            self.read(opt_state)
        elif self.calls > self._calls_at_read:
            pending = self.calls - self._calls_at_read
            raise ValueError(
                f"Monitor.flush() needs the optimizer state: the {pending} call(s) since the "
                "last read are not recorded yet. Call monitor.flush(opt_state) after the "
                "training loop; it reads the state once and closes the last interval."
            )
        if self.events is not None:
            self.events.flush()

    def _record(self, path: str, state: GradientFlowState) -> None:
        step = int(state.stabilizer_step)
        track = self._tracks.get(path)
        if track is None:
            # The first read: the interval since step 0 (empty for a fresh state).
            track = _Track(
                origin_step=0,
                origin_threshold=math.nan,
                origin_loss_scale=math.nan,
                totals=dict.fromkeys(COUNTERS, 0),
            )
            if step == 0:
                track.origin_threshold = float(state.clip_threshold)
                track.origin_loss_scale = float(state.loss_scale)
            self._tracks[path] = track
        elif step < track.step:
            _rewind(track, step)
        if step == track.step:
            return
        counts = {
            field: max(int(getattr(state, field)) - track.totals[field], 0) for field in COUNTERS
        }
        norms = _interval_norms(state, step - track.step, counts)
        interval = Interval(
            start=track.step,
            stop=step,
            reads=1,
            norms=int(norms.size),
            norm_median=float(np.median(norms)) if norms.size else math.nan,
            norm_max=float(np.max(norms)) if norms.size else math.nan,
            threshold=float(state.clip_threshold),
            loss_scale=float(state.loss_scale),
            loss=float(state.last_loss),
            **{COUNTERS[field]: n for field, n in counts.items()},
        )
        self._append(track, interval)
        track.step = step
        for field, n in counts.items():
            track.totals[field] += n

    def _append(self, track: _Track, interval: Interval) -> None:
        records = track.records
        if records and records[-1].reads < track.reads_per_record:
            records[-1] = merge(records[-1], interval)
        else:
            records.append(interval)
        if len(records) > self.max_records:
            records[:] = [
                merge(records[j], records[j + 1]) if j + 1 < len(records) else records[j]
                for j in range(0, len(records), 2)
            ]
            track.reads_per_record *= 2

    # --- Results ---------------------------------------------------------------

    @property
    def paths(self) -> list[str]:
        """The stabilizers' paths, in the order they were first read."""
        return list(self._tracks)

    @property
    def records(self) -> dict[str, tuple[Interval, ...]]:
        """Path -> its records, oldest first."""
        return {path: tuple(track.records) for path, track in self._tracks.items()}

    def totals(self, path: str) -> dict[str, int]:
        """The counts over all of ``path``'s records (the state's counters at the last read)."""
        track = self._tracks[path]
        return {COUNTERS[field]: n for field, n in track.totals.items()}

    def origin(self, path: str) -> tuple[int, float, float]:
        """(step, threshold, loss scale) where ``path``'s records start; NaN values
        when the first read came after step 0."""
        track = self._tracks[path]
        return track.origin_step, track.origin_threshold, track.origin_loss_scale

    def as_dict(self) -> dict[str, Any]:
        """Plain Python values; non-finite floats become None (strict JSON)."""
        return {
            "format": FORMAT,
            "every": self.every,
            "max_records": self.max_records,
            "calls": self.calls,
            "reads": self.reads,
            "stabilizers": {
                path: {
                    "origin": {
                        "step": track.origin_step,
                        "threshold": _json_float(track.origin_threshold),
                        "loss_scale": _json_float(track.origin_loss_scale),
                    },
                    "reads_per_record": track.reads_per_record,
                    "step": track.step,
                    "totals": self.totals(path),
                    "records": [r.as_dict() for r in track.records],
                }
                for path, track in self._tracks.items()
            },
        }

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Writes :meth:`as_dict` as strict JSON, atomically (a temporary file in the
        same directory, then ``os.replace``), with the mode a new file gets (0666
        less the umask: usually 0644)."""
        text = json.dumps(self.as_dict(), allow_nan=False, indent=1)
        files.write_atomically(path, text, prefix=".monitor-")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Monitor:
        """A monitor holding the records of :meth:`as_dict` (e.g. to plot a saved run).

        It can go on reading the same run: the next interval starts at the
        saved step and counters. The event logger's state is not saved.
        """
        if data.get("format") != FORMAT:
            raise ValueError(f"Not a Monitor export (format {data.get('format')!r}).")
        monitor = cls(every=int(data["every"]), max_records=int(data["max_records"]))
        monitor.calls = int(data["calls"])
        monitor.reads = int(data["reads"])
        monitor._calls_at_read = monitor.calls
        for path, saved in data["stabilizers"].items():
            origin = saved["origin"]
            monitor._tracks[path] = _Track(
                origin_step=int(origin["step"]),
                origin_threshold=_nan_if_none(origin["threshold"]),
                origin_loss_scale=_nan_if_none(origin["loss_scale"]),
                records=[Interval.from_dict(r) for r in saved["records"]],
                reads_per_record=int(saved["reads_per_record"]),
                step=int(saved["step"]),
                totals={field: int(saved["totals"][name]) for field, name in COUNTERS.items()},
            )
        return monitor

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Monitor:
        """:meth:`from_dict` of a file written by :meth:`to_json`."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def __repr__(self) -> str:
        sizes = ", ".join(f"{p!r}: {len(t.records)}" for p, t in self._tracks.items())
        return f"Monitor(every={self.every}, reads={self.reads}, records={{{sizes}}})"


def _nan_if_none(value: Any) -> float:
    return math.nan if value is None else float(value)


def _rewind(track: _Track, step: int) -> None:
    """Drops the records past ``step``; the next interval starts at the newest kept one."""
    track.records = [r for r in track.records if r.stop <= step]
    track.step = track.records[-1].stop if track.records else track.origin_step
    track.totals = dict.fromkeys(COUNTERS, 0)
    for r in track.records:
        for field, name in COUNTERS.items():
            track.totals[field] += getattr(r, name)


def _interval_norms(state: GradientFlowState, steps: int, counts: dict[str, int]) -> np.ndarray:
    """The finite norms of the interval's last ``steps`` steps that the state still holds.

    Each finite, non-exploding step pushed its norm onto ``norm_history``
    and each explosion onto ``explosion_norms`` (SPEC.md, "Per-step order" 6
    and 10), so the interval's are the newest ``steps - explosions -
    non-finite`` entries of the one and the newest ``explosions`` of the
    other: all there when they fit in the rings.
    """
    explosions = counts["explosion_count"]
    calm = steps - explosions - counts["nonfinite_count"]
    return np.concatenate(
        [_newest(state.norm_history, calm), _newest(state.explosion_norms, explosions)]
    )


def _newest(ring: Ring, n: int) -> np.ndarray:
    """The newest ``n`` valid entries of a host ring (fewer if it holds fewer)."""
    values = host_chronological(*ring)
    keep = max(0, min(n, values.shape[0]))
    return np.asarray(values[values.shape[0] - keep :], dtype=np.float64)


# --- Reading the states -----------------------------------------------------------


def _is_torch_stabilizer(x: Any) -> bool:
    return callable(getattr(x, "state_dict", None)) and not isinstance(x, Mapping)


def _read_host(source: Any) -> list[tuple[str, GradientFlowState]]:
    """(path, host state) of every stabilizer in ``source``, with one transfer for JAX
    (:func:`optax_gradflow.events.read_states`)."""
    torch_found = _torch_stabilizers(source)
    if torch_found is not None:
        return [(path, _torch_host_state(stab)) for path, stab in torch_found]
    return read_states(source)


def _torch_stabilizers(source: Any) -> list[tuple[str, Any]] | None:
    """The PyTorch stabilizers in ``source`` (one, a list or a dict of them), or None."""
    if _is_torch_stabilizer(source):
        return [(TORCH_PATH, source)]
    if isinstance(source, (list, tuple)) and source:
        if all(_is_torch_stabilizer(s) for s in source):
            return [(f"{TORCH_PATH}[{i}]", s) for i, s in enumerate(source)]
    if isinstance(source, Mapping) and source:
        if all(_is_torch_stabilizer(s) for s in source.values()):
            return [(str(k), s) for k, s in source.items()]
    return None


def _torch_host_state(stabilizer: Any) -> GradientFlowState:
    """The ``state_dict()`` of a PyTorch stabilizer as a host GradientFlowState."""
    state = stabilizer.state_dict()
    missing = [name for name in FLAT_FIELDS if name not in state and name != VERSION_FIELD]
    if missing:
        raise TypeError(
            f"{type(stabilizer).__name__}.state_dict() lacks the stabilizer fields "
            f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}: pass an "
            "optax_gradflow.torch.GradientFlowStabilizer or an optax optimizer state."
        )
    return from_flat(
        {name: value.detach().cpu().numpy() for name, value in state.items()},
        where=f"{type(stabilizer).__name__}.state_dict()",
        array=np.asarray,
    )
