"""Adafactor's stabiliser rules against the paper's equations (Shazeer & Stern 2018), on random tensors, in float64.

The pure functions of ``lightning_memopt.adafactor_rules`` are checked against the formulas written out here; then the
rules of the callbacks drive real optimizers (torch's Adam/AdamW/SGD, bitsandbytes' Adam) through
``UpdateTransforms.attach`` in a plain loop, and the result is compared with the paper's recurrences step by step.
"""

from __future__ import annotations

import doctest
import math
from collections import defaultdict

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_memopt.adafactor_rules
import lightning_memopt.callbacks.update_transform
from lightning_memopt.adafactor_rules import (
    adam_bias_correction_fix,
    beta2_at,
    clip_scale,
    relative_step_size,
    rms,
    step_size_cap,
)
from lightning_memopt.callbacks.beta2_schedule import BETA2_PRODUCT_KEY, Beta2Schedule
from lightning_memopt.callbacks.relative_step import RelativeStepSize
from lightning_memopt.callbacks.update_clipping import UpdateClipping
from lightning_memopt.callbacks.update_transform import UpdateTransforms

F64 = torch.float64


def paper_rms(x: torch.Tensor) -> float:
    return math.sqrt(float((x.double() ** 2).mean()))


@pytest.mark.parametrize("module", [lightning_memopt.adafactor_rules, lightning_memopt.callbacks.update_transform])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


# ------------------------------------------------------------------------------------------------- pure rules
def test_beta2_schedule_is_one_minus_t_to_the_decay():
    ts = [1, 2, 3, 10, 100, 1000, 12345]
    for decay in (-0.8, -0.5, -1.0):
        values = [beta2_at(t, decay) for t in ts]
        assert values == [1.0 - t**decay for t in ts]
        assert values[0] == 0.0  # beta2_1 = 0: the first estimate is g^2, no bias to correct
        assert values == sorted(values) and values[-1] < 1.0
    assert abs(beta2_at(100) - 0.975) < 1e-3  # DESIGN.md: at t = 100, beta2 is about 0.975
    with pytest.raises(ValueError, match="counts from 1"):
        beta2_at(0)


@pytest.mark.parametrize("threshold", [0.5, 1.0, 2.0])
def test_clip_scale_is_the_papers_update_clipping(threshold):
    g = torch.Generator().manual_seed(1)
    for scale in (1e-3, 0.3, 1.0, 7.0):
        u = torch.randn(17, 5, generator=g, dtype=F64) * scale
        clipped = u * clip_scale(rms(u), threshold)
        expected = u / max(1.0, paper_rms(u) / threshold)  # U_hat = U / max(1, RMS(U) / d)
        torch.testing.assert_close(clipped, expected, rtol=1e-14, atol=0)
        assert paper_rms(clipped) == pytest.approx(min(paper_rms(u), threshold), rel=1e-12)


@pytest.mark.parametrize("warmup_init", [False, True])
def test_relative_step_size_is_the_papers_alpha(warmup_init):
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(8, 3, generator=g, dtype=F64) * s for s in (1e-5, 0.02, 1.0, 30.0)] + [torch.zeros(4, 4)]
    for x in tensors:
        for t in (1, 2, 100, 10_000, 40_000, 10**7):
            rho = min(1e-6 * t if warmup_init else 1e-2, 1.0 / math.sqrt(t))
            expected = max(1e-3, paper_rms(x)) * rho  # alpha_t = max(eps2, RMS(X_{t-1})) * rho_t
            assert relative_step_size(t, rms(x), warmup_init=warmup_init) == pytest.approx(expected, rel=1e-12)
    assert step_size_cap(10_000) == 1e-2 and step_size_cap(40_000) == 5e-3  # 1/sqrt(t) takes over past t = 10^4
    assert relative_step_size(5, 0.5, max_step=1e-3, eps2=0.0) == pytest.approx(0.5e-3)


def test_rms_reduces_half_precision_in_fp32():
    x = torch.full((1024,), 300.0, dtype=torch.float16)  # the sum of squares overflows fp16
    assert rms(x) == 300.0
    assert rms(torch.tensor([1.0, -1.0], dtype=torch.bfloat16)) == pytest.approx(1.0, rel=1e-7)


@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_bias_correction_fix_turns_adams_formula_into_the_right_one(beta1):
    """Algebra only: Adam's arithmetic (its own 1 - beta2**step, eps scaled by f, update scaled by f) equals Adam with
    the true normaliser 1 - prod(beta2_j) of v_t = beta2_t v_{t-1} + (1 - beta2_t) g_t^2, for any schedule."""
    g = torch.Generator().manual_seed(3)
    eps, lr = 1e-3, 0.1  # a large eps so that its placement matters
    schedules = {
        "paper, t from 1": [beta2_at(t) for t in range(1, 9)],
        "paper, t from 50 (state reset mid-run)": [beta2_at(t) for t in range(50, 58)],
        "random": torch.rand(8, generator=g, dtype=F64).mul(0.99).tolist(),
    }
    for name, betas in schedules.items():
        m = v = torch.zeros(6, dtype=F64)
        product = 1.0
        for step, beta2 in enumerate(betas, start=1):
            grad = torch.randn(6, generator=g, dtype=F64)
            m = beta1 * m + (1 - beta1) * grad
            v = beta2 * v + (1 - beta2) * grad**2
            product *= beta2
            m_hat = m / (1 - beta1**step)
            truth = -lr * m_hat / ((v / (1 - product)).sqrt() + eps)
            f = adam_bias_correction_fix(beta2, step, product)
            adams = -lr * m_hat / (v.sqrt() / math.sqrt(1 - beta2**step) + eps * f)
            torch.testing.assert_close(adams * f, truth, rtol=1e-13, atol=0, msg=name)


# ------------------------------------------------------------------------------------------------- rules on optimizers
def _adam(kind: str, params, **kwargs):
    if kind == "torch-adam":
        return torch.optim.Adam(params, **kwargs)
    if kind == "torch-adamw":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    return bnb.optim.Adam32bit(params, **kwargs)


@pytest.mark.parametrize("restart_on_switch", [True, False], ids=["restart", "global"])
@pytest.mark.parametrize(("kind", "beta1", "weight_decay"), [
    ("torch-adam", 0.0, 0.0),
    ("torch-adam", 0.9, 0.01),  # L2 in the gradient
    ("torch-adamw", 0.9, 0.1),  # decoupled decay, not scaled by the bias-correction fix
    ("bnb-adam32", 0.9, 0.0),
])  # fmt: skip
def test_beta2_rule_makes_adam_follow_the_papers_recurrence(kind, beta1, weight_decay, restart_on_switch):
    """Real Adam steps with the rule attached equal the float64 recurrence v_t = beta2_t v_{t-1} + (1 - beta2_t) g_t^2
    with the bias correction 1 - prod(beta2_j); the optimizer state is reset mid-run, as a BAdam block switch does."""
    dtype = torch.float32 if kind.startswith("bnb") else F64
    g = torch.Generator().manual_seed(4)
    shapes = [(5,), (4, 3)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]
    lr, eps, steps, reset_at = 0.05, 1e-3, 9, 5
    optimizer = _adam(kind, params, lr=lr, betas=(beta1, 0.999), eps=eps, weight_decay=weight_decay)
    callback = Beta2Schedule(restart_on_switch=restart_on_switch)
    detach = UpdateTransforms.attach(optimizer, callback.make_rule(optimizer))

    ref = [p.detach().to(F64).clone() for p in params]
    m = [torch.zeros_like(r) for r in ref]
    v = [torch.zeros_like(r) for r in ref]
    naive = [r.clone() for r in ref]  # what Adam's own bias correction would give for the same schedule
    product, count = 1.0, 0
    for t_global in range(1, steps + 1):
        if t_global == reset_at:
            optimizer.state = defaultdict(dict)  # what BAdam does at a block switch
            m = [torch.zeros_like(r) for r in ref]
            v = [torch.zeros_like(r) for r in ref]
            product, count = 1.0, 0
        count += 1
        beta2 = beta2_at(count if restart_on_switch else t_global)
        product *= beta2
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g, dtype=F64)
            p.grad = grad.to(dtype)
            decoupled = kind == "torch-adamw"
            x = ref[i]
            gw = grad if decoupled else grad + weight_decay * x
            m[i] = beta1 * m[i] + (1 - beta1) * gw
            v[i] = beta2 * v[i] + (1 - beta2) * gw**2
            m_hat = m[i] / (1 - beta1**count)
            decayed = x * (1 - lr * weight_decay) if decoupled else x
            ref[i] = decayed - lr * m_hat / ((v[i] / (1 - product)).sqrt() + eps)
            naive[i] = decayed - lr * m_hat / ((v[i] / (1 - beta2**count)).sqrt() + eps)
        optimizer.step()
        tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == F64 else {"rtol": 2e-6, "atol": 2e-7}
        for i, p in enumerate(params):
            state = optimizer.state[p]
            torch.testing.assert_close(
                state["exp_avg_sq" if kind.startswith("torch") else "state2"].to(F64), v[i], **tol
            )
            assert state[BETA2_PRODUCT_KEY] == pytest.approx(product, rel=1e-12, abs=0)
            torch.testing.assert_close(p.detach().to(F64), ref[i], **tol)
        # the groups show the user's hyper-parameters between steps
        assert optimizer.param_groups[0]["betas"] == (beta1, 0.999) and optimizer.param_groups[0]["eps"] == eps
    # the test can fail: Adam's own correction for a changing beta2 is measurably different
    assert max(float((n - r).abs().max()) for n, r in zip(naive, ref, strict=True)) > 1e-4
    detach()
    assert UpdateTransforms.of(optimizer) is None


@pytest.mark.parametrize(("kind", "weight_decay"), [("sgd", 0.05), ("adamw", 0.2)], ids=["sgd-L2", "adamw-decoupled"])
def test_clipping_then_relative_step_on_a_plain_loop(kind, weight_decay):
    """SGD with momentum and L2 (clipped with the update) and AdamW with decoupled decay (left unclipped, applied at
    the relative step size): the two rules compose as Û = U / max(1, RMS(U)/d), X -= alpha_t Û, in that order."""
    g = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=F64) * 0.3) for s in [(6,), (3, 4), (2, 2, 2)]]
    params.append(torch.nn.Parameter(torch.zeros(3, dtype=F64)))  # RMS 0 < eps2: steps against eps2
    lr, momentum, d = 0.7, 0.9, 0.05
    if kind == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.0, 0.9), eps=1e-30, weight_decay=weight_decay)
    clip, relative = UpdateClipping(threshold=d), RelativeStepSize(max_step=0.3, warmup_init=False)
    # attached in the "wrong" order on purpose: the order of application is fixed (clip, then step size)
    handles = [UpdateTransforms.attach(optimizer, relative.make_rule(optimizer))]
    handles.append(UpdateTransforms.attach(optimizer, clip.make_rule(optimizer)))

    ref = [p.detach().clone() for p in params]
    buf = [torch.zeros_like(r) for r in ref]
    v = [torch.zeros_like(r) for r in ref]
    clipped = 0
    for t in range(1, 7):
        rho = min(0.3, 1 / math.sqrt(t))
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g, dtype=F64)
            p.grad = grad.clone()
            x = ref[i]
            if kind == "sgd":
                gw = grad + weight_decay * x
                buf[i] = gw if t == 1 else momentum * buf[i] + gw
                u, decay = buf[i], 0.0
            else:
                v[i] = 0.9 * v[i] + 0.1 * grad**2
                u = grad / (v[i] / (1 - 0.9**t)).sqrt()
                decay = rho * weight_decay  # AdamW's decay at the step size the rule gives it
            clipped += paper_rms(u) > d
            u_hat = u / max(1.0, paper_rms(u) / d)
            alpha = max(1e-3, paper_rms(x)) * rho
            ref[i] = x * (1 - decay) - alpha * u_hat
        optimizer.step()
        for p, r in zip(params, ref, strict=True):
            torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-14)
        assert optimizer.param_groups[0]["lr"] == lr
    assert clipped > 0
    for handle in handles:
        handle()


def test_step_with_and_without_closure_are_the_same():
    """Lightning passes a closure (the pre-hook runs before backward); a loss scaler calls step() without one."""
    results = []
    for with_closure in (True, False):
        torch.manual_seed(0)
        layer = torch.nn.Linear(4, 3).double()
        optimizer = torch.optim.Adam(layer.parameters(), lr=0.1, betas=(0.0, 0.999))
        for callback in (Beta2Schedule(), UpdateClipping(), RelativeStepSize()):
            UpdateTransforms.attach(optimizer, callback.make_rule(optimizer))
        x = torch.randn(8, 4, dtype=F64)

        def closure(layer=layer, optimizer=optimizer, x=x):
            optimizer.zero_grad()
            loss = layer(x).pow(2).sum()
            loss.backward()
            return loss

        for _ in range(3):
            if with_closure:
                optimizer.step(closure)
            else:
                closure()
                optimizer.step()
        results.append([p.detach().clone() for p in layer.parameters()])
        snapshot = UpdateTransforms.of(optimizer)
        assert snapshot is not None and snapshot.last_snapshot_bytes == sum(p.numel() * 8 for p in layer.parameters())
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(("make", "message"), [
    (lambda: UpdateClipping(threshold=0), "must be > 0"),
    (lambda: UpdateClipping(threshold=float("nan")), "finite number"),
    (lambda: Beta2Schedule(decay=0.8), "must be <= 0"),
    (lambda: Beta2Schedule(restart_on_switch="yes"), "True or False"),
    (lambda: RelativeStepSize(max_step=0), "must be > 0"),
    (lambda: RelativeStepSize(eps2=-1e-3), "must be >= 0"),
    (lambda: RelativeStepSize(warmup_init=1), "True or False"),
])  # fmt: skip
def test_arguments_are_validated(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def _transformers_adafactor(params):
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=None)


@pytest.mark.parametrize(("callback", "make_optimizer", "message"), [
    (Beta2Schedule(), lambda p: torch.optim.SGD(p, lr=0.1), "torch.optim.SGD is not supported"),
    (Beta2Schedule(), lambda p: torch.optim.Adam(p, amsgrad=True), "amsgrad=False"),
    (Beta2Schedule(), lambda p: torch.optim.Adafactor(p), "own increasing beta2 schedule"),
    (RelativeStepSize(), lambda p: torch.optim.ASGD(p), "step proportional"),
    (RelativeStepSize(), _transformers_adafactor, "takes relative steps itself"),
    (UpdateClipping(), lambda p: torch.optim.Adafactor(p), "clips its update itself"),
    (UpdateClipping(), lambda p: torch.optim.LBFGS(p), "LBFGS"),
])  # fmt: skip
def test_unsupported_optimizers_are_refused(callback, make_optimizer, message):
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(MisconfigurationException, match=message):
        UpdateTransforms.attach(optimizer, callback.make_rule(optimizer))
