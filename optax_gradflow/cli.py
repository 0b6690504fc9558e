"""The ``optax-gradflow`` command line: argument parsing and command dispatch.

``optax-gradflow demo`` (or ``python -m optax_gradflow demo``) trains one
small Flax model three ways on a data stream with corrupted batches, prints a
comparison table, which run did best and the stabilizer's report, and writes a
PNG. The demo itself lives in :mod:`optax_gradflow._demo` and is imported only
when the command runs.
"""

from __future__ import annotations

import argparse
import os
import pathlib
from collections.abc import Sequence

import optax_gradflow
from optax_gradflow._demo import scenario

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
        description=scenario.DESCRIPTION,
    )
    demo.add_argument(
        "--steps",
        type=_positive_int,
        default=scenario.DEFAULT_STEPS,
        help=f"training steps of each run, a positive integer (default {scenario.DEFAULT_STEPS})",
    )
    demo.add_argument(
        "--seed",
        type=_non_negative_int,
        default=0,
        help="seed of the model initialisation and of the data stream (default 0)",
    )
    demo.add_argument(
        "--output",
        default=scenario.DEFAULT_OUTPUT,
        metavar="PATH",
        help="where to write the PNG plot; its directory must exist "
        f"(default {scenario.DEFAULT_OUTPUT})",
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
        # Imported here: the demo (JAX, Flax, its training loop) loads only when it runs.
        from optax_gradflow._demo.app import demo

        return demo(steps=args.steps, seed=args.seed, output=output, quiet=args.quiet)
    parser.error(f"unknown command {args.command!r}")  # unreachable: argparse checks choices
    return 2
