"""State-free updates for the parameters outside BAdam's active block (in the spirit of FRUGAL's gradient splitting)."""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_memopt.log import get_logger, rank_zero_log
from lightning_memopt.precision import MasterGradScalerPrecision
from lightning_memopt.rounding import stochastic_round
from lightning_memopt.strategies.badam import block_strategy
from lightning_memopt.strategies.collectives import all_reduce_mean

__all__ = ["RULES", "StateFreeUpdates", "state_free_direction"]

_log = get_logger("state_free")

RULES = ("signsgd", "sgd")
Rule = Literal["signsgd", "sgd"]


def state_free_direction(grad: Tensor, rule: Rule, grad_scale: float = 1.0) -> Tensor:
    """The FP32 direction a state-free rule moves a parameter against: ``x ← x - step · direction``.

    ``"signsgd"``: ``sign(g)`` (each element moves by exactly ``step``, whatever the gradient's size, like an Adam
    update with a stale or no second moment). ``"sgd"``: ``g``. ``grad_scale`` is a loss scale to divide out
    (``16-true``); the sign does not depend on it.

    Example::

        >>> import torch
        >>> state_free_direction(torch.tensor([0.3, -2.0, 0.0]), "signsgd")
        tensor([ 1., -1.,  0.])
        >>> state_free_direction(torch.tensor([512.0, -1024.0], dtype=torch.float16), "sgd", grad_scale=1024.0)
        tensor([ 0.5000, -1.0000])
    """
    if rule == "signsgd":
        return torch.sign(grad).to(torch.float32)
    if rule == "sgd":
        grad = grad.to(torch.float32)
        return grad if grad_scale == 1.0 else grad / grad_scale
    raise ValueError(f"Unknown state-free rule {rule!r}; choose one of {', '.join(RULES)}.")


class StateFreeUpdates(Callback):
    """Move the parameters outside BAdam's active block too, every step, with a rule that keeps no state.

    BAdam trains one block at a time; the other blocks stand still. FRUGAL (Zmushko et al., 2025) splits the gradient
    instead: a state-full optimizer (here: your optimizer, on the active block's FP32 masters) for one part, and a
    state-free rule for the rest, so every step changes every parameter. With ``rule="signsgd"`` each inactive
    parameter moves by ``lr_ratio · lr · sign(g)``; with ``rule="sgd"`` by ``lr_ratio · lr · g``, where ``lr`` is the
    current learning rate of the parameter's param group (so schedulers apply) and ``g`` its gradient of this step.
    No optimizer state is kept for these parameters and no FP32 copy: the update is added to the half-precision
    weights directly, with stochastic rounding (:func:`~lightning_memopt.rounding.stochastic_round`, seeded, saved in
    checkpoints) so that updates below half a unit in the last place are not lost.

    When it acts: in ``on_before_optimizer_step``, on gradients that are all-reduced (``BAdamDDPStrategy``: this
    callback averages them itself, in FP32) and unscaled (``16-true``: divided by the loss scaler's scale), and
    *before* gradient clipping — Lightning clips the optimizer's parameters (the active block) after this hook, and the
    state-free part is not clipped (signSGD does not depend on the gradient's size anyway). A step whose gradients hold
    inf/NaN, in the active block or outside it, changes no inactive parameter. No weight decay is applied to them.

    What it costs — it gives up part of what BAdam saves:

    - **Compute**: backward runs through every block, not only down to the active one (BAdam's block-epoch of
      ``K·D(D+1)/2`` unit backward passes becomes ``K·D²``), and computes every weight gradient.
    - **Memory**: a half-precision gradient for every block parameter (2 bytes per parameter with bf16: about ``2M``
      more, on top of BAdam's ``2M + 16M/D``), and the activations of every layer kept for backward, as in full
      fine-tuning. Each tensor's update needs a temporary FP32 copy of that tensor.
    - **Communication** (several devices): the gradients of every block are all-reduced each optimizer step, in FP32
      (4 bytes per parameter), where BAdam alone sends the active block's only.

    It needs a BAdam strategy (``badam`` or ``badam_ddp``; ``badam_fsdp`` is refused: its sharded gradients would need
    sharded rounding). Parameters outside every block (frozen embedding, head, final norm) stay frozen.

    Args:
        rule: ``"signsgd"`` (default) or ``"sgd"``.
        lr_ratio: the state-free step as a multiple of the optimizer's current lr (default 0.1). With signSGD,
            ``1.0`` moves every inactive parameter by a full Adam-sized step each step; smaller is safer (see
            ``docs/smarter-blocks.md`` for measured values). With SGD the gradient's own scale enters: expect to need
            a much larger ratio.
        stochastic_rounding: round the updated half-precision weights stochastically (default) or to nearest (which
            loses updates smaller than half an ulp). FP32 weights (``32-true``) are updated exactly either way.
        seed: seed of the rounding's random generator (identical on every rank, so the weights stay identical).
        bucket_cap_mb: size of the FP32 buckets in which gradients are all-reduced on several devices.

    Example::

        from lightning.pytorch import Trainer
        from lightning_memopt import BAdamStrategy, BlockSwitch
        from lightning_memopt.callbacks.state_free import StateFreeUpdates

        trainer = Trainer(strategy=BAdamStrategy(), precision="bf16-true",
                          callbacks=[BlockSwitch(every=50), StateFreeUpdates(rule="signsgd", lr_ratio=0.1)])
    """

    def __init__(
        self,
        rule: Rule = "signsgd",
        lr_ratio: float = 0.1,
        stochastic_rounding: bool = True,
        seed: int = 0,
        bucket_cap_mb: float = 25.0,
    ) -> None:
        if rule not in RULES:
            raise ValueError(f"StateFreeUpdates(rule={rule!r}) is not known; choose one of {', '.join(RULES)}.")
        if isinstance(lr_ratio, bool) or not isinstance(lr_ratio, (int, float)) or not math.isfinite(lr_ratio):
            raise ValueError(f"StateFreeUpdates(lr_ratio=...) must be a finite number, got {lr_ratio!r}.")
        if lr_ratio <= 0:
            raise ValueError(
                f"StateFreeUpdates(lr_ratio={lr_ratio}) must be > 0: it scales the optimizer's lr for the inactive "
                "blocks. Remove the callback to leave them frozen."
            )
        if not bucket_cap_mb > 0:
            raise ValueError(f"StateFreeUpdates(bucket_cap_mb=...) must be > 0, got {bucket_cap_mb!r}.")
        self.rule: Rule = rule
        self.lr_ratio = float(lr_ratio)
        self.stochastic_rounding = stochastic_rounding
        self.seed = seed
        self.bucket_cap_mb = bucket_cap_mb
        self._names: list[str] = []
        self._params: dict[str, nn.Parameter] = {}
        self._group_of: dict[str, int] = {}
        self._generator: torch.Generator | None = None
        self._pending_generator_state: Tensor | None = None
        self._handle: RemovableHandle | None = None
        self._warned_missing = False
        self.skipped_steps = 0

    def __repr__(self) -> str:
        return (
            f"StateFreeUpdates(rule={self.rule!r}, lr_ratio={self.lr_ratio}, "
            f"stochastic_rounding={self.stochastic_rounding}, seed={self.seed})"
        )

    # ----------------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = block_strategy(trainer)
        if strategy is None:
            raise MisconfigurationException(
                f"StateFreeUpdates moves the parameters outside BAdam's active block, but the Trainer uses "
                f"{type(trainer.strategy).__name__}, which trains all parameters already. Use strategy='badam' or "
                "'badam_ddp', or remove StateFreeUpdates."
            )
        if strategy.shards_parameters:
            raise MisconfigurationException(
                "StateFreeUpdates does not support BAdamFSDPStrategy: the inactive blocks' gradients would be "
                "sharded DTensors, which its stochastically rounded half-precision update does not handle. Use "
                "strategy='badam_ddp' if the model fits on one device, or remove StateFreeUpdates."
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        strategy = block_strategy(trainer)
        self._params = dict(pl_module.named_parameters())
        assert strategy is not None  # setup refused any other strategy
        self._names = [n for b in strategy.blocks for n in b.param_names]
        self._group_of = {n: i for i, members in enumerate(strategy.param_group_names) for n in members}
        device = strategy.root_device
        self._generator = torch.Generator(device=device).manual_seed(self.seed)
        if self._pending_generator_state is not None:
            self._generator.set_state(self._pending_generator_state)
            self._pending_generator_state = None
        self._warned_missing = False
        # after every activation the blocks that just became inactive must keep requiring grad (and now, in case
        # BlockSwitch activated the first block before this callback's on_fit_start)
        self._handle = strategy.register_activation_hook(self._on_activation, run_now=True)
        half = sum(self._params[n].numel() * self._params[n].element_size() for n in self._names)
        rank_zero_log(
            _log,
            logging.INFO,
            f"StateFreeUpdates: {self.rule} with lr_ratio={self.lr_ratio} on the inactive blocks; backward now runs "
            f"through every block and their gradients take {half / 2**20:,.2f} MiB",
        )

    def _on_activation(self, strategy: Any, index: int | None) -> None:
        masters = strategy.master_params
        for name in self._names:
            if name not in masters:
                self._params[name].requires_grad_(True)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        masters = trainer.strategy.master_params  # type: ignore[attr-defined]
        names = [n for n in self._names if n not in masters]
        world = trainer.world_size
        if world > 1:
            # every rank joins the collective with the same tensors, zeros where its loss did not reach a parameter
            for name in names:
                param = self._params[name]
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
            grads = [g for g in (self._params[n].grad for n in names) if g is not None]
            # half gradients averaged in FP32 (as the strategies average master gradients), one bucket at a time
            all_reduce_mean(grads, world, int(self.bucket_cap_mb * 2**20))
        present = [n for n in names if self._params[n].grad is not None]
        try:
            if present:
                self._warn_missing(names, present)
                self._apply(trainer, optimizer, present, masters)
        finally:
            for name in names:
                self._params[name].grad = None

    @torch.no_grad()
    def _apply(self, trainer: Trainer, optimizer: Optimizer, names: list[str], masters: dict[str, Tensor]) -> None:
        grads = [self._params[n].grad for n in names]
        master_grads = [m.grad for m in masters.values() if m.grad is not None]
        finite = torch.stack([torch.isfinite(g).all() for g in [*grads, *master_grads] if g is not None]).all()
        strategy = block_strategy(trainer)
        assert strategy is not None  # setup refused any other strategy
        if not bool(finite) or strategy.step_skipped:
            # the step is skipped as a whole: BAdam (bf16/32-true) or the loss scaler (16-true) skips the active one
            self.skipped_steps += 1
            return
        plugin = trainer.precision_plugin
        scale = float(plugin.scaler.get_scale()) if isinstance(plugin, MasterGradScalerPrecision) else 1.0
        groups = optimizer.param_groups
        for name, grad in zip(names, grads, strict=True):
            assert grad is not None
            param = self._params[name]
            step = self.lr_ratio * float(groups[self._group_of.get(name, 0)]["lr"])
            direction = state_free_direction(grad, self.rule, scale)
            if param.dtype in (torch.float32, torch.float64) or not self.stochastic_rounding:
                param.add_(direction.to(param.dtype), alpha=-step)
            else:
                param.copy_(stochastic_round(param.float().add_(direction, alpha=-step), param.dtype, self._generator))

    def _warn_missing(self, names: list[str], present: list[str]) -> None:
        if self._warned_missing or len(present) == len(names):
            return
        self._warned_missing = True
        missing = sorted(set(names) - set(present))
        rank_zero_warn(
            f"StateFreeUpdates: {len(missing)} inactive parameters got no gradient this step (e.g. {missing[0]!r}), "
            "so they do not move. With reentrant gradient checkpointing, layers below the active block get no "
            "gradient at all: use gradient_checkpointing_kwargs={'use_reentrant': False}."
        )

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._release(trainer)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release(trainer)

    def _release(self, trainer: Trainer) -> None:
        # the strategy's teardown restores every parameter's requires_grad; what is left here are the hook and the
        # half gradients of a step that did not reach on_before_optimizer_step
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        masters = getattr(trainer.strategy, "master_params", {})
        for name in self._names:
            if name not in masters:
                self._params[name].grad = None

    # ----------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rule": self.rule, "lr_ratio": self.lr_ratio, "seed": self.seed}
        if self._generator is not None:
            state["generator"] = self._generator.get_state()
        elif self._pending_generator_state is not None:
            state["generator"] = self._pending_generator_state
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("rule") != self.rule:
            rank_zero_warn(
                f"The checkpoint's StateFreeUpdates used rule={state_dict.get('rule')!r}; this run continues with "
                f"rule={self.rule!r}."
            )
        generator = state_dict.get("generator")
        if generator is not None:
            if self._generator is not None:
                self._generator.set_state(generator)
            else:
                self._pending_generator_state = generator
