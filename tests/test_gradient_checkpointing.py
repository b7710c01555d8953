"""Gradient checkpointing as users run it: ``CausalLM(gradient_checkpointing=True)`` under BAdam, across block switches.

Two things must hold at every step, whichever block is active: the checkpointed run computes exactly what the plain
run computes (same weights after every step, bit for bit), and backward still stops at the active block. A layer whose
forward runs again during backward is one that backward reached (checkpointing recomputes a layer only when its
backward needs the saved activations), so counting each layer's calls per step shows how far backward went.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from lightning_memopt import BAdamStrategy, BlockSwitch
from lightning_memopt.data import TextDataModule
from lightning_memopt.lm import CausalLM

LAYERS = 3
CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": LAYERS, "num_attention_heads": 2}


class LayerCalls(Callback):
    """Per optimizer step: how often each decoder layer's attention ran, and which layers the active block covers."""

    def __init__(self, layers: torch.nn.ModuleList) -> None:
        self.calls = [0] * len(layers)
        self.per_step: list[list[int]] = []
        self.active_layers: list[set[int]] = []
        for i, layer in enumerate(layers):
            # transformers checkpoints the layer's `forward`, so only hooks inside it see the recomputation
            layer.self_attn.register_forward_pre_hook(lambda *_, i=i: self._count(i))

    def _count(self, i: int) -> None:
        self.calls[i] += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        strategy = trainer.strategy
        names = [n for i in strategy.active_blocks for n in strategy.blocks[i].param_names]
        self.active_layers.append({int(n.split("layers.")[1].split(".")[0]) for n in names})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.per_step.append(self.calls)
        self.calls = [0] * len(self.calls)


def _run(tmp_path: Path, checkpointing: str | None, granularity: str, steps: int):
    seed_everything(0)
    model = CausalLM(
        config=CONFIG,
        lr=1e-2,
        gradient_checkpointing=checkpointing is not None,
        gradient_checkpointing_reentrant=checkpointing == "reentrant",
    )
    layers = model.model.model.layers
    record = LayerCalls(layers)
    start = {n: p.detach().to(torch.bfloat16).float() for n, p in model.named_parameters()}  # as bf16-true holds them
    snapshots: list[dict[str, torch.Tensor]] = []

    class Snapshot(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        precision="bf16-true",
        strategy=BAdamStrategy(granularity=granularity),
        max_steps=steps,
        limit_val_batches=0,
        callbacks=[BlockSwitch(every=1, order="ascending"), record, Snapshot()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, TextDataModule(seq_len=16, batch_size=2, max_bytes=20_000))
    return trainer, record, start, snapshots


@pytest.mark.parametrize("granularity", ["layer", "module"])
@pytest.mark.parametrize("checkpointing", ["reentrant", "non_reentrant"])
def test_checkpointed_model_trains_like_the_plain_one_and_backward_stops_at_the_active_block(
    tmp_path, checkpointing, granularity
):
    blocks = LAYERS if granularity == "layer" else 4 * LAYERS  # attention, MLP, two norms per layer
    steps = blocks + 1  # every block once, then the first again: the input hook follows each switch and comes back
    trainer, record, start, got = _run(tmp_path / "ckpt", checkpointing, granularity, steps)
    _, plain_record, _, expected = _run(tmp_path / "plain", None, granularity, steps)
    assert len(trainer.strategy.blocks) == blocks

    # backward reaches the active block's layer and those above it, never a layer below
    assert len(record.per_step) == steps
    for step, (calls, active) in enumerate(zip(record.per_step, record.active_layers, strict=True)):
        lowest = min(active)
        assert calls == [1 if i < lowest else 2 for i in range(LAYERS)], (step, active, calls)
    assert all(calls == [1] * LAYERS for calls in plain_record.per_step)  # nothing recomputed without checkpointing

    # the same update at every step, bit for bit, and every layer's weights moved by a few learning rates
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        for name in a:
            assert torch.equal(a[name], b[name]), (step, name)
    for i in range(LAYERS):
        prefix = f"model.model.layers.{i}."
        moved = [(got[-1][n].float() - start[n]).abs().max().item() for n in start if n.startswith(prefix)]
        assert min(moved) > 5e-3, (i, moved)  # each AdamW step moves an element by about lr = 1e-2
    frozen = [n for n in start if ".layers." not in n]
    assert frozen and all(torch.equal(got[-1][n].float(), start[n]) for n in frozen)
