"""The block engine: BAdam's bookkeeping, without Lightning.

A :class:`BlockEngine` owns, for one module and one optimizer, everything block coordinate descent changes: which
blocks are active, their FP32 masters (FP32 weights are their own), the optimizer's param groups re-pointed at those
masters, the stashed optimizer state of inactive blocks (``keep_optimizer_state``), the hooks that make the active
block's input require grad, and the engine's part of a checkpoint. The BAdam strategies
(:mod:`lightning_memopt.strategies`) are thin adapters that call it from Lightning's hooks;
:class:`ShardedBlockEngine` overrides only what FSDP2 sharding changes (the FP32 gradient's conversion, a finiteness
check all ranks agree on, re-sharding of saved tensors).

One optimizer step, in order (``docs/concepts.md`` has the same list with the callbacks' parts):

1. a block switch, if ``BlockSwitch`` decides one: :meth:`BlockEngine.activate` drops (or stashes) the old masters
   and state, makes FP32 masters from the new blocks' half weights and re-points the param groups at them;
2. forward and backward of each micro-batch; gradients reach only the active blocks' half weights (nothing else
   requires grad), and after each backward :meth:`BlockEngine.grads_to_masters` moves them into FP32 master
   gradients (summed over micro-batches in FP32), freeing the half gradients;
3. after the last micro-batch, data parallel strategies all-reduce the master gradients, then a non-finite gradient
   (:meth:`BlockEngine.master_grads_finite`) skips the step in ``bf16-true``/``32-true`` (``16-true``'s loss scaler
   unscales, checks and skips itself);
4. the user's optimizer steps the masters (``on_before_optimizer_step``, clipping and the update transforms run on
   the master gradients before it);
5. :meth:`BlockEngine.masters_to_weights` copies the masters into the half weights, refusing inf/NaN.

Example::

    engine = BlockEngine(model, partition(model), torch.optim.AdamW(model.parameters()))
    engine.activate((0,))
    loss = model(x).sum()
    loss.backward()
    engine.grads_to_masters()
    engine.optimizer.step()
    engine.masters_to_weights()
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_memopt.blocks import Block
from lightning_memopt.compat import disable_input_grad_hooks, enable_input_grad_hooks, nonfinite_flag
from lightning_memopt.optimizers import step_one_tensor

__all__ = ["BlockEngine", "BlockEngineError", "ShardedBlockEngine", "needs_master"]

CHECKPOINT_FORMAT = 1


class BlockEngineError(ValueError):
    """A model, optimizer or checkpoint the engine cannot work with; the message names the fix.

    Example::

        >>> from lightning_memopt.engine import BlockEngineError
        >>> try:
        ...     raise BlockEngineError("the optimizer holds no parameter of the model: build it from the model")
        ... except BlockEngineError as error:  # strategies raise it at setup, before any step
        ...     print(str(error).split(":")[0])
        the optimizer holds no parameter of the model
    """


def needs_master(param: Tensor) -> bool:
    """Whether ``param`` gets a separate FP32 master: FP32/FP64 weights are their own masters (no copy, and 32-true
    BAdam equals the plain optimizer exactly).

    Example::

        >>> needs_master(torch.zeros(2, dtype=torch.bfloat16)), needs_master(torch.zeros(2))
        (True, False)
    """
    return param.dtype not in (torch.float32, torch.float64)


class BlockEngine:
    """The active blocks of ``module``, their FP32 masters and the optimizer pointed at them.

    On construction every parameter is frozen (``requires_grad=False``) and the optimizer's param groups are emptied;
    the param groups keep their hyper-parameters, and :attr:`group_members` remembers which parameters each was
    configured with. Nothing trains until :meth:`activate`.

    Args:
        module: the model whose parameters the blocks name.
        blocks: the partition (see :func:`lightning_memopt.blocks.partition`).
        optimizer: the user's optimizer over (some of) ``module``'s parameters; it is kept and re-pointed.
        keep_optimizer_state: stash a block's optimizer state when it is deactivated and restore it when it is
            activated again (the paper resets it).
        input_requires_grad: make each active block's input require grad (reentrant gradient checkpointing needs it
            to reach the block); transformers' own input-grad hooks, which would run backward through every frozen
            layer below, are disabled meanwhile.
        fused_update: step each active master during backward, as soon as its half weight's gradient is complete
            (a post-accumulate-grad hook), and copy it back at once: no FP32 gradient buffer for the block exists.
            Needs :attr:`step_in_backward` set while the step's backward runs.

    Example::

        engine = BlockEngine(model, partition(model), torch.optim.SGD(model.parameters(), lr=0.1))
        engine.activate((1,))
        sorted(engine.masters)  # the names of block 1's parameters
    """

    sharded = False
    r"""Whether parameters, masters and their gradients are shards (``DTensor``\ s) on each rank."""

    def __init__(
        self,
        module: nn.Module,
        blocks: Sequence[Block],
        optimizer: Optimizer,
        *,
        keep_optimizer_state: bool = False,
        input_requires_grad: bool = False,
        fused_update: bool = False,
    ) -> None:
        self.module = module
        self.fused_update = fused_update
        self.blocks = list(blocks)
        self.optimizer = optimizer
        self.keep_optimizer_state = keep_optimizer_state
        self.input_requires_grad = input_requires_grad
        self.params: dict[str, nn.Parameter] = dict(module.named_parameters())
        self.masters: dict[str, nn.Parameter] = {}
        """The active blocks' FP32 masters by parameter name (FP32 weights are their own)."""
        self.stash: dict[str, dict[str, Any]] = {}
        self.active: tuple[int, ...] = ()
        """Indices of the active blocks, ascending; empty before the first activation."""
        self.on_activate: Callable[[int], None] | None = None
        """Called with the lowest active index after every activation (the strategies run their hooks here)."""
        self._original_requires_grad = {n: p.requires_grad for n, p in self.params.items()}
        self._input_hooks: list[RemovableHandle] = []
        self._disabled_input_grad_hooks: list[nn.Module] = []
        self._fused_hooks: list[RemovableHandle] = []
        self.step_in_backward: Callable[[], Any] | None = None
        """With ``fused_update``: the optimizer's own ``step`` while a step's backward runs (the strategy sets it)."""
        self.reduce_grad: Callable[[Tensor], None] | None = None
        """With ``fused_update``: averages one FP32 master gradient over the ranks before it is stepped (DDP)."""
        self.skipped: list[str] = []
        """With ``fused_update``: the parameters whose inf/NaN gradient skipped their update in this step."""
        self.group_members = self._group_members()
        self._group_index = {n: i for i, members in enumerate(self.group_members) for n in members}
        self._name_of = {id(p): n for n, p in self.params.items()}
        """For each param group, the names of the parameters it was configured with (active or not)."""
        in_optimizer = {n for members in self.group_members for n in members}
        in_blocks = {n for b in self.blocks for n in b.param_names}
        not_optimized = [n for n in in_blocks if n not in in_optimizer]
        if not_optimized:
            raise BlockEngineError(
                f"{len(not_optimized)} parameters of the BAdam blocks are not in the optimizer (e.g. "
                f"{not_optimized[0]!r}). Pass every parameter you want to train to the optimizer, or restrict the "
                "blocks with block_prefixes=[...]."
            )
        self.frozen_outside = [n for n, p in self.params.items() if p.requires_grad and n not in in_blocks]
        """Parameters that required grad but are in no block: they stay frozen."""
        for param in self.params.values():
            param.requires_grad_(False)
            param.grad = None
        # state an optimizer creates at construction, before any step (FLORA's per-parameter random seeds): each
        # new master starts from its parameter's, as the optimizer over the whole model would
        self.initial_state: dict[str, dict[str, Any]] = {
            self._name_of[id(p)]: dict(s) for p, s in optimizer.state.items() if s and id(p) in self._name_of
        }
        for group in optimizer.param_groups:
            group["params"] = []
        optimizer.state = defaultdict(dict)
        if input_requires_grad:
            # transformers' gradient checkpointing makes the embedding output require grad, so backward would run
            # through every frozen layer below the active block; the hook on the active block's input suffices
            self._disabled_input_grad_hooks = disable_input_grad_hooks(module)

    def _group_members(self) -> list[list[str]]:
        names_by_id = {id(p): n for n, p in self.params.items()}
        members_of_groups = []
        for i, group in enumerate(self.optimizer.param_groups):
            members = []
            for p in group["params"]:
                if id(p) not in names_by_id:
                    raise BlockEngineError(
                        f"Param group {i} of {type(self.optimizer).__name__} holds a tensor of shape {tuple(p.shape)} "
                        "that is not a parameter of the LightningModule. BAdam can only train the module's own "
                        "parameters: build the optimizer from self.parameters() or self.named_parameters()."
                    )
                members.append(names_by_id[id(p)])
            members_of_groups.append(members)
        return members_of_groups

    # ------------------------------------------------------------------------------------------- activation
    def activate(self, indices: Sequence[int]) -> bool:
        """Make ``indices`` the trainable blocks; ``False`` (and nothing done) when they already are.

        The previous blocks' masters and optimizer state are dropped (or stashed), FP32 masters are made from the new
        blocks' half weights, the param groups are re-pointed at them and only their weights require grad.
        """
        chosen = tuple(sorted(set(indices)))
        if not chosen:
            raise ValueError("activate() needs at least one block index.")
        for i in chosen:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.blocks):
                raise IndexError(f"Block index {i!r} is out of range: the model has {len(self.blocks)} blocks.")
        if chosen == self.active:
            return False
        if self.active:
            self.deactivate()
        for name in (n for i in chosen for n in self.blocks[i].param_names):
            param = self.params[name]
            param.grad = None
            param.requires_grad_(True)
            if needs_master(param):
                self.masters[name] = nn.Parameter(param.detach().to(dtype=torch.float32, copy=True))
            else:
                self.masters[name] = param
        for group, members in zip(self.optimizer.param_groups, self.group_members, strict=True):
            group["params"] = [self.masters[n] for n in members if n in self.masters]
        for name, master in self.masters.items():
            if name in self.initial_state:
                self.optimizer.state[master] = copy.deepcopy(self.initial_state[name])
        if self.keep_optimizer_state:
            for name, master in self.masters.items():
                if name in self.stash:
                    self.optimizer.state[master] = {
                        k: self.like(v, master) if isinstance(v, Tensor) and v.shape == master.shape else v
                        for k, v in self.stash.pop(name).items()
                    }
        self.active = chosen
        self._update_input_hooks()
        if self.fused_update:
            for name in self.masters:
                self._fused_hooks.append(self.params[name].register_post_accumulate_grad_hook(self._step_in_backward))
        if self.on_activate is not None:
            self.on_activate(chosen[0])
        return True

    def deactivate(self) -> None:
        """Drop the active masters and optimizer state (stash the state with ``keep_optimizer_state``); freeze."""
        optimizer = self.optimizer
        if self.keep_optimizer_state:
            for name, master in self.masters.items():
                if master in optimizer.state:
                    self.stash[name] = optimizer.state[master]
        # a fresh state dict: leftover keys of dropped masters would keep them alive and break state_dict()
        optimizer.state = defaultdict(dict)
        for handle in self._fused_hooks:
            handle.remove()
        self._fused_hooks = []
        for name in self.masters:
            param = self.params[name]
            param.grad = None
            param.requires_grad_(False)
        self.masters.clear()
        for group in optimizer.param_groups:
            group["params"] = []
        self.active = ()

    def _update_input_hooks(self) -> None:
        for handle in self._input_hooks:
            handle.remove()
        self._input_hooks = []
        if not self.active or not self.input_requires_grad:
            return
        paths = [path for i in self.active for path in self.blocks[i].module_paths]
        for path in dict.fromkeys(paths):
            sub = self.module.get_submodule(path)
            self._input_hooks.append(sub.register_forward_pre_hook(_make_input_require_grad, with_kwargs=True))

    # ----------------------------------------------------------------------------------------- one step
    def grads_to_masters(self) -> None:
        """Move the active half weights' gradients into FP32 master gradients (summed over micro-batches)."""
        for name, master in self.masters.items():
            param = self.params[name]
            grad = param.grad
            if master is param or grad is None:
                continue
            param.grad = None
            grad = self.fp32_grad(grad, param)
            if master.grad is None:
                master.grad = grad
            else:
                master.grad.add_(grad)

    @torch.no_grad()
    def _step_in_backward(self, param: Tensor) -> None:
        # fused_update: this half weight's gradient is complete; step its master now and free both gradients
        if self.step_in_backward is None or param.grad is None:
            return  # a backward outside an optimizer step: grads_to_masters takes the gradient as usual
        name = self._name_of[id(param)]
        master = self.masters[name]
        grad = param.grad
        if master is not param:
            param.grad = None
            master.grad = self.fp32_grad(grad, param)
        if self.reduce_grad is not None:
            self.reduce_grad(master.grad)  # type: ignore[arg-type]
        if not self.all_finite([master.grad]):  # type: ignore[list-item]
            self.skipped.append(name)
            master.grad = None
            return
        step_one_tensor(self.step_in_backward, self.optimizer, master, self._group_index[name])
        master.grad = None
        if master is not param:
            if not self.all_finite([master]):
                raise RuntimeError(
                    f"BAdam: the optimizer produced inf/NaN master weights for {name!r} from finite gradients, so "
                    "its half-precision weight was not updated. Lower the learning rate or check the optimizer's "
                    "settings (eps, weight decay), then resume from the last checkpoint."
                )
            param.copy_(master)

    def fp32_grad(self, grad: Tensor, param: Tensor) -> Tensor:
        """``grad`` of the half weight ``param`` as an FP32 master gradient."""
        return grad.to(dtype=torch.float32)

    def master_grads_finite(self) -> bool:
        """Whether every master gradient is finite (on every rank, for sharded engines); ``True`` without any."""
        grads = [m.grad for m in self.masters.values() if m.grad is not None]
        return not grads or self.all_finite(grads)

    def drop_master_grads(self) -> None:
        """Forget the master gradients: optimizers skip parameters without one, so the step changes nothing."""
        for master in self.masters.values():
            master.grad = None

    @torch.no_grad()
    def masters_to_weights(self) -> None:
        """Copy the stepped masters into the half weights, or raise (weights untouched) if a master is inf/NaN."""
        pairs = [(self.params[n], m) for n, m in self.masters.items() if m is not self.params[n]]
        if not pairs:
            return
        if not self.all_finite([m for _, m in pairs]):
            # never let a NaN reach the half weights: they still hold the last finite update
            raise RuntimeError(
                "BAdam: the optimizer produced inf/NaN master weights from finite gradients, so the half-precision "
                "weights were not updated. Lower the learning rate or check the optimizer's settings (eps, weight "
                "decay), then resume from the last checkpoint."
            )
        for param, master in pairs:
            param.copy_(master)

    def all_finite(self, tensors: Sequence[Tensor]) -> bool:
        """Whether every tensor is finite (on every rank, for sharded engines)."""
        return not bool(nonfinite_flag(tensors).item())

    def like(self, tensor: Tensor, like: Tensor) -> Tensor:
        """``tensor`` (as saved in a checkpoint) in the layout of ``like`` (sharded engines re-shard it)."""
        return tensor

    # ------------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The engine's part of a checkpoint: block names, the active set, their masters (and the stash)."""
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "block_names": [b.name for b in self.blocks],
            "active_block": self.active[0] if self.active else None,
            # a set of blocks (BlockSwitch's budget); checkpoints without this key hold one block
            "active_blocks": list(self.active),
            "masters": {n: m.detach().clone() for n, m in self.masters.items() if m is not self.params[n]},
        }
        if self.keep_optimizer_state:
            state["stash"] = {n: dict(s) for n, s in self.stash.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Activate the saved blocks and restore their masters (and the stash); the layout must be this one's."""
        names = [b.name for b in self.blocks]
        saved = [str(n) for n in state.get("block_names", [])]
        if saved != names:
            if len(saved) != len(names):
                difference = f"the checkpoint has {len(saved)} blocks, this run {len(names)}"
            else:
                i = next(i for i, (a, b) in enumerate(zip(saved, names, strict=True)) if a != b)
                difference = (
                    f"{len(names)} blocks in both, but block {i} is {saved[i]!r} in the checkpoint and {names[i]!r} now"
                )
            raise BlockEngineError(
                f"The checkpoint was written with another BAdam block layout ({difference}). Resume with the same "
                "block_prefixes / block_regexes / include_embedding / include_lm_head / granularity / "
                "layers_per_block, or start a new run from the checkpoint's weights only."
            )
        active = state.get("active_block")
        active_set = tuple(int(i) for i in state.get("active_blocks", [] if active is None else [active]))
        if active_set:
            self.activate(active_set)
        with torch.no_grad():
            for name, tensor in state.get("masters", {}).items():
                if name not in self.masters:
                    raise BlockEngineError(
                        f"The checkpoint holds a master weight for {name!r}, which is not in the active block(s) "
                        f"{self.active_names()!r}."
                    )
                self.masters[name].copy_(self.like(tensor, self.masters[name]))
        self.stash = {n: dict(s) for n, s in state.get("stash", {}).items()}

    def active_names(self) -> list[str]:
        """The names of the active blocks."""
        return [self.blocks[i].name for i in self.active]

    def full_groups(self, compact: Mapping[str, Any]) -> dict[str, Any]:
        """The optimizer's state dict with every param group listing every parameter it was configured with (state for
        the active ones), as a plain optimizer over the whole module saves it: a plain strategy can resume from it
        (continue with full AdamW) and :meth:`compact_groups` maps it back to the active masters."""
        order = [n for members in self.group_members for n in members]
        full_index = {n: i for i, n in enumerate(order)}
        active = [n for n in order if n in self.masters]
        groups = [
            {**group, "params": [full_index[n] for n in members]}
            for group, members in zip(compact["param_groups"], self.group_members, strict=True)
        ]
        # torch numbers the parameters of the re-pointed groups (the active masters) 0, 1, ... in group order
        state = {full_index[active[i]]: value for i, value in compact["state"].items()}
        return {**compact, "state": state, "param_groups": groups}

    def compact_groups(self, full: Mapping[str, Any]) -> dict[str, Any]:
        """The inverse of :meth:`full_groups`, once the saved blocks are active again."""
        saved_groups = full["param_groups"]
        if len(saved_groups) != len(self.group_members) or any(
            len(g["params"]) != len(m) for g, m in zip(saved_groups, self.group_members, strict=True)
        ):
            raise BlockEngineError(
                "The checkpoint's optimizer has other param groups than configure_optimizers returns now (sizes "
                f"{[len(g['params']) for g in saved_groups]} in the checkpoint, "
                f"{[len(m) for m in self.group_members]} now). Resume with the optimizer the checkpoint was written "
                "with, or start a new run from its weights only."
            )
        name_of = {
            saved: name
            for group, members in zip(saved_groups, self.group_members, strict=True)
            for saved, name in zip(group["params"], members, strict=True)
        }
        active = [n for members in self.group_members for n in members if n in self.masters]
        compact_index = {n: i for i, n in enumerate(active)}
        groups, start = [], 0
        for group, members in zip(saved_groups, self.group_members, strict=True):
            count = sum(n in self.masters for n in members)
            groups.append({**group, "params": list(range(start, start + count))})
            start += count
        state = {}
        for saved, value in full["state"].items():
            name = name_of[saved]
            if name not in compact_index:
                raise BlockEngineError(
                    f"The checkpoint holds optimizer state for {name!r}, which is not in the active block(s) "
                    f"{self.active_names()!r}: it was written by another run."
                )
            state[compact_index[name]] = value
        return {**full, "state": state, "param_groups": groups}

    # --------------------------------------------------------------------------------------------- release
    def release(self) -> None:
        """End of a fit: remove the input hooks, restore ``requires_grad`` and move the masters to the CPU.

        The active masters and optimizer state stay (on the CPU, like the model after fit), so a checkpoint written
        after fit holds the same resumable state as one written at the last step.
        """
        for handle in [*self._input_hooks, *self._fused_hooks]:
            handle.remove()
        self._input_hooks = []
        self._fused_hooks = []
        with torch.no_grad():
            for name, master in self.masters.items():
                if master is not self.params[name]:
                    master.data = master.data.cpu()
                    if master.grad is not None:
                        master.grad = master.grad.cpu()
        for name, param in self.params.items():
            param.requires_grad_(self._original_requires_grad.get(name, True))
        enable_input_grad_hooks(self._disabled_input_grad_hooks)
        self._disabled_input_grad_hooks = []


class ShardedBlockEngine(BlockEngine):
    """:class:`BlockEngine` for FSDP2-sharded modules: parameters, masters and gradients are ``DTensor`` shards.

    What sharding changes, and nothing else: the FP32-reduced gradient of a bf16 shard is rebuilt with FP32 metadata,
    finiteness is decided by all ranks together (each sees only its shards), and full tensors loaded from a
    (consolidated) checkpoint are cut into this rank's shard.

    Example::

        engine = ShardedBlockEngine(fsdp_model, blocks, optimizer)  # after fully_shard(...)
    """

    sharded = True

    def fp32_grad(self, grad: Tensor, param: Tensor) -> Tensor:
        from torch.distributed.tensor import DTensor

        if not isinstance(grad, DTensor):
            return grad.to(torch.float32)
        # the FP32-reduced gradient arrives on a bf16 parameter: rebuild it with FP32 metadata throughout
        return DTensor.from_local(
            grad.to_local().to(torch.float32),
            grad.device_mesh,
            grad.placements,
            run_check=False,
            shape=param.shape,
            stride=param.stride(),
        )

    def all_finite(self, tensors: Sequence[Tensor]) -> bool:
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        flag = nonfinite_flag([t.to_local() if isinstance(t, DTensor) else t for t in tensors])
        # every rank must take the same decision, and each sees only its shards
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return not bool(flag.item())

    def like(self, tensor: Tensor, like: Tensor) -> Tensor:
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(like, DTensor) and not isinstance(tensor, DTensor):
            # every rank loaded the same full tensor: each keeps its own shard, no communication
            full = tensor.to(device=like.device, dtype=like.dtype)
            return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
        return tensor

    def reshard_optimizer_state(self) -> None:
        """Cut the full tensors of freshly loaded optimizer state into this rank's shards: those of the parameter's
        shape, and those laid out like it along its sharded dimensions (FOAM's moments, folded along the rows)."""
        for param, param_state in self.optimizer.state.items():
            for key, value in list(param_state.items()):
                if isinstance(value, Tensor) and _sharded_like(value, param):
                    param_state[key] = self.like(value, param)


def _sharded_like(value: Tensor, param: Tensor) -> bool:
    from torch.distributed.tensor import DTensor, Shard

    if value.shape == param.shape:
        return True
    if not isinstance(param, DTensor) or value.dim() != param.dim() or value.dim() == 0:
        return False
    sharded = {p.dim % param.dim() for p in param.placements if isinstance(p, Shard)}
    return bool(sharded) and all(value.shape[d] == param.shape[d] for d in sharded)


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
