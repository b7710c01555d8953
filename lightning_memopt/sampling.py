"""Importance sampling of BAdam blocks from their gradient norms: the math behind ``BlockSwitch(order="importance")``.

Pure functions over plain numbers; nothing here knows about Lightning or the strategy. The idea follows MISA
(Module-wise Importance SAmpling, Liu et al., NeurIPS 2025): blocks whose gradients are larger are trained more often,
every block keeps a positive probability (which is what a convergence guarantee of block coordinate descent under
sampling needs), and with a *budget* several small blocks are drawn without replacement until the trainable parameters
reach it. The formulas below are this package's, written for BAdam's every-K-steps schedule; they are not a
transcription of the paper's algorithm.

For block ``b`` with ``n_b`` parameters:

1. **Observation**, every optimizer step in which ``b`` is active (no extra backward: its FP32 master gradients exist
   anyway, already all-reduced and unscaled, before clipping)::

       x_b = ‖g_b‖₂ / √n_b                         (the gradient's root mean square)

   The RMS, not the norm, so that a block is not favoured for being large: the budget is what prices size.
2. **Clipping**: once ``b`` has a score, ``x_b ← min(x_b, c · s_b)`` (``c = clip``, default 5), so one spiky batch
   moves the score by at most a bounded factor.
3. **Smoothing**: ``s_b ← β · s_b + (1 - β) · x_b`` (``β = smoothing``, default 0.9); the first observation sets
   ``s_b = x_b``. A block that is not active keeps its score.
4. **Probabilities**, with temperature ``τ`` (default 1) and floor ``ε`` (default 0.1)::

       p_b = (1 - ε) · w_b / Σ_j w_j  +  ε / D,      w_b = s_b^(1/τ)

   ``τ = 1`` samples in proportion to the gradient RMS; ``τ → 0`` approaches always taking the largest; ``τ = inf`` is
   uniform. The floor keeps every block at ``p_b ≥ ε / D``, so each is still visited every ``D / ε`` draws on average.
5. **Optimism**: a block never visited counts as infinitely promising: while any is left, the ``1 - ε`` share goes to
   the unvisited blocks evenly (``w_b = 1`` for them, ``0`` for visited ones). The first ``D`` draws are therefore
   close to a random pass over all blocks, and every block has a measured score before gradients decide. (Merely
   tying unvisited blocks with the best one is not enough: with few switches a block can stay unexplored by chance,
   and a from-scratch run that never trains its head, say, does not learn.)
6. **Drawing**: the first block is drawn from ``p``. Without a budget that is the whole draw. With a budget ``B``
   (trainable parameters per activation), further blocks are drawn from ``p`` renormalised over the blocks not drawn
   yet whose size still fits in what is left of ``B``, until none fits. A block larger than ``B`` can still be drawn
   first, and then trains alone.

Example::

    >>> import torch
    >>> scores = [update_score(None, 0.2, smoothing=0.9, clip=5.0), 0.05, None]
    >>> [round(p, 3) for p in importance_probabilities(scores, temperature=1.0, floor=0.1)]  # explore block 2 first
    [0.033, 0.033, 0.933]
    >>> scores[2] = 0.05
    >>> [round(p, 3) for p in importance_probabilities(scores, temperature=1.0, floor=0.1)]
    [0.633, 0.183, 0.183]
    >>> sample_blocks([0.5, 0.25, 0.25], torch.Generator().manual_seed(0))
    [2]
    >>> sample_blocks([0.5, 0.25, 0.25], torch.Generator().manual_seed(0), sizes=[4, 4, 4], budget=8)  # two fit
    [2, 1]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["importance_probabilities", "sample_blocks", "update_score"]


def update_score(score: float | None, observation: float, smoothing: float, clip: float) -> float:
    """One step of a block's score: clip the observation against the score, then smooth (steps 2-3 above).

    Args:
        score: the block's score, or ``None`` if it has none yet (the observation then becomes the score).
        observation: the gradient RMS ``‖g_b‖₂ / √n_b`` of this step; must be finite and ``>= 0``.
        smoothing: ``β`` in ``[0, 1)``.
        clip: ``c >= 1``: an observation counts at most ``c`` times the current score.

    Example::

        >>> update_score(1.0, 100.0, smoothing=0.9, clip=5.0)  # 0.9 * 1 + 0.1 * min(100, 5)
        1.4
    """
    if not math.isfinite(observation) or observation < 0:
        raise ValueError(f"A gradient RMS must be finite and >= 0, got {observation!r}.")
    if score is None:
        return observation
    return smoothing * score + (1.0 - smoothing) * min(observation, clip * score)


def importance_probabilities(scores: Sequence[float | None], temperature: float, floor: float) -> list[float]:
    """Sampling probabilities from block scores (steps 4-5 above); ``None`` marks a block never visited.

    Computed in double precision with plain Python arithmetic, so every rank gets bit-identical values from identical
    scores.

    Example::

        >>> importance_probabilities([4.0, 1.0], temperature=1.0, floor=0.0)
        [0.8, 0.2]
        >>> importance_probabilities([4.0, 1.0], temperature=float("inf"), floor=0.0)
        [0.5, 0.5]
        >>> importance_probabilities([0.0, 0.0], temperature=1.0, floor=0.0)  # nothing learned yet: uniform
        [0.5, 0.5]
    """
    if not scores:
        raise ValueError("There are no blocks to sample from.")
    if not temperature > 0:
        raise ValueError(f"The temperature must be > 0 (float('inf') for uniform sampling), got {temperature!r}.")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"The floor is a share of the probability in [0, 1], got {floor!r}.")
    visited = [s for s in scores if s is not None]
    if any(not math.isfinite(s) or s < 0 for s in visited):
        raise ValueError(f"Scores must be finite and >= 0, got {visited!r}.")
    best = max(visited, default=0.0)
    if len(visited) < len(scores):
        weights = [1.0 if s is None else 0.0 for s in scores]
    elif best == 0.0:
        weights = [1.0] * len(scores)
    else:
        exponent = 1.0 / temperature
        # relative scores in [0, 1]: no overflow for small temperatures, and 0 ** 0 == 1 makes tau = inf uniform
        weights = [(s / best) ** exponent for s in visited]
    total = sum(weights)
    uniform = 1.0 / len(scores)
    return [(1.0 - floor) * w / total + floor * uniform for w in weights]


def sample_blocks(
    probabilities: Sequence[float],
    generator: torch.Generator,
    sizes: Sequence[int] | None = None,
    budget: int | None = None,
    first: int | None = None,
) -> list[int]:
    """Draw the blocks of one activation (step 6 above), in the order drawn.

    Args:
        probabilities: one per block, ``>= 0``, summing to 1 (as :func:`importance_probabilities` returns).
        generator: the source of randomness (one ``torch.rand`` draw in double precision per block drawn), so the same
            generator state gives the same blocks on every rank and after a resume.
        sizes: parameters per block; needed with a budget.
        budget: the most parameters an activation may train; ``None`` draws one block.
        first: a block to take first instead of drawing it (``BlockSwitch(start=...)``).

    Example::

        >>> import torch
        >>> sample_blocks([0.0, 1.0], torch.Generator())
        [1]
    """
    count = len(probabilities)
    if budget is not None and (sizes is None or len(sizes) != count):
        raise ValueError("A budget needs the size of every block.")
    if first is None:
        chosen = [_draw(probabilities, range(count), generator)]
    else:
        chosen = [first]
    if budget is None or sizes is None:
        return chosen
    left = budget - sizes[chosen[0]]
    while True:
        candidates = [i for i in range(count) if i not in chosen and sizes[i] <= left and probabilities[i] > 0]
        if not candidates:
            return chosen
        pick = _draw(probabilities, candidates, generator)
        chosen.append(pick)
        left -= sizes[pick]


def _draw(probabilities: Sequence[float], candidates: Sequence[int], generator: torch.Generator) -> int:
    total = sum(probabilities[i] for i in candidates)
    if not total > 0:
        raise ValueError("All candidate blocks have probability 0; raise the floor above 0.")
    threshold = float(torch.rand((), generator=generator, dtype=torch.float64)) * total
    cumulative = 0.0
    for i in candidates:
        cumulative += probabilities[i]
        if threshold < cumulative:
            return i
    # rounding in the running sum can leave the threshold just above it: the last block with weight takes it
    return next(i for i in reversed(candidates) if probabilities[i] > 0)
