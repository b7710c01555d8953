"""BAdam: block coordinate descent with the user's optimizer as the inner solver (Luo, Yu & Li, NeurIPS 2024).

The model's weights stay in the half precision Lightning's ``precision`` asked for. Only the *active block* has FP32
master weights, FP32 gradients and optimizer state; the user's own optimizer object is kept and its ``param_groups``
are re-pointed at the active block's masters, so LR schedulers, ``LearningRateMonitor``, gradient clipping and the
``on_before_optimizer_step`` hook keep working. Which block is active, and when it changes, is decided by the
:class:`~lightning_memopt.BlockSwitch` callback.
"""

from __future__ import annotations

import sys
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import LBFGS, Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_memopt.blocks import (
    GRANULARITIES,
    Block,
    Granularity,
    _check_layers_per_block,
    partition,
)
from lightning_memopt.checkpoint_io import AtomicCheckpointIO
from lightning_memopt.precision import MasterGradScalerPrecision, resolve_precision_plugin

__all__ = ["BAdamStrategy", "BlockCoordinateMixin", "block_strategy"]

_CKPT_KEY = "badam"
_CKPT_FORMAT = 1


def _needs_master(param: Tensor) -> bool:
    # FP32/FP64 weights are their own masters: no copy, and 32-true BAdam equals the plain optimizer exactly
    return param.dtype not in (torch.float32, torch.float64)


class BlockCoordinateMixin(Strategy):
    """The block bookkeeping shared by the BAdam strategies: half weights, the active block's masters, re-pointing.

    Mix it in before a Lightning strategy (``class S(BlockCoordinateMixin, SingleDeviceStrategy)``): its hooks wrap
    the strategy's own. Nothing here knows about schedules: :class:`~lightning_memopt.BlockSwitch` calls
    :meth:`activate`. Subclasses may override :meth:`_badam_after_closure` to communicate master gradients.
    """

    strategy_name: str
    strategy_description: str

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        # the one registration of every BAdam strategy: its name (``Trainer(strategy="badam")``) and description
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(cls.strategy_name, cls, description=cls.strategy_description)

    def _badam_init(
        self,
        block_prefixes: Sequence[str | Sequence[str]] | None,
        block_regexes: Sequence[str] | None,
        include_embedding: bool,
        include_lm_head: bool,
        keep_optimizer_state: bool,
        active_input_requires_grad: bool | None,
        max_nonfinite_steps: int,
        granularity: Granularity = "layer",
        layers_per_block: int = 1,
    ) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity={granularity!r} is not known; choose one of {', '.join(map(repr, GRANULARITIES))}."
            )
        self.granularity: Granularity = granularity
        _check_layers_per_block(layers_per_block)
        self.layers_per_block = layers_per_block
        if isinstance(max_nonfinite_steps, bool) or not isinstance(max_nonfinite_steps, int) or max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be an int >= 1 but is: {max_nonfinite_steps!r}")
        self.max_nonfinite_steps = max_nonfinite_steps
        self._nonfinite_in_a_row = 0
        self.block_prefixes = block_prefixes
        self.block_regexes = block_regexes
        self.include_embedding = include_embedding
        self.include_lm_head = include_lm_head
        self.keep_optimizer_state = keep_optimizer_state
        self.active_input_requires_grad = active_input_requires_grad
        self._blocks: list[Block] = []
        self._partitioned = False  # whether _blocks belong to the current fit
        self._active: int | None = None
        self._active_set: tuple[int, ...] = ()
        self._params: dict[str, nn.Parameter] = {}
        self._masters: dict[str, nn.Parameter] = {}
        self._group_members: list[list[str]] = []
        self._original_requires_grad: dict[str, bool] = {}
        self._stash: dict[str, dict[str, Any]] = {}
        self._input_hooks: list[RemovableHandle] = []
        self._disabled_input_grad_hooks: list[nn.Module] = []
        self._pending_ckpt: dict[str, Any] | None = None
        self._ready = False
        self._activation_hooks: OrderedDict[int, Callable[[Any, int], None]] = OrderedDict()
        self._step_skipped = False

    # ----------------------------------------------------------------------------------------------- public surface
    # What callbacks use to talk to a BAdam strategy (find it with :func:`block_strategy`): the blocks, which are
    # active, their masters, whether this step was skipped, and a hook on every activation.
    shards_parameters: bool = False
    r"""Whether parameters, masters and their gradients are shards (``DTensor``\ s) on each rank."""

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
        return self._active

    @property
    def active_blocks(self) -> tuple[int, ...]:
        """Indices of all blocks being trained, ascending (one, unless a set was activated); empty before the first
        activation."""
        return self._active_set

    @property
    def param_group_names(self) -> list[list[str]]:
        """For each param group of the optimizer, the names of the parameters it was configured with (active or not).

        BAdam re-points ``param_groups`` at the active masters only; this says which group (and so which lr) a
        parameter belongs to while it is inactive.
        """
        return [list(members) for members in self._group_members]

    @property
    def master_params(self) -> dict[str, nn.Parameter]:
        """The active block's FP32 master weights by parameter name (FP32 weights are their own masters)."""
        return dict(self._masters)

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
        indices = (index,) if isinstance(index, int) else tuple(sorted(set(index)))
        if not indices:
            raise ValueError("activate() needs at least one block index.")
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self._blocks):
                raise IndexError(f"Block index {i!r} is out of range: the model has {len(self._blocks)} blocks.")
        if indices == self._active_set:
            return
        optimizer = self._badam_optimizer()
        if self._active is not None:
            self._deactivate(optimizer)
        for name in (n for i in indices for n in self._blocks[i].param_names):
            param = self._params[name]
            param.grad = None
            param.requires_grad_(True)
            if _needs_master(param):
                master = nn.Parameter(param.detach().to(dtype=torch.float32, copy=True))
            else:
                master = param
            self._masters[name] = master
        for group, members in zip(optimizer.param_groups, self._group_members, strict=True):
            group["params"] = [self._masters[n] for n in members if n in self._masters]
        if self.keep_optimizer_state:
            for name, master in self._masters.items():
                if name in self._stash:
                    optimizer.state[master] = {
                        k: self._badam_like(v, master) if isinstance(v, Tensor) and v.shape == master.shape else v
                        for k, v in self._stash.pop(name).items()
                    }
        self._active = indices[0]
        self._active_set = indices
        self._update_input_hooks()
        for hook in list(self._activation_hooks.values()):
            hook(self, self._active)

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
            hook(self, self._active)  # type: ignore[arg-type]
        return handle

    # ------------------------------------------------------------------------------------------------- internals
    def _badam_optimizer(self) -> Optimizer:
        return self.optimizers[0]

    def _deactivate(self, optimizer: Optimizer) -> None:
        if self.keep_optimizer_state:
            for name, master in self._masters.items():
                if master in optimizer.state:
                    self._stash[name] = optimizer.state[master]
        # a fresh state dict: leftover keys of dropped masters would keep them alive and break state_dict()
        optimizer.state = defaultdict(dict)
        for name in self._masters:
            param = self._params[name]
            param.grad = None
            param.requires_grad_(False)
        self._masters.clear()
        for group in optimizer.param_groups:
            group["params"] = []
        self._active = None
        self._active_set = ()

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
        self._partition(module)
        self._params = dict(module.named_parameters())
        self._original_requires_grad = {n: p.requires_grad for n, p in self._params.items()}
        names_by_id = {id(p): n for n, p in self._params.items()}
        self._group_members = []
        for i, group in enumerate(optimizer.param_groups):
            members = []
            for p in group["params"]:
                if id(p) not in names_by_id:
                    raise MisconfigurationException(
                        f"Param group {i} of {type(optimizer).__name__} holds a tensor of shape {tuple(p.shape)} that "
                        "is not a parameter of the LightningModule. BAdam can only train the module's own parameters: "
                        "build the optimizer from self.parameters() or self.named_parameters()."
                    )
                members.append(names_by_id[id(p)])
            self._group_members.append(members)
        in_optimizer = {n for members in self._group_members for n in members}
        in_blocks = {n for b in self._blocks for n in b.param_names}
        not_optimized = [n for n in in_blocks if n not in in_optimizer]
        if not_optimized:
            raise MisconfigurationException(
                f"{len(not_optimized)} parameters of the BAdam blocks are not in the optimizer (e.g. "
                f"{not_optimized[0]!r}). Pass every parameter you want to train to the optimizer, or restrict the "
                "blocks with block_prefixes=[...]."
            )
        outside = [n for n, p in self._params.items() if p.requires_grad and n not in in_blocks]
        for param in self._params.values():
            param.requires_grad_(False)
            param.grad = None
        for group in optimizer.param_groups:
            group["params"] = []
        optimizer.state = defaultdict(dict)
        self._disabled_input_grad_hooks = []
        if self.active_input_requires_grad is not False and self._wants_input_grad():
            # transformers' gradient checkpointing makes the embedding output require grad, so backward would run
            # through every frozen layer below the active block; our hook on the active block's input suffices
            for sub in module.modules():
                disable = getattr(sub, "disable_input_require_grads", None)
                if getattr(sub, "_require_grads_hooks", None) and callable(disable):
                    disable()
                    self._disabled_input_grad_hooks.append(sub)
        self._ready = True
        sizes = [sum(self._params[n].numel() for n in b.param_names) for b in self._blocks]
        explicit = self.block_prefixes is not None or self.block_regexes is not None
        rank_zero_info(
            f"BAdam: {len(self._blocks)} blocks of {min(sizes):,}-{max(sizes):,} parameters"
            + (f"; {len(outside)} parameters outside every block stay frozen (e.g. {outside[0]!r})" if outside else "")
        )
        if outside and explicit:
            # the automatic blocks leave the embedding, head and final norm out by design; explicit ones by mistake
            rank_zero_warn(
                f"BAdam: {len(outside)} trainable parameters are in none of the blocks given by block_prefixes / "
                f"block_regexes and stay frozen for the whole run: {_first_names(outside)}. Add them to a block to "
                "train them, or set requires_grad=False on them to say that they are frozen on purpose."
            )
        _warn_if_compiled(module, len(self._blocks))

    def _badam_grads_to_masters(self) -> None:
        for name, master in self._masters.items():
            param = self._params[name]
            if master is param or param.grad is None:
                continue
            grad = param.grad
            param.grad = None
            if master.grad is None:
                master.grad = grad.to(dtype=torch.float32)
            else:
                master.grad.add_(grad)

    @torch.no_grad()
    def _badam_masters_to_weights(self) -> None:
        pairs = [(self._params[n], m) for n, m in self._masters.items() if m is not self._params[n]]
        if not pairs:
            return
        if not self._badam_all_finite([m for _, m in pairs]):
            # never let a NaN reach the half weights: they still hold the last finite update
            raise RuntimeError(
                "BAdam: the optimizer produced inf/NaN master weights from finite gradients, so the half-precision "
                "weights were not updated. Lower the learning rate or check the optimizer's settings (eps, weight "
                "decay), then resume from the last checkpoint."
            )
        for param, master in pairs:
            param.copy_(master)

    def _update_input_hooks(self) -> None:
        for handle in self._input_hooks:
            handle.remove()
        self._input_hooks = []
        if self._active is None or not self._wants_input_grad():
            return
        module = self.lightning_module
        assert module is not None
        paths = [path for i in self._active_set for path in self._blocks[i].module_paths]
        for path in dict.fromkeys(paths):
            sub = module.get_submodule(path)
            self._input_hooks.append(sub.register_forward_pre_hook(_make_input_require_grad, with_kwargs=True))

    def _wants_input_grad(self) -> bool:
        if self.active_input_requires_grad is not None:
            return self.active_input_requires_grad
        module = self.lightning_module
        assert module is not None
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

    def _badam_teardown(self) -> None:
        self._partitioned = False  # the blocks stay readable; the next fit partitions again
        for handle in self._input_hooks:
            handle.remove()
        self._input_hooks = []
        if not self._ready:
            return
        # The active block's masters and optimizer state stay (on the CPU, like the model after fit), so that
        # `trainer.save_checkpoint(...)` after fit writes the same resumable state as a checkpoint at the last step.
        with torch.no_grad():
            for name, master in self._masters.items():
                if master is not self._params[name]:
                    master.data = master.data.cpu()
                    if master.grad is not None:
                        master.grad = master.grad.cpu()
        for name, param in self._params.items():
            param.requires_grad_(self._original_requires_grad.get(name, True))
        for sub in self._disabled_input_grad_hooks:
            sub.enable_input_require_grads()  # type: ignore[operator]
        self._disabled_input_grad_hooks = []

    # ------------------------------------------------------------------------------------------ strategy hooks
    @override
    def setup_environment(self) -> None:
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
        self._badam_grads_to_masters()

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        def closure_then_hook() -> Any:
            self._step_skipped = False
            result = closure()
            self._badam_after_closure()
            if not isinstance(self.precision_plugin, MasterGradScalerPrecision):
                # the fp16 loss scaler skips non-finite steps itself (and lowers its scale)
                self._badam_skip_nonfinite()
            return result

        output = super().optimizer_step(optimizer, closure_then_hook, model, **kwargs)
        self._badam_masters_to_weights()
        return output

    def _badam_all_finite(self, tensors: Sequence[Tensor]) -> bool:
        """Whether every tensor is finite (on every rank, for strategies whose tensors are shards)."""
        return bool(torch.stack([t.isfinite().all() for t in tensors]).all())

    def _badam_like(self, tensor: Tensor, like: Tensor) -> Tensor:
        """``tensor`` (as saved in a checkpoint) in the layout of ``like`` (sharding strategies re-shard it)."""
        return tensor

    def _badam_skip_nonfinite(self) -> None:
        grads = [m.grad for m in self._masters.values() if m.grad is not None]
        if not grads or self._badam_all_finite(grads):
            self._nonfinite_in_a_row = 0
            return
        # optimizers skip parameters without a gradient: this step changes no weight, master or optimizer state
        for master in self._masters.values():
            master.grad = None
        self._step_skipped = True
        self._nonfinite_in_a_row += 1
        module = self.lightning_module
        step = module.trainer.global_step if module is not None and module._trainer is not None else "?"
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
            state = self._badam_full_groups(state)
            state[_CKPT_KEY] = {**self._badam_state(), "optimizer_groups": "full"}
        return state

    def _badam_full_groups(self, compact: Mapping[str, Any]) -> dict[str, Any]:
        """The optimizer's state dict with every param group listing every parameter it was configured with (state for
        the active ones), as a plain optimizer over the whole module saves it: a plain strategy can resume from it
        (continue with full AdamW) and BAdam maps it back to the active masters on load."""
        full_index = {n: i for i, n in enumerate(n for members in self._group_members for n in members)}
        active = [n for members in self._group_members for n in members if n in self._masters]
        groups = [
            {**group, "params": [full_index[n] for n in members]}
            for group, members in zip(compact["param_groups"], self._group_members, strict=True)
        ]
        # torch numbers the parameters of the re-pointed groups (the active masters) 0, 1, ... in group order
        state = {full_index[active[i]]: value for i, value in compact["state"].items()}
        return {**compact, "state": state, "param_groups": groups}

    def _badam_compact_groups(self, full: Mapping[str, Any]) -> dict[str, Any]:
        """The inverse of :meth:`_badam_full_groups`, once the saved block is active again."""
        saved_groups = full["param_groups"]
        if len(saved_groups) != len(self._group_members) or any(
            len(g["params"]) != len(m) for g, m in zip(saved_groups, self._group_members, strict=True)
        ):
            raise MisconfigurationException(
                "The checkpoint's optimizer has other param groups than configure_optimizers returns now (sizes "
                f"{[len(g['params']) for g in saved_groups]} in the checkpoint, "
                f"{[len(m) for m in self._group_members]} now). Resume with the optimizer the checkpoint was written "
                "with, or start a new run from its weights only."
            )
        name_of = {
            saved: name
            for group, members in zip(saved_groups, self._group_members, strict=True)
            for saved, name in zip(group["params"], members, strict=True)
        }
        active = [n for members in self._group_members for n in members if n in self._masters]
        compact_index = {n: i for i, n in enumerate(active)}
        groups, start = [], 0
        for group, members in zip(saved_groups, self._group_members, strict=True):
            count = sum(n in self._masters for n in members)
            groups.append({**group, "params": list(range(start, start + count))})
            start += count
        state = {}
        for saved, value in full["state"].items():
            name = name_of[saved]
            if name not in compact_index:
                raise MisconfigurationException(
                    f"The checkpoint holds optimizer state for {name!r}, which is not in the active block(s) "
                    f"{[self._blocks[i].name for i in self._active_set]!r}: it was written by another run."
                )
            state[compact_index[name]] = value
        return {**full, "state": state, "param_groups": groups}

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
        self._badam_load_state(badam)
        if badam.get("optimizer_groups") == "full":  # older checkpoints saved the active masters' groups only
            first = self._badam_compact_groups(first)
        super().load_optimizer_state_dict({**checkpoint, "optimizer_states": [first, *states[1:]]})

    @override
    def teardown(self) -> None:
        self._badam_teardown()
        super().teardown()

    # --------------------------------------------------------------------------------------------- checkpointing
    def _badam_state(self) -> dict[str, Any]:
        masters = {n: m.detach().clone() for n, m in self._masters.items() if m is not self._params[n]}
        state: dict[str, Any] = {
            "format": _CKPT_FORMAT,
            "block_names": [b.name for b in self._blocks],
            "active_block": self._active,
            # a set of blocks (BlockSwitch's budget); checkpoints without this key hold one block
            "active_blocks": list(self._active_set),
            "masters": masters,
        }
        if self.keep_optimizer_state:
            state["stash"] = {n: dict(s) for n, s in self._stash.items()}
        return state

    def _badam_load_state(self, state: Mapping[str, Any]) -> None:
        names = [b.name for b in self._blocks]
        saved = [str(n) for n in state.get("block_names", [])]
        if saved != names:
            if len(saved) != len(names):
                difference = f"the checkpoint has {len(saved)} blocks, this run {len(names)}"
            else:
                i = next(i for i, (a, b) in enumerate(zip(saved, names, strict=True)) if a != b)
                difference = (
                    f"{len(names)} blocks in both, but block {i} is {saved[i]!r} in the checkpoint and {names[i]!r} now"
                )
            raise MisconfigurationException(
                f"The checkpoint was written with another BAdam block layout ({difference}). Resume with the same "
                "block_prefixes / block_regexes / include_embedding / include_lm_head / granularity / "
                "layers_per_block, or start a new run from the checkpoint's weights only."
            )
        active = state.get("active_block")
        active_set = tuple(int(i) for i in state.get("active_blocks", [] if active is None else [active]))
        if active_set and active_set != self._active_set:
            self.activate(active_set)
        with torch.no_grad():
            for name, tensor in state.get("masters", {}).items():
                if name not in self._masters:
                    raise MisconfigurationException(
                        f"The checkpoint holds a master weight for {name!r}, which is not in the active block(s) "
                        f"{[self._blocks[i].name for i in self._active_set]!r}."
                    )
                self._masters[name].copy_(self._badam_like(tensor, self._masters[name]))
        self._stash = {n: dict(s) for n, s in state.get("stash", {}).items()}


def _first_names(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _compiled_parts(module: nn.Module) -> list[str]:
    """Where ``module`` is compiled: ``trainer.fit(torch.compile(model))``, ``torch.compile(submodule)`` or
    ``submodule.compile()``."""
    dynamo = sys.modules.get("torch._dynamo")  # torch.compile imports it: without it nothing can be compiled
    if dynamo is None:
        return []
    found = []
    if getattr(module, "_compiler_ctx", None) is not None:  # Lightning unwraps a compiled LightningModule in fit()
        found.append("the LightningModule")
    for name, sub in module.named_modules():
        if isinstance(sub, dynamo.OptimizedModule) or getattr(sub, "_compiled_call_impl", None) is not None:
            found.append(repr(name) if name else "the LightningModule")
    return list(dict.fromkeys(found))


def _warn_if_compiled(module: nn.Module, num_blocks: int) -> None:
    parts = _compiled_parts(module)
    if not parts:
        return
    config = sys.modules["torch._dynamo"].config
    # torch 2.6 renamed cache_size_limit to recompile_limit
    setting = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    limit = getattr(config, setting, "?")
    rank_zero_warn(
        f"BAdam: {', '.join(parts[:3])}{f' and {len(parts) - 3} more modules' if len(parts) > 3 else ''} "
        f"{'is' if len(parts) == 1 else 'are'} compiled with torch.compile. Each block switch changes which "
        "parameters require grad, which the compiled graph guards on, so torch.compile recompiles the first time "
        f"each of the {num_blocks} blocks becomes active, and once it holds torch._dynamo.config.{setting} ({limit}) "
        "versions it runs uncompiled. BAdam's memory saving does not need compilation: remove torch.compile, or set "
        f"torch._dynamo.config.{setting} to at least the number of blocks ({num_blocks}) so that each block's graph "
        "is compiled once and reused."
    )


def _make_input_require_grad(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    if not torch.is_grad_enabled():
        return None
    if args and isinstance(args[0], Tensor) and args[0].is_floating_point() and not args[0].requires_grad:
        return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
    hidden = kwargs.get("hidden_states")
    if isinstance(hidden, Tensor) and hidden.is_floating_point() and not hidden.requires_grad:
        return args, {**kwargs, "hidden_states": hidden.detach().requires_grad_(True)}
    return None


class BAdamStrategy(BlockCoordinateMixin, SingleDeviceStrategy):
    """BAdam on one device: half-precision weights, FP32 masters and optimizer state for the active block only.

    Use ``precision="bf16-true"`` (or ``"16-true"``, with loss scaling on the FP32 master gradients, or ``"32-true"``).
    The optimizer from ``configure_optimizers`` (or LightningCLI's ``optimizer:``) is kept, with its param groups and
    hyper-parameters; its state is reset at every block switch, as in the paper, unless ``keep_optimizer_state``.
    Without a :class:`~lightning_memopt.BlockSwitch` callback a default one (every 100 steps, random order) is added.

    Args:
        block_prefixes: explicit blocks, one entry per block: a dotted name prefix or a list of prefixes.
            ``None`` finds the repeated layers and makes one block per layer.
        block_regexes: explicit blocks as regular expressions (``re.search`` on parameter names), one per block.
        include_embedding: with automatic blocks, also train the embeddings as a block of their own.
        include_lm_head: with automatic blocks, also train the output head and the final norm (a tied head through
            its shared weight) as a last block.
        granularity: with automatic blocks, ``"layer"`` (one block per repeated layer), ``"module"`` (per attention,
            MLP, norm of each layer) or ``"matrix"`` (per parameter tensor); see
            :func:`lightning_memopt.blocks.partition`. Finer blocks pair with ``BlockSwitch(order="importance",
            budget=...)``, which activates several at a time.
        layers_per_block: with automatic blocks, blocks of this many consecutive layers (see
            :func:`lightning_memopt.blocks.partition`): more of the model trains per step, for proportionally more
            FP32 state.
        keep_optimizer_state: keep each block's optimizer state across switches (costs its memory for every visited
            block; the paper resets it).
        active_input_requires_grad: make the active block's input require grad, which reentrant gradient checkpointing
            needs to reach the block. ``None`` turns it on when a module has ``gradient_checkpointing=True``.
        max_nonfinite_steps: with ``bf16-true``/``32-true``, a step whose gradients hold inf/NaN is skipped with a
            warning; this many in a row stop the run with an error. (``16-true``'s loss scaler skips such steps and
            lowers its scale instead.)
        device: the device to train on; by default the one the Trainer's accelerator picked.
        checkpoint_io: how checkpoint files are written; by default
            :class:`~lightning_memopt.checkpoint_io.AtomicCheckpointIO`, which never leaves a half-written file.

    Example::

        from lightning.pytorch import Trainer
        from lightning_memopt import BAdamStrategy, BlockSwitch

        trainer = Trainer(strategy=BAdamStrategy(), precision="bf16-true",
                          callbacks=[BlockSwitch(every=100, order="random")])
        trainer.fit(model)
    """

    strategy_name = "badam"
    strategy_description = "BAdam block coordinate descent, one device"

    def __init__(
        self,
        block_prefixes: Sequence[str | Sequence[str]] | None = None,
        block_regexes: Sequence[str] | None = None,
        include_embedding: bool = False,
        include_lm_head: bool = False,
        granularity: Granularity = "layer",
        layers_per_block: int = 1,
        keep_optimizer_state: bool = False,
        active_input_requires_grad: bool | None = None,
        max_nonfinite_steps: int = 5,
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
        self._badam_init(
            block_prefixes,
            block_regexes,
            include_embedding,
            include_lm_head,
            keep_optimizer_state,
            active_input_requires_grad,
            max_nonfinite_steps,
            granularity=granularity,
            layers_per_block=layers_per_block,
        )

    @override
    def setup_environment(self) -> None:
        if not self._device_given:
            self._root_device = _device_from_trainer(self)
        super().setup_environment()


def block_strategy(trainer: Trainer) -> BlockCoordinateMixin | None:
    """The BAdam strategy ``trainer`` runs (``badam``, ``badam_ddp``, ``badam_fsdp``), or ``None`` for any other: how
    callbacks find the block protocol (:attr:`~BlockCoordinateMixin.blocks`, ``active_blocks``, ``master_params``,
    ``step_skipped``, ``register_activation_hook``).

    Example::

        strategy = block_strategy(trainer)
        if strategy is not None:
            print("training", [strategy.blocks[i].name for i in strategy.active_blocks])
    """
    strategy = trainer.strategy
    return strategy if isinstance(strategy, BlockCoordinateMixin) else None


def _trainer_of(strategy: Any) -> Trainer:
    module = strategy.lightning_module
    if module is None or module._trainer is None:
        raise RuntimeError("The strategy is not attached to a Trainer yet.")
    return module._trainer


def _device_from_trainer(strategy: Any) -> torch.device:
    # Lightning #18902: a SingleDeviceStrategy built without `device` would stay on CPU even when the accelerator is a
    # GPU, so take the device the accelerator connector resolved from `devices=`.
    trainer = _trainer_of(strategy)
    devices = getattr(trainer._accelerator_connector, "_parallel_devices", None) or []
    if len(devices) > 1:
        raise MisconfigurationException(
            f"BAdamStrategy trains on one device but the Trainer was given {len(devices)} devices. "
            "Use strategy='badam_ddp' for several devices, or devices=1."
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
    rank_zero_info(
        f"BAdam: no BlockSwitch callback was given, so the default {default!r} decides block switches. "
        "Add lightning_memopt.BlockSwitch(...) to the Trainer's callbacks to choose the schedule."
    )
