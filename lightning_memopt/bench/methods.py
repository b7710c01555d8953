"""The benchmark's methods: one small declarative entry per row of the table.

A row names a precision, an optimizer, whether BAdam drives it, and the package's callbacks it needs. Rows whose
callbacks do not exist in this version of the package are skipped with a note, so the matrix grows as features land.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, Trainer
from torch.optim import Optimizer

from lightning_memopt.bench.config import BenchConfig

__all__ = [
    "DEFAULT_METHODS",
    "KINDS",
    "METHODS",
    "OPTIMIZERS",
    "CallbackSpec",
    "Method",
    "build_optimizer",
    "build_trainer",
    "select",
]

OPTIMIZERS = (
    "adamw",
    "adamw8bit",
    "adafactor",
    "sgd",
    "sgd-plain",
    "adalomo",
    "galore-adamw",
    "galore-adamw8bit",
    "flora",
    "foam",
    "adamw4bit-ao",
)


Kind = Literal["full", "badam", "lora"]
KINDS: tuple[str, ...] = ("full", "badam", "lora")

CallbackSpec = str | tuple[str, Mapping[str, Any]]
"""A callback of a row: a class name in :mod:`lightning_memopt.callbacks` (default arguments) or ``(name, kwargs)``."""


@dataclass(frozen=True)
class Method:
    """One row of a benchmark: the memory/speed matrix, the communication benchmark and the fine-tuning benchmark all
    describe their rows with this type.

    Args:
        name: the key on the command line (``--methods badam,adamw-mixed``).
        label: the row's title in tables and plots.
        precision: Lightning's ``precision=``.
        optimizer: one of :data:`OPTIMIZERS`.
        kind: ``"full"`` (every parameter, the optimizer alone), ``"badam"`` (a BAdam strategy and a
            :class:`~lightning_memopt.BlockSwitch`) or ``"lora"`` (peft adapters on every linear layer, base weights
            frozen in bf16; fine-tuning only).
        lr: learning rate; ``None``: the benchmark's setting for the optimizer (the fine-tuning rows name theirs, the
            sweep's choices).
        every: BAdam's K; ``None``: the benchmark's setting.
        order: ``BlockSwitch(order=...)``.
        rank: LoRA rank (alpha = 2 x rank).
        layers_per_block: BAdam blocks of this many consecutive decoder layers (1: the paper's one layer).
        fused: the update in backward: ``"full"`` rows train with ``strategy="fused_update"``, BAdam rows with
            ``fused_update=True`` (each tensor stepped as its gradient completes; no gradient buffer).
        strategy: further block options of the BAdam strategy (:class:`~lightning_memopt.strategies.BlockOptions`).
        callbacks: the package's callbacks the row adds (see :data:`CallbackSpec`).

    Example::

        >>> Method("badam-sgd", "BAdam + SGD", "bf16-true", "sgd", kind="badam").missing()
        []
    """

    name: str
    label: str
    precision: str
    optimizer: str = "adamw"
    kind: Kind = "full"
    lr: float | None = None
    every: int | None = None
    order: str = "random"
    rank: int = 0
    layers_per_block: int = 1
    fused: bool = False
    strategy: Mapping[str, Any] = field(default_factory=dict)
    callbacks: tuple[CallbackSpec, ...] = ()

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Method {self.name!r}: optimizer {self.optimizer!r} is not one of {OPTIMIZERS}.")
        if self.kind not in KINDS:
            raise ValueError(f"Method {self.name!r}: kind {self.kind!r} is not one of {KINDS}.")
        if self.fused and self.kind == "lora":
            raise ValueError(f"Method {self.name!r}: the update in backward is for full and BAdam rows.")

    @property
    def badam(self) -> bool:
        """Whether a BAdam strategy trains the row."""
        return self.kind == "badam"

    def callback_specs(self) -> list[tuple[str, dict[str, Any]]]:
        """The row's callbacks as ``(class name, keyword arguments)``."""
        return [(c, {}) if isinstance(c, str) else (c[0], dict(c[1])) for c in self.callbacks]

    def missing(self) -> list[str]:
        """The callbacks this row needs that the installed package does not have yet."""
        callbacks = importlib.import_module("lightning_memopt.callbacks")
        return [name for name, _ in self.callback_specs() if not hasattr(callbacks, name)]

    def build_callbacks(self) -> list[Callback]:
        callbacks = importlib.import_module("lightning_memopt.callbacks")
        return [getattr(callbacks, name)(**kwargs) for name, kwargs in self.callback_specs()]

    def block_options(self) -> dict[str, Any]:
        """The keyword arguments of the row's BAdam strategy."""
        options = dict(self.strategy)
        if self.layers_per_block > 1:
            options["layers_per_block"] = self.layers_per_block
        if self.fused:
            options["fused_update"] = True
        return options

    def build_strategy(self, devices: int = 1) -> Any:
        """The row's strategy on ``devices`` CPU processes: a BAdam strategy for BAdam rows, else Lightning's."""
        from lightning_memopt import BAdamDDPStrategy, BAdamStrategy

        if devices > 1:
            if self.fused and not self.badam:
                raise ValueError(f"Method {self.name!r}: fused_update runs on one device.")
            return BAdamDDPStrategy(process_group_backend="gloo", **self.block_options()) if self.badam else "ddp"
        if self.badam:
            return BAdamStrategy(**self.block_options())
        return "fused_update" if self.fused else "auto"


def build_trainer(
    out: Path,
    precision: str,
    steps: int,
    callbacks: list[Callback],
    strategy: Any = "auto",
    devices: int = 1,
    **overrides: Any,
) -> Trainer:
    """The one Trainer every benchmark row trains with: CPU, ``steps`` optimizer steps, no validation loop,
    checkpoints, progress bar or model summary (each row measures what it needs through its callbacks); ``overrides``
    for the few rows that differ (a logger, validation during pretraining, clipping).

    Example::

        trainer = build_trainer(Path("out"), "bf16-true", 10, [StepClock()], strategy=METHODS["badam"].build_strategy())
    """
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": devices,
        "strategy": strategy,
        "precision": precision,
        "max_steps": steps,
        "limit_val_batches": 0,
        "logger": False,
        "callbacks": callbacks,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": out,
        **overrides,
    }
    return Trainer(**settings)


_STABILISERS = ("UpdateClipping", "Beta2Schedule", "RelativeStepSize")

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("adamw-32", "AdamW (32-true)", "32-true", "adamw"),
        Method("adamw-mixed", "AdamW (bf16-mixed)", "bf16-mixed", "adamw"),
        Method("adamw-bf16", "AdamW (bf16-true)", "bf16-true", "adamw"),
        Method("adamw8bit", "AdamW8bit (bf16-mixed)", "bf16-mixed", "adamw8bit"),
        Method("adafactor", "Adafactor (bf16-mixed)", "bf16-mixed", "adafactor"),
        Method("badam", "BAdam + AdamW (bf16-true)", "bf16-true", "adamw", kind="badam"),
        Method("badam-8bit", "BAdam + AdamW8bit (bf16-true)", "bf16-true", "adamw8bit", kind="badam"),
        Method("badam-adafactor", "BAdam + Adafactor (bf16-true)", "bf16-true", "adafactor", kind="badam"),
        Method("block-sgd", "Block SGD (BAdam + SGD, bf16-true)", "bf16-true", "sgd", kind="badam"),
        Method("lomo", "LOMO (SGD in backward, bf16-true)", "bf16-true", "sgd-plain", fused=True),
        Method("adalomo", "AdaLomo (in backward, bf16-true)", "bf16-true", "adalomo", fused=True),
        Method(
            "adamw8bit-fused",
            "AdamW8bit in backward (bf16-true, torchtune's optimizer_in_bwd)",
            "bf16-true",
            "adamw8bit",
            fused=True,
        ),
        Method("badam-fused", "BAdam + AdamW, update in backward (bf16-true)", "bf16-true", kind="badam", fused=True),
        Method(
            "badam-8bit-fused",
            "BAdam + AdamW8bit, update in backward (bf16-true)",
            "bf16-true",
            "adamw8bit",
            kind="badam",
            fused=True,
        ),
        Method("galore", "GaLore AdamW, rank H/4 (bf16-true)", "bf16-true", "galore-adamw"),
        Method("flora", "FLORA, rank H/4 (bf16-true)", "bf16-true", "flora"),
        Method("foam", "FOAM (bf16-true)", "bf16-true", "foam"),
        Method("adamw4bit-ao", "AdamW4bit, torchao (bf16-true)", "bf16-true", "adamw4bit-ao"),
        Method("galore-8bit", "GaLore AdamW8bit, rank H/4 (bf16-true)", "bf16-true", "galore-adamw8bit"),
        Method("badam-galore", "BAdam + GaLore AdamW (bf16-true)", "bf16-true", "galore-adamw", kind="badam"),
        Method("badam-flora", "BAdam + FLORA (bf16-true)", "bf16-true", "flora", kind="badam"),
        Method("badam-foam", "BAdam + FOAM (bf16-true)", "bf16-true", "foam", kind="badam"),
        Method(
            "badam-4bit",
            "BAdam + EightBitState(torchao, 4 bits) (bf16-true)",
            "bf16-true",
            "adamw",
            kind="badam",
            callbacks=(("EightBitState", {"backend": "torchao", "bits": 4}),),
        ),
        Method(
            "badam-eightbitstate",
            "BAdam + EightBitState (bf16-true)",
            "bf16-true",
            "adamw",
            kind="badam",
            callbacks=("EightBitState",),
        ),
        Method(
            "badam-stabilised",
            "BAdam + AdamW + stabilisers (bf16-true)",
            "bf16-true",
            "adamw",
            kind="badam",
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
    name: str,
    params: Iterable[torch.nn.Parameter],
    config: BenchConfig,
    lr: float | None = None,
    module: torch.nn.Module | None = None,
) -> Optimizer:
    """The optimizer of a row, over ``params``, with the run's hyper-parameters (no weight decay anywhere); ``lr``,
    when given, replaces the config's learning rate for that optimizer. GaLore builds its param groups from
    ``module`` (rank ``hidden / 4``, as the GaLore paper's 60 M model: 128 at width 512; the width is the module's
    embedding size, else the config's); FLORA compresses its momentum at the same rank. GaLore's and FOAM's ``scale``
    is 1 (steps the size of AdamW's at the same lr; the papers' 0.25 goes with larger lrs); FOAM folds blocks of 16.

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
    if name == "sgd-plain":  # LOMO's rule: SGD without momentum, no state at all
        return torch.optim.SGD(params, lr=config.sgd_lr if lr is None else lr)
    if name == "adalomo":
        from lightning_memopt.optim import AdaLomo

        # a relative step like Adafactor's: the same lr setting
        return AdaLomo(params, lr=config.adafactor_lr if lr is None else lr)
    rank = max(1, _hidden_size(module, config) // 4)
    if name in ("galore-adamw", "galore-adamw8bit"):
        from galore_torch import GaLoreAdamW, GaLoreAdamW8bit

        from lightning_memopt.low_rank import low_rank_param_groups

        if module is None:
            raise ValueError(f"build_optimizer({name!r}, ...) needs module= to choose the projected matrices.")
        trained = {id(p) for p in params}
        groups = [
            {**g, "params": [p for p in g["params"] if id(p) in trained]}
            for g in low_rank_param_groups(module, rank=rank, update_proj_gap=200, scale=1.0)
        ]
        lr = config.lr if lr is None else lr
        if name == "galore-adamw8bit":  # keyword arguments only; the pack's shim fixes its own positional ones
            return GaLoreAdamW8bit(groups, lr=lr, weight_decay=0.0)
        return GaLoreAdamW(groups, lr=lr, weight_decay=0.0, no_deprecation_warning=True)
    if name == "flora":
        from flora_opt import Flora

        # Adafactor's rule with a momentum (compressed at `rank`); an absolute lr like AdamW's (not scaled by each
        # tensor's RMS, which would make it ~50x smaller at this initialisation)
        lr = config.lr if lr is None else lr
        return Flora(params, lr=lr, rank=rank, beta1=0.9, relative_step=False, scale_parameter=False)
    if name == "foam":
        from lightning_memopt.optim import FOAM

        return FOAM(params, lr=config.lr if lr is None else lr, weight_decay=0.0, fold_level=4, scale=1.0)
    if name == "adamw4bit-ao":
        from torchao.optim import AdamW4bit

        return AdamW4bit(params, lr=config.lr if lr is None else lr, weight_decay=0.0)
    raise ValueError(f"Unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")


def _hidden_size(module: torch.nn.Module | None, config: BenchConfig) -> int:
    embeddings = [m for m in module.modules() if isinstance(m, torch.nn.Embedding)] if module is not None else []
    return embeddings[0].embedding_dim if embeddings else config.hidden
