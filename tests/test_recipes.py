"""Every recipe parses with the CLI that runs it: class paths import, keys exist, values have the right types.

``--print_config`` parses and validates the whole configuration and exits before anything is instantiated, so the
8B recipes are checked without their (placeholder) model directory.
"""

from pathlib import Path

import pytest
import yaml
from lightning.pytorch.strategies import StrategyRegistry

from lightning_memopt.cli import main

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    # LightningCLI warns when it gets `args` while sys.argv holds pytest's own arguments.
    monkeypatch.setattr("sys.argv", ["lightning-memopt"])


def _parsed(recipe: Path, capsys: pytest.CaptureFixture[str], *overrides: str) -> dict:
    with pytest.raises(SystemExit) as exited:
        main(["fit", "--config", str(recipe), *overrides, "--print_config"])
    assert exited.value.code in (0, None), capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def test_the_documented_recipes_exist() -> None:
    assert {"quickstart.yaml", "llama3-8b-badam.yaml"} <= {recipe.name for recipe in RECIPES}


@pytest.mark.parametrize("recipe", RECIPES, ids=[recipe.stem for recipe in RECIPES])
def test_recipe_is_valid(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _parsed(recipe, capsys)
    trainer = config["trainer"]
    strategy = trainer["strategy"]
    if isinstance(strategy, str):
        # A name only resolves when the Trainer is built; check it here instead.
        assert strategy in StrategyRegistry, f"strategy {strategy!r} is not registered"
    assert config["model"]["class_path"] and config["data"]["class_path"]
    scheduler = config.get("lr_scheduler") or {}
    if scheduler.get("class_path") == "torch.optim.lr_scheduler.CosineAnnealingLR":
        # MemoptCLI steps schedulers per optimizer step, so the cosine must span exactly the run.
        assert scheduler["init_args"]["T_max"] == trainer["max_steps"]


def test_invalid_recipes_are_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    quickstart = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "quickstart.yaml").read_text())
    broken = [
        ("data", "init_args", "seq_length", 128),
        ("model", "class_path", None, "lightning_memopt.lm.NoSuchModel"),
        ("trainer", "max_steps", None, "many"),
    ]
    for section, key, subkey, value in broken:
        config = yaml.safe_load(yaml.safe_dump(quickstart))
        if subkey is None:
            config[section][key] = value
        else:
            config[section][key][subkey] = value
        path = tmp_path / f"{section}-{key}.yaml"
        path.write_text(yaml.safe_dump(config))
        with pytest.raises(SystemExit) as exited:
            main(["fit", "--config", str(path), "--print_config"])
        assert exited.value.code not in (0, None), f"{section}.{key} = {value!r} was accepted"
        capsys.readouterr()


def test_the_instruction_tuning_recipe_is_the_papers_setting(capsys: pytest.CaptureFixture[str]) -> None:
    config = _parsed(Path(__file__).parents[1] / "recipes" / "llama3-8b-badam-sft.yaml", capsys)
    trainer = config["trainer"]
    assert trainer["strategy"] == "badam" and trainer["precision"] == "bf16-true"
    (switch,) = [c for c in trainer["callbacks"] if c["class_path"] == "lightning_memopt.BlockSwitch"]
    assert switch["init_args"]["every"] == 100 and switch["init_args"]["order"] == "random"
    assert config["optimizer"]["init_args"]["lr"] == 1e-5
    assert config["lr_scheduler"]["class_path"] == "torch.optim.lr_scheduler.CosineAnnealingLR"
    # 16 samples per optimizer step, the loss on the responses, the model's own tokenizer and chat template
    assert config["data"]["init_args"]["batch_size"] * trainer["accumulate_grad_batches"] == 16
    assert config["data"]["class_path"] == "lightning_memopt.data.InstructionDataModule"
    assert config["data"]["init_args"]["train_on"] == "responses"
    assert config["data"]["init_args"]["tokenizer"] == config["model"]["init_args"]["model_path"]
    assert config["model"]["init_args"]["gradient_checkpointing"] is True
