"""``python -m lightning_memopt.bench finetune``: does BAdam fine-tune as well as Adam, and better than LoRA?

Every row fine-tunes the same pretrained base (:func:`~lightning_memopt.bench.finetune_data.make_base`) on the same
instruction task (:func:`~lightning_memopt.bench.finetune_data.make_task`, loss on the responses only) through
:class:`~lightning_memopt.data.InstructionDataModule`, in a fresh process, with the same data order and seed. A row
records the held-out response loss along the way (against the optimizer steps *and* the training time, evaluation
excluded), the final held-out loss, the peak memory above the process start, the accounted bytes by category
(:class:`~lightning_memopt.MemoryReport`) and the median step time.
"""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_memopt.bench.finetune_data import BaseConfig, ScheduledLM, TaskConfig
from lightning_memopt.bench.methods import Method, build_trainer
from lightning_memopt.bench.worker import held_out_loss
from lightning_memopt.lm import CausalLM

__all__ = [
    "DEFAULT_FT_METHODS",
    "FT_DEFAULT_EVERY",
    "FT_METHODS",
    "FinetuneConfig",
    "HeldOutCurve",
    "quick_config",
    "run_finetune_row",
]


EVAL_BATCH = 16
"""Held-out samples per forward pass (no autograd): its peak stays below the training steps' at these lengths."""


FT_DEFAULT_EVERY = 3
"""BAdam's K for the fine-tuning rows that name none."""


FT_METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("adamw-mixed", "AdamW (bf16-mixed)", "bf16-mixed", lr=3.33e-4),
        Method("adamw-bf16", "AdamW (bf16-true)", "bf16-true", lr=3.33e-4),
        Method("adamw8bit", "AdamW8bit (bf16-mixed)", "bf16-mixed", "adamw8bit", lr=3.33e-4),
        Method("lora-r8", "LoRA r=8, all linear (bf16 base)", "bf16-mixed", kind="lora", lr=3e-3, rank=8),
        Method("lora-r64", "LoRA r=64, all linear (bf16 base)", "bf16-mixed", kind="lora", lr=3e-3, rank=64),
        Method("badam", "BAdam + AdamW (bf16-true)", "bf16-true", kind="badam", lr=6.66e-4),
        Method("badam-8bit", "BAdam + AdamW8bit (bf16-true)", "bf16-true", "adamw8bit", kind="badam", lr=6.66e-4),
        Method("block-sgd", "Block SGD (bf16-true)", "bf16-true", "sgd", kind="badam", lr=0.15),
        # the update in backward (docs/update-in-backward.md); the lrs are not swept yet
        Method("lomo", "LOMO (SGD in backward, bf16-true)", "bf16-true", "sgd-plain", lr=0.15, fused=True),
        Method("adalomo", "AdaLomo (in backward, bf16-true)", "bf16-true", "adalomo", lr=1e-2, fused=True),
        Method("badam-fused", "BAdam, update in backward", "bf16-true", kind="badam", lr=6.66e-4, fused=True),
        Method(
            "badam-8bit-fused",
            "BAdam + AdamW8bit, update in backward",
            "bf16-true",
            "adamw8bit",
            kind="badam",
            lr=6.66e-4,
            fused=True,
        ),
        # compressed optimizer state (docs/compressed-state.md); the lrs are AdamW's / BAdam's, not swept yet
        Method("galore", "GaLore AdamW, rank H/4 (bf16-true)", "bf16-true", "galore-adamw", lr=3.33e-4),
        Method("galore-8bit", "GaLore AdamW8bit, rank H/4 (bf16-true)", "bf16-true", "galore-adamw8bit", lr=3.33e-4),
        Method("flora", "FLORA, rank H/4 (bf16-true)", "bf16-true", "flora", lr=3.33e-4),
        Method("foam", "FOAM (bf16-true)", "bf16-true", "foam", lr=3.33e-4),
        Method("adamw4bit-ao", "AdamW4bit, torchao (bf16-true)", "bf16-true", "adamw4bit-ao", lr=3.33e-4),
        Method("badam-galore", "BAdam + GaLore AdamW", "bf16-true", "galore-adamw", kind="badam", lr=6.66e-4),
        Method("badam-foam", "BAdam + FOAM", "bf16-true", "foam", kind="badam", lr=6.66e-4),
        Method(
            "badam-importance", "BAdam, importance order", "bf16-true", kind="badam", lr=6.66e-4, order="importance"
        ),
        Method(
            "badam-statefree",
            "BAdam + StateFreeUpdates (signSGD)",
            "bf16-true",
            kind="badam",
            lr=2e-3,
            callbacks=(("StateFreeUpdates", {"rule": "signsgd", "lr_ratio": 0.1}),),
        ),
        # the gap study's variants (docs/benchmarks.md, "Where the gap comes from"): not in the default rows
        Method(
            "badam-embed-head",
            "BAdam, embedding and head as blocks",
            "bf16-true",
            kind="badam",
            lr=2e-3,
            strategy={"include_embedding": True, "include_lm_head": True},
        ),
        Method(
            "badam-keep-state",
            "BAdam, optimizer state kept across switches",
            "bf16-true",
            kind="badam",
            lr=6.66e-4,
            strategy={"keep_optimizer_state": True},
        ),
        Method(
            "badam-module",
            "BAdam, attention / MLP blocks",
            "bf16-true",
            kind="badam",
            lr=2e-3,
            strategy={"granularity": "module"},
        ),
        Method(
            "badam-2layer",
            "BAdam, blocks of 2 layers",
            "bf16-true",
            kind="badam",
            lr=6.66e-4,
            every=6,
            layers_per_block=2,
        ),
        Method(
            "badam-4layer",
            "BAdam, blocks of 4 layers",
            "bf16-true",
            kind="badam",
            lr=6.66e-4,
            every=12,
            layers_per_block=4,
        ),
    )
}
"""Every row, by name; the learning rates and K are the sweep's choices (see ``docs/benchmarks.md``)."""

DEFAULT_FT_METHODS: tuple[str, ...] = (
    "adamw-mixed", "adamw-bf16", "adamw8bit", "lora-r8", "lora-r64", "badam", "badam-8bit", "block-sgd",
    "badam-importance", "badam-statefree", "badam-4layer",
)  # fmt: skip
"""The benchmark's rows (``--methods`` default); the other entries of :data:`FT_METHODS` are the gap study's."""


@dataclass(frozen=True)
class FinetuneConfig:
    """What all rows share: base, task, schedule length, batch, evaluation.

    Args:
        steps: optimizer steps (equal-steps comparison).
        batch_size: samples per optimizer step.
        max_length: bytes per sample (longer ones are left out; the report counts them).
        group_by_length: batches of similar lengths (:class:`~lightning_memopt.data.InstructionDataModule`'s
            ``group_by_length``), so less of each batch is padding.
        gradient_checkpointing: recompute the decoder layers' activations in backward (every row alike).
        warmup: warmup steps of the cosine schedule.
        eval_every: steps between held-out evaluations on ``curve_samples`` test samples.
        eval_stride: the held-out loss is on every ``eval_stride``-th sample of the split (1: all of them); each
            evaluation of the whole test set costs as much as ~20 training steps here.
        curve_samples: held-out samples of the loss curves, evenly spread over the held-out set (the base and final
            losses use all of it).
        split: ``"test"`` (the held-out modules) or ``"val"`` (sweeps: never choose settings on the test set).
        seed: model-independent seed: data order, BAdam's block order.
        threads: torch threads.
        lr, every: overrides of the method's lr and K (sweeps).
        precision: every row's precision instead of its own, the base's pretraining's too (``--fp32``:
            ``"32-true"``, for a CPU without bf16 matrix units, where a bf16 matrix product costs ~35x an FP32 one).
            The losses then compare the update rules; the memory columns describe FP32 weights.
        base, task: the base model and the task.
    """

    steps: int = 144
    batch_size: int = 4
    max_length: int = 512
    group_by_length: bool = True
    gradient_checkpointing: bool = False
    warmup: int = 8
    eval_every: int = 36
    eval_stride: int = 2
    curve_samples: int = 64
    split: str = "test"
    seed: int = 0
    threads: int = 1
    lr: float | None = None
    every: int | None = None
    precision: str | None = None
    base: BaseConfig = field(default_factory=BaseConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FinetuneConfig:
        raw = json.loads(text)
        return cls(**{**raw, "base": BaseConfig(**raw["base"]), "task": TaskConfig(**raw["task"])})

    def for_method(self, method: Method) -> Method:
        """``method`` with this run's lr, K and precision: the overrides, else the row's (K: else
        :data:`FT_DEFAULT_EVERY`)."""
        if method.lr is None and self.lr is None:
            raise ValueError(f"Fine-tuning row {method.name!r} names no lr: give it one (the sweep's choice).")
        method = replace(
            method,
            lr=self.lr if self.lr is not None else method.lr,
            every=self.every or method.every or FT_DEFAULT_EVERY,
        )
        if self.precision is None or self.precision == method.precision:
            return method
        label = re.sub(r"bf16-(true|mixed)", self.precision, method.label).replace(
            "bf16 base", f"{self.precision} base"
        )
        if self.precision not in label:
            label = f"{label} ({self.precision})"
        return replace(method, precision=self.precision, label=label)


class HeldOutCurve(Callback):
    """Held-out loss every ``every`` optimizer steps (and before the first), against steps and training seconds.

    Training seconds exclude the evaluations themselves, so a curve against time shows what a run would reach in
    that much training.
    """

    def __init__(self, loader: DataLoader[Any], every: int) -> None:
        self.loader = loader
        self.every = every
        self.points: list[dict[str, float]] = []
        self.step_times: list[float] = []
        self._train_seconds = 0.0
        self._start = 0.0

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loss = held_out_loss(pl_module, self.loader, trainer.precision_plugin)
        self.points.append({"step": trainer.global_step, "seconds": self._train_seconds, "loss": loss})

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluate(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        seconds = time.perf_counter() - self._start
        self.step_times.append(seconds)
        self._train_seconds += seconds
        if trainer.global_step % self.every == 0 or trainer.global_step >= (trainer.max_steps or 0):
            self._evaluate(trainer, pl_module)


def _add_lora(module: CausalLM, rank: int) -> None:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
    module.model = get_peft_model(module.model, config)  # type: ignore[assignment]
    for name, param in module.model.named_parameters():
        if "lora_" in name:
            # adapters train in FP32 over the frozen bf16 base (bf16-mixed autocasts the matmuls)
            param.data = param.data.float()


def run_finetune_row(
    method: Method, config: FinetuneConfig, base_dir: str, task_dir: str, out: Path, cache_dir: str
) -> dict[str, Any]:
    """Fine-tune one row in this process; returns its figures (also written to ``out/row.json``)."""
    from lightning_memopt import BlockSwitch, MemoryReport
    from lightning_memopt.data import InstructionDataModule
    from lightning_memopt.memory import current_rss, reset_peak_rss

    began = time.perf_counter()
    torch.set_num_threads(config.threads)
    out.mkdir(parents=True, exist_ok=True)
    method = config.for_method(method)
    seed_everything(config.seed, verbose=False)
    train_file = str(Path(task_dir) / "train.jsonl")
    data = InstructionDataModule(
        [train_file], None, config.max_length, config.batch_size, val_fraction=0.0, cache_dir=cache_dir,
        overlong="drop", seed=config.seed, group_by_length=config.group_by_length,
    )  # fmt: skip
    held_out = InstructionDataModule(
        [train_file], None, config.max_length, EVAL_BATCH, val_paths=[str(Path(task_dir) / f"{config.split}.jsonl")],
        cache_dir=cache_dir, seed=config.seed, overlong="drop",
    )  # fmt: skip
    held_out.prepare_data()
    held_out.setup("fit")
    split_loader = held_out.val_dataloader()
    assert isinstance(split_loader, DataLoader)
    every_sample = range(0, len(split_loader.dataset), config.eval_stride)  # type: ignore[arg-type]
    eval_set = torch.utils.data.Subset(split_loader.dataset, list(every_sample))
    full_loader = DataLoader(eval_set, batch_size=EVAL_BATCH, collate_fn=split_loader.collate_fn)
    spread = torch.linspace(0, len(eval_set) - 1, min(config.curve_samples, len(eval_set))).round().long().tolist()
    curve_loader = DataLoader(
        torch.utils.data.Subset(eval_set, spread), batch_size=EVAL_BATCH, collate_fn=split_loader.collate_fn
    )

    with contextlib.suppress(ImportError):
        import bitsandbytes  # noqa: F401
    import peft  # noqa: F401

    # the data setup and the imports above can set a high-water mark the run itself never reaches
    reset_peak_rss()
    baseline = current_rss()
    full = method.precision == "32-true" or (method.precision.endswith("mixed") and method.kind != "lora")
    dtype = "float32" if full else "bfloat16"
    assert method.lr is not None  # for_method guarantees it
    model = ScheduledLM(
        method.optimizer, method.lr, config.steps, config.warmup, model_path=base_dir, dtype=dtype,
        gradient_checkpointing=config.gradient_checkpointing,
    )  # fmt: skip
    if method.kind == "lora":
        _add_lora(model, method.rank)
    curve = HeldOutCurve(curve_loader, config.eval_every)
    report = MemoryReport(every_n_steps=25)
    cbs: list[Callback] = [curve]
    if method.badam:
        cbs.append(BlockSwitch(every=method.every, order=method.order, seed=config.seed))  # type: ignore[arg-type]
    cbs += [*method.build_callbacks(), report]
    trainer = build_trainer(out, method.precision, config.steps, cbs, strategy=method.build_strategy())
    base_loss = held_out_loss(model, full_loader, trainer.precision_plugin)
    trainer.fit(model, datamodule=data)
    final_loss = held_out_loss(model, full_loader, trainer.precision_plugin)
    memory = report.report or {}
    peak = memory.get("peak")
    row: dict[str, Any] = {
        "method": method.name,
        "label": method.label,
        "kind": method.kind,
        "precision": method.precision,
        "optimizer": method.optimizer,
        "lr": method.lr,
        "every": method.every if method.kind == "badam" else None,
        "rank": method.rank or None,
        "seed": config.seed,
        "steps": config.steps,
        "split": config.split,
        "base_loss": base_loss,
        "final_loss": final_loss,
        "curve": curve.points,
        "train_seconds": sum(curve.step_times),
        "step_time_s": statistics.median(curve.step_times[config.warmup :] or curve.step_times),
        "peak_bytes": peak,
        "baseline_rss_bytes": baseline,
        "peak_above_start_bytes": peak - baseline if peak is not None else None,
        "accounted_bytes": memory.get("total"),
        "memory": {k: memory.get(k) for k in ("weights", "buffers", "masters", "grads", "optimizer_state")},
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "data_stats": dict(data.stats),
        "eval_samples": len(eval_set),
        "wall_s": time.perf_counter() - began,
    }
    (out / "row.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


def quick_config() -> FinetuneConfig:
    """A tiny base and a few steps: checks the whole pipeline in about a minute (``--quick``), no figures."""
    base = BaseConfig(
        layers=3, hidden=32, intermediate=64, heads=2, context=512, steps=10, seq_len=64, batch_size=8,
        max_bytes=200_000,
    )  # fmt: skip
    return FinetuneConfig(
        steps=4, batch_size=4, max_length=384, warmup=1, eval_every=2, curve_samples=8, threads=1, base=base
    )
