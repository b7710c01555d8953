"""A real 2-process BAdamDDP run with Adafactor's stabilisers, launched by the tests as
`python tests/ddp_stabilisers_run.py --out DIR ...` (Lightning's launcher re-runs it once per extra rank).

Every rank writes to `DIR/rank{R}.pt` what it holds at the end (weights, masters, optimizer state, the callbacks'
state) and, per optimizer step and active-block tensor, RMS(ΔX) / (max(ε₂, RMS(Xₜ₋₁))·ρₜ): with update clipping and
the relative step size that ratio is the RMS of the clipped update, so it must be <= 1 (and 1 at each block's first
step, where Adam's update is g/|g|). `--fused-update` steps each master in its gradient hook
(`BAdamDDPStrategy(fused_update=True)`); `--no-stabilisers` is the reference run without the three callbacks.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).parent))
from models import LlamaModule, token_loader

from lightning_memopt import BAdamDDPStrategy, BlockSwitch
from lightning_memopt.callbacks.beta2_schedule import Beta2Schedule
from lightning_memopt.callbacks.relative_step import RelativeStepSize
from lightning_memopt.callbacks.update_clipping import UpdateClipping
from lightning_memopt.strategies.collectives import finish_distributed


class ShardedModule(LlamaModule):
    """Shards the data in order, so that the ranks see different batches (and must average their gradients)."""

    def train_dataloader(self):
        loader = token_loader(n=self.n, batch_size=self.batch_size, seq=8)
        sampler = DistributedSampler(
            loader.dataset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return DataLoader(loader.dataset, batch_size=self.batch_size, sampler=sampler)


def _rms(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x.double())) / math.sqrt(x.numel())


class Record(Callback):
    def __init__(self) -> None:
        self.blocks: list[int] = []
        self.ratios: list[list[float]] = []
        self._before: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # before backward (and after BlockSwitch's switch): with fused_update the hooks step the masters in backward
        self._before = {n: m.detach().clone() for n, m in trainer.strategy.master_params.items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.blocks.append(trainer.strategy.active_block)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        t = trainer.global_step  # this step's t (global_step already counts it)
        rho = min(1e-2, 1 / math.sqrt(t))
        after = trainer.strategy.master_params
        self.ratios.append([_rms(after[n] - x) / (max(1e-3, _rms(x)) * rho) for n, x in sorted(self._before.items())])

    def on_train_end(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        self.masters = {n: m.detach().clone() for n, m in trainer.strategy.master_params.items()}
        self.state = {n: dict(optimizer.state[m]) for n, m in trainer.strategy.master_params.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--fused-update", action="store_true", help="BlockOptions.fused_update=True")
    parser.add_argument("--no-stabilisers", action="store_true", help="the reference: Adam as it is")
    args = parser.parse_args()

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    module = ShardedModule(num_layers=args.layers, hidden=16, lr=1e-3, optimizer="adam", n=32, batch_size=2)
    record = Record()
    stabilisers = [] if args.no_stabilisers else [UpdateClipping(), Beta2Schedule(), RelativeStepSize()]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=BAdamDDPStrategy(fused_update=args.fused_update),
        precision="bf16-true",
        max_steps=args.steps,
        callbacks=[BlockSwitch(every=args.every, order="random", seed=7), *stabilisers, record],
        use_distributed_sampler=False,
        default_root_dir=out,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module)
    torch.save(
        {
            "world_size": trainer.world_size,
            "weights": {n: p.detach().clone() for n, p in module.named_parameters()},
            "masters": record.masters,
            "state": record.state,
            "callbacks": {type(c).__name__: c.state_dict() for c in stabilisers},
            "blocks": record.blocks,
            "ratios": record.ratios,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
    finish_distributed()
