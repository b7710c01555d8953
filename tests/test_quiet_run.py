"""What a BAdam run prints (issue #18): a start summary, one line per pass over the blocks, each switch at DEBUG only,
nothing per step; the progress bar shows the active block as ``block: 1/3``, the loggers get the number."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from models import LlamaModule, trainer_kwargs

from lightning_memopt import BAdamStrategy, BlockSwitch, MemoryReport
from lightning_memopt.callbacks.block_switch import block_label

STEPS, EVERY, LAYERS = 13, 2, 3  # 3 blocks, a pass every 6 steps: passes end at steps 6 and 12, switches every 2


@pytest.fixture
def package_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog with every record of the ``lightning_memopt`` loggers at DEBUG and above, once each, however logging was
    configured before (caplog's handler sits on the root logger; the package's logger may not propagate there)."""
    package = logging.getLogger("lightning_memopt")
    level, propagate = package.level, package.propagate
    package.addHandler(caplog.handler)
    package.propagate = False
    package.setLevel(logging.DEBUG)
    caplog.handler.setLevel(logging.DEBUG)
    try:
        yield caplog
    finally:
        package.removeHandler(caplog.handler)
        package.setLevel(level)
        package.propagate = propagate


def _fit(tmp_path: Path, **overrides) -> L.Trainer:
    trainer = L.Trainer(
        strategy=BAdamStrategy(),
        precision="bf16-true",
        max_steps=overrides.pop("max_steps", STEPS),
        callbacks=[BlockSwitch(every=EVERY, order="ascending"), *overrides.pop("callbacks", [])],
        **trainer_kwargs(tmp_path, **overrides),
    )
    trainer.fit(LlamaModule(num_layers=LAYERS))
    return trainer


def test_info_summarises_start_and_passes_debug_has_each_switch(tmp_path, package_log, capsys):
    _fit(tmp_path)
    ours = [r for r in package_log.records if r.name.startswith("lightning_memopt")]
    info = [r.getMessage() for r in ours if r.levelno == logging.INFO]
    debug = [r.getMessage() for r in ours if r.levelno == logging.DEBUG]

    # the start: the schedule, and the strategy's blocks and predicted memory, once each
    assert sum("BAdam starts with block 0/3" in m for m in info) == 1
    (schedule,) = [m for m in info if "starts with" in m]
    assert "every 2 steps in ascending order" in schedule and "6 steps" in schedule
    (summary,) = [m for m in info if m.startswith("BAdam: 3 blocks")]
    assert "3 x 10,304 parameters" in summary and "predicted memory on cpu" in summary and "AdamW state" in summary
    # one line per pass over the blocks (steps 6 and 12), with the order the pass took
    passes = [m for m in info if "pass" in m and "done at step" in m]
    assert len(passes) == 2
    assert "pass 1 over the 3 blocks done at step 6" in passes[0] and "order 0, 1, 2" in passes[0]
    assert "pass 2 over the 3 blocks done at step 12" in passes[1]
    assert len(info) == 4  # nothing else at INFO: no line per switch, none per step

    # DEBUG: every switch (steps 2, 4, ..., 12), naming the block and the step
    assert len(debug) == STEPS // EVERY
    assert "switched to block 1/3 ('model.model.layers.1') at step 2" in debug[0]
    assert "switched to block 0/3 ('model.model.layers.0') at step 6" in debug[2]
    assert all(r.name == "lightning_memopt.block_switch" for r in ours if r.levelno == logging.DEBUG)

    printed = capsys.readouterr()
    assert "BAdam" not in printed.out + printed.err  # through logging only, never print()


def test_default_level_hides_the_switches(tmp_path, package_log):
    logging.getLogger("lightning_memopt").setLevel(logging.INFO)  # the package's default
    _fit(tmp_path)
    messages = [r.getMessage() for r in package_log.records]
    assert not any("switched to" in m for m in messages)
    assert sum("done at step" in m for m in messages) == 2


@pytest.mark.parametrize("bar", ["tqdm", "rich"])
def test_progress_bar_shows_the_block_as_an_integer_and_the_logger_the_number(tmp_path, bar):
    console = io.StringIO()
    progress = (
        TQDMProgressBar()
        if bar == "tqdm"
        else RichProgressBar(console_kwargs={"file": console, "force_terminal": True, "width": 300})
    )
    trainer = _fit(
        tmp_path,
        callbacks=[progress],
        enable_progress_bar=True,
        logger=CSVLogger(tmp_path, name="run"),
        log_every_n_steps=1,
        max_steps=4,
    )
    module = trainer.lightning_module
    assert progress.get_metrics(trainer, module)["block"] == "1/3"
    if bar == "tqdm":
        assert "block=1/3" in progress.train_progress_bar.postfix
    else:
        assert "block: 1/3" in console.getvalue() and "block: 1.000" not in console.getvalue()
    rows = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()
    col = rows[0].split(",").index("badam/block")
    assert [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]] == [0.0, 0.0, 1.0, 1.0]


def test_block_label():
    assert block_label((4,), 6) == "4/6"
    assert block_label((1, 3), 12) == "1+3/12"
    assert block_label((1, 3, 5, 7), 12) == "1+3+5+.../12"


def test_the_console_of_a_fresh_process(tmp_path):
    """What a user sees: no logging configured, so the package's own handler prints to stderr; DEBUG on request."""
    script = textwrap.dedent(
        f"""
        import logging, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import lightning as L
        from models import LlamaModule, trainer_kwargs
        from lightning_memopt import BAdamStrategy, BlockSwitch, MemoryReport

        def fit():
            trainer = L.Trainer(strategy=BAdamStrategy(), precision="bf16-true", max_steps={STEPS},
                                callbacks=[BlockSwitch(every={EVERY}, order="random")],
                                **trainer_kwargs({str(tmp_path)!r}))
            trainer.fit(LlamaModule(num_layers={LAYERS}))

        fit()
        print("=== DEBUG", file=sys.stderr, flush=True)
        logging.getLogger("lightning_memopt").setLevel(logging.DEBUG)
        fit()
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    default, debug = proc.stderr.split("=== DEBUG")
    ours = [line for line in default.splitlines() if line.startswith("BAdam")]
    assert len(ours) == 4, ours  # start, blocks and memory, two passes
    assert "BAdam" not in proc.stdout
    assert sum("switched to" in line for line in debug.splitlines()) == STEPS // EVERY


def test_the_memory_table_goes_to_the_package_logger_once(tmp_path, package_log, capsys):
    _fit(tmp_path, callbacks=[MemoryReport(every_n_steps=4, filename=None)])
    tables = [r for r in package_log.records if r.getMessage().startswith("Memory at step")]
    assert [(r.name, r.levelno) for r in tables] == [("lightning_memopt.memory", logging.INFO)]
    assert "optimizer state" in tables[0].getMessage()
    printed = capsys.readouterr()
    assert "Memory at step" not in printed.out + printed.err


def test_a_quickstart_run_prints_a_handful_of_lines(tmp_path):
    """`lightning-memopt fit` on the quickstart recipe, as a user runs it: our start lines and the memory table, none
    of the library noise the CLI filters (Lightning's tips, deprecations, torchao's CUDA-kernel loading on a CPU)."""
    recipe = Path(__file__).parents[1] / "lightning_memopt" / "recipes" / "quickstart.yaml"
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "lightning_memopt", "fit", "--config", str(recipe)]
    command += ["--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1"]
    command += ["--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(runs)]
    command += ["--trainer.logger.init_args.save_dir", str(runs), "--data.init_args.max_bytes", "100000"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    for noise in ("Tip:", "LeafSpec", "will be overridden", "Failed to load", "register_constant", "┏"):
        assert not any(noise in line for line in lines), (noise, lines)
    assert sum(line.startswith("BAdam") for line in lines) == 2, lines  # where it starts; blocks and memory
    assert any(line.startswith("Memory at step 4") for line in lines), lines
    assert len(lines) <= 20, "\n".join(lines)
