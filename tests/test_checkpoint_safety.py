"""BAdam checkpoints hold only tensors, numbers, strings and plain containers: they load with
``torch.load(weights_only=True)``, and nothing in them names code to run.

Covered: every piece of state the pack adds to a checkpoint (the active block's masters, the stash of
``keep_optimizer_state``, the ``16-true`` loss scaler, bitsandbytes' 8-bit optimizer state, the ``BlockSwitch``
schedule with its RNG), on real checkpoints written by ``ModelCheckpoint`` during ``fit``.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from models import LlamaModule, trainer_kwargs

from lightning_memopt import BAdamStrategy, BlockSwitch, EightBitState, MasterGradScalerPrecision

LEAVES = (int, float, str, bool, type(None))
CONTAINERS = (dict, OrderedDict, list, tuple)

# name: (precision, LlamaModule options, BAdamStrategy options, extra callbacks)
SETUPS: dict[str, tuple[str, dict[str, Any], dict[str, Any], list[type[Callback]]]] = {
    "bf16-true": ("bf16-true", {"hidden": 16}, {}, []),
    "16-true-loss-scaler": ("16-true", {"hidden": 16, "n": 8, "batch_size": 2}, {}, []),
    "keep_optimizer_state": ("bf16-true", {"hidden": 16}, {"keep_optimizer_state": True}, []),
    # hidden 64: the attention and MLP matrices are large enough for 8-bit state (bitsandbytes' min_8bit_size)
    "eight-bit-state": ("bf16-true", {"hidden": 64}, {}, [EightBitState]),
}


def _badam_checkpoint(root: Path, setup: str) -> Path:
    precision, module_options, strategy_options, extra = SETUPS[setup]
    trainer = pl.Trainer(
        strategy=BAdamStrategy(**strategy_options),
        precision=precision,
        max_steps=3,
        callbacks=[
            BlockSwitch(every=1, order="random", seed=2),
            *(cls() for cls in extra),
            ModelCheckpoint(root, filename="step{step}", every_n_train_steps=3),
        ],
        **trainer_kwargs(root, enable_checkpointing=True),
    )
    trainer.fit(LlamaModule(num_layers=2, **module_options))
    (path,) = root.glob("*.ckpt")
    return path


def _walk(obj: Any, where: str, seen: dict[str, int]) -> None:
    """Fails on anything that is not a plain tensor, number, string, bool, None or a plain container of them."""
    kind = type(obj)
    if isinstance(obj, torch.Tensor):
        assert kind is torch.Tensor, f"{where}: a {kind.__qualname__}, not a plain tensor"
        seen["tensor"] += 1
    elif kind in LEAVES:
        seen["plain"] += 1
    elif kind in CONTAINERS:
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, value in items:
            assert type(key) in (str, int), f"{where}: key {key!r} of type {type(key).__qualname__}"
            _walk(value, f"{where}[{key!r}]", seen)
    else:
        pytest.fail(f"{where}: {kind.__module__}.{kind.__qualname__} is not a tensor, number, string or container")


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_checkpoints_hold_only_tensors_and_plain_values(tmp_path, setup):
    path = _badam_checkpoint(tmp_path, setup)
    # every global the pickle refers to is on torch's weights-only allow list: loading runs no code from the file
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    seen = {"tensor": 0, "plain": 0}
    _walk(checkpoint, "checkpoint", seen)
    assert seen["tensor"] > 0 and seen["plain"] > 0

    # the state this setup adds is really in the file (so the walk above went through it)
    badam = checkpoint["optimizer_states"][0]["badam"]
    assert badam["masters"] and all(m.dtype == torch.float32 for m in badam["masters"].values())
    assert torch.is_tensor(checkpoint["callbacks"]["BlockSwitch"]["generator"])
    if setup == "keep_optimizer_state":
        assert badam["stash"], "no stashed optimizer state of an inactive block"
    if setup == "16-true-loss-scaler":
        assert checkpoint[MasterGradScalerPrecision.__qualname__]["scale"] > 0
    if setup == "eight-bit-state":
        states = checkpoint["optimizer_states"][0]["state"].values()
        codes = [s["__bnb_optimizer_quant_state__"]["state1"] for s in states if "__bnb_optimizer_quant_state__" in s]
        assert any(c.dtype == torch.uint8 for c in codes), "no 8-bit optimizer state in the checkpoint"
