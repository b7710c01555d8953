"""The ``lightning-memopt`` command: Lightning's CLI with this package's strategies registered.

Run a recipe with ``lightning-memopt fit --config recipes/quickstart.yaml`` (or ``python -m lightning_memopt``);
any key can be overridden on the command line, e.g. ``--trainer.max_steps 100``. ``lightning-memopt export CKPT OUT``
writes a checkpoint as a Hugging Face model directory or a safetensors file (:mod:`lightning_memopt.export`);
``lightning-memopt recipes`` lists the shipped recipes and ``lightning-memopt recipes copy NAME DIR`` writes one out.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from functools import partial, update_wrapper
from importlib import import_module
from types import MethodType
from typing import Any, Optional

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, LRSchedulerTypeUnion
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau
from typing_extensions import override

# Lightning 2.6 does not discover third-party strategies: importing the package registers `badam` and friends, so
# `trainer.strategy: badam` resolves in a recipe.
import lightning_memopt
from lightning_memopt.compat import quiet_library_noise
from lightning_memopt.low_rank import LowRankOptions, install_galore_shims, low_rank_param_groups
from lightning_memopt.optimizers import is_galore, optimizer_name
from lightning_memopt.strategies.collectives import finish_distributed

__all__ = ["MemoptCLI", "main"]

_DESCRIPTION = (
    "Memory-efficient full-parameter fine-tuning with PyTorch Lightning (BAdam and friends). "
    "`lightning-memopt export CKPT OUT` turns a checkpoint into a Hugging Face model or a safetensors file; "
    "`lightning-memopt recipes` lists the shipped recipes (`recipes copy NAME DIR` writes one out to edit); "
    "`lightning-memopt --version` prints the version."
)


class MemoptCLI(LightningCLI):
    """``LightningCLI`` for fine-tuning recipes.

    Differences from ``LightningCLI``:

    - Any ``LightningModule`` and ``LightningDataModule`` can be named with ``class_path`` (subclass mode), so the
      CLI runs users' own modules unchanged.
    - Learning-rate schedulers from the ``lr_scheduler:`` section step after every optimizer step, not every epoch:
      fine-tuning recipes count warmup and cosine decay in steps and often run less than one epoch.
      ``ReduceLROnPlateau`` still steps per epoch, on its ``monitor``.
    - The seed defaults to 0, and re-running into the same directory overwrites the saved ``config.yaml``.
    - A ``low_rank:`` section (the options of :func:`~lightning_memopt.low_rank_param_groups`) gives a GaLore
      optimizer in the ``optimizer:`` section its param groups: the projected matrices, rank, gap and scale.
    - The ``optimizer:`` section's optimizer trains the parameters the module holds when the strategy asks for it.
      (LightningCLI builds it from ``model.parameters()`` while parsing, before a sharding strategy such as
      ``badam_fsdp`` replaces the parameters with sharded ones, which left it holding the stale, unsharded tensors.)

    Example::

        >>> cli = MemoptCLI(args=["fit", "--config", "recipes/quickstart.yaml"])  # doctest: +SKIP
    """

    def __init__(
        self,
        model_class: type[LightningModule] | None = None,
        datamodule_class: type[LightningDataModule] | None = None,
        *,
        save_config_kwargs: dict[str, Any] | None = None,
        seed_everything_default: bool | int = 0,
        parser_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            model_class,
            datamodule_class,
            save_config_kwargs={"overwrite": True} if save_config_kwargs is None else save_config_kwargs,
            seed_everything_default=seed_everything_default,
            parser_kwargs={"prog": "lightning-memopt", "description": _DESCRIPTION, **(parser_kwargs or {})},
            subclass_mode_model=True,
            subclass_mode_data=True,
            **kwargs,
        )

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--low_rank",
            type=Optional[LowRankOptions],  # noqa: UP045 (jsonargparse reads the annotation at run time)
            default=None,
            help="GaLore's param groups for the optimizer: section's galore_torch optimizer "
            "(lightning_memopt.low_rank_param_groups: rank, update_proj_gap, scale, proj_type, target_modules).",
        )

    @override
    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        low_rank = config.get("low_rank")
        configured = getattr(self.model, "configure_optimizers", None)
        generated = getattr(configured, "__func__", None)
        optimizer = generated.keywords.get("optimizer") if isinstance(generated, partial) else None
        if isinstance(generated, partial) and isinstance(optimizer, Optimizer):
            install_galore_shims()  # the optimizer's class is imported now; a checkpoint is restored later
            if low_rank is not None:
                _use_low_rank_groups(optimizer, self.model, low_rank)
            elif is_galore(optimizer):
                rank_zero_warn(
                    f"The optimizer: section configures galore_torch's {type(optimizer).__name__} without a low_rank: "
                    "section, so no matrix gets a projection and it trains as the plain optimizer. Add e.g. "
                    "`low_rank: {rank: 128}` to the recipe."
                )
            names = {id(p): n for n, p in self.model.named_parameters()}
            self.model.configure_optimizers = MethodType(_with_current_parameters(generated, names), self.model)
        elif low_rank is not None:
            raise MisconfigurationException(
                "The low_rank: section builds GaLore's param groups for the optimizer: section, but the recipe has no "
                "optimizer: section. Add one with a galore_torch optimizer (class_path: galore_torch.GaLoreAdamW), or "
                "remove low_rank:."
            )

    @staticmethod
    @override
    def configure_optimizers(
        lightning_module: LightningModule, optimizer: Optimizer, lr_scheduler: LRSchedulerTypeUnion | None = None
    ) -> Any:
        if lr_scheduler is None or isinstance(lr_scheduler, ReduceLROnPlateau):
            return LightningCLI.configure_optimizers(lightning_module, optimizer, lr_scheduler)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}


def _use_low_rank_groups(optimizer: Optimizer, model: LightningModule, options: LowRankOptions) -> None:
    if not is_galore(optimizer):
        raise MisconfigurationException(
            f"The low_rank: section gives param groups GaLore's projection keys, but the optimizer: section's "
            f"{optimizer_name(optimizer)} would ignore them. Use galore_torch.GaLoreAdamW, GaLoreAdafactor or "
            "GaLoreAdamW8bit, or remove low_rank:."
        )
    groups = low_rank_param_groups(model, **dataclasses.asdict(options))
    # the CLI built the optimizer over model.parameters() with the section's arguments: same defaults, new groups
    optimizer.param_groups = []
    for group in groups:
        optimizer.add_param_group(group)


def _with_current_parameters(generated: partial[Any], names: dict[int, str]) -> Callable[[LightningModule], Any]:
    """LightningCLI's generated ``configure_optimizers``, re-pointing its (not yet stepped) optimizer's param groups at
    the module's parameters of the same names first."""

    def configure_optimizers(lightning_module: LightningModule) -> Any:
        optimizer: Optimizer = generated.keywords["optimizer"]
        current = dict(lightning_module.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [current.get(names.get(id(p), ""), p) for p in group["params"]]
        return generated(lightning_module)

    update_wrapper(configure_optimizers, generated)  # keeps `is_overridden` seeing the CLI's method
    return configure_optimizers


# this package's own subcommands: the module whose `main(argv) -> int | None` runs each
_SUBCOMMANDS = {
    "export": "lightning_memopt.export",
    "estimate": "lightning_memopt.estimate",
    "plot": "lightning_memopt.plot",
    "recipes": "lightning_memopt.recipes",
}


def main(args: ArgsType = None) -> None:
    """Entry point of ``lightning-memopt`` and ``python -m lightning_memopt``.

    ``export``, ``estimate``, ``plot`` and ``recipes`` are this package's own subcommands (see
    :mod:`lightning_memopt.export`, :mod:`lightning_memopt.estimate`, :mod:`lightning_memopt.plot` and
    :mod:`lightning_memopt.recipes`); everything else goes to LightningCLI
    (``fit``, ``validate``, ``test``, ``predict``).

    ``lightning-memopt --version`` prints the installed version.

    Example::

        >>> main(["fit", "--config", "recipes/quickstart.yaml", "--trainer.max_steps", "10"])  # doctest: +SKIP
        >>> main(["recipes", "copy", "quickstart", "configs/"])  # doctest: +SKIP
        >>> main(["export", "last.ckpt", "exported/"])  # doctest: +SKIP
        >>> main(["estimate", "--model", "llama-3-8b", "--gpu-memory", "24GB"])  # doctest: +SKIP
        >>> main(["plot", "runs/quickstart"])  # doctest: +SKIP
    """
    argv = sys.argv[1:] if args is None else args
    words = [str(word) for word in argv] if isinstance(argv, (list, tuple)) else []  # not a parsed config dict
    if words[:1] in (["--version"], ["-V"]):
        print(f"lightning-memopt {lightning_memopt.__version__}")
        return
    command = _SUBCOMMANDS.get(words[0]) if words else None
    if command is not None:
        # dispatched before LightningCLI parses argv: its parser knows only the Trainer's subcommands
        code = import_module(command).main(words[1:])
        if code:
            raise SystemExit(code)
        return
    quiet_library_noise()
    MemoptCLI(args=args)
    finish_distributed()  # a clean teardown on every rank, not at interpreter exit
