"""BAdam: block coordinate descent with the user's optimizer as the inner solver (Luo, Yu & Li, NeurIPS 2024).

The model's weights stay in the half precision Lightning's ``precision`` asked for. Only the *active block* has FP32
master weights, FP32 gradients and optimizer state; the user's own optimizer object is kept and its ``param_groups``
are re-pointed at the active block's masters, so LR schedulers, ``LearningRateMonitor``, gradient clipping and the
``on_before_optimizer_step`` hook keep working. Which block is active, and when it changes, is decided by the
:class:`~lightning_memopt.BlockSwitch` callback.
"""

from __future__ import annotations

import difflib
import logging
from collections import OrderedDict
from collections.abc import Callable, Generator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, TypedDict

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim import LBFGS, Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import Unpack, override

from lightning_memopt.blocks import (
    GRANULARITIES,
    Block,
    Granularity,
    _check_layers_per_block,
    partition,
)
from lightning_memopt.checkpoint_io import AtomicCheckpointIO
from lightning_memopt.compat import compiled_parts, dynamo_recompile_limit, lightning_trainer, parallel_devices
from lightning_memopt.engine import BlockEngine, BlockEngineError
from lightning_memopt.log import get_logger, logs_on_this_rank, rank_zero_log
from lightning_memopt.low_rank import install_galore_shims
from lightning_memopt.optimizers import predict_optimizer_state_bytes, steps_in_backward
from lightning_memopt.precision import MasterGradScalerPrecision, resolve_precision_plugin

__all__ = ["BAdamStrategy", "BlockCoordinateMixin", "BlockOptions", "BlockStrategy", "block_strategy"]

_CKPT_KEY = "badam"
_log = get_logger("badam")


class BlockOptions(TypedDict, total=False):
    """The block options every BAdam strategy takes, as keyword arguments (``BAdamStrategy(include_lm_head=True)``,
    or ``init_args`` in YAML); the defaults are in brackets.

    Attributes:
        block_prefixes: explicit blocks, one entry per block: a dotted name prefix or a list of prefixes. ``None``
            [default] finds the repeated layers and makes one block per layer.
        block_regexes: explicit blocks as regular expressions (``re.search`` on parameter names), one per block
            [``None``].
        include_embedding: with automatic blocks, also train the embeddings as a block of their own [``False``].
        include_lm_head: with automatic blocks, also train the output head and the final norm (a tied head through
            its shared weight) as a last block [``False``].
        granularity: with automatic blocks, ``"layer"`` [default] (one block per repeated layer), ``"module"`` (per
            attention, MLP, norm of each layer) or ``"matrix"`` (per parameter tensor); see
            :func:`lightning_memopt.blocks.partition`. Finer blocks pair with ``BlockSwitch(order="importance",
            budget=...)``, which activates several at a time.
        layers_per_block: with automatic blocks, blocks of this many consecutive layers [1]: more of the model trains
            per step, for proportionally more FP32 state.
        keep_optimizer_state: keep each block's optimizer state across switches [``False``]: costs its memory for
            every visited block; the paper resets it.
        active_input_requires_grad: make the active block's input require grad, which reentrant gradient
            checkpointing needs to reach the block. ``None`` [default] turns it on when a module has
            ``gradient_checkpointing=True``.
        max_nonfinite_steps: with ``bf16-true``/``32-true``, a step whose gradients hold inf/NaN is skipped with a
            warning; this many in a row [5] stop the run with an error. (``16-true``'s loss scaler skips such steps
            and lowers its scale instead.) Data parallel strategies decide after the all-reduce, so the same on every
            rank.
        fused_update: step each active master during backward, as soon as its gradient is complete, and free the
            gradient at once [``False``]: the block needs no FP32 gradient buffer (the update in backward; see
            ``docs/update-in-backward.md``). Refuses gradient accumulation, norm clipping and ``16-true``;
            ``badam`` and ``badam_ddp`` only.

    Example::

        options: BlockOptions = {"granularity": "module", "include_lm_head": True}
        BAdamStrategy(**options), BAdamDDPStrategy(**options)
    """

    block_prefixes: Sequence[str | Sequence[str]] | None
    block_regexes: Sequence[str] | None
    include_embedding: bool
    include_lm_head: bool
    granularity: Granularity
    layers_per_block: int
    keep_optimizer_state: bool
    active_input_requires_grad: bool | None
    max_nonfinite_steps: int
    fused_update: bool


_DEFAULT_OPTIONS: dict[str, Any] = {
    "block_prefixes": None,
    "block_regexes": None,
    "include_embedding": False,
    "include_lm_head": False,
    "granularity": "layer",
    "layers_per_block": 1,
    "keep_optimizer_state": False,
    "active_input_requires_grad": None,
    "max_nonfinite_steps": 5,
    "fused_update": False,
}
assert set(_DEFAULT_OPTIONS) == set(BlockOptions.__annotations__)


class BlockStrategy(Strategy):
    """The base of the BAdam strategies: a Lightning adapter around a :class:`~lightning_memopt.engine.BlockEngine`.

    Mix it in before a Lightning strategy (``class S(BlockStrategy, SingleDeviceStrategy)``): its hooks wrap the
    strategy's own and call the engine (grads to masters after each backward, masters to weights after the step, the
    engine's part of checkpoints). It also carries the small protocol callbacks use (:func:`block_strategy` finds it):
    :attr:`blocks`, :attr:`active_blocks`, :attr:`master_params`, :attr:`step_skipped`, :meth:`activate`,
    :meth:`register_activation_hook`. Nothing here knows about schedules: :class:`~lightning_memopt.BlockSwitch`
    calls :meth:`activate`. Subclasses set :attr:`engine_class` for what sharding changes and may override
    :meth:`_badam_after_closure` to communicate master gradients.

    Example::

        >>> from lightning.pytorch.strategies import SingleDeviceStrategy
        >>> class MyBAdam(BlockStrategy, SingleDeviceStrategy):  # what BAdamStrategy is, less its options
        ...     pass
        >>> # Trainer(strategy=MyBAdam(torch.device("cpu")), callbacks=[BlockSwitch(every=50)])
    """

    strategy_name: str
    strategy_description: str
    engine_class: type[BlockEngine] = BlockEngine

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        # the one registration of every BAdam strategy: its name (``Trainer(strategy="badam")``) and description
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(cls.strategy_name, cls, description=cls.strategy_description)

    def _badam_init(self, options: Mapping[str, Any], also_known: Sequence[str] = ()) -> None:
        unknown = [k for k in options if k not in _DEFAULT_OPTIONS]
        if unknown:
            known = [*_DEFAULT_OPTIONS, *also_known]
            close = difflib.get_close_matches(unknown[0], known, n=1)
            raise TypeError(
                f"{type(self).__name__} got an unexpected option {unknown[0]!r}"
                + (f"; did you mean {close[0]!r}?" if close else ".")
                + f" Its options are: {', '.join(known)}."
            )
        settings = {**_DEFAULT_OPTIONS, **options}
        granularity = settings["granularity"]
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity={granularity!r} is not known; choose one of {', '.join(map(repr, GRANULARITIES))}."
            )
        _check_layers_per_block(settings["layers_per_block"])
        limit = settings["max_nonfinite_steps"]
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_nonfinite_steps must be an int >= 1 but is: {limit!r}")
        self.block_prefixes: Sequence[str | Sequence[str]] | None = settings["block_prefixes"]
        self.block_regexes: Sequence[str] | None = settings["block_regexes"]
        self.include_embedding: bool = settings["include_embedding"]
        self.include_lm_head: bool = settings["include_lm_head"]
        self.granularity: Granularity = granularity
        self.layers_per_block: int = settings["layers_per_block"]
        self.keep_optimizer_state: bool = settings["keep_optimizer_state"]
        self.active_input_requires_grad: bool | None = settings["active_input_requires_grad"]
        self.max_nonfinite_steps: int = limit
        self.fused_update: bool = bool(settings["fused_update"])
        self._nonfinite_in_a_row = 0
        self._blocks: list[Block] = []
        self._partitioned = False  # whether _blocks belong to the current fit
        self._engine: BlockEngine | None = None  # one per fit, kept after it (a checkpoint after fit still resumes)
        self._ready = False
        self._activation_hooks: OrderedDict[int, Callable[[Any, int], None]] = OrderedDict()
        self._step_skipped = False

    # ----------------------------------------------------------------------------------------------- public surface
    # What callbacks use to talk to a BAdam strategy (find it with :func:`block_strategy`): the blocks, which are
    # active, their masters, whether this step was skipped, and a hook on every activation.
    shards_parameters: ClassVar[bool] = False
    r"""Whether parameters, masters and their gradients are shards (``DTensor``\ s) on each rank (set from
    :attr:`engine_class`)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.shards_parameters = cls.engine_class.sharded

    @property
    def updates_in_backward(self) -> bool:
        """Whether each master is stepped during backward (``fused_update=True``), so no gradient outlives its step."""
        return self.fused_update

    @property
    def engine(self) -> BlockEngine:
        """The block engine of this fit (see :mod:`lightning_memopt.engine`); set up by ``trainer.fit``."""
        if self._engine is None:
            raise RuntimeError(
                "The BAdam strategy is not set up yet: its block engine exists once trainer.fit() has started "
                "(from a callback's on_fit_start or later)."
            )
        return self._engine

    @property
    def step_skipped(self) -> bool:
        """Whether this optimizer step's master gradients were inf/NaN and were dropped, so the step changes nothing
        (``bf16-true``/``32-true``). Set after the last backward of the step, before ``on_before_optimizer_step``.
        Under ``16-true`` the loss scaler decides later: see ``MasterGradScalerPrecision.last_step_skipped``."""
        return self._step_skipped

    @property
    def blocks(self) -> list[Block]:
        """The blocks, in ascending order. Empty until ``trainer.fit`` has set the strategy up."""
        return list(self._blocks)

    @property
    def active_block(self) -> int | None:
        """Index into :attr:`blocks` of the block being trained (the lowest one when several are active), or ``None``
        before the first activation."""
        active = self.active_blocks
        return active[0] if active else None

    @property
    def active_blocks(self) -> tuple[int, ...]:
        """Indices of all blocks being trained, ascending (one, unless a set was activated); empty before the first
        activation."""
        return self._engine.active if self._engine is not None else ()

    @property
    def param_group_names(self) -> list[list[str]]:
        """For each param group of the optimizer, the names of the parameters it was configured with (active or not).

        BAdam re-points ``param_groups`` at the active masters only; this says which group (and so which lr) a
        parameter belongs to while it is inactive.
        """
        return [list(members) for members in self._engine.group_members] if self._engine is not None else []

    @property
    def master_params(self) -> dict[str, nn.Parameter]:
        """The active block's FP32 master weights by parameter name (FP32 weights are their own masters)."""
        return dict(self._engine.masters) if self._engine is not None else {}

    def activate(self, index: int | Sequence[int]) -> None:
        """Make block ``index`` the trainable one, or, given several indices, that set of blocks together.

        The previous blocks' masters and optimizer state are dropped (their half weights already hold their last
        update), FP32 masters are made from the new blocks' half weights, the optimizer's param groups are re-pointed
        at them and only the new blocks' weights require grad. Activating the active block(s) again does nothing.
        """
        if not self._ready:
            raise RuntimeError(
                "The BAdam strategy is not set up yet: blocks can be activated once trainer.fit() has started "
                "(from a callback's on_fit_start or later)."
            )
        self.engine.activate((index,) if isinstance(index, int) else tuple(index))

    def register_activation_hook(self, hook: Callable[[Any, int], None], *, run_now: bool = False) -> RemovableHandle:
        """Call ``hook(strategy, index)`` after every block activation (the new masters exist and the optimizer's param
        groups point at them). Add-ons whose settings are keyed by parameter identity re-apply them here. When a set of
        blocks is active, ``index`` is the lowest; ``strategy.active_blocks`` has them all. ``run_now=True`` also
        calls it at once with the current block (``None`` before the first activation), for a callback that starts
        after ``BlockSwitch`` has activated one.

        Example::

            handle = trainer.strategy.register_activation_hook(lambda strategy, i: print("now training", i))
            handle.remove()
        """
        handle = RemovableHandle(self._activation_hooks)
        self._activation_hooks[handle.id] = hook
        if run_now:
            hook(self, self.active_block)  # type: ignore[arg-type]
        return handle

    @property
    @override
    def optimizers(self) -> list[Optimizer]:
        return self._optimizers

    @optimizers.setter
    def optimizers(self, optimizers: list[Optimizer]) -> None:
        # a callback may swap the optimizer during fit (EightBitState puts in its 8-bit twin): the engine follows
        Strategy.optimizers.fset(self, optimizers)  # type: ignore[attr-defined]
        engine = getattr(self, "_engine", None)
        if engine is not None and optimizers:
            engine.optimizer = optimizers[0]

    # ------------------------------------------------------------------------------------------------- internals
    def _run_activation_hooks(self, index: int) -> None:
        for hook in list(self._activation_hooks.values()):
            hook(self, index)

    def _badam_optimizer(self) -> Optimizer:
        return self.optimizers[0]

    def _badam_check_precision(self) -> None:
        self.precision_plugin = resolve_precision_plugin(self.precision_plugin)

    def _badam_setup(self, trainer: Trainer) -> None:
        module = self.lightning_module
        assert module is not None
        if not module.automatic_optimization:
            raise MisconfigurationException(
                "BAdam needs automatic optimization: the strategy moves gradients into the active block's FP32 masters "
                "and re-points the optimizer at them around each step. Remove `self.automatic_optimization = False` "
                "(and the manual optimizer.step() calls) from your LightningModule, or use another strategy."
            )
        if len(self.optimizers) != 1:
            raise MisconfigurationException(
                f"BAdam drives exactly one optimizer, but configure_optimizers returned {len(self.optimizers)}. "
                "Return a single optimizer (use param groups for different learning rates or weight decay)."
            )
        optimizer = self._badam_optimizer()
        if isinstance(optimizer, LBFGS):
            raise MisconfigurationException(
                "BAdam cannot drive LBFGS: it re-evaluates the loss inside step() while the active block changes "
                "between steps. Use a first-order optimizer such as torch.optim.AdamW or SGD."
            )
        if self.fused_update:
            self._check_fused_update(trainer)
        blocks = self._partition(module)
        input_grad = self._wants_input_grad(module)
        with _misconfiguration():
            engine = self.engine_class(
                module,
                blocks,
                optimizer,
                keep_optimizer_state=self.keep_optimizer_state,
                input_requires_grad=input_grad,
                fused_update=self.fused_update,
            )
        engine.on_activate = self._run_activation_hooks
        self._engine = engine
        self._ready = True
        outside = engine.frozen_outside
        explicit = self.block_prefixes is not None or self.block_regexes is not None
        if outside and explicit:
            # the automatic blocks leave the embedding, head and final norm out by design; explicit ones by mistake
            rank_zero_warn(
                f"BAdam: {len(outside)} trainable parameters are in none of the blocks given by block_prefixes / "
                f"block_regexes and stay frozen for the whole run: {_first_names(outside)}. Add them to a block to "
                "train them, or set requires_grad=False on them to say that they are frozen on purpose."
            )
        _warn_if_compiled(module, len(blocks))

    def _check_fused_update(self, trainer: Trainer) -> None:
        name = type(self).__name__
        if trainer.accumulate_grad_batches > 1:
            raise MisconfigurationException(
                f"{name}(fused_update=True) cannot accumulate gradients (accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches}): each master is stepped during the backward of every batch. Use "
                "fused_update=False, which accumulates the active block's gradients in FP32, or a larger batch."
            )
        if trainer.gradient_clip_val:
            raise MisconfigurationException(
                f"{name}(fused_update=True) cannot clip by the global gradient norm (gradient_clip_val="
                f"{trainer.gradient_clip_val}): a master is stepped before the block's other gradients exist. Remove "
                "gradient_clip_val and clip each tensor's update with lightning_memopt.UpdateClipping(), or use "
                "fused_update=False."
            )
        if isinstance(self.precision_plugin, MasterGradScalerPrecision):
            raise MisconfigurationException(
                f"{name}(fused_update=True) does not support precision='16-true': the loss scaler decides whether to "
                "skip a step only after the whole backward. Use precision='bf16-true', or fused_update=False."
            )

    def _wants_input_grad(self, module: nn.Module) -> bool:
        if self.active_input_requires_grad is not None:
            return self.active_input_requires_grad
        # Hugging Face marks layers with gradient_checkpointing=True; reentrant checkpointing of a layer whose input
        # does not require grad returns an output without grad, so the active block would get no gradient at all
        return any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())

    def _partition(self, module: nn.Module) -> list[Block]:
        """This fit's blocks, computed once per fit (the FSDP variant shards by them before the optimizer is set up;
        the names do not change with sharding)."""
        if not self._partitioned:
            self._blocks = partition(
                module,
                block_prefixes=self.block_prefixes,
                block_regexes=self.block_regexes,
                include_embedding=self.include_embedding,
                include_lm_head=self.include_lm_head,
                granularity=self.granularity,
                layers_per_block=self.layers_per_block,
            )
            self._partitioned = True
        return self._blocks

    # ------------------------------------------------------------------------------------------ strategy hooks
    @override
    def setup_environment(self) -> None:
        # before Lightning restores a checkpoint: GaLore's projector objects must load with weights_only=True
        install_galore_shims()
        self._badam_check_precision()
        if isinstance(self.precision_plugin, MasterGradScalerPrecision):
            self.precision_plugin.set_device(self.root_device)
        _ensure_block_switch(self)
        super().setup_environment()

    @override
    def setup(self, trainer: Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self._badam_setup(trainer)

    @override
    def setup_optimizers(self, trainer: Trainer) -> None:
        try:
            super().setup_optimizers(trainer)
        except RuntimeError as err:
            if "multiple optimizers" not in str(err):
                raise
            # Lightning's advice (manual optimization) is no way out here: BAdam needs automatic optimization
            raise MisconfigurationException(
                "BAdam drives exactly one optimizer, but configure_optimizers returned several. Return a single "
                "optimizer and use param groups for different learning rates or weight decay."
            ) from err

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        try:
            super().load_model_state_dict(checkpoint, strict=strict)
        except RuntimeError as err:
            if "state_dict" not in str(err):
                raise
            raise MisconfigurationException(
                "The checkpoint's weights do not fit this LightningModule (missing, unexpected or differently shaped "
                "parameters: see below), so it comes from another model or configuration. Resume with the model the "
                f"checkpoint was written with, or start a new run without ckpt_path.\n{err}"
            ) from err

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        super().post_backward(closure_loss)
        self.engine.grads_to_masters()

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        if self.fused_update:
            return self._fused_optimizer_step(optimizer, closure, model, **kwargs)

        def closure_then_hook() -> Any:
            self._step_skipped = False
            result = closure()
            self._badam_after_closure()
            if not isinstance(self.precision_plugin, MasterGradScalerPrecision):
                # the fp16 loss scaler skips non-finite steps itself (and lowers its scale)
                self._badam_skip_nonfinite()
            return result

        output = super().optimizer_step(optimizer, closure_then_hook, model, **kwargs)
        self.engine.masters_to_weights()
        return output

    def _fused_optimizer_step(
        self, optimizer: Optimizer, closure: Callable[[], Any], model: LightningModule | nn.Module | None, **kwargs: Any
    ) -> Any:
        # the masters are stepped, and copied back, inside the closure's backward (BlockEngine._step_in_backward)
        engine = self.engine
        engine.skipped = []
        self._step_skipped = False
        try:
            with steps_in_backward(optimizer) as step:
                engine.step_in_backward = step
                return super().optimizer_step(optimizer, closure, model, **kwargs)
        finally:
            engine.step_in_backward = None
            if engine.skipped:
                trainer = lightning_trainer(self.lightning_module)
                rank_zero_warn(
                    f"BAdam: inf/NaN gradients of {_first_names(engine.skipped)} at step "
                    f"{trainer.global_step if trainer is not None else '?'}; their update was skipped (the other "
                    "masters of the block were stepped)."
                )

    def _badam_skip_nonfinite(self) -> None:
        engine = self.engine
        if engine.master_grads_finite():
            self._nonfinite_in_a_row = 0
            return
        engine.drop_master_grads()
        self._step_skipped = True
        self._nonfinite_in_a_row += 1
        trainer = lightning_trainer(self.lightning_module)
        step = trainer.global_step if trainer is not None else "?"
        if self._nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise RuntimeError(
                f"BAdam: the gradients were inf/NaN {self._nonfinite_in_a_row} optimizer steps in a row (last at step "
                f"{step}); every one was skipped, so the weights hold the last finite update. Look for a NaN loss "
                "(bad data, a too-high learning rate, log of zero) and resume from the last checkpoint; raise "
                "BAdamStrategy(max_nonfinite_steps=...) to tolerate longer streaks."
            )
        rank_zero_warn(
            f"BAdam: inf/NaN gradients at step {step}; the optimizer step was skipped "
            f"({self._nonfinite_in_a_row} in a row, the run stops at {self.max_nonfinite_steps})."
        )

    def _badam_after_closure(self) -> None:
        """Runs after the last micro-batch's backward, before unscaling, hooks, clipping and the step."""

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        state: dict[str, Any] = dict(super().optimizer_state(optimizer))
        if self._ready:
            state = self.engine.full_groups(state)
            state[_CKPT_KEY] = {**self.engine.state_dict(), "optimizer_groups": "full"}
        return state

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        states = list(checkpoint["optimizer_states"])
        if not states or _CKPT_KEY not in states[0]:
            raise MisconfigurationException(
                "This checkpoint was not written by a BAdam strategy, so the active block's masters and optimizer "
                "state cannot be restored. To start BAdam from its weights, load them into the module "
                "(model.load_state_dict(torch.load(path)['state_dict'])) and call trainer.fit without ckpt_path."
            )
        first = dict(states[0])
        badam = first.pop(_CKPT_KEY)
        with _misconfiguration():
            self.engine.load_state_dict(badam)
            if badam.get("optimizer_groups") == "full":  # older checkpoints saved the active masters' groups only
                first = self.engine.compact_groups(first)
        super().load_optimizer_state_dict({**checkpoint, "optimizer_states": [first, *states[1:]]})

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        # after every callback's on_fit_start and on_train_start: the first block is active, an optimizer swap
        # (EightBitState) is done and a resumed run's state is loaded, so the prediction is the one the run will see
        if self._ready and logs_on_this_rank(_log, logging.INFO):
            _log.info(self._badam_summary())

    def _badam_summary(self) -> str:
        """The start-of-fit summary: the blocks, their sizes and the predicted memory of the active one(s)."""
        from lightning_memopt.memory import _size, predict_memory  # memory.py imports this module

        engine = self.engine
        module = self.lightning_module
        assert module is not None
        sizes = [sum(engine.params[n].numel() for n in b.param_names) for b in self._blocks]
        text = f"BAdam: {len(sizes)} blocks ({_sizes_text(sizes)} parameters)"
        outside = engine.frozen_outside
        if outside:
            tensors = "tensor stays" if len(outside) == 1 else "tensors stay"
            text += f"; {len(outside)} parameter {tensors} frozen outside every block (e.g. {outside[0]!r})"
        trainer = _trainer_of(self)
        optimizer = engine.optimizer
        prediction = predict_memory(
            module,
            [optimizer],
            self.master_params,
            precision=str(trainer.precision),
            blocks=len(sizes),
            update_in_backward=self.updates_in_backward,
        )
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters()})
        parts = [f"{'/'.join(dtypes)} weights {_size(prediction.weights)}"]
        active = [("FP32 masters", prediction.masters), ("gradients", prediction.grads)]
        name = type(optimizer).__name__
        state = (
            "not predicted" if predict_optimizer_state_bytes(optimizer) is None else _size(prediction.optimizer_state)
        )
        listed = ", ".join(f"{label} {_size(n)}" for label, n in active if n) + f", {name} state {state}"
        parts.append(f"for the active {'block' if len(self.active_blocks) == 1 else 'blocks'}: {listed.lstrip(', ')}")
        text += f"; predicted memory on {self.root_device} {_size(prediction.total)} ({'; '.join(parts)}"
        largest = max(range(len(sizes)), key=sizes.__getitem__)
        trained = prediction.trained_params
        if len(self.active_blocks) == 1 and trained and sizes[largest] > trained:
            per_param = (prediction.total - prediction.weights - prediction.buffers) / trained
            peak = prediction.weights + prediction.buffers + round(per_param * sizes[largest])
            text += f"; about {_size(peak)} while the largest block trains, {self._blocks[largest].name!r}"
        return text + "; activations come on top)"

    @override
    def teardown(self) -> None:
        self._partitioned = False  # the blocks stay readable; the next fit partitions again
        if self._ready:
            self.engine.release()
        super().teardown()


BlockCoordinateMixin = BlockStrategy
"""The former name of :class:`BlockStrategy` (kept for code written against 0.x)."""


@contextmanager
def _misconfiguration() -> Generator[None, None, None]:
    # the engine is Lightning-free: its errors become Lightning's configuration error at the adapter
    try:
        yield
    except BlockEngineError as err:
        raise MisconfigurationException(str(err)) from err


def _sizes_text(sizes: Sequence[int], most: int = 5) -> str:
    """Block sizes in order, equal neighbours grouped (``32,768 + 4 x 197,120 + 200,960``); a range beyond ``most``
    groups (``4,096 to 58,720,256``)."""
    runs: list[list[int]] = []
    for size in sizes:
        if runs and runs[-1][0] == size:
            runs[-1][1] += 1
        else:
            runs.append([size, 1])
    if len(runs) > most:
        return f"{min(sizes):,} to {max(sizes):,}"
    return " + ".join(f"{count} x {size:,}" if count > 1 else f"{size:,}" for size, count in runs)


def _first_names(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _warn_if_compiled(module: nn.Module, num_blocks: int) -> None:
    parts = compiled_parts(module)
    if not parts:
        return
    setting, limit = dynamo_recompile_limit()
    rank_zero_warn(
        f"BAdam: {', '.join(parts[:3])}{f' and {len(parts) - 3} more modules' if len(parts) > 3 else ''} "
        f"{'is' if len(parts) == 1 else 'are'} compiled with torch.compile. Each block switch changes which "
        "parameters require grad, which the compiled graph guards on, so torch.compile recompiles the first time "
        f"each of the {num_blocks} blocks becomes active, and once it holds torch._dynamo.config.{setting} ({limit}) "
        "versions it runs uncompiled. BAdam's memory saving does not need compilation: remove torch.compile, or set "
        f"torch._dynamo.config.{setting} to at least the number of blocks ({num_blocks}) so that each block's graph "
        "is compiled once and reused."
    )


class BAdamStrategy(BlockStrategy, SingleDeviceStrategy):
    """BAdam on one device: half-precision weights, FP32 masters and optimizer state for the active block only.

    Use ``precision="bf16-true"`` (or ``"16-true"``, with loss scaling on the FP32 master gradients, or ``"32-true"``).
    The optimizer from ``configure_optimizers`` (or LightningCLI's ``optimizer:``) is kept, with its param groups and
    hyper-parameters; its state is reset at every block switch, as in the paper, unless ``keep_optimizer_state``.
    Without a :class:`~lightning_memopt.BlockSwitch` callback a default one (every 100 steps, random order) is added.

    Takes every option of :class:`BlockOptions` as a keyword argument (which parameters form the blocks, optimizer
    state across switches, input grads for gradient checkpointing, inf/NaN tolerance), and:

    Args:
        device: the device to train on; by default the one the Trainer's accelerator picked.
        accelerator: Lightning's accelerator (normally chosen by the Trainer).
        checkpoint_io: how checkpoint files are written; by default
            :class:`~lightning_memopt.checkpoint_io.AtomicCheckpointIO`, which never leaves a half-written file.
        precision_plugin: Lightning's precision plugin (normally from ``Trainer(precision=...)``).

    Example::

        from lightning.pytorch import Trainer
        from lightning_memopt import BAdamStrategy, BlockSwitch

        trainer = Trainer(strategy=BAdamStrategy(include_lm_head=True), precision="bf16-true",
                          callbacks=[BlockSwitch(every=100, order="random")])
        trainer.fit(model)
    """

    strategy_name = "badam"
    strategy_description = "BAdam block coordinate descent, one device"

    def __init__(
        self,
        device: str | torch.device | None = None,
        accelerator: Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        **block_options: Unpack[BlockOptions],
    ) -> None:
        self._badam_init(block_options)
        super().__init__(
            device=device if device is not None else "cpu",
            accelerator=accelerator,
            checkpoint_io=checkpoint_io if checkpoint_io is not None else AtomicCheckpointIO(),
            precision_plugin=precision_plugin,
        )
        self._device_given = device is not None

    @override
    def setup_environment(self) -> None:
        if not self._device_given:
            self._root_device = _device_from_trainer(self)
        super().setup_environment()


def block_strategy(trainer: Trainer) -> BlockStrategy | None:
    """The BAdam strategy ``trainer`` runs (``badam``, ``badam_ddp``, ``badam_fsdp``), or ``None`` for any other: how
    callbacks find the block protocol (:attr:`~BlockStrategy.blocks`, ``active_blocks``, ``master_params``,
    ``step_skipped``, ``register_activation_hook``).

    Example::

        strategy = block_strategy(trainer)
        if strategy is not None:
            print("training", [strategy.blocks[i].name for i in strategy.active_blocks])
    """
    strategy = trainer.strategy
    return strategy if isinstance(strategy, BlockStrategy) else None


def _trainer_of(strategy: Any) -> Trainer:
    trainer = lightning_trainer(strategy.lightning_module)
    if trainer is None:
        raise RuntimeError("The strategy is not attached to a Trainer yet.")
    return trainer


def _device_from_trainer(strategy: Any, several: str = "strategy='badam_ddp'") -> torch.device:
    # Lightning #18902: a SingleDeviceStrategy built without `device` would stay on CPU even when the accelerator is a
    # GPU, so take the device the accelerator connector resolved from `devices=`.
    trainer = _trainer_of(strategy)
    devices = parallel_devices(trainer)
    if len(devices) > 1:
        raise MisconfigurationException(
            f"{type(strategy).__name__} trains on one device but the Trainer was given {len(devices)} devices. "
            f"Use {several} for several devices, or devices=1."
        )
    if devices:
        device = devices[0]
        return device if isinstance(device, torch.device) else torch.device(device)
    return torch.device("cpu")


def _ensure_block_switch(strategy: Any) -> None:
    from lightning.pytorch.callbacks import Checkpoint

    from lightning_memopt.callbacks.block_switch import BlockSwitch

    trainer = _trainer_of(strategy)
    callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]
    if trainer.state.fn != TrainerFn.FITTING or any(isinstance(c, BlockSwitch) for c in callbacks):
        return
    default = BlockSwitch()
    # before the checkpoint callbacks, like Lightning orders its own, so checkpoints see this step's schedule state
    position = next((i for i, c in enumerate(callbacks) if isinstance(c, Checkpoint)), len(callbacks))
    callbacks.insert(position, default)
    rank_zero_log(
        _log,
        logging.INFO,
        f"BAdam: no BlockSwitch callback was given, so the default {default!r} decides block switches. "
        "Add lightning_memopt.BlockSwitch(...) to the Trainer's callbacks to choose the schedule.",
    )
