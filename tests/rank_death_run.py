"""A 2-process BAdam DDP run in which rank 1 dies or hangs at a chosen step, launched by `tests/test_rank_death.py`.

`python tests/rank_death_run.py --out DIR --mode exit|hang --step S --timeout SECONDS`. Rank 1 writes its PID to
`DIR/rank1.pid` when training starts, then at step `S` either exits at once (`os._exit(1)`, as a crash or the
out-of-memory killer would) or sleeps without ever joining the next all-reduce (a hang). Rank 0 must stop with a clear
error, within the process group timeout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).parent))
from models import LlamaModule

from lightning_memopt import BAdamDDPStrategy, BlockSwitch


class LoseRankOne(Callback):
    def __init__(self, out: Path, mode: str, step: int) -> None:
        self.out, self.mode, self.step = out, mode, step

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == 1:
            (self.out / "rank1.pid").write_text(str(os.getpid()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank != 1 or trainer.global_step != self.step:
            return
        if self.mode == "exit":
            os._exit(1)
        time.sleep(3600)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=["exit", "hang"], required=True)
    parser.add_argument("--step", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=15.0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=BAdamDDPStrategy(timeout=timedelta(seconds=args.timeout)),
        precision="bf16-true",
        max_steps=args.step + 3,
        callbacks=[BlockSwitch(every=2, order="ascending"), LoseRankOne(out, args.mode, args.step)],
        use_distributed_sampler=False,
        default_root_dir=out,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(LlamaModule(num_layers=2, hidden=16, n=32))


if __name__ == "__main__":
    main()
