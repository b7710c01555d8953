"""The BAdam block schedule: which block trains, and for how many optimizer steps."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

__all__ = ["ORDERS", "BlockSwitch"]

ORDERS = ("ascending", "descending", "random", "fixed")
Order = Literal["ascending", "descending", "random", "fixed"]


class BlockSwitch(Callback):
    """Switch BAdam's active block every ``every`` optimizer steps.

    The schedule is a pure function of the optimizer step count and this callback's state, so it is the same on every
    rank and after a resume. The switch happens at the start of the first batch of an optimizer step (so with gradient
    accumulation ``every`` counts optimizer steps, not batches). Its state (order, position, RNG) is saved in
    checkpoints.

    Args:
        every: optimizer steps per block (the paper's K; 100 there).
        order: ``"ascending"`` (input to output), ``"descending"`` (output to input), ``"random"`` (a fresh random
            permutation every pass over the blocks: each block exactly once per pass, as in the paper) or ``"fixed"``
            (stay on the ``start`` block).
        start: index of the first block; by default 0 for ascending/fixed, the last block for descending and the
            permutation's first for random.
        seed: seed of the random order's generator (independent of the global RNG, identical on every rank).

    Example::

        from lightning.pytorch import Trainer
        from lightning_memopt import BAdamStrategy, BlockSwitch

        trainer = Trainer(strategy=BAdamStrategy(), precision="bf16-true",
                          callbacks=[BlockSwitch(every=50, order="descending")])
    """

    def __init__(self, every: int = 100, order: Order = "random", start: int | None = None, seed: int = 0) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ValueError(f"BlockSwitch(every=...) must be a positive number of optimizer steps, got {every!r}.")
        if order not in ORDERS:
            raise ValueError(f"BlockSwitch(order={order!r}) is not a known order; choose one of {', '.join(ORDERS)}.")
        if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 0):
            raise ValueError(f"BlockSwitch(start=...) must be a block index >= 0 or None, got {start!r}.")
        self.every = every
        self.order: Order = order
        self.start = start
        self.seed = seed
        self._num_blocks: int | None = None
        self._segment = 0  # number of completed switches: steps [segment*every, (segment+1)*every) train `_current`
        self._current: int | None = None
        self._pass: list[int] = []  # the random order's current permutation; `_current` was popped from its front
        self._generator = torch.Generator().manual_seed(seed)
        self._restored = False

    def __repr__(self) -> str:
        return f"BlockSwitch(every={self.every}, order={self.order!r}, start={self.start}, seed={self.seed})"

    @property
    def current_block(self) -> int | None:
        """Index of the block the schedule has chosen for the current step (``None`` before fit starts)."""
        return self._current

    # ----------------------------------------------------------------------------------------------- schedule
    def _first(self, num_blocks: int) -> int:
        if self.start is not None:
            if self.start >= num_blocks:
                raise MisconfigurationException(
                    f"BlockSwitch(start={self.start}) is out of range: the model has {num_blocks} blocks "
                    f"(0..{num_blocks - 1})."
                )
            if self.order == "random":
                # start there, then continue with the rest of a permutation so the first pass still visits each once
                rest = [i for i in self._permutation(num_blocks) if i != self.start]
                self._pass = rest
            return self.start
        if self.order == "descending":
            return num_blocks - 1
        if self.order == "random":
            self._pass = self._permutation(num_blocks)
            return self._pass.pop(0)
        return 0

    def _permutation(self, num_blocks: int) -> list[int]:
        return [int(i) for i in torch.randperm(num_blocks, generator=self._generator)]

    def _next(self, current: int, num_blocks: int) -> int:
        if self.order == "ascending":
            return (current + 1) % num_blocks
        if self.order == "descending":
            return (current - 1) % num_blocks
        if self.order == "random":
            if not self._pass:
                self._pass = self._permutation(num_blocks)
            return self._pass.pop(0)
        return current

    # ----------------------------------------------------------------------------------------------- hooks
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        strategy = _badam_strategy(trainer)
        num_blocks = len(strategy.blocks)
        if self._restored:
            if self._num_blocks != num_blocks:
                raise MisconfigurationException(
                    f"The checkpoint's BlockSwitch schedule was made for {self._num_blocks} blocks but the model now "
                    f"has {num_blocks}. Resume with the same block layout, or start a new run."
                )
        else:
            self._num_blocks = num_blocks
            self._segment = 0
            self._current = self._first(num_blocks)
        assert self._current is not None
        strategy.activate(self._current)
        self._announce(strategy, trainer, verb="resumes with" if self._restored else "starts with")

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        strategy = _badam_strategy(trainer)
        assert self._current is not None and self._num_blocks is not None
        target = trainer.global_step // self.every
        switched = False
        while self._segment < target:
            self._segment += 1
            nxt = self._next(self._current, self._num_blocks)
            switched = switched or nxt != self._current
            self._current = nxt
        if strategy.active_block != self._current:
            strategy.activate(self._current)
        if switched:
            self._announce(strategy, trainer, verb="switched to")
        pl_module.log("badam/block", float(self._current), prog_bar=True, on_step=True, on_epoch=False, logger=True)

    def _announce(self, strategy: Any, trainer: Trainer, verb: str) -> None:
        assert self._current is not None
        name = strategy.blocks[self._current].name
        # on resume, on_fit_start runs before the loops restore global_step: the schedule knows the segment's start
        step = trainer.global_step if verb == "switched to" else self._segment * self.every
        where = "at step" if verb != "resumes with" else "in the segment starting at step"
        rank_zero_info(f"BAdam {verb} block {self._current}/{len(strategy.blocks)} ({name!r}) {where} {step}")

    # ----------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "every": self.every,
            "order": self.order,
            "num_blocks": self._num_blocks,
            "segment": self._segment,
            "current": self._current,
            "pass": list(self._pass),
            "generator": self._generator.get_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("order") != self.order or state_dict.get("every") != self.every:
            raise MisconfigurationException(
                f"The checkpoint's BlockSwitch(every={state_dict.get('every')}, order={state_dict.get('order')!r}) "
                f"differs from this run's {self!r}; resume with the same schedule."
            )
        self._num_blocks = state_dict["num_blocks"]
        self._segment = int(state_dict["segment"])
        self._current = state_dict["current"]
        self._pass = [int(i) for i in state_dict["pass"]]
        self._generator.set_state(state_dict["generator"])
        self._restored = True


def _badam_strategy(trainer: Trainer) -> Any:
    from lightning_memopt.strategies.badam import BlockCoordinateMixin

    strategy = trainer.strategy
    if not isinstance(strategy, BlockCoordinateMixin):
        raise MisconfigurationException(
            f"BlockSwitch schedules BAdam's blocks, but the Trainer uses {type(strategy).__name__}. "
            "Pass strategy='badam' (or lightning_memopt.BAdamStrategy()) to the Trainer, or remove BlockSwitch."
        )
    return strategy
