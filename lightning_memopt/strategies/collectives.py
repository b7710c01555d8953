"""The one bucketed all-reduce of the pack: ``badam_ddp`` averages the active block's FP32 master gradients with it,
``StateFreeUpdates`` the inactive blocks' half gradients (in FP32)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_mean", "finish_distributed"]


def all_reduce_mean(tensors: Sequence[Tensor], world: int, cap_bytes: int, dtype: torch.dtype = torch.float32) -> None:
    """Average ``tensors`` over the ``world`` ranks in place, reduced in ``dtype``, in buckets of about ``cap_bytes``.

    Consecutive tensors are flattened into one buffer until it holds ``cap_bytes`` or more (counted in ``dtype``),
    which is then summed across ranks and divided by ``world``; a lone contiguous tensor already in ``dtype`` is
    reduced where it lies, without a copy. Every rank must pass tensors of the same shapes in the same order.

    Example::

        all_reduce_mean([p.grad for p in block], dist.get_world_size(), cap_bytes=25 * 2**20)
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    bucket: list[Tensor] = []
    size = 0
    for tensor in tensors:
        bucket.append(tensor)
        size += tensor.numel() * itemsize
        if size >= cap_bytes:
            _reduce(bucket, world, dtype)
            bucket, size = [], 0
    if bucket:
        _reduce(bucket, world, dtype)


def finish_distributed() -> None:
    """End this process's part of a multi-process run: wait for every rank, then destroy the process groups.

    Call it once, at the very end of a script that ran a multi-device ``Trainer`` (``lightning-memopt fit`` does).
    Lightning leaves the process group alive after ``fit`` and destroys it at interpreter exit; a gloo group whose
    peer is already gone at that point can abort the process (``terminate called without an active exception``,
    exit status -6) after the run itself succeeded. With every rank past the barrier first, each tears down while
    the others are still connected. Does nothing in a single-process run.

    Example::

        trainer.fit(model)
        finish_distributed()
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()


def _reduce(bucket: list[Tensor], world: int, dtype: torch.dtype) -> None:
    in_place = len(bucket) == 1 and bucket[0].is_contiguous() and bucket[0].dtype == dtype
    flat = bucket[0].view(-1) if in_place else torch.cat([t.reshape(-1).to(dtype) for t in bucket])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(world)
    if not in_place:
        offset = 0
        for tensor in bucket:
            n = tensor.numel()
            tensor.copy_(flat[offset : offset + n].view_as(tensor))
            offset += n
