"""BAdamDDPStrategy with two real gloo processes, one of which dies or hangs: the run ends with a clear error.

Without a bound, a rank waiting in an all-reduce for a peer that will never come waits for the process group timeout
(30 minutes by default); a peer that hangs outside a collective would even outlive the others. Each launch takes
about 10-20 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "rank_death_run.py"
# the run's BAdamDDPStrategy(timeout=timedelta(seconds=45)); it also bounds how long rank 0 waits for rank 1 to start
# (importing torch, Lightning and transformers), which takes 5-10 s on an idle 2-core machine and several times that
# when the other tests keep both cores busy: 45 s leaves room for that, and a hang still costs under a minute
TIMEOUT_S = 45
BOUND_S = 300  # two slow start-ups, three steps, the timeout and the teardown; the default timeout is 1800 s

pytestmark = pytest.mark.xdist_group("ddp")  # one DDP launch at a time: they each want both cores


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _launch(out: Path, mode: str) -> tuple[int, float, str, int]:
    """Runs the script; returns its exit code, its duration, its output and rank 1's PID."""
    log = out / "output.txt"
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "w") as f:
        # output to a file, not a pipe: a leftover rank holding the pipe open would make a pipe reader wait for it
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--out", str(out), "--mode", mode, "--timeout", str(TIMEOUT_S)],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
        try:
            code = proc.wait(timeout=BOUND_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = None
    elapsed = time.monotonic() - start
    pid_file = out / "rank1.pid"
    pid = int(pid_file.read_text()) if pid_file.exists() else -1
    if code is None:
        if pid > 0 and _alive(pid):
            os.kill(pid, 9)
        pytest.fail(f"the launch did not end within {BOUND_S} s:\n{log.read_text()[-3000:]}")
    return code, elapsed, log.read_text(), pid


@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_a_lost_rank_stops_the_run_with_a_clear_error(tmp_path, mode):
    code, elapsed, output, pid = _launch(tmp_path, mode)
    assert pid > 0, f"rank 1 never started training:\n{output[-3000:]}"
    assert code != 0, output[-3000:]
    assert elapsed < BOUND_S
    # rank 0's error says what happened, which process it was, and how to bound the wait
    assert "BAdamDDPStrategy: rank 0 of 2 lost contact with the other ranks at step 3" in output, output[-3000:]
    assert f"process group timeout ({timedelta(seconds=TIMEOUT_S)})" in output
    assert "BAdamDDPStrategy(timeout=datetime.timedelta(minutes=N))" in output
    assert "Original error:" in output  # gloo's own words stay
    if mode == "exit":
        assert f"local rank 1 (PID {pid}) exited with code 1" in output
    else:
        assert "Timed out" in output  # gloo gave up after the timeout
        assert f"local rank 1 (PID {pid}) is still running" in output
    # no rank outlives the launch: a hung one is stopped when rank 0 exits
    deadline = time.monotonic() + 30  # a busy machine is slow to deliver the signal and reap the process
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        os.kill(pid, 9)
        pytest.fail(f"rank 1 (PID {pid}) was still running after the launch ended")
