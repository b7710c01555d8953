"""Adafactor's update clipping for any optimizer: Û = U / max(1, RMS(U) / d), per parameter tensor."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim import Optimizer

from lightning_memopt.adafactor_rules import clip_scale
from lightning_memopt.callbacks.update_transform import (
    ORDER_CLIP,
    ParamUpdate,
    TransformCallback,
    UpdateTransform,
    is_adafactor,
    optimizer_name,
)

__all__ = ["UpdateClipping"]


class UpdateClipping(TransformCallback):
    """Scale each tensor's update so that the root mean square of its unscaled update is at most ``threshold``.

    Shazeer & Stern (2018, Section 6) clip the *update*, not the gradient: when the second-moment estimate is out of
    date (slow β₂, a sudden larger gradient), ``U = G / √V̂`` grows far beyond 1 and a single step can wreck training.
    ``Û = U / max(1, RMS(U) / d)`` bounds it, per tensor, with the paper's ``d = 1``.

    What is clipped is the update the optimizer really made: after ``optimizer.step()`` each tensor's change is
    measured against a snapshot taken before it, split into decoupled weight decay and the gradient-driven part
    ``G``, and ``U = G / lr``. For Adam that is ``m̂ / (√v̂ + ε)``, for SGD the momentum buffer; bitsandbytes'
    8-bit optimizers are handled the same way. Under BAdam the optimizer's tensors *are* the active block's FP32
    masters, so the masters are clipped before they are copied into the half-precision weights.

    Weight decay: AdamW-style decoupled decay (``X ← X·(1 - lr·wd)``) is left as the optimizer applied it and only
    ``G`` is clipped — the paper clips ``G/√V̂`` to guard against a stale second moment, which the decay does not
    involve, and ``torch.optim.Adafactor`` likewise decays outside its clipped update. L2 decay that the optimizer adds
    to the gradient (Adam's or SGD's ``weight_decay``) is part of the gradient and so of ``U``, and is clipped with it.
    With momentum the clip acts on the optimizer's final update (after momentum); for β₁ = 0 that is the paper's
    algorithm exactly.

    Combines with :class:`~lightning_memopt.callbacks.beta2_schedule.Beta2Schedule` and
    :class:`~lightning_memopt.callbacks.relative_step.RelativeStepSize` (their order is fixed: bias correction,
    clipping, step size) and with any strategy except sharded ones (FSDP, DeepSpeed). It costs one copy of the stepped
    tensors during ``step()``, shared with those callbacks.

    Args:
        threshold: the paper's ``d``: the largest RMS an unscaled update may keep (default 1).

    Example::

        from lightning.pytorch import Trainer
        from lightning_memopt import BAdamStrategy, BlockSwitch
        from lightning_memopt.callbacks.update_clipping import UpdateClipping

        trainer = Trainer(strategy=BAdamStrategy(), precision="bf16-true",
                          callbacks=[BlockSwitch(every=100), UpdateClipping(threshold=1.0)])
    """

    def __init__(self, threshold: float = 1.0) -> None:
        super().__init__()
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"UpdateClipping(threshold=...) must be a finite number, got {threshold!r}.")
        if threshold <= 0:
            raise ValueError(
                f"UpdateClipping(threshold=...) is the largest RMS an update may keep and must be > 0, got {threshold}"
                " (the paper uses 1)."
            )
        self.threshold = float(threshold)

    def __repr__(self) -> str:
        return f"UpdateClipping(threshold={self.threshold})"

    def make_rule(self, optimizer: Optimizer) -> UpdateTransform:
        if is_adafactor(optimizer):
            raise MisconfigurationException(
                f"{optimizer_name(optimizer)} clips its update itself (its `d` / "
                "`clip_threshold` argument); clipping again would act on an update that is not G/sqrt(V). Remove "
                "UpdateClipping, or set the threshold on the optimizer."
            )
        return _ClipRule(self.threshold)


class _ClipRule(UpdateTransform):
    order = ORDER_CLIP

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def scale(self, update: ParamUpdate) -> float:
        return clip_scale(update.update_rms, self.threshold)

    def state_dict(self) -> dict[str, Any]:
        return {}
