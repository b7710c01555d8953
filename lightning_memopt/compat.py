"""Every private attribute of another library that the pack reads or writes, in one place.

Each function names the library version its private attribute was checked against and falls back safely where the
attribute has gone, so an upgrade that renames one breaks this file's tests rather than a user's run. Nothing else in
the package touches another library's underscore names.

Example::

    >>> import torch
    >>> is_fake(torch.zeros(1))
    False
"""

from __future__ import annotations

import logging
import sys
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import wraps
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

# torch (2.13): the base class of dispatch modes, which sees every operator call and its results, and pytree's
# flattening of nested results (both public in use, private in name)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = [
    "OPTIMIZER_STEP_HOOK_ATTRS",
    "TorchDispatchMode",
    "buffer",
    "child_schedulers",
    "compiled_parts",
    "disable_input_grad_hooks",
    "dynamo_recompile_limit",
    "enable_input_grad_hooks",
    "fake_tensor_mode",
    "full_tensor",
    "is_fake",
    "lightning_trainer",
    "nonfinite_flag",
    "parallel_devices",
    "quiet_library_noise",
    "replace_buffer",
    "storage_key",
    "track_step_called",
    "tree_leaves",
]

# torch (2.13): the dicts behind Optimizer.register_step_pre_hook / register_step_post_hook
OPTIMIZER_STEP_HOOK_ATTRS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")


def is_fake(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``FakeTensor`` (torch.compile's tracing stand-in, which owns no memory).

    torch (2.13) has no public test for it.
    """
    from torch._subclasses.fake_tensor import is_fake as torch_is_fake

    return bool(torch_is_fake(tensor))


def nonfinite_flag(tensors: Sequence[Tensor]) -> Tensor:
    """A one-element FP32 tensor on the tensors' device: 1 if any of them holds an inf or NaN, else 0.

    torch's fused check that ``GradScaler`` runs (``_amp_foreach_non_finite_check_and_unscale_``, torch 2.13, CPU and
    CUDA), with a scale of 1, which leaves every value bit-identical; ~20x faster on the CPU than a stack of
    ``isfinite().all()`` per tensor, and exact (no norm that could overflow).

    Example::

        >>> import torch
        >>> nonfinite_flag([torch.ones(3), torch.tensor([1.0, float("nan")])])
        tensor([1.])
    """
    found = torch.zeros(1, device=tensors[0].device)
    torch._amp_foreach_non_finite_check_and_unscale_(list(tensors), found, torch.ones(1, device=found.device))
    return found


def lightning_trainer(module: Any) -> Any:
    """The Trainer a LightningModule is attached to, or ``None`` (Lightning 2.6's ``trainer`` property raises
    instead of returning ``None``, so the attribute behind it is read)."""
    return getattr(module, "_trainer", None)


def parallel_devices(trainer: Any) -> list[Any]:
    """The devices Lightning's accelerator connector resolved from ``Trainer(devices=...)`` (Lightning 2.6; empty when
    it has none). Lightning #18902: a ``SingleDeviceStrategy`` built without ``device`` would not see them."""
    connector = getattr(trainer, "_accelerator_connector", None)
    return list(getattr(connector, "_parallel_devices", None) or [])


def compiled_parts(module: nn.Module) -> list[str]:
    """Where ``module`` is compiled: ``trainer.fit(torch.compile(model))`` (Lightning 2.6 unwraps it and keeps
    ``_compiler_ctx``), ``torch.compile(submodule)`` or ``submodule.compile()`` (torch's ``_compiled_call_impl``).

    Example::

        >>> compiled_parts(nn.Linear(2, 2))
        []
    """
    dynamo = sys.modules.get("torch._dynamo")  # torch.compile imports it: without it nothing can be compiled
    if dynamo is None:
        return []
    found = []
    if getattr(module, "_compiler_ctx", None) is not None:
        found.append("the LightningModule")
    for name, sub in module.named_modules():
        if isinstance(sub, dynamo.OptimizedModule) or getattr(sub, "_compiled_call_impl", None) is not None:
            found.append(repr(name) if name else "the LightningModule")
    return list(dict.fromkeys(found))


def dynamo_recompile_limit() -> tuple[str, Any]:
    """The name and value of dynamo's per-function recompilation limit (torch 2.6 renamed ``cache_size_limit`` to
    ``recompile_limit``)."""
    config = sys.modules["torch._dynamo"].config
    setting = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return setting, getattr(config, setting, "?")


def disable_input_grad_hooks(module: nn.Module) -> list[nn.Module]:
    """Turn off transformers' input-embedding hooks that make the embedding output require grad (set up by
    ``gradient_checkpointing_enable``; transformers 4.5x keeps them in ``_require_grads_hooks``); returns the modules
    to hand back to :func:`enable_input_grad_hooks`."""
    disabled = []
    for sub in module.modules():
        disable = getattr(sub, "disable_input_require_grads", None)
        if getattr(sub, "_require_grads_hooks", None) and callable(disable):
            disable()
            disabled.append(sub)
    return disabled


def enable_input_grad_hooks(modules: list[nn.Module]) -> None:
    """Undo :func:`disable_input_grad_hooks`."""
    for sub in modules:
        sub.enable_input_require_grads()  # type: ignore[operator]


def child_schedulers(scheduler: Any) -> Iterator[Any]:
    """The schedulers that ``SequentialLR`` and ``ChainedScheduler`` drive (torch 2.13 keeps them in
    ``_schedulers``); nothing for any other scheduler."""
    yield from getattr(scheduler, "_schedulers", [])


def track_step_called(optimizer: Optimizer) -> None:
    """Wrap ``optimizer.step`` as torch's LR schedulers do for the optimizer they are built with (torch 2.13:
    ``_wrapped_by_lr_sched`` marks the wrapper, ``_opt_called`` records a call), so that a scheduler re-pointed at a new
    optimizer does not warn that ``step()`` "has been overridden after learning rate scheduler initialization"
    (pytorch#20124)."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    step = type(optimizer).step
    ref = weakref.ref(optimizer)  # the optimizer holds this wrapper: no reference cycle

    @wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = ref()
        assert opt is not None
        opt._opt_called = True  # type: ignore[attr-defined]
        return step(opt, *args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]


def replace_buffer(module: nn.Module, name: str, tensor: Tensor) -> bool:
    """Put ``tensor`` in place of ``module``'s buffer ``name``, keeping whether it is persistent, from inside
    ``nn.Module._apply`` (torch 2.13 keeps buffers in ``_buffers``; ``register_buffer`` would reset persistence).
    Returns ``False`` when the module has no such buffer."""
    if module._buffers.get(name) is None:
        return False
    module._buffers[name] = tensor
    return True


def buffer(module: nn.Module, name: str) -> Tensor | None:
    """``module``'s own buffer ``name`` (not a submodule's), or ``None``."""
    return module._buffers.get(name)


def storage_key(tensor: Tensor) -> int:
    """An identity of ``tensor``'s storage, shared by its views and tied weights, for meta and fake tensors too (whose
    ``data_ptr`` is 0): the address of torch's C++ storage object (``UntypedStorage._cdata``, torch 2.13), valid
    while the storage lives."""
    return int(tensor.untyped_storage()._cdata)


@contextmanager
def fake_tensor_mode() -> Iterator[Any]:
    """torch's ``FakeTensorMode`` (``torch._subclasses``, 2.13): tensors made inside have shapes, dtypes and devices
    but no memory, and operators on them compute nothing. Real tensors passed in are converted."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole of a sharded ``DTensor`` on every rank (a collective: every rank calls it), with nothing left in
    flight; any other tensor as it is.

    ``DTensor.full_tensor()`` gathers through torch's functional collectives, whose results are
    ``AsyncCollectiveTensor`` wrappers waited on first use (``torch.distributed._functional_collectives``, torch 2.13).
    For a tensor subclass that gathers its inner tensors itself (torchao 0.18's quantised optimizer state gathers its
    codes and scales), the wrappers end up *inside* the subclass, where a no-op such as ``.cpu()`` on a CPU tensor never
    waits: the collectives stay pending into the checkpoint, and a gloo group torn down with them can abort the
    process (exit status -6). Here every inner result is waited before it is returned.

    Example::

        state = full_tensor(optimizer.state[param]["exp_avg"])  # under badam_fsdp: the unsharded moment
    """
    gather = getattr(tensor, "full_tensor", None)
    if gather is None:
        return tensor
    return _waited(gather())


def _waited(tensor: Tensor) -> Tensor:
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    if isinstance(tensor, AsyncCollectiveTensor):
        return _waited(tensor.wait())
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None:
        return tensor
    names, attributes = flatten()
    inner = {name: getattr(tensor, name) for name in names}
    if not any(isinstance(t, AsyncCollectiveTensor) for t in inner.values()):
        return tensor
    waited = {name: _waited(t) for name, t in inner.items()}
    unflatten = type(tensor).__tensor_unflatten__  # type: ignore[attr-defined]
    return unflatten(waited, attributes, tensor.shape, tensor.stride())


class _DropRecords(logging.Filter):
    """Drop the log records whose message contains one of ``fragments``."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(fragment in message for fragment in self.fragments)


def quiet_library_noise() -> None:
    """Silence console lines of other libraries that a recipe run can neither act on nor needs (the CLI only; the
    Python API leaves them alone; ``docs/concepts.md`` lists them):

    - Lightning's ``💡 Tip:`` advertisements for its cloud products (two per fit);
    - Lightning's own deprecated use of torch's pytree API (``isinstance(treespec, LeafSpec)``);
    - LightningCLI's note that the ``optimizer:`` section overrides :class:`~lightning_memopt.lm.CausalLM`'s own
      ``configure_optimizers`` (the fallback for a recipe without one, by design);
    - on a machine without CUDA, torchao's failures to load its CUDA kernels (transformers imports torchao when it is
      installed) and torch's deprecation notes about how torchao registers its enums.

    Example::

        >>> quiet_library_noise()  # what `lightning-memopt fit` does first (lightning_memopt.cli.main)
    """
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropRecords) for f in rank_zero.filters):
        rank_zero.addFilter(_DropRecords("\N{ELECTRIC LIGHT BULB} Tip:"))
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # CausalLM's own configure_optimizers is the fallback for a recipe without an optimizer: section, by design
    warnings.filterwarnings("ignore", message=r"`CausalLM\.configure_optimizers` will be overridden by")
    if not torch.cuda.is_available():
        for name, fragment in (("torchao", "Failed to load"), ("torch.utils._pytree", "register_constant() on Enum")):
            target = logging.getLogger(name)
            if not any(isinstance(f, _DropRecords) for f in target.filters):
                target.addFilter(_DropRecords(fragment))
