"""Adafactor's relative step size for any optimizer: αₜ = max(ε₂, RMS(Xₜ₋₁)) · min(max_step, 1/√t), per tensor."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim import Optimizer

from lightning_memopt.adafactor_rules import EPS2, step_size_cap
from lightning_memopt.callbacks.update_transform import (
    ORDER_STEP_SIZE,
    ParamUpdate,
    StepContext,
    TransformCallback,
    UpdateTransform,
    is_adafactor,
    lr_scales_update,
    optimizer_name,
)

__all__ = ["RelativeStepSize"]


class RelativeStepSize(TransformCallback):
    """Take each tensor's step relative to its own scale: αₜ = max(ε₂, RMS(Xₜ₋₁)) · ρₜ (Shazeer & Stern 2018, §8).

    ρₜ = min(max_step, 1/√t), or min(10⁻⁶·t, 1/√t) with ``warmup_init`` (fairseq's and transformers' Adafactor).
    A tensor of RMS 0.02 then moves by about 2·10⁻⁴ per step however its gradients are scaled, and a zero-initialised
    one (RMS < ε₂) by ε₂·ρₜ.

    The update itself stays the optimizer's: for each step the param group's ``lr`` is replaced by
    ``ρₜ · lr / initial_lr`` (so the optimizer's step is already about as large as the final one, and no precision is
    lost by rescaling a tiny change), and each tensor's gradient-driven change is then multiplied by
    ``max(ε₂, RMS(Xₜ₋₁))``. Decoupled weight decay (AdamW) is applied by the optimizer at that step size, as
    ``torch.optim.Adafactor`` decays with its step-size cap.

    LR schedulers: ``lr / initial_lr`` — the scheduler's factor, ``initial_lr`` being what torch's schedulers record
    when they are created (without a scheduler, the group's ``lr`` at the first step) — multiplies αₜ. Warm-up,
    cosine decay and ``ReduceLROnPlateau`` therefore keep their shape, and the absolute value of the optimizer's
    ``lr`` no longer matters. ``LearningRateMonitor`` keeps showing the scheduler's ``lr``.

    t counts the updates since the start of training (saved in checkpoints) and does not restart at BAdam's block
    switches: ρₜ anneals the whole run, and ``warmup_init`` warms up once. For a restart per block see
    :class:`~lightning_memopt.callbacks.beta2_schedule.Beta2Schedule`, whose t follows the optimizer state.

    Works with optimizers whose step is proportional to ``lr`` (Adam, AdamW, NAdam, RAdam, Adamax, SGD, RMSprop,
    Adadelta, Adagrad without ``lr_decay``, and bitsandbytes' Adam/AdamW/SGD/Lion/RMSprop/Adagrad, 8-bit included).
    Composes with :class:`~lightning_memopt.callbacks.update_clipping.UpdateClipping` (clipping first, then the step
    size) and :class:`~lightning_memopt.callbacks.beta2_schedule.Beta2Schedule`; with Adam(β₁ = 0) the three are
    Adafactor's update for unfactored tensors.

    Args:
        max_step: the cap on ρₜ (the paper's 10⁻²).
        eps2: the smallest scale a tensor's step is taken against (the paper's ε₂ = 10⁻³).
        warmup_init: grow ρₜ as 10⁻⁶·t instead of starting at ``max_step``.

    Example::

        from lightning.pytorch import Trainer
        from lightning_memopt import BAdamStrategy, BlockSwitch
        from lightning_memopt.callbacks.relative_step import RelativeStepSize

        trainer = Trainer(strategy=BAdamStrategy(), precision="bf16-true",
                          callbacks=[BlockSwitch(every=100), RelativeStepSize(max_step=1e-2)])
    """

    def __init__(self, max_step: float = 1e-2, eps2: float = EPS2, warmup_init: bool = False) -> None:
        super().__init__()
        for name, value in (("max_step", max_step), ("eps2", eps2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"RelativeStepSize({name}=...) must be a finite number, got {value!r}.")
        if max_step <= 0:
            raise ValueError(f"RelativeStepSize(max_step=...) must be > 0, got {max_step} (the paper uses 1e-2).")
        if eps2 < 0:
            raise ValueError(f"RelativeStepSize(eps2=...) must be >= 0, got {eps2} (the paper uses 1e-3).")
        if not isinstance(warmup_init, bool):
            raise ValueError(f"RelativeStepSize(warmup_init=...) must be True or False, got {warmup_init!r}.")
        self.max_step = float(max_step)
        self.eps2 = float(eps2)
        self.warmup_init = warmup_init

    def __repr__(self) -> str:
        return f"RelativeStepSize(max_step={self.max_step}, eps2={self.eps2}, warmup_init={self.warmup_init})"

    def make_rule(self, optimizer: Optimizer) -> UpdateTransform:
        name = optimizer_name(optimizer)
        if is_adafactor(optimizer):
            raise MisconfigurationException(
                f"{name} takes relative steps itself (its `lr` caps rho_t, transformers' `relative_step=True`). "
                "Remove RelativeStepSize, or configure the step size on the optimizer."
            )
        if not lr_scales_update(optimizer):
            raise MisconfigurationException(
                f"RelativeStepSize replaces the step size of the optimizer's update, which needs a step proportional "
                f"to lr; {name} is not known to take one. Use Adam, AdamW, SGD, RMSprop or a bitsandbytes "
                "Adam/AdamW/SGD/Lion (8-bit included)."
            )
        return _RelativeStepRule(self.max_step, self.eps2, self.warmup_init)

    @property
    def steps(self) -> int:
        """Updates taken since the start of training (t - 1 of the next step), of the first optimizer."""
        rules = self.rules
        return rules[0].steps if rules and isinstance(rules[0], _RelativeStepRule) else 0


class _RelativeStepRule(UpdateTransform):
    order = ORDER_STEP_SIZE

    def __init__(self, max_step: float, eps2: float, warmup_init: bool) -> None:
        self.max_step = max_step
        self.eps2 = eps2
        self.warmup_init = warmup_init
        self.steps = 0
        self.base_lrs: list[float | None] = []  # by group: lr at the first step, for groups without "initial_lr"

    def _schedule_factor(self, step: StepContext, index: int) -> float:
        lr = float(step.original(index, "lr"))
        group = step.optimizer.param_groups[index]
        if "initial_lr" in group:
            base = float(group["initial_lr"])
        else:
            self.base_lrs.extend([None] * (index + 1 - len(self.base_lrs)))
            recorded = self.base_lrs[index]
            if recorded is None:
                recorded = self.base_lrs[index] = lr
            base = recorded
        if base == 0.0:
            # a schedule that starts from lr = 0 without recording initial_lr: only "off" or "on" is known
            return 0.0 if lr == 0.0 else 1.0
        return lr / base

    def before_update(self, step: StepContext) -> None:
        rho = step_size_cap(self.steps + 1, self.max_step, self.warmup_init)
        for index in step.group_indices:
            step.override(index, "lr", rho * self._schedule_factor(step, index))

    def scale(self, update: ParamUpdate) -> float:
        return max(self.eps2, update.param_rms)

    def after_step(self) -> None:
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict.get("steps", 0))
        self.base_lrs = [None if b is None else float(b) for b in state_dict.get("base_lrs", [])]
