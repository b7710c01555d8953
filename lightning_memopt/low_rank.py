"""GaLore's param groups: which matrices get a low-rank gradient projection, at which rank, gap and scale.

GaLore (Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024; the
``galore-torch`` package) keeps Adam's moments of an ``m x n`` weight matrix at the projected shape (``m x r`` or
``r x n``, whichever is smaller, for rank ``r``) plus the projection matrix itself, recomputed from an SVD of the
gradient every ``update_proj_gap`` steps. Its optimizers (``galore_torch.GaLoreAdamW``, ``GaLoreAdafactor``,
``GaLoreAdamW8bit``) project exactly the tensors of the param groups that carry the keys ``rank``,
``update_proj_gap``, ``scale`` and ``proj_type``; every other tensor gets the plain update.
:func:`low_rank_param_groups` builds those groups from a model: by default every ``Linear`` weight inside the model's
repeated layers (attention and MLP matrices), never embeddings, the language-model head, norms or biases.

The projector lives in the optimizer state (``state[p]["projector"]``, a ``GaLoreProjector`` object). Checkpoints
written with it load with torch's default ``weights_only=True`` once :func:`install_galore_shims` has run (it also
keeps FP32 projections at their own size), which importing this package does when ``galore_torch`` is imported
already, and which the BAdam strategies, the CLI and :func:`low_rank_param_groups` do too. Under BAdam the projector
is state like any other: dropped at a block switch, or stashed with ``keep_optimizer_state=True``.

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.ModuleDict({"embed": nn.Embedding(100, 16),
    ...                        "layers": nn.ModuleList(nn.Linear(16, 16) for _ in range(2))})
    >>> groups = low_rank_param_groups(model, rank=4, update_proj_gap=50)
    >>> [len(g["params"]) for g in groups], groups[1]["rank"], groups[1]["proj_type"]
    ([3, 2], 4, 'std')
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import wraps
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

from lightning_memopt.blocks import find_layer_lists, find_lm_head_params, matches_prefix
from lightning_memopt.optimizers import is_galore

__all__ = [
    "PROJECTION_TYPES",
    "LowRankOptions",
    "compacts_projections",
    "install_galore_shims",
    "low_rank_param_groups",
]

PROJECTION_TYPES = ("std", "reverse_std", "right", "left", "full")
"""``proj_type`` values ``galore-torch`` 1.0 understands (``std``: project the smaller side of each matrix)."""

GALORE_INSTALL = "pip install 'lightning-memopt[compressed]'  # or: pip install galore-torch"


@dataclass(frozen=True)
class LowRankOptions:
    """The options of :func:`low_rank_param_groups`, as the CLI's ``low_rank:`` section takes them.

    Example (a recipe)::

        optimizer:
          class_path: galore_torch.GaLoreAdamW
          init_args: {lr: 1.0e-4, no_deprecation_warning: true}
        low_rank:
          rank: 128
          update_proj_gap: 200
    """

    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"
    target_modules: Sequence[str] | None = None


def _check(rank: Any, update_proj_gap: Any, scale: Any, proj_type: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(
            f"low_rank_param_groups(rank=...) must be a whole number >= 1, got {rank!r} (GaLore uses 128)."
        )
    if isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, int) or update_proj_gap < 1:
        raise ValueError(
            f"low_rank_param_groups(update_proj_gap=...) must be a number of steps >= 1, got {update_proj_gap!r} "
            "(GaLore recomputes the projection every 200 steps)."
        )
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
        raise ValueError(f"low_rank_param_groups(scale=...) must be a number > 0, got {scale!r} (GaLore uses 0.25).")
    if proj_type not in PROJECTION_TYPES:
        raise ValueError(
            f"low_rank_param_groups(proj_type=...) must be one of {', '.join(map(repr, PROJECTION_TYPES))}, "
            f"got {proj_type!r}."
        )


def _default_targets(module: nn.Module) -> list[str]:
    layer_lists = find_layer_lists(module)
    heads = set(find_lm_head_params(module, tied=True))
    names = []
    for path, sub in module.named_modules():
        if not isinstance(sub, nn.Linear):
            continue
        if layer_lists and not any(matches_prefix(path, outer) for outer in layer_lists):
            continue
        name = f"{path}.weight" if path else "weight"
        if name not in heads:
            names.append(name)
    return names


def low_rank_param_groups(
    module: nn.Module,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    target_modules: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Param groups for a GaLore optimizer: one group of the matrices that get a rank-``rank`` gradient projection
    (carrying GaLore's keys), one of every other parameter (plain update).

    Args:
        module: the model (the LightningModule itself is fine); every parameter lands in exactly one group, as
            ``module.parameters()`` would list it, so BAdam can train every block.
        rank: the projection's rank ``r``; a matrix with a smaller side keeps that side (``min(m, n)``).
        update_proj_gap: the projection is recomputed from the gradient's SVD every this many steps.
        scale: GaLore's alpha, multiplying the projected-back update (0.25 in the paper).
        proj_type: which side is projected, as ``galore-torch`` names it (``"std"``: the smaller one).
        target_modules: regular expressions (``re.search``) on module names; the 2-D weights of the matching
            modules are projected. Default: the weight of every ``nn.Linear`` inside the model's repeated layers
            (``model.layers.N.self_attn.q_proj``, ...); embeddings, the language-model head, norms and biases never.

    Example::

        from galore_torch import GaLoreAdamW

        def configure_optimizers(self):
            return GaLoreAdamW(low_rank_param_groups(self, rank=128), lr=1e-4, no_deprecation_warning=True)
    """
    _check(rank, update_proj_gap, scale, proj_type)
    install_galore_shims()
    params = dict(module.named_parameters())
    if target_modules is None:
        targets = set(_default_targets(module))
    else:
        if isinstance(target_modules, str):
            raise ValueError(
                f"low_rank_param_groups(target_modules=...) takes a list of regular expressions, got the string "
                f"{target_modules!r}. Write target_modules=[{target_modules!r}]."
            )
        targets = set()
        for pattern in target_modules:
            try:
                regex = re.compile(pattern)
            except re.error as err:
                raise ValueError(
                    f"low_rank_param_groups(target_modules=...): invalid pattern {pattern!r}: {err}"
                ) from err
            matched = [
                f"{path}.{n}" if path else n
                for path, sub in module.named_modules()
                if regex.search(path)
                for n, p in sub.named_parameters(recurse=False)
                if p.dim() == 2
            ]
            if not matched:
                raise ValueError(
                    f"low_rank_param_groups(target_modules=[..., {pattern!r}, ...]) matches no module with a matrix "
                    f"(module names look like {next((p for p, _ in module.named_modules() if p), '')!r}). Fix the "
                    "pattern, or leave target_modules=None for every Linear inside the repeated layers."
                )
            targets.update(n for n in matched if n in params)
    projected = [p for n, p in params.items() if n in targets and p.dim() == 2]
    if not projected:
        raise ValueError(
            f"low_rank_param_groups found no matrix to project in {type(module).__name__}: it has no nn.Linear "
            "inside repeated layers. Name the modules with target_modules=[...]."
        )
    chosen = {id(p) for p in projected}
    rest = [p for p in params.values() if id(p) not in chosen]
    low_rank = {"rank": rank, "update_proj_gap": update_proj_gap, "scale": float(scale), "proj_type": proj_type}
    return [{"params": rest}, {"params": projected, **low_rank}]


_compacting: RemovableHandle | None = None


def compacts_projections() -> bool:
    """Whether :func:`install_galore_shims` has run: GaLore's FP32 projection matrices are then kept at ``r`` rows
    (or columns) instead of the SVD factor they are a view of.

    Example::

        >>> import galore_torch
        >>> install_galore_shims()  # importing lightning_memopt does it when galore_torch is loaded
        True
        >>> compacts_projections()
        True
    """
    return _compacting is not None


def install_galore_shims() -> bool:
    """Small fixes around ``galore-torch`` 1.0, installed once the package is imported; returns whether it is.

    - Checkpoints: ``torch.load(weights_only=True)`` (Lightning's default for local checkpoints) may read GaLore's
      projector objects. ``GaLoreProjector`` holds only tensors, numbers and strings and defines no
      ``__setstate__``: unpickling it sets those attributes and runs no code of its own.
    - ``GaLoreAdamW8bit``'s arguments: it passes ``percentile_clipping`` and ``block_wise`` to bitsandbytes by
      position, and bitsandbytes 0.50 removed both, so they land on ``max_unorm`` (100: an update-norm check with an
      extra state buffer per tensor) and ``skip_zeros`` (``True``: elements whose gradient is exactly zero keep their
      moments and weight). The shim restores what the defaults meant (no clipping, no skipping) and refuses a
      percentile clipping or ``block_wise=False``, which bitsandbytes no longer has.
    - Devices: ``GaLoreAdamW8bit`` calls ``torch.cuda.synchronize()`` after each tensor's update; when none of its
      parameters is on CUDA that call is skipped (bitsandbytes steps on the CPU since 0.50), so it runs on the CPU.
    - Gradients: ``GaLoreAdamW8bit`` leaves each projected matrix's ``.grad`` set to the *projected* gradient (a
      different shape from the parameter, which breaks gradient accumulation into it and BAdam's next step); the
      gradient it was given is put back, as ``GaLoreAdamW`` and ``GaLoreAdafactor`` leave it.
    - Memory: for FP32 gradients (BAdam's masters, or FP32 training) galore-torch keeps the projection matrix as a
      *view* of the SVD factor: ``k x n`` values for an ``r x n`` projection, ``k = min(m, n)``; for a square 4096
      matrix at rank 128 that is 64 MiB instead of 2 MiB, half of plain Adam's state. After every step of a GaLore
      optimizer the projections of the tensors just stepped are copied into storage of their own size.

    The importing of this package installs them when ``galore_torch`` is imported already; the BAdam strategies, the
    CLI and :func:`low_rank_param_groups` install them too.

    Example::

        >>> import galore_torch
        >>> install_galore_shims()
        True
    """
    global _compacting
    projector_module = sys.modules.get("galore_torch.galore_projector")
    projector = getattr(projector_module, "GaLoreProjector", None)
    if projector is None:
        return False
    if projector not in torch.serialization.get_safe_globals():
        torch.serialization.add_safe_globals([projector])
    if _compacting is None:
        _compacting = register_optimizer_step_post_hook(_compact_projections)
    adamw8bit = getattr(sys.modules.get("galore_torch.adamw8bit"), "AdamW8bit", None)
    if adamw8bit is not None and not getattr(adamw8bit, "_memopt_shimmed", False):
        _shim_adamw8bit(adamw8bit)
    return True


def _shim_adamw8bit(cls: type) -> None:
    """The fixes to galore-torch 1.0's ``AdamW8bit`` that :func:`install_galore_shims` describes (arguments,
    devices, gradients)."""
    import inspect

    from bitsandbytes.optim.optimizer import Optimizer2State

    init, step = cls.__init__, cls.step  # type: ignore[misc,attr-defined]
    signature = inspect.signature(init)
    positions_shifted = "percentile_clipping" not in inspect.signature(Optimizer2State.__init__).parameters

    @wraps(init)
    def fixed_init(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        clipping, block_wise = bound.arguments["percentile_clipping"], bound.arguments["block_wise"]
        if positions_shifted and (clipping != 100 or not block_wise):
            raise ValueError(
                f"GaLoreAdamW8bit(percentile_clipping={clipping}, block_wise={block_wise}): bitsandbytes 0.50 and "
                "newer have no percentile clipping and always quantise block-wise, and galore-torch 1.0 would pass "
                "these on as other options (max_unorm, skip_zeros). Leave both at their defaults."
            )
        init(self, *args, **kwargs)
        if positions_shifted:  # what percentile_clipping=100 and block_wise=True meant: no clipping, no skipping
            self.args.max_unorm = 0.0
            self.args.skip_zeros = False

    @wraps(step)
    def fixed_step(self: Any, closure: Any = None) -> Any:
        loss = None
        if closure is not None:  # first, as galore-torch does: the gradients to put back are the closure's
            with torch.enable_grad():
                loss = closure()
        grads = {p: p.grad for g in self.param_groups if "rank" in g for p in g["params"]}
        synchronize = torch.cuda.synchronize
        if not any(p.device.type == "cuda" for g in self.param_groups for p in g["params"]):
            torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
        try:
            step(self)
            return loss
        finally:
            torch.cuda.synchronize = synchronize  # type: ignore[assignment]
            for p, grad in grads.items():
                p.grad = grad

    cls.__init__ = fixed_init  # type: ignore[misc]
    cls.step = fixed_step  # type: ignore[attr-defined]
    cls._memopt_shimmed = True  # type: ignore[attr-defined]


def _compact(matrix: Any) -> Any:
    if isinstance(matrix, list):
        return [_compact(m) for m in matrix]
    if isinstance(matrix, Tensor) and matrix.untyped_storage().nbytes() > matrix.numel() * matrix.element_size():
        return matrix.clone()
    return matrix


def _compact_projections(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    if not is_galore(optimizer):
        return
    # only the tensors in the groups now: the update in backward steps one tensor at a time
    for group in optimizer.param_groups:
        for param in group["params"]:
            projector = optimizer.state.get(param, {}).get("projector")
            if projector is not None and getattr(projector, "ortho_matrix", None) is not None:
                projector.ortho_matrix = _compact(projector.ortho_matrix)
