"""8-bit optimizer state through bitsandbytes: the run's optimizer swapped for its 8-bit counterpart.

Adam keeps two FP32 numbers per trained parameter (8 bytes). bitsandbytes' 8-bit optimizers store each state tensor as
``uint8`` codes of a dynamic quantization map plus one FP32 absolute maximum per block of 256 values: 2 + 8/256 =
2.03 bytes per parameter for Adam (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022). Small
tensors (fewer than ``min_8bit_size`` values) and the parameters asked for keep 32-bit state.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from packaging.version import Version
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_memopt.checkpoint_io import AtomicCheckpointIO
from lightning_memopt.compat import OPTIMIZER_STEP_HOOK_ATTRS, child_schedulers, track_step_called
from lightning_memopt.log import get_logger, rank_zero_log
from lightning_memopt.optimizers import (
    BNB_INSTALL,
    SUPPORTED_OPTIMIZERS,
    bnb_group_keys,
    eight_bit_counterpart,
    import_bitsandbytes,
    is_eight_bit,
)
from lightning_memopt.strategies.badam import block_strategy

__all__ = [
    "SUPPORTED_OPTIMIZERS",
    "EightBitState",
    "check_bitsandbytes_version",
    "check_torchao_fp8_device",
    "is_eight_bit",
    "to_eight_bit",
    "to_torchao",
]

_log = get_logger("eight_bit")

# 8-bit optimizers on the CPU arrived in 0.50, and so did the lookup of per-parameter overrides by parameter identity
# (bitsandbytes#1269, fixed by #1869): before, `override_config` was silently ignored once the optimizer existed.
_CPU_MIN_VERSION = (0, 50)
_OVERRIDE_MIN_VERSION = (0, 50)
_OLDEST_SUPPORTED = (0, 45)  # pyproject's floor; 8-bit optimizers on CUDA are much older than that


def check_bitsandbytes_version(version: str, device_type: str, keeps_32bit: bool) -> None:
    """Raise if bitsandbytes ``version`` cannot run 8-bit optimizers on ``device_type`` as EightBitState needs.

    The CPU needs 0.50 (earlier releases have no CPU kernels for 8-bit optimizers); keeping chosen parameters in 32-bit
    state needs 0.50 on every device (earlier releases ignore ``GlobalOptimManager.override_config`` once the
    optimizer exists, bitsandbytes#1269).

    Example::

        >>> check_bitsandbytes_version("0.50.2", "cpu", keeps_32bit=True)
        >>> check_bitsandbytes_version("0.45.5", "cuda", keeps_32bit=False)
        >>> check_bitsandbytes_version("0.49.0", "cpu", keeps_32bit=False)
        Traceback (most recent call last):
        ...
        lightning.fabric.utilities.exceptions.MisconfigurationException: bitsandbytes 0.49.0 ...
    """
    release = Version(version).release
    if device_type == "cpu" and release < _CPU_MIN_VERSION:
        reason = "runs its 8-bit optimizers on the CPU only from 0.50 on"
    elif keeps_32bit and release < _OVERRIDE_MIN_VERSION:
        reason = (
            "ignores per-parameter 32-bit overrides before 0.50 (bitsandbytes#1269), so the parameters EightBitState "
            "keeps in 32 bits would silently get 8-bit state; pass keep_32bit=() and keep_32bit_embeddings=False to "
            "run without overrides"
        )
    elif release < _OLDEST_SUPPORTED:
        reason = "is older than the oldest release lightning-memopt supports (0.45)"
    else:
        return
    raise MisconfigurationException(
        f"bitsandbytes {version} is too old for 8-bit optimizer state on this {device_type} run: it {reason}. "
        f"Upgrade with `{BNB_INSTALL}`."
    )


def to_eight_bit(optimizer: Optimizer, min_8bit_size: int = 4096) -> Optimizer:
    """Return the bitsandbytes 8-bit counterpart of ``optimizer``, over the same param groups and hyper-parameters.

    Every param group keeps its parameters, its current hyper-parameters (translated into bitsandbytes' keys, e.g.
    SGD's momentum becomes ``betas[0]``) and any extra keys (a scheduler's ``initial_lr``, your own ``name``). Step
    hooks registered on ``optimizer`` are shared with the new one. The new optimizer starts without state (create it
    before the first step). An optimizer that already keeps 8-bit state is returned as it is. Supported:
    torch's Adam (no L2 weight decay), AdamW, SGD with momentum, RMSprop, Adagrad, and bitsandbytes' 32-bit Adam,
    AdamW and Lion (and Paged versions); options the 8-bit kernels would ignore (AMSGrad, Nesterov, centered,
    ``maximize``, ...) raise a ``ValueError`` that names them.

    Args:
        optimizer: the optimizer to replace.
        min_8bit_size: tensors with fewer values keep 32-bit state (bitsandbytes' default, 4096).

    Example::

        >>> import torch
        >>> model = torch.nn.Linear(64, 64)
        >>> adamw = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias], "weight_decay": 0.0}],
        ...                           lr=1e-3, weight_decay=0.1)
        >>> eight = to_eight_bit(adamw)
        >>> type(eight).__name__, [g["weight_decay"] for g in eight.param_groups]
        ('AdamW8bit', [0.1, 0.0])
    """
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"min_8bit_size must be a number of tensor elements >= 0, got {min_8bit_size!r}.")
    if is_eight_bit(optimizer):
        return optimizer
    bnb = import_bitsandbytes()
    target, translate = eight_bit_counterpart(optimizer, bnb)
    source = type(optimizer).__name__
    groups = []
    for i, group in enumerate(optimizer.param_groups):
        # keys the source optimizer does not define (params, initial_lr, a user's name) travel unchanged
        extras = {k: v for k, v in group.items() if k not in optimizer.defaults}
        groups.append({**extras, **bnb_group_keys(target, translate(group, f"Param group {i} of {source}"))})
    # keyword arguments only: bitsandbytes 0.50 removed percentile_clipping/block_wise, so positions shifted
    eight = target(params=groups, min_8bit_size=min_8bit_size, **translate(optimizer.defaults, f"{source}'s defaults"))
    for attr in OPTIMIZER_STEP_HOOK_ATTRS:
        # share the very dicts, so hooks registered before the swap run and their handles still remove them
        setattr(eight, attr, getattr(optimizer, attr))
    return eight


TORCHAO_INSTALL = "pip install 'torchao>=0.18'  # or: pip install 'lightning-memopt[compressed]'"
BACKENDS = ("bitsandbytes", "torchao")
TORCHAO_BITS = (4, 8, "fp8")
# torchao's FP8 state casts to float8_e4m3fn inside compiled code: Triton has that cast from compute capability 8.9 on
# (Ada, Hopper; torchao's own tests skip below it), the CPU's C++ backend has it on every CPU (checked on torch 2.13)
_FP8_MIN_CUDA_CAPABILITY = (8, 9)


def import_torchao_optim() -> Any:
    try:
        import torchao.optim
    except ImportError as err:
        raise ModuleNotFoundError(
            f"EightBitState(backend='torchao') needs the torchao package, which could not be imported ({err}). "
            f"Install it with `{TORCHAO_INSTALL}`, or use backend='bitsandbytes'."
        ) from err
    return torchao.optim


def check_torchao_fp8_device(device: torch.device | str) -> None:
    """Raise if torchao's FP8 optimizer state (``bits="fp8"``) cannot run on ``device``.

    FP8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); the CPU runs it. Other devices are
    left to torchao.

    Example::

        >>> check_torchao_fp8_device("cpu")
    """
    device = torch.device(device)
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability >= _FP8_MIN_CUDA_CAPABILITY:
        return
    major, minor = capability
    raise MisconfigurationException(
        f"EightBitState(backend='torchao', bits='fp8') needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper or "
        f"newer), but {torch.cuda.get_device_name(device)} has {major}.{minor}: torchao's FP8 state casts to "
        "float8_e4m3fn, which Triton compiles only from 8.9 on. Use bits=8 (the same 2 bytes per parameter, with a "
        "256-entry map) or bits=4."
    )


def to_torchao(optimizer: Optimizer, bits: int | str = 4) -> Optimizer:
    """Return torchao's low-bit counterpart of a torch ``Adam``/``AdamW``: ``Adam4bit``/``AdamW4bit`` (``bits=4``),
    ``Adam8bit``/``AdamW8bit`` (``bits=8``) or ``AdamFp8``/``AdamWFp8`` (``bits="fp8"``), over the same param groups
    and hyper-parameters (``lr``, ``betas``, ``eps``, ``weight_decay``; Adam's L2 decay stays L2, AdamW's decoupled).

    torchao quantises both moments of every tensor of at least 4096 values that its block size divides, blockwise
    (4 bits: codes two to a byte, one FP32 scale per 128 values and a 16-entry FP32 map per tensor; 8 bits: one byte,
    a scale per 256 values and a 256-entry map; FP8: ``float8_e4m3fn`` codes, a scale per 256 values), and keeps the
    others in the parameter's own dtype; ``step`` is a 0-d FP32 tensor. The update is compiled with
    ``torch.compile`` on the first step of each parameter shape, dtype and combination of ``betas``, ``eps`` and
    ``weight_decay`` (seconds on a CPU; later steps and new tensors of the same kind reuse it). torchao keeps ``lr`` as
    a 0-d tensor, which torch's LR schedulers fill in place (so schedules never recompile); a Python float written
    into ``group["lr"]`` (which torchao's step refuses) is turned back into a tensor before each step. Every param
    group keeps its extra keys (a scheduler's ``initial_lr``, your own ``name``); step hooks registered on
    ``optimizer`` are shared. Options torchao does not implement (``amsgrad``, ``maximize``, ...) raise a
    ``ValueError`` that names them; other optimizers a ``TypeError``. FP8 state needs a CPU or a CUDA GPU of compute
    capability >= 8.9 (see :func:`check_torchao_fp8_device`).

    Example::

        >>> import torch
        >>> model = torch.nn.Linear(64, 64)
        >>> low = to_torchao(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1), bits=4)
        >>> type(low).__name__, float(low.param_groups[0]["lr"]), low.param_groups[0]["weight_decay"]
        ('AdamW4bit', 0.0010000000474974513, 0.1)
    """
    if isinstance(bits, bool) or bits not in TORCHAO_BITS:
        raise ValueError(f"to_torchao(bits=...) must be 4, 8 or 'fp8', got {bits!r}.")
    ao = import_torchao_optim()
    cls = type(optimizer)
    if cls.__module__.startswith("torchao"):
        return optimizer
    if cls not in (torch.optim.Adam, torch.optim.AdamW):
        raise TypeError(
            f"EightBitState(backend='torchao') cannot give {cls.__module__}.{cls.__qualname__} low-bit state: torchao "
            "has low-bit versions of torch.optim.Adam and torch.optim.AdamW only. Use one of those, or "
            "backend='bitsandbytes' (which also covers SGD, RMSprop, Adagrad and Lion)."
        )
    if bits == "fp8":
        for device in {p.device for group in optimizer.param_groups for p in group["params"]}:
            check_torchao_fp8_device(device)
    decoupled = cls is torch.optim.AdamW
    suffix = "Fp8" if bits == "fp8" else f"{bits}bit"
    target = getattr(ao, f"{'AdamW' if decoupled else 'Adam'}{suffix}")

    def translate(h: Mapping[str, Any], where: str) -> dict[str, Any]:
        for option in ("maximize", "capturable", "differentiable"):
            if h.get(option, False):
                raise ValueError(f"{where} has {option}=True, which torchao's {target.__name__} does not implement.")
        if h.get("amsgrad", False):
            # torchao 0.18 has the option, but its quantised state has no `maximum`: the first step fails to compile
            raise ValueError(
                f"{where} has amsgrad=True, which torchao's {target.__name__} cannot run on quantised state. Pass "
                "amsgrad=False, or use EightBitState without backend='torchao' for 32-bit AMSGrad."
            )
        if not decoupled and h.get("decoupled_weight_decay", False):
            raise ValueError(f"{where} has decoupled_weight_decay=True: use torch.optim.AdamW for torchao's AdamW.")
        return {
            "lr": _as_float(h["lr"]),
            "betas": tuple(_as_float(b) for b in h["betas"]),
            "eps": _as_float(h["eps"]),
            "weight_decay": _as_float(h["weight_decay"]),
            "amsgrad": False,
        }

    source = cls.__name__
    groups = []
    for i, group in enumerate(optimizer.param_groups):
        extras = {k: v for k, v in group.items() if k not in optimizer.defaults}
        groups.append({**extras, **translate(group, f"Param group {i} of {source}")})
    low = target(groups, **translate(optimizer.defaults, f"{source}'s defaults"))
    for attr in OPTIMIZER_STEP_HOOK_ATTRS:
        setattr(low, attr, getattr(optimizer, attr))
    # registered after the sharing, so it lives in the shared dict: it acts on `low` only
    low.register_step_pre_hook(_LrAsTensor(low))
    return low


class _LrAsTensor:
    """Step pre-hook: put a Python float found in ``group["lr"]`` back into the 0-d tensor torchao's step needs.

    torch's schedulers fill the tensor in place, but ``group["lr"] = x`` (user code, older schedulers, LR finders)
    would make torchao raise "lr was changed to a non-Tensor object"; the value written last is the one used.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self._optimizer = weakref.ref(optimizer)

    def __call__(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if optimizer is not self._optimizer():
            return
        for group in optimizer.param_groups:
            if not isinstance(group["lr"], Tensor):
                group["lr"] = torch.tensor(_as_float(group["lr"]), dtype=torch.float32)


def _as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


# ------------------------------------------------------------------------------------------- 32-bit exceptions
class _Overrides:
    """The parameters whose state bitsandbytes keeps in 32 bits, as entries in its process-wide GlobalOptimManager.

    The manager is keyed by ``id(param)``: entries must follow the parameters (BAdam makes new masters at every
    activation) and must go away with them, or a later tensor that reuses the id would inherit the override.
    """

    def __init__(self) -> None:
        self._previous: dict[int, dict[str, Any] | None] = {}

    def set(self, params: Iterable[Tensor]) -> None:
        self.clear()
        manager = import_bitsandbytes().optim.GlobalOptimManager.get_instance()
        for param in params:
            key = id(param)
            if key in self._previous:
                continue
            previous = manager.pid2config.get(key)
            self._previous[key] = previous
            # a fresh dict: `override_config` would update a dict that bitsandbytes may share between parameters
            manager.pid2config[key] = {**(previous or {}), "optim_bits": 32}

    def clear(self) -> None:
        if not self._previous:
            return
        manager = import_bitsandbytes().optim.GlobalOptimManager.get_instance()
        for key, previous in self._previous.items():
            if previous is None:
                manager.pid2config.pop(key, None)
            else:
                manager.pid2config[key] = previous
        self._previous = {}


def _embedding_param_names(module: nn.Module) -> set[str]:
    embedding_ids = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return {n for n, p in module.named_parameters() if id(p) in embedding_ids}


def _is_bnb_state(state: Mapping[str, Any]) -> bool:
    # bitsandbytes' state_dict nests its quantization tensors under this key (for FSDP); in memory they are top level
    return "state1" in state or "__bnb_optimizer_quant_state__" in state


# ------------------------------------------------------------------------------------------------------ callback
class EightBitState(Callback):
    """Keep the optimizer state in 8 bits: the run's optimizer is swapped for its bitsandbytes 8-bit counterpart.

    At the start of fit, ``torch.optim.Adam``/``AdamW``/``SGD`` (with momentum)/``RMSprop``/``Adagrad`` (or
    bitsandbytes' 32-bit Adam/AdamW/Lion) become ``Adam8bit``/``AdamW8bit``/``SGD8bit``/``RMSprop8bit``/``Adagrad8bit``
    (``Lion8bit``) with the same param groups and hyper-parameters; LR schedulers are re-pointed at the new optimizer,
    so schedules, ``LearningRateMonitor`` (which then logs ``lr-AdamW8bit``), gradient clipping and checkpoints keep
    working. A bitsandbytes optimizer that is 8-bit already is kept as it is. State is 8-bit for every tensor of at
    least ``min_8bit_size`` values, except the parameters kept in 32 bits: embeddings (by default, as bitsandbytes
    recommends) and the names matching ``keep_32bit``.

    Works with single-device and DDP strategies and with ``badam``/``badam_ddp``, where the 32-bit exceptions are
    registered again for the new FP32 masters at every block activation. Needs bitsandbytes >= 0.50 on the CPU.

    With ``backend="torchao"`` the optimizer (torch's ``Adam``/``AdamW``) becomes torchao's ``Adam4bit``/
    ``AdamW4bit`` (``bits=4``: ~0.53 bytes per moment value), ``Adam8bit``/``AdamW8bit`` (``bits=8``) or
    ``AdamFp8``/``AdamWFp8`` (``bits="fp8"``; a CPU or a CUDA GPU of compute capability >= 8.9) instead (see
    :func:`to_torchao`); torchao compiles each parameter shape on its first step and has no per-parameter exceptions
    (so no ``keep_32bit``, ``min_8bit_size`` or ``keep_32bit_embeddings=True``). Its state loads with
    ``weights_only=True`` (torchao registers its classes as safe when ``torchao.optim`` is imported, which this
    callback does), but not through Lightning's default loader, whose callable ``map_location`` torch refuses for
    tensor subclasses: a strategy with Lightning's default ``TorchCheckpointIO`` is given
    :class:`~lightning_memopt.AtomicCheckpointIO` (the BAdam strategies' default, which reads them) at setup.

    Args:
        min_8bit_size: tensors with fewer values keep 32-bit state (norms, biases); bitsandbytes' default is 4096.
        keep_32bit: regular expressions (``re.search`` on parameter names such as ``model.norm.weight``) of further
            parameters whose state stays 32-bit, e.g. ``["norm", "lm_head"]``.
        keep_32bit_embeddings: keep the state of every ``torch.nn.Embedding``'s weight in 32 bits (bitsandbytes'
            advice for stable training; Hugging Face's Trainer does the same). bitsandbytes only: left out, it is
            ``True`` there and does not apply to torchao, which quantises embeddings like any large tensor.
        backend: ``"bitsandbytes"`` or ``"torchao"``.
        bits: 8, or with ``backend="torchao"`` 4 or ``"fp8"`` as well.

    Example::

        from lightning.pytorch import Trainer
        from lightning_memopt import BAdamStrategy, BlockSwitch, EightBitState

        trainer = Trainer(strategy=BAdamStrategy(), precision="bf16-true",
                          callbacks=[BlockSwitch(every=100), EightBitState(keep_32bit=["norm"])])
        # torchao's 4-bit AdamW state instead of bitsandbytes' 8 bits
        trainer = Trainer(strategy=BAdamStrategy(), precision="bf16-true",
                          callbacks=[BlockSwitch(every=100), EightBitState(backend="torchao", bits=4)])

    or, in a LightningCLI recipe, one more entry under ``trainer.callbacks``::

        - class_path: lightning_memopt.EightBitState
          init_args: {backend: torchao, bits: 4}   # torchao's 4-bit AdamW; leave out for bitsandbytes' 8 bits
    """

    def __init__(
        self,
        min_8bit_size: int = 4096,
        keep_32bit: Sequence[str] = (),
        keep_32bit_embeddings: bool | None = None,
        backend: str = "bitsandbytes",
        bits: int | str = 8,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"EightBitState(backend=...) must be one of {BACKENDS}, got {backend!r}.")
        if backend == "bitsandbytes" and bits != 8:
            raise ValueError(
                f"EightBitState(bits={bits!r}) needs backend='torchao': bitsandbytes keeps 8-bit state only. Write "
                f"EightBitState(backend='torchao', bits={bits!r})."
            )
        if backend == "torchao":
            if isinstance(bits, bool) or bits not in TORCHAO_BITS:
                raise ValueError(f"EightBitState(backend='torchao', bits=...) must be 4, 8 or 'fp8', got {bits!r}.")
            if min_8bit_size != 4096 or keep_32bit or keep_32bit_embeddings:
                raise ValueError(
                    "EightBitState(backend='torchao') has no min_8bit_size, keep_32bit or keep_32bit_embeddings: "
                    "torchao quantises every tensor of at least 4096 values (that its block size divides), "
                    "embeddings included, and has no per-parameter exceptions. Remove those options, or use "
                    "backend='bitsandbytes'."
                )
            import_torchao_optim()
        self.backend = backend
        self.bits = bits
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(
                f"EightBitState(min_8bit_size=...) must be a number of tensor elements >= 0, got {min_8bit_size!r}."
            )
        if isinstance(keep_32bit, str):
            raise ValueError(
                f"EightBitState(keep_32bit=...) takes a list of regular expressions, got the string {keep_32bit!r}. "
                f"Write keep_32bit=[{keep_32bit!r}]."
            )
        for pattern in keep_32bit:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(
                    f"EightBitState(keep_32bit=...) has an invalid regular expression {pattern!r}: {err}"
                ) from err
        if backend == "bitsandbytes":
            import_bitsandbytes()  # fail while the run is being configured, not at the start of fit
        self.min_8bit_size = min_8bit_size
        self.keep_32bit = list(keep_32bit)
        self.keep_32bit_embeddings = backend == "bitsandbytes" and keep_32bit_embeddings is not False
        self._kept: list[str] = []
        self._overrides = _Overrides()
        self._activation_handle: RemovableHandle | None = None

    def __repr__(self) -> str:
        if self.backend == "torchao":
            return f"EightBitState(backend='torchao', bits={self.bits})"
        return (
            f"EightBitState(min_8bit_size={self.min_8bit_size}, keep_32bit={self.keep_32bit!r}, "
            f"keep_32bit_embeddings={self.keep_32bit_embeddings})"
        )

    @property
    def kept_32bit(self) -> list[str]:
        """Names of the parameters whose state stays 32-bit by request (known once fit has started)."""
        return list(self._kept)

    # ----------------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.backend == "torchao":
            if self.bits == "fp8":
                check_torchao_fp8_device(trainer.strategy.root_device)
            _load_tensor_subclasses(trainer)
            return
        bnb = import_bitsandbytes()
        keeps = bool(self.keep_32bit) or self.keep_32bit_embeddings
        check_bitsandbytes_version(bnb.__version__, trainer.strategy.root_device.type, keeps_32bit=keeps)

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        for i, saved in enumerate(checkpoint.get("optimizer_states", [])):
            for state in saved.get("state", {}).values():
                if self.backend == "torchao":
                    if _is_bnb_state(state):
                        raise MisconfigurationException(
                            f"The checkpoint's optimizer {i} holds bitsandbytes 8-bit state, but EightBitState("
                            "backend='torchao') trains with torchao's optimizer, which cannot load it. Resume with "
                            "backend='bitsandbytes', or start a new run from the checkpoint's weights only."
                        )
                    continue
                if state and not _is_bnb_state(state):
                    raise MisconfigurationException(
                        f"The checkpoint's optimizer {i} holds 32-bit state ({', '.join(sorted(state))}), but "
                        "EightBitState trains with a bitsandbytes 8-bit optimizer, which cannot load it. Resume "
                        "without EightBitState, or start a new run from the checkpoint's weights only "
                        "(model.load_state_dict(torch.load(path)['state_dict']) and trainer.fit without ckpt_path)."
                    )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        strategy = trainer.strategy
        if not strategy.optimizers:
            rank_zero_warn("EightBitState: configure_optimizers returned no optimizer, so there is no state to shrink.")
            return
        swapped = []
        for old in strategy.optimizers:
            if any(len(s) for s in old.state.values()):
                rank_zero_warn(
                    f"EightBitState: {type(old).__name__} already has optimizer state; its bitsandbytes 8-bit "
                    "counterpart starts without it."
                )
            if self.backend == "torchao":
                swapped.append((old, to_torchao(old, bits=self.bits)))
                continue
            new = to_eight_bit(old, min_8bit_size=self.min_8bit_size)
            own_min_size = getattr(getattr(old, "args", None), "min_8bit_size", self.min_8bit_size)
            if new is old and own_min_size != self.min_8bit_size:
                rank_zero_warn(
                    f"EightBitState(min_8bit_size={self.min_8bit_size}) leaves the configured {type(old).__name__} "
                    f"as it is, with its own min_8bit_size={own_min_size}."
                )
            swapped.append((old, new))
        strategy.optimizers = [new for _, new in swapped]
        for old, new in swapped:
            if new is not old:
                _repoint_schedulers(trainer, old, new)

        if self.backend == "torchao":
            names = ", ".join(f"{type(o).__name__} -> {type(n).__name__}" for o, n in swapped)
            rank_zero_log(
                _log,
                logging.INFO,
                f"EightBitState: {names} (torchao, {self.bits}-bit state for tensors of >= 4096 values; each "
                "parameter shape compiles on its first step)",
            )
            return
        self._kept = self._resolve_kept(pl_module)
        badam = block_strategy(trainer)
        if badam is not None:
            # BAdam makes new FP32 masters at every activation: register them again each time (and now, in case the
            # BlockSwitch callback ran before this one and a block is active already)
            self._activation_handle = badam.register_activation_hook(self._on_activation, run_now=True)
        else:
            params = dict(pl_module.named_parameters())
            self._overrides.set(params[n] for n in self._kept)
        names = ", ".join(
            f"{type(o).__name__} -> {type(n).__name__}" if n is not o else f"{type(o).__name__} (kept)"
            for o, n in swapped
        )
        rank_zero_log(
            _log,
            logging.INFO,
            f"EightBitState: {names}; 32-bit state for tensors under {self.min_8bit_size} values"
            + (f" and {len(self._kept)} kept parameters (e.g. {self._kept[0]!r})" if self._kept else ""),
        )

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._release()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release()

    # ----------------------------------------------------------------------------------------------- internals
    def _resolve_kept(self, pl_module: LightningModule) -> list[str]:
        names = [n for n, _ in pl_module.named_parameters()]
        wanted = _embedding_param_names(pl_module) if self.keep_32bit_embeddings else set()
        for pattern in self.keep_32bit:
            matched = {n for n in names if re.search(pattern, n)}
            if not matched:
                rank_zero_warn(
                    f"EightBitState(keep_32bit=[..., {pattern!r}, ...]) matches no parameter (names look like "
                    f"{names[0]!r}); fix the pattern or remove it."
                )
            wanted |= matched
        return [n for n in names if n in wanted]

    def _on_activation(self, strategy: Any, index: int | None) -> None:
        masters = strategy.master_params
        self._overrides.set(masters[n] for n in self._kept if n in masters)

    def _release(self) -> None:
        if self._activation_handle is not None:
            self._activation_handle.remove()
            self._activation_handle = None
        self._overrides.clear()


def _load_tensor_subclasses(trainer: Trainer) -> None:
    # Lightning's loader passes map_location=`lambda storage, loc: storage`, which torch refuses for tensor subclasses
    # ("Callable map_location not supported with _rebuild_wrapper_subclass"); `setup` runs before a checkpoint is read
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
        rank_zero_log(
            _log,
            logging.INFO,
            "EightBitState(backend='torchao'): checkpoints are written and read by AtomicCheckpointIO, which can "
            "load torchao's quantised optimizer state (Lightning's default loader cannot).",
        )


def _repoint_schedulers(trainer: Trainer, old: Optimizer, new: Optimizer) -> None:
    def repoint(scheduler: Any) -> bool:
        found = False
        if getattr(scheduler, "optimizer", None) is old:
            scheduler.optimizer = new
            found = True
        # SequentialLR and ChainedScheduler drive schedulers of their own
        for inner in child_schedulers(scheduler):
            found = repoint(inner) or found
        return found

    found = False
    for config in trainer.lr_scheduler_configs:
        found = repoint(config.scheduler) or found
    if found:
        track_step_called(new)
