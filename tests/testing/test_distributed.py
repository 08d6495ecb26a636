"""The multi-process test runner (megatron_emo.testing.distributed.run_distributed)."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from megatron_emo.testing.distributed import DistributedError, run_distributed


def _rank_and_sum(rank, world_size, offset):
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    return {"rank": rank, "world": world_size, "sum": value, "offset": offset}


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on purpose")
    dist.barrier()  # rank 0 waits here for rank 1, which never comes
    return rank


def _hang(rank, world_size):
    time.sleep(600)


def test_results_are_ordered_by_rank_and_collectives_work():
    results = run_distributed(_rank_and_sum, 2, 10)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == 2 and r["offset"] == 10 for r in results)
    assert all(torch.equal(r["sum"], torch.tensor([3.0])) for r in results)


def test_exception_names_rank_and_traceback():
    with pytest.raises(DistributedError) as excinfo:
        run_distributed(_fail_on_rank_one, 2, timeout=60)
    message = str(excinfo.value)
    assert "rank 1 of 2 failed" in message
    assert "ValueError: boom on purpose" in message and "Traceback" in message
    assert "_fail_on_rank_one" in message


def test_timeout_kills_and_raises():
    with pytest.raises(DistributedError, match="timed out"):
        run_distributed(_hang, 2, timeout=3)


def _crash_on_rank_zero(rank, world_size):
    if rank == 0:
        os._exit(3)  # dies without reporting, as a segfault would
    return rank


def test_child_dying_without_report_is_an_error():
    with pytest.raises(DistributedError, match="rank 0 of 2 failed:\nexited with code 3"):
        run_distributed(_crash_on_rank_zero, 2, timeout=60)
