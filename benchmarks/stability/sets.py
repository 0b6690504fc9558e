"""The stability suite's entries: each task at two or three learning rates, in one of two sets.

**selection**: the tasks on which the stabilizer's rules may be chosen and
tuned. **validation**: tasks and seeds that play no part in any choice; their
results are reported apart, and only read. Each kind of instability appears
in both sets, in different forms (architecture, optimizer, data).

The learning rates of an entry are a sensible one and one or two higher. The
unstable entries were calibrated on the baselines only (no clipping spikes or
diverges at the high rate, some fixed clip helps), never on the stabilizer's
results. A variant of a task differs from it in ``learning_rate`` only (its
name becomes ``task@lr``): nothing in a task depends on the rate but
``base(lr)``.

The RL tasks of ``gym_tasks.py`` (gymnax environments) join the sets when
that module is present; without it their entries are listed as unavailable.
They run at their own rate and at 1e-2, the rate that module calls too
high from runs without clipping.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from tasks import Task

SETS = ("selection", "validation")
KINDS = ("recurrent", "deep", "heavy-tailed noise", "attention/language", "RL", "fp16", "healthy")
# The seeds of each set come from their own key: the validation seeds differ
# from the selection seeds (the selection key is the one the suite always used).
SET_KEYS = {"selection": 0, "validation": 20261205}
# The module holding the gymnax tasks, and its registry function.
GYM_MODULE = "gym_tasks"


@dataclasses.dataclass(frozen=True)
class Entry:
    """A task of the registry at its learning rates, in a set, with its kind of instability.

    ``quick``: the learning rate (one of ``learning_rates``) run by ``--quick``,
    or None when the entry is too slow for it.
    """

    task: str
    learning_rates: tuple[float, ...]
    set: str
    kind: str
    quick: float | None = None

    def __post_init__(self):
        if self.set not in SETS:
            raise ValueError(f"{self.task}: unknown set {self.set!r}")
        if self.kind not in KINDS:
            raise ValueError(f"{self.task}: unknown kind {self.kind!r}")
        if not 1 <= len(self.learning_rates) <= 3:
            raise ValueError(f"{self.task}: one to three learning rates")
        if self.quick is not None and self.quick not in self.learning_rates:
            raise ValueError(f"{self.task}: the quick rate must be one of its rates")


ENTRIES: tuple[Entry, ...] = (
    # Selection: the suite's original tasks, DQN on CartPole and PPO on Acrobot.
    Entry("rnn_adding", (0.02, 0.05), "selection", "recurrent"),
    Entry("deep_mlp", (0.05, 0.1), "selection", "deep"),
    Entry("heavy_tail", (0.02, 0.05, 0.1), "selection", "heavy-tailed noise", quick=0.05),
    Entry("transformer", (5e-3, 1.4e-2), "selection", "attention/language"),
    Entry("fp16", (1e-3, 3e-3), "selection", "fp16"),
    Entry("rl_auction", (1e-3, 3e-3), "selection", "RL"),
    Entry("dqn_cartpole", (3e-4, 1e-2), "selection", "RL"),
    Entry("ppo_acrobot", (1e-3, 1e-2), "selection", "RL"),
    Entry("transformer_preln", (1e-3, 2e-3), "selection", "healthy"),
    Entry("mlp_layernorm", (1e-3, 3e-3), "selection", "healthy", quick=1e-3),
    # Validation: everything else.
    Entry("gru_copy", (2.0, 3.0), "validation", "recurrent"),
    Entry("lstm_adding", (0.03, 0.1), "validation", "recurrent"),
    Entry("tanh_deep", (0.03, 0.1), "validation", "deep", quick=0.1),
    Entry("relu_deep_spike", (1e-3, 3e-3), "validation", "deep"),
    Entry("digits_cnn", (0.02, 0.1), "validation", "heavy-tailed noise"),
    Entry("char_lm", (1e-2, 3e-2), "validation", "attention/language"),
    Entry("digits_fp16", (1e-3, 3e-3), "validation", "fp16"),
    Entry("dqn_acrobot", (1e-3, 1e-2), "validation", "RL"),
    Entry("ppo_cartpole", (1e-3, 1e-2), "validation", "RL"),
    Entry("digits_cnn_norm", (1e-3, 3e-3), "validation", "healthy", quick=1e-3),
    Entry("char_lm_warmup", (1e-3, 2e-3), "validation", "healthy"),
)


def gym_factories() -> dict[str, Callable[[], Task]]:
    """The gymnax tasks of ``gym_tasks.py``, or ``{}`` when that module is not there."""
    try:
        module = importlib.import_module(GYM_MODULE)
    except ModuleNotFoundError as err:
        if err.name != GYM_MODULE:
            raise
        return {}
    return dict(module.gym_tasks())


def factories() -> dict[str, Callable[[], Task]]:
    """Every task of the suite by name: ``tasks.py``, ``tasks_more.py`` and the gymnax tasks."""
    from tasks import TASKS
    from tasks_more import TASKS_MORE

    return {**TASKS, **TASKS_MORE, **gym_factories()}


def variant_name(task: str, learning_rate: float) -> str:
    return f"{task}@{learning_rate:g}"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One entry of the suite: a task at one learning rate."""

    name: str
    task: str
    learning_rate: float
    set: str
    kind: str
    quick: bool

    def make(self, registry: dict[str, Callable[[], Task]] | None = None) -> Task:
        registry = factories() if registry is None else registry
        task = registry[self.task]()
        return dataclasses.replace(task, name=self.name, learning_rate=self.learning_rate)


def variants(
    sets: Sequence[str] = SETS, registry: dict[str, Callable[[], Task]] | None = None
) -> tuple[list[Variant], list[str]]:
    """``(the variants of the entries of sets, in registry order; the unavailable variants)``.

    A variant is unavailable when its task is not in the registry (the
    gymnax tasks without ``gym_tasks.py``).
    """
    registry = factories() if registry is None else registry
    found, missing = [], []
    for entry in ENTRIES:
        if entry.set not in sets:
            continue
        for lr in entry.learning_rates:
            name = variant_name(entry.task, lr)
            v = Variant(name, entry.task, lr, entry.set, entry.kind, entry.quick == lr)
            (found if entry.task in registry else missing).append(v)
    return found, [v.name for v in missing]


def select(
    names: Sequence[str] | None,
    sets: Sequence[str] = SETS,
    quick: bool = False,
    registry: dict[str, Callable[[], Task]] | None = None,
) -> tuple[list[Variant], list[str]]:
    """The variants to run: those named (a variant ``task@lr`` or a task: all its rates),
    else the ``--quick`` ones (``quick``), else all; and the unavailable ones among them.

    Raises ``KeyError`` for a name that is neither.
    """
    found, missing = variants(sets, registry)
    if names is None:
        return ([v for v in found if v.quick] if quick else found), missing
    known = {variant_name(e.task, lr) for e in ENTRIES for lr in e.learning_rates}
    known |= {e.task for e in ENTRIES}
    picked, gone = [], []
    for name in names:
        if name not in known:
            raise KeyError(name)
        picked += [v for v in found if name in (v.name, v.task) and v not in picked]
        gone += [n for n in missing if name == n or n.startswith(f"{name}@")]
    return picked, gone


def set_keys(set_name: str, seeds: int) -> tuple[jax.Array, jax.Array]:
    """(init keys [seeds], data keys [seeds]) of a set's ``seeds`` seeds.

    The same for every task and method of the set: every method starts from
    the same parameters and sees the same batches.
    """
    key = jax.random.PRNGKey(SET_KEYS[set_name])
    init_keys, data_keys = jnp.split(jax.random.split(key, 2 * seeds), 2)
    return init_keys, data_keys
