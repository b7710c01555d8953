"""Every recipe in ``recipes/`` runs end to end for a few steps, as a user would run it, with its placeholders replaced
by tiny stand-ins: a saved pretrained Llama with its own tokenizer and chat template (``model_dir``), and JSONL data.

The single-device recipes run in-process through ``lightning_memopt.cli``; the DDP and FSDP ones through the
``lightning-memopt fit`` console script, which launches 2 gloo processes. Only what cannot work on 2 CPU cores with a
tiny model is changed (accelerator, devices, backend, steps, lengths, batch sizes, the lr: a tiny bf16 model barely
moves at 1e-5); the strategy, precision, callbacks, module, data module and gradient checkpointing stay the recipe's.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pretrained import instruction_records, write_jsonl
from safetensors.torch import load_file

from lightning_memopt.cli import main

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
PLACEHOLDER = "/path/to/"
STEPS = 6
EVERY = 2  # BlockSwitch: three blocks in six steps
pytestmark = pytest.mark.xdist_group("ddp")


def _replace_placeholders(node: Any, stand_ins: dict[str, str], key: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _replace_placeholders(v, stand_ins, k) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_placeholders(v, stand_ins, key) for v in node]
    if isinstance(node, str) and node.startswith(PLACEHOLDER):
        assert key in stand_ins, f"the recipe has a placeholder under {key!r} that this test does not know: {node}"
        return stand_ins[key]
    return node


def _callback(config: dict, name: str) -> dict | None:
    for callback in config["trainer"].get("callbacks") or []:
        if callback["class_path"].rsplit(".", 1)[-1] == name:
            return callback.setdefault("init_args", {})
    return None


def _scaled_down(recipe: Path, root: Path, model_dir: Path) -> tuple[dict, int]:
    """The recipe with stand-ins for its placeholders, sized for two CPU cores; returns it and its device count."""
    config = yaml.safe_load(recipe.read_text())
    data = config["data"]
    instruction = data["class_path"].endswith("InstructionDataModule")
    if instruction:
        data_file = write_jsonl(root / "data" / "train.jsonl", instruction_records())
    else:
        texts = [{"text": r["instruction"] + "\n" + r["output"]} for r in instruction_records()]
        data_file = write_jsonl(root / "data" / "train.jsonl", texts)
    config = _replace_placeholders(
        config, {"model_path": str(model_dir), "tokenizer": str(model_dir), "paths": str(data_file)}
    )
    assert PLACEHOLDER not in json.dumps(config)

    trainer = config["trainer"]
    strategy = trainer["strategy"]
    distributed = isinstance(strategy, dict) and ("DDP" in strategy["class_path"] or "FSDP" in strategy["class_path"])
    devices = 2 if distributed else 1
    if distributed and "process_group_backend" in strategy.get("init_args", {}):
        strategy["init_args"]["process_group_backend"] = "gloo"
    accumulate = trainer.get("accumulate_grad_batches", 1)
    trainer.update(
        accelerator="cpu",
        devices=devices,
        max_steps=STEPS,
        val_check_interval=3 * accumulate,  # micro-batches: after steps 3 and 6
        limit_val_batches=2,
        log_every_n_steps=1,
        enable_progress_bar=False,
        default_root_dir=str(root / "run"),
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root / "run")}},
    )
    if (switch := _callback(config, "BlockSwitch")) is not None:
        switch["every"] = EVERY
    if (report := _callback(config, "MemoryReport")) is not None:
        report["every_n_steps"] = 1
    if (samples := _callback(config, "SampleGeneration")) is not None:
        samples["max_new_tokens"] = 8
    if _callback(config, "ModelCheckpoint") is None:
        trainer["callbacks"].append(
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}
        )
    else:
        _callback(config, "ModelCheckpoint")["save_last"] = True

    data = config["data"]
    args = data["init_args"]
    args["num_workers"] = 0
    args["batch_size"] = 2
    if instruction:
        args.update(max_length=192, cache_dir=str(root / "cache"), val_fraction=0.1)
    elif "TextDataModule" in data["class_path"]:
        args.update(seq_len=64, val_fraction=0.1)
    if config["model"]["init_args"].get("model_path") is None:
        config["model"]["init_args"].setdefault("config", {})["num_hidden_layers"] = 3
    trainer["callbacks"].append({"class_path": "recompute_probe.RecomputeProbe"})
    config["optimizer"]["init_args"]["lr"] = 1e-3
    if (scheduler := config.get("lr_scheduler")) and "T_max" in scheduler.get("init_args", {}):
        scheduler["init_args"]["T_max"] = STEPS
    return config, devices


def _run(config: dict, devices: int, root: Path) -> None:
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    if devices == 1:
        main(["fit", "--config", str(path)])
        return
    console_script = Path(sys.executable).parent / "lightning-memopt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [str(console_script), "fit", "--config", str(path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=[recipe.stem for recipe in RECIPES])
def test_recipe_runs_end_to_end(recipe: Path, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["lightning-memopt"])
    config, devices = _scaled_down(recipe, tmp_path, model_dir)
    _run(config, devices, tmp_path)

    (log_dir,) = (tmp_path / "run" / "lightning_logs").iterdir()
    checkpoint = torch.load(log_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["global_step"] == STEPS
    with open(log_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    val = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
    assert len(train) == STEPS and all(torch.isfinite(torch.tensor(train)))
    assert len(val) == 2 and val[-1] < val[0], "six steps at lr 1e-3 lower the validation loss"
    assert (log_dir / "memory.json").is_file()
    if _callback(config, "SampleGeneration") is not None:
        lines = (log_dir / "samples.jsonl").read_text().splitlines()
        assert len(lines) == 2 * len(_callback(config, "SampleGeneration")["prompts"])

    # gradient checkpointing ran on every rank, and backward stopped at the active layer: the active layer and those
    # above it ran twice per step (forward, recomputed in backward), those below it once
    checkpointing = config["model"]["init_args"].get("gradient_checkpointing", False)
    for rank in range(devices):
        steps = json.loads((tmp_path / "run" / f"recompute-rank{rank}.json").read_text())
        assert len(steps) == STEPS * config["trainer"].get("accumulate_grad_batches", 1)
        for step in steps:
            active = int(step["active"].rsplit(".", 1)[-1]) if ".layers." in step["active"] else 0
            twice = [2 if checkpointing and i >= active else 1 for i in range(3)]
            assert step["calls"] == twice, (rank, step)

    weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    if config["model"]["init_args"].get("model_path") is None:
        return  # trained from scratch (the quickstart): nothing to compare with
    base = load_file(model_dir / "model.safetensors")
    assert weights.keys() == base.keys()
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    # BAdam trained three decoder layers for two steps each and left embedding, head and final norm alone
    frozen = ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")
    for name in frozen:
        assert torch.equal(weights[name], base[name]), name
    # Adam's first steps after a reset move each element by about the lr: a layer moves by the sum of the lrs of the
    # steps it was active, as the run logged them (cosine schedule), up to bf16 rounding
    lr = {int(r["step"]): float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")}
    block = [int(float(r["badam/block"])) for r in rows if r.get("badam/block")]
    assert len(block) == STEPS and sorted(set(block)) == [0, 1, 2]
    for layer in range(3):
        expected = sum(lr[step] for step in range(STEPS) if block[step] == layer)
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        moved = (weights[name].float() - base[name].float()).abs().mean().item()
        assert 0.6 * expected < moved < 1.3 * expected, (name, moved, expected)
