"""Benchmark rows for ``docs/smarter-blocks.md``: importance-sampled blocks and state-free updates vs BAdam (random).

Every row is BAdam + AdamW in ``bf16-true`` on the same model, data, seeds and number of steps; the rows differ in the
block partition (``granularity``), the :class:`~lightning_memopt.BlockSwitch` order and budget, and whether
:class:`~lightning_memopt.callbacks.state_free.StateFreeUpdates` moves the inactive blocks. Embedding and head are
blocks too (the model is trained from scratch, as in ``recipes/quickstart.yaml``).

These rows live apart from :data:`lightning_memopt.bench.METHODS` because a :class:`~lightning_memopt.bench.Method`
cannot yet carry strategy, ``BlockSwitch`` or callback arguments; :func:`SmarterMethod.method` gives each row's
``Method`` view for tables and plots. Run them with::

    python -m lightning_memopt.bench.smarter_blocks --seeds 0,1 --out runs/smarter   # quickstart-like, 200 steps

which writes ``smarter.json``, ``smarter.md`` and ``smarter_loss.png`` (the loss curves, averaged over seeds).

Example::

    >>> [row.name for row in SMARTER_METHODS.values()][:3]
    ['badam-random', 'badam-importance', 'module-importance']
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch.optim import Optimizer
from typing_extensions import override

from lightning_memopt.bench.config import BenchConfig
from lightning_memopt.bench.methods import Method, build_trainer

__all__ = ["QUICKSTART_LIKE", "SMARTER_METHODS", "GradientBytes", "SmarterMethod", "run_smarter_method"]

QUICKSTART_LIKE = BenchConfig(
    layers=4, hidden=128, heads=4, seq_len=128, batch_size=16, steps=200, warmup=5, every=25, lr=2e-3, memory_every=50
)
"""``recipes/quickstart.yaml``'s model and batch (its MLP is 320 wide here, 352 there), 200 steps, constant lr."""


@dataclass(frozen=True)
class SmarterMethod:
    """One row: BAdam + AdamW (``bf16-true``) with a partition, a block order and optionally state-free updates.

    Args:
        name: the key on the command line.
        label: the row's title in tables and plots.
        granularity: ``BAdamStrategy(granularity=...)``.
        order: ``BlockSwitch(order=...)``.
        budget_blocks: importance order: the budget in units of ``M / D``, the average block of the layer partition
            (1.0: as many trainable parameters per step as BAdam trains on average); ``None``: one block.
        temperature: importance order: ``BlockSwitch(temperature=...)`` (``None``: its default).
        state_free_ratio: ``StateFreeUpdates(rule="signsgd", lr_ratio=...)``; ``None``: no state-free updates.
    """

    name: str
    label: str
    granularity: str = "layer"
    order: str = "random"
    budget_blocks: float | None = None
    temperature: float | None = None
    state_free_ratio: float | None = None

    def method(self) -> Method:
        """The row as the benchmark's :class:`~lightning_memopt.bench.Method` (what tables and plots read)."""
        callbacks = ("StateFreeUpdates",) if self.state_free_ratio is not None else ()
        return Method(self.name, self.label, "bf16-true", "adamw", kind="badam", callbacks=callbacks)

    def build(self, config: BenchConfig) -> tuple[Any, list[Any]]:
        """The strategy and the callbacks (BlockSwitch first) of this row for ``config``."""
        from lightning_memopt import BAdamStrategy, BlockSwitch
        from lightning_memopt.callbacks.state_free import StateFreeUpdates

        switch: dict[str, Any] = {"every": config.every, "order": self.order, "seed": config.seed}
        if self.budget_blocks is not None:
            # the layer partition with embedding and head has layers + 2 blocks
            switch["budget"] = min(1.0, self.budget_blocks / (config.layers + 2))
        if self.temperature is not None:
            switch["temperature"] = self.temperature
        callbacks: list[Any] = [BlockSwitch(**switch)]
        if self.state_free_ratio is not None:
            callbacks.append(StateFreeUpdates(rule="signsgd", lr_ratio=self.state_free_ratio, seed=config.seed))
        strategy = BAdamStrategy(include_embedding=True, include_lm_head=True, granularity=self.granularity)  # type: ignore[arg-type]
        return strategy, callbacks


SMARTER_METHODS: dict[str, SmarterMethod] = {
    m.name: m
    for m in (
        SmarterMethod("badam-random", "BAdam, random order (baseline)"),
        SmarterMethod("badam-importance", "BAdam, importance order", order="importance"),
        SmarterMethod(
            "module-importance",
            "module blocks, importance, budget M/D",
            granularity="module",
            order="importance",
            budget_blocks=1.0,
        ),
        SmarterMethod(
            "module-uniform",
            "module blocks, uniform, budget M/D",
            granularity="module",
            order="importance",
            budget_blocks=1.0,
            temperature=float("inf"),
        ),
        SmarterMethod("badam-statefree", "BAdam random + signSGD elsewhere (0.1)", state_free_ratio=0.1),
        SmarterMethod("badam-statefree-0.02", "BAdam random + signSGD elsewhere (0.02)", state_free_ratio=0.02),
        SmarterMethod("badam-statefree-0.3", "BAdam random + signSGD elsewhere (0.3)", state_free_ratio=0.3),
        SmarterMethod(
            "module-importance-statefree",
            "module blocks, importance, M/D + signSGD (0.1)",
            granularity="module",
            order="importance",
            budget_blocks=1.0,
            state_free_ratio=0.1,
        ),
    )
}
"""Every row, by name."""


def run_smarter_method(row: SmarterMethod, config: BenchConfig, out: Path) -> dict[str, Any]:
    """Train one row in this process and return its figures (also written to ``out/row.json``)."""

    from lightning_memopt.bench.worker import BenchLM, StepClock, held_out_loss, start_row
    from lightning_memopt.memory import MemoryReport

    began = time.perf_counter()
    data = start_row(config, out)
    clock = StepClock()
    report = MemoryReport(every_n_steps=config.memory_every)
    grad_bytes = GradientBytes()
    strategy, callbacks = row.build(config)
    # BlockSwitch, then the gradient count (before StateFreeUpdates frees the inactive blocks' gradients)
    ordered = [clock, callbacks[0], grad_bytes, *callbacks[1:], report]
    trainer = build_trainer(out, "bf16-true", config.steps, ordered, strategy=strategy)
    with trainer.init_module():
        model = BenchLM(config.model_config(), "adamw", config)
    trainer.fit(model, datamodule=data)
    final_loss = held_out_loss(model, data.val_dataloader(), trainer.precision_plugin, config.eval_batches)
    memory = report.report or {}
    switch = callbacks[0]
    result: dict[str, Any] = {
        "method": row.name,
        "label": row.label,
        "seed": config.seed,
        "badam": True,
        "blocks": len(strategy.blocks),
        "final_loss": final_loss,
        "final_train_loss": statistics.fmean(clock.losses[-10:]),
        "loss_curve": [round(x, 5) for x in clock.losses],
        "step_time_s": statistics.median(clock.step_times[config.warmup :]),
        "accounted_bytes": memory.get("total"),
        "memory": {k: memory.get(k) for k in ("weights", "masters", "grads", "optimizer_state")},
        "grad_bytes_at_step": max(grad_bytes.bytes, default=0),
        "block_names": [b.name for b in strategy.blocks],
        "sets": grad_bytes.sets[:: config.every],
        "scores": switch.scores if row.order == "importance" else None,
        "visited_blocks": sum(s is not None for s in switch.scores) if row.order == "importance" else None,
        "wall_s": time.perf_counter() - began,
    }
    (out / "row.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


class GradientBytes(Callback):
    """Bytes of all gradients (the weights' half-precision ones, the masters' FP32 ones) as each step begins, and
    the blocks that step trains.

    Placed before ``StateFreeUpdates``, which frees the inactive blocks' gradients in the same hook.
    """

    def __init__(self) -> None:
        self.bytes: list[int] = []
        self.sets: list[list[int]] = []

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        tensors = {id(p): p for p in pl_module.parameters()}
        tensors.update({id(m): m for m in trainer.strategy.master_params.values()})  # type: ignore[attr-defined]
        grads = [t.grad for t in tensors.values() if t.grad is not None]
        self.bytes.append(sum(g.numel() * g.element_size() for g in grads))
        self.sets.append(list(trainer.strategy.active_blocks))  # type: ignore[attr-defined]


def _summarise(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_name.setdefault(r["method"], []).append(r)
    baseline = by_name.get("badam-random")
    base_loss = statistics.fmean(r["final_loss"] for r in baseline) if baseline else None
    lines = [
        "| method | held-out loss (mean; per seed) | vs baseline | train loss, last 10 steps | step time | "
        "masters + Adam state | gradients at the step |",
        "|---|---|---|---|---|---|---|",
    ]
    averaged = []
    for name, rows in by_name.items():
        losses = [r["final_loss"] for r in rows]
        mean = statistics.fmean(losses)
        delta = f"{mean - base_loss:+.3f}" if base_loss is not None and name != "badam-random" else "-"
        train = statistics.fmean(r.get("final_train_loss", statistics.fmean(r["loss_curve"][-10:])) for r in rows)
        step = statistics.fmean(r["step_time_s"] for r in rows)
        if "grad_bytes_at_step" in rows[0]:
            state = max((r["memory"]["masters"] or 0) + (r["memory"]["optimizer_state"] or 0) for r in rows)
            memory = f"{state / 2**20:.2f} MiB | {max(r['grad_bytes_at_step'] for r in rows) / 2**20:.2f} MiB"
        else:  # a whole-model reference row of the main benchmark
            memory = "(whole model) | (whole model)"
        per_seed = ", ".join(f"{x:.3f}" for x in losses)
        lines.append(
            f"| {rows[0]['label']} | {mean:.3f} ({per_seed}) | {delta} | {train:.3f} | {step:.3f} s | {memory} |"
        )
        curves = [r["loss_curve"] for r in rows]
        averaged.append(
            {
                "label": rows[0]["label"],
                "badam": rows[0].get("badam", True),
                "loss_curve": [statistics.fmean(c[i] for c in curves) for i in range(min(map(len, curves)))],
                "final_loss": mean,
            }
        )
    return averaged, "\n".join(lines) + "\n"


def _write(results: list[dict[str, Any]], config: BenchConfig, out: Path) -> str:
    from lightning_memopt.bench.plots import plot_loss

    averaged, table = _summarise(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "smarter.json").write_text(json.dumps({"config": json.loads(config.to_json()), "rows": results}))
    (out / "smarter.md").write_text(table)
    plot_loss(averaged, out / "smarter_loss.png", window=10)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_memopt.bench.smarter_blocks``: run the rows (each seed in a fresh process)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "worker":
        parser = argparse.ArgumentParser()
        parser.add_argument("--row", required=True)
        parser.add_argument("--config", required=True)
        parser.add_argument("--out", type=Path, required=True)
        args = parser.parse_args(argv[1:])
        run_smarter_method(SMARTER_METHODS[args.row], BenchConfig.from_json(args.config), args.out)
        return 0
    parser = argparse.ArgumentParser(prog="python -m lightning_memopt.bench.smarter_blocks", description=__doc__)
    parser.add_argument("--methods", default=",".join(SMARTER_METHODS), help="comma-separated rows")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (model init, data order, block order)")
    parser.add_argument("--out", type=Path, default=Path("runs/smarter"))
    parser.add_argument(
        "--reference",
        type=Path,
        action="append",
        default=[],
        help="results.json of `python -m lightning_memopt.bench` with the same settings: its rows join the table and "
        "the plot as whole-model references (repeat for several seeds)",
    )
    parser.add_argument("--replot", action="store_true", help="re-read OUT/smarter.json instead of training")
    BenchConfig.add_arguments(parser)
    parser.set_defaults(**{k: getattr(QUICKSTART_LIKE, k) for k in json.loads(QUICKSTART_LIKE.to_json())})
    args = parser.parse_args(argv)
    config = BenchConfig.from_args(args)
    results: list[dict[str, Any]] = []
    if args.replot:
        saved = json.loads((args.out / "smarter.json").read_text())
        config = BenchConfig(**saved["config"])
        results = [r for r in saved["rows"] if r["method"] in SMARTER_METHODS]
    env = {**os.environ, "OMP_NUM_THREADS": str(config.threads), "TOKENIZERS_PARALLELISM": "false"}
    for seed in [] if args.replot else [int(s) for s in args.seeds.split(",") if s.strip()]:
        for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
            if name not in SMARTER_METHODS:
                parser.error(f"unknown row {name!r}; choose from {', '.join(SMARTER_METHODS)}")
            out = args.out / "runs" / f"{name}-seed{seed}"
            command = [sys.executable, "-m", "lightning_memopt.bench.smarter_blocks", "worker", "--row", name]
            command += ["--config", replace(config, seed=seed).to_json(), "--out", str(out)]
            out.mkdir(parents=True, exist_ok=True)
            with (out / "log.txt").open("w") as log:
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
            if code != 0:
                print(f"{name} (seed {seed}) failed; see {out / 'log.txt'}", file=sys.stderr)
                return 1
            row = json.loads((out / "row.json").read_text())
            print(f"{row['label']} (seed {seed}): held-out {row['final_loss']:.3f}, step {row['step_time_s']:.3f} s")
            results.append(row)
    for path in args.reference:
        reference = json.loads(path.read_text())
        differs = {k: v for k, v in reference["config"].items() if k not in ("seed", "memory_every", "every")}
        ours = {k: v for k, v in json.loads(config.to_json()).items() if k in differs}
        if differs != ours:
            parser.error(f"{path} was run with other settings than these rows: {differs} != {ours}")
        results += [{**r, "seed": reference["config"]["seed"]} for r in reference["rows"]]
    print(_write(results, config, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
