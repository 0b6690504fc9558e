"""The ``optax-gradflow`` command line.

``optax-gradflow demo`` (or ``python -m optax_gradflow demo``) trains one
small Flax model three ways on a data stream with corrupted batches, prints a
comparison table and the stabilizer's report, and writes a PNG.

The scenario: a 4-layer ReLU MLP (Flax NNX, no normalisation) regresses a
smooth teacher function with Adam at learning rate 3e-3. The data stream is
what a real pipeline sometimes delivers: in 2% of the batches the targets are
off by a factor of 10^4 (a unit error upstream), and 0.2% of the batches
carry a missing target encoded as NaN. The three runs see exactly the same
batches:

* plain ``optax.adam``: each outlier batch kicks every weight by a few times
  the learning rate and inflates Adam's second moment, and the first NaN
  batch turns every parameter into NaN;
* ``optax.clip_by_global_norm(1.0)`` before Adam: the outliers are tamed,
  but a NaN gradient has a NaN norm and passes the clip;
* ``optax_gradflow.stabilized(optax.adam(lr), lr)``: outliers are clipped
  (explosions), NaN steps are skipped with Adam's state left untouched.

The loss plotted and tabulated is the mean squared error on a fixed set of
clean examples, evaluated after every step.
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
from optax_gradflow.events import EventLogger

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

DEFAULT_STEPS = 1000
DEFAULT_OUTPUT = "gradflow_demo.png"
PROGRESS_UPDATES = 25
BAR_WIDTH = 30

RUNS = (
    ("adam", "plain optax.adam"),
    ("adam+clip", f"clip_by_global_norm({CLIP_NORM:g}) + adam"),
    ("adam+gradflow", "optax_gradflow.stabilized(adam)"),
)


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
        description=(
            "Trains a 4-layer ReLU MLP (Flax NNX) with Adam (lr 3e-3) on a regression "
            "stream in which 2%% of the batches have targets off by 1e4 and 0.2%% carry "
            "a NaN target; three runs on the same batches: plain Adam, Adam behind "
            "optax.clip_by_global_norm(1.0), and Adam behind optax_gradflow.stabilized. "
            "Prints a comparison table and the stabilizer's stability report, logs the "
            "stabilizer's events, and writes a PNG of the loss curves and of the "
            "stabilizer's state. Needs flax and matplotlib "
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
        help="no progress bar and no event log lines; the table and report are still printed",
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


class _Progress:
    """A text progress bar on a stream; redrawn in place on a terminal only."""

    def __init__(self, stream: TextIO, label: str, total: int, enabled: bool):
        self.stream = stream
        self.label = label
        self.total = total
        self.enabled = enabled
        self.in_place = enabled and stream.isatty()
        self.done = 0

    def line(self) -> str:
        filled = round(BAR_WIDTH * self.done / self.total)
        percent = 100 * self.done // self.total
        return (
            f"{self.label:<14} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
            f"{percent:3d}% {self.done}/{self.total} steps"
        )

    def advance(self, steps: int) -> None:
        self.done = min(self.total, self.done + steps)
        if self.in_place:
            self.stream.write("\r" + self.line())
            self.stream.flush()

    def clear(self) -> None:
        """Blanks the bar's line so that another line can be written."""
        if self.in_place:
            self.stream.write("\r" + " " * len(self.line()) + "\r")

    def finish(self, note: str) -> None:
        if self.enabled:
            self.stream.write(("\r" if self.in_place else "") + f"{self.line()}  {note}\n")
            self.stream.flush()


class _BarAwareHandler(logging.StreamHandler):
    """Writes log records on their own line, above the progress bar."""

    def __init__(self, stream: TextIO):
        super().__init__(stream)
        self.progress: _Progress | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.progress is not None:
            self.progress.clear()
        super().emit(record)
        if self.progress is not None and self.progress.in_place:
            self.stream.write(self.progress.line())
            self.stream.flush()


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
    if name == "adam":
        return optax.adam(LEARNING_RATE)
    if name == "adam+clip":
        return optax.chain(optax.clip_by_global_norm(CLIP_NORM), optax.adam(LEARNING_RATE))
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
    stabilizer = name == "adam+gradflow"

    def mse(p, x, y):
        return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)

    def train_step(carry, inputs, x_eval, y_eval):
        p, state = carry
        key, active = inputs
        x, y = _batch(key)
        if stabilizer:
            scale = optax_gradflow.loss_scale(state)

            def loss_fn(p):
                loss = mse(p, x, y)
                # The stabilizer divides the gradients by the scale it multiplied in.
                return optax_gradflow.scale_loss(loss, state), loss

            (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
            updates, new_state = tx.update(grads, state, p, value=loss)
        else:
            scale = jnp.float32(1.0)
            grads = jax.grad(mse)(p, x, y)
            updates, new_state = tx.update(grads, state, p)
        new_p = optax.apply_updates(p, updates)
        # Steps past the end of the run (padding of the last chunk) change nothing.
        new_carry = jax.tree.map(
            lambda new, old: jnp.where(active, new, old), (new_p, new_state), carry
        )
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))) / scale
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
    progress: _Progress,
    events: EventLogger | None = None,
) -> RunResult:
    """Trains the MLP with the optimizer ``name``; progress after each chunk of steps."""
    from flax import nnx

    start = time.perf_counter()
    runner = _runner(name)
    _, params = nnx.split(_model_class()(nnx.Rngs(seed)), nnx.Param)
    opt_state = runner.tx.init(params)
    x_eval = jax.random.normal(jax.random.PRNGKey(seed + 10_000), (EVAL_SIZE, INPUT_DIM))
    y_eval = _teacher(x_eval)

    chunk = math.ceil(steps / min(steps, PROGRESS_UPDATES))
    n_chunks = math.ceil(steps / chunk)
    keys = stream_keys(seed, n_chunks * chunk)
    active = np.arange(n_chunks * chunk) < steps
    initial_loss = float(runner.mse(params, x_eval, y_eval))
    carry = (params, opt_state)
    losses, norms = [], []
    if events is not None:
        events(opt_state)  # the baseline the later reads compare with
    for c in range(n_chunks):
        part = slice(c * chunk, (c + 1) * chunk)
        carry, (loss, norm) = runner.run_chunk(carry, keys[part], active[part], x_eval, y_eval)
        losses.append(np.asarray(loss))
        norms.append(np.asarray(norm))
        if events is not None:
            events(carry[1])
        progress.advance(chunk)
    if events is not None:
        events.flush(carry[1])
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


def counts(result: RunResult) -> tuple[str, str, str]:
    """(clipped, explosions, non-finite) steps; "-" where the optimizer has no such notion."""
    finite = np.isfinite(result.grad_norm)
    nonfinite = str(int(np.sum(~finite)))
    if result.name == "adam+gradflow":
        flow = optax_gradflow.find_states(result.opt_state)[0][1]
        return str(int(flow.clip_count)), str(int(flow.explosion_count)), nonfinite
    if result.name == "adam+clip":
        clipped = int(np.sum(finite & (result.grad_norm > CLIP_NORM)))
        return str(clipped), "-", nonfinite
    return "-", "-", nonfinite


def _fmt_loss(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "nan"


def table(results: Sequence[RunResult]) -> str:
    """The comparison table, one row per run."""
    header = (
        f"{'run':<14} {'final loss':>10} {'peak loss':>10} {'clipped':>8} "
        f"{'explosions':>10} {'non-finite':>10}  diverged?"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        clipped, explosions, nonfinite = counts(r)
        peak = float(np.nanmax(r.eval_loss)) if np.isfinite(r.eval_loss).any() else math.nan
        lines.append(
            f"{r.name:<14} {_fmt_loss(float(r.eval_loss[-1])):>10} {_fmt_loss(peak):>10} "
            f"{clipped:>8} {explosions:>10} {nonfinite:>10}  {verdict(r)}"
        )
    return "\n".join(lines)


def write_plot(results: Sequence[RunResult], report: Any, path: pathlib.Path, *, seed: int) -> None:
    """Loss curves of the runs (top) and ``optax_gradflow.plot`` of the stabilizer."""
    from matplotlib.figure import Figure  # rendered by Agg; no pyplot state is touched

    fig = Figure(figsize=(10, 9), layout="constrained")
    ax_loss, ax_norm, ax_scale = fig.subplots(
        3, 1, gridspec_kw={"height_ratios": [3, 3, 1]}
    ).tolist()
    colours = {"adam": "tab:red", "adam+clip": "tab:blue", "adam+gradflow": "tab:green"}
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
    optax_gradflow.plot(report, ax=(ax_norm, ax_scale))
    ax_norm.set_title("adam+gradflow, the stabilizer's state: " + ax_norm.get_title())
    fig.savefig(path, format="png", dpi=100)


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
    with _event_lines(err_stream, enabled=not quiet) as handler:
        for name, description in RUNS:
            progress = _Progress(err_stream, name, steps, enabled=not quiet)
            if handler is not None:
                handler.progress = progress
            events = EventLogger(every=1) if name == "adam+gradflow" and not quiet else None
            result = train(name, steps=steps, seed=seed, progress=progress, events=events)
            if handler is not None:
                handler.progress = None
            progress.finish(f"{result.seconds:.1f} s  ({description})")
            results.append(result)

    print("", file=out)
    print(table(results), file=out)
    report = optax_gradflow.stability_report(results[-1].opt_state)
    print("\nStability report of the stabilized run:", file=out)
    print(report.summary(), file=out)
    try:
        write_plot(results, report, pathlib.Path(output), seed=seed)
    except OSError as err:
        print(f"optax-gradflow demo: cannot write the plot to {output}: {err}", file=sys.stderr)
        return 1
    print(f"\nPlot written to {output} ({time.perf_counter() - began:.1f} s in all).", file=out)
    return 0
