"""The block engine on its own, without Lightning: a plain PyTorch loop drives it, and a float reference checks it."""

from __future__ import annotations

import pytest
import torch
from models import tiny_llama

from lightning_memopt.blocks import partition
from lightning_memopt.engine import BlockEngine, BlockEngineError, needs_master


def _bf16_llama(num_layers: int = 3) -> torch.nn.Module:
    return tiny_llama(num_layers).to(torch.bfloat16)


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))


def _backward(model: torch.nn.Module, seed: int = 0) -> None:
    x = _batch(seed)
    model(input_ids=x, labels=x).loss.backward()


def test_one_sgd_step_equals_the_float_reference_and_touches_only_the_active_block():
    model = _bf16_llama()
    blocks = partition(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = BlockEngine(model, blocks, torch.optim.SGD(model.parameters(), lr=0.5))
    assert not any(p.requires_grad for p in model.parameters())  # nothing trains before activate

    assert engine.activate((1,)) is True
    active = set(blocks[1].param_names)
    assert set(engine.masters) == active
    assert {n for n, p in model.named_parameters() if p.requires_grad} == active
    assert all(m.dtype == torch.float32 for m in engine.masters.values())

    _backward(model)
    half_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert set(half_grads) == active  # backward reached the active block only
    engine.grads_to_masters()
    assert all(p.grad is None for p in model.parameters())  # the half gradients are freed
    engine.optimizer.step()
    engine.masters_to_weights()

    for name, param in model.named_parameters():
        if name in active:
            # SGD in FP32 on the FP32 copy of the half gradient, then rounded once to bf16
            expected = before[name].float() - 0.5 * half_grads[name].float()
            assert torch.equal(engine.masters[name].detach(), expected), name
            assert torch.equal(param.detach(), expected.to(torch.bfloat16)), name
        else:
            assert torch.equal(param.detach(), before[name]), name
    moved = sum(int((model.get_parameter(n).detach() != before[n]).sum()) for n in active)
    assert moved > 0.5 * sum(before[n].numel() for n in active)  # most of the block really moved


def test_micro_batch_gradients_accumulate_in_fp32():
    model = _bf16_llama()
    engine = BlockEngine(model, partition(model), torch.optim.SGD(model.parameters(), lr=0.1))
    engine.activate((0,))
    name = next(iter(engine.masters))
    grads = []
    for seed in (0, 1):
        _backward(model, seed)
        grads.append(model.get_parameter(name).grad.detach().clone())
        engine.grads_to_masters()
    expected = grads[0].float() + grads[1].float()
    assert torch.equal(engine.masters[name].grad, expected)
    assert not torch.equal(expected.to(torch.bfloat16).float(), expected)  # a bf16 sum would have lost bits


def test_fp32_weights_are_their_own_masters():
    model = tiny_llama(2)  # FP32
    engine = BlockEngine(model, partition(model), torch.optim.SGD(model.parameters(), lr=0.1))
    engine.activate((0,))
    assert all(engine.masters[n] is model.get_parameter(n) for n in engine.masters)
    assert not needs_master(model.get_parameter(next(iter(engine.masters))))
    assert engine.state_dict()["masters"] == {}


def test_a_switch_drops_the_state_unless_it_is_kept():
    for keep in (False, True):
        model = _bf16_llama()
        engine = BlockEngine(
            model, partition(model), torch.optim.AdamW(model.parameters(), lr=1e-3), keep_optimizer_state=keep
        )
        engine.activate((0,))
        _backward(model)
        engine.grads_to_masters()
        engine.optimizer.step()
        saved = {n: {k: v.clone() for k, v in engine.optimizer.state[m].items()} for n, m in engine.masters.items()}
        engine.activate((2,))
        assert len(engine.optimizer.state) == 0  # the new block starts without state
        assert all(engine.optimizer.param_groups[0]["params"][i] is m for i, m in enumerate(engine.masters.values()))
        engine.activate((0,))
        if keep:
            for name, master in engine.masters.items():
                for key, value in saved[name].items():
                    assert torch.equal(engine.optimizer.state[master][key], value), (name, key)
        else:
            assert len(engine.optimizer.state) == 0
        assert engine.activate((0,)) is False  # already active: nothing happens


def test_state_dict_round_trip_into_a_fresh_engine():
    model = _bf16_llama()
    engine = BlockEngine(model, partition(model), torch.optim.AdamW(model.parameters(), lr=1e-2))
    engine.activate((0, 2))
    _backward(model)
    engine.grads_to_masters()
    engine.optimizer.step()
    engine.masters_to_weights()
    state = engine.state_dict()
    full = engine.full_groups(engine.optimizer.state_dict())
    # as a plain AdamW over the whole model saves it: every parameter listed, state for the active ones
    assert full["param_groups"][0]["params"] == list(range(len(list(model.parameters()))))
    assert len(full["state"]) == len(engine.masters)

    copy = _bf16_llama()
    copy.load_state_dict(model.state_dict())
    other = BlockEngine(copy, partition(copy), torch.optim.AdamW(copy.parameters(), lr=1e-2))
    other.load_state_dict(state)
    assert other.active == (0, 2)
    for name, master in engine.masters.items():
        # the masters hold what the half weights lost in rounding: restored exactly, not re-made from the weights
        assert torch.equal(other.masters[name], master), name
        assert not torch.equal(master, copy.get_parameter(name).detach().float()), name
    other.optimizer.load_state_dict(other.compact_groups(full))
    for name, master in engine.masters.items():
        theirs = other.optimizer.state[other.masters[name]]
        for key, value in engine.optimizer.state[master].items():
            assert torch.equal(theirs[key], value), (name, key)


def test_a_checkpoint_of_another_layout_is_refused():
    model = _bf16_llama(3)
    engine = BlockEngine(model, partition(model), torch.optim.SGD(model.parameters(), lr=0.1))
    engine.activate((0,))
    state = engine.state_dict()
    small = _bf16_llama(2)
    other = BlockEngine(small, partition(small), torch.optim.SGD(small.parameters(), lr=0.1))
    with pytest.raises(BlockEngineError, match=r"another BAdam block layout.*3 blocks, this run 2"):
        other.load_state_dict(state)


def test_non_finite_values_never_reach_the_half_weights():
    model = _bf16_llama()
    engine = BlockEngine(model, partition(model), torch.optim.SGD(model.parameters(), lr=0.1))
    engine.activate((1,))
    _backward(model)
    engine.grads_to_masters()
    assert engine.master_grads_finite()
    name = next(iter(engine.masters))
    engine.masters[name].grad[0, 0] = float("nan")
    assert not engine.master_grads_finite()
    engine.drop_master_grads()
    assert all(m.grad is None for m in engine.masters.values())
    assert engine.master_grads_finite()  # no gradients: nothing to refuse

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        engine.masters[name][0, 0] = float("inf")
    with pytest.raises(RuntimeError, match="inf/NaN master weights"):
        engine.masters_to_weights()
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_an_optimizer_that_misses_block_parameters_or_holds_foreign_tensors_is_refused():
    model = _bf16_llama()
    blocks = partition(model)
    some = [p for n, p in model.named_parameters() if n not in blocks[1].param_names]
    with pytest.raises(BlockEngineError, match="not in the optimizer"):
        BlockEngine(model, blocks, torch.optim.SGD(some, lr=0.1))
    stranger = torch.nn.Parameter(torch.zeros(3, 5))
    with pytest.raises(BlockEngineError, match=r"shape \(3, 5\) that is not a parameter"):
        BlockEngine(model, blocks, torch.optim.SGD([*model.parameters(), stranger], lr=0.1))


def test_release_restores_requires_grad_and_keeps_the_masters():
    model = _bf16_llama()
    model.get_parameter("model.embed_tokens.weight").requires_grad_(False)
    engine = BlockEngine(model, partition(model), torch.optim.SGD(model.parameters(), lr=0.1))
    assert "lm_head.weight" in engine.frozen_outside and "model.embed_tokens.weight" not in engine.frozen_outside
    engine.activate((0,))
    engine.release()
    assert not model.get_parameter("model.embed_tokens.weight").requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "model.embed_tokens.weight")
    assert set(engine.masters) == set(engine.blocks[0].param_names)


def test_the_activation_callback_sees_the_new_masters():
    model = _bf16_llama()
    engine = BlockEngine(model, partition(model), torch.optim.SGD(model.parameters(), lr=0.1))
    seen = []
    engine.on_activate = lambda index: seen.append((index, sorted(engine.masters)))
    engine.activate((2, 1))
    assert seen == [(1, sorted(engine.blocks[1].param_names + engine.blocks[2].param_names))]
    with pytest.raises(IndexError, match="out of range: the model has 3 blocks"):
        engine.activate((3,))


def test_strategies_take_the_block_options_once_and_name_a_misspelt_one():
    from lightning_memopt import BAdamDDPStrategy, BAdamFSDPStrategy, BAdamStrategy

    for cls in (BAdamStrategy, BAdamDDPStrategy, BAdamFSDPStrategy):
        strategy = cls(granularity="module", include_lm_head=True, max_nonfinite_steps=3)
        assert (strategy.granularity, strategy.include_lm_head, strategy.max_nonfinite_steps) == ("module", True, 3)
        assert strategy.layers_per_block == 1 and strategy.block_prefixes is None  # the defaults
        with pytest.raises(TypeError, match="unexpected option 'include_lm_heads'; did you mean 'include_lm_head'"):
            cls(include_lm_heads=True)
    with pytest.raises(ValueError, match="granularity='row' is not known"):
        BAdamStrategy(granularity="row")  # type: ignore[arg-type]


def test_the_distributed_strategies_take_block_and_process_options_from_yaml_style_arguments():
    from datetime import timedelta

    from jsonargparse import ArgumentParser

    from lightning_memopt import BAdamDDPStrategy, BAdamFSDPStrategy
    from lightning_memopt.checkpoint_io import AtomicCheckpointIO

    # how LightningCLI reads `strategy: {class_path: ..., init_args: ...}`: the TypedDict options are parameters
    parser = ArgumentParser()
    parser.add_argument("--ddp", type=BAdamDDPStrategy)
    parser.add_argument("--fsdp", type=BAdamFSDPStrategy)
    config = parser.parse_args(
        [
            '--ddp={"class_path": "lightning_memopt.BAdamDDPStrategy", "init_args": {"bucket_cap_mb": 5, '
            '"include_lm_head": true, "process_group_backend": "gloo", "timeout": "0:05:00"}}',
            '--fsdp={"class_path": "lightning_memopt.BAdamFSDPStrategy", "init_args": {"granularity": "module", '
            '"reshard_after_forward": false}}',
        ]
    )
    built = parser.instantiate(config)
    ddp, fsdp = built.ddp, built.fsdp
    assert (ddp.bucket_cap_mb, ddp.include_lm_head, ddp.process_group_backend) == (5.0, True, "gloo")
    assert ddp._timeout == timedelta(minutes=5)
    assert (fsdp.granularity, fsdp.reshard_after_forward) == ("module", False)
    assert isinstance(ddp.checkpoint_io, AtomicCheckpointIO) and isinstance(fsdp.checkpoint_io, AtomicCheckpointIO)
    with pytest.raises(TypeError, match="did you mean 'process_group_backend'"):
        BAdamDDPStrategy(process_group_backed="gloo")
