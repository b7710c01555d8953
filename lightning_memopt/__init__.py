"""lightning-memopt: memory-efficient full-parameter fine-tuning for PyTorch Lightning.

Importing the package registers the strategy names ``"badam"``, ``"badam_ddp"`` and ``"badam_fsdp"``, so
``Trainer(strategy="badam")`` and ``strategy: badam`` in LightningCLI YAML work.

Example::

    from lightning.pytorch import Trainer
    from lightning_memopt import BAdamStrategy, BlockSwitch

    trainer = Trainer(strategy=BAdamStrategy(), precision="bf16-true",
                      callbacks=[BlockSwitch(every=100, order="random")])
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_memopt.blocks import Block, BlockPartitionError, partition
from lightning_memopt.callbacks import (
    Beta2Schedule,
    BlockSwitch,
    EightBitState,
    RelativeStepSize,
    SampleGeneration,
    StateFreeUpdates,
    UpdateClipping,
)
from lightning_memopt.checkpoint_io import AtomicCheckpointIO
from lightning_memopt.low_rank import install_galore_shims, low_rank_param_groups
from lightning_memopt.memory import MemoryReport
from lightning_memopt.precision import MasterGradScalerPrecision
from lightning_memopt.strategies import BAdamDDPStrategy, BAdamFSDPStrategy, BAdamStrategy, register

__version__ = "0.1.0.dev0"

# Lightning 2.6 does not discover third-party strategies: register ours on import, once.
register(StrategyRegistry)
# GaLore's projector in weights_only checkpoints, its FP32 projections at their own size (when galore_torch is in use)
install_galore_shims()

__all__ = [
    "AtomicCheckpointIO",
    "BAdamDDPStrategy",
    "BAdamFSDPStrategy",
    "BAdamStrategy",
    "Beta2Schedule",
    "Block",
    "BlockPartitionError",
    "BlockSwitch",
    "EightBitState",
    "MasterGradScalerPrecision",
    "MemoryReport",
    "RelativeStepSize",
    "SampleGeneration",
    "StateFreeUpdates",
    "UpdateClipping",
    "__version__",
    "low_rank_param_groups",
    "partition",
]
