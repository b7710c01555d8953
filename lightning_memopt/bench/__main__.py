"""``python -m lightning_memopt.bench``: the memory/time/loss matrix, or ``comm`` for the communication benchmark.

Usage::

    python -m lightning_memopt.bench                       # every method, ~100 M-parameter Llama, D = 32
    python -m lightning_memopt.bench --methods adamw-mixed,badam --layers 8 --hidden 256 --steps 20 --out out/
    python -m lightning_memopt.bench --list                # the methods and whether they can run
    python -m lightning_memopt.bench comm                  # bytes all-reduced per step, BAdam DDP vs DDP (2 gloo ranks)
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_memopt.bench.config import BenchConfig


def _matrix_parser() -> argparse.ArgumentParser:
    from lightning_memopt.bench.methods import DEFAULT_METHODS

    parser = argparse.ArgumentParser(
        prog="python -m lightning_memopt.bench",
        description="Run memory-efficient fine-tuning methods side by side, each in a fresh process, and write "
        "results.json, results.md and plots. `python -m lightning_memopt.bench comm --help` for the communication "
        "benchmark.",
    )
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated rows (see --list)")
    parser.add_argument("--out", type=Path, default=Path("bench_results"), help="output directory")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before a method's run is abandoned")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--list", action="store_true", help="list the methods and exit")
    parser.add_argument("--comm", action="store_true", help="run the communication benchmark instead (as `comm`)")
    BenchConfig.add_arguments(parser)
    return parser


def _comm_parser() -> argparse.ArgumentParser:
    from lightning_memopt.bench.comm import COMM_METHODS

    parser = argparse.ArgumentParser(
        prog="python -m lightning_memopt.bench comm",
        description="Bytes all-reduced per optimizer step: BAdamDDPStrategy vs Lightning's DDP with AdamW, on two "
        "CPU processes (gloo). Writes comm.json, comm.md and comm.png.",
    )
    parser.add_argument("--methods", default=",".join(COMM_METHODS), help=f"comma-separated: {', '.join(COMM_METHODS)}")
    parser.add_argument("--out", type=Path, default=Path("bench_results"), help="output directory")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before a method's run is abandoned")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    BenchConfig.add_arguments(parser)
    # the traffic is the same every step: a few steps suffice
    parser.set_defaults(steps=4, warmup=0)
    return parser


def _worker(argv: Sequence[str], comm: bool) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_memopt.bench " + ("comm-worker" if comm else "worker"))
    parser.add_argument("--method", required=True)
    parser.add_argument("--config", required=True, help="BenchConfig as JSON")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    config = BenchConfig.from_json(args.config)
    if comm:
        from lightning_memopt.bench.comm import COMM_METHODS, run_comm_worker

        run_comm_worker(COMM_METHODS[args.method], config, args.out)
    else:
        from lightning_memopt.bench.methods import METHODS
        from lightning_memopt.bench.worker import run_method

        run_method(METHODS[args.method], config, args.out)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (1 if a method failed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python -m lightning_memopt.bench " + shlex.join(argv)
    if argv and argv[0] in ("worker", "comm-worker"):
        _worker(argv[1:], comm=argv[0] == "comm-worker")
        return 0
    if (argv and argv[0] == "comm") or "--comm" in argv:
        from lightning_memopt.bench.comm import run_comm

        argv = [a for a in argv if a not in ("comm", "--comm")]
        args = _comm_parser().parse_args(argv)
        results = run_comm(
            BenchConfig.from_args(args),
            args.out,
            [m.strip() for m in args.methods.split(",") if m.strip()],
            progress=not args.no_progress,
            timeout_s=args.timeout,
            command=command,
        )
        print(f"wrote {args.out / 'comm.json'}, {args.out / 'comm.md'}, {args.out / 'comm.png'}")
        return 1 if results["failed"] else 0

    from lightning_memopt.bench.matrix import run_matrix
    from lightning_memopt.bench.methods import METHODS, select

    args = _matrix_parser().parse_args(argv)
    if args.list:
        for method in METHODS.values():
            missing = method.missing()
            state = "ready" if not missing else "skipped until lightning_memopt.callbacks has " + ", ".join(missing)
            print(f"{method.name:22} {method.label:45} {state}")
        return 0
    results = run_matrix(
        select(args.methods.split(",")),
        BenchConfig.from_args(args),
        args.out,
        progress=not args.no_progress,
        timeout_s=args.timeout,
        command=command,
    )
    print((args.out / "results.md").read_text())
    failed = [s for s in results["skipped"] if "(not there yet)" not in s["reason"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
