"""A BAdam run killed with SIGKILL, again and again, and resumed from `last.ckpt` ends bit-identical to one that never
stopped; a checkpoint file is never left half-written.

The killed runs are real processes (`tests/crash_resume_run.py`) killed at a point they announce: in the middle of a
block, right after a block switch, and halfway through writing `last.ckpt`. Each start costs a few seconds.
"""

from __future__ import annotations

import doctest
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from crash_resume_run import EVERY, MARKER, MAX_STEPS, train
from lightning.pytorch.plugins.io import TorchCheckpointIO

import lightning_memopt.checkpoint_io
from lightning_memopt import BAdamDDPStrategy, BAdamFSDPStrategy, BAdamStrategy
from lightning_memopt.checkpoint_io import AtomicCheckpointIO

SCRIPT = Path(__file__).parent / "crash_resume_run.py"


def _kill_when_stopped(root: Path, stop: str, resume: bool) -> dict[str, Any]:
    """Runs the script until it reports `stop`, SIGKILLs it there and returns what it reported."""
    marker = root / MARKER
    marker.unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    log = root / f"log-{stop.replace(':', '-')}.txt"
    command = [sys.executable, str(SCRIPT), "--root", str(root), "--stop", stop, *(["--resume"] if resume else [])]
    with open(log, "w") as f:
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while not marker.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the run never reached {stop} (exit code {proc.poll()}):\n{log.read_text()[-3000:]}")
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return json.loads(marker.read_text())


def _step_of(path: Path) -> int:
    return int(torch.load(path, weights_only=True, map_location="cpu")["global_step"])


def _assert_same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(a, b), f"{where}: max abs diff {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: {sorted(a)} != {sorted(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_sigkilled_runs_resume_bit_identical_and_no_checkpoint_is_half_written(tmp_path):
    reference = train(tmp_path / "reference")
    block_at = dict(reference["blocks"])  # global step -> block trained in that step
    assert len(set(block_at.values())) == 3, block_at  # the run visits every block

    root = tmp_path / "crashing"
    checkpoints = root / "checkpoints"
    last = checkpoints / "last.ckpt"

    # 1. killed in the middle of a block (steps 3-5 train one block): the last checkpoint is step 4's
    seen = _kill_when_stopped(root, "batch_end:5", resume=False)
    assert seen["active_block"] == block_at[4] == block_at[5]
    assert _step_of(last) == 4

    # 2. resumed from step 4, killed right after the switch to the third block, before that step ran
    seen = _kill_when_stopped(root, "batch_start:6", resume=True)
    assert seen["active_block"] == block_at[6] != block_at[5]
    assert _step_of(last) == 6

    # 3. resumed from step 6, killed halfway through writing last.ckpt at step 8
    seen = _kill_when_stopped(root, "writing:8", resume=True)
    partial = Path(seen["file"])
    assert partial.parent == checkpoints and partial.name.startswith(".last.ckpt.") and partial.exists()
    assert 0 < partial.stat().st_size < seen["size"]  # the kill really came in the middle of the write
    assert _step_of(last) == 6  # the previous last.ckpt, whole
    assert _step_of(checkpoints / "step=8.ckpt") == 8  # written (completely) before last.ckpt

    # 4. resumed once more, from step 6: the end equals the run that never stopped
    resumed = train(root, resume=True)
    assert resumed["blocks"] == [(s, b) for s, b in reference["blocks"] if s >= 6]
    for key in ("global_step", "weights", "masters", "optimizer", "switch"):
        _assert_same(reference[key], resumed[key], key)
    assert resumed["global_step"] == MAX_STEPS and MAX_STEPS > 2 * EVERY

    # every checkpoint on disk is complete, and the killed writer's leftover was removed by the next save
    assert not list(checkpoints.glob(".*.partial"))
    files = sorted(p.name for p in checkpoints.glob("*.ckpt"))
    assert files == ["last.ckpt", *(f"step={s}.ckpt" for s in (10, 2, 4, 6, 8))]
    for name in files:
        torch.load(checkpoints / name, weights_only=True, map_location="cpu")


def test_badam_strategies_write_checkpoints_atomically_unless_told_otherwise():
    assert type(BAdamStrategy().checkpoint_io) is AtomicCheckpointIO
    assert type(BAdamDDPStrategy().checkpoint_io) is AtomicCheckpointIO
    assert type(BAdamFSDPStrategy().checkpoint_io) is AtomicCheckpointIO  # rank 0 writes the consolidated file
    mine = TorchCheckpointIO()
    assert BAdamStrategy(checkpoint_io=mine).checkpoint_io is mine
    assert BAdamFSDPStrategy(checkpoint_io=mine).checkpoint_io is mine


def test_atomic_checkpoint_io_replaces_the_file_in_one_step(tmp_path, monkeypatch):
    # with the system temporary directory on another filesystem Lightning's move becomes a copy into the target;
    # AtomicCheckpointIO never uses it
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))
    path = tmp_path / "deep" / "dir" / "model.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.ones(3), "step": 1}, path)
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace

    def recording_replace(src, dst):
        replaced.append((Path(src).name, Path(dst).name))
        assert torch.load(src, weights_only=True)["step"] == 2  # complete before it takes the name
        assert torch.load(dst, weights_only=True)["step"] == 1  # and the old file is whole until then
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    io.save_checkpoint({"w": torch.zeros(3), "step": 2}, path)
    assert len(replaced) == 1 and replaced[0][1] == "model.ckpt" and replaced[0][0].startswith(".model.ckpt.")
    assert io.load_checkpoint(path)["step"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.ckpt"]
    assert not (tmp_path / "elsewhere").exists()


def test_a_failed_write_leaves_the_old_checkpoint_and_no_leftover(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle this"):
        io.save_checkpoint({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_docstring_examples():
    result = doctest.testmod(lightning_memopt.checkpoint_io)
    assert result.attempted > 0 and result.failed == 0
