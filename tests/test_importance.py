"""Importance-sampled block selection (``BlockSwitch(order="importance")``) and finer block partitions.

The sampling distribution is checked with Pearson's chi-square test against the intended probabilities (each test
also shows that the statistic rejects a wrong distribution, so it can fail); the scores against a recomputation from
the master gradients a real Trainer produced; determinism across ranks and FSDP with module-sized blocks on two gloo
processes; exact resume from real checkpoint files.
"""

from __future__ import annotations

import doctest
import itertools
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from ddp_smarter_run import launch, run
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import LlamaModule, tiny_llama, trainer_kwargs, weights
from test_resume import _assert_same, _assert_weights_equal
from transformers import GPT2Config, GPT2LMHeadModel

import lightning_memopt.bench.smarter_blocks
import lightning_memopt.sampling
from lightning_memopt import BAdamStrategy, BlockSwitch
from lightning_memopt.blocks import BlockPartitionError, enclosing_layers, partition
from lightning_memopt.sampling import importance_probabilities, sample_blocks, update_score

# upper 0.1% points of the chi-square distribution (any table), used when scipy is not installed
_CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124, 9: 27.877}


def chi2_critical(df: int) -> float:
    try:
        from scipy.stats import chi2
    except ImportError:
        return _CHI2_999[df]
    return float(chi2.ppf(0.999, df))


def chi2_statistic(counts: list[int], probabilities: list[float]) -> float:
    total = sum(counts)
    return sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, probabilities, strict=True))


@pytest.mark.parametrize("module", [lightning_memopt.sampling, lightning_memopt.bench.smarter_blocks])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------------------------------------------ math
def test_probabilities_follow_the_documented_formula():
    scores = [0.4, 0.2, 0.1, 0.0]
    tau, floor = 0.5, 0.2
    # p = (1 - e) s^(1/t) / sum + e / D
    weights_ = [0.4**2, 0.2**2, 0.1**2, 0.0]
    expected = [(1 - floor) * w / sum(weights_) + floor / 4 for w in weights_]
    assert importance_probabilities(scores, tau, floor) == pytest.approx(expected, rel=1e-12)
    assert sum(importance_probabilities(scores, tau, floor)) == pytest.approx(1.0)
    assert min(importance_probabilities(scores, 1e-3, floor)) == pytest.approx(floor / 4)  # the floor holds
    assert importance_probabilities(scores, math.inf, 0.0) == [0.25] * 4
    # unvisited blocks are explored first: they share the (1 - e) part, whatever the others' scores
    assert importance_probabilities([0.4, None, 0.1, None], tau, floor) == pytest.approx([0.05, 0.45, 0.05, 0.45])
    assert importance_probabilities([None, None], 1.0, 0.1) == [0.5, 0.5]
    for bad in ({"temperature": 0.0}, {"floor": 1.5}):
        with pytest.raises(ValueError):
            importance_probabilities(scores, **{"temperature": 1.0, "floor": 0.1, **bad})
    with pytest.raises(ValueError, match="finite"):
        importance_probabilities([float("nan"), 1.0], 1.0, 0.1)


def test_score_is_a_clipped_exponential_moving_average():
    assert update_score(None, 0.3, smoothing=0.9, clip=5.0) == 0.3
    assert update_score(1.0, 2.0, smoothing=0.9, clip=5.0) == pytest.approx(0.9 + 0.2)
    assert update_score(1.0, 50.0, smoothing=0.9, clip=5.0) == pytest.approx(0.9 + 0.5)  # spike clipped to 5x
    assert update_score(1.0, 0.0, smoothing=0.5, clip=5.0) == 0.5
    with pytest.raises(ValueError):
        update_score(1.0, float("inf"), smoothing=0.9, clip=5.0)


def test_single_draws_follow_the_probabilities():
    probabilities = importance_probabilities([0.8, 0.1, 0.9, 0.3, 0.02, 0.5], temperature=1.0, floor=0.1)
    generator = torch.Generator().manual_seed(123)
    draws = 12_000
    counts = [0] * len(probabilities)
    for _ in range(draws):
        (i,) = sample_blocks(probabilities, generator)
        counts[i] += 1
    critical = chi2_critical(len(counts) - 1)
    assert chi2_statistic(counts, probabilities) < critical, counts
    # and the test has power: the same draws are far from uniform sampling
    assert chi2_statistic(counts, [1 / len(counts)] * len(counts)) > 10 * critical


def test_budgeted_sets_follow_sampling_without_replacement():
    # four blocks of one parameter and a budget of two: an unordered pair {i, j} comes out with probability
    # p_i * p_j / (1 - p_i) + p_j * p_i / (1 - p_j)
    p = [0.4, 0.3, 0.2, 0.1]
    pairs = list(itertools.combinations(range(4), 2))
    expected = [p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j]) for i, j in pairs]
    assert sum(expected) == pytest.approx(1.0)
    generator = torch.Generator().manual_seed(5)
    counts = dict.fromkeys(pairs, 0)
    for _ in range(8_000):
        chosen = sample_blocks(p, generator, sizes=[1, 1, 1, 1], budget=2)
        counts[tuple(sorted(chosen))] += 1  # type: ignore[index]
    observed = [counts[pair] for pair in pairs]
    critical = chi2_critical(len(pairs) - 1)
    assert chi2_statistic(observed, expected) < critical, observed
    # independent draws of each block with its own p would give other pair frequencies: rejected
    naive = [p[i] * p[j] for i, j in pairs]
    naive = [x / sum(naive) for x in naive]
    assert chi2_statistic(observed, naive) > critical


def test_budget_is_respected_and_filled():
    sizes = [5, 3, 2, 2, 1, 8]
    generator = torch.Generator().manual_seed(0)
    for _ in range(500):
        chosen = sample_blocks([1 / 6] * 6, generator, sizes=sizes, budget=7)
        used = sum(sizes[i] for i in chosen)
        assert len(set(chosen)) == len(chosen)
        if chosen[0] == 5:  # larger than the budget: drawn first, it trains alone
            assert chosen == [5]
            continue
        assert used <= 7
        assert all(sizes[j] > 7 - used for j in range(6) if j not in chosen)  # nothing else would fit
    assert sample_blocks([0.5, 0.5], generator, sizes=[3, 3], budget=6, first=1)[0] == 1


# ----------------------------------------------------------------------------------------------------- granularity
def test_module_and_matrix_granularity_split_the_layers():
    model = tiny_llama(num_layers=2)
    layers = partition(model)
    modules = partition(model, granularity="module")
    matrices = partition(model, granularity="matrix", include_embedding=True, include_lm_head=True)
    assert [b.name for b in modules[:4]] == [
        "model.layers.0.self_attn",
        "model.layers.0.mlp",
        "model.layers.0.input_layernorm",
        "model.layers.0.post_attention_layernorm",
    ]
    assert modules[1].param_names == tuple(f"model.layers.0.mlp.{m}_proj.weight" for m in ("gate", "up", "down"))
    # the same parameters, in the same order, only cut finer
    flat = [n for b in layers for n in b.param_names]
    assert [n for b in modules for n in b.param_names] == flat
    # every tensor its own block, the final norm with the head (the head block holds it)
    assert sorted(b.param_names for b in matrices) == sorted((n,) for n, _ in model.named_parameters())
    assert matrices[0].name == "model.embed_tokens.weight"
    assert [b.name for b in matrices[-2:]] == ["model.norm.weight", "lm_head.weight"]
    assert enclosing_layers(model, modules[5].param_names) == ["model.layers.1"]


def test_module_granularity_keeps_a_layers_own_parameters_together():
    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(2))
            self.proj = torch.nn.Linear(2, 2)

    net = torch.nn.Module()
    net.layers = torch.nn.ModuleList(Layer() for _ in range(2))
    blocks = [(b.name, b.param_names) for b in partition(net, granularity="module")][:2]
    assert blocks == [
        ("layers.0", ("layers.0.scale",)),
        ("layers.0.proj", ("layers.0.proj.weight", "layers.0.proj.bias")),
    ]
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    names = [b.name for b in partition(gpt2, granularity="module")][:4]
    assert names == [f"transformer.h.0.{child}" for child in ("ln_1", "attn", "ln_2", "mlp")]


def test_granularity_errors_name_the_fix():
    model = tiny_llama(num_layers=2)
    with pytest.raises(BlockPartitionError, match="'layer', 'module', 'matrix'"):
        partition(model, granularity="head")  # type: ignore[arg-type]
    with pytest.raises(BlockPartitionError, match="Name the finer blocks yourself"):
        partition(model, block_prefixes=["model.layers.0"], granularity="module")
    with pytest.raises(ValueError, match="granularity='rows'"):
        BAdamStrategy(granularity="rows")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ BlockSwitch args
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"order": "random", "temperature": 2.0}, "only applies to order='importance'"),
        ({"order": "ascending", "budget": 100}, "only applies to order='importance'"),
        ({"order": "importance", "budget": 0}, ">= 1"),
        ({"order": "importance", "budget": 1.5}, r"\(0, 1\]"),
        ({"order": "importance", "temperature": 0.0}, "temperature"),
        ({"order": "importance", "score_smoothing": 1.0}, "score_smoothing"),
        ({"order": "importance", "score_clip": 0.5}, "score_clip"),
        ({"order": "importance", "floor": -0.1}, "floor"),
    ],
)
def test_importance_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockSwitch(**kwargs)


def test_state_of_the_classic_orders_is_unchanged_and_old_checkpoints_load():
    old_keys = {"every", "order", "num_blocks", "segment", "current", "pass", "generator"}
    old = BlockSwitch(every=3, order="random").state_dict()
    assert set(old) == old_keys
    old.update(num_blocks=4, segment=2, current=1, **{"pass": [3, 0]})
    switch = BlockSwitch(every=3, order="random")
    switch.load_state_dict(old)
    assert (switch.active_block, switch.active_blocks) == (1, (1,))


# ------------------------------------------------------------------------------------------- a real Trainer
class Observe(Callback):
    """After BlockSwitch: the trained sets, and per step each active block's gradient RMS as the docs define it."""

    def __init__(self) -> None:
        self.sets: list[tuple[int, ...]] = []
        self.observations: list[tuple[int, float]] = []
        self.master_names: list[set[str]] = []
        self.optimizer_names: list[set[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sets.append(trainer.strategy.active_blocks)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        strategy = trainer.strategy
        masters = strategy.master_params
        self.master_names.append(set(masters))
        self.optimizer_names.append({id(p) for g in optimizer.param_groups for p in g["params"]})
        assert self.optimizer_names[-1] == {id(m) for m in masters.values()}
        for i in strategy.active_blocks:
            names = strategy.blocks[i].param_names
            grads = [masters[n].grad for n in names]
            size = sum(masters[n].numel() for n in names)
            rms = torch.nn.utils.get_total_norm(grads) / math.sqrt(size)
            self.observations.append((i, float(rms.double())))


def fit(root, max_steps: int, ckpt_path=None, save_every: int | None = None, **switch_kwargs: Any):
    module = LlamaModule(num_layers=2, hidden=16, n=8, batch_size=4)
    switch = BlockSwitch(every=3, order="importance", seed=11, **switch_kwargs)
    observe = Observe()
    callbacks: list[Callback] = [switch, observe]
    if save_every:
        callbacks.append(ModelCheckpoint(root, filename="{step}", every_n_train_steps=save_every, save_top_k=-1))
    trainer = pl.Trainer(
        strategy=BAdamStrategy(granularity="module"),
        precision="bf16-true",
        callbacks=callbacks,
        max_steps=max_steps,
        **trainer_kwargs(root, enable_checkpointing=bool(save_every)),
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, trainer, switch, observe


def test_scores_sets_and_masters_in_a_real_run(tmp_path):
    module, trainer, switch, observe = fit(tmp_path, max_steps=12, budget=0.4)
    strategy = trainer.strategy
    sizes = [sum(module.get_parameter(n).numel() for n in b.param_names) for b in strategy.blocks]
    budget = int(0.4 * sum(sizes))
    assert len(strategy.blocks) == 8  # attention, MLP and two norms per layer
    for chosen, masters in zip(observe.sets, observe.master_names, strict=True):
        assert chosen == tuple(sorted(chosen))
        assert sum(sizes[i] for i in chosen) <= budget or len(chosen) == 1
        # exactly the set's parameters have FP32 masters, and the optimizer holds exactly those
        assert masters == {n for i in chosen for n in strategy.blocks[i].param_names}
    assert any(len(c) > 1 for c in observe.sets) and len(set(observe.sets)) > 1
    # the scores are the documented EMA of the observed gradient RMS (bit-exact: the same computation)
    expected: list[float | None] = [None] * len(sizes)
    for index, value in observe.observations:
        expected[index] = update_score(expected[index], value, smoothing=0.9, clip=5.0)
    assert switch.scores == expected
    assert sum(s is not None for s in expected) >= 4
    assert switch.probabilities == importance_probabilities(expected, 1.0, 0.1)


def test_exact_resume_with_importance_sets(tmp_path):
    # two batches per epoch: step 4 is an epoch boundary in the middle of a block set (every=3)
    options = {"budget": 0.4, "temperature": 0.5}
    reference = fit(tmp_path / "ref", max_steps=10, **options)
    fit(tmp_path / "first", max_steps=4, save_every=4, **options)
    path = tmp_path / "first" / "step=4.ckpt"
    saved = torch.load(path, weights_only=True)
    badam = saved["optimizer_states"][0]["badam"]
    assert len(badam["active_blocks"]) > 1 and badam["active_block"] == badam["active_blocks"][0]
    resumed = fit(tmp_path / "second", max_steps=10, ckpt_path=str(path), **options)
    _assert_weights_equal(weights(reference[0]), weights(resumed[0]))
    assert resumed[3].sets == reference[3].sets[4:]
    assert resumed[2].scores == reference[2].scores
    _assert_same(reference[2].state_dict(), resumed[2].state_dict(), "BlockSwitch")
    _assert_same(
        {n: m.detach() for n, m in reference[1].strategy.master_params.items()},
        {n: m.detach() for n, m in resumed[1].strategy.master_params.items()},
        "masters",
    )


def test_start_block_and_budget_warnings(tmp_path):
    with pytest.warns(UserWarning, match="train alone"):
        *_, observe = fit(tmp_path, max_steps=1, budget=100, start=1)
    assert observe.sets == [(1,)]  # the start block, an MLP larger than the budget, trains alone
    with pytest.raises(MisconfigurationException, match="out of range"):
        fit(tmp_path, max_steps=1, start=99)


# ------------------------------------------------------------------------------------------------ two processes
@pytest.mark.xdist_group("ddp")
def test_fsdp_trains_module_sets_like_one_device(tmp_path):
    """FSDP units stay whole layers; sets of module blocks inside them train as on one device, same draws."""
    common = ["--precision", "32-true", "--lr", "1e-3", "--granularity", "module", "--budget", "0.3"]
    r0, r1 = launch(tmp_path / "fsdp", "--strategy", "badam_fsdp", *common)
    single = run(["--out", str(tmp_path / "single"), "--devices", "1", "--batch-size", "4", *common])
    assert r0["world_size"] == 2
    assert r0["sets"] == r1["sets"] == single["sets"]
    assert len({tuple(s) for s in r0["sets"]}) > 1 and any(len(s) > 1 for s in r0["sets"])
    assert r0["scores"] == r1["scores"]
    assert [s is None for s in r0["scores"]] == [s is None for s in single["scores"]]
    assert [s for s in r0["scores"] if s is not None] == pytest.approx([s for s in single["scores"] if s], rel=1e-4)
    for name, w in single["weights"].items():
        assert torch.equal(r0["weights"][name], r1["weights"][name]), name
        torch.testing.assert_close(r0["weights"][name], w, rtol=0, atol=1e-5)
