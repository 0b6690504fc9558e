"""``GradientFlowStabilizer``: the stabilizer with a ``torch.amp.GradScaler``-shaped API.

A thin stateful front end of :func:`optax_gradflow.torch.update`; every rule is
in SPEC.md. A training step reads::

    stab = GradientFlowStabilizer(lr)
    loss = loss_fn(model(x), y)
    stab.get_scaled_loss(loss).backward()
    norm = stab.clip_gradients(model.parameters(), loss=loss)
    stab.step(optimizer)
    optimizer.zero_grad()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch

from optax_gradflow import arithmetic
from optax_gradflow.config import INT32_MAX, StabilizerConfig
from optax_gradflow.constants import Event
from optax_gradflow.report import StabilityReport, build_report
from optax_gradflow.torch import distributed, functional, host, traced
from optax_gradflow.torch.functional import (
    Due,
    HistoryRule,
    TorchOps,
    _device_of,
    _gather,
    check_value,
    rule_for,
)
from optax_gradflow.torch.state import (
    FIELDS,
    State,
    _check_config,
    check_version,
    expected_specs,
    init_state,
    migrate_state,
)

# Attribute set on each gradient tensor this stabilizer has written.
_TAG = "_optax_gradflow_tag"

SkipMode = Literal["auto", "found_inf", "restore", "sync"]
_SKIP_MODES = ("auto", "found_inf", "restore", "sync")


class GradientFlowStabilizer:
    """Adaptive clipping, dynamic loss scaling and skipping of non-finite steps.

    The state is a dict of tensors (SPEC.md, "State") that lives on the
    gradients' device: it is created on the CPU and moved, once, to the device
    of the first loss or gradients it sees. Off the CPU, ``get_scaled_loss``,
    ``unscale_gradients`` and ``clip_gradients`` never read a device value on
    the host. On the CPU, where a read waits for nothing, the step's scalar
    logic runs on NumPy scalars and writes the state's tensors in place
    (``path``; :mod:`optax_gradflow.torch.host`): the same arithmetic, without
    the fixed cost of dozens of tiny tensor operations.

    The gradients are rescaled in place: one multiplication of every gradient
    by one scalar (``t / r`` when clipped, ``1 / s`` otherwise), the same
    passes over the gradients as ``torch.nn.utils.clip_grad_norm_``. The
    periodic work (the percentile rules' sort, the diagnostics) runs only on
    the steps it is due, known from a host-side count of the steps (the state's
    ``stabilizer_step`` advances by one per step, so counting needs no read).

    How ``step(optimizer)`` skips a non-finite step (``skip_mode``): the
    gradients of such a step are already zero, but an optimizer stepped on zeros
    still moves (momentum, weight decay, step counts), so the step must be
    skipped. The methods and what each costs in memory:

    * ``"found_inf"``: an optimizer built with ``fused=True``
      (``_step_supports_amp_scaling``) gets the skip flag as
      ``optimizer.found_inf``, as ``GradScaler`` passes it, and its kernel skips
      the update on the device: no host read, no extra memory (one scalar);
    * ``"sync"``: the flag is read on the host, once per ``step`` (free on the
      CPU, one device-to-host transfer on an accelerator), and
      ``optimizer.step`` is not called on a skipped step: no extra memory;
    * ``"restore"`` (only when asked for): the parameters and the optimizer
      state are copied, the optimizer steps, and ``torch.where(skip, old, new)``
      puts the old values back: exact and no host read, but it holds a second
      copy of every stepped parameter and of its optimizer state during each
      ``step`` (with Adam, 3 x 4 bytes per float32 parameter: about 12 MB per
      million parameters) and copies them every step. It reads the flag on the
      first step (before the optimizer has state) and raises ValueError for
      state it cannot restore.

    ``"auto"`` (the default) picks ``"found_inf"`` when the optimizer accepts
    it, else ``"sync"``; it never copies the model or the optimizer state.

    Args:
      learning_rate: as in :func:`optax_gradflow.stabilize` (initial threshold):
        a number, or a schedule ``step -> lr`` read where it is positive.
      optimizer: when ``learning_rate`` is None, the learning rate is read from
        this optimizer's param groups (:func:`optimizer_learning_rate`): the
        base rate a ``torch.optim.lr_scheduler`` scales, so a warm-up from 0
        reads the rate it warms up to. Used at construction only; ``step``
        still takes the optimizer to step. (Reading it at the first ``step``
        would be too late: the first step's gradients are clipped before.)
      config: a :class:`~optax_gradflow.StabilizerConfig`; the defaults if None.
      initial_threshold: an explicit initial threshold.
      skip_mode: how ``step`` skips a non-finite step, see above.
      process_group: with gradients sharded over the ranks of this
        ``torch.distributed`` group as plain tensors, their squared norm is
        all-reduced over it (one scalar per step), so that every rank takes the
        same decision. Not needed for FSDP2 (DTensor gradients are reduced over
        their mesh) and wrong for DDP (its gradients are already all-reduced:
        they would be counted once per rank). SPEC.md, "Distributed".
      path: where the scalar logic of a step runs, as in
        :func:`optax_gradflow.torch.update`: ``"auto"`` (the host on the
        CPU, the device elsewhere), ``"host"`` or ``"device"``.
      params: the model's parameters (a module, or an iterable of tensors;
        ``optimizer``'s when None). Without a learning rate (data mode) the
        first threshold is at most ``config.param_threshold_scale`` times
        their global norm: a first gradient far larger than the weights it
        would update is clipped. Without them the first norm is not clipped.

    Examples:
      >>> import torch
      >>> from optax_gradflow.torch import GradientFlowStabilizer
      >>> model = torch.nn.Linear(3, 1)
      >>> _ = torch.nn.init.constant_(model.weight, 0.1), torch.nn.init.zeros_(model.bias)
      >>> opt = torch.optim.SGD(model.parameters(), lr=1e-2)
      >>> stab = GradientFlowStabilizer(1e-2)  # threshold 0.1 * sqrt(1 / 1e-2) = 1
      >>> loss = model(torch.ones(2, 3)).pow(2).mean()
      >>> stab.get_scaled_loss(loss).backward()
      >>> norm = stab.clip_gradients(model.parameters(), loss=loss)  # 1.2: clipped to 1
      >>> round(norm.item(), 4)
      1.2
      >>> stab.step(opt)
      >>> report = stab.get_stability_report()
      >>> report.step, report.status
      (1, 'healthy')
    """

    def __init__(
        self,
        learning_rate: float | Callable[[int], Any] | None = None,
        *,
        config: StabilizerConfig | None = None,
        initial_threshold: float | None = None,
        skip_mode: SkipMode = "auto",
        process_group: Any = None,
        optimizer: torch.optim.Optimizer | None = None,
        params: Any = None,
        path: functional.Path = "auto",
    ):
        if skip_mode not in _SKIP_MODES:
            raise ValueError(f"skip_mode must be one of {_SKIP_MODES}, got {skip_mode!r}.")
        if path not in functional.PATHS:
            raise ValueError(f"path must be one of {functional.PATHS}, got {path!r}.")
        self.path = path
        if learning_rate is None and optimizer is not None:
            learning_rate = optimizer_learning_rate(optimizer)
        self.config = _check_config(config)
        self.skip_mode = skip_mode
        self.process_group = process_group
        if params is None and optimizer is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
        self._state = init_state(
            learning_rate, config=self.config, initial_threshold=initial_threshold, params=params
        )
        self._rule = rule_for(self.config)
        # Host-side copies of the state's step counter and (for the history
        # rules, whose warm-up is a plain count-down) warm-up counter: they
        # advance deterministically, so they tell which periodic work a step
        # needs without reading the state.
        self._count_from(self._state)
        # Each gradient this stabilizer writes is tagged with (id(self), epoch,
        # its version counter after the write). A gradient with that tag is
        # already stabilized; a new tensor (zero_grad(set_to_none=True), then
        # backward) has no tag, and an in-place change (accumulation, zero_)
        # bumps the version. The epoch changes on load_state_dict.
        self._epoch = 0
        self._processed_step: int | None = None
        self._pending_loss: torch.Tensor | None = None
        # The loss gate's inputs of the step processed last (its levels on
        # entry and whether the step was calm), so that a loss given after the
        # step ran (clip_gradients(loss=...) after unscale_gradients) is the
        # step's value for the gate too, as if it had been given to update.
        self._gate_entry: tuple[dict[str, Any], State] | None = None
        # NumPy views of the state's tensors, for the host path; rebuilt when
        # the state dict is replaced (a move, a load).
        self._host: host.HostState | None = None

    # --- Host-side step count ---------------------------------------------------

    def _count_from(self, state: State) -> None:
        """Reads the step and warm-up counters of ``state`` (at init and load only)."""
        self._host_step = int(state["stabilizer_step"].detach().cpu().numpy())
        self._host_warmup = int(state["warmup_steps_left"].detach().cpu().numpy())

    def _due(self) -> Due:
        """What periodic work the next step may need, from the host-side counts."""
        config = self.config
        after = min(self._host_step + 1, INT32_MAX)
        diagnose = config.diagnostics_interval > 0 and after % config.diagnostics_interval == 0
        interval = config.adaptation_interval > 0 and after % config.adaptation_interval == 0
        if isinstance(self._rule, HistoryRule):
            left = self._host_warmup
            return Due(
                warmup=left > 0,
                adapt=left == 1 or (interval and max(left - 1, 0) == 0),
                diagnose=diagnose,
            )
        return Due(warmup=True, adapt=interval, diagnose=diagnose)

    def _advance_count(self) -> None:
        self._host_step = min(self._host_step + 1, INT32_MAX)
        self._host_warmup = max(self._host_warmup - 1, 0)

    # --- State access --------------------------------------------------------

    @property
    def state(self) -> State:
        """The current state (a new dict; the tensors are the live ones: a step
        on the CPU writes into them, so clone what you keep, or use
        :meth:`state_dict`)."""
        return dict(self._state)

    @property
    def loss_scale(self) -> torch.Tensor:
        """The current loss scale, a float32 scalar tensor on the state's device."""
        return self._state["loss_scale"]

    def _move_to(self, device: torch.device) -> None:
        # Once, when the first loss or gradients arrive on another device.
        if self._state["loss_scale"].device != device:
            self._state = {name: value.to(device) for name, value in self._state.items()}

    # --- The training step ---------------------------------------------------

    def get_scaled_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * loss_scale`` in the loss's dtype: call ``backward`` on this.

        The loss (detached) is remembered as the ``value`` of the next update.
        """
        self._move_to(loss.device)
        self._pending_loss = loss.detach()
        return loss * self._state["loss_scale"].to(loss.dtype)

    def unscale_gradients(self, parameters: Iterable[torch.Tensor]) -> None:
        """Runs the stabilizer step on ``p.grad`` in place.

        Afterwards every ``p.grad`` holds the unscaled gradient, clipped to the
        threshold when the global norm exceeds it, and zero on a non-finite step
        (SPEC.md, "Per-step order"); the state has advanced one step. The clip
        is part of this pass because SPEC.md defines it on the scaled
        gradients, ``(g / r) * t``. Idempotent within a step: a second call on
        the same, unchanged gradients does nothing.
        """
        self._process(list(parameters), step=None, loss=None)

    def clip_gradients(
        self,
        parameters: Iterable[torch.Tensor],
        step: int | None = None,
        loss: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """Stabilizes ``p.grad`` in place; returns the pre-clip unscaled global norm.

        Args:
          parameters: the parameters whose ``.grad`` to stabilize.
          step: optional, the caller's step number. A call with a number other
            than the previous call's starts a new stabilizer step even when the
            gradients look unchanged; otherwise a new step starts when the
            gradients are new or changed in place (a new ``backward``).
          loss: the loss, recorded as ``last_loss`` and fed to the loss gate
            (also when this step's gradients were already stabilized: it is
            then this step's ``value``); defaults to the loss given to
            :meth:`get_scaled_loss`.

        Returns:
          The unscaled global norm ``n`` of this step as a float32 scalar tensor
          on the gradients' device (NaN or inf on a non-finite step); no host
          transfer.
        """
        self._process(list(parameters), step=step, loss=loss)
        norm = self._state["last_grad_norm"]
        # The host path writes the state in place: hand out a tensor of its own.
        return norm.clone() if self._host is not None else norm

    def _tags(self, leaves: list[torch.Tensor]) -> list[tuple[int, int, int]]:
        # A DTensor's own version counter misses in-place writes to its local
        # shard; the shard's counter sees them.
        owner, epoch = id(self), self._epoch
        return [(owner, epoch, x._version) for x in distributed.local_shards(leaves)]

    def _is_processed(self, leaves: list[torch.Tensor], step: int | None) -> bool:
        if step is not None and step != self._processed_step:
            return False
        seen = [
            getattr(g, _TAG, None) == tag for g, tag in zip(leaves, self._tags(leaves), strict=True)
        ]
        if seen and any(seen) and not all(seen):
            raise ValueError(
                "Some of these gradients were stabilized in this step and some were not: "
                "pass the same parameters to clip_gradients / unscale_gradients and to the "
                "optimizer."
            )
        return all(seen)

    def _process(
        self,
        params: list[torch.Tensor],
        *,
        step: int | None,
        loss: torch.Tensor | float | None,
    ) -> None:
        grads = [p.grad for p in params]
        # The floating-point gradients: the ones the step rescales and tags.
        _, leaves = functional.float_gradients(grads)
        if self._is_processed(leaves, step):
            if loss is not None:
                value = _as_f32(loss, self._state["last_loss"].device)
                self._write("last_loss", value)
                if self._gate_entry is not None:
                    entry, after = self._gate_entry
                    xp = TorchOps(value.device)
                    centre, reference, spread = arithmetic.loss_gate(
                        xp,
                        value,
                        _calm(after),
                        tuple(_as_tensor(entry[name], value.device) for name in _GATE_LEVELS),
                        _as_tensor(entry["stabilizer_step"], value.device),
                        self.config,
                    )
                    reference = self._rule.gate_reference(
                        xp, _fired(after), after["consecutive_explosions"], centre, reference
                    )
                    self._write("loss_centre", centre)
                    self._write("loss_reference", reference)
                    self._write("loss_spread", spread)
            return
        for g in grads:
            if g is not None:
                self._move_to(g.device)
                break
        value = loss if loss is not None else self._pending_loss
        # The checks of update, but for the state's: the state is this
        # stabilizer's own (checked at init and at load), and the config and
        # its rule were chosen at construction.
        check_value(value)
        device = _device_of(grads, self._state)
        if functional.host_path(self.path, device):
            if self._host is None or self._host.flat is not self._state:
                self._host = host.HostState(self._state)
            # The levels on entry, as values: the step writes the tensors in place.
            entry = {name: self._host.views[name][()] for name in _GATE_FIELDS}
            with torch.no_grad():
                _, self._state = traced.step(
                    leaves,
                    self._host,
                    value=value,
                    config=self.config,
                    rescale=functional.rescale_leaves,
                    process_group=self.process_group,
                    inplace=True,
                )
        else:
            self._host = None
            entry = {name: self._state[name] for name in _GATE_FIELDS}
            with torch.no_grad():
                _, self._state = functional.step(
                    leaves,
                    self._state,
                    device,
                    value=value,
                    config=self.config,
                    rule=self._rule,
                    process_group=self.process_group,
                    due=self._due(),
                    inplace=True,
                )
        self._advance_count()
        self._gate_entry = (entry, self._state)
        for g, tag in zip(leaves, self._tags(leaves), strict=True):
            setattr(g, _TAG, tag)
        self._processed_step = step
        self._pending_loss = None

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Stabilizes the gradients if not done yet, then steps ``optimizer`` unless non-finite.

        See the class docstring for how the skip is done without a host read.
        Extra arguments go to ``optimizer.step``. Returns what it returns, or
        None on a skipped step of the ``"sync"`` method. With several
        optimizers, call :meth:`clip_gradients` on all parameters first, then
        ``step`` each optimizer: the stabilizer step covers all gradients.
        """
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self._process(params, step=self._processed_step, loss=None)
        skip = ~torch.isfinite(self._state["last_grad_norm"])
        mode = self._skip_method(optimizer, params, skip.device)
        if mode == "found_inf":
            optimizer.found_inf = skip.to(torch.float32)  # type: ignore[attr-defined]
            try:
                return optimizer.step(*args, **kwargs)
            finally:
                del optimizer.found_inf  # type: ignore[attr-defined]
        if mode == "restore":
            return _step_and_restore(optimizer, params, skip, args, kwargs)
        # One device-to-host read of the skip flag.
        if skip.item():
            return None
        return optimizer.step(*args, **kwargs)

    def _skip_method(
        self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], device: torch.device
    ) -> str:
        if self.skip_mode == "found_inf":
            if not getattr(optimizer, "_step_supports_amp_scaling", False):
                raise ValueError(
                    f"skip_mode='found_inf' needs an optimizer that accepts found_inf "
                    f"(built with fused=True); got {type(optimizer).__name__}."
                )
            return "found_inf"
        if self.skip_mode == "restore":
            problem = _restore_problem(optimizer, params, device)
            if problem is not None:
                raise ValueError(f"skip_mode='restore' cannot restore this optimizer: {problem}.")
            return "restore" if _has_state(optimizer, params) else "sync"
        if self.skip_mode == "sync":
            return "sync"
        # "auto": never a copy of the model and the optimizer state.
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            return "found_inf"
        return "sync"

    def _write(self, name: str, value: torch.Tensor) -> None:
        """Sets a state field: in place under the host path (its views stay valid)."""
        if self._host is not None and self._host.flat is self._state:
            self._state[name].copy_(value)
        else:
            self._state[name] = value

    # --- Reporting and checkpoints -------------------------------------------

    def get_stability_report(self) -> StabilityReport:
        """This stabilizer's :class:`optax_gradflow.StabilityReport` (SPEC.md, "Stability report").

        The same type, fields, status rules and ``summary()`` as JAX's
        :func:`optax_gradflow.stability_report`, built by the same host-side
        function (:func:`optax_gradflow.report.build_report`) from the state
        dict: a run moved between frameworks gets the same report. Reads the
        state on the host (one copy of the scalars and rings to the CPU); the
        update ratio, which only the optax wrapper form records, is absent.
        """
        host = {name: value.detach().cpu().numpy() for name, value in self._state.items()}
        return build_report(host, path="torch")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The state, cloned: the flat keys (SPEC.md, "State"), ``"state_version"`` included."""
        return {name: self._state[name].detach().clone() for name in FIELDS}

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Loads a :meth:`state_dict`, all or nothing.

        The tensors are copied onto the device the current state is on.

        A state dict of layout 2, 3 or 4 is migrated first
        (:func:`migrate_state`: the quantile at the centre for layouts 2 and
        3, and for layout 2 an empty ring of exploding norms; layout 4 only
        takes the new version; SPEC.md, "Layout version").

        Raises:
          StateVersionError: a state dict of layout 1 (one without
            ``"state_version"``) or of a newer layout.
          ValueError: naming the key, for a missing or extra key, a value that
            is not a tensor, or a shape or dtype this stabilizer's config does
            not build. Nothing is loaded then.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"Expected a mapping, got {type(state_dict).__name__}.")
        state_dict = migrate_state(state_dict)
        check_version(state_dict, "The state dict given to load_state_dict")
        specs = expected_specs(self.config)
        for name in FIELDS:
            if name not in state_dict:
                raise ValueError(f"state_dict is missing key {name!r}.")
        for name in state_dict:
            if name not in specs:
                raise ValueError(f"state_dict has unexpected key {name!r}.")
        for name, (shape, dtype) in specs.items():
            value = state_dict[name]
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"state_dict[{name!r}] is a {type(value).__name__}, not a tensor.")
            if tuple(value.shape) != shape or value.dtype != dtype:
                raise ValueError(
                    f"state_dict[{name!r}] has shape {tuple(value.shape)} and dtype "
                    f"{value.dtype}; this stabilizer's config expects shape {shape} and dtype "
                    f"{dtype}."
                )
        device = self._state["loss_scale"].device
        self._state = {
            name: state_dict[name].detach().to(device=device, copy=True) for name in FIELDS
        }
        self._count_from(state_dict)
        self._epoch += 1
        self._processed_step = None
        self._pending_loss = None
        self._gate_entry = None


def optimizer_learning_rate(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate an initial threshold is derived from, read from ``optimizer``.

    The largest over its param groups of ``lr``, ``initial_lr`` (the base rate
    that a ``torch.optim.lr_scheduler`` scales, set when the scheduler is
    built: a warm-up that starts at 0 has set ``lr`` to 0 already) and
    ``max_lr`` (``OneCycleLR``'s peak). SPEC.md, "Initial threshold" 3.

    Examples:
      >>> import torch
      >>> from optax_gradflow.torch import optimizer_learning_rate
      >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=1e-2)
      >>> warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 20))
      >>> opt.param_groups[0]["lr"], optimizer_learning_rate(opt)
      (0.0, 0.01)
    """
    groups = getattr(optimizer, "param_groups", None)
    if not groups:
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer with param groups, got "
            f"{type(optimizer).__name__}."
        )
    rates = [
        float(group[key]) for group in groups for key in _LR_KEYS if group.get(key) is not None
    ]
    return max(rates)


# Param-group keys that hold a learning rate (torch.optim and its schedulers).
_LR_KEYS = ("lr", "initial_lr", "max_lr")


# What the loss gate reads from the state on entry (SPEC.md, "Loss gate").
_GATE_LEVELS = ("loss_centre", "loss_reference", "loss_spread")
_GATE_FIELDS = (*_GATE_LEVELS, "stabilizer_step")


def _as_tensor(value: Any, device: torch.device) -> torch.Tensor:
    """A state value of the gate's entry (a tensor, or a NumPy scalar of the host path)."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.as_tensor(value, device=device)


def _newest_flags(state: State) -> torch.Tensor:
    """The event flags of the step just pushed onto ``event_flags``."""
    ring = state["event_flags"]
    newest = ((state["event_flags_index"] - 1) % ring.shape[0]).to(torch.int64)
    return _gather(ring, newest)


def _calm(state: State) -> torch.Tensor:
    """Whether the step just pushed onto ``event_flags`` was calm: finite, no explosion."""
    return (_newest_flags(state) & (Event.EXPLOSION | Event.NONFINITE)) == 0


def _fired(state: State) -> torch.Tensor:
    """Whether the step just pushed onto ``event_flags`` fired an emergency."""
    return (_newest_flags(state) & Event.EMERGENCY) != 0


def _as_f32(value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    check_value(value)
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float32).reshape(())
    return torch.full((), value, dtype=torch.float32, device=device)


def _has_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> bool:
    """Whether every parameter with a gradient has optimizer state (not the first step)."""
    return all(optimizer.state.get(p) for p in params if p.grad is not None)


def _restore_problem(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor], device: torch.device
) -> str | None:
    """Why parameters and optimizer state cannot be restored on ``device``; None if they can."""
    for p in params:
        if p.grad is None:
            continue
        if p.device != device:
            return f"a parameter is on {p.device}, the skip flag on {device}"
        for key, value in optimizer.state.get(p, {}).items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                return f"optimizer state {key!r} is a {type(value).__name__}, not a tensor"
            if value.device != device:
                return f"optimizer state {key!r} is on {value.device}, the skip flag on {device}"
    return None


def _step_and_restore(
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    skip: torch.Tensor,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Steps, then puts parameters and optimizer state back where ``skip``; no host read."""
    stepped = [p for p in params if p.grad is not None]
    saved_params = [p.detach().clone() for p in stepped]
    saved_state = [
        {key: v.detach().clone() for key, v in optimizer.state[p].items() if v is not None}
        for p in stepped
    ]
    result = optimizer.step(*args, **kwargs)
    with torch.no_grad():
        for p, old_p, old_state in zip(stepped, saved_params, saved_state, strict=True):
            p.copy_(torch.where(skip, old_p, p))
            state = optimizer.state[p]
            for key, old in old_state.items():
                new = state[key]
                new.copy_(torch.where(skip, old, new))
    return result
