"""The benchmark's methods: one small declarative entry per row of the table.

A row names a precision, an optimizer, whether BAdam drives it, and the package's callbacks it needs. Rows whose
callbacks do not exist in this version of the package are skipped with a note, so the matrix grows as features land.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import Callback
from torch.optim import Optimizer

from lightning_memopt.bench.config import BenchConfig

__all__ = ["DEFAULT_METHODS", "METHODS", "OPTIMIZERS", "Method", "build_optimizer", "select"]

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "sgd")


@dataclass(frozen=True)
class Method:
    """One row of the benchmark.

    Args:
        name: the key on the command line (``--methods badam,adamw-mixed``).
        label: the row's title in tables and plots.
        precision: Lightning's ``precision=``.
        optimizer: one of :data:`OPTIMIZERS` (hyper-parameters come from :class:`BenchConfig`).
        badam: train with :class:`~lightning_memopt.BAdamStrategy` and a random-order
            :class:`~lightning_memopt.BlockSwitch` every ``config.every`` steps.
        callbacks: names of classes in :mod:`lightning_memopt.callbacks`, added with their default arguments.

    Example::

        >>> Method("badam-sgd", "BAdam + SGD", "bf16-true", "sgd", badam=True).missing()
        []
    """

    name: str
    label: str
    precision: str
    optimizer: str
    badam: bool = False
    callbacks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Method {self.name!r}: optimizer {self.optimizer!r} is not one of {OPTIMIZERS}.")

    def missing(self) -> list[str]:
        """The callbacks this row needs that the installed package does not have yet."""
        callbacks = importlib.import_module("lightning_memopt.callbacks")
        return [name for name in self.callbacks if not hasattr(callbacks, name)]

    def build_callbacks(self) -> list[Callback]:
        callbacks = importlib.import_module("lightning_memopt.callbacks")
        return [getattr(callbacks, name)() for name in self.callbacks]


_STABILISERS = ("UpdateClipping", "Beta2Schedule", "RelativeStepSize")

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("adamw-32", "AdamW (32-true)", "32-true", "adamw"),
        Method("adamw-mixed", "AdamW (bf16-mixed)", "bf16-mixed", "adamw"),
        Method("adamw-bf16", "AdamW (bf16-true)", "bf16-true", "adamw"),
        Method("adamw8bit", "AdamW8bit (bf16-mixed)", "bf16-mixed", "adamw8bit"),
        Method("adafactor", "Adafactor (bf16-mixed)", "bf16-mixed", "adafactor"),
        Method("badam", "BAdam + AdamW (bf16-true)", "bf16-true", "adamw", badam=True),
        Method("badam-8bit", "BAdam + AdamW8bit (bf16-true)", "bf16-true", "adamw8bit", badam=True),
        Method("badam-adafactor", "BAdam + Adafactor (bf16-true)", "bf16-true", "adafactor", badam=True),
        Method("block-sgd", "Block SGD (BAdam + SGD, bf16-true)", "bf16-true", "sgd", badam=True),
        Method(
            "badam-eightbitstate",
            "BAdam + EightBitState (bf16-true)",
            "bf16-true",
            "adamw",
            badam=True,
            callbacks=("EightBitState",),
        ),
        Method(
            "badam-stabilised",
            "BAdam + AdamW + stabilisers (bf16-true)",
            "bf16-true",
            "adamw",
            badam=True,
            callbacks=_STABILISERS,
        ),
    )
}
"""Every known row, by name."""

DEFAULT_METHODS = tuple(METHODS)
"""The rows ``python -m lightning_memopt.bench`` runs without ``--methods``."""

ABLATION = ("badam", "badam-stabilised")
"""BAdam without and with UpdateClipping + Beta2Schedule + RelativeStepSize."""


def select(names: Iterable[str]) -> list[Method]:
    """The methods for a comma-separated ``--methods`` value, in the order given.

    Example::

        >>> [m.name for m in select(["badam", "adamw-32"])]
        ['badam', 'adamw-32']
    """
    chosen = []
    for name in names:
        name = name.strip()
        if not name:
            continue
        if name not in METHODS:
            raise ValueError(f"Unknown method {name!r}. Choose from: {', '.join(METHODS)}.")
        chosen.append(METHODS[name])
    if not chosen:
        raise ValueError(f"No method selected. Choose from: {', '.join(METHODS)}.")
    return chosen


def build_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], config: BenchConfig, lr: float | None = None
) -> Optimizer:
    """The optimizer of a row, over ``params``, with the run's hyper-parameters (no weight decay anywhere); ``lr``,
    when given, replaces the config's learning rate for that optimizer.

    Example::

        >>> layer = torch.nn.Linear(2, 2)
        >>> type(build_optimizer("sgd", layer.parameters(), BenchConfig())).__name__
        'SGD'
    """
    kwargs: dict[str, Any]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr if lr is None else lr, weight_decay=0.0)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        # keyword arguments only: bitsandbytes 0.50 removed positional parameters that would shift the rest
        kwargs = {"lr": config.lr if lr is None else lr, "weight_decay": 0.0}
        return bnb.optim.AdamW8bit(params, **kwargs)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=config.adafactor_lr if lr is None else lr, weight_decay=0.0)
    if name == "sgd":
        return torch.optim.SGD(params, lr=config.sgd_lr if lr is None else lr, momentum=0.9)
    raise ValueError(f"Unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")
