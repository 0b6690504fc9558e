"""Does the stabilizer keep unstable training runs alive, untuned, and leave stable ones alone?

The driver of the stability suite: the tasks are in ``tasks.py`` (five
unstable on purpose, two stable ones trained the standard way, and a DQN
bidder with hard target-network copies), the methods in ``baselines.py`` (no
clipping, fixed clips alone and inside ``optax.apply_if_finite``, AGC, ZClip,
AutoClip, loss scaling on fp16, the stabilizer with a learning rate and in
data mode). Each task runs over several seeds with every method.

Everything is generated from fixed seeds. One run of a method is ``jax.jit``
of a ``lax.scan`` over the steps, mapped with ``lax.map`` over the seeds (and
the thresholds of the fixed clips), so each method compiles once per task.

Metrics per run: diverged (a non-finite loss, or a final loss above 10x the
initial one), final loss (mean of the last 10% of steps; the tables quote the
median over seeds), spikes (steps whose loss exceeds 3x the median of the
previous 50 steps) and, for the methods with a stabilizer in their state, its
final emergency / explosion / clip / non-finite counts.

Targets, for each stabilizer mode (learning rate given; nothing given):
no divergence on any task and seed; on the unstable tasks with a finite best
fixed clip (in hindsight), a geometric mean of final-loss ratios to it of at
most 1.05 and no task above 1.20; more "good runs" (final loss within 1.10x
the best fixed clip's median) than AutoClip, ZClip and AGC; on the stable
tasks, a final loss within 1% of no clipping; on the RL task, at most one
emergency per target copy. The RL task's TD loss does not rank methods (a
method that learns more slowly moves its targets less): it is left out of the
loss ratios and the good runs.

Usage (from the repository root)::

    python benchmarks/stability/run.py                  # the full suite
    python benchmarks/stability/run.py --quick          # 10% of the steps, 2 seeds, 4 tasks
    python benchmarks/stability/run.py --rules          # also compare adaptation rules
    python benchmarks/stability/run.py --stab-config '{"track_k": 2.0}'  # a variant
    python benchmarks/stability/run.py --trace deep_mlp # the stabilizer's state along one run
    python benchmarks/stability/run.py --from-json      # re-derive tables and plot, no training
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# The library (not installed), benchmarks/_machine.py, and the sibling modules.
for _path in (ROOT, ROOT / "benchmarks", HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from _machine import machine_info  # noqa: E402
from baselines import (  # noqa: E402
    AGC_CLIPPING,
    APPLY_IF_FINITE_MAX_ERRORS,
    FIXED_THRESHOLDS,
    Method,
    base_methods,
    config_for,
    grad_scaler_state,
    parse_stab_config,
    rule_methods,
)
from tasks import TASKS, Task  # noqa: E402

import optax_gradflow  # noqa: E402
from optax_gradflow.state import to_flat  # noqa: E402

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "stability.json"
DEFAULT_PLOT = ROOT / "benchmarks" / "results" / "stability.png"
COMMAND = "python benchmarks/stability/run.py"

DIVERGENCE_FACTOR = 10.0
SPIKE_FACTOR = 3.0
SPIKE_WINDOW = 50
SEEDS = 5  # seeds of the full suite
QUICK_SEEDS = 2

# Targets.
MODES = ("stabilizer", "stabilizer (data)")
TARGET_GEOMEAN = 1.05  # geometric mean of final loss / best fixed clip's, unstable tasks
TARGET_MAX_RATIO = 1.20  # no unstable task above this
GOOD_RUN_FACTOR = 1.10  # a good run: final loss <= 1.10 x the best fixed clip's median
TARGET_STABLE_RATIO = 1.01  # stable tasks: final loss / no clipping's
TARGET_EMERGENCIES_PER_COPY = 1.0  # RL task
# Methods whose good runs the stabilizer must beat; and those compared by geomean.
GOOD_RUN_RIVALS = ("AutoClip p10", "ZClip", f"AGC {AGC_CLIPPING:g}")
COMPARED = (*GOOD_RUN_RIVALS, *(f"finite+clip {c:g}" for c in FIXED_THRESHOLDS))

# The stabilizer's counters returned per run (of the first stabilizer state).
STAT_FIELDS = ("emergency_count", "explosion_count", "clip_count", "nonfinite_count")
# The key of a task's carried state: folded into each seed's data key.
STATE_KEY = 0x7FFFFFFF


# ----------------------------------------------------------------------------
# Training.


def scaled_loss(loss: jax.Array, opt_state) -> jax.Array:
    """The loss to differentiate: multiplied by the optimizer's loss scale, if it has one.

    The stabilizer (and the GradScaler baseline) divide the gradients by their
    loss scale. Decided at trace time; the other methods get the loss itself.
    """
    if optax_gradflow.find_states(opt_state):
        return optax_gradflow.scale_loss(loss, opt_state)
    scaler = grad_scaler_state(opt_state)
    if scaler is not None:
        return loss * scaler.scale.astype(loss.dtype)
    return loss


def make_train_step(
    task: Task,
    opt: optax.GradientTransformationExtraArgs,
    steps: int,
    data_key: jax.Array,
    record: Callable[[Any], Any] | None = None,
):
    """``(init(params) -> carry, train_step(carry, step) -> (carry, out))`` for ``lax.scan``.

    The carry is ``(params, opt_state, task_state)``; ``out`` is the reported
    loss, or ``(loss, record(opt_state))``. A task with ``collect`` draws its
    batch from its carried state, and ``after_update`` runs after each update.
    """

    def init(params):
        opt_state = opt.init(params)
        task_state = ()
        if task.init_state is not None:
            task_state = task.init_state(params, jax.random.fold_in(data_key, STATE_KEY))
        return params, opt_state, task_state

    def train_step(carry, step):
        params, opt_state, task_state = carry
        key = jax.random.fold_in(data_key, step)
        if task.collect is None:
            batch = task.batch(key)
        else:
            task_state, batch = task.collect(task_state, params, key, step, steps)

        def objective(p):
            loss, report = task.loss(p, batch)
            return scaled_loss(loss, opt_state), report

        grads, report = jax.grad(objective, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params, value=report)
        params = optax.apply_updates(params, updates)
        if task.after_update is not None:
            task_state = task.after_update(task_state, params, step, steps)
        out = report if record is None else (report, record(opt_state))
        return (params, opt_state, task_state), out

    return init, train_step


def stabilizer_stats(opt_state) -> jax.Array | None:
    """``STAT_FIELDS`` of the first stabilizer state in ``opt_state`` (int32[4]), or None."""
    found = optax_gradflow.find_states(opt_state)
    if not found:
        return None
    flow = found[0][1]
    return jnp.stack([getattr(flow, f).astype(jnp.int32) for f in STAT_FIELDS])


def make_runner(task: Task, method: Method, steps: int):
    """``(run, has_stats)``: ``run`` a jitted ``(params [S], data keys [S], hparams [K])
    -> (losses [K, S, steps], stats [K, S, 4])``.

    ``params`` are the initial parameters of the S seeds, stacked; every
    (hparam, seed) pair runs one after another. ``has_stats()`` says, once
    traced, whether the optimizer holds a stabilizer (else the stats are 0).
    """
    traced: dict[str, bool] = {}

    def run_one(params, data_key, hparam):
        opt = optax.with_extra_args_support(method.make(task, hparam, steps))
        init, train_step = make_train_step(task, opt, steps, data_key)
        (_, opt_state, _), losses = jax.lax.scan(train_step, init(params), jnp.arange(steps))
        stats = stabilizer_stats(opt_state)
        traced["has_stats"] = stats is not None
        return losses, jnp.zeros(len(STAT_FIELDS), jnp.int32) if stats is None else stats

    def run_all(params, data_keys, hparams):
        # lax.map, not vmap: under vmap the stabilizer's lax.cond branches
        # would both run every step (a batched predicate becomes a select).
        k, s = hparams.shape[0], data_keys.shape[0]
        grid = (
            jax.tree.map(lambda x: jnp.tile(x, (k,) + (1,) * (x.ndim - 1)), params),
            jnp.tile(data_keys, (k, 1)),
            jnp.repeat(hparams, s),
        )
        losses, stats = jax.lax.map(lambda a: run_one(*a), grid)
        return losses.reshape(k, s, steps), stats.reshape(k, s, len(STAT_FIELDS))

    return jax.jit(run_all), lambda: traced.get("has_stats", False)


def suite_keys(seeds: int) -> tuple[jax.Array, jax.Array]:
    """(init keys [seeds], data keys [seeds]): the seeds of a suite of ``seeds`` seeds."""
    init_keys, data_keys = jnp.split(jax.random.split(jax.random.PRNGKey(0), 2 * seeds), 2)
    return init_keys, data_keys


def target_copies(task_result: dict[str, Any]) -> int:
    """Target-network copies after which a run goes on (0 for a task without a target)."""
    period = task_result.get("target_period")
    if not period:
        return 0
    return (task_result["steps"] - 1) // period


# ----------------------------------------------------------------------------
# Metrics.


def run_metrics(losses: np.ndarray) -> dict[str, Any]:
    """Metrics of one method on one task; ``losses`` is [seeds, steps]."""
    seeds, steps = losses.shape
    tail = max(1, steps // 10)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        initial = np.nanmean(np.where(np.isfinite(losses[:, :5]), losses[:, :5], np.nan), axis=1)
    finite_run = np.all(np.isfinite(losses), axis=1)
    final = np.mean(losses[:, -tail:], axis=1)
    final = np.where(np.isfinite(final), final, np.inf)
    diverged = ~finite_run | (final > DIVERGENCE_FACTOR * initial)
    # Spikes: loss above SPIKE_FACTOR x the median of the previous SPIKE_WINDOW steps.
    spikes = np.zeros(seeds, dtype=int)
    if steps > SPIKE_WINDOW:
        windows = np.lib.stride_tricks.sliding_window_view(losses, SPIKE_WINDOW, axis=1)
        with np.errstate(invalid="ignore"):
            ref = np.median(windows[:, :-1], axis=-1)
            cur = losses[:, SPIKE_WINDOW:]
            spikes = np.sum(np.isfinite(cur) & (cur > SPIKE_FACTOR * ref), axis=1)
    return {
        "diverged": int(np.sum(diverged)),
        "seeds": seeds,
        "final_loss_median": float(np.median(final)),
        "final_loss_per_seed": [float(x) for x in final],
        "initial_loss_median": float(np.nanmedian(initial))
        if np.any(np.isfinite(initial))
        else None,
        "spikes_mean": float(np.mean(spikes)),
        "spikes_per_seed": [int(x) for x in spikes],
    }


def stats_metrics(stats: np.ndarray, copies: int) -> dict[str, Any]:
    """The stabilizer's counters per seed (``stats`` is [seeds, 4]); per target copy if any."""
    out: dict[str, Any] = {
        "stabilizer_stats": {f: [int(x) for x in stats[:, i]] for i, f in enumerate(STAT_FIELDS)}
    }
    if copies:
        emergencies = stats[:, STAT_FIELDS.index("emergency_count")]
        out["emergencies_per_copy"] = [float(x) / copies for x in emergencies]
    return out


def _median_curve(losses: np.ndarray, smooth: int) -> np.ndarray:
    clean = np.where(np.isfinite(losses), losses, np.nan)
    with warnings.catch_warnings():
        # Steps where every seed is non-finite stay NaN (a gap in the plot).
        warnings.simplefilter("ignore", RuntimeWarning)
        curve = np.nanmedian(clean, axis=0)
    if smooth > 1 and curve.size >= smooth:
        kernel = np.ones(smooth) / smooth
        padded = np.concatenate([np.full(smooth - 1, curve[0]), curve])
        curve = np.convolve(padded, kernel, mode="valid")
    return curve


# ----------------------------------------------------------------------------
# Suite.


def run_suite(
    task_names: Sequence[str],
    methods: Sequence[Method],
    seeds: int,
    quick: bool,
    steps_override: int | None = None,
    config: optax_gradflow.StabilizerConfig | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    config = optax_gradflow.StabilizerConfig() if config is None else config
    results: dict[str, Any] = {}
    for task_name in task_names:
        task = TASKS[task_name]()
        steps = steps_override or (task.quick_steps if quick else task.steps)
        init_keys, data_keys = suite_keys(seeds)
        # Initial parameters, once per seed, shared by every method.
        params = jax.jit(jax.vmap(task.init))(init_keys)
        cfg = config_for(task, config)
        lr_threshold = min(
            max(cfg.lr_threshold_scale * math.sqrt(1.0 / task.learning_rate), cfg.min_threshold),
            cfg.max_threshold,
        )
        task_result: dict[str, Any] = {
            "description": task.description,
            "base_optimizer": task.base_name,
            "learning_rate": task.learning_rate,
            "steps": steps,
            "seeds": seeds,
            "stable": task.stable,
            "compare_losses": task.compare_losses,
            "stabilizer_loss_scaling": cfg.loss_scaling,
            "target_period": task.target_period(steps) if task.target_period else None,
            "stabilizer_initial_threshold": float(lr_threshold),
            "methods": {},
            "curves": {},
        }
        copies = target_copies(task_result)
        task_result["target_copies"] = copies
        for method in methods:
            if method.tasks is not None and task_name not in method.tasks:
                continue
            if method.alias_of is not None:
                continue
            hparams = method.hparams or (0.0,)
            labels = method.labels or (method.name,)
            runner, has_stats = make_runner(task, method, steps)
            t0 = time.perf_counter()
            h = jnp.asarray(hparams, jnp.float32)
            compiled = runner.lower(params, data_keys, h).compile()
            t1 = time.perf_counter()
            losses, stats = jax.block_until_ready(compiled(params, data_keys, h))
            losses, stats = np.asarray(losses), np.asarray(stats)
            t2 = time.perf_counter()
            for i, label in enumerate(labels):
                m = run_metrics(losses[i])
                if has_stats():
                    m.update(stats_metrics(stats[i], copies))
                m.update(
                    kind=method.kind,
                    compile_s=(t1 - t0) / len(labels),
                    run_s=(t2 - t1) / len(labels),
                )
                task_result["methods"][label] = m
                task_result["curves"][label] = _median_curve(losses[i], max(1, steps // 100))
                extra = ""
                if "stabilizer_stats" in m:
                    st = m["stabilizer_stats"]
                    extra = "  em/ex/clip/nf " + "/".join(
                        str(int(np.median(st[f]))) for f in STAT_FIELDS
                    )
                log(
                    f"[{task_name}] {label:<24s} diverged {m['diverged']}/{seeds}  "
                    f"final {m['final_loss_median']:.4g}  spikes {m['spikes_mean']:.1f}{extra}  "
                    f"({t1 - t0:.1f}s compile, {t2 - t1:.1f}s run)"
                )
        results[task_name] = task_result
    add_aliases(results, methods)
    return results


def add_aliases(results: dict[str, Any], methods: Sequence[Method]) -> None:
    """Rows that are runs of another label (a rule whose config is the stabilizer's)."""
    for tr in results.values():
        for method in methods:
            if method.alias_of is None or method.alias_of not in tr["methods"]:
                continue
            tr["methods"][method.name] = dict(tr["methods"][method.alias_of], kind=method.kind)
            tr["curves"][method.name] = tr["curves"][method.alias_of]


# ----------------------------------------------------------------------------
# Targets.


def _best_fixed(task_result: dict[str, Any]) -> tuple[str, float]:
    """The plain fixed clip with the lowest median final loss (in hindsight)."""
    fixed = {
        label: m["final_loss_median"]
        for label, m in task_result["methods"].items()
        if label.startswith("clip ")
    }
    if not fixed:
        return "-", math.inf
    label = min(fixed, key=lambda k: fixed[k])
    return label, fixed[label]


def _geomean(values: Sequence[float]) -> float | None:
    if not values:
        return None
    if any(not math.isfinite(v) for v in values):
        return math.inf
    return float(np.exp(np.mean(np.log(values))))


def _ratio(num: float, den: float) -> float:
    if not math.isfinite(num):
        return math.inf
    return num / den if den > 0 else math.inf


def loss_comparison(results: dict[str, Any]) -> dict[str, Any]:
    """Final-loss ratios to the best fixed clip and good runs, per method, on the unstable tasks.

    The unstable tasks counted: not ``stable``, ``compare_losses``, and a
    best fixed clip with a finite median final loss. A good run: a seed whose
    final loss is at most ``GOOD_RUN_FACTOR`` x that median.
    """
    tasks, best, skipped = [], {}, {}
    for name, tr in results.items():
        if tr.get("stable", False):
            continue
        if not tr.get("compare_losses", True):
            skipped[name] = "its loss does not rank methods"
            continue
        label, final = _best_fixed(tr)
        if not (math.isfinite(final) and final > 0):
            skipped[name] = "every fixed clip diverged"
            continue
        tasks.append(name)
        best[name] = {"label": label, "final": final, "good_bar": GOOD_RUN_FACTOR * final}
    methods: list[str] = []
    for name in tasks:
        methods += [m for m in results[name]["methods"] if m not in methods]
    ratios: dict[str, dict[str, float]] = {}
    good: dict[str, dict[str, Any]] = {}
    for method in methods:
        per_task = {
            name: _ratio(results[name]["methods"][method]["final_loss_median"], best[name]["final"])
            for name in tasks
            if method in results[name]["methods"]
        }
        counts = {
            name: int(
                sum(
                    x <= best[name]["good_bar"]
                    for x in results[name]["methods"][method]["final_loss_per_seed"]
                )
            )
            for name in tasks
            if method in results[name]["methods"]
        }
        ratios[method] = per_task
        good[method] = {
            "total": sum(counts.values()),
            "runs": sum(results[n]["methods"][method]["seeds"] for n in counts),
            "per_task": counts,
        }
    return {
        "unstable_tasks": tasks,
        "skipped_tasks": skipped,
        "best_fixed": best,
        "ratio_to_best_fixed": ratios,
        "geomean_ratio_to_best_fixed": {
            m: _geomean(list(r.values())) if len(r) == len(tasks) else None
            for m, r in ratios.items()
        },
        "good_runs": good,
    }


def _verdict(key: str, name: str, goal: str, figure: float | None, met: bool | None, text: str):
    return {"key": key, "target": name, "goal": goal, "figure": figure, "met": met, "text": text}


def evaluate_targets(results: dict[str, Any], comparison: dict[str, Any]) -> dict[str, Any]:
    """Every target, for each stabilizer mode in ``MODES`` that ran."""
    out: dict[str, Any] = {}
    for mode in MODES:
        if not any(mode in tr["methods"] for tr in results.values()):
            continue
        verdicts = []
        # 1. No divergence, over all tasks and seeds.
        ran = {n: tr["methods"][mode] for n, tr in results.items() if mode in tr["methods"]}
        per_task = {n: m["diverged"] for n, m in ran.items()}
        runs = sum(m["seeds"] for m in ran.values())
        diverged = sum(per_task.values())
        verdicts.append(
            _verdict(
                "divergences",
                "divergences, all tasks and seeds",
                "0",
                diverged,
                diverged == 0,
                f"{diverged} of {runs} runs",
            )
        )
        # 2. Final loss against the best fixed clip, unstable tasks.
        tasks = comparison["unstable_tasks"]
        ratios = comparison["ratio_to_best_fixed"].get(mode, {})
        geomean = comparison["geomean_ratio_to_best_fixed"].get(mode)
        worst_task = max(ratios, key=lambda n: ratios[n]) if ratios else None
        worst = ratios[worst_task] if worst_task else None
        none_text = "n/a (no unstable task with a finite best fixed clip)"
        verdicts.append(
            _verdict(
                "geomean_ratio",
                "geomean final loss / best fixed clip, unstable tasks",
                f"<= {TARGET_GEOMEAN:g}",
                geomean,
                None if geomean is None else geomean <= TARGET_GEOMEAN,
                none_text if geomean is None else f"{geomean:.3f} over {len(tasks)} tasks",
            )
        )
        verdicts.append(
            _verdict(
                "max_ratio",
                "max final loss / best fixed clip, unstable tasks",
                f"<= {TARGET_MAX_RATIO:g}",
                worst,
                None if worst is None else worst <= TARGET_MAX_RATIO,
                none_text if worst is None else f"{worst:.3f} ({worst_task})",
            )
        )
        # 3. Good runs, against each rival.
        good = comparison["good_runs"]
        if tasks and mode in good:
            ours = good[mode]["total"]
            rivals = {r: good[r]["total"] for r in GOOD_RUN_RIVALS if r in good}
            met = all(ours > v for v in rivals.values()) if rivals else None
            text = f"{ours} of {good[mode]['runs']}; " + ", ".join(
                f"{r} {v}" for r, v in rivals.items()
            )
        else:
            ours, met, text = None, None, none_text
        verdicts.append(
            _verdict(
                "good_runs",
                f"good runs (final <= {GOOD_RUN_FACTOR:g} x best fixed median), unstable tasks",
                "more than each of " + ", ".join(GOOD_RUN_RIVALS),
                ours,
                met,
                text,
            )
        )
        # 4. Stable tasks: no harm against no clipping.
        stable = {
            n: _ratio(
                tr["methods"][mode]["final_loss_median"],
                tr["methods"]["no clipping"]["final_loss_median"],
            )
            for n, tr in results.items()
            if tr.get("stable", False) and mode in tr["methods"] and "no clipping" in tr["methods"]
        }
        worst_stable = max(stable, key=lambda n: stable[n]) if stable else None
        figure = stable[worst_stable] if worst_stable else None
        verdicts.append(
            _verdict(
                "stable_ratio",
                "stable tasks: final loss / no clipping (max over tasks)",
                f"<= {TARGET_STABLE_RATIO:g}",
                figure,
                None if figure is None else figure <= TARGET_STABLE_RATIO,
                "n/a (no stable task)" if figure is None else f"{figure:.4f} ({worst_stable})",
            )
        )
        # 5. RL: emergencies per target copy (the worst seed).
        rl = {}
        for n, m in ran.items():
            per_seed = m.get("emergencies_per_copy")
            if per_seed:
                rl[n] = {
                    "median": float(np.median(per_seed)),
                    "max": float(max(per_seed)),
                    "per_seed": per_seed,
                    "copies": results[n]["target_copies"],
                }
        figure = max((v["max"] for v in rl.values()), default=None)
        verdicts.append(
            _verdict(
                "rl_emergencies_per_copy",
                "RL: emergencies per target copy (worst seed)",
                f"<= {TARGET_EMERGENCIES_PER_COPY:g}",
                figure,
                None if figure is None else figure <= TARGET_EMERGENCIES_PER_COPY,
                "n/a (no RL task with target copies)"
                if figure is None
                else "; ".join(
                    f"{n}: median {v['median']:.2f}, max {v['max']:.2f} over {v['copies']} copies"
                    for n, v in rl.items()
                ),
            )
        )
        out[mode] = {
            "divergences": {"diverged": diverged, "runs": runs, "per_task": per_task},
            "ratio_to_best_fixed": ratios,
            "geomean_ratio_to_best_fixed": geomean,
            "max_ratio_to_best_fixed": worst,
            "stable_ratio_to_no_clipping": stable,
            "emergencies_per_copy": rl,
            "verdicts": verdicts,
        }
    return out


def rank_methods(results: dict[str, Any], kinds: Sequence[str]) -> list[dict[str, Any]]:
    """Mean rank (1 = lowest median final loss) of the methods of ``kinds`` across tasks."""
    names: list[str] = []
    for tr in results.values():
        for label, m in tr["methods"].items():
            if m["kind"] in kinds and label not in names:
                names.append(label)
    ranks: dict[str, list[float]] = {n: [] for n in names}
    diverged: dict[str, int] = dict.fromkeys(names, 0)
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for tr in results.values():
        ms = tr["methods"]
        present = [n for n in names if n in ms]
        if not present:
            continue
        # Diverged runs count first as worse, then the median final loss; ties
        # share their average rank.
        key = {n: (ms[n]["diverged"], ms[n]["final_loss_median"]) for n in present}
        # The ratio's reference: the best median among the runs that never
        # diverged (a method that diverged on some seeds may still have a low median).
        clean = [n for n in present if ms[n]["diverged"] == 0] or present
        best = min(ms[n]["final_loss_median"] for n in clean)
        for n in present:
            below = sum(key[m] < key[n] for m in present)
            tied = sum(key[m] == key[n] for m in present)
            ranks[n].append(below + (tied + 1) / 2)
            diverged[n] += ms[n]["diverged"]
            final = ms[n]["final_loss_median"]
            ratios[n].append(final / best if best > 0 and math.isfinite(final) else math.inf)
    table = [
        {
            "method": n,
            "mean_rank": float(np.mean(ranks[n])),
            "diverged_runs": diverged[n],
            "geomean_ratio_to_best": float(np.exp(np.mean(np.log(ratios[n])))),
            "ranks": ranks[n],
        }
        for n in names
    ]
    return sorted(table, key=lambda row: (row["diverged_runs"], row["mean_rank"]))


def derive(results: dict[str, Any], rules: bool) -> dict[str, Any]:
    """Targets, comparisons and rankings, computed from the per-method results."""
    comparison = loss_comparison(results)
    return {
        "targets": evaluate_targets(results, comparison),
        "comparison": comparison,
        "rule_ranking": rank_methods(results, ("rule",)) if rules else [],
        "rule_ranking_data_mode": rank_methods(results, ("rule (data)",)) if rules else [],
        "overall_ranking": rank_methods(results, ("baseline", "stabilizer")),
    }


# ----------------------------------------------------------------------------
# Tables.


def _fmt(x: float | None, digits: str = ".3f") -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else format(x, digits)


def _median_max(values: Sequence[float], digits: str = "g") -> str:
    return f"{format(float(np.median(values)), digits)} / {format(float(max(values)), digits)}"


def format_tables(results: dict[str, Any]) -> str:
    lines = []
    for task_name, tr in results.items():
        best_label, _ = _best_fixed(tr)
        group = "stable" if tr.get("stable") else "unstable"
        extra = ""
        if tr.get("target_copies"):
            extra = f", target copied every {tr['target_period']} steps ({tr['target_copies']}x)"
        lines.append(
            f"\n### {task_name} ({group}): {tr['description']} (lr {tr['learning_rate']:g}, "
            f"{tr['steps']} steps, {tr['seeds']} seeds{extra})\n"
        )
        rl = bool(tr.get("target_copies"))
        header = (
            "| method | diverged | final loss (median) | worst seed | spikes (mean) "
            "| emergencies | explosions | clips | non-finite |"
        )
        rule = "|---|---|---|---|---|---|---|---|---|"
        if rl:
            header += " emergencies per copy |"
            rule += "---|"
        lines += [header, rule]
        for label, m in tr["methods"].items():
            mark = " (best fixed)" if label == best_label else ""
            stats = m.get("stabilizer_stats")
            counts = (
                " | ".join(_median_max(stats[f]) for f in STAT_FIELDS)
                if stats
                else " | ".join("-" for _ in STAT_FIELDS)
            )
            row = (
                f"| {label}{mark} | {m['diverged']}/{m['seeds']} "
                f"| {m['final_loss_median']:.4g} | {max(m['final_loss_per_seed']):.4g} "
                f"| {m['spikes_mean']:.1f} | {counts} |"
            )
            if rl:
                per_copy = m.get("emergencies_per_copy")
                row += f" {_median_max(per_copy, '.2f') if per_copy else '-'} |"
            lines.append(row)
    lines.append("\n(stabilizer counts: median / max over seeds, of the first stabilizer state)")
    return "\n".join(lines)


def format_targets(targets: dict[str, Any]) -> str:
    verdict = {True: "met", False: "MISSED", None: "n/a"}
    lines = []
    for mode, t in targets.items():
        lines += [f"\n**{mode}**\n", "| target | goal | figure | verdict |", "|---|---|---|---|"]
        for v in t["verdicts"]:
            lines.append(f"| {v['target']} | {v['goal']} | {v['text']} | {verdict[v['met']]} |")
    return "\n".join(lines)


def format_verdicts(targets: dict[str, Any]) -> str:
    lines = []
    for mode, t in targets.items():
        for v in t["verdicts"]:
            head = f"{mode}: {v['target']} {v['goal']}"
            if v["met"] is None:
                lines.append(f"{head}: {v['text']}")
            else:
                lines.append(f"{head}: {'met' if v['met'] else 'MISSED'} ({v['text']})")
    return "\n".join(lines)


def format_comparison(comparison: dict[str, Any]) -> str:
    tasks = comparison["unstable_tasks"]
    if not tasks:
        return "(no unstable task with a finite best fixed clip)"
    ratios = comparison["ratio_to_best_fixed"]
    shown = [m for m in (*MODES, *COMPARED) if m in ratios]
    lines = [
        "| task | best fixed | its median | " + " | ".join(shown) + " |",
        "|---|---|---|" + "---|" * len(shown),
    ]
    for name in tasks:
        b = comparison["best_fixed"][name]
        cells = [_fmt(ratios[m].get(name)) for m in shown]
        lines.append(f"| {name} | {b['label']} | {b['final']:.4g} | " + " | ".join(cells) + " |")
    geo = comparison["geomean_ratio_to_best_fixed"]
    lines.append("| **geomean** | | | " + " | ".join(_fmt(geo.get(m)) for m in shown) + " |")
    lines.append(
        "| **max** | | | "
        + " | ".join(_fmt(max(ratios[m].values(), default=None)) for m in shown)
        + " |"
    )
    if comparison["skipped_tasks"]:
        lines.append(
            "\nleft out: "
            + "; ".join(f"{n} ({why})" for n, why in comparison["skipped_tasks"].items())
        )
    return "\n".join(lines)


def format_good_runs(comparison: dict[str, Any]) -> str:
    tasks = comparison["unstable_tasks"]
    if not tasks:
        return "(no unstable task with a finite best fixed clip)"
    lines = [
        "| method | good runs | " + " | ".join(tasks) + " |",
        "|---|---|" + "---|" * len(tasks),
        "| *bar (1.10 x best fixed median)* | | "
        + " | ".join(f"{comparison['best_fixed'][n]['good_bar']:.4g}" for n in tasks)
        + " |",
    ]
    good = comparison["good_runs"]
    for method in sorted(good, key=lambda m: -good[m]["total"]):
        g = good[method]
        cells = [str(g["per_task"].get(n, "-")) for n in tasks]
        lines.append(f"| {method} | {g['total']}/{g['runs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_stable(results: dict[str, Any]) -> str:
    stable = [n for n, tr in results.items() if tr.get("stable")]
    if not stable:
        return "(no stable task)"
    shown = [m for m in MODES if any(m in results[n]["methods"] for n in stable)]
    lines = [
        "| task | no clipping diverged | no clipping final | "
        + " | ".join(f"{m} final | ratio" for m in shown)
        + " |",
        "|---|---|---|" + "---|---|" * len(shown),
    ]
    for n in stable:
        ms = results[n]["methods"]
        ref = ms.get("no clipping")
        if ref is None:
            continue
        cells = []
        for m in shown:
            final = ms[m]["final_loss_median"] if m in ms else None
            ratio = _ratio(final, ref["final_loss_median"]) if final is not None else None
            cells.append(f"{_fmt(final, '.4g')} | {_fmt(ratio, '.4f')}")
        lines.append(
            f"| {n} | {ref['diverged']}/{ref['seeds']} | {ref['final_loss_median']:.4g} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def format_rl(results: dict[str, Any]) -> str:
    rows = []
    for n, tr in results.items():
        if not tr.get("target_copies"):
            continue
        for label, m in tr["methods"].items():
            per_copy = m.get("emergencies_per_copy")
            if per_copy is None:
                continue
            em = m["stabilizer_stats"]["emergency_count"]
            rows.append(
                f"| {n} | {label} | {tr['target_copies']} | {_median_max(em)} "
                f"| {_median_max(per_copy, '.2f')} | {m['final_loss_median']:.4g} |"
            )
    if not rows:
        return "(no RL task with target copies)"
    return "\n".join(
        [
            "| task | method | copies | emergencies (median / max) "
            "| per copy (median / max) | final TD loss |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )


def format_ranking(ranking: list[dict[str, Any]]) -> str:
    lines = [
        "| method | mean rank | diverged runs | geomean final / best |",
        "|---|---|---|---|",
    ]
    for row in ranking:
        lines.append(
            f"| {row['method']} | {row['mean_rank']:.2f} | {row['diverged_runs']} "
            f"| {row['geomean_ratio_to_best']:.3f} |"
        )
    return "\n".join(lines)


def report(results: dict[str, Any], derived: dict[str, Any], rules: bool) -> None:
    """Prints the per-task tables, the comparisons, the targets and the rankings."""
    comparison = derived["comparison"]
    print(format_tables(results))
    print(
        "\nFinal loss / best fixed clip's (median over seeds), unstable tasks with a finite "
        "best fixed clip:\n"
    )
    print(format_comparison(comparison))
    print(
        f"\nGood runs: seeds with final loss <= {GOOD_RUN_FACTOR:g} x the best fixed clip's "
        "median, unstable tasks:\n"
    )
    print(format_good_runs(comparison))
    print("\nStable tasks, final loss against no clipping:\n")
    print(format_stable(results))
    print("\nRL task: the stabilizer's emergencies per target-network copy:\n")
    print(format_rl(results))
    if rules:
        print("\nAdaptation rules, threshold from the learning rate (mean rank across tasks):\n")
        print(format_ranking(derived["rule_ranking"]))
        print("\nAdaptation rules, data mode (mean rank across tasks):\n")
        print(format_ranking(derived["rule_ranking_data_mode"]))
    print("\nAll methods:\n")
    print(format_ranking(derived["overall_ranking"]))
    print("\nTargets:")
    print(format_targets(derived["targets"]))
    print("\nVerdicts:\n")
    print(format_verdicts(derived["targets"]))


# ----------------------------------------------------------------------------
# JSON and plot.

CURVE_POINTS = 300  # points kept per stored loss curve


def compact_curves(results: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """The median curves as stored in the JSON: every ``curve_stride``-th step, 4 digits.

    The curves are already smoothed over 1% of the steps; the stride is saved
    in each task's results.
    """
    out = {}
    for name, tr in results.items():
        if "curve_stride" not in tr:
            tr["curve_stride"] = max(1, math.ceil(tr["steps"] / CURVE_POINTS))
        stride = tr["curve_stride"]
        out[name] = {
            label: [float(f"{x:.4g}") for x in np.asarray(c, dtype=float)[::stride]]
            for label, c in tr["curves"].items()
        }
    return out


def plot(results: dict[str, Any], path: pathlib.Path) -> None:
    """Median loss curves per task: no clipping, the best fixed clip, the stabilizer (both modes).

    The y axis stops at 3x the largest initial loss, so that a diverging curve
    leaves the plot instead of flattening the others. Grey verticals: target copies.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (task_name, tr) in zip(axes.flat, results.items(), strict=False):
        best_label, best_final = _best_fixed(tr)
        lines = [("no clipping", "no clipping", dict(color="0.6", lw=1.0))]
        if math.isfinite(best_final):
            # (On fp16 every fixed clip diverges: no curve to draw.)
            lines.append((best_label, f"{best_label} (best fixed)", dict(color="tab:blue", lw=1.2)))
        if "GradScaler + clip 1" in tr["curves"]:
            lines.append(("GradScaler + clip 1", "GradScaler + clip 1", dict(color="tab:green")))
        lines.append(("stabilizer", "stabilizer (default)", dict(color="tab:red", lw=1.4)))
        lines.append(
            ("stabilizer (data)", "stabilizer (data)", dict(color="tab:red", lw=1.0, ls="--"))
        )
        top = 0.0
        for label, name, style in lines:
            if label not in tr["curves"]:
                continue
            curve = np.asarray(tr["curves"][label], dtype=float)
            finite = curve[np.isfinite(curve)]
            if finite.size:
                top = max(top, float(finite[0]))
            stride = tr.get("curve_stride", 1) if curve.size < tr["steps"] else 1
            steps = np.arange(curve.size) * stride
            ax.plot(steps, curve, label=name, **style)
        period = tr.get("target_period")
        for k in range(1, tr.get("target_copies", 0) + 1):
            ax.axvline(k * period, color="0.8", lw=0.8, zorder=0)
        ax.set_yscale("log")
        if top > 0:
            ax.set_ylim(top=3 * top)
        kind = ", stable" if tr.get("stable") else ""
        ax.set_title(
            f"{task_name} ({tr['base_optimizer']}, lr {tr['learning_rate']:g}{kind})", fontsize=9
        )
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("loss, median over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------
# Trace.


def trace(
    task_name: str,
    data_mode: bool = False,
    seed: int = 0,
    rows: int = 16,
    steps: int | None = None,
    config: optax_gradflow.StabilizerConfig | None = None,
) -> list[dict]:
    """The stabilizer's state along one run of ``task_name`` (the full suite's seed ``seed``).

    Prints, at ``rows`` evenly spaced steps: the loss, the unscaled norm, the
    threshold, the loss scale, the explosion / emergency / non-finite counts
    and how many norms the history holds.
    """
    task = TASKS[task_name]()
    steps = steps or task.steps
    config = config_for(task, optax_gradflow.StabilizerConfig() if config is None else config)
    # The keys of the full suite's seed ``seed`` (it splits the keys for all its seeds).
    init_keys, data_keys = suite_keys(SEEDS)
    params = jax.tree.map(lambda x: x[seed], jax.jit(jax.vmap(task.init))(init_keys))
    lr = None if data_mode else task.learning_rate
    opt = optax_gradflow.stabilized(task.base(task.learning_rate), lr, config=config)
    fields = (
        "last_grad_norm",
        "clip_threshold",
        "loss_scale",
        "explosion_count",
        "emergency_count",
        "nonfinite_count",
        "norm_history_count",
    )

    def record(opt_state):
        flow = optax_gradflow.find_states(opt_state)[0][1]
        flat = to_flat(flow)
        return tuple(flat[f] for f in fields)

    def run(params, data_key):
        init, train_step = make_train_step(task, opt, steps, data_key, record)
        _, (losses, recorded) = jax.lax.scan(train_step, init(params), jnp.arange(steps))
        return (losses, *recorded)

    out = [np.asarray(x) for x in jax.jit(run)(params, data_keys[seed])]
    names = ("loss", "norm", "threshold", "loss scale", "explosions", "emergencies")
    names += ("non-finite", "history")
    shown = sorted({0, 1, 2, 5, 10, *np.linspace(0, steps - 1, rows).astype(int).tolist()})
    shown = [i for i in shown if i < steps]
    mode = "data mode" if data_mode else f"lr {task.learning_rate:g}"
    print(f"{task_name}, stabilizer ({mode}), seed {seed}, {steps} steps:\n")
    print("| step | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    records = []
    for i in shown:
        values = [float(o[i]) for o in out]
        records.append({"step": i, **dict(zip(names, values, strict=True))})
        print(f"| {i} | " + " | ".join(f"{v:.4g}" for v in values) + " |")
    return records


# ----------------------------------------------------------------------------
# Command line.


def quick_tasks() -> list[str]:
    """The tasks of ``--quick`` (without ``--tasks``): the cheap ones."""
    return [name for name, make in TASKS.items() if make().in_quick]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="10%% of the steps, 2 seeds, the cheap tasks (" + ",".join(quick_tasks()) + ")",
    )
    parser.add_argument("--rules", action="store_true", help="also run every adaptation rule")
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds per run (default {SEEDS})")
    parser.add_argument("--steps", type=int, default=None, help="override every task's steps")
    parser.add_argument(
        "--tasks", default=None, help=f"comma-separated task names (default: {','.join(TASKS)})"
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated method names to keep (no clipping and the fixed clips always run)",
    )
    parser.add_argument(
        "--stab-config",
        default=None,
        help="the stabilizer's config: StabilizerConfig fields as a JSON object, "
        "e.g. '{\"track_k\": 2.0}' (default: the default config)",
    )
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    parser.add_argument("--plot", default=str(DEFAULT_PLOT), help="'' for no plot")
    parser.add_argument(
        "--from-json",
        action="store_true",
        help="train nothing: re-derive the tables, targets and plot from the results in --json",
    )
    parser.add_argument(
        "--trace", default=None, help="only print the stabilizer's state along one run of TASK"
    )
    parser.add_argument("--trace-data-mode", action="store_true", help="--trace in data mode")
    parser.add_argument("--trace-seed", type=int, default=0, help="--trace this seed (0-4)")
    args = parser.parse_args(argv)
    try:
        config = parse_stab_config(args.stab_config)
    except (ValueError, TypeError) as err:
        parser.error(f"--stab-config: {err}")

    if args.trace:
        if args.trace not in TASKS:
            parser.error(f"unknown task {args.trace!r}; choose from {', '.join(TASKS)}")
        steps = args.steps or (TASKS[args.trace]().quick_steps if args.quick else None)
        trace(
            args.trace,
            data_mode=args.trace_data_mode,
            seed=args.trace_seed,
            steps=steps,
            config=config,
        )
        return {}

    seeds = args.seeds or (QUICK_SEEDS if args.quick else SEEDS)
    if args.tasks is None:
        task_names = quick_tasks() if args.quick else list(TASKS)
    else:
        task_names = [t for t in args.tasks.split(",") if t]
    for t in task_names:
        if t not in TASKS:
            parser.error(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    methods = base_methods(config)
    if args.methods:
        keep = {m.strip() for m in args.methods.split(",")}
        known = {m.name for m in methods}
        if keep - known:
            parser.error(f"unknown method(s) {sorted(keep - known)}; choose from {sorted(known)}")
        methods = [m for m in methods if m.name in keep or m.name in ("no clipping", "fixed clip")]
    if args.rules:
        methods += rule_methods(config)

    if args.from_json:
        stored = json.loads(pathlib.Path(args.json).read_text())
        results = {
            name: dict(tr, curves=stored["curves"][name]) for name, tr in stored["results"].items()
        }
        rules = args.rules or bool(stored.get("rule_ranking"))
        derived = derive(results, rules)
        report(results, derived, rules)
        stored.update(derived)
        stored["curves"] = compact_curves(results)
        stored["results"] = {
            name: {k: v for k, v in tr.items() if k != "curves"} for name, tr in results.items()
        }
        pathlib.Path(args.json).write_text(json.dumps(stored, indent=1, allow_nan=True) + "\n")
        if args.plot:
            plot(results, pathlib.Path(args.plot))
        print(
            f"\nre-derived the tables of {args.json}"
            + (f", wrote {args.plot}" if args.plot else "")
        )
        return stored

    start = time.perf_counter()
    results = run_suite(task_names, methods, seeds, args.quick, args.steps, config)
    wall = time.perf_counter() - start
    derived = derive(results, args.rules)

    argv_used = sys.argv[1:] if argv is None else argv
    out = {
        "command": " ".join([COMMAND, *argv_used]),
        "machine": machine_info(),
        "settings": {
            "quick": args.quick,
            "seeds": seeds,
            "tasks": task_names,
            "fixed_thresholds": FIXED_THRESHOLDS,
            "agc_clipping": AGC_CLIPPING,
            "apply_if_finite_max_consecutive_errors": APPLY_IF_FINITE_MAX_ERRORS,
            "divergence_factor": DIVERGENCE_FACTOR,
            "spike_factor": SPIKE_FACTOR,
            "spike_window": SPIKE_WINDOW,
            "stabilizer_config": config.as_dict(),
            "stabilizer_config_overrides": json.loads(args.stab_config or "{}"),
            "targets": {
                "geomean_ratio_to_best_fixed": TARGET_GEOMEAN,
                "max_ratio_to_best_fixed": TARGET_MAX_RATIO,
                "good_run_factor": GOOD_RUN_FACTOR,
                "good_run_rivals": GOOD_RUN_RIVALS,
                "stable_ratio_to_no_clipping": TARGET_STABLE_RATIO,
                "emergencies_per_target_copy": TARGET_EMERGENCIES_PER_COPY,
            },
        },
        "curves": compact_curves(results),
        "results": {
            name: {k: v for k, v in tr.items() if k != "curves"} for name, tr in results.items()
        },
        **derived,
        "wall_s": wall,
    }
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written before the tables are printed: a failing table loses no training.
    path.write_text(json.dumps(out, indent=1, allow_nan=True) + "\n")
    report(results, derived, args.rules)
    if args.plot:
        plot(results, pathlib.Path(args.plot))
    print(f"\nwrote {path}" + (f" and {args.plot}" if args.plot else "") + f" in {wall:.0f} s")
    return out


if __name__ == "__main__":
    main()
