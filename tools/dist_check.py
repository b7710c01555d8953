"""Prove the release artefacts carry everything: build, check, install outside the tree, run.

``make dist-check`` (called from ``.ci/run`` after ``make test``) runs this:

1. ``python -m build``: the sdist, then the wheel built *from the sdist* (so a file missing from the sdist fails too);
2. ``twine check --strict`` on both, and the wheel's contents: every shipped recipe, ``py.typed``, the licence, the
   version from ``lightning_memopt/__init__.py`` in its name;
3. a fresh virtual environment in a temporary folder outside the source tree: the torch build given by ``--torch``
   (the CPU build in CI), then the wheel with its ``recipes`` extra;
4. from a scratch folder there: ``lightning-memopt --version``, ``lightning-memopt recipes``, ``lightning-memopt
   recipes copy quickstart .`` and ``lightning-memopt fit --config quickstart.yaml`` for a few steps, checking that
   the installed package (not the source tree) ran, that the metrics were written and the training loss fell.

Example::

    python tools/dist_check.py --torch torch==2.13.0          # what make dist-check runs
    python tools/dist_check.py --keep /tmp/memopt-dist          # keep the venv and the run to look at
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys
import time
import zipfile
from pathlib import Path

from check_venv import ROOT, CheckFailed, fresh_venv, run, work_folder

FIT_STEPS = 12


def _source_version() -> str:
    text = (ROOT / "lightning_memopt" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    if match is None:
        raise CheckFailed('lightning_memopt/__init__.py has no `__version__ = "..."` line')
    return match.group(1)


def _check_wheel(wheel: Path, version: str) -> None:
    if f"-{version}-" not in wheel.name:
        raise CheckFailed(f"{wheel.name} does not carry version {version} (lightning_memopt.__version__)")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {f"lightning_memopt/recipes/{p.name}" for p in (ROOT / "lightning_memopt" / "recipes").glob("*.yaml")}
    wanted |= {"lightning_memopt/py.typed", "lightning_memopt/recipes/__init__.py"}
    missing = sorted(wanted - names)
    if not any(n.endswith("/licenses/LICENSE") for n in names):
        missing.append("*.dist-info/licenses/LICENSE")
    if missing:
        raise CheckFailed(f"the wheel lacks {', '.join(missing)}: check [tool.setuptools.package-data]")
    print(f"  ok  wheel contents: {len(wanted) - 2} recipes, py.typed, LICENSE", flush=True)


def _check_fit(run_dir: Path) -> None:
    metrics = sorted(run_dir.glob("lightning_logs/version_*/metrics.csv"))
    if not metrics:
        raise CheckFailed(f"the quickstart run wrote no metrics.csv under {run_dir}")
    with metrics[-1].open() as handle:
        losses = [float(row["train_loss"]) for row in csv.DictReader(handle) if row.get("train_loss")]
    if len(losses) < 2 or not all(map(math.isfinite, losses)) or not losses[-1] < losses[0]:
        raise CheckFailed(f"the quickstart run's train_loss did not fall: {losses}")
    print(f"  ok  quickstart fit: train_loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} logs", flush=True)


def check(torch_spec: str, work: Path) -> None:
    version = _source_version()
    dist, venv, scratch = work / "dist", work / "venv", work / "run"
    print(f"dist-check of lightning-memopt {version} in {work}", flush=True)
    run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], cwd=work, label="python -m build")
    sdists, wheels = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    if len(sdists) != 1 or len(wheels) != 1:
        raise CheckFailed(f"expected one sdist and one wheel in {dist}, found {[p.name for p in dist.iterdir()]}")
    run([sys.executable, "-m", "twine", "check", "--strict", *map(str, sdists + wheels)], cwd=work, label="twine")
    _check_wheel(wheels[0], version)

    python, pip = fresh_venv(work, torch_spec)
    bin_dir = venv / "bin"
    run([*pip, f"{wheels[0]}[recipes]"], cwd=work, label="install the wheel with [recipes]")

    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    cli = str(bin_dir / "lightning-memopt")
    where = run(
        [python, "-c", "import lightning_memopt; print(lightning_memopt.__file__)"],
        cwd=scratch,
        env=env,
        label="import",
    ).strip()
    if not Path(where).is_relative_to(venv):
        raise CheckFailed(f"lightning_memopt was imported from {where}, not from the fresh venv {venv}")
    printed = run([cli, "--version"], cwd=scratch, env=env, label="lightning-memopt --version").strip()
    if printed != f"lightning-memopt {version}":
        raise CheckFailed(f"`lightning-memopt --version` printed {printed!r}, expected 'lightning-memopt {version}'")
    listed = run([cli, "recipes"], cwd=scratch, env=env, label="lightning-memopt recipes")
    for recipe in (ROOT / "lightning_memopt" / "recipes").glob("*.yaml"):
        if recipe.stem not in listed:
            raise CheckFailed(f"`lightning-memopt recipes` does not list {recipe.stem}:\n{listed}")
    run([cli, "recipes", "copy", "quickstart", "."], cwd=scratch, env=env, label="lightning-memopt recipes copy")
    source = ROOT / "lightning_memopt" / "recipes" / "quickstart.yaml"
    if (scratch / "quickstart.yaml").read_bytes() != source.read_bytes():
        raise CheckFailed("the copied quickstart.yaml differs from lightning_memopt/recipes/quickstart.yaml")
    fit = [cli, "fit", "--config", "quickstart.yaml", "--trainer.max_steps", str(FIT_STEPS)]
    fit += ["--trainer.val_check_interval", str(FIT_STEPS // 2), "--trainer.limit_val_batches", "2"]
    fit += ["--trainer.log_every_n_steps", "2", "--trainer.enable_progress_bar", "false"]
    fit += ["--data.init_args.max_bytes", "400000"]
    run(fit, cwd=scratch, env=env, label=f"lightning-memopt fit --config quickstart.yaml ({FIT_STEPS} steps)")
    _check_fit(scratch / "runs" / "quickstart")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch", default="torch==2.13.0", help="the torch requirement for the fresh venv")
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it; default: a temporary one")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        with work_folder(args.keep, prefix="lightning-memopt-dist-") as work:
            check(args.torch, work)
    except CheckFailed as error:
        print(f"dist-check FAILED: {error}", file=sys.stderr)
        return 1
    print(f"dist-check passed in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
