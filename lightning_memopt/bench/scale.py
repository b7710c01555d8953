"""``python -m lightning_memopt.bench scale``: train a few BAdam steps of a model of real shape (Llama 3-8B by default)
and print the measured peak next to ``lightning-memopt estimate``.

Each row runs in a fresh process: :class:`~lightning_memopt.lm.CausalLM` built from the preset's config directly in
bf16 (meta device, then materialised: no FP32 copy), random weights and random tokens, batch 1, gradient
checkpointing, a block switch every ``--every`` steps in ascending order (so the first switch is included), and
:class:`~lightning_memopt.MemoryReport`. Before a row starts, its estimate is compared with the memory the machine
has free (``MemAvailable``); a row that would not fit is refused with the figures instead of getting the machine
out-of-memory-killed. On CPU the peak is the process's peak resident set size; the estimate is compared with the peak
above the process's size just before the model is built (the interpreter and its libraries).

Usage::

    python -m lightning_memopt.bench scale                          # Llama 3-8B shape, badam, badam-8bit, badam-fused
    python -m lightning_memopt.bench scale --model llama-3.2-1b --seq-len 512 --no-gradient-checkpointing
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["SCALE_METHODS", "ScaleConfig", "available_memory", "run_scale", "run_scale_row"]

SCALE_METHODS = ("badam", "badam-8bit", "badam-fused")
"""The rows without ``--methods``: BAdam + AdamW, + AdamW8bit, with the update in backward."""

_GIB = 2**30


@dataclass(frozen=True)
class ScaleConfig:
    """One scale run's settings (every row shares them).

    Args:
        model: a preset of :data:`lightning_memopt.estimate.PRESETS` (built in bf16 from its config, random weights)
            or a model directory (loaded in bf16).
        seq_len: tokens per sequence (batch 1).
        steps: optimizer steps per row.
        every: BAdam's K, so ``steps > every`` includes a block switch.
        gradient_checkpointing: recompute each decoder layer in backward.
        loss_chunk_size: ``CausalLM(loss_chunk_size=...)``; ``None``: full logits.
        layers: replace the model's number of decoder layers (a quicker, shallower model of the same width).
        threads: torch's CPU threads.
        headroom: bytes a row must leave free beyond its estimate (the interpreter, libraries, allocator slack).
        memory_limit: refuse rows whose estimate plus headroom exceeds this many bytes; ``None``: the machine's free
            memory (``MemAvailable``).
    """

    model: str = "llama-3-8b"
    seq_len: int = 64
    steps: int = 3
    every: int = 2
    gradient_checkpointing: bool = True
    loss_chunk_size: int | None = 1024
    layers: int | None = None
    threads: int = 2
    headroom: int = int(1.5 * _GIB)
    memory_limit: int | None = None

    def model_config(self) -> Any:
        from lightning_memopt.estimate import load_config

        config = load_config(self.model)
        if self.layers is not None:
            config.num_hidden_layers = self.layers
        return config

    def estimate_kwargs(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "batch_size": 1,
            "gradient_checkpointing": self.gradient_checkpointing,
            "loss_chunk_size": self.loss_chunk_size,
        }


def available_memory() -> int | None:
    """The memory the machine can give a new process now (Linux ``MemAvailable``), in bytes; ``None`` elsewhere.

    Example::

        >>> free = available_memory()
        >>> free is None or free > 0
        True
    """
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class _RandomTokens(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, vocab: int, seq_len: int, length: int) -> None:
        self.data = torch.randint(0, vocab, (length, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[index], "labels": self.data[index]}


def run_scale_row(name: str, config: ScaleConfig, out: Path) -> dict[str, Any]:
    """Train one row in this process and write ``out/row.json``: the estimate, the measured peak and the accounting.

    Example::

        run_scale_row("badam", ScaleConfig(model="llama-3.2-1b", layers=2), Path("out/badam"))
    """
    from lightning.pytorch import seed_everything

    from lightning_memopt import BlockSwitch, MemoryReport
    from lightning_memopt.bench.config import BenchConfig
    from lightning_memopt.bench.methods import METHODS, build_trainer
    from lightning_memopt.bench.worker import BenchLM, StepClock
    from lightning_memopt.estimate import estimate
    from lightning_memopt.memory import current_rss, peak_memory, reset_peak_rss

    torch.set_num_threads(config.threads)
    method = METHODS[name]
    model_config = config.model_config()
    (row,) = estimate(model_config, [name], **config.estimate_kwargs())
    seed_everything(0)
    reset_peak_rss()
    baseline = current_rss()
    started = time.perf_counter()
    model = BenchLM(
        model_config.to_dict(),
        method.optimizer,
        BenchConfig(),
        dtype="bfloat16",
        gradient_checkpointing=config.gradient_checkpointing,
        loss_chunk_size=config.loss_chunk_size,
    )
    built_s = time.perf_counter() - started
    clock = StepClock()
    report = MemoryReport(every_n_steps=1, count_other=False, filename="memory.json")
    switch = [BlockSwitch(every=config.every, order="ascending")] if method.badam else []
    trainer = build_trainer(
        out, method.precision, config.steps, [clock, *switch, report], strategy=method.build_strategy()
    )
    data = DataLoader(_RandomTokens(model_config.vocab_size, config.seq_len, config.steps), batch_size=1)
    trainer.fit(model, data)
    peak, source = peak_memory("cpu")
    accounted = report.report or {}
    result = {
        "method": name,
        "label": method.label,
        "estimate": row.as_json(),
        "baseline_rss": baseline,
        "peak_rss": peak,
        "peak_source": source,
        "peak_above_baseline": None if peak is None or baseline is None else peak - baseline,
        "accounted": {
            k: accounted.get(k) for k in ("weights", "buffers", "masters", "grads", "optimizer_state", "total")
        },
        "blocks_visited": sorted({b for b in clock.blocks if b is not None}),
        "step_times_s": clock.step_times,
        "losses": clock.losses,
        "build_s": built_s,
        "params": sum(p.numel() for p in model.parameters()),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "row.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_scale(
    methods: Sequence[str], config: ScaleConfig, out: Path, timeout_s: float | None = None, command: str = ""
) -> dict[str, Any]:
    """Every row in a fresh process, each checked against the free memory first; writes ``scale.json`` and
    ``scale.md`` into ``out`` and returns the results."""
    from lightning_memopt.bench.matrix import run_worker
    from lightning_memopt.estimate import estimate

    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    failed: list[str] = []
    for name in methods:
        (row,) = estimate(config.model_config(), [name], **config.estimate_kwargs())
        limit = config.memory_limit if config.memory_limit is not None else available_memory()
        needed = row.total + config.headroom
        if limit is not None and needed > limit:
            reason = (
                f"{name}: the estimate is {row.total / _GIB:.2f} GiB (+ {config.headroom / _GIB:.2f} GiB headroom) but "
                f"only {limit / _GIB:.2f} GiB is free: refused, to keep the machine from running out of memory. "
                "Free memory, pick a smaller --model or --layers, or a method with less state."
            )
            print(reason, flush=True)
            refused.append({"method": name, "reason": reason, "estimate": row.as_json()})
            continue
        print(f"{name}: estimate {row.total / _GIB:.2f} GiB, running ...", flush=True)
        args = ["scale-worker", "--method", name, "--config", json.dumps(asdict(config)), "--out", str(out / name)]
        result = run_worker(args, out / name, config.threads, timeout_s=timeout_s)
        if result is None:
            failed.append(name)
            continue
        rows.append(result)
        print(_line(result), flush=True)
    results = {"config": asdict(config), "command": command, "rows": rows, "refused": refused, "failed": failed}
    (out / "scale.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "scale.md").write_text(format_scale(results) + "\n")
    return results


def _line(result: dict[str, Any]) -> str:
    est = result["estimate"]["total"]
    measured = result["peak_above_baseline"]
    error = "" if measured is None else f" ({(est - measured) / measured:+.1%} estimate vs measured)"
    measured_text = "n/a" if measured is None else f"{measured / _GIB:.2f} GiB"
    return f"{result['method']}: peak above start {measured_text}, estimate {est / _GIB:.2f} GiB{error}"


def format_scale(results: dict[str, Any]) -> str:
    """The Markdown table of a scale run (GiB)."""
    config = results["config"]
    lines = [
        f"Model {config['model']}"
        + (f" with {config['layers']} layers" if config.get("layers") else "")
        + f", seq {config['seq_len']}, batch 1, gradient checkpointing {config['gradient_checkpointing']}, "
        f"loss chunk {config['loss_chunk_size']}, {config['steps']} steps, switch every {config['every']}",
        "",
        "| method | params | estimate total | of which activations | accounted model state | peak RSS | peak above "
        "start | estimate error | median step (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        est = r["estimate"]
        measured = r["peak_above_baseline"]
        error = "" if not measured else f"{(est['total'] - measured) / measured:+.1%}"
        steps = sorted(r["step_times_s"])
        median = steps[len(steps) // 2] if steps else float("nan")
        lines.append(
            f"| {r['method']} | {r['params'] / 1e9:.2f} B | {est['total'] / _GIB:.2f} | "
            f"{est['activations'] / _GIB:.2f} | {(r['accounted']['total'] or 0) / _GIB:.2f} | "
            f"{(r['peak_rss'] or 0) / _GIB:.2f} | "
            f"{(measured or 0) / _GIB:.2f} | {error} | {median:.1f} |"
        )
    for r in results["refused"]:
        lines.append(f"| {r['method']} | refused: {r['reason']} |||||||")
    for name in results["failed"]:
        lines.append(f"| {name} | failed: see {name}/log.txt |||||||")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """Options of ``python -m lightning_memopt.bench scale``."""
    defaults = ScaleConfig()
    p = argparse.ArgumentParser(
        prog="python -m lightning_memopt.bench scale",
        description="A few BAdam steps of a model of real shape (random bf16 weights), peak memory next to the "
        "estimate; refuses rows that would not fit in the free memory. Writes scale.json and scale.md.",
    )
    p.add_argument("--methods", default=",".join(SCALE_METHODS), help="comma-separated benchmark rows")
    p.add_argument("--model", default=defaults.model, help="preset or model directory (default: llama-3-8b)")
    p.add_argument("--seq-len", type=int, default=defaults.seq_len)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--every", type=int, default=defaults.every, help="BAdam's K")
    p.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--loss-chunk-size", type=int, default=defaults.loss_chunk_size, help="0: full logits")
    p.add_argument("--threads", type=int, default=defaults.threads)
    p.add_argument("--memory-limit", default=None, help="refuse rows above this (e.g. 20GB); default: free memory")
    p.add_argument("--out", type=Path, default=Path("bench_results/scale"))
    p.add_argument("--timeout", type=float, default=None, help="seconds before a row is abandoned")
    return p


def main(argv: Sequence[str], command: str = "") -> int:
    """Entry point of ``bench scale``; 1 if a row failed or was refused."""
    from lightning_memopt.bench.methods import METHODS
    from lightning_memopt.estimate import EstimateError, parse_size

    args = parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"Unknown or no --methods {unknown}. Choose from: {', '.join(METHODS)}.")
    try:
        limit = parse_size(args.memory_limit) if args.memory_limit else None
    except EstimateError as err:
        raise SystemExit(str(err).replace("--gpu-memory", "--memory-limit")) from err
    config = ScaleConfig(
        model=args.model,
        seq_len=args.seq_len,
        steps=args.steps,
        every=args.every,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        loss_chunk_size=args.loss_chunk_size or None,
        layers=args.layers,
        threads=args.threads,
        memory_limit=limit,
    )
    results = run_scale(methods, config, args.out, timeout_s=args.timeout, command=command)
    print((args.out / "scale.md").read_text())
    return 1 if results["failed"] or results["refused"] else 0


def worker_main(argv: Sequence[str]) -> None:
    """``bench scale-worker``: one row in this process."""
    p = argparse.ArgumentParser(prog="python -m lightning_memopt.bench scale-worker")
    for name in ("--method", "--config", "--out"):
        p.add_argument(name, required=True)
    args = p.parse_args(argv)
    config = replace(ScaleConfig(), **json.loads(args.config))
    run_scale_row(args.method, config, Path(args.out))
