"""Callbacks: schedules and add-ons that work through the strategies' public surface."""

from lightning_memopt.callbacks.block_switch import BlockSwitch
from lightning_memopt.callbacks.eight_bit import EightBitState, to_eight_bit

__all__ = ["BlockSwitch", "EightBitState", "to_eight_bit"]
