"""The fine-tuning benchmark: its task and base are built from local text and split by module, and ``--quick`` runs
the whole pipeline (fresh process per row, equal-time reruns, results and plots). Figures are not checked here: the
targets live in the benchmark's results, never in timed tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from lightning_memopt.bench.finetune import FT_METHODS
from lightning_memopt.bench.finetune_data import TEST_MODULES, TaskConfig, make_task, pretraining_files

pytestmark = pytest.mark.slow


def test_the_task_is_split_by_module_and_held_out_code_is_not_pretrained(tmp_path: Path) -> None:
    info = make_task(tmp_path, TaskConfig())
    splits = ("train", "val", "test")
    records = {s: [json.loads(x) for x in Path(info["dir"], f"{s}.jsonl").read_text().splitlines()] for s in splits}
    modules = {
        split: {r["instruction"].rsplit("(module ", 1)[1].rstrip(").") for r in records[split]} for split in splits
    }
    assert modules["test"] <= set(TEST_MODULES) and modules["test"]
    assert not modules["train"] & modules["test"] and not modules["train"] & modules["val"]
    assert info["train"] > 1000 and info["test"] > 200 and info["val"] > 100
    assert all(80 <= len(r["output"].encode()) <= 300 and r["output"].startswith(("def ", "async def ")) for r in
               records["test"])  # fmt: skip
    assert make_task(tmp_path, TaskConfig()) == info  # built once, then read back
    moved = tmp_path / "moved"
    moved.mkdir()
    built = Path(info["dir"])
    built.rename(moved / built.name)  # a cache moved elsewhere is found where it is now
    assert make_task(moved, TaskConfig()) == {**info, "dir": str(moved / built.name)}
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    top_level = {Path(p).relative_to(stdlib).parts[0].removesuffix(".py") for p in pretraining_files()}
    assert not top_level & set(TEST_MODULES)
    assert {"os", "json", "email"} <= top_level


def test_quick_run_writes_results_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "LIGHTNING_MEMOPT_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "lightning_memopt.bench", "finetune", "--quick", "--seeds", "0", "--out", str(out)]
    command += ["--methods", "adamw-mixed,lora-r8,badam", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["adamw-mixed", "lora-r8", "badam"]
    assert not results["failed"]
    base = results["base"]
    assert Path(base["dir"], "config.json").is_file() and base["parameters"] > 0
    for row in results["rows"]:
        for key in ("base_loss", "final_loss", "final_loss_equal_time", "peak_bytes", "step_time_s"):
            assert isinstance(row[key], float | int), (row["method"], key)
        (seed,) = row["per_seed"]
        assert seed["curve"][0]["step"] == 0 and seed["curve"][-1]["step"] == results["config"]["steps"]
        assert row["base_loss"] == pytest.approx(results["rows"][0]["base_loss"], rel=1e-3)  # the same base
    adam, lora, _ = results["rows"]
    assert adam["final_loss"] < adam["base_loss"]  # four AdamW steps at the row's lr on a tiny model move it
    assert lora["trainable_params"] < adam["trainable_params"]
    assert adam["final_loss_equal_time"] == adam["final_loss"]  # the reference defines the time budget
    assert {t["target"] for t in results["targets"]} >= {"gain_vs_adam_equal_steps", "peak_vs_adam"}
    assert "| AdamW (bf16-mixed) |" in (out / "results.md").read_text()
    assert (out / "finetune_loss_steps.png").stat().st_size > 0 and (out / "finetune_loss_time.png").stat().st_size > 0

    # --resume: the finished rows are kept (their runs untouched); a row whose record is gone runs again
    logs = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("log.txt")}
    assert len(logs) >= 3 and all(p.with_name("done.json").is_file() for p in logs)
    lora_log = out / "runs" / "lora-r8" / "seed0" / "log.txt"
    lora_log.with_name("done.json").unlink()
    result = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    again = json.loads((out / "results.json").read_text())
    rerun = {p for p, mtime in logs.items() if p.stat().st_mtime_ns != mtime}
    # LoRA's equal-time rerun may follow it: its number of steps comes from the new run's step time
    assert lora_log in rerun and rerun <= {lora_log, lora_log.parents[1] / "seed0-equal-time" / "log.txt"}
    for before, after in zip(results["rows"], again["rows"], strict=True):
        if before["method"] != "lora-r8":
            assert after["per_seed"] == before["per_seed"]
    assert again["rows"][1]["trainable_params"] == lora["trainable_params"]


def test_fp32_runs_the_base_and_every_row_in_32_true(tmp_path: Path) -> None:
    from dataclasses import replace

    from lightning_memopt.bench.finetune import FinetuneConfig
    from lightning_memopt.bench.finetune_data import BaseConfig

    # a bf16 base cached before the option existed keeps its key; an FP32 one is another base
    assert BaseConfig().key() == BaseConfig(precision="bf16-mixed").key() != BaseConfig(precision="32-true").key()
    assert FinetuneConfig().for_method(FT_METHODS["lomo"]).precision == "bf16-true"
    out = tmp_path / "out"
    env = {**os.environ, "LIGHTNING_MEMOPT_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "lightning_memopt.bench", "finetune", "--quick", "--fp32", "--seeds", "0"]
    command += ["--out", str(out), "--methods", "adamw-mixed,lora-r8,badam-fused", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["base"]["config"]["precision"] == "32-true" and not results["failed"]
    labels = [r["label"] for r in results["rows"]]
    assert labels == ["AdamW (32-true)", "LoRA r=8, all linear (32-true base)", "BAdam, update in backward (32-true)"]
    for row in results["rows"]:
        assert row["precision"] == "32-true"
        # what the run held, not what it was told: 4 bytes per weight (bf16 would be 2), no masters to keep
        weights = row["memory"]["weights"]
        if row["kind"] == "lora":
            assert weights >= 4 * results["base"]["parameters"]
        else:
            assert weights == 4 * results["base"]["parameters"] and row["memory"]["masters"] == 0
    assert results["rows"][2]["memory"]["grads"] == 0  # the update in backward holds no gradient buffer
    assert "| AdamW (32-true) |" in (out / "results.md").read_text()
    config = replace(FinetuneConfig(), precision="32-true")
    assert config.for_method(FT_METHODS["badam"]).label == "BAdam + AdamW (32-true)"


def test_quick_sweep_reads_the_validation_split_and_keeps_the_best_setting(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    env = {**os.environ, "LIGHTNING_MEMOPT_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "lightning_memopt.bench", "finetune", "--quick", "--sweep", "--seeds", "0"]
    command += ["--methods", "badam,adamw-mixed", "--lr-factors", "1,10", "--everys", "1,2", "--jobs", "2"]
    command += ["--base-hidden", "64", "--gradient-checkpointing", "--out", str(out), "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["config"]["split"] == "val" and not sweep["failed"]
    # --base-hidden: the quick base (width 32) at width 64, pretrained for this sweep
    assert {k: sweep["base"]["config"][k] for k in ("hidden", "intermediate", "heads")} == {
        "hidden": 64, "intermediate": 176, "heads": 2}  # fmt: skip
    assert sweep["config"]["base"]["hidden"] == 64 and sweep["base"]["parameters"] > 0
    assert sweep["config"]["gradient_checkpointing"] is True  # every run recomputed its activations
    settings = [(r["method"], r["lr"], r["every"]) for r in sweep["runs"]]
    # BAdam: every lr factor x every K; AdamW: every lr factor (no K)
    badam, adam = FT_METHODS["badam"].lr, FT_METHODS["adamw-mixed"].lr
    expected = [("badam", badam, 1), ("badam", badam, 2), ("badam", 10 * badam, 1), ("badam", 10 * badam, 2),
                ("adamw-mixed", adam, None), ("adamw-mixed", 10 * adam, None)]  # fmt: skip
    assert [(m, pytest.approx(lr, rel=1e-3), k) for m, lr, k in expected] == settings
    for method in ("badam", "adamw-mixed"):
        losses = [r["final_loss"] for r in sweep["runs"] if r["method"] == method]
        assert sweep["best"][method]["final_loss"] == min(losses)
    # every run starts from the same base on the same (validation) samples, and the settings change the outcome
    assert all(r["base_loss"] == pytest.approx(sweep["runs"][0]["base_loss"], rel=1e-3) for r in sweep["runs"])
    assert len({round(r["final_loss"], 6) for r in sweep["runs"]}) == len(settings)
    table = (out / "sweep.md").read_text()
    assert "**best**" in table and "validation" in table


def test_a_base_width_that_is_not_a_multiple_of_the_head_size_is_refused() -> None:
    from lightning_memopt.bench.__main__ import _finetune

    with pytest.raises(SystemExit, match="--base-hidden must be a positive multiple of 32"):
        _finetune(["--quick", "--base-hidden", "50"], "test")


def test_a_diverged_base_is_refused_and_not_cached(tmp_path: Path) -> None:
    from lightning_memopt.bench.finetune_data import BaseConfig, make_base

    tiny = dict(layers=2, hidden=32, intermediate=64, heads=2, context=128, steps=6, seq_len=32, batch_size=4)
    diverging = BaseConfig(**tiny, lr=1e6, clip=0.0, max_bytes=100_000)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"diverged.*nothing was cached"):
        make_base(tmp_path, diverging, progress=False)
    assert not any(tmp_path.iterdir())
