"""Test the dependency floors: install every ``>=`` floor of ``pyproject.toml`` exactly and run the core tests.

``make floors-check`` (called from ``.ci/run``) runs this. It reads the floors from ``pyproject.toml`` itself (the
project's dependencies and the ``dev`` extra's, which include the optional libraries), so the floors written there
are the versions tested: raising or lowering one there changes what this installs. ``torch`` is the exception: its
floor is a CUDA build of several GB, so the check installs ``--torch`` (the CPU build in CI) and the floor of torch
is documented with the run that tested it (``docs/benchmarks.md``, "Dependency floors").

Example::

    python tools/floors_check.py                       # a fresh venv in a temporary folder, removed afterwards
    python tools/floors_check.py --keep /tmp/floors    # keep it; --tests to run other test files
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import tomllib
from check_venv import ROOT, CheckFailed, fresh_venv, run, work_folder

# the core of the pack against the oldest libraries: strategies, CLI and recipes, memory, models, export, data,
# 8-bit and compressed state, the update in backward, DDP and FSDP2
TESTS = [
    "tests/test_badam_strategy.py",
    "tests/test_cli.py",
    "tests/test_recipes.py",
    "tests/test_memory.py",
    "tests/test_lm.py",
    "tests/test_export.py",
    "tests/test_instruct_data.py",
    "tests/test_eight_bit.py",
    "tests/test_compressed_state.py",
    "tests/test_torchao_state.py",
    "tests/test_fused_update.py",
    "tests/test_ddp.py",
    "tests/test_fsdp.py",
]
# tools of the test run, not of the pack: their newest releases are fine
UNPINNED = {"pytest", "pytest-xdist", "ruff", "mypy", "build", "twine", "mkdocs", "mkdocs-material"}
UNPINNED |= {"mkdocstrings", "mkdocstrings-python"}


def floors(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """``{distribution: floor}`` for every ``name>=X`` requirement of the project and of its ``dev`` extra (the
    extras it names included), except torch and the test tools.

    Example::

        >>> floors()["lightning"]  # doctest: +SKIP
        '2.6.0'
    """
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    extras = project.get("optional-dependencies", {})
    requirements = list(project["dependencies"])
    pending, seen = ["dev"], set()
    while pending:
        extra = pending.pop()
        seen.add(extra)
        for requirement in extras.get(extra, []):
            own = re.fullmatch(rf"{re.escape(project['name'])}\[([\w,-]+)\]", requirement)
            if own:
                pending += [e for e in own.group(1).split(",") if e not in seen]
            else:
                requirements.append(requirement)
    found: dict[str, str] = {}
    for requirement in requirements:
        match = re.match(r"([A-Za-z0-9_.-]+)(\[[\w,-]+\])?\s*>=\s*([\w.]+)", requirement)
        if match is None:
            raise SystemExit(f"floors-check: {requirement!r} in pyproject.toml has no `>=` floor")
        name = match.group(1).lower()
        if name != "torch" and name not in UNPINNED:
            found[name + (match.group(2) or "")] = match.group(3)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch", default="torch==2.13.0", help="the torch requirement (default: the CPU build)")
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it")
    parser.add_argument("--tests", nargs="*", default=TESTS, help="test files to run against the floors")
    args = parser.parse_args(argv)
    pins = [f"{name}=={version}" for name, version in sorted(floors().items())]
    started = time.perf_counter()
    try:
        with work_folder(args.keep, prefix="lightning-memopt-floors-") as work:
            print(f"floors-check in {work}: {args.torch} {' '.join(pins)}", flush=True)
            python, pip = fresh_venv(work, args.torch)
            run([*pip, *pins, "pytest", "pytest-xdist"], cwd=work, label="install the floors")
            run([*pip, "--no-deps", "-e", str(ROOT)], cwd=work, label="install the project")
            # pip check: the floors are consistent with each other and with what the project asks for
            run([python, "-m", "pip", "check"], cwd=work, label="pip check")
            pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup"]
            run([*pytest, *args.tests], cwd=ROOT, label=f"pytest {len(args.tests)} files against the floors")
    except CheckFailed as error:
        print(f"floors-check FAILED: {error}", file=sys.stderr)
        return 1
    print(f"floors-check passed in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
