"""Optimizers written here from their papers, with the math in plain functions: :class:`AdaLomo` and :class:`FOAM`
(its rule is in its class docstring).

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
4. ``aₜ = lr · max(ε₂, RMS(θ))``; ``θ ← θ (1 - aₜ·weight_decay) - aₜ Û``.

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

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_memopt.adafactor_rules import EPS1, EPS2, beta2_at

__all__ = [
    "FOAM",
    "AdaLomo",
    "adalomo_step",
    "factored_second_moment",
    "foam_state_bytes",
    "foam_step",
    "fold",
    "unfold",
    "update_moments",
]


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


# ---------------------------------------------------------------------------------------------------------- FOAM
def fold(tensor: Tensor, block: int) -> Tensor:
    """Block means along the last dimension: ``(..., n) -> (..., ceil(n / block))``; a last, partial block is the
    mean of the elements it has.

    Example::

        >>> fold(torch.tensor([[1.0, 3.0, 5.0, 7.0, 9.0]]), 2)
        tensor([[2., 6., 9.]])
    """
    n = tensor.shape[-1]
    blocks = -(-n // block)
    padded = torch.nn.functional.pad(tensor, (0, blocks * block - n))
    sums = padded.reshape(*tensor.shape[:-1], blocks, block).sum(dim=-1)
    counts = torch.full((blocks,), float(block), dtype=tensor.dtype, device=tensor.device)
    counts[-1] = n - (blocks - 1) * block
    return sums / counts


def unfold(folded: Tensor, block: int, size: int) -> Tensor:
    """Each block's value repeated over its elements: the inverse shape of :func:`fold` (``size`` elements).

    Example::

        >>> unfold(torch.tensor([[2.0, 6.0, 9.0]]), 2, 5)
        tensor([[2., 2., 6., 6., 9.]])
    """
    return folded.repeat_interleave(block, dim=-1)[..., :size]


def foam_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    block: int | None,
    scale: float,
    residual_scale: float,
) -> None:
    """One FOAM step of ``param`` in place (``block=None``: Adam's step, unfolded moments); the moments are updated
    in place. All tensors in one dtype.

    Example::

        >>> p, g = torch.zeros(1, 4), torch.tensor([[1.0, 3.0, -2.0, 2.0]])
        >>> m, v = torch.zeros(1, 2), torch.zeros(1, 2)
        >>> foam_step(p, g, m, v, 1, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, block=2, scale=1.0,
        ...           residual_scale=1.0)
        >>> m  # (1 - beta1) x block means of g: 2 and 0
        tensor([[0.2000, 0.0000]])
    """
    beta1, beta2 = betas
    if block is None:
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        update = exp_avg / exp_avg_sq.sqrt().add_(eps)
    else:
        size = grad.shape[-1]
        # the moments of the block means of g and of g²; the residual restores each element's own deviation
        residual = grad - unfold(fold(grad, block), block, size)
        exp_avg.mul_(beta1).add_(fold(grad, block), alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).add_(fold(grad * grad, block), alpha=1.0 - beta2)
        m = unfold(exp_avg, block, size).add_(residual, alpha=residual_scale)
        v = unfold(exp_avg_sq, block, size).add_(residual * residual, alpha=residual_scale**2)
        update = m.div_(v.sqrt_().add_(eps)).mul_(scale)
    step_size = lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    param.add_(update, alpha=-step_size)
    if weight_decay:
        param.mul_(1.0 - lr * weight_decay)


def foam_block(param: Tensor, group: Mapping[str, Any]) -> int | None:
    """The block size FOAM folds ``param``'s moments with in ``group`` (``2 ** fold_level``), ``None`` for a tensor
    it keeps Adam's full moments for (fewer than two dimensions, or ``fold_level=None``)."""
    level = group.get("fold_level")
    return None if level is None or param.dim() < 2 else 2 ** int(level)


def foam_state_bytes(param: Tensor, group: Mapping[str, Any]) -> int:
    """Bytes of state :class:`FOAM` keeps for ``param`` after a step: two FP32 moments (FP64 for FP64 parameters) of
    ``ceil(n / 2^l)`` values per row of ``n`` (all of them for an unfolded tensor) and the FP32 step.

    Example::

        >>> w = torch.zeros(64, 1024)
        >>> foam_state_bytes(w, {"fold_level": 8}), 8 * w.numel() + 4  # 4 values per row instead of 1024
        (2052, 524292)
    """
    block = foam_block(param, group)
    numel = param.numel()
    if block is not None and numel:
        numel = numel // param.shape[-1] * -(-param.shape[-1] // block)
    return 2 * numel * torch.empty((), dtype=_wide(param.dtype)).element_size() + 4


def _local(tensor: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _foam_moment(param: Tensor, block: int | None, dtype: torch.dtype) -> Tensor:
    """A zero moment for ``param``: its shape with the last dimension folded in blocks of ``block``; for a
    ``DTensor`` parameter a ``DTensor`` laid out like it (rows sharded as the parameter's), so checkpoints gather it.
    """
    from torch.distributed.tensor import DTensor, Shard

    def folded(shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(shape) if block is None else (*shape[:-1], -(-shape[-1] // block))

    if not isinstance(param, DTensor):
        return torch.zeros(folded(param.shape), dtype=dtype, device=param.device)
    last = param.dim() - 1
    if block is not None and any(isinstance(p, Shard) and p.dim % param.dim() == last for p in param.placements):
        raise ValueError(
            f"FOAM folds each row of a tensor, but this one ({tuple(param.shape)}) is sharded along its rows' "
            "dimension, so no rank holds whole rows. Shard along the first dimension (FSDP2's default, "
            "badam_fsdp's) or give the tensor a param group with fold_level=None."
        )
    local = param.to_local()
    shape = folded(param.shape)
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    zeros = torch.zeros(folded(local.shape), dtype=dtype, device=local.device)
    return DTensor.from_local(
        zeros, param.device_mesh, param.placements, run_check=False, shape=torch.Size(shape), stride=stride
    )


class FOAM(Optimizer):
    """FOAM (Wen et al., "FOAM: Blocked State Folding for Memory-Efficient LLM Training", ICML 2026,
    arXiv 2512.07112): Adam whose moments are kept for block means of the gradient, with the residual restoring each
    element's own deviation.

    For a matrix's gradient ``g`` folded along its last dimension in blocks of ``b = 2^fold_level`` (``fold``: block
    means; ``unfold``: each mean repeated over its block), at step ``t``:

    1. ``m̃ ← β₁ m̃ + (1 - β₁) fold(g)``, ``ṽ ← β₂ ṽ + (1 - β₂) fold(g²)`` (stored: ``b`` times smaller than ``g``);
    2. ``r = g - unfold(fold(g))``; ``m = unfold(m̃) + s·r``, ``v = unfold(ṽ) + s²·r²`` (``s``: ``residual_scale``);
    3. ``θ ← θ - lr · √(1 - β₂ᵗ) / (1 - β₁ᵗ) · a · m / (√v + ε)`` (``a``: ``scale``);
    4. ``θ ← θ · (1 - lr · weight_decay)`` (decoupled, after the step, as the authors' code does).

    Tensors of fewer than two dimensions (norms, biases) and groups with ``fold_level=None`` get Adam's step with full
    moments (``a = 1``); the paper folds the matrices of the transformer layers and leaves the embedding and the head
    to Adam: give those a group with ``fold_level=None``. A row whose length is not a multiple of ``b`` ends in a
    partial block, folded to the mean of the elements it has (the authors' code pads it with zeros instead). State is
    FP32 (FP64 for FP64 parameters), also for half parameters, which are updated through an FP32 copy and rounded
    once. Each tensor's step depends on that tensor alone, so the update in backward applies; each row's on that row
    alone, so a ``DTensor`` sharded by rows (FSDP2, ``badam_fsdp``) is stepped shard by shard, with its moments
    sharded the same way.

    Args:
        params: parameters or param groups (``fold_level``, ``scale`` and ``residual_scale`` can be set per group).
        lr: learning rate.
        betas: ``(β₁, β₂)``.
        eps: ``ε``, added to ``√v``.
        weight_decay: decoupled weight decay.
        fold_level: ``l``; moments are kept per block of ``2^l`` elements of each row (the paper's GLUE runs: 8);
            ``None`` folds nothing (Adam).
        scale: ``a``, the step's factor for folded tensors (the paper's GLUE runs: 0.25).
        residual_scale: ``s``, the residual's weight in both moments (1 in the paper).

    Example::

        >>> w = torch.nn.Parameter(torch.ones(2, 4))
        >>> optimizer = FOAM([w], lr=0.1, fold_level=1, scale=1.0)
        >>> w.grad = torch.ones(2, 4)
        >>> optimizer.step()
        >>> round(float(w[0, 0]), 4), tuple(optimizer.state[w]["exp_avg"].shape)  # Adam's first step: -lr
        (0.9, (2, 2))
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        fold_level: int | None = 8,
        scale: float = 0.25,
        residual_scale: float = 1.0,
    ) -> None:
        if not lr >= 0:
            raise ValueError(f"FOAM's lr must be >= 0 but is: {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"FOAM's betas must be two numbers in [0, 1) but are: {betas!r}")
        if not eps >= 0:
            raise ValueError(f"FOAM's eps must be >= 0 but is: {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"FOAM's weight_decay must be >= 0 but is: {weight_decay}")
        if fold_level is not None and (
            isinstance(fold_level, bool) or not isinstance(fold_level, int) or fold_level < 0
        ):
            raise ValueError(
                f"FOAM's fold_level must be a whole number >= 0 (blocks of 2**fold_level elements) or None (no "
                f"folding) but is: {fold_level!r}"
            )
        if not scale > 0:
            raise ValueError(f"FOAM's scale must be > 0 but is: {scale}")
        if not residual_scale >= 0:
            raise ValueError(f"FOAM's residual_scale must be >= 0 but is: {residual_scale}")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "fold_level": fold_level,
            "scale": scale,
            "residual_scale": residual_scale,
        }
        super().__init__(params, defaults)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts loaded state to each parameter's dtype: FOAM's moments stay FP32 for half parameters
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, values in saved.items():
            state = self.state[params[index]]
            for key in ("exp_avg", "exp_avg_sq"):
                if isinstance(values.get(key), Tensor):
                    state[key] = values[key].to(device=params[index].device, dtype=_wide(params[index].dtype))

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
                    raise RuntimeError("FOAM does not support sparse gradients.")
                dtype = _wide(param.dtype)
                block = foam_block(param, group)
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = _foam_moment(param, block, dtype)
                    state["exp_avg_sq"] = _foam_moment(param, block, dtype)
                state["step"] += 1
                # a DTensor shard (badam_fsdp) holds whole rows: each rank steps its rows, and its moments' rows
                local = _local(param)
                wide = local if local.dtype == dtype else local.to(dtype)
                foam_step(
                    wide,
                    _local(param.grad).to(dtype),
                    _local(state["exp_avg"]),
                    _local(state["exp_avg_sq"]),
                    int(state["step"].item()),
                    float(group["lr"]),
                    group["betas"],
                    group["eps"],
                    group["weight_decay"],
                    block,
                    group["scale"] if block is not None else 1.0,
                    group["residual_scale"],
                )
                if wide is not local:
                    local.copy_(wide)
        return loss
