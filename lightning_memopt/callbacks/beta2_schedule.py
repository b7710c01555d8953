"""Adafactor's increasing second-moment decay β̂₂ₜ = 1 - t^decay for Adam, with a bias correction that stays right."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim import Adam, Optimizer

from lightning_memopt.adafactor_rules import adam_bias_correction_fix, beta2_at
from lightning_memopt.callbacks.update_transform import (
    ORDER_BIAS_CORRECTION,
    ParamUpdate,
    StepContext,
    TransformCallback,
    UpdateTransform,
    bitsandbytes_kernel,
    is_adafactor,
    optimizer_name,
)

__all__ = ["BETA2_PRODUCT_KEY", "Beta2Schedule"]

#: Key of ∏ β̂₂ⱼ (over the steps since the second moment was zero) in each tensor's optimizer state.
BETA2_PRODUCT_KEY = "beta2_product"


class Beta2Schedule(TransformCallback):
    """Give Adam the second-moment decay β̂₂ₜ = 1 - t^decay (Shazeer & Stern 2018, Section 7.2).

    β̂₂₁ = 0 makes the first estimate the squared gradient itself, and β̂₂ₜ → 1 makes it ever longer-sighted, so an
    adaptive optimizer needs neither warm-up nor, for the second moment, bias correction. Adam reads ``betas`` from
    its param groups at every step; this callback sets β₂ there for the duration of each step (the groups show your
    own ``betas`` at all other times, in checkpoints too).

    Bias correction: torch's Adam divides vₜ by ``1 - β₂^step``, which is right only for a constant β₂. The total
    weight of vₜ = β̂₂ₜ vₜ₋₁ + (1 - β̂₂ₜ) gₜ² is ``1 - ∏ β̂₂ⱼ`` over the steps since v was zero; this product is kept
    per tensor in the optimizer state (key ``"beta2_product"``: it is reset, stashed and checkpointed exactly when v
    is, BAdam's block switches included). Adam then steps with ε·f and its update is multiplied by
    ``f = √((1 - ∏ β̂₂ⱼ) / (1 - β̂₂ₜ^step))``, which turns its update into ``-lr·m̂ / (√(vₜ / (1 - ∏ β̂₂ⱼ)) + ε)``
    exactly (see :func:`~lightning_memopt.adafactor_rules.adam_bias_correction_fix`). When t starts with the state,
    β̂₂₁ = 0 makes the product 0: no bias correction, as in the paper. The first moment keeps Adam's own correction.

    Counting t: ``restart_on_switch=True`` counts the steps of the optimizer state, so t restarts at 1 whenever the
    state does — at every BAdam block switch (the paper's BAdam resets it), while with ``keep_optimizer_state=True``
    each block continues its own count. ``restart_on_switch=False`` counts every update since the start of training
    (saved in checkpoints): after a switch the fresh state starts with β̂₂ already close to 1 (0.975 at t = 100), and
    the bias correction above compensates the way Adam's does. Without BAdam both count the same.

    Supported: ``torch.optim.Adam`` and ``AdamW`` (``amsgrad=False``) and bitsandbytes' Adam/AdamW (8-bit, 32-bit,
    paged). A param group's ε is shared by its tensors: if they have taken different numbers of steps (a tensor
    without a gradient is skipped), the bias correction stays exact for each, and ε is exact for the first tensor
    and off by the ratio of the fixes for the others (a warning says so). bitsandbytes' per-parameter overrides of
    ``betas``/``eps`` (``GlobalOptimManager.override_config``) bypass the param groups and so this callback.

    Args:
        decay: the exponent ``c`` in β̂₂ₜ = 1 - t^c; must be <= 0 (the paper uses -0.8).
        restart_on_switch: count t from the optimizer state (restarts with it at BAdam switches) rather than from the
            start of training.

    Example::

        from lightning.pytorch import Trainer
        from lightning_memopt import BAdamStrategy, BlockSwitch
        from lightning_memopt.callbacks.beta2_schedule import Beta2Schedule

        trainer = Trainer(strategy=BAdamStrategy(), precision="bf16-true",
                          callbacks=[BlockSwitch(every=100), Beta2Schedule(decay=-0.8, restart_on_switch=True)])
    """

    def __init__(self, decay: float = -0.8, restart_on_switch: bool = True) -> None:
        super().__init__()
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not math.isfinite(decay):
            raise ValueError(f"Beta2Schedule(decay=...) must be a finite number, got {decay!r}.")
        if decay > 0:
            raise ValueError(
                f"Beta2Schedule(decay=...) must be <= 0 so that beta2 = 1 - t**decay grows towards 1, got {decay} "
                "(the paper uses -0.8)."
            )
        if not isinstance(restart_on_switch, bool):
            raise ValueError(f"Beta2Schedule(restart_on_switch=...) must be True or False, got {restart_on_switch!r}.")
        self.decay = float(decay)
        self.restart_on_switch = restart_on_switch

    def __repr__(self) -> str:
        return f"Beta2Schedule(decay={self.decay}, restart_on_switch={self.restart_on_switch})"

    def make_rule(self, optimizer: Optimizer) -> UpdateTransform:
        name = optimizer_name(optimizer)
        if is_adafactor(optimizer):
            raise MisconfigurationException(
                f"{name} has its own increasing beta2 schedule (its `beta2_decay` / `decay_rate` argument). Remove "
                "Beta2Schedule, or set the decay on the optimizer."
            )
        kernel = bitsandbytes_kernel(optimizer)
        if not (isinstance(optimizer, Adam) or kernel == "adam"):
            raise MisconfigurationException(
                f"Beta2Schedule sets beta2 of Adam and corrects Adam's bias correction for it; {name} is not supported."
                " Use torch.optim.Adam, torch.optim.AdamW or a bitsandbytes Adam/AdamW (8-bit, 32-bit or paged)."
            )
        if any(group.get("amsgrad", False) for group in optimizer.param_groups):
            raise MisconfigurationException(
                "Beta2Schedule cannot be combined with amsgrad=True: AMSGrad keeps the maximum of second moments "
                "that were normalised for different beta2. Use amsgrad=False."
            )
        return _Beta2Rule(self.decay, self.restart_on_switch)

    @property
    def steps(self) -> int:
        """Updates since the start of training, of the first optimizer (t - 1 for ``restart_on_switch=False``)."""
        rules = self.rules
        return rules[0].steps if rules and isinstance(rules[0], _Beta2Rule) else 0


def _step_count(state: dict[str, Any] | None) -> int:
    if not state or "step" not in state:
        return 0
    return int(float(state["step"]))


class _Beta2Rule(UpdateTransform):
    order = ORDER_BIAS_CORRECTION

    def __init__(self, decay: float, restart_on_switch: bool) -> None:
        self.decay = decay
        self.restart_on_switch = restart_on_switch
        self.steps = 0
        self._fixes: dict[int, tuple[float, float]] = {}  # id(tensor) -> (factor f, product after this step)
        self._warned = False

    def before_update(self, step: StepContext) -> None:
        self._fixes = {}
        for index in step.group_indices:
            tensors = [p for i, _, p in step.stepping if i == index]
            counts = [_step_count(step.optimizer.state.get(p)) for p in tensors]
            t = max(counts) + 1 if self.restart_on_switch else self.steps + 1
            beta2 = beta2_at(t, self.decay)
            betas = tuple(step.original(index, "betas"))
            user_beta2 = float(betas[1])
            factors = []
            for p, count in zip(tensors, counts, strict=True):
                state = step.optimizer.state.get(p) or {}
                # a state built without this callback had a constant beta2: its product is beta2**count
                before = float(state.get(BETA2_PRODUCT_KEY, user_beta2**count)) if count else 1.0
                product = before * beta2
                factor = adam_bias_correction_fix(beta2, count + 1, product)
                self._fixes[id(p)] = (factor, product)
                factors.append(factor)
            if not self._warned and any(abs(f / factors[0] - 1.0) > 1e-9 for f in factors):
                self._warned = True
                rank_zero_warn(
                    f"Beta2Schedule: the tensors of param group {index} have taken different numbers of steps "
                    f"({min(counts)} to {max(counts)}); their bias correction stays exact but Adam's eps, shared by "
                    "the group, is exact only for the first of them. Put tensors that skip steps in a param group of "
                    "their own to avoid this."
                )
            step.override(index, "betas", (betas[0], beta2, *betas[2:]))
            step.override(index, "eps", float(step.original(index, "eps")) * factors[0])

    def scale(self, update: ParamUpdate) -> float:
        fix = self._fixes.get(id(update.param))
        return fix[0] if fix is not None else 1.0

    def after_update(self, step: StepContext) -> None:
        for _, _, p in step.stepping:
            fix = self._fixes.get(id(p))
            if fix is not None:
                step.optimizer.state[p][BETA2_PRODUCT_KEY] = fix[1]
        self._fixes = {}

    def after_step(self) -> None:
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict.get("steps", 0))
