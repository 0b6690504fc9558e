"""Smoke tests of the benchmark scripts: they run, and write what BENCHMARKS.md quotes.

The scripts run in a subprocess on a tiny budget (one task, a few steps, two
seeds; one small size). Timings are not checked: benchmarks are never timed
tests. The two baselines the stability suite reimplements from their papers
are checked against numbers worked out by hand.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # Registered before running: dataclasses resolve annotations through it.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stability():
    return _load("stability")


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_stability_quick_runs_and_writes_json_and_plot(tmp_path):
    out_json, out_png = tmp_path / "stability.json", tmp_path / "stability.png"
    proc = _run(
        [
            "benchmarks/stability.py",
            "--quick",
            "--tasks",
            "heavy_tail",
            "--steps",
            "60",
            "--seeds",
            "2",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
        ],
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out_json.read_text())
    methods = result["results"]["heavy_tail"]["methods"]
    for label in ("no clipping", "clip 0.1", "clip 5", "ZClip", "AutoClip p10", "stabilizer"):
        assert label in methods
        assert methods[label]["seeds"] == 2
        assert len(result["curves"]["heavy_tail"][label]) == 60
    (target,) = result["targets"]
    assert target["task"] == "heavy_tail"
    assert isinstance(target["no_divergence_met"], bool)
    assert out_png.stat().st_size > 0
    assert "Targets" in proc.stdout


def test_overhead_quick_runs_and_writes_json(tmp_path):
    out_json = tmp_path / "overhead.json"
    proc = _run(
        [
            "benchmarks/overhead.py",
            "--quick",
            "--sizes",
            "4e4",
            "--no-torch",
            "--json",
            str(out_json),
        ],
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out_json.read_text())
    rows = {(r["group"], r["variant"]): r for r in result["jax"]}
    assert rows[("alone", "clip_by_global_norm")]["ratio"] == pytest.approx(1.0, abs=1e-12)
    assert rows[("alone", "floor")]["ratio_to_floor"] == pytest.approx(1.0, abs=1e-12)
    # The stabilizer's state does not grow with the model; Adam's is two copies of it.
    assert rows[("alone", "stabilize")]["state_bytes"] < 10_000
    assert rows[("chained", "no clipping + adam")]["state_bytes"] >= 2 * 4 * 40_000
    assert result["machine"]["versions"]["jax"]


def test_autoclip_clips_to_the_percentile_of_all_norms_seen(stability):
    # p = 50 over the history {1, 3} (the current norm included) is 2: a
    # gradient of norm 3 comes out with norm 2.
    tx = stability.autoclip(50.0, max_history=8)
    state = tx.init({"w": jnp.zeros(2)})
    _, state = tx.update({"w": jnp.array([1.0, 0.0])}, state)
    out, state = tx.update({"w": jnp.array([0.0, 3.0])}, state)
    np.testing.assert_allclose(out["w"], [0.0, 2.0], rtol=1e-6)
    assert int(state.count) == 2


def test_zclip_leaves_warmup_alone_then_clips_a_spike(stability):
    # Warm-up norms 1 and 3: mean 2, variance 1. The third norm, 12, has
    # z = (12 - 2) / 1 = 10 > 2.5 and is clipped to 2 + 2.5**2 / 10 * 1 = 2.625.
    tx = stability.zclip(alpha=0.5, z_threshold=2.5, warmup_steps=2, eps=0.0)
    state = tx.init({"w": jnp.zeros(1)})
    out, state = tx.update({"w": jnp.array([1.0])}, state)
    np.testing.assert_allclose(out["w"], [1.0], rtol=1e-6)
    out, state = tx.update({"w": jnp.array([3.0])}, state)
    np.testing.assert_allclose(out["w"], [3.0], rtol=1e-6)
    np.testing.assert_allclose([state.mean, state.var], [2.0, 1.0], rtol=1e-6)
    out, state = tx.update({"w": jnp.array([12.0])}, state)
    np.testing.assert_allclose(out["w"], [2.625], rtol=1e-6)
    # The EMA moves with the clipped norm: 0.5 * 2 + 0.5 * 2.625.
    np.testing.assert_allclose(state.mean, 2.3125, rtol=1e-6)
