"""Small real models and data for the tests: tiny Hugging Face Llama inside an unchanged LightningModule."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

VOCAB = 64


def tiny_llama(num_layers: int = 4, hidden: int = 32, vocab: int = VOCAB, **overrides: Any):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    cfg.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def token_loader(n: int = 64, seq: int = 16, batch_size: int = 4, vocab: int = VOCAB, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (n, seq), generator=g)
    return DataLoader(TensorDataset(data), batch_size=batch_size, shuffle=False)


class LlamaModule(L.LightningModule):
    """An ordinary LightningModule: nothing in it knows about BAdam."""

    def __init__(
        self,
        num_layers: int = 4,
        hidden: int = 32,
        lr: float = 1e-3,
        optimizer: str = "adamw",
        weight_decay: float = 0.0,
        n: int = 64,
        batch_size: int = 4,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        self.model = tiny_llama(num_layers, hidden, **model_kwargs)
        self.lr = lr
        self.optimizer_name = optimizer
        self.weight_decay = weight_decay
        self.n = n
        self.batch_size = batch_size

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = self.model(input_ids=x, labels=x).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def train_dataloader(self):
        return token_loader(n=self.n, batch_size=self.batch_size)

    def configure_optimizers(self):
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if self.optimizer_name == "galore":  # rank 4, a new projection every 2 steps
            from galore_torch import GaLoreAdamW

            from lightning_memopt import low_rank_param_groups

            groups = low_rank_param_groups(self, rank=4, update_proj_gap=2)
            return GaLoreAdamW(groups, lr=self.lr, weight_decay=self.weight_decay, no_deprecation_warning=True)
        if self.optimizer_name == "flora":  # compressed momentum at rank 4, a new projection every 2 steps
            from flora_opt import Flora

            return Flora(self.parameters(), lr=self.lr, rank=4, beta1=0.9, kappa=2)
        if self.optimizer_name == "foam":  # blocks of 4 values per row
            from lightning_memopt.optim import FOAM

            return FOAM(self.parameters(), lr=self.lr, fold_level=2, weight_decay=self.weight_decay)
        if self.optimizer_name == "adamw4bit":  # torchao's 4-bit state
            from torchao.optim import AdamW4bit

            return AdamW4bit(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        raise ValueError(self.optimizer_name)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def trainer_kwargs(tmp_path, **overrides: Any) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kw.update(overrides)
    return kw
