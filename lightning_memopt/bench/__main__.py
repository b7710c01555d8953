"""``python -m lightning_memopt.bench``: the memory/time/loss matrix, or ``comm`` for the communication benchmark.

Usage::

    python -m lightning_memopt.bench                       # every method, ~100 M-parameter Llama, D = 32
    python -m lightning_memopt.bench --methods adamw-mixed,badam --layers 8 --hidden 256 --steps 20 --out out/
    python -m lightning_memopt.bench --list                # the methods and whether they can run
    python -m lightning_memopt.bench comm                  # bytes all-reduced per step, BAdam DDP vs DDP (2 gloo ranks)
    python -m lightning_memopt.bench finetune --out out/   # fine-tuning a pretrained base: BAdam vs AdamW vs LoRA
    python -m lightning_memopt.bench scale                 # a few BAdam steps of Llama 3-8B's shape vs the estimate
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


def _finetune_parser() -> argparse.ArgumentParser:
    from lightning_memopt.bench.finetune import DEFAULT_FT_METHODS, FT_METHODS

    parser = argparse.ArgumentParser(
        prog="python -m lightning_memopt.bench finetune",
        description="Fine-tune one pretrained base (cached) on an instruction task with every method, each seed in "
        "a fresh process; held-out loss at equal steps and equal time, memory and step time. Writes results.json, "
        "results.md and plots.",
    )
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_FT_METHODS), help=f"comma-separated: {', '.join(FT_METHODS)}"
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/finetune"), help="output directory")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per row")
    parser.add_argument("--split", choices=["test", "val"], default="test", help="val: for sweeps (default: test)")
    parser.add_argument("--lr", type=float, default=None, help="override every row's learning rate (sweeps)")
    parser.add_argument("--every", type=int, default=None, help="override BAdam's K (sweeps)")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (a minute): checks the pipeline only")
    parser.add_argument("--jobs", type=int, default=1, help="rows run at once, one process each (default: 1)")
    parser.add_argument(
        "--sweep", action="store_true", help="sweep lr (and K) on the validation split instead; writes sweep.json/md"
    )
    parser.add_argument("--lr-factors", default="0.333,1,3", help="--sweep: factors of each row's lr")
    parser.add_argument("--everys", default="", help="--sweep: comma-separated K values for the BAdam rows")
    parser.add_argument(
        "--base-hidden",
        type=int,
        default=None,
        help="the base's width (model-size trend; default 128): MLP 2.75x, heads of 32; pretrained once and cached",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute every row's decoder activations in backward (activations stop dominating the peak)",
    )
    parser.add_argument(
        "--fp32",
        action="store_true",
        help="every row and the base's pretraining in 32-true (a CPU without bf16 matrix units: bf16 is ~35x slower "
        "there); the losses compare the update rules, the memory columns describe FP32 weights",
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds before a run is abandoned")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows that a stopped run with the same settings and --jobs finished in --out; run the rest",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _finetune(argv: Sequence[str], command: str) -> int:
    from dataclasses import replace

    from lightning_memopt.bench.finetune import FT_METHODS, FinetuneConfig, quick_config
    from lightning_memopt.bench.finetune_report import run_finetune, run_finetune_sweep

    args = _finetune_parser().parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {args.jobs}.")
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [n for n in names if n not in FT_METHODS]
    if unknown or not names:
        raise SystemExit(f"Unknown or no --methods {unknown}. Choose from: {', '.join(FT_METHODS)}.")
    config = quick_config() if args.quick else FinetuneConfig()
    config = replace(config, split=args.split, lr=args.lr, every=args.every)
    if args.gradient_checkpointing:
        config = replace(config, gradient_checkpointing=True)
    if args.fp32:
        config = replace(config, precision="32-true", base=replace(config.base, precision="32-true"))
    if args.steps is not None:
        config = replace(config, steps=args.steps)
    if args.base_hidden is not None:
        if args.base_hidden < 32 or args.base_hidden % 32:
            raise SystemExit(f"--base-hidden must be a positive multiple of 32 (heads of 32), got {args.base_hidden}.")
        config = replace(config, base=config.base.with_width(args.base_hidden))
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds:
        raise SystemExit("--seeds is empty: give at least one seed, e.g. --seeds 0.")
    methods = [FT_METHODS[n] for n in names]
    shared = {"jobs": args.jobs, "progress": not args.no_progress, "timeout_s": args.timeout, "command": command,
              "resume": args.resume}  # fmt: skip
    if args.sweep:
        factors = [float(f) for f in args.lr_factors.split(",") if f.strip()]
        everys = [int(k) for k in args.everys.split(",") if k.strip()]
        sweep = run_finetune_sweep(methods, replace(config, lr=None, every=None), args.out, factors, everys, seeds[0],
                                   **shared)  # fmt: skip
        print((args.out / "sweep.md").read_text())
        return 1 if sweep["failed"] else 0
    results = run_finetune(methods, config, args.out, seeds=seeds, **shared)
    print((args.out / "results.md").read_text())
    return 1 if results["failed"] else 0


def _finetune_worker(argv: Sequence[str]) -> None:
    from lightning_memopt.bench.finetune import FT_METHODS, FinetuneConfig, run_finetune_row
    from lightning_memopt.bench.finetune_data import cache_root

    parser = argparse.ArgumentParser(prog="python -m lightning_memopt.bench finetune-worker")
    for name in ("--method", "--config", "--base", "--task", "--out"):
        parser.add_argument(name, required=True)
    args = parser.parse_args(argv)
    config = FinetuneConfig.from_json(args.config)
    run_finetune_row(FT_METHODS[args.method], config, args.base, args.task, Path(args.out), str(cache_root() / "data"))


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
    if argv and argv[0] in ("scale", "scale-worker"):
        from lightning_memopt.bench import scale

        if argv[0] == "scale-worker":
            scale.worker_main(argv[1:])
            return 0
        return scale.main(argv[1:], command)
    if argv and argv[0] == "finetune-worker":
        _finetune_worker(argv[1:])
        return 0
    if argv and argv[0] == "finetune":
        return _finetune(argv[1:], command)
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
