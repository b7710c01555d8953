"""BAdam with real Trainers: true precisions, fp16 loss scaling on the masters, accumulation, clipping, checkpointing.

Every test runs ``lightning.pytorch.Trainer(strategy=BAdamStrategy(...), callbacks=[BlockSwitch(...)])`` on CPU with a
tiny Hugging Face Llama inside an unchanged LightningModule (``tests/models.py``). fp16 matmuls are very slow on CPU,
so every fp16 run uses the smallest model (hidden 16, 2 layers, sequence 8) and a handful of steps.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import LlamaModule, token_loader, trainer_kwargs, weights

from lightning_memopt import BAdamStrategy, BlockSwitch, MasterGradScalerPrecision

DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "32-true": torch.float32}
TINY = dict(num_layers=2, hidden=16, seq=8, n=16, batch_size=2)  # small enough for fp16 on CPU


class SeqLlama(LlamaModule):
    """``LlamaModule`` with a configurable sequence length (fp16 on CPU needs short sequences)."""

    def __init__(self, seq: int = 16, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seq = seq

    def train_dataloader(self):
        return token_loader(n=self.n, seq=self.seq, batch_size=self.batch_size)


class InfLossAt(SeqLlama):
    """Returns an infinite loss at one chosen global step: the fp16 scaler must skip that step."""

    def __init__(self, inf_step: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inf_step = inf_step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_step == self.inf_step:
            return loss * float("inf")
        return loss


def fit(
    tmp_path,
    module: pl.LightningModule,
    precision: str,
    callbacks: Sequence[pl.Callback] = (),
    switch: BlockSwitch | None = None,
    strategy_kwargs: dict[str, Any] | None = None,
    **trainer_overrides: Any,
) -> pl.Trainer:
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, precision=precision, **trainer_overrides),
        strategy=BAdamStrategy(**(strategy_kwargs or {})),
        callbacks=[switch or BlockSwitch(every=100, order="ascending"), *callbacks],
    )
    trainer.fit(module)
    return trainer


def block_names(trainer: pl.Trainer, index: int) -> list[str]:
    return list(trainer.strategy.blocks[index].param_names)


def masters_snapshot(trainer: pl.Trainer) -> dict[str, torch.Tensor]:
    return {n: m.detach().clone() for n, m in trainer.strategy.master_params.items()}


def master_grads(trainer: pl.Trainer) -> dict[str, torch.Tensor]:
    return {n: m.grad.detach().clone() for n, m in trainer.strategy.master_params.items()}


# ------------------------------------------------------------------------------------------------------- precision
class DtypeProbe(pl.Callback):
    """At every optimizer step: dtypes of the module's weights, of the optimizer's params and of their grads."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        module_params = dict(pl_module.named_parameters())
        masters = trainer.strategy.master_params
        stepped = [p for g in optimizer.param_groups for p in g["params"]]
        self.rows.append(
            dict(
                block=trainer.strategy.active_block,
                weight_dtypes={p.dtype for p in module_params.values()},
                opt_dtypes={p.dtype for p in stepped},
                grad_dtypes={p.grad.dtype for p in stepped},
                opt_is_masters={id(p) for p in stepped} == {id(m) for m in masters.values()},
                masters_are_weights=[m is module_params[n] for n, m in masters.items()],
                half_grads=[n for n, p in module_params.items() if p.grad is not None and p is not masters.get(n)],
            )
        )


@pytest.mark.parametrize("precision", ["bf16-true", "32-true", "16-true"])
def test_true_precision_keeps_weight_dtype_and_fp32_optimizer_params(tmp_path, precision):
    dtype = DTYPES[precision]
    module = SeqLlama(**TINY)
    before = weights(module)
    probe = DtypeProbe()
    trainer = fit(tmp_path, module, precision, [probe], BlockSwitch(every=2, order="ascending"), max_steps=4)

    assert isinstance(trainer.precision_plugin, MasterGradScalerPrecision) == (precision == "16-true")
    assert [r["block"] for r in probe.rows] == [0, 0, 1, 1]  # the dtypes hold across a switch too
    for row in probe.rows:
        assert row["weight_dtypes"] == {dtype}
        assert row["opt_dtypes"] == {torch.float32}
        assert row["grad_dtypes"] == {torch.float32}
        assert row["opt_is_masters"]
        # FP32 weights are their own masters; half weights get separate FP32 copies
        assert all(row["masters_are_weights"]) if precision == "32-true" else not any(row["masters_are_weights"])
        assert row["half_grads"] == []
    after = dict(module.named_parameters())
    assert {p.dtype for p in after.values()} == {dtype}
    for index in (0, 1):  # both visited blocks trained
        assert any(not torch.equal(before[n].to(dtype), after[n]) for n in block_names(trainer, index))


class GradCapture(pl.Callback):
    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(master_grads(trainer))


def test_fp16_master_grads_are_unscaled(tmp_path):
    module = SeqLlama(**TINY)
    reference = copy.deepcopy(module).half()
    capture = GradCapture()
    trainer = fit(tmp_path, module, "16-true", [capture], max_steps=1)
    scale = trainer.precision_plugin.scaler.get_scale()
    assert scale == 2.0**16  # no overflow happened, so the default initial scale was used

    # references on a copy of the same fp16 model and batch: a plain backward without loss scaling, and one that
    # scales the loss by hand and divides the fp16 grads afterwards (what the strategy must reproduce)
    (x,) = next(iter(module.train_dataloader()))
    ref_grads = {}
    for factor in (1.0, scale):
        reference.zero_grad(set_to_none=True)
        with HalfPrecision("16-true").forward_context():
            (reference.model(input_ids=x, labels=x).loss * factor).backward()
        ref_grads[factor] = {n: p.grad.float() / factor for n, p in reference.named_parameters() if p.grad is not None}
    got = capture.grads[0]
    assert set(got) == set(block_names(trainer, 0))
    for name, grad in got.items():
        assert grad.dtype == torch.float32
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, ref_grads[scale][name], rtol=1e-6, atol=0)
        # without scaling, fp16 loses the tiniest intermediate grads (subnormals): close, but not exactly equal
        torch.testing.assert_close(grad, ref_grads[1.0][name], rtol=0.1, atol=1e-4)
    total = math.sqrt(sum(g.pow(2).sum().item() for g in got.values()))
    ref_total = math.sqrt(sum(ref_grads[1.0][n].pow(2).sum().item() for n in got))
    assert total == pytest.approx(ref_total, rel=1e-2)  # not `scale` times larger


class StepSnapshots(pl.Callback):
    """Weights, masters and loss scale around every training batch."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append(
            dict(
                step=trainer.global_step,
                w0=weights(pl_module),
                m0=masters_snapshot(trainer),
                s0=trainer.precision_plugin.scaler.get_scale(),
            )
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows[-1].update(
            w1=weights(pl_module),
            m1=masters_snapshot(trainer),
            s1=trainer.precision_plugin.scaler.get_scale(),
            skipped=trainer.precision_plugin.last_step_skipped,
        )


def test_fp16_overflow_skips_step_backs_off_scale_and_training_continues(tmp_path):
    inf_step = 1
    module = InfLossAt(inf_step=inf_step, **TINY)
    snaps = StepSnapshots()
    trainer = fit(tmp_path, module, "16-true", [snaps], BlockSwitch(every=100, order="fixed", start=1), max_steps=4)

    active = set(block_names(trainer, 1))
    assert len(snaps.rows) == 4
    for row in snaps.rows:
        assert set(row["m0"]) == active and set(row["m1"]) == active
        assert {t.dtype for t in row["m1"].values()} == {torch.float32}
        assert {t.dtype for t in row["w1"].values()} == {torch.float16}
        if row["step"] == inf_step:
            assert row["skipped"]
            assert row["s1"] == row["s0"] * 0.5  # default backoff_factor
            for name in row["w0"]:
                assert torch.equal(row["w0"][name], row["w1"][name]), name
            for name in active:
                assert torch.equal(row["m0"][name], row["m1"][name]), name
        else:
            assert not row["skipped"]
            assert row["s1"] == row["s0"]
            assert any(not torch.equal(row["w0"][n], row["w1"][n]) for n in active)
            assert any(not torch.equal(row["m0"][n], row["m1"][n]) for n in active)
            for name in set(row["w0"]) - active:
                assert torch.equal(row["w0"][name], row["w1"][name]), name
            # the half weights hold the rounded masters after every real step
            for name in active:
                assert torch.equal(row["w1"][name], row["m1"][name].half()), name
    assert [r["step"] for r in snaps.rows] == [0, 1, 2, 3]
    assert snaps.rows[-1]["s1"] == 2.0**15


@pytest.mark.parametrize(
    ("precision", "plugin"),
    [("16-mixed", None), ("bf16-mixed", None), (None, MixedPrecision("16-mixed", device="cpu"))],
    ids=["16-mixed", "bf16-mixed", "16-mixed-plugin"],
)
def test_mixed_precision_is_refused_with_explanation(tmp_path, precision, plugin):
    overrides = {} if precision is None else {"precision": precision}
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=1, **overrides),
        strategy=BAdamStrategy(precision_plugin=plugin),
        callbacks=[BlockSwitch(every=1)],
    )
    module = SeqLlama(**TINY)
    with pytest.raises(MisconfigurationException) as info:
        trainer.fit(module)
    message = str(info.value)
    assert "save no weight memory" in message
    assert "bf16-true" in message
    # on CPU Lightning turns '16-mixed' into 'bf16-mixed' before the strategy sees it
    assert ("'16-mixed'" if plugin is not None else "'bf16-mixed'") in message


# ------------------------------------------------------------------------------------------- gradient accumulation
class BlockPerBatch(pl.Callback):
    def __init__(self) -> None:
        self.blocks: list[int] = []
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.blocks.append(trainer.strategy.active_block)
        self.steps.append(trainer.global_step)


def test_block_switch_counts_optimizer_steps_under_accumulation(tmp_path):
    module = SeqLlama(num_layers=4, hidden=16, seq=8, n=24, batch_size=2)
    rec = BlockPerBatch()
    switch = BlockSwitch(every=2, order="ascending")
    fit(tmp_path, module, "bf16-true", [rec], switch, accumulate_grad_batches=2, max_epochs=1)
    # 12 batches = 6 optimizer steps; each block trains for 2 optimizer steps = 4 batches
    assert rec.blocks == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert rec.steps == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_accumulation_equals_larger_batch_fp32(tmp_path, optimizer):
    def run(batch_size: int, accumulate: int) -> tuple[pl.Trainer, dict[str, torch.Tensor]]:
        module = SeqLlama(num_layers=3, hidden=32, seq=16, n=24, batch_size=batch_size, optimizer=optimizer)
        trainer = fit(
            tmp_path,
            module,
            "32-true",
            switch=BlockSwitch(every=3, order="ascending"),
            accumulate_grad_batches=accumulate,
            max_steps=6,
        )
        return trainer, weights(module)

    initial = weights(SeqLlama(num_layers=3, hidden=32))
    trainer_acc, acc = run(batch_size=2, accumulate=2)
    trainer_big, big = run(batch_size=4, accumulate=1)
    assert trainer_acc.global_step == trainer_big.global_step == 6
    for name in acc:
        # summation order differs between CPUs; Adam turns that into ~1e-6 on single near-zero-gradient elements
        # (1.4e-6 measured on an AMD EPYC), against a step of ~lr = 1e-3 per element: a micro-batch left out of the
        # sum or counted twice moves the update by a good fraction of that
        torch.testing.assert_close(acc[name], big[name], rtol=0, atol=1e-5, msg=name)
    # the comparison is not vacuous: blocks 0 and 1 trained (a switch happened at step 3), block 2 did not
    for index, changed in ((0, True), (1, True), (2, False)):
        names = block_names(trainer_acc, index)
        assert any(not torch.equal(acc[n], initial[n]) for n in names) == changed


class AccumulationProbe(pl.Callback):
    """Half grads of each micro-batch (seen in on_after_backward, before the strategy moves them) and the masters'."""

    def __init__(self) -> None:
        self.micro: list[dict[str, torch.Tensor]] = []
        self.steps: list[dict[str, Any]] = []

    def on_after_backward(self, trainer, pl_module):
        params = dict(pl_module.named_parameters())
        self.micro.append({n: params[n].grad.detach().clone() for n in trainer.strategy.master_params})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append(
            dict(
                grads=master_grads(trainer),
                module_grads=[n for n, p in pl_module.named_parameters() if p.grad is not None],
                micro=self.micro,
            )
        )
        self.micro = []


def test_bf16_master_grads_accumulate_in_fp32(tmp_path):
    accumulate = 3
    module = SeqLlama(num_layers=2, hidden=32, seq=16, n=24, batch_size=2)
    probe = AccumulationProbe()
    fit(tmp_path, module, "bf16-true", [probe], accumulate_grad_batches=accumulate, max_steps=2)

    assert len(probe.steps) == 2
    for step in probe.steps:
        assert step["module_grads"] == []  # half grads are freed after every backward
        assert len(step["micro"]) == accumulate
        assert {g.dtype for micro in step["micro"] for g in micro.values()} == {torch.bfloat16}
        differs_from_bf16_sum = False
        for name, grad in step["grads"].items():
            assert grad.dtype == torch.float32
            fp32_sum = sum(micro[name].float() for micro in step["micro"])
            bf16_sum = sum(micro[name] for micro in step["micro"])
            torch.testing.assert_close(grad, fp32_sum, rtol=1e-6, atol=0)
            differs_from_bf16_sum |= not torch.equal(grad, bf16_sum.float())
        assert differs_from_bf16_sum  # the sum really is kept in FP32, not rounded to bf16 in between


# ----------------------------------------------------------------------------------------------- gradient clipping
class ClipProbe(pl.Callback):
    """Grads before clipping (on_before_optimizer_step) and the grads the optimizer actually steps with.

    A step *pre*-hook cannot see them with ``bf16-true``/``32-true``: Lightning's ``Precision.optimizer_step`` passes
    its closure (forward, backward, ``on_before_optimizer_step``, clipping) into ``optimizer.step(closure=...)``, and
    torch runs the pre-hooks before the closure, when the grads are still ``None``. A *post*-hook sees exactly the
    grads ``step()`` used (SGD/Adam(W) never modify ``.grad``), for every precision plugin.
    """

    def __init__(self) -> None:
        self.before: list[dict[int, torch.Tensor]] = []
        self.stepped: list[dict[str, Any]] = []

    def on_train_start(self, trainer, pl_module):
        trainer.optimizers[0].register_step_post_hook(self._post_step)
        self._trainer = trainer

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before.append({id(p): p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]})

    def _post_step(self, optimizer, args, kwargs):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        masters = self._trainer.strategy.master_params.values()
        self.stepped.append(
            dict(
                grads={id(p): p.grad.detach().clone() for p in params},
                are_masters={id(p) for p in params} == {id(m) for m in masters},
            )
        )


@pytest.mark.parametrize("algorithm", ["norm", "value"])
@pytest.mark.parametrize("precision", ["bf16-true", "32-true", "16-true"])
def test_gradient_clipping_acts_on_active_fp32_grads(tmp_path, precision, algorithm):
    clip = 1e-3 if algorithm == "norm" else 1e-4
    module = SeqLlama(**TINY)
    probe = ClipProbe()
    fit(
        tmp_path,
        module,
        precision,
        [probe],
        BlockSwitch(every=1, order="ascending"),
        gradient_clip_val=clip,
        gradient_clip_algorithm=algorithm,
        max_steps=3,
    )
    assert len(probe.stepped) == len(probe.before) == 3
    for before, stepped in zip(probe.before, probe.stepped, strict=True):
        assert stepped["are_masters"]
        grads = stepped["grads"]
        assert set(grads) == set(before)
        assert {g.dtype for g in grads.values()} == {torch.float32}
        assert any(not torch.equal(grads[k], before[k]) for k in grads)  # clipping changed them
        if algorithm == "norm":
            norm_before = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in before.values()]))
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
            assert norm_before > 10 * clip
            assert norm <= clip + 1e-6
            assert norm >= 0.99 * clip  # rescaled onto the ball, not zeroed
            for k, g in grads.items():
                torch.testing.assert_close(g, before[k] * (clip / norm_before), rtol=1e-4, atol=1e-12)
        else:
            assert max(g.abs().max().item() for g in before.values()) > clip
            assert max(g.abs().max().item() for g in grads.values()) <= clip + 1e-12
            for k, g in grads.items():
                assert torch.equal(g, before[k].clamp(-clip, clip))


# ------------------------------------------------------------------------------------------ gradient checkpointing
GC_MODEL = dict(num_layers=3, hidden=32, seq=16, n=8, batch_size=4)


def first_step_master_grads(
    tmp_path, precision: str, start: int, checkpointing: str | None, **strategy_kwargs: Any
) -> dict[str, Any]:
    module = SeqLlama(**GC_MODEL)
    if checkpointing is not None:
        reentrant = checkpointing.startswith("reentrant")
        module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if not checkpointing.endswith("+hf_input_grads"):
            # without HF's hook on the embeddings' output nothing below the active block requires grad, so only the
            # strategy's active_input_requires_grad can make reentrant checkpointing reach the block
            module.model.disable_input_require_grads()
    layers = module.model.model.layers
    assert all(layer.gradient_checkpointing == (checkpointing is not None) for layer in layers)
    # HF checkpoints the layer's forward, so a submodule's hook counts the forward and the recomputation in backward
    calls = []
    layers[start].self_attn.register_forward_hook(lambda *_: calls.append(1))
    capture = GradCapture()
    trainer = fit(
        tmp_path / str(checkpointing),
        module,
        precision,
        [capture],
        BlockSwitch(order="fixed", start=start),
        strategy_kwargs=strategy_kwargs,
        max_steps=1,
    )
    return dict(grads=capture.grads[0], names=block_names(trainer, start), forward_calls=len(calls))


@pytest.mark.parametrize("checkpointing", ["reentrant", "non_reentrant", "reentrant+hf_input_grads"])
@pytest.mark.parametrize("start", [1, 0], ids=["middle_layer", "first_layer"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_gradient_checkpointing_gives_same_master_grads(tmp_path, precision, start, checkpointing):
    reference = first_step_master_grads(tmp_path, precision, start, None)
    got = first_step_master_grads(tmp_path, precision, start, checkpointing)
    assert reference["forward_calls"] == 1
    assert got["forward_calls"] == 2  # the active layer really was checkpointed and recomputed
    assert set(got["grads"]) == set(reference["grads"]) == set(got["names"])
    for name, grad in got["grads"].items():
        assert grad.dtype == torch.float32
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, reference["grads"][name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("start", [1, 0], ids=["middle_layer", "first_layer"])
def test_reentrant_checkpointing_needs_active_input_requires_grad(tmp_path, start):
    # negative control for the test above: with the option forced off, reentrant checkpointing of frozen inputs cuts
    # the graph, so the loss does not even require grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        first_step_master_grads(tmp_path, "32-true", start, "reentrant", active_input_requires_grad=False)
