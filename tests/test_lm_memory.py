"""Where the pack lowers the peak itself (issue #15): the chunked loss and building from a config without an FP32 copy.

The chunked loss (``CausalLM(loss_chunk_size=...)``, :func:`chunked_next_token_loss`) must compute what the full logits
compute -- the loss, every gradient, a BAdam run step by step -- while the graph holds no more than one chunk's
logits; models it cannot serve fall back to the full logits. ``CausalLM(config=..., dtype="bfloat16")`` must build the
same model as the FP32 init would (the same distribution, tied weights tied, exact rotary frequencies) without ever
holding an FP32 weight.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_memopt import BAdamStrategy, BlockSwitch
from lightning_memopt.data import TextDataModule
from lightning_memopt.lm import IGNORE_INDEX, TINY_LLAMA, CausalLM, chunked_next_token_loss, next_token_loss

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def _batch(key: str, rows: int = 3, seq: int = 13, vocab: int = 256) -> dict[str, Tensor]:
    ids = torch.randint(0, vocab, (rows, seq))
    if key == "labels":
        labels = ids.clone()
        labels[0, :4] = IGNORE_INDEX  # a prompt
        labels[2, -3:] = IGNORE_INDEX  # padding
        return {"input_ids": ids, "labels": labels}
    targets = torch.randint(0, vocab, (rows, seq))
    targets[1, ::3] = IGNORE_INDEX
    return {"input_ids": ids, "targets": targets}


def _loss_and_grads(module: CausalLM, batch: dict[str, Tensor], chunk: int | None) -> tuple[Tensor, Tensor, dict]:
    module.loss_chunk_size = chunk
    module.zero_grad()
    loss, tokens = module._loss(batch)  # what training_step and validation_step compute
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), tokens, grads


def _assert_same(module: CausalLM, batch: dict[str, Tensor], chunk: int, rtol: float, atol: float) -> None:
    full, full_tokens, full_grads = _loss_and_grads(module, batch, None)
    chunked, tokens, grads = _loss_and_grads(module, batch, chunk)
    assert int(tokens) == int(full_tokens) > 0
    torch.testing.assert_close(chunked, full, rtol=rtol, atol=0.0)
    trained = [n for n, p in module.named_parameters() if p.requires_grad]
    assert sorted(grads) == sorted(full_grads) == sorted(trained)
    for name, grad in grads.items():
        scale = full_grads[name].abs().max().item()
        torch.testing.assert_close(grad, full_grads[name], rtol=rtol, atol=atol * scale, msg=name)


@pytest.mark.parametrize("chunk", [5, 1000])  # 5 does not divide the 39 tokens; 1000 is one chunk
@pytest.mark.parametrize("key", ["targets", "labels"])
@pytest.mark.parametrize(("dtype", "rtol", "atol"), [(torch.float32, 1e-6, 1e-5), (torch.bfloat16, 1e-5, 2e-2)])
def test_chunked_loss_and_every_gradient_equal_the_full_logits(
    key: str, chunk: int, dtype: torch.dtype, rtol: float, atol: float
) -> None:
    module = CausalLM(config=TINY).to(dtype)
    # bf16: the head's weight gradient is summed over chunks in bf16 (one rounding per chunk), all else row by row
    _assert_same(module, _batch(key), chunk, rtol, atol)


def test_a_tied_gpt2_head_gets_the_same_gradient_from_both_its_uses(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # two training-mode forwards must compute the same
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    module = CausalLM(model_path=str(tmp_path / "gpt2"), dtype="float32")
    head = module.model.get_output_embeddings()
    assert head.weight is module.model.get_input_embeddings().weight
    _assert_same(module, _batch("labels"), chunk=7, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_peft_lora_with_gradient_checkpointing_gets_the_same_loss_and_adapter_gradients(checkpointing: bool) -> None:
    from peft import LoraConfig, get_peft_model

    module = CausalLM(config=TINY, gradient_checkpointing=checkpointing)
    # as the fine-tuning benchmark's LoRA rows do
    module.model = get_peft_model(module.model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, param in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)  # B = 0 would leave A without gradient
    calls: list[int] = []
    module.model.base_model.model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    _assert_same(module, _batch("labels"), chunk=6, rtol=1e-6, atol=1e-5)
    assert len(calls) == (4 if checkpointing else 2)  # recomputed in both backward passes, or not at all


HEAD = {"model.lm_head.weight", "model.model.norm.weight"}


@pytest.mark.filterwarnings("ignore:BAdam.*stay frozen for the whole run")  # the head-only run
@pytest.mark.parametrize(
    ("checkpointing", "head_trains"), [(False, False), (True, False), (False, True)], ids=["plain", "ckpt", "head"]
)
def test_badam_trains_step_by_step_as_with_the_full_logits(
    tmp_path: Path, checkpointing: bool, head_trains: bool
) -> None:
    # 32 tokens a batch in chunks of 5
    chunked = _badam_run(tmp_path / "chunked", loss_chunk_size=5, checkpointing=checkpointing, head=head_trains)
    full = _badam_run(tmp_path / "full", loss_chunk_size=None, checkpointing=checkpointing, head=head_trains)
    start, chunked, full = chunked[0], chunked[1:], full[1:]
    assert len(chunked) == len(full) == 4
    for step, (a, b) in enumerate(zip(chunked, full, strict=True)):
        for name in a:
            if not head_trains or name not in HEAD:
                # backward below the head is row by row: the same bits here, a bf16 unit in the last place at most
                torch.testing.assert_close(a[name], b[name], rtol=2**-7, atol=1e-5, msg=(step, name))
                continue
            # the head's bf16 weight gradient is rounded once per chunk before the sum: where Adam's update of a
            # near-zero gradient flips sign, that element moves by lr (1e-2) the other way, and then the others a
            # little -- on average a thousandth of how far the weights moved
            differ = (a[name].float() - b[name].float()).abs()
            travelled = (b[name].float() - start[name].float()).abs()
            assert differ.max() <= 1.5e-2 and differ.mean() < 1e-2 * travelled.mean(), (step, name)
    moved = {name for name in start if not torch.equal(chunked[-1][name], start[name])}
    layers = {name for name in start if ".layers." in name}
    assert moved == (HEAD if head_trains else layers)


def _badam_run(root: Path, loss_chunk_size: int | None, checkpointing: bool, head: bool) -> list[dict[str, Tensor]]:
    seed_everything(0)
    module = CausalLM(config=TINY, lr=1e-2, loss_chunk_size=loss_chunk_size, gradient_checkpointing=checkpointing)
    snapshots = [{n: p.detach().to(torch.bfloat16).clone() for n, p in module.named_parameters()}]

    class Snapshot(Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            snapshots.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    # the head block: its weight gradient is summed over the chunks
    blocks = {"block_prefixes": [["model.lm_head", "model.model.norm"]]} if head else {}
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        precision="bf16-true",
        strategy=BAdamStrategy(**blocks),
        max_steps=4,
        limit_val_batches=0,
        callbacks=[BlockSwitch(every=2, order="ascending"), Snapshot()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(module, TextDataModule(seq_len=16, batch_size=2, max_bytes=20_000))
    return snapshots


class _SavedForBackward:
    """Bytes of the distinct storages autograd saves for backward (parameters left out), via the pack hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.storages: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor  # the graph keeps it alive, so no other storage reuses its address meanwhile

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def test_the_graph_holds_one_chunk_of_logits_at_most() -> None:
    vocab, seq, chunk = 32_000, 512, 64
    module = CausalLM(config={**TINY, "num_hidden_layers": 1, "vocab_size": vocab, "max_position_embeddings": seq})
    batch = {"input_ids": torch.randint(0, vocab, (1, seq)), "labels": torch.randint(0, vocab, (1, seq))}
    saved = {}
    for size in (None, chunk):
        module.loss_chunk_size = size
        counter = _SavedForBackward(module)
        with counter.hooks:
            loss, _ = module._loss(batch)
        saved[size] = counter.bytes
        del loss

    logits_rows: list[int] = []
    head = module.model.get_output_embeddings()
    head.register_forward_hook(lambda m, args, out: logits_rows.append(out.shape[0]) if out.size(-1) == vocab else None)
    loss, _ = module._loss(batch)
    in_forward = len(logits_rows)
    loss.backward()
    print(f"saved for backward: full logits {saved[None]:,} B, chunked {saved[chunk]:,} B")

    assert saved[None] >= seq * vocab * 4  # the FP32 log-probabilities of every position
    assert saved[chunk] < saved[None] / 4
    assert saved[chunk] < seq * vocab * 4 / 16
    # the chunks' logits, each computed once forward and once again backward, none longer than a chunk
    assert in_forward == seq // chunk and len(logits_rows) == 2 * in_forward
    assert max(logits_rows) == chunk


def test_models_that_change_the_logits_after_the_head_fall_back_to_the_full_logits(tmp_path: Path) -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=1.0,
    )  # fmt: skip
    Gemma2ForCausalLM(config).save_pretrained(tmp_path / "gemma2")
    module = CausalLM(model_path=str(tmp_path / "gemma2"), dtype="float32", loss_chunk_size=None)
    with torch.no_grad():
        module.model.get_output_embeddings().weight.mul_(30)  # logits of a few units: the cap of 1 bends them
    batch = _batch("labels")
    expected, _ = module._loss(batch)
    hidden = module.model.model(input_ids=batch["input_ids"]).last_hidden_state
    skipped, _ = chunked_next_token_loss(hidden, module.model.get_output_embeddings(), batch, 4)
    assert not torch.allclose(skipped, expected, rtol=1e-3)  # the soft-cap matters: skipping it would be wrong
    module.loss_chunk_size = 4
    with pytest.warns(UserWarning, match="not in chunks: its forward changes the logits after the head"):
        assert torch.equal(module._loss(batch)[0], expected)


class _HalvedLogits(CausalLM):
    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return super().forward(*args, **kwargs) / 2  # nothing in the config says so


def test_a_forward_that_changes_the_head_output_is_noticed_and_computed_in_full() -> None:
    module = _HalvedLogits(config=TINY, loss_chunk_size=4)
    batch = _batch("targets")
    with pytest.warns(UserWarning, match="changes the output of the head"):
        loss, _ = module._loss(batch)
    assert torch.equal(loss, next_token_loss(module(batch["input_ids"]), batch)[0])
    assert module._loss(batch)[0].item() == loss.item()  # warned once; the full path from now on
    assert torch.equal(module.model.get_output_embeddings()(torch.zeros(1, 32)), torch.zeros(1, 256))  # head restored


class _LargestFloat32(TorchDispatchMode):
    """The largest FP32 tensor any operation produces on the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, Tensor) and tensor.device.type == "cpu" and tensor.dtype == torch.float32:
                self.numel = max(self.numel, tensor.numel())
        return out


def test_a_config_built_in_bf16_is_the_fp32_init_without_an_fp32_copy() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {"tie_word_embeddings": True, "max_position_embeddings": 4096, "rope_theta": 500_000.0}
    torch.manual_seed(0)
    reference = CausalLM(config=config)  # dtype "auto": FP32, bit for bit LlamaForCausalLM(config) under the seed
    torch.manual_seed(0)
    plain = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **config}))
    assert all(
        torch.equal(a, b)
        for a, b in zip(reference.model.state_dict().values(), plain.state_dict().values(), strict=True)
    )

    torch.manual_seed(0)
    with _LargestFloat32() as largest:
        built = CausalLM(config=config, dtype="bfloat16")
    model = built.model
    assert largest.numel <= TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"] // 2  # rotary only
    assert model.training and model.dtype == torch.bfloat16 and model.config.dtype == torch.bfloat16
    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head is embedding and head.data_ptr() == embedding.data_ptr()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert tensor.device.type == "cpu" and bool(tensor.isfinite().all()), name
    expected = dict(reference.model.named_parameters())
    for name, param in model.named_parameters():
        assert param.dtype == torch.bfloat16, name
        want = expected[name]
        if want.std() == 0:  # norms: ones
            assert torch.equal(param.float(), want), name
        else:  # the same normal init, other draws
            assert param.float().std().item() == pytest.approx(want.std().item(), rel=0.05), name
            assert abs(param.float().mean().item()) < 0.1 * want.std().item(), name
    buffers = dict(reference.model.named_buffers())
    assert {n for n, _ in model.named_buffers()} == set(buffers) == {
        "model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq",
    }  # fmt: skip
    for name, value in model.named_buffers():
        assert value.dtype == torch.float32 and torch.equal(value, buffers[name]), name

    with _LargestFloat32() as largest:
        CausalLM(config=config)
    assert largest.numel >= TINY_LLAMA["vocab_size"] * TINY_LLAMA["hidden_size"]  # the control: FP32 weights


_PEAK_RSS = """
import json, sys
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # imported before the measurement
from lightning_memopt.lm import CausalLM
from lightning_memopt.memory import current_rss, peak_memory, reset_peak_rss
assert reset_peak_rss()
before = current_rss()
model = CausalLM(config=json.loads(sys.argv[1]), dtype="bfloat16").model
rise = peak_memory("cpu")[0] - before
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"rise": rise, "weights": weights, "embedding": model.get_input_embeddings().weight.nbytes}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="resetting the peak resident set size needs Linux")
def test_building_a_tied_model_in_bf16_peaks_at_its_bf16_weights() -> None:
    # a fresh process: peak RSS (Linux) counts only the pages written; 128 K tokens x 1024, a 256 MiB embedding
    config = {"vocab_size": 131072, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 2,
              "num_attention_heads": 8, "tie_word_embeddings": True}  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, json.dumps(config)], capture_output=True, text=True, check=True
    )
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"peak RSS rise {measured['rise'] / 2**20:.0f} MiB for {measured['weights'] / 2**20:.0f} MiB of weights")
    # FP32 weights would be twice as much; an embedding written twice before tying, weights + 256 MiB
    assert measured["weights"] <= measured["rise"] < measured["weights"] + measured["embedding"] / 2


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: CausalLM(config=TINY, loss_chunk_size=0), "loss_chunk_size should be >= 1"),
        (lambda: CausalLM(config=TINY, dtype="int8"), "floating-point torch dtype"),
        (lambda: CausalLM(config=TINY, dtype="bfloat"), "floating-point torch dtype"),
        (lambda: chunked_next_token_loss(torch.zeros(1, 3, 4), torch.nn.Linear(4, 5), _batch("targets"), 2), "fit"),
        (lambda: chunked_next_token_loss(torch.zeros(1, 3, 4), torch.nn.Linear(4, 5), {"labels": torch.zeros(1, 3)}, 0),
         "chunk_size should be >= 1"),
    ],
)  # fmt: skip
def test_invalid_arguments_say_what_to_pass(build: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()
