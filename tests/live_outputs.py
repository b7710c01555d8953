"""What the trained LightningModule itself computes at the end of fit, for a later comparison with an exported model.

``RecordOutputs(path, prompt)`` goes into a run's callbacks (a recipe's ``trainer.callbacks`` with this folder on
``PYTHONPATH``): at the end of training it encodes ``prompt`` with the datamodule's ``encode_prompt()``, runs the live
module on it (logits) and decodes greedily from it, on every rank (a sharded module's forward is a collective), and
rank 0 saves ``{"prompt_ids", "logits", "tokens"}`` to ``path`` with ``torch.save``. Nothing is rebuilt from a
checkpoint: a wrong consolidation of sharded weights cannot agree with it by construction.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_memopt.callbacks.sample_generation import greedy_generate


class RecordOutputs(Callback):
    def __init__(self, path: str, prompt: str, max_new_tokens: int = 8) -> None:
        self.path = Path(path)
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # on_train_end, not on_fit_end: the strategy has not torn down yet, the module is sharded as it trained
        ids = list(trainer.datamodule.encode_prompt(self.prompt))
        eos = pl_module.model.generation_config.eos_token_id
        stops = [eos] if isinstance(eos, int) else list(eos or [])
        strategy = trainer.strategy
        agree = (lambda token: strategy.broadcast(token, src=0)) if trainer.world_size > 1 else None
        training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                logits = pl_module(torch.tensor([ids], device=strategy.root_device))
                tokens, _ = greedy_generate(
                    pl_module, ids, self.max_new_tokens, stops, device=strategy.root_device, agree=agree
                )
        finally:
            pl_module.train(training)
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"prompt_ids": ids, "logits": logits.cpu(), "tokens": tokens}, self.path)
