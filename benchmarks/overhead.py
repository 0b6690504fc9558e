"""Per-step cost of the stabilizer against plain clipping, in JAX and PyTorch.

Every variant of a group runs interleaved in one process: each round calls
every variant once, in an order rotated from round to round, and waits for
its result; the first rounds are discarded. The tables quote the median time
and the median (and interquartile range) of the per-round ratios to the
reference of the group, which cancels most of the drift of a shared machine.

Rows, chosen with ``--rows`` (default: all but ``torch-compile``):

- ``update``: a jitted ``update`` plus ``optax.apply_updates``, the parameters
  and the optimizer state donated, at each of ``--sizes``. Group ``alone``:
  the clipping transformation by itself, against ``optax.clip_by_global_norm``;
  the floor is the barest global-norm clip (one reduction for the norm, then
  ``g * c`` with a scalar ``c``). Group ``chained``: the same followed by
  ``optax.adam``, against ``chain(clip_by_global_norm, adam)``. At a few
  thousand parameters this is the fixed per-step cost.
- ``step``: the whole jitted train step of an MLP (forward, backward, update,
  apply; parameters and optimizer state donated in the order they are
  returned), at each of ``--train-widths``, against
  ``chain(clip_by_global_norm, adam)``.
- ``compile``: seconds of ``jax.jit(step).lower(...).compile()`` of that train
  step, a fresh function every round (``--compile-width``,
  ``--compile-repeats``).
- ``eager``: ``update`` called outside ``jit``.
- ``torch``: one clipping call on gradients restored (outside the timed
  region) before every call, against ``torch.nn.utils.clip_grad_norm_``, with
  the paired ratio to ZClip where it is installed; the adapter twice: its
  default (on the CPU, the scalar logic on the host) and ``path="device"``
  (tensor operations, the path taken off the CPU).
- ``torch-compile``: the same under ``torch.compile(fullgraph=True)``; the
  adapter documents it for its functional ``update``, so that is what runs.
- ``state``: the stabilizer's state in bytes at every size measured.

Usage::

    python benchmarks/overhead.py                      # 1e6, 1e7, 1e8 parameters
    python benchmarks/overhead.py --sizes 1e6 --quick  # a smoke run
    python benchmarks/overhead.py --rows compile,state # only these rows
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from _machine import machine_info  # noqa: E402

import optax_gradflow  # noqa: E402

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "overhead.json"
NUM_LEAVES = 4
LEAF_COLUMNS = 1000
THRESHOLD = 1.0
# The gradients' global norm: ten times the threshold, so every step clips.
GRAD_NORM = 10.0 * THRESHOLD
LEARNING_RATE = 1e-3
AGC_CLIPPING = 0.01


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------
# Interleaved timing.


def interleaved(
    calls: dict[str, Callable[[], None]],
    warmup: int,
    repeats: int,
    prepare: dict[str, Callable[[], None]] | None = None,
) -> dict[str, np.ndarray]:
    """Seconds per call of every entry, measured round-robin.

    Round ``r`` starts at entry ``r mod len(calls)``, so no variant always runs
    right after the same neighbour. ``warmup`` rounds are run and discarded.
    ``prepare[name]``, when given, runs before every call of ``name``, outside
    the timed region (restoring gradients, building a fresh function).
    """
    names = list(calls)
    times = {name: [] for name in names}
    for r in range(warmup + repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if prepare is not None:
                prepare[name]()
            t0 = time.perf_counter()
            calls[name]()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return {name: np.asarray(t) for name, t in times.items()}


def paired_ratio(times: dict[str, np.ndarray], name: str, reference: str) -> dict[str, float]:
    """The median and IQR of the per-round ratios ``times[name] / times[reference]``."""
    ratios = times[name] / times[reference]
    return {
        "ratio": float(np.median(ratios)),
        "ratio_p25": float(np.percentile(ratios, 25)),
        "ratio_p75": float(np.percentile(ratios, 75)),
    }


def summarize(times: dict[str, np.ndarray], reference: str) -> dict[str, dict[str, float]]:
    """Median time and the median / IQR of the paired per-round ratios to ``reference``."""
    return {
        name: {
            "median_s": float(np.median(t)),
            "p25_s": float(np.percentile(t, 25)),
            "p75_s": float(np.percentile(t, 75)),
            **paired_ratio(times, name, reference),
            "samples": len(t),
        }
        for name, t in times.items()
    }


def make_rows(
    summary: dict[str, dict[str, float]], reference: str, **fields: Any
) -> list[dict[str, Any]]:
    """One row per variant of ``summary``: ``fields``, the variant, its reference, its figures."""
    return [
        {**fields, "variant": name, "reference": reference, **figures}
        for name, figures in summary.items()
    ]


# ----------------------------------------------------------------------------
# JAX variants.


@dataclasses.dataclass
class JaxVariant:
    name: str
    group: str  # "alone" or "chained"
    make: Callable[[], Any]  # () -> step fn (params, state, grads) and a transformation
    note: str = ""


def _transform_step(tx: optax.GradientTransformation):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step, tx


def scale_by_norm_floor(max_norm: float) -> optax.GradientTransformation:
    """The barest global-norm clip: one reduction, then one multiply by a scalar.

    ``g * min(1, max_norm / |g|)``; no select, no division per element.
    """

    def update_fn(updates, state, params=None):
        del params
        sq = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(updates))
        coef = jnp.minimum(jnp.float32(1.0), jnp.float32(max_norm) / jnp.sqrt(sq))
        return jax.tree.map(lambda g: g * coef, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def jax_variants() -> list[JaxVariant]:
    # The seed design's data warm-up sorts the norm history every step.
    warmup_config = dataclasses.replace(optax_gradflow.presets.seed(), warmup_steps=1_000_000)
    adam = lambda: optax.adam(LEARNING_RATE)
    return [
        JaxVariant("no clipping", "alone", lambda: _transform_step(optax.identity())),
        JaxVariant(
            "clip_by_global_norm", "alone", lambda: _transform_step(optax.clip_by_global_norm(1.0))
        ),
        JaxVariant(
            "adaptive_grad_clip",
            "alone",
            lambda: _transform_step(optax.adaptive_grad_clip(AGC_CLIPPING)),
        ),
        JaxVariant(
            "stabilize",
            "alone",
            lambda: _transform_step(optax_gradflow.stabilize(initial_threshold=THRESHOLD)),
            "default config, initial_threshold=1 (no warm-up)",
        ),
        JaxVariant(
            "stabilize (data warm-up)",
            "alone",
            lambda: _transform_step(optax_gradflow.stabilize(config=warmup_config)),
            "presets.seed() in data mode, every step a warm-up step (sorts the norm history)",
        ),
        JaxVariant(
            "floor",
            "alone",
            lambda: _transform_step(scale_by_norm_floor(THRESHOLD)),
            "global norm, then one multiply by a scalar",
        ),
        JaxVariant("no clipping + adam", "chained", lambda: _transform_step(adam())),
        JaxVariant(
            "clip_by_global_norm + adam",
            "chained",
            lambda: _transform_step(optax.chain(optax.clip_by_global_norm(1.0), adam())),
        ),
        JaxVariant(
            "adaptive_grad_clip + adam",
            "chained",
            lambda: _transform_step(optax.chain(optax.adaptive_grad_clip(AGC_CLIPPING), adam())),
        ),
        JaxVariant(
            "chain(stabilize, adam)",
            "chained",
            lambda: _transform_step(
                optax.chain(optax_gradflow.stabilize(initial_threshold=THRESHOLD), adam())
            ),
        ),
        JaxVariant(
            "stabilized(adam)",
            "chained",
            lambda: _transform_step(optax_gradflow.stabilized(adam(), initial_threshold=THRESHOLD)),
            "track_update_ratio=True (default)",
        ),
        JaxVariant(
            "stabilized(adam, no ratio)",
            "chained",
            lambda: _transform_step(
                optax_gradflow.stabilized(
                    adam(), initial_threshold=THRESHOLD, track_update_ratio=False
                )
            ),
            "track_update_ratio=False",
        ),
        JaxVariant(
            "apply_if_finite(clip + adam)",
            "chained",
            lambda: _transform_step(
                optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(1.0), adam()), 10**9)
            ),
            "optax's answer to NaN steps: the wrapper form's peer",
        ),
        JaxVariant(
            "floor + adam",
            "chained",
            lambda: _transform_step(optax.chain(scale_by_norm_floor(THRESHOLD), adam())),
            "the floor, then adam",
        ),
    ]


def _tree(size: int, seed: int, norm: float | None) -> dict[str, jax.Array]:
    rows = size // (NUM_LEAVES * LEAF_COLUMNS)
    keys = jax.random.split(jax.random.PRNGKey(seed), NUM_LEAVES)
    tree = {
        f"w{i}": jax.random.normal(keys[i], (rows, LEAF_COLUMNS), jnp.float32)
        for i in range(NUM_LEAVES)
    }
    if norm is not None:
        total = optax.tree.norm(tree)
        tree = jax.tree.map(lambda x: x * (norm / total), tree)
    return jax.block_until_ready(tree)


def _fresh_copy(tree):
    # Distinct buffers for every leaf: a donated argument must not alias another.
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _count(tree) -> int:
    """The number of elements of ``tree``'s leaves (arrays or shape-dtype structs)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _nbytes(tree) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def _hlo_stats(text: str) -> dict[str, int]:
    lines = text.splitlines()
    entry = next((i for i, line in enumerate(lines) if line.startswith("ENTRY")), 0)
    body = lines[entry:]
    return {
        "hlo_lines": len(lines),
        "entry_fusions": sum(" fusion(" in line for line in body),
        "entry_conditionals": sum(" conditional(" in line for line in body),
        "entry_copies": sum(" copy(" in line for line in body),
        "sorts": text.count(" sort("),
    }


def _time_jax_group(
    members: list[JaxVariant], size: int, grads, reference: str, repeats: int, warmup: int
) -> list[dict[str, Any]]:
    """Compiles every member (round-robin), then times them interleaved."""
    carry: dict[str, list[Any]] = {}
    compile_s: dict[str, float] = {}
    info: dict[str, dict[str, Any]] = {}
    for v in members:
        step, tx = v.make()
        params = _tree(size, seed=2, norm=None)
        state = _fresh_copy(tx.init(params))
        t0 = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
        compile_s[v.name] = time.perf_counter() - t0
        info[v.name] = {"state_bytes": _nbytes(state), **_hlo_stats(compiled.as_text())}
        carry[v.name] = [compiled, params, state]

    def make_call(name):
        def call():
            compiled, params, state = carry[name]
            params, state = compiled(params, state, grads)
            jax.block_until_ready((params, state))
            carry[name][1:] = [params, state]

        return call

    times = interleaved({v.name: make_call(v.name) for v in members}, warmup, repeats)
    summary = summarize(times, reference)
    floor = next(v.name for v in members if v.name.startswith("floor"))
    rows = []
    for v in members:
        rows.append(
            {
                "framework": "jax",
                "size": size,
                "group": members[0].group,
                "variant": v.name,
                "note": v.note,
                "reference": reference,
                **summary[v.name],
                "floor": floor,
                "ratio_to_floor": float(np.median(times[v.name] / times[floor])),
                "compile_s": compile_s[v.name],
                "compile_ratio": compile_s[v.name] / compile_s[reference],
                **info[v.name],
            }
        )
    return rows


def run_jax(sizes: list[int], repeats: int, warmup: int) -> tuple[list[dict[str, Any]], list]:
    variants = jax_variants()
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for size in sizes:
        grads = _tree(size, seed=1, norm=GRAD_NORM)
        for group, reference in (
            ("alone", "clip_by_global_norm"),
            ("chained", "clip_by_global_norm + adam"),
        ):
            members = [v for v in variants if v.group == group]
            # Parameters (and Adam's two moments) per variant, plus the shared grads.
            per_variant = (3 if group == "chained" else 1) * size * 4
            need = len(members) * per_variant + 2 * size * 4
            avail = _mem_available()
            if avail is not None and need > 0.8 * avail:
                msg = (
                    f"{group} at {size:.0e}: needs ~{need / 2**30:.1f} GiB, "
                    f"{avail / 2**30:.1f} GiB available"
                )
                print(f"[jax] skipping {msg}", flush=True)
                skipped.append(msg)
                continue
            print(f"[jax] {group} at {size:.0e} parameters: {len(members)} variants", flush=True)
            rows += _time_jax_group(members, size, grads, reference, repeats, warmup)
            gc.collect()
        del grads
        gc.collect()
    return rows, skipped


# ----------------------------------------------------------------------------
# The whole jitted train step: what a user pays.

TRAIN_INPUTS = 256
TRAIN_BATCH = 64
# Hidden width -> about 1M and 10M parameters: 256 h + h^2 + h (weights and
# biases of three dense layers, 256 -> h -> h -> 1); "small" (49,537
# parameters) is the smoke run's.
TRAIN_WIDTHS = {"small": 128, "1M": 896, "10M": 3072}


def _mlp_params(width: int, seed: int) -> dict[str, jax.Array]:
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)

    def dense(key, n_in, n_out):
        return jax.random.normal(key, (n_in, n_out), jnp.float32) / np.sqrt(n_in)

    return {
        "w1": dense(k1, TRAIN_INPUTS, width),
        "b1": jnp.zeros((width,), jnp.float32),
        "w2": dense(k2, width, width),
        "b2": jnp.zeros((width,), jnp.float32),
        "w3": dense(k3, width, 1),
        "b3": jnp.zeros((1,), jnp.float32),
    }


def _mlp_loss(params, x, y):
    h = jax.nn.relu(x @ params["w1"] + params["b1"])
    h = jax.nn.relu(h @ params["w2"] + params["b2"])
    return jnp.mean((h @ params["w3"] + params["b3"] - y) ** 2)


def _train_step(tx: optax.GradientTransformation, with_value: bool):
    """``(params, state, x, y) -> (params, state)``: loss, gradient, update, apply.

    Params and state come back in the order they come in, so that donating
    both pairs each buffer with its own output (no copies).
    """
    tx = optax.with_extra_args_support(tx)

    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(_mlp_loss)(params, x, y)
        extra = {"value": loss} if with_value else {}
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    return step


def train_step_variants() -> dict[str, tuple[Callable[[], Any], bool]]:
    """name -> (transformation factory, whether the loss is passed as value=)."""
    adam = lambda: optax.adam(LEARNING_RATE)
    clip = lambda: optax.clip_by_global_norm(THRESHOLD)
    return {
        "adam (no clipping)": (adam, False),
        "clip_by_global_norm + adam": (lambda: optax.chain(clip(), adam()), False),
        "chain(stabilize, adam)": (
            lambda: optax.chain(optax_gradflow.stabilize(LEARNING_RATE), adam()),
            True,
        ),
        "stabilized(adam)": (lambda: optax_gradflow.stabilized(adam(), LEARNING_RATE), True),
        "apply_if_finite(clip + adam)": (
            lambda: optax.apply_if_finite(optax.chain(clip(), adam()), 10**9),
            False,
        ),
    }


def _interleave_carried(carry: dict[str, list[Any]], extra: tuple, warmup: int, repeats: int):
    """Times ``carry[name][0](*carry[name][1:3], *extra)`` round-robin, carrying
    the returned (params, state) into the next call (their buffers are donated)."""

    def make_call(name):
        def call():
            compiled, params, state = carry[name]
            params, state = compiled(params, state, *extra)
            jax.block_until_ready((params, state))
            carry[name][1:] = [params, state]

        return call

    return interleaved({name: make_call(name) for name in carry}, warmup, repeats)


def _time_train_step(label: str, width: int, repeats: int, warmup: int) -> list[dict[str, Any]]:
    reference = "clip_by_global_norm + adam"
    x = jax.random.normal(jax.random.PRNGKey(7), (TRAIN_BATCH, TRAIN_INPUTS), jnp.float32)
    y = jnp.sin(x[:, :1])
    carry: dict[str, list[Any]] = {}
    compile_s: dict[str, float] = {}
    size = 0
    for name, (make, with_value) in train_step_variants().items():
        tx = make()
        params = _mlp_params(width, seed=3)
        size = _count(params)
        state = _fresh_copy(tx.init(params))
        t0 = time.perf_counter()
        compiled = (
            jax.jit(_train_step(tx, with_value), donate_argnums=(0, 1))
            .lower(params, state, x, y)
            .compile()
        )
        compile_s[name] = time.perf_counter() - t0
        carry[name] = [compiled, params, state]
    print(f"[jax] train step at {label} ({size:,} parameters)", flush=True)
    times = _interleave_carried(carry, (x, y), warmup, repeats)
    rows = make_rows(
        summarize(times, reference), reference, framework="jax", group="train step", label=label
    )
    for row in rows:
        row.update(size=size, compile_s=compile_s[row["variant"]])
    return rows


def run_train_step(widths: dict[str, int], repeats: int, warmup: int) -> list[dict[str, Any]]:
    """The whole jitted train step of an MLP, params and optimizer state donated."""
    rows = []
    for label, width in widths.items():
        rows += _time_train_step(label, width, repeats, warmup)
        gc.collect()
    return rows


# The compile rows: the clip users would otherwise chain, and the stabilizer's two forms.
COMPILE_VARIANTS = ("clip_by_global_norm + adam", "chain(stabilize, adam)", "stabilized(adam)")


def run_compile(label: str, width: int, repeats: int, warmup: int) -> list[dict[str, Any]]:
    """Seconds of ``jax.jit(step).lower(...).compile()`` for the whole train step.

    Every round builds each variant afresh (its transformation, its step
    function and its ``jax.jit``, outside the timed region), so that no
    trace or executable is reused; the timed call traces, lowers and
    compiles. The arguments are abstract (``jax.ShapeDtypeStruct``): nothing
    is allocated or run.
    """
    reference = "clip_by_global_norm + adam"
    variants = {name: train_step_variants()[name] for name in COMPILE_VARIANTS}
    params = jax.eval_shape(lambda: _mlp_params(width, seed=3))
    data = (
        jax.ShapeDtypeStruct((TRAIN_BATCH, TRAIN_INPUTS), jnp.float32),
        jax.ShapeDtypeStruct((TRAIN_BATCH, 1), jnp.float32),
    )
    args = {
        name: (params, jax.eval_shape(make().init, params), *data)
        for name, (make, _) in variants.items()
    }
    fresh: dict[str, Any] = {}

    def make_prepare(name):
        make, with_value = variants[name]

        def prepare():
            fresh[name] = jax.jit(_train_step(make(), with_value), donate_argnums=(0, 1))

        return prepare

    def make_call(name):
        def call():
            fresh[name].lower(*args[name]).compile()

        return call

    size = _count(params)
    print(f"[jax] compile of the train step at {label} ({size:,} parameters)", flush=True)
    times = interleaved(
        {name: make_call(name) for name in variants},
        warmup,
        repeats,
        prepare={name: make_prepare(name) for name in variants},
    )
    summary = summarize(times, reference)
    return make_rows(summary, reference, framework="jax", group="compile", label=label, size=size)


def _time_eager(members: dict[str, Any], reference: str, grads, params, repeats, warmup):
    states = {name: tx.init(params) for name, tx in members.items()}

    def make_call(name):
        def call():
            updates, states[name] = members[name].update(grads, states[name], params)
            jax.block_until_ready((updates, states[name]))

        return call

    times = interleaved({name: make_call(name) for name in members}, warmup, repeats)
    summary = summarize(times, reference)
    return make_rows(summary, reference, framework="jax", group="eager", size=_count(params))


def run_eager(size: int, repeats: int, warmup: int) -> list[dict[str, Any]]:
    """``update`` called outside ``jit``, as a notebook or a debugging session does."""
    grads = _tree(size, seed=1, norm=GRAD_NORM)
    params = _tree(size, seed=2, norm=None)
    adam = lambda: optax.adam(LEARNING_RATE)
    clip = lambda: optax.clip_by_global_norm(THRESHOLD)
    groups = {
        "clip_by_global_norm": {
            "clip_by_global_norm": clip(),
            "stabilize": optax_gradflow.stabilize(initial_threshold=THRESHOLD),
        },
        "clip_by_global_norm + adam": {
            "clip_by_global_norm + adam": optax.chain(clip(), adam()),
            "chain(stabilize, adam)": optax.chain(
                optax_gradflow.stabilize(initial_threshold=THRESHOLD), adam()
            ),
            "stabilized(adam)": optax_gradflow.stabilized(adam(), initial_threshold=THRESHOLD),
        },
    }
    rows = []
    for reference, members in groups.items():
        print(f"[jax] eager calls at {size:.0e}, against {reference}", flush=True)
        rows += _time_eager(members, reference, grads, params, repeats, warmup)
    return rows


# ----------------------------------------------------------------------------
# PyTorch variants.


def _torch_adapter():
    """The project's PyTorch adapter class, or None if it is not importable yet."""
    try:
        from optax_gradflow.torch import GradientFlowStabilizer
    except ImportError as e:
        print(f"[torch] optax_gradflow.torch not importable ({e}); its row is skipped.")
        return None
    return GradientFlowStabilizer


def _torch_params(torch, size: int, gen):
    rows = size // (NUM_LEAVES * LEAF_COLUMNS)
    params = [
        torch.nn.Parameter(torch.randn(rows, LEAF_COLUMNS, generator=gen))
        for _ in range(NUM_LEAVES)
    ]
    for p in params:
        p.grad = torch.empty_like(p)
    return params


def _torch_source(torch, size: int, gen) -> list[Any]:
    """The gradients every call starts from: four leaves of global norm ``GRAD_NORM``."""
    rows = size // (NUM_LEAVES * LEAF_COLUMNS)
    source = [torch.randn(rows, LEAF_COLUMNS, generator=gen) for _ in range(NUM_LEAVES)]
    total = torch.sqrt(sum(torch.sum(s * s) for s in source))
    return [s * (GRAD_NORM / total) for s in source]


def _restorer(torch, params, source) -> Callable[[], None]:
    """Copies ``source`` into the parameters' ``.grad`` (in place, so each is a new version)."""

    def restore():
        with torch.no_grad():
            for p, s in zip(params, source, strict=True):
                p.grad.copy_(s)

    return restore


# The adapter's documented per-step call is GradientFlowStabilizer.clip_gradients
# (eager). torch.compile is documented for the functional core only (README,
# "PyTorch"; SPEC.md, "torch.compile": `update` compiles with fullgraph=True), so
# the compiled rows compile `update`, not the class.
ADAPTER_CALL = "GradientFlowStabilizer.clip_gradients"
# The same call with the scalar logic as tensor operations (the path taken off
# the CPU); on the CPU the default takes the host path.
ADAPTER_DEVICE_CALL = "GradientFlowStabilizer.clip_gradients (path='device')"
ADAPTER_COMPILED = "update (torch.compile, in place)"
CLASS_NOT_COMPILED = (
    "GradientFlowStabilizer.clip_gradients under torch.compile: not measured, the "
    "adapter documents torch.compile for the functional update only"
)
ZCLIP_CALL = "zclip.ZClip.step"


def _torch_calls(torch, size: int, clippers: dict[str, Any]):
    """name -> (restore, call): ``restore`` resets the gradients, ``call`` clips them."""
    gen = torch.Generator().manual_seed(0)
    source = _torch_source(torch, size, gen)
    calls: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {}

    def register(name, params, fn):
        calls[name] = (_restorer(torch, params, source), fn)

    ps = _torch_params(torch, size, gen)
    register("clip_grad_norm_", ps, lambda: torch.nn.utils.clip_grad_norm_(ps, THRESHOLD))

    ps_s = _torch_params(torch, size, gen)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    scaler.scale(torch.ones(()))  # initialises the scale tensor
    opt = torch.optim.SGD(ps_s, lr=0.0)

    def scaler_step():
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(ps_s, THRESHOLD)
        scaler.update()

    register("GradScaler.unscale_ + clip_grad_norm_", ps_s, scaler_step)

    if clippers.get("zclip") is not None:
        ps_z = _torch_params(torch, size, gen)
        module = torch.nn.ParameterList(ps_z)
        zc = clippers["zclip"]()
        register(ZCLIP_CALL, ps_z, lambda: zc.step(module))
    if clippers.get("autoclip") is not None:
        ps_q = _torch_params(torch, size, gen)
        qc = clippers["autoclip"](ps_q, quantile=0.9, history_length=1000, global_threshold=True)
        register("autoclip QuantileClip (global)", ps_q, qc.step)
    if clippers.get("adapter") is not None:
        ps_a = _torch_params(torch, size, gen)
        # Configured like the JAX rows: an explicit initial threshold, so no warm-up.
        stab = clippers["adapter"](initial_threshold=THRESHOLD)
        register(ADAPTER_CALL, ps_a, lambda: stab.clip_gradients(ps_a))
        ps_d = _torch_params(torch, size, gen)
        on_device = clippers["adapter"](initial_threshold=THRESHOLD, path="device")
        register(ADAPTER_DEVICE_CALL, ps_d, lambda: on_device.clip_gradients(ps_d))
    return calls


def _torch_compiled_calls(torch, size: int):
    """Like ``_torch_calls``, each clip compiled with ``torch.compile(fullgraph=True)``.

    The functional ``update`` runs in place on the gradients, as the class
    runs it, with ``due=None`` (its default: the periodic work computed every
    step and selected), its state carried from call to call.
    """
    from optax_gradflow.torch import init_state, update

    gen = torch.Generator().manual_seed(0)
    source = _torch_source(torch, size, gen)
    ps = _torch_params(torch, size, gen)
    clip = torch.compile(lambda: torch.nn.utils.clip_grad_norm_(ps, THRESHOLD), fullgraph=True)

    config = optax_gradflow.StabilizerConfig()
    ps_u = _torch_params(torch, size, gen)
    state = {"state": init_state(config=config, initial_threshold=THRESHOLD)}

    def functional(grads, state):
        return update(grads, state, config=config, inplace=True, validate=False)

    step = torch.compile(functional, fullgraph=True)

    def stabilize():
        with torch.no_grad():
            _, state["state"] = step([p.grad for p in ps_u], state["state"])

    return {
        "clip_grad_norm_ (torch.compile)": (_restorer(torch, ps, source), clip),
        ADAPTER_COMPILED: (_restorer(torch, ps_u, source), stabilize),
    }


def _time_torch_group(
    torch, calls, group: str, reference: str, size: int, repeats: int, warmup: int
):
    names = list(calls)
    print(f"[torch] {group} at {size:.0e} parameters: {len(names)} variants", flush=True)
    times = interleaved(
        {name: calls[name][1] for name in names},
        warmup,
        repeats,
        prepare={name: calls[name][0] for name in names},
    )
    summary = summarize(times, reference)
    threads = torch.get_num_threads()
    rows = make_rows(summary, reference, framework="torch", size=size, group=group, threads=threads)
    if ZCLIP_CALL in times:
        for row in rows:
            row["vs_zclip"] = paired_ratio(times, row["variant"], ZCLIP_CALL)
    return rows


def run_torch(
    sizes: list[int], repeats: int, warmup: int, eager: bool, compiled: bool, threads: int = 0
) -> tuple[list[dict[str, Any]], list]:
    """The eager clipping calls and (or) the compiled ones, interleaved at each size.

    ``threads`` > 0 sets PyTorch's intra-op threads (on a shared machine, a
    pool as large as the cores waits for the busy ones at every small op).
    """
    try:
        import torch
    except ImportError:
        print("[torch] not installed; PyTorch rows skipped.")
        return [], ["torch not installed"]
    if threads > 0:
        torch.set_num_threads(threads)
    print(f"[torch] {torch.get_num_threads()} intra-op threads", flush=True)
    skipped: list[str] = []
    clippers: dict[str, Any] = {}
    try:
        from zclip import ZClip

        clippers["zclip"] = ZClip
    except ImportError as e:
        print(f"[torch] zclip not importable ({e}); its row is skipped.")
        skipped.append("zclip not installed")
    try:
        from autoclip.torch import QuantileClip

        clippers["autoclip"] = QuantileClip
    except ImportError:
        skipped.append("autoclip not installed")
    clippers["adapter"] = _torch_adapter()
    if clippers["adapter"] is None:
        skipped.append("optax_gradflow.torch not importable")
        compiled = False
    if compiled:
        print(f"[torch] {CLASS_NOT_COMPILED}.")
        skipped.append(CLASS_NOT_COMPILED)

    rows: list[dict[str, Any]] = []
    # ZClip initialises its statistics after 25 steps; time it after that.
    # The compiled calls compile (and may recompile once) in these rounds.
    warmup = max(warmup, 30)
    for size in sizes:
        if eager:
            calls = _torch_calls(torch, size, clippers)
            rows += _time_torch_group(
                torch, calls, "eager", "clip_grad_norm_", size, repeats, warmup
            )
            gc.collect()
        if not compiled:
            continue
        # Each size compiled from scratch, with static shapes.
        torch._dynamo.reset()
        try:
            calls = _torch_compiled_calls(torch, size)
            rows += _time_torch_group(
                torch, calls, "compiled", "clip_grad_norm_ (torch.compile)", size, repeats, warmup
            )
        except Exception as e:  # Inductor needs a working C++ compiler.
            msg = f"torch.compile at {size:.0e}: {type(e).__name__}: {e}"
            print(f"[torch] skipping {msg}", flush=True)
            skipped.append(msg)
        gc.collect()
    return rows, skipped


def torch_state_bytes(torch, size: int) -> tuple[int, int]:
    """Bytes of ``GradientFlowStabilizer``'s state after init and after one clip."""
    from optax_gradflow.torch import GradientFlowStabilizer

    gen = torch.Generator().manual_seed(0)
    params = _torch_params(torch, size, gen)
    _restorer(torch, params, _torch_source(torch, size, gen))()
    stab = GradientFlowStabilizer(initial_threshold=THRESHOLD)
    nbytes = lambda: sum(t.nbytes for t in stab.state.values())
    before = nbytes()
    stab.clip_gradients(params)
    return before, nbytes()


# ----------------------------------------------------------------------------
# State size.


def run_state(
    sizes: list[int], widths: dict[str, int], torch_sizes: list[int]
) -> list[dict[str, Any]]:
    """Bytes of the stabilizer's state after init and after one step, at each model size.

    JAX: ``stabilize`` on the trees of the update rows and the train step's
    MLPs; PyTorch: ``GradientFlowStabilizer`` on the PyTorch rows' parameters.
    """
    tx = optax_gradflow.stabilize(initial_threshold=THRESHOLD)
    update = jax.jit(tx.update)
    trees = [lambda size=size: _tree(size, seed=1, norm=GRAD_NORM) for size in sizes]
    trees += [lambda width=width: _mlp_params(width, seed=3) for width in widths.values()]
    rows = []
    for make in trees:
        grads = make()
        state = tx.init(grads)
        _, after = update(grads, state)
        size = _count(grads)
        rows.append(
            {
                "framework": "jax",
                "size": size,
                "state_bytes_init": _nbytes(state),
                "state_bytes": _nbytes(after),
            }
        )
    if torch_sizes and _torch_adapter() is not None:
        import torch

        for size in torch_sizes:
            before, after = torch_state_bytes(torch, size)
            rows.append(
                {
                    "framework": "torch",
                    "size": size,
                    "state_bytes_init": before,
                    "state_bytes": after,
                }
            )
    for r in rows:
        print(
            f"[state] {r['framework']} at {r['size']:,} parameters: "
            f"{r['state_bytes_init']:,} bytes after init, {r['state_bytes']:,} after a step",
            flush=True,
        )
    return rows


# ----------------------------------------------------------------------------
# Report.


def _fmt_size(size: int) -> str:
    return f"{size / 1e6:g}M"


def _fmt_ratio(r: dict[str, float]) -> str:
    return f"{r['ratio']:.3f}x ({r['ratio_p25']:.2f}-{r['ratio_p75']:.2f})"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The isolated update rows."""
    header = (
        "| size | group | variant | median ms | vs reference (IQR) | vs floor "
        "| compile s | compile vs ref | state bytes |"
    )
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {_fmt_size(r['size'])} | {r['group']} | {r['variant']} "
            f"| {r['median_s'] * 1e3:.3f} | {_fmt_ratio(r)} | {r['ratio_to_floor']:.2f}x "
            f"| {r['compile_s']:.2f} | {r['compile_ratio']:.1f}x | {r['state_bytes']:,} |"
        )
    return "\n".join(lines)


def format_step_table(rows: list[dict[str, Any]], unit: str = "ms") -> str:
    """Rows timed against one reference: median time and the paired ratio to it.

    A ``vs ZClip`` column is added when the rows have one (the PyTorch rows).
    """
    scale = {"ms": 1e3, "s": 1.0}[unit]
    zclip = any("vs_zclip" in r for r in rows)
    header = f"| size | group | variant | median {unit} | vs reference (IQR) | reference |"
    lines = [header + (" vs ZClip (IQR) |" if zclip else ""), "|---" * (6 + zclip) + "|"]
    for r in rows:
        line = (
            f"| {_fmt_size(r['size'])} | {r['group']} | {r['variant']} "
            f"| {r['median_s'] * scale:.3f} | {_fmt_ratio(r)} | {r['reference']} |"
        )
        if zclip:
            line += f" {_fmt_ratio(r['vs_zclip']) if 'vs_zclip' in r else ''} |"
        lines.append(line)
    return "\n".join(lines)


def format_state_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| framework | size | state bytes after init | state bytes after a step |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['framework']} | {r['size']:,} | {r['state_bytes_init']:,} "
            f"| {r['state_bytes']:,} |"
        )
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Target:
    """A ratio that must stay at or under ``limit`` (under it, if ``strict``)."""

    text: str
    rows: str  # the result's key: "jax", "train_step", "compile" or "torch"
    match: dict[str, Any]
    limit: float
    field: str = ""  # a nested paired ratio (such as "vs_zclip"); the row's own if ""
    strict: bool = False


TARGETS = (
    Target(
        "`stabilize` <= 1.5x `clip_by_global_norm` at 4k",
        "jax",
        {"size": 4_000, "group": "alone", "variant": "stabilize"},
        1.5,
    ),
    Target(
        "`chain(stabilize, adam)` <= 1.25x `chain(clip_by_global_norm, adam)` at 100k",
        "jax",
        {"size": 100_000, "group": "chained", "variant": "chain(stabilize, adam)"},
        1.25,
    ),
    *(
        Target(
            f"whole train step, `chain(stabilize, adam)` <= 1.00x at {label}",
            "train_step",
            {"label": label, "variant": "chain(stabilize, adam)"},
            1.0,
        )
        for label in ("1M", "10M")
    ),
    Target(
        "whole train step, `stabilized(adam)` <= 1.05x at 10M",
        "train_step",
        {"label": "10M", "variant": "stabilized(adam)"},
        1.05,
    ),
    *(
        Target(f"compile of the train step, `{v}` <= 2x", "compile", {"variant": v}, 2.0)
        for v in ("chain(stabilize, adam)", "stabilized(adam)")
    ),
    Target(
        "PyTorch `clip_gradients` <= 1.15x `clip_grad_norm_` at 1M",
        "torch",
        {"size": 1_000_000, "group": "eager", "variant": ADAPTER_CALL},
        1.15,
    ),
    Target(
        "PyTorch `clip_gradients` <= 1.05x `clip_grad_norm_` at 10M",
        "torch",
        {"size": 10_000_000, "group": "eager", "variant": ADAPTER_CALL},
        1.05,
    ),
    *(
        Target(
            f"PyTorch `clip_gradients` faster than ZClip at {_fmt_size(size)}",
            "torch",
            {"size": size, "group": "eager", "variant": ADAPTER_CALL},
            1.0,
            field="vs_zclip",
            strict=True,
        )
        for size in (1_000_000, 10_000_000)
    ),
)


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured paired ratio (None if not measured) and whether it is met."""
    out = []
    for t in TARGETS:
        row = next(
            (
                r
                for r in result[t.rows]
                if all(r.get(k) == v for k, v in t.match.items()) and (not t.field or t.field in r)
            ),
            None,
        )
        entry: dict[str, Any] = {"target": t.text, "measured": None, "iqr": None, "met": None}
        if row is not None:
            ratio = row[t.field] if t.field else row
            entry["measured"] = ratio["ratio"]
            entry["iqr"] = [ratio["ratio_p25"], ratio["ratio_p75"]]
            below = ratio["ratio"] < t.limit if t.strict else ratio["ratio"] <= t.limit
            entry["met"] = bool(below)
        out.append(entry)
    for framework in ("jax", "torch"):
        rows = [r for r in result["state"] if r["framework"] == framework]
        seen = sorted({r[k] for r in rows for k in ("state_bytes_init", "state_bytes")})
        out.append(
            {
                "target": f"{framework} state bytes independent of model size",
                "measured": seen or None,
                "iqr": None,
                # Two sizes at least, else nothing was shown.
                "met": len(seen) == 1 if len(rows) > 1 else None,
            }
        )
    return out


def format_targets(entries: list[dict[str, Any]]) -> str:
    lines = []
    for t in entries:
        m = t["measured"]
        if m is None:
            measured = "n/a"
        elif t["iqr"] is None:
            measured = ", ".join(f"{b:,}" for b in m) + " bytes"
        else:
            measured = f"{m:.3f}x (IQR {t['iqr'][0]:.2f}-{t['iqr'][1]:.2f})"
        met = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        lines.append(f"{t['target']}: {measured} ({met})")
    return "\n".join(lines)


ROWS = ("update", "step", "compile", "eager", "torch", "torch-compile", "state")
DEFAULT_ROWS = "update,step,compile,eager,torch,state"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows",
        default=DEFAULT_ROWS,
        help=f"comma-separated rows to run, among {','.join(ROWS)}",
    )
    parser.add_argument("--sizes", default="1e6,1e7,1e8", help="update rows: parameter counts")
    parser.add_argument("--torch-sizes", default="1e6,1e7", help="sizes of the PyTorch rows")
    parser.add_argument("--repeats", type=int, default=50, help="measured rounds (>= 30)")
    parser.add_argument("--warmup", type=int, default=5, help="discarded rounds")
    parser.add_argument(
        "--compile-repeats", type=int, default=7, help="measured rounds of the compile rows"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch.set_num_threads for the PyTorch rows (0: PyTorch's default)",
    )
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the results")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: the smallest sizes, the small MLP, 10 rounds (1 of compile)",
    )
    parser.add_argument("--no-torch", action="store_true", help="drop the PyTorch rows")
    parser.add_argument("--only-torch", action="store_true", help="keep only the PyTorch rows")
    parser.add_argument(
        "--train-widths",
        default="1M,10M",
        help="train step rows: MLP sizes among " + ",".join(TRAIN_WIDTHS) + " ('' for none)",
    )
    parser.add_argument(
        "--compile-width", default="1M", help="the MLP of the compile rows, as --train-widths"
    )
    parser.add_argument("--eager-size", default="1e6", help="size of the eager (un-jitted) rows")
    parser.add_argument(
        "--only-steps", action="store_true", help="keep only the train-step, compile and eager rows"
    )
    args = parser.parse_args(argv)

    rows = {r.strip() for r in args.rows.split(",") if r.strip()}
    if not rows <= set(ROWS):
        parser.error(f"unknown rows {sorted(rows - set(ROWS))}; choose among {', '.join(ROWS)}")
    if args.no_torch:
        rows -= {"torch", "torch-compile"}
    if args.only_torch:
        rows &= {"torch", "torch-compile"}
    if args.only_steps:
        rows &= {"step", "compile", "eager"}

    unit = NUM_LEAVES * LEAF_COLUMNS
    parse = lambda text: [int(float(s)) // unit * unit for s in text.split(",") if s.strip()]
    sizes, torch_sizes = parse(args.sizes), parse(args.torch_sizes)
    repeats, compile_repeats = args.repeats, args.compile_repeats
    widths = {k: TRAIN_WIDTHS[k] for k in args.train_widths.split(",") if k.strip()}
    compile_label = args.compile_width
    eager_size = parse(args.eager_size)[0] if args.eager_size.strip() else None
    if args.quick:
        sizes, torch_sizes, repeats, compile_repeats = [min(sizes)], [min(torch_sizes)], 10, 1
        widths, compile_label, eager_size = {"small": TRAIN_WIDTHS["small"]}, "small", sizes[0]
    if not widths:
        rows.discard("step")
    if not eager_size:
        rows.discard("eager")
    with_torch = "torch" in rows or "torch-compile" in rows

    start = time.perf_counter()
    # PyTorch first: for a few seconds after a JAX compile, the XLA threads
    # still running made PyTorch's small multi-threaded kernels (a vecdot of
    # 40k elements) 1,000x slower on 2 cores; the freed 100M-parameter
    # buffers disturbed them too.
    torch_rows, torch_skipped = [], ["not asked for"]
    if with_torch:
        torch_rows, torch_skipped = run_torch(
            torch_sizes,
            repeats,
            args.warmup,
            eager="torch" in rows,
            compiled="torch-compile" in rows,
            threads=args.torch_threads,
        )
    step_rows = run_train_step(widths, repeats, args.warmup) if "step" in rows else []
    compile_rows = []
    if "compile" in rows:
        width = TRAIN_WIDTHS[compile_label]
        # One discarded round (a smoke run has compiled these steps already).
        compile_rows = run_compile(
            compile_label, width, compile_repeats, warmup=int(not args.quick)
        )
    eager_rows = run_eager(eager_size, repeats, args.warmup) if "eager" in rows else []
    jax_rows, jax_skipped = [], ["not asked for"]
    if "update" in rows:
        jax_rows, jax_skipped = run_jax(sizes, repeats, args.warmup)
    state_rows = []
    if "state" in rows:
        state_sizes = sizes if "update" in rows else []
        state_widths = widths if "step" in rows else {}
        state_rows = run_state(state_sizes, state_widths, torch_sizes if with_torch else [])
    result = {
        "command": "python " + " ".join([pathlib.Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "machine": machine_info(),
        "settings": {
            "rows": sorted(rows),
            "sizes": sizes,
            "torch_sizes": torch_sizes,
            "repeats": repeats,
            "warmup": args.warmup,
            "compile_repeats": compile_repeats,
            "torch_threads": args.torch_threads or "default",
            "num_leaves": NUM_LEAVES,
            "threshold": THRESHOLD,
            "grad_norm": GRAD_NORM,
            "adam_learning_rate": LEARNING_RATE,
            "agc_clipping": AGC_CLIPPING,
        },
        "train_step": step_rows,
        "train_step_settings": {
            "widths": widths,
            "compile_width": {compile_label: TRAIN_WIDTHS[compile_label]},
            "inputs": TRAIN_INPUTS,
            "batch": TRAIN_BATCH,
            "reference": "clip_by_global_norm + adam",
        },
        "compile": compile_rows,
        "eager": eager_rows,
        "jax": jax_rows,
        "jax_skipped": jax_skipped,
        "torch": torch_rows,
        "torch_skipped": torch_skipped,
        "state": state_rows,
    }
    result["targets"] = targets(result)
    result["wall_s"] = time.perf_counter() - start
    tables = (
        ("Whole jitted train step (params and optimizer state donated):", step_rows, "ms"),
        ("Compile time of the train step (trace, lower, compile):", compile_rows, "s"),
        ("Eager update calls (no jit):", eager_rows, "ms"),
        ("PyTorch clipping calls (CPU):", torch_rows, "ms"),
    )
    for title, table_rows, unit_name in tables:
        if table_rows:
            print(f"\n{title}")
            print(format_step_table(table_rows, unit_name))
    if jax_rows:
        print("\nIsolated update steps:")
        print(format_table(jax_rows))
    if state_rows:
        print("\nThe stabilizer's state:")
        print(format_state_table(state_rows))
    print("\nTargets:")
    print(format_targets(result["targets"]))
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path} in {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
