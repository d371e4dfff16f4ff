"""`run_distributed`, the helper that runs a function on N gloo ranks: return values come back
by rank, the ranks share a working process group, and a failing rank surfaces in the test with
its rank named instead of hanging the others."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from distributed import RankError, run_distributed


def _rank_and_sum(offset: int) -> tuple[int, int, str, float]:
    t = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(t)  # a real collective over the helper's group
    return dist.get_rank(), dist.get_world_size(), os.environ["DS_ACCELERATOR"], t.item()


def test_return_values_come_back_by_rank():
    assert run_distributed(_rank_and_sum, 2, 10) == [(0, 2, "cpu", 21.0), (1, 2, "cpu", 21.0)]


def _rank_1_fails() -> int:
    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")
    dist.barrier()  # rank 0 would wait here for ever: the helper must not
    return 0


def test_a_failing_rank_is_named_and_the_others_do_not_hang():
    with pytest.raises(RankError, match=r"rank 1 failed:[\s\S]*ValueError: boom on purpose") as e:
        run_distributed(_rank_1_fails, 2, timeout=120)
    assert e.value.rank == 1


def _rank_0_exits() -> None:
    if dist.get_rank() == 0:
        os._exit(3)


def test_a_rank_that_dies_is_named():
    with pytest.raises(RankError, match="rank 0 failed: exited with code 3"):
        run_distributed(_rank_0_exits, 2, timeout=120)
