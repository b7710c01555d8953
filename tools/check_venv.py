"""What ``tools/dist_check.py`` and ``tools/floors_check.py`` share: a work folder outside the source tree, a fresh
virtual environment in it with the torch build asked for, and steps that print ``ok`` or stop with their output.

Example::

    with work_folder(keep=None, prefix="lightning-memopt-dist-") as work:
        python, pip = fresh_venv(work, "torch==2.13.0")
        run([*pip, "some-package"], cwd=work, label="install some-package")
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class CheckFailed(RuntimeError):
    """A step of a check failed; the message holds the command and the end of its output."""


def run(command: list[str], *, cwd: Path, label: str, env: dict[str, str] | None = None) -> str:
    """Run ``command``, print ``ok  label (seconds)`` and return its output; raise :class:`CheckFailed` on a non-zero
    exit, with the last 6000 characters of its output."""
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-6000:]
        raise CheckFailed(f"{label} failed (exit {result.returncode}): {' '.join(command)}\n{tail}")
    print(f"  ok  {label} ({time.perf_counter() - started:.0f} s)", flush=True)
    return result.stdout + result.stderr


@contextmanager
def work_folder(keep: Path | None, prefix: str) -> Iterator[Path]:
    """``keep`` (created, must be new, kept afterwards) or a temporary folder removed afterwards; either way outside
    the source tree, so nothing there can be imported from the checkout by accident."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=False)
        work = keep.resolve()
    else:
        work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        if work.is_relative_to(ROOT):
            raise CheckFailed(f"{work} is inside the source tree; the point is to run outside it")
        yield work
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


def fresh_venv(work: Path, torch_spec: str) -> tuple[str, list[str]]:
    """A new venv in ``work/venv`` with an upgraded pip and ``torch_spec`` installed; returns its python and the
    quiet ``pip install`` command line to add packages with."""
    venv = work / "venv"
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    run([sys.executable, "-m", "venv", str(venv)], cwd=work, label="fresh venv")
    run([*pip, "--upgrade", "pip"], cwd=work, label="pip upgrade")
    run([*pip, torch_spec], cwd=work, label=f"install {torch_spec}")
    return python, pip
