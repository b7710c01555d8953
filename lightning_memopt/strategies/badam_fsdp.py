"""BAdam on sharded models: FSDP2 (``fully_shard``) shards the half weights and the active block's FP32 state."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from typing_extensions import Unpack, override

from lightning_memopt.compat import full_tensor
from lightning_memopt.engine import ShardedBlockEngine
from lightning_memopt.optimizers import needs_whole_tensors, optimizer_name
from lightning_memopt.precision import MasterGradScalerPrecision
from lightning_memopt.strategies.badam_ddp import DistributedBlockStrategy, DistributedOptions

__all__ = ["BAdamFSDPStrategy"]


class BAdamFSDPStrategy(DistributedBlockStrategy):
    """BAdam on models too large for one GPU: every block's layer is an FSDP2 unit, so all state is sharded.

    Each block's module (one transformer layer by default) is wrapped with
    ``torch.distributed.fsdp.fully_shard`` as its own unit, and the root module with the rest. The half-precision
    weights are ``DTensor`` shards; the active block's FP32 masters, gradients and optimizer state are built from the
    local shards, so per rank memory is about ``(2M + 16M/D) / N`` for N ranks, plus one layer's all-gathered weights
    during its forward/backward. FSDP2 reduce-scatters only the gradients of parameters that require grad: the active
    block. Gradient clipping by norm uses the global norm over all shards.

    Checkpoints are *consolidated*: the model ``state_dict`` holds full tensors (gathered to rank 0's CPU one tensor at
    a time), and the active block's masters and optimizer state are gathered too, so a checkpoint loads anywhere —
    on one device, with another number of ranks, or into ``lightning-memopt export``. Resuming re-shards them.

    ``precision="16-true"`` is not supported (the loss scaler's overflow check would have to agree across shards);
    use ``bf16-true``.

    Takes every option of :class:`~lightning_memopt.strategies.badam_ddp.DistributedOptions` (the block options of
    :class:`~lightning_memopt.BAdamStrategy` and the process-group ones; rank 0 writes the consolidated checkpoint
    file) as a keyword argument; with ``granularity="module"``/``"matrix"`` the FSDP units stay whole layers, and a
    finer block is a part of its layer's unit, whose gradients alone FSDP2 reduce-scatters. And:

    Args:
        reshard_after_forward: FSDP2's option: free the gathered weights after forward (less memory, one more
            all-gather in backward).

    Example::

        from lightning.pytorch import Trainer
        from lightning_memopt import BAdamFSDPStrategy, BlockSwitch

        trainer = Trainer(accelerator="gpu", devices=8, strategy=BAdamFSDPStrategy(), precision="bf16-true",
                          callbacks=[BlockSwitch(every=100, order="random")])
    """

    strategy_name = "badam_fsdp"
    strategy_description = "BAdam block coordinate descent on FSDP2-sharded models"
    engine_class = ShardedBlockEngine

    def __init__(self, reshard_after_forward: bool = True, **options: Unpack[DistributedOptions]) -> None:
        if options.get("fused_update"):
            raise ValueError(
                "BAdamFSDPStrategy does not support fused_update=True: FSDP2 reduce-scatters a layer's gradients "
                "together after its backward. Use badam or badam_ddp for the update in backward."
            )
        super().__init__(**options)
        self.reshard_after_forward = reshard_after_forward
        self._mesh: DeviceMesh | None = None
        self._sharded_units: list[nn.Module] = []

    @override
    def _badam_check_precision(self) -> None:
        super()._badam_check_precision()
        if isinstance(self.precision_plugin, MasterGradScalerPrecision):
            raise MisconfigurationException(
                "BAdamFSDPStrategy does not support precision='16-true': the loss scaler's inf/NaN check would see "
                "only each rank's shard. Use precision='bf16-true' (no loss scaling needed)."
            )

    @override
    def setup_optimizers(self, trainer: Trainer) -> None:
        super().setup_optimizers(trainer)
        for optimizer in self.optimizers:
            reason = needs_whole_tensors(optimizer)
            if reason is not None:
                raise MisconfigurationException(
                    f"BAdamFSDPStrategy shards every master, but {optimizer_name(optimizer)} {reason}, so on a shard "
                    "it would compute something else. Use badam or badam_ddp with it, or an element-wise optimizer "
                    "(AdamW, AdamW8bit, torchao's AdamW4bit, FOAM) with badam_fsdp."
                )

    @override
    def configure_ddp(self) -> None:
        # instead of wrapping with DistributedDataParallel: start from rank 0's weights, then shard block by block
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        module = self.lightning_module
        assert module is not None
        self._mesh = init_device_mesh(self.root_device.type, (dist.get_world_size(),))
        blocks = self._partition(module)
        units: list[nn.Module] = []
        for block in blocks:
            for path in block.module_paths:
                sub = module.get_submodule(path)
                if sub is not module and all(sub is not u for u in units):
                    units.append(sub)
        # average gradients in FP32, as the other BAdam strategies do: they feed FP32 masters
        policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        # unit by unit: move to the device, take rank 0's values, shard; at most one full unit is on the device
        for unit in [*units, module]:
            # parameters of units sharded already are DTensors on the device
            plain = [t for t in [*unit.parameters(), *unit.buffers()] if not isinstance(t, DTensor)]
            self._to_device_from_rank0(plain)
            fully_shard(unit, mesh=self._mesh, reshard_after_forward=self.reshard_after_forward, mp_policy=policy)
        for param in module.parameters():
            # the reduced FP32 gradient lands on the bf16 shard as it is (it is moved into the FP32 master anyway)
            param.grad_dtype = None
        self._sharded_units = [*units, module]

    @override
    def model_to_device(self) -> None:
        # the whole model may not fit on one device: configure_ddp moves it there one FSDP unit at a time
        pass

    def _to_device_from_rank0(self, tensors: list[Tensor]) -> None:
        with torch.no_grad():
            for tensor in tensors:
                tensor.data = tensor.data.to(self.root_device)
                dist.broadcast(tensor.data, src=0)

    def _redirect(self, method: str, context: Any, *args: Any, **kwargs: Any) -> Any:
        module = self.lightning_module
        assert module is not None
        with context:
            if self._sharded_units:
                # FSDP2 gathers the root unit's weights in forward's pre-hook: run the step through __call__
                return self._forward_redirection(module, module, method, *args, **kwargs)
            return getattr(module, method)(*args, **kwargs)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._redirect("training_step", self.precision_plugin.train_step_context(), *args, **kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._redirect("validation_step", self.precision_plugin.val_step_context(), *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._redirect("test_step", self.precision_plugin.test_step_context(), *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._redirect("predict_step", self.precision_plugin.predict_step_context(), *args, **kwargs)

    @override
    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        # non-final micro-batches accumulate unsharded gradients locally; the last backward reduce-scatters the sum
        module = self.lightning_module
        setter = getattr(module, "set_requires_gradient_sync", None)
        if setter is None:
            yield
            return
        setter(False)
        try:
            yield
        finally:
            setter(True)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        module = self.lightning_module
        assert module is not None
        # consolidated: full tensors, gathered one at a time to rank 0's CPU (the other ranks get an empty dict)
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        state = super().optimizer_state(optimizer)
        gathered = _gather(state)
        assert isinstance(gathered, dict)
        return gathered

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        super().load_optimizer_state_dict(checkpoint)
        engine = self.engine
        assert isinstance(engine, ShardedBlockEngine)
        engine.reshard_optimizer_state()


def _gather(obj: Any) -> Any:
    if isinstance(obj, DTensor):
        return full_tensor(obj).cpu()
    if isinstance(obj, dict):
        return {k: _gather(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_gather(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_gather(v) for v in obj)
    return obj
