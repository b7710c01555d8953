"""Turn benchmark rows into ``results.json``, ``results.md`` (tables and the targets' pass/miss) and plots."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

__all__ = ["TARGETS", "evaluate_targets", "machine_info", "render_markdown", "results_header", "write_results"]

_MIB = 2**20

TARGETS = {
    "accounting": "BAdam's accounted bytes within 1% of 2M + 16M/D (+ buffers)",
    "peak": "BAdam's peak ≤ 0.3 x AdamW (bf16-mixed)'s peak, above each process's start",
    "peak_process": "BAdam's peak ≤ 0.3 x AdamW (bf16-mixed)'s peak, whole process (peak RSS)",
    "step_time": "BAdam's time per step ≤ 0.8 x AdamW (bf16-true)'s",
    "overhead": "BAdam strategy's own work (grad move, copy-back, switching) ≤ 5% of a step",
    "loss": "BAdam's final loss within 5% of AdamW (bf16-mixed)'s at equal steps",
}


def results_header(config: Any, command: str | None) -> dict[str, Any]:
    """The first keys of every benchmark's results file: its settings, the model, the machine and the command."""
    return {
        "config": json.loads(config.to_json()),
        "model": config.model_config(),
        "machine": machine_info(config.threads),
        "command": command,
    }


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """CPU model, cores, library versions: where the figures come from.

    Example::

        >>> sorted(machine_info())[:3]
        ['bitsandbytes', 'cores', 'cpu']
    """
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for package in ("torch", "lightning", "transformers", "bitsandbytes"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **versions,
    }


def _row(rows: Sequence[Mapping[str, Any]], *names: str) -> Mapping[str, Any] | None:
    by_name = {r["method"]: r for r in rows}
    return next((by_name[n] for n in names if n in by_name), None)


def _target(key: str, value: float | None, limit: float, detail: str, *, absolute: bool = False) -> dict[str, Any]:
    passed = None if value is None else (abs(value) if absolute else value) <= limit
    return {"key": key, "target": TARGETS[key], "value": value, "limit": limit, "passed": passed, "detail": detail}


def evaluate_targets(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Pass or miss for each of :data:`TARGETS` (``passed`` is ``None`` when a row it needs was not run).

    The peak target compares the peaks above the RSS each process had before building its model (imports, data):
    that part of a CPU process's peak is the same for every method, and on a GPU it would not be counted either.

    Example::

        >>> evaluate_targets([])[0]["passed"] is None
        True
    """
    badam = _row(rows, "badam")
    mixed = _row(rows, "adamw-mixed")
    bf16 = _row(rows, "adamw-bf16")
    adamw = _row(rows, "adamw-mixed", "adamw-32", "adamw-bf16")
    targets = []

    value, detail = None, "needs the badam row"
    if badam is not None:
        m, d = badam["params"], badam["blocks"]
        buffers = badam["memory"].get("buffers") or 0
        closed = 2 * m + 16 * m / d + buffers
        value = badam["accounted_bytes"] / closed - 1
        detail = (
            f"accounted {badam['accounted_bytes']:,} B vs 2M + 16M/D + buffers = {closed:,.0f} B "
            f"(M = {m:,}, D = {d}); {value:+.2%}"
        )
    targets.append(_target("accounting", value, 0.01, detail, absolute=True))

    value, whole, detail = None, None, "needs the badam and adamw-mixed rows"
    if badam is not None and mixed is not None:
        value = badam["peak_above_start_bytes"] / mixed["peak_above_start_bytes"]
        whole = badam["peak_bytes"] / mixed["peak_bytes"]
        detail = (
            f"peak above the process's start: {badam['peak_above_start_bytes'] / _MIB:.0f} vs "
            f"{mixed['peak_above_start_bytes'] / _MIB:.0f} MiB = {value:.3f}x"
        )
    targets.append(_target("peak", value, 0.3, detail))
    if whole is not None:
        assert badam is not None and mixed is not None
        start = badam["baseline_rss_bytes"] / _MIB if badam.get("baseline_rss_bytes") else None
        detail = (
            f"peak RSS {badam['peak_bytes'] / _MIB:.0f} vs {mixed['peak_bytes'] / _MIB:.0f} MiB = {whole:.3f}x; "
            + (f"both include ~{start:.0f} MiB the process held before building the model" if start else "")
        )
    targets.append(_target("peak_process", whole, 0.3, detail))

    value, detail = None, "needs the badam and adamw-bf16 rows"
    if badam is not None and bf16 is not None:
        value = badam["step_time_s"] / bf16["step_time_s"]
        detail = f"median step {badam['step_time_s']:.3f} s vs {bf16['step_time_s']:.3f} s = {value:.3f}x"
    targets.append(_target("step_time", value, 0.8, detail))

    value, detail = None, "needs the badam row"
    if badam is not None and badam.get("strategy_overhead_fraction") is not None:
        value = badam["strategy_overhead_fraction"]
        parts = ", ".join(f"{k} {v:.3f} s" for k, v in badam.get("strategy_overhead_s", {}).items())
        detail = f"{value:.2%} of the timed steps' wall time ({parts})"
    targets.append(_target("overhead", value, 0.05, detail))

    value, detail = None, "needs the badam and an AdamW row"
    if badam is not None and adamw is not None:
        value = badam["final_loss"] / adamw["final_loss"] - 1
        detail = f"held-out loss {badam['final_loss']:.4f} vs {adamw['label']} {adamw['final_loss']:.4f}: {value:+.2%}"
    targets.append(_target("loss", value, 0.05, detail))
    return targets


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value / _MIB:,.1f}"


def _verdict(passed: bool | None) -> str:
    return "n/a" if passed is None else ("**pass**" if passed else "**miss**")


def render_markdown(results: Mapping[str, Any]) -> str:
    """The ``results.md`` text: the main table, memory by category, targets, the ablation, skipped rows.

    Example::

        print(render_markdown(json.loads(Path("bench_results/results.json").read_text())))
    """
    rows = results["rows"]
    config = results["config"]
    machine = results["machine"]
    reference = _row(rows, "adamw-mixed", "adamw-32", "adamw-bf16")
    lines = [
        "# Benchmark results",
        "",
        f"Model: Llama, {config['layers']} layers, hidden {config['hidden']}, "
        f"MLP {results['model']['intermediate_size']}, vocab 256 (bytes); "
        f"{rows[0]['params']:,} parameters."
        if rows
        else "No row ran.",
        f"Data: byte windows of the Python standard library's sources, seq_len {config['seq_len']}, batch "
        f"{config['batch_size']}; {config['steps']} optimizer steps per method, seed {config['seed']}; "
        f"BAdam: K = {config['every']} steps per block, random order.",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {config['threads']} torch thread(s); "
        f"torch {machine['torch']}, lightning {machine['lightning']}, transformers {machine['transformers']}, "
        f"bitsandbytes {machine['bitsandbytes']}.",
    ]
    if results.get("command"):
        lines.append(f"Command: `{results['command']}`")
    lines += [
        "",
        "| method | D | accounted MiB | grads MiB | predicted MiB | peak MiB (process) | peak - start MiB | step s | "
        "strategy overhead | final loss | vs AdamW |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        overhead = r.get("strategy_overhead_fraction")
        delta = "-" if reference is None else f"{r['final_loss'] / reference['final_loss'] - 1:+.1%}"
        lines.append(
            f"| {r['label']} | {r['blocks'] or '-'} | {_mib(r['accounted_bytes'])} | "
            f"{_mib((r.get('memory') or {}).get('grads'))} | {_mib(r['predicted_bytes'])} | "
            f"{_mib(r['peak_bytes'])} | {_mib(r['peak_above_start_bytes'])} | {r['step_time_s']:.3f} | "
            f"{'-' if overhead is None else f'{overhead:.1%}'} | {r['final_loss']:.4f} | {delta} |"
        )
    lines += [
        "",
        "accounted: weights + buffers + FP32 masters + gradients + optimizer state, measured after an optimizer step "
        "(largest of the measurements). predicted: the analytic model of `lightning_memopt.memory`. "
        "peak: the process's peak RSS (`VmHWM`, process-wide); peak - start: minus the RSS before the model was "
        "built. step: median "
        f"wall time of an optimizer step after {config['warmup']} warm-up steps. final loss: mean token loss on "
        f"{config['eval_batches']} held-out batches after training.",
        "",
        "## Memory by category (MiB)",
        "",
        "| method | closed form | weights | masters | grads | optimizer state | buffers | other (gc) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = r["memory"]
        lines.append(
            f"| {r['label']} | {r.get('formula') or ''} = {_mib(r.get('formula_bytes'))} | "
            f"{_mib(mem.get('weights'))} | "
            f"{_mib(mem.get('masters'))} | {_mib(mem.get('grads'))} | {_mib(mem.get('optimizer_state'))} | "
            f"{_mib(mem.get('buffers'))} | {_mib(mem.get('other'))} |"
        )
    lines += ["", "## Targets", "", "| target | result | measured |", "|---|---|---|"]
    for t in results.get("targets", evaluate_targets(rows)):
        lines.append(f"| {t['target']} | {_verdict(t['passed'])} | {t['detail']} |")
    lines += ["", "## Stabiliser ablation", ""]
    plain, stabilised = _row(rows, "badam"), _row(rows, "badam-stabilised")
    if plain is None or stabilised is None:
        lines.append(
            "Not run: needs the `badam` and `badam-stabilised` rows (the latter needs UpdateClipping, Beta2Schedule "
            "and RelativeStepSize in `lightning_memopt.callbacks`)."
        )
    else:
        lines += ["| method | final loss | largest loss jump within 5 steps after a switch |", "|---|---|---|"]
        for r in (plain, stabilised):
            jump = r.get("max_switch_jump")
            lines.append(f"| {r['label']} | {r['final_loss']:.4f} | {'-' if jump is None else f'{jump:+.4f}'} |")
    if results.get("skipped"):
        lines += ["", "## Skipped", ""]
        lines += [f"- {s['label']} (`{s['method']}`): {s['reason']}" for s in results["skipped"]]
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], out: Path) -> None:
    """Write ``results.json``, ``results.md`` and the plots (``memory.png``, ``loss.png``, ``time.png``) to ``out``.

    Adds the targets' verdicts (:func:`evaluate_targets`) to ``results``.

    Example::

        results = json.loads(Path("bench_results/results.json").read_text())
        write_results(results, Path("bench_results"))  # redraw after editing the rows
    """
    from lightning_memopt.bench.plots import plot_loss, plot_memory, plot_time

    results["targets"] = evaluate_targets(results["rows"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(render_markdown(results))
    if results["rows"]:
        plot_memory(results["rows"], out / "memory.png")
        plot_loss(results["rows"], out / "loss.png")
        plot_time(results["rows"], out / "time.png")
