"""The benchmark on a tiny model: the files it writes, the accounting in its rows, targets and skipped rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_memopt.bench import METHODS, BenchConfig, Method, select
from lightning_memopt.bench.report import evaluate_targets, render_markdown
from lightning_memopt.bench.worker import max_switch_jump

TINY = ["--layers", "2", "--hidden", "32", "--steps", "6", "--warmup", "1", "--every", "2"]
TINY += ["--eval-batches", "2", "--max-bytes", "100000", "--memory-every", "2"]


def bench(out: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_memopt.bench", *args, "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.xdist_group("bench")
def test_tiny_benchmark_writes_results_and_accounts_exactly(tmp_path):
    bench(tmp_path, "--methods", "adamw-mixed,adamw-bf16,badam", *TINY)
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == ["adamw-mixed", "adamw-bf16", "badam"]
    for name in ("results.md", "memory.png", "loss.png", "time.png"):
        assert 0 < (tmp_path / name).stat().st_size < 200_000
    for name, row in rows.items():
        for key in ("method", "params", "peak_bytes", "accounted_bytes", "predicted_bytes", "step_time_s"):
            assert row[key] is not None, (name, key)
        assert len(row["loss_curve"]) == 6
        assert row["predicted_bytes"] == row["accounted_bytes"]  # the analytic model is exact here
        assert row["peak_bytes"] > row["accounted_bytes"]
        assert row["step_time_s"] > 0 and row["final_loss"] > 0
        memory_json = json.loads((tmp_path / "runs" / name / "memory.json").read_text())
        assert memory_json["total"] == row["accounted_bytes"]
    params = rows["adamw-mixed"]["params"]
    # mixed precision keeps FP32 weights and gradients; Adam's two moments are FP32 too
    assert rows["adamw-mixed"]["memory"]["weights"] == rows["adamw-mixed"]["memory"]["grads"] == 4 * params
    assert rows["adamw-bf16"]["memory"]["weights"] == rows["adamw-bf16"]["memory"]["grads"] == 2 * params
    badam = rows["badam"]
    active = badam["trained_params"]
    assert badam["blocks"] == 2 and active < params / 2
    assert badam["memory"]["weights"] == 2 * params
    assert badam["memory"]["masters"] == badam["memory"]["grads"] == 4 * active
    assert badam["accounted_bytes"] < rows["adamw-bf16"]["accounted_bytes"]
    assert 0 < badam["strategy_overhead_fraction"] < 1
    assert set(badam["strategy_overhead_s"]) == {"grads_to_masters", "masters_to_weights", "activate"}
    assert badam["active_blocks"][0] == badam["active_blocks"][1] != badam["active_blocks"][2]  # K = 2
    md = (tmp_path / "results.md").read_text()
    assert "## Targets" in md and "BAdam + AdamW (bf16-true)" in md
    targets = {t["key"]: t for t in results["targets"]}
    assert set(targets) == {"accounting", "peak", "peak_process", "step_time", "overhead", "loss"}
    assert all(t["passed"] is not None for t in targets.values())  # every row a target needs was run
    assert results["machine"]["torch"] and results["machine"]["cores"] >= 1


def test_rows_with_missing_features_are_skipped_with_a_note(tmp_path, monkeypatch):
    import lightning_memopt.bench.matrix as matrix

    future = Method(
        "future", "BAdam + NoSuchCallback", "bf16-true", "adamw", kind="badam", callbacks=("NoSuchCallback",)
    )
    assert future.missing() == ["NoSuchCallback"]
    monkeypatch.setattr(matrix, "write_results", lambda results, out: None)
    results = matrix.run_matrix([future], BenchConfig(), tmp_path, progress=False)
    assert results["rows"] == []
    assert "lightning_memopt.callbacks.NoSuchCallback" in results["skipped"][0]["reason"]


def test_method_selection_and_config_validation():
    assert [m.name for m in select(["badam", " adamw-mixed"])] == ["badam", "adamw-mixed"]
    with pytest.raises(ValueError, match="Unknown method 'adam'"):
        select(["adam"])
    with pytest.raises(ValueError, match="warmup"):
        BenchConfig(steps=3, warmup=3)
    with pytest.raises(ValueError, match="optimizer"):
        Method("x", "x", "bf16-true", "lion")
    assert {"adamw-32", "adamw-mixed", "adamw-bf16", "adamw8bit", "adafactor", "badam", "block-sgd"} <= set(METHODS)
    assert BenchConfig().model_config()["num_hidden_layers"] == 32


def _row(method, **values):
    row = {
        "method": method,
        "label": method,
        "params": 1000,
        "blocks": None,
        "memory": {"buffers": 0},
        "accounted_bytes": 0,
        "peak_bytes": 1,
        "peak_above_start_bytes": 1,
        "step_time_s": 1.0,
        "final_loss": 3.0,
        "strategy_overhead_fraction": None,
        "loss_curve": [3.0],
    }
    row.update(values)
    return row


def test_targets_pass_and_miss():
    rows = [
        _row("adamw-mixed", peak_above_start_bytes=1000, peak_bytes=1500, final_loss=3.0),
        _row("adamw-bf16", step_time_s=1.0),
        _row(
            "badam",
            blocks=10,
            accounted_bytes=2 * 1000 + 1600,  # exactly 2M + 16M/D
            peak_above_start_bytes=400,  # 0.4 x: a miss
            peak_bytes=420,  # 0.28 x of the whole process: a pass
            step_time_s=0.5,
            strategy_overhead_fraction=0.01,
            final_loss=3.1,
            strategy_overhead_s={"activate": 0.1},
        ),
    ]
    verdicts = {t["key"]: t["passed"] for t in evaluate_targets(rows)}
    assert verdicts == {
        "accounting": True,
        "peak": False,
        "peak_process": True,
        "step_time": True,
        "overhead": True,
        "loss": True,
    }
    md = render_markdown(
        {
            "rows": [{**r, "formula": None, "formula_bytes": None, "predicted_bytes": 0} for r in rows],
            "config": {**BenchConfig().__dict__},
            "model": BenchConfig().model_config(),
            "machine": {
                "cpu": "x",
                "cores": 2,
                "torch": "t",
                "lightning": "l",
                "transformers": "t",
                "bitsandbytes": "b",
            },
            "skipped": [{"method": "m", "label": "M", "reason": "needs X"}],
        }
    )
    assert "**miss**" in md and "**pass**" in md and "needs X" in md


def test_max_switch_jump():
    losses = [3.0, 2.9, 3.5, 3.1, 2.8, 2.7, 2.6, 3.0]
    assert max_switch_jump(losses, [0, 0, 1, 1, 1, 1, 1, 2], window=5) == pytest.approx(0.6)
    assert max_switch_jump(losses, [0] * 8) is None


@pytest.mark.slow
@pytest.mark.xdist_group("ddp")  # two gloo processes per method: one launch at a time
def test_comm_benchmark_counts_all_reduced_bytes(tmp_path):
    bench(tmp_path, "comm", "--methods", "ddp-mixed,badam-ddp", "--layers", "2", "--hidden", "32", "--steps", "2")
    results = json.loads((tmp_path / "comm.json").read_text())
    rows = {r["method"]: r for r in results["rows"]}
    ddp, badam = rows["ddp-mixed"], rows["badam-ddp"]
    assert ddp["world_size"] == badam["world_size"] == 2
    # plain DDP all-reduces every FP32 gradient each step; BAdam only the active block's FP32 master gradients
    assert ddp["step_bytes"] == [4 * ddp["params"]] * 2
    assert badam["step_bytes"] == [4 * badam["active_block_params"]] * 2
    assert badam["bytes_per_step"] < ddp["bytes_per_step"] / 2
    assert (tmp_path / "comm.png").stat().st_size < 200_000
    assert "| BAdamDDPStrategy" in (tmp_path / "comm.md").read_text()


@pytest.mark.parametrize("name", ["config", "methods", "report", "worker", "comm"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"lightning_memopt.bench.{name}"), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_update_in_backward_rows_pick_their_strategy():
    from lightning_memopt import BAdamDDPStrategy, BAdamStrategy
    from lightning_memopt.bench.finetune import FT_METHODS

    assert METHODS["lomo"].build_strategy() == "fused_update"
    assert METHODS["adamw-bf16"].build_strategy() == "auto"
    fused = METHODS["badam-fused"].build_strategy()
    assert isinstance(fused, BAdamStrategy) and fused.fused_update
    assert not METHODS["badam"].build_strategy().fused_update
    ddp = METHODS["badam-fused"].build_strategy(devices=2)
    assert isinstance(ddp, BAdamDDPStrategy) and ddp.fused_update
    with pytest.raises(ValueError, match="fused_update runs on one device"):
        METHODS["lomo"].build_strategy(devices=2)
    assert FT_METHODS["badam-fused"].build_strategy().fused_update
    with pytest.raises(ValueError, match="full and BAdam rows"):
        Method("x", "x", "bf16-true", kind="lora", fused=True)
