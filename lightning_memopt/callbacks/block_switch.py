"""The BAdam block schedule: which block trains, and for how many optimizer steps."""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_memopt.log import get_logger, rank_zero_log
from lightning_memopt.sampling import importance_probabilities, sample_blocks, update_score
from lightning_memopt.strategies.badam import BlockStrategy, block_strategy

__all__ = ["ORDERS", "PROGRESS_BAR_KEY", "BlockSwitch", "block_label"]

ORDERS = ("ascending", "descending", "random", "fixed", "importance")
Order = Literal["ascending", "descending", "random", "fixed", "importance"]

# order="importance" defaults (the formulas are in lightning_memopt.sampling)
_IMPORTANCE_DEFAULTS: dict[str, float] = {"temperature": 1.0, "score_smoothing": 0.9, "score_clip": 5.0, "floor": 0.1}

_log = get_logger("block_switch")
PROGRESS_BAR_KEY = "block"
"""The progress bar's entry for the active block(s), e.g. ``block: 4/6`` (the index, then the number of blocks)."""


class BlockSwitch(Callback):
    """Switch BAdam's active block every ``every`` optimizer steps.

    The schedule is a pure function of the optimizer step count and this callback's state, so it is the same on every
    rank and after a resume. The switch happens at the start of the first batch of an optimizer step (so with gradient
    accumulation ``every`` counts optimizer steps, not batches). Its state (order, position, RNG) is saved in
    checkpoints.

    The active block goes to the progress bar as a string, ``block: 4/6`` (index / number of blocks; ``1+3/6`` when
    a set trains), and to the loggers as the number ``badam/block`` (the lowest active index), for plots. What the
    schedule does is logged under ``logging.getLogger("lightning_memopt.block_switch")``, on rank 0: at ``INFO`` the
    first block and the schedule when training starts, and one line per pass over the blocks (every ``D`` switches
    for ``D`` blocks); at ``DEBUG`` every switch (``logging.getLogger("lightning_memopt").setLevel(logging.DEBUG)``).

    Args:
        every: optimizer steps per block (the paper's K; 100 there).
        order: ``"ascending"`` (input to output), ``"descending"`` (output to input), ``"random"`` (a fresh random
            permutation every pass over the blocks: each block exactly once per pass, as in the paper), ``"fixed"``
            (stay on the ``start`` block) or ``"importance"`` (draw the next block, or set of blocks, with
            probabilities from each block's smoothed gradient RMS, in the spirit of MISA; the formulas are in
            :mod:`lightning_memopt.sampling` and ``docs/smarter-blocks.md``).
        start: index of the first block; by default 0 for ascending/fixed, the last block for descending and the
            permutation's first for random. For importance, the first block of the first draw.
        seed: seed of the random and importance orders' generator (independent of the global RNG, identical on every
            rank).
        budget: importance only: trainable parameters per activation. ``None`` (default) trains one block at a time;
            an int is a number of parameters, a float in ``(0, 1]`` a share of all block parameters (MISA's δ). Blocks
            are drawn without replacement until the next would exceed it, so with ``granularity="module"`` or
            ``"matrix"`` several small blocks train together. A block larger than the budget trains alone.
        temperature: importance only (default 1): ``p ∝ score^(1/temperature)``; ``float("inf")`` is uniform.
        score_smoothing: importance only (default 0.9): the EMA factor β of each block's score, per optimizer step.
        score_clip: importance only (default 5): an observation counts at most this many times the current score.
        floor: importance only (default 0.1): the share of the probability spread uniformly, so every block keeps
            ``p >= floor / D`` and is visited again.

    Example::

        from lightning.pytorch import Trainer
        from lightning_memopt import BAdamStrategy, BlockSwitch

        trainer = Trainer(strategy=BAdamStrategy(), precision="bf16-true",
                          callbacks=[BlockSwitch(every=50, order="descending")])

        # module blocks drawn by gradient importance; the budget: 1/32 of the parameters (one of 32 layers' worth)
        trainer = Trainer(strategy=BAdamStrategy(granularity="module"), precision="bf16-true",
                          callbacks=[BlockSwitch(every=50, order="importance", budget=1 / 32)])
    """

    def __init__(
        self,
        every: int = 100,
        order: Order = "random",
        start: int | None = None,
        seed: int = 0,
        budget: int | float | None = None,
        temperature: float | None = None,
        score_smoothing: float | None = None,
        score_clip: float | None = None,
        floor: float | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ValueError(f"BlockSwitch(every=...) must be a positive number of optimizer steps, got {every!r}.")
        if order not in ORDERS:
            raise ValueError(f"BlockSwitch(order={order!r}) is not a known order; choose one of {', '.join(ORDERS)}.")
        if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 0):
            raise ValueError(f"BlockSwitch(start=...) must be a block index >= 0 or None, got {start!r}.")
        given = {
            "budget": budget,
            "temperature": temperature,
            "score_smoothing": score_smoothing,
            "score_clip": score_clip,
            "floor": floor,
        }
        if order != "importance":
            extra = [k for k, v in given.items() if v is not None]
            if extra:
                raise ValueError(
                    f"BlockSwitch({extra[0]}=...) only applies to order='importance', but order={order!r}. Use "
                    f"order='importance' or remove {', '.join(extra)}."
                )
        self.every = every
        self.order: Order = order
        self.start = start
        self.seed = seed
        self.budget = _check_budget(budget)
        self.temperature = _check_number("temperature", temperature, low=0.0, low_open=True, allow_inf=True)
        self.score_smoothing = _check_number("score_smoothing", score_smoothing, low=0.0, high=1.0, high_open=True)
        self.score_clip = _check_number("score_clip", score_clip, low=1.0)
        self.floor = _check_number("floor", floor, low=0.0, high=1.0)
        self._num_blocks: int | None = None
        self._segment = 0  # number of completed switches: steps [segment*every, (segment+1)*every) train `_active`
        self._active: int | None = None
        self._active_set: tuple[int, ...] = ()  # what trains; (`_active`,) unless importance drew several blocks
        self._pass: list[int] = []  # the random order's current permutation; `_active` was popped from its front
        self._generator = torch.Generator().manual_seed(seed)
        self._restored = False
        # importance order: a score per block (None: never visited), observations not folded into them yet (kept as
        # tensors so that no step waits for the device; folded at switches and checkpoints), block sizes, the budget
        self._scores: list[float | None] = []
        self._pending: list[tuple[int, Tensor]] = []
        self._sizes: list[int] = []
        self._budget_params: int | None = None
        # what the log's pass summaries say: the sets of the pass in progress (None: it began before a resume) and
        # when it began
        self._visits: list[tuple[int, ...]] | None = None
        self._pass_began: float | None = None

    def __repr__(self) -> str:
        text = f"BlockSwitch(every={self.every}, order={self.order!r}, start={self.start}, seed={self.seed}"
        if self.order == "importance":
            text += (
                f", budget={self.budget}, temperature={self.temperature}, score_smoothing={self.score_smoothing}, "
                f"score_clip={self.score_clip}, floor={self.floor}"
            )
        return text + ")"

    @property
    def active_block(self) -> int | None:
        """Index of the block the schedule makes active for the current step (the lowest of a set; ``None`` before
        fit starts): the strategy's ``active_block`` once the step has started."""
        return self._active

    @property
    def active_blocks(self) -> tuple[int, ...]:
        """All blocks the schedule makes active for the current step (one, unless importance drew a set)."""
        return self._active_set

    @property
    def current_block(self) -> int | None:
        """Deprecated name of :attr:`active_block`."""
        warnings.warn("BlockSwitch.current_block is now BlockSwitch.active_block", DeprecationWarning, stacklevel=2)
        return self._active

    @property
    def current_blocks(self) -> tuple[int, ...]:
        """Deprecated name of :attr:`active_blocks`."""
        warnings.warn("BlockSwitch.current_blocks is now BlockSwitch.active_blocks", DeprecationWarning, stacklevel=2)
        return self._active_set

    @property
    def scores(self) -> list[float | None]:
        """Importance order: each block's score (smoothed gradient RMS; ``None`` if never visited)."""
        self._fold()
        return list(self._scores)

    @property
    def probabilities(self) -> list[float]:
        """Importance order: each block's probability of being drawn first at the next switch."""
        return importance_probabilities(self.scores, self._param("temperature"), self._param("floor"))

    def _param(self, name: str) -> float:
        value = getattr(self, name)
        return _IMPORTANCE_DEFAULTS[name] if value is None else float(value)

    # ----------------------------------------------------------------------------------------------- schedule
    def _fold(self) -> None:
        if not self._pending:
            return
        # one transfer for all observations since the last fold; folding early or late gives the same scores
        values = torch.stack([v.detach().to(torch.float64) for _, v in self._pending]).cpu().tolist()
        smoothing, clip = self._param("score_smoothing"), self._param("score_clip")
        for (index, _), value in zip(self._pending, values, strict=True):
            if math.isfinite(value):  # a 16-true overflow step: the scaler skipped it, nothing was learned
                self._scores[index] = update_score(self._scores[index], value, smoothing, clip)
        self._pending = []

    def _draw(self, first: int | None = None) -> tuple[int, ...]:
        probabilities = importance_probabilities(self._scores, self._param("temperature"), self._param("floor"))
        chosen = sample_blocks(
            probabilities, self._generator, sizes=self._sizes, budget=self._budget_params, first=first
        )
        return tuple(sorted(chosen))

    def _first_set(self, num_blocks: int) -> tuple[int, ...]:
        if self.order == "importance":
            if self.start is not None and self.start >= num_blocks:
                self._first(num_blocks)  # raises the out-of-range error
            return self._draw(first=self.start)
        return (self._first(num_blocks),)

    def _next_set(self, current: tuple[int, ...], num_blocks: int) -> tuple[int, ...]:
        if self.order == "importance":
            return self._draw()
        return (self._next(current[0], num_blocks),)

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
        if self.order == "importance":
            self._setup_importance(strategy, pl_module)
        if not self._restored:
            self._active_set = self._first_set(num_blocks)
            self._active = self._active_set[0]
        assert self._active is not None
        strategy.activate(self._active_set)
        at_pass_start = self._segment % num_blocks == 0
        self._visits = [self._active_set] if at_pass_start else None
        self._pass_began = None

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # announced here rather than in on_fit_start: after the sanity check, next to the strategy's summary
        strategy = _badam_strategy(trainer)
        self._pass_began = time.monotonic() if self._visits is not None else None
        if self._restored:
            # global_step is restored by now, but the segment's start is what the schedule knows
            start = f"BAdam resumes with {self._describe(strategy)} in the segment starting at step "
            start += f"{self._segment * self.every}"
        else:
            start = f"BAdam starts with {self._describe(strategy)} at step {trainer.global_step}"
        rank_zero_log(_log, logging.INFO, f"{start}; {self._schedule_text(len(strategy.blocks))}")

    def _setup_importance(self, strategy: Any, pl_module: LightningModule) -> None:
        numel = {n: p.numel() for n, p in pl_module.named_parameters()}
        self._sizes = [sum(numel[n] for n in b.param_names) for b in strategy.blocks]
        if not self._restored:
            self._scores = [None] * len(self._sizes)
        self._pending = []
        total = sum(self._sizes)
        if self.budget is None:
            self._budget_params = None
            return
        self._budget_params = self.budget if isinstance(self.budget, int) else int(self.budget * total)
        too_big = [strategy.blocks[i].name for i, n in enumerate(self._sizes) if n > self._budget_params]
        if too_big:
            rank_zero_warn(
                f"BlockSwitch(budget={self.budget}) allows {self._budget_params:,} trainable parameters per "
                f"activation, but {len(too_big)} blocks are larger (e.g. {too_big[0]!r}, {max(self._sizes):,}); they "
                "train alone when drawn. Raise the budget, or use BAdamStrategy(granularity='module'/'matrix') for "
                "smaller blocks."
            )
        if self._budget_params >= total:
            rank_zero_warn(
                f"BlockSwitch(budget={self.budget}) covers all {total:,} block parameters, so every block trains at "
                "every step: that is full fine-tuning with BAdam's bookkeeping. Lower the budget."
            )

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        if self.order != "importance":
            return
        strategy = _badam_strategy(trainer)
        if strategy.step_skipped:
            return  # a skipped step (inf/NaN gradients) teaches nothing about the blocks
        masters = strategy.master_params
        for index in strategy.active_blocks:
            names = strategy.blocks[index].param_names
            grads: list[Tensor] = [g for g in (masters[n].grad for n in names if n in masters) if g is not None]
            if not grads:
                continue  # backward did not reach the block
            # FP32 master gradients, all-reduced (DDP) and unscaled (16-true) before this hook, and not clipped yet
            norm = torch.nn.utils.get_total_norm(grads)
            if hasattr(norm, "full_tensor"):  # FSDP: a norm over shards, reduced across ranks here
                norm = norm.full_tensor()
            self._pending.append((index, norm.detach() / math.sqrt(self._sizes[index])))

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        strategy = _badam_strategy(trainer)
        assert self._active is not None and self._num_blocks is not None
        target = trainer.global_step // self.every
        switched = False
        if self.order == "importance" and self._segment < target:
            self._fold()
            # the scores come from all-reduced gradients and agree already; rank 0's copy makes that a guarantee, so
            # that every rank draws the same blocks from its identically seeded generator
            self._scores = list(trainer.strategy.broadcast(self._scores, src=0))
        while self._segment < target:
            self._segment += 1
            nxt = self._next_set(self._active_set, self._num_blocks)
            switched = switched or nxt != self._active_set
            self._active_set = nxt
            self._active = nxt[0]
            if self.order == "fixed":
                continue  # no passes: the block never changes
            if self._segment % self._num_blocks == 0:
                self._end_pass(self._segment // self._num_blocks)
            if self._visits is not None:
                self._visits.append(nxt)
        if tuple(strategy.active_blocks) != self._active_set:
            strategy.activate(self._active_set)
        if switched:
            rank_zero_log(
                _log, logging.DEBUG, f"BAdam switched to {self._describe(strategy)} at step {trainer.global_step}"
            )
        # the number for the loggers (plots); the progress bar gets "4/6": a logged value is always a float there,
        # which the bars print as 4.000
        pl_module.log("badam/block", float(self._active), prog_bar=False, on_step=True, on_epoch=False)
        bar: dict[str, Any] = trainer.progress_bar_metrics
        bar[PROGRESS_BAR_KEY] = block_label(self._active_set, self._num_blocks)

    def _describe(self, strategy: Any) -> str:
        assert self._active is not None
        if len(self._active_set) == 1:
            name = strategy.blocks[self._active].name
            return f"block {self._active}/{len(strategy.blocks)} ({name!r})"
        names = ", ".join(repr(strategy.blocks[i].name) for i in self._active_set[:3])
        more = ", ..." if len(self._active_set) > 3 else ""
        size = sum(self._sizes[i] for i in self._active_set)
        what = f"{len(self._active_set)} blocks {list(self._active_set)} of {len(strategy.blocks)} "
        return what + f"({names}{more}; {size:,} parameters)"

    def _schedule_text(self, num_blocks: int) -> str:
        if self.order == "fixed":
            return "it trains alone (BlockSwitch order='fixed')"
        span = f"one pass over the {num_blocks} blocks: {num_blocks * self.every} steps"
        if self.order == "importance":
            return f"a new draw by gradient importance every {self.every} steps ({span}, {num_blocks} draws)"
        return f"a new block every {self.every} steps in {self.order} order ({span})"

    def _end_pass(self, number: int) -> None:
        assert self._num_blocks is not None
        now = time.monotonic()
        took = f", {now - self._pass_began:.1f} s" if self._pass_began is not None else ""
        if self._visits is None:
            visited = "it began before the resume"
        elif len(self._visits) > 16:
            distinct = len({i for s in self._visits for i in s})
            visited = f"{distinct} of the {self._num_blocks} blocks trained"
        else:
            visited = "order " + ", ".join("+".join(map(str, s)) for s in self._visits)
        rank_zero_log(
            _log,
            logging.INFO,
            f"BAdam: pass {number} over the {self._num_blocks} blocks done at step {self._segment * self.every} "
            f"({self.every} steps per block{took}; {visited})",
        )
        self._visits = []
        self._pass_began = now

    # ----------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "every": self.every,
            "order": self.order,
            "num_blocks": self._num_blocks,
            "segment": self._segment,
            "current": self._active,
            "pass": list(self._pass),
            "generator": self._generator.get_state(),
        }
        if self.order == "importance":
            self._fold()
            state["current_set"] = list(self._active_set)
            state["scores"] = list(self._scores)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("order") != self.order or state_dict.get("every") != self.every:
            raise MisconfigurationException(
                f"The checkpoint's BlockSwitch(every={state_dict.get('every')}, order={state_dict.get('order')!r}) "
                f"differs from this run's {self!r}; resume with the same schedule."
            )
        self._num_blocks = state_dict["num_blocks"]
        self._segment = int(state_dict["segment"])
        self._active = state_dict["current"]
        self._pass = [int(i) for i in state_dict["pass"]]
        self._generator.set_state(state_dict["generator"])
        # checkpoints written before the importance order have one block and no scores
        current_set = state_dict.get("current_set")
        if current_set is None:
            current_set = [] if self._active is None else [self._active]
        self._active_set = tuple(int(i) for i in current_set)
        self._scores = [None if s is None else float(s) for s in state_dict.get("scores", [])]
        self._pending = []
        self._restored = True


def block_label(active: tuple[int, ...] | list[int], num_blocks: int) -> str:
    """What the progress bar shows for the active blocks: ``"4/6"``, or ``"1+3/6"`` for a set (at most three named).

    Example::

        >>> block_label((4,), 6), block_label((1, 3, 5, 7), 12)
        ('4/6', '1+3+5+.../12')
    """
    shown = "+".join(str(i) for i in active[:3]) + ("+..." if len(active) > 3 else "")
    return f"{shown}/{num_blocks}"


def _check_budget(budget: int | float | None) -> int | float | None:
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"BlockSwitch(budget=...) must be an int, a float in (0, 1] or None, got {budget!r}.")
    if isinstance(budget, int):
        if budget < 1:
            raise ValueError(f"BlockSwitch(budget={budget}) must be a number of parameters >= 1 (or a float share).")
        return budget
    if not 0.0 < budget <= 1.0:
        raise ValueError(
            f"BlockSwitch(budget={budget}) as a float is a share of the block parameters and must be in (0, 1]; pass "
            "an int for a number of parameters."
        )
    return float(budget)


def _check_number(
    name: str,
    value: float | None,
    low: float,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"BlockSwitch({name}=...) must be a number, got {value!r}.")
    if math.isinf(value) and not (allow_inf and value > 0):
        raise ValueError(f"BlockSwitch({name}=...) must be finite, got {value!r}.")
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left, right = "(" if low_open else "[", ")" if high_open or high is None else "]"
        upper = "inf" if high is None else high
        raise ValueError(
            f"BlockSwitch({name}={value}) must be in {left}{low}, {upper}{right} (default "
            f"{_IMPORTANCE_DEFAULTS[name]})."
        )
    return float(value)


def _badam_strategy(trainer: Trainer) -> BlockStrategy:
    strategy = block_strategy(trainer)
    if strategy is None:
        raise MisconfigurationException(
            f"BlockSwitch schedules BAdam's blocks, but the Trainer uses {type(trainer.strategy).__name__}. "
            "Pass strategy='badam' (or lightning_memopt.BAdamStrategy()) to the Trainer, or remove BlockSwitch."
        )
    return strategy
