"""The update in backward (LOMO, AdaLomo): each parameter is stepped as soon as its gradient is complete, and the
gradient is freed at once, so no gradient buffer for the whole model ever exists.

:class:`FusedUpdateStrategy` keeps the user's optimizer from ``configure_optimizers``: during backward, a
``register_post_accumulate_grad_hook`` on every trained parameter narrows the optimizer's param groups to that one
parameter, calls ``optimizer.step()`` and restores the groups. The optimizer's state, hyper-parameters, LR schedulers
(the lr each step uses is the one the scheduler set for it) and ``state_dict`` are the ordinary ones, and the result
equals ``backward(); optimizer.step()`` for every optimizer whose rule treats each tensor on its own (SGD = LOMO,
AdamW, Adafactor, :class:`~lightning_memopt.optim.AdaLomo`, bitsandbytes' 8-bit optimizers; see
:func:`lightning_memopt.optimizers.steps_each_tensor_alone`).

What a step in backward cannot do, and what it does instead:

- **gradient accumulation** (``accumulate_grad_batches > 1``) and **norm clipping** (``gradient_clip_val``): a
  parameter is stepped before the next micro-batch or the other gradients exist, so both are refused with an error
  naming the alternatives (per-tensor update clipping: :class:`~lightning_memopt.UpdateClipping`, AdaLomo's own
  ``clip_threshold``);
- **inf/NaN**: a non-finite loss skips the whole step before backward (nothing is updated); a non-finite gradient of
  one parameter skips that parameter's update, with a warning; ``16-true``'s loss scaler, which decides only after
  the whole backward, is refused (use ``bf16-true``);
- ``on_before_optimizer_step`` still runs after backward, but the gradients are gone by then.

Example::

    from lightning.pytorch import Trainer
    from lightning_memopt.optim import AdaLomo

    class Model(LightningModule):
        def configure_optimizers(self):
            return AdaLomo(self.parameters(), lr=5e-4)

    Trainer(strategy="fused_update", precision="bf16-true").fit(Model())
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_memopt.checkpoint_io import AtomicCheckpointIO
from lightning_memopt.compat import lightning_trainer
from lightning_memopt.low_rank import install_galore_shims
from lightning_memopt.optimizers import optimizer_name, step_one_tensor, steps_each_tensor_alone, steps_in_backward
from lightning_memopt.rounding import stochastic_round
from lightning_memopt.strategies.badam import _device_from_trainer

__all__ = ["FusedUpdateStrategy"]

_CKPT_KEY = "fused_update"


class FusedUpdateStrategy(SingleDeviceStrategy):
    """Whole-model training with the update in backward: gradients never accumulate (see the module docstring).

    Args:
        stochastic_rounding: step half-precision weights through an FP32 copy and write it back with stochastic
            rounding (:func:`lightning_memopt.rounding.stochastic_round`), so that updates below half a unit in the
            last place survive on average. The optimizer's state is then FP32 (AdamW: 8 bytes per parameter instead
            of 4 in ``bf16-true``); one parameter's FP32 copy exists at a time. Without it, the optimizer steps the
            half weights in place, as it would in a plain ``bf16-true`` run.
        seed: seed of the stochastic rounding's generator (saved in checkpoints, so a resumed run rounds the same).
        device: the device to train on; by default the one the Trainer's accelerator picked.
        accelerator: Lightning's accelerator (normally chosen by the Trainer).
        checkpoint_io: how checkpoint files are written; by default
            :class:`~lightning_memopt.checkpoint_io.AtomicCheckpointIO`.
        precision_plugin: Lightning's precision plugin (normally from ``Trainer(precision=...)``).

    Example::

        trainer = Trainer(strategy=FusedUpdateStrategy(stochastic_rounding=True), precision="bf16-true")
    """

    strategy_name = "fused_update"
    strategy_description = "update in backward (LOMO / AdaLomo): each parameter stepped as its gradient completes"

    def __init__(
        self,
        stochastic_rounding: bool = False,
        seed: int = 0,
        device: str | torch.device | None = None,
        accelerator: Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        super().__init__(
            device=device if device is not None else "cpu",
            accelerator=accelerator,
            checkpoint_io=checkpoint_io if checkpoint_io is not None else AtomicCheckpointIO(),
            precision_plugin=precision_plugin,
        )
        self._device_given = device is not None
        self.stochastic_rounding = stochastic_rounding
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._hooks: list[RemovableHandle] = []
        self._group_of: dict[int, int] = {}  # id(param) -> its param group
        self._step: Callable[..., Any] | None = None  # the optimizer's own step while optimizer.step is a stand-in
        self._skipped_params: list[str] = []
        self._names: dict[int, str] = {}  # id(param) -> its name

    updates_in_backward = True
    """Every parameter is stepped during backward: no gradient outlives its step (``MemoryReport`` predicts none)."""

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(cls.strategy_name, cls, description=cls.strategy_description)

    # ------------------------------------------------------------------------------------------------- setup
    @override
    def setup_environment(self) -> None:
        install_galore_shims()  # before Lightning restores a checkpoint (see BlockStrategy.setup_environment)
        if not self._device_given:
            self._root_device = _device_from_trainer(self, "BAdamDDPStrategy(fused_update=True)")
        super().setup_environment()

    @override
    def setup(self, trainer: Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self._fused_setup(trainer)

    def _fused_setup(self, trainer: Trainer) -> None:
        module = self.lightning_module
        assert module is not None
        if not module.automatic_optimization:
            raise MisconfigurationException(
                "The update in backward needs automatic optimization: the strategy steps each parameter during "
                "backward. Remove `self.automatic_optimization = False` from your LightningModule, or use another "
                "strategy."
            )
        if len(self.optimizers) != 1:
            raise MisconfigurationException(
                f"The update in backward drives exactly one optimizer, but configure_optimizers returned "
                f"{len(self.optimizers)}. Return a single optimizer (param groups for different settings)."
            )
        optimizer = self.optimizers[0]
        if not steps_each_tensor_alone(optimizer):
            raise MisconfigurationException(
                f"{optimizer_name(optimizer)} cannot be stepped one parameter at a time during backward: only "
                "optimizers whose rule treats each tensor on its own can (torch's SGD, Adam, AdamW, Adafactor, "
                "Adagrad, Adamax, NAdam, RAdam, RMSprop, Rprop, ASGD, Adadelta, bitsandbytes' optimizers, "
                "lightning_memopt.optim.AdaLomo). Use one of those, or a strategy that steps after backward."
            )
        if trainer.accumulate_grad_batches > 1:
            raise MisconfigurationException(
                f"The update in backward cannot accumulate gradients (accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches}): each parameter is stepped, and its gradient freed, during the "
                "backward of every batch. Use a larger batch (or gradient checkpointing to afford one), or "
                "strategy='badam', which accumulates the active block's gradients."
            )
        if trainer.gradient_clip_val:
            raise MisconfigurationException(
                f"The update in backward cannot clip by the global gradient norm (gradient_clip_val="
                f"{trainer.gradient_clip_val}): a parameter is stepped before the other gradients exist. Remove "
                "gradient_clip_val and clip each tensor's update instead: lightning_memopt.UpdateClipping(), or "
                "AdaLomo's own clip_threshold."
            )
        plugin = self.precision_plugin
        # the only precisions with FP16 gradients, and the only ones Lightning (or MasterGradScalerPrecision) scales
        if plugin.precision in ("16-true", "16-mixed"):
            raise MisconfigurationException(
                f"The update in backward does not support precision={plugin.precision!r} yet: FP16 gradients need "
                "loss scaling, and a scaler decides whether to skip a step only after the whole backward, when every "
                "parameter has been stepped. Use precision='bf16-true' (or 'bf16-mixed', '32-true'), which need no "
                "scaler."
            )
        self._names = {id(p): n for n, p in module.named_parameters()}
        self._group_of = {}
        trained: list[Tensor] = []
        for index, group in enumerate(optimizer.param_groups):
            for param in group["params"]:
                if id(param) not in self._names:
                    raise MisconfigurationException(
                        f"Param group {index} of {type(optimizer).__name__} holds a tensor of shape "
                        f"{tuple(param.shape)} that is not a parameter of the LightningModule: the update in backward "
                        "hooks the module's own parameters. Build the optimizer from self.parameters()."
                    )
                self._group_of[id(param)] = index
                trained.append(param)
        self._remove_hooks()
        for param in trained:
            if param.requires_grad:
                self._hooks.append(param.register_post_accumulate_grad_hook(self._step_parameter))
        if self.stochastic_rounding and self._generator is None:
            self._generator = torch.Generator(device=self.root_device).manual_seed(self.seed)

    # ------------------------------------------------------------------------------------------- one step
    @override
    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        if not bool(torch.isfinite(closure_loss.detach()).all()):
            trainer = lightning_trainer(self.lightning_module)
            rank_zero_warn(
                f"FusedUpdateStrategy: the loss is inf/NaN at step {trainer.global_step if trainer else '?'}; its "
                "backward (and so every parameter's update) is skipped."
            )
            return closure_loss
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        # the parameters are stepped inside the closure's backward; the optimizer's step() must not run again after
        # it, but everything around it does (the precision plugin's closure, on_before_optimizer_step)
        self._skipped_params = []
        try:
            with steps_in_backward(optimizer) as step:
                self._step = step
                return super().optimizer_step(optimizer, closure, model, **kwargs)
        finally:
            self._step = None
            if self._skipped_params:
                names = ", ".join(repr(n) for n in self._skipped_params[:3])
                more = f" and {len(self._skipped_params) - 3} more" if len(self._skipped_params) > 3 else ""
                rank_zero_warn(
                    f"FusedUpdateStrategy: inf/NaN gradients of {names}{more}; their update was skipped this step "
                    "(the other parameters were stepped)."
                )

    @torch.no_grad()
    def _step_parameter(self, param: Tensor) -> None:
        if self._step is None or param.grad is None:  # a backward outside an optimizer step (e.g. a probe)
            return
        if not bool(torch.isfinite(param.grad).all()):
            self._skipped_params.append(self._names.get(id(param), "?"))
            param.grad = None
            return
        optimizer = self.optimizers[0]
        target = param
        if self.stochastic_rounding and param.dtype in (torch.bfloat16, torch.float16):
            target = nn.Parameter(param.detach().to(torch.float32))
            target.grad = param.grad.to(torch.float32)
            param.grad = None
            if param in optimizer.state:
                optimizer.state[target] = optimizer.state.pop(param)
        try:
            step_one_tensor(self._step, optimizer, target, self._group_of[id(param)])
        finally:
            if target is not param:
                if target in optimizer.state:
                    optimizer.state[param] = optimizer.state.pop(target)
                param.copy_(stochastic_round(target.detach(), param.dtype, self._generator))
            param.grad = None

    # --------------------------------------------------------------------------------------------- checkpoints
    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        state: dict[str, Any] = dict(super().optimizer_state(optimizer))
        if self._generator is not None:
            state[_CKPT_KEY] = {"generator": self._generator.get_state()}
        return state

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        states = [dict(s) for s in checkpoint["optimizer_states"]]
        if states and _CKPT_KEY in states[0]:
            saved = states[0].pop(_CKPT_KEY)["generator"]
            # Lightning restores optimizer states after setup, where the generator was made (stochastic rounding);
            # a run resumed without stochastic rounding has no use for the saved one
            if self._generator is not None:
                self._generator.set_state(saved)
        super().load_optimizer_state_dict({**checkpoint, "optimizer_states": states})
        if self.stochastic_rounding and states:
            # torch casts loaded state to each parameter's dtype; stepped through FP32 copies, it was saved in FP32
            optimizer = self.optimizers[0]
            params = [p for group in optimizer.param_groups for p in group["params"]]
            for index, values in states[0]["state"].items():
                param = params[index]
                for key, value in values.items():
                    if isinstance(value, Tensor) and value.is_floating_point() and key != "step":
                        optimizer.state[param][key] = value.to(param.device)

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @override
    def teardown(self) -> None:
        self._remove_hooks()
        super().teardown()
