"""Lightning strategies that own BAdam's half-precision weights and the active block's FP32 masters."""

from lightning_memopt.strategies.badam import BAdamStrategy, BlockCoordinateMixin
from lightning_memopt.strategies.badam_ddp import BAdamDDPStrategy
from lightning_memopt.strategies.badam_fsdp import BAdamFSDPStrategy

__all__ = ["BAdamDDPStrategy", "BAdamFSDPStrategy", "BAdamStrategy", "BlockCoordinateMixin"]
