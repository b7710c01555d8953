import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.cli import ReduceLROnPlateau
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_memopt.cli import MemoptCLI

ROOT = Path(__file__).parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def _small_run(root: Path, steps: int) -> list[str]:
    return [
        "--config", str(QUICKSTART),
        "--trainer.accelerator", "cpu",
        "--trainer.max_steps", str(steps),
        "--lr_scheduler.T_max", str(steps),
        "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "2",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", str(root),
        "--data.max_bytes", "100000",
    ]  # fmt: skip


def test_schedulers_step_per_optimizer_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["lightning-memopt"])
    cli = MemoptCLI(args=_small_run(tmp_path, steps=4), run=False)
    cli.trainer.fit(cli.model, cli.datamodule)

    (config,) = cli.trainer.lr_scheduler_configs
    assert config.interval == "step"
    lr_max, lr_min = 0.002, 0.0001  # the recipe's AdamW lr and cosine eta_min
    # 4 scheduler steps of a cosine over 4 steps end at its minimum; per-epoch stepping would still be at lr_max.
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(lr_min)
    assert config.scheduler.get_last_lr()[0] == pytest.approx(lr_min + (lr_max - lr_min) * (1 + math.cos(math.pi)) / 2)


def test_plateau_schedulers_keep_stepping_per_epoch_on_their_monitor() -> None:
    model = BoringModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = ReduceLROnPlateau(optimizer, monitor="val_loss")
    assert MemoptCLI.configure_optimizers(model, optimizer, plateau) == {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": plateau, "monitor": "val_loss"},
    }
    assert MemoptCLI.configure_optimizers(model, optimizer) is optimizer


def test_python_m_runs_the_quickstart(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lightning_memopt", "fit", *_small_run(tmp_path, steps=4)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    (log_dir,) = (tmp_path / "lightning_logs").iterdir()
    assert (log_dir / "config.yaml").is_file()
    assert [p.name for p in (log_dir / "checkpoints").iterdir()] == ["epoch=0-step=4.ckpt"]
    with open(log_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len([r for r in rows if r["train_loss"]]) == 4
    assert len([r for r in rows if r["val_loss"]]) == 2
    lrs = [float(r["lr-AdamW"]) for r in rows if r["lr-AdamW"]]
    assert len(lrs) == 4 and lrs == sorted(lrs, reverse=True) and lrs[0] > lrs[-1]


def test_the_optimizer_section_trains_the_parameters_the_module_holds_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # LightningCLI builds the optimizer while parsing; a sharding strategy (badam_fsdp) replaces the parameters later
    monkeypatch.setattr("sys.argv", ["lightning-memopt"])
    cli = MemoptCLI(args=_small_run(tmp_path, steps=2), run=False)
    head = cli.model.model.lm_head
    head.weight = torch.nn.Parameter(head.weight.detach().clone())  # what fully_shard does to every parameter
    configured = cli.model.configure_optimizers()
    optimizer = configured["optimizer"]
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in cli.model.parameters()]
    assert configured["lr_scheduler"]["scheduler"].optimizer is optimizer
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.002)  # the recipe's optimizer settings are kept


def _galore_overrides(root: Path, low_rank: str | None, optimizer: str = "galore_torch.GaLoreAdamW") -> list[str]:
    config = root / "galore.yaml"
    config.write_text(
        f"optimizer:\n  class_path: {optimizer}\n  init_args:\n    lr: 0.002\n"
        + ("    no_deprecation_warning: true\n" if "galore" in optimizer else "")
        + (f"low_rank:\n{low_rank}" if low_rank is not None else "")
    )
    return [*_small_run(root, steps=2), "--config", str(config)]


def test_the_low_rank_section_gives_a_galore_optimizer_its_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("galore_torch")
    monkeypatch.setattr("sys.argv", ["lightning-memopt"])
    cli = MemoptCLI(args=_galore_overrides(tmp_path, "  rank: 8\n  update_proj_gap: 50\n"), run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    optimizer = cli.trainer.optimizers[0]
    plain, projected = optimizer.param_groups
    assert (projected["rank"], projected["update_proj_gap"], projected["scale"], projected["proj_type"]) == (
        8,
        50,
        0.25,
        "std",
    )
    assert plain["lr"] == projected["lr"] == pytest.approx(0.002 * 0.5 * (1 + math.cos(math.pi * 2 / 2)), abs=2e-4)
    # BAdam's groups hold the active block's masters: its matrices in the projected group, its norms in the other
    masters = {id(m): n for n, m in cli.trainer.strategy.master_params.items()}
    projected_names = {masters[id(p)] for p in projected["params"]}
    assert projected_names and all(".layers." in n and n.endswith("proj.weight") for n in projected_names)
    assert {masters[id(p)] for p in plain["params"]} == set(masters.values()) - projected_names
    # the active block's matrices were stepped through their projection (FP32 masters: r x n moments)
    states = [optimizer.state[p] for p in projected["params"] if p in optimizer.state]
    assert states and all("projector" in s and 8 in s["exp_avg"].shape for s in states)


@pytest.mark.parametrize(
    ("optimizer", "low_rank", "message"),
    [
        ("torch.optim.AdamW", "  rank: 8\n", "torch.optim.AdamW would ignore them. Use galore_torch.GaLoreAdamW"),
        ("galore_torch.GaLoreAdamW", "  rank: 0\n", r"rank=...\) must be a whole number >= 1"),
    ],
)
def test_the_low_rank_section_refuses_what_it_cannot_do(tmp_path, monkeypatch, optimizer, low_rank, message):
    pytest.importorskip("galore_torch")
    monkeypatch.setattr("sys.argv", ["lightning-memopt"])
    with pytest.raises(Exception, match=message):
        MemoptCLI(args=_galore_overrides(tmp_path, low_rank, optimizer), run=False)


def test_a_galore_optimizer_without_low_rank_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("galore_torch")
    monkeypatch.setattr("sys.argv", ["lightning-memopt"])
    with pytest.warns(UserWarning, match="without a low_rank: section, so no matrix gets a projection"):
        MemoptCLI(args=_galore_overrides(tmp_path, None), run=False)


def test_flora_from_the_optimizer_section_trains_under_badam(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("flora_opt")
    monkeypatch.setattr("sys.argv", ["lightning-memopt"])
    config = tmp_path / "flora.yaml"
    config.write_text("optimizer:\n  class_path: flora_opt.Flora\n  init_args: {lr: 0.002, rank: 8, beta1: 0.9}\n")
    cli = MemoptCLI(args=[*_small_run(tmp_path, steps=2), "--config", str(config)], run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer).__name__ == "Flora" and optimizer.param_groups[0]["rank"] == 8
    # the active block's matrices keep the momentum compressed to rank 8 (one side of 8), seeded
    states = [optimizer.state[p] for g in optimizer.param_groups for p in g["params"] if p.dim() == 2]
    assert states and all(8 in s["exp_avg"].shape and isinstance(s["seed"], int) for s in states)


def test_foam_from_the_optimizer_section_trains_under_badam(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["lightning-memopt"])
    config = tmp_path / "foam.yaml"
    config.write_text(
        "optimizer:\n  class_path: lightning_memopt.optim.FOAM\n  init_args: {lr: 0.002, fold_level: 5}\n"
    )
    cli = MemoptCLI(args=[*_small_run(tmp_path, steps=2), "--config", str(config)], run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer).__name__ == "FOAM" and optimizer.param_groups[0]["fold_level"] == 5
    # the active block's matrices keep moments per block of 32 along each row
    matrices = [p for g in optimizer.param_groups for p in g["params"] if p.dim() == 2]
    assert matrices and all(optimizer.state[p]["exp_avg"].shape == (p.shape[0], -(-p.shape[1] // 32)) for p in matrices)


def test_torchao_state_from_a_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torchao")
    from lightning_memopt import EightBitState

    monkeypatch.setattr("sys.argv", ["lightning-memopt"])
    config = tmp_path / "torchao.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_memopt.EightBitState\n"
        "      init_args: {backend: torchao, bits: 4}\n"
    )
    cli = MemoptCLI(args=[*_small_run(tmp_path, steps=2), "--config", str(config)], run=False)
    (state,) = [c for c in cli.trainer.callbacks if isinstance(c, EightBitState)]
    assert (state.backend, state.bits) == ("torchao", 4)
