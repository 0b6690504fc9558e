"""Two gloo ranks take the decisions of the one-process run (SPEC.md, "Distributed").

tests/distributed/torch_ranks.py trains the same small model under DDP and
under FSDP2 (``fully_shard``, DTensor gradients), and runs the functional
``update`` on plain-tensor shards with ``process_group``; this file replays the
same code in one process and compares. The two ranks run in subprocesses on
127.0.0.1, bounded by a timeout and killed if they run over.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))
import launch  # noqa: E402
import scenario  # noqa: E402
import torch_ranks  # noqa: E402

from optax_gradflow.torch import distributed as ogt_distributed  # noqa: E402

WORLD = 2
FLAG_CLIPPED, FLAG_EXPLOSION, FLAG_NONFINITE = 1, 2, 8
ALL_REDUCE = "c10d.allreduce_"
# The ranks average the two halves' gradients where the reference takes the
# mean over the whole batch: floats agree to the last bits, not bit for bit.
RTOL = 1e-6
# Parameters add up twelve SGD steps and some end near zero: compared with an
# absolute tolerance too, 1e-6 of their typical size (0.1).
PARAM_ATOL = 1e-7


# The track rule's log-domain fields (SPEC.md, "Tracking rule") and the
# diagnostics' log-norm slope can sit near 0, where a relative tolerance
# means nothing: the norm's last-bit difference becomes an absolute one of
# about 1e-8 in the log. Compared with this absolute tolerance too (log
# units: a relative 1e-7 of the norm).
LOG_FIELDS = ("ema_mean", "ema_var", "centre_anchor", "norm_quantile", "norm_trend")
LOG_ATOL = 1e-7
# The loss gate's spread is an average of |loss - centre|, a difference of two
# nearly equal losses: a last-bit difference of the (all-reduced) loss is an
# absolute one of about 3e-8 in it (the losses here are about 0.5), far more
# than 1e-6 of a spread of 0.02. Compared with this absolute tolerance too.
DIFFERENCE_FIELDS = ("loss_spread",)
DIFFERENCE_ATOL = 1e-7


def assert_same(got, want, context: str, *, rtol: float = RTOL, atol: float = 0.0) -> None:
    """Exact for integers and booleans, ``rtol`` / ``atol`` for floats; NaN equals NaN."""
    if isinstance(want, dict):
        assert set(got) == set(want), context
        for name in want:
            assert_same(got[name], want[name], f"{context}: {name}", rtol=rtol, atol=atol)
        return
    if context.endswith(tuple(f": {name}" for name in LOG_FIELDS)):
        atol = max(atol, LOG_ATOL)
    if context.endswith(tuple(f": {name}" for name in DIFFERENCE_FIELDS)):
        atol = max(atol, DIFFERENCE_ATOL)
    g, w = np.asarray(got), np.asarray(want)
    assert g.shape == w.shape, context
    if w.dtype.kind == "f":
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, equal_nan=True, err_msg=context)
    else:
        np.testing.assert_array_equal(g, w, err_msg=context)


def assert_identical(got, want, context: str) -> None:
    for name in want:
        np.testing.assert_array_equal(
            np.asarray(got[name]), np.asarray(want[name]), err_msg=f"{context}: {name}"
        )


@pytest.fixture(scope="module")
def ranks():
    port = launch.free_port()
    return launch.run_together(
        [["torch_ranks.py", str(r), str(WORLD), str(port)] for r in range(WORLD)],
        env=launch.environment(OMP_NUM_THREADS="1"),
        timeout=180,
    )


@pytest.fixture(scope="module")
def reference():
    """The same training loops, one process, whole batch, no wrapper."""
    return {
        "ddp": torch_ranks.train(torch_ranks.make_model(), rank=0, world=1, shard_corruption=False),
        "fsdp": torch_ranks.train(torch_ranks.make_model(), rank=0, world=1, shard_corruption=True),
        "plain_shards": torch_ranks.plain_shard_run(rank=0, world=1),
    }


def _ranks_agree_with_reference(ranks, reference, run: str) -> None:
    for k in range(scenario.STEPS):
        states = [r[run]["states"][k] for r in ranks]
        for rank, state in enumerate(states[1:], start=1):
            assert_identical(state, states[0], f"{run} step {k}: rank {rank} vs rank 0")
        assert_same(states[0], reference[run]["states"][k], f"{run} step {k}")


@pytest.mark.distributed
def test_ddp_ranks_take_the_one_process_decisions(ranks, reference):
    _ranks_agree_with_reference(ranks, reference, "ddp")
    for r in ranks:
        assert_same(
            r["ddp"]["params"],
            reference["ddp"]["params"],
            f"rank {r['rank']} params",
            atol=PARAM_ATOL,
        )
    # DDP's gradients are already the whole batch's: the norm is not summed
    # again across ranks (that would make it sqrt(2) times larger).
    for k in range(scenario.STEPS):
        np.testing.assert_allclose(
            ranks[0]["ddp"]["states"][k]["last_grad_norm"],
            reference["ddp"]["states"][k]["last_grad_norm"],
            rtol=RTOL,
        )
    # The stabilizer added no communication to any DDP step.
    for r in ranks:
        assert r["ddp"]["comm_counts"] == [{}] * scenario.STEPS
    # The NaN in one rank's data reached every rank through DDP's all-reduce.
    for r in ranks:
        assert r["ddp"]["states"][-1]["event_flags"][scenario.NAN_STEP] & FLAG_NONFINITE


@pytest.mark.distributed
def test_fsdp2_ranks_take_the_one_process_decisions(ranks, reference):
    _ranks_agree_with_reference(ranks, reference, "fsdp")
    # Each rank holds rows of every parameter (dim-0 shards, the last bias
    # unevenly: 2 rows and 1); together they are the one-process parameters.
    for name, want in reference["fsdp"]["params"].items():
        joined = np.concatenate([np.asarray(r["fsdp"]["params"][name]) for r in ranks])
        assert_same(joined, want, f"param {name}", atol=PARAM_ATOL)
    # One all-reduce per step, of the sum of squares; no gather of gradients.
    for r in ranks:
        assert r["fsdp"]["comm_counts"] == [{ALL_REDUCE: 1}] * scenario.STEPS


@pytest.mark.distributed
def test_fsdp2_bad_values_in_one_shard_move_every_rank(ranks, reference):
    """Rank 1's shard alone holds a spike, then an inf: rank 0 clips, then skips."""
    flags = [r["fsdp"]["states"][-1]["event_flags"] for r in ranks]
    spike, inf = torch_ranks.SHARD_SPIKE_STEP, torch_ranks.SHARD_INF_STEP
    for rank_flags in flags:
        assert rank_flags[spike] & FLAG_CLIPPED and rank_flags[spike] & FLAG_EXPLOSION
        assert rank_flags[inf] & FLAG_NONFINITE
    # The reference, which sees the whole gradient, decided the same.
    ref_flags = reference["fsdp"]["states"][-1]["event_flags"]
    assert ref_flags[spike] == flags[0][spike] and ref_flags[inf] == flags[0][inf]
    for r in ranks:
        assert np.isinf(r["fsdp"]["states"][inf]["last_grad_norm"])
        assert r["fsdp"]["states"][inf]["nonfinite_count"] == (
            r["fsdp"]["states"][inf - 1]["nonfinite_count"] + 1
        )


@pytest.mark.distributed
def test_fsdp2_accumulated_gradients_are_stabilized_again(ranks):
    # A second backward pass without zero_grad is a new step, not a repeat.
    assert [r["fsdp_accumulation"] for r in ranks] == [[1, 2]] * WORLD


@pytest.mark.distributed
def test_functional_update_with_process_group_on_plain_shards(ranks, reference):
    run = "plain_shards"
    _ranks_agree_with_reference(ranks, reference, run)
    for k in range(scenario.STEPS):
        for i, name in enumerate(scenario.SHAPES):
            joined = np.concatenate([np.asarray(r[run]["updates"][k][i]) for r in ranks])
            assert_same(joined, reference[run]["updates"][k][i], f"step {k} {name}", rtol=1e-6)
    flags = ranks[0][run]["states"][-1]["event_flags"]
    assert flags[scenario.SPIKE_STEP] & FLAG_CLIPPED
    assert flags[scenario.NAN_STEP] & FLAG_NONFINITE and flags[scenario.INF_STEP] & FLAG_NONFINITE


def test_plain_tensors_without_process_group_need_no_collective():
    """No process group, no DTensor: the local sum, not a call to torch.distributed."""
    calls = []

    def local_sum(leaves, device):
        calls.append(len(leaves))
        return torch.stack([torch.sum(x.float() ** 2) for x in leaves]).sum()

    leaves = [torch.tensor([3.0]), torch.tensor([4.0])]
    total = ogt_distributed.global_sum_of_squares(leaves, torch.device("cpu"), None, local_sum)
    assert float(total) == 25.0 and calls == [2]
    assert ogt_distributed.local_shard(leaves[0]) is leaves[0]
    assert ogt_distributed.like(leaves[0], leaves[1]) is leaves[1]
