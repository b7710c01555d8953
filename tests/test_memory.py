"""Memory accounting and MemoryReport: exact bytes per category, no double counting, the prediction, memory.json."""

from __future__ import annotations

import doctest
import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from models import LlamaModule, trainer_kwargs
from torch import nn

import lightning_memopt.memory
from lightning_memopt import BAdamStrategy, BlockSwitch
from lightning_memopt.memory import (
    MemoryReport,
    StorageLedger,
    account_memory,
    format_report,
    optimizer_state_bytes,
    peak_memory,
    predict_memory,
)

JSON_KEYS = {"weights", "masters", "grads", "optimizer_state", "total", "predicted", "peak"}


class Snapshot(Callback):
    """Takes the accounting itself after every optimizer step, with what the test needs to check it."""

    def __init__(self) -> None:
        self.taken: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        strategy = trainer.strategy
        masters = getattr(strategy, "master_params", {})
        optimizer = trainer.optimizers[0]
        self.taken.append(
            {
                "memory": account_memory(pl_module, [optimizer], masters),
                "prediction": predict_memory(
                    pl_module, [optimizer], masters, blocks=len(strategy.blocks) if masters else None
                ),
                "active_numel": sum(m.numel() for m in masters.values()),
                "active_tensors": len(masters),
            }
        )


def fit(tmp_path, module, *, badam: bool, precision: str, steps: int = 5, every: int = 2, report=None):
    snapshot = Snapshot()
    callbacks: list[Callback] = [snapshot]
    if badam:
        callbacks.append(BlockSwitch(every=every, order="ascending"))
    if report is not None:
        callbacks.append(report)
    trainer = L.Trainer(
        **trainer_kwargs(
            tmp_path,
            strategy=BAdamStrategy() if badam else "auto",
            precision=precision,
            max_steps=steps,
            callbacks=callbacks,
        )
    )
    trainer.fit(module)
    return trainer, snapshot.taken


def test_badam_bf16_exact_accounting(tmp_path):
    module = LlamaModule(num_layers=4, hidden=32)
    numel = sum(p.numel() for p in module.parameters())
    buffers = 2 * sum(b.numel() for b in module.buffers())  # rotary frequencies, cast to bf16 by bf16-true
    _, taken = fit(tmp_path, module, badam=True, precision="bf16-true")
    for snap in taken:
        memory, active = snap["memory"], snap["active_numel"]
        assert 0 < active < numel / 4
        assert memory.weights_by_dtype == {"bfloat16": 2 * numel}
        assert memory.masters == 4 * active
        assert memory.grads == 4 * active  # FP32 master grads; the half grads were freed
        state = memory.optimizer_state_by_key
        assert state["exp_avg"] + state["exp_avg_sq"] == 8 * active
        assert state["step"] == 4 * snap["active_tensors"]  # torch keeps one FP32 step scalar per parameter
        prediction = snap["prediction"]
        # bf16 weights, then per active parameter an FP32 master, gradient and two moments, and a step per tensor
        expected = 2 * numel + buffers + 16 * active + 4 * snap["active_tensors"]
        assert prediction.total == memory.total == expected
        assert (prediction.masters, prediction.grads) == (memory.masters, memory.grads)
        assert prediction.formula == "2M + 16M/D"


def test_plain_adamw_32_true_exact_accounting(tmp_path):
    module = LlamaModule(num_layers=2, hidden=32)
    numel = sum(p.numel() for p in module.parameters())
    tensors = len(list(module.parameters()))
    _, taken = fit(tmp_path, module, badam=False, precision="32-true", steps=2)
    memory = taken[-1]["memory"]
    assert memory.weights_by_dtype == {"float32": 4 * numel}
    assert memory.masters == 0
    assert memory.grads == 4 * numel
    assert memory.optimizer_state == 8 * numel + 4 * tensors
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    assert taken[-1]["prediction"].total == memory.total == 16 * numel + 4 * tensors + buffers
    assert taken[-1]["prediction"].formula == "16M"


def test_badam_32_true_masters_are_the_weights(tmp_path):
    module = LlamaModule(num_layers=2, hidden=32)
    _, taken = fit(tmp_path, module, badam=True, precision="32-true", steps=3)
    memory = taken[-1]["memory"]
    assert memory.masters == 0  # an FP32 weight is its own master: counted once, as a weight
    assert memory.grads == 4 * taken[-1]["active_numel"]
    assert taken[-1]["prediction"].total == memory.total


def test_tied_gpt2_embeddings_are_counted_once(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    class GPT2Module(LlamaModule):
        def __init__(self):
            super().__init__(num_layers=1, hidden=32)
            torch.manual_seed(0)
            self.model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32))

    module = GPT2Module()
    assert module.model.lm_head.weight is module.model.transformer.wte.weight
    unique = sum(p.numel() for p in module.parameters())
    naive = sum(t.numel() for t in module.state_dict().values() if t.is_floating_point())
    assert naive > unique  # the state dict lists the tied matrix twice: a naive count would be wrong
    _, taken = fit(tmp_path, module, badam=False, precision="32-true", steps=1)
    memory = taken[-1]["memory"]
    assert memory.weights == 4 * unique
    assert memory.grads == 4 * unique
    assert taken[-1]["prediction"].total == memory.total


def test_tensors_sharing_storage_are_counted_once():
    first = nn.Linear(8, 8, bias=False)
    second = nn.Linear(8, 8, bias=False)
    second.weight = nn.Parameter(first.weight.data)  # another Parameter object over the same storage
    view = nn.Module()
    view.head = first
    view.tail = second
    view.register_buffer("window", first.weight.data[:2])  # a buffer that views a weight
    assert len(list(view.parameters())) == 2
    memory = account_memory(view)
    assert memory.weights == 8 * 8 * 4
    assert memory.buffers == 0


OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    "adam-amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-3, amsgrad=True),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-3),
    "adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
    "adamw8bit": lambda ps: __import__("bitsandbytes").optim.AdamW8bit(ps, lr=1e-3),
    "bnb-adamw32": lambda ps: __import__("bitsandbytes").optim.AdamW(ps, lr=1e-3),
    "sgd8bit": lambda ps: __import__("bitsandbytes").optim.SGD8bit(ps, lr=1e-3, momentum=0.9),
}


def _expected_state_bytes(name: str, dtype: torch.dtype) -> int:
    """The state of Linear(96, 64) + Linear(64, 8) after one step, from each optimizer's documented layout (not from
    the accounting code): torch keeps moments in the parameter's dtype and an FP32 step scalar per tensor; Adafactor
    a row and a column vector per matrix; bitsandbytes FP32 state, or for tensors of >= 4096 values uint8 codes, one
    FP32 maximum per 256 values and a 256-entry FP32 quantization map per moment."""
    w1, b1, w2, b2 = 64 * 96, 64, 8 * 64, 8
    numel, tensors, size = w1 + b1 + w2 + b2, 4, torch.finfo(dtype).bits // 8
    small = b1 + w2 + b2  # below bitsandbytes' min_8bit_size: 32-bit state
    eight_bit_moment = w1 + 4 * (w1 // 256) + 4 * 256
    return {
        "adamw": 2 * numel * size + 4 * tensors,
        "adam-amsgrad": 3 * numel * size + 4 * tensors,
        "sgd-momentum": numel * size,
        "sgd": 0,
        "adafactor": (64 + 96 + b1 + 8 + 64 + b2) * size + 4 * tensors,
        "adamw8bit": 2 * eight_bit_moment + 2 * 4 * small,
        "bnb-adamw32": 2 * 4 * numel,
        "sgd8bit": eight_bit_moment + 4 * small,
    }[name]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prediction_equals_accounting_for_each_optimizer(name, dtype):
    # a matrix above bitsandbytes' min_8bit_size (8-bit state), a small one and a vector (32-bit state)
    model = nn.Sequential(nn.Linear(96, 64), nn.Linear(64, 8)).to(dtype)
    optimizer = OPTIMIZERS[name](model.parameters())
    model(torch.randn(4, 96, dtype=dtype)).sum().backward()
    optimizer.step()
    memory = account_memory(model, [optimizer])
    prediction = predict_memory(model, [optimizer])
    expected = _expected_state_bytes(name, dtype)
    assert memory.optimizer_state == expected
    assert prediction.optimizer_state == expected
    numel = sum(p.numel() for p in model.parameters())
    size = torch.finfo(dtype).bits // 8
    assert prediction.total == memory.total == 2 * numel * size + expected  # weights and their gradients
    assert prediction.notes == []


def test_eight_bit_state_counts_codes_and_absmax():
    import bitsandbytes as bnb

    weight = nn.Parameter(torch.randn(64, 96))
    optimizer = bnb.optim.AdamW8bit([weight], lr=1e-3)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    state = account_memory(nn.Module(), [optimizer]).optimizer_state_by_key
    blocks = -(-weight.numel() // 256)
    assert state["state1"] == state["state2"] == weight.numel()  # one uint8 code per value
    assert state["absmax1"] == state["absmax2"] == 4 * blocks
    assert state["qmap1"] == state["qmap2"] == 256 * 4
    assert optimizer_state_bytes(optimizer, weight) == 2 * (weight.numel() + 4 * blocks)


def test_unknown_optimizer_is_predicted_as_accounted_with_a_note():
    layer = nn.Linear(4, 4)
    optimizer = torch.optim.RMSprop(layer.parameters())
    layer(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    memory = account_memory(layer, [optimizer])
    prediction = predict_memory(layer, [optimizer], accounted=memory)
    assert prediction.optimizer_state == memory.optimizer_state > 0
    assert "RMSprop" in prediction.notes[0]


def test_other_counts_live_tensors_outside_the_categories():
    layer = nn.Linear(4, 4)
    extra = torch.zeros(10_000)
    memory = account_memory(layer, count_other=True)
    assert memory.other is not None and memory.other >= extra.numel() * 4
    assert memory.total == memory.weights  # `other` is reported apart from the total
    assert account_memory(layer).other is None


def test_memory_report_writes_json_and_predicts_within_one_percent(tmp_path, capsys):
    report = MemoryReport(every_n_steps=2)
    module = LlamaModule(num_layers=4, hidden=32)
    _, taken = fit(tmp_path, module, badam=True, precision="bf16-true", steps=5, report=report)
    data = json.loads((tmp_path / "memory.json").read_text())
    assert data.keys() >= JSON_KEYS
    assert all(isinstance(data[k], int) for k in JSON_KEYS)
    assert (
        data["total"] == data["weights"] + data["buffers"] + data["masters"] + data["grads"] + data["optimizer_state"]
    )
    assert abs(data["predicted"] / data["total"] - 1) < 0.01
    assert data["peak"] >= data["total"]
    # measured after steps 1, 2, 4 and at the end; the reported one is the largest
    assert data["details"]["measurements"] == 4
    assert data["total"] == max(s["memory"].total for s in taken)
    assert data["details"]["blocks"] == 4
    assert data["details"]["formula"] == "2M + 16M/D"
    assert data["masters"] == 4 * data["details"]["trained_params"]
    assert report.report == data


def test_memory_report_logs_to_the_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = LlamaModule(num_layers=2, hidden=32)
    trainer = L.Trainer(
        **trainer_kwargs(
            tmp_path,
            precision="32-true",
            max_steps=3,
            logger=CSVLogger(tmp_path, name="", version=""),
            callbacks=[MemoryReport(every_n_steps=1, count_other=False)],
        )
    )
    trainer.fit(module)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    for key in ("memory/weights_mib", "memory/grads_mib", "memory/optimizer_state_mib", "memory/predicted_mib"):
        assert key in header
    assert (tmp_path / "memory.json").exists()


def test_memory_report_rejects_a_negative_interval():
    with pytest.raises(ValueError, match="every_n_steps"):
        MemoryReport(every_n_steps=-1)


def test_ledger_peak_and_table():
    ledger = StorageLedger()
    t = torch.zeros(16)
    assert ledger.add(t) == 64 and ledger.add(t[3:]) == 0 and t in ledger
    assert ledger.add(torch.empty(0)) == 0
    peak, source = peak_memory("cpu")
    assert peak is not None and peak > 0 and "process" in source
    text = format_report({"weights": 3 * 2**20, "total": 3 * 2**20, "predicted": 3 * 2**20, "step": 7, "details": {}})
    assert "3.00 MiB" in text and "step 7" in text


def test_docstring_examples():
    result = doctest.testmod(lightning_memopt.memory, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_reset_peak_rss_forgets_an_earlier_peak() -> None:
    import subprocess
    import sys

    # in a fresh process: a 300 MB buffer sets the high-water mark, is freed, and the reset forgets it
    code = (
        "import torch\n"
        "from lightning_memopt.memory import peak_memory, reset_peak_rss, current_rss\n"
        "x = torch.ones(300 * 2**20, dtype=torch.uint8); del x\n"
        "before = peak_memory('cpu')[0]\n"
        "ok = reset_peak_rss()\n"
        "after = peak_memory('cpu')[0]\n"
        "print(ok, before, after, current_rss())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    ok, before, after, now = out[0] == "True", int(out[1]), int(out[2]), int(out[3])
    if sys.platform.startswith("linux"):
        assert ok
        assert before - after > 250 * 2**20  # the freed buffer no longer counts
        assert after < now + 32 * 2**20  # the peak restarts from (about) the current size
    else:
        assert not ok and before == after


def test_fake_tensors_left_by_tracing_are_not_counted():
    # Lightning's model summary counts FLOPs on fake tensors; until the garbage collector frees them, the scan for
    # "other" tensors meets them. They own no memory: a data pointer of 0, or one whose access raises
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    fakes = [mode.from_tensor(torch.arange(1000)) for _ in range(2)]
    torch._C._set_throw_on_mutable_data_ptr(fakes[1])
    real = torch.arange(1000)
    ledger = StorageLedger()
    assert [ledger.add(f) for f in fakes] == [0, 0]
    assert ledger.add(real) == 8000
    layer = nn.Linear(4, 4)
    memory = account_memory(layer, count_other=True)  # meets both fakes in gc.get_objects() and does not fail
    assert memory.weights == (16 + 4) * 4
    assert memory.other is not None and memory.other >= real.numel() * 8  # the real tensors still count
