"""Does the stabilizer keep unstable training runs alive, untuned, and leave healthy ones alone?

The driver of the stability suite. Its entries (``sets.py``) are tasks at two
or three learning rates each, in two sets:

- **selection**: the tasks of ``tasks.py`` (a tanh RNN on the adding
  problem, a deep ReLU MLP, heavy-tailed regression, a post-LN transformer
  without warm-up, float16 compute, a DQN bidder on the auction simulator,
  and two healthy runs) and DQN on CartPole (``gym_tasks.py``). The
  stabilizer's rules may be chosen and tuned on this set.
- **validation**: the tasks of ``tasks_more.py`` (a GRU and an LSTM on
  long-memory tasks, deep tanh and ReLU MLPs, a CNN on noisy digits, the
  digits CNN in float16, a character model on the standard library's
  sources, two healthy runs) and DQN on Acrobot and PPO on CartPole. Its
  tasks and its seeds (drawn from another key) play no part in any choice
  about the stabilizer; its results are reported apart, and only read.

The rule of the split: a task never moves from one set to the other after
its result has been seen, and nothing is tuned on the validation set; a
validation task whose result prompts a change becomes, at best, a new
selection task next to a new validation task, both chosen before they run.
Unstable entries are calibrated (difficulty, learning rates) on the
baselines alone, never on the stabilizer's results.

The methods are in ``baselines.py`` (no clipping, fixed clips, the same
inside ``optax.apply_if_finite``, AGC 0.01, ZClip, AutoClip, loss scaling on
the float16 tasks, the stabilizer with a learning rate and in data mode).
Each entry runs over several seeds with every method; everything is
generated from fixed seeds. One run of a method is ``jax.jit`` of a
``lax.scan`` over the steps, mapped with ``lax.map`` over the seeds (and the
thresholds of the fixed clips), so each method compiles once per entry. The
optimizer's ``value=`` is the training loss a user would pass (the first
output of ``task.loss``, never scaled), not the report (on an RL task, the
return).

Scores (``metrics.py``): the final loss or return (mean over the last 10% of
the steps), divergence (a non-finite final parameter; on a loss task also a
non-finite loss or a final loss above 10x the initial one), spikes, and the
stabilizer's own figures (final threshold, median gradient norm, explosion
and clip shares, emergencies, per target copy). Comparisons and targets
(``report.py``), per set and for each stabilizer mode: no divergence; RL
normalised return mean >= 1.0 and min >= 0.8, final threshold >= 0.1x the
median norm; on the loss tasks more good runs than AGC, AutoClip and ZClip,
a geometric mean of final loss / best fixed clip <= 1.10 and below theirs,
no entry above 1.5; healthy entries within 1% of no clipping.

Usage (from the repository root)::

    python benchmarks/stability/run.py                    # both sets, every entry
    python benchmarks/stability/run.py --set selection    # the selection set only
    python benchmarks/stability/run.py --set validation   # the validation set only
    python benchmarks/stability/run.py --quick            # smoke: 10% of the steps, 2 seeds
    python benchmarks/stability/run.py --tasks rnn_adding,deep_mlp@0.1
    python benchmarks/stability/run.py --stab-config '{"track_k": 2.0}'  # a variant
    python benchmarks/stability/run.py --rules            # also compare adaptation rules
    python benchmarks/stability/run.py --trace deep_mlp@0.05  # the stabilizer along one run
    python benchmarks/stability/run.py --from-json        # re-derive tables and plots
    python benchmarks/stability/run.py --list             # the entries, their sets and rates
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
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
import metrics  # noqa: E402
import optax  # noqa: E402
import report  # noqa: E402
import sets  # noqa: E402
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
from metrics import FINAL_FIELDS, MethodResult, TaskResult  # noqa: E402
from tasks import Task  # noqa: E402

import optax_gradflow  # noqa: E402
from optax_gradflow.state import to_flat  # noqa: E402

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "stability.json"
DEFAULT_PLOT = ROOT / "benchmarks" / "results" / "stability.png"
COMMAND = "python benchmarks/stability/run.py"

SEEDS = 5  # seeds of the full suite, per set
QUICK_SEEDS = 2
CURVE_POINTS = 300  # points kept per stored curve
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


def step_norm(grads, opt_state) -> jax.Array:
    """The step's gradient norm: the stabilizer's ``last_grad_norm`` (unscaled), else the raw."""
    found = optax_gradflow.find_states(opt_state)
    if found:
        return found[0][1].last_grad_norm.astype(jnp.float32)
    return optax.tree.norm(grads).astype(jnp.float32)


def make_train_step(
    task: Task,
    opt: optax.GradientTransformationExtraArgs,
    steps: int,
    data_key: jax.Array,
    record: Callable[[Any], Any] | None = None,
):
    """``(init(params) -> carry, train_step(carry, step) -> (carry, out))`` for ``lax.scan``.

    The carry is ``(params, opt_state, task_state)``; ``out`` is ``(report,
    gradient norm)`` (``step_norm``), or ``(report, record(opt_state))``. The
    optimizer's ``value=`` is the training loss (the first output of
    ``task.loss``, unscaled), never the report. A task with ``collect`` draws
    its batch from its carried state, and ``after_update`` runs after each
    update.
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
            loss, reported = task.loss(p, batch)
            return scaled_loss(loss, opt_state), (loss, reported)

        grads, (loss, reported) = jax.grad(objective, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params, value=loss)
        params = optax.apply_updates(params, updates)
        if task.after_update is not None:
            task_state = task.after_update(task_state, params, step, steps)
        out = (reported, step_norm(grads, opt_state) if record is None else record(opt_state))
        return (params, opt_state, task_state), out

    return init, train_step


def final_stats(opt_state) -> jax.Array | None:
    """``FINAL_FIELDS`` of the first stabilizer state in ``opt_state`` (float32), or None."""
    found = optax_gradflow.find_states(opt_state)
    if not found:
        return None
    flow = found[0][1]
    return jnp.stack([getattr(flow, f).astype(jnp.float32) for f in FINAL_FIELDS])


def all_finite(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_runner(task: Task, method: Method, steps: int):
    """``(run, has_stats)``: ``run`` a jitted ``(params [S], data keys [S], hparams [K]) ->
    (reports [K, S, T], norms [K, S, T], final stats [K, S, F], finite params [K, S])``.

    ``params`` are the initial parameters of the S seeds, stacked; every
    (hparam, seed) pair runs one after another. ``has_stats()`` says, once
    traced, whether the optimizer holds a stabilizer (else the stats are 0).
    """
    traced: dict[str, bool] = {}
    fields = len(FINAL_FIELDS)

    def run_one(params, data_key, hparam):
        opt = optax.with_extra_args_support(method.make(task, hparam, steps))
        init, train_step = make_train_step(task, opt, steps, data_key)
        (params, opt_state, _), (reports, norms) = jax.lax.scan(
            train_step, init(params), jnp.arange(steps)
        )
        stats = final_stats(opt_state)
        traced["has_stats"] = stats is not None
        stats = jnp.zeros(fields, jnp.float32) if stats is None else stats
        return reports.astype(jnp.float32), norms, stats, all_finite(params)

    def run_all(params, data_keys, hparams):
        # lax.map, not vmap: under vmap the stabilizer's lax.cond branches
        # would both run every step (a batched predicate becomes a select).
        k, s = hparams.shape[0], data_keys.shape[0]
        grid = (
            jax.tree.map(lambda x: jnp.tile(x, (k,) + (1,) * (x.ndim - 1)), params),
            jnp.tile(data_keys, (k, 1)),
            jnp.repeat(hparams, s),
        )
        reports, norms, stats, finite = jax.lax.map(lambda a: run_one(*a), grid)
        return (
            reports.reshape(k, s, steps),
            norms.reshape(k, s, steps),
            stats.reshape(k, s, fields),
            finite.reshape(k, s),
        )

    return jax.jit(run_all), lambda: traced.get("has_stats", False)


def initial_threshold(task: Task, config: optax_gradflow.StabilizerConfig) -> float:
    """The stabilizer's threshold from the learning rate (SPEC.md, "Initial threshold")."""
    lr_threshold = config.lr_threshold_scale * math.sqrt(1.0 / task.learning_rate)
    return float(min(max(lr_threshold, config.min_threshold), config.max_threshold))


def run_variant(
    variant: sets.Variant,
    task: Task,
    methods: Sequence[Method],
    seeds: int,
    steps: int,
    config: optax_gradflow.StabilizerConfig,
    log: Callable[[str], None] = print,
) -> TaskResult:
    """Every method on one entry of the suite, over the seeds of its set."""
    init_keys, data_keys = sets.set_keys(variant.set, seeds)
    # Initial parameters, once per seed, shared by every method.
    params = jax.jit(jax.vmap(task.init))(init_keys)
    cfg = config_for(task, config)
    tr = TaskResult(
        name=variant.name,
        task=variant.task,
        set=variant.set,
        kind=variant.kind,
        description=task.description,
        base_optimizer=task.base_name,
        learning_rate=task.learning_rate,
        steps=steps,
        seeds=seeds,
        stable=task.stable,
        metric=task.metric,
        compare_losses=task.compare_losses,
        random_return=task.random_return,
        target_period=task.target_period(steps) if task.target_period else None,
        stabilizer_loss_scaling=cfg.loss_scaling,
        stabilizer_initial_threshold=initial_threshold(task, cfg),
        curve_stride=max(1, math.ceil(steps / CURVE_POINTS)),
    )
    smooth = max(1, steps // 100)
    for method in methods:
        if method.applies_to is not None and not method.applies_to(task):
            continue
        if method.alias_of is not None:
            continue
        labels = method.labels or (method.name,)
        if method.same_if_finite is not None:
            source = next(m for m in methods if m.name == method.same_if_finite)
            twins = [tr.methods.get(label) for label in source.labels or (source.name,)]
            if all(t is not None and not t.saw_nonfinite for t in twins):
                for label, twin in zip(labels, twins, strict=True):
                    tr.methods[label] = twin.renamed(label, method.kind, twin.label)
                    tr.curves[label] = tr.curves[twin.label]
                log(f"[{variant.name}] {method.name}: no non-finite gradient, as {source.name}")
                continue
        hparams = jnp.asarray(method.hparams or (0.0,), jnp.float32)
        runner, has_stats = make_runner(task, method, steps)
        t0 = time.perf_counter()
        compiled = runner.lower(params, data_keys, hparams).compile()
        t1 = time.perf_counter()
        out = jax.block_until_ready(compiled(params, data_keys, hparams))
        reports, norms, stats, finite = (np.asarray(x) for x in out)
        t2 = time.perf_counter()
        for i, label in enumerate(labels):
            final, initial, diverged, spikes = metrics.score_runs(reports[i], finite[i], tr.metric)
            m = MethodResult(
                label=label,
                kind=method.kind,
                metric=tr.metric,
                final=final,
                initial=initial,
                diverged=diverged,
                nonfinite_grad_steps=[int(x) for x in np.sum(~np.isfinite(norms[i]), axis=1)],
                spikes=spikes,
                stabilizer=(
                    metrics.stabilizer_runs(stats[i], norms[i], tr.target_copies)
                    if has_stats()
                    else None
                ),
                compile_s=(t1 - t0) / len(labels),
                run_s=(t2 - t1) / len(labels),
            )
            tr.methods[label] = m
            curve = metrics.median_curve(reports[i], smooth)[:: tr.curve_stride]
            tr.curves[label] = [float(f"{x:.4g}") for x in curve]
            extra = ""
            if m.stabilizer is not None:
                s = m.stabilizer
                extra = (
                    f"  explosions {np.median(s.explosion_fraction):.3f} "
                    f"clips {np.median(s.clip_fraction):.3f} emergencies {max(s.emergencies)}"
                )
            log(
                f"[{variant.name}] {label:<22s} diverged {m.diverged_count}/{seeds}  "
                f"final {m.median:.4g}{extra}  ({t1 - t0:.1f}s compile, {t2 - t1:.1f}s run)"
            )
    for method in methods:
        if method.alias_of is not None and method.alias_of in tr.methods:
            tr.methods[method.name] = tr.methods[method.alias_of].renamed(
                method.name, method.kind, method.alias_of
            )
            tr.curves[method.name] = tr.curves[method.alias_of]
    return tr


def run_suite(
    variants: Sequence[sets.Variant],
    methods: Sequence[Method],
    seeds: int,
    quick: bool,
    steps_override: int | None = None,
    config: optax_gradflow.StabilizerConfig | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, TaskResult]:
    config = optax_gradflow.StabilizerConfig() if config is None else config
    registry = sets.factories()
    results = {}
    for variant in variants:
        task = variant.make(registry)
        steps = steps_override or (task.quick_steps if quick else task.steps)
        t0 = time.perf_counter()
        results[variant.name] = run_variant(variant, task, methods, seeds, steps, config, log)
        log(f"[{variant.name}] {time.perf_counter() - t0:.0f} s")
    return results


def summarise_all(results: dict[str, TaskResult], rules: bool) -> dict[str, report.SetSummary]:
    """One summary per set present in ``results``, in the order of ``sets.SETS``."""
    out = {}
    for set_name in sets.SETS:
        part = {n: tr for n, tr in results.items() if tr.set == set_name}
        if part:
            out[set_name] = report.summarise(set_name, part, rules)
    return out


def print_report(
    results: dict[str, TaskResult], summaries: dict[str, report.SetSummary], rules: bool
) -> None:
    for set_name, summary in summaries.items():
        part = {n: tr for n, tr in results.items() if tr.set == set_name}
        print(report.format_set(summary, part, rules))
    print("\nVerdicts:\n")
    for set_name, summary in summaries.items():
        for t in summary.targets:
            print(f"{set_name}, {t.mode}: {t.description}: {report.VERDICT[t.met]} ({t.text})")


def plot_paths(path: pathlib.Path, set_names: Sequence[str]) -> dict[str, pathlib.Path]:
    """One figure per set: ``stability.png`` -> ``stability_selection.png``, ..."""
    return {s: path.with_name(f"{path.stem}_{s}{path.suffix}") for s in set_names}


def plot_sets(results: dict[str, TaskResult], path: pathlib.Path) -> list[pathlib.Path]:
    present = [s for s in sets.SETS if any(tr.set == s for tr in results.values())]
    written = []
    for set_name, p in plot_paths(path, present).items():
        part = {n: tr for n, tr in results.items() if tr.set == set_name}
        report.plot(part, p, title=f"{set_name} set")
        written.append(p)
    return written


# ----------------------------------------------------------------------------
# JSON.


def to_json(
    results: dict[str, TaskResult], summaries: dict[str, report.SetSummary]
) -> dict[str, Any]:
    return {
        "results": {n: tr.to_json() for n, tr in results.items()},
        "curves": {n: tr.curves for n, tr in results.items()},
        "curve_strides": {n: tr.curve_stride for n, tr in results.items()},
        "summaries": {s: summary.to_json() for s, summary in summaries.items()},
    }


def results_from_json(stored: dict[str, Any]) -> dict[str, TaskResult]:
    if "summaries" not in stored:
        raise ValueError("not a results file of this suite (no 'summaries'): run the suite again")
    return {
        n: TaskResult.from_json(data, stored["curves"].get(n, {}))
        for n, data in stored["results"].items()
    }


# ----------------------------------------------------------------------------
# Trace.


def trace(
    name: str,
    data_mode: bool = False,
    seed: int = 0,
    rows: int = 16,
    steps: int | None = None,
    config: optax_gradflow.StabilizerConfig | None = None,
) -> list[dict]:
    """The stabilizer's state along one run of entry ``name`` (its set's seed ``seed``).

    Prints, at ``rows`` evenly spaced steps: the report, the unscaled norm,
    the threshold, the loss scale, the explosion / emergency / non-finite
    counts and how many norms the history holds.
    """
    variant = sets.select([name])[0][0]
    task = variant.make()
    steps = steps or task.steps
    config = config_for(task, optax_gradflow.StabilizerConfig() if config is None else config)
    init_keys, data_keys = sets.set_keys(variant.set, SEEDS)
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
        flat = to_flat(optax_gradflow.find_states(opt_state)[0][1])
        return tuple(flat[f] for f in fields)

    def run(params, data_key):
        init, train_step = make_train_step(task, opt, steps, data_key, record)
        _, (reports, recorded) = jax.lax.scan(train_step, init(params), jnp.arange(steps))
        return (reports, *recorded)

    out = [np.asarray(x) for x in jax.jit(run)(params, data_keys[seed])]
    names = (task.metric, "norm", "threshold", "loss scale", "explosions", "emergencies")
    names += ("non-finite", "history")
    shown = sorted({0, 1, 2, 5, 10, *np.linspace(0, steps - 1, rows).astype(int).tolist()})
    shown = [i for i in shown if i < steps]
    mode = "data mode" if data_mode else f"lr {task.learning_rate:g}"
    print(f"{variant.name} ({variant.set}), stabilizer ({mode}), seed {seed}, {steps} steps:\n")
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


def list_entries() -> None:
    found, missing = sets.variants()
    print("| entry | set | kind | quick |")
    print("|---|---|---|---|")
    for v in found:
        print(f"| {v.name} | {v.set} | {v.kind} | {'yes' if v.quick else ''} |")
    for name in missing:
        print(f"| {name} | (unavailable: no {sets.GYM_MODULE}.py) | | |")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--set",
        choices=(*sets.SETS, "all"),
        default="all",
        help="the set to run (default: all, each reported apart)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 10%% of the steps, 2 seeds, a cheap entry or two of each set",
    )
    parser.add_argument("--rules", action="store_true", help="also run every adaptation rule")
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds per run (default {SEEDS})")
    parser.add_argument("--steps", type=int, default=None, help="override every task's steps")
    parser.add_argument(
        "--tasks",
        default=None,
        help="comma-separated entries (task@lr) or tasks (all their rates); default: every entry "
        "of --set (see --list)",
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
    parser.add_argument(
        "--plot",
        default=str(DEFAULT_PLOT),
        help="figure path; one figure per set (NAME_selection.png, ...); '' for none",
    )
    parser.add_argument(
        "--from-json",
        action="store_true",
        help="train nothing: re-derive the tables, targets and plots from the results in --json",
    )
    parser.add_argument("--list", action="store_true", help="list the entries and exit")
    parser.add_argument(
        "--trace", default=None, help="only print the stabilizer's state along one run of ENTRY"
    )
    parser.add_argument("--trace-data-mode", action="store_true", help="--trace in data mode")
    parser.add_argument("--trace-seed", type=int, default=0, help="--trace this seed (0-4)")
    args = parser.parse_args(argv)
    try:
        config = parse_stab_config(args.stab_config)
    except (ValueError, TypeError) as err:
        parser.error(f"--stab-config: {err}")
    if args.list:
        list_entries()
        return {}
    chosen_sets = sets.SETS if args.set == "all" else (args.set,)

    if args.trace:
        try:
            found, _ = sets.select([args.trace])
        except KeyError:
            parser.error(f"unknown entry {args.trace!r} (see --list)")
        if not found:
            parser.error(f"{args.trace!r} is unavailable here")
        steps = args.steps or (found[0].make().quick_steps if args.quick else None)
        trace(
            found[0].name,
            data_mode=args.trace_data_mode,
            seed=args.trace_seed,
            steps=steps,
            config=config,
        )
        return {}

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
        path = pathlib.Path(args.json)
        stored = json.loads(path.read_text())
        results = results_from_json(stored)
        rules = args.rules or any(s.get("rule_ranking") for s in stored["summaries"].values())
        summaries = summarise_all(results, rules)
        print_report(results, summaries, rules)
        stored.update(to_json(results, summaries))
        path.write_text(json.dumps(stored, indent=1, allow_nan=True) + "\n")
        written = plot_sets(results, pathlib.Path(args.plot)) if args.plot else []
        print(f"\nre-derived the tables of {path}" + "".join(f", wrote {p}" for p in written))
        return stored

    names = [t for t in args.tasks.split(",") if t] if args.tasks else None
    try:
        variants, unavailable = sets.select(names, chosen_sets, args.quick)
    except KeyError as err:
        parser.error(f"unknown entry or task {err.args[0]!r} (see --list)")
    if names is not None:
        variants = [v for v in variants if v.set in chosen_sets]
    if unavailable:
        print(f"unavailable (no {sets.GYM_MODULE}.py): {', '.join(unavailable)}")
    if not variants:
        parser.error("no entry to run")
    seeds = args.seeds or (QUICK_SEEDS if args.quick else SEEDS)

    start = time.perf_counter()
    results = run_suite(variants, methods, seeds, args.quick, args.steps, config)
    wall = time.perf_counter() - start
    summaries = summarise_all(results, args.rules)

    argv_used = sys.argv[1:] if argv is None else argv
    out = {
        "command": " ".join([COMMAND, *argv_used]),
        "machine": machine_info(),
        "settings": {
            "quick": args.quick,
            "sets": list(chosen_sets),
            "seeds": seeds,
            "set_keys": {s: sets.SET_KEYS[s] for s in chosen_sets},
            "entries": [dataclasses.asdict(v) for v in variants],
            "unavailable": unavailable,
            "fixed_thresholds": FIXED_THRESHOLDS,
            "agc_clipping": AGC_CLIPPING,
            "apply_if_finite_max_consecutive_errors": APPLY_IF_FINITE_MAX_ERRORS,
            "divergence_factor": metrics.DIVERGENCE_FACTOR,
            "spike_factor": metrics.SPIKE_FACTOR,
            "spike_window": metrics.SPIKE_WINDOW,
            "stabilizer_config": config.as_dict(),
            "stabilizer_config_overrides": json.loads(args.stab_config or "{}"),
            "targets": [
                {"key": t.key, "description": t.description, "op": t.op, "bound": t.bound}
                for t in report.TARGETS
            ],
            "good_run_factor": report.GOOD_RUN_FACTOR,
            "peers": list(report.PEERS),
        },
        **to_json(results, summaries),
        "wall_s": wall,
    }
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written before the tables are printed: a failing table loses no training.
    path.write_text(json.dumps(out, indent=1, allow_nan=True) + "\n")
    print_report(results, summaries, args.rules)
    written = plot_sets(results, pathlib.Path(args.plot)) if args.plot else []
    print(f"\nwrote {path}" + "".join(f", {p}" for p in written) + f" in {wall:.0f} s")
    return out


if __name__ == "__main__":
    main()
