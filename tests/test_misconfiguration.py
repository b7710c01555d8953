"""User mistakes that the other test files do not cover: each gives one clear error or warning that names the fix.

The catalogue of every mistake, with the test of each, is docs/errors.md. Every run trains as users' runs do (three
steps across a block switch on a tiny model), so a check that comes later than set-up is reached too, and a test that
expects no warning sees the whole run.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import LlamaModule, trainer_kwargs

from lightning_memopt import BAdamDDPStrategy, BAdamStrategy, BlockSwitch


def _trainer(tmp_path, strategy: Any = None, **overrides: Any) -> L.Trainer:
    kwargs = dict(max_steps=3)
    kwargs.update(overrides)
    return L.Trainer(
        strategy=strategy if strategy is not None else BAdamStrategy(),
        precision="bf16-true",
        callbacks=[BlockSwitch(every=1, order="ascending")],
        **trainer_kwargs(tmp_path, **kwargs),
    )


def _badam_warnings(record: list[warnings.WarningMessage], text: str) -> list[str]:
    return [str(w.message) for w in record if text in str(w.message)]


# ------------------------------------------------------------------------------------------------ blocks
def test_explicit_blocks_that_leave_trainable_parameters_out_warn(tmp_path):
    layers = ["model.model.layers.0", "model.model.layers.1"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _trainer(tmp_path, BAdamStrategy(block_prefixes=layers)).fit(LlamaModule(num_layers=2, hidden=16))
    (message,) = _badam_warnings(record, "in none of the blocks")
    # the embedding, final norm and head: named, counted, and what to do about them
    assert "3 trainable parameters" in message and "'model.model.embed_tokens.weight'" in message
    assert "stay frozen for the whole run" in message
    assert "Add them to a block" in message and "requires_grad=False" in message


@pytest.mark.parametrize(
    "strategy_kwargs",
    [{}, {"block_prefixes": ["model.model.layers.0", ["model.model.layers.1", "model.model.norm", "model.lm_head"]]}],
    ids=["automatic-blocks", "explicit-blocks-frozen-embedding"],
)
def test_parameters_left_out_on_purpose_do_not_warn(tmp_path, strategy_kwargs):
    module = LlamaModule(num_layers=2, hidden=16)
    if strategy_kwargs:  # the user froze the embedding themselves
        module.model.model.embed_tokens.weight.requires_grad_(False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = _trainer(tmp_path, BAdamStrategy(**strategy_kwargs))
        trainer.fit(module)
    assert len(trainer.strategy.blocks) == 2
    assert not _badam_warnings(record, "in none of the blocks")  # the automatic blocks leave them out by design


# ------------------------------------------------------------------------------------------------ torch.compile
class QuietLlama(LlamaModule):
    """No ``self.log`` in ``training_step``: Lightning compiles a compiled LightningModule's ``training_step``, and
    Dynamo (torch 2.13, Lightning 2.6) fails on ``self.log`` there under every strategy (docs/errors.md)."""

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.model(input_ids=x, labels=x).loss


def _module_for(where: str, **kwargs: Any) -> LlamaModule:
    return QuietLlama(**kwargs) if where.startswith("fit") else LlamaModule(**kwargs)


def _compile(module: LlamaModule, where: str) -> Any:
    if where == "fit(torch.compile(module))":
        return torch.compile(module, backend="eager")
    if where == "torch.compile(submodule)":
        module.model = torch.compile(module.model, backend="eager")
    else:
        module.model.compile(backend="eager")
    return module


@pytest.mark.parametrize("where", ["fit(torch.compile(module))", "torch.compile(submodule)", "submodule.compile()"])
def test_a_compiled_model_warns_once_about_recompiles(tmp_path, where):
    target = _compile(_module_for(where, num_layers=2, hidden=16), where)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _trainer(tmp_path).fit(target)
    (message,) = _badam_warnings(record, "torch.compile")
    expected_part = "the LightningModule" if where.startswith("fit") else "'model'"
    assert f"BAdam: {expected_part} is compiled with torch.compile" in message
    assert "recompiles the first time each of the 2 blocks becomes active" in message
    assert "torch._dynamo.config.recompile_limit" in message and "remove torch.compile" in message


@pytest.mark.parametrize("where", ["fit(torch.compile(module))", "torch.compile(submodule)", "submodule.compile()"])
def test_a_compiled_model_trains_across_block_switches_like_the_uncompiled_one(tmp_path, where):
    # aot_eager traces forward and backward together, as inductor does: a graph traced while block 0 was the only
    # one requiring grad would give block 1 no gradient if it were reused after the switch; the requires_grad flip
    # must make torch.compile recompile instead
    def run(compiled: bool) -> tuple[LlamaModule, L.Trainer]:
        module = _module_for(where, num_layers=2, hidden=16, lr=1e-2)
        target = module
        if compiled:
            if where.startswith("fit"):
                target = torch.compile(module, backend="aot_eager")
            elif where.startswith("torch.compile"):
                module.model = torch.compile(module.model, backend="aot_eager")
            else:
                module.model.compile(backend="aot_eager")
        trainer = L.Trainer(
            strategy=BAdamStrategy(),
            precision="32-true",
            callbacks=[BlockSwitch(every=2, order="ascending")],
            **trainer_kwargs(tmp_path, max_steps=4),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the recompile warning, tested above
            trainer.fit(target)
        return module, trainer

    start = {n: p.detach().clone() for n, p in LlamaModule(num_layers=2, hidden=16).named_parameters()}
    compiled, trainer = run(True)
    plain, _ = run(False)
    assert len(trainer.strategy.blocks) == 2
    # torch.compile(submodule) puts the compiled wrapper's `_orig_mod.` into the parameter names
    got = {n.replace("_orig_mod.", ""): p for n, p in compiled.named_parameters()}
    expected = dict(plain.named_parameters())
    for name, w in expected.items():
        torch.testing.assert_close(got[name].detach(), w.detach(), rtol=0, atol=1e-6, msg=name)
        moved = (w.detach() - start[name]).abs().max().item()
        # both layers trained for two AdamW steps at lr 1e-2 (each element moves by up to ~2e-2); the rest is frozen
        assert (moved > 1e-2) if ".layers." in name else (moved == 0.0), (name, moved)


def test_an_uncompiled_model_does_not_warn_about_compile(tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _trainer(tmp_path).fit(LlamaModule(num_layers=2, hidden=16))
    assert not _badam_warnings(record, "torch.compile")


# ------------------------------------------------------------------------------------------------ optimizer
class ForeignParameter(LlamaModule):
    def configure_optimizers(self):
        return torch.optim.AdamW([*self.parameters(), torch.nn.Parameter(torch.zeros(3, 5))], lr=1e-3)


class FirstLayerOnly(LlamaModule):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.model.layers[0].parameters(), lr=1e-3)


@pytest.mark.parametrize(
    ("module_cls", "match"),
    [
        (ForeignParameter, r"holds a tensor of shape \(3, 5\) that is not a parameter of the LightningModule.*"
         r"build the optimizer from self.parameters\(\)"),
        (FirstLayerOnly, r"parameters of the BAdam blocks are not in the optimizer \(e.g. 'model.model.layers.1.*"
         r"Pass every parameter you want to train to the optimizer, or restrict the blocks with block_prefixes"),
    ],
    ids=["optimizer-param-not-from-module", "block-param-not-in-optimizer"],
)  # fmt: skip
def test_optimizer_and_blocks_must_agree(tmp_path, module_cls, match):
    with pytest.raises(MisconfigurationException, match=match):
        _trainer(tmp_path).fit(module_cls(num_layers=2, hidden=16))


# ------------------------------------------------------------------------------------------------ devices
def test_badam_on_several_devices_points_to_badam_ddp(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"given 2 devices\. Use strategy='badam_ddp'"):
        _trainer(tmp_path, devices=2).fit(LlamaModule(num_layers=2, hidden=16))


def test_badam_ddp_validates_bucket_size():
    with pytest.raises(ValueError, match="bucket_cap_mb must be > 0 but is: 0"):
        BAdamDDPStrategy(bucket_cap_mb=0)


# ------------------------------------------------------------------------------------------------ schedule
def test_block_switch_start_must_be_a_block_index():
    with pytest.raises(ValueError, match=r"BlockSwitch\(start=...\) must be a block index >= 0 or None, got -1"):
        BlockSwitch(start=-1)


def test_two_block_switch_callbacks_are_refused(tmp_path):
    with pytest.raises(RuntimeError, match="Found more than one stateful callback of type `BlockSwitch`"):
        L.Trainer(strategy=BAdamStrategy(), callbacks=[BlockSwitch(every=1), BlockSwitch(every=2)])


# ------------------------------------------------------------------------------------------------ checkpoints
def _checkpoint(tmp_path, strategy: Any, num_layers: int = 2) -> str:
    trainer = L.Trainer(
        strategy=strategy,
        precision="bf16-true",
        max_steps=1,
        callbacks=[BlockSwitch(every=1)] if strategy != "auto" else [],
        **trainer_kwargs(tmp_path),
    )
    trainer.fit(LlamaModule(num_layers=num_layers, hidden=16, n=4))
    path = tmp_path / "written.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def test_resuming_a_checkpoint_not_written_by_badam_says_how_to_start_from_its_weights(tmp_path):
    path = _checkpoint(tmp_path, "auto")
    with pytest.raises(MisconfigurationException) as err:
        _trainer(tmp_path, max_steps=2).fit(LlamaModule(num_layers=2, hidden=16, n=4), ckpt_path=path)
    message = str(err.value)
    assert "not written by a BAdam strategy" in message
    assert "model.load_state_dict(torch.load(path)['state_dict'])" in message and "without ckpt_path" in message


def test_resuming_another_models_checkpoint_names_the_mismatch(tmp_path):
    path = _checkpoint(tmp_path, BAdamStrategy(), num_layers=3)
    with pytest.raises(
        MisconfigurationException, match=r"(?s)another model.*Unexpected key\(s\) in state_dict: \"model.model.layers.2"
    ):
        _trainer(tmp_path, max_steps=2).fit(LlamaModule(num_layers=2, hidden=16, n=4), ckpt_path=path)
