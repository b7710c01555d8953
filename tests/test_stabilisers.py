"""Adafactor's stabilisers as callbacks, end to end: a real Trainer, a tiny Hugging Face Llama, real checkpoints.

- Adam(β₁=0) + Beta2Schedule + UpdateClipping + RelativeStepSize takes Adafactor's step on unfactored tensors (the
  paper's equations in float64, written out here), with and without BAdam, under bf16/fp16/fp32 and an LR scheduler.
- Beta2Schedule keeps Adam's bias correction exact in float64 across BAdam's state resets.
- UpdateClipping acts on the update each optimizer really made (torch and bitsandbytes 8-bit), weight decay included.
- Every callback's state, and torch's and transformers' Adafactor as BAdam's inner optimizer, resume bit-exactly.
- YAML (LightningCLI) runs Adafactor inside BAdam and the stabilisers as configured callbacks.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import LlamaModule, token_loader, trainer_kwargs, weights

from lightning_memopt import BAdamStrategy, BlockSwitch
from lightning_memopt.callbacks.beta2_schedule import BETA2_PRODUCT_KEY, Beta2Schedule
from lightning_memopt.callbacks.relative_step import RelativeStepSize
from lightning_memopt.callbacks.update_clipping import UpdateClipping
from lightning_memopt.callbacks.update_transform import TransformCallback, UpdateTransforms
from lightning_memopt.strategies.badam import BlockStrategy

F64 = torch.float64


class Module(LlamaModule):
    """``LlamaModule`` with the optimizers and schedulers these tests need; still knows nothing about BAdam."""

    def __init__(
        self,
        optimizer: str = "adam",
        optimizer_kwargs: dict[str, Any] | None = None,
        warmup_steps: int = 0,
        seq: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__(optimizer=optimizer, **kwargs)
        self.optimizer_kwargs = optimizer_kwargs or {}
        self.warmup_steps = warmup_steps
        self.seq = seq

    def train_dataloader(self):
        return token_loader(n=self.n, seq=self.seq, batch_size=self.batch_size)

    def configure_optimizers(self):
        params, kw = self.parameters(), dict(self.optimizer_kwargs)
        name = self.optimizer_name
        if name in ("adam", "adamw", "sgd"):
            optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name](
                params, **kw
            )
        elif name in ("adam8bit", "adamw8bit"):
            import bitsandbytes as bnb

            optimizer = getattr(bnb.optim, {"adam8bit": "Adam8bit", "adamw8bit": "AdamW8bit"}[name])(params, **kw)
        elif name == "torch-adafactor":
            optimizer = torch.optim.Adafactor(params, **kw)
        elif name == "transformers-adafactor":
            from transformers.optimization import Adafactor

            optimizer = Adafactor(params, lr=None, **kw)
        else:
            raise ValueError(name)
        if not self.warmup_steps:
            return optimizer
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.25, total_iters=self.warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def _tensors(trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """What the optimizer steps: the active block's FP32 masters under BAdam, the trainable weights otherwise."""
    if isinstance(trainer.strategy, BlockStrategy):
        return trainer.strategy.master_params
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


class Steps(Callback):
    """Per optimizer step: the tensors before, their gradients, after; the lr; and the param groups between steps.

    Must come after ``BlockSwitch`` (so it sees this step's block).
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.final: dict[str, Any] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        tensors = _tensors(trainer, pl_module)
        self.records.append(
            {
                "block": getattr(trainer.strategy, "active_block", None),
                "before": {n: t.detach().to(F64, copy=True) for n, t in tensors.items()},
                "grad": {n: t.grad.to(F64, copy=True) for n, t in tensors.items() if t.grad is not None},
                "lr": [_float(g["lr"]) for g in optimizer.param_groups],  # transformers' Adafactor: lr=None
                "initial_lr": [_float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups],
            }
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        record = self.records[-1]
        tensors = _tensors(trainer, pl_module)
        record["after"] = {n: t.detach().to(F64, copy=True) for n, t in tensors.items()}
        optimizer = trainer.optimizers[0]
        record["groups"] = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        transforms = UpdateTransforms.of(optimizer)
        record["snapshot_bytes"] = transforms.last_snapshot_bytes if transforms is not None else None
        record["tensor_bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
        record["state"] = {n: _clone(dict(optimizer.state[t])) for n, t in tensors.items() if t in optimizer.state}

    def on_train_end(self, trainer, pl_module):
        self.final = {
            "masters": {n: m.detach().clone() for n, m in getattr(trainer.strategy, "master_params", {}).items()},
            "optimizer": _clone(trainer.optimizers[0].state_dict()),
            "callbacks": {
                type(c).__name__: _clone(c.state_dict())
                for c in trainer.callbacks
                if isinstance(c, (TransformCallback, BlockSwitch))
            },
        }


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max diff {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: {sorted(a)} != {sorted(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _fit(
    root,
    *,
    badam: bool,
    precision: str,
    callbacks: list[Callback],
    max_steps: int,
    every: int = 3,
    ckpt_path: str | None = None,
    **module_kw: Any,
):
    module_kw.setdefault("num_layers", 2)
    module_kw.setdefault("hidden", 16)
    module_kw.setdefault("n", 8)
    module = Module(**module_kw)
    steps = Steps()
    extra: list[Callback] = [BlockSwitch(every=every, order="ascending")] if badam else []
    trainer = pl.Trainer(
        strategy=BAdamStrategy() if badam else "auto",
        precision=precision,
        max_steps=max_steps,
        callbacks=[*extra, *callbacks, steps],
        **trainer_kwargs(root, enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks)),
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, trainer, steps


def _rms(x: torch.Tensor) -> float:
    return math.sqrt(float((x.double() ** 2).mean()))


# --------------------------------------------------------------------------------------- Adafactor on 1-D tensors
SETUPS = {
    "single-32-true": dict(badam=False, precision="32-true"),
    "single-32-true-warmup": dict(badam=False, precision="32-true", warmup_steps=4),
    "badam-bf16-true": dict(badam=True, precision="bf16-true"),
    "badam-16-true": dict(badam=True, precision="16-true", seq=8),  # fp16 matmul on CPU is slow: short sequences
}


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_adam_with_the_three_stabilisers_is_adafactor_on_unfactored_tensors(tmp_path, setup):
    """Adam(β₁=0, ε≈0) + the three callbacks equals the paper's Adafactor step (Algorithm 4 with Section 6-8) on every
    1-D tensor (RMSNorm weights, which Adafactor does not factor), to 1e-6, under BAdam on its FP32 masters too."""
    cfg = dict(SETUPS[setup])
    badam = cfg.pop("badam")
    _, _, steps = _fit(
        tmp_path,
        badam=badam,
        callbacks=[RelativeStepSize(), UpdateClipping(), Beta2Schedule()],  # any order: they apply in a fixed one
        max_steps=8,
        optimizer="adam",
        optimizer_kwargs={"lr": 0.123, "betas": (0.0, 0.999), "eps": 1e-30},  # lr only carries the schedule's shape
        **cfg,
    )
    x_ref: dict[str, torch.Tensor] = {}
    v: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    clipped = compared = 0
    previous_block = None
    for t, record in enumerate(steps.records, start=1):
        if record["block"] != previous_block:  # a BAdam switch resets the optimizer state: t of beta2 restarts
            x_ref, v, count = {}, {}, {}
            previous_block = record["block"]
        schedule = record["lr"][0] / record["initial_lr"][0]
        for name, grad in record["grad"].items():
            if grad.dim() != 1:
                continue
            x = x_ref.setdefault(name, record["before"][name])
            count[name] = count.get(name, 0) + 1
            beta2 = 1 - count[name] ** -0.8  # β̂₂ₜ = 1 - t^-0.8, no bias correction
            v[name] = beta2 * v.get(name, torch.zeros_like(grad)) + (1 - beta2) * (grad**2 + 1e-30)
            u = grad / v[name].sqrt()
            clipped += _rms(u) > 1.0
            u_hat = u / max(1.0, _rms(u) / 1.0)  # update clipping, d = 1
            alpha = max(1e-3, _rms(x)) * min(1e-2, 1 / math.sqrt(t)) * schedule  # relative step size
            x_ref[name] = x - alpha * u_hat
            torch.testing.assert_close(record["after"][name], x_ref[name], rtol=0, atol=1e-6, msg=f"step {t} {name}")
            compared += 1
        # between steps the param groups hold the user's (and the scheduler's) values
        assert record["groups"][0]["betas"] == (0.0, 0.999) and record["groups"][0]["eps"] == 1e-30
        assert 0.123 * 0.25 - 1e-12 <= record["groups"][0]["lr"] <= 0.123  # never the rule's rho_t * schedule
        # the snapshot is the stepped tensors only: under BAdam the active block's FP32 masters
        assert record["snapshot_bytes"] == record["tensor_bytes"]
    assert compared >= 8 * 2 and clipped > 0
    if cfg.get("warmup_steps"):
        assert steps.records[0]["lr"][0] == pytest.approx(0.123 * 0.25)  # the scheduler's lr, untouched by the rule


@pytest.mark.parametrize("restart_on_switch", [True, False], ids=["restart", "global"])
def test_beta2_schedule_keeps_adams_bias_correction_exact_across_badam_switches(tmp_path, restart_on_switch):
    """float64 end to end: AdamW(β₁=0.9, decoupled decay) + Beta2Schedule under BAdam equals the recurrence
    vₜ = β̂₂ₜ vₜ₋₁ + (1 - β̂₂ₜ) gₜ² with bias correction 1 - ∏β̂₂ⱼ since each block switch reset the state."""
    lr, eps, wd, beta1 = 1e-2, 1e-6, 0.1, 0.9
    _, _, steps = _fit(
        tmp_path,
        badam=True,
        precision="64-true",
        callbacks=[Beta2Schedule(restart_on_switch=restart_on_switch)],
        max_steps=8,
        every=3,
        optimizer="adamw",
        optimizer_kwargs={"lr": lr, "betas": (beta1, 0.999), "eps": eps, "weight_decay": wd},
    )
    m: dict[str, torch.Tensor] = {}
    v: dict[str, torch.Tensor] = {}
    x_ref: dict[str, torch.Tensor] = {}
    naive_gap = 0.0
    previous_block, count, product = None, 0, 1.0
    for t, record in enumerate(steps.records, start=1):
        if record["block"] != previous_block:
            m, v, x_ref, count, product = {}, {}, {}, 0, 1.0
            previous_block = record["block"]
        count += 1
        beta2 = 1 - (count if restart_on_switch else t) ** -0.8
        product *= beta2
        for name, grad in record["grad"].items():
            x = x_ref.setdefault(name, record["before"][name])
            m[name] = beta1 * m.get(name, torch.zeros_like(grad)) + (1 - beta1) * grad
            v[name] = beta2 * v.get(name, torch.zeros_like(grad)) + (1 - beta2) * grad**2
            m_hat = m[name] / (1 - beta1**count)
            x_ref[name] = x * (1 - lr * wd) - lr * m_hat / ((v[name] / (1 - product)).sqrt() + eps)
            naive = x * (1 - lr * wd) - lr * m_hat / ((v[name] / (1 - beta2**count)).sqrt() + eps)
            naive_gap = max(naive_gap, float((naive - x_ref[name]).abs().max()))
            state = record["state"][name]
            torch.testing.assert_close(state["exp_avg_sq"], v[name], rtol=1e-12, atol=1e-300)
            assert state[BETA2_PRODUCT_KEY] == pytest.approx(product, rel=1e-12, abs=0)
            torch.testing.assert_close(record["after"][name], x_ref[name], rtol=1e-12, atol=1e-15)
    assert naive_gap > 1e-5  # Adam's own 1 - beta2**step would have been measurably wrong
    assert [r["block"] for r in steps.records] == [0, 0, 0, 1, 1, 1, 0, 0]


# --------------------------------------------------------------------------------------- the update really made
OPTIMIZERS = {
    # name: (module optimizer, its kwargs, clipping threshold, decay decoupled from the update)
    "adam": ("adam", {"lr": 1e-2}, 0.5, False),
    "adamw": ("adamw", {"lr": 1e-2, "weight_decay": 0.5}, 0.5, True),
    "sgd": ("sgd", {"lr": 0.5, "momentum": 0.9, "weight_decay": 0.05}, 1e-3, False),  # L2: inside the update
    "adam8bit": ("adam8bit", {"lr": 1e-2, "min_8bit_size": 256}, 0.5, False),
    "adamw8bit": ("adamw8bit", {"lr": 1e-2, "weight_decay": 0.5, "min_8bit_size": 256}, 0.5, True),
}


class Shadow(Callback):
    """Steps a deep copy of the optimizer (without the clipping hooks) on the same gradients: the unclipped update."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        hooks = optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks
        optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks = OrderedDict(), OrderedDict()
        try:
            shadow = copy.deepcopy(optimizer)
        finally:
            optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks = hooks
        for key, value in optimizer.__dict__.items():  # torch's __getstate__ keeps only defaults, state and groups
            shadow.__dict__.setdefault(key, value)
        names = {id(m): n for n, m in trainer.strategy.master_params.items()}
        pairs = []
        for group, copied in zip(optimizer.param_groups, shadow.param_groups, strict=True):
            for real, twin in zip(group["params"], copied["params"], strict=True):
                twin.grad = real.grad.clone()
                pairs.append((names[id(real)], real.detach().clone(), twin))
        shadow.step()
        group = optimizer.param_groups[0]
        decay = float(group["lr"]) * float(group.get("weight_decay", 0.0))
        self.records.append({"pairs": pairs, "lr": float(group["lr"]), "decay": decay})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.records[-1]["after"] = {n: m.detach().clone() for n, m in trainer.strategy.master_params.items()}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_update_clipping_acts_on_the_update_each_optimizer_made(tmp_path, name):
    optimizer, kwargs, threshold, decoupled = OPTIMIZERS[name]
    shadow = Shadow()
    _fit(
        tmp_path,
        badam=True,
        precision="bf16-true",
        callbacks=[UpdateClipping(threshold=threshold), shadow],
        max_steps=5,
        hidden=32,
        optimizer=optimizer,
        optimizer_kwargs=kwargs,
    )
    clipped = decay_matters = 0
    for record in shadow.records:
        lr, r = record["lr"], record["decay"] if decoupled else 0.0
        for tensor, before, twin in record["pairs"]:
            unclipped = twin.detach().double()
            g = unclipped - (1 - r) * before.double()  # the gradient-driven part of the optimizer's own change
            factor = min(1.0, threshold / (_rms(g) / lr))  # Û = U / max(1, RMS(U)/d), U = G / lr
            clipped += factor < 1.0
            expected = (1 - r) * before.double() + factor * g
            actual = record["after"][tensor].double()
            torch.testing.assert_close(actual, expected, rtol=0, atol=2e-7, msg=tensor)
            if decoupled:  # clipping the decay as well would give another weight
                g_all = unclipped - before.double()
                other = before.double() + min(1.0, threshold / (_rms(g_all) / lr)) * g_all
                decay_matters += float((other - actual).abs().max()) > 1e-5
    assert clipped > 0
    assert decay_matters > 0 or not decoupled


def test_beta2_schedule_refuses_sgd_when_fit_starts(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"torch\.optim\.SGD is not supported"):
        _fit(tmp_path, badam=True, precision="bf16-true", callbacks=[Beta2Schedule()], max_steps=1, optimizer="sgd")


# --------------------------------------------------------------------------------------- resume
RESUME = {
    "clipping": ("adamw", {"lr": 1e-2, "weight_decay": 0.1}, 0, lambda: [UpdateClipping(threshold=0.5)]),
    "beta2-restart": ("adam", {"lr": 1e-2}, 0, lambda: [Beta2Schedule()]),
    "beta2-global": ("adam", {"lr": 1e-2}, 0, lambda: [Beta2Schedule(restart_on_switch=False)]),
    "relative-step": ("adamw", {"lr": 1e-3, "weight_decay": 0.1}, 0, lambda: [RelativeStepSize(warmup_init=True)]),
    "all-with-warmup": (
        "adam",
        {"lr": 1e-3, "betas": (0.0, 0.999)},
        6,
        lambda: [UpdateClipping(), Beta2Schedule(), RelativeStepSize()],
    ),
    "torch-adafactor": ("torch-adafactor", {"lr": 1e-2}, 0, lambda: []),
    "transformers-adafactor": ("transformers-adafactor", {}, 0, lambda: []),
}
K, MAX_STEPS = 4, 8  # two batches per epoch: step 4 is an epoch boundary in the middle of a block (every=3)


@pytest.mark.parametrize("case", sorted(RESUME))
def test_resume_is_bit_exact(tmp_path, case):
    optimizer, kwargs, warmup, make = RESUME[case]
    kwargs_module = {"warmup_steps": warmup}
    common = dict(
        badam=True, precision="bf16-true", num_layers=3, optimizer=optimizer, optimizer_kwargs=kwargs, **kwargs_module
    )
    saver = ModelCheckpoint(tmp_path / "ckpt", filename="{step}", every_n_train_steps=K, save_top_k=-1)
    callbacks = make()
    module, trainer, steps = _fit(tmp_path / "a", callbacks=[*callbacks, saver], max_steps=MAX_STEPS, **common)
    assert trainer.global_step == MAX_STEPS
    path = tmp_path / "ckpt" / f"step={K}.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    for callback in callbacks:  # the step counters are in the checkpoint (UpdateClipping has no state)
        saved = checkpoint["callbacks"].get(callback.state_key)
        assert saved is None if isinstance(callback, UpdateClipping) else saved["optimizers"][0]["steps"] == K

    resumed_callbacks = make()
    resumed, _, resumed_steps = _fit(
        tmp_path / "b", callbacks=resumed_callbacks, max_steps=MAX_STEPS, ckpt_path=str(path), **common
    )
    _assert_same(weights(module), weights(resumed), "weights")
    _assert_same(steps.final, resumed_steps.final, "final")
    assert [r["block"] for r in resumed_steps.records] == [r["block"] for r in steps.records[K:]]

    state = steps.final["optimizer"]["state"]
    if case.startswith("beta2") or case == "all-with-warmup":
        assert all(BETA2_PRODUCT_KEY in s for s in state.values()) and state
    if case.endswith("adafactor"):
        # the inner Adafactor's factored state exists for the active block only: rows + columns, not rows x columns
        masters = steps.final["masters"]
        assert len(state) == len(masters) == len(trainer.strategy.blocks[2].param_names)
        state_numel = sum(v.numel() for s in state.values() for v in s.values() if isinstance(v, torch.Tensor))
        assert state_numel < sum(m.numel() for m in masters.values()) / 2
        factored = [k for s in state.values() for k in s if k in ("row_var", "col_var", "exp_avg_sq_row")]
        assert factored


# --------------------------------------------------------------------------------------- YAML
def _cli(args: list[str]):
    from lightning_memopt.cli import MemoptCLI  # the pack's own CLI: a broken one must fail these tests

    return MemoptCLI(args=args, run=False)


YAML_CASES = {
    "torch-adafactor": ("optimizer: torch.optim.Adafactor", []),
    "transformers-adafactor": (
        "optimizer:\n  class_path: transformers.optimization.Adafactor\n  init_args: {lr: null}",
        [],
    ),
    "adamw-stabilisers": (
        "optimizer:\n  class_path: torch.optim.AdamW\n  init_args: {lr: 1.0e-3, betas: [0.0, 0.999]}",
        [
            "lightning_memopt.callbacks.update_clipping.UpdateClipping",
            "lightning_memopt.callbacks.beta2_schedule.Beta2Schedule",
            "lightning_memopt.callbacks.relative_step.RelativeStepSize",
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_yaml_runs_adafactor_inside_badam_and_the_stabilisers(tmp_path, monkeypatch, case):
    optimizer, callbacks = YAML_CASES[case]
    listed = "".join(f"\n    - class_path: {c}" for c in callbacks)
    config = tmp_path / "recipe.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            trainer:
              accelerator: cpu
              devices: 1
              precision: bf16-true
              max_steps: 4
              logger: false
              enable_checkpointing: false
              enable_progress_bar: false
              enable_model_summary: false
              default_root_dir: {tmp_path}
              strategy:
                class_path: lightning_memopt.BAdamStrategy
              callbacks:
                - class_path: lightning_memopt.BlockSwitch
                  init_args: {{every: 2, order: ascending}}"""
        )
        + listed
        + textwrap.dedent(
            """
            model:
              class_path: models.LlamaModule
              init_args: {num_layers: 2, hidden: 16, n: 8}
            """
        )
        + optimizer
        + "\n"
    )
    monkeypatch.setattr("sys.argv", ["lightning-memopt"])
    cli = _cli(["--config", str(config)])
    before = weights(cli.model)
    cli.trainer.fit(cli.model)
    optimizer_object = cli.trainer.optimizers[0]
    assert type(optimizer_object).__name__ == ("AdamW" if callbacks else "Adafactor")
    after = weights(cli.model)
    changed = [n for n in after if not torch.equal(before[n].to(after[n].dtype), after[n])]
    assert all(".layers." in n for n in changed), changed  # embeddings, final norm and head stay frozen
    assert {n.split(".layers.")[1].split(".")[0] for n in changed} == {"0", "1"}  # both blocks (every=2, 4 steps)
    masters = cli.trainer.strategy.master_params
    assert set(optimizer_object.state) == set(masters.values())  # state of the active block only
    for callback in cli.trainer.callbacks:
        if isinstance(callback, (Beta2Schedule, RelativeStepSize)):
            assert callback.steps == 4


# --------------------------------------------------------------------------------------- DDP
def launch_stabilisers(out: Path, *args: str) -> list[dict[str, Any]]:
    """Runs `ddp_stabilisers_run.py` on two gloo processes; what each rank wrote, by rank."""
    script = Path(__file__).parent / "ddp_stabilisers_run.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--out", str(out), *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(p, weights_only=True) for p in sorted(out.glob("rank*.pt"))]


@pytest.mark.xdist_group("ddp")  # one DDP launch at a time: it wants both cores
def test_badam_ddp_ranks_stay_bit_identical_with_the_stabilisers(tmp_path):
    r0, r1 = launch_stabilisers(tmp_path)
    assert r0["world_size"] == 2
    assert r0["blocks"] == r1["blocks"] and len(set(r0["blocks"])) > 1  # the same random blocks, switches happened
    _assert_same(r0["weights"], r1["weights"], "weights")
    _assert_same(r0["masters"], r1["masters"], "masters")
    _assert_same(r0["state"], r1["state"], "optimizer state")
    assert all(BETA2_PRODUCT_KEY in s for s in r0["state"].values())
    _assert_same(r0["callbacks"], r1["callbacks"], "callbacks")
    assert r0["callbacks"]["RelativeStepSize"]["optimizers"][0]["steps"] == 6
    # the stabilisers acted on the FP32 masters: RMS(dX) = alpha * RMS(U_hat) <= alpha, = alpha at a block's first step
    ratios = r0["ratios"]
    assert max(max(r) for r in ratios) <= 1 + 1e-5
    for step, block in enumerate(r0["blocks"]):
        if step == 0 or block != r0["blocks"][step - 1]:
            assert min(ratios[step]) > 0.99, (step, ratios[step])
