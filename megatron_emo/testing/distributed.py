"""Run a function on several CPU processes joined in one torch.distributed process group.

    run_distributed(fn, world_size, *args) --spawn world_size processes-->
        each: init_process_group(file:// rendezvous) -> fn(rank, world_size, *args) -> result
    --> [result of rank 0, result of rank 1, ...]

``fn`` must be a module-level function (the "spawn" start method pickles it by name) and its
arguments and return value must be picklable. Results travel back as pickled bytes, so tensors
are copied by value and stay valid after the child exits. A rank that raises makes the call
raise :class:`DistributedError` naming the rank and carrying its traceback; the other ranks are
killed (they may be blocked in a collective waiting for it). Past ``timeout`` seconds every
child is killed and :class:`DistributedError` is raised as well.
"""

import os
import pickle
import queue as queue_module
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class DistributedError(RuntimeError):
    """A rank failed, died or did not finish in time."""


def _worker(fn, rank, world_size, init_method, backend, results, args):
    """Body of one child: join the group, run ``fn``, report ``(rank, ok, payload)``.

    The report goes out before the group is destroyed, so a rank's own error reaches the
    parent ahead of the errors it causes on the ranks blocked in a collective with it.
    """
    torch.set_num_threads(1)  # world_size processes share the machine's cores
    initialised = False
    try:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
        initialised = True
        results.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # report everything, KeyboardInterrupt included
        results.put((rank, False, traceback.format_exc()))
    finally:
        if initialised:
            dist.destroy_process_group()


def _stop(processes, wait: float = 0.0):
    """Give the children ``wait`` s to exit by themselves (exiting, a child shuts down the helper
    processes it started, e.g. megatron-core's checkpoint writer's), then terminate, then kill,
    every child still alive; reap them all."""
    deadline = time.monotonic() + wait
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()


def run_distributed(fn, world_size: int, *args, backend: str = "gloo", timeout: float = 120.0):
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` processes; return results by rank.

    Args:
        fn: module-level function; torch.distributed is initialised when it runs.
        world_size: number of processes (ranks).
        *args: extra picklable arguments, the same for every rank.
        backend: torch.distributed backend ("gloo" on CPU).
        timeout: seconds for the whole run, process start-up included.

    Returns:
        list of ``world_size`` return values, index = rank.

    Raises:
        DistributedError: a rank raised (message names the rank, with its traceback), a child
            died without reporting, or the timeout passed.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="emo_dist_") as tmp:
        init_method = "file://" + os.path.join(tmp, "rendezvous")
        processes = [
            context.Process(
                target=_worker,
                args=(fn, rank, world_size, init_method, backend, results, args),
                daemon=False,
            )
            for rank in range(world_size)
        ]
        try:
            for process in processes:
                process.start()
            values = _collect(processes, results, deadline, timeout)
            _stop(processes, wait=30.0)
            return values
        finally:
            _stop(processes)
            results.close()


def _collect(processes, results, deadline, timeout, grace=2.0):
    """Read every rank's report; raise on the first failure once the others had ``grace`` s.

    After a failure, the other ranks often fail too (a collective with the failed rank
    breaks): the error lists every failure, the first reported (usually the cause) first.
    """
    world_size = len(processes)
    values, failures, dead_since = {}, [], {}
    stop_at = deadline
    while len(values) + len(failures) < world_size:
        now = time.monotonic()
        if now >= stop_at:
            break
        try:
            rank, ok, payload = results.get(timeout=min(stop_at - now, 0.5))
        except queue_module.Empty:
            # A child killed by a signal never reports: give its report 1 s to arrive.
            for rank, process in enumerate(processes):
                reported = rank in values or any(rank == r for r, _ in failures)
                if reported or process.exitcode in (None, 0):
                    continue
                if now - dead_since.setdefault(rank, now) > 1.0:
                    failures.append((rank, f"exited with code {process.exitcode} without a report"))
                    stop_at = min(stop_at, now + grace)
            continue
        if ok:
            values[rank] = pickle.loads(payload)
        else:
            failures.append((rank, payload))
            stop_at = min(stop_at, time.monotonic() + grace)
    if failures:
        details = "\n".join(f"rank {rank} of {world_size} failed:\n{text}" for rank, text in failures)
        ranks = ", ".join(str(rank) for rank, _ in failures)
        raise DistributedError(f"rank(s) {ranks} failed (first reported first)\n{details}")
    if len(values) < world_size:
        missing = sorted(set(range(world_size)) - set(values))
        raise DistributedError(f"timed out after {timeout:g} s waiting for rank(s) {missing}")
    return [values[rank] for rank in range(world_size)]
