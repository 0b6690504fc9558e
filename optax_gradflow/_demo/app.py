"""The ``demo`` command's run: three trainings, their table, findings, report and figure."""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

import optax_gradflow
from optax_gradflow._demo.results import findings, table, write_plot
from optax_gradflow._demo.scenario import (
    DEFAULT_OUTPUT,
    DEFAULT_STEPS,
    DEPTH,
    GRADFLOW,
    LEARNING_RATE,
    MISSING_RATE,
    NAME_WIDTH,
    OUTLIER_FACTOR,
    OUTLIER_RATE,
    RUNS,
)
from optax_gradflow._demo.training import train
from optax_gradflow.monitor import Monitor


def _progress_bar(stream: TextIO, label: str, total: int, enabled: bool) -> Any:
    """A ``tqdm`` bar on ``stream`` (a terminal only), or None: disabled, or tqdm missing.

    tqdm is optional (the ``examples`` extra); without it the demo runs without
    a bar.
    """
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    # disable=None: no bar when the stream is not a terminal (logs, CI).
    return tqdm(
        total=total,
        desc=f"{label:<{NAME_WIDTH}}",
        unit="step",
        file=stream,
        disable=None,
        leave=False,
        dynamic_ncols=True,
    )


class _BarAwareHandler(logging.StreamHandler):
    """Writes log records on their own line, above the progress bar if there is one."""

    def __init__(self, stream: TextIO):
        super().__init__(stream)
        self.bar: Any = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.bar is None or self.bar.disable:
            super().emit(record)
            return
        try:
            self.bar.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def _event_lines(stream: TextIO, enabled: bool) -> Iterator[_BarAwareHandler | None]:
    """Routes the ``optax_gradflow`` logger to ``stream`` for the duration of the demo."""
    if not enabled:
        yield None
        return
    log = logging.getLogger("optax_gradflow")
    handler = _BarAwareHandler(stream)
    handler.setFormatter(logging.Formatter("  gradflow %(levelname)s: %(message)s"))
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


def demo(
    *,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    output: str | os.PathLike[str] = DEFAULT_OUTPUT,
    quiet: bool = False,
    stream: TextIO | None = None,
) -> int:
    """Runs the demo; returns the exit status (0, or 1 if the plot cannot be written)."""
    try:
        import flax  # noqa: F401
        import matplotlib  # noqa: F401
    except ImportError as err:
        print(
            f"optax-gradflow demo needs flax and matplotlib ({err}); install them with "
            "pip install 'optax-gradflow[examples]'",
            file=sys.stderr,
        )
        return 1
    out = sys.stdout if stream is None else stream
    err_stream = sys.stderr
    began = time.perf_counter()
    print(
        f"Scenario: a {DEPTH}-layer ReLU MLP, Adam lr {LEARNING_RATE:g}, {steps} steps, "
        f"seed {seed}; {OUTLIER_RATE:.0%} of the batches have targets x{OUTLIER_FACTOR:g}, "
        f"{MISSING_RATE:.1%} carry a NaN target. Loss: MSE on clean examples.",
        file=out,
    )
    results = []
    # The stabilizer run's whole history, one device read per chunk of CHUNK steps;
    # it also logs the stabilizer's events (unless quiet).
    monitor = Monitor(every=1, log_events=not quiet)
    with _event_lines(err_stream, enabled=not quiet) as handler:
        for name, description in RUNS:
            bar = _progress_bar(err_stream, name, steps, enabled=not quiet)
            if handler is not None:
                handler.bar = bar
            try:
                result = train(
                    name,
                    steps=steps,
                    seed=seed,
                    bar=bar,
                    monitor=monitor if name == GRADFLOW else None,
                )
            finally:
                if handler is not None:
                    handler.bar = None
                if bar is not None:
                    bar.close()
            if not quiet:
                print(
                    f"{name:<{NAME_WIDTH}} {steps} steps in {result.seconds:.1f} s  "
                    f"({description})",
                    file=err_stream,
                )
            results.append(result)

    notes = findings(results)
    print("", file=out)
    print(table(results), file=out)
    print("", file=out)
    for line in notes:
        print(line, file=out)
    report = optax_gradflow.stability_report(results[-1].opt_state)
    print("\nStability report of the stabilized run:", file=out)
    print(report.summary(), file=out)
    try:
        write_plot(results, monitor, pathlib.Path(output), seed=seed, notes=notes)
    except OSError as err:
        print(f"optax-gradflow demo: cannot write the plot to {output}: {err}", file=sys.stderr)
        return 1
    print(f"\nPlot written to {output} ({time.perf_counter() - began:.1f} s in all).", file=out)
    return 0
