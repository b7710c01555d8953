"""Stochastic rounding of FP32 values to half precision: unbiased updates of weights that have no FP32 master.

Round-to-nearest drops every update smaller than half a unit in the last place: a bf16 weight of 1.0 (ulp 2⁻⁷) ignores
any change below 0.0039, so many small steps add up to nothing. Stochastic rounding rounds up with probability equal
to the distance from the value below, divided by the gap: ``E[round(x)] = x``, and small updates survive on average.
BAdam's active block does not need it (its FP32 master keeps the small updates); code that updates half weights
directly does (:class:`~lightning_memopt.StateFreeUpdates`).

Example::

    >>> import torch
    >>> x = torch.full((100_000,), 1.0 + 2.0**-9)  # a quarter of the way from 1.0 to the next bf16 value, 1.0078125
    >>> sorted(set(stochastic_round(x, torch.bfloat16, torch.Generator().manual_seed(0)).tolist()))
    [1.0, 1.0078125]
    >>> float(x.to(torch.bfloat16).float().mean())  # round to nearest: the increment is lost
    1.0
    >>> round(float(stochastic_round(x, torch.bfloat16, torch.Generator().manual_seed(0)).double().mean()), 3)
    1.002
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["stochastic_round"]

_BF16_DROPPED_BITS = 16  # bf16 is the upper half of an FP32: same sign and exponent, 7 of its 23 mantissa bits


def stochastic_round(x: Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> Tensor:
    """Round ``x`` to ``dtype`` (``torch.bfloat16`` or ``torch.float16``) up or down at random, without bias.

    Each value becomes one of its two neighbours in ``dtype``, the upper one with probability
    ``(x - lower) / (upper - lower)``; values representable in ``dtype`` are returned unchanged. Inf/NaN, and values
    beyond ``dtype``'s range, become what round-to-nearest makes of them.

    For bf16 this is a bit operation on the FP32 pattern: add 16 uniformly random bits below the bf16 mantissa,
    then truncate them. The carry into the kept bits happens with exactly the probability above (for negative
    values too, since FP32 stores sign and magnitude). For fp16, whose exponent is narrower, the two neighbours are
    found with ``torch.nextafter`` and one is picked against a uniform draw.

    Args:
        x: the values, FP32 (other float dtypes are converted first).
        dtype: ``torch.bfloat16`` or ``torch.float16``; ``torch.float32``/``float64`` need no rounding and return ``x``
            converted.
        generator: the source of randomness, on ``x``'s device (seed it for reproducible runs); ``None`` uses the
            global generator.

    Example::

        >>> import torch
        >>> stochastic_round(torch.tensor([1.0, -2.5]), torch.bfloat16)  # exact values do not move
        tensor([ 1.0000, -2.5000], dtype=torch.bfloat16)
    """
    if dtype in (torch.float32, torch.float64):
        return x.to(dtype)
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"stochastic_round rounds to torch.bfloat16 or torch.float16, not {dtype}.")
    x = x.to(torch.float32)
    nearest = x.to(dtype)
    if dtype == torch.bfloat16:
        noise = torch.randint(
            0, 1 << _BF16_DROPPED_BITS, x.shape, dtype=torch.int32, device=x.device, generator=generator
        )
        # -65536 is 0xFFFF0000 as an int32: keep sign, exponent and the 7 mantissa bits bf16 has
        rounded = ((x.view(torch.int32) + noise) & -(1 << _BF16_DROPPED_BITS)).view(torch.float32).to(dtype)
    else:
        above = nearest.float() > x
        lower = torch.where(above, torch.nextafter(nearest, torch.full_like(nearest, -float("inf"))), nearest)
        upper = torch.where(above, nearest, torch.nextafter(nearest, torch.full_like(nearest, float("inf"))))
        gap = upper.float() - lower.float()
        chance = torch.where(gap > 0, (x - lower.float()) / gap, torch.zeros_like(x))
        draw = torch.rand(x.shape, dtype=torch.float32, device=x.device, generator=generator)
        rounded = torch.where(draw < chance, upper, lower)
    return torch.where(torch.isfinite(nearest), rounded, nearest)
