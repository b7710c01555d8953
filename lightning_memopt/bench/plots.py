"""The benchmark's figures (matplotlib, headless): memory by category, loss curves, step time, communication.

Each function takes the rows of ``results.json`` (or ``comm.json``) and writes one PNG.

Example::

    rows = json.loads(Path("bench_results/results.json").read_text())["rows"]
    plot_memory(rows, Path("memory.png"))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_comm", "plot_loss", "plot_memory", "plot_time"]

_MIB = 2**20
_CATEGORIES = (
    ("weights", "weights", "#4c72b0"),
    ("masters", "FP32 masters", "#dd8452"),
    ("grads", "gradients", "#55a868"),
    ("optimizer_state", "optimizer state", "#c44e52"),
    ("buffers", "buffers", "#8172b3"),
)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    # small PNGs for the docs: modest dpi, no transparency
    fig.savefig(path, dpi=90)
    fig.clf()
    _pyplot().close(fig)


def plot_memory(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Stacked horizontal bars of the accounted memory per method, with the measured peaks as markers."""
    plt = _pyplot()
    labels = [r["label"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.6))
    y = list(range(len(rows)))[::-1]
    left = [0.0] * len(rows)
    for key, name, color in _CATEGORIES:
        widths = [(r["memory"].get(key) or 0) / _MIB for r in rows]
        ax.barh(y, widths, left=left, color=color, label=name, height=0.65)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    peaks = [(r.get("peak_above_start_bytes") or 0) / _MIB for r in rows]
    ax.scatter(peaks, y, marker="D", color="black", s=22, zorder=3, label="measured peak (RSS above start)")
    for total, row_y in zip(left, y, strict=True):
        ax.text(total, row_y, f" {total:,.0f}", va="center", fontsize=7)
    ax.set_yticks(y, labels)
    ax.set_xlabel("MiB")
    ax.margins(x=0.06)
    ax.set_title("Accounted memory by category, and the measured peak")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


def plot_loss(rows: Sequence[Mapping[str, Any]], path: Path, window: int = 5) -> None:
    """Training loss per step (running mean over ``window`` steps) and the final held-out loss per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    colors = [*plt.get_cmap("tab10").colors, *plt.get_cmap("Dark2").colors]
    for i, r in enumerate(rows):
        curve = r["loss_curve"]
        color = colors[i % len(colors)]
        style = "-" if r.get("badam") else "--"
        ax.plot(range(1, len(curve) + 1), _smooth(curve, window), style, color=color, lw=1.4, label=r["label"])
        ax.scatter([len(curve)], [r["final_loss"]], color=color, s=18, zorder=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss (running mean of {window}); dots: held-out loss at the end")
    ax.set_title("Loss (dashed: whole-model optimizers, solid: BAdam)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def plot_time(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Median step time per method; for BAdam the share spent in the strategy's own work is drawn darker."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.4))
    y = list(range(len(rows)))[::-1]
    times = [r["step_time_s"] for r in rows]
    overhead = [(r.get("strategy_overhead_fraction") or 0.0) * r["step_time_s"] for r in rows]
    ax.barh(y, times, color="#4c72b0", height=0.65, label="median step time")
    ax.barh(y, overhead, color="#c44e52", height=0.65, label="BAdam strategy's own work (mean share)")
    for seconds, row_y in zip(times, y, strict=True):
        ax.text(seconds, row_y, f" {seconds:.2f} s", va="center", fontsize=7)
    ax.set_yticks(y, [r["label"] for r in rows])
    ax.set_xlabel("seconds per optimizer step")
    ax.margins(x=0.1)  # room for the labels right of the longest bar
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


def plot_comm(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Bytes communicated per optimizer step: bars of the mean, lines of every step."""
    plt = _pyplot()
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = [r["label"] for r in rows]
    means = [r["bytes_per_step"] / _MIB for r in rows]
    bars.barh(list(range(len(rows)))[::-1], means, color="#4c72b0")
    bars.set_yticks(list(range(len(rows)))[::-1], labels)
    bars.set_xscale("log")
    bars.set_xlabel("MiB per optimizer step (log)")
    for x, y in zip(means, list(range(len(rows)))[::-1], strict=True):
        bars.text(x, y, f" {x:,.1f}", va="center", fontsize=8)
    for r in rows:
        steps = r["step_bytes"]
        lines.plot(range(1, len(steps) + 1), [b / _MIB for b in steps], marker="o", ms=3, label=r["label"])
    lines.set_yscale("log")
    lines.set_xlabel("optimizer step")
    lines.set_ylabel("MiB (log)")
    lines.legend(fontsize=7)
    lines.grid(alpha=0.3)
    fig.suptitle("Gradient bytes all-reduced per optimizer step (rank 0, 2 gloo processes)")
    _save(fig, path)
