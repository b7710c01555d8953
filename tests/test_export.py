"""Results usable anywhere: BAdam checkpoints without this package, and `lightning-memopt export` to Hugging Face and
safetensors, loaded back offline with the same weights and logits.

One tiny CausalLM (tied embeddings) is trained once through the CLI, BAdam in bf16; every export test reads its
checkpoint.
"""

from __future__ import annotations

import copy
import doctest
import json
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.demos.boring_classes import BoringModel
from models import LlamaModule, trainer_kwargs

import lightning_memopt.export
from lightning_memopt import BAdamStrategy, BlockSwitch
from lightning_memopt.cli import MemoptCLI, main
from lightning_memopt.lm import CausalLM

MODEL_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "tie_word_embeddings": True}
NO_PACK_SCRIPT = Path(__file__).parent / "load_without_pack.py"


def _cli_config(root: Path) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "strategy": "badam",
            "precision": "bf16-true",
            "max_steps": 3,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(root),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root)}},
            "callbacks": [{"class_path": "lightning_memopt.BlockSwitch", "init_args": {"every": 1}}],
        },
        "model": {"class_path": "lightning_memopt.lm.CausalLM", "init_args": {"config": MODEL_CONFIG}},
        "data": {
            "class_path": "lightning_memopt.data.TextDataModule",
            "init_args": {"seq_len": 32, "batch_size": 4, "max_bytes": 20000, "val_fraction": 0.1},
        },
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
    }


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """(trained LightningModule, its checkpoint, the run's config.yaml): a LightningCLI run as users make them."""
    root = tmp_path_factory.mktemp("cli_run")
    config = root / "recipe.yaml"
    config.write_text(yaml.safe_dump(_cli_config(root)))
    cli = MemoptCLI(args=["--config", str(config)], run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    (checkpoint,) = (root / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt")
    saved_config = root / "lightning_logs" / "version_0" / "config.yaml"
    assert saved_config.is_file()
    return cli.model, checkpoint, saved_config


def _reference_logits(module: CausalLM, x: torch.Tensor) -> torch.Tensor:
    """The trained model's logits, with the rotary buffers a loader recomputes.

    Lightning's ``bf16-true`` casts every floating buffer of the module, the non-persistent rotary ``inv_freq``
    included; ``from_pretrained`` (like a fresh module) recomputes it in FP32. The weights are what the export carries.
    """
    hf = copy.deepcopy(module.model)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config)
    with torch.no_grad():
        return hf(input_ids=x).logits


def _tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def _without_class_path(checkpoint: Path, target: Path) -> Path:
    """The checkpoint as a plain Trainer run writes it: hyper-parameters, but no LightningCLI `_class_path`."""
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["hyper_parameters"] = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, target)
    return target


def test_cli_run_exports_a_transformers_model_that_loads_offline(cli_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    module, checkpoint, _ = cli_run
    out = tmp_path / "hf"
    main(["export", str(checkpoint), str(out)])  # format auto: CausalLM wraps a transformers model
    assert capsys.readouterr().out.strip() == str(out)
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}

    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert loaded.dtype == torch.bfloat16  # as trained (bf16-true)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied again
    trained = dict(module.model.named_parameters())
    assert set(dict(loaded.named_parameters())) == set(trained)
    for name, param in loaded.named_parameters():
        assert torch.equal(param, trained[name]), name
    with torch.no_grad():
        logits = loaded(input_ids=_tokens()).logits
    assert torch.equal(logits, _reference_logits(module, _tokens()))


@pytest.mark.parametrize("source", ["--module", "--config", "config.yaml next to the run"])
def test_the_module_class_comes_from_options_or_the_runs_config(cli_run, tmp_path, source):
    from transformers import AutoModelForCausalLM

    module, checkpoint, saved_config = cli_run
    args: list[str] = []
    if source == "config.yaml next to the run":
        # a copy of the run's layout: version_0/{config.yaml, checkpoints/x.ckpt}
        shutil.copy(saved_config, tmp_path / "config.yaml")
        ckpt = _without_class_path(checkpoint, tmp_path / "checkpoints" / "x.ckpt")
    else:
        ckpt = _without_class_path(checkpoint, tmp_path / "x.ckpt")
        args = ["--module", "lightning_memopt.lm.CausalLM"] if source == "--module" else ["--config", str(saved_config)]
    out = tmp_path / "out"
    main(["export", str(ckpt), str(out), "--format", "hf", "--dtype", "float32", *args])
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert loaded.dtype == torch.float32
    with torch.no_grad():
        logits = loaded(input_ids=_tokens()).logits
    # bf16 weights widened to FP32 exactly: the FP32 export computes what the trained weights compute in FP32
    torch.testing.assert_close(logits.to(torch.bfloat16), _reference_logits(module, _tokens()), rtol=0.02, atol=0.02)
    trained = dict(module.model.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(param, trained[name].float()), name


def test_safetensors_export_holds_the_modules_state_dict(cli_run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    module, checkpoint, _ = cli_run
    out = tmp_path / "st"
    main(["export", str(checkpoint), str(out), "--format", "safetensors"])
    path = out / "model.safetensors"
    tensors = load_file(path)
    expected = module.state_dict()
    assert set(tensors) == set(expected)
    for name, tensor in tensors.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, expected[name]), name
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["shared"]) == {"model.lm_head.weight": "model.model.embed_tokens.weight"}
    assert metadata["global_step"] == "3"

    # anyone can rebuild the module and load the file strictly, without Lightning's checkpoint machinery
    fresh = CausalLM(config=MODEL_CONFIG)
    fresh.load_state_dict(tensors, strict=True)
    fresh.to(torch.bfloat16)  # what bf16-true did to the trained module, buffers included
    with torch.no_grad():
        assert torch.equal(fresh(_tokens()), module(_tokens()))


@pytest.fixture(scope="module")
def plain_module_checkpoint(tmp_path_factory):
    """A BAdam checkpoint of a LightningModule that saves no hyper-parameters (tests/models.py)."""
    root = tmp_path_factory.mktemp("plain")
    module = LlamaModule(num_layers=2, hidden=16, n=8)
    trainer = L.Trainer(
        strategy=BAdamStrategy(),
        precision="bf16-true",
        max_steps=3,
        callbacks=[BlockSwitch(every=1, order="ascending")],
        **trainer_kwargs(root),
    )
    trainer.fit(module)
    path = root / "badam.ckpt"
    trainer.save_checkpoint(path)
    return module, path


def test_a_badam_checkpoint_loads_where_the_pack_is_not_installed(plain_module_checkpoint):
    module, path = plain_module_checkpoint
    assert "badam" in torch.load(path, weights_only=True)["optimizer_states"][0]  # a real BAdam checkpoint
    result = subprocess.run(
        [sys.executable, str(NO_PACK_SCRIPT), str(path), "2", "16"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])

    class ValidatedLlama(LlamaModule):
        def validation_step(self, batch, batch_idx):
            (x,) = batch
            self.log("val_loss", self.model(input_ids=x, labels=x).loss)

    from models import token_loader

    # the trained module itself, validated here, scores exactly what the bare environment computed from the file
    trained = ValidatedLlama(num_layers=2, hidden=16)
    trained.load_state_dict(module.state_dict(), strict=True)
    expected = L.Trainer(precision="bf16-true", **trainer_kwargs(path.parent)).validate(
        trained, dataloaders=token_loader(n=8, seed=1), verbose=False
    )[0]["val_loss"]
    assert got["val_loss"] == got["from_file"] == expected
    assert got["steps"] == 2 and got["moved"] > 0


def test_plain_checkpoint_exports_safetensors_unless_asked_for_hf(plain_module_checkpoint, tmp_path, capsys):
    module, path = plain_module_checkpoint
    main(["export", str(path), str(tmp_path / "auto")])  # nothing names the class: the state_dict alone
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "auto" / "model.safetensors")
    assert {n: t.dtype for n, t in tensors.items()} == {n: torch.bfloat16 for n in module.state_dict()}
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(path), str(tmp_path / "hf"), "--format", "hf"])
    assert exit_info.value.code == 2
    assert "pass --module package.ModuleClass" in capsys.readouterr().err


def _wrong_layers_config(tmp_path: Path, saved_config: Path) -> Path:
    config = yaml.safe_load(saved_config.read_text())
    config["model"]["init_args"]["config"] = {**MODEL_CONFIG, "num_hidden_layers": 3}
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing file", "No checkpoint file at"),
        ("not a Lightning checkpoint", "holds no 'state_dict'"),
        ("not a LightningModule", "'torch.nn.Linear' is not a LightningModule subclass"),
        ("class not importable", "Cannot import the module class 'no_such_package.Model'"),
        ("another model's weights", "do not fit lightning_memopt.lm.CausalLM"),
        ("no transformers model", "BoringModel holds no transformers PreTrainedModel"),
        ("unknown dtype", "invalid choice: 'int8'"),
    ],
)
def test_export_errors_say_what_to_pass(cli_run, tmp_path, capsys, case, message):
    _, checkpoint, saved_config = cli_run
    args = [str(checkpoint), str(tmp_path / "out")]
    if case == "missing file":
        args[0] = str(tmp_path / "nothing.ckpt")
    elif case == "not a Lightning checkpoint":
        torch.save({"weights": torch.ones(2)}, tmp_path / "plain.pt")
        args[0] = str(tmp_path / "plain.pt")
    elif case == "not a LightningModule":
        args += ["--module", "torch.nn.Linear"]
    elif case == "class not importable":
        args += ["--module", "no_such_package.Model"]
    elif case == "another model's weights":
        args += ["--config", str(_wrong_layers_config(tmp_path, saved_config))]
    elif case == "no transformers model":
        torch.save({"state_dict": BoringModel().state_dict()}, tmp_path / "boring.ckpt")
        boring = "lightning.pytorch.demos.boring_classes.BoringModel"
        args = [str(tmp_path / "boring.ckpt"), args[1], "--format", "hf", "--module", boring]
    else:
        args += ["--dtype", "int8"]
    with pytest.raises(SystemExit) as exit_info:
        main(["export", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_docstring_examples():
    result = doctest.testmod(lightning_memopt.export, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
