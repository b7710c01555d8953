"""The fine-tuning benchmark's base model and task, built from text that ships with every machine.

- **Base model**: a byte-level Llama (vocabulary 256) pretrained with AdamW on the Python standard library's sources,
  *without* the modules the task holds out, cached on disk keyed by its settings (``save_pretrained`` format).
- **Task**: instruction pairs "write the function `name` that does <docstring summary>" -> the function's source,
  from documented standard-library functions, split *by module* into train, validation (for sweeps) and held-out
  test sets, as Alpaca JSONL for :class:`~lightning_memopt.data.InstructionDataModule`. The model learns a new
  format (an instruction template it never saw) and a new mapping (summary -> implementation) for modules whose code
  it never saw: a distribution shift, with the loss on the responses only, as in instruction tuning.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import shutil
import sysconfig
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback
from typing_extensions import override

from lightning_memopt.bench.methods import build_trainer
from lightning_memopt.lm import CausalLM

__all__ = [
    "BaseConfig",
    "ScheduledLM",
    "TaskConfig",
    "cache_root",
    "make_base",
    "make_task",
    "pretraining_files",
    "task_functions",
    "warmup_cosine",
]

# held out from pretraining and fine-tuning: the test set's functions come from these modules only
TEST_MODULES = (
    "argparse", "calendar", "csv", "difflib", "fractions", "ftplib", "gettext", "imaplib", "mailbox", "optparse",
    "pickletools", "pydoc", "smtplib", "statistics", "tarfile", "textwrap", "turtle", "zipfile",
)  # fmt: skip
# held out from fine-tuning for the sweeps (validation); seen in pretraining like the train modules
VAL_MODULES = (
    "ast", "bdb", "cgi", "codecs", "configparser", "copy", "datetime", "decimal", "enum", "fileinput", "glob",
    "heapq", "inspect", "locale", "platform", "pprint", "shlex", "string", "tempfile", "traceback", "uuid",
)  # fmt: skip


def cache_root() -> Path:
    """``$LIGHTNING_MEMOPT_CACHE/bench`` or ``~/.cache/lightning_memopt/bench``."""
    base = os.environ.get("LIGHTNING_MEMOPT_CACHE")
    return Path(base).expanduser() / "bench" if base else Path.home() / ".cache" / "lightning_memopt" / "bench"


def _key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _module_files() -> dict[str, list[Path]]:
    """The standard library's source files by top-level module or package name (``email`` holds ``email/*.py``),
    sorted; tests, IDLE and private modules are left out."""
    root = _stdlib()
    modules: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        name = parts[0].removesuffix(".py")
        if name.startswith("_") or name in _SKIPPED or any(p in _SKIPPED for p in parts[1:-1]):
            continue
        modules.setdefault(name, []).append(path)
    return modules


_SKIPPED = frozenset(
    {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3", "ensurepip"}
)


@dataclass(frozen=True)
class TaskConfig:
    """Which functions make the task.

    Args:
        max_source: longest function source (bytes) kept; longer functions are left out, not cut.
        min_source: shortest.
        max_summary: the docstring summary (first paragraph) is cut to this many characters.
    """

    max_source: int = 300
    min_source: int = 80
    max_summary: int = 120

    def key(self) -> str:
        return _key({"task": asdict(self), "version": 2})


def task_functions(config: TaskConfig, module: str, path: Path) -> list[dict[str, str]]:
    """The Alpaca records of one module's documented functions (methods included), in source order."""
    source = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines(keepends=True)
    records = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node)
        if not doc or node.end_lineno is None or node.end_col_offset is None:
            continue
        # ast.get_source_segment re-splits the whole file at every call: slice the lines once instead
        chunk = [line.encode() for line in lines[node.lineno - 1 : node.end_lineno]]
        chunk[-1] = chunk[-1][: node.end_col_offset]
        chunk[0] = chunk[0][node.col_offset :]
        body = "\n".join(line.rstrip() for line in _dedent(b"".join(chunk).decode()).splitlines())
        if not config.min_source <= len(body.encode()) <= config.max_source:
            continue
        summary = " ".join(doc.split("\n\n")[0].split())[: config.max_summary]
        records.append(
            {
                "instruction": f"Write the Python function `{node.name}` (module {module}).",
                "input": summary,
                "output": body,
            }
        )
    return records


def _dedent(body: str) -> str:
    lines = body.splitlines()
    # ast.get_source_segment drops the first line's indentation only: methods keep theirs on later lines
    indents = [len(line) - len(line.lstrip()) for line in lines[1:] if line.strip()]
    cut = min(indents) - 4 if indents and min(indents) >= 4 else 0
    return "\n".join([lines[0], *(line[cut:] for line in lines[1:])])


def make_task(out: Path, config: TaskConfig | None = None) -> dict[str, Any]:
    """Write ``train.jsonl``, ``val.jsonl`` and ``test.jsonl`` to ``out`` (once per settings) and return their sizes.

    Example::

        sizes = make_task(cache_root() / "task")   # {"train": ..., "val": ..., "test": ..., "dir": ...}
    """
    config = config or TaskConfig()
    out = Path(out) / config.key()
    info_file = out / "task.json"
    if info_file.is_file():
        return {**json.loads(info_file.read_text()), "dir": str(out)}  # where it is now: a cache can be moved
    splits: dict[str, list[dict[str, str]]] = {"train": [], "val": [], "test": []}
    for module, paths in _module_files().items():
        split = "test" if module in TEST_MODULES else "val" if module in VAL_MODULES else "train"
        for path in paths:
            splits[split].extend(task_functions(config, module, path))
    staging = out.with_name(out.name + f".partial-{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        with (staging / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    info = {
        "dir": str(out),
        "config": asdict(config),
        **{split: len(records) for split, records in splits.items()},
        "bytes": {s: sum(len(r["output"].encode()) for r in records) for s, records in splits.items()},
        "test_modules": list(TEST_MODULES),
        "val_modules": list(VAL_MODULES),
    }
    (staging / "task.json").write_text(json.dumps(info, indent=2))
    if out.exists():
        shutil.rmtree(staging)
    else:
        os.replace(staging, out)
    return json.loads(info_file.read_text())


@dataclass(frozen=True)
class BaseConfig:
    """The pretrained base model: a byte-level Llama and its AdamW pretraining on the standard library.

    The modules of the test set are left out of the pretraining corpus, so the held-out functions are new code.
    ``precision`` is the pretraining's (``"32-true"`` on a CPU without fast bf16 matrix products: see
    :attr:`~lightning_memopt.bench.finetune.FinetuneConfig.precision`).
    """

    layers: int = 16
    hidden: int = 128
    intermediate: int = 352
    heads: int = 4
    context: int = 512
    steps: int = 600
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 2e-3
    clip: float = 1.0
    max_bytes: int = 8_000_000
    seed: int = 0
    precision: str = "bf16-mixed"

    def key(self) -> str:
        fields = asdict(self)
        if self.precision == "bf16-mixed":  # the bases cached before there was a choice keep their key
            del fields["precision"]
        return _key({"base": fields, "version": 2})

    def with_width(self, hidden: int) -> BaseConfig:
        """The same base at another width (the model-size trend): MLP 2.75x wide, attention heads of 32 dimensions.

        Example::

            BaseConfig().with_width(64)  # 16 layers of width 64, MLP 176, 2 heads
        """
        return replace(self, hidden=hidden, intermediate=hidden * 11 // 4, heads=max(1, hidden // 32))

    def model_config(self) -> dict[str, Any]:
        return {
            "vocab_size": 256,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads,
            "max_position_embeddings": self.context,
            "bos_token_id": None,
            "eos_token_id": 0,
            "pad_token_id": 0,
        }


def warmup_cosine(optimizer: Any, steps: int, warmup: int = 0, floor: float = 0.1) -> Any:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``floor`` x the peak lr at ``steps``."""
    import math

    import torch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class ScheduledLM(CausalLM):
    """:class:`~lightning_memopt.lm.CausalLM` trained with the benchmark's ``optimizer``
    (:func:`~lightning_memopt.bench.methods.build_optimizer`) at peak ``lr`` over its trainable parameters, with
    :func:`warmup_cosine` stepped per optimizer step.

    Example::

        model = ScheduledLM("adamw", 1e-3, steps=300, warmup=10, model_path="base/")
    """

    def __init__(self, optimizer: str, lr: float, steps: int, warmup: int, **kwargs: Any) -> None:
        super().__init__(lr=lr, **kwargs)
        self.optimizer_name = optimizer
        self.steps = steps
        self.warmup = warmup

    @override
    def configure_optimizers(self) -> Any:  # type: ignore[override]
        from lightning_memopt.bench.config import BenchConfig
        from lightning_memopt.bench.methods import build_optimizer

        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = build_optimizer(self.optimizer_name, params, BenchConfig(), lr=self.lr, module=self)
        scheduler = warmup_cosine(optimizer, self.steps, warmup=self.warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class _SkipNonFiniteSteps(Callback):
    """Drops every gradient of a step in which one is inf/NaN, so AdamW skips that step.

    The base's bf16-mixed pretraining can overflow in backward (a residual-stream gradient of ~1e37 was seen once at
    lr 2e-3, from a finite loss); one such step would write NaN into every weight.
    """

    def __init__(self) -> None:
        self.skipped: list[int] = []

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        import torch

        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads and not all(bool(torch.isfinite(g).all()) for g in grads):
            self.skipped.append(trainer.global_step)
            for param in pl_module.parameters():
                param.grad = None


def pretraining_files() -> list[str]:
    """The standard library's top-level modules, without the test modules."""
    return [str(path) for module, paths in _module_files().items() if module not in TEST_MODULES for path in paths]


def make_base(out: Path, config: BaseConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Pretrain the base model once per settings into ``out/<key>`` (``save_pretrained``) and return its record
    (directory, parameters, pretraining loss, time). A cached base is returned as it is."""
    config = config or BaseConfig()
    out = Path(out) / config.key()
    info_file = out / "base.json"
    if info_file.is_file():
        return {**json.loads(info_file.read_text()), "dir": str(out)}  # where it is now: a cache can be moved

    import torch
    from lightning.pytorch import seed_everything

    from lightning_memopt.bench.worker import StepClock
    from lightning_memopt.data import TextDataModule

    seed_everything(config.seed, verbose=False)
    model = ScheduledLM("adamw", config.lr, config.steps, max(1, config.steps // 20), config=config.model_config())
    data = TextDataModule(
        paths=pretraining_files(),
        seq_len=config.seq_len,
        batch_size=config.batch_size,
        val_fraction=0.01,
        max_bytes=config.max_bytes,
    )

    losses = StepClock()
    skips = _SkipNonFiniteSteps()
    trainer = build_trainer(
        out,
        config.precision,
        config.steps,
        [losses, skips],
        enable_progress_bar=progress,
        limit_val_batches=20,
        gradient_clip_val=config.clip,
        val_check_interval=config.steps,
        check_val_every_n_epoch=None,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    val_loss = float(trainer.callback_metrics["val_loss"])
    # worse than a uniform guess over the 256 bytes: it diverged (or learned nothing)
    if not val_loss <= math.log(256) or len(skips.skipped) > config.steps // 50:
        raise RuntimeError(
            f"Pretraining the benchmark's base diverged (validation loss {val_loss:.3f} nats/byte, a uniform guess is "
            f"{math.log(256):.3f}; {len(skips.skipped)} steps skipped for inf/NaN gradients); nothing was cached. "
            "Lower BaseConfig.lr or BaseConfig.clip and run again."
        )
    staging = out.with_name(out.name + f".partial-{os.getpid()}")
    model.model.to(torch.bfloat16).save_pretrained(staging)  # type: ignore[arg-type]
    info = {
        "dir": str(out),
        "config": asdict(config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretrain_val_loss": val_loss,
        "pretrain_train_loss_last50": sum(losses.losses[-50:]) / max(1, len(losses.losses[-50:])),
        "pretrain_seconds": seconds,
        "pretrain_loss_every_25_steps": losses.losses[::25],
        "pretrain_skipped_steps": skips.skipped,
    }
    (staging / "base.json").write_text(json.dumps(info, indent=2))
    if out.exists():
        shutil.rmtree(staging)
    else:
        os.replace(staging, out)
    return json.loads(info_file.read_text())
