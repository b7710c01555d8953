"""One benchmark row, run in the current process (the matrix starts a fresh process per row, so peaks do not leak).

The row trains :class:`~lightning_memopt.lm.CausalLM` on :class:`~lightning_memopt.data.TextDataModule` with a real
``Trainer`` and records what the table needs: the :class:`~lightning_memopt.memory.MemoryReport`, the wall time of
every optimizer step, the time the BAdam strategy spends in its own bookkeeping, the loss of every step and the loss on
held-out batches at the end.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from torch.optim import Optimizer
from typing_extensions import override

from lightning_memopt.bench.config import BenchConfig
from lightning_memopt.bench.methods import Method, build_optimizer, build_trainer
from lightning_memopt.data import TextDataModule
from lightning_memopt.lm import CausalLM, next_token_loss
from lightning_memopt.memory import MemoryReport, current_rss
from lightning_memopt.strategies import block_strategy

__all__ = ["BenchLM", "StepClock", "held_out_loss", "max_switch_jump", "run_method", "start_row"]

# the strategy's own work around a step: its engine's half grads -> FP32 master grads and masters -> half weights, and
# block switches
_ENGINE_CALLS = ("grads_to_masters", "masters_to_weights")
_STRATEGY_CALLS = ("activate",)


class BenchLM(CausalLM):
    """:class:`~lightning_memopt.lm.CausalLM` whose ``configure_optimizers`` builds the row's optimizer.

    Example::

        model = BenchLM(BenchConfig().model_config(), "adamw8bit", BenchConfig())
    """

    def __init__(self, config: dict[str, Any], optimizer: str, bench: BenchConfig, **causal_lm: Any) -> None:
        super().__init__(config=config, **causal_lm)
        self.optimizer_name = optimizer
        self.bench = bench

    @override
    def configure_optimizers(self) -> Optimizer:  # type: ignore[override]
        return build_optimizer(self.optimizer_name, self.parameters(), self.bench, module=self)


class StepClock(Callback):
    """Records each optimizer step's wall time, loss and active block, and the strategy's bookkeeping time in it.

    Put it first in the callback list: its ``on_train_batch_start`` then runs before BlockSwitch activates a block,
    and its ``on_train_batch_end`` before MemoryReport measures, so a step's time includes switching and excludes
    accounting. The bookkeeping time comes from timers put, at the start of fit, around the block engine's
    ``grads_to_masters`` and ``masters_to_weights`` and the strategy's ``activate`` (instance attributes; neither has
    a public timing hook).

    Example::

        clock = StepClock()
        Trainer(strategy=BAdamStrategy(), callbacks=[clock, BlockSwitch(every=5)]).fit(model)
        statistics.median(clock.step_times), sum(clock.overhead) / sum(clock.step_times)
    """

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.losses: list[float] = []
        self.blocks: list[int | None] = []
        self.overhead: list[float] = []
        self.overhead_by_call: list[dict[str, float]] = []
        self._start = 0.0
        self._in_step = False
        self._current: dict[str, float] = {}

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        strategy = block_strategy(trainer)
        if strategy is None:
            return
        # timing nothing would report a zero overhead: a renamed method fails here (AttributeError) instead
        for target, names in ((strategy.engine, _ENGINE_CALLS), (strategy, _STRATEGY_CALLS)):
            for name in names:
                setattr(target, name, self._timed(name, getattr(target, name)))

    def _timed(self, name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                if self._in_step:
                    self._current[name] = self._current.get(name, 0.0) + time.perf_counter() - start

        return timed

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._current = {}
        self._in_step = True
        self._start = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.step_times.append(time.perf_counter() - self._start)
        self._in_step = False
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        self.blocks.append(getattr(trainer.strategy, "active_block", None))
        self.overhead.append(sum(self._current.values()))
        self.overhead_by_call.append(dict(self._current))


def start_row(config: BenchConfig, out: Path) -> TextDataModule:
    """What every in-process row of the matrix does first: torch threads, the output folder, the seed, and the data
    (the same text, split and batches for every row).

    Example::

        data = start_row(BenchConfig(layers=2, hidden=32, steps=6), Path("out/badam"))
    """
    torch.set_num_threads(config.threads)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed, verbose=False)
    data = TextDataModule(
        seq_len=config.seq_len, batch_size=config.batch_size, max_bytes=config.max_bytes, val_fraction=0.02
    )
    data.setup("fit")
    return data


def max_switch_jump(losses: list[float], blocks: list[int | None], window: int = 5) -> float | None:
    """The largest rise of the loss within ``window`` steps after a block switch, over the loss just before it.

    Example::

        >>> max_switch_jump([3.0, 2.9, 3.4, 3.0, 2.8], [0, 0, 1, 1, 1], window=2)
        0.5
    """
    jumps = [
        max(losses[i : i + window]) - losses[i - 1]
        for i in range(1, len(blocks))
        if blocks[i] != blocks[i - 1] and blocks[i] is not None
    ]
    return round(max(jumps), 6) if jumps else None


@torch.no_grad()
def held_out_loss(model: LightningModule, loader: Any, precision: Any, max_batches: int | None = None) -> float:
    """Mean next-token loss per target token over ``loader`` (at most ``max_batches``), in eval mode, without autograd
    (no activations kept for a backward that never comes) and in the run's precision context; the module's training
    mode is restored afterwards.

    Example::

        loss = held_out_loss(model, data.val_dataloader(), trainer.precision_plugin, max_batches=16)
    """
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad(), precision.forward_context():
        for i, batch in enumerate(loader):
            if i == max_batches:
                break
            loss, count = next_token_loss(model(batch["input_ids"], batch.get("attention_mask")), batch)
            total += float(loss) * int(count)
            tokens += int(count)
    model.train(was_training)
    return total / max(tokens, 1)


def run_method(method: Method, config: BenchConfig, out: Path) -> dict[str, Any]:
    """Train one row in this process and return its figures (also written to ``out/row.json``).

    The matrix calls this in a fresh process per row (``python -m lightning_memopt.bench worker ...``); calling it
    twice in one process mixes the second row's peak with the first's.

    Example::

        row = run_method(METHODS["badam"], BenchConfig(layers=2, hidden=32, steps=6), Path("out/badam"))
        row["accounted_bytes"], row["step_time_s"], row["final_loss"]
    """
    began = time.perf_counter()
    data = start_row(config, out)

    from lightning_memopt import BlockSwitch

    clock = StepClock()
    report = MemoryReport(every_n_steps=config.memory_every)
    callbacks: list[Callback] = [clock]
    if method.badam:
        callbacks.append(BlockSwitch(every=method.every or config.every, order=method.order, seed=config.seed))  # type: ignore[arg-type]
    callbacks += [*method.build_callbacks(), report]
    trainer = build_trainer(
        out,
        method.precision,
        config.steps,
        callbacks,
        strategy=method.build_strategy(),
        logger=CSVLogger(out, name="", version=""),
        log_every_n_steps=1,
    )
    # every row loads it (not only the 8-bit ones), so that all processes start from the same libraries
    with contextlib.suppress(ImportError):
        import bitsandbytes  # noqa: F401
    # after imports and data, before the model: what the process holds for anything but training
    baseline = current_rss()
    with trainer.init_module():  # bf16-true builds the weights in bf16 directly, as loading a bf16 checkpoint does
        model = BenchLM(config.model_config(), method.optimizer, config)
    trainer.fit(model, datamodule=data)
    final_loss = held_out_loss(model, data.val_dataloader(), trainer.precision_plugin, config.eval_batches)

    memory = report.report or {}
    details = memory.get("details", {})
    timed = clock.step_times[config.warmup :]
    overhead = clock.overhead[config.warmup :]
    by_call: dict[str, float] = {}
    for step in clock.overhead_by_call[config.warmup :]:
        for name, seconds in step.items():
            by_call[name] = by_call.get(name, 0.0) + seconds
    peak = memory.get("peak")
    strategy = trainer.strategy
    row: dict[str, Any] = {
        "method": method.name,
        "label": method.label,
        "precision": method.precision,
        "optimizer": method.optimizer,
        "badam": method.badam,
        "callbacks": list(method.callbacks),
        "params": details.get("params"),
        "trained_params": details.get("trained_params"),
        "blocks": len(strategy.blocks) if method.badam else None,  # type: ignore[attr-defined]
        "peak_bytes": peak,
        "baseline_rss_bytes": baseline,
        "peak_above_start_bytes": peak - baseline if peak is not None and baseline is not None else None,
        "accounted_bytes": memory.get("total"),
        "predicted_bytes": memory.get("predicted"),
        "formula": details.get("formula"),
        "formula_bytes": details.get("formula_bytes"),
        "memory": {k: memory.get(k) for k in ("weights", "buffers", "masters", "grads", "optimizer_state", "other")},
        "memory_details": details,
        "step_time_s": statistics.median(timed),
        "step_times_s": [round(t, 5) for t in clock.step_times],
        "strategy_overhead_fraction": sum(overhead) / sum(timed) if method.badam and sum(timed) > 0 else None,
        "strategy_overhead_s": {k: round(v, 5) for k, v in by_call.items()},
        "final_loss": final_loss,
        "final_train_loss": statistics.fmean(clock.losses[-5:]),
        "loss_curve": [round(x, 5) for x in clock.losses],
        "active_blocks": clock.blocks if method.badam else None,
        "max_switch_jump": max_switch_jump(clock.losses, clock.blocks) if method.badam else None,
        "wall_s": time.perf_counter() - began,
    }
    (out / "row.json").write_text(json.dumps(row, indent=2) + "\n")
    return row
