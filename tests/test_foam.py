"""FOAM (arXiv 2512.07112) against its equations, written out here element by element in float64.

End to end (a real Trainer, plain and under BAdam, exact resume, memory accounting) FOAM runs in
``tests/test_compressed_state.py`` with GaLore and FLORA.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_memopt.optim import FOAM, foam_state_bytes, fold, unfold
from lightning_memopt.optimizers import optimizer_state_bytes, steps_each_tensor_alone

LR, BETAS, EPS, WD = 0.05, (0.8, 0.95), 1e-8, 0.1
SCALE, RESIDUAL = 0.25, 0.5


def _blocks(n: int, b: int) -> list[range]:
    return [range(start, min(start + b, n)) for start in range(0, n, b)]


def _reference_run(theta: torch.Tensor, grads: list[torch.Tensor], level: int | None) -> torch.Tensor:
    """The paper's steps with explicit loops over rows and blocks (float64, no vectorised folding)."""
    theta = theta.clone()
    beta1, beta2 = BETAS
    folded = level is not None and theta.dim() >= 2
    rows = theta.reshape(-1, theta.shape[-1]) if theta.dim() >= 2 else theta.reshape(1, -1)
    n = rows.shape[1]
    b = 2**level if folded else 1
    blocks = _blocks(n, b)
    m_t = torch.zeros(rows.shape[0], len(blocks), dtype=torch.float64)
    v_t = torch.zeros_like(m_t)
    for t, grad in enumerate(grads, start=1):
        g = grad.reshape(rows.shape)
        update = torch.zeros_like(rows)
        for i in range(rows.shape[0]):
            for k, block in enumerate(blocks):
                values = [float(g[i, j]) for j in block]
                mean = sum(values) / len(values)
                mean_sq = sum(x * x for x in values) / len(values)
                m_t[i, k] = beta1 * m_t[i, k] + (1 - beta1) * mean
                v_t[i, k] = beta2 * v_t[i, k] + (1 - beta2) * mean_sq
                for j, x in zip(block, values, strict=True):
                    r = x - mean if folded else 0.0
                    s = RESIDUAL if folded else 0.0
                    m = float(m_t[i, k]) + s * r
                    v = float(v_t[i, k]) + s * s * r * r
                    update[i, j] = (SCALE if folded else 1.0) * m / (math.sqrt(v) + EPS)
        step = LR * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        rows = (rows - step * update) * (1 - LR * WD)
    return rows.reshape(theta.shape)


@pytest.mark.parametrize(
    ("shape", "level"),
    [((6, 8), 2), ((3, 10), 2), ((2, 3, 12), 3), ((6, 8), None), ((5,), 2)],
    ids=["divisible", "partial_block", "3d", "unfolded", "vector"],
)
def test_steps_equal_the_papers_equations_in_float64(shape, level):
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(shape, dtype=torch.float64, generator=g)
    grads = [torch.randn(shape, dtype=torch.float64, generator=g) for _ in range(4)]
    param = torch.nn.Parameter(theta.clone())
    optimizer = FOAM(
        [param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fold_level=level, scale=SCALE, residual_scale=RESIDUAL
    )
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
    expected = _reference_run(theta, grads, level)
    torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=1e-14)
    assert (param.detach() - theta).abs().max() > 0.05  # four steps of lr 0.05 moved it


def test_fold_and_unfold():
    g = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    means = fold(g, 4)
    assert means.shape == (4, 3)
    torch.testing.assert_close(means[:, 2], g[:, 8:].mean(dim=1))  # the partial block: the mean of its two
    residual = g - unfold(means, 4, 10)
    for block in _blocks(10, 4):  # the residual sums to zero in every block
        torch.testing.assert_close(residual[:, block.start : block.stop].sum(dim=1), torch.zeros(4), atol=1e-6, rtol=0)


def test_state_is_folded_and_accounted():
    weight = torch.nn.Parameter(torch.randn(64, 1024))
    bias = torch.nn.Parameter(torch.randn(64))
    optimizer = FOAM([weight, bias], fold_level=8)
    weight.grad, bias.grad = torch.randn_like(weight), torch.randn_like(bias)
    optimizer.step()
    state = optimizer.state[weight]
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (64, 4)
    assert optimizer.state[bias]["exp_avg"].shape == (64,)
    for p in (weight, bias):
        held = sum(t.numel() * t.element_size() for t in optimizer.state[p].values())
        assert held == foam_state_bytes(p, optimizer.param_groups[0]) == optimizer_state_bytes(optimizer, p)
    # 1/256 of Adam's two moments for the matrix
    assert foam_state_bytes(weight, optimizer.param_groups[0]) == (8 * weight.numel()) // 256 + 4
    assert steps_each_tensor_alone(optimizer)


def test_half_parameters_keep_fp32_state_across_a_checkpoint():
    weight = torch.nn.Parameter(torch.randn(8, 16).bfloat16())
    optimizer = FOAM([weight], fold_level=2)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    restored = FOAM([weight], fold_level=2)
    restored.load_state_dict(optimizer.state_dict())
    assert restored.state[weight]["exp_avg"].dtype == torch.float32
    assert torch.equal(restored.state[weight]["exp_avg_sq"], optimizer.state[weight]["exp_avg_sq"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "lr must be >= 0"),
        ({"betas": (0.9, 1.0)}, r"betas must be two numbers in \[0, 1\)"),
        ({"eps": -1.0}, "eps must be >= 0"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"fold_level": -1}, "fold_level must be a whole number >= 0"),
        ({"fold_level": 2.5}, "fold_level must be a whole number >= 0"),
        ({"scale": 0.0}, "scale must be > 0"),
        ({"residual_scale": -1.0}, "residual_scale must be >= 0"),
    ],
)
def test_arguments_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FOAM([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)
