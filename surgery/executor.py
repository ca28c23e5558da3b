"""Independent jobs on one process, a process pool, or the ranks of a torchrun group.

A *job* here is a pure function of its arguments (a spec and a seed) that writes its own output:
an incubation module MT_k, a co-training member that is not batched, one fine-tune of a benchmark,
one model's features. Such jobs need no communication, so they are dealt out rather than
data-parallelised; a job whose output exists is skipped, which makes resumption work the same way
on every backend (a killed run rerun with the same command redoes only the unfinished jobs).

Backends (:data:`BACKENDS`):

* ``serial``: one after another in this process;
* ``process``: a pool of spawned processes on this machine, the cores split between them (the
  default for more than one job and worker). A worker dies with its parent (``PR_SET_PDEATHSIG`` on
  Linux) and a failed or interrupted job stops the others;
* ``torchrun``: under a torchrun group each rank runs jobs ``r, r + W, r + 2W, ...`` of those still
  to do, as a single process (:func:`surgery.distributed.local`), then all ranks wait for each other;
  several machines need a shared file system for the outputs.

Why our own ~100 lines rather than Ray or Dask: both run these jobs (measured here: Ray 6.6 s
start-up and 236 MB installed, Dask 5.5 s), but the jobs need nothing they offer beyond a process
pool, and the torchrun backend reuses the launcher users already have for training. A cluster
scheduler can still run the ``torchrun`` backend (see the README's SLURM example).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from surgery import distributed
from surgery.errors import SurgeryError

__all__ = ["BACKENDS", "run_jobs", "default_backend", "threads_per_worker"]

BACKENDS = ("serial", "process", "torchrun")


def default_backend(workers: int) -> str:
    """``torchrun`` under a group, ``process`` for more than one worker, else ``serial``."""
    if distributed.init_from_env():
        return "torchrun"
    return "process" if workers > 1 else "serial"


def threads_per_worker(workers: int) -> int:
    """This machine's cores (the ones this process may use) divided between ``workers``, at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(workers, 1))


def _worker_init(threads: int) -> None:
    """A pool worker: its share of the cores, and it dies with the parent.

    Without PR_SET_PDEATHSIG a ``kill -9`` of the command would leave the workers running (and then
    idling) as orphans; Linux only, elsewhere a no-op.
    """
    torch.set_num_threads(threads)
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Stop running jobs now (``shutdown`` alone waits for them to finish)."""
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):  # older Pythons: no public way
        process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def run_jobs(
    fn: Callable[..., Any],
    jobs: Sequence[tuple],
    *,
    backend: str | None = None,
    workers: int = 1,
    done: Callable[[int], bool] | None = None,
    on_done: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """Run ``fn(*jobs[i])`` for every job not yet done, on a backend; results in job order.

    Args:
        fn: a module-level function (the ``process`` backend imports it by name in each worker;
            a script calling this needs the usual ``if __name__ == "__main__":`` guard).
        jobs: one tuple of picklable arguments per job.
        backend: one of :data:`BACKENDS`; None picks :func:`default_backend`.
        workers: processes of the ``process`` backend (threads are split between them).
        done: ``done(i)`` True when job ``i``'s output exists: the job is skipped (its result is None).
        on_done: called in this process as ``on_done(i, result)`` after each job this process ran or
            collected (with ``torchrun``, rank 0 sees every rank's results at the end).

    Returns:
        Each job's return value; None for skipped jobs. With ``torchrun`` every rank gets all of
        them (gathered with ``all_gather_object``), so they must be picklable.

    Raises:
        SurgeryError: an unknown backend, ``torchrun`` without a group, ``workers < 1``.
    """
    backend = backend or default_backend(workers)
    if backend not in BACKENDS:
        raise SurgeryError(f"unknown executor {backend!r}; expected one of {', '.join(BACKENDS)}")
    if workers < 1:
        raise SurgeryError(f"workers must be at least 1, got {workers}")
    todo = [i for i in range(len(jobs)) if done is None or not done(i)]
    results: list[Any] = [None] * len(jobs)

    def finished(i: int, value: Any) -> None:
        results[i] = value
        if on_done is not None:
            on_done(i, value)

    if backend == "torchrun":
        if not distributed.init_from_env():
            raise SurgeryError("the torchrun executor needs a torchrun launch with more than one process "
                               "(torchrun --nproc-per-node N -m surgery ...)")
        # Rank 0's list for everyone: a rank that looked later could see outputs a faster rank has
        # just written and deal the remaining jobs differently (jobs skipped or run twice).
        todo = distributed.broadcast_object(todo)
        me = distributed.rank()
        mine = todo[me::distributed.world_size()]
        local_results: dict[int, Any] = {}
        error = None
        with distributed.local():
            for i in mine:
                try:
                    local_results[i] = fn(*jobs[i])
                except Exception as e:  # noqa: BLE001  (re-raised on every rank below, not swallowed)
                    error = f"rank {me}, job {i}: {e}"
                    break
        # A failed job must not leave the other ranks waiting forever: everyone learns of it here.
        shares = distributed.all_gather_objects((local_results, error))
        errors = [err for _, err in shares if err]
        if errors:
            raise SurgeryError(errors[0])
        for share, _ in shares:
            for i, value in sorted(share.items()):
                finished(i, value)
        return results
    if backend == "serial" or len(todo) <= 1 or workers == 1:
        for i in todo:
            finished(i, fn(*jobs[i]))
        return results
    workers = min(workers, len(todo))
    # spawn, not fork: fork would copy this process's thread pools.
    ctx = torch.multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                               initargs=(threads_per_worker(workers),))
    try:
        futures = {i: pool.submit(fn, *jobs[i]) for i in todo}
        for i, fut in futures.items():
            finished(i, fut.result())
    except BaseException:
        _stop_workers(pool)  # Ctrl-C or a failed job: the others stop too; finished outputs stay
        raise
    pool.shutdown()
    return results
