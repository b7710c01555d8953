"""Callbacks: schedules and add-ons that work through the strategies' public surface."""

from lightning_memopt.callbacks.beta2_schedule import Beta2Schedule
from lightning_memopt.callbacks.block_switch import BlockSwitch
from lightning_memopt.callbacks.eight_bit import EightBitState, to_eight_bit
from lightning_memopt.callbacks.relative_step import RelativeStepSize
from lightning_memopt.callbacks.sample_generation import SampleGeneration
from lightning_memopt.callbacks.state_free import StateFreeUpdates
from lightning_memopt.callbacks.update_clipping import UpdateClipping

__all__ = [
    "Beta2Schedule",
    "BlockSwitch",
    "EightBitState",
    "RelativeStepSize",
    "SampleGeneration",
    "StateFreeUpdates",
    "UpdateClipping",
    "to_eight_bit",
]
