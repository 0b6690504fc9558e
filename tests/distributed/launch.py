"""Starting helper scripts in subprocesses, each wait bounded, never leaving one behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        XLA_PYTHON_CLIENT_PREALLOCATE="false",
        CUDA_VISIBLE_DEVICES="",
    )
    env.update(extra)
    return env


def run_together(argvs: list[list[str]], *, env: dict[str, str], timeout: float) -> list[dict]:
    """Runs the scripts at once; returns the JSON each printed last.

    Every process is killed when the time is up or one of them fails, so a
    process left waiting for a dead peer cannot hang the test run.
    """
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / argv[0]), *argv[1:]],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in argvs
    ]
    deadline = time.monotonic() + timeout
    outputs: list[tuple[str, str]] = []
    try:
        for proc in procs:
            try:
                outputs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 1.0)))
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"{argvs[len(outputs)]} did not finish within {timeout} s"
                ) from None
            if proc.returncode != 0:
                out, err = outputs[-1]
                raise AssertionError(
                    f"{argvs[len(outputs) - 1]} exited with {proc.returncode}:\n"
                    f"{out[-2000:]}\n{err[-4000:]}"
                )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
