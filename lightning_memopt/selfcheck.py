"""``python -m lightning_memopt.selfcheck`` (``make selfcheck``): the GPU checks, in a few minutes, as a table and JSON.

On a CUDA machine it runs:

1. **peak vs estimate**: a few BAdam steps of a ~1 B-parameter Llama (Llama 3.2-1B's shape, random bf16 weights,
   sequence 1024, batch 1): ``torch.cuda.max_memory_allocated`` next to ``lightning-memopt estimate``'s total;
2. **step time**: BAdam vs AdamW, both ``bf16-true``, median step time and their ratio;
3. **16-true**: BAdam with ``16-true`` (dynamic loss scaling on the FP32 masters) trains: finite loss, weights moved,
   the scaler's scale reported;
4. with two or more GPUs: ``badam_ddp`` and ``badam_fsdp`` over NCCL (two ranks), ranks' weights identical.

Without CUDA it says what it would run and exits 0. ``--tiny`` runs the same checks on a tiny model on whatever
device there is (CPU here): the checks' code is tested that way; the figures mean nothing.

Example::

    python -m lightning_memopt.selfcheck --json selfcheck.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import torch
from torch.utils.data import DataLoader

__all__ = ["CHECKS", "main", "run_checks"]

CHECKS = {
    "peak": "BAdam on a ~1 B Llama (bf16, seq 1024): CUDA max_memory_allocated vs lightning-memopt estimate",
    "speed": "BAdam vs AdamW step time, bf16-true, same model (ratio)",
    "fp16": "BAdam with 16-true and dynamic loss scaling: trains, scale reported",
    "ddp": "badam_ddp over NCCL on 2 GPUs: ranks identical (needs >= 2 GPUs)",
    "fsdp": "badam_fsdp over NCCL on 2 GPUs: ranks identical (needs >= 2 GPUs)",
}
"""Each check's name and what it measures."""

_GIB = 2**30
_TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}  # fmt: skip


def _model_config(tiny: bool) -> dict[str, Any]:
    from lightning_memopt.estimate import PRESETS

    return dict(_TINY) if tiny else dict(PRESETS["llama-3.2-1b"])


def _loader(vocab: int, seq_len: int, steps: int) -> DataLoader[Any]:
    from lightning_memopt.bench.scale import _RandomTokens

    return DataLoader(_RandomTokens(vocab, seq_len, steps), batch_size=1)


def _train(
    name: str, tiny: bool, device: str, seq_len: int, steps: int, precision: str | None = None
) -> dict[str, Any]:
    """``steps`` optimizer steps of one benchmark row; step times, peak and the module's weights after."""
    from lightning.pytorch import Trainer, seed_everything

    from lightning_memopt import BlockSwitch
    from lightning_memopt.bench.config import BenchConfig
    from lightning_memopt.bench.methods import METHODS
    from lightning_memopt.bench.worker import BenchLM, StepClock

    method = METHODS[name]
    config = _model_config(tiny)
    seed_everything(0)
    model = BenchLM(config, method.optimizer, BenchConfig(lr=1e-4), dtype="bfloat16")
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    clock = StepClock()
    callbacks: list[Any] = [clock]
    if method.badam:
        callbacks.append(BlockSwitch(every=2, order="ascending"))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with TemporaryDirectory() as out:
        trainer = Trainer(
            accelerator="gpu" if device == "cuda" else "cpu",
            devices=1,
            strategy=method.build_strategy(),
            precision=precision or method.precision,  # type: ignore[arg-type]
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
            default_root_dir=out,
        )
        trainer.fit(model, _loader(config["vocab_size"], seq_len, steps))
    moved = max((p.detach().float().cpu() - before[n]).abs().max().item() for n, p in model.named_parameters())
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return {
        "step_times_s": clock.step_times,
        "median_step_s": statistics.median(clock.step_times[1:] or clock.step_times),
        "losses": clock.losses,
        "max_weight_change": moved,
        "peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "scale": float(scaler.get_scale()) if scaler is not None and hasattr(scaler, "get_scale") else None,
    }


def _check_peak(tiny: bool, device: str) -> dict[str, Any]:
    from lightning_memopt.estimate import estimate

    seq_len = 64 if tiny else 1024
    (row,) = estimate(_model_config(tiny), ["badam"], seq_len=seq_len)
    run = _train("badam", tiny, device, seq_len, steps=3)
    measured = run["peak_bytes"]
    error = None if not measured else (row.total - measured) / measured
    return {"estimate_bytes": row.total, "peak_bytes": measured, "estimate_error": error,
            "ok": measured is None or abs(error or 0.0) < 0.25}  # fmt: skip


def _check_speed(tiny: bool, device: str) -> dict[str, Any]:
    seq_len = 64 if tiny else 1024
    badam = _train("badam", tiny, device, seq_len, steps=6)
    adamw = _train("adamw-bf16", tiny, device, seq_len, steps=6)
    ratio = badam["median_step_s"] / adamw["median_step_s"]
    return {"badam_step_s": badam["median_step_s"], "adamw_step_s": adamw["median_step_s"], "ratio": ratio,
            "ok": badam["max_weight_change"] > 0 and adamw["max_weight_change"] > 0}  # fmt: skip


def _check_fp16(tiny: bool, device: str) -> dict[str, Any]:
    import math

    run = _train("badam", tiny, device, 16 if tiny else 512, steps=4, precision="16-true")
    finite = all(math.isfinite(x) for x in run["losses"])
    return {"losses": run["losses"], "scale": run["scale"], "max_weight_change": run["max_weight_change"],
            "ok": finite and run["max_weight_change"] > 0}  # fmt: skip


def _check_distributed(kind: str, tiny: bool) -> dict[str, Any]:
    with TemporaryDirectory() as out:
        command = [sys.executable, "-m", "lightning_memopt.selfcheck", "--distributed-worker", kind, "--out", out]
        if tiny:
            command.append("--tiny")
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        result_file = Path(out) / "result.json"
        if done.returncode != 0 or not result_file.exists():
            return {"ok": False, "error": (done.stderr or done.stdout)[-2000:]}
        result = json.loads(result_file.read_text())
    result["seconds"] = time.perf_counter() - started
    return result


def _distributed_worker(kind: str, tiny: bool, out: Path) -> None:
    """Two NCCL ranks (gloo with ``--tiny`` on CPU) train a few BAdam steps; rank 0 writes whether ranks agree."""
    from lightning.pytorch import Trainer, seed_everything

    from lightning_memopt import BAdamDDPStrategy, BAdamFSDPStrategy, BlockSwitch
    from lightning_memopt.bench.config import BenchConfig
    from lightning_memopt.bench.worker import BenchLM

    cuda = torch.cuda.is_available() and not tiny
    backend = "nccl" if cuda else "gloo"
    strategy = (BAdamDDPStrategy if kind == "ddp" else BAdamFSDPStrategy)(process_group_backend=backend)
    config = _model_config(tiny)
    seed_everything(0)
    model = BenchLM(config, "adamw", BenchConfig(lr=1e-3), dtype="bfloat16")
    trainer = Trainer(
        accelerator="gpu" if cuda else "cpu", devices=2, strategy=strategy, precision="bf16-true", max_steps=4,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[BlockSwitch(every=2, order="ascending")], default_root_dir=out,
    )  # fmt: skip
    trainer.fit(model, _loader(config["vocab_size"], 32, 8))
    local = torch.cat([_full(p).detach().float().flatten().cpu() for p in model.parameters()])
    gathered = trainer.strategy.all_gather(local.to(trainer.strategy.root_device))
    if trainer.is_global_zero:
        difference = (gathered[0] - gathered[1]).abs().max().item()
        (out / "result.json").write_text(json.dumps({"max_rank_difference": difference, "ok": difference == 0.0}))


def _full(param: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(param, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else param


def run_checks(tiny: bool = False, only: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the checks this machine can run; returns ``{"device": ..., "checks": {name: result}}``.

    Example::

        results = run_checks(tiny=True, only=["fp16"])  # on CPU: the code path, not the figures
    """
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda and not tiny else "cpu"
    gpus = torch.cuda.device_count() if cuda else 0
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "gpus": gpus,
                               "tiny": tiny, "torch": torch.__version__, "checks": {}}  # fmt: skip
    for name in only or CHECKS:
        if name in ("ddp", "fsdp") and gpus < 2 and not tiny:
            results["checks"][name] = {"skipped": f"needs 2 GPUs, found {gpus}"}
            continue
        started = time.perf_counter()
        try:
            if name == "peak":
                result = _check_peak(tiny, device)
            elif name == "speed":
                result = _check_speed(tiny, device)
            elif name == "fp16":
                result = _check_fp16(tiny, device)
            else:
                result = _check_distributed(name, tiny)
        except Exception as err:  # a failed check is reported, the others still run
            result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        result["seconds"] = time.perf_counter() - started
        results["checks"][name] = result
    return results


def format_results(results: dict[str, Any]) -> str:
    """The table ``selfcheck`` prints."""
    lines = [f"lightning-memopt selfcheck on {results['device']} ({results['gpus']} GPUs, torch {results['torch']})"]
    for name, r in results["checks"].items():
        if "skipped" in r:
            lines.append(f"  {name:6} skipped: {r['skipped']}")
            continue
        status = "ok" if r.get("ok") else "FAILED"
        if name == "peak" and r.get("peak_bytes"):
            detail = (f"peak {r['peak_bytes'] / _GIB:.2f} GiB, estimate {r['estimate_bytes'] / _GIB:.2f} GiB "
                      f"({r['estimate_error']:+.1%})")  # fmt: skip
        elif name == "peak":
            detail = f"estimate {r.get('estimate_bytes', 0) / _GIB:.2f} GiB (no CUDA peak on this device)"
        elif name == "speed" and "ratio" in r:
            detail = (
                f"BAdam {r['badam_step_s']:.3f} s, AdamW {r['adamw_step_s']:.3f} s per step: ratio {r['ratio']:.2f}"
            )
        elif name == "fp16" and "scale" in r:
            detail = f"losses {', '.join(f'{x:.3f}' for x in r['losses'])}; scale {r['scale']}"
        elif "max_rank_difference" in r:
            detail = f"max difference between ranks {r['max_rank_difference']}"
        else:
            detail = r.get("error", "")
        lines.append(f"  {name:6} {status:6} {detail} [{r['seconds']:.0f} s]")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; 0 when every check that ran passed (or nothing could run: no CUDA)."""
    parser = argparse.ArgumentParser(prog="python -m lightning_memopt.selfcheck", description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on any device: tests the checks' code")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated: {', '.join(CHECKS)}")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--distributed-worker", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.distributed_worker:
        _distributed_worker(args.distributed_worker, args.tiny, args.out)
        return 0
    only = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in only if c not in CHECKS]
    if unknown:
        parser.error(f"unknown check {unknown[0]!r}; choose from {', '.join(CHECKS)}")
    if not torch.cuda.is_available() and not args.tiny:
        print("No CUDA device here: nothing to check. On a CUDA machine this runs:")
        for name in only:
            print(f"  {name:6} {CHECKS[name]}")
        print("(`--tiny` runs the same checks on a tiny model on this device, to test them.)")
        return 0
    results = run_checks(tiny=args.tiny, only=only)
    print(format_results(results))
    print(json.dumps(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r.get("ok", True) for r in results["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
