"""``16-true`` (fp16 weights, dynamic loss scaling on the FP32 masters) combined with what users combine it with:
gradient accumulation, gradient checkpointing, 8-bit optimizer state and the importance order.

Each combination is checked against a reference computed independently (by hand on a copy of the fp16 model, or a
run without the combined feature), and with an overflow step where the combination could let it leak. fp16 matmuls
are very slow on CPU: tiny models and a handful of steps.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import HalfPrecision
from models import trainer_kwargs, weights
from test_eight_bit import MIN_8BIT, _assert_state_layout, _state_of
from test_precision_and_grads import TINY, InfLossAt, StepSnapshots, first_step_master_grads

from lightning_memopt import BAdamStrategy, BlockSwitch
from lightning_memopt.callbacks.eight_bit import EightBitState


class MasterGrads(pl.Callback):
    """The active block's FP32 master gradients at every optimizer step (unscaled, before clipping)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        masters = trainer.strategy.master_params
        self.grads.append({n: m.grad.detach().clone() for n, m in masters.items() if m.grad is not None})


def _fit(tmp_path, module, callbacks, switch, **overrides: Any) -> pl.Trainer:
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, precision="16-true", **overrides),
        strategy=BAdamStrategy(),
        callbacks=[switch, *callbacks],
    )
    trainer.fit(module)
    return trainer


def test_accumulated_fp16_gradients_are_the_unscaled_sum_and_one_overflow_skips_the_whole_step(tmp_path):
    accumulate = 2
    module = InfLossAt(inf_step=1, **TINY)
    reference = copy.deepcopy(module).half()
    grads, snaps = MasterGrads(), StepSnapshots()
    trainer = _fit(
        tmp_path, module, [grads, snaps], BlockSwitch(every=100, order="fixed", start=1),
        max_steps=3, accumulate_grad_batches=accumulate,
    )  # fmt: skip
    names = set(trainer.strategy.blocks[1].param_names)

    # step 0, by hand: each micro-batch's fp16 backward of scale * loss / 2, summed in FP32, divided by the scale
    scale = 2.0**16  # no overflow before step 1, so the initial scale
    loader = iter(module.train_dataloader())
    expected = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in reference.named_parameters() if n in names}
    for _ in range(accumulate):
        (x,) = next(loader)
        reference.zero_grad(set_to_none=True)
        with HalfPrecision("16-true").forward_context():
            (reference.model(input_ids=x, labels=x).loss * (scale / accumulate)).backward()
        for n, p in reference.named_parameters():
            if n in names:
                expected[n] += p.grad.float()
    assert set(grads.grads[0]) == names
    for n, grad in grads.grads[0].items():
        assert grad.abs().sum() > 0, n
        torch.testing.assert_close(grad, expected[n] / scale, rtol=1e-6, atol=0, msg=n)

    # step 1: its first micro-batch overflows (the loss is inf); the step is skipped as a whole, for every parameter
    # of the block, although the second micro-batch was finite; the scale halves and step 2 trains again
    rows = snaps.rows
    assert [r["step"] for r in rows] == [0, 0, 1, 1, 2, 2]
    first, last = rows[2], rows[3]  # the two micro-batches of step 1
    assert last["skipped"] and last["s1"] == first["s0"] / 2
    for n in first["w0"]:
        assert torch.equal(first["w0"][n], last["w1"][n]), n
    for n in names:
        assert torch.equal(first["m0"][n], last["m1"][n]), n
    assert not rows[5]["skipped"]
    assert any(not torch.equal(rows[4]["w0"][n], rows[5]["w1"][n]) for n in names)


@pytest.mark.parametrize("checkpointing", ["reentrant", "non_reentrant"])
def test_fp16_gradient_checkpointing_gives_the_same_master_grads(tmp_path, checkpointing):
    reference = first_step_master_grads(tmp_path, "16-true", 1, None)
    got = first_step_master_grads(tmp_path, "16-true", 1, checkpointing)
    assert got["forward_calls"] == 2  # the active layer really was recomputed in backward
    assert set(got["grads"]) == set(reference["grads"]) == set(got["names"])
    for name, grad in got["grads"].items():
        assert grad.dtype == torch.float32 and grad.abs().sum() > 0, name
        # unscaled: an fp16 gradient of the scaled loss divided by 2**16 is ~1e-3, not ~1e2
        assert grad.abs().max() < 10, name
        torch.testing.assert_close(grad, reference["grads"][name], rtol=0, atol=0, msg=name)


def test_eight_bit_state_under_fp16_skips_overflow_steps_and_trains(tmp_path):
    lr = 1e-2
    # hidden 64: the attention and MLP matrices have >= 4096 values, enough for 8-bit state
    module = InfLossAt(inf_step=1, num_layers=2, hidden=64, seq=8, n=8, batch_size=2, lr=lr)
    start = {n: w.half() for n, w in weights(module).items()}
    states: list[dict[str, Any]] = []

    class State(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            masters = trainer.strategy.master_params
            state = _state_of(trainer.optimizers[0], masters)
            states.append(
                {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for n, s in state.items()}
            )

    snaps = StepSnapshots()
    trainer = _fit(
        tmp_path, module, [EightBitState(), State(), snaps], BlockSwitch(every=100, order="fixed", start=0),
        max_steps=3,
    )  # fmt: skip
    import bitsandbytes as bnb

    assert type(trainer.optimizers[0]) is bnb.optim.AdamW8bit
    masters = trainer.strategy.master_params
    for n, master in masters.items():
        _assert_state_layout(states[-1][n], master, master.numel() >= MIN_8BIT, n)
    assert any(m.numel() >= MIN_8BIT for m in masters.values())

    # step 0 trains: Adam's first step moves each element by about lr (8-bit m and v keep m / sqrt(v) near +-1)
    moved = max((snaps.rows[0]["w1"][n].float() - start[n].float()).abs().max().item() for n in masters)
    assert 0.5 * lr < moved < 1.5 * lr, moved
    # step 1 overflows: the weights, the masters and the 8-bit state (codes, block maxima, step count) stay as they were
    assert snaps.rows[1]["skipped"] and snaps.rows[1]["s1"] == snaps.rows[1]["s0"] / 2
    for n in masters:
        assert torch.equal(snaps.rows[1]["w0"][n], snaps.rows[1]["w1"][n]), n
        for key, value in states[0][n].items():
            same = torch.equal(value, states[1][n][key]) if torch.is_tensor(value) else value == states[1][n][key]
            assert same, (n, key)
    # step 2 trains again, from the state of step 0
    assert not snaps.rows[2]["skipped"]
    assert {s["step"] for s in states[2].values()} == {2}
    assert any(not torch.equal(snaps.rows[2]["w0"][n], snaps.rows[2]["w1"][n]) for n in masters)


def test_importance_scores_under_fp16_come_from_unscaled_gradients_and_skip_overflow_steps(tmp_path):
    module = InfLossAt(inf_step=1, **TINY)
    grads = MasterGrads()
    switch = BlockSwitch(every=1, order="importance", seed=0)
    scores: list[list[float | None]] = []

    class Scores(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            scores.append(switch.scores)

    trainer = _fit(tmp_path, module, [grads, Scores()], switch, max_steps=4)
    blocks = trainer.strategy.blocks
    # every score is finite and of the size of an unscaled gradient's RMS (a scaled one would be ~2**16 larger)
    for row in scores:
        assert all(s is None or (math.isfinite(s) and 0 < s < 1) for s in row), row
    # the overflow step (1) left every score as it was; the finite steps updated the active block's score
    assert scores[1] == scores[0]
    assert sum(a != b for a, b in zip(scores[1], scores[2], strict=True)) >= 1
    # step 0's score is the active block's gradient RMS, computed here from the master gradients it saw
    first = next(i for i, s in enumerate(scores[0]) if s is not None)
    g = grads.grads[0]
    assert set(g) == set(blocks[first].param_names)
    rms = math.sqrt(sum(t.pow(2).sum().item() for t in g.values()) / sum(t.numel() for t in g.values()))
    assert scores[0][first] == pytest.approx(rms, rel=1e-5)
    assert sum(s is not None for s in scores[0]) == 1
