"""The ``optax-gradflow`` command line.

``optax-gradflow demo`` (or ``python -m optax_gradflow demo``) trains one
small Flax model three ways on a data stream with corrupted batches, prints a
comparison table, which run did best and the stabilizer's report, and writes a
PNG.

The scenario: a 4-layer ReLU MLP (Flax NNX, no normalisation) regresses a
smooth teacher function with Adam at learning rate 3e-3. The data stream is
what a real pipeline sometimes delivers: in 2% of the batches the targets are
off by a factor of 10^4 (a unit error upstream), and 0.2% of the batches
carry a missing target encoded as NaN. The three runs see exactly the same
batches:

* plain ``optax.adam``: each outlier batch kicks every weight by a few times
  the learning rate and inflates Adam's second moment, and the first NaN
  batch turns every parameter into NaN;
* ``optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(1.0),
  optax.adam(lr)), max_consecutive_errors=10**6)``: what an optax user
  writes against NaN batches: outliers are clipped at a fixed norm, a
  non-finite update is dropped with Adam's state untouched;
* ``optax_gradflow.stabilized(optax.adam(lr), lr)`` with the default config:
  the threshold tracks the norms, outliers are clipped (explosions), NaN
  steps are skipped with Adam's state untouched. The loss is passed as
  ``value=`` (the loss gate); loss scaling is off by default.

The loss plotted and tabulated is the mean squared error on a fixed set of
clean examples, evaluated after every step. Which run does best is computed
from these numbers, not asserted: it depends on the seed and the steps.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import os
import pathlib
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gradflow
from optax_gradflow.monitor import Monitor

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


# --- Arguments ------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``optax-gradflow``."""
    parser = argparse.ArgumentParser(
        prog="optax-gradflow",
        description="A gradient flow stabilizer for optax.",
    )
    parser.add_argument("--version", action="version", version=optax_gradflow.__version__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="train a small model three ways on a stream with corrupted batches",
        # argparse %-formats help strings but not a description (unless it
        # names %(prog)s): a plain "%" here.
        description=(
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
        ),
    )
    demo.add_argument(
        "--steps",
        type=_positive_int,
        default=DEFAULT_STEPS,
        help=f"training steps of each run, a positive integer (default {DEFAULT_STEPS})",
    )
    demo.add_argument(
        "--seed",
        type=_non_negative_int,
        default=0,
        help="seed of the model initialisation and of the data stream (default 0)",
    )
    demo.add_argument(
        "--output",
        default=DEFAULT_OUTPUT,
        metavar="PATH",
        help=f"where to write the PNG plot; its directory must exist (default {DEFAULT_OUTPUT})",
    )
    demo.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar, timing lines or event log lines; the table, findings and "
        "report are still printed",
    )
    demo.set_defaults(parser=demo)
    return parser


def _check_output(parser: argparse.ArgumentParser, output: str) -> pathlib.Path:
    path = pathlib.Path(output)
    if path.is_dir():
        parser.error(f"--output {output!r} is a directory; give a file name such as demo.png")
    parent = path.parent if str(path.parent) else pathlib.Path(".")
    if not parent.is_dir():
        parser.error(f"--output {output!r}: the directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        parser.error(f"--output {output!r}: cannot write there (permission denied)")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``optax-gradflow``; returns the exit status.

    Bad arguments exit with status 2 and a message on stderr (argparse).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        output = _check_output(args.parser, args.output)
        return demo(steps=args.steps, seed=args.seed, output=output, quiet=args.quiet)
    parser.error(f"unknown command {args.command!r}")  # unreachable: argparse checks choices
    return 2


# --- Progress and logging -------------------------------------------------------


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


# --- The scenario ---------------------------------------------------------------


class RunResult(NamedTuple):
    """What one training run produced (host arrays)."""

    name: str
    eval_loss: np.ndarray  # clean loss after each step
    grad_norm: np.ndarray  # unscaled global gradient norm of each step
    initial_loss: float
    opt_state: Any
    seconds: float


def _model_class():
    from flax import nnx

    class DeepMLP(nnx.Module):
        """ReLU layers without normalisation, then a linear head."""

        def __init__(self, rngs: nnx.Rngs):
            self.layers = nnx.List(
                [nnx.Linear(INPUT_DIM if i == 0 else WIDTH, WIDTH, rngs=rngs) for i in range(DEPTH)]
            )
            self.head = nnx.Linear(WIDTH, 1, rngs=rngs)

        def __call__(self, x):
            for layer in self.layers:
                x = jax.nn.relu(layer(x))
            return self.head(x)[:, 0]

    return DeepMLP


def _teacher(x: jax.Array) -> jax.Array:
    direction = jax.random.normal(jax.random.PRNGKey(1234), (INPUT_DIM,)) / 4.0
    return jnp.sin(3.0 * (x @ direction))


def _corruption(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(outlier, missing) flags of the batch drawn from ``key``."""
    _, _, ko, km, _ = jax.random.split(key, 5)
    return jax.random.bernoulli(ko, OUTLIER_RATE), jax.random.bernoulli(km, MISSING_RATE)


def _batch(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One batch of the stream: clean, off by OUTLIER_FACTOR, or with a NaN target."""
    kx, kn, _, _, ki = jax.random.split(key, 5)
    outlier, missing = _corruption(key)
    x = jax.random.normal(kx, (BATCH, INPUT_DIM))
    y = _teacher(x) + NOISE * jax.random.normal(kn, (BATCH,))
    y = jnp.where(outlier, OUTLIER_FACTOR * y, y)
    slot = jax.random.randint(ki, (), 0, BATCH)
    return x, jnp.where(missing & (jnp.arange(BATCH) == slot), jnp.nan, y)


def stream_keys(seed: int, steps: int) -> jax.Array:
    """The PRNG key of each step's batch; the three runs share them."""
    return jax.random.split(jax.random.PRNGKey(seed), steps)


def corrupted_steps(seed: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The steps whose batch has outlier targets, and those with a NaN target."""
    outlier, missing = jax.jit(jax.vmap(_corruption))(stream_keys(seed, steps))
    return np.flatnonzero(np.asarray(outlier)), np.flatnonzero(np.asarray(missing))


def _optimizer(name: str) -> optax.GradientTransformation:
    if name == ADAM:
        return optax.adam(LEARNING_RATE)
    if name == AIF:
        return optax.apply_if_finite(
            optax.chain(optax.clip_by_global_norm(CLIP_NORM), optax.adam(LEARNING_RATE)),
            max_consecutive_errors=MAX_CONSECUTIVE_ERRORS,
        )
    return optax_gradflow.stabilized(optax.adam(LEARNING_RATE), LEARNING_RATE)


class _Runner(NamedTuple):
    graphdef: Any
    tx: optax.GradientTransformation
    mse: Any
    run_chunk: Any


@functools.cache
def _runner(name: str) -> _Runner:
    """The jitted chunk of training steps for one optimizer, built once per process."""
    from flax import nnx

    graphdef, _ = nnx.split(_model_class()(nnx.Rngs(0)), nnx.Param)
    tx = _optimizer(name)
    stabilizer = name == GRADFLOW

    def mse(p, x, y):
        return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)

    def train_step(carry, inputs, x_eval, y_eval):
        p, state = carry
        key, active = inputs
        x, y = _batch(key)
        loss, grads = jax.value_and_grad(mse)(p, x, y)
        if stabilizer:
            # The loss feeds the stabilizer's loss gate; no loss scaling (off by default).
            updates, new_state = tx.update(grads, state, p, value=loss)
        else:
            updates, new_state = tx.update(grads, state, p)
        new_p = optax.apply_updates(p, updates)
        # Steps past the end of the run (padding of the last chunk) change nothing.
        new_carry = jax.tree.map(
            lambda new, old: jnp.where(active, new, old), (new_p, new_state), carry
        )
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        return new_carry, (mse(new_carry[0], x_eval, y_eval), norm)

    @jax.jit
    def run_chunk(carry, keys, active, x_eval, y_eval):
        body = functools.partial(train_step, x_eval=x_eval, y_eval=y_eval)
        return jax.lax.scan(body, carry, (keys, active))

    return _Runner(graphdef, tx, jax.jit(mse), run_chunk)


def train(
    name: str,
    *,
    steps: int,
    seed: int,
    bar: Any = None,
    monitor: Monitor | None = None,
) -> RunResult:
    """Trains the MLP with the optimizer ``name``, in jitted chunks of ``CHUNK`` steps.

    ``bar`` (a tqdm bar) advances and ``monitor`` is called once per chunk:
    for the monitor, a chunk is one call, so ``Monitor(every=1)`` reads the
    device once per ``CHUNK`` steps.
    """
    from flax import nnx

    start = time.perf_counter()
    runner = _runner(name)
    _, params = nnx.split(_model_class()(nnx.Rngs(seed)), nnx.Param)
    opt_state = runner.tx.init(params)
    x_eval = jax.random.normal(jax.random.PRNGKey(seed + 10_000), (EVAL_SIZE, INPUT_DIM))
    y_eval = _teacher(x_eval)

    n_chunks = math.ceil(steps / CHUNK)
    keys = stream_keys(seed, n_chunks * CHUNK)
    active = np.arange(n_chunks * CHUNK) < steps
    initial_loss = float(runner.mse(params, x_eval, y_eval))
    carry = (params, opt_state)
    losses, norms = [], []
    if monitor is not None:
        monitor(opt_state)  # the baseline: step 0
    for c in range(n_chunks):
        part = slice(c * CHUNK, (c + 1) * CHUNK)
        carry, (loss, norm) = runner.run_chunk(carry, keys[part], active[part], x_eval, y_eval)
        losses.append(np.asarray(loss))
        norms.append(np.asarray(norm))
        if monitor is not None:
            monitor(carry[1])
        if bar is not None:
            bar.update(min(CHUNK, steps - c * CHUNK))
    if monitor is not None:
        monitor.flush()
    return RunResult(
        name=name,
        eval_loss=np.concatenate(losses)[:steps],
        grad_norm=np.concatenate(norms)[:steps],
        initial_loss=initial_loss,
        opt_state=carry[1],
        seconds=time.perf_counter() - start,
    )


# --- Reporting ------------------------------------------------------------------


def verdict(result: RunResult) -> str:
    """Whether the run diverged: a non-finite loss, or a peak above 10x the initial loss."""
    bad = ~np.isfinite(result.eval_loss)
    if bad.any():
        return f"yes: NaN from step {int(np.argmax(bad))}"
    peak = float(np.max(result.eval_loss))
    if peak > DIVERGENCE_FACTOR * result.initial_loss:
        return f"yes: blow-up to {peak / result.initial_loss:.0f}x"
    return "no"


def counts(result: RunResult) -> tuple[str, str, str, str]:
    """(clipped, explosions, non-finite, skipped) steps; "-" where the optimizer has no
    such notion."""
    finite = np.isfinite(result.grad_norm)
    nonfinite = str(int(np.sum(~finite)))
    if result.name == GRADFLOW:
        flow = optax_gradflow.find_states(result.opt_state)[0][1]
        return (
            str(int(flow.clip_count)),
            str(int(flow.explosion_count)),
            nonfinite,
            str(int(flow.nonfinite_count)),
        )
    if result.name == AIF:
        clipped = int(np.sum(finite & (result.grad_norm > CLIP_NORM)))
        return str(clipped), "-", nonfinite, str(int(result.opt_state.total_notfinite))
    return "-", "-", nonfinite, "0"


def _fmt_loss(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "nan"


def _tail_mean(result: RunResult) -> float:
    """Mean eval loss over the last ``TAIL_SHARE`` of the steps (at least one)."""
    n = max(1, round(TAIL_SHARE * len(result.eval_loss)))
    return float(np.mean(result.eval_loss[-n:]))


def _run_mean(result: RunResult) -> float:
    """Mean eval loss over all the steps (lower: it got there sooner); NaN if it diverged."""
    return float(np.mean(result.eval_loss))


def _and(labels: Sequence[str]) -> str:
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def _peak(result: RunResult) -> float:
    finite = np.isfinite(result.eval_loss)
    return float(np.max(result.eval_loss[finite])) if finite.any() else math.nan


def table(results: Sequence[RunResult]) -> str:
    """The comparison table, one row per run."""
    tail = f"last {TAIL_SHARE:.0%}"
    header = (
        f"{'run':<{NAME_WIDTH}} {'final loss':>10} {tail:>10} {'peak loss':>10} {'clipped':>8} "
        f"{'explosions':>10} {'non-finite':>10} {'skipped':>8}  diverged?"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        clipped, explosions, nonfinite, skipped = counts(r)
        lines.append(
            f"{r.name:<{NAME_WIDTH}} {_fmt_loss(float(r.eval_loss[-1])):>10} "
            f"{_fmt_loss(_tail_mean(r)):>10} {_fmt_loss(_peak(r)):>10} {clipped:>8} "
            f"{explosions:>10} {nonfinite:>10} {skipped:>8}  {verdict(r)}"
        )
    return "\n".join(lines)


def _compare(ours: float, theirs: float) -> str:
    """Whether ``ours`` is "lower", "higher" or "about equal" to ``theirs`` (lower is better)."""
    if not math.isfinite(ours) or not math.isfinite(theirs):
        return "lower" if math.isfinite(ours) else ("higher" if math.isfinite(theirs) else "n/a")
    if max(ours, theirs) <= TIE_FACTOR * min(ours, theirs):
        return "about equal"
    return "lower" if ours < theirs else "higher"


def findings(results: Sequence[RunResult]) -> list[str]:
    """What the numbers say, in words: the best final loss, and the stabilizer against
    ``apply_if_finite`` on each measure (lower is better), with where it wins and loses.

    Computed from ``results``; nothing here names a winner in advance.
    """
    lines = []
    final = {r.name: float(r.eval_loss[-1]) for r in results}
    ranked = sorted((v, n) for n, v in final.items() if math.isfinite(v))
    if ranked:
        best_value, best = ranked[0]
        others = []
        for r in results:
            if r.name == best:
                continue
            value = final[r.name]
            if not math.isfinite(value):
                others.append(f"{r.name} {_fmt_loss(value)} (diverged: {verdict(r)})")
            elif best_value > 0:
                others.append(f"{r.name} {_fmt_loss(value)} ({value / best_value:.2f}x)")
            else:
                others.append(f"{r.name} {_fmt_loss(value)}")
        lines.append(
            f"Best final eval loss: {best} ({_fmt_loss(best_value)}); " + ", ".join(others) + "."
        )
    else:
        lines.append("Every run ended with a non-finite eval loss.")
    by_name = {r.name: r for r in results}
    ours, theirs = by_name.get(GRADFLOW), by_name.get(AIF)
    if ours is None or theirs is None:
        return lines
    measures = (
        ("final loss", float(ours.eval_loss[-1]), float(theirs.eval_loss[-1])),
        (f"mean loss over the last {TAIL_SHARE:.0%}", _tail_mean(ours), _tail_mean(theirs)),
        ("mean loss over the run", _run_mean(ours), _run_mean(theirs)),
    )
    parts, outcomes = [], {"lower": [], "higher": [], "about equal": [], "n/a": []}
    for label, a, b in measures:
        outcome = _compare(a, b)
        parts.append(f"{label} {_fmt_loss(a)} vs {_fmt_loss(b)} ({outcome})")
        outcomes[outcome].append(label)
    lines.append(f"{GRADFLOW} vs {AIF} (lower is better): " + "; ".join(parts) + ".")
    tie = f"within {TIE_FACTOR - 1:.0%}"
    if not outcomes["lower"] and not outcomes["higher"]:
        lines.append(f"So the stabilizer and {AIF} are {tie} of each other on every measure.")
    else:
        summary = [
            f"{verb} on {_and(outcomes[key])}"
            for verb, key in (("wins", "lower"), ("loses", "higher"), (f"is {tie}", "about equal"))
            if outcomes[key]
        ]
        lines.append(f"So, against {AIF}, the stabilizer {'; '.join(summary)}.")
    return lines


def write_plot(
    results: Sequence[RunResult],
    monitor: Monitor,
    path: pathlib.Path,
    *,
    seed: int,
    notes: Sequence[str] = (),
) -> None:
    """Loss curves of the runs (top) and ``optax_gradflow.plot(monitor)`` of the stabilizer."""
    from matplotlib.figure import Figure  # rendered by Agg; no pyplot state is touched

    fig = Figure(figsize=(11, 14), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.1, 2])
    ax_loss = top.subplots()
    colours = {ADAM: "tab:red", AIF: "tab:blue", GRADFLOW: "tab:green"}
    died: dict[int, list[str]] = {}
    for r in results:
        steps = np.arange(1, len(r.eval_loss) + 1)
        ax_loss.plot(steps, r.eval_loss, color=colours[r.name], linewidth=1.2, label=r.name)
        bad = ~np.isfinite(r.eval_loss)
        if bad.any():
            died.setdefault(int(np.argmax(bad)) + 1, []).append(r.name)
    for step, names in died.items():
        ax_loss.axvline(step, color="black", linestyle=":", linewidth=1.2)
        ax_loss.annotate(
            f"{' and '.join(names)}: NaN from here",
            (step, 1.0),
            xycoords=("data", "axes fraction"),
            textcoords="offset points",
            xytext=(4, -14),
            fontsize="small",
        )
    outliers, missing = corrupted_steps(seed, len(results[0].eval_loss))
    rug = {"xycoords": ("data", "axes fraction"), "fontsize": 7, "ha": "center"}
    for k in outliers:
        ax_loss.annotate("|", (k + 1, 0.0), color="tab:gray", **rug)
    for k in missing:
        ax_loss.annotate("|", (k + 1, 0.0), color="black", fontweight="bold", **rug)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel(
        "step  (ticks on the axis: grey, a batch with outlier targets; black, a NaN target)"
    )
    ax_loss.set_ylabel("MSE on clean examples")
    ax_loss.set_title(
        f"Adam, lr {LEARNING_RATE:g}: {OUTLIER_RATE:.0%} of the batches have targets "
        f"x{OUTLIER_FACTOR:g}, {MISSING_RATE:.1%} a NaN target"
    )
    ax_loss.legend(loc="center right", fontsize="small")
    if notes:
        top.suptitle("\n".join(notes), fontsize="small", wrap=True)
    optax_gradflow.plot(monitor, ax=bottom)
    bottom.suptitle(
        f"{GRADFLOW}: the stabilizer over the whole run (optax_gradflow.Monitor, one read "
        f"per {CHUNK} steps)",
        fontsize="medium",
    )
    fig.savefig(path, format="png", dpi=90)


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
