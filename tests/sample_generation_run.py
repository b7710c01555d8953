"""SampleGeneration under a distributed BAdam strategy, launched by the tests as
`python tests/sample_generation_run.py --out DIR --model-dir MODEL_DIR --strategy badam_fsdp`.

Lightning's launcher re-runs this script for rank 1. The same processes fit twice from the same seed, with and
without SampleGeneration (the second Trainer reuses the process group), and every rank writes the weights of both
runs and the samples it generated to `DIR/rank{R}.pt`. Also home of :class:`ChatData`, the tests' instruction data.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_memopt.strategies.collectives import finish_distributed

sys.path.insert(0, str(Path(__file__).parent))

CONVERSATIONS = [
    ("What is the capital of France?", "Paris."),
    ("Name a prime number.", "Seven is prime."),
    ("Say hello.", "Hello!"),
    ("What colour is the sky?", "Blue, on a clear day."),
    ("Count to three.", "One, two, three."),
    ("What is 2 + 2?", "Four."),
    ("Spell cat.", "C, A, T."),
    ("Is water wet?", "Yes."),
]
PROMPTS = ["What is the capital of France?", "Count to three."]


class ChatData(L.LightningDataModule):
    """Instruction data as an InstructionDataModule yields it: chat-rendered conversations, loss on the answers only,
    and the prompt encoding (``encode_prompt``/``decode``/``eos_token_id``/``get_tokenizer``) SampleGeneration uses."""

    def __init__(self, tokenizer: str, seq_len: int = 48, batch_size: int = 2, eos_token_id: int | None = None):
        super().__init__()
        self.save_hyperparameters()
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        self.eos_token_id = self._tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        self.seq_len = seq_len
        self.batch_size = batch_size

    def get_tokenizer(self) -> Any:
        return self._tokenizer

    def encode_prompt(self, prompt: str | list[dict]) -> list[int]:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids))

    def _samples(self) -> list[dict[str, torch.Tensor]]:
        samples = []
        for question, answer in CONVERSATIONS:
            prompt = self.encode_prompt(question)
            response = self._tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
            ids = (prompt + response + [self._tokenizer.eos_token_id])[: self.seq_len]
            labels = [-100] * len(prompt) + ids[len(prompt) :]
            pad = self.seq_len - len(ids)
            samples.append(
                {
                    "input_ids": torch.tensor(ids + [self._tokenizer.eos_token_id] * pad),
                    "labels": torch.tensor(labels + [-100] * pad),
                }
            )
        return samples

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._samples(), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._samples()[:2], batch_size=self.batch_size)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def fit(model_dir: str, strategy: Any, root: Path, callbacks: list, devices: int = 2) -> dict[str, torch.Tensor]:
    from lightning_memopt import BlockSwitch
    from lightning_memopt.lm import CausalLM

    L.seed_everything(0, verbose=False)
    module = CausalLM(model_path=model_dir, lr=1e-2)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        precision="bf16-true",
        max_steps=4,
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=1,
        callbacks=[BlockSwitch(every=2, order="random", seed=3), *callbacks],
        use_distributed_sampler=False,
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, ChatData(model_dir))
    return {n: _full(p.detach()).clone() for n, p in module.named_parameters()}


def main() -> None:
    from lightning_memopt import BAdamDDPStrategy, BAdamFSDPStrategy, SampleGeneration

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--strategy", default="badam_fsdp", choices=["badam_ddp", "badam_fsdp"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    strategy_class = BAdamFSDPStrategy if args.strategy == "badam_fsdp" else BAdamDDPStrategy

    samples = SampleGeneration(PROMPTS, max_new_tokens=6)
    with_samples = fit(args.model_dir, strategy_class(process_group_backend="gloo"), out / "with", [samples])
    without = fit(args.model_dir, strategy_class(process_group_backend="gloo"), out / "without", [])
    rank = torch.distributed.get_rank()
    torch.save({"with": with_samples, "without": without, "samples": samples.samples}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
    finish_distributed()
