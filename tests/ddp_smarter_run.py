"""Importance-sampled blocks and state-free updates in a real multi-process run: `python tests/ddp_smarter_run.py`.

Lightning's launcher re-runs this script once per extra rank. Every rank writes what it holds at the end to
`OUT/rank{R}.pt`: the sets of blocks it trained, the importance scores, the weights, the stochastic-rounding generator
state, and for the first optimizer step the weights and this rank's own (not yet all-reduced) gradients of the
inactive blocks, so that the test can recompute the all-reduced state-free update. `run(argv)` does the same in the
calling process (the one-device reference).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).parent))
from models import LlamaModule, token_loader

from lightning_memopt import BAdamDDPStrategy, BAdamFSDPStrategy, BAdamStrategy, BlockSwitch
from lightning_memopt.callbacks.state_free import StateFreeUpdates
from lightning_memopt.strategies.collectives import finish_distributed

# what an in-process DDP Trainer (world size 1) leaves in os.environ would make the launched ranks reuse its port
_LAUNCH_ENV_SCRUB = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")


def launch(out: Path, *args: str) -> list[dict[str, Any]]:
    """Run this script on two gloo processes and load what every rank wrote."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV_SCRUB}
    proc = subprocess.run(
        [sys.executable, __file__, "--out", str(out), *args], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(p, weights_only=True) for p in sorted(Path(out).glob("rank*.pt"))]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class InOrderModule(LlamaModule):
    """Shards the data in order, so 2 ranks x batch b see what 1 device x batch 2b sees."""

    def train_dataloader(self):
        loader = token_loader(n=self.n, batch_size=self.batch_size, seq=8)
        if self.trainer.world_size == 1:
            return loader
        sampler = DistributedSampler(
            loader.dataset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return DataLoader(loader.dataset, batch_size=self.batch_size, sampler=sampler)


class Record(Callback):
    """Placed after BlockSwitch and before StateFreeUpdates in the callback list."""

    def __init__(self) -> None:
        self.sets: list[list[int]] = []
        self.first_weights: dict[str, torch.Tensor] = {}
        self.first_local_grads: dict[str, torch.Tensor] = {}
        self.after_first: dict[str, torch.Tensor] = {}
        self.lr = 0.0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.sets.append(list(trainer.strategy.active_blocks))
        if trainer.global_step == 0:
            self.lr = float(optimizer.param_groups[0]["lr"])
            masters = trainer.strategy.master_params
            for name, p in pl_module.named_parameters():
                self.first_weights[name] = _full(p.detach()).clone()
                if name not in masters and p.grad is not None:
                    self.first_local_grads[name] = p.grad.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            self.after_first = {n: _full(p.detach()).clone() for n, p in pl_module.named_parameters()}


def run(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--strategy", default="badam_ddp", choices=["badam_ddp", "badam_fsdp"])
    parser.add_argument("--precision", default="bf16-true")
    parser.add_argument("--granularity", default="module")
    parser.add_argument("--budget", type=float, default=0.3)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--state-free", action="store_true")
    parser.add_argument("--lr-ratio", type=float, default=0.5)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    module = InOrderModule(num_layers=args.layers, hidden=16, lr=args.lr, n=32, batch_size=args.batch_size)
    kwargs = {"granularity": args.granularity}
    if args.devices == 1:
        strategy: Any = BAdamStrategy(**kwargs)
    elif args.strategy == "badam_fsdp":
        strategy = BAdamFSDPStrategy(**kwargs)
    else:
        strategy = BAdamDDPStrategy(**kwargs)
    switch = BlockSwitch(every=args.every, order="importance", budget=args.budget, seed=7)
    record = Record()
    callbacks: list[Callback] = [switch, record]
    state_free = StateFreeUpdates(rule="signsgd", lr_ratio=args.lr_ratio, seed=3) if args.state_free else None
    if state_free is not None:
        callbacks.append(state_free)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        precision=args.precision,
        max_steps=args.steps,
        callbacks=callbacks,
        use_distributed_sampler=False,
        default_root_dir=out,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module)
    result = {
        "world_size": trainer.world_size,
        "sets": record.sets,
        "scores": switch.scores,
        "budget_params": switch._budget_params,
        "sizes": switch._sizes,
        "block_names": [b.name for b in trainer.strategy.blocks],
        "weights": {n: _full(p.detach()).clone() for n, p in module.named_parameters()},
        "first_weights": record.first_weights,
        "first_local_grads": record.first_local_grads,
        "after_first": record.after_first,
        "lr": record.lr,
        "rounding_state": state_free.state_dict()["generator"] if state_free is not None else None,
    }
    torch.save(result, out / f"rank{trainer.global_rank}.pt")
    return result


if __name__ == "__main__":
    run()
    finish_distributed()
