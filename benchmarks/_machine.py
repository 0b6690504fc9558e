"""The machine and versions a benchmark ran on, for its JSON output.

Shared by ``benchmarks/overhead.py`` and ``benchmarks/stability/run.py``;
both put this folder on ``sys.path`` (a script's own folder is on it
anyway), so it imports as ``from _machine import machine_info``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import pathlib
import platform
import subprocess
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _memory_total() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def git_commit() -> str | None:
    """The commit of the working tree measured, with "+dirty" if the library has local changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "optax_gradflow"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, memory, JAX backend and devices, the versions that matter here."""
    # Imported here: the caller has already put the repository root on sys.path.
    import jax
    import numpy as np
    import optax

    import optax_gradflow

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_bytes": _memory_total(),
        "platform": platform.platform(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": _version("jaxlib"),
            "optax": optax.__version__,
            "flax": _version("flax"),
            "optax_gradflow": optax_gradflow.__version__,
            "numpy": np.__version__,
            "torch": _version("torch"),
            "zclip": _version("zclip"),
            "autoclip": _version("autoclip"),
        },
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
