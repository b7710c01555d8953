"""Optimizers written here from their papers, with the math in plain functions.

:class:`AdaLomo` (Lv et al., "AdaLomo: Low-memory Optimization with Adaptive Learning Rate", 2023) is LOMO's
update-in-backward with an adaptive step: Adafactor's factored second moment, no momentum, update clipping and a
step relative to the parameter's scale. Its state is one row and one column vector per matrix, so with the update in
backward (:class:`~lightning_memopt.strategies.fused.FusedUpdateStrategy`) full-parameter training keeps neither
gradients nor Adam moments.

For a gradient ``G`` (m x n) at step ``t`` (counted from 1), with ``β̂₂ₜ = 1 - t^decay_rate``:

1. ``R ← β̂₂ₜ R + (1 - β̂₂ₜ) mean_cols(G² + ε₁)``, ``C ← β̂₂ₜ C + (1 - β̂₂ₜ) mean_rows(G² + ε₁)`` (a vector ``V``
   with ``V ← β̂₂ₜ V + (1 - β̂₂ₜ)(G² + ε₁)`` for a 1-D tensor);
2. ``V̂ = R Cᵀ / mean(R)`` (the rank-1 non-negative factorisation of the second moment: equal to ``R_s C_sᵀ / 1ᵀR_s``
   for the row and column *sums* of the paper);
3. ``U = G / √V̂``, clipped: ``Û = U / max(1, RMS(U) / d)``;
4. ``αₜ = lr · max(ε₂, RMS(θ))``; ``θ ← θ (1 - αₜ·weight_decay) - αₜ Û``.

Tensors of more than two dimensions factor over their last two (as Adafactor does). Half-precision parameters are
updated through an FP32 copy and rounded once; the state is FP32 (FP64 for FP64 parameters).

Example::

    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(4, 3))
    >>> optimizer = AdaLomo([w], lr=0.1)
    >>> w.grad = torch.full((4, 3), 0.5)
    >>> optimizer.step()
    >>> round(float(w[0, 0]), 4)  # one step of 0.1 x RMS(w) x clipped U (= 1 here) down
    0.9
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_memopt.adafactor_rules import EPS1, EPS2, beta2_at

__all__ = ["AdaLomo", "adalomo_step", "factored_second_moment", "update_moments"]


def update_moments(state: dict[str, Tensor], grad: Tensor, beta2: float, eps1: float = EPS1) -> None:
    """Step 1: fold ``G² + ε₁`` into the row/column means (``exp_avg_sq_row``/``_col``) of a tensor with two or more
    dimensions, or into the full ``exp_avg_sq`` of a 1-D one, with decay ``beta2``.

    Example::

        >>> state = {"exp_avg_sq": torch.zeros(2)}
        >>> update_moments(state, torch.tensor([1.0, 2.0]), beta2=0.0)
        >>> state["exp_avg_sq"]
        tensor([1., 4.])
    """
    square = grad.square().add_(eps1)
    if grad.dim() >= 2:
        state["exp_avg_sq_row"].mul_(beta2).add_(square.mean(dim=-1), alpha=1.0 - beta2)
        state["exp_avg_sq_col"].mul_(beta2).add_(square.mean(dim=-2), alpha=1.0 - beta2)
    else:
        state["exp_avg_sq"].mul_(beta2).add_(square, alpha=1.0 - beta2)


def factored_second_moment(row: Tensor, col: Tensor) -> Tensor:
    """Step 2: ``V̂ = R Cᵀ / mean(R)`` from the row means ``R`` (..., m) and column means ``C`` (..., n).

    Example::

        >>> factored_second_moment(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 4.0]))
        tensor([[1., 2.],
                [3., 6.]])
    """
    return (row / row.mean(dim=-1, keepdim=True)).unsqueeze(-1) * col.unsqueeze(-2)


def adalomo_step(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    step: int,
    lr: float,
    eps: tuple[float, float] = (EPS1, EPS2),
    clip_threshold: float = 1.0,
    decay_rate: float = -0.8,
    weight_decay: float = 0.0,
) -> Tensor:
    """One AdaLomo step (steps 1-4 above) on the FP32 tensor ``param`` in place, given its FP32 ``grad``; returns
    the clipped update ``Û`` (before the step size).

    Example::

        >>> p, state = torch.ones(3), {"exp_avg_sq": torch.zeros(3)}
        >>> adalomo_step(p, torch.full((3,), 2.0), state, step=1, lr=0.5)
        tensor([1., 1., 1.])
        >>> p
        tensor([0.5000, 0.5000, 0.5000])
    """
    update_moments(state, grad, beta2_at(step, decay_rate), eps[0])
    if grad.dim() >= 2:
        second = factored_second_moment(state["exp_avg_sq_row"], state["exp_avg_sq_col"])
    else:
        second = state["exp_avg_sq"]
    update = grad * second.rsqrt()
    update_rms = update.norm() / update.numel() ** 0.5
    update.div_((update_rms / clip_threshold).clamp(min=1.0))
    param_rms = param.norm() / param.numel() ** 0.5
    alpha = lr * torch.clamp(param_rms, min=eps[1])
    if weight_decay != 0.0:
        param.mul_(1.0 - alpha * weight_decay)
    param.sub_(alpha * update)
    return update


class AdaLomo(Optimizer):
    """AdaLomo as a torch optimizer (the module docstring has the rule); usable in any loop, and per parameter during
    backward under :class:`~lightning_memopt.strategies.fused.FusedUpdateStrategy` (``strategy="fused_update"``).

    Each parameter keeps its own step count (it is stepped once per optimizer step either way), so schedules of
    ``lr`` set by LR schedulers apply per step as usual.

    Args:
        params: parameters or param groups.
        lr: the relative step size (multiplied by ``max(ε₂, RMS(θ))``); AdaLomo's paper fine-tunes LLaMA at 5e-4.
        eps: ``(ε₁, ε₂)``: added to ``G²``, and the smallest parameter scale.
        clip_threshold: ``d``, the largest RMS of the update.
        decay_rate: the exponent of ``β̂₂ₜ = 1 - t^decay_rate``.
        weight_decay: decoupled weight decay, scaled by the step size as in the official implementation.

    Example::

        optimizer = AdaLomo(model.parameters(), lr=5e-4)
        trainer = Trainer(strategy="fused_update", precision="bf16-true")
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        eps: tuple[float, float] = (EPS1, EPS2),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        weight_decay: float = 0.0,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"AdaLomo's lr must be > 0 but is: {lr}")
        if clip_threshold <= 0:
            raise ValueError(f"AdaLomo's clip_threshold must be > 0 but is: {clip_threshold}")
        if decay_rate >= 0:
            raise ValueError(f"AdaLomo's decay_rate must be < 0 (beta2_t = 1 - t^decay_rate) but is: {decay_rate}")
        defaults = {
            "lr": lr,
            "eps": tuple(eps),
            "clip_threshold": clip_threshold,
            "decay_rate": decay_rate,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)

    def _init_state(self, param: Tensor) -> dict[str, Any]:
        state = self.state[param]
        if not state:
            state["step"] = 0
            device, dtype = param.device, _wide(param.dtype)
            if param.dim() >= 2:
                state["exp_avg_sq_row"] = torch.zeros(param.shape[:-1], dtype=dtype, device=device)
                cols = param.shape[:-2] + param.shape[-1:]
                state["exp_avg_sq_col"] = torch.zeros(cols, dtype=dtype, device=device)
            else:
                state["exp_avg_sq"] = torch.zeros(param.shape, dtype=dtype, device=device)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts loaded state to each parameter's dtype: AdaLomo's moments stay FP32 for half parameters
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, values in saved.items():
            state = self.state[params[index]]
            for key, value in values.items():
                if isinstance(value, Tensor) and key.startswith("exp_avg_sq"):
                    state[key] = value.to(device=params[index].device, dtype=_wide(params[index].dtype))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("AdaLomo does not support sparse gradients.")
                state = self._init_state(param)
                state["step"] += 1
                dtype = _wide(param.dtype)
                wide = param if param.dtype == dtype else param.to(dtype)
                adalomo_step(
                    wide,
                    param.grad.to(dtype),
                    state,
                    state["step"],
                    float(group["lr"]),
                    group["eps"],
                    group["clip_threshold"],
                    group["decay_rate"],
                    group["weight_decay"],
                )
                if wide is not param:
                    param.copy_(wide)
        return loss


def _wide(dtype: torch.dtype) -> torch.dtype:
    # the precision AdaLomo computes and keeps state in: FP32, or FP64 for FP64 parameters
    return torch.float64 if dtype == torch.float64 else torch.float32
