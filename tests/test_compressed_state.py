"""GaLore (``galore-torch``), FLORA (``flora-opt``) and FOAM (``lightning_memopt.optim``) as the optimizer of a
plain Lightning run and inside BAdam.

Each method trains a tiny Llama end to end with a real ``Trainer``: under a plain strategy its trajectory equals the
same optimizer stepped by hand in a plain PyTorch loop, bit for bit; under ``badam`` only the active block moves. The
optimizer state ``MemoryReport`` accounts equals the prediction to the byte and is smaller than Adam's, and a run
checkpointed mid-way (a real file, loaded with torch's default ``weights_only=True``) and resumed ends bit-identical to
the uninterrupted run, GaLore's projector and FLORA's seeds included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from models import LlamaModule, token_loader, trainer_kwargs, weights

from lightning_memopt import AtomicCheckpointIO, BAdamStrategy, BlockSwitch, MemoryReport, low_rank_param_groups
from lightning_memopt.low_rank import compacts_projections, install_galore_shims
from lightning_memopt.optim import FOAM
from lightning_memopt.optimizers import galore_projection

galore_torch = pytest.importorskip("galore_torch")
flora_opt = pytest.importorskip("flora_opt")
install_galore_shims()  # what the strategies, the CLI and low_rank_param_groups do

RANK = 4
N, BATCH = 8, 4  # two batches per epoch: the checkpoint at step K is an epoch boundary
STEPS, K, EVERY = 8, 4, 3  # blocks 0 (steps 0-2), 1 (3-5), 0 (6-7); K is in the middle of block 1

Factory = Callable[[torch.nn.Module], torch.optim.Optimizer]
METHODS: dict[str, Factory] = {
    # gap 3: the projection is recomputed at step 3 and 6, across the checkpoint
    "galore_adamw": lambda m: galore_torch.GaLoreAdamW(
        low_rank_param_groups(m, rank=RANK, update_proj_gap=3), lr=3e-3, weight_decay=0.01, no_deprecation_warning=True
    ),
    # 8-bit moments from 128 values: the projected 32 x 4 matrices' are quantised
    "galore_adamw8bit": lambda m: galore_torch.GaLoreAdamW8bit(
        low_rank_param_groups(m, rank=RANK, update_proj_gap=3), lr=3e-3, weight_decay=0.01, min_8bit_size=128
    ),
    "galore_adafactor": lambda m: galore_torch.GaLoreAdafactor(
        low_rank_param_groups(m, rank=RANK, update_proj_gap=3, proj_type="full"),
        lr=3e-3,
        beta1=0.9,
        relative_step=False,
        scale_parameter=False,
    ),
    # moments per block of 8 along each row (a quarter of hidden 32); the 1-D norms keep Adam's full moments
    "foam": lambda m: FOAM(m.parameters(), lr=3e-3, fold_level=3, scale=0.5, weight_decay=0.01),
    # beta1 and rank: the momentum is kept compressed; kappa 3: the projection's seed moves on across the checkpoint
    "flora": lambda m: flora_opt.Flora(m.parameters(), lr=3e-3, rank=RANK, beta1=0.9, kappa=3),
}

torchao_optim = pytest.importorskip("torchao.optim")
# torchao quantises tensors of >= 4096 values: width 64 gives 64 x 64 and 64 x 128 matrices (compiled once per shape,
# ~10 s each on first use, which is why torchao has one entry here)
METHODS["torchao_adamw4bit"] = lambda m: torchao_optim.AdamW4bit(m.parameters(), lr=3e-3, weight_decay=0.01)
WIDE = {"torchao_adamw4bit"}


class CompressedModule(LlamaModule):
    def __init__(self, method: str, hidden: int = 32) -> None:
        super().__init__(num_layers=2, hidden=hidden, n=N, batch_size=BATCH)
        self.method = method

    def configure_optimizers(self):
        return METHODS[self.method](self)


class Recorder(Callback):
    """Mid-run memory (accounted and predicted) and, at the first step, the optimizer state of the active tensors."""

    def __init__(self) -> None:
        self.memory: list[tuple[Any, Any, int]] = []
        self.first_state: dict[str, dict[str, Any]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            strategy = trainer.strategy
            masters = getattr(strategy, "master_params", None) or dict(pl_module.named_parameters())
            state = trainer.optimizers[0].state
            self.first_state = {n: dict(state[m]) for n, m in masters.items() if m in state}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in (2, 5):  # mid-block, after the state exists
            trained = sum(p.numel() for g in trainer.optimizers[0].param_groups for p in g["params"])
            accounted, predicted = MemoryReport(filename=None, count_other=False).measure(trainer, pl_module)
            self.memory.append((accounted, predicted, trained))


def _fit(root, method: str, badam: bool, steps: int, ckpt_path=None, save_at: int | None = None, **options):
    module = CompressedModule(method, hidden=64 if method in WIDE else 32)
    recorder = Recorder()
    callbacks: list[Callback] = [recorder]
    if badam:
        callbacks.insert(0, BlockSwitch(every=EVERY))
    if save_at is not None:
        callbacks.append(ModelCheckpoint(root, filename="{step}", every_n_train_steps=save_at, save_top_k=-1))
    trainer = pl.Trainer(
        strategy=BAdamStrategy(**options) if badam else "auto",
        # the BAdam strategies use it anyway; a plain strategy needs it to resume torchao's tensor-subclass state
        plugins=None if badam else [AtomicCheckpointIO()],
        precision="bf16-true" if badam else "32-true",
        max_steps=steps,
        callbacks=callbacks,
        **trainer_kwargs(root, enable_checkpointing=save_at is not None),
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    assert trainer.global_step == steps
    return module, trainer, recorder


def _hand_loop(method: str, steps: int) -> dict[str, torch.Tensor]:
    """The same optimizer stepped by hand: forward, backward, step, zero_grad, over the same batches."""
    module = CompressedModule(method, hidden=64 if method in WIDE else 32)
    optimizer = METHODS[method](module)
    done = 0
    while done < steps:
        for (x,) in token_loader(n=N, batch_size=BATCH):
            module.model(input_ids=x, labels=x).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            if done == steps:
                break
    return weights(module)


_RUNS: dict[tuple[str, bool], Any] = {}


def _reference(tmp_path_factory, method: str, badam: bool):
    key = (method, badam)
    if key not in _RUNS:
        _RUNS[key] = _fit(tmp_path_factory.mktemp("reference"), method, badam, STEPS)
    return _RUNS[key]


def _state_tensors(state: Any) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor) and type(state) is not torch.Tensor:  # torchao's quantised state
        return [t for name in state.__tensor_flatten__()[0] for t in _state_tensors(getattr(state, name))]
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for k in sorted(state, key=str) for t in _state_tensors(state[k])]
    if isinstance(state, list | tuple):
        return [t for v in state for t in _state_tensors(v)]
    if hasattr(state, "__dict__"):
        return _state_tensors(vars(state))
    return []


@pytest.mark.parametrize("badam", [False, True], ids=["plain", "badam"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_trains_accounts_and_resumes_exactly(tmp_path_factory, tmp_path, method, badam):
    initial = weights(CompressedModule(method, hidden=64 if method in WIDE else 32))
    module, trainer, recorder = _reference(tmp_path_factory, method, badam)
    final = weights(module)
    moved = {n for n in final if not torch.equal(final[n], initial[n].to(final[n].dtype))}
    if badam:
        # two layers trained in turn; embedding, final norm and head are not in a block (a norm's small steps may
        # round away in its bf16 weight, its master moved)
        layers = {n for n in final if n.startswith("model.model.layers.")}
        assert {n for n in layers if final[n].dim() == 2} <= moved <= layers
    else:
        # the plain strategy is the optimizer stepped by hand, bit for bit
        reference = _hand_loop(method, STEPS)
        assert all(torch.equal(final[n], reference[n]) for n in final)
        assert moved == set(final)
    change = max((final[n].float() - initial[n].to(final[n].dtype).float()).abs().max().item() for n in moved)
    assert 1e-3 < change < 0.2  # lr 3e-3 over 8 steps: a few steps' worth, not a blow-up

    assert len(recorder.memory) == 2
    for accounted, predicted, trained in recorder.memory:
        assert accounted.optimizer_state == predicted.optimizer_state > 0
        assert accounted.total == predicted.total
        assert accounted.optimizer_state < 8 * trained  # less than Adam's two FP32 moments

    # interrupted at K (a real checkpoint file, read with weights_only=True as Lightning does), then resumed
    root = tmp_path / "interrupted"
    _fit(root, method, badam, K, save_at=K)
    path = root / f"step={K}.ckpt"
    saved = torch.load(path, weights_only=True)["optimizer_states"][0]["state"]
    assert saved, "the checkpoint holds no optimizer state"
    if method.startswith("galore"):
        assert any("projector" in s for s in saved.values())
    resumed, resumed_trainer, _ = _fit(tmp_path / "resumed", method, badam, STEPS, ckpt_path=str(path))
    after = weights(resumed)
    differ = [n for n in final if not torch.equal(final[n], after[n])]
    assert not differ, f"{len(differ)} parameters differ after resume, e.g. {differ[:3]}"
    a, b = (t.optimizers[0].state_dict()["state"] for t in (trainer, resumed_trainer))
    assert len(a) == len(b) and all(
        torch.equal(x, y) for i in a for x, y in zip(_state_tensors(a[i]), _state_tensors(b[i]), strict=True)
    )


def test_flora_masters_get_the_seeds_flora_gave_their_parameters(tmp_path_factory):
    # flora-opt seeds each parameter's random projection at construction (1, 2, ... in group order); BAdam's masters
    # are new tensors, and without their seed FLORA's compressed momentum fails (KeyError: 'seed')
    module, trainer, recorder = _reference(tmp_path_factory, "flora", badam=True)
    order = [n for n, _ in module.named_parameters()]
    block = trainer.strategy.blocks[0].param_names
    assert set(recorder.first_state) == set(block)
    assert {n: s["seed"] for n, s in recorder.first_state.items()} == {n: order.index(n) + 1 for n in block}


# ------------------------------------------------------------------------------------------------ param groups
def test_low_rank_param_groups_project_the_layers_matrices_only():
    module = CompressedModule("galore_adamw")
    groups = low_rank_param_groups(module, rank=8, update_proj_gap=50, scale=0.5)
    names = {id(p): n for n, p in module.named_parameters()}
    plain, projected = ({names[id(p)] for p in g["params"]} for g in groups)
    linears = [f"self_attn.{x}_proj" for x in "qkvo"] + [f"mlp.{x}_proj" for x in ("gate", "up", "down")]
    layer_linears = {f"model.model.layers.{i}.{m}.weight" for i in range(2) for m in linears}
    assert projected == layer_linears
    assert plain == set(names.values()) - layer_linears
    assert {k: v for k, v in groups[1].items() if k != "params"} == {
        "rank": 8,
        "update_proj_gap": 50,
        "scale": 0.5,
        "proj_type": "std",
    }
    only_mlp = low_rank_param_groups(module, target_modules=[r"mlp\.(up|down)_proj"])
    assert {names[id(p)] for p in only_mlp[1]["params"]} == {
        f"model.model.layers.{i}.mlp.{m}_proj.weight" for i in range(2) for m in ("up", "down")
    }
    assert compacts_projections()  # building the groups installs the shims


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank=...) must be a whole number >= 1"),
        ({"update_proj_gap": 0}, "update_proj_gap=...) must be a number of steps >= 1"),
        ({"scale": -1.0}, "scale=...) must be a number > 0"),
        ({"proj_type": "sideways"}, "proj_type=...) must be one of 'std'"),
        ({"target_modules": "mlp"}, "Write target_modules=['mlp']"),
        ({"target_modules": ["nothing_like_this"]}, "matches no module with a matrix"),
    ],
)
def test_low_rank_param_groups_refuse_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        low_rank_param_groups(CompressedModule("galore_adamw"), **kwargs)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])
def test_galore_state_is_at_the_projected_shape(shape, proj_type):
    weight = torch.nn.Parameter(torch.randn(shape))
    group = {"params": [weight], "rank": RANK, "update_proj_gap": 10, "scale": 0.25, "proj_type": proj_type}
    optimizer = galore_torch.GaLoreAdamW([group], lr=1e-3, no_deprecation_warning=True)
    weight.grad = torch.randn(shape)
    optimizer.step()
    state = optimizer.state[weight]
    low, projection_numel = galore_projection(shape, group)
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == low
    matrices = state["projector"].ortho_matrix
    matrices = matrices if isinstance(matrices, list) else [matrices]
    assert sum(m.numel() for m in matrices) == projection_numel
    # compacted by the shim: each projection owns storage of its own size, not the SVD factor's
    assert all(m.untyped_storage().nbytes() == 4 * m.numel() for m in matrices)


def test_galore_adamw8bit_steps_on_the_cpu_as_bitsandbytes_does_on_the_projected_gradient():
    """galore-torch's AdamW8bit against its own pieces composed by hand: GaLore's projector and bitsandbytes'
    AdamW8bit (keyword arguments) on the projected gradient, then the projection back and the decoupled decay."""
    import bitsandbytes as bnb
    from galore_torch.galore_projector import GaLoreProjector

    torch.manual_seed(0)
    lr, wd, rank, gap = 1e-2, 0.1, 8, 2
    layer = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.Linear(32, 64)])})
    weight, bias = layer["layers"][0].weight, layer["layers"][0].bias
    groups = low_rank_param_groups(layer, rank=rank, update_proj_gap=gap)
    assert groups[1]["params"] == [weight] and groups[0]["params"] == [bias]
    # 8-bit state from 128 values: the projected 64 x 8 moments and the bias's 64 are both quantised
    optimizer = galore_torch.GaLoreAdamW8bit(groups, lr=lr, weight_decay=wd, min_8bit_size=32)
    # what bitsandbytes' kernels are given (its CPU kernels ignore skip_zeros, so the trajectory alone cannot tell)
    config = optimizer.get_config(1, 0, groups[1])
    assert config["max_unorm"] == 0.0 and config["skip_zeros"] is False

    initial = weight.detach().clone()
    ref_weight, ref_bias = weight.detach().clone(), torch.nn.Parameter(bias.detach().clone())
    projector = GaLoreProjector(rank, update_proj_gap=gap, scale=groups[1]["scale"], proj_type="std")
    low = torch.nn.Parameter(torch.zeros(64, rank))
    reference = bnb.optim.AdamW8bit(
        [{"params": [ref_bias]}, {"params": [low], "weight_decay": 0.0}], lr=lr, weight_decay=wd, min_8bit_size=32
    )
    for step in range(5):
        grad_w, grad_b = torch.randn(64, 32), torch.randn(64)
        grad_b[::3] = 0.0  # exact zeros, which CUDA's kernels skip under skip_zeros=True (the misplaced block_wise)
        weight.grad, bias.grad = grad_w.clone(), grad_b.clone()
        optimizer.step()

        low.data.zero_()
        low.grad = projector.project(grad_w, step)
        ref_bias.grad = grad_b.clone()
        reference.step()
        ref_weight = ref_weight + projector.project_back(low.data)
        ref_weight.add_(ref_weight, alpha=-lr * wd)
        assert torch.equal(weight.detach(), ref_weight), step
        assert torch.equal(bias.detach(), ref_bias.detach()), step
    assert optimizer.state[weight]["state1"].dtype == torch.uint8  # the moments really are 8-bit codes
    assert (weight.detach() - initial).abs().max() > 1e-3  # five steps of lr 1e-2 moved it


def test_galore_adamw8bit_refuses_options_bitsandbytes_no_longer_has():
    layer = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.Linear(16, 16)])})
    for options in ({"percentile_clipping": 5}, {"block_wise": False}):
        with pytest.raises(ValueError, match=r"bitsandbytes 0\.50 and newer have no percentile clipping"):
            galore_torch.GaLoreAdamW8bit(low_rank_param_groups(layer, rank=4), lr=1e-3, **options)


@pytest.mark.parametrize("method", ["galore_adamw", "flora"])
def test_sharded_badam_refuses_whole_matrix_rules(tmp_path, method):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_memopt import BAdamFSDPStrategy

    trainer = pl.Trainer(strategy=BAdamFSDPStrategy(), precision="bf16-true", max_steps=1, **trainer_kwargs(tmp_path))
    with pytest.raises(MisconfigurationException, match=r"shards every master, but .* whole matrix"):
        trainer.fit(CompressedModule(method))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_badam_with_the_update_in_backward_takes_the_same_steps(tmp_path_factory, tmp_path, method):
    # each master is stepped alone as its gradient arrives: the same step for these per-tensor rules, and no
    # gradient is held afterwards
    module, _, _ = _reference(tmp_path_factory, method, badam=True)
    fused, _, recorder = _fit(tmp_path, method, badam=True, steps=STEPS, fused_update=True)
    expected, actual = weights(module), weights(fused)
    assert all(torch.equal(expected[n], actual[n]) for n in expected)
    for accounted, predicted, _ in recorder.memory:
        assert accounted.grads == predicted.grads == 0
        assert accounted.optimizer_state == predicted.optimizer_state


@pytest.mark.xdist_group("ddp")
@pytest.mark.parametrize("optimizer", ["galore", "flora", "foam", "adamw4bit"])
def test_badam_ddp_ranks_stay_identical(tmp_path, optimizer):
    from test_ddp import assert_same, launch

    # two gloo processes, 4 blocks visited in random order, the projection renewed every 2 steps; torchao quantises
    # tensors of >= 4096 values only, so its run is 64 wide
    hidden = 64 if optimizer == "adamw4bit" else 32
    r0, r1 = launch(
        tmp_path, "--optimizer", optimizer, "--layers", "4", "--every", "2", "--steps", "6", "--lr", "3e-3",
        "--hidden", str(hidden),
    )  # fmt: skip
    assert r0["world_size"] == 2 and r0["blocks"] == r1["blocks"]
    assert_same(r0["weights"], r1["weights"])
    assert_same(r0["masters"], r1["masters"])
    initial = weights(LlamaModule(num_layers=4, hidden=hidden))
    moved = [n for n, w in r0["weights"].items() if not torch.equal(w, initial[n].to(w.dtype))]
    assert {n.split(".")[3] for n in moved} == {str(b) for b in r0["blocks"]}  # every visited layer, nothing else
    assert r0["state"] and all(r0["state"][i].keys() == r1["state"][i].keys() for i in r0["state"])
    for i in r0["state"]:
        assert_same(r0["state"][i], r1["state"][i])


@pytest.mark.xdist_group("ddp")
@pytest.mark.parametrize("optimizer", ["foam", "adamw4bit"])
def test_badam_fsdp_steps_as_one_device_does(tmp_path, optimizer):
    from test_ddp import assert_same, launch

    # FOAM folds rows and FSDP2 shards rows, so each rank steps its own rows exactly. torchao quantises a tensor of
    # >= 4096 values and decides on the local shard, hence 128 wide: 64 x 128 rows per rank, quantised on both sides
    hidden = "128" if optimizer == "adamw4bit" else "32"
    common = ["--optimizer", optimizer, "--layers", "4", "--every", "2", "--steps", "6", "--lr", "3e-3"]
    common += ["--hidden", hidden, "--precision", "32-true", "--order", "random"]
    r0, r1 = launch(tmp_path / "fsdp", "--strategy", "badam_fsdp", "--batch-size", "2", *common)
    (single,) = launch(tmp_path / "single", "--devices", "1", "--batch-size", "4", *common)
    assert r0["world_size"] == 2 and r0["blocks"] == r1["blocks"] == single["blocks"]
    assert_same(r0["weights"], r1["weights"])
    assert_same(r0["masters"], r1["masters"])
    initial = weights(LlamaModule(num_layers=4, hidden=int(hidden)))
    moved = [n for n, w in r0["weights"].items() if not torch.equal(w, initial[n].to(w.dtype))]
    assert {n.split(".")[3] for n in moved} == {str(b) for b in r0["blocks"]}
    diffs = torch.cat([(r0["weights"][n] - single["weights"][n]).abs().flatten() for n in single["weights"]])
    if optimizer == "foam":
        assert diffs.max() < 1e-6  # the gradients' reduction order only; one step moves weights by ~3e-3
        for i, state in r0["state"].items():  # the consolidated moments: the full folded shape, as on one device
            for key in ("exp_avg", "exp_avg_sq"):
                assert state[key].shape == single["state"][i][key].shape
                torch.testing.assert_close(state[key], single["state"][i][key], rtol=1e-4, atol=1e-9)
    else:
        # 4-bit state rounds the reduction-order noise into a few different quantisation levels: a handful of
        # elements differ (a shard-wise decision to keep 32-bit state, say, would change ~30% of them)
        assert (diffs > 1e-4).float().mean() < 1e-3


@pytest.mark.xdist_group("ddp")
def test_badam_fsdp_resumes_foam_exactly(tmp_path):
    from test_ddp import assert_same, launch

    common = ["--strategy", "badam_fsdp", "--optimizer", "foam", "--order", "random", "--every", "3", "--layers", "3"]
    common += ["--n", "16", "--lr", "3e-3"]
    full = launch(tmp_path / "full", *common, "--steps", "8")
    ckpt = tmp_path / "half.ckpt"
    launch(tmp_path / "first", *common, "--steps", "4", "--ckpt-out", str(ckpt))
    resumed = launch(tmp_path / "resumed", *common, "--steps", "8", "--ckpt-in", str(ckpt))
    for a, b in zip(full, resumed, strict=True):
        assert_same(a["weights"], b["weights"])
        assert_same(a["masters"], b["masters"])
        for i in a["state"]:
            assert_same(a["state"][i], b["state"][i])


def test_foam_refuses_a_tensor_sharded_along_its_rows(tmp_path):
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import torch, torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        from lightning_memopt.optim import FOAM

        dist.init_process_group("gloo", init_method="file://{tmp_path / "store"}", rank=0, world_size=1)
        mesh = init_device_mesh("cpu", (1,))
        w = torch.nn.Parameter(distribute_tensor(torch.ones(4, 8), mesh, [Shard(1)]))
        w.grad = distribute_tensor(torch.ones(4, 8), mesh, [Shard(1)])
        try:
            FOAM([w], fold_level=1).step()
        except ValueError as error:
            print(error)
        dist.destroy_process_group()
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sharded along its rows' dimension" in proc.stdout and "fold_level=None" in proc.stdout


def test_galore_projector_is_stashed_with_the_state_and_resumes(tmp_path):
    # keep_optimizer_state: block 0's moments and projector are stashed at the switch (step 3), written into the
    # checkpoint at step 4, and back in use at step 6
    reference, _, _ = _fit(tmp_path / "reference", "galore_adamw", True, STEPS, keep_optimizer_state=True)
    _fit(tmp_path / "interrupted", "galore_adamw", True, K, save_at=K, keep_optimizer_state=True)
    path = tmp_path / "interrupted" / f"step={K}.ckpt"
    stash = torch.load(path, weights_only=True)["optimizer_states"][0]["badam"]["stash"]
    projected = [s for s in stash.values() if "projector" in s]
    assert projected and all(s["exp_avg"].shape[-1] == RANK or s["exp_avg"].shape[0] == RANK for s in projected)
    resumed, _, _ = _fit(
        tmp_path / "resumed", "galore_adamw", True, STEPS, ckpt_path=str(path), keep_optimizer_state=True
    )
    expected, actual = weights(reference), weights(resumed)
    assert all(torch.equal(expected[n], actual[n]) for n in expected)
