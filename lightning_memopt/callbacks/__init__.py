"""Callbacks: schedules and add-ons that work through the strategies' public surface."""

from lightning_memopt.callbacks.block_switch import BlockSwitch

__all__ = ["BlockSwitch"]
