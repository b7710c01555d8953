"""Every recipe parses with the CLI that runs it: class paths import, keys exist, values have the right types.

``--print_config`` parses and validates the whole configuration and exits before anything is instantiated, so the
8B recipes are checked without their (placeholder) model directory.
"""

from pathlib import Path

import pytest
import yaml
from lightning.pytorch.strategies import StrategyRegistry

import lightning_memopt
from lightning_memopt.cli import main
from lightning_memopt.recipes import RecipeError, copy_recipe, list_recipes, recipe_path

ROOT = Path(__file__).parents[1]
PACKAGED = ROOT / "lightning_memopt" / "recipes"
RECIPES = sorted(PACKAGED.glob("*.yaml"))


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


def test_the_top_level_recipes_folder_is_the_packaged_one() -> None:
    # one source of truth: readers browse recipes/, the wheel ships lightning_memopt/recipes/
    assert (ROOT / "recipes").is_symlink()
    assert (ROOT / "recipes").resolve() == PACKAGED.resolve()
    assert list_recipes() == sorted(recipe.stem for recipe in RECIPES)
    assert recipe_path("quickstart") == recipe_path("quickstart.yaml") == (PACKAGED / "quickstart.yaml").resolve()


def test_an_unknown_recipe_names_the_closest_and_all(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"did you mean 'quickstart'\?.*llama3-8b-badam-sft.*quickstart"):
        recipe_path("quickstrat")
    with pytest.raises(RecipeError, match=r"No recipe named '\.\./quickstart'"):
        recipe_path("../quickstart")
    assert not list(tmp_path.iterdir())


def test_copy_writes_the_recipe_and_keeps_an_existing_file(tmp_path: Path) -> None:
    target = copy_recipe("quickstart", tmp_path / "configs")
    assert target == tmp_path / "configs" / "quickstart.yaml"
    assert target.read_bytes() == (PACKAGED / "quickstart.yaml").read_bytes()
    target.write_text("# my edits\n")
    with pytest.raises(RecipeError, match="already exists; pass --overwrite"):
        copy_recipe("quickstart", tmp_path / "configs")
    assert target.read_text() == "# my edits\n"
    copy_recipe("quickstart", tmp_path / "configs", overwrite=True)
    assert target.read_bytes() == (PACKAGED / "quickstart.yaml").read_bytes()


def test_the_recipes_command_lists_and_copies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["recipes"])
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed[: len(RECIPES)]] == list_recipes()
    assert "quickstart             Quick check on a laptop CPU (about 3 minutes on 2 cores)" in listed
    main(["recipes", "copy", "llama3-8b-badam-sft", str(tmp_path)])
    assert (tmp_path / "llama3-8b-badam-sft.yaml").read_bytes() == (PACKAGED / "llama3-8b-badam-sft.yaml").read_bytes()
    assert f"lightning-memopt fit --config {tmp_path / 'llama3-8b-badam-sft.yaml'}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main(["recipes", "copy", "llama3-8b-badam-sft", str(tmp_path)])
    assert exited.value.code == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["recipes", "copy", "no-such", str(tmp_path)])
    assert exited.value.code == 2
    assert "No recipe named 'no-such'" in capsys.readouterr().err


def test_version_is_defined_once_and_printed(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    main(["--version"])
    assert capsys.readouterr().out == f"lightning-memopt {lightning_memopt.__version__}\n"
    assert version("lightning-memopt") == lightning_memopt.__version__  # the installed metadata reads the same
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and "\nversion =" not in pyproject.split("[tool.setuptools.dynamic]")[0]


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
