"""8-bit optimizer state: ``EightBitState``, ``to_eight_bit`` and bitsandbytes optimizers under our strategies.

Everything runs the real bitsandbytes 8-bit kernels on the CPU (bitsandbytes >= 0.50) and inspects the state the
optimizer really holds. The tiny Llama has ``hidden=64``: its attention and MLP matrices have 4096 and 8192 values,
enough for 8-bit state (``min_8bit_size=4096``), while the norms (64 values) stay 32-bit by size.
"""

from __future__ import annotations

import doctest
import math
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import LlamaModule, trainer_kwargs, weights

import lightning_memopt.callbacks.eight_bit as eight_bit_module
from lightning_memopt import BAdamStrategy, BlockSwitch
from lightning_memopt.callbacks.eight_bit import EightBitState, check_bitsandbytes_version, is_eight_bit, to_eight_bit
from lightning_memopt.cli import MemoptCLI

BLOCK = 256  # bitsandbytes' block-wise quantization: one FP32 absmax per 256 values
EIGHT_BIT_BYTES_PER_PARAM = 2 + 2 * 4 / BLOCK  # Adam: two uint8 codes + two FP32 absmax per block = 2.03125
MIN_8BIT = 4096
DDP_SCRIPT = Path(__file__).parent / "ddp_eight_bit_run.py"


class OptimizerModule(LlamaModule):
    """``LlamaModule`` whose optimizer comes from a factory (given the module's parameters)."""

    def __init__(self, make_optimizer: Callable[[Iterable[torch.nn.Parameter]], Any] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.make_optimizer = make_optimizer

    def configure_optimizers(self):
        if self.make_optimizer is None:
            return super().configure_optimizers()
        return self.make_optimizer(self.parameters())


def bnb_adamw8bit(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return bnb.optim.AdamW8bit(params=params, lr=3e-3, weight_decay=0.01)


def _manager() -> Any:
    return bnb.optim.GlobalOptimManager.get_instance()


def _state_of(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """The optimizer's state by parameter name (``tensors``: the objects it optimizes, by name)."""
    names = {id(t): n for n, t in tensors.items()}
    return {names[id(p)]: s for p, s in optimizer.state.items() if s}


def _assert_state_layout(state: dict[str, Any], param: torch.Tensor, eight_bit: bool, where: str) -> None:
    """32-bit: FP32 state1/state2 of the parameter's shape. 8-bit: uint8 codes + FP32 absmax per 256-value block."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not eight_bit:
        assert set(tensors) == {"state1", "state2"}, f"{where}: {sorted(tensors)}"
        for v in tensors.values():
            assert (v.dtype, v.shape) == (torch.float32, param.shape), where
        return
    assert set(tensors) == {"state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2"}, f"{where}: {sorted(tensors)}"
    for k in ("state1", "state2"):
        assert (tensors[k].dtype, tensors[k].shape) == (torch.uint8, param.shape), f"{where}.{k}"
    for k in ("absmax1", "absmax2"):
        assert (tensors[k].dtype, tensors[k].shape) == (torch.float32, (math.ceil(param.numel() / BLOCK),)), where
        assert tensors[k].abs().max() > 0, f"{where}.{k}: the block maxima were never written"
    for k in ("qmap1", "qmap2"):  # the 256-entry dynamic quantization maps (signed for m, unsigned for v)
        assert (tensors[k].dtype, tensors[k].shape) == (torch.float32, (256,)), where


def _bytes_per_param(state: dict[str, Any], numel: int) -> float:
    # the quantization maps are one pair per optimizer, shared by every tensor (checked below), not per-value state
    return sum(state[k].nbytes for k in ("state1", "state2", "absmax1", "absmax2") if k in state) / numel


# ------------------------------------------------------------------------------------------ to_eight_bit alone
# name: (factory over param groups, group-1 overrides, bitsandbytes class). Group 1 changes lr and one more option,
# so translating per group (SGD's momentum becomes bitsandbytes' betas[0]) is tested too.
TRANSLATIONS: dict[str, tuple[Callable[[list], Any], dict[str, Any], str]] = {
    "Adam": (lambda g: torch.optim.Adam(g, lr=1e-2, betas=(0.8, 0.9), eps=1e-6), {"betas": (0.5, 0.99)}, "Adam8bit"),
    "Adam-decoupled": (
        lambda g: torch.optim.Adam(g, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
        {"weight_decay": 0.0},
        "Adam8bit",
    ),
    "AdamW": (lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.1), {"weight_decay": 0.0}, "AdamW8bit"),
    "SGD": (lambda g: torch.optim.SGD(g, lr=1e-2, momentum=0.9, weight_decay=0.01), {"momentum": 0.5}, "SGD8bit"),
    "RMSprop": (lambda g: torch.optim.RMSprop(g, lr=1e-3, alpha=0.9, weight_decay=0.01), {"alpha": 0.5}, "RMSprop8bit"),
    "Adagrad": (lambda g: torch.optim.Adagrad(g, lr=1e-2, weight_decay=0.01), {"eps": 1e-6}, "Adagrad8bit"),
    "bnb-Lion": (lambda g: bnb.optim.Lion(params=g, lr=1e-3, weight_decay=0.01), {"betas": (0.5, 0.9)}, "Lion8bit"),
}


def _quadratic_run(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], targets, steps: int = 5):
    for _ in range(steps):
        optimizer.zero_grad()
        sum(((p - t) ** 2).sum() for p, t in zip(params, targets, strict=True)).backward()
        optimizer.step()


@pytest.mark.parametrize("name", sorted(TRANSLATIONS))
def test_translation_keeps_groups_and_hyper_parameters(name):
    factory, overrides, target = TRANSLATIONS[name]
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 128, generator=g), torch.randn(128, 64, generator=g), torch.randn(64, generator=g)]
    targets = [torch.randn(s.shape, generator=g) for s in start]

    def fresh(make=factory) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
        params = [torch.nn.Parameter(s.clone()) for s in start]
        groups = [{"params": params[:1]}, {"params": params[1:], "lr": 5e-3, "name": "rest", **overrides}]
        return params, make(groups)

    reference_params, reference = fresh()
    _quadratic_run(reference, reference_params, targets)

    # every tensor below min_8bit_size: bitsandbytes' 32-bit path with the translated hyper-parameters must follow
    # the source optimizer's trajectory, which proves lr, betas/momentum/alpha, eps and weight decay (per group) carried
    # over
    params, source = fresh()
    post_hook_calls: list[str] = []
    source.register_step_post_hook(lambda opt, args, kwargs: post_hook_calls.append(type(opt).__name__))
    converted = to_eight_bit(source, min_8bit_size=10**9)
    assert type(converted).__name__ == target
    assert [g["params"] for g in converted.param_groups] == [g["params"] for g in source.param_groups]
    assert converted.param_groups[1]["name"] == "rest"  # keys the source does not define travel unchanged
    _quadratic_run(converted, params, targets)
    for ref, p in zip(reference_params, params, strict=True):
        torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-6)
    assert post_hook_calls == [target] * 5, "step hooks registered on the source optimizer must run on the new one"

    # 8-bit state: the same run within quantization error, with uint8 state for the two matrices
    params8, source8 = fresh()
    eight = to_eight_bit(source8)
    _quadratic_run(eight, params8, targets)
    assert is_eight_bit(eight) and not is_eight_bit(source8)
    assert [eight.state[p]["state1"].dtype for p in params8] == [torch.uint8, torch.uint8, torch.float32]
    for ref, p, s in zip(reference_params, params8, start, strict=True):
        moved = (ref.detach() - s).norm()
        assert (p.detach() - ref.detach()).norm() < 0.05 * moved


@pytest.mark.parametrize(
    ("make", "error", "names"),
    [
        (lambda p: torch.optim.NAdam(p), TypeError, ["torch.optim.nadam.NAdam", "torch.optim.AdamW", "Lion"]),
        (
            lambda p: type("MyAdamW", (torch.optim.AdamW,), {})(p),
            TypeError,
            ["MyAdamW", "bitsandbytes.optim.AdamW8bit"],
        ),
        (lambda p: torch.optim.Adam(p, weight_decay=0.1), ValueError, ["weight_decay=0.1", "torch.optim.AdamW"]),
        (lambda p: torch.optim.AdamW(p, amsgrad=True), ValueError, ["amsgrad=True", "Set amsgrad=False"]),
        (lambda p: torch.optim.AdamW(p, maximize=True), ValueError, ["maximize=True", "Negate the loss"]),
        (lambda p: torch.optim.SGD(p, lr=0.1), ValueError, ["momentum=0", "Remove EightBitState"]),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), ValueError, ["nesterov=True"]),
        (lambda p: torch.optim.RMSprop(p, centered=True), ValueError, ["centered=True"]),
        (lambda p: torch.optim.RMSprop(p, momentum=0.9), ValueError, ["momentum=0.9", "Set momentum=0"]),
        (lambda p: torch.optim.Adagrad(p, lr_decay=0.1), ValueError, ["lr_decay=0.1", "Set lr_decay=0"]),
    ],
    ids=[
        "nadam",
        "subclass",
        "adam-l2",
        "amsgrad",
        "maximize",
        "sgd-no-momentum",
        "nesterov",
        "centered",
        "rmsprop-momentum",
        "adagrad-lr-decay",
    ],
)
def test_unsupported_optimizers_and_options_say_what_to_change(make, error, names):
    optimizer = make([torch.nn.Parameter(torch.zeros(8))])
    with pytest.raises(error) as err:
        to_eight_bit(optimizer)
    for name in names:
        assert name in str(err.value), str(err.value)


def test_an_eight_bit_optimizer_is_kept_as_it_is():
    optimizer = bnb.optim.AdamW8bit(params=[torch.nn.Parameter(torch.zeros(8))], lr=1e-3)
    assert to_eight_bit(optimizer) is optimizer
    assert is_eight_bit(bnb.optim.Adam(params=[torch.nn.Parameter(torch.zeros(8))], optim_bits=8))
    assert not is_eight_bit(bnb.optim.Adam(params=[torch.nn.Parameter(torch.zeros(8))]))


def test_missing_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails as if not installed
    with pytest.raises(
        ModuleNotFoundError, match=r"needs the bitsandbytes package.*pip install -U 'bitsandbytes>=0.50'"
    ):
        EightBitState()
    with pytest.raises(ModuleNotFoundError, match="pip install"):
        to_eight_bit(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(8))]))


@pytest.mark.parametrize(
    ("version", "device", "keeps", "fails_with"),
    [
        ("0.50.2", "cpu", True, None),
        ("0.50.0.dev0", "cpu", True, None),  # a development build of 0.50 has the CPU kernels
        ("0.49.2", "cpu", False, "on the CPU only from 0.50"),
        ("0.45.5", "cuda", False, None),
        ("0.45.5", "cuda", True, "bitsandbytes#1269"),
        ("0.44.1", "cuda", False, "oldest release"),
    ],
)
def test_bitsandbytes_version_floor_depends_on_device_and_overrides(version, device, keeps, fails_with):
    if fails_with is None:
        check_bitsandbytes_version(version, device, keeps_32bit=keeps)
        return
    with pytest.raises(MisconfigurationException, match=fails_with) as err:
        check_bitsandbytes_version(version, device, keeps_32bit=keeps)
    assert f"bitsandbytes {version} is too old" in str(err.value) and "pip install -U" in str(err.value)


def test_too_old_bitsandbytes_stops_a_cpu_run_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(bnb, "__version__", "0.49.1")
    module = LlamaModule(num_layers=1, hidden=64)
    trainer = pl.Trainer(max_steps=1, callbacks=[EightBitState()], **trainer_kwargs(tmp_path))
    with pytest.raises(MisconfigurationException, match=r"bitsandbytes 0\.49\.1 is too old .* cpu run"):
        trainer.fit(module)
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_8bit_size": -1}, "min_8bit_size"),
        ({"keep_32bit": "norm"}, r"Write keep_32bit=\['norm'\]"),
        ({"keep_32bit": ["lm_head", "("]}, "invalid regular expression '\\('"),
    ],
)
def test_constructor_validates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EightBitState(**kwargs)


def test_docstring_examples():
    result = doctest.testmod(eight_bit_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------------------ plain Lightning strategies
class GroupedModule(LlamaModule):
    """AdamW with two param groups (matrices decay; vectors do not, at twice the lr) and a 4-step linear warmup."""

    def configure_optimizers(self):
        matrices = [p for p in self.parameters() if p.ndim >= 2]
        vectors = [p for p in self.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0, "lr": 2 * self.lr}],
            lr=self.lr,
            betas=(0.8, 0.95),
            eps=1e-7,
        )
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


class HookBeforeSwap(Callback):
    """Registers a step post-hook on the configured optimizer in on_fit_start, before EightBitState swaps it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_fit_start(self, trainer, pl_module):
        trainer.optimizers[0].register_step_post_hook(lambda opt, a, k: self.calls.append(type(opt).__name__))


class GradNorms(Callback):
    """Total gradient norm before clipping (on_before_optimizer_step) and what the optimizer stepped with.

    The latter is read in a step post-hook: in automatic optimization the closure (forward, backward, clipping) runs
    inside ``optimizer.step``, after the pre-hooks.
    """

    def __init__(self) -> None:
        self.before_clip: list[float] = []
        self.at_step: list[float] = []

    @staticmethod
    def _norm(optimizer) -> float:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def on_train_start(self, trainer, pl_module):
        trainer.optimizers[0].register_step_post_hook(lambda opt, a, k: self.at_step.append(self._norm(opt)))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before_clip.append(self._norm(optimizer))


def test_swap_keeps_groups_schedule_monitor_clipping_and_hooks(tmp_path):
    steps, lr, clip = 6, 1e-3, 0.05
    module = GroupedModule(num_layers=2, hidden=64, lr=lr)
    hook, norms, monitor = HookBeforeSwap(), GradNorms(), LearningRateMonitor(logging_interval="step")
    eight_bit = EightBitState(keep_32bit=["lm_head", "no_such_parameter"])
    trainer = pl.Trainer(
        max_steps=steps,
        gradient_clip_val=clip,
        log_every_n_steps=1,
        callbacks=[hook, eight_bit, norms, monitor],
        **trainer_kwargs(tmp_path, logger=CSVLogger(tmp_path)),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module)
    messages = [str(w.message) for w in caught]
    # the re-pointed scheduler found its step-order check on the new optimizer (no "overridden" warning)
    assert not [m for m in messages if "lr_scheduler" in m or "overridden" in m], messages
    assert [m for m in messages if "matches no parameter" in m and "'no_such_parameter'" in m], messages

    optimizer = trainer.optimizers[0]
    assert type(optimizer) is bnb.optim.AdamW8bit
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.optimizer is optimizer
    # the groups and their hyper-parameters, with the schedule's current lr (warmup over after 4 steps)
    assert [(g["lr"], g["weight_decay"], g["betas"], g["eps"]) for g in optimizer.param_groups] == [
        (lr, 0.1, (0.8, 0.95), 1e-7),
        (2 * lr, 0.0, (0.8, 0.95), 1e-7),
    ]
    assert [g["initial_lr"] for g in optimizer.param_groups] == [lr, 2 * lr]
    warmup = [min(1.0, (s + 1) / 4) for s in range(steps)]
    assert monitor.lrs["lr-AdamW8bit/pg1"] == pytest.approx([lr * f for f in warmup])
    assert monitor.lrs["lr-AdamW8bit/pg2"] == pytest.approx([2 * lr * f for f in warmup])
    # clipping acted on the gradients the 8-bit optimizer stepped with; the hook from before the swap ran every step
    assert max(norms.before_clip) > clip and len(norms.at_step) == steps
    assert all(n <= clip * (1 + 1e-4) for n in norms.at_step), norms.at_step
    assert hook.calls == ["AdamW8bit"] * steps

    # the state itself: 8-bit for large tensors, 32-bit for the kept ones (embedding by default, lm_head by pattern)
    params = dict(module.named_parameters())
    kept = {"model.model.embed_tokens.weight", "model.lm_head.weight"}
    assert set(eight_bit.kept_32bit) == kept
    state = _state_of(optimizer, params)
    assert set(state) == set(params)
    eight_bit_params = 0
    for name, param in params.items():
        is_eight = name not in kept and param.numel() >= MIN_8BIT
        _assert_state_layout(state[name], param, is_eight, name)
        assert state[name]["step"] == steps
        if is_eight:
            eight_bit_params += param.numel()
            assert _bytes_per_param(state[name], param.numel()) == EIGHT_BIT_BYTES_PER_PARAM, name
            assert state[name]["qmap1"] is optimizer.name2qmap["dynamic"], "one quantization map per optimizer"
        else:
            assert _bytes_per_param(state[name], param.numel()) == 8, name  # two FP32 numbers, as in torch's AdamW
    assert eight_bit_params > 0.7 * sum(p.numel() for p in params.values())
    # the 32-bit exceptions are bitsandbytes-wide settings: gone once fit is over
    assert not {id(params[n]) for n in kept} & set(_manager().pid2config)


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("setup", ["single-32-true", "badam-bf16-true"])
def test_eight_bit_loss_follows_the_32bit_run(tmp_path, setup):
    """40 steps memorising 16 sequences (the loss falls from ln 64 = 4.16): 8-bit state ends within 0.05 of 32-bit.

    Measured here: 0.008 apart (single device, loss 4.17 -> 1.1) and 0.014 (BAdam, 4.17 -> 3.5; only one block
    trains at a time). 0.05 leaves room for other CPUs' rounding and is still well below the loss's fall.
    """

    def run(eight: bool) -> list[float]:
        recorder = LossRecorder()
        callbacks: list[Callback] = [recorder, *([EightBitState()] if eight else [])]
        if setup.startswith("badam"):
            callbacks.append(BlockSwitch(every=5, order="ascending"))
            strategy: Any = BAdamStrategy()
            precision = "bf16-true"
        else:
            strategy, precision = "auto", "32-true"
        module = LlamaModule(num_layers=2, hidden=64, lr=3e-3, n=16)
        trainer = pl.Trainer(
            strategy=strategy, precision=precision, max_steps=40, callbacks=callbacks, **trainer_kwargs(tmp_path)
        )
        trainer.fit(module)
        assert type(trainer.optimizers[0]).__name__ == ("AdamW8bit" if eight else "AdamW")
        return recorder.losses

    full, eight = run(False), run(True)
    final_full, final_eight = sum(full[-4:]) / 4, sum(eight[-4:]) / 4
    assert full[0] - final_full > 0.5, "the model must learn for the comparison to mean anything"
    assert abs(final_eight - final_full) < 0.05, (final_full, final_eight)
    assert full != eight, "identical losses: the 8-bit state did not take effect"


# -------------------------------------------------------------------------------------------------------- BAdam
class BlockStates(Callback):
    """After every step: the active block, its masters' state by name, the groups' sizes and our 32-bit overrides."""

    def __init__(self) -> None:
        self.groups_at_fit_start: list[int] = []
        self.steps: list[dict[str, Any]] = []

    def on_fit_start(self, trainer, pl_module):
        self.groups_at_fit_start = [len(g["params"]) for g in trainer.optimizers[0].param_groups]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        masters = trainer.strategy.master_params
        overridden = {n for n, m in masters.items() if _manager().pid2config.get(id(m), {}).get("optim_bits") == 32}
        self.steps.append(
            {
                "block": trainer.strategy.active_block,
                "state": _clone(_state_of(trainer.optimizers[0], masters)),
                "masters": dict(masters),
                "overridden": overridden,
                "overrides": len(_manager().pid2config),
            }
        )


@pytest.mark.parametrize("mode", ["callback-before-switch", "callback-after-switch", "AdamW8bit-configured"])
def test_badam_block_states_are_eight_bit_and_reset_at_every_switch(tmp_path, mode):
    every, blocks = 2, 4  # embedding, two layers, lm_head
    baseline = len(_manager().pid2config)
    probe, switch = BlockStates(), BlockSwitch(every=every, order="ascending")
    if mode == "AdamW8bit-configured":
        module = OptimizerModule(bnb_adamw8bit, num_layers=2, hidden=64)
        callbacks: list[Callback] = [probe, switch]
        kept: set[str] = set()  # no EightBitState: bitsandbytes' own rule (size) only
    else:
        module = OptimizerModule(num_layers=2, hidden=64)
        eight_bit = EightBitState(keep_32bit=["lm_head"])
        order = [eight_bit, switch] if mode == "callback-before-switch" else [switch, eight_bit]
        callbacks = [probe, *order]
        kept = {"model.model.embed_tokens.weight", "model.lm_head.weight"}
    trainer = pl.Trainer(
        strategy=BAdamStrategy(include_embedding=True, include_lm_head=True),
        precision="bf16-true",
        max_steps=every * blocks,
        callbacks=callbacks,
        **trainer_kwargs(tmp_path),
    )
    trainer.fit(module)
    assert type(trainer.optimizers[0]) is bnb.optim.AdamW8bit
    assert probe.groups_at_fit_start == [0], "BAdam starts from empty param groups"

    assert [s["block"] for s in probe.steps] == [b for b in range(blocks) for _ in range(every)]
    for step, record in enumerate(probe.steps):
        masters = record["masters"]
        # state for the active block's masters only, restarted at its activation (bitsandbytes counts steps itself)
        assert set(record["state"]) == set(masters), step
        assert {s["step"] for s in record["state"].values()} == {step % every + 1}, step
        for name, master in masters.items():
            assert master.dtype == torch.float32
            _assert_state_layout(
                record["state"][name], master, name not in kept and master.numel() >= MIN_8BIT, f"{step}:{name}"
            )
        # the 32-bit exceptions follow the new masters: exactly the kept ones of this block, nothing stale
        assert record["overridden"] == kept & set(masters), step
        assert record["overrides"] == baseline + len(kept & set(masters)), step
    assert len(_manager().pid2config) == baseline


# ------------------------------------------------------------------------------------------------------ resume
class FinalState(Callback):
    """The state at the end of training (weights, BAdam masters, optimizer state dict)."""

    def __init__(self) -> None:
        self.final: dict[str, Any] = {}

    def on_train_end(self, trainer, pl_module):
        self.final = {
            "weights": weights(pl_module),
            "masters": {n: m.detach().clone() for n, m in getattr(trainer.strategy, "master_params", {}).items()},
            "optimizer": _clone(trainer.optimizers[0].state_dict()),
        }


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bit-exact equality of nested containers of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


RESUME_MODES = ["single-EightBitState", "badam-EightBitState", "badam-AdamW8bit-configured"]


def _resume_fit(root: Path, mode: str, max_steps: int, ckpt_path: str | None = None, save_every: int | None = None):
    # two batches per epoch: a checkpoint at an even step sits at an epoch boundary, where Lightning resumes exactly
    configured = mode.endswith("configured")
    module = OptimizerModule(bnb_adamw8bit if configured else None, num_layers=2, hidden=64, lr=3e-3, n=8)
    final = FinalState()
    callbacks: list[Callback] = [final]
    if not configured:
        callbacks.append(EightBitState())
    if mode.startswith("badam"):
        # blocks (embedding, layer 0, layer 1) trained descending: the checkpoint falls in layer 0 (8-bit state), and
        # the resumed run goes on to the embedding, whose 32-bit exception must be registered again
        callbacks.insert(0, BlockSwitch(every=3, order="descending"))
        strategy: Any = BAdamStrategy(include_embedding=True)
        precision = "bf16-true"
    else:
        strategy, precision = "auto", "32-true"
    if save_every is not None:
        callbacks.append(ModelCheckpoint(root, filename="{step}", every_n_train_steps=save_every, save_top_k=-1))
    trainer = pl.Trainer(
        strategy=strategy,
        precision=precision,
        max_steps=max_steps,
        callbacks=callbacks,
        **trainer_kwargs(root, enable_checkpointing=save_every is not None),
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps
    return final.final


@pytest.mark.parametrize("mode", RESUME_MODES)
def test_resume_is_bit_exact(tmp_path, mode):
    k, total = 4, 8  # with every=3, step 4 is in the middle of the second block
    reference = _resume_fit(tmp_path / "full", mode, total)
    _resume_fit(tmp_path / "first", mode, k, save_every=k)
    path = tmp_path / "first" / f"step={k}.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    saved = checkpoint["optimizer_states"][0]["state"]
    codes = [
        s["__bnb_optimizer_quant_state__"]["state1"] for s in saved.values() if "__bnb_optimizer_quant_state__" in s
    ]
    assert torch.uint8 in {c.dtype for c in codes}, "the checkpoint holds the 8-bit codes"
    resumed = _resume_fit(tmp_path / "resumed", mode, total, ckpt_path=str(path))
    _assert_same(reference, resumed, "final")


def test_resuming_a_32bit_checkpoint_with_eight_bit_state_is_refused(tmp_path):
    path = tmp_path / "plain" / "step=2.ckpt"
    module = LlamaModule(num_layers=1, hidden=64, n=8)
    checkpointing = ModelCheckpoint(path.parent, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    pl.Trainer(max_steps=2, callbacks=[checkpointing], **trainer_kwargs(tmp_path, enable_checkpointing=True)).fit(
        module
    )
    trainer = pl.Trainer(max_steps=4, callbacks=[EightBitState()], **trainer_kwargs(tmp_path))
    with pytest.raises(MisconfigurationException, match=r"holds 32-bit state \(exp_avg, exp_avg_sq, step\)"):
        trainer.fit(LlamaModule(num_layers=1, hidden=64, n=8), ckpt_path=str(path))


# ---------------------------------------------------------------------------------------------------------- CLI
CLI_CONFIG = """
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 3
  precision: bf16-true
  strategy: badam
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_memopt.BlockSwitch
      init_args: {{every: 1, order: ascending}}
{extra_callback}
model:
  class_path: models.LlamaModule
  init_args: {{num_layers: 2, hidden: 64}}
optimizer:
  class_path: {optimizer}
  init_args: {{lr: 0.003}}
"""


@pytest.mark.parametrize(
    ("optimizer", "extra_callback"),
    [
        ("torch.optim.AdamW", "    - class_path: lightning_memopt.callbacks.eight_bit.EightBitState"),
        ("bitsandbytes.optim.AdamW8bit", ""),
    ],
    ids=["EightBitState-line", "optimizer-AdamW8bit"],
)
def test_cli_recipe_turns_eight_bit_state_on(tmp_path, optimizer, extra_callback):
    config = tmp_path / "recipe.yaml"
    config.write_text(CLI_CONFIG.format(optimizer=optimizer, extra_callback=extra_callback))
    args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path)]
    cli = MemoptCLI(args=args)  # the pack's CLI, as `lightning-memopt fit --config ...` runs it
    trainer = cli.trainer
    assert trainer.global_step == 3
    assert type(trainer.optimizers[0]) is bnb.optim.AdamW8bit
    state = _state_of(trainer.optimizers[0], trainer.strategy.master_params)
    assert state and {s["state1"].dtype for s in state.values()} == {torch.uint8, torch.float32}


# ---------------------------------------------------------------------------------------------------------- DDP
def _launch_eight_bit(out: Path, *args: str) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, str(DDP_SCRIPT), "--out", str(out), *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(p, weights_only=True) for p in sorted(out.glob("rank*.pt"))]


@pytest.mark.xdist_group("ddp")  # one DDP launch at a time: each wants both cores
@pytest.mark.parametrize("strategy", ["ddp", "badam_ddp"])
def test_two_ranks_hold_identical_eight_bit_state(tmp_path, strategy):
    r0, r1 = _launch_eight_bit(tmp_path, "--strategy", strategy)
    assert r0["world_size"] == 2 and r0["optimizer"] == r1["optimizer"] == "AdamW8bit"
    _assert_same(r0["weights"], r1["weights"], "weights")
    _assert_same(r0["optimizer_state"], r1["optimizer_state"], "optimizer state")  # the uint8 codes included
    kept = {"model.model.embed_tokens.weight", "model.lm_head.weight"}
    assert set(r0["kept"]) == kept
    seen_dtypes = set()
    for step in r0["dtypes"]:
        for name, dtype in step.items():
            eight = name not in kept and r0["numel"][name] >= MIN_8BIT
            assert dtype == ("torch.uint8" if eight else "torch.float32"), (name, dtype)
            seen_dtypes.add(dtype)
    assert seen_dtypes == {"torch.uint8", "torch.float32"}
    assert r0["dtypes"] == r1["dtypes"]


@pytest.mark.xdist_group("ddp")
@pytest.mark.parametrize("strategy", ["ddp", "badam_ddp"])
def test_two_ranks_with_eight_bit_state_match_one_device_at_twice_the_batch(tmp_path, strategy):
    # FP32 weights, so that the ranks' averaged gradients equal one device's to float rounding; 8-bit state then
    # quantizes the same values the same way
    common = ["--strategy", strategy, "--precision", "32-true"]
    r0, _ = _launch_eight_bit(tmp_path / "two", *common, "--batch-size", "2")
    (single,) = _launch_eight_bit(tmp_path / "one", *common, "--devices", "1", "--batch-size", "4")
    assert r0["world_size"] == 2 and single["world_size"] == 1
    assert r0["optimizer"] == single["optimizer"] == "AdamW8bit"
    assert r0["dtypes"] == single["dtypes"]  # the same tensors trained, with the same state layout, at every step
    start = weights(LlamaModule(num_layers=2, hidden=64))
    moved = {n: (w - start[n]).abs().max().item() for n, w in single["weights"].items()}
    trained = [n for n, m in moved.items() if m > 0]
    # six AdamW steps at lr 3e-3 move a trained element by up to ~1.8e-2; under BAdam (2 steps per block, random
    # order, lm_head a block too) three of its blocks trained
    assert max(moved.values()) > 5e-3 and len(trained) >= 9, moved
    for name, w in single["weights"].items():
        # a missing or doubled step would be off by a learning rate (3e-3) or more
        torch.testing.assert_close(r0["weights"][name], w, rtol=0, atol=1e-4, msg=name)
