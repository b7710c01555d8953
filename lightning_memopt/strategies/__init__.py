"""Lightning strategies that own BAdam's half-precision weights and the active block's FP32 masters."""

from lightning_memopt.strategies.badam import BAdamStrategy, BlockCoordinateMixin

__all__ = ["BAdamStrategy", "BlockCoordinateMixin"]
