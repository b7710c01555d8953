"""One mechanism for callbacks that change what an optimizer step does to each parameter tensor.

Lightning has no ``on_after_optimizer_step`` hook (Lightning #11688), so the stabiliser callbacks work through the
optimizer's own ``register_step_pre_hook`` / ``register_step_post_hook``. Every optimizer gets one
:class:`UpdateTransforms` however many callbacks act on it; per step it

1. waits for the gradients: under Lightning's precision plugins the pre-hook runs *before* the closure (forward and
   backward), so it wraps the closure and starts once it has returned (with a loss scaler, ``step()`` is called
   after the closure and the start is immediate);
2. asks each transform, in ``order``, to prepare (``before_update``): it may override param-group options such as
   ``lr``, ``betas`` or ``eps`` for this step only;
3. snapshots the tensors that have a gradient (the parameters the optimizer will change; under BAdam the active
   block's FP32 masters, since they are what the param groups hold);
4. lets the optimizer step, then restores the overridden options;
5. splits each tensor's change into the decoupled weight decay (``-lr·wd·Xₜ₋₁`` for AdamW-like optimizers, left
   as the optimizer made it) and the gradient-driven part ``G``, computes the unscaled update ``U = G / lr`` and
   multiplies ``G`` by the product of the transforms' factors (``scale``), in ``order``: bias correction (0), update
   clipping (10), relative step size (20);
6. calls ``after_update`` so transforms can keep per-tensor state, then ``after_step`` so they can count steps.

Under the update in backward (``FusedUpdateStrategy``, ``BAdamStrategy(fused_update=True)``, ``BAdamDDPStrategy(
fused_update=True)``) one optimizer step arrives as one ``step()`` call per tensor, each as its gradient completes.
With ``steps_in_pieces`` set (``TransformCallback`` sets it from the strategy's ``updates_in_backward``) 1-6 run
for each call except ``after_step``, which runs once, at :meth:`UpdateTransforms.end_step` (after backward): the
counters, and with them ρₜ and β̂₂ₜ, advance once per optimizer step rather than once per tensor.

Memory: the snapshot is one copy of the tensors being stepped, in their own dtype, alive from the end of backward
to the end of ``step()`` — not during forward/backward. Under BAdam that is the active block's FP32 masters (4 bytes
per parameter of one block); with a plain optimizer it is every trainable parameter. One snapshot serves all
transforms.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_memopt.adafactor_rules import rms_many
from lightning_memopt.optimizers import (
    bitsandbytes_kernel,
    decoupled_weight_decay,
    is_adafactor,
    lr_scales_update,
    optimizer_name,
)

__all__ = [
    "ORDER_BIAS_CORRECTION",
    "ORDER_CLIP",
    "ORDER_STEP_SIZE",
    "ParamUpdate",
    "StepContext",
    "TransformCallback",
    "UpdateTransform",
    "UpdateTransforms",
    "bitsandbytes_kernel",
    "decoupled_weight_decay",
    "is_adafactor",
    "lr_scales_update",
    "optimizer_name",
]

ORDER_BIAS_CORRECTION = 0
ORDER_CLIP = 10
ORDER_STEP_SIZE = 20


@dataclass
class ParamUpdate:
    """What a transform sees of one tensor's step (read-only; return a factor from ``scale`` instead).

    Example::

        >>> class ClipToOne(UpdateTransform):  # Adafactor's update clipping with d = 1, in two lines
        ...     def scale(self, update: ParamUpdate) -> float:
        ...         return 1.0 / max(1.0, update.update_rms)
    """

    param: Tensor  #: the tensor after the optimizer's step
    group_index: int  #: index of its param group
    state: dict[str, Any]  #: its optimizer state after the step
    step_lr: float  #: the ``lr`` the optimizer stepped with (after ``before_update`` overrides)
    update_rms: float  #: RMS of the unscaled update U = G / step_lr, after the earlier transforms' factors
    param_rms: float  #: RMS of the tensor before the step, RMS(Xₜ₋₁)


class StepContext:
    """One optimizer step as the transforms see it in ``before_update`` and ``after_update``.

    Example::

        >>> class HalfLrOnFirstGroup(UpdateTransform):
        ...     def before_update(self, step: StepContext) -> None:
        ...         step.override(0, "lr", step.original(0, "lr") / 2)  # this step only; restored after it
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        #: ``(group index, group, tensor)`` for every tensor with a gradient: those the optimizer steps
        self.stepping: list[tuple[int, dict[str, Any], Tensor]] = [
            (i, group, p)
            for i, group in enumerate(optimizer.param_groups)
            for p in group["params"]
            if p.grad is not None
        ]
        self._originals: dict[tuple[int, str], Any] = {}

    @property
    def stepped(self) -> bool:
        """Whether the step changes any tensor (an inf/NaN skip or a loss without gradients changes none)."""
        return bool(self.stepping)

    @property
    def group_indices(self) -> list[int]:
        """Indices of the param groups with at least one tensor being stepped, ascending."""
        return sorted({i for i, _, _ in self.stepping})

    def override(self, group_index: int, key: str, value: Any) -> None:
        """Set a param-group option for this step only; the group gets its own value back right after the step."""
        group = self.optimizer.param_groups[group_index]
        self._originals.setdefault((group_index, key), group[key])
        group[key] = value

    def original(self, group_index: int, key: str) -> Any:
        """A param-group option as the user (or the LR scheduler) set it, whatever overrides this step made."""
        return self._originals.get((group_index, key), self.optimizer.param_groups[group_index][key])

    def restore(self) -> None:
        for (i, key), value in self._originals.items():
            self.optimizer.param_groups[i][key] = value
        self._originals.clear()


class UpdateTransform:
    """A rule applied to every step of one optimizer; subclasses override what they need.

    ``order`` fixes where its factor comes in: :data:`ORDER_BIAS_CORRECTION`, :data:`ORDER_CLIP`,
    :data:`ORDER_STEP_SIZE`. ``state_dict``/``load_state_dict`` carry what must survive a restart.

    Example::

        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> optimizer = torch.optim.SGD([w], lr=0.1)
        >>> class Double(UpdateTransform):
        ...     def scale(self, update: ParamUpdate) -> float:
        ...         return 2.0
        >>> detach = UpdateTransforms.attach(optimizer, Double())
        >>> w.grad = torch.ones(2)
        >>> optimizer.step()
        >>> w.detach()  # -2 * lr * grad
        tensor([-0.2000, -0.2000])
        >>> detach()
    """

    order: int = ORDER_CLIP

    def before_update(self, step: StepContext) -> None:
        """Runs after backward, before the optimizer's update; may override param-group options for this step."""

    def scale(self, update: ParamUpdate) -> float:
        """The factor this rule multiplies the tensor's gradient-driven update by."""
        return 1.0

    def after_update(self, step: StepContext) -> None:
        """Runs after the update (and after the factors were applied)."""

    def after_step(self) -> None:
        """Runs once per optimizer step, after every tensor of it was updated: where a rule counts steps."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


_REGISTRY: weakref.WeakKeyDictionary[Optimizer, UpdateTransforms] = weakref.WeakKeyDictionary()


class UpdateTransforms:
    """The optimizer-step hooks that run every :class:`UpdateTransform` of one optimizer; see the module docstring.

    Example::

        >>> w = torch.nn.Parameter(torch.ones(4))
        >>> optimizer = torch.optim.SGD([w], lr=1.0)
        >>> class Halve(UpdateTransform):
        ...     def scale(self, update):
        ...         return 0.5
        >>> handle = UpdateTransforms.attach(optimizer, Halve())
        >>> w.grad = torch.ones(4)
        >>> optimizer.step()
        >>> w.detach()
        tensor([0.5000, 0.5000, 0.5000, 0.5000])
        >>> handle()  # detach
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self._optimizer = weakref.ref(optimizer)
        self._transforms: list[UpdateTransform] = []
        self._hooks = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]
        self._step: StepContext | None = None
        self._snapshots: list[Tensor] = []
        self._param_rms: list[float] = []
        self._undetermined_decay_warned = False
        #: bytes of the snapshot the last step took (what the transforms cost on top of the optimizer)
        self.last_snapshot_bytes = 0
        #: each optimizer step is several ``step()`` calls (one per tensor, in backward), ended by :meth:`end_step`
        self.steps_in_pieces = False
        self._step_open = False  # a piece of the current optimizer step was taken, and end_step has not run yet

    @classmethod
    def of(cls, optimizer: Optimizer) -> UpdateTransforms | None:
        """The hooks acting on ``optimizer``, or ``None`` when no transform is attached to it."""
        return _REGISTRY.get(optimizer)

    @classmethod
    def attach(cls, optimizer: Optimizer, transform: UpdateTransform) -> Callable[[], None]:
        """Apply ``transform`` to every step of ``optimizer``; returns the function that detaches it again."""
        if isinstance(optimizer, torch.optim.LBFGS):
            raise MisconfigurationException(
                "The update transforms (UpdateClipping, Beta2Schedule, RelativeStepSize) need one update per step(), "
                "but LBFGS re-evaluates the loss and moves the weights several times inside it. Use a first-order "
                "optimizer such as torch.optim.AdamW."
            )
        transforms = _REGISTRY.get(optimizer)
        if transforms is None:
            transforms = _REGISTRY[optimizer] = cls(optimizer)
        transforms._transforms.append(transform)
        transforms._transforms.sort(key=lambda t: t.order)  # stable: same order keeps the attach order
        return lambda: transforms._detach(transform)

    def _detach(self, transform: UpdateTransform) -> None:
        if transform in self._transforms:
            self._transforms.remove(transform)
        if self._transforms:
            return
        self._finish_aborted()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        optimizer = self._optimizer()
        if optimizer is not None and _REGISTRY.get(optimizer) is self:
            del _REGISTRY[optimizer]

    # ------------------------------------------------------------------------------------------------- the hooks
    def _pre_hook(
        self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        self._finish_aborted()
        if kwargs.get("closure") is not None:
            closure, where = kwargs["closure"], "kwargs"
        elif len(args) > 1 and args[1] is not None:
            closure, where = args[1], "args"
        else:
            # a loss scaler calls step() after the closure ran: the gradients are final now
            self._begin(optimizer)
            return None

        def closure_then_begin() -> Any:
            result = closure()
            self._begin(optimizer)
            return result

        if where == "kwargs":
            return args, {**kwargs, "closure": closure_then_begin}
        return (args[0], closure_then_begin, *args[2:]), kwargs

    @torch.no_grad()
    def _begin(self, optimizer: Optimizer) -> None:
        self._finish_aborted()
        step = StepContext(optimizer)
        if not step.stepped:
            return  # nothing changes: no transform runs and no step is counted
        _refuse_shards(step)
        for transform in self._transforms:
            transform.before_update(step)
        self._snapshots = [p.detach().clone() for _, _, p in step.stepping]
        self.last_snapshot_bytes = sum(t.numel() * t.element_size() for t in self._snapshots)
        self._param_rms = rms_many(self._snapshots)
        self._step = step

    @torch.no_grad()
    def _post_hook(self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        step, snapshots, param_rms = self._step, self._snapshots, self._param_rms
        self._step, self._snapshots, self._param_rms = None, [], []
        if step is None:
            return
        groups = optimizer.param_groups
        step_lrs = {i: float(groups[i]["lr"]) for i in step.group_indices}
        decay = {i: self._decay_rate(optimizer, groups[i], step_lrs[i]) for i in step.group_indices}
        step.restore()
        # G = Xₜ - (1 - lr·wd)·Xₜ₋₁, computed in the snapshot's memory: the optimizer made (1 - lr·wd)·Xₜ₋₁ with the
        # same multiplication, so G is exactly its gradient-driven change
        for (i, _, param), snapshot in zip(step.stepping, snapshots, strict=True):
            if decay[i]:
                snapshot.mul_(1.0 - decay[i])
            snapshot.neg_().add_(param)
        change_rms = rms_many(snapshots)
        for (i, _, param), change, g_rms, x_rms in zip(step.stepping, snapshots, change_rms, param_rms, strict=True):
            if step_lrs[i] == 0.0:
                continue  # no gradient-driven change to shape
            state = optimizer.state.get(param, {})  # .get: SGD without momentum keeps no state, and must not get any
            update = ParamUpdate(param, i, state, step_lrs[i], g_rms / step_lrs[i], x_rms)
            factor = 1.0
            for transform in self._transforms:
                f = transform.scale(update)
                factor *= f
                update.update_rms *= abs(f)
            if factor != 1.0:
                param.add_(change, alpha=factor - 1.0)
        del snapshots
        for transform in self._transforms:
            transform.after_update(step)
        self._step_open = True
        if not self.steps_in_pieces:
            self.end_step()

    def end_step(self) -> None:
        """Ends the optimizer step whose tensors were stepped since the last call (``after_step`` of every transform);
        nothing happens when none was. Called after each ``step()`` unless ``steps_in_pieces`` is set."""
        if not self._step_open:
            return
        self._step_open = False
        for transform in self._transforms:
            transform.after_step()

    def _finish_aborted(self) -> None:
        # a step that raised between the hooks must not leave its overrides in the param groups
        if self._step is not None:
            self._step.restore()
            self._step, self._snapshots, self._param_rms = None, [], []

    def _decay_rate(self, optimizer: Optimizer, group: dict[str, Any], step_lr: float) -> float:
        weight_decay = float(group.get("weight_decay", 0.0) or 0.0)
        if weight_decay == 0.0:
            return 0.0
        decoupled = decoupled_weight_decay(optimizer, group)
        if decoupled is None and not self._undetermined_decay_warned:
            self._undetermined_decay_warned = True
            rank_zero_warn(
                f"Update transforms cannot tell whether {type(optimizer).__name__} applies its weight_decay="
                f"{weight_decay} decoupled (like AdamW) or through the gradient (like Adam): the whole change of each "
                "tensor is treated as its update, so clipping and the relative step size act on the decay too."
            )
        return step_lr * weight_decay if decoupled else 0.0


def _refuse_shards(step: StepContext) -> None:
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor

    sharded = next((p for _, _, p in step.stepping if isinstance(p, DTensor)), None)
    if sharded is not None:
        # the RMS of a shard is not the RMS of the tensor, and the rules are defined per whole tensor
        raise MisconfigurationException(
            f"The update transforms need whole parameter tensors, but {type(step.optimizer).__name__} steps a sharded "
            f"DTensor of shape {tuple(sharded.shape)} (FSDP2 / tensor parallelism). Use them with a single-device, "
            "DDP or BAdam strategy."
        )


class TransformCallback(Callback, ABC):
    """Base of the callbacks that act through :class:`UpdateTransforms`: one rule per optimizer of the Trainer.

    The rules are made at the first training batch, not in ``on_fit_start``: callbacks such as
    :class:`~lightning_memopt.callbacks.eight_bit.EightBitState` replace the optimizer there. Their state
    (``state_dict`` of each rule, by optimizer index) is saved in checkpoints.

    Example::

        >>> class Double(UpdateTransform):
        ...     def scale(self, update: ParamUpdate) -> float:
        ...         return 2.0
        >>> class DoubleSteps(TransformCallback):  # Trainer(callbacks=[DoubleSteps()]) doubles every update
        ...     def make_rule(self, optimizer: Optimizer) -> UpdateTransform:
        ...         return Double()
        >>> DoubleSteps().rules
        []
    """

    def __init__(self) -> None:
        self._rules: list[UpdateTransform] = []
        self._detach: list[Callable[[], None]] = []
        self._attached_to: list[int] = []
        self._pending: list[dict[str, Any]] | None = None

    @abstractmethod
    def make_rule(self, optimizer: Optimizer) -> UpdateTransform:
        """The rule this callback applies to ``optimizer`` (it raises if the optimizer is not supported).

        Without a Trainer, ``UpdateTransforms.attach(optimizer, callback.make_rule(optimizer))`` applies it to a plain
        PyTorch loop.
        """

    @property
    def rules(self) -> list[UpdateTransform]:
        """The rules acting on ``trainer.optimizers``, in the same order (empty until the first training batch)."""
        return list(self._rules)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
            raise MisconfigurationException(
                f"{type(self).__name__} computes the RMS of whole parameter tensors, but "
                f"{type(trainer.strategy).__name__} shards them across ranks. Use it with a single-device, DDP or "
                "BAdam strategy."
            )

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        optimizers = list(trainer.optimizers)
        if [id(o) for o in optimizers] == self._attached_to:
            return
        states = self._pending if self._pending is not None else [r.state_dict() for r in self._rules]
        self._release()
        for index, optimizer in enumerate(optimizers):
            rule = self.make_rule(optimizer)
            if index < len(states):
                rule.load_state_dict(states[index])
            self._rules.append(rule)
            self._detach.append(UpdateTransforms.attach(optimizer, rule))
            transforms = UpdateTransforms.of(optimizer)
            if transforms is not None:
                transforms.steps_in_pieces = bool(getattr(trainer.strategy, "updates_in_backward", False))
        self._attached_to = [id(o) for o in optimizers]
        self._pending = None

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        # under the update in backward every tensor was stepped by now; otherwise the step is still to come (no-op)
        self._end_steps(trainer)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._end_steps(trainer)
        # the rules (and their counters) stay readable after fit; only the hooks go
        for detach in self._detach:
            detach()
        self._detach = []
        self._attached_to = []

    def _end_steps(self, trainer: Trainer) -> None:
        for optimizer in trainer.optimizers:
            transforms = UpdateTransforms.of(optimizer)
            if transforms is not None:
                transforms.end_step()

    def _release(self) -> None:
        for detach in self._detach:
            detach()
        self._rules, self._detach, self._attached_to = [], [], []

    @override
    def state_dict(self) -> dict[str, Any]:
        states = self._pending if self._pending is not None else [r.state_dict() for r in self._rules]
        return {"optimizers": states} if any(states) else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = [dict(s) for s in state_dict.get("optimizers", [])]
