"""Lightning strategies that own BAdam's half-precision weights and the active block's FP32 masters."""

from typing import Any

from lightning_memopt.strategies.badam import (
    BAdamStrategy,
    BlockCoordinateMixin,
    BlockOptions,
    BlockStrategy,
    block_strategy,
)
from lightning_memopt.strategies.badam_ddp import BAdamDDPStrategy, DistributedBlockStrategy, DistributedOptions
from lightning_memopt.strategies.badam_fsdp import BAdamFSDPStrategy
from lightning_memopt.strategies.fused import FusedUpdateStrategy

__all__ = [
    "STRATEGIES",
    "BAdamDDPStrategy",
    "BAdamFSDPStrategy",
    "BAdamStrategy",
    "BlockCoordinateMixin",
    "BlockOptions",
    "BlockStrategy",
    "DistributedBlockStrategy",
    "DistributedOptions",
    "FusedUpdateStrategy",
    "block_strategy",
    "register",
]

STRATEGIES: tuple[type[BlockStrategy], ...] = (BAdamStrategy, BAdamDDPStrategy, BAdamFSDPStrategy)
"""Every BAdam strategy, in the order they are registered."""


def register(strategy_registry: Any) -> None:
    """Register every BAdam strategy's name with Lightning's ``StrategyRegistry`` (done once, on import).

    Example::

        >>> from lightning.pytorch.strategies import StrategyRegistry
        >>> register(StrategyRegistry)  # idempotent
        >>> sorted(name for name in StrategyRegistry if name.startswith("badam"))
        ['badam', 'badam_ddp', 'badam_fsdp']
    """
    for strategy in STRATEGIES:
        strategy.register_strategies(strategy_registry)
    FusedUpdateStrategy.register_strategies(strategy_registry)
