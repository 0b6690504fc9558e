"""The global norm of sharded gradients: local squares, then one scalar all-reduce.

SPEC.md, "Distributed". A gradient is sharded when it is a ``DTensor`` with a
``Shard`` placement (FSDP2's ``fully_shard``, tensor parallelism), or a plain
tensor holding this rank's part of a gradient split over ``process_group``.
Each rank sums the float32 squares of its local shards and the sums are
all-reduced: one scalar per process group, never the gradients themselves. A
plain gradient without ``process_group`` (single process, or DDP, whose
gradients are already all-reduced and identical on every rank) is counted as
it is: summing it across ranks would count it once per rank.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

_SumOfSquares = Callable[[list[torch.Tensor], torch.device], torch.Tensor]


def _dtensor_class() -> type | None:
    # No DTensor exists before torch.distributed.tensor is imported, so there is
    # no need to import it (about a second) just to find that out.
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def is_dtensor(x: Any) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(x, cls)


def local_shard(x: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: ``x.to_local()`` for a DTensor, else ``x``."""
    return x.to_local() if is_dtensor(x) else x


def local_shards(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`local_shard` of each; ``xs`` itself when no DTensor can exist."""
    if _dtensor_class() is None:
        return xs
    return [local_shard(x) for x in xs]


def like(template: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` as a tensor of the same kind as ``template`` (a DTensor with its layout)."""
    if not is_dtensor(template):
        return local
    return type(template).from_local(
        local,
        template.device_mesh,
        template.placements,
        run_check=False,
        shape=template.shape,
        stride=template.stride(),
    )


def _groups(x: torch.Tensor, index: int, process_group: Any) -> tuple[Any, ...]:
    """The process groups whose ranks hold the other shards of ``x``."""
    if not is_dtensor(x):
        return () if process_group is None else (process_group,)
    groups = []
    for dim, placement in enumerate(x.placements):
        if placement.is_partial():
            raise ValueError(
                f"Gradient {index} is a DTensor with a {placement} placement: its values are "
                "partial sums, not yet reduced, so its norm is not defined. Reduce it first."
            )
        if placement.is_shard():
            groups.append(x.device_mesh.get_group(dim))
    return tuple(groups)


def global_sum_of_squares(
    leaves: Sequence[torch.Tensor],
    device: torch.device,
    process_group: Any,
    sum_of_squares: _SumOfSquares,
) -> torch.Tensor:
    """The sum of squares of the whole gradients, on every rank alike.

    Leaves are grouped by the process groups they are sharded over; each group's
    local sum is all-reduced over them (in place, so no host synchronisation),
    and the groups' sums are added. One FSDP2 mesh, or plain shards over
    ``process_group``, give one all-reduce of one float32 scalar; gradients that
    are not sharded, none. A 2-D mesh sharded along both dimensions gives one
    all-reduce per dimension.

    Args:
      leaves: the floating-point gradients, plain tensors or DTensors.
      device: the device of the result when there are no leaves.
      process_group: the group plain-tensor leaves are sharded over, or None.
      sum_of_squares: ``(tensors, device) -> float32 scalar``, the local sum.
    """
    if process_group is None and _dtensor_class() is None:
        # Nothing is sharded: no DTensor exists, no group is given.
        return sum_of_squares(list(leaves), device)
    by_groups: dict[tuple[Any, ...], list[torch.Tensor]] = {}
    if process_group is not None:
        # Every rank must join the all-reduce, even one without plain leaves.
        by_groups[(process_group,)] = []
    for i, x in enumerate(leaves):
        by_groups.setdefault(_groups(x, i, process_group), []).append(local_shard(x))
    if not by_groups or list(by_groups) == [()]:
        return sum_of_squares(list(leaves), device)
    import torch.distributed as dist

    total = None
    for groups, members in by_groups.items():
        part = sum_of_squares(members, device)
        for group in groups:
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
        total = part if total is None else total + part
    return total  # type: ignore[return-value]
