import csv
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_memopt import BlockSwitch
from lightning_memopt.data import TextDataModule
from lightning_memopt.lm import IGNORE_INDEX, TINY_LLAMA, CausalLM, next_token_loss

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}


def _trainer(tmp_path: Path, **kwargs) -> Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        precision="bf16-true",
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return Trainer(**{**defaults, **kwargs})


def test_fit_bf16_true_logs_falling_loss(tmp_path: Path) -> None:
    seed_everything(0)
    model = CausalLM(config=TINY, lr=3e-3)
    data = TextDataModule(seq_len=64, batch_size=8, max_bytes=200_000)
    trainer = _trainer(tmp_path, max_steps=8, log_every_n_steps=1, val_check_interval=4, limit_val_batches=2)
    trainer.fit(model, data)

    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train = [float(r["train_loss"]) for r in rows if r["train_loss"]]
    val = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert len(train) == 8 and len(val) == 2
    assert abs(train[0] - math.log(256)) < 0.3, "a fresh byte-level model predicts uniformly"
    assert train[-1] < train[0] - 0.3
    assert val[-1] < val[0]
    last = next(r for r in reversed(rows) if r["train_ppl"])
    assert float(last["train_ppl"]) == pytest.approx(math.exp(float(last["train_loss"])), rel=1e-5)


def test_val_metrics_are_token_weighted_in_float32_under_bf16(tmp_path: Path) -> None:
    seed_everything(0)
    model = CausalLM(config=TINY)
    # 230 validation windows in batches of 16: the last batch is smaller and must weigh less.
    data = TextDataModule(seq_len=32, batch_size=16, val_fraction=0.1, max_bytes=2300 * 33)
    trainer = _trainer(tmp_path)
    (logged,) = trainer.validate(model, data, verbose=False)

    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for batch in data.val_dataloader():
            loss, n = next_token_loss(model(batch["input_ids"]), batch)
            loss_sum += loss.item() * n.item()
            tokens += n.item()
    assert tokens == 230 * 32
    # bf16 metric states are off by ~2e-4 here; float32 states stay within rounding of the per-batch losses.
    assert logged["val_loss"] == pytest.approx(loss_sum / tokens, rel=1e-5)
    assert logged["val_ppl"] == pytest.approx(math.exp(loss_sum / tokens), rel=1e-5)


@pytest.mark.parametrize(
    ("checkpointing", "reentrant", "calls_per_step"), [(False, False, 1), (True, False, 2), (True, True, 2)]
)
def test_gradient_checkpointing_recomputes_layers_in_backward(
    tmp_path: Path, checkpointing: bool, reentrant: bool, calls_per_step: int
) -> None:
    model = CausalLM(config=TINY, gradient_checkpointing=checkpointing, gradient_checkpointing_reentrant=reentrant)
    # transformers 5 renamed the flag; 4.x only has the old name.
    flag = getattr(model.model, "is_activation_checkpointing", None)
    assert (model.model.is_gradient_checkpointing if flag is None else flag) is checkpointing
    calls = []
    # transformers 5 checkpoints a layer's `forward`, not its `__call__`: only hooks inside the layer see the recompute,
    # and a pre-hook, because non-reentrant recomputation stops as soon as the last saved tensor is rebuilt.
    model.model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    before = model.model.model.layers[0].mlp.up_proj.weight.detach().clone()

    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0, logger=False)
    trainer.fit(model, TextDataModule(seq_len=16, batch_size=2, max_bytes=10_000))

    assert len(calls) == calls_per_step
    assert not torch.equal(model.model.model.layers[0].mlp.up_proj.weight.float(), before.float())


def test_hf_style_labels_give_the_same_loss_as_shifted_targets() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 6))
    labels = ids[:, :5].clone()
    labels[0, 2] = IGNORE_INDEX
    targets = ids[:, 1:5].clone()
    targets[0, 1] = IGNORE_INDEX
    from_labels = next_token_loss(logits[:, :5], {"labels": labels})
    from_targets = next_token_loss(logits[:, :4], {"targets": targets})
    assert from_labels[1] == from_targets[1] == 7
    assert torch.allclose(from_labels[0], from_targets[0])
    with pytest.raises(KeyError, match="needs `targets` or `labels`"):
        next_token_loss(logits, {"input_ids": ids})


def test_loads_a_saved_model_in_its_own_dtype(tmp_path: Path) -> None:
    built = CausalLM(config=TINY)
    built.model.to(torch.bfloat16).save_pretrained(tmp_path / "tiny")
    loaded = CausalLM(model_path=str(tmp_path / "tiny"))
    assert loaded.model.config.hidden_size == 64 and loaded.model.config.vocab_size == TINY_LLAMA["vocab_size"]
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    for (name, expected), actual in zip(built.named_parameters(), loaded.parameters(), strict=True):
        assert torch.equal(expected, actual), name
    assert CausalLM(model_path=str(tmp_path / "tiny"), dtype="float32").model.dtype == torch.float32


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_pretrained_model_trains_in_train_mode_with_checkpointing_that_recomputes(
    model_dir: Path, tmp_path: Path, reentrant: bool
) -> None:
    # from_pretrained returns an eval-mode model; transformers only checkpoints while `training` is set
    model = CausalLM(model_path=str(model_dir), gradient_checkpointing=True, gradient_checkpointing_reentrant=reentrant)
    assert model.model.training
    calls: list[bool] = []
    layer = model.model.model.layers[1]
    # transformers checkpoints the layer's `forward`, keeping its own hooks outside: count a submodule's calls
    layer.self_attn.register_forward_pre_hook(lambda module, args: calls.append(torch.is_grad_enabled()))
    batch = {"input_ids": torch.randint(0, 500, (2, 12)), "labels": torch.randint(0, 500, (2, 12))}
    data = DataLoader([batch], batch_size=None)
    switch = BlockSwitch(every=1, order="fixed", start=1)
    trainer = _trainer(tmp_path, max_steps=1, strategy="badam", logger=False, callbacks=[switch])
    before = layer.mlp.down_proj.weight.detach().clone()
    trainer.fit(model, train_dataloaders=data)
    assert trainer.strategy.blocks[trainer.strategy.active_block].name == "model.model.layers.1"
    # the active layer runs forward twice: once in the forward pass, once recomputed in the backward pass
    assert calls == ([False, True] if reentrant else [True, True])
    assert not torch.equal(before, layer.mlp.down_proj.weight)


def test_bf16_true_keeps_rotary_frequencies_in_float32(model_dir: Path, tmp_path: Path) -> None:
    # Lightning's bf16-true casts the whole module; the model must stay the one transformers loads from the directory
    from transformers import AutoModelForCausalLM

    model = CausalLM(model_path=str(model_dir))
    batch = {"input_ids": torch.randint(0, 500, (2, 200)), "labels": torch.randint(0, 500, (2, 200))}
    _trainer(tmp_path, logger=False).validate(model, DataLoader([batch], batch_size=None), verbose=False)
    rotary = model.model.model.rotary_emb
    assert rotary.inv_freq.dtype == rotary.original_inv_freq.dtype == torch.float32
    assert next(model.parameters()).dtype == torch.bfloat16
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()
    with torch.no_grad():
        expected = reference(input_ids=batch["input_ids"]).logits
        assert torch.equal(model.eval()(batch["input_ids"]), expected)
        # what the cast did before: bf16 frequencies give another model at long positions
        rotary.inv_freq = rotary.inv_freq.to(torch.bfloat16)
        assert not torch.equal(model(batch["input_ids"]), expected)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"model_path": "/no/such/model"}, OSError, "No such directory"),
        ({"model_path": "someone/not-cached"}, OSError, "local_files_only: false"),
        ({"model_path": "x", "config": {}}, ValueError, "either `model_path`.*or `config`"),
        ({"lr": 0.0}, ValueError, "lr should be > 0"),
    ],
)
def test_invalid_arguments(kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        CausalLM(**kwargs)
