"""A BAdam run that `tests/test_crash_resume.py` kills with SIGKILL at a chosen point, then resumes from `last.ckpt`.

`python tests/crash_resume_run.py --root DIR [--resume] [--stop WHERE:STEP]` trains a tiny Llama with
`BAdamStrategy` (bf16-true, random block order, `every=3`), writing `DIR/checkpoints/step=N.ckpt` and `last.ckpt`
every 2 steps. Two batches make an epoch, so every checkpoint lies at an epoch boundary (Lightning does not restore
the position inside an epoch of a plain DataLoader). `--stop` makes it write `DIR/stopped.json` at that point and wait
there to be killed:

- `batch_end:S`: after optimizer step S-1, when `global_step == S`;
- `batch_start:S`: at the start of the batch with `global_step == S`, after `BlockSwitch` has (re)activated a block;
- `writing:S`: halfway through writing `last.ckpt` at `global_step == S`, from the `CheckpointIO` (a subclass of the
  BAdam strategies' default, `AtomicCheckpointIO`, whose `torch.save` writes half the bytes, flushes them to disk
  and waits).

The test imports `train` to run the uninterrupted reference and the final resume in its own process.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

sys.path.insert(0, str(Path(__file__).parent))
from models import LlamaModule

from lightning_memopt import BAdamStrategy, BlockSwitch
from lightning_memopt.checkpoint_io import AtomicCheckpointIO
from lightning_memopt.strategies.collectives import finish_distributed

MAX_STEPS = 10
EVERY = 3  # optimizer steps per block: step 4 is inside a block, step 6 starts one
SAVE_EVERY = 2  # = batches per epoch
MARKER = "stopped.json"


def _wait_to_be_killed(root: Path, stop: str, **facts: Any) -> None:
    marker = root / MARKER
    marker.with_suffix(".tmp").write_text(json.dumps({"stop": stop, **facts}))
    os.replace(marker.with_suffix(".tmp"), marker)
    time.sleep(600)
    raise SystemExit(f"{stop}: not killed within 600 s")


class StopAt(Callback):
    """Waits to be killed at ``batch_end:S`` or ``batch_start:S`` (after BlockSwitch in the callback list)."""

    def __init__(self, root: Path, stop: str | None) -> None:
        self.root = root
        self.where, _, step = (stop or "none:-1").partition(":")
        self.step = int(step)
        self.stop = stop

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.where == "batch_start" and trainer.global_step == self.step:
            _wait_to_be_killed(self.root, self.stop, active_block=trainer.strategy.active_block)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.where == "batch_end" and trainer.global_step == self.step:
            _wait_to_be_killed(self.root, self.stop, active_block=trainer.strategy.active_block)


class SlowLastCheckpoint(AtomicCheckpointIO):
    """``AtomicCheckpointIO`` that stops halfway through writing ``last.ckpt`` at one step (``writing:S``)."""

    def __init__(self, root: Path, stop: str | None) -> None:
        super().__init__()
        self.root = root
        self.stop = stop
        where, _, step = (stop or "none:-1").partition(":")
        self.step = int(step) if where == "writing" else None

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if self.step is None or Path(path).name != "last.ckpt" or checkpoint["global_step"] != self.step:
            return super().save_checkpoint(checkpoint, path, storage_options)
        real_save = torch.save

        def half_then_wait(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            _wait_to_be_killed(self.root, self.stop, file=getattr(f, "name", None), size=len(data))

        torch.save = half_then_wait
        try:
            return super().save_checkpoint(checkpoint, path, storage_options)
        finally:
            torch.save = real_save


class FinalState(Callback):
    """The block of every step, and at the end everything an exact resume must reproduce."""

    def __init__(self) -> None:
        self.blocks: list[tuple[int, int]] = []
        self.final: dict[str, Any] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.blocks.append((trainer.global_step, trainer.strategy.active_block))

    def on_train_end(self, trainer, pl_module):
        switch = next(c for c in trainer.callbacks if isinstance(c, BlockSwitch))
        self.final = {
            "global_step": trainer.global_step,
            "weights": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "masters": {n: m.detach().clone() for n, m in trainer.strategy.master_params.items()},
            "optimizer": _clone(trainer.optimizers[0].state_dict()),
            "switch": _clone(switch.state_dict()),
            "blocks": list(self.blocks),
        }


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def train(root: Path, max_steps: int = MAX_STEPS, resume: bool = False, stop: str | None = None) -> dict[str, Any]:
    """Trains (from ``root/checkpoints/last.ckpt`` if ``resume``) and returns the final state."""
    torch.set_num_threads(1)
    checkpoints = root / "checkpoints"
    final = FinalState()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=BAdamStrategy(checkpoint_io=SlowLastCheckpoint(root, stop)),
        precision="bf16-true",
        max_steps=max_steps,
        callbacks=[
            BlockSwitch(every=EVERY, order="random", seed=1),
            StopAt(root, stop),
            final,
            ModelCheckpoint(
                dirpath=checkpoints,
                filename="{step}",
                every_n_train_steps=SAVE_EVERY,
                save_top_k=-1,
                save_last=True,
                enable_version_counter=False,
            ),
        ],
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    module = LlamaModule(num_layers=3, hidden=16, n=2 * 4, batch_size=4)
    trainer.fit(module, ckpt_path=str(checkpoints / "last.ckpt") if resume else None)
    return final.final


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--max-steps", type=int, default=MAX_STEPS)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop", default=None)
    args = parser.parse_args()
    train(Path(args.root), args.max_steps, args.resume, args.stop)


if __name__ == "__main__":
    main()
    finish_distributed()
