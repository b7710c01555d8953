"""Run the fine-tuning benchmark's rows (each in a fresh process, per seed), compare them, write the results.

Outputs in ``--out``: ``results.json`` (a list of rows, one per method, with per-seed values), ``results.md`` (the
table and the targets, each with pass/miss) and ``finetune_loss_steps.png`` / ``finetune_loss_time.png``.

Equal wall-clock time: the reference is AdamW ``bf16-mixed``'s training time (evaluations excluded), per seed. A
row whose training time differs from it by more than ``TIME_TOLERANCE`` (10%) is run again for as many steps as fit
in the reference time at its own median step time (its schedule spanning those steps); the held-out loss at the end
of that run is its equal-time loss. Every loss in the table is on the whole held-out set (every ``eval_stride``-th
sample of the split); the curves use ``curve_samples`` of it.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lightning_memopt.bench.finetune import FT_DEFAULT_EVERY, FT_METHODS, FinetuneConfig
from lightning_memopt.bench.finetune_data import cache_root, make_base, make_task
from lightning_memopt.bench.matrix import run_worker
from lightning_memopt.bench.methods import Method
from lightning_memopt.bench.report import machine_info

__all__ = ["REFERENCE", "evaluate_finetune_targets", "render_finetune", "run_finetune", "run_finetune_sweep"]

REFERENCE = "adamw-mixed"
"""The paper's "Adam": every gain is compared with this row's."""

TIME_TOLERANCE = 0.1
"""A row whose training time is within this fraction of the reference's counts as equal time (two runs of one row
differ by about as much on this shared machine); others are rerun for as many steps as fit."""


def _worker_args(method: Method, config: FinetuneConfig, base: str, task: str, out: Path) -> list[str]:
    return [
        "finetune-worker",
        *("--method", method.name, "--config", config.to_json()),
        *("--base", base, "--task", task, "--out", str(out)),
    ]


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "spread": (max(values) - min(values)) / 2 if len(values) > 1 else 0.0,
    }


def run_finetune(
    methods: Sequence[Method],
    config: FinetuneConfig,
    out: Path,
    seeds: Sequence[int] = (0, 1, 2),
    *,
    jobs: int = 1,
    progress: bool = True,
    timeout_s: float | None = None,
    command: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Pretrain (or reuse) the base, build the task, run every method for every seed, write the results.

    ``jobs`` runs that many rows at once (each in its own process with ``config.threads`` threads): every row's step
    time is then measured under the same kind of load, the reference's included. ``resume`` keeps the rows a stopped
    run of the same settings (and ``jobs``) finished in ``out`` and runs only the others.

    Example::

        run_finetune([FT_METHODS["adamw-mixed"], FT_METHODS["badam"]], FinetuneConfig(), Path("out"), jobs=2)
    """
    out.mkdir(parents=True, exist_ok=True)
    base = make_base(cache_root() / "base", config.base, progress=progress)
    task = make_task(cache_root() / "task", config.task)
    failed: list[dict[str, str]] = []
    order = sorted(methods, key=lambda m: m.name != REFERENCE)  # the reference first: it sets the time budget
    plan = [(method, replace(config, seed=seed), out / "runs" / method.name / f"seed{seed}")
            for method in order for seed in seeds]  # fmt: skip
    run = partial(_run_many, base=base["dir"], task=task["dir"], jobs=jobs, timeout_s=timeout_s, failed=failed,
                  progress=progress, resume=resume)  # fmt: skip
    done = run(plan, desc="fine-tuning benchmark")
    runs: dict[str, list[dict[str, Any]]] = {}
    for (method, _, _), row in zip(plan, done, strict=True):
        if row is not None:
            runs.setdefault(method.name, []).append(row)
    reference_seconds = {r["seed"]: r["train_seconds"] for r in runs.get(REFERENCE, [])}
    longer_plan: list[tuple[Method, FinetuneConfig, Path]] = []
    longer_rows: list[dict[str, Any]] = []
    for name, rows in runs.items():
        for row in rows:
            budget = reference_seconds.get(row["seed"])
            row["equal_time_budget_s"] = budget
            row["equal_time_steps"] = None
            row["final_loss_equal_time"] = None
            if budget is None:
                continue
            if abs(row["train_seconds"] - budget) <= TIME_TOLERANCE * budget:
                row["final_loss_equal_time"] = row["final_loss"]
                continue
            # the method given AdamW's training time: as many steps as fit at its own step time, its schedule
            # spanning them
            steps = max(1, round(budget / row["step_time_s"]))
            longer = replace(config, seed=row["seed"], steps=steps, eval_every=max(1, steps // 6),
                             warmup=min(config.warmup, steps - 1))  # fmt: skip
            row["equal_time_steps"] = steps
            longer_plan.append((FT_METHODS[name], longer, out / "runs" / name / f"seed{row['seed']}-equal-time"))
            longer_rows.append(row)
    extras = run(longer_plan, desc="equal-time reruns")
    for row, extra in zip(longer_rows, extras, strict=True):
        row["equal_time_curve"] = extra["curve"] if extra else None
        row["final_loss_equal_time"] = extra["final_loss"] if extra else None
    rows = [_aggregate(name, runs[name]) for name in [m.name for m in methods] if name in runs]
    results = {
        "config": json.loads(config.to_json()),
        "base": base,
        "task": {k: v for k, v in task.items() if k != "dir"},
        "seeds": list(seeds),
        "jobs": jobs,
        "machine": machine_info(config.threads),
        "command": command,
        "rows": rows,
        "failed": failed,
    }
    results["targets"] = evaluate_finetune_targets(rows)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(render_finetune(results))
    _plots(rows, out)
    return results


def _run_many(
    plan: Sequence[tuple[Method, FinetuneConfig, Path]],
    base: str,
    task: str,
    jobs: int,
    timeout_s: float | None,
    failed: list[dict[str, str]],
    progress: bool,
    desc: str,
    resume: bool,
) -> list[dict[str, Any] | None]:
    """Run every ``(method, config, out)`` of ``plan`` in its own process, ``jobs`` at a time, in plan order; the
    rows in plan order (``None`` for a failed run, recorded in ``failed``). ``resume``: a run finished earlier with
    the same arguments and ``jobs`` is not run again (:func:`~lightning_memopt.bench.matrix.run_worker`)."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}.")
    bar = tqdm(total=len(plan), desc=desc, disable=not progress or not plan, dynamic_ncols=True)

    def one(item: tuple[Method, FinetuneConfig, Path]) -> dict[str, Any] | None:
        method, run_config, where = item
        args = _worker_args(method, run_config, base, task, where)
        row = run_worker(args, where, run_config.threads, timeout_s, settings={"jobs": jobs}, resume=resume)
        bar.set_postfix_str(f"{method.name} seed {run_config.seed}")
        bar.update()
        if row is None:
            failed.append({"method": method.name, "seed": str(run_config.seed),
                           "reason": (where / "error.txt").read_text()})  # fmt: skip
        return row

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        rows = list(pool.map(one, plan))
    bar.close()
    return rows


def run_finetune_sweep(
    methods: Sequence[Method],
    config: FinetuneConfig,
    out: Path,
    lr_factors: Sequence[float] = (1 / 3, 1.0, 3.0),
    everys: Sequence[int] = (),
    seed: int = 0,
    *,
    jobs: int = 1,
    progress: bool = True,
    timeout_s: float | None = None,
    command: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """The settings sweep, on the **validation** split only: every method at ``lr x factor`` for each factor (and, for
    BAdam rows, each K in ``everys``, else its own K), one seed, equal steps. Writes ``sweep.json`` and ``sweep.md``
    with the best setting per method by validation loss; the test set is never read.

    Example::

        run_finetune_sweep([FT_METHODS["badam"]], FinetuneConfig(), Path("sweep"), everys=(2, 4), jobs=2)
    """
    out.mkdir(parents=True, exist_ok=True)
    config = replace(config, split="val", seed=seed)
    base = make_base(cache_root() / "base", config.base, progress=progress)
    task = make_task(cache_root() / "task", config.task)
    plan: list[tuple[Method, FinetuneConfig, Path]] = []
    for method in methods:
        ks = everys if method.kind == "badam" and everys else (method.every or FT_DEFAULT_EVERY,)
        for factor in lr_factors:
            for k in ks:
                assert method.lr is not None, method.name  # every fine-tuning row names its lr
                lr = float(f"{method.lr * factor:.3g}")
                tag = f"lr{lr:g}" + (f"-K{k}" if method.kind == "badam" else "")
                plan.append((method, replace(config, lr=lr, every=k), out / "runs" / method.name / tag))
    failed: list[dict[str, str]] = []
    desc = "fine-tuning sweep (val)"
    rows = _run_many(plan, base["dir"], task["dir"], jobs, timeout_s, failed, progress, desc, resume)
    runs = [
        {key: row[key] for key in ("method", "label", "kind", "lr", "every", "base_loss", "final_loss", "step_time_s")}
        for row in rows
        if row is not None
    ]
    best: dict[str, dict[str, Any]] = {}
    for run in runs:
        if run["method"] not in best or run["final_loss"] < best[run["method"]]["final_loss"]:
            best[run["method"]] = run
    results = {"config": json.loads(config.to_json()), "base": base, "runs": runs, "best": best, "failed": failed,
               "command": command, "machine": machine_info(config.threads)}  # fmt: skip
    (out / "sweep.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Fine-tuning sweep (validation split)",
        "",
        f"{config.steps} steps of {config.batch_size}, seed {seed}; base loss on the validation split "
        f"{runs[0]['base_loss']:.3f}."
        if runs
        else "No run finished.",
        "",
        "| method | lr | K | validation loss | step | best |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        mark = "**best**" if best[run["method"]] is run else ""
        every = str(run["every"]) if run["kind"] == "badam" else "-"
        loss, step = f"{run['final_loss']:.4f}", f"{run['step_time_s']:.2f} s"
        lines.append(f"| {run['label']} | {run['lr']:g} | {every} | {loss} | {step} | {mark} |")
    if failed:
        lines += ["", "Failed runs:", *[f"- {f['method']}: {f['reason']}" for f in failed]]
    lines += ["", f"Command: `{command}`", ""]
    (out / "sweep.md").write_text("\n".join(lines))
    return results


def _aggregate(name: str, runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    first = runs[0]
    gains = [r["base_loss"] - r["final_loss"] for r in runs]
    row: dict[str, Any] = {
        key: first[key] for key in ("method", "label", "kind", "precision", "optimizer", "lr", "every", "rank")
    }
    row.update(
        base_loss=statistics.fmean(r["base_loss"] for r in runs),
        final_loss=statistics.fmean(r["final_loss"] for r in runs),
        final_loss_spread=_summary([r["final_loss"] for r in runs])["spread"],
        gain=_summary(gains),
        peak_bytes=max(r["peak_above_start_bytes"] or 0 for r in runs),
        accounted_bytes=first["accounted_bytes"],
        memory=first["memory"],
        step_time_s=statistics.median(r["step_time_s"] for r in runs),
        train_seconds=statistics.fmean(r["train_seconds"] for r in runs),
        trainable_params=first["trainable_params"],
        per_seed=[{k: r.get(k) for k in _PER_SEED} for r in runs],
    )
    equal_time = [r["final_loss_equal_time"] for r in runs if r.get("final_loss_equal_time") is not None]
    row["final_loss_equal_time"] = statistics.fmean(equal_time) if equal_time else None
    row["gain_equal_time"] = (
        _summary([r["base_loss"] - r["final_loss_equal_time"] for r in runs if r.get("final_loss_equal_time")])
        if equal_time
        else None
    )
    return row


_PER_SEED = (
    "seed",
    "base_loss",
    "final_loss",
    "final_loss_equal_time",
    "train_seconds",
    "step_time_s",
    "peak_above_start_bytes",
    "equal_time_steps",
    "curve",
    "equal_time_curve",
)


def _find(rows: Sequence[Mapping[str, Any]], name: str) -> Mapping[str, Any] | None:
    return next((r for r in rows if r["method"] == name), None)


def evaluate_finetune_targets(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets: BAdam's gain vs AdamW mixed (equal steps >= 90%, equal time >= 100%), vs LoRA r = 8 at
    equal steps, and BAdam's peak memory vs AdamW mixed (<= 0.3x) and LoRA r = 64."""
    adam = _find(rows, REFERENCE)
    lora8, lora64 = _find(rows, "lora-r8"), _find(rows, "lora-r64")
    reference = adam["label"] if adam else "AdamW (bf16-mixed)"  # AdamW (32-true) under --fp32
    targets: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, lower_is_better: bool, detail: str) -> None:
        passed = None if value is None else (value <= limit if lower_is_better else value >= limit)
        targets.append({"target": name, "value": value, "limit": limit, "passed": passed, "detail": detail})

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    def gain(row: Mapping[str, Any] | None, key: str = "gain") -> float | None:
        return row[key]["mean"] if row and row.get(key) else None

    def peak(row: Mapping[str, Any] | None) -> float | None:
        return row["peak_bytes"] if row else None

    # the targets for BAdam (one layer per block), then the same for blocks of 4 layers (the gap study's
    # best setting, behind an option), when that row ran
    for name, suffix, label in (("badam", "", "BAdam"), ("badam-4layer", "_4layer", "BAdam 4-layer blocks")):
        row = _find(rows, name)
        if row is None and suffix:
            continue
        add(f"gain_vs_adam_equal_steps{suffix}", ratio(gain(row), gain(adam)), 0.9, False,
            f"{label} gain / {reference} gain")  # fmt: skip
        add(f"gain_vs_adam_equal_time{suffix}", ratio(gain(row, "gain_equal_time"), gain(adam)), 1.0, False,
            f"{label} gain at AdamW's training time / AdamW's gain")  # fmt: skip
        add(f"gain_vs_lora_r8_equal_steps{suffix}", ratio(gain(row), gain(lora8)), 1.0, False,
            f"{label} gain / LoRA r=8 gain")  # fmt: skip
        add(f"peak_vs_adam{suffix}", ratio(peak(row), peak(adam)), 0.3, True,
            f"peak above start, {label} / {reference}")  # fmt: skip
        add(f"peak_vs_lora_r64{suffix}", ratio(peak(row), peak(lora64)), 1.0, True,
            f"peak above start, {label} / LoRA r=64")  # fmt: skip
    return targets


def render_finetune(results: Mapping[str, Any]) -> str:
    """``results.md``: the rows, the targets and where the numbers come from."""
    rows = results["rows"]
    seeds = results["seeds"]
    lines = [
        "# Fine-tuning benchmark",
        "",
        f"Base: {results['base']['parameters']:,} parameters, {results['base']['config']['layers']} layers, "
        f"pretraining val loss {results['base']['pretrain_val_loss']:.3f} nats/byte. Task: "
        f"{results['task']['train']} train / {results['task']['test']} held-out functions. "
        f"{results['config']['steps']} steps of {results['config']['batch_size']}, seeds {seeds}.",
        "",
        "| method | lr | K | held-out loss | gain over base | loss at AdamW's time | peak above start | "
        "accounted | grads | step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        equal = "-" if r["final_loss_equal_time"] is None else f"{r['final_loss_equal_time']:.3f}"
        grads = ((r.get("memory") or {}).get("grads") or 0) / 2**20
        lines.append(
            f"| {r['label']} | {r['lr']:g} | {r['every'] or '-'} | {r['final_loss']:.3f} ± {r['final_loss_spread']:.3f}"
            f" | {r['gain']['mean']:.3f} | {equal} | {r['peak_bytes'] / 2**20:.0f} MiB | "
            f"{(r['accounted_bytes'] or 0) / 2**20:.1f} MiB | {grads:.1f} MiB | {r['step_time_s']:.2f} s |"
        )
    lines += ["", "| target | value | limit | result |", "|---|---|---|---|"]
    for t in results["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        verdict = "n/a" if t["passed"] is None else "pass" if t["passed"] else "miss"
        lines.append(f"| {t['detail']} | {value} | {t['limit']} | {verdict} |")
    if results["failed"]:
        lines += ["", "Failed runs:", *[f"- {f['method']} seed {f['seed']}: {f['reason']}" for f in results["failed"]]]
    lines += ["", f"Command: `{results['command']}`", ""]
    return "\n".join(lines)


def _plots(rows: Sequence[Mapping[str, Any]], out: Path) -> None:
    from lightning_memopt.bench.plots import _pyplot, _save

    plt = _pyplot()
    # more rows than the default colour cycle has colours: 20 distinct ones, and a line style per kind of method
    palette = plt.get_cmap("tab20").colors
    colours = [palette[i] for i in (*range(0, 20, 2), *range(1, 20, 2))]
    styles = {"full": "-", "lora": "--", "badam": "-."}
    for axis, name, label in (("step", "finetune_loss_steps.png", "optimizer steps"),
                              ("seconds", "finetune_loss_time.png", "training time (s)")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, row in enumerate(rows):
            curves = [seed["curve"] for seed in row["per_seed"]]
            if axis == "seconds":
                curves = [seed.get("equal_time_curve") or seed["curve"] for seed in row["per_seed"]]
            xs = [statistics.fmean(p[axis] for p in points) for points in zip(*curves, strict=False)]
            ys = [statistics.fmean(p["loss"] for p in points) for points in zip(*curves, strict=False)]
            ax.plot(xs, ys, marker="o", markersize=3, label=row["label"], color=colours[i % len(colours)],
                    linestyle=styles.get(row.get("kind", ""), "-"))  # fmt: skip
        ax.set_xlabel(label)
        ax.set_ylabel("held-out response loss (nats/byte)")
        ax.set_title(f"Fine-tuning: held-out loss vs {label} (mean over seeds)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        _save(fig, out / name)
