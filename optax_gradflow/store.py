"""A JSON file of learned clip thresholds, keyed by a model fingerprint.

SPEC.md, section "Threshold store", is the contract: the record schema, the
fingerprint, the save policy and what happens to a corrupt file. In short: a
run that has been stable for a while saves its adapted threshold; the next run
of the same model (``stabilize(..., store=store)``) starts from it instead of
a guess or a warm-up. The file is plain JSON (never pickle), written
atomically, and several processes may share it.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib
import json
import logging
import math
import os
import pathlib
import warnings
from collections.abc import Iterator
from typing import Any

import filelock
import jax
import numpy as np

from optax_gradflow import files
from optax_gradflow.loss_scaling import find_state
from optax_gradflow.report import norm_statistics, score_of_flags
from optax_gradflow.state import GradientFlowState, host_chronological

logger = logging.getLogger("optax_gradflow")

FORMAT = "optax_gradflow.threshold_store"
SCHEMA_VERSION = 1

DEFAULT_SAVE_EVERY = 1000
DEFAULT_MIN_STABLE_STEPS = 500
DEFAULT_MIN_SCORE = 0.8
DEFAULT_MAX_EXPLOSIONS = 10


class ThresholdStoreError(RuntimeError):
    """The store file cannot be written safely (corrupt, foreign or newer schema)."""


class ThresholdStoreWarning(UserWarning):
    """A lookup found an unusable store file or record and returned None."""


def fingerprint(params: Any, label: str | None = None) -> str:
    """A stable identifier of a model: its parameter tree's key paths, shapes and dtypes.

    The SHA-256 of a canonical JSON list of ``[key path, shape, dtype]`` per
    leaf, plus ``label``, cut to 32 hex digits. Values do not matter, so the
    fingerprint is the same at every step, in every process and for abstract
    (``jax.ShapeDtypeStruct``) or traced parameters. Use ``label`` to tell
    apart models of the same architecture trained on different data.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_gradflow.store import fingerprint
      >>> fingerprint({"w": jnp.ones(3)}) == fingerprint({"w": jnp.zeros(3)})
      True
      >>> fingerprint({"w": jnp.ones(3)}) == fingerprint({"w": jnp.ones(3)}, label="b")
      False
    """
    if label is not None and not isinstance(label, str):
        raise TypeError(f"label must be a str or None, got {label!r}.")
    entries = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        shape = getattr(leaf, "shape", None)
        shape = np.shape(leaf) if shape is None else shape
        dtype = getattr(leaf, "dtype", None)
        dtype = type(leaf).__name__ if dtype is None else str(np.dtype(dtype))
        entries.append([jax.tree_util.keystr(path), [int(d) for d in shape], dtype])
    canonical = json.dumps({"label": label, "tree": entries}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]


class _Unusable(Exception):
    """The file's content is not a store this version can use."""


def _library_version() -> str:
    return str(getattr(importlib.import_module("optax_gradflow"), "__version__", "unknown"))


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


class ThresholdStore:
    """Learned thresholds in one JSON file, shared safely between processes.

    Reading: :meth:`lookup` (what ``stabilize(..., store=store)`` calls at
    ``init``) returns the stored threshold or None; a missing file is simply
    empty; a corrupt, truncated, foreign or newer-schema file, or a bad record,
    makes it warn (:class:`ThresholdStoreWarning`) and return None, so that
    training still starts.

    Writing: :meth:`save` writes a record now; :meth:`maybe_save`, called
    every step, saves by the policy below. Writes hold an exclusive lock on
    the side file ``<path>.lock`` for the whole read-modify-write, so two
    processes lose no record, and replace the file atomically (temporary file
    in the same directory, flush, fsync, ``os.replace``). A file this version
    cannot read is never overwritten: writes raise :class:`ThresholdStoreError`
    naming the path.

    Save policy of :meth:`maybe_save` (SPEC.md, "Threshold store"): when the
    step crosses a multiple of ``save_every`` since the previous check, read
    the state once and save if the data warm-up is over, ``stable_streak >=
    min_stable_steps``, the stability score is above ``min_score`` and fewer
    than ``max_explosions`` explosions happened since the previous check.

    Args:
      path: the JSON file (not a directory: ValueError); its directory is
        created on the first save.
      save_every: steps between two policy checks (and device reads).
      min_stable_steps: least ``stable_streak`` to save.
      min_score: the stability score must be above this to save.
      max_explosions: explosions since the previous check must be fewer.

    Examples:
      >>> import tempfile, os, jax.numpy as jnp, optax, optax_gradflow
      >>> from optax_gradflow.store import ThresholdStore
      >>> store = ThresholdStore(os.path.join(tempfile.mkdtemp(), "thresholds.json"))
      >>> params = {"w": jnp.ones(3)}
      >>> store.lookup(params) is None
      True
      >>> opt = optax_gradflow.stabilize(initial_threshold=2.0)
      >>> record = store.save(opt.init(params), params)
      >>> store.lookup(params)
      2.0
      >>> optax_gradflow.stabilize(store=store).init(params).clip_threshold.item()
      2.0
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        save_every: int = DEFAULT_SAVE_EVERY,
        min_stable_steps: int = DEFAULT_MIN_STABLE_STEPS,
        min_score: float = DEFAULT_MIN_SCORE,
        max_explosions: int = DEFAULT_MAX_EXPLOSIONS,
    ):
        for name, value, least in (
            ("save_every", save_every, 1),
            ("min_stable_steps", min_stable_steps, 0),
            ("max_explosions", max_explosions, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}.")
        if not 0.0 <= float(min_score) <= 1.0:
            raise ValueError(f"min_score must lie in [0, 1], got {min_score!r}.")
        self.path = pathlib.Path(path)
        if self.path.is_dir():
            raise ValueError(
                f"ThresholdStore needs a file path, but {str(self.path)!r} is a directory: "
                f"give a file in it, e.g. {str(self.path / 'thresholds.json')!r}."
            )
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.save_every = save_every
        self.min_stable_steps = min_stable_steps
        self.min_score = float(min_score)
        self.max_explosions = max_explosions
        self._calls = 0
        self._checked_period: int | None = None
        self._explosions_at_check: int | None = None

    def __repr__(self) -> str:
        return f"ThresholdStore({str(self.path)!r})"

    # --- Reading ----------------------------------------------------------

    def lookup(self, params: Any, label: str | None = None) -> float | None:
        """The stored threshold for this model, or None (warns if the file is unusable).

        One read of the file; no device transfer (the fingerprint needs only
        shapes and dtypes).
        """
        record = self.get(params, label)
        if record is None:
            return None
        threshold = float(record["threshold"])
        logger.info(
            "using stored clip threshold %.4g from %s (fingerprint %s, saved at step %s)",
            threshold,
            self.path,
            record.get("fingerprint"),
            record.get("steps"),
        )
        return threshold

    def get(self, params: Any, label: str | None = None) -> dict[str, Any] | None:
        """The whole stored record for this model, or None (warns like :meth:`lookup`)."""
        key = fingerprint(params, label)
        try:
            document = self._read()
            record = document["records"].get(key)
            if record is None:
                return None
            _check_record(record)
        except _Unusable as err:
            warnings.warn(
                f"Ignoring the threshold store {self.path}: {err}", ThresholdStoreWarning, 2
            )
            return None
        return record

    def records(self) -> dict[str, dict[str, Any]]:
        """Every record, by fingerprint. Raises ThresholdStoreError if the file is unusable."""
        try:
            return self._read()["records"]
        except _Unusable as err:
            raise ThresholdStoreError(
                f"Cannot read the threshold store {self.path}: {err}"
            ) from err

    def _read(self) -> dict[str, Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "records": {}}
        except (OSError, UnicodeDecodeError) as err:
            raise _Unusable(f"unreadable ({err})") from err
        return _parse(text)

    # --- Writing ----------------------------------------------------------

    def save(self, opt_state: Any, params: Any, label: str | None = None) -> dict[str, Any]:
        """Saves this run's threshold now, whatever the policy; returns the record.

        One device-to-host transfer (the stabilizer state).

        Raises:
          ValueError: several stabilizers in ``opt_state`` (pass the sub-state
            and its params), or the data warm-up is not over (the threshold is
            a placeholder until then).
          ThresholdStoreError: the file exists but is corrupt, foreign or of a
            newer schema; it is left untouched.
        """
        host = jax.device_get(find_state(opt_state))
        if int(host.warmup_steps_left) > 0:
            raise ValueError(
                f"Not saving: the data warm-up has {int(host.warmup_steps_left)} steps left, "
                "so the threshold is not learned yet."
            )
        return self._write(_record(host, fingerprint(params, label), label))

    def maybe_save(
        self,
        opt_state: Any,
        params: Any,
        label: str | None = None,
        *,
        step: int | None = None,
    ) -> dict[str, Any] | None:
        """Call once per step; saves by the policy, returns the record or None.

        Reads the device at most once per ``save_every`` steps: the step is
        ``step`` if given (a host ``int``, e.g. the loop counter), else this
        store's own count of calls, re-synchronised with ``stabilizer_step`` at
        each read. Nothing is read on the calls in between.
        """
        if step is None:
            self._calls += 1
            current = self._calls
        elif isinstance(step, (int, np.integer)) and not isinstance(step, bool):
            current = int(step)
        else:
            raise TypeError(
                f"step must be a host int (reading a device array would cost a transfer), "
                f"got {type(step).__name__}."
            )
        period = current // self.save_every
        if self._checked_period is None or period < self._checked_period:
            self._checked_period = period  # first call, or a restarted run
            return None
        if period == self._checked_period:
            return None
        self._checked_period = period

        host = jax.device_get(find_state(opt_state))  # the one read of this period
        if step is None:
            self._calls = int(host.stabilizer_step)
            self._checked_period = self._calls // self.save_every
        explosions = int(host.explosion_count)
        since = explosions - (self._explosions_at_check or 0)
        self._explosions_at_check = explosions
        failures = self._policy_failures(host, since)
        if failures:
            logger.debug("not saving the clip threshold: %s", "; ".join(failures))
            return None
        return self._write(_record(host, fingerprint(params, label), label))

    def _policy_failures(self, s: GradientFlowState, explosions_since: int) -> list[str]:
        failures = []
        if int(s.warmup_steps_left) > 0:
            failures.append("the data warm-up is not over")
        if int(s.stable_streak) < self.min_stable_steps:
            failures.append(f"stable streak {int(s.stable_streak)} < {self.min_stable_steps}")
        score = _score(s)
        if not score > self.min_score:
            failures.append(f"stability score {score:.3f} is not above {self.min_score:g}")
        if explosions_since >= self.max_explosions:
            failures.append(
                f"{explosions_since} explosions since the last check (limit {self.max_explosions})"
            )
        if not math.isfinite(float(s.clip_threshold)):
            failures.append("the threshold is not finite")
        return failures

    def _write(self, record: dict[str, Any]) -> dict[str, Any]:
        key = record["fingerprint"]
        with self._locked():
            try:
                document = self._read()
            except _Unusable as err:
                raise ThresholdStoreError(
                    f"Refusing to overwrite the threshold store {self.path}: {err}. Move the "
                    "file aside (or pass another path) to start a new store."
                ) from err
            old = document["records"].get(key)
            if isinstance(old, dict) and _newer(old.get("schema_version")):
                raise ThresholdStoreError(
                    f"Refusing to replace the record {key} in {self.path}: it has schema "
                    f"version {old.get('schema_version')}, newer than this library's "
                    f"{SCHEMA_VERSION}."
                )
            document["records"][key] = record
            self._replace(document)
        logger.info(
            "saved clip threshold %.4g to %s (fingerprint %s, label %r, step %d, score %.3f)",
            record["threshold"],
            self.path,
            key,
            record["label"],
            record["steps"],
            record["stability_score"],
        )
        return record

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # A side lock file, not the store itself: os.replace swaps the store's
        # inode, so a lock held on it would not exclude the next writer.
        # filelock locks on every platform (fcntl on POSIX, msvcrt on Windows).
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(self.lock_path):
            yield

    def _replace(self, document: dict[str, Any]) -> None:
        text = json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n"
        files.write_atomically(self.path, text, prefix=f".{self.path.name}.")


def _newer(version: Any) -> bool:
    return isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION


def _parse(text: str) -> dict[str, Any]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise _Unusable(f"not valid JSON, corrupt or truncated ({err})") from err
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise _Unusable(f'not a threshold store (no "format": "{FORMAT}" at the top)')
    version = document.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise _Unusable(f"bad schema_version {version!r}")
    if version > SCHEMA_VERSION:
        raise _Unusable(
            f"written with schema version {version}, newer than this library's "
            f"{SCHEMA_VERSION}; upgrade optax-gradflow to use it"
        )
    if not isinstance(document.get("records"), dict):
        raise _Unusable('"records" is not an object')
    return document


def _check_record(record: Any) -> None:
    if not isinstance(record, dict):
        raise _Unusable("a record is not an object")
    version = record.get("schema_version")
    if _newer(version):
        raise _Unusable(
            f"the record has schema version {version}, newer than this library's "
            f"{SCHEMA_VERSION}; upgrade optax-gradflow to use it"
        )
    threshold = record.get("threshold")
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not math.isfinite(threshold)
        or threshold <= 0
    ):
        raise _Unusable(f"the record's threshold {threshold!r} is not a positive number")


def _score(s: GradientFlowState) -> float:
    return score_of_flags(host_chronological(*s.event_flags))


def _record(s: GradientFlowState, key: str, label: str | None) -> dict[str, Any]:
    threshold = float(s.clip_threshold)
    if not math.isfinite(threshold) or threshold <= 0:
        raise ValueError(
            f"Not saving: the clip threshold {threshold!r} is not positive and finite."
        )
    stats = norm_statistics(host_chronological(*s.norm_history))
    return {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": key,
        "label": label,
        "threshold": threshold,
        "grad_norm": {
            "mean": _finite_or_none(stats.mean),
            "std": _finite_or_none(stats.std),
            "p50": _finite_or_none(stats.p50),
            "p90": _finite_or_none(stats.p90),
        },
        "steps": int(s.stabilizer_step),
        "stability_score": float(_score(s)),
        "explosion_count": int(s.explosion_count),
        "library_version": _library_version(),
        "saved_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
