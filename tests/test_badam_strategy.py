"""BAdam on one device, end to end with a real Trainer and a tiny Hugging Face Llama."""

from __future__ import annotations

import gc
import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import LlamaModule, token_loader, trainer_kwargs, weights

from lightning_memopt import BAdamStrategy, BlockSwitch
from lightning_memopt.compat import is_fake


class Probe(Callback):
    """Records what the trainer really holds at each optimizer step."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.after: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        strategy = trainer.strategy
        masters = strategy.master_params
        opt_params = [p for g in optimizer.param_groups for p in g["params"]]
        self.records.append(
            {
                "step": trainer.global_step,
                "active": strategy.active_block,
                "active_names": set(strategy.blocks[strategy.active_block].param_names),
                "master_names": set(masters),
                "opt_is_masters": {id(p) for p in opt_params} == {id(m) for m in masters.values()},
                "opt_dtypes": {p.dtype for p in opt_params},
                "weight_dtypes": {p.dtype for p in pl_module.parameters()},
                "half_grads": [n for n, p in pl_module.named_parameters() if p.grad is not None],
                "requires_grad": {n for n, p in pl_module.named_parameters() if p.requires_grad},
                "master_grad_dtypes": {m.grad.dtype for m in masters.values() if m.grad is not None},
                "state_keys_ok": all(any(k is p for p in opt_params) for k in optimizer.state),
            }
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(weights(pl_module))


def _fp32_live_bytes(shapes: set[tuple[int, ...]]) -> int:
    """Bytes of live FP32 CPU tensors shaped like a parameter (activations and scalars are not copies of weights)."""
    seen: set[int] = set()
    total = 0
    for obj in gc.get_objects():
        try:
            is_tensor = isinstance(obj, torch.Tensor)
        except ReferenceError:
            continue
        if not is_tensor or obj.dtype != torch.float32 or obj.device.type != "cpu" or tuple(obj.shape) not in shapes:
            continue
        if is_fake(obj):  # left by torch.compile's tracing (torchao's optimizers) until gc collects it: no memory
            continue
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


class MemoryProbe(Callback):
    """Mid-block, every FP32 byte alive must belong to the active block's masters, their grads or optimizer state."""

    def __init__(self) -> None:
        self.checks: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # after optimizer.step(): masters, their grads and the freshly updated state are all alive
        gc.collect()
        optimizer = trainer.optimizers[0]
        strategy = trainer.strategy
        numel = sum(m.numel() for m in strategy.master_params.values())
        state_bytes = sum(
            t.untyped_storage().nbytes()
            for s in optimizer.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.ndim > 0
        )
        assert state_bytes == numel * 4 * 2  # AdamW: exp_avg and exp_avg_sq
        expected = numel * 4 * 2 + state_bytes  # masters + FP32 grads + state
        shapes = {tuple(p.shape) for p in pl_module.parameters()}
        self.checks.append((_fp32_live_bytes(shapes), expected))


def test_memory_shape_bf16(tmp_path):
    model = LlamaModule(num_layers=4)
    probe, mem = Probe(), MemoryProbe()
    trainer = L.Trainer(
        strategy=BAdamStrategy(),
        precision="bf16-true",
        max_steps=10,
        callbacks=[BlockSwitch(every=3, order="ascending"), probe, mem],
        **trainer_kwargs(tmp_path),
    )
    trainer.fit(model)
    assert [r["active"] for r in probe.records] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    for rec in probe.records:
        assert rec["weight_dtypes"] == {torch.bfloat16}
        assert rec["master_names"] == rec["active_names"]
        assert rec["opt_is_masters"]
        assert rec["opt_dtypes"] == {torch.float32}
        assert rec["master_grad_dtypes"] == {torch.float32}
        assert rec["half_grads"] == []  # moved into the masters right after backward
        assert rec["requires_grad"] == rec["active_names"]  # frozen blocks never get a gradient
        assert rec["state_keys_ok"]
    # inactive weights are bit-identical across another block's steps; the active block's matrices move (a norm
    # weight of 1.0 may not: a 1e-3 update is below half a bf16 ulp there, and only its FP32 master records it)
    names = list(probe.after[0])
    for step in range(1, len(probe.after)):
        active = probe.records[step]["active_names"]
        changed = {n for n in names if not torch.equal(probe.after[step - 1][n], probe.after[step][n])}
        assert changed <= active, (step, changed - active)
        assert {n for n in active if n.endswith("proj.weight")} <= changed, step
    # nothing FP32 is alive but the active block's masters, FP32 grads and optimizer state (+ tiny scalars)
    for live, expected in mem.checks:
        assert live == expected, (live, expected)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def _record_run(tmp_path, strategy, precision="32-true", steps=6, module=None, callbacks=()):
    module = module or LlamaModule(num_layers=2, lr=1e-2, weight_decay=0.1)
    seen: list[dict[str, torch.Tensor]] = []

    class Rec(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(weights(pl_module))

    trainer = L.Trainer(
        strategy=strategy,
        precision=precision,
        max_steps=steps,
        callbacks=[Rec(), *callbacks],
        **trainer_kwargs(tmp_path),
    )
    trainer.fit(module)
    return seen, trainer, module


def test_one_block_32_true_equals_adamw(tmp_path):
    reference, _, _ = _record_run(tmp_path, "auto")
    badam, trainer, _ = _record_run(
        tmp_path, BAdamStrategy(block_prefixes=["model"]), callbacks=[BlockSwitch(every=2, order="ascending")]
    )
    assert len(trainer.strategy.blocks) == 1
    assert len(reference) == len(badam) == 6
    for ref_step, badam_step in zip(reference, badam, strict=True):
        for n in ref_step:
            assert torch.equal(ref_step[n], badam_step[n]), n


def test_one_block_bf16_equals_hand_written_master_loop(tmp_path):
    steps, lr = 5, 1e-2
    badam, _, _ = _record_run(
        tmp_path,
        BAdamStrategy(block_prefixes=["model"]),
        precision="bf16-true",
        steps=steps,
        module=LlamaModule(num_layers=2, lr=lr, weight_decay=0.1),
    )
    # the reference: bf16 weights, FP32 masters, FP32 grads, AdamW on the masters, round back to bf16
    module = LlamaModule(num_layers=2, lr=lr, weight_decay=0.1).to(torch.bfloat16)
    params = list(module.parameters())
    masters = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    optimizer = torch.optim.AdamW(masters, lr=lr, weight_decay=0.1)
    batches = iter(token_loader())
    for step in range(steps):
        (x,) = next(batches)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # what Lightning's bf16-true forward context does
        try:
            loss = module.model(input_ids=x, labels=x).loss
        finally:
            torch.set_default_dtype(previous)
        loss.backward()
        for p, m in zip(params, masters, strict=True):
            m.grad = p.grad.float()
            p.grad = None
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for p, m in zip(params, masters, strict=True):
                p.copy_(m)
        for n, p in module.named_parameters():
            assert torch.equal(p, badam[step][n]), (step, n)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_user_optimizer_is_kept(tmp_path, name):
    # SGD's first steps are lr * grad: large enough to show in bf16 weights only with a large lr
    module = LlamaModule(num_layers=3, optimizer=name, lr=1.0 if name == "sgd" else 1e-2)
    made: list[torch.optim.Optimizer] = []
    original = module.configure_optimizers

    def configure_optimizers():
        made.append(original())
        return made[-1]

    module.configure_optimizers = configure_optimizers
    before = weights(module)
    trainer = L.Trainer(
        strategy="badam",
        precision="bf16-true",
        max_steps=4,
        callbacks=[BlockSwitch(every=2, order="fixed", start=1)],
        **trainer_kwargs(tmp_path),
    )
    trainer.fit(module)
    assert trainer.optimizers[0] is made[0]
    after = weights(module)
    changed = {n for n in before if not torch.equal(before[n].to(after[n].dtype), after[n])}
    layer1 = set(trainer.strategy.blocks[1].param_names)
    assert changed <= layer1
    assert {n for n in layer1 if n.endswith("proj.weight")} <= changed
    # after fit the model is trainable as before, and the optimizer still holds the last block's masters
    assert all(p.requires_grad for p in module.parameters())
    masters = trainer.strategy.master_params
    assert {id(p) for g in made[0].param_groups for p in g["params"]} == {id(m) for m in masters.values()}


class GroupedModule(LlamaModule):
    """Per-group weight decay and learning rate, the way fine-tuning scripts build them."""

    def configure_optimizers(self):
        decay = [p for n, p in self.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.named_parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0, "lr": 5e-3}], lr=1e-2
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_param_groups_and_step_scheduler_match_plain_run(tmp_path):
    """32-true with one block: grouped options and a per-step scheduler behave exactly as without BAdam."""
    lrs: dict[str, list[list[float]]] = {"auto": [], "badam": []}

    class LrRec(Callback):
        def __init__(self, key):
            self.key = key

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            lrs[self.key].append([g["lr"] for g in optimizer.param_groups])

    ref, _, _ = _record_run(tmp_path, "auto", module=GroupedModule(num_layers=2), callbacks=[LrRec("auto")])
    got, _, _ = _record_run(
        tmp_path,
        BAdamStrategy(block_prefixes=["model"]),
        module=GroupedModule(num_layers=2),
        callbacks=[LrRec("badam"), BlockSwitch(every=2, order="ascending")],
    )
    assert lrs["auto"] == lrs["badam"]
    assert lrs["badam"][0] != lrs["badam"][-1]
    for r, g in zip(ref, got, strict=True):
        for n in r:
            assert torch.equal(r[n], g[n]), n


def test_scheduler_continues_across_switches_and_lr_monitor_logs(tmp_path):
    module = GroupedModule(num_layers=3)
    seen: list[tuple[int, float, int]] = []

    class Rec(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            groups = optimizer.param_groups
            seen.append((trainer.strategy.active_block, groups[0]["lr"], len(groups[0]["params"])))

    logger = CSVLogger(tmp_path, name="lr")
    trainer = L.Trainer(
        strategy=BAdamStrategy(),
        precision="bf16-true",
        max_steps=6,
        callbacks=[BlockSwitch(every=2, order="ascending"), Rec(), LearningRateMonitor(logging_interval="step")],
        **trainer_kwargs(tmp_path, logger=logger, log_every_n_steps=1),
    )
    trainer.fit(module)
    assert [s[0] for s in seen] == [0, 0, 1, 1, 2, 2]
    assert [s[1] for s in seen] == pytest.approx([1e-2 / (1 + i) for i in range(6)])
    # each group holds only the active layer's masters: 7 matrices per Llama layer, the 2 norms in the other group
    assert {s[2] for s in seen} == {7}
    metrics = (tmp_path / "lr" / "version_0" / "metrics.csv").read_text()
    header = metrics.splitlines()[0]
    assert "lr-AdamW" in header and "badam/block" in header


def test_optimizer_state_reset_on_switch_unless_kept(tmp_path):
    def run(keep: bool) -> list[tuple[int, int]]:
        steps: list[tuple[int, int]] = []

        class Rec(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                # after the step: every tensor in state has its step count
                optimizer = trainer.optimizers[0]
                counts = {int(s["step"]) for s in optimizer.state.values()}
                assert len(counts) == 1
                steps.append((trainer.strategy.active_block, counts.pop()))

        trainer = L.Trainer(
            strategy=BAdamStrategy(keep_optimizer_state=keep),
            precision="bf16-true",
            max_steps=8,
            callbacks=[BlockSwitch(every=2, order="ascending"), Rec()],
            **trainer_kwargs(tmp_path),
        )
        trainer.fit(LlamaModule(num_layers=2))
        return steps

    assert run(keep=False) == [(0, 1), (0, 2), (1, 1), (1, 2), (0, 1), (0, 2), (1, 1), (1, 2)]
    assert run(keep=True) == [(0, 1), (0, 2), (1, 1), (1, 2), (0, 3), (0, 4), (1, 3), (1, 4)]


def test_default_block_switch_is_added_and_announced(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        trainer = L.Trainer(strategy="badam", precision="bf16-true", max_steps=2, **trainer_kwargs(tmp_path))
        trainer.fit(LlamaModule(num_layers=2))
    switches = [c for c in trainer.callbacks if isinstance(c, BlockSwitch)]
    assert len(switches) == 1 and switches[0].every == 100 and switches[0].order == "random"
    assert sum("no BlockSwitch callback was given" in r.getMessage() for r in caplog.records) == 1


def test_progress_bar_and_logger_show_active_block(tmp_path, caplog):
    logger = CSVLogger(tmp_path, name="blocks")
    with caplog.at_level(logging.INFO):
        trainer = L.Trainer(
            strategy="badam",
            precision="bf16-true",
            max_steps=4,
            callbacks=[BlockSwitch(every=2, order="descending")],
            **trainer_kwargs(tmp_path, logger=logger, log_every_n_steps=1, enable_progress_bar=True),
        )
        trainer.fit(LlamaModule(num_layers=3))
    # the bar gets the index as text (a logged number would show as 1.000); the logger gets the number
    assert trainer.progress_bar_metrics["block"] == "1/3"
    assert "badam/block" not in trainer.progress_bar_metrics
    rows = (tmp_path / "blocks" / "version_0" / "metrics.csv").read_text().splitlines()
    col = rows[0].split(",").index("badam/block")
    logged = [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]]
    assert logged == [2.0, 2.0, 1.0, 1.0]
    messages = [r.getMessage() for r in caplog.records if r.name == "lightning_memopt.block_switch"]
    assert any("starts with block 2/3" in m for m in messages)
    # each switch is a DEBUG record, so INFO shows none (tests/test_quiet_run.py checks what each level shows)
    assert not any("switched to" in m for m in messages)


class ManualModule(LlamaModule):
    def __init__(self):
        super().__init__(num_layers=2)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        opt.step()
        opt.zero_grad()


class TwoOptimizers(LlamaModule):
    def configure_optimizers(self):
        params = list(self.parameters())
        return torch.optim.AdamW(params[:5]), torch.optim.AdamW(params[5:])


class LBFGSModule(LlamaModule):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters())


@pytest.mark.parametrize(
    ("module_cls", "precision", "match"),
    [
        (ManualModule, "bf16-true", "automatic optimization"),
        (TwoOptimizers, "bf16-true", "exactly one optimizer.*param groups"),
        (LBFGSModule, "bf16-true", "LBFGS"),
        (LlamaModule, "bf16-mixed", "bf16-true"),
        (LlamaModule, "16-mixed", "no weight memory"),
    ],
)
def test_unsupported_setups_raise_clear_errors(tmp_path, module_cls, precision, match):
    trainer = L.Trainer(strategy="badam", precision=precision, max_steps=1, **trainer_kwargs(tmp_path))
    with pytest.raises((MisconfigurationException, RuntimeError), match=match):
        trainer.fit(module_cls() if module_cls is not LlamaModule else LlamaModule(num_layers=2))


def test_block_switch_needs_badam(tmp_path):
    trainer = L.Trainer(max_steps=1, callbacks=[BlockSwitch()], **trainer_kwargs(tmp_path))
    with pytest.raises(MisconfigurationException, match="strategy='badam'"):
        trainer.fit(LlamaModule(num_layers=2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"every": 0}, "positive"), ({"every": -3}, "positive"), ({"order": "sideways"}, "ascending, descending")],
)
def test_block_switch_validates_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockSwitch(**kwargs)


def test_start_out_of_range(tmp_path):
    trainer = L.Trainer(
        strategy="badam",
        precision="bf16-true",
        max_steps=1,
        callbacks=[BlockSwitch(start=9)],
        **trainer_kwargs(tmp_path),
    )
    with pytest.raises(MisconfigurationException, match="has 2 blocks"):
        trainer.fit(LlamaModule(num_layers=2))


def test_random_order_visits_every_block_once_per_pass(tmp_path):
    seen: list[int] = []

    class Rec(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(trainer.strategy.active_block)

    trainer = L.Trainer(
        strategy="badam",
        precision="bf16-true",
        max_steps=12,
        callbacks=[BlockSwitch(every=1, order="random", seed=3), Rec()],
        **trainer_kwargs(tmp_path),
    )
    trainer.fit(LlamaModule(num_layers=4, n=48))
    passes = [seen[i : i + 4] for i in range(0, 12, 4)]
    assert all(sorted(p) == [0, 1, 2, 3] for p in passes)
    assert len({tuple(p) for p in passes}) > 1  # a fresh permutation each pass


def test_strategy_surface_and_registry():
    from lightning.pytorch.strategies import StrategyRegistry

    assert "badam" in StrategyRegistry
    strategy = BAdamStrategy()
    assert strategy.blocks == [] and strategy.active_block is None
    with pytest.raises(RuntimeError, match="not set up"):
        strategy.activate(0)


def test_activation_hooks_see_every_activation(tmp_path):
    seen: list[tuple[int, int]] = []

    class Listener(Callback):
        def on_fit_start(self, trainer, pl_module):
            self.handle = trainer.strategy.register_activation_hook(
                lambda strategy, index: seen.append((index, len(strategy.master_params)))
            )

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                self.handle.remove()

    trainer = L.Trainer(
        strategy="badam",
        precision="bf16-true",
        max_steps=5,
        callbacks=[Listener(), BlockSwitch(every=1, order="ascending")],
        **trainer_kwargs(tmp_path),
    )
    trainer.fit(LlamaModule(num_layers=2))
    # the activations for steps 0, 1 and 2 are seen; the hook is removed once 3 steps are done, before step 3's
    assert seen == [(0, 9), (1, 9), (0, 9)]


def test_backward_stops_at_the_active_block_under_hf_checkpointing(tmp_path):
    """transformers' checkpointing makes embeddings' output require grad; BAdam swaps that for its own input hook."""
    module = LlamaModule(num_layers=3)
    hf = module.model
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert hf._require_grads_hooks  # installed by transformers
    below_requires_grad: list[bool] = []
    hf.model.layers[0].register_forward_hook(lambda m, i, out: below_requires_grad.append(out.requires_grad))
    hooks_during_fit: list[int] = []

    class Rec(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            hooks_during_fit.append(len(hf._require_grads_hooks))
            assert all(m.grad is not None for m in trainer.strategy.master_params.values())

    trainer = L.Trainer(
        strategy="badam",
        precision="bf16-true",
        max_steps=2,
        callbacks=[BlockSwitch(order="fixed", start=2), Rec()],
        **trainer_kwargs(tmp_path),
    )
    trainer.fit(module)
    assert below_requires_grad and not any(below_requires_grad)  # nothing below the active layer joins backward
    assert hooks_during_fit == [0, 0]
    assert hf._require_grads_hooks  # given back after fit


def test_checkpoint_of_another_model_is_refused_with_the_fix(tmp_path):
    trainer = L.Trainer(strategy="badam", precision="bf16-true", max_steps=1, **trainer_kwargs(tmp_path))
    trainer.fit(LlamaModule(num_layers=2))
    path = tmp_path / "two_layers.ckpt"
    trainer.save_checkpoint(path)
    other = L.Trainer(strategy="badam", precision="bf16-true", max_steps=2, **trainer_kwargs(tmp_path))
    with pytest.raises(MisconfigurationException, match=r"another model or configuration.*without ckpt_path"):
        other.fit(LlamaModule(num_layers=3), ckpt_path=path)


@pytest.mark.parametrize("tied", [False, True])
def test_head_block_trains_the_final_norm_and_a_tied_head(tmp_path, tied):
    # include_lm_head=True: the head block holds the final norm and the head; a tied head through the shared weight
    # (the embedding is no block of its own here). It is the last block, so "descending" trains it first.
    def module():
        torch.manual_seed(0)
        return LlamaModule(num_layers=2, lr=1e-2, weight_decay=0.1, tie_word_embeddings=tied)

    head = ["model.model.norm.weight", "model.model.embed_tokens.weight" if tied else "model.lm_head.weight"]
    start = weights(module())
    badam, trainer, _ = _record_run(
        tmp_path, BAdamStrategy(include_lm_head=True), steps=2, module=module(),
        callbacks=[BlockSwitch(every=2, order="descending")],
    )  # fmt: skip
    assert trainer.strategy.blocks[-1].name == "lm_head"
    assert sorted(trainer.strategy.blocks[-1].param_names) == sorted(head)
    # the reference: plain AdamW on exactly those parameters, everything else frozen
    reference_module = module()
    for n, p in reference_module.named_parameters():
        p.requires_grad_(n in head)
    reference, _, _ = _record_run(tmp_path, "auto", steps=2, module=reference_module)
    for ref_step, badam_step in zip(reference, badam, strict=True):
        for n in ref_step:
            assert torch.equal(ref_step[n], badam_step[n]), n
    for n in start:
        moved = (badam[-1][n] - start[n]).abs().max().item()
        # two AdamW steps at lr 1e-2 move every trained element by about 2e-2; nothing else moves at all
        assert (moved > 1e-2) if n in head else (moved == 0.0), (n, moved)


def test_layers_per_block_trains_groups_of_layers_like_the_same_explicit_blocks(tmp_path):
    def module():
        torch.manual_seed(0)
        return LlamaModule(num_layers=4, lr=1e-2)

    start = weights(module())
    grouped, trainer, _ = _record_run(
        tmp_path, BAdamStrategy(layers_per_block=2), steps=4, module=module(),
        callbacks=[BlockSwitch(every=2, order="ascending")],
    )  # fmt: skip
    layers = [f"model.model.layers.{i}" for i in range(4)]
    assert [b.name for b in trainer.strategy.blocks] == [f"{layers[0]} + {layers[1]}", f"{layers[2]} + {layers[3]}"]
    explicit, _, _ = _record_run(
        tmp_path, BAdamStrategy(block_prefixes=[layers[:2], layers[2:]]), steps=4, module=module(),
        callbacks=[BlockSwitch(every=2, order="ascending")],
    )  # fmt: skip
    for a, b in zip(grouped, explicit, strict=True):
        assert all(torch.equal(a[n], b[n]) for n in a)

    def moved(step: int, prefix: str) -> float:
        return max((grouped[step][n] - start[n]).abs().max().item() for n in start if n.startswith(prefix + "."))

    # steps 0-1 train layers 0 and 1 together (two AdamW steps at lr 1e-2: ~2e-2 each), steps 2-3 layers 2 and 3
    assert moved(1, layers[0]) > 1e-2 and moved(1, layers[1]) > 1e-2
    assert moved(1, layers[2]) == moved(1, layers[3]) == 0.0
    assert moved(3, layers[2]) > 1e-2 and moved(3, layers[3]) > 1e-2


# ------------------------------------------------------------------------------------------------ callback protocol
class NanLossAt(LlamaModule):
    def __init__(self, nan_step: int, **kwargs):
        super().__init__(**kwargs)
        self.nan_step = nan_step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step == self.nan_step else loss


def test_callbacks_find_the_strategy_its_blocks_and_skipped_steps_through_the_protocol(tmp_path):
    from lightning_memopt import BAdamDDPStrategy, BAdamFSDPStrategy
    from lightning_memopt.strategies import block_strategy

    seen: list[dict] = []

    class Probe(Callback):
        def on_fit_start(self, trainer, pl_module):
            strategy = block_strategy(trainer)
            assert strategy is trainer.strategy and not strategy.shards_parameters
            # run_now: called at once with the current block (BlockSwitch, listed first, activated block 0 already)
            self.now: list = []
            strategy.register_activation_hook(lambda s, i: self.now.append(i), run_now=True)
            assert self.now == [0]

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            strategy = block_strategy(trainer)
            grads = [m.grad for m in strategy.master_params.values()]
            seen.append({"skipped": strategy.step_skipped, "has_grads": all(g is not None for g in grads)})

    probe = Probe()
    trainer = L.Trainer(
        strategy="badam",
        precision="bf16-true",
        max_steps=4,
        callbacks=[BlockSwitch(every=2, order="ascending"), probe],
        **trainer_kwargs(tmp_path),
    )
    with pytest.warns(UserWarning, match="inf/NaN gradients at step 1"):
        trainer.fit(NanLossAt(nan_step=1, num_layers=2, hidden=16))
    # step 1's NaN gradients were dropped: the protocol says so, and only for that step
    assert [s["skipped"] for s in seen] == [False, True, False, False]
    assert [s["has_grads"] for s in seen] == [True, False, True, True]
    assert probe.now == [0, 1]  # and the hook followed the switch at step 2
    plain = L.Trainer(max_steps=1, **trainer_kwargs(tmp_path))
    assert block_strategy(plain) is None
    assert not BAdamDDPStrategy.shards_parameters and BAdamFSDPStrategy.shards_parameters
