"""A real 2-process run with 8-bit optimizer state, launched by the tests as `python tests/ddp_eight_bit_run.py ...`.

`--strategy ddp` is Lightning's own DDPStrategy (the model is wrapped, 32-true), `--strategy badam_ddp` is
BAdamDDPStrategy (bf16-true, random block order); with `--devices 1` each is its single-device form (the default
strategy, BAdamStrategy) for comparisons at twice the batch. Lightning's DDP launcher re-runs this script once per
extra rank. Every rank writes its weights and its optimizer's class and state dict to `DIR/rank{R}.pt` for the test
to compare.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).parent))
from models import LlamaModule, token_loader
from torch.utils.data import DataLoader, DistributedSampler

from lightning_memopt import BAdamDDPStrategy, BAdamStrategy, BlockSwitch
from lightning_memopt.callbacks.eight_bit import EightBitState
from lightning_memopt.strategies.collectives import finish_distributed


class StateDtypes(Callback):
    """After every optimizer step: the dtype of each trained parameter's first state tensor, by parameter name."""

    def __init__(self) -> None:
        self.steps: list[dict[str, str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        names = {id(p): n for n, p in _trained(trainer).items()}
        self.steps.append({names[id(p)]: str(s["state1"].dtype) for p, s in optimizer.state.items() if "state1" in s})


class InOrder(LlamaModule):
    """Shards the data in order, so 2 ranks x batch b see what 1 device x batch 2b sees; ``scheduled``: an lr of
    lr / (1 + step) (a per-step LambdaLR), so that a step run at another step's lr shows."""

    scheduled = False

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        if not self.scheduled:
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def train_dataloader(self):
        loader = token_loader(n=self.n, batch_size=self.batch_size)
        if self.trainer.world_size == 1:
            return loader
        trainer = self.trainer
        sampler = DistributedSampler(loader.dataset, trainer.world_size, trainer.global_rank, shuffle=False)
        return DataLoader(loader.dataset, batch_size=self.batch_size, sampler=sampler)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", choices=["ddp", "badam_ddp"], required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--devices", type=int, default=2)  # 1: the same strategy's single-device form
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--precision", default=None, help="default: bf16-true for badam_ddp, 32-true for ddp")
    parser.add_argument("--fused-update", action="store_true", help="badam_ddp: BlockOptions.fused_update=True")
    parser.add_argument("--scheduled", action="store_true", help="a per-step LR schedule")
    args = parser.parse_args()

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # hidden=64: the attention and MLP matrices have >= 4096 values, so their state is 8-bit
    module = InOrder(num_layers=2, hidden=64, lr=3e-3, weight_decay=0.01, n=32, batch_size=args.batch_size)
    module.scheduled = args.scheduled
    eight_bit = EightBitState(keep_32bit=["lm_head"])
    dtypes = StateDtypes()
    callbacks: list[Callback] = [eight_bit, dtypes]
    if args.strategy == "badam_ddp":
        strategy: str | BAdamStrategy = (
            BAdamDDPStrategy(include_lm_head=True, fused_update=args.fused_update)
            if args.devices > 1
            else BAdamStrategy(include_lm_head=True, fused_update=args.fused_update)
        )
        precision = args.precision or "bf16-true"
        callbacks.append(BlockSwitch(every=2, order="random", seed=3))
    else:
        strategy, precision = ("ddp" if args.devices > 1 else "auto"), args.precision or "32-true"
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        precision=precision,
        max_steps=args.steps,
        callbacks=callbacks,
        default_root_dir=out,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    trainer.fit(module)
    optimizer = trainer.optimizers[0]
    torch.save(
        {
            "world_size": trainer.world_size,
            "optimizer": type(optimizer).__name__,
            "kept": eight_bit.kept_32bit,
            "weights": {n: p.detach().clone() for n, p in module.named_parameters()},
            "optimizer_state": optimizer.state_dict(),
            # the parameters behind the optimizer's state indices, in param-group order
            "optimized": [n for n, _ in module.named_parameters() if n in _trained(trainer)],
            "dtypes": dtypes.steps,
            "numel": {n: p.numel() for n, p in module.named_parameters()},
        },
        out / f"rank{trainer.global_rank}.pt",
    )


def _trained(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    """The tensors the optimizer updates, by parameter name: BAdam's active FP32 masters, else the parameters."""
    masters = getattr(trainer.strategy, "master_params", None)
    if masters is not None:
        return masters
    return dict(trainer.lightning_module.named_parameters())


if __name__ == "__main__":
    main()
    finish_distributed()
