"""What every method of a benchmark run shares: the model's shape, the data, the seed, the number of steps."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["BenchConfig"]


@dataclass(frozen=True)
class BenchConfig:
    """Settings shared by all methods of one benchmark run (the same model, data, seed and number of steps).

    The model is a Hugging Face Llama with a byte-level vocabulary (256) trained from scratch on byte windows of the
    Python standard library's sources (:class:`~lightning_memopt.data.TextDataModule`). The defaults give ~100 M
    parameters in 32 layers, so BAdam has ``D = 32`` blocks as in the paper.

    Example::

        >>> config = BenchConfig(layers=2, hidden=32, steps=6)
        >>> config.model_config()["num_attention_heads"], config.model_config()["intermediate_size"]
        (2, 64)
    """

    layers: int = 32
    hidden: int = 512
    heads: int | None = None
    seq_len: int = 128
    batch_size: int = 2
    steps: int = 50
    warmup: int = 3
    every: int = 5
    lr: float = 1e-3
    sgd_lr: float = 0.05
    adafactor_lr: float = 1e-2
    seed: int = 0
    threads: int = 1
    max_bytes: int = 2_000_000
    eval_batches: int = 16
    memory_every: int = 10

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "seq_len", "batch_size", "steps", "every", "threads", "eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} should be a positive integer but is: {value!r}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(
                f"warmup should be in [0, steps) so that some steps are timed, but is {self.warmup} with "
                f"steps={self.steps}. Lower --warmup or raise --steps."
            )
        if self.hidden % self.num_heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by the number of heads ({self.num_heads}).")

    @property
    def num_heads(self) -> int:
        """``heads``, or one head per 64 dimensions (at least 2 for tiny models that allow it)."""
        if self.heads is not None:
            return self.heads
        return self.hidden // 64 if self.hidden >= 128 else max(1, min(2, self.hidden // 16))

    def model_config(self) -> dict[str, Any]:
        """``LlamaConfig`` arguments: Llama's 8/3 MLP ratio rounded down to a multiple of 32."""
        return {
            "vocab_size": 256,
            "hidden_size": self.hidden,
            "intermediate_size": max(32, (self.hidden * 8 // 3) // 32 * 32),
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.num_heads,
            "max_position_embeddings": self.seq_len,
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BenchConfig:
        return cls(**json.loads(text))

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One ``--option`` per field (``seq_len`` becomes ``--seq-len``), defaulting to the field's default."""
        helps = {
            "layers": "decoder layers (= BAdam's number of blocks D)",
            "hidden": "hidden size",
            "heads": "attention heads (default: hidden / 64)",
            "seq_len": "tokens (bytes) per sample",
            "batch_size": "samples per optimizer step",
            "steps": "optimizer steps per method",
            "warmup": "first steps left out of the median step time",
            "every": "BAdam's K: optimizer steps per block",
            "lr": "learning rate of AdamW and AdamW8bit",
            "sgd_lr": "learning rate of block SGD (momentum 0.9)",
            "adafactor_lr": "torch Adafactor's lr (caps its relative step size)",
            "seed": "seed of the model, the data order and BAdam's block order",
            "threads": "torch threads per run (1 is robust on a shared machine)",
            "max_bytes": "bytes of the standard library's sources to read",
            "eval_batches": "held-out batches for the final loss",
            "memory_every": "MemoryReport measures every this many steps",
        }
        for f in fields(cls):
            default = f.default
            kind = float if isinstance(default, float) else int
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                type=kind,
                default=default,
                help=f"{helps.get(f.name, f.name)} (default: {default})",
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchConfig:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
