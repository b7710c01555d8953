"""A callback for recipe runs: how often each decoder layer's attention ran during every training step.

With gradient checkpointing on, a layer that backward reaches runs twice (forward, then recomputed in backward), one
that it does not reach once. Under BAdam backward stops at the active block: the layers from the active one up run
twice, those below it once. Written per rank to ``recompute-rank{N}.json`` in the trainer's root directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class RecomputeProbe(Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self._calls: dict[int, int] = {}
        self._layers = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        layers = pl_module.model.model.layers
        self._layers = len(layers)
        for index, layer in enumerate(layers):
            layer.self_attn.register_forward_pre_hook(self._counter(index))

    def _counter(self, index: int) -> Any:
        def count(module: Any, args: Any) -> None:
            self._calls[index] = self._calls.get(index, 0) + 1

        return count

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._calls = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        strategy = trainer.strategy
        active = strategy.blocks[strategy.active_block].name
        self.steps.append({"active": active, "calls": [self._calls.get(i, 0) for i in range(self._layers)]})

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = Path(trainer.default_root_dir) / f"recompute-rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.steps))
