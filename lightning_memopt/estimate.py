"""Will it fit? The memory of fine-tuning a model with each method, worked out without building the model.

``lightning-memopt estimate`` (and :func:`estimate`) builds the model on the *meta device* (shapes and dtypes only: no
memory, no weights read), so an 8B or 70B model costs a fraction of a second. Then, per method:

* **model state** (weights, buffers, FP32 masters, gradients, optimizer state) is :func:`~lightning_memopt.memory.
  predict_memory` applied to the same objects a real run has: the optimizer the benchmark builds, and for BAdam the
  blocks :func:`~lightning_memopt.blocks.partition` makes and the masters :class:`~lightning_memopt.engine.BlockEngine`
  creates, block by block (the largest block is the one reported). These figures equal what
  :class:`~lightning_memopt.MemoryReport` accounts on a real run, to the byte (tested).
* **activations** (everything else live during one forward and backward: tensors saved for backward, the logits and
  the loss, temporaries, the gradients of the active block's half weights) is *simulated*: the model runs one
  forward and backward on fake tensors (torch's ``FakeTensorMode``, no memory and no arithmetic) while a
  dispatch mode follows every storage created and freed and keeps the peak. The simulation runs the model as
  :class:`~lightning_memopt.lm.CausalLM` does (chunked cross-entropy, gradient checkpointing, autocast for
  ``bf16-mixed``, which parameters require grad, gradients freed in backward with the update in backward). It is an
  estimate: the allocator's rounding and caching, the CUDA context, kernels' workspaces and communication buffers
  are not in it; its measured error is in ``docs/will-it-fit.md``.

``total`` is their sum: an upper bound of the peak in that gradients (in model state) are only partly allocated when
the activations peak.

Example::

    >>> from transformers import LlamaConfig
    >>> config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                      num_attention_heads=4)
    >>> rows = estimate(config, ["adamw-bf16", "badam"], seq_len=64)
    >>> [row.method for row in rows], rows[1].masters < rows[0].grads
    (['adamw-bf16', 'badam'], True)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import weakref
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_memopt.bench.config import BenchConfig
from lightning_memopt.bench.methods import METHODS, Method, build_optimizer
from lightning_memopt.blocks import partition
from lightning_memopt.compat import (
    TorchDispatchMode,
    buffer,
    fake_tensor_mode,
    replace_buffer,
    storage_key,
    tree_leaves,
)
from lightning_memopt.engine import BlockEngine
from lightning_memopt.lm import next_token_loss
from lightning_memopt.memory import MemoryPrediction, predict_memory

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "ESTIMATE_METHODS",
    "PRESETS",
    "Estimate",
    "EstimateError",
    "estimate",
    "format_estimates",
    "main",
    "unsupported",
]

PRESETS: dict[str, dict[str, Any]] = {
    "llama-3-8b": {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "llama-3-70b": {
        "vocab_size": 128256,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "llama-3.2-1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
}
"""``LlamaConfig`` arguments of published model shapes (``--model llama-3-8b``): Llama 3 8B (8.03 B parameters),
Llama 3 70B (70.6 B) and Llama 3.2 1B (1.24 B, tied head), as in their released ``config.json`` files."""

ESTIMATE_METHODS: tuple[str, ...] = (
    "adamw-32",
    "adamw-mixed",
    "adamw-bf16",
    "adamw8bit",
    "adafactor",
    "lomo",
    "adalomo",
    "adamw8bit-fused",
    "badam",
    "badam-8bit",
    "badam-adafactor",
    "block-sgd",
    "badam-fused",
    "badam-8bit-fused",
)
"""The methods estimated without ``--methods``: every benchmark row with its own memory (the benchmark's
``badam-eightbitstate`` and ``badam-stabilised`` rows hold exactly what ``badam-8bit`` and ``badam`` hold)."""

_GIB = 2**30


class EstimateError(ValueError):
    """The estimate cannot be made as asked (an unknown model, method or option); the message names the fix.

    Example::

        >>> try:
        ...     estimate("llama-3-8b", ["no-such-method"])
        ... except EstimateError as error:
        ...     print("no-such-method" in str(error))
        True
    """


@dataclass(frozen=True)
class Estimate:
    """The bytes one method needs, per rank, by category (see the module docstring for how each is found).

    ``fits`` is ``None`` unless a GPU memory size was given.

    Example::

        >>> row = estimate("llama-3-8b", ["badam"], seq_len=8, gpu_memory=24 * 10**9)[0]
        >>> row.method, row.total > row.weights, row.fits
        ('badam', True, True)
    """

    method: str
    label: str
    precision: str
    strategy: str
    weights: int
    buffers: int
    masters: int
    grads: int
    optimizer_state: int
    activations: int
    total: int
    fits: bool | None = None
    block: str | None = None
    blocks: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def model_state(self) -> int:
        """Weights, buffers, masters, gradients and optimizer state: what :class:`~lightning_memopt.MemoryReport`
        accounts."""
        return self.weights + self.buffers + self.masters + self.grads + self.optimizer_state

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Setting:
    seq_len: int
    batch_size: int
    devices: int
    sharded: bool
    gradient_checkpointing: bool
    loss_chunk_size: int | None


# ------------------------------------------------------------------------------------------------ the model
def load_config(model: str | os.PathLike[str] | Mapping[str, Any] | PretrainedConfig) -> PretrainedConfig:
    """A Hugging Face config from a preset name (:data:`PRESETS`), a model directory, a ``config.json`` path, a dict
    of ``LlamaConfig`` arguments or a config itself. Nothing but the config is read.

    Example::

        >>> load_config("llama-3-8b").num_hidden_layers
        32
    """
    from transformers import AutoConfig, LlamaConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    if isinstance(model, Mapping):
        return LlamaConfig(**model)
    name = str(model)
    if name in PRESETS:
        return LlamaConfig(**PRESETS[name])
    path = Path(os.path.expanduser(name))
    if path.is_file():
        path = path.parent
    if not (path / "config.json").is_file():
        raise EstimateError(
            f"--model {name!r}: no config.json there. Pass a model directory (or its config.json) or one of the "
            f"presets: {', '.join(PRESETS)}."
        )
    return AutoConfig.from_pretrained(path, local_files_only=True)


def meta_model(config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``config`` on the meta device, in ``dtype`` with FP32 rotary frequencies (as
    :class:`~lightning_memopt.lm.CausalLM` keeps them).

    Example::

        >>> meta_model(load_config("llama-3-8b"), torch.bfloat16).lm_head.weight.device
        device(type='meta')
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    rope = [(m, n) for m in model.modules() for n, b in m.named_buffers(recurse=False) if "inv_freq" in n]
    model.to(dtype)
    for module, name in rope:
        current = buffer(module, name)
        if current is not None:
            replace_buffer(module, name, current.float())
    return model.train()


def _shard_rows(model: nn.Module, ranks: int) -> None:
    # FSDP2 shards each parameter along dim 0 into `ranks` chunks of ceil(rows / ranks): rank 0's share, the largest
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() == 0:
                continue
            rows = math.ceil(param.shape[0] / ranks)
            shard = torch.empty((rows, *param.shape[1:]), dtype=param.dtype, device="meta")
            setattr(module, name, nn.Parameter(shard, requires_grad=param.requires_grad))


def _weight_dtype(precision: str) -> torch.dtype:
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision, torch.float32)


def _partition_options(method: Method) -> dict[str, Any]:
    keys = ("block_prefixes", "block_regexes", "include_embedding", "include_lm_head", "granularity")
    options = {k: v for k, v in method.strategy.items() if k in keys}
    options["layers_per_block"] = method.layers_per_block
    return options


def _model_state(
    method: Method, config: PretrainedConfig, setting: _Setting
) -> list[tuple[str | None, set[str] | None, MemoryPrediction]]:
    """For each BAdam block (one entry for a plain optimizer): its name, its parameter names (``None``: every
    parameter trains) and the prediction."""
    model = meta_model(config, _weight_dtype(method.precision))
    if setting.sharded and setting.devices > 1:
        _shard_rows(model, setting.devices)
    optimizer = build_optimizer(method.optimizer, model.parameters(), BenchConfig(), lr=method.lr, module=model)
    if not method.badam:
        prediction = predict_memory(model, [optimizer], precision=method.precision, update_in_backward=method.fused)
        return [(None, None, prediction)]
    blocks = partition(model, **_partition_options(method))
    engine = BlockEngine(model, blocks, optimizer)
    predictions: list[tuple[str | None, set[str] | None, MemoryPrediction]] = []
    for index, block in enumerate(blocks):
        engine.activate((index,))
        prediction = predict_memory(
            model,
            [optimizer],
            engine.masters,
            precision=method.precision,
            blocks=len(blocks),
            update_in_backward=method.fused,
        )
        predictions.append((block.name, set(block.param_names), prediction))
    return predictions


# ------------------------------------------------------------------------------------------------ activations
class _LiveBytes(TorchDispatchMode):
    """Follows every tensor storage created inside it (by the result of each operator) until it is freed, and keeps
    the peak of their total; storages that existed before (weights, buffers, existing gradients) are not counted."""

    def __init__(self, existing: Sequence[Tensor]) -> None:
        super().__init__()
        self._existing = {storage_key(t) for t in existing}
        self._live: dict[int, int] = {}
        self._refs: list[weakref.ref[Any]] = []
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, Tensor):
                self._track(leaf)
        return out

    def _track(self, tensor: Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage_key(tensor)
        if key in self._existing or key in self._live:
            return
        nbytes = storage.nbytes()
        self._live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        self._refs.append(weakref.ref(storage, self._release(key)))

    def _release(self, key: int) -> Any:
        def free(_: Any) -> None:
            self.current -= self._live.pop(key, 0)

        return free


def _enable_checkpointing(model: nn.Module) -> None:
    # as CausalLM(gradient_checkpointing=True) does; transformers 5 renamed the method
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]


def _hidden_and_head(model: nn.Module, input_ids: Tensor) -> tuple[Tensor, nn.Module | None]:
    head = model.get_output_embeddings()  # type: ignore[operator]
    base = getattr(model, "base_model", None)
    softcap = getattr(model.config, "final_logit_softcapping", None) or getattr(model.config, "logit_scale", None)
    if head is None or base is None or base is model or softcap:
        return model(input_ids=input_ids, use_cache=False).logits, None
    return base(input_ids=input_ids, use_cache=False).last_hidden_state, head


def _simulate(
    config: PretrainedConfig, precision: str, trained: set[str] | None, fused: bool, setting: _Setting
) -> int:
    """Peak bytes of one forward and backward beyond the model state, on fake tensors (see the module docstring).

    ``trained``: the parameter names that require grad (BAdam's active block; ``None``: every parameter, whose
    gradients already exist, as after a first step, unless ``fused`` frees each in backward)."""
    dtype = _weight_dtype(precision)
    model = meta_model(config, dtype)
    with fake_tensor_mode():
        model = model.to_empty(device="cpu")
        rope = [b for n, b in model.named_buffers() if "inv_freq" in n]
        for buf in rope:
            buf.fill_(1.0)
        if setting.gradient_checkpointing:
            _enable_checkpointing(model)
        existing: list[Tensor] = [*model.parameters(), *model.buffers()]
        for name, param in model.named_parameters():
            param.requires_grad_(trained is None or name in trained)
            if trained is None and not fused:
                param.grad = torch.zeros_like(param)
                existing.append(param.grad)
        if fused:
            for param in model.parameters():
                if param.requires_grad:
                    param.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        # BAdam (``trained`` given, not fused): the active block's half gradients are created in backward and
        # counted here; the engine moves them into the FP32 masters' gradients after backward
        ids = torch.zeros(setting.batch_size, setting.seq_len, dtype=torch.long)
        targets = torch.zeros(setting.batch_size, setting.seq_len, dtype=torch.long)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if "mixed" in precision else nullcontext()
        live = _LiveBytes(existing)
        with live:
            with autocast:
                hidden, head = _hidden_and_head(model, ids)
                batch = {"targets": targets}
                if head is not None and setting.loss_chunk_size:
                    from lightning_memopt.lm import chunked_next_token_loss

                    loss, _ = chunked_next_token_loss(hidden, head, batch, setting.loss_chunk_size)
                else:
                    logits = head(hidden) if head is not None else hidden
                    del hidden
                    loss, _ = next_token_loss(logits, batch)
                    del logits
            if loss.requires_grad:
                loss.backward()
            del loss
        return live.peak


# ------------------------------------------------------------------------------------------------ estimate
def estimate(
    model: str | os.PathLike[str] | Mapping[str, Any] | PretrainedConfig,
    methods: Sequence[str] | None = None,
    *,
    seq_len: int = 2048,
    batch_size: int = 1,
    devices: int = 1,
    sharded: bool = False,
    gradient_checkpointing: bool = False,
    loss_chunk_size: int | None = 1024,
    precision: str | None = None,
    gpu_memory: int | None = None,
) -> list[Estimate]:
    """Bytes per rank by category for each method (named as in the benchmark), without building the model.

    Args:
        model: a preset (:data:`PRESETS`), a model directory or ``config.json``, a dict of ``LlamaConfig``
            arguments, or a Hugging Face config.
        methods: benchmark method names; ``None``: :data:`ESTIMATE_METHODS` less those the pack cannot run on
            ``devices`` (see :func:`unsupported`; naming one of those is an error).
        seq_len: tokens per sequence.
        batch_size: sequences per micro-batch on each rank.
        devices: ranks; with ``sharded`` the weights, masters, gradients and state are split over them as FSDP2 does
            (``badam_fsdp``, or FSDP for the plain optimizers), otherwise each rank holds all of it (DDP).
        gradient_checkpointing: recompute each layer's activations in backward (``CausalLM(gradient_checkpointing=
            True)``).
        loss_chunk_size: ``CausalLM(loss_chunk_size=...)``: the cross-entropy runs this many tokens at a time
            (``None``: full logits).
        precision: only the methods that train in this precision (e.g. ``"bf16-true"``).
        gpu_memory: bytes per GPU; sets each row's ``fits``.

    Example::

        >>> rows = estimate("llama-3-8b", ["badam"], seq_len=8, gpu_memory=24 * 10**9)
        >>> rows[0].weights, rows[0].fits
        (16060522496, True)
    """
    config = load_config(model)
    names = list(ESTIMATE_METHODS if methods is None else methods)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise EstimateError(f"Unknown method {unknown[0]!r}. Choose from: {', '.join(ESTIMATE_METHODS)}.")
    chosen = [METHODS[n] for n in names]
    if methods is not None:
        for method in chosen:
            reason = unsupported(method, devices, sharded)
            if reason:
                raise EstimateError(f"{method.name}: {reason}")
    chosen = [m for m in chosen if unsupported(m, devices, sharded) is None]
    if precision is not None:
        chosen = [m for m in chosen if m.precision == precision]
        if not chosen:
            raise EstimateError(f"No method trains in {precision!r}; leave out --precision or pick other methods.")
    for value, what in ((seq_len, "seq_len"), (batch_size, "batch_size"), (devices, "devices")):
        if value < 1:
            raise EstimateError(f"{what} must be at least 1, got {value}.")
    setting = _Setting(seq_len, batch_size, devices, sharded, gradient_checkpointing, loss_chunk_size or None)
    simulated: dict[tuple[Any, ...], int] = {}

    def activations(method: Method, trained: set[str] | None) -> int:
        key = (method.precision, None if trained is None else tuple(sorted(trained)), method.fused)
        if key not in simulated:
            simulated[key] = _simulate(config, method.precision, trained, method.fused, setting)
        return simulated[key]

    rows = []
    for method in chosen:
        predictions = _model_state(method, config, setting)
        largest = max(range(len(predictions)), key=lambda i: predictions[i][2].total)
        # BAdam: the first block has the longest backward below it, the largest one the most model state
        candidates = sorted({0, largest})
        totals = {i: predictions[i][2].total + activations(method, predictions[i][1]) for i in candidates}
        chosen_block = max(candidates, key=lambda i: totals[i])
        block_name, _, prediction = predictions[chosen_block]
        act = totals[chosen_block] - prediction.total
        strategy = _strategy_name(method, devices, sharded)
        notes = list(prediction.notes)
        if sharded and devices > 1:
            gathered = 2 * _largest_layer_bytes(config, _weight_dtype(method.precision))
            act += gathered
            notes.append(
                f"FSDP: activations include two decoder layers' all-gathered weights ({gathered:,} bytes: the layer "
                "computing and the one prefetched); the reduce-scatter buffers of a layer's gradients are not modelled."
            )
        total = prediction.total + act
        rows.append(
            Estimate(
                method=method.name,
                label=method.label,
                precision=method.precision,
                strategy=strategy,
                weights=prediction.weights,
                buffers=prediction.buffers,
                masters=prediction.masters,
                grads=prediction.grads,
                optimizer_state=prediction.optimizer_state,
                activations=act,
                total=total,
                fits=None if gpu_memory is None else total <= gpu_memory,
                block=block_name,
                blocks=prediction.blocks,
                notes=notes,
            )
        )
    return rows


def _largest_layer_bytes(config: PretrainedConfig, dtype: torch.dtype) -> int:
    from lightning_memopt.blocks import find_layer_lists

    model = meta_model(config, dtype)
    layers = [layer for path in find_layer_lists(model) for layer in model.get_submodule(path).children()]
    sizes = [sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers]
    return max(sizes, default=0)


def unsupported(method: Method, devices: int, sharded: bool) -> str | None:
    """Why the pack cannot train ``method`` on ``devices`` GPUs (sharded or not); ``None`` when it can.

    Example::

        >>> unsupported(METHODS["lomo"], 2, False)
        'the update in backward of the whole model (fused_update) runs on one device; use badam-fused on several'
    """
    if devices > 1 and method.fused and not method.badam:
        return "the update in backward of the whole model (fused_update) runs on one device; use badam-fused on several"
    if devices > 1 and sharded and method.fused:
        return (
            "badam_fsdp refuses fused_update (FSDP2 reduce-scatters a layer's gradients together); use --strategy ddp"
        )
    return None


def _strategy_name(method: Method, devices: int, sharded: bool) -> str:
    if devices == 1:
        return "badam" if method.badam else ("fused_update" if method.fused else "single device")
    if method.badam:
        return "badam_fsdp" if sharded else "badam_ddp"
    return "fsdp" if sharded else "ddp"


# ------------------------------------------------------------------------------------------------ output
def _gib(nbytes: int) -> str:
    return f"{nbytes / _GIB:.2f}"


def format_estimates(rows: Sequence[Estimate], gpu_memory: int | None = None) -> str:
    """The table ``lightning-memopt estimate`` prints (GiB per rank).

    Example::

        >>> row = Estimate("badam", "BAdam", "bf16-true", "badam", 2**31, 0, 2**28, 2**28, 2**29, 2**30, 2**32)
        >>> print(format_estimates([row]).splitlines()[2])
        badam      2.00     0.25   0.25        0.50         1.00   4.00
    """
    header = ("method", "weights", "masters", "grads", "opt. state", "activations", "total")
    table: list[tuple[str, ...]] = [
        header,
        *(
            (
                r.method,
                _gib(r.weights + r.buffers),
                _gib(r.masters),
                _gib(r.grads),
                _gib(r.optimizer_state),
                _gib(r.activations),
                _gib(r.total),
            )
            for r in rows
        ),
    ]
    if gpu_memory is not None:
        table = [(*table[0], "fits"), *((*t, "yes" if r.fits else "no") for t, r in zip(table[1:], rows, strict=True))]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = ["GiB per rank (model state as accounted by MemoryReport; activations simulated, an estimate)"]
    for line in table:
        cells = [line[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True))]
        lines.append("  ".join(cells).rstrip())
    if gpu_memory is not None:
        lines.append(f"fits: total <= {gpu_memory / 1e9:g} GB ({gpu_memory / _GIB:.2f} GiB) per GPU")
    return "\n".join(lines)


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes of ``"24GB"`` (10^9), ``"80GiB"`` (2^30), ``"512MB"``...; a bare number is in GB.

    Example::

        >>> parse_size("24GB"), parse_size("1GiB"), parse_size("24")
        (24000000000, 1073741824, 24000000000)
    """
    match = _SIZE.match(text)
    if match is None:
        raise EstimateError(f"--gpu-memory {text!r}: write a size such as 24GB, 80GiB or 24 (GB).")
    value, unit = float(match.group(1)), (match.group(2) or "GB").upper()
    powers = {"K": 1, "M": 2, "G": 3, "T": 4}
    base = 1024 if "I" in unit else 1000
    return round(value * base ** powers[unit[0]])


def _from_recipe(path: str) -> dict[str, Any]:
    import yaml

    try:
        recipe = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise EstimateError(f"--config {path!r}: cannot read it ({err}).") from err
    trainer = recipe.get("trainer") or {}
    model_args = (recipe.get("model") or {}).get("init_args") or {}
    data_args = (recipe.get("data") or {}).get("init_args") or {}
    strategy = trainer.get("strategy")
    strategy_name = strategy.get("class_path", "") if isinstance(strategy, Mapping) else str(strategy or "")
    settings: dict[str, Any] = {
        "devices": trainer.get("devices") if isinstance(trainer.get("devices"), int) else None,
        "sharded": "fsdp" in strategy_name.lower() or None,
        "gradient_checkpointing": model_args.get("gradient_checkpointing"),
        "loss_chunk_size": model_args.get("loss_chunk_size", "unset"),
        "batch_size": data_args.get("batch_size"),
        "seq_len": data_args.get("max_length") or data_args.get("seq_len") or data_args.get("block_size"),
    }
    model = model_args.get("model_path")
    if model is None and "config" in model_args:
        from lightning_memopt.lm import TINY_LLAMA

        model = {**TINY_LLAMA, **(model_args.get("config") or {})}
    settings["model"] = model
    return {k: v for k, v in settings.items() if v is not None and v != "unset"}


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-memopt estimate``: print the table (or ``--json``); see ``--help``.

    Example::

        >>> main(["--model", "llama-3-8b", "--methods", "badam", "--gpu-memory", "24GB"])  # doctest: +SKIP
        0
    """
    parser = argparse.ArgumentParser(
        prog="lightning-memopt estimate",
        description="Memory per GPU of fine-tuning a model with each method, from its config alone (meta device).",
    )
    parser.add_argument("--model", help=f"model directory, config.json, or a preset: {', '.join(PRESETS)}")
    parser.add_argument("--config", help="a recipe YAML (lightning-memopt fit --config ...): its model and settings")
    parser.add_argument("--methods", help=f"comma-separated; default: {','.join(ESTIMATE_METHODS)}")
    parser.add_argument("--precision", help="only the methods that train in this precision")
    parser.add_argument("--devices", type=int, help="GPUs (ranks) [1]")
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), help="with --devices > 1: replicate or shard [ddp]")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence [2048]")
    parser.add_argument("--batch-size", type=int, help="sequences per micro-batch per GPU [1]")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None)
    parser.add_argument("--loss-chunk-size", type=int, help="CausalLM's chunked cross-entropy; 0: full logits [1024]")
    parser.add_argument("--gpu-memory", help="memory per GPU, e.g. 24GB or 80GiB: adds a fits column")
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows instead of the table")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        settings = _from_recipe(args.config) if args.config else {}
        model = args.model or settings.pop("model", None)
        settings.pop("model", None)
        if model is None:
            raise EstimateError("Name a model: --model DIR (or config.json, or a preset) or --config RECIPE.")
        if isinstance(model, str) and model not in PRESETS and not Path(os.path.expanduser(model)).exists():
            raise EstimateError(
                f"The model {model!r} does not exist here (a recipe's placeholder?). Pass --model with a local model "
                f"directory, its config.json, or a preset ({', '.join(PRESETS)})."
            )
        for key in ("devices", "seq_len", "batch_size", "gradient_checkpointing", "loss_chunk_size"):
            if getattr(args, key) is not None:
                settings[key] = getattr(args, key)
        if args.strategy is not None:
            settings["sharded"] = args.strategy == "fsdp"
        gpu_memory = parse_size(args.gpu_memory) if args.gpu_memory else None
        methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
        rows = estimate(model, methods, precision=args.precision, gpu_memory=gpu_memory, **settings)
    except EstimateError as err:
        print(f"lightning-memopt estimate: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.as_json() for r in rows], indent=2))
    else:
        print(format_estimates(rows, gpu_memory))
        shown = {r.method for r in rows}
        left_out = [n for n in (methods or ESTIMATE_METHODS) if n not in shown]
        if left_out and methods is None:
            print(f"left out (the pack cannot run them on {settings.get('devices', 1)} GPUs): {', '.join(left_out)}")
    return 0
