"""Plots of a finished run, from its ``metrics.csv`` (Lightning's ``CSVLogger``) and ``memory.json``
(:class:`~lightning_memopt.MemoryReport`): ``lightning-memopt plot RUN_DIR``.

Two PNG files, written next to the metrics (or into ``--out``), their paths printed one a line:

- ``training.png``: over the optimizer steps, one panel each for what the run logged: the losses (every column with
  ``loss`` in its name; validation as points), the learning rate (``LearningRateMonitor``'s ``lr-*``), memory by
  category (``MemoryReport``'s ``memory/*_mib``, the prediction dashed) and BAdam's active block (``badam/block``).
- ``memory.png``: ``memory.json``'s accounted bytes per category next to the predicted ones, and the peak.

``RUN_DIR`` is the directory holding ``metrics.csv`` (``<save_dir>/<name>/version_N``), or a directory above it: then
the latest run under it is plotted (the highest ``version_N`` of one logger directory, else the most recently written
``metrics.csv``), and the choice is said on stderr. Needs matplotlib (``pip install 'lightning-memopt[plot]'``).

Example::

    lightning-memopt fit --config recipes/quickstart.yaml
    lightning-memopt plot runs/quickstart        # -> runs/quickstart/lightning_logs/version_0/training.png, ...

    >>> from lightning_memopt.plot import plot_run
    >>> paths = plot_run("runs/quickstart/lightning_logs/version_0")  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PlotError", "RunFiles", "find_run", "main", "plot_run", "read_metrics"]

METRICS = "metrics.csv"
MEMORY = "memory.json"
_SEARCH_DEPTH = 3  # RUN_DIR/<name>/version_N/metrics.csv from one directory above a CSVLogger's save_dir
_CATEGORIES = (
    ("weights", "weights"),
    ("buffers", "buffers"),
    ("masters", "FP32 masters"),
    ("grads", "gradients"),
    ("optimizer_state", "optimizer state"),
)
_BLOCK = "badam/block"

Series = dict[str, list[tuple[float, float]]]


class PlotError(ValueError):
    """A run directory that cannot be plotted (no ``metrics.csv``, nothing plottable in it); the message says what to
    pass instead.

    Example::

        >>> try:
        ...     find_run("no/such/run")
        ... except PlotError as error:
        ...     print("no/such/run" in str(error))
        True
    """


@dataclass(frozen=True)
class RunFiles:
    """The files of one run: its directory, ``metrics.csv``, and ``memory.json`` when ``MemoryReport`` wrote one.

    Example::

        >>> files, note = find_run("runs/quickstart")  # doctest: +SKIP
        >>> files.metrics.name, files.memory is not None  # doctest: +SKIP
        ('metrics.csv', True)
    """

    directory: Path
    metrics: Path
    memory: Path | None


def find_run(path: str | Path) -> tuple[RunFiles, str | None]:
    """The run to plot under ``path`` and, when ``path`` held several runs, a sentence saying which one was picked.

    Example::

        >>> find_run("runs/quickstart")  # doctest: +SKIP
        (RunFiles(directory=PosixPath('runs/quickstart/lightning_logs/version_1'), ...),
         'runs/quickstart holds 2 runs; plotting the latest, lightning_logs/version_1')
    """
    root = Path(path)
    if not root.exists():
        raise PlotError(f"{root} does not exist. Pass the log directory of a run, e.g. runs/quickstart.")
    if root.is_file():
        if root.name != METRICS:
            raise PlotError(f"{root} is a file; pass the directory that holds the run's {METRICS}.")
        root = root.parent
    if (root / METRICS).is_file():
        return _files(root), None
    found = sorted(
        p.parent for depth in range(1, _SEARCH_DEPTH + 1) for p in root.glob("/".join(["*"] * depth + [METRICS]))
    )
    if not found:
        raise PlotError(
            f"No {METRICS} in {root}: looked for {root / METRICS} and for {METRICS} up to {_SEARCH_DEPTH} directories "
            f"below it. Lightning's CSVLogger writes <save_dir>/<name>/version_N/{METRICS}: pass that directory (or "
            "one above it) of a run that trained with a CSVLogger (in a recipe, trainer.logger: class_path: "
            "lightning.pytorch.loggers.CSVLogger)."
        )
    if len({d.parent for d in found}) == 1:
        chosen = max(found, key=lambda d: (_version_number(d), (d / METRICS).stat().st_mtime))
    else:
        chosen = max(found, key=lambda d: (d / METRICS).stat().st_mtime)
    note = None
    if len(found) > 1:
        note = f"{root} holds {len(found)} runs; plotting the latest, {chosen.relative_to(root)}"
    return _files(chosen), note


def _files(directory: Path) -> RunFiles:
    memory = directory / MEMORY
    return RunFiles(directory, directory / METRICS, memory if memory.is_file() else None)


def _version_number(directory: Path) -> int:
    match = re.fullmatch(r"version_(\d+)", directory.name)
    return int(match.group(1)) if match else -1


def read_metrics(path: str | Path) -> Series:
    """Each numeric column of a ``CSVLogger`` ``metrics.csv`` as ``(step, value)`` pairs, in file order (rows
    without a step, and the ``step`` and ``epoch`` columns, are left out).

    Example::

        >>> import tempfile
        >>> csv_file = Path(tempfile.mkdtemp()) / "metrics.csv"
        >>> _ = csv_file.write_text("epoch,step,train_loss,val_loss\\n0,9,2.5,\\n0,9,,2.75\\n0,19,2.25,\\n")
        >>> read_metrics(csv_file)
        {'train_loss': [(9.0, 2.5), (19.0, 2.25)], 'val_loss': [(9.0, 2.75)]}
    """
    series: Series = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = _number(row.get("step"))
            if step is None:
                continue
            for key, text in row.items():
                if key in (None, "step", "epoch"):
                    continue
                value = _number(text)
                if value is not None:
                    series.setdefault(str(key), []).append((step, value))
    return series


def _number(text: Any) -> float | None:
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _panels(series: Series) -> list[tuple[str, list[str]]]:
    """(y label, columns) of each panel there is data for, in the order they are drawn."""
    losses = sorted((k for k in series if "loss" in k.lower()), key=lambda k: (not k.startswith("train"), k))
    lrs = [
        k
        for k in series
        if (k.startswith("lr-") or k == "lr" or k.endswith("/lr")) and not k.endswith(("-momentum", "-weight_decay"))
    ]
    memory = [k for k in series if k.startswith("memory/") and k.endswith("_mib")]
    panels = [("loss", losses), ("learning rate", lrs), ("memory (MiB)", memory)]
    if _BLOCK in series:
        panels.append(("active block", [_BLOCK]))
    return [(label, columns) for label, columns in panels if columns]


def _matplotlib() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise PlotError(
            "lightning-memopt plot draws with matplotlib, which is not installed here: "
            "pip install 'lightning-memopt[plot]' (or pip install matplotlib)."
        ) from err
    return Figure


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Draw ``training.png`` (and ``memory.png`` when the run has a ``memory.json``) for the run in ``run_dir`` (see
    :func:`find_run`) into ``out`` (default: the run's directory); returns the paths written.

    Example::

        >>> plot_run("runs/quickstart", out="plots")  # doctest: +SKIP
        [PosixPath('plots/training.png'), PosixPath('plots/memory.png')]
    """
    files, _ = find_run(run_dir)
    return _plot(files, Path(out) if out is not None else None)


def _plot(files: RunFiles, out: Path | None) -> list[Path]:
    series = read_metrics(files.metrics)
    panels = _panels(series)
    memory = json.loads(files.memory.read_text()) if files.memory is not None else None
    if not panels and memory is None:
        columns = ", ".join(sorted(series)) or "none with numbers"
        raise PlotError(
            f"{files.metrics} has nothing to plot: no loss, lr-*, memory/*_mib or {_BLOCK} column (its columns: "
            f"{columns}), and there is no {MEMORY} next to it. Log a loss with self.log, add LearningRateMonitor or "
            "lightning_memopt.MemoryReport to the callbacks, or pass another run."
        )
    Figure = _matplotlib()
    target = out if out is not None else files.directory
    target.mkdir(parents=True, exist_ok=True)
    method = (memory or {}).get("details", {}).get("method")
    title = f"{files.directory.name}" + (f": {method}" if method else "")
    written = []
    if panels:
        written.append(_draw_training(Figure, series, panels, title, target / "training.png"))
    if memory is not None:
        written.append(_draw_memory(Figure, memory, title, target / "memory.png"))
    return written


def _draw_training(
    Figure: Any, series: Series, panels: Sequence[tuple[str, list[str]]], title: str, path: Path
) -> Path:
    fig = Figure(figsize=(9, 1.2 + 2.1 * len(panels)))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (label, columns) in zip(axes, panels, strict=True):
        for column in columns:
            steps, values = zip(*series[column], strict=True)
            sparse = len(values) < 0.2 * max(len(v) for v in series.values())
            name = column.removeprefix("memory/").removesuffix("_mib")
            if column == _BLOCK:
                ax.plot(steps, values, drawstyle="steps-post", color="#4c72b0")
                ax.yaxis.get_major_locator().set_params(integer=True)
            elif name == "predicted":
                ax.plot(steps, values, linestyle="--", color="black", label=name)
            else:
                ax.plot(steps, values, marker="o" if sparse else None, markersize=3, label=name)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(columns) > 1:
            ax.legend(fontsize=7, loc="best")
    axes[-1].set_xlabel("step")
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _draw_memory(Figure: Any, memory: Mapping[str, Any], title: str, path: Path) -> Path:
    predicted = memory.get("details", {}).get("predicted_by_category", {})
    rows = [(label, memory.get(key) or 0, predicted.get(key)) for key, label in _CATEGORIES if key in memory]
    rows.append(("total", memory.get("total") or 0, memory.get("predicted")))
    scale, unit = _unit(max([r[1] for r in rows] + [r[2] or 0 for r in rows]))
    fig = Figure(figsize=(8, 3.6))
    ax = fig.subplots()
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r[1] / scale for r in rows], width=0.4, label="accounted", color="#4c72b0")
    ax.bar([i + 0.2 for i in x], [(r[2] or 0) / scale for r in rows], width=0.4, label="predicted", color="#dd8452")
    ax.set_xticks(list(x), [r[0] for r in rows])
    ax.set_ylabel(unit)
    step = memory.get("step")
    text = f"memory at step {step}" if step is not None else "memory"
    if memory.get("peak") is not None:
        # the source's first words only ("VmHWM", "torch.cuda.max_memory_allocated"): the whole sentence overflows
        source = str(memory.get("details", {}).get("peak_source", "")).split(":")[0].strip()
        text += f"; peak {memory['peak'] / scale:,.2f} {unit}" + (f" ({source[:40]})" if source else "")
    ax.set_title(f"{title}\n{text}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _unit(largest: float) -> tuple[int, str]:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if largest >= size:
            return size, unit
    return 1, "bytes"


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-memopt plot RUN_DIR [--out DIR]`` (the CLI dispatches here before LightningCLI sees argv).

    Example::

        >>> main(["runs/quickstart"])  # doctest: +SKIP
        runs/quickstart/lightning_logs/version_0/training.png
        runs/quickstart/lightning_logs/version_0/memory.png
        0
    """
    parser = argparse.ArgumentParser(
        prog="lightning-memopt plot",
        description="Plot loss, learning rate, memory by category and the active block of a finished run, from its "
        f"{METRICS} (CSVLogger) and {MEMORY} (MemoryReport).",
    )
    parser.add_argument("run_dir", help=f"the run's log directory (holding {METRICS}), or a directory above it")
    parser.add_argument("--out", help="directory for the PNG files (default: next to the metrics)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        files, note = find_run(args.run_dir)
        if note:
            print(f"lightning-memopt plot: {note}", file=sys.stderr)
        written = _plot(files, Path(args.out) if args.out else None)
    except PlotError as err:
        print(f"lightning-memopt plot: error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
