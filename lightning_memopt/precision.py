"""Precision handling for BAdam: which Lightning precisions work, and loss scaling on FP32 master gradients.

Lightning's ``16-true`` casts the whole module to FP16 and has no loss scaler, and ``torch.amp.GradScaler`` refuses
FP16 gradients. BAdam keeps FP32 master gradients for the active block, so a ``GradScaler`` can unscale *those*:
:class:`MasterGradScalerPrecision` scales the loss before backward, the strategy moves the (scaled) half gradients
into the FP32 masters, and the scaler unscales them, skips the step on inf/NaN and adapts the scale.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import LBFGS
from typing_extensions import override

__all__ = ["MasterGradScalerPrecision", "resolve_precision_plugin"]


class MasterGradScalerPrecision(HalfPrecision):
    """``16-true`` with dynamic loss scaling applied to the FP32 master gradients of BAdam's active block.

    The BAdam strategies install it automatically when ``precision="16-true"``; pass it yourself only to change the
    scaler's settings.

    Args:
        init_scale: initial loss scale.
        growth_factor: factor the scale grows by after ``growth_interval`` steps without overflow.
        backoff_factor: factor the scale shrinks by on an overflow (the step is then skipped).
        growth_interval: number of overflow-free steps before the scale grows.

    Example::

        >>> from lightning_memopt import BAdamStrategy
        >>> strategy = BAdamStrategy(precision_plugin=MasterGradScalerPrecision(init_scale=2.0**12))
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        super().__init__("16-true")
        self._scaler_kwargs: dict[str, Any] = {
            "init_scale": init_scale,
            "growth_factor": growth_factor,
            "backoff_factor": backoff_factor,
            "growth_interval": growth_interval,
        }
        self._scaler: torch.amp.GradScaler | None = None
        self._pending_state: dict[str, Any] | None = None
        self._last_skipped = False

    def set_device(self, device: torch.device) -> None:
        """Create the scaler for ``device`` (the strategy calls this once it knows its root device)."""
        if self._scaler is not None and self._scaler._device == device.type:
            return
        self._scaler = torch.amp.GradScaler(device.type, **self._scaler_kwargs)
        if self._pending_state is not None:
            self._scaler.load_state_dict(self._pending_state)
            self._pending_state = None

    @property
    def scaler(self) -> torch.amp.GradScaler:
        """The ``torch.amp.GradScaler`` acting on the master gradients."""
        if self._scaler is None:
            self.set_device(torch.device("cpu"))
        assert self._scaler is not None
        return self._scaler

    @override
    def pre_backward(self, tensor: Tensor, module: LightningModule) -> Tensor:  # type: ignore[override]
        return super().pre_backward(self.scaler.scale(tensor), module)

    @override
    def optimizer_step(  # type: ignore[override]
        self,
        optimizer: Any,
        model: LightningModule,
        closure: Callable[[], Any],
        **kwargs: Any,
    ) -> Any:
        if isinstance(optimizer, LBFGS):
            raise MisconfigurationException("16-true with loss scaling cannot drive LBFGS; use bf16-true or 32-true.")
        closure_result = closure()
        skipped_backward = closure_result is None
        if not skipped_backward:
            # unscale before on_before_optimizer_step so hooks and clipping see true FP32 gradients
            self.scaler.unscale_(optimizer)
        self._after_closure(model, optimizer)
        if skipped_backward:
            return None
        # GradScaler.step skips optimizer.step() when the unscaled master gradients hold inf/NaN
        scale_before = self.scaler.get_scale()
        step_output = self.scaler.step(optimizer, **kwargs)
        self.scaler.update()
        # the scale only ever shrinks after an overflow, which is also exactly when the step was skipped
        self._last_skipped = self.scaler.get_scale() < scale_before
        return step_output

    @property
    def last_step_skipped(self) -> bool:
        """Whether the scaler skipped the most recent optimizer step (it found inf/NaN gradients)."""
        return self._last_skipped

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._scaler is None:
            self._pending_state = dict(state_dict)
        else:
            self._scaler.load_state_dict(state_dict)


_MIXED_EXPLANATION = (
    "BAdam keeps the model's weights in half precision and only the active block in FP32. Mixed precision "
    "('{precision}') keeps every weight in FP32, so BAdam would save no weight memory. Use precision='bf16-true' "
    "(recommended; no loss scaling needed) or '16-true' (FP16 weights, with dynamic loss scaling on the FP32 master "
    "gradients), or '32-true' to train in full precision."
)


def resolve_precision_plugin(plugin: Precision) -> Precision:
    """Check that ``plugin`` suits BAdam and return the plugin BAdam should use instead of it.

    ``16-true`` becomes :class:`MasterGradScalerPrecision`; ``bf16-true``, ``32-true`` and ``64-true`` are kept;
    ``16-mixed``/``bf16-mixed`` and other plugins raise a ``MisconfigurationException`` that says what to use.

    Example::

        >>> from lightning.pytorch.plugins.precision import HalfPrecision
        >>> type(resolve_precision_plugin(HalfPrecision("16-true"))).__name__
        'MasterGradScalerPrecision'
    """
    if isinstance(plugin, MasterGradScalerPrecision):
        return plugin
    if isinstance(plugin, MixedPrecision):
        raise MisconfigurationException(_MIXED_EXPLANATION.format(precision=plugin.precision))
    if isinstance(plugin, HalfPrecision):
        return MasterGradScalerPrecision() if plugin.precision == "16-true" else plugin
    if type(plugin) in (Precision, DoublePrecision):
        return plugin
    raise MisconfigurationException(
        f"BAdam does not support the precision plugin {type(plugin).__name__} (precision={plugin.precision!r}). "
        "Use precision='bf16-true', '16-true' or '32-true'."
    )
