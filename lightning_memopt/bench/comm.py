"""Communication benchmark: gradient bytes all-reduced per optimizer step, BAdam on DDP vs plain Lightning DDP.

Each method runs as two real gloo processes on the CPU (Lightning's DDP launcher re-runs this module for rank 1).
Plain DDP is measured with a DDP communication hook that counts every bucket it all-reduces (Lightning registers
hooks only on CUDA, so a callback registers it on the wrapped model). :class:`~lightning_memopt.BAdamDDPStrategy`
does not wrap the model in DDP; it all-reduces the active block's FP32 master gradients with
``torch.distributed.all_reduce``, which is counted by wrapping that function.

The rows are :class:`~lightning_memopt.bench.Method` entries, like the other benchmarks'; the strategy follows from
the row's kind:

    >>> [(name, m.build_strategy(devices=2).__class__.__name__) for name, m in COMM_METHODS.items()]
    [('ddp-mixed', 'str'), ('ddp-bf16', 'str'), ('badam-ddp', 'BAdamDDPStrategy')]
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from tqdm.auto import tqdm
from typing_extensions import override

from lightning_memopt.bench.config import BenchConfig
from lightning_memopt.bench.matrix import run_worker
from lightning_memopt.bench.methods import Method, build_trainer

__all__ = ["COMM_METHODS", "ByteCounter", "run_comm", "run_comm_worker"]


COMM_METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ddp-mixed", "DDP + AdamW (bf16-mixed)", "bf16-mixed"),
        Method("ddp-bf16", "DDP + AdamW (bf16-true)", "bf16-true"),
        Method("badam-ddp", "BAdamDDPStrategy + AdamW (bf16-true)", "bf16-true", kind="badam"),
    )
}


class ByteCounter(Callback):
    """Counts the bytes all-reduced in each optimizer step: DDP comm-hook buckets, or else ``dist.all_reduce`` calls.

    Example::

        trainer = Trainer(strategy="ddp", devices=2, callbacks=[ByteCounter()])
    """

    def __init__(self) -> None:
        self.hook_bytes = 0
        self.all_reduce_bytes = 0
        self.all_reduce_calls = 0
        self.step_bytes: list[int] = []
        self._start = 0
        self._real_all_reduce: Any = None

    def _all_reduce(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.all_reduce_bytes += tensor.numel() * tensor.element_size()
        self.all_reduce_calls += 1
        return self._real_all_reduce(tensor, *args, **kwargs)

    def _total(self) -> int:
        return self.hook_bytes + self.all_reduce_bytes

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        # no annotations: DDP checks the hook's at runtime, and this module's postponed annotations are strings
        def counting_hook(state, bucket):  # type: ignore[no-untyped-def]
            buffer = bucket.buffer()
            self.hook_bytes += buffer.numel() * buffer.element_size()
            return allreduce_hook(state, bucket)

        model = trainer.strategy.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model.register_comm_hook(state=None, hook=counting_hook)
            # the hook's own all-reduce goes through dist.all_reduce: wrapping that too would count it twice
            return
        # looked up as `dist.all_reduce` at call time by BAdamDDPStrategy: replacing the attribute counts its calls
        self._real_all_reduce = dist.all_reduce
        dist.all_reduce = self._all_reduce  # type: ignore[assignment]

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._real_all_reduce is not None:
            dist.all_reduce = self._real_all_reduce

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = self._total()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.step_bytes.append(self._total() - self._start)


def run_comm_worker(method: Method, config: BenchConfig, out: Path) -> None:
    """One method on two gloo processes (this process and one the launcher starts); each rank writes its counts.

    Lightning's DDP launcher starts rank 1 by re-running this process's command line, so it must be started as
    ``python -m lightning_memopt.bench comm-worker --method NAME --config JSON --out DIR``, as :func:`run_comm` does.
    """
    from lightning_memopt import BlockSwitch
    from lightning_memopt.bench.worker import BenchLM
    from lightning_memopt.data import TextDataModule

    torch.set_num_threads(config.threads)
    seed_everything(config.seed, verbose=False)
    counter = ByteCounter()
    callbacks: list[Callback] = [counter]
    if method.badam:
        callbacks.append(BlockSwitch(every=config.every, order="random", seed=config.seed))
    trainer = build_trainer(out, method.precision, config.steps, callbacks, method.build_strategy(devices=2), devices=2)
    data = TextDataModule(seq_len=config.seq_len, batch_size=config.batch_size, max_bytes=config.max_bytes)
    with trainer.init_module():
        model = BenchLM(config.model_config(), "adamw", config)
    trainer.fit(model, datamodule=data)
    params = sum(p.numel() for p in model.parameters())
    masters = getattr(trainer.strategy, "master_params", {})
    record = {
        "method": method.name,
        "label": method.label,
        "precision": method.precision,
        "world_size": trainer.world_size,
        "params": params,
        "blocks": len(trainer.strategy.blocks) if method.badam else None,  # type: ignore[attr-defined]
        "active_block_params": sum(m.numel() for m in masters.values()) if method.badam else None,
        "step_bytes": counter.step_bytes,
        "bytes_per_step": statistics.fmean(counter.step_bytes),
        "ddp_hook_bytes": counter.hook_bytes,
        "all_reduce_bytes": counter.all_reduce_bytes,
        "all_reduce_calls": counter.all_reduce_calls,
        "counted_by": "torch.distributed.all_reduce wrapper" if method.badam else "DDP comm hook (bucket.buffer())",
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record, indent=2) + "\n")


def run_comm(
    config: BenchConfig,
    out: Path,
    methods: Sequence[str] = tuple(COMM_METHODS),
    *,
    progress: bool = True,
    timeout_s: float | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the communication rows and write ``comm.json``, ``comm.md`` and ``comm.png`` to ``out``.

    Example::

        results = run_comm(BenchConfig(layers=4, hidden=64, steps=3), Path("out"))
    """
    from lightning_memopt.bench.plots import plot_comm
    from lightning_memopt.bench.report import results_header

    unknown = [m for m in methods if m not in COMM_METHODS]
    if unknown:
        raise ValueError(f"Unknown communication method(s) {unknown}; choose from {', '.join(COMM_METHODS)}.")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    bar = tqdm([COMM_METHODS[m] for m in methods], desc="communication", unit="method", disable=not progress)
    for method in bar:
        bar.set_postfix_str(method.label)
        run_dir = out / "comm_runs" / method.name
        run_dir.mkdir(parents=True, exist_ok=True)
        for old in run_dir.glob("rank*.json"):
            old.unlink()
        args = ["comm-worker", "--method", method.name, "--config", config.to_json(), "--out", str(run_dir)]
        row = run_worker(args, run_dir, config.threads, timeout_s, result="rank0.json")
        if row is not None:
            rows.append(row)
            tqdm.write(f"{method.label}: {row['bytes_per_step'] / 2**20:,.2f} MiB per step")
        else:
            reason = (run_dir / "error.txt").read_text()
            failed.append({"method": method.name, "label": method.label, "reason": reason})
            tqdm.write(f"{method.label}: {reason}\n{(run_dir / 'log.txt').read_text()[-1500:]}")
    results = {
        **results_header(config, command),
        "rows": rows,
        "failed": failed,
    }
    (out / "comm.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "comm.md").write_text(render_comm_markdown(results))
    if rows:
        plot_comm(rows, out / "comm.png")
    return results


def render_comm_markdown(results: dict[str, Any]) -> str:
    """The ``comm.md`` table: bytes per optimizer step and the ratio to plain DDP with FP32 gradients.

    Example::

        print(render_comm_markdown(json.loads(Path("bench_results/comm.json").read_text())))
    """
    rows = results["rows"]
    reference = next((r for r in rows if r["method"] == "ddp-mixed"), rows[0] if rows else None)
    lines = [
        "# Communication per optimizer step (2 CPU processes, gloo)",
        "",
        "| method | params | bytes per step | MiB per step | vs DDP (bf16-mixed) | counted by |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "-" if reference is None else f"{r['bytes_per_step'] / reference['bytes_per_step']:.4f}"
        lines.append(
            f"| {r['label']} | {r['params']:,} | {r['bytes_per_step']:,.0f} | {r['bytes_per_step'] / 2**20:,.2f} | "
            f"{ratio} | {r['counted_by']} |"
        )
    for f in results.get("failed", []):
        lines.append(f"\n- {f['label']}: {f['reason']}")
    return "\n".join(lines) + "\n"
