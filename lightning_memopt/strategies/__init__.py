"""Lightning strategies that own BAdam's half-precision weights and the active block's FP32 masters."""

from lightning_memopt.strategies.badam import BAdamStrategy, BlockCoordinateMixin
from lightning_memopt.strategies.badam_ddp import BAdamDDPStrategy

__all__ = ["BAdamDDPStrategy", "BAdamStrategy", "BlockCoordinateMixin"]
