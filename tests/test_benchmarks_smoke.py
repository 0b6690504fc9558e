"""Smoke tests of the benchmark scripts: they run, and write what BENCHMARKS.md quotes.

The scripts run in a subprocess on a tiny budget (60 steps, two seeds: every
method on one unstable task of the stability suite, then a stable task and the
RL task with the stabilizer and the references only; one small size of the
overhead benchmark). Timings are not checked: benchmarks
are never timed tests. The two baselines the stability suite reimplements
from their papers are checked against numbers worked out by hand.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
STABILITY = BENCHMARKS / "stability"
STAT_FIELDS = ("emergency_count", "explosion_count", "clip_count", "nonfinite_count")


def _load(path: pathlib.Path):
    name = f"_bench_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # Registered before running: dataclasses resolve annotations through it.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def baselines():
    return _load(STABILITY / "baselines.py")


@pytest.fixture(scope="module")
def tasks():
    return _load(STABILITY / "tasks.py")


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _stability(tmp: pathlib.Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out_json, out_png = tmp / "stability.json", tmp / "stability.png"
    proc = _run(
        [
            "benchmarks/stability/run.py",
            "--quick",
            "--steps",
            "60",
            "--seeds",
            "2",
            *args,
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
        ],
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert out_png.stat().st_size > 0
    assert "Verdicts" in proc.stdout
    return proc, json.loads(out_json.read_text())


@pytest.fixture(scope="module")
def unstable_run(tmp_path_factory):
    """Every method on one unstable task, with a --stab-config."""
    tmp = tmp_path_factory.mktemp("unstable")
    proc, result = _stability(
        tmp, "--tasks", "heavy_tail", "--stab-config", '{"explosion_factor": 4.0}'
    )
    return proc, result, tmp / "stability.json"


@pytest.fixture(scope="module")
def stable_and_rl_run(tmp_path_factory):
    """A stable task and the RL task, the references and the stabilizer only (compiles cost)."""
    tmp = tmp_path_factory.mktemp("stable_rl")
    return _stability(
        tmp, "--tasks", "mlp_layernorm,rl_auction", "--methods", "stabilizer,stabilizer (data)"
    )[1]


def test_stability_quick_runs_every_method(unstable_run):
    _, result, _ = unstable_run
    assert result["command"].startswith("python benchmarks/stability/run.py --quick")
    assert result["machine"]["versions"]["jax"]
    # The --stab-config fields reach the stabilizer's config.
    assert result["settings"]["stabilizer_config"]["explosion_factor"] == 4.0
    methods = result["results"]["heavy_tail"]["methods"]
    for label in (
        "no clipping",
        "clip 0.1",
        "clip 5",
        "finite+clip 0.1",
        "finite+clip 5",
        "AGC 0.05",
        "ZClip",
        "AutoClip p10",
        "stabilizer",
        "stabilizer (data)",
    ):
        assert label in methods
        assert methods[label]["seeds"] == 2
        assert len(methods[label]["final_loss_per_seed"]) == 2
        assert len(result["curves"]["heavy_tail"][label]) == 60
    # The stabilizer's counters, per seed, for the methods that hold one only.
    for label in ("stabilizer", "stabilizer (data)"):
        stats = methods[label]["stabilizer_stats"]
        assert set(stats) == set(STAT_FIELDS)
        assert all(len(v) == 2 and min(v) >= 0 for v in stats.values())
        assert max(stats["clip_count"]) <= 60
    assert "stabilizer_stats" not in methods["no clipping"]
    assert "stabilizer_stats" not in methods["finite+clip 1"]

    comparison = result["comparison"]
    assert comparison["unstable_tasks"] == ["heavy_tail"]
    best = comparison["best_fixed"]["heavy_tail"]
    assert best["label"].startswith("clip ")
    assert best["good_bar"] == pytest.approx(1.10 * best["final"])
    for mode in ("stabilizer", "stabilizer (data)"):
        targets = result["targets"][mode]
        verdicts = {v["key"]: v for v in targets["verdicts"]}
        assert set(verdicts) == {
            "divergences",
            "geomean_ratio",
            "max_ratio",
            "good_runs",
            "stable_ratio",
            "rl_emergencies_per_copy",
        }
        assert targets["divergences"]["runs"] == 2
        assert verdicts["divergences"]["met"] == (targets["divergences"]["diverged"] == 0)
        ratio = targets["ratio_to_best_fixed"]["heavy_tail"]
        assert verdicts["geomean_ratio"]["figure"] == pytest.approx(ratio)
        assert verdicts["max_ratio"]["met"] == (ratio <= 1.20)
        good = comparison["good_runs"]
        assert 0 <= good[mode]["total"] <= good[mode]["runs"] == 2
        rivals = [good[r]["total"] for r in ("AutoClip p10", "ZClip", "AGC 0.05")]
        assert verdicts["good_runs"]["met"] == all(good[mode]["total"] > r for r in rivals)
        # No stable task and no RL task in this run.
        assert verdicts["stable_ratio"]["met"] is None
        assert verdicts["rl_emergencies_per_copy"]["met"] is None


def test_stability_quick_covers_the_stable_and_rl_tasks(stable_and_rl_run):
    result = stable_and_rl_run
    tasks = result["results"]
    assert tasks["mlp_layernorm"]["stable"] is True
    assert tasks["rl_auction"]["stable"] is False
    assert all(
        math.isfinite(x)
        for x in tasks["mlp_layernorm"]["methods"]["no clipping"]["final_loss_per_seed"]
    )
    # The RL task: a target copy every quarter of the run, three copies that matter.
    rl = tasks["rl_auction"]
    assert rl["target_period"] == 15
    assert rl["target_copies"] == 3
    per_copy = rl["methods"]["stabilizer"]["emergencies_per_copy"]
    emergencies = rl["methods"]["stabilizer"]["stabilizer_stats"]["emergency_count"]
    assert per_copy == pytest.approx([e / 3 for e in emergencies])
    assert all(math.isfinite(x) for x in rl["methods"]["no clipping"]["final_loss_per_seed"])
    # The RL task's TD loss does not rank methods: no loss comparison in this run.
    assert result["comparison"]["unstable_tasks"] == []
    assert "rl_auction" in result["comparison"]["skipped_tasks"]

    for mode in ("stabilizer", "stabilizer (data)"):
        targets = result["targets"][mode]
        verdicts = {v["key"]: v for v in targets["verdicts"]}
        assert targets["divergences"]["runs"] == 4
        ratio = targets["stable_ratio_to_no_clipping"]["mlp_layernorm"]
        assert verdicts["stable_ratio"]["figure"] == pytest.approx(ratio)
        assert verdicts["stable_ratio"]["met"] == (ratio <= 1.01)
        rl_target = targets["emergencies_per_copy"]["rl_auction"]
        assert rl_target["copies"] == 3
        assert verdicts["rl_emergencies_per_copy"]["figure"] == pytest.approx(rl_target["max"])
        assert verdicts["rl_emergencies_per_copy"]["met"] == (rl_target["max"] <= 1.0)
        for key in ("geomean_ratio", "max_ratio", "good_runs"):
            assert verdicts[key]["met"] is None


def test_stability_from_json_rederives_tables(unstable_run, tmp_path):
    _, _, out_json = unstable_run
    copy, png = tmp_path / "copy.json", tmp_path / "again.png"
    shutil.copy(out_json, copy)
    proc = _run(
        ["benchmarks/stability/run.py", "--from-json", "--json", str(copy), "--plot", str(png)],
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    before, after = json.loads(out_json.read_text()), json.loads(copy.read_text())
    assert after["targets"] == before["targets"]
    assert after["comparison"] == before["comparison"]
    assert png.stat().st_size > 0
    assert "Verdicts" in proc.stdout


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
    # The whole train step and the eager calls, each against its reference.
    steps = {r["variant"]: r for r in result["train_step"]}
    assert steps["clip_by_global_norm + adam"]["ratio"] == pytest.approx(1.0, abs=1e-12)
    assert {"chain(stabilize, adam)", "stabilized(adam)"} <= set(steps)
    # 256 * 128 + 128 + 128 * 128 + 128 + 128 + 1 parameters in the quick MLP.
    assert steps["stabilized(adam)"]["size"] == 256 * 128 + 128 * 128 + 128 + 128 + 128 + 1
    eager = {(r["reference"], r["variant"]): r for r in result["eager"]}
    assert eager[("clip_by_global_norm", "clip_by_global_norm")]["ratio"] == pytest.approx(1.0)
    assert ("clip_by_global_norm", "stabilize") in eager


def test_stabilizer_config_from_the_command_line(baselines, tasks):
    import optax_gradflow

    default = optax_gradflow.StabilizerConfig()
    assert baselines.parse_stab_config(None) == default
    cfg = baselines.parse_stab_config('{"explosion_factor": 4.0}')
    assert cfg == optax_gradflow.StabilizerConfig(explosion_factor=4.0)
    with pytest.raises(ValueError):
        baselines.parse_stab_config("[1, 2]")
    with pytest.raises(TypeError):
        baselines.parse_stab_config('{"no_such_field": 1}')
    # Only the fp16 task turns loss scaling on for the stabilizer methods.
    plain = optax_gradflow.StabilizerConfig(loss_scaling=False)
    assert baselines.config_for(tasks.TASKS["fp16"](), plain).loss_scaling is True
    assert baselines.config_for(tasks.TASKS["heavy_tail"](), plain) is plain


def test_task_registry(tasks):
    stable = {name for name, make in tasks.TASKS.items() if make().stable}
    assert stable == {"transformer_preln", "mlp_layernorm"}
    rl = tasks.TASKS["rl_auction"]()
    assert rl.target_period(4000) == 1000
    assert rl.batch is None and rl.collect is not None and rl.after_update is not None


def test_autoclip_clips_to_the_percentile_of_all_norms_seen(baselines):
    # p = 50 over the history {1, 3} (the current norm included) is 2: a
    # gradient of norm 3 comes out with norm 2.
    tx = baselines.autoclip(50.0, max_history=8)
    state = tx.init({"w": jnp.zeros(2)})
    _, state = tx.update({"w": jnp.array([1.0, 0.0])}, state)
    out, state = tx.update({"w": jnp.array([0.0, 3.0])}, state)
    np.testing.assert_allclose(out["w"], [0.0, 2.0], rtol=1e-6)
    assert int(state.count) == 2


def test_zclip_leaves_warmup_alone_then_clips_a_spike(baselines):
    # Warm-up norms 1 and 3: mean 2, variance 1. The third norm, 12, has
    # z = (12 - 2) / 1 = 10 > 2.5 and is clipped to 2 + 2.5**2 / 10 * 1 = 2.625.
    tx = baselines.zclip(alpha=0.5, z_threshold=2.5, warmup_steps=2, eps=0.0)
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
