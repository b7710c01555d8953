"""The one bucketed all-reduce of the pack: ``badam_ddp`` averages the active block's FP32 master gradients with it,
``StateFreeUpdates`` the inactive blocks' half gradients (in FP32)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_mean"]


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
