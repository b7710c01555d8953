"""``lightning-memopt plot RUN_DIR`` (issue #18): the figures of a finished run, drawn from what a real ``Trainer``
wrote (``metrics.csv`` from ``CSVLogger``, ``memory.json`` from ``MemoryReport``)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from matplotlib.image import imread
from models import LlamaModule, trainer_kwargs

from lightning_memopt import BAdamStrategy, BlockSwitch, MemoryReport
from lightning_memopt.cli import main
from lightning_memopt.plot import PlotError, find_run, plot_run, read_metrics

STEPS = 8


class ScheduledModule(LlamaModule):
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.1, total_iters=STEPS)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _run(root: Path, version: int | None = None) -> Path:
    logger = CSVLogger(root, name="lightning_logs", version=version)
    trainer = L.Trainer(
        strategy=BAdamStrategy(),
        precision="bf16-true",
        max_steps=STEPS,
        callbacks=[
            BlockSwitch(every=2, order="ascending"),
            LearningRateMonitor(logging_interval="step"),
            MemoryReport(every_n_steps=2),
        ],
        **trainer_kwargs(root, logger=logger, log_every_n_steps=1),
    )
    trainer.fit(ScheduledModule(num_layers=3))
    return Path(trainer.log_dir)


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    _run(root, version=0)
    _run(root, version=1)
    return root


def test_the_command_plots_the_latest_run(run_root, tmp_path, capsys):
    main(["plot", str(run_root), "--out", str(tmp_path / "plots")])
    captured = capsys.readouterr()
    written = [Path(line) for line in captured.out.splitlines()]
    assert written == [tmp_path / "plots" / "training.png", tmp_path / "plots" / "memory.png"]
    assert "holds 2 runs; plotting the latest, lightning_logs/version_1" in captured.err

    training = imread(written[0])
    # four panels (loss, lr, memory, active block) at 9 x (1.2 + 2.1 * panels) inches and 100 dpi
    assert training.shape[:2] == (960, 900)
    assert training.std() > 0.05  # drawn, not blank
    memory = imread(written[1])
    assert memory.shape[:2] == (360, 800) and memory.std() > 0.05


def test_what_the_figures_are_drawn_from(run_root):
    files, note = find_run(run_root / "lightning_logs" / "version_0")
    assert note is None and files.memory is not None
    series = read_metrics(files.metrics)
    # the steps the run logged, with its values: the schedule's lr falls, the block walks 0, 1, 2, 0
    lr = [value for _, value in series["lr-AdamW"]]
    assert lr[0] == pytest.approx(1e-3) and lr[-1] < lr[0] and lr == sorted(lr, reverse=True)
    assert [value for _, value in series["badam/block"]] == [0, 0, 1, 1, 2, 2, 0, 0]
    assert len(series["train_loss"]) == STEPS
    assert {"memory/total_mib", "memory/predicted_mib"} <= set(series)
    report = json.loads(files.memory.read_text())
    assert report["total"] > 0 and report["predicted"] == report["total"]

    written = plot_run(files.directory)
    assert written == [files.directory / "training.png", files.directory / "memory.png"]


def test_a_run_with_a_loss_only_gets_one_panel_and_no_memory_figure(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,step,train_loss\n0,0,3.5\n0,1,3.0\n0,2,2.5\n")
    (written,) = plot_run(run)
    assert written == run / "training.png"
    assert imread(written).shape[:2] == (330, 900)


def test_bad_run_directories_say_what_to_pass(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "does not exist. Pass the log directory of a run" in capsys.readouterr().err

    with pytest.raises(PlotError, match=r"No metrics.csv in .*CSVLogger"):
        find_run(tmp_path)

    run = tmp_path / "nothing"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,step,accuracy\n0,0,0.5\n")
    with pytest.raises(PlotError, match=r"has nothing to plot: no loss, lr-\*.*its columns: accuracy"):
        plot_run(run)
    assert not (run / "training.png").exists()
