"""What the pack knows about optimizers, in one place: which family an optimizer is, how much state it keeps, how
its weight decay and learning rate act, and how its hyper-parameters translate to bitsandbytes' 8-bit counterparts.

:mod:`lightning_memopt.memory` (accounting and prediction), the update transforms
(:mod:`lightning_memopt.callbacks.update_transform`) and :class:`~lightning_memopt.EightBitState` all ask here, so a
new optimizer family (torchao's low-bit AdamW, GaLore, FLORA, ...) is taught to the pack in this file.

Example::

    >>> import torch
    >>> w = torch.nn.Parameter(torch.zeros(10, 20))
    >>> optimizer_state_bytes(torch.optim.AdamW([w]), w), lr_scales_update(torch.optim.AdamW([w]))
    (1604, True)
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_memopt.optim import FOAM, AdaLomo, foam_state_bytes

__all__ = [
    "BNB_INSTALL",
    "SUPPORTED_OPTIMIZERS",
    "bitsandbytes_kernel",
    "bnb_group_keys",
    "bnb_state_count",
    "decoupled_weight_decay",
    "eight_bit_counterpart",
    "frees_gradients",
    "galore_projection",
    "import_bitsandbytes",
    "is_adafactor",
    "is_eight_bit",
    "is_flora",
    "is_galore",
    "is_torchao_low_bit",
    "local_tensor",
    "lr_scales_update",
    "needs_whole_tensors",
    "optimizer_name",
    "optimizer_state_bytes",
    "predict_optimizer_state_bytes",
    "state_bytes_per_param",
    "step_one_tensor",
    "steps_each_tensor_alone",
    "steps_in_backward",
]

BNB_INSTALL = "pip install -U 'bitsandbytes>=0.50'"
"""How to install a bitsandbytes that runs 8-bit optimizers on the CPU too."""

SUPPORTED_OPTIMIZERS = (
    "torch.optim.Adam (weight_decay=0 or decoupled_weight_decay=True), torch.optim.AdamW, torch.optim.SGD "
    "(with momentum), torch.optim.RMSprop, torch.optim.Adagrad, and bitsandbytes' 32-bit Adam, AdamW and Lion "
    "(also their Paged versions)"
)

# bitsandbytes quantises 8-bit state in blocks of 256 values, with one FP32 absmax per block
_BNB_BLOCKSIZE = 256
_BNB_QMAP_BYTES = 256 * 4


# ------------------------------------------------------------------------------------------------ families
# bitsandbytes' kernels: which `optimizer_name` applies `p *= 1 - lr*wd` (decoupled) and which adds `wd*p` to the
# gradient (coupled); see bitsandbytes/backends/*/ops.py
_BNB_DECOUPLED = frozenset({"adam", "ademamix", "lion", "lamb"})
_BNB_COUPLED = frozenset({"momentum", "lars", "rmsprop", "adagrad"})
# optimizers whose whole step is proportional to lr, with state that does not depend on lr
_BNB_LR_LINEAR = frozenset({"adam", "momentum", "lion", "rmsprop", "adagrad"})
_TORCH_LR_LINEAR = (
    torch.optim.Adam,  # and AdamW, its subclass
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adamax,
    torch.optim.SGD,
    torch.optim.RMSprop,
    torch.optim.Adadelta,
    torch.optim.Adagrad,
)
_TORCH_COUPLED = (
    torch.optim.SGD,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.Adamax,
    torch.optim.ASGD,
    torch.optim.RMSprop,
)


def bitsandbytes_kernel(optimizer: Optimizer) -> str | None:
    """The ``optimizer_name`` of a bitsandbytes optimizer (``"adam"`` for Adam8bit, AdamW, PagedAdamW32bit, ...).

    Example::

        >>> import bitsandbytes as bnb
        >>> bitsandbytes_kernel(bnb.optim.AdamW8bit([torch.nn.Parameter(torch.zeros(64, 64))]))
        'adam'
        >>> bitsandbytes_kernel(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4))])) is None
        True
    """
    name = getattr(optimizer, "optimizer_name", None)
    module = type(optimizer).__module__
    return name if isinstance(name, str) and module.startswith("bitsandbytes") else None


def optimizer_name(optimizer: Optimizer) -> str:
    """How users import the optimizer's class: ``torch.optim.SGD`` rather than ``torch.optim.sgd.SGD``.

    Example::

        >>> optimizer_name(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
        'torch.optim.SGD'
    """
    cls = type(optimizer)
    root = cls.__module__.split(".")[0]
    for public in (f"{root}.optim", root):
        try:
            module = importlib.import_module(public)
        except ImportError:
            continue
        if getattr(module, cls.__name__, None) is cls:
            return f"{public}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__name__}"


def is_adafactor(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` is an Adafactor (torch's or transformers'), which has all three stabilisers built in.

    Example::

        >>> is_adafactor(torch.optim.Adafactor([torch.nn.Parameter(torch.zeros(4, 4))]))
        True
        >>> is_adafactor(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4))]))
        False
    """
    cls = type(optimizer)
    return cls.__name__ == "Adafactor" and cls.__module__.split(".")[0] in ("torch", "transformers")


def _family(optimizer: Optimizer, package: str, *names: str) -> bool:
    # the compressed-state libraries are matched by module and class name: importing them to compare classes would
    # cost seconds (galore-torch imports transformers) in runs that do not use them
    cls = type(optimizer)
    return cls.__module__.split(".")[0] == package and cls.__name__ in names


def is_galore(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` is one of ``galore-torch``'s (``GaLoreAdamW``, ``GaLoreAdafactor``, ``GaLoreAdamW8bit``),
    which project the gradients of the param groups that carry a ``rank`` (see
    :func:`~lightning_memopt.low_rank_param_groups`).

    Example::

        >>> is_galore(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4))]))
        False
    """
    return _family(optimizer, "galore_torch", "AdamW", "Adafactor", "AdamW8bit")


def is_flora(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` is ``flora_opt.Flora`` (FLORA: Adafactor with a random-projection-compressed momentum).

    Example::

        >>> is_flora(torch.optim.Adafactor([torch.nn.Parameter(torch.zeros(4, 4))]))
        False
    """
    return _family(optimizer, "flora_opt", "Flora")


def is_torchao_low_bit(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` is one of torchao's low-bit Adam/AdamW (4-bit, 8-bit or FP8 state).

    Example::

        >>> from torchao.optim import AdamW4bit  # doctest: +SKIP
        >>> is_torchao_low_bit(AdamW4bit([torch.nn.Parameter(torch.zeros(256, 256))]))  # doctest: +SKIP
        True
        >>> is_torchao_low_bit(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4))]))
        False
    """
    return _family(optimizer, "torchao", "Adam4bit", "Adam8bit", "AdamFp8", "AdamW4bit", "AdamW8bit", "AdamWFp8")


def needs_whole_tensors(optimizer: Optimizer) -> str | None:
    """Why ``optimizer``'s rule needs each matrix whole (so an FSDP2 shard would change what it computes), or
    ``None`` when it works on shards as on the whole tensor.

    Example::

        >>> needs_whole_tensors(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])) is None
        True
    """
    if is_galore(optimizer):
        return "projects each matrix's gradient onto its top singular vectors (an SVD of the whole matrix)"
    if is_flora(optimizer):
        return "compresses each matrix's momentum with a random projection of the whole matrix"
    return None


def frees_gradients(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step()`` sets each stepped parameter's ``.grad`` to ``None`` itself (``flora_opt.Flora``
    does), so no gradient outlives the step.

    Example::

        >>> frees_gradients(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4))]))
        False
    """
    return is_flora(optimizer)


def decoupled_weight_decay(optimizer: Optimizer, group: dict[str, Any]) -> bool | None:
    """Whether the optimizer applies this group's weight decay as ``X ← X·(1 - lr·wd)`` outside its update (AdamW),
    ``False`` when it adds ``wd·X`` to the gradient (Adam, SGD), ``None`` when it cannot tell.

    Example::

        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> adamw = torch.optim.AdamW([w], weight_decay=0.01)
        >>> decoupled_weight_decay(adamw, adamw.param_groups[0])
        True
        >>> sgd = torch.optim.SGD([w], lr=0.1, weight_decay=0.01)
        >>> decoupled_weight_decay(sgd, sgd.param_groups[0])
        False
    """
    name = bitsandbytes_kernel(optimizer)
    if name is not None:
        return True if name in _BNB_DECOUPLED else (False if name in _BNB_COUPLED else None)
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.NAdam, torch.optim.RAdam)):
        return bool(group.get("decoupled_weight_decay", False))
    if isinstance(optimizer, _TORCH_COUPLED):
        return False
    if is_adafactor(optimizer) or type(optimizer).__name__ == "Muon" or is_galore(optimizer) or is_flora(optimizer):
        return True
    if is_torchao_low_bit(optimizer):
        return type(optimizer).__name__.startswith("AdamW")
    if isinstance(optimizer, FOAM):
        return True
    return None


def lr_scales_update(optimizer: Optimizer) -> bool:
    """Whether the optimizer's step is proportional to ``lr`` and its state does not depend on ``lr``, so that a step
    at another ``lr`` is the same step scaled (needed to substitute the step size).

    Example::

        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> lr_scales_update(torch.optim.AdamW([w])), lr_scales_update(torch.optim.ASGD([w]))
        (True, False)
    """
    name = bitsandbytes_kernel(optimizer)
    if name is not None:
        return name in _BNB_LR_LINEAR
    if isinstance(optimizer, torch.optim.Adagrad):
        return all(float(g.get("lr_decay", 0.0)) == 0.0 for g in optimizer.param_groups)
    if _family(optimizer, "galore_torch", "AdamW", "AdamW8bit") or is_torchao_low_bit(optimizer):
        return True
    return isinstance(optimizer, (*_TORCH_LR_LINEAR, FOAM))


# torch optimizers whose rule treats each parameter tensor on its own (LBFGS re-evaluates the loss; SparseAdam needs
# sparse gradients)
_TORCH_PER_TENSOR = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adafactor,
    torch.optim.Adagrad,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Rprop,
    torch.optim.ASGD,
    torch.optim.Adadelta,
)


def steps_each_tensor_alone(optimizer: Optimizer) -> bool:
    """Whether ``optimizer``'s step for one parameter depends on that parameter's gradient and state alone, so that
    stepping it one parameter at a time (the update in backward) equals one step over all of them.

    Exact types only for torch's optimizers (a subclass may couple tensors); every bitsandbytes optimizer (its LAMB
    and LARS trust ratios are per tensor too) and :class:`~lightning_memopt.optim.AdaLomo`.

    Example::

        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> steps_each_tensor_alone(torch.optim.AdamW([w])), steps_each_tensor_alone(torch.optim.LBFGS([w]))
        (True, False)
    """
    cls = type(optimizer)
    if cls in _TORCH_PER_TENSOR:
        return True
    if bitsandbytes_kernel(optimizer) is not None:
        return True
    # GaLore's projection, FLORA's compression and torchao's quantisation are each per tensor too
    if is_galore(optimizer) or is_flora(optimizer) or is_torchao_low_bit(optimizer):
        return True
    return cls is AdaLomo or cls is FOAM


def step_one_tensor(step: Callable[[], Any], optimizer: Optimizer, tensor: Tensor, group_index: int) -> None:
    """Step ``optimizer`` for ``tensor`` alone: every param group is narrowed to nothing but ``tensor`` in group
    ``group_index`` (its lr, betas, weight decay), ``step()`` runs, and the groups are restored. What the update in
    backward does for each parameter as its gradient completes.

    Example::

        >>> w, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))
        >>> sgd = torch.optim.SGD([{"params": [w]}, {"params": [b], "lr": 0.5}], lr=0.1)
        >>> w.grad, b.grad = torch.ones(2), torch.ones(1)
        >>> step_one_tensor(sgd.step, sgd, b, 1)
        >>> w.tolist(), b.tolist(), [len(g["params"]) for g in sgd.param_groups]
        ([1.0, 1.0], [0.5], [1, 1])
    """
    groups = optimizer.param_groups
    saved = [group["params"] for group in groups]
    for group in groups:
        group["params"] = []
    groups[group_index]["params"] = [tensor]
    try:
        step()
    finally:
        for group, params in zip(groups, saved, strict=True):
            group["params"] = params


@contextmanager
def steps_in_backward(optimizer: Optimizer) -> Iterator[Callable[[], Any]]:
    """Within the block, ``optimizer.step(closure)`` only runs the closure (the parameters are stepped during its
    backward); yields the optimizer's own ``step`` (an LR scheduler's counting wrapper included) for those steps.

    Example::

        with steps_in_backward(optimizer) as step:
            ...  # Lightning's optimizer.step(closure) runs the closure; hooks call step_one_tensor(step, ...)
    """
    own = optimizer.__dict__.get("step")
    real = optimizer.step
    optimizer.step = _run_closure  # type: ignore[method-assign]
    try:
        yield real
    finally:
        if own is None:
            del optimizer.step
        else:
            optimizer.step = own  # type: ignore[method-assign]


def _run_closure(closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
    return closure() if closure is not None else None


# ---------------------------------------------------------------------------------------------------- bitsandbytes
def import_bitsandbytes() -> ModuleType:
    """``bitsandbytes`` with its optimizers imported, or a ``ModuleNotFoundError`` that names the install command.

    Example::

        >>> import_bitsandbytes().optim.AdamW8bit.__name__
        'AdamW8bit'
    """
    try:
        import bitsandbytes
        import bitsandbytes.optim
    except ImportError as err:
        raise ModuleNotFoundError(
            f"8-bit optimizer state needs the bitsandbytes package, which could not be imported ({err}). "
            f"Install it with `{BNB_INSTALL}`, or remove EightBitState / the bitsandbytes optimizer from the run."
        ) from err
    return bitsandbytes


def is_eight_bit(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` is a bitsandbytes optimizer that keeps 8-bit state (``AdamW8bit``, ``Adam(optim_bits=8)``).

    Example::

        >>> import torch, bitsandbytes as bnb
        >>> params = [torch.nn.Parameter(torch.zeros(4))]
        >>> is_eight_bit(bnb.optim.AdamW8bit(params=params)), is_eight_bit(torch.optim.AdamW(params))
        (True, False)
    """
    bnb = import_bitsandbytes()
    return isinstance(optimizer, bnb.optim.optimizer.Optimizer8bit) and getattr(optimizer.args, "optim_bits", 32) == 8


# ------------------------------------------------------------------------------------------------ state sizes
def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's part of ``tensor``: the local shard of a ``DTensor`` (``badam_fsdp``), else the tensor itself.

    Example::

        >>> local_tensor(torch.ones(2)).tolist()  # not a DTensor: the tensor itself
        [1.0, 1.0]
    """
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _projection_matrices(
    shape: Sequence[int], group: Mapping[str, Any]
) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    # the moments' shape and, per projection matrix, (its rows, its columns, the SVD factor it is sliced from)
    m, n = int(shape[0]), int(shape[1])
    k = min(m, n)
    r = min(int(group["rank"]), k)
    kind = group.get("proj_type", "std")
    if kind == "full":  # U[:, :r] (m x r, from U: m x k) and Vh[:r] (r x n, from Vh: k x n)
        return (r, r), [(m * r, m * k), (r * n, k * n)]
    right = {"std": m >= n, "reverse_std": m < n, "right": True, "left": False}[kind]
    # right: grad @ Pᵀ with P = Vh[:r] (r x n), moments m x r; left: Pᵀ @ grad with P = U[:, :r] (m x r), moments r x n
    return ((m, r), [(r * n, k * n)]) if right else ((r, n), [(m * r, m * k)])


def galore_projection(shape: Sequence[int], group: Mapping[str, Any]) -> tuple[tuple[int, ...], int] | None:
    """The shape GaLore keeps a matrix's optimizer state at, and the number of elements of its projection matrix (or
    matrices), for a param group carrying GaLore's keys; ``None`` when the group projects nothing.

    ``galore-torch`` 1.0 takes the projection from a truncated SVD, so rank ``r`` is at most ``min(m, n)``.

    Example::

        >>> galore_projection((64, 16), {"rank": 4, "proj_type": "std"})  # m >= n: moments m x r, projection r x n
        ((64, 4), 64)
        >>> galore_projection((16, 64), {"rank": 4, "proj_type": "std"})
        ((4, 64), 64)
    """
    if "rank" not in group or len(shape) != 2:
        return None
    low, matrices = _projection_matrices(shape, group)
    return low, sum(own for own, _ in matrices)


def _galore_projection_numel(shape: Sequence[int], group: Mapping[str, Any], fp32: bool) -> int:
    if "rank" not in group or len(shape) != 2:
        return 0
    from lightning_memopt.low_rank import compacts_projections

    _, matrices = _projection_matrices(shape, group)
    # an FP32 projection is a view of its SVD factor unless the shim compacts it (a half one is a copy already)
    whole = fp32 and not compacts_projections()
    return sum(factor if whole else own for own, factor in matrices)


def _factored_bytes(shape: Sequence[int], size: int) -> int:
    # Adafactor's row and column means of the last two dimensions (batched over the leading ones)
    numel = math.prod(shape)
    rows, cols = shape[-2], shape[-1]
    return (numel // cols + numel // rows) * size if numel else 0


def _galore_state_shape(param: Tensor, group: Mapping[str, Any]) -> tuple[int, ...]:
    projection = galore_projection(tuple(param.shape), group)
    return tuple(param.shape) if projection is None else projection[0]


def _galore_state_bytes(optimizer: Optimizer, param: Tensor, group_index: int, param_index: int) -> int | None:
    group = optimizer.param_groups[group_index]
    shape = _galore_state_shape(param, group)
    numel = math.prod(shape)
    name = type(optimizer).__name__
    if name == "Adafactor":
        # FP32 state (gradients are upcast first), the parameter's RMS as a 0-d tensor
        moments = _factored_bytes(shape, 4) if len(shape) >= 2 else 4 * numel
        first = 4 * numel if group.get("beta1") is not None else 0
        return moments + first + 4 + 4 * _galore_projection_numel(param.shape, group, fp32=True)
    size = param.element_size()  # the projection and the moments follow the gradient's dtype
    ortho = size * _galore_projection_numel(param.shape, group, fp32=param.dtype == torch.float32)
    if name == "AdamW":
        return 2 * numel * size + ortho
    # AdamW8bit: bitsandbytes' Adam on the projected tensor (8-bit from min_8bit_size elements on)
    config = optimizer.get_config(group_index, param_index, group)  # type: ignore[attr-defined]
    if config["optim_bits"] == 8 and numel >= config["min_8bit_size"]:
        return 2 * (numel + 4 * math.ceil(numel / _BNB_BLOCKSIZE)) + ortho
    return 2 * 4 * numel + ortho


def _flora_state_bytes(group: Mapping[str, Any], param: Tensor) -> int | None:
    if group.get("quantization", False):
        return None  # bitsandbytes quantisation states: not modelled
    shape = tuple(param.shape)
    numel = math.prod(shape)
    # flora-opt 0.0.3 (`Flora._get_options`): FP32 state, the parameter's RMS as a 0-d tensor, the seed a number
    factored = len(shape) == 2 and group["factorize_second_moment"]
    beta1, rank = group.get("beta1"), group.get("rank")
    first_moment = beta1 is not None and beta1 > 0
    compressed = (
        first_moment
        and factored
        and rank is not None
        and rank > 0
        and min(shape) >= rank
        and max(shape) / min(shape) <= 4
    )
    second = _factored_bytes(shape, 4) if factored else 4 * numel
    if not first_moment:
        first = 0
    elif compressed:
        first = 4 * int(rank or 0) * (shape[-1] if shape[0] < shape[-1] else shape[0])
    else:
        first = 4 * numel
    return second + first + 4


def _torchao_state_bytes(optimizer: Optimizer, param: Tensor, group: Mapping[str, Any]) -> int:
    # torchao 0.18 (`_AdamBase._new_buffer`): tensors of >= 4096 values divisible by the block size are quantised:
    # codes (4-bit: two per byte), one FP32 scale per block and, for 4/8 bits, each state's own FP32 quantisation map
    numel = local_tensor(param).numel()
    block = int(getattr(optimizer, "block_size", 128))
    states = 3 if group.get("amsgrad", False) else 2
    if numel < 4096 or numel % block:
        return states * numel * param.element_size() + 4
    name = type(optimizer).__name__
    if name.endswith("4bit"):
        each = numel // 2 + 4 * (numel // block) + 4 * 16
    elif name.endswith("8bit"):
        each = numel + 4 * (numel // block) + 4 * 256
    else:  # FP8 codes, no map
        each = numel + 4 * (numel // block)
    return states * each + 4


def optimizer_state_bytes(
    optimizer: Optimizer, param: Tensor, group_index: int = 0, param_index: int = 0
) -> int | None:
    """Bytes of state ``optimizer`` keeps for ``param`` after a step; ``None`` for an optimizer it does not know.

    Knows torch's ``Adam``/``AdamW`` (incl. ``amsgrad``), ``SGD``, ``Adafactor``, this package's ``AdaLomo`` and
    ``FOAM``, bitsandbytes' one- and two-state optimizers (8-bit or 32-bit, honouring ``min_8bit_size`` and
    per-parameter overrides), torchao's low-bit AdamW, GaLore's optimizers (moments at the projected shape plus the
    projection matrix) and FLORA (without its ``quantization`` option). Shared bitsandbytes quantisation maps are not
    included (see :func:`predict_memory`).

    Example::

        >>> p = torch.nn.Parameter(torch.zeros(10, 20))
        >>> optimizer_state_bytes(torch.optim.AdamW([p]), p)  # exp_avg + exp_avg_sq + the step scalar
        1604
        >>> optimizer_state_bytes(torch.optim.Adafactor([p]), p)  # row (10) + column (20) variances + step
        124
    """
    numel, size = local_tensor(param).numel(), param.element_size()
    if is_galore(optimizer):
        return _galore_state_bytes(optimizer, param, group_index, param_index)
    if is_flora(optimizer):
        return _flora_state_bytes(optimizer.param_groups[group_index], param)
    if isinstance(optimizer, FOAM):
        return foam_state_bytes(param, optimizer.param_groups[group_index])
    if is_torchao_low_bit(optimizer):
        return _torchao_state_bytes(optimizer, param, optimizer.param_groups[group_index])
    bnb_states = bnb_state_count(optimizer)
    if bnb_states is not None:
        group = optimizer.param_groups[group_index]
        config = optimizer.get_config(group_index, param_index, group)  # type: ignore[attr-defined]
        extra = 4 if config.get("max_unorm", 0.0) > 0.0 else 0
        if config["optim_bits"] == 8 and numel >= config["min_8bit_size"]:
            blocks = math.ceil(numel / _BNB_BLOCKSIZE)
            return bnb_states * (numel + 4 * blocks) + extra
        return bnb_states * 4 * numel + extra
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        amsgrad = optimizer.param_groups[group_index].get("amsgrad", False)
        return (3 if amsgrad else 2) * numel * size + 4
    if isinstance(optimizer, torch.optim.SGD):
        return numel * size if optimizer.param_groups[group_index].get("momentum", 0) != 0 else 0
    if isinstance(optimizer, AdaLomo):
        # factored FP32 (FP64 for FP64 weights) second moment: one value per row and per column of each matrix
        wide = 8 if param.dtype == torch.float64 else 4
        if param.dim() >= 2 and numel:
            return (numel // param.shape[-1] + numel // param.shape[-2]) * wide
        return numel * wide
    if isinstance(optimizer, torch.optim.Adafactor):
        if param.dim() > 1:
            rows, cols = param.shape[-2], param.shape[-1]
            batch = numel // (rows * cols) if rows * cols else 0
            return batch * (rows + cols) * size + 4
        return numel * size + 4
    return None


def predict_optimizer_state_bytes(optimizer: Optimizer) -> int | None:
    """Bytes of state ``optimizer`` keeps after a step for its parameters that require grad (bitsandbytes' shared
    quantisation maps included); ``None`` when it holds an optimizer :func:`optimizer_state_bytes` does not know.

    Example::

        >>> optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(10, 10))])
        >>> predict_optimizer_state_bytes(optimizer)  # two FP32 moments of 100 values (and the step counter)
        804
    """
    total = 0
    uses_qmap = False
    bnb_states = bnb_state_count(optimizer)
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            if not p.requires_grad:  # no gradient, so no state
                continue
            nbytes = optimizer_state_bytes(optimizer, p, gi, pi)
            if nbytes is None:
                return None
            total += nbytes
            if bnb_states is not None:
                config = optimizer.get_config(gi, pi, group)  # type: ignore[attr-defined]
                # GaLore's AdamW8bit keeps the moments at the projected shape
                numel = math.prod(_galore_state_shape(p, group)) if is_galore(optimizer) else p.numel()
                uses_qmap = uses_qmap or (config["optim_bits"] == 8 and numel >= config["min_8bit_size"])
    # bitsandbytes: one quantisation map per state (signed, unsigned), shared by all the optimizer's 8-bit tensors
    return total + (bnb_states or 0) * _BNB_QMAP_BYTES * uses_qmap


def bnb_state_count(optimizer: Optimizer) -> int | None:
    """How many state tensors per parameter a bitsandbytes optimizer keeps (2 for Adam's moments, 1 for SGD's
    momentum); ``None`` for any other optimizer, and for bitsandbytes' AdEMAMix, whose three states share a buffer.

    Example::

        >>> import bitsandbytes as bnb
        >>> bnb_state_count(bnb.optim.AdamW8bit([torch.nn.Parameter(torch.zeros(64, 64))]))
        2
        >>> bnb_state_count(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4))])) is None
        True
    """
    # bitsandbytes' own classes, and subclasses of them elsewhere (galore-torch's AdamW8bit)
    if not any(cls.__module__.startswith("bitsandbytes") for cls in type(optimizer).__mro__):
        return None
    names = {cls.__name__ for cls in type(optimizer).__mro__ if cls.__module__.startswith("bitsandbytes")}
    if "AdEMAMix" in names:  # three states in one buffer: not modelled
        return None
    if "Optimizer2State" in names:
        return 2
    if "Optimizer1State" in names:
        return 1
    return None


def state_bytes_per_param(optimizer: Optimizer | None, state_size: int) -> tuple[float, str]:
    """Textbook state bytes per trained parameter for the closed form, and the optimizer's short name.

    Example::

        >>> state_bytes_per_param(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4))]), 4)
        (8.0, 'AdamW')
    """
    if optimizer is None:
        return 0.0, "none"
    if is_galore(optimizer) or is_flora(optimizer) or is_torchao_low_bit(optimizer) or isinstance(optimizer, FOAM):
        # shape-dependent (rank, block sizes): the average over the tensors the optimizer trains now
        trained = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        predicted = predict_optimizer_state_bytes(optimizer)
        numel = sum(local_tensor(p).numel() for p in trained)
        name = f"GaLore{type(optimizer).__name__}" if is_galore(optimizer) else type(optimizer).__name__
        return (predicted / numel if predicted is not None and numel else 0.0), name
    bnb = bnb_state_count(optimizer)
    if bnb is not None:
        bits = getattr(getattr(optimizer, "args", None), "optim_bits", 32)
        return (float(bnb) if bits == 8 else 4.0 * bnb), f"{type(optimizer).__name__}"
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return 2.0 * state_size, type(optimizer).__name__
    if isinstance(optimizer, torch.optim.SGD):
        momentum = optimizer.param_groups[0].get("momentum", 0) if optimizer.param_groups else 0
        return (float(state_size) if momentum else 0.0), "SGD" + (" (momentum)" if momentum else "")
    if isinstance(optimizer, torch.optim.Adafactor | AdaLomo):
        return 0.0, type(optimizer).__name__
    return 0.0, type(optimizer).__name__


# ------------------------------------------------------------------------------------- hyper-parameter translation
# Each function reads one param group (or an optimizer's `defaults`) of a supported optimizer and returns the keyword
# arguments of its bitsandbytes 8-bit counterpart, refusing options the bitsandbytes kernels would silently ignore.
_Translate = Callable[[Mapping[str, Any], str], dict[str, Any]]


def _num(value: Any) -> Any:
    # torch optimizers accept tensor learning rates and betas; bitsandbytes passes them on as Python numbers
    if isinstance(value, Tensor):
        return value.item()
    if isinstance(value, (tuple, list)):
        return tuple(_num(v) for v in value)
    return value


def _refuse(where: str, option: str, value: Any, why: str, fix: str) -> ValueError:
    return ValueError(f"{where} has {option}={value!r}, but {why}. {fix}")


def _no_maximize(h: Mapping[str, Any], where: str, target: str) -> None:
    if h.get("maximize", False):
        raise _refuse(where, "maximize", True, f"bitsandbytes' {target} only minimizes", "Negate the loss instead.")


def _adam(h: Mapping[str, Any], where: str) -> dict[str, Any]:
    _no_maximize(h, where, "Adam8bit")
    if h.get("amsgrad", False):
        raise _refuse(where, "amsgrad", True, "bitsandbytes' 8-bit Adam has no AMSGrad", "Set amsgrad=False.")
    weight_decay = _num(h["weight_decay"])
    if weight_decay != 0 and not h.get("decoupled_weight_decay", False):
        raise _refuse(
            where,
            "weight_decay",
            weight_decay,
            "torch.optim.Adam adds weight decay to the gradient (L2) while bitsandbytes' Adam8bit decays the weights "
            "directly, as AdamW does",
            "Use torch.optim.AdamW(weight_decay=...) (or Adam(decoupled_weight_decay=True)), or weight_decay=0.",
        )
    return {"lr": _num(h["lr"]), "betas": _num(h["betas"]), "eps": _num(h["eps"]), "weight_decay": weight_decay}


def _adamw(h: Mapping[str, Any], where: str) -> dict[str, Any]:
    _no_maximize(h, where, "AdamW8bit")
    if h.get("amsgrad", False):
        raise _refuse(where, "amsgrad", True, "bitsandbytes' AdamW8bit has no AMSGrad", "Set amsgrad=False.")
    return {k: _num(h[k]) for k in ("lr", "betas", "eps", "weight_decay")}


def _sgd(h: Mapping[str, Any], where: str) -> dict[str, Any]:
    _no_maximize(h, where, "SGD8bit")
    momentum = _num(h["momentum"])
    if momentum == 0:
        raise _refuse(
            where,
            "momentum",
            momentum,
            "SGD without momentum keeps no optimizer state, so there is nothing to store in 8 bits",
            "Remove EightBitState, or set momentum (e.g. 0.9).",
        )
    if h.get("nesterov", False):
        raise _refuse(where, "nesterov", True, "bitsandbytes' SGD8bit ignores it", "Set nesterov=False.")
    if _num(h.get("dampening", 0)) != 0:
        raise _refuse(where, "dampening", h["dampening"], "bitsandbytes' SGD8bit ignores it", "Set dampening=0.")
    return {"lr": _num(h["lr"]), "momentum": momentum, "weight_decay": _num(h["weight_decay"])}


def _rmsprop(h: Mapping[str, Any], where: str) -> dict[str, Any]:
    _no_maximize(h, where, "RMSprop8bit")
    if h.get("centered", False):
        raise _refuse(where, "centered", True, "bitsandbytes' RMSprop8bit is not centered", "Set centered=False.")
    if _num(h.get("momentum", 0)) != 0:
        raise _refuse(where, "momentum", h["momentum"], "bitsandbytes' RMSprop8bit ignores it", "Set momentum=0.")
    if _num(h["alpha"]) == 0:
        raise _refuse(where, "alpha", 0, "bitsandbytes' RMSprop8bit needs alpha > 0", "Use alpha=0.99.")
    return {k: _num(h[k]) for k in ("lr", "alpha", "eps", "weight_decay")}


def _adagrad(h: Mapping[str, Any], where: str) -> dict[str, Any]:
    _no_maximize(h, where, "Adagrad8bit")
    for option in ("lr_decay", "initial_accumulator_value"):
        if _num(h.get(option, 0)) != 0:
            raise _refuse(
                where, option, h[option], "bitsandbytes' Adagrad8bit does not implement it", f"Set {option}=0."
            )
    return {k: _num(h[k]) for k in ("lr", "eps", "weight_decay")}


def _bnb_same_keys(*keys: str) -> _Translate:
    # bitsandbytes' own 32-bit optimizers store their hyper-parameters under the constructor's names already
    def translate(h: Mapping[str, Any], where: str) -> dict[str, Any]:
        return {k: _num(h[k]) for k in keys}

    return translate


def eight_bit_counterpart(optimizer: Optimizer, bnb: ModuleType) -> tuple[Any, _Translate]:
    """The bitsandbytes 8-bit class for ``optimizer``'s exact type and the function that translates one of its param
    groups (or its ``defaults``) into that class's keyword arguments; ``TypeError`` for an unsupported optimizer.

    Example::

        >>> import bitsandbytes as bnb
        >>> optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(64, 64))], lr=1e-3)
        >>> cls, translate = eight_bit_counterpart(optimizer, bnb)
        >>> cls.__name__, translate(optimizer.defaults, "the defaults")["lr"]
        ('AdamW8bit', 0.001)
    """
    torch_table: dict[type, tuple[str, _Translate]] = {
        torch.optim.Adam: ("Adam8bit", _adam),
        torch.optim.AdamW: ("AdamW8bit", _adamw),
        torch.optim.SGD: ("SGD8bit", _sgd),
        torch.optim.RMSprop: ("RMSprop8bit", _rmsprop),
        torch.optim.Adagrad: ("Adagrad8bit", _adagrad),
    }
    adam_keys = _bnb_same_keys("lr", "betas", "eps", "weight_decay")
    lion_keys = _bnb_same_keys("lr", "betas", "weight_decay")
    for base, translate in (("Adam", adam_keys), ("AdamW", adam_keys), ("Lion", lion_keys)):
        for paged in ("", "Paged"):
            for suffix in ("", "32bit"):
                torch_table[getattr(bnb.optim, f"{paged}{base}{suffix}")] = (f"{paged}{base}8bit", translate)
    # exact types only: a subclass may change the update rule, and its 8-bit version would not
    entry = torch_table.get(type(optimizer))
    if entry is None:
        cls = type(optimizer)
        raise TypeError(
            f"EightBitState cannot give {cls.__module__}.{cls.__qualname__} 8-bit state: bitsandbytes has 8-bit "
            f"versions of {SUPPORTED_OPTIMIZERS}. Use one of those, or configure a bitsandbytes 8-bit optimizer "
            "(e.g. bitsandbytes.optim.AdamW8bit) yourself and keep EightBitState for its 32-bit exceptions."
        )
    name, translate = entry
    return getattr(bnb.optim, name), translate


def bnb_group_keys(target: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The param-group keys bitsandbytes' ``target`` class stores for constructor arguments ``kwargs``.

    Example::

        >>> import bitsandbytes as bnb
        >>> bnb_group_keys(bnb.optim.SGD8bit, {"lr": 0.1, "momentum": 0.9})["betas"][0]
        0.9
    """
    # bitsandbytes' constructors translate their keyword arguments into param-group keys (SGD8bit keeps momentum as
    # betas[0], RMSprop8bit alpha as betas[0]); an empty optimizer built with the group's arguments does that for us
    probe = target(params=[{"params": []}], **kwargs)
    return {k: v for k, v in probe.param_groups[0].items() if k != "params"}
