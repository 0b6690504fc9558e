"""One rank of a 2-process gloo group on 127.0.0.1: DDP, FSDP2 and plain shards.

Usage: ``python torch_ranks.py RANK WORLD_SIZE PORT``. Run by
tests/test_distributed_torch.py, which replays the same steps in one process
(``train`` and ``plain_shard_run`` below, with ``rank=0, world=1``) and
compares. Prints one JSON object on the last line of stdout.

Each run trains ``make_model()`` with SGD for ``scenario.STEPS`` steps on
``scenario.batch`` split evenly over the ranks. The data's own bad values (a
spike, a NaN) sit in the last example, so on one rank; DDP's gradient
all-reduce and FSDP2's reduce-scatter spread them. FSDP2 also gets bad values
written into one rank's shard after the backward pass (``corrupt``): only the
stabilizer's scalar all-reduce can tell the other rank about those.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenario

from optax_gradflow import StabilizerConfig
from optax_gradflow.torch import GradientFlowStabilizer, init_state, update

CONFIG = StabilizerConfig(**scenario.CONFIG)
SHARD_SPIKE_STEP = 2
SHARD_INF_STEP = scenario.INF_STEP
# Rows of the first layer's weight gradient [8, 4] that ``corrupt`` touches:
# with two ranks, all of them on rank 1.
BAD_ROWS = (4, 8)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def corrupt(step: int, grad: torch.Tensor, start: int) -> None:
    """Bad values in rows ``BAD_ROWS`` of the first weight's gradient.

    ``grad`` holds the global rows ``[start, start + len(grad))``.
    """
    lo, hi = max(BAD_ROWS[0], start), min(BAD_ROWS[1], start + grad.shape[0])
    if lo >= hi:
        return
    with torch.no_grad():
        if step == SHARD_SPIKE_STEP:
            grad[lo - start : hi - start] *= 100.0
        elif step == SHARD_INF_STEP:
            grad[lo - start, 0] = torch.inf


def to_host(tree):
    return {k: v.detach().cpu().tolist() for k, v in tree.items()}


def local_params(model: torch.nn.Module) -> dict[str, list]:
    """This rank's part of each parameter (the whole of it without sharding)."""
    out = {}
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        out[name.removeprefix("module.")] = local.detach().tolist()
    return out


def train(model, *, rank: int, world: int, shard_corruption: bool, comm_debug: bool = False):
    """The training loop; the same code serves the ranks and the one-process reference."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stab = GradientFlowStabilizer(config=CONFIG)
    first_weight = next(model.parameters())
    rows_per_rank = -(-8 // world)  # torch.chunk: the first ranks take the rounded-up part
    states, comm_counts = [], []
    for k in range(scenario.STEPS):
        x, y = (torch.from_numpy(a) for a in scenario.batch(k))
        part = x.shape[0] // world
        x, y = x[rank * part : (rank + 1) * part], y[rank * part : (rank + 1) * part]
        loss = torch.mean(torch.square(model(x) - y))
        stab.get_scaled_loss(loss).backward()
        # The whole batch's loss for last_loss, as the one-process run sees it.
        mean_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= world
        if shard_corruption:
            grad = first_weight.grad
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            corrupt(k, local, rank * rows_per_rank)
        if comm_debug:
            from torch.distributed.tensor.debug import CommDebugMode

            with CommDebugMode() as mode:
                stab.clip_gradients(model.parameters(), loss=mean_loss)
            comm_counts.append({str(op): n for op, n in mode.get_comm_counts().items()})
        else:
            stab.clip_gradients(model.parameters(), loss=mean_loss)
        stab.step(optimizer)
        optimizer.zero_grad()
        states.append(to_host(stab.state_dict()))
    return {"states": states, "params": local_params(model), "comm_counts": comm_counts}


def accumulation_steps(model: torch.nn.Module) -> list[int]:
    """``stabilizer_step`` after each of two backward passes into the same gradients.

    FSDP2 accumulates into the same DTensor gradient, whose own version counter
    does not move: the second pass must still be seen as new gradients.
    """
    stab = GradientFlowStabilizer(config=CONFIG)
    x, y = (torch.from_numpy(a) for a in scenario.batch(0))
    steps = []
    for _ in range(2):
        stab.get_scaled_loss(torch.mean(torch.square(model(x) - y))).backward()
        stab.clip_gradients(model.parameters())
        steps.append(int(stab.state["stabilizer_step"]))
    return steps


def plain_shard_run(*, rank: int, world: int, process_group=None):
    """Functional ``update`` on this rank's rows of the scenario's gradients."""
    state = init_state(config=CONFIG)
    states, outs = [], []
    for k in range(scenario.STEPS):
        grads = []
        for g in scenario.gradients(k).values():
            rows = g.shape[0] // world
            grads.append(torch.from_numpy(np.ascontiguousarray(g[rank * rows : (rank + 1) * rows])))
        new, state = update(
            grads, state, value=float(k), config=CONFIG, process_group=process_group
        )
        states.append(to_host(state))
        outs.append([g.tolist() for g in new])
    return {"states": states, "updates": outs}


def main() -> None:
    rank, world, port = (int(a) for a in sys.argv[1:4])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    report = {"rank": rank}
    report["ddp"] = train(
        DistributedDataParallel(make_model()),
        rank=rank,
        world=world,
        shard_corruption=False,
        comm_debug=True,
    )
    model = make_model()
    fully_shard(model)
    report["fsdp"] = train(model, rank=rank, world=world, shard_corruption=True, comm_debug=True)
    report["fsdp_accumulation"] = accumulation_steps(model)
    report["plain_shards"] = plain_shard_run(rank=rank, world=world, process_group=dist.group.WORLD)
    print(json.dumps(report))
    sys.stdout.flush()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
