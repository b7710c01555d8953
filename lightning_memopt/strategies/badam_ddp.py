"""BAdam on several devices and nodes: data parallel, with only the active block's gradients on the network."""

from __future__ import annotations

import atexit
import re
import subprocess
import time
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins import ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor
from typing_extensions import Unpack, override

from lightning_memopt.checkpoint_io import AtomicCheckpointIO
from lightning_memopt.compat import lightning_trainer
from lightning_memopt.strategies.badam import BlockOptions, BlockStrategy
from lightning_memopt.strategies.collectives import all_reduce_mean

__all__ = ["BAdamDDPStrategy", "DistributedBlockStrategy", "DistributedOptions"]


class DistributedOptions(BlockOptions, total=False):
    """The options of the data-parallel and sharded BAdam strategies: every :class:`BlockOptions` entry and these
    (defaults in brackets), all keyword arguments.

    Attributes:
        process_group_backend: ``"nccl"`` (default on GPUs) or ``"gloo"`` (default on CPUs).
        timeout: process group timeout [30 minutes]: a rank that hangs makes the others fail after this long (one that
            dies usually makes them fail at once). Their error then says that another rank stopped and names this
            setting; processes this one launched that are still running are stopped when it exits.
        start_method: how Lightning launches processes [``"popen"``: re-runs the script, as torchrun does].
        checkpoint_io: how rank 0 writes checkpoint files; by default
            :class:`~lightning_memopt.checkpoint_io.AtomicCheckpointIO`, which never leaves a half-written file.
        accelerator: Lightning's accelerator (normally chosen by the Trainer).
        parallel_devices: the devices (normally from ``Trainer(devices=...)``).
        cluster_environment: Lightning's cluster environment (normally detected).
        precision_plugin: Lightning's precision plugin (normally from ``Trainer(precision=...)``).

    Example::

        BAdamDDPStrategy(include_lm_head=True, process_group_backend="gloo", timeout=timedelta(minutes=5))
    """

    process_group_backend: str | None
    timeout: timedelta | None
    start_method: Literal["popen", "spawn", "fork", "forkserver"]
    checkpoint_io: CheckpointIO | None
    accelerator: Accelerator | None
    parallel_devices: list[torch.device] | None
    cluster_environment: ClusterEnvironment | None
    precision_plugin: Precision | None


_PROCESS_OPTIONS = tuple(sorted(DistributedOptions.__optional_keys__ - BlockOptions.__optional_keys__))


class DistributedBlockStrategy(BlockStrategy, DDPStrategy):
    """The base of the BAdam strategies on several processes (``badam_ddp``, ``badam_fsdp``): Lightning's DDP process
    handling without its ``DistributedDataParallel`` wrapper, the options of :class:`DistributedOptions`, and an error
    that says which rank stopped when another rank is lost.

    Example::

        >>> from lightning_memopt import BAdamDDPStrategy
        >>> isinstance(BAdamDDPStrategy(), DistributedBlockStrategy)
        True
        >>> # Trainer(strategy=BAdamDDPStrategy(), accelerator="gpu", devices=4, precision="bf16-true")
    """

    def __init__(self, **options: Unpack[DistributedOptions]) -> None:
        process: dict[str, Any] = {k: v for k, v in options.items() if k in _PROCESS_OPTIONS}
        self._badam_init({k: v for k, v in options.items() if k not in process}, also_known=_PROCESS_OPTIONS)
        if process.get("checkpoint_io") is None:
            process["checkpoint_io"] = AtomicCheckpointIO()
        process.setdefault("timeout", default_pg_timeout)
        super().__init__(**process)

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        if not _lost_another_rank(exception):
            return
        procs = list(getattr(self.launcher, "procs", None) or [])
        trainer = lightning_trainer(self.lightning_module)
        step = trainer.global_step if trainer is not None else None
        message = (
            f"{type(self).__name__}: rank {self.global_rank} of {self.world_size} lost contact with the other ranks"
            + (f" at step {step}" if step is not None else "")
            + ": another rank stopped (an error, a kill, the out-of-memory killer) or hangs. "
            + _children_status(procs)
            + "That rank's own log shows why. A rank that hangs holds the others until the process group timeout "
            f"({self._timeout}) runs out; set it with {type(self).__name__}(timeout=datetime.timedelta(minutes=N))."
        )
        exception.args = (f"{message}\nOriginal error: {exception.args[0] if exception.args else ''}",)
        if procs:
            # Lightning stops the other local ranks only when one of *them* fails; a hung one would outlive this one.
            # At exit, after the traceback is printed (Lightning's process observer SIGKILLs us once a child is gone).
            atexit.register(_kill_running, procs)


class BAdamDDPStrategy(DistributedBlockStrategy):
    """BAdam with data parallelism: every rank trains the same block; only its FP32 gradients are all-reduced.

    PyTorch's ``DistributedDataParallel`` builds its reducer over the parameters that require grad when it wraps the
    model, so flipping ``requires_grad`` at each block switch either desynchronises ranks or raises "parameters that
    were not used in producing loss" (and ``find_unused_parameters=True`` would reduce the whole model). This strategy
    therefore does not wrap the model: it broadcasts rank 0's weights once, and after the last micro-batch of each
    optimizer step all-reduces (averages) the active block's FP32 master gradients in buckets of ``bucket_cap_mb``,
    before unscaling, hooks, clipping and the step. Gradient accumulation communicates only once per step, and an
    inf/NaN on one rank reaches every rank, so a ``16-true`` overflow skips the step everywhere.

    Takes every option of :class:`DistributedOptions` (the block options of :class:`~lightning_memopt.BAdamStrategy`
    and the process-group ones) as a keyword argument, and:

    Args:
        bucket_cap_mb: size of the all-reduce buckets of master gradients, in MiB.

    Example::

        from lightning.pytorch import Trainer
        from lightning_memopt import BAdamDDPStrategy, BlockSwitch

        trainer = Trainer(accelerator="gpu", devices=4, strategy=BAdamDDPStrategy(), precision="bf16-true",
                          callbacks=[BlockSwitch(every=100, order="random")])
    """

    strategy_name = "badam_ddp"
    strategy_description = "BAdam block coordinate descent, data parallel over devices"

    def __init__(self, bucket_cap_mb: float = 25.0, **options: Unpack[DistributedOptions]) -> None:
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb must be > 0 but is: {bucket_cap_mb}")
        super().__init__(**options)
        self.bucket_cap_mb = bucket_cap_mb

    @override
    def configure_ddp(self) -> None:
        # no DistributedDataParallel wrapper (see the class docstring): start every rank from rank 0's weights instead
        assert self.model is not None
        with torch.no_grad():
            for tensor in [*self.model.parameters(), *self.model.buffers()]:
                dist.broadcast(tensor.data, src=0)

    @override
    def _badam_setup(self, trainer: Any) -> None:
        super()._badam_setup(trainer)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if self.fused_update and world > 1:
            # every rank steps the same master in the same hook: average its gradient there, before the step
            self.engine.reduce_grad = lambda grad: all_reduce_mean([grad], world, int(self.bucket_cap_mb * 2**20))

    @override
    def _badam_after_closure(self) -> None:
        world = dist.get_world_size()
        if world == 1:
            return
        grads: list[Tensor] = []
        for master in self.engine.masters.values():
            if master.grad is None:
                # a rank whose loss did not reach this parameter still joins the collective, with zeros
                master.grad = torch.zeros_like(master)
            grads.append(master.grad)
        all_reduce_mean(grads, world, int(self.bucket_cap_mb * 2**20))


# gloo, NCCL and c10d name themselves in their errors (a DataLoader's "timed out" must not count) ...
_DISTRIBUTED = re.compile(r"gloo|nccl|ProcessGroup|c10d", re.IGNORECASE)
# ... and these say the peer is gone or silent (NCCL's own local failures, "unhandled cuda error", do not)
_PEER_LOST = re.compile(r"connection (closed|reset)|timed out|timeout|remote process|by peer|abort", re.IGNORECASE)


def _lost_another_rank(exception: BaseException) -> bool:
    if isinstance(exception, (dist.DistNetworkError, dist.DistStoreError)):
        return True
    if not isinstance(exception, RuntimeError):  # DistBackendError is one
        return False
    message = str(exception)
    return bool(_DISTRIBUTED.search(message)) and bool(_PEER_LOST.search(message))


def _children_status(procs: list[subprocess.Popen]) -> str:
    notes = []
    # a rank that just died may not have exited yet when its closed socket reaches us: give them 2 s together
    deadline = time.monotonic() + 2.0
    for local_rank, proc in enumerate(procs, start=1):
        try:
            code = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            notes.append(
                f"local rank {local_rank} (PID {proc.pid}) is still running (it is stopped when this one exits)"
            )
        else:
            if code != 0:
                notes.append(f"local rank {local_rank} (PID {proc.pid}) exited with code {code}")
    return ("On this node, " + "; ".join(notes) + ". ") if notes else ""


def _kill_running(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
