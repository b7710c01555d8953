"""The rules of Adafactor's stabilisers (Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
Cost", ICML 2018) as plain functions, testable against the paper's equations.

The paper's notation, per parameter tensor X and step t = 1, 2, ...:

- increasing decay of the second moment: β̂₂ₜ = 1 - t^c with c = -0.8, so β̂₂₁ = 0 and the estimate needs no bias
  correction (Section 7.2);
- update clipping: Û = U / max(1, RMS(U) / d) with d = 1, where U = G / √V̂ is the unscaled update (Section 6);
- relative step size: αₜ = max(ε₂, RMS(Xₜ₋₁)) · ρₜ with ρₜ = min(10⁻², 1/√t) and ε₂ = 10⁻³ (Section 8);
  ``warmup_init`` uses ρₜ = min(10⁻⁶·t, 1/√t), as fairseq's and transformers' Adafactor do.

The callbacks :class:`~lightning_memopt.callbacks.update_clipping.UpdateClipping`,
:class:`~lightning_memopt.callbacks.beta2_schedule.Beta2Schedule` and
:class:`~lightning_memopt.callbacks.relative_step.RelativeStepSize` apply these rules to any optimizer's step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "EPS1",
    "EPS2",
    "adam_bias_correction_fix",
    "beta2_at",
    "clip_scale",
    "relative_step_size",
    "rms",
    "rms_many",
    "step_size_cap",
]

EPS1 = 1e-30  # the paper's ε₁, added to G² in the second-moment estimate
EPS2 = 1e-3  # the paper's ε₂, the smallest parameter scale a relative step is taken against


def rms(x: Tensor) -> float:
    """Root mean square of a tensor, ``‖x‖₂ / √n`` (half precision is reduced in FP32).

    Example::

        >>> rms(torch.tensor([3.0, -3.0, 3.0, -3.0]))
        3.0
    """
    return rms_many([x])[0]


def rms_many(tensors: Sequence[Tensor]) -> list[float]:
    """:func:`rms` of several tensors, with one device-to-host transfer for all of them.

    Example::

        >>> rms_many([torch.ones(4), torch.full((2, 2), -2.0)])
        [1.0, 2.0]
    """
    if not tensors:
        return []
    norms = [
        torch.linalg.vector_norm(t, dtype=torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None)
        for t in tensors
    ]
    wide = torch.float32 if norms[0].device.type == "mps" else torch.float64  # MPS has no float64
    values = torch.stack([n.to(wide) for n in norms]).tolist()
    return [v / math.sqrt(max(t.numel(), 1)) for v, t in zip(values, tensors, strict=True)]


def beta2_at(t: float, decay: float = -0.8) -> float:
    """The paper's second-moment decay at step ``t`` (counted from 1): β̂₂ₜ = 1 - t^decay.

    Example::

        >>> beta2_at(1)
        0.0
        >>> round(beta2_at(100), 4)
        0.9749
    """
    if t < 1:
        raise ValueError(f"The step t counts from 1 but is: {t}")
    return 1.0 - float(t) ** decay


def adam_bias_correction_fix(beta2: float, step: float, product: float) -> float:
    """The factor that makes Adam's bias correction right when β₂ changes from step to step.

    Adam divides its second moment vₜ by ``1 - β₂^step``, which is the total weight of vₜ's terms only for a constant
    β₂. For a schedule the total weight is ``1 - ∏ β̂₂ⱼ`` over the steps since v was zero (``product``, this step's
    β̂₂ included). Adam's update ``-lr · m̂ / (√(v / (1 - β₂^step)) + ε)`` becomes the right one,
    ``-lr · m̂ / (√(v / (1 - ∏ β̂₂ⱼ)) + ε)``, when Adam runs with ε·f and its update (without decoupled weight
    decay) is then multiplied by f, for

        f = √((1 - ∏ β̂₂ⱼ) / (1 - β₂^step)).

    Args:
        beta2: the β₂ Adam steps with (this step's β̂₂ₜ).
        step: Adam's own step count for the tensor, this step included (what it raises β₂ to).
        product: ∏ β̂₂ⱼ over the steps since v was zero, this one included.

    Example::

        >>> adam_bias_correction_fix(beta2=0.999, step=10, product=0.999**10)  # a constant beta2 needs no fix
        1.0
        >>> adam_bias_correction_fix(beta2=0.5, step=2, product=0.0)  # beta2 was 0 at step 1: no bias at all
        1.1547005383792515
    """
    adam_weight = 1.0 - beta2**step
    if adam_weight <= 0.0:
        raise ValueError(f"Adam's bias correction 1 - beta2**step is {adam_weight} for beta2={beta2}, step={step}")
    return math.sqrt((1.0 - product) / adam_weight)


def clip_scale(update_rms: float, threshold: float = 1.0) -> float:
    """The factor update clipping multiplies the unscaled update U by: 1 / max(1, RMS(U) / d).

    Example::

        >>> clip_scale(0.5)
        1.0
        >>> clip_scale(4.0, threshold=2.0)
        0.5
    """
    return 1.0 / max(1.0, update_rms / threshold)


def step_size_cap(t: float, max_step: float = 1e-2, warmup_init: bool = False) -> float:
    """The relative step size's ρₜ = min(max_step, 1/√t), or min(10⁻⁶·t, 1/√t) with ``warmup_init``.

    Example::

        >>> step_size_cap(1)
        0.01
        >>> step_size_cap(40_000)
        0.005
        >>> step_size_cap(1000, warmup_init=True)
        0.001
    """
    if t < 1:
        raise ValueError(f"The step t counts from 1 but is: {t}")
    cap = 1e-6 * t if warmup_init else max_step
    return min(cap, 1.0 / math.sqrt(t))


def relative_step_size(
    t: float, param_rms: float, max_step: float = 1e-2, eps2: float = EPS2, warmup_init: bool = False
) -> float:
    """The paper's step size αₜ = max(ε₂, RMS(Xₜ₋₁)) · ρₜ for a tensor whose RMS before the step is ``param_rms``.

    Example::

        >>> relative_step_size(1, param_rms=0.5)
        0.005
        >>> relative_step_size(1, param_rms=0.0)  # a zero-initialised tensor still moves
        1e-05
    """
    return max(eps2, param_rms) * step_size_cap(t, max_step, warmup_init)
