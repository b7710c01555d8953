"""Inf/NaN under bf16-true: the step is skipped with a warning, and a streak stops the run; no NaN reaches a weight."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from models import LlamaModule, trainer_kwargs, weights

from lightning_memopt import BAdamStrategy, BlockSwitch


class NaNLossAt(LlamaModule):
    def __init__(self, bad_steps: set[int], **kwargs):
        super().__init__(num_layers=2, **kwargs)
        self.bad_steps = bad_steps

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step in self.bad_steps else loss


class Snapshots(Callback):
    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        self.masters: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(weights(pl_module))
        self.masters.append({n: m.detach().clone() for n, m in trainer.strategy.master_params.items()})


@pytest.mark.parametrize("precision", ["bf16-true", "32-true"])
def test_nan_step_is_skipped_with_a_warning(tmp_path, precision):
    snaps = Snapshots()
    trainer = L.Trainer(
        strategy=BAdamStrategy(),
        precision=precision,
        max_steps=4,
        callbacks=[BlockSwitch(order="fixed"), snaps],
        **trainer_kwargs(tmp_path),
    )
    with pytest.warns(UserWarning, match="inf/NaN gradients at step 2; the optimizer step was skipped"):
        trainer.fit(NaNLossAt({2}))
    w, m = snaps.weights, snaps.masters
    for k in w[1]:
        assert torch.equal(w[1][k], w[2][k]), k
    for k in m[1]:
        assert torch.equal(m[1][k], m[2][k]), k
    assert any(not torch.equal(w[2][k], w[3][k]) for k in w[2])  # training goes on after the bad step
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())


def test_a_streak_of_nan_steps_stops_the_run_with_a_clear_error(tmp_path):
    model = NaNLossAt({1, 2, 3, 4})
    trainer = L.Trainer(
        strategy=BAdamStrategy(max_nonfinite_steps=3),
        precision="bf16-true",
        max_steps=8,
        callbacks=[BlockSwitch(order="fixed")],
        **trainer_kwargs(tmp_path),
    )
    with pytest.warns(UserWarning, match="skipped"), pytest.raises(RuntimeError, match="3 optimizer steps in a row"):
        trainer.fit(model)
    assert trainer.global_step == 3  # steps 1 and 2 were skipped (but counted), step 3 raised
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_max_nonfinite_steps_is_validated():
    with pytest.raises(ValueError, match="max_nonfinite_steps must be an int >= 1"):
        BAdamStrategy(max_nonfinite_steps=0)


def test_fp16_nan_loss_skips_the_step_and_lowers_the_scale(tmp_path):
    """NaN (not only inf) under 16-true: the loss scaler skips the step and backs off; nothing NaN reaches a weight."""
    scales: list[tuple[float, bool]] = []

    class Scale(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            plugin = trainer.precision_plugin
            scales.append((plugin.scaler.get_scale(), plugin.last_step_skipped))

    snaps = Snapshots()
    trainer = L.Trainer(
        strategy=BAdamStrategy(),
        precision="16-true",
        max_steps=3,
        callbacks=[BlockSwitch(order="fixed"), snaps, Scale()],
        **trainer_kwargs(tmp_path),
    )
    trainer.fit(NaNLossAt({1}, hidden=16, n=6, batch_size=2))  # fp16 on CPU is slow: the smallest model
    assert scales == [(2.0**16, False), (2.0**15, True), (2.0**15, False)]
    w, m = snaps.weights, snaps.masters
    for k in w[0]:
        assert torch.equal(w[0][k], w[1][k]), k
    for k in m[0]:
        assert torch.equal(m[0][k], m[1][k]), k
    assert any(not torch.equal(w[1][k], w[2][k]) for k in w[1])  # the next step trains again
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())
    assert all(torch.isfinite(t).all() for t in m[-1].values())
