"""torch.distributed for surgery: the process group ``torchrun`` describes, and what each rank does in it.

Launch any training command or the similarity pass with the launcher torch ships::

    torchrun --nproc-per-node 2 -m surgery finetune MODEL_DIR --data fashion-mnist     # one machine
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        --nproc-per-node 8 -m surgery incubate ...                                     # several

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; the first
surgery step that needs the group (:func:`init_from_env`) creates it: NCCL for CUDA tensors, gloo for
CPU ones (one group serves both, ``"cpu:gloo,cuda:nccl"``). Tests and notebooks may create the group
themselves (``torch.distributed.init_process_group(..., init_method="file://...")``); surgery then
uses that group. ``WORLD_SIZE=1`` or no group at all is the plain single-process path, unchanged.

Conventions every surgery command follows under a group (the reasons are in each function):

* every rank runs the same code: collective steps (training, evaluation, the similarity pass) are
  entered by all ranks, never by rank 0 alone;
* files are written by rank 0 only (:func:`is_main`; :func:`surgery.workspace.atomic_path` discards
  other ranks' writes unless told a file is per rank), and :func:`barrier` follows a write that
  other ranks read next. Several machines therefore need one shared file system for the output
  folder, as for any torchrun job that resumes from checkpoints;
* :func:`local` turns the group off for a block: a rank running its own share of independent jobs
  (:mod:`surgery.executor`'s ``torchrun`` backend) trains them as single processes.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from surgery.errors import SurgeryError

__all__ = ["init_from_env", "active", "rank", "world_size", "local_rank", "is_main", "barrier", "local",
           "device_for_rank", "all_reduce_sum", "all_gather_objects", "broadcast_object",
           "shard_train_loader", "shard_eval_loader", "launched_by_torchrun", "launch_local", "check_batch"]

_local_depth = 0  # > 0 inside local(): the group is ignored


def launched_by_torchrun() -> bool:
    """True when the environment describes more than one process (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init_from_env() -> bool:
    """Create the process group ``torchrun`` describes, once; returns :func:`active`.

    Nothing happens when a group exists already (a test's ``file://`` group) or the environment does
    not describe several processes. On CUDA machines each process also selects GPU ``LOCAL_RANK``.

    Raises:
        SurgeryError: the environment names several processes but the rendezvous variables are
            missing (``MASTER_ADDR`` / ``MASTER_PORT``), i.e. it was not started by torchrun.
    """
    if _local_depth or not dist.is_available():
        return False
    if not dist.is_initialized() and launched_by_torchrun():
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise SurgeryError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} not set; "
                               "launch with torchrun (e.g. torchrun --nproc-per-node 2 -m surgery ...)")
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank() % torch.cuda.device_count())
            backend = "cpu:gloo,cuda:nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend)
    return active()


def active() -> bool:
    """A process group of more than one rank exists and is not switched off by :func:`local`."""
    return (not _local_depth and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1)


def rank() -> int:
    """This process's global rank (0 without a group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Number of processes in the group (1 without one)."""
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``; 0 without torchrun)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def is_main() -> bool:
    """Rank 0, the one process that writes files and prints progress (always True without a group)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op without a group)."""
    if active():
        dist.barrier()


@contextmanager
def local() -> Iterator[None]:
    """Inside this block the group is ignored: training, evaluation and writes act as one process.

    Used by a rank that runs its own share of independent jobs; nothing inside may wait for the
    other ranks. Nestable.
    """
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


def device_for_rank(device: torch.device) -> torch.device:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` under a group (one GPU per process); others unchanged."""
    if active() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return device


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place (a no-op without a group)."""
    if not active():
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` without a group); picklable plain data only."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself without a group)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_batch(batch_size: int) -> None:
    """Refuse a global batch the processes cannot share equally (commands call it before writing).

    Raises:
        SurgeryError: ``batch_size`` is not a multiple of the world size.
    """
    if init_from_env() and batch_size % world_size():
        raise SurgeryError(f"the global batch size {batch_size} is not divisible by the {world_size()} processes; "
                           f"choose a multiple of {world_size()}")


def _dataset_of(loader: Any, what: str):
    if not isinstance(loader, DataLoader):
        raise SurgeryError(f"under torch.distributed the {what} data must be a DataLoader or a Dataset (each rank "
                           f"reads its own shard of loader.dataset), got {type(loader).__name__}")
    return loader.dataset


def shard_train_loader(loader: DataLoader, seed: int) -> DataLoader:
    """The rank's share of a training loader: the same global batch, ``batch_size / world`` per rank.

    A :class:`~torch.utils.data.distributed.DistributedSampler` seeded by ``seed`` (the loop calls
    ``set_epoch``) deals out one permutation per epoch: rank ``r`` takes positions ``r, r + W, ...``,
    so the ranks' batches at step ``s`` together are positions ``s*B .. s*B + B - 1`` of that
    permutation. A single process fed the same sampler with ``num_replicas=1`` sees exactly those
    global batches (the test of equivalence uses this).

    Raises:
        SurgeryError: not a DataLoader, or a batch size the world size does not divide.
    """
    dataset = _dataset_of(loader, "training")
    world, batch = world_size(), loader.batch_size
    if batch is None or batch % world:
        raise SurgeryError(f"the global batch size {batch} is not divisible by the {world} processes; "
                           f"choose a multiple of {world}")
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank(), shuffle=True, seed=seed, drop_last=True)
    return DataLoader(dataset, batch_size=batch // world, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last)


def shard_eval_loader(loader: DataLoader) -> DataLoader:
    """The rank's share of an evaluation loader: samples ``r, r + W, ...``, each exactly once.

    No padding (unlike ``DistributedSampler``): sums of correct predictions and losses reduced over
    the ranks equal the single-process ones.
    """
    dataset = _dataset_of(loader, "evaluation")
    shard = Subset(dataset, range(rank(), len(dataset), world_size()))
    return DataLoader(shard, batch_size=loader.batch_size, shuffle=False, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)


def _launch_entry(rank_: int, world: int, init_file: str, threads: int, fn, args, queue) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank_, world_size=world)
    try:
        # Pickled here to bytes: a tensor sent as is travels as a shared-memory handle that dies with
        # this process, which may exit before the parent reads it. (This is our own child process's
        # return value, not a file from elsewhere.)
        queue.put((rank_, True, pickle.dumps(fn(*args))))
    except BaseException as e:  # noqa: BLE001  (reported to the parent, which raises)
        import traceback

        queue.put((rank_, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        dist.destroy_process_group()


def launch_local(fn, nprocs: int = 2, args: tuple = (), *, threads: int = 1, timeout: float = 600.0) -> list[Any]:
    """Run ``fn(*args)`` in ``nprocs`` fresh CPU processes joined in one gloo group; their results.

    For tests, notebooks and debugging, what torchrun does in one call and without network ports: the
    processes are spawned (not forked) and meet through a ``file://`` rendezvous in a temporary
    folder. ``fn`` must be importable by name (a module-level function) and return picklable data.

    Args:
        fn: the function every rank runs; inside it :func:`rank`, :func:`world_size` and every
            surgery training call see the group.
        nprocs: number of processes.
        args: positional arguments of ``fn`` (picklable).
        threads: intra-op threads per process (keep ``nprocs * threads`` at most the cores).
        timeout: seconds to wait for all ranks.

    Returns:
        ``fn``'s return values in rank order.

    Raises:
        SurgeryError: a rank raised (its message and traceback included) or did not finish in time.
    """
    import queue as queue_mod
    import tempfile

    ctx = torch.multiprocessing.get_context("spawn")
    results: dict[int, Any] = {}
    with tempfile.TemporaryDirectory(prefix="surgery-group-") as tmp:
        q = ctx.Queue()
        procs = [ctx.Process(target=_launch_entry, args=(r, nprocs, f"{tmp}/rendezvous", threads, fn, args, q),
                             daemon=True) for r in range(nprocs)]
        for p in procs:
            p.start()
        failure = None
        try:
            for _ in range(nprocs):
                r, ok, value = q.get(timeout=timeout)
                if not ok and failure is None:
                    failure = f"rank {r} failed: {value}"
                    break
                results[r] = pickle.loads(value)
        except queue_mod.Empty:
            failure = f"{nprocs - len(results)} rank(s) did not finish within {timeout:.0f} s"
        finally:
            if failure is not None:
                for p in procs:
                    p.terminate()
            for p in procs:
                p.join(timeout=30)
    if failure is not None:
        raise SurgeryError(failure)
    return [results[r] for r in range(nprocs)]
