"""Per-step cost of the stabilizer against plain clipping, in JAX and PyTorch.

Every variant of a group runs interleaved in one process: each round calls
every variant once, in an order rotated from round to round, and waits for
its result. The table quotes the median step time and the median of the
per-round ratios to the reference of the group, which cancels most of the
drift of a shared machine.

JAX groups, each step a jitted ``update`` plus ``optax.apply_updates`` with
the parameters and the optimizer state donated:

- ``alone``: the clipping transformation by itself; the reference is
  ``optax.clip_by_global_norm``. The floor is the barest global-norm clip:
  one reduction for the norm, then ``params + c * grads`` with a scalar ``c``.
- ``chained``: the same, followed by ``optax.adam``; the reference is
  ``optax.chain(optax.clip_by_global_norm, optax.adam)`` and the floor is the
  floor followed by ``optax.adam``.

PyTorch rows time one clipping call on gradients restored (outside the timed
region) before every call; the reference is ``torch.nn.utils.clip_grad_norm_``.

Usage::

    python benchmarks/overhead.py                      # 1e6, 1e7, 1e8 parameters
    python benchmarks/overhead.py --sizes 1e6 --quick  # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
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
    calls: dict[str, Callable[[], None]], warmup: int, repeats: int
) -> dict[str, np.ndarray]:
    """Seconds per call of every entry, measured round-robin.

    Round ``r`` starts at entry ``r mod len(calls)``, so no variant always runs
    right after the same neighbour. ``warmup`` rounds are run and discarded.
    """
    names = list(calls)
    times = {name: [] for name in names}
    for r in range(warmup + repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            calls[name]()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return {name: np.asarray(t) for name, t in times.items()}


def summarize(times: dict[str, np.ndarray], reference: str) -> dict[str, dict[str, float]]:
    """Median time and the median / IQR of the paired per-round ratios to ``reference``."""
    out = {}
    ref = times[reference]
    for name, t in times.items():
        ratios = t / ref
        out[name] = {
            "median_s": float(np.median(t)),
            "p25_s": float(np.percentile(t, 25)),
            "p75_s": float(np.percentile(t, 75)),
            "ratio": float(np.median(ratios)),
            "ratio_p25": float(np.percentile(ratios, 25)),
            "ratio_p75": float(np.percentile(ratios, 75)),
            "samples": len(t),
        }
    return out


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
# biases of three dense layers, 256 -> h -> h -> 1).
TRAIN_WIDTHS = {"1M": 896, "10M": 3072}


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
        size = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
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
    summary = summarize(times, reference)
    return [
        {
            "framework": "jax",
            "group": "train step",
            "size": size,
            "variant": name,
            "reference": reference,
            **summary[name],
            "compile_s": compile_s[name],
        }
        for name in carry
    ]


def run_train_step(widths: dict[str, int], repeats: int, warmup: int) -> list[dict[str, Any]]:
    """The whole jitted train step of an MLP, params and optimizer state donated."""
    rows = []
    for label, width in widths.items():
        rows += _time_train_step(label, width, repeats, warmup)
        gc.collect()
    return rows


def _time_eager(members: dict[str, Any], reference: str, grads, params, repeats, warmup):
    states = {name: tx.init(params) for name, tx in members.items()}

    def make_call(name):
        def call():
            updates, states[name] = members[name].update(grads, states[name], params)
            jax.block_until_ready((updates, states[name]))

        return call

    times = interleaved({name: make_call(name) for name in members}, warmup, repeats)
    summary = summarize(times, reference)
    size = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    return [
        {
            "framework": "jax",
            "group": "eager",
            "size": size,
            "variant": name,
            "reference": reference,
            **summary[name],
        }
        for name in members
    ]


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


def _build_adapter(cls, params):
    # Configured like the JAX rows: an explicit initial threshold, so no warm-up.
    sig = inspect.signature(cls)
    kwargs: dict[str, Any] = {}
    if "initial_threshold" in sig.parameters:
        kwargs["initial_threshold"] = THRESHOLD
    elif "learning_rate" in sig.parameters:
        kwargs["learning_rate"] = 1e-2  # 0.1 * sqrt(1 / 1e-2) = 1.0, the same threshold
    positional = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        and p.default is p.empty
        and p.name not in kwargs
    ]
    if positional and positional[0].name in ("params", "parameters"):
        return cls(params, **kwargs)
    return cls(**kwargs)


def _torch_params(torch, size: int, gen):
    rows = size // (NUM_LEAVES * LEAF_COLUMNS)
    params = [
        torch.nn.Parameter(torch.randn(rows, LEAF_COLUMNS, generator=gen))
        for _ in range(NUM_LEAVES)
    ]
    for p in params:
        p.grad = torch.empty_like(p)
    return params


def _torch_calls(torch, size: int, clippers: dict[str, Any]):
    """name -> (restore, call): ``restore`` resets the gradients, ``call`` clips them."""
    gen = torch.Generator().manual_seed(0)
    rows = size // (NUM_LEAVES * LEAF_COLUMNS)
    source = [torch.randn(rows, LEAF_COLUMNS, generator=gen) for _ in range(NUM_LEAVES)]
    total = torch.sqrt(sum(torch.sum(s * s) for s in source))
    source = [s * (GRAD_NORM / total) for s in source]
    calls: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {}

    def register(name, params, fn):
        def restore():
            with torch.no_grad():
                for p, s in zip(params, source, strict=True):
                    p.grad.copy_(s)

        calls[name] = (restore, fn)

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
        register("zclip.ZClip.step", ps_z, lambda: zc.step(module))
    if clippers.get("autoclip") is not None:
        ps_q = _torch_params(torch, size, gen)
        qc = clippers["autoclip"](ps_q, quantile=0.9, history_length=1000, global_threshold=True)
        register("autoclip QuantileClip (global)", ps_q, qc.step)
    if clippers.get("adapter") is not None:
        ps_a = _torch_params(torch, size, gen)
        try:
            stab = _build_adapter(clippers["adapter"], ps_a)
        except Exception as e:
            print(f"[torch] could not build GradientFlowStabilizer: {e!r}")
        else:
            register(
                "GradientFlowStabilizer.clip_gradients", ps_a, lambda: stab.clip_gradients(ps_a)
            )
    return calls


def run_torch(sizes: list[int], repeats: int, warmup: int) -> tuple[list[dict[str, Any]], list]:
    try:
        import torch
    except ImportError:
        print("[torch] not installed; PyTorch rows skipped.")
        return [], ["torch not installed"]
    skipped: list[str] = []
    clippers: dict[str, Any] = {}
    try:
        from zclip import ZClip

        clippers["zclip"] = ZClip
    except ImportError:
        skipped.append("zclip not installed")
    try:
        from autoclip.torch import QuantileClip

        clippers["autoclip"] = QuantileClip
    except ImportError:
        skipped.append("autoclip not installed")
    clippers["adapter"] = _torch_adapter()
    if clippers["adapter"] is None:
        skipped.append("optax_gradflow.torch not importable")

    rows: list[dict[str, Any]] = []
    reference = "clip_grad_norm_"
    # ZClip initialises its statistics after 25 steps; time it after that.
    warmup = max(warmup, 30)
    for size in sizes:
        calls = _torch_calls(torch, size, clippers)
        names = list(calls)
        times: dict[str, list[float]] = {name: [] for name in names}
        print(f"[torch] {size:.0e} parameters: {len(names)} variants", flush=True)
        for r in range(warmup + repeats):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                restore, call = calls[name]
                restore()
                t0 = time.perf_counter()
                call()
                dt = time.perf_counter() - t0
                if r >= warmup:
                    times[name].append(dt)
        summary = summarize({n: np.asarray(t) for n, t in times.items()}, reference)
        for name in names:
            rows.append(
                {
                    "framework": "torch",
                    "size": size,
                    "group": "alone",
                    "variant": name,
                    "reference": reference,
                    **summary[name],
                }
            )
        gc.collect()
    return rows, skipped


# ----------------------------------------------------------------------------
# Report.


def _fmt_size(size: int) -> str:
    return f"{size / 1e6:g}M"


def format_table(rows: list[dict[str, Any]], framework: str) -> str:
    if framework == "jax":
        header = (
            "| size | group | variant | median ms | vs reference (IQR) | vs floor "
            "| compile s | compile vs ref | state bytes |"
        )
        lines = [header, "|" + "---|" * 9]
        for r in rows:
            floor = f"{r['ratio_to_floor']:.2f}x"
            lines.append(
                f"| {_fmt_size(r['size'])} | {r['group']} | {r['variant']} "
                f"| {r['median_s'] * 1e3:.3f} "
                f"| {r['ratio']:.3f}x ({r['ratio_p25']:.2f}-{r['ratio_p75']:.2f}) | {floor} "
                f"| {r['compile_s']:.2f} | {r['compile_ratio']:.1f}x | {r['state_bytes']:,} |"
            )
    else:
        lines = ["| size | variant | median ms | vs clip_grad_norm_ (IQR) |", "|---|---|---|---|"]
        for r in rows:
            lines.append(
                f"| {_fmt_size(r['size'])} | {r['variant']} | {r['median_s'] * 1e3:.3f} "
                f"| {r['ratio']:.3f}x ({r['ratio_p25']:.2f}-{r['ratio_p75']:.2f}) |"
            )
    return "\n".join(lines)


def format_step_table(rows: list[dict[str, Any]]) -> str:
    """The train-step or eager rows: median time and the paired ratio to the reference."""
    lines = [
        "| size | variant | median ms | vs reference (IQR) | reference |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {_fmt_size(r['size'])} | {r['variant']} | {r['median_s'] * 1e3:.3f} "
            f"| {r['ratio']:.3f}x ({r['ratio_p25']:.2f}-{r['ratio_p75']:.2f}) "
            f"| {r['reference']} |"
        )
    return "\n".join(lines)


def targets(jax_rows, torch_rows) -> list[dict[str, Any]]:
    """The benchmark's targets, each with the measured value and whether it is met."""
    out = []

    def add(target: str, size: int, measured: float, limit: float) -> None:
        out.append({"target": target, "size": size, "measured": measured, "met": measured <= limit})

    by_variant = {(r["size"], r["variant"]): r for r in jax_rows}
    for r in jax_rows:
        size, variant = r["size"], r["variant"]
        if variant == "stabilize" and size <= 10_000:
            add("stabilize <= 2x clip_by_global_norm (the fixed cost)", size, r["ratio"], 2.0)
        if variant == "stabilize" and size >= 1_000_000:
            add("stabilize <= 1.05x clip_by_global_norm", size, r["ratio"], 1.05)
        if variant == "chain(stabilize, adam)" and size >= 1_000_000:
            add("chain(stabilize, adam) <= 1.00x clip_by_global_norm + adam", size, r["ratio"], 1.0)
            add("chain(stabilize, adam) <= 1.10x floor + adam", size, r["ratio_to_floor"], 1.10)
            add(
                "compile of chain(stabilize, adam) <= 2x clip_by_global_norm + adam",
                size,
                r["compile_ratio"],
                2.0,
            )
        chained = by_variant.get((size, "chain(stabilize, adam)"))
        if variant == "stabilized(adam)" and chained is not None and size >= 1_000_000:
            add(
                "stabilized(adam) <= 1.05x chain(stabilize, adam)",
                size,
                r["median_s"] / chained["median_s"],
                1.05,
            )
    by_size: dict[int, dict[str, dict[str, Any]]] = {}
    for r in torch_rows:
        by_size.setdefault(r["size"], {})[r["variant"]] = r
    for size, rs in by_size.items():
        ours = rs.get("GradientFlowStabilizer.clip_gradients")
        if ours is None:
            out.append({"target": "PyTorch adapter", "size": size, "measured": None, "met": None})
            continue
        out.append(
            {
                "target": "GradientFlowStabilizer <= 1.15x clip_grad_norm_",
                "size": size,
                "measured": ours["ratio"],
                "met": ours["ratio"] <= 1.15,
            }
        )
        if "zclip.ZClip.step" in rs:
            z = rs["zclip.ZClip.step"]
            out.append(
                {
                    "target": "GradientFlowStabilizer faster than ZClip",
                    "size": size,
                    "measured": ours["median_s"] / z["median_s"],
                    "met": ours["median_s"] < z["median_s"],
                }
            )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1e6,1e7,1e8", help="comma-separated parameter counts")
    parser.add_argument("--torch-sizes", default="1e6,1e7", help="sizes of the PyTorch rows")
    parser.add_argument("--repeats", type=int, default=50, help="measured rounds (>= 30)")
    parser.add_argument("--warmup", type=int, default=5, help="discarded rounds")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="1e6 only, 10 rounds: a smoke run")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    parser.add_argument("--only-torch", action="store_true", help="only the PyTorch rows")
    parser.add_argument(
        "--train-widths",
        default="1M,10M",
        help="whole train steps: MLP sizes among " + ",".join(TRAIN_WIDTHS) + " ('' for none)",
    )
    parser.add_argument(
        "--eager-size", default="1e6", help="size of the eager (un-jitted) rows ('' for none)"
    )
    parser.add_argument(
        "--only-steps", action="store_true", help="only the train-step and eager rows"
    )
    args = parser.parse_args(argv)

    unit = NUM_LEAVES * LEAF_COLUMNS
    parse = lambda text: [int(float(s)) // unit * unit for s in text.split(",") if s.strip()]
    sizes, torch_sizes, repeats = parse(args.sizes), parse(args.torch_sizes), args.repeats
    if args.quick:
        sizes, torch_sizes, repeats = [min(sizes)], [min(torch_sizes)], 10

    widths = {k: TRAIN_WIDTHS[k] for k in args.train_widths.split(",") if k.strip()}
    eager_size = parse(args.eager_size)[0] if args.eager_size.strip() else None
    if args.quick:
        widths, eager_size = {"small": 128}, sizes[0]
    if args.only_steps:
        args.no_torch = args.only_torch = True

    start = time.perf_counter()
    step_rows = run_train_step(widths, repeats, args.warmup) if widths else []
    eager_rows = run_eager(eager_size, repeats, args.warmup) if eager_size else []
    # PyTorch first: after the JAX rows, XLA's CPU thread pool and the freed
    # 100M-parameter buffers disturbed the PyTorch timings.
    torch_rows, torch_skipped = [], ["--no-torch"]
    if not args.no_torch:
        torch_rows, torch_skipped = run_torch(torch_sizes, repeats, args.warmup)
    jax_rows, jax_skipped = [], ["--only-torch or --only-steps"]
    if not args.only_torch:
        jax_rows, jax_skipped = run_jax(sizes, repeats, args.warmup)
    result = {
        "command": "python " + " ".join([pathlib.Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "machine": machine_info(),
        "settings": {
            "sizes": sizes,
            "torch_sizes": torch_sizes,
            "repeats": repeats,
            "warmup": args.warmup,
            "num_leaves": NUM_LEAVES,
            "threshold": THRESHOLD,
            "grad_norm": GRAD_NORM,
            "adam_learning_rate": LEARNING_RATE,
            "agc_clipping": AGC_CLIPPING,
        },
        "train_step": step_rows,
        "train_step_settings": {
            "widths": widths,
            "inputs": TRAIN_INPUTS,
            "batch": TRAIN_BATCH,
            "reference": "clip_by_global_norm + adam",
        },
        "eager": eager_rows,
        "jax": jax_rows,
        "jax_skipped": jax_skipped,
        "torch": torch_rows,
        "torch_skipped": torch_skipped,
        "targets": targets(jax_rows, torch_rows),
        "wall_s": time.perf_counter() - start,
    }
    if step_rows:
        print("\nWhole jitted train step (params and optimizer state donated):")
        print(format_step_table(step_rows))
    if eager_rows:
        print("\nEager update calls (no jit):")
        print(format_step_table(eager_rows))
    print()
    print(format_table(jax_rows, "jax"))
    if torch_rows:
        print()
        print(format_table(torch_rows, "torch"))
    print()
    for t in result["targets"]:
        measured = "n/a" if t["measured"] is None else f"{t['measured']:.3f}"
        met = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        print(f"{t['target']} at {_fmt_size(t['size'])}: {measured} ({met})")
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path} in {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
