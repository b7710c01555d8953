"""Where training memory goes: exact accounting of live tensors, the analytic prediction, and :class:`MemoryReport`.

The functions at the top know nothing about Lightning: give them a module, its optimizers and (for BAdam) the active
block's FP32 masters. :class:`MemoryReport` gathers those from a running ``Trainer``, measures during training,
logs the figures and writes ``memory.json``.

Accounting counts every tensor *storage* once (keyed by device and ``untyped_storage().data_ptr()``), in this order:
weights, buffers, masters, gradients, optimizer state. A tied head, a parameter that views another one, a master that
*is* its FP32 weight, or an 8-bit quantisation map shared by all parameters is therefore counted once, in the first
category that holds it.

The prediction, for ``M`` parameters of which ``A`` are trained (``A = M`` for a plain optimizer; the active block's
size for BAdam, ``A ≈ M / D`` with ``D`` blocks), in bytes:

==================================  =======  ===========  ===========  ============================  ================
setup                               weights  FP32 master  gradients    optimizer state               closed form
==================================  =======  ===========  ===========  ============================  ================
AdamW, ``32-true``                  4 M      --           4 A          8 A                           16 M
AdamW, ``bf16-mixed``               4 M      --           4 A          8 A                           16 M (paper: 18)
AdamW, ``bf16-true``                2 M      --           2 A          4 A (state in bf16)           8 M
AdamW8bit (bitsandbytes)            w M      --           w A          2 A + 8 A/256 (absmax)        (2w + 2) M
Adafactor (torch)                   w M      --           w A          w (rows + cols) per matrix    ≈ 2w M
SGD with momentum / without         w M      --           w A          w A / 0                       3w M / 2w M
BAdam + AdamW, ``bf16-true``        2 M      4 A          4 A          8 A                           2 M + 16 M/D
BAdam + AdamW8bit                   2 M      4 A          4 A          2 A (+ absmax)                2 M + 10 M/D
BAdam + Adafactor / SGD momentum    2 M      4 A          4 A          ≈ 0 / 4 A                     2 M + 8 / 12 M/D
==================================  =======  ===========  ===========  ============================  ================

(``w``: bytes per weight.) ``bf16-mixed`` keeps FP32 weights; the paper's 18 M also counts a 2-byte copy of the
weights, which Lightning's autocast holds only during forward and backward: it shows in the peak, not here. Exact
extras are added per tensor: torch's Adam/Adafactor keep a 4-byte ``step`` tensor per parameter, bitsandbytes keeps
32-bit state for tensors under ``min_8bit_size`` elements and one 256-entry quantisation map per state, Adafactor
keeps full variances for 1-D tensors. Optimizers the prediction does not know are predicted as accounted (with a
note).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_memopt.compat import is_fake, storage_key
from lightning_memopt.log import get_logger, rank_zero_log
from lightning_memopt.optimizers import (
    frees_gradients,
    local_tensor,
    optimizer_state_bytes,
    predict_optimizer_state_bytes,
    state_bytes_per_param,
)
from lightning_memopt.strategies.badam import block_strategy

__all__ = [
    "MemoryBreakdown",
    "MemoryPrediction",
    "MemoryReport",
    "StorageLedger",
    "account_memory",
    "current_rss",
    "format_report",
    "optimizer_state_bytes",
    "peak_memory",
    "predict_memory",
    "reset_peak_rss",
]

_log = get_logger("memory")

_MIB = 2**20


# ---------------------------------------------------------------------------------------------------- accounting
class StorageLedger:
    """Counts the bytes of tensor storages, each storage once however many tensors view it.

    Example::

        >>> ledger = StorageLedger()
        >>> weight = torch.zeros(4, 4)
        >>> ledger.add(weight), ledger.add(weight.t()), ledger.add(weight[0])
        (64, 0, 0)
    """

    def __init__(self, shapes_only: bool = False) -> None:
        self._seen: set[tuple[str, int]] = set()
        self.bytes_by_device: dict[str, int] = {}
        self.shapes_only = shapes_only
        """Also count meta and fake tensors, by their storage objects (the prediction of a model on the meta device,
        as ``lightning-memopt estimate`` builds it); otherwise they own no memory and count 0."""

    def key(self, tensor: Tensor) -> tuple[str, int] | None:
        """``(device, data_ptr)`` of the tensor's storage, or ``None`` for a tensor without memory (meta, empty)."""
        tensor = local_tensor(tensor)
        if type(tensor) is not Tensor and callable(getattr(tensor, "__tensor_flatten__", None)):
            # a wrapper subclass (torchao's quantised optimizer state) owns no storage; its inner tensors do
            return None
        if tensor.device.type == "meta" or is_fake(tensor):
            # a FakeTensor (left by tracing, e.g. Lightning's FLOPs count in the model summary, until the garbage
            # collector frees it) owns no memory; its data pointer is 0, or access to it raises
            if not self.shapes_only:
                return None
            # the storage's own identity: shared by views and tied weights, as data_ptr is
            return (str(tensor.device), storage_key(tensor)) if tensor.untyped_storage().nbytes() else None
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0:
            return None
        return str(tensor.device), storage.data_ptr()

    def __contains__(self, tensor: Tensor) -> bool:
        key = self.key(tensor)
        return key is not None and key in self._seen

    def add(self, tensor: Tensor) -> int:
        """Record the tensor's storage; returns its size in bytes, or 0 if the storage was already counted."""
        key = self.key(tensor)
        if key is None or key in self._seen:
            return 0
        self._seen.add(key)
        nbytes = local_tensor(tensor).untyped_storage().nbytes()
        self.bytes_by_device[key[0]] = self.bytes_by_device.get(key[0], 0) + nbytes
        return nbytes


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes held by live tensors, by category; each storage counted once (see :func:`account_memory`).

    Example::

        >>> memory = MemoryBreakdown({"bfloat16": 200}, buffers=0, masters=40, grads=40, optimizer_state_by_key={})
        >>> memory.weights, memory.total
        (200, 280)
    """

    weights_by_dtype: dict[str, int]
    buffers: int
    masters: int
    grads: int
    optimizer_state_by_key: dict[str, int]
    other: int | None = None
    other_source: str | None = None

    @property
    def weights(self) -> int:
        return sum(self.weights_by_dtype.values())

    @property
    def optimizer_state(self) -> int:
        return sum(self.optimizer_state_by_key.values())

    @property
    def total(self) -> int:
        """Weights, buffers, masters, gradients and optimizer state; ``other`` is reported apart from it."""
        return self.weights + self.buffers + self.masters + self.grads + self.optimizer_state


@dataclass(frozen=True)
class MemoryPrediction:
    """What the analytic model expects per category, and the closed form (``2M + 16M/D``) with its value.

    Returned by :func:`predict_memory`; ``total`` is comparable with :attr:`MemoryBreakdown.total`.

    Example::

        >>> from torch import nn
        >>> model = nn.Linear(100, 100, bias=False)
        >>> prediction = predict_memory(model, [torch.optim.AdamW(model.parameters())])
        >>> prediction.optimizer_state  # two FP32 moments of 10,000 values (and the step counter)
        80004
    """

    weights: int
    buffers: int
    masters: int
    grads: int
    optimizer_state: int
    method: str
    formula: str
    formula_bytes: int
    params: int
    trained_params: int
    blocks: int | None
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.buffers + self.masters + self.grads + self.optimizer_state


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _unique_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return list(module.named_parameters(remove_duplicate=True))


def _optimizer_params(optimizers: Iterable[Optimizer]) -> list[Tensor]:
    return [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]


def _state_tensors(state: Any, prefix: str, depth: int = 0) -> Iterable[tuple[str, Tensor]]:
    if isinstance(state, Tensor):
        flatten = getattr(state, "__tensor_flatten__", None)
        if callable(flatten) and type(state) is not Tensor and not hasattr(state, "to_local"):
            # a wrapper subclass (torchao's OptimState4bit/8bit/Fp8) owns no storage: its inner tensors do (codes,
            # scales, the quantisation map)
            names, _ = flatten()
            for name in names:
                yield from _state_tensors(getattr(state, name), prefix, depth)
        else:
            yield prefix, state
    elif isinstance(state, Mapping):
        for key, value in state.items():
            yield from _state_tensors(value, prefix or str(key), depth)
    elif isinstance(state, list | tuple):
        for value in state:
            yield from _state_tensors(value, prefix, depth)
    elif depth < 2 and hasattr(state, "__dict__") and not isinstance(state, type):
        # an object in the state (GaLore's projector holds its projection matrices as attributes)
        for value in vars(state).values():
            yield from _state_tensors(value, prefix, depth + 1)


def account_memory(
    module: nn.Module,
    optimizers: Sequence[Optimizer] = (),
    masters: Mapping[str, Tensor] | None = None,
    *,
    count_other: bool = False,
) -> MemoryBreakdown:
    """Count the bytes held by ``module``'s weights and buffers, the masters, all gradients and optimizer state.

    Args:
        module: the model; its parameters are the weights (reported per dtype), its buffers the buffers.
        optimizers: their ``state`` tensors are the optimizer state (every tensor, e.g. ``exp_avg``, 8-bit ``state1``
            and ``absmax1``), reported per state key; their params that are not weights count as masters.
        masters: BAdam's ``strategy.master_params``; a master that is its own (FP32) weight counts as a weight.
        count_other: also count the rest. On CUDA: the caching allocator's allocated bytes minus everything
            accounted on that device (activations kept for backward, temporaries, the loss scaler). On CPU there is
            no allocator counter: the rest is every other tensor the garbage collector can reach (data batches,
            metric states); tensors only C++ holds, such as activations saved for backward, are not seen.

    Example::

        >>> layer = nn.Linear(4, 4)
        >>> optimizer = torch.optim.AdamW(layer.parameters())
        >>> layer(torch.ones(1, 4)).sum().backward()
        >>> optimizer.step()
        >>> memory = account_memory(layer, [optimizer])
        >>> memory.weights, memory.grads, memory.optimizer_state_by_key
        (80, 80, {'step': 8, 'exp_avg': 80, 'exp_avg_sq': 80})
    """
    ledger = StorageLedger()
    weights: dict[str, int] = {}
    params = _unique_params(module)
    for _, param in params:
        nbytes = ledger.add(param)
        if nbytes:
            name = _dtype_name(param.dtype)
            weights[name] = weights.get(name, 0) + nbytes
    buffers = sum(ledger.add(buffer) for buffer in module.buffers())
    master_tensors = list((masters or {}).values())
    optimized = _optimizer_params(optimizers)
    master_bytes = sum(ledger.add(t) for t in [*master_tensors, *optimized])
    grads = 0
    for tensor in [*(p for _, p in params), *master_tensors, *optimized]:
        if tensor.grad is not None:
            grads += ledger.add(tensor.grad)
    state: dict[str, int] = {}
    for optimizer in optimizers:
        for param_state in optimizer.state.values():
            for key, tensor in _state_tensors(param_state, ""):
                nbytes = ledger.add(tensor)
                if nbytes:
                    state[key] = state.get(key, 0) + nbytes
    other: int | None = None
    source: str | None = None
    if count_other:
        other, source = _other_bytes(ledger)
    return MemoryBreakdown(
        weights_by_dtype=weights,
        buffers=buffers,
        masters=master_bytes,
        grads=grads,
        optimizer_state_by_key=state,
        other=other,
        other_source=source,
    )


def _other_bytes(ledger: StorageLedger) -> tuple[int, str]:
    cuda_devices = [d for d in ledger.bytes_by_device if d.startswith("cuda")]
    if cuda_devices:
        allocated = sum(torch.cuda.memory_allocated(torch.device(d)) for d in cuda_devices)
        accounted = sum(ledger.bytes_by_device[d] for d in cuda_devices)
        return max(allocated - accounted, 0), "torch.cuda.memory_allocated minus the accounted categories"
    other = 0
    with warnings.catch_warnings():
        # touching deprecated module attributes (torch.distributed.reduce_op) warns; this is not the user's doing
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            # isinstance on arbitrary gc objects can raise (lazy modules, proxies): skip what cannot be inspected
            try:
                is_tensor = isinstance(obj, Tensor)
            except Exception:
                continue
            if is_tensor:
                other += ledger.add(obj)
    return other, "other tensors reachable by Python's garbage collector (autograd's saved tensors are not)"


# ---------------------------------------------------------------------------------------------------- prediction
def _coefficient(value: float) -> str:
    return f"{value:.3g}"


def predict_memory(
    module: nn.Module,
    optimizers: Sequence[Optimizer] = (),
    masters: Mapping[str, Tensor] | None = None,
    *,
    precision: str | None = None,
    blocks: int | None = None,
    accounted: MemoryBreakdown | None = None,
    update_in_backward: bool = False,
) -> MemoryPrediction:
    """The analytic memory model for the setup in use (see the module docstring for the formulas).

    Weights and buffers are predicted from their dtypes; a trained parameter (one in an optimizer, or a weight that
    requires grad and has no master) is predicted to hold a gradient in its own dtype and the state its optimizer
    keeps (:func:`optimizer_state_bytes`); a master is 4 bytes per element unless it is its own FP32 weight.

    Args:
        module: the model.
        optimizers: the optimizers; their param groups say which tensors are trained.
        masters: BAdam's active-block masters by parameter name.
        precision: Lightning's precision string, for the method's description.
        blocks: BAdam's number of blocks ``D`` (``None`` for a plain optimizer); it enters the closed form.
        accounted: used for optimizer state the model does not know (noted), instead of predicting nothing.
        update_in_backward: each tensor is stepped during backward and its gradient freed at once
            (``fused_update``): no gradient outlives its step, so none is predicted; during backward at most about
            the largest trained tensor's gradient exists (noted).

    Example::

        >>> layer = nn.Linear(100, 100, bias=False).to(torch.bfloat16)
        >>> master = nn.Parameter(layer.weight.detach().float())
        >>> prediction = predict_memory(layer, [torch.optim.AdamW([master])], {"weight": master}, blocks=1)
        >>> prediction.weights, prediction.masters, prediction.grads, prediction.optimizer_state
        (20000, 40000, 40000, 80004)
        >>> prediction.formula
        '2M + 16M/D'
    """
    masters = dict(masters or {})
    params = _unique_params(module)
    weight_storages = StorageLedger(shapes_only=True)
    weights = sum(weight_storages.add(p) for _, p in params)
    numel = sum(local_tensor(p).numel() for _, p in params)
    buffers = StorageLedger(shapes_only=True)
    buffer_bytes = sum(buffers.add(b) for b in module.buffers() if b not in weight_storages)
    own_masters = [m for m in masters.values() if m not in weight_storages]
    master_bytes = sum(local_tensor(m).numel() * 4 for m in own_masters)
    notes: list[str] = []

    trained: list[Tensor] = []
    seen: set[int] = set()
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    trained.append(p)
    master_ids = {id(m) for m in masters.values()}
    trained = [p for p in trained if p.requires_grad]
    for name, p in params:
        if p.requires_grad and id(p) not in seen and name not in masters and id(p) not in master_ids:
            seen.add(id(p))
            trained.append(p)
    freed = {id(p) for o in optimizers if frees_gradients(o) for g in o.param_groups for p in g["params"]}
    if freed:
        notes.append(
            "The optimizer frees each gradient as it steps its tensor (FLORA does): no gradient is held after the "
            "step; the peak still holds them between backward and the step."
        )
    grads = sum(local_tensor(p).numel() * p.element_size() for p in trained if id(p) not in freed)
    if update_in_backward:
        largest = max((local_tensor(p).numel() * p.element_size() for p in trained), default=0)
        notes.append(
            "Update in backward: every gradient is freed as soon as its tensor is stepped, so none is held after the "
            f"step; during backward about one tensor's gradient exists at a time (the largest: {largest:,} bytes)."
        )
        grads = 0

    state = 0
    for optimizer in optimizers:
        predicted = predict_optimizer_state_bytes(optimizer)
        if predicted is None:
            predicted = accounted.optimizer_state if accounted is not None else 0
            notes.append(
                f"{type(optimizer).__name__} is not in the memory model: its state is "
                + ("taken as accounted." if accounted is not None else "predicted as 0.")
            )
        state += predicted
    trained_numel = sum(local_tensor(p).numel() for p in trained)

    # the closed form, in bytes per parameter
    weight_size = weights / numel if numel else 0.0
    is_badam = blocks is not None
    trained_size = trained[0].element_size() if trained else (4 if own_masters else round(weight_size))
    s, optimizer_name = state_bytes_per_param(optimizers[0] if optimizers else None, trained_size)
    per_trained = (4.0 if own_masters else 0.0) + (0 if update_in_backward or freed else trained_size) + s
    if is_badam:
        d = max(int(blocks or 1), 1)
        formula = f"{_coefficient(weight_size)}M + {_coefficient(per_trained)}M/D"
        formula_bytes = round(weight_size * numel + per_trained * numel / d)
        method = f"BAdam ({precision or 'unknown precision'}) + {optimizer_name}"
    else:
        total_coefficient = weight_size + per_trained
        formula = f"{_coefficient(total_coefficient)}M"
        formula_bytes = round(total_coefficient * numel)
        method = f"{optimizer_name} ({precision or 'unknown precision'})"
        if precision is not None and "mixed" in precision:
            notes.append(
                "Mixed precision: the paper's count adds 2 bytes per parameter for a half-precision copy of the "
                "weights, which autocast holds only during forward and backward (it shows in the peak)."
            )
    return MemoryPrediction(
        weights=weights,
        buffers=buffer_bytes,
        masters=master_bytes,
        grads=grads,
        optimizer_state=state,
        method=method,
        formula=formula,
        formula_bytes=formula_bytes,
        params=numel,
        trained_params=trained_numel,
        blocks=blocks,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------------- peak
def peak_memory(device: torch.device | str) -> tuple[int | None, str]:
    """The peak memory so far and where it comes from.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, since the process started or the last reset of the
    peak statistics). CPU: the process's peak resident set size (Linux ``VmHWM``, elsewhere ``ru_maxrss``):
    process-wide, so it includes the Python interpreter, the loaded libraries and everything else the process held
    since it started, or since :func:`reset_peak_rss`.

    Example::

        >>> peak, source = peak_memory("cpu")
        >>> peak is None or peak > 0
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    hwm = _vm_hwm()
    if hwm is not None:
        return hwm, "VmHWM: peak resident set size of the whole process since it started (or reset_peak_rss)"
    try:
        import resource
    except ImportError:  # Windows
        return None, "unavailable on this platform"
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    scale = 1 if sys.platform == "darwin" else 1024
    return int(usage) * scale, "ru_maxrss: peak resident set size of the whole process since it started"


def _vm_hwm() -> int | None:
    # Linux: the high-water mark that /proc/self/clear_refs resets (ru_maxrss may also keep a maximum it saw earlier)
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_rss() -> bool:
    """Restart the CPU peak (:func:`peak_memory`) from the current resident set size; ``False`` where the OS cannot.

    Linux resets the process's high-water mark when ``5`` is written to ``/proc/self/clear_refs``. Call it just before
    the part to measure, so that earlier peaks (imports, tokenizing the data) do not hide the one that matters. Memory
    that was freed but kept by the C allocator would be reused without raising the resident size, hiding part of the
    new peak: glibc's ``malloc_trim`` hands it back to the OS first.

    Example::

        >>> reset_peak_rss() in (True, False)
        True
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def current_rss() -> int | None:
    """The process's resident set size now, in bytes (Linux ``/proc/self/statm``; ``None`` elsewhere).

    Example::

        >>> rss = current_rss()
        >>> rss is None or rss > 0
        True
    """
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------------------- callback
class MemoryReport(Callback):
    """Account for the memory of weights, FP32 masters, gradients and optimizer state, and compare with the model.

    Measures after an optimizer step (right after a BAdam block switch the new block has no optimizer state until its
    first step): after the first step, then every ``every_n_steps`` optimizer steps, and when training ends. The
    measurement with the largest accounted total is the one reported. Each measurement is logged to the Trainer's
    loggers as ``memory/<category>_mib`` (MiB). When training ends, rank zero prints a table and writes
    ``memory.json`` (bytes) into ``trainer.log_dir`` (the ``default_root_dir`` without a logger). Under DDP every
    rank measures its own tensors; the figures written are rank zero's.

    ``memory.json`` holds ``weights``, ``buffers``, ``masters``, ``grads``, ``optimizer_state``, ``total`` (their
    sum), ``other`` (see :func:`account_memory`; not in ``total``), ``predicted`` (:func:`predict_memory`), ``peak``
    (:func:`peak_memory`; on CPU process-wide), ``step``, and ``details`` (per-dtype weights, per-key state, the
    closed form, sources).

    Args:
        every_n_steps: measure every this many optimizer steps (``0``: only after the first step and at the end).
        count_other: also count the memory outside the categories (a garbage-collector scan on CPU, which takes a
            few tens of milliseconds in a large process).
        filename: name of the JSON file written in the log directory; ``None`` writes nothing.

    Example::

        from lightning.pytorch import Trainer
        from lightning_memopt import BAdamStrategy
        from lightning_memopt.memory import MemoryReport

        trainer = Trainer(strategy=BAdamStrategy(), precision="bf16-true", callbacks=[MemoryReport(every_n_steps=100)])
        trainer.fit(model)  # prints the table; <log_dir>/memory.json
    """

    def __init__(self, every_n_steps: int = 50, count_other: bool = True, filename: str | None = "memory.json") -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(
                f"MemoryReport(every_n_steps=...) must be a number of optimizer steps >= 0, got {every_n_steps!r}."
            )
        self.every_n_steps = every_n_steps
        self.count_other = count_other
        self.filename = filename
        self.report: dict[str, Any] | None = None
        self._best: tuple[MemoryBreakdown, MemoryPrediction, int, dict[str, Any]] | None = None
        self._last_step = -1
        self._measurements = 0

    def measure(self, trainer: Trainer, pl_module: LightningModule) -> tuple[MemoryBreakdown, MemoryPrediction]:
        """Account and predict now; keep the result if it is the largest so far, and log it."""
        badam = block_strategy(trainer)
        masters = badam.master_params if badam is not None else {}
        optimizers = list(trainer.optimizers)
        breakdown = account_memory(pl_module, optimizers, masters, count_other=self.count_other)
        prediction = predict_memory(
            pl_module,
            optimizers,
            masters,
            precision=str(trainer.precision),
            blocks=len(badam.blocks) if badam is not None else None,
            accounted=breakdown,
            update_in_backward=bool(getattr(trainer.strategy, "updates_in_backward", False)),
        )
        context = {"active_block": badam.active_block if badam is not None else None}
        self._measurements += 1
        if self._best is None or breakdown.total >= self._best[0].total:
            self._best = (breakdown, prediction, trainer.global_step, context)
        metrics = {
            "memory/weights_mib": breakdown.weights / _MIB,
            "memory/masters_mib": breakdown.masters / _MIB,
            "memory/grads_mib": breakdown.grads / _MIB,
            "memory/optimizer_state_mib": breakdown.optimizer_state / _MIB,
            "memory/total_mib": breakdown.total / _MIB,
            "memory/predicted_mib": prediction.total / _MIB,
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        return breakdown, prediction

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._best = None
        self.report = None
        self._last_step = trainer.global_step
        self._measurements = 0

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # a micro-batch of gradient accumulation: no optimizer step yet
            return
        self._last_step = step
        first = self._measurements == 0
        if first or (self.every_n_steps and step % self.every_n_steps == 0):
            self.measure(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step > 0:
            self.measure(trainer, pl_module)
        # trainer.log_dir is a collective under DDP: every rank asks
        log_dir = trainer.log_dir or trainer.default_root_dir
        if self._best is None:
            return
        self.report = self._summary(trainer, pl_module)
        if trainer.is_global_zero:
            rank_zero_log(_log, logging.INFO, format_report(self.report))
            if self.filename is not None:
                path = Path(log_dir) / self.filename
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(self.report, indent=2) + "\n")

    def _summary(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        assert self._best is not None
        breakdown, prediction, step, context = self._best
        device = trainer.strategy.root_device
        peak, peak_source = peak_memory(device)
        return {
            "weights": breakdown.weights,
            "buffers": breakdown.buffers,
            "masters": breakdown.masters,
            "grads": breakdown.grads,
            "optimizer_state": breakdown.optimizer_state,
            "total": breakdown.total,
            "other": breakdown.other,
            "predicted": prediction.total,
            "peak": peak,
            "step": step,
            "details": {
                "method": prediction.method,
                "params": prediction.params,
                "trained_params": prediction.trained_params,
                "blocks": prediction.blocks,
                "active_block": context["active_block"],
                "weights_by_dtype": breakdown.weights_by_dtype,
                "optimizer_state_by_key": breakdown.optimizer_state_by_key,
                "predicted_by_category": {
                    "weights": prediction.weights,
                    "buffers": prediction.buffers,
                    "masters": prediction.masters,
                    "grads": prediction.grads,
                    "optimizer_state": prediction.optimizer_state,
                },
                "formula": prediction.formula,
                "formula_bytes": prediction.formula_bytes,
                "other_source": breakdown.other_source,
                "peak_source": peak_source,
                "rss_now": current_rss() if device.type == "cpu" else None,
                "device": str(device),
                "rank": trainer.global_rank,
                "measurements": self._measurements,
                "notes": prediction.notes,
            },
        }


def format_report(report: Mapping[str, Any]) -> str:
    """The table :class:`MemoryReport` prints, from its ``memory.json`` content.

    Example::

        >>> print(format_report({"weights": 2**20, "predicted": 2**20, "total": 2**20, "step": 1,
        ...                      "details": {"method": "AdamW (32-true)", "formula": "16M"}}).splitlines()[0])
        Memory at step 1, AdamW (32-true)
    """
    details = report.get("details", {})
    predicted = details.get("predicted_by_category", {})
    lines = [f"Memory at step {report.get('step')}, {details.get('method')}"]
    rows = [("category", "accounted", "predicted")]
    for key, label in (
        ("weights", "weights " + "/".join(details.get("weights_by_dtype", {}))),
        ("buffers", "buffers"),
        ("masters", "FP32 masters"),
        ("grads", "gradients"),
        ("optimizer_state", "optimizer state"),
    ):
        if key in report:
            rows.append((label.strip(), _size(report.get(key)), _size(predicted.get(key))))
    rows.append(("total", _size(report.get("total")), _size(report.get("predicted"))))
    if details.get("formula"):
        rows.append((f"closed form {details['formula']}", "", _size(details.get("formula_bytes"))))
    if report.get("other") is not None:
        rows.append(("other (not in total)", _size(report.get("other")), ""))
    if report.get("peak") is not None:
        rows.append(("peak (process-wide on CPU)", _size(report.get("peak")), ""))
    width = max(len(r[0]) for r in rows)
    lines += [f"  {a:<{width}}  {b:>11}  {c:>11}" for a, b, c in rows]
    return "\n".join(lines)


def _size(value: Any) -> str:
    if value is None:
        return ""
    for unit, size in (("GiB", 2**30), ("MiB", _MIB), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value} B"
