"""Run the benchmark's methods one after another, each in a fresh Python process, and collect their rows.

A fresh process per method keeps peaks apart: the CPU peak is the process's peak resident set size, and memory a
process has freed is not always returned to the operating system.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lightning_memopt.bench.config import BenchConfig
from lightning_memopt.bench.methods import Method
from lightning_memopt.bench.report import results_header, write_results

__all__ = ["run_matrix", "run_subprocess", "run_worker"]


def run_worker(
    args: Sequence[str],
    out: Path,
    threads: int,
    timeout_s: float | None = None,
    result: str = "row.json",
    settings: Mapping[str, Any] | None = None,
    resume: bool = False,
) -> dict[str, Any] | None:
    """Run ``python -m lightning_memopt.bench <args>`` in a new interpreter with its output in ``out/log.txt``, and
    return the ``out/<result>`` JSON it wrote; ``None`` (with the reason in ``out/error.txt``) when it failed. Every
    sub-benchmark (matrix, fine-tuning, communication) starts its rows through this one runner.

    A finished run records ``args``, ``threads`` and ``settings`` (what else decides the row: the number of rows run
    at once, say) in ``out/done.json``. With ``resume``, a run whose record matches returns its row without running
    again (a benchmark that was stopped resumes where it was); any other run starts afresh.
    """
    out.mkdir(parents=True, exist_ok=True)
    row_file, done_file = out / result, out / "done.json"
    record = {"args": list(args), "threads": threads, **(settings or {})}
    finished = resume and row_file.is_file() and done_file.is_file()
    if finished and json.loads(done_file.read_text()) == record:
        return json.loads(row_file.read_text())
    row_file.unlink(missing_ok=True)
    done_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "lightning_memopt.bench", *args]
    # the OpenMP pool is sized when torch loads: set it before the import, not only with torch.set_num_threads
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    log = out / "log.txt"
    with log.open("w") as handle:
        try:
            code = subprocess.run(
                command, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=timeout_s
            ).returncode
        except subprocess.TimeoutExpired:
            code = None
    if code == 0 and row_file.exists():
        done_file.write_text(json.dumps(record) + "\n")
        return json.loads(row_file.read_text())
    reason = "timed out" if code is None else f"exited with code {code}"
    (out / "error.txt").write_text(f"{reason}; see {log}")
    return None


def run_subprocess(method: Method, config: BenchConfig, out: Path, timeout_s: float | None = None) -> dict[str, Any]:
    """Run one method in a new interpreter (``python -m lightning_memopt.bench worker``) and return its row.

    The run's output goes to ``out/log.txt``. A failed run returns ``{"method": ..., "error": ...}`` with the end of
    its log instead of raising, so one broken row does not cost the rest of the matrix.

    Example::

        row = run_subprocess(METHODS["adamw-mixed"], BenchConfig(layers=2, hidden=32, steps=6), Path("out/mixed"))
    """
    args = ["worker", "--method", method.name, "--config", config.to_json(), "--out", str(out)]
    row = run_worker(args, out, config.threads, timeout_s)
    if row is not None:
        return row
    tail = (out / "log.txt").read_text()[-3000:]
    return {"method": method.name, "label": method.label, "error": (out / "error.txt").read_text(), "log_tail": tail}


def run_matrix(
    methods: Sequence[Method],
    config: BenchConfig,
    out: Path,
    *,
    progress: bool = True,
    timeout_s: float | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run ``methods`` on the same model, data, seed and steps, then write results.json, results.md and the plots.

    Rows whose callbacks are missing from this version of the package are listed as skipped, with the reason.

    Example::

        from lightning_memopt.bench import BenchConfig, run_matrix, select

        results = run_matrix(select(["adamw-mixed", "badam"]), BenchConfig(layers=4, hidden=64, steps=10), Path("out"))
    """
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    runnable = []
    for method in methods:
        missing = method.missing()
        if missing:
            names = ", ".join(f"lightning_memopt.callbacks.{name}" for name in missing)
            skipped.append({"method": method.name, "label": method.label, "reason": f"needs {names} (not there yet)"})
        else:
            runnable.append(method)
    bar = tqdm(runnable, desc="benchmark", unit="method", disable=not progress, dynamic_ncols=True)
    for method in bar:
        bar.set_postfix_str(method.label)
        row = run_subprocess(method, config, out / "runs" / method.name, timeout_s)
        if "error" in row:
            skipped.append({"method": method.name, "label": method.label, "reason": row["error"]})
            tqdm.write(f"{method.label}: {row['error']}\n{row['log_tail'][-1500:]}")
        else:
            rows.append(row)
            tqdm.write(
                f"{method.label}: step {row['step_time_s']:.3f} s, accounted {row['accounted_bytes'] / 2**20:.1f} MiB, "
                f"peak {row['peak_bytes'] / 2**20:.0f} MiB, final loss {row['final_loss']:.3f}"
            )
    results = {
        **results_header(config, command),
        "rows": rows,
        "skipped": skipped,
    }
    write_results(results, out)
    return results
