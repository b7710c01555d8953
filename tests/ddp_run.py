"""A real multi-process BAdam run, launched by the DDP tests as `python tests/ddp_run.py --out DIR ...`.

Lightning's DDP launcher re-runs this script once per extra rank (like torchrun would). Every rank writes what it
holds at the end (weights, masters, optimizer state, the block sequence, the bytes it all-reduced per step) to
`DIR/rank{R}.pt` for the test to compare.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).parent))
from models import LlamaModule, token_loader

from lightning_memopt import BAdamDDPStrategy, BAdamFSDPStrategy, BAdamStrategy, BlockSwitch, MemoryReport
from lightning_memopt.compat import full_tensor
from lightning_memopt.strategies.collectives import finish_distributed


def _full(t: torch.Tensor) -> torch.Tensor:
    # sharded runs hold DTensors: compare the gathered full tensors (a collective: every rank calls it), gathered as
    # the strategy gathers them for a checkpoint
    t = full_tensor(t)
    # torchao's quantised state: its values, as plain tensors (the codes and scales decide them)
    return t.dequantize() if type(t).__module__.startswith("torchao") else t


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


_real_all_reduce = dist.all_reduce
_bytes = {"now": 0, "calls": 0}


def _counting_all_reduce(tensor, *args, **kwargs):
    _bytes["now"] += tensor.numel() * tensor.element_size()
    _bytes["calls"] += 1
    return _real_all_reduce(tensor, *args, **kwargs)


dist.all_reduce = _counting_all_reduce


class ShardedModule(LlamaModule):
    """Shards the data in order (no shuffling), so 2 ranks x batch b see what 1 device x batch 2b sees."""

    def __init__(self, overflow_rank: int, overflow_step: int, **kwargs):
        super().__init__(**kwargs)
        self.overflow_rank = overflow_rank
        self.overflow_step = overflow_step

    def train_dataloader(self):
        loader = token_loader(n=self.n, batch_size=self.batch_size, seq=8)
        if self.trainer.world_size == 1:
            return loader
        sampler = DistributedSampler(
            loader.dataset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return DataLoader(loader.dataset, batch_size=self.batch_size, sampler=sampler)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step == self.overflow_step and self.global_rank == self.overflow_rank:
            loss = loss * float("inf")
        return loss


class Record(Callback):
    def __init__(self) -> None:
        self.blocks: list[int] = []
        self.step_bytes: list[int] = []
        self.step_calls: list[int] = []
        self.batch_bytes: list[int] = []
        self.active_bytes: list[int] = []
        self.scales: list[float] = []
        self.grad_norms: list[float] = []
        self.stepped_grad_norms: list[float] = []
        self.local_master_bytes: list[int] = []
        self.local_weight_bytes: list[int] = []
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.master_snapshots: list[dict[str, torch.Tensor]] = []
        self.masters: dict[str, torch.Tensor] = {}
        self.state: dict = {}
        self._step_start = 0
        self._layer_calls: dict[int, int] = {}
        self.layer_calls: list[dict[int, int]] = []  # per optimizer step: forward calls of each decoder layer

    def on_train_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        step = optimizer.step

        def measured_step(closure=None, **kwargs):
            # Lightning's closure runs forward, backward, unscaling and clipping; what is left when it returns is
            # what the optimizer steps with
            def closure_then_measure():
                loss = closure()
                grads = [m.grad for m in trainer.strategy.master_params.values() if m.grad is not None]
                self.stepped_grad_norms.append(float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0)
                return loss

            return step(closure=closure_then_measure if closure is not None else None, **kwargs)

        optimizer.step = measured_step

    def count_layer_call(self, layer: int) -> None:
        self._layer_calls[layer] = self._layer_calls.get(layer, 0) + 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (batch_idx % trainer.accumulate_grad_batches) == 0:
            self._step_start = _bytes["now"]
            self._calls_start = _bytes["calls"]
        self._batch_start = _bytes["now"]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        strategy = trainer.strategy
        self.blocks.append(strategy.active_block)
        self.active_bytes.append(sum(m.numel() * 4 for m in strategy.master_params.values()))
        local = [_local(m) for m in strategy.master_params.values()]
        self.local_master_bytes.append(sum(t.numel() * t.element_size() for t in local))
        self.local_weight_bytes.append(sum(_local(p).numel() * p.element_size() for p in pl_module.parameters()))
        grads = [m.grad for m in strategy.master_params.values() if m.grad is not None]
        # with the update in backward the masters were stepped, and their gradients freed, during backward
        self.grad_norms.append(float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batch_bytes.append(_bytes["now"] - self._batch_start)
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.step_bytes.append(_bytes["now"] - self._step_start)
            self.step_calls.append(_bytes["calls"] - self._calls_start)
            self.snapshots.append({n: _full(p.detach()).clone() for n, p in pl_module.named_parameters()})
            self.layer_calls.append(self._layer_calls)
            # FP32 and unrounded: what the step did to the active block, before bf16 rounding of the copy-back
            masters = trainer.strategy.master_params
            self.master_snapshots.append({n: _full(m.detach()).clone() for n, m in masters.items()})
            self._layer_calls = {}
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            self.scales.append(float(scaler.get_scale()) if scaler is not None else 1.0)
        self.masters = {n: _full(m.detach()).clone() for n, m in trainer.strategy.master_params.items()}
        opt = trainer.optimizers[0]
        self.state = {
            i: {k: _full(v).clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
            for i, p in enumerate(p for g in opt.param_groups for p in g["params"])
            if p in opt.state
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--precision", default="bf16-true")
    parser.add_argument("--order", default="random")
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument(
        "--optimizer", default="adamw", choices=["adamw", "sgd", "galore", "flora", "foam", "adamw4bit"]
    )
    parser.add_argument("--overflow-rank", type=int, default=-1)
    parser.add_argument("--overflow-step", type=int, default=-1)
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0)
    parser.add_argument("--strategy", default="badam_ddp", choices=["badam_ddp", "badam_fsdp"])
    parser.add_argument("--clip", type=float, default=None)
    parser.add_argument("--ckpt-in", default=None)
    parser.add_argument("--ckpt-out", default=None)
    parser.add_argument("--checkpointing", default="none", choices=["none", "reentrant", "non_reentrant"])
    parser.add_argument("--fused-update", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    module = ShardedModule(
        args.overflow_rank,
        args.overflow_step,
        num_layers=args.layers,
        hidden=args.hidden,
        lr=args.lr,
        optimizer=args.optimizer,
        n=args.n,
        batch_size=args.batch_size,
    )
    if args.devices > 1 and args.strategy == "badam_fsdp":
        strategy = BAdamFSDPStrategy()
    elif args.devices > 1:
        strategy = BAdamDDPStrategy(bucket_cap_mb=args.bucket_cap_mb, fused_update=args.fused_update)
    else:
        strategy = BAdamStrategy(fused_update=args.fused_update)
    if args.checkpointing != "none":
        # what CausalLM(gradient_checkpointing=True) calls
        kwargs = {"use_reentrant": args.checkpointing == "reentrant"}
        module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    record = Record()
    for i, layer in enumerate(module.model.model.layers):
        # transformers checkpoints the layer's `forward`: a hook inside it sees the recomputation in backward too
        layer.self_attn.register_forward_pre_hook(lambda *_, i=i: record.count_layer_call(i))
    memory = MemoryReport(every_n_steps=1, count_other=False, filename=None)
    callbacks: list[Callback] = [BlockSwitch(every=args.every, order=args.order, seed=7), record, memory]
    if args.ckpt_out:
        # written during fit at the last step (a checkpoint saved after fit resumes on an extra batch in Lightning)
        target = Path(args.ckpt_out)
        callbacks.append(
            ModelCheckpoint(
                dirpath=target.parent,
                filename=target.stem,
                every_n_train_steps=args.steps,
                save_top_k=1,
                enable_version_counter=False,
            )
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        precision=args.precision,
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=args.clip,
        callbacks=callbacks,
        use_distributed_sampler=False,
        default_root_dir=out,
        logger=False,
        enable_checkpointing=bool(args.ckpt_out),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, ckpt_path=args.ckpt_in)
    torch.save(
        {
            "world_size": trainer.world_size,
            "weights": {n: _full(p.detach()).clone() for n, p in module.named_parameters()},
            "grad_norms": record.grad_norms,
            "stepped_grad_norms": record.stepped_grad_norms,
            "local_master_bytes": record.local_master_bytes,
            "local_weight_bytes": record.local_weight_bytes,
            "blocks": record.blocks,
            "step_bytes": record.step_bytes,
            "step_calls": record.step_calls,
            "batch_bytes": record.batch_bytes,
            "active_bytes": record.active_bytes,
            "scales": record.scales,
            "snapshots": record.snapshots,
            "layer_calls": record.layer_calls,
            "master_snapshots": record.master_snapshots,
            "masters": record.masters,
            "state": record.state,
            "block_names": [b.name for b in trainer.strategy.blocks],
            "memory": {k: v for k, v in (memory.report or {}).items() if isinstance(v, int)},
        },
        out / f"rank{trainer.global_rank}.pt",
    )
    if trainer.global_rank == 0:
        (out / "pid.txt").write_text(str(os.getpid()))


if __name__ == "__main__":
    main()
    finish_distributed()
