"""The private attributes of other libraries, each checked against the installed library: an upgrade that renames one
fails here, not in a user's run."""

from __future__ import annotations

import warnings

import torch
from lightning.pytorch import Trainer
from models import LlamaModule, tiny_llama, trainer_kwargs
from torch import nn

from lightning_memopt import compat


def test_is_fake_tells_tracing_stand_ins_from_real_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.zeros(3)
    assert compat.is_fake(fake)
    assert not compat.is_fake(torch.zeros(3))


def test_the_trainer_and_devices_lightning_resolved(tmp_path):
    module = LlamaModule(num_layers=1, n=4)
    assert compat.lightning_trainer(module) is None
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=1))
    trainer.fit(module)
    assert compat.lightning_trainer(module) is trainer
    assert [d.type for d in compat.parallel_devices(trainer)] == ["cpu"]
    two = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert len(compat.parallel_devices(two)) == 2
    assert compat.parallel_devices(object()) == []


def test_compiled_parts_finds_each_way_of_compiling():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    assert compat.compiled_parts(model) == []
    model[1].compile()
    assert compat.compiled_parts(model) == ["'1'"]
    assert compat.compiled_parts(nn.Sequential(torch.compile(nn.Linear(2, 2)))) == ["'0'"]
    setting, limit = compat.dynamo_recompile_limit()
    assert setting in ("recompile_limit", "cache_size_limit") and isinstance(limit, int)


def test_transformers_input_grad_hooks_are_disabled_and_given_back():
    model = tiny_llama(1)
    model.enable_input_require_grads()
    model.requires_grad_(False)
    x = torch.randint(0, 64, (1, 4))
    assert model.get_input_embeddings()(x).requires_grad  # transformers' hook at work
    disabled = compat.disable_input_grad_hooks(model)
    assert disabled == [model]
    assert not model.get_input_embeddings()(x).requires_grad
    compat.enable_input_grad_hooks(disabled)
    assert model.get_input_embeddings()(x).requires_grad


def test_child_schedulers_of_a_sequential_schedule():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    first = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=2)
    second = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    sequential = torch.optim.lr_scheduler.SequentialLR(optimizer, [first, second], milestones=[2])
    assert list(compat.child_schedulers(sequential)) == [first, second]
    assert list(compat.child_schedulers(first)) == []


def test_a_scheduler_moved_to_a_new_optimizer_does_not_warn_once_its_step_is_tracked():
    params = [nn.Parameter(torch.zeros(1))]
    old = torch.optim.SGD(params, lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(old, step_size=1)
    new = torch.optim.SGD(params, lr=1.0)
    scheduler.optimizer = new
    compat.track_step_called(new)
    compat.track_step_called(new)  # idempotent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new.step()
        scheduler.step()
    assert new._opt_called  # type: ignore[attr-defined]


def test_replace_buffer_keeps_a_non_persistent_buffer_out_of_the_state_dict():
    module = nn.Module()
    module.register_buffer("inv_freq", torch.ones(2), persistent=False)
    assert compat.replace_buffer(module, "inv_freq", torch.full((2,), 3.0))
    assert torch.equal(compat.buffer(module, "inv_freq"), torch.full((2,), 3.0))
    assert "inv_freq" not in module.state_dict()
    assert not compat.replace_buffer(module, "missing", torch.ones(1))
    assert compat.buffer(module, "missing") is None


def test_the_optimizer_step_hook_dicts_exist():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    optimizer.register_step_pre_hook(lambda *a: None)
    optimizer.register_step_post_hook(lambda *a: None)
    for attr in compat.OPTIMIZER_STEP_HOOK_ATTRS:
        assert len(getattr(optimizer, attr)) == 1


def test_only_compat_touches_other_libraries_private_names():
    import pathlib
    import re

    root = pathlib.Path(compat.__file__).parent
    private = re.compile(
        r"_(require_grads_hooks|compiler_ctx|compiled_call_impl|accelerator_connector|parallel_devices|"
        r"optimizer_step_(pre|post)_hooks|wrapped_by_lr_sched|opt_called)\b|\._(trainer|buffers)\b|\"_(schedulers|trainer)\"|"
        r"torch\._subclasses|_cdata\b|torch\.utils\._(python_dispatch|pytree)\b"
    )
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if path.name != "compat.py" and private.search(path.read_text())
    ]
    assert offenders == [], offenders


def test_storage_key_and_fake_tensors():
    weight = torch.empty(4, 3, device="meta")
    assert (
        compat.storage_key(weight)
        == compat.storage_key(weight.t())
        != compat.storage_key(torch.empty(2, device="meta"))
    )
    real = torch.zeros(4)
    assert compat.storage_key(real) == compat.storage_key(real[1:])
    with compat.fake_tensor_mode():
        fake = torch.zeros(1000, 1000) @ torch.ones(1000, 10)
        assert compat.is_fake(fake) and fake.shape == (1000, 10)
        assert compat.storage_key(fake) == compat.storage_key(fake.view(-1))
    assert compat.tree_leaves({"a": (1, [real])}) == [1, real]


def test_nonfinite_flag_is_exact_and_leaves_the_values_alone():
    tensors = [torch.randn(4, 4, dtype=torch.float64), torch.randn(3).bfloat16(), torch.randn(5, 6).t(), torch.zeros(0)]
    before = [t.clone() for t in tensors]
    assert compat.nonfinite_flag(tensors).item() == 0.0
    assert all(torch.equal(t, b) for t, b in zip(tensors, before, strict=True))
    huge = torch.full((1000,), 3.0e38)  # finite, although any norm of it overflows
    assert compat.nonfinite_flag([huge]).item() == 0.0
    for bad in (float("inf"), -float("inf"), float("nan")):
        tensors[2][1, 1] = bad
        assert compat.nonfinite_flag(tensors).item() == 1.0


_GATHER_SCRIPT = """
import sys, warnings
import torch, torch.distributed as dist
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torchao.optim.subclass_4bit import OptimState4bit
from lightning_memopt.compat import full_tensor

rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
mesh = init_device_mesh("cpu", (2,))
torch.manual_seed(rank)
values = torch.randn(64, 128)
local = OptimState4bit.zeros((64, 128), signed=True, block_size=128, device="cpu")
local.copy_(values)
sharded = DTensor.from_local(local, mesh, [Shard(0)], shape=torch.Size((128, 128)), stride=(128, 1))
whole = full_tensor(sharded)
inner = [getattr(whole, name) for name in whole.__tensor_flatten__()[0]]
pending = [type(t).__name__ for t in inner if isinstance(t, AsyncCollectiveTensor)]
torch.save({"type": type(whole).__name__, "pending": pending, "shape": tuple(whole.shape),
            "values": whole.dequantize(), "local": local.dequantize(), "plain": full_tensor(values) is values}, out)
dist.barrier()
dist.destroy_process_group()
"""


def test_full_tensor_of_sharded_torchao_state_leaves_no_collective_in_flight(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "gather.py"
    script.write_text(_GATHER_SCRIPT)

    def rank_process(rank: int) -> subprocess.Popen:
        command = [sys.executable, str(script), str(rank), str(tmp_path / "store"), str(tmp_path / f"{rank}.pt")]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    procs = [rank_process(rank) for rank in (0, 1)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)[-4000:]
    assert not any("unwaited collective" in log for log in logs)
    r0, r1 = (torch.load(tmp_path / f"{rank}.pt", weights_only=False) for rank in (0, 1))
    for r in (r0, r1):
        # torchao's own gather leaves AsyncCollectiveTensor codes and scales inside the state; none are left here
        assert r["type"] == "OptimState4bit" and r["shape"] == (128, 128)
        assert r["pending"] == []
        # the rows of each rank's shard, in rank order: the quantised values, not a re-quantisation of them
        assert torch.equal(r["values"], torch.cat([r0["local"], r1["local"]]))
    assert r0["plain"] and r1["plain"]  # a plain tensor comes back as it is
