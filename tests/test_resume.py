"""Exact resume of BAdam runs from real checkpoint files.

A run checkpointed at step ``k`` and resumed with a fresh module and Trainer must end bit-identical to the run that
was never interrupted: the half weights, the active block's FP32 masters and optimizer state, the block schedule
(including the random order's RNG) and, for ``16-true``, the loss scaler. Checkpoints sit at epoch boundaries (two
batches per epoch): Lightning does not fast-forward a plain DataLoader inside an epoch, so a mid-epoch checkpoint
would resume on other data. ``k=4`` is in the middle of a block (``every=3``), ``k=6`` is exactly at a switch.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import LlamaModule, token_loader, trainer_kwargs, weights

from lightning_memopt import BAdamStrategy, BlockSwitch, MasterGradScalerPrecision

EVERY = 3
MAX_STEPS = 10  # with 3 blocks and every=3 the run starts a second pass over the blocks (a fresh random permutation)
BATCH = 4
N_SAMPLES = 2 * BATCH  # two batches per epoch: every even step is an epoch boundary
ORDERS = ("ascending", "descending", "random", "fixed")


@dataclass(frozen=True)
class Setup:
    precision: str  # the Trainer's precision flag
    half: torch.dtype  # the dtype the model's weights are kept in
    num_layers: int
    seq: int
    growth_interval: int | None = None  # 16-true: a loss scaler that grows every n steps (None: the default scaler)


SETUPS = {
    "bf16-true": Setup("bf16-true", torch.bfloat16, num_layers=3, seq=16),
    "32-true": Setup("32-true", torch.float32, num_layers=3, seq=16),
    # fp16 matmul on CPU is very slow: a smaller model and shorter sequences
    "16-true": Setup("16-true", torch.float16, num_layers=2, seq=8),
    # the scale doubles every step until the FP16 gradients overflow: steps are skipped and the scale halves on both
    # sides of the checkpoint, so the weights themselves depend on the restored scaler state
    "16-true-overflows": Setup("16-true", torch.float16, num_layers=2, seq=8, growth_interval=1),
}


class SeqLlamaModule(LlamaModule):
    """``LlamaModule`` with a configurable sequence length (the shared helper fixes it at 16)."""

    def __init__(self, seq: int = 16, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seq = seq

    def train_dataloader(self):
        return token_loader(n=self.n, seq=self.seq, batch_size=self.batch_size)


class Recorder(Callback):
    """Records, per optimizer step, the block that trains, a checksum of the batch and the loss scale; at the end, the
    final state (read in ``on_train_end``, before the strategy's teardown drops the masters and the optimizer state).

    Must come after ``BlockSwitch`` in the callback list so that ``on_train_batch_start`` sees this step's block.
    """

    def __init__(self) -> None:
        self.steps: list[tuple[int, int | None, int, float | None]] = []
        self.final: dict[str, Any] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        plugin = trainer.precision_plugin
        scale = plugin.scaler.get_scale() if isinstance(plugin, MasterGradScalerPrecision) else None
        self.steps.append((trainer.global_step, trainer.strategy.active_block, int(batch[0].sum()), scale))

    def on_train_end(self, trainer, pl_module):
        strategy = trainer.strategy
        self.final = {
            "global_step": trainer.global_step,
            "active_block": strategy.active_block,
            "masters": {n: m.detach().clone() for n, m in strategy.master_params.items()},
            "optimizer": _clone(trainer.optimizers[0].state_dict()),
        }
        if isinstance(trainer.precision_plugin, MasterGradScalerPrecision):
            self.final["scaler"] = dict(trainer.precision_plugin.state_dict())

    @property
    def blocks(self) -> list[int | None]:
        return [b for _, b, _, _ in self.steps]


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bit-exact recursive equality of nested containers of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{where}: {a.dtype} {a.shape} != {b.dtype} {b.shape}"
        assert torch.equal(a, b), f"{where}: tensors differ (max abs diff {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _assert_weights_equal(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert set(expected) == set(actual)
    differ = [n for n in expected if expected[n].dtype != actual[n].dtype or not torch.equal(expected[n], actual[n])]
    assert not differ, f"{len(differ)}/{len(expected)} parameters differ after resume, e.g. {differ[:3]}"


def _fit(
    root,
    setup: str,
    order: str,
    max_steps: int,
    ckpt_path=None,
    save_every: int | None = None,
    every: int = EVERY,
    n_samples: int = N_SAMPLES,
    **strategy_kwargs: Any,
) -> tuple[LlamaModule, pl.Trainer, BlockSwitch, Recorder]:
    """A fresh module and Trainer, trained to ``max_steps`` (resumed from ``ckpt_path`` if given)."""
    cfg = SETUPS[setup]
    module = SeqLlamaModule(n=n_samples, batch_size=BATCH, num_layers=cfg.num_layers, hidden=16, seq=cfg.seq)
    switch = BlockSwitch(every=every, order=order)
    recorder = Recorder()
    callbacks: list[Callback] = [switch, recorder]
    if save_every is not None:
        callbacks.append(ModelCheckpoint(root, filename="{step}", every_n_train_steps=save_every, save_top_k=-1))
    if cfg.growth_interval is not None:
        strategy_kwargs["precision_plugin"] = MasterGradScalerPrecision(growth_interval=cfg.growth_interval)
    trainer = pl.Trainer(
        strategy=BAdamStrategy(**strategy_kwargs),
        precision=cfg.precision,
        callbacks=callbacks,
        max_steps=max_steps,
        **trainer_kwargs(root, enable_checkpointing=save_every is not None),
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps
    return module, trainer, switch, recorder


_REFERENCES: dict[tuple, tuple] = {}
_CHECKPOINTS: dict[tuple, str] = {}


def _reference(tmp_path_factory, setup: str, order: str, **options: Any):
    """The uninterrupted run (cached: several resume cases compare against it)."""
    key = (setup, order, tuple(sorted(options.items())))
    if key not in _REFERENCES:
        _REFERENCES[key] = _fit(tmp_path_factory.mktemp("reference"), setup, order, MAX_STEPS, **options)
    return _REFERENCES[key]


def _checkpoint(tmp_path_factory, setup: str, order: str, k: int, **options: Any) -> str:
    """The run interrupted at step ``k``: ``ModelCheckpoint`` writes the file during ``fit`` (cached)."""
    key = (setup, order, k, tuple(sorted(options.items())))
    if key not in _CHECKPOINTS:
        root = tmp_path_factory.mktemp("interrupted")
        _fit(root, setup, order, k, save_every=k, **options)
        path = root / f"step={k}.ckpt"
        assert path.is_file(), sorted(p.name for p in root.iterdir())
        _CHECKPOINTS[key] = str(path)
    return _CHECKPOINTS[key]


def _assert_resume_exact(reference, resumed, k: int) -> None:
    ref_module, _, ref_switch, ref_rec = reference
    module, _, switch, rec = resumed
    _assert_weights_equal(weights(ref_module), weights(module))
    # the same block, on the same batch, with the same loss scale at every step after the checkpoint
    assert rec.blocks == [b for s, b, _, _ in ref_rec.steps if s >= k]
    assert rec.steps == [s for s in ref_rec.steps if s[0] >= k]
    # the same final masters, optimizer state, loss scaler, active block and schedule state (order, position, RNG)
    _assert_same(ref_rec.final, rec.final, "final")
    assert switch.active_block == ref_switch.active_block == ref_rec.final["active_block"]
    _assert_same(ref_switch.state_dict(), switch.state_dict(), "BlockSwitch")


# ---------------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("k", [4, 6], ids=["mid_block", "at_switch"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_resume_is_bit_exact(tmp_path_factory, tmp_path, setup, order, k):
    reference = _reference(tmp_path_factory, setup, order)
    resumed = _fit(tmp_path, setup, order, MAX_STEPS, ckpt_path=_checkpoint(tmp_path_factory, setup, order, k))
    _assert_resume_exact(reference, resumed, k)
    visited = reference[3].blocks[::EVERY]
    if order == "random":  # the schedule visits every block and leaves the ascending cycle
        assert set(visited) == set(range(SETUPS[setup].num_layers)), visited
        assert visited != sorted(visited), visited
    if SETUPS[setup].growth_interval is not None:  # steps were skipped and the scale halved after the checkpoint
        scales = [scale for step, _, _, scale in reference[3].steps if step >= k]
        assert any(b < a for a, b in pairwise(scales)), scales


def test_keep_optimizer_state_resume_is_bit_exact(tmp_path_factory, tmp_path):
    # k=4: block 0's state is stashed in the checkpoint and is needed again at step 9 (second pass)
    setup, order, k = "bf16-true", "ascending", 4
    reference = _reference(tmp_path_factory, setup, order, keep_optimizer_state=True)
    path = _checkpoint(tmp_path_factory, setup, order, k, keep_optimizer_state=True)
    stash = torch.load(path, weights_only=True)["optimizer_states"][0]["badam"]["stash"]
    assert set(stash) == set(reference[1].strategy.blocks[0].param_names)
    assert all(s["exp_avg"].dtype == torch.float32 and float(s["step"]) == EVERY for s in stash.values())
    resumed = _fit(tmp_path, setup, order, MAX_STEPS, ckpt_path=path, keep_optimizer_state=True)
    _assert_resume_exact(reference, resumed, k)
    # block 0 came back with its stashed state: its Adam step count goes on from the first pass (3 + 1)
    assert resumed[3].blocks[-1] == 0
    assert {float(s["step"]) for s in resumed[3].final["optimizer"]["state"].values()} == {EVERY + 1.0}


@pytest.mark.parametrize("setup", ["bf16-true", "32-true"])
def test_save_checkpoint_after_fit_resumes_exactly(tmp_path_factory, tmp_path, setup):
    """The plain recipe: ``fit(max_steps=k)``, then ``trainer.save_checkpoint(path)``, then resume.

    One batch per epoch here: after a ``max_steps`` stop, Lightning itself (any strategy) resumes such a checkpoint
    on a phantom extra batch of the finished epoch, which re-reads the epoch's first batch.
    """
    k = 4
    reference = _reference(tmp_path_factory, setup, "ascending", n_samples=BATCH)
    _, trainer, _, _ = _fit(tmp_path / "first", setup, "ascending", k, n_samples=BATCH)
    path = tmp_path / "after_fit.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["optimizer_states"][0]
    assert "badam" in state, "trainer.save_checkpoint after fit() wrote no BAdam state (active block, masters)"
    assert state["state"], "trainer.save_checkpoint after fit() wrote an empty optimizer state"
    resumed = _fit(tmp_path / "second", setup, "ascending", MAX_STEPS, ckpt_path=path, n_samples=BATCH)
    _assert_resume_exact(reference, resumed, k)


# ---------------------------------------------------------------------------------------------------- contents
@pytest.mark.parametrize("setup", ["bf16-true", "32-true", "16-true"])
def test_checkpoint_contents(tmp_path_factory, setup):
    cfg = SETUPS[setup]
    ckpt = torch.load(_checkpoint(tmp_path_factory, setup, "ascending", 4), weights_only=True)
    state_dict = ckpt["state_dict"]
    assert {t.dtype for t in state_dict.values()} == {cfg.half}

    opt_state = ckpt["optimizer_states"][0]
    badam = opt_state["badam"]
    assert badam["format"] == 1
    assert badam["block_names"] == [f"model.model.layers.{i}" for i in range(cfg.num_layers)]
    assert badam["active_block"] == 1  # steps 3..5 train block 1 (ascending, every=3)
    active = [n for n in state_dict if n.startswith("model.model.layers.1.")]
    # the param groups list every configured parameter, as a plain optimizer's do; Adam state of the active block
    # only, one step into it, under the active parameters' positions
    names = list(state_dict)
    assert [g["params"] for g in opt_state["param_groups"]] == [list(range(len(names)))]
    assert sorted(opt_state["state"]) == [names.index(n) for n in active]
    assert badam["optimizer_groups"] == "full"
    assert all(float(s["step"]) == 1 and s["exp_avg"].dtype == torch.float32 for s in opt_state["state"].values())
    if cfg.half is torch.float32:
        assert badam["masters"] == {}  # FP32 weights are their own masters
    else:
        masters = badam["masters"]
        assert sorted(masters) == sorted(active)
        assert all(m.dtype == torch.float32 for m in masters.values())
        for name, master in masters.items():
            assert torch.equal(master.to(cfg.half), state_dict[name]), name  # the half weights are rounded masters
        # the masters carry precision the half weights lack (which is why exact resume needs them)
        assert any(not torch.equal(m, state_dict[n].float()) for n, m in masters.items())

    switch = ckpt["callbacks"][BlockSwitch(every=EVERY, order="ascending").state_key]
    assert (switch["segment"], switch["current"], switch["num_blocks"]) == (1, 1, cfg.num_layers)

    scaler = ckpt.get(MasterGradScalerPrecision.__qualname__)
    if cfg.precision == "16-true":
        assert scaler is not None, f"no loss scaler state; keys: {sorted(ckpt)}"
        assert {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"} <= set(scaler)
        assert scaler["_growth_tracker"] == 4  # four overflow-free steps at the default scale
    else:
        assert scaler is None


# ---------------------------------------------------------------------------------------------------- mismatches
LAYOUTS = {
    # another number of blocks: the saved schedule cannot go on
    "fewer_blocks": (["model.model.layers.0", ["model.model.layers.1", "model.model.layers.2"]], "has 2"),
    # as many blocks with other contents: the masters would land in other parameters; the message must say which
    "other_blocks": (
        ["model.model.layers.0", "model.model.layers.1", ["model.model.layers.2", "model.model.norm"]],
        "model.model.layers.2 + model.model.norm",
    ),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_resume_with_other_block_layout_raises(tmp_path_factory, tmp_path, layout):
    prefixes, names_the_difference = LAYOUTS[layout]
    path = _checkpoint(tmp_path_factory, "bf16-true", "ascending", 4)
    with pytest.raises(MisconfigurationException) as err:
        _fit(tmp_path, "bf16-true", "ascending", MAX_STEPS, ckpt_path=path, block_prefixes=prefixes)
    message = str(err.value)
    assert "block layout" in message and "Resume with the same" in message, message
    assert "3" in message and names_the_difference in message, message


@pytest.mark.parametrize(("every", "order"), [(2, "ascending"), (EVERY, "descending")], ids=["every", "order"])
def test_resume_with_other_schedule_raises(tmp_path_factory, tmp_path, every, order):
    path = _checkpoint(tmp_path_factory, "bf16-true", "ascending", 4)
    with pytest.raises(MisconfigurationException) as err:
        _fit(tmp_path, "bf16-true", order, MAX_STEPS, ckpt_path=path, every=every)
    message = str(err.value)
    assert f"every={EVERY}" in message and "'ascending'" in message, message  # what the checkpoint was made with
    assert f"every={every}" in message and "same schedule" in message, message


# ------------------------------------------------------------------------------------------- plain-strategy resume
def test_a_badam_checkpoint_resumes_with_a_plain_strategy(tmp_path_factory, tmp_path):
    # continue a BAdam run with full AdamW: the saved groups list every parameter, so the plain optimizer loads the
    # active block's Adam state and starts the others fresh
    path = _checkpoint(tmp_path_factory, "bf16-true", "ascending", 4)
    saved = torch.load(path, weights_only=True)
    names = list(saved["state_dict"])
    active = [n for n in names if n.startswith("model.model.layers.1.")]
    loaded: dict[str, Any] = {}

    class AtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            optimizer = trainer.optimizers[0]
            by_param = {p: n for n, p in pl_module.named_parameters()}
            loaded.update({by_param[p]: _clone(s) for p, s in optimizer.state.items() if s})
            loaded["__weights"] = weights(pl_module)

    module = SeqLlamaModule(n=N_SAMPLES, batch_size=BATCH, num_layers=3, hidden=16, seq=16)
    trainer = pl.Trainer(precision="bf16-mixed", callbacks=[AtStart()], max_steps=6, **trainer_kwargs(tmp_path))
    trainer.fit(module, ckpt_path=path)
    assert trainer.global_step == 6
    weights_at_start = loaded.pop("__weights")
    assert sorted(loaded) == sorted(active)  # state for the block BAdam was training, nothing else
    for name in active:
        expected = saved["optimizer_states"][0]["state"][names.index(name)]
        _assert_same(expected, loaded[name], name)
    for name, value in weights_at_start.items():
        assert torch.equal(value, saved["state_dict"][name].float()), name  # the checkpoint's (bf16) weights
    # two full AdamW steps at lr 1e-3 move every parameter, inactive blocks, embedding and head included
    moved = {n: (p.detach() - weights_at_start[n]).abs().max().item() for n, p in module.named_parameters()}
    assert min(moved.values()) > 1e-4, min(moved, key=moved.get)


def test_a_checkpoint_in_the_older_layout_still_resumes_exactly(tmp_path_factory, tmp_path):
    # before the groups listed every parameter, they listed the active masters only (numbered 0, 1, ... in group
    # order) and the BAdam entry had no "optimizer_groups"; such a file must still resume bit-exactly
    ckpt = torch.load(_checkpoint(tmp_path_factory, "bf16-true", "ascending", 4), weights_only=True)
    opt_state = ckpt["optimizer_states"][0]
    active = sorted(opt_state["state"])
    opt_state["state"] = {i: opt_state["state"][full] for i, full in enumerate(active)}
    opt_state["param_groups"] = [{**opt_state["param_groups"][0], "params": list(range(len(active)))}]
    del opt_state["badam"]["optimizer_groups"]
    old = tmp_path / "old-layout.ckpt"
    torch.save(ckpt, old)
    resumed = _fit(tmp_path, "bf16-true", "ascending", MAX_STEPS, ckpt_path=str(old))
    _assert_resume_exact(_reference(tmp_path_factory, "bf16-true", "ascending"), resumed, 4)
