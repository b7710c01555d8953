"""The update in backward: AdaLomo against the paper's equations and the authors' package, and FusedUpdateStrategy
against the same steps taken after backward (a plain PyTorch loop, and Lightning's own strategy)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import LlamaModule, token_loader, trainer_kwargs, weights

from lightning_memopt.optim import AdaLomo
from lightning_memopt.strategies import FusedUpdateStrategy


# ------------------------------------------------------------------------------------------------------- AdaLomo
def _paper_adalomo(params, grads_per_step, lr, eps1=1e-30, eps2=1e-3, d=1.0, decay=-0.8, wd=0.0):
    """AdaLomo in float64 as the paper writes it: row and column *sums*, V = R C / 1ᵀR, no library code."""
    params = [p.clone().double() for p in params]
    rows = [None] * len(params)
    cols = [None] * len(params)
    full = [None] * len(params)
    for t, grads in enumerate(grads_per_step, start=1):
        beta2 = 1.0 - t**decay
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            g = g.double()
            sq = g * g + eps1
            if g.dim() >= 2:
                r, c = sq.sum(dim=-1), sq.sum(dim=-2)
                rows[i] = r if rows[i] is None else beta2 * rows[i] + (1 - beta2) * r
                cols[i] = c if cols[i] is None else beta2 * cols[i] + (1 - beta2) * c
                v = rows[i].unsqueeze(-1) * cols[i].unsqueeze(-2) / rows[i].sum(dim=-1, keepdim=True).unsqueeze(-1)
            else:
                full[i] = sq if full[i] is None else beta2 * full[i] + (1 - beta2) * sq
                v = full[i]
            u = g / v.sqrt()
            u = u / max(1.0, float(u.pow(2).mean().sqrt()) / d)
            alpha = lr * max(eps2, float(p.pow(2).mean().sqrt()))
            params[i] = p * (1 - alpha * wd) - alpha * u
    return params


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adalomo_follows_the_papers_equations_in_float64(weight_decay):
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (7,), (3, 4, 5)]
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    # gradients of very different scales, so that the update clipping acts on some steps and not on others
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) * 10.0 ** (k - 2) for s in shapes] for k in range(5)]
    params = [torch.nn.Parameter(p.clone()) for p in start]
    optimizer = AdaLomo(params, lr=0.05, weight_decay=weight_decay)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
    expected = _paper_adalomo(start, grads, lr=0.05, wd=weight_decay)
    for got, want in zip(params, expected, strict=True):
        assert torch.allclose(got.detach(), want, rtol=1e-12, atol=1e-14)
    moved = [float((p.detach() - s).abs().max()) for p, s in zip(params, start, strict=True)]
    assert all(m > 1e-3 for m in moved)


def test_adalomo_matches_the_authors_lomo_optim_package(monkeypatch):
    import lomo_optim  # installed with the dev extra: the reference must run, not be skipped

    # the package allocates its state with .cuda(); on this CPU machine that must be a no-op
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    ours_module = LlamaModule(num_layers=2).model
    theirs_module = LlamaModule(num_layers=2).model
    theirs_module.load_state_dict(ours_module.state_dict())
    theirs = lomo_optim.AdaLomo(theirs_module, lr=1e-2, loss_scale=0)
    ours = AdaLomo(ours_module.parameters(), lr=1e-2)
    start = weights(ours_module)
    for _, (x,) in zip(range(3), token_loader(n=12), strict=False):
        loss = ours_module(input_ids=x, labels=x).loss
        loss.backward()
        ours.step()
        ours.zero_grad(set_to_none=True)
        theirs.fused_backward(theirs_module(input_ids=x, labels=x).loss, 1e-2)
    for (name, mine), (_, reference) in zip(
        ours_module.named_parameters(), theirs_module.named_parameters(), strict=True
    ):
        assert torch.allclose(mine, reference, rtol=1e-5, atol=1e-7), name
        assert not torch.equal(mine.detach(), start[name]), name


def test_adalomo_keeps_fp32_state_for_bf16_parameters_across_a_state_dict_round_trip():
    w = torch.nn.Parameter(torch.randn(4, 3).bfloat16())
    optimizer = AdaLomo([w], lr=0.1)
    w.grad = torch.randn(4, 3).bfloat16()
    optimizer.step()
    saved = optimizer.state_dict()
    fresh = AdaLomo([w], lr=0.1)
    fresh.load_state_dict(saved)
    state = fresh.state[w]
    assert state["exp_avg_sq_row"].dtype == torch.float32 and state["step"] == 1
    assert torch.equal(state["exp_avg_sq_col"], optimizer.state[w]["exp_avg_sq_col"])


# --------------------------------------------------------------------------------------- FusedUpdateStrategy
class Module(LlamaModule):
    """``LlamaModule`` with the optimizers these tests need and an optional per-step LR schedule."""

    def __init__(self, optimizer: str = "sgd-plain", scheduled: bool = False, **kwargs: Any) -> None:
        super().__init__(optimizer=optimizer, n=24, **kwargs)
        self.scheduled = scheduled

    def configure_optimizers(self):
        optimizer = build(self.optimizer_name, self.parameters(), self.lr)
        if not self.scheduled:
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def build(name: str, params, lr: float):
    params = list(params)
    if name == "sgd-plain":
        return torch.optim.SGD(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if name == "adalomo":
        return AdaLomo(params, lr=lr)
    raise ValueError(name)


LRS = {"sgd-plain": 0.5, "adamw": 1e-2, "adalomo": 1e-2}


def _fit(tmp_path, strategy, precision="32-true", steps=4, optimizer="sgd-plain", **kw) -> Module:
    model = Module(optimizer=optimizer, lr=LRS[optimizer], scheduled=kw.pop("scheduled", False))
    Trainer(**trainer_kwargs(tmp_path, strategy=strategy, precision=precision, max_steps=steps, **kw)).fit(model)
    return model


@pytest.mark.parametrize("optimizer", ["sgd-plain", "adamw", "adalomo"])
def test_fused_steps_equal_a_plain_loop_that_steps_after_backward(tmp_path, optimizer):
    monitor = LearningRateMonitor(logging_interval="step")
    fused = _fit(
        tmp_path, "fused_update", optimizer=optimizer, scheduled=True, callbacks=[monitor], logger=CSVLogger(tmp_path)
    )
    reference = Module(optimizer=optimizer, lr=LRS[optimizer]).model  # the same initial weights (seeded)
    start = weights(reference)
    opt = build(optimizer, reference.parameters(), LRS[optimizer])
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    for _, (x,) in zip(range(4), token_loader(n=24), strict=False):
        reference(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
    for name, param in reference.named_parameters():
        got = fused.model.get_parameter(name).detach()
        assert torch.allclose(got, param.detach(), rtol=1e-6, atol=1e-7), name
        assert not torch.equal(got, start[name]), name  # every parameter was trained


def test_the_lr_of_each_step_is_the_schedules(tmp_path):
    # SGD without momentum: the change of a weight in a step is exactly -lr_t * g_t, so the schedule is visible in it
    model = Module(optimizer="sgd-plain", lr=0.5, scheduled=True)
    seen: list[float] = []

    name = "model.lm_head.weight"
    param = model.get_parameter(name)

    def record(p):
        if p.grad is not None:
            seen.append((p.detach().clone(), p.grad.detach().clone()))

    param.register_post_accumulate_grad_hook(record)  # registered first: runs before the strategy's step
    trainer = Trainer(**trainer_kwargs(tmp_path, strategy="fused_update", max_steps=3))
    trainer.fit(model)
    assert len(seen) == 3
    after = [w for w, _ in seen[1:]] + [param.detach()]
    used = [float(((w0 - w1) * g).sum() / (g * g).sum()) for (w0, g), w1 in zip(seen, after, strict=True)]
    assert used == pytest.approx([0.5, 0.25, 0.5 / 3], rel=1e-5)


def test_no_gradient_outlives_its_parameters_step(tmp_path):
    model = Module(optimizer="adamw", lr=1e-2)
    live: list[int] = []
    for param in model.parameters():
        param.register_post_accumulate_grad_hook(
            lambda p: live.append(sum(q.grad is not None for q in model.parameters()))
        )
    after_backward: list[int] = []

    original = model.on_before_optimizer_step

    def on_before_optimizer_step(optimizer):
        after_backward.append(sum(p.grad is not None for p in model.parameters()))
        original(optimizer)

    model.on_before_optimizer_step = on_before_optimizer_step  # type: ignore[method-assign]
    Trainer(**trainer_kwargs(tmp_path, strategy="fused_update", max_steps=2)).fit(model)
    assert after_backward == [0, 0]  # every gradient was freed during backward
    # when a parameter's gradient is complete, at most the few whose hooks are about to run hold one
    assert max(live) <= 2, max(live)


@pytest.mark.parametrize("optimizer", ["adamw", "adalomo"])
def test_bf16_true_equals_lightnings_step_after_backward(tmp_path, optimizer):
    fused = _fit(tmp_path / "f", "fused_update", precision="bf16-true", optimizer=optimizer)
    plain = _fit(tmp_path / "p", "auto", precision="bf16-true", optimizer=optimizer)
    start = weights(Module(optimizer=optimizer).model.to(torch.bfloat16))
    for name, param in plain.named_parameters():
        got = fused.get_parameter(name).detach()
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, param.detach()), name
    assert not torch.equal(fused.model.lm_head.weight.detach(), start["lm_head.weight"])


def test_stochastic_rounding_keeps_updates_below_half_a_bf16_ulp(tmp_path):
    # lr so small that every SGD update is far below half a bf16 ulp: round-to-nearest loses all of them
    def run(strategy):
        model = Module(optimizer="sgd-plain", lr=1e-8)
        Trainer(**trainer_kwargs(tmp_path, strategy=strategy, precision="bf16-true", max_steps=3)).fit(model)
        return model

    start = weights(Module(optimizer="sgd-plain").to(torch.bfloat16))
    nearest = run("fused_update")
    rounded = run(FusedUpdateStrategy(stochastic_rounding=True, seed=3))
    changed = {
        label: sum(int((m.get_parameter(n).detach() != start[n]).sum()) for n in start)
        for label, m in (("nearest", nearest), ("stochastic", rounded))
    }
    assert changed["nearest"] == 0
    assert changed["stochastic"] > 0


@pytest.mark.parametrize(
    ("strategy", "optimizer", "precision"),
    [
        ("fused_update", "adamw", "32-true"),
        ("fused_update", "adalomo", "bf16-true"),
        ("stochastic", "adamw", "bf16-true"),
    ],
)
def test_resume_is_bit_exact(tmp_path, strategy, optimizer, precision):
    def make_strategy():
        return FusedUpdateStrategy(stochastic_rounding=True, seed=1) if strategy == "stochastic" else strategy

    # 24 samples in batches of 4: six steps per epoch; checkpoint at the epoch boundary after step 6
    straight = _fit(tmp_path / "a", make_strategy(), precision=precision, steps=9, optimizer=optimizer)
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    _fit(tmp_path / "b", make_strategy(), precision=precision, steps=6, optimizer=optimizer, callbacks=[every],
         enable_checkpointing=True)  # fmt: skip
    resumed = Module(optimizer=optimizer, lr=LRS[optimizer])
    trainer = Trainer(**trainer_kwargs(tmp_path / "c", strategy=make_strategy(), precision=precision, max_steps=9))
    trainer.fit(resumed, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=6.ckpt"))
    for name, param in straight.named_parameters():
        assert torch.equal(resumed.get_parameter(name).detach(), param.detach()), name
    if optimizer == "adalomo":
        state = next(iter(trainer.optimizers[0].state.values()))
        assert all(v.dtype == torch.float32 for k, v in state.items() if k.startswith("exp_avg_sq"))


def test_a_nan_loss_skips_the_whole_step(tmp_path):
    class NaNAtStep1(Module):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.trainer.global_step == 1 else loss

    model = NaNAtStep1(optimizer="sgd-plain", lr=0.5)
    snapshots = []

    class Snap(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots.append(weights(pl_module))

    with pytest.warns(UserWarning, match="loss is inf/NaN at step 1"):
        Trainer(**trainer_kwargs(tmp_path, strategy="fused_update", max_steps=3, callbacks=[Snap()])).fit(model)
    assert all(torch.equal(snapshots[1][n], snapshots[0][n]) for n in snapshots[0])  # step 1 changed nothing
    assert not torch.equal(snapshots[2]["model.lm_head.weight"], snapshots[1]["model.lm_head.weight"])
    assert all(torch.isfinite(w).all() for w in snapshots[2].values())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"accumulate_grad_batches": 2}, "cannot accumulate gradients"),
        ({"gradient_clip_val": 1.0}, "cannot clip by the global gradient norm.*UpdateClipping"),
        ({"precision": "16-true"}, "does not support precision='16-true'"),
    ],
)
def test_what_a_step_in_backward_cannot_do_is_refused(tmp_path, settings, message):
    model = Module(optimizer="adamw", lr=1e-2)
    before = weights(model)
    with pytest.raises(MisconfigurationException, match=message):
        Trainer(**trainer_kwargs(tmp_path, strategy="fused_update", max_steps=2, **settings)).fit(model)
    # nothing was trained (16-true has cast the weights to fp16 before the check: compare in that dtype)
    assert all(torch.equal(p.detach(), before[n].to(p.dtype)) for n, p in model.named_parameters())


def test_an_optimizer_that_couples_tensors_is_refused(tmp_path):
    class WithLBFGS(Module):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters())

    with pytest.raises(MisconfigurationException, match=r"torch.optim.LBFGS cannot be stepped one parameter"):
        Trainer(**trainer_kwargs(tmp_path, strategy="fused_update", max_steps=1)).fit(WithLBFGS())


def test_the_strategy_is_registered():
    from lightning.pytorch.strategies import StrategyRegistry

    assert "fused_update" in StrategyRegistry
    assert StrategyRegistry.get("fused_update").__class__ is FusedUpdateStrategy


# ------------------------------------------------------------------------------------- BAdam, update in backward
def _badam(tmp_path, fused: bool, optimizer: str, precision: str = "bf16-true", steps: int = 6, **kw) -> Module:
    from lightning_memopt import BAdamStrategy, BlockSwitch

    model = Module(optimizer=optimizer, lr=LRS[optimizer], num_layers=3, scheduled=kw.pop("scheduled", False))
    callbacks = [BlockSwitch(every=2, order="random", seed=5), *kw.pop("callbacks", [])]
    ckpt_path = kw.pop("ckpt_path", None)
    strategy = BAdamStrategy(fused_update=fused, include_lm_head=True)
    trainer = Trainer(
        **trainer_kwargs(tmp_path, strategy=strategy, precision=precision, max_steps=steps, callbacks=callbacks, **kw)
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize(("optimizer", "precision"), [("adamw", "bf16-true"), ("sgd-plain", "bf16-true"),
                                                      ("adalomo", "bf16-true"), ("adamw", "32-true")])  # fmt: skip
def test_badam_with_the_update_in_backward_equals_badam_without_it(tmp_path, optimizer, precision):
    fused = _badam(tmp_path / "f", True, optimizer, precision)
    plain = _badam(tmp_path / "p", False, optimizer, precision)
    start = weights(Module(optimizer=optimizer, num_layers=3).to(fused.dtype))
    for name, param in plain.named_parameters():
        assert torch.equal(fused.get_parameter(name).detach(), param.detach()), name
    moved = [n for n in start if not torch.equal(fused.get_parameter(n).detach(), start[n])]
    assert len(moved) > len(start) // 3  # three blocks of four over six steps (and the head) really trained


def test_badam_in_backward_holds_no_gradient_when_the_step_is_over(tmp_path):
    seen = []

    class Look(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            strategy = trainer.strategy
            seen.append(
                (
                    sum(m.grad is not None for m in strategy.master_params.values()),
                    sum(p.grad is not None for p in pl_module.parameters()),
                    len(strategy.master_params),
                )
            )

    _badam(tmp_path, True, "adamw", steps=3, callbacks=[Look()])
    assert [s[:2] for s in seen] == [(0, 0)] * 3 and all(s[2] > 0 for s in seen)


def test_badam_in_backward_resumes_exactly(tmp_path):
    straight = _badam(tmp_path / "a", True, "adamw", steps=9)
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    _badam(tmp_path / "b", True, "adamw", steps=6, callbacks=[every], enable_checkpointing=True)
    resumed = _badam(tmp_path / "c", True, "adamw", steps=9, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=6.ckpt"))
    for name, param in straight.named_parameters():
        assert torch.equal(resumed.get_parameter(name).detach(), param.detach()), name


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"accumulate_grad_batches": 2}, r"fused_update=True\) cannot accumulate"),
        ({"gradient_clip_val": 1.0}, r"fused_update=True\) cannot clip.*UpdateClipping"),
    ],
)
def test_badam_in_backward_refuses_what_it_cannot_do(tmp_path, settings, message):
    with pytest.raises(MisconfigurationException, match=message):
        _badam(tmp_path, True, "adamw", steps=2, **settings)


def test_badam_in_backward_refuses_16_true_and_fsdp(tmp_path):
    from lightning_memopt import BAdamFSDPStrategy

    with pytest.raises(MisconfigurationException, match="does not support precision='16-true'"):
        _badam(tmp_path, True, "sgd-plain", precision="16-true", steps=1)
    with pytest.raises(ValueError, match="BAdamFSDPStrategy does not support fused_update=True"):
        BAdamFSDPStrategy(fused_update=True)


@pytest.mark.xdist_group("ddp")
def test_badam_ddp_in_backward_equals_badam_ddp_and_ranks_agree(tmp_path):
    from test_ddp import assert_same, launch

    fused = launch(tmp_path / "f", "--steps", "4", "--fused-update")
    plain = launch(tmp_path / "p", "--steps", "4")
    assert_same(fused[0]["weights"], fused[1]["weights"])  # the gradients were averaged before each hook's step
    assert_same(fused[0]["weights"], plain[0]["weights"])
    assert fused[0]["blocks"] == plain[0]["blocks"]
    # the same FP32 bytes cross the network, one master at a time instead of in buckets
    assert fused[0]["step_bytes"] == plain[0]["step_bytes"]
    assert all(calls > 1 for calls in fused[0]["step_calls"])


@pytest.mark.parametrize("callback", ["EightBitState", "UpdateClipping", "Beta2Schedule", "RelativeStepSize"])
def test_the_packs_callbacks_work_with_the_update_in_backward(tmp_path, callback):
    from lightning_memopt import callbacks

    def run(strategy, where):
        model = Module(optimizer="adamw", lr=1e-2)
        settings = trainer_kwargs(where, strategy=strategy, precision="bf16-true", max_steps=4)
        the_callback = getattr(callbacks, callback)()
        Trainer(**settings, callbacks=[the_callback]).fit(model)
        # Beta2Schedule's and RelativeStepSize's t: one per optimizer step, not one per tensor stepped in backward
        assert getattr(the_callback, "steps", 4) == 4
        return model

    fused = run("fused_update", tmp_path / "f")
    plain = run("auto", tmp_path / "p")
    start = weights(Module(optimizer="adamw").to(torch.bfloat16))
    for name, param in plain.named_parameters():
        assert torch.equal(fused.get_parameter(name).detach(), param.detach()), name
    assert not torch.equal(fused.model.lm_head.weight.detach(), start["model.lm_head.weight"])


@pytest.mark.parametrize("badam", [False, True])
def test_memory_report_accounts_and_predicts_no_gradients(tmp_path, badam):
    from lightning_memopt import BAdamStrategy, MemoryReport

    model = Module(optimizer="adamw", lr=1e-2)
    report = MemoryReport(every_n_steps=1, filename=None)
    strategy = BAdamStrategy(fused_update=True) if badam else "fused_update"
    settings = trainer_kwargs(tmp_path, strategy=strategy, precision="bf16-true", max_steps=2, callbacks=[report])
    trainer = Trainer(**settings)
    trainer.fit(model)
    result = report.report
    assert result is not None
    masters = trainer.strategy.master_params if badam else {}  # type: ignore[attr-defined]
    trained = [model.get_parameter(n) for n in masters] if badam else list(model.parameters())
    assert trained
    numel = sum(p.numel() for p in model.parameters())
    # independent of the ledger: bf16 weights; AdamW's two moments (bf16 plain, FP32 for BAdam's masters) + step
    state_size = 4 if badam else 2
    assert result["weights"] == 2 * numel
    assert result["grads"] == 0
    assert result["masters"] == (4 * sum(p.numel() for p in trained) if badam else 0)
    assert result["optimizer_state"] == sum(2 * state_size * p.numel() + 4 for p in trained)
    assert result["predicted"] == result["total"]
    assert any("Update in backward" in note for note in result["details"]["notes"])


def test_badam_in_backward_with_a_schedule_eight_bit_state_and_update_clipping_equals_badam(tmp_path):
    from lightning_memopt import EightBitState, UpdateClipping

    def run(fused, where):
        callbacks = [EightBitState(), UpdateClipping()]
        return _badam(where, fused, "adamw", scheduled=True, callbacks=callbacks, logger=CSVLogger(where),
                      log_every_n_steps=1)  # fmt: skip

    fused = run(True, tmp_path / "f")
    plain = run(False, tmp_path / "p")
    for name, param in plain.named_parameters():
        assert torch.equal(fused.get_parameter(name).detach(), param.detach()), name


def test_fused_update_under_bf16_mixed_equals_lightnings_step(tmp_path):
    fused = _fit(tmp_path / "f", "fused_update", precision="bf16-mixed", optimizer="adamw")
    plain = _fit(tmp_path / "p", "auto", precision="bf16-mixed", optimizer="adamw")
    for name, param in plain.named_parameters():
        assert param.dtype == torch.float32
        assert torch.equal(fused.get_parameter(name).detach(), param.detach()), name


@pytest.mark.xdist_group("ddp")
def test_badam_ddp_in_backward_resumes_exactly_on_every_rank_and_accounts_no_gradients(tmp_path):
    from test_ddp import assert_same, launch

    common = ["--order", "random", "--every", "3", "--n", "16", "--layers", "3", "--fused-update"]
    full = launch(tmp_path / "full", *common, "--steps", "8")
    ckpt = tmp_path / "half.ckpt"
    launch(tmp_path / "first", *common, "--steps", "4", "--ckpt-out", str(ckpt))
    resumed = launch(tmp_path / "resumed", *common, "--steps", "8", "--ckpt-in", str(ckpt))
    for a, b in zip(full, resumed, strict=True):
        assert a["blocks"][4:] == b["blocks"]
        assert_same(a["weights"], b["weights"])
        assert_same(a["masters"], b["masters"])
        assert a["state"].keys() == b["state"].keys() and a["state"]
        for i in a["state"]:
            assert_same(a["state"][i], b["state"][i])
        # MemoryReport on every rank: no gradient after the step, and the prediction knows it
        assert b["memory"]["grads"] == 0 and b["memory"]["masters"] > 0
        assert b["memory"]["predicted"] == b["memory"]["total"]


def test_fused_update_on_several_devices_points_to_badam_ddp(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"FusedUpdateStrategy trains on one device.*BAdamDDPStrategy"):
        Trainer(**trainer_kwargs(tmp_path, strategy="fused_update", devices=2, max_steps=1)).fit(Module())


@pytest.mark.xdist_group("ddp")
def test_badam_ddp_in_backward_with_eight_bit_state_and_a_schedule_equals_badam_ddp(tmp_path):
    from test_eight_bit import _launch_eight_bit

    common = ["--strategy", "badam_ddp", "--scheduled"]
    fused = _launch_eight_bit(tmp_path / "f", *common, "--fused-update")
    plain = _launch_eight_bit(tmp_path / "p", *common)
    assert fused[0]["optimizer"] == plain[0]["optimizer"] == "AdamW8bit"
    assert fused[0]["dtypes"] == plain[0]["dtypes"]  # the same tensors with 8-bit state at every step
    for name, w in plain[0]["weights"].items():
        assert torch.equal(fused[0]["weights"][name], w), name
        assert torch.equal(fused[1]["weights"][name], w), name


@pytest.mark.xdist_group("ddp")
def test_badam_ddp_in_backward_with_the_adafactor_stabilisers_equals_badam_ddp(tmp_path):
    from test_stabilisers import _assert_same, launch_stabilisers

    fused = launch_stabilisers(tmp_path / "f", "--fused-update")
    plain = launch_stabilisers(tmp_path / "p")
    bare = launch_stabilisers(tmp_path / "b", "--no-stabilisers")
    assert fused[0]["world_size"] == 2
    assert fused[0]["blocks"] == plain[0]["blocks"] == [0, 0, 1, 1, 2, 2]
    for rank in fused:  # every rank, bit for bit: the step in each hook equals badam_ddp's step after backward
        for key in ("weights", "masters", "state", "callbacks", "ratios"):
            _assert_same(rank[key], plain[0][key], key)
    _assert_same(plain[0], plain[1], "plain ranks")
    # one count per optimizer step (6), not one per master stepped in backward (9 per step)
    assert fused[0]["callbacks"]["RelativeStepSize"]["optimizers"][0]["steps"] == 6
    assert fused[0]["callbacks"]["Beta2Schedule"]["optimizers"][0]["steps"] == 6
    # the stabilisers acted: RMS(dX) / (max(eps2, RMS(X)) rho_t) is the clipped update's RMS, <= 1 and 1 at a block's
    # first step; Adam's own lr=1e-3 step is ~5x that for the projections (RMS 0.02, so a relative step of ~2e-4)
    assert max(max(r) for r in fused[0]["ratios"]) <= 1 + 1e-5
    assert all(min(fused[0]["ratios"][step]) > 0.99 for step in (0, 2, 4))
    assert max(max(r) for r in bare[0]["ratios"]) > 3
    start = weights(LlamaModule(num_layers=3, hidden=16).to(torch.bfloat16))
    with_them, without = fused[0]["weights"], bare[0]["weights"]

    def rms(x: torch.Tensor) -> float:
        return float(x.double().pow(2).mean().sqrt())

    trained = [n for n in start if ".layers." in n]
    assert len(trained) == 27 and all(torch.equal(with_them[n], start[n]) for n in start if n not in trained)
    for name in trained:
        # each block trained two steps of at most one relative step max(eps2, RMS(X)) * 1e-2 (a full one at the first)
        moved = rms(with_them[name] - start[name])
        assert 1.0 < moved / (1e-2 * max(1e-3, rms(start[name]))) < 2.2, (name, moved)
        if "layernorm" not in name:  # (Adam's 1e-3 steps on the norms' 1.0 are below half a bf16 ulp: some round away)
            assert rms(without[name] - start[name]) > 4 * moved, name  # Adam alone: ~2 * 1e-3, ~5x as far


# by the callbacks' own step counters: rho_t = 1e-6 t (warmup_init), beta2_t = 1 - t^-0.8 (no restart at a switch)
@pytest.mark.parametrize("counted", [False, True], ids=["defaults", "t-from-the-callbacks-counters"])
def test_badam_in_backward_with_the_adafactor_stabilisers_equals_badam(tmp_path, counted):
    from lightning_memopt import Beta2Schedule, RelativeStepSize, UpdateClipping

    def run(fused, where):
        stabilisers = [Beta2Schedule(restart_on_switch=not counted), RelativeStepSize(warmup_init=counted)]
        return _badam(where, fused, "adamw", callbacks=[UpdateClipping(), *stabilisers]), stabilisers

    fused, fused_stabilisers = run(True, tmp_path / "f")
    plain, _ = run(False, tmp_path / "p")
    reference = _badam(tmp_path / "r", False, "adamw")
    # one count per optimizer step, not one per tensor stepped in backward
    assert [s.steps for s in fused_stabilisers] == [6, 6]
    for name, param in plain.named_parameters():
        assert torch.equal(fused.get_parameter(name).detach(), param.detach()), name
    # the stabilisers did act: without them the run ends elsewhere
    assert any(not torch.equal(p.detach(), reference.get_parameter(n).detach()) for n, p in plain.named_parameters())
