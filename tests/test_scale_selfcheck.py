"""`bench scale` (real training next to the estimate, refusing what would not fit) and the GPU self-check's code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lightning_memopt.bench.scale import ScaleConfig, available_memory, run_scale
from lightning_memopt.selfcheck import CHECKS, main, run_checks

TINY_PRESET = "llama-3.2-1b"  # its width and vocabulary, two layers: 0.38 B parameters, ~2 GB per row


def test_scale_trains_a_real_shape_and_reports_the_peak_next_to_the_estimate(tmp_path):
    config = ScaleConfig(model=TINY_PRESET, layers=2, seq_len=16, steps=3, every=2)
    results = run_scale(["badam", "badam-fused"], config, tmp_path)
    assert not results["failed"] and not results["refused"]
    for row in results["rows"]:
        est = row["estimate"]
        # the model state the estimate names is what MemoryReport accounted in that run, to the byte
        for key in ("weights", "buffers", "masters", "grads", "optimizer_state"):
            assert row["accounted"][key] == est[key], (row["method"], key)
        assert row["params"] == 2 * 128256 * 2048 // 2 + 2 * 60_821_504 + 2048  # tied head, 2 layers, final norm
        assert row["blocks_visited"] == [0, 1]  # the switch is included
        measured = row["peak_above_baseline"]
        # the estimate within 35% of the measured CPU peak (the interpreter's own growth is in the measurement)
        assert measured > 0 and abs(est["total"] - measured) / measured < 0.35, (est["total"], measured)
    fused, plain = (r for r in sorted(results["rows"], key=lambda r: r["method"], reverse=True))
    assert plain["method"] == "badam" and fused["estimate"]["grads"] == 0 < plain["estimate"]["grads"]
    assert "| badam |" in (tmp_path / "scale.md").read_text()
    assert json.loads((tmp_path / "scale.json").read_text())["rows"]


def test_scale_refuses_a_row_that_would_not_fit(tmp_path):
    config = ScaleConfig(model="llama-3-8b", memory_limit=10 * 2**30)
    results = run_scale(["badam"], config, tmp_path)
    assert not results["rows"]
    (refused,) = results["refused"]
    assert "refused" in refused["reason"] and "10.00 GiB is free" in refused["reason"]
    assert refused["estimate"]["weights"] == 2 * 8_030_261_248
    assert available_memory() is None or available_memory() > 0


def test_scale_command_line_refuses_with_exit_code_1(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "lightning_memopt.bench", "scale", "--memory-limit", "1GB", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1
    assert "to keep the machine from running out of memory" in done.stdout


def test_selfcheck_without_cuda_says_what_it_would_run(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the listing is for machines without it")
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "No CUDA device" in out
    for name in CHECKS:
        assert name in out


def test_selfcheck_checks_run_on_a_tiny_model():
    results = run_checks(tiny=True, only=["peak", "speed", "fp16"])
    checks = results["checks"]
    assert all(c["ok"] for c in checks.values()), checks
    assert checks["peak"]["estimate_bytes"] > 0
    assert checks["speed"]["ratio"] > 0
    assert len(checks["fp16"]["losses"]) == 4 and checks["fp16"]["max_weight_change"] > 0


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_selfcheck_distributed_check_runs_two_ranks(kind):
    result = run_checks(tiny=True, only=[kind])["checks"][kind]
    assert result["ok"], result
    assert result["max_rank_difference"] == 0.0
