"""StateFreeUpdates: signSGD/SGD for the blocks outside BAdam's active one, with stochastic rounding into half weights.

Unit tests of the rule and of stochastic rounding (unbiased over many draws; round-to-nearest, on the same draws, is
not); end to end with real Trainers: in ``32-true`` every inactive parameter moves by exactly the rule's amount with
its param group's lr, in ``bf16-true``/``16-true`` by that amount up to the stochastic rounding bracket; inf/NaN steps
move nothing; exact resume; two gloo ranks stay bit-identical and apply the all-reduced gradient.
"""

from __future__ import annotations

import doctest
import json
import math
import os
import subprocess
import sys
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from ddp_smarter_run import launch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import LlamaModule, token_loader, trainer_kwargs, weights
from test_resume import _assert_weights_equal

import lightning_memopt.callbacks.state_free
import lightning_memopt.rounding
from lightning_memopt import BAdamFSDPStrategy, BAdamStrategy, BlockSwitch, MasterGradScalerPrecision
from lightning_memopt.callbacks.state_free import StateFreeUpdates, state_free_direction
from lightning_memopt.rounding import stochastic_round


@pytest.mark.parametrize("module", [lightning_memopt.rounding, lightning_memopt.callbacks.state_free])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------------------------- stochastic rounding
def neighbours(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The representable values of ``dtype`` just below and just above each FP32 value (equal if representable)."""
    nearest = x.to(dtype)
    above = nearest.float() > x
    below = nearest.float() < x
    down = torch.nextafter(nearest, torch.full_like(nearest, -math.inf))
    up = torch.nextafter(nearest, torch.full_like(nearest, math.inf))
    return torch.where(above, down, nearest).float(), torch.where(below, up, nearest).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.77])
@pytest.mark.parametrize("base", [1.0, -3.0, 2.0**-10, -(2.0**-20)])
def test_stochastic_rounding_is_unbiased(dtype, fraction, base):
    lower = torch.tensor([base]).to(dtype)
    upper = torch.nextafter(lower, torch.full_like(lower, math.inf))
    gap = float(upper.float() - lower.float())
    x = float(lower.float()) + fraction * gap
    draws = 100_000
    values = torch.full((draws,), x)
    rounded = stochastic_round(values, dtype, torch.Generator().manual_seed(1)).double()
    assert set(rounded.unique().tolist()) <= {float(lower.float()), float(upper.float())}
    sigma = gap * math.sqrt(fraction * (1 - fraction) / draws)
    assert abs(float(rounded.mean()) - x) < 5 * sigma
    # round-to-nearest on the same values is biased by min(f, 1 - f) gaps: far outside the same band
    assert abs(float(values.to(dtype).double().mean()) - x) > 50 * sigma


def test_stochastic_rounding_keeps_exact_values_and_specials_and_is_seeded():
    x = torch.tensor([0.0, -1.5, 1024.0, math.inf, -math.inf, math.nan, 1e39])
    for dtype in (torch.bfloat16, torch.float16):
        out = stochastic_round(x, dtype, torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, x.to(dtype), equal_nan=True)
    x = torch.randn(1000) * 1e-3
    a = stochastic_round(x, torch.bfloat16, torch.Generator().manual_seed(7))
    b = stochastic_round(x, torch.bfloat16, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    down, up = neighbours(x, torch.bfloat16)
    assert bool(((a.float() == down) | (a.float() == up)).all())
    with pytest.raises(ValueError, match=r"bfloat16 or torch\.float16"):
        stochastic_round(x, torch.int8)


def test_small_updates_add_up_only_with_stochastic_rounding():
    # 2000 steps of 1e-5 on bf16 weights of 1.0 (ulp 2^-7 ~ 0.0078): round-to-nearest keeps 1.0 forever
    generator = torch.Generator().manual_seed(0)
    sr = torch.ones(4096, dtype=torch.bfloat16)
    rn = torch.ones(4096, dtype=torch.bfloat16)
    for _ in range(2000):
        sr = stochastic_round(sr.float() + 1e-5, torch.bfloat16, generator)
        rn = (rn.float() + 1e-5).to(torch.bfloat16)
    assert torch.equal(rn, torch.ones_like(rn))
    assert float(sr.double().mean()) == pytest.approx(1.02, abs=2e-3)


# ---------------------------------------------------------------------------------------------- the rule
def test_rules_and_arguments():
    g = torch.tensor([3.0, -0.5, 0.0], dtype=torch.bfloat16)
    assert state_free_direction(g, "signsgd").tolist() == [1.0, -1.0, 0.0]
    assert state_free_direction(g, "sgd", grad_scale=2.0).tolist() == [1.5, -0.25, 0.0]
    assert state_free_direction(g, "sgd").dtype == torch.float32
    with pytest.raises(ValueError, match="signsgd, sgd"):
        state_free_direction(g, "adam")  # type: ignore[arg-type]
    for kwargs, match in [
        ({"rule": "lion"}, "not known"),
        ({"lr_ratio": 0.0}, "must be > 0"),
        ({"lr_ratio": math.nan}, "finite"),
        ({"bucket_cap_mb": 0}, "bucket_cap_mb"),
    ]:
        with pytest.raises(ValueError, match=match):
            StateFreeUpdates(**kwargs)


# ---------------------------------------------------------------------------------------------- real Trainers
class TwoGroups(LlamaModule):
    """Layer 0 at lr, everything else at lr / 10; a frozen embedding; a configurable sequence; an inf loss step."""

    def __init__(self, seq: int = 16, inf_step: int = -1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seq = seq
        self.inf_step = inf_step
        self.model.model.embed_tokens.weight.requires_grad_(False)

    def train_dataloader(self):
        return token_loader(n=self.n, seq=self.seq, batch_size=self.batch_size)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * math.inf if self.global_step == self.inf_step else loss

    def configure_optimizers(self):
        first = [p for n, p in self.named_parameters() if n.startswith("model.model.layers.0.") and p.requires_grad]
        rest = [p for n, p in self.named_parameters() if not n.startswith("model.model.layers.0.") and p.requires_grad]
        return torch.optim.AdamW([{"params": first}, {"params": rest, "lr": self.lr / 10}], lr=self.lr)


class Snapshot(Callback):
    """Before StateFreeUpdates: each inactive block parameter's weight and gradient, and its group's lr; after the
    step, its new weight and whether its gradient was freed."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        strategy = trainer.strategy
        masters = strategy.master_params
        lrs = {n: float(optimizer.param_groups[i]["lr"]) for i, ns in enumerate(strategy.param_group_names) for n in ns}
        inactive = {n for b in strategy.blocks for n in b.param_names} - set(masters)
        params = dict(pl_module.named_parameters())
        self.steps.append(
            {
                "before": {n: params[n].detach().clone() for n in params},
                "grads": {n: params[n].grad.detach().clone() for n in inactive if params[n].grad is not None},
                "lr": {n: lrs[n] for n in inactive},
                "scale": float(trainer.precision_plugin.scaler.get_scale())
                if isinstance(trainer.precision_plugin, MasterGradScalerPrecision)
                else 1.0,
                "active": set(masters),
            }
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = self.steps[-1]
        step["after"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        step["leftover_grads"] = [n for n in step["grads"] if pl_module.get_parameter(n).grad is not None]


def fit(root, precision: str, max_steps: int, rule="signsgd", ckpt_path=None, save_every=None, **module_kwargs):
    module = TwoGroups(num_layers=3, hidden=16, lr=1e-2, n=8, batch_size=4, **module_kwargs)
    snapshot = Snapshot()
    state_free = StateFreeUpdates(rule=rule, lr_ratio=0.5 if rule == "signsgd" else 20.0, seed=5)
    callbacks: list[Callback] = [BlockSwitch(every=2, order="ascending"), snapshot, state_free]
    if save_every:
        callbacks.append(ModelCheckpoint(root, filename="{step}", every_n_train_steps=save_every, save_top_k=-1))
    trainer = pl.Trainer(
        strategy=BAdamStrategy(),
        precision=precision,
        callbacks=callbacks,
        max_steps=max_steps,
        **trainer_kwargs(root, enable_checkpointing=bool(save_every)),
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, trainer, snapshot, state_free


def expected_update(step: dict[str, Any], name: str, rule: str, ratio: float) -> torch.Tensor:
    direction = state_free_direction(step["grads"][name], rule, step["scale"])  # type: ignore[arg-type]
    return step["before"][name].float().add(direction, alpha=-ratio * step["lr"][name])


@pytest.mark.parametrize("rule", ["signsgd", "sgd"])
def test_inactive_blocks_move_by_exactly_the_rule_in_32_true(tmp_path, rule):
    module, trainer, snapshot, _ = fit(tmp_path, "32-true", max_steps=4, rule=rule)
    ratio = 0.5 if rule == "signsgd" else 20.0
    blocks = trainer.strategy.blocks
    for step in snapshot.steps:
        inactive = {n for b in blocks for n in b.param_names} - step["active"]
        assert set(step["grads"]) == inactive and len(inactive) == 2 * len(blocks[0].param_names)
        assert {step["lr"][n] for n in inactive} >= {1e-3}  # layers 1 and 2 are in the lr / 10 group
        for name in inactive:
            assert torch.equal(step["after"][name], expected_update(step, name, rule, ratio)), name
        assert step["leftover_grads"] == []  # the half gradients are freed every step
        # parameters outside every block (final norm) and the frozen embedding never move
        for name in ("model.model.norm.weight", "model.model.embed_tokens.weight"):
            assert torch.equal(step["after"][name], step["before"][name])
    # the strategy's teardown restored requires_grad, including the user's frozen embedding
    assert not module.model.model.embed_tokens.weight.requires_grad
    assert all(p.requires_grad for n, p in module.named_parameters() if "embed_tokens" not in n)


@pytest.mark.parametrize(("precision", "rule"), [("bf16-true", "signsgd"), ("16-true", "sgd")])
def test_half_weights_move_by_the_rule_up_to_stochastic_rounding(tmp_path, precision, rule):
    # 16-true: the gradients are loss-scaled; an inf loss at step 2 skips the whole step (active block included)
    inf_step = 2 if precision == "16-true" else -1
    _, _, snapshot, state_free = fit(tmp_path, precision, max_steps=4, rule=rule, seq=8, inf_step=inf_step)
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float16
    ratio = 0.5 if rule == "signsgd" else 20.0
    moved = eligible = 0
    for i, step in enumerate(snapshot.steps):
        if i == inf_step:
            assert all(torch.equal(step["after"][n], step["before"][n]) for n in step["after"])
            continue
        for name in step["grads"]:
            x = expected_update(step, name, rule, ratio)
            down, up = neighbours(x, dtype)
            after = step["after"][name].float()
            assert bool(((after == down) | (after == up)).all()), name
            moved += not torch.equal(step["after"][name], step["before"][name])
            eligible += 1
        assert step["leftover_grads"] == []
    assert moved >= 0.75 * eligible  # not a no-op (the old weight is often inside the bracket of a small update)
    assert state_free.skipped_steps == (1 if inf_step >= 0 else 0)
    if precision == "16-true":
        assert snapshot.steps[0]["scale"] > 1  # the unscaling was exercised


def test_exact_resume_restores_the_rounding_generator(tmp_path):
    reference = fit(tmp_path / "ref", "bf16-true", max_steps=6)
    fit(tmp_path / "first", "bf16-true", max_steps=2, save_every=2)
    path = tmp_path / "first" / "step=2.ckpt"
    saved = torch.load(path, weights_only=True)["callbacks"]
    state = next(v for k, v in saved.items() if k.startswith("StateFreeUpdates"))
    assert state["generator"].dtype == torch.uint8
    resumed = fit(tmp_path / "second", "bf16-true", max_steps=6, ckpt_path=str(path))
    _assert_weights_equal(weights(reference[0]), weights(resumed[0]))
    assert torch.equal(reference[3].state_dict()["generator"], resumed[3].state_dict()["generator"])
    # a fresh generator (no restore) would round differently: the restore is what makes the run exact
    fresh = fit(tmp_path / "fresh", "bf16-true", max_steps=4)
    assert not torch.equal(fresh[3].state_dict()["generator"], resumed[3].state_dict()["generator"])


def test_needs_a_non_sharded_badam_strategy(tmp_path):
    trainer = pl.Trainer(callbacks=[StateFreeUpdates()], max_steps=1, **trainer_kwargs(tmp_path))
    with pytest.raises(MisconfigurationException, match="strategy='badam'"):
        trainer.fit(LlamaModule(num_layers=2, hidden=16))
    # one in-process rank: it opens a process group and sets MASTER_PORT, which later launches in this worker would
    # inherit and find taken; leave neither behind
    environ = dict(os.environ)
    try:
        trainer = pl.Trainer(
            strategy=BAdamFSDPStrategy(), callbacks=[StateFreeUpdates()], max_steps=1, **trainer_kwargs(tmp_path)
        )
        with pytest.raises(MisconfigurationException, match="BAdamFSDPStrategy"):
            trainer.fit(LlamaModule(num_layers=2, hidden=16))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)


# ---------------------------------------------------------------------------------------------- two processes
@pytest.mark.xdist_group("ddp")
def test_two_ranks_apply_the_all_reduced_update_and_stay_identical(tmp_path):
    args = ["--state-free", "--lr-ratio", "0.5", "--granularity", "module", "--budget", "0.3", "--steps", "6"]
    r0, r1 = launch(tmp_path, *args)
    assert r0["world_size"] == 2
    # the same sets of blocks, scores, rounding generator and bit-identical weights on both ranks
    assert r0["sets"] == r1["sets"] and r0["scores"] == r1["scores"]
    assert torch.equal(r0["rounding_state"], r1["rounding_state"])
    for name in r0["weights"]:
        assert torch.equal(r0["weights"][name], r1["weights"][name]), name
    # step 0: each rank saw its own half of the batch; the update follows the sign of the FP32 average of both
    step = 0.5 * r0["lr"]
    grads0, grads1 = r0["first_local_grads"], r1["first_local_grads"]
    assert grads0.keys() == grads1.keys() and grads0
    differs = 0
    for name, g0 in grads0.items():
        mean = (g0.float() + grads1[name].float()) / 2
        differs += not torch.equal(torch.sign(g0), torch.sign(mean))
        x = r0["first_weights"][name].float().add(torch.sign(mean), alpha=-step)
        down, up = neighbours(x, torch.bfloat16)
        after = r0["after_first"][name].float()
        assert bool(((after == down) | (after == up)).all()), name
    assert differs > 0  # a rank's own gradient would have given other signs: the all-reduce mattered


# ---------------------------------------------------------------------------------------------- the benchmark rows
def test_benchmark_rows_measure_the_extra_gradient_memory(tmp_path):
    from lightning_memopt.bench import BenchConfig
    from lightning_memopt.bench.smarter_blocks import SMARTER_METHODS
    from lightning_memopt.blocks import partition
    from lightning_memopt.lm import CausalLM

    tiny = ["--layers", "2", "--hidden", "32", "--steps", "4", "--warmup", "1", "--every", "2", "--eval-batches", "2"]
    tiny += ["--max-bytes", "100000", "--memory-every", "2", "--seeds", "0", "--out", str(tmp_path)]
    command = [sys.executable, "-m", "lightning_memopt.bench.smarter_blocks"]
    command += ["--methods", "badam-random,badam-statefree"]
    proc = subprocess.run(
        [*command, *tiny],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("smarter.json", "smarter.md", "smarter_loss.png"):
        assert (tmp_path / name).stat().st_size > 0
    plain, state_free = json.loads((tmp_path / "smarter.json").read_text())["rows"]
    assert plain["sets"] == state_free["sets"] and len(plain["loss_curve"]) == 4
    # bf16: the active block's FP32 master gradients (4 bytes), plus, with StateFreeUpdates, a bf16 gradient (2 bytes)
    # for every other block parameter when the step begins
    config = BenchConfig(layers=2, hidden=32)
    sizes = [
        sum(p.numel() for n, p in CausalLM(config=config.model_config()).named_parameters() if n in b.param_names)
        for b in partition(CausalLM(config=config.model_config()), include_embedding=True, include_lm_head=True)
    ]
    largest = max(sizes[i] for (i,) in plain["sets"])
    assert plain["grad_bytes_at_step"] == 4 * largest
    assert state_free["grad_bytes_at_step"] == 4 * largest + 2 * (sum(sizes) - largest)
    assert SMARTER_METHODS["badam-statefree"].method().callbacks == ("StateFreeUpdates",)
