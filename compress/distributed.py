"""Multi-process runs under ``torchrun``: the process group, rank helpers, sharding and reductions.

Every function is a no-op (or the single-process answer) when the program was not started by
``torchrun`` with more than one process, so library code calls them unconditionally.

How the engine uses them:

- :func:`compress.training.fit` wraps the model in ``DistributedDataParallel``; each rank
  trains on its :func:`shard_indices` of the epoch's permutation; rank 0 writes checkpoints.
- :func:`compress.analysis.features.extract_features` runs each rank on a contiguous block of whole
  batches (:func:`shard_range`), then every rank receives the other blocks.
- :func:`compress.analysis.fields.field_matrices` sums each rank's block of the test features
  and adds the per-class sums across ranks (:func:`all_reduce_sum`).
- :mod:`compress.io` writes only on rank 0 (:func:`is_main`).
- :func:`run_on_main` runs a piece of work on rank 0 alone, the process group hidden from it
  (:func:`alone`), while the others wait; every rank gets its result (a recipe's model-changing
  steps, exports and benchmarks).
"""

from __future__ import annotations

import os
import pickle
import sys
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from compress.errors import UserError

__all__ = ["init_distributed", "launched", "is_distributed", "rank", "world_size", "local_world_size", "is_main",
           "barrier", "all_reduce_sum", "broadcast_", "broadcast_object", "broadcast_state_", "shard_indices",
           "shard_range", "alone", "run_on_main", "session"]

_CHUNK_BYTES = 256 * 2**20  # CPU tensors cross NCCL in pieces of this size
# How long the other ranks wait for rank 0's work in run_on_main (a benchmark or an export of a
# large model can outlast the process group's own timeout; a rank that dies ends the wait at once).
WAIT_FOR_MAIN = timedelta(hours=24)

T = TypeVar("T")
_alone = False  # inside alone(): this process acts as if it were the only one
_wait_group: Any = None  # the gloo group run_on_main waits in (created on first use, by every rank)


def launched() -> bool:
    """True when ``torchrun`` (or another launcher setting its variables) started this process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(timeout_minutes: float = 30.0) -> bool:
    """Join the process group that ``torchrun`` describes in ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``.

    NCCL on CUDA (each process takes the GPU ``LOCAL_RANK``), gloo on the CPU. Nothing happens
    outside ``torchrun`` or with a single process.

    Returns:
        True when this process is one of several.
    """
    if is_distributed():
        return True
    if not launched() or int(os.environ["WORLD_SIZE"]) <= 1:
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
    return True


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process (and not :func:`alone`)."""
    return not _alone and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank: from the process group, else from ``torchrun``'s ``RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ["RANK"]) if launched() else 0


def world_size() -> int:
    """Number of processes in the group (1 outside ``torchrun``)."""
    return dist.get_world_size() if is_distributed() else 1


def local_world_size() -> int:
    """Processes on this node (``torchrun``'s ``LOCAL_WORLD_SIZE``)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size())) if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0, the process that prints and writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _collective(tensor: torch.Tensor, op) -> torch.Tensor:
    """Run ``op(t)`` in place on ``tensor``; CPU tensors go through the GPU in chunks under NCCL."""
    if dist.get_backend() != "nccl" or tensor.is_cuda:
        op(tensor)
        return tensor
    flat = tensor.view(-1)
    step = max(1, _CHUNK_BYTES // max(1, tensor.element_size()))
    for start in range(0, flat.numel(), step):
        part = flat[start:start + step].cuda()
        op(part)
        flat[start:start + step].copy_(part.cpu())
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place; returns it (unchanged in a single process)."""
    if is_distributed():
        if not tensor.is_contiguous():
            raise ValueError("all_reduce_sum needs a contiguous tensor")
        _collective(tensor, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every process with its value on rank ``src``, in place (a contiguous
    tensor, possibly a slice of a larger one or backed by a memory-mapped file)."""
    if is_distributed():
        if not tensor.is_contiguous():
            raise ValueError("broadcast_ needs a contiguous tensor")
        _collective(tensor, lambda t: dist.broadcast(t, src=src))
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """A small picklable object (a path, a flag) as rank ``src`` has it."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_state_(module: torch.nn.Module, src: int = 0) -> torch.nn.Module:
    """Give every process rank ``src``'s parameters and buffers of ``module`` (the same
    architecture everywhere), in place: e.g. after ``DistributedDataParallel`` training, whose
    last step leaves each rank with its own batch-norm statistics."""
    if is_distributed():
        with torch.no_grad():
            for t in module.state_dict().values():
                if t.is_contiguous():
                    broadcast_(t, src)
                else:
                    t.copy_(broadcast_(t.contiguous(), src))
    return module


def shard_indices(n: int, epoch_seed: int, *, shuffle: bool = True) -> torch.Tensor:
    """This rank's sample indices for one epoch, with ``DistributedSampler``'s semantics.

    Every rank draws the same permutation of ``range(n)`` from ``epoch_seed`` (in a single process,
    exactly ``torch.randperm(n)`` of a generator seeded with it), pads it with its first indices
    to a multiple of the world size, and rank ``r`` takes positions ``r, r + W, r + 2W, ...``:
    the shards are disjoint (up to the padding), cover every sample and have equal length, so
    every rank takes the same number of steps.
    """
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world_size(), rank=rank() if is_distributed() else 0,
                                 shuffle=shuffle, seed=epoch_seed, drop_last=False)
    return torch.tensor(list(iter(sampler)), dtype=torch.long)


def shard_range(n: int, block: int = 1, *, of_rank: int | None = None) -> tuple[int, int]:
    """The contiguous rows ``[start, stop)`` of ``n`` that rank ``of_rank`` (default: this one) handles.

    The rows are cut into blocks of ``block`` (whole batches, so a sharded pass sees the same
    batches as a single process) and the blocks are split as evenly as possible, in rank order.
    """
    world = world_size()
    r = rank() if of_rank is None else of_rank
    blocks = -(-n // max(1, block))
    first, last = blocks * r // world, blocks * (r + 1) // world
    return min(n, first * block), min(n, last * block)


@contextmanager
def alone() -> Iterator[None]:
    """Act as a single process for the block: :func:`is_distributed` is False, :func:`world_size`
    1, and every helper of this module a no-op, so library code (training, evaluation, analysis)
    runs unsharded, without collective operations. For rank 0 while the others wait
    (:func:`run_on_main`)."""
    global _alone
    before, _alone = _alone, True
    try:
        yield
    finally:
        _alone = before


def _group() -> Any:
    """The gloo group of :func:`run_on_main` (CPU objects, a long timeout), created by every rank."""
    global _wait_group
    if _wait_group is None:
        _wait_group = dist.new_group(backend="gloo", timeout=WAIT_FOR_MAIN)
    return _wait_group


def _forget_group() -> None:
    global _wait_group
    _wait_group = None


def run_on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 alone (see :func:`alone`) while the other ranks wait; every rank returns
    rank 0's result, which must be picklable. Every rank must call it at the same point.

    In a single process, simply ``fn()``.

    Raises:
        Whatever ``fn`` raised on rank 0; on the other ranks a :class:`UserError` saying rank 0
        stopped (rank 0 reports the error, the others stop quietly with it).
    """
    if not is_distributed():
        return fn()
    group = _group()
    if is_main():
        try:
            with alone():
                value = fn()
            payload = pickle.dumps(("ok", value))
        except BaseException as e:
            dist.broadcast_object_list([pickle.dumps(("failed", f"{type(e).__name__}: {e}"))], src=0, group=group)
            raise
        dist.broadcast_object_list([payload], src=0, group=group)
        return value
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0, group=group)
    status, value = pickle.loads(box[0])
    if status != "ok":
        raise UserError(f"rank 0 stopped ({value})")
    return value


@contextmanager
def session(*, seed: int | None = None, single_process: str | None = None) -> Iterator[bool]:
    """Set up one command: seed, and under ``torchrun`` join the process group.

    torch's global generator is seeded with ``seed``, so a model's initial weights (drawn before
    training starts) follow the seed too, in every process alike. Ranks other than 0 print
    nothing on stdout (errors still reach stderr).

    Args:
        seed: seed of torch's global generator (``None``: left as it is).
        single_process: when the command cannot run in several processes, the message of the
            error raised if it was started so (``None``: it can).

    Yields:
        True on the ranks that should stay quiet (all but rank 0).
    """
    if seed is not None:
        torch.manual_seed(seed)
    if single_process is not None and launched() and int(os.environ["WORLD_SIZE"]) > 1:
        raise UserError(single_process)
    joined = init_distributed()
    quiet = not is_main()
    stdout = sys.stdout
    if quiet:
        sys.stdout = open(os.devnull, "w")
    try:
        yield quiet
    finally:
        if quiet:
            sys.stdout.close()
            sys.stdout = stdout
        _forget_group()
        if joined and dist.is_initialized():
            dist.destroy_process_group()
