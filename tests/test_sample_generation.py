"""SampleGeneration: greedy completions after validation, equal to transformers' own greedy ``generate``, logged on
rank zero, and invisible to training (bit-identical weights with and without it), on one device, under DDP and sharded
(FSDP2), the distributed runs on two gloo processes (~20 s each)."""

from __future__ import annotations

import copy
import doctest
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from sample_generation_run import CONVERSATIONS, PROMPTS, ChatData
from torch.utils.data import DataLoader

import lightning_memopt.callbacks.sample_generation
from lightning_memopt import BlockSwitch, SampleGeneration
from lightning_memopt.callbacks.sample_generation import greedy_generate
from lightning_memopt.data import InstructionDataModule
from lightning_memopt.lm import CausalLM

SCRIPT = Path(__file__).parent / "sample_generation_run.py"
MAX_NEW = 10


class Snapshots(Callback):
    """The trained transformers model as it is at each validation, to decode independently."""

    def __init__(self) -> None:
        self.models: dict[int, torch.nn.Module] = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.models[trainer.global_step] = copy.deepcopy(pl_module.model)


class Trainable(Callback):
    """What BAdam trains, seen right after each validation (SampleGeneration must leave it alone)."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        strategy = trainer.strategy
        flags = tuple(n for n, p in pl_module.named_parameters() if p.requires_grad)
        groups = [[id(p) for p in g["params"]] for g in trainer.optimizers[0].param_groups]
        masters = [id(m) for m in strategy.master_params.values()]
        self.seen.append((strategy.active_block, flags, groups == [masters], pl_module.training))


def _instruction_data(root: Path, model_dir: Path | None, **kwargs) -> InstructionDataModule:
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in CONVERSATIONS))
    return InstructionDataModule(
        [str(path)],
        tokenizer=None if model_dir is None else str(model_dir),
        max_length=64,
        batch_size=2,
        val_fraction=0.25,
        cache_dir=str(root / "cache"),
        **kwargs,
    )


def _fit(root: Path, model_dir: Path, callbacks: list, **trainer_kwargs) -> tuple[CausalLM, L.Trainer]:
    """BAdam in bf16 on the real InstructionDataModule: 4 steps, validating (one batch) after steps 2 and 4."""
    L.seed_everything(0, verbose=False)
    module = CausalLM(model_path=str(model_dir), lr=1e-2)
    kwargs = dict(
        accelerator="cpu",
        strategy="badam",
        precision="bf16-true",
        max_steps=4,
        val_check_interval=2,
        check_val_every_n_epoch=None,  # count the 2 steps across epochs (3 batches each)
        limit_val_batches=1,
        num_sanity_val_steps=1,
        callbacks=[BlockSwitch(every=2), *callbacks],
        default_root_dir=root,
        logger=CSVLogger(root),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer = L.Trainer(**{**kwargs, **trainer_kwargs})
    trainer.fit(module, _instruction_data(root, model_dir))
    return module, trainer


@pytest.fixture(scope="module")
def generated_run(tmp_path_factory, model_dir):
    """A BAdam bf16 fit with SampleGeneration (validation at steps 2 and 4) and the records around it."""
    root = tmp_path_factory.mktemp("sampled")
    samples, snapshots, trainable = SampleGeneration(PROMPTS, max_new_tokens=MAX_NEW), Snapshots(), Trainable()
    handler = _Records()
    logging.getLogger("lightning_memopt").addHandler(handler)
    try:
        module, trainer = _fit(root, model_dir, [trainable, samples, snapshots])
    finally:
        logging.getLogger("lightning_memopt").removeHandler(handler)
    return module, trainer, samples, snapshots, trainable, handler.messages


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _hf_greedy(
    model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int, eos: list[int] | None = None
) -> list[int]:
    x = torch.tensor([prompt_ids])
    # use_cache=False: the KV-cached path sums in another order, and a near-tie of a barely trained model's logits
    # can then flip in bf16; both recompute the whole sequence per token here
    kwargs = {} if eos is None else {"eos_token_id": eos}
    out = model.eval().generate(
        x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens, use_cache=False, **kwargs
    )
    return out[0, len(prompt_ids) :].tolist()


def test_completions_equal_transformers_greedy_generate(generated_run, model_dir):
    _, trainer, samples, snapshots, _, _ = generated_run
    (log_dir,) = (Path(trainer.default_root_dir) / "lightning_logs").iterdir()
    records = [json.loads(line) for line in (log_dir / "samples.jsonl").read_text().splitlines()]
    # after each of the two validations of training, not after the sanity check
    assert [(r["step"], r["prompt"]) for r in records] == [(2, p) for p in PROMPTS] + [(4, p) for p in PROMPTS]
    assert samples.samples == records[2:]
    data = trainer.datamodule
    tokenizer = data.get_tokenizer()
    # a completion ends at the template's end of turn (what the data trains answers to end with) or at EOS
    stops = sorted({data.eos_token_id, tokenizer.eos_token_id})
    assert tokenizer.convert_ids_to_tokens(stops) == ["<|end_of_text|>", "<|im_end|>"]
    assert set(snapshots.models) == {2, 4}
    for record in records:
        prompt_ids = data.encode_prompt(record["prompt"])
        expected = _hf_greedy(snapshots.models[record["step"]], prompt_ids, MAX_NEW, eos=stops)
        assert record["tokens"] == expected
        assert record["stop"] == ("eos" if expected[-1] in stops else "max_new_tokens")
        text_ids = expected[:-1] if record["stop"] == "eos" else expected
        assert record["completion"] == data.decode(text_ids)
        assert set(record) == {"step", "prompt", "completion", "tokens", "stop"}


def test_the_samples_are_printed_once_per_validation(generated_run):
    *_, messages = generated_run
    blocks = [m for m in messages if m.startswith("SampleGeneration at step")]
    assert len(blocks) == 2
    lines = blocks[-1].splitlines()
    assert lines[0] == f"SampleGeneration at step 4 (greedy, up to {MAX_NEW} new tokens):"
    _, _, samples, *_ = generated_run
    assert lines[1:] == [f"  [{i}] {s['prompt']!r} -> {s['completion']!r}" for i, s in enumerate(samples.samples)]


def test_training_is_bit_identical_with_and_without_sample_generation(generated_run, model_dir, tmp_path):
    module, trainer, _, _, trainable, _ = generated_run
    plain_trainable = Trainable()
    plain, plain_trainer = _fit(tmp_path, model_dir, [plain_trainable])
    # the same block trained with the same masters and flags at every validation, and the module back in train mode
    assert trainable.seen == plain_trainable.seen
    assert [s[2] for s in trainable.seen] == [True, True]
    assert trainer.strategy.active_block == plain_trainer.strategy.active_block
    with_state, plain_state = module.state_dict(), plain.state_dict()
    assert with_state.keys() == plain_state.keys()
    for name in with_state:
        assert torch.equal(with_state[name], plain_state[name]), name
    pretrained = CausalLM(str(model_dir)).model
    assert any(not torch.equal(p, pretrained.get_parameter(n)) for n, p in plain.model.named_parameters())
    opt, plain_opt = trainer.optimizers[0].state_dict(), plain_trainer.optimizers[0].state_dict()
    assert opt["param_groups"] == plain_opt["param_groups"]
    for key in opt["state"]:
        for name, value in opt["state"][key].items():
            assert torch.equal(value, plain_opt["state"][key][name]), (key, name)


def test_generate_restores_every_modules_mode(generated_run):
    module, trainer, samples, *_ = generated_run
    module.train()
    module.model.model.layers[1].eval()  # a user's frozen-in-eval submodule stays in eval
    before = [m.training for m in module.modules()]
    grads = [p.requires_grad for p in module.parameters()]
    rng = torch.get_rng_state()
    again = samples.generate(trainer, module)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in module.modules()] == before
    assert [p.requires_grad for p in module.parameters()] == grads
    assert [s["tokens"] for s in again] == [s["tokens"] for s in samples.samples]  # same weights, same samples


def _validate(
    root: Path, model_dir: Path, samples: SampleGeneration, datamodule=None, module=None, **kwargs
) -> L.Trainer:
    module = CausalLM(model_path=str(model_dir)) if module is None else module
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-true",
        limit_val_batches=1,
        callbacks=[samples],
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        **{"logger": False, **kwargs},
    )
    if datamodule is None:
        trainer.validate(module, dataloaders=ChatData(str(model_dir)).val_dataloader(), verbose=False)
    else:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    return trainer


class TokenizerPathData(L.LightningDataModule):
    """Like TextDataModule: a ``tokenizer`` path in the hyper-parameters and nothing else."""

    def __init__(self, tokenizer: str) -> None:
        super().__init__()
        self.save_hyperparameters()

    def val_dataloader(self) -> DataLoader:
        return ChatData(self.hparams["tokenizer"]).val_dataloader()


class OnlyTokenizer(L.LightningDataModule):
    def __init__(self, model_dir: str) -> None:
        super().__init__()
        self.data = ChatData(model_dir)

    def get_tokenizer(self):
        return self.data.get_tokenizer()

    def val_dataloader(self) -> DataLoader:
        return self.data.val_dataloader()


@pytest.mark.parametrize("source", ["tokenizer=", "encode_prompt", "get_tokenizer", "tokenizer hyper-parameter"])
def test_every_prompt_source_renders_the_chat_template(tmp_path, model_dir, source):
    kwargs: dict = {}
    datamodule: L.LightningDataModule | None = None
    if source == "tokenizer=":
        kwargs["tokenizer"] = str(model_dir)
    elif source == "encode_prompt":
        datamodule = ChatData(str(model_dir))
    elif source == "get_tokenizer":
        datamodule = OnlyTokenizer(str(model_dir))
    else:
        datamodule = TokenizerPathData(str(model_dir))
    samples = SampleGeneration(PROMPTS[:1], max_new_tokens=4, **kwargs)
    trainer = _validate(tmp_path, model_dir, samples, datamodule)
    data = ChatData(str(model_dir))
    (sample,) = samples.samples
    expected = _hf_greedy(copy.deepcopy(trainer.lightning_module.model), data.encode_prompt(PROMPTS[0]), 4)
    assert sample["tokens"] == expected and sample["step"] == 0
    # no logger: samples.jsonl lands in default_root_dir
    assert json.loads((tmp_path / "samples.jsonl").read_text()) == sample


def test_plain_text_prompts_and_the_stop_token(tmp_path, model_dir):
    tokenizer = ChatData(str(model_dir)).get_tokenizer()
    prompt = "def main():"
    free = SampleGeneration([prompt], max_new_tokens=6, tokenizer=str(model_dir), chat=False, filename=None)
    trainer = _validate(tmp_path, model_dir, free)
    model = copy.deepcopy(trainer.lightning_module.model)
    tokens = free.samples[0]["tokens"]
    assert tokens == _hf_greedy(model, tokenizer(prompt)["input_ids"], 6)  # no chat template
    assert not (tmp_path / "samples.jsonl").exists()
    # the datamodule's end-of-sequence token ends a completion: make it the third greedy token
    chat = SampleGeneration([prompt], max_new_tokens=6)
    _validate(tmp_path, model_dir, chat, ChatData(str(model_dir)))
    tokens = chat.samples[0]["tokens"]
    stop = tokens[2]
    stopped = SampleGeneration([prompt], max_new_tokens=6)
    _validate(tmp_path, model_dir, stopped, ChatData(str(model_dir), eos_token_id=stop))
    (sample,) = stopped.samples
    assert sample["tokens"] == tokens[: tokens.index(stop) + 1] and sample["stop"] == "eos"
    assert sample["completion"] == tokenizer.decode(tokens[: tokens.index(stop)])


@pytest.mark.parametrize("tokenizer", ["model_dir", "bytes"])
def test_instruction_data_encodes_the_prompts_and_ends_them_at_its_end_of_turn(tmp_path, model_dir, tokenizer):
    """The real InstructionDataModule: chat template and end-of-turn marker, or byte-level (its plain template)."""
    data = _instruction_data(tmp_path, model_dir if tokenizer == "model_dir" else None)
    module = CausalLM(model_path=str(model_dir)) if tokenizer == "model_dir" else CausalLM(config={"hidden_size": 32})
    samples = SampleGeneration(PROMPTS, max_new_tokens=8)
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-true",
        limit_val_batches=1,
        callbacks=[samples],
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(module, datamodule=data, verbose=False)
    model = copy.deepcopy(module.model)
    hf_tokenizer = data.get_tokenizer()
    # where generation stops: the data's end of a response (<|im_end|> / the EOS byte), the tokenizer's and the model's
    stops = {data.eos_token_id, model.generation_config.eos_token_id}
    if hf_tokenizer is not None:
        assert data.eos_token_id == hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
        stops.add(hf_tokenizer.eos_token_id)
    for sample in samples.samples:
        prompt_ids = data.encode_prompt(sample["prompt"])
        if hf_tokenizer is None:
            assert bytes(prompt_ids).decode().endswith("### Assistant:\n")  # the plain template, in bytes
        assert sample["tokens"] == _hf_greedy(model, prompt_ids, 8, eos=sorted(stops))
        kept = sample["tokens"][:-1] if sample["stop"] == "eos" else sample["tokens"]
        assert sample["completion"] == data.decode(kept)


class TextLogger(Logger):
    """A logger as WandbLogger is for text (``log_text``), or as TensorBoard's (``experiment.add_text``)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.calls: list[tuple] = []
        if kind == "wandb":
            self.log_text = lambda **kwargs: self.calls.append(("log_text", kwargs))

    @property
    def name(self) -> str:
        return self.kind

    @property
    def version(self) -> int:
        return 0

    @property
    def experiment(self):
        calls = self.calls

        class Writer:
            def add_text(self, tag, text, global_step=None):
                calls.append(("add_text", tag, text, global_step))

        return Writer()

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


@pytest.mark.parametrize("kind", ["wandb", "tensorboard"])
def test_loggers_that_take_text_get_the_samples(tmp_path, model_dir, kind):
    logger = TextLogger(kind)
    samples = SampleGeneration(PROMPTS, max_new_tokens=3)
    _validate(tmp_path, model_dir, samples, ChatData(str(model_dir)), logger=logger)
    s = samples.samples
    if kind == "wandb":
        rows = [[0, x["prompt"], x["completion"]] for x in s]
        assert logger.calls == [
            ("log_text", {"key": "samples", "columns": ["step", "prompt", "completion"], "data": rows, "step": 0})
        ]
    else:
        assert logger.calls == [
            ("add_text", f"samples/{i}", f"**{x['prompt']}**\n\n```\n{x['completion']}\n```", 0)
            for i, x in enumerate(s)
        ]


def test_every_n_validations_and_its_state(tmp_path, model_dir):
    samples = SampleGeneration(PROMPTS[:1], max_new_tokens=2, every_n_validations=2)
    _fit(tmp_path, model_dir, [samples], max_steps=6)  # validations at steps 2, 4, 6
    (log_dir,) = (tmp_path / "lightning_logs").iterdir()
    steps = [json.loads(line)["step"] for line in (log_dir / "samples.jsonl").read_text().splitlines()]
    assert steps == [4]
    assert samples.state_dict() == {"validations": 3}
    restored = SampleGeneration(PROMPTS[:1], every_n_validations=2)
    restored.load_state_dict(samples.state_dict())
    assert restored.state_dict() == {"validations": 3}


class InputsSeen(CausalLM):
    """A CausalLM that keeps the token ids of every row it is given (SampleGeneration feeds one prompt at a time)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.inputs: list[list[int]] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        self.inputs.extend(input_ids.tolist())
        return super().forward(input_ids, attention_mask, position_ids)


@pytest.mark.parametrize("case", ["system_prompt", "plain template", "another tokenizer"])
def test_prompts_follow_the_data_modules_rendering_even_with_a_tokenizer(tmp_path, model_dir, case):
    """tokenizer= does not override InstructionDataModule's rendering (chat=True): its system prompt, and its plain
    template for a tokenizer without a chat template, are in the prompts as in the training data."""
    from pretrained import make_model_dir

    no_template = make_model_dir(tmp_path / "no_template", chat_template=False)
    base = no_template if case == "plain template" else model_dir
    system_prompt = "Answer in one word." if case == "system_prompt" else None
    data = _instruction_data(tmp_path, base, system_prompt=system_prompt)
    given = no_template if case == "another tokenizer" else base
    samples = SampleGeneration(PROMPTS, max_new_tokens=MAX_NEW, tokenizer=str(given), filename=None)
    module = InputsSeen(model_path=str(base))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _validate(tmp_path, base, samples, data, module)
        _validate(tmp_path, base, samples, data, module)  # a second run of the same callback: still one warning
    unused = [w for w in caught if "is not used: with chat=True" in str(w.message)]
    assert len(unused) == (case == "another tokenizer")
    if unused:
        assert f"InstructionDataModule.encode_prompt() (tokenizer={str(base)!r})" in str(unused[0].message)

    model = copy.deepcopy(trainer.lightning_module.model)
    tokenizer = data.get_tokenizer()
    stops = sorted({data.eos_token_id, tokenizer.eos_token_id, model.generation_config.eos_token_id})
    for sample in samples.samples:
        prompt_ids = data.encode_prompt(sample["prompt"])
        assert prompt_ids in module.inputs  # the model was given the prompt as the data module renders it
        text = tokenizer.decode(prompt_ids)
        if case == "system_prompt":
            assert text.count("Answer in one word.") == 1
        elif case == "plain template":
            assert text.startswith(tokenizer.bos_token) and text.endswith("### Assistant:\n")
        assert sample["tokens"] == _hf_greedy(model, prompt_ids, MAX_NEW, eos=stops)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompts": []}, r"prompts=...\) is empty"),
        ({"prompts": "Hi"}, "wrap a single prompt in a list"),
        ({"prompts": ["Hi", 3]}, r"prompts\[1\] must be a string, got int"),
        ({"max_new_tokens": 0}, r"max_new_tokens=...\) must be an int >= 1, got 0"),
        ({"max_new_tokens": True}, r"max_new_tokens=...\) must be an int >= 1, got True"),
        ({"every_n_validations": 0}, r"every_n_validations=...\) must be an int >= 1, got 0"),
        ({"chat": "yes"}, r"chat=...\) must be True or False"),
        ({"tokenizer": ""}, r"tokenizer=...\) must be a tokenizer directory or None"),
        ({"filename": "logs/samples.jsonl"}, "must be a plain file name"),
    ],
)
def test_arguments_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SampleGeneration(**{"prompts": ["Hi"], **kwargs})


def test_setup_errors_say_what_to_pass(tmp_path, model_dir):
    with pytest.raises(
        MisconfigurationException, match=r"The Trainer has no datamodule.*tokenizer='path/to/model_dir'"
    ):
        _validate(tmp_path, model_dir, SampleGeneration(["Hi"]))
    with pytest.raises(MisconfigurationException, match="Could not load a tokenizer from SampleGeneration"):
        _validate(tmp_path, model_dir, SampleGeneration(["Hi"], tokenizer=str(tmp_path / "missing")))
    with pytest.raises(MisconfigurationException, match=r"prompts\[1\] \(''\) encodes to no tokens"):
        _validate(tmp_path, model_dir, SampleGeneration(["Hi", ""], tokenizer=str(model_dir), chat=False))


def test_greedy_generate_stops_within_the_models_length():
    def count_up(ids):
        return torch.nn.functional.one_hot((ids + 1) % 8, 8).float()

    assert greedy_generate(count_up, [1, 2], max_new_tokens=5, max_length=3) == ([3], "max_length")
    assert greedy_generate(count_up, [1, 2, 3], max_new_tokens=5, max_length=3) == ([], "max_length")
    # a distributed caller's agreement (rank 0's token) decides what is fed back
    assert greedy_generate(count_up, [1], max_new_tokens=3, agree=lambda t: 6) == ([6, 6, 6], "max_new_tokens")
    with pytest.raises(TypeError, match="logits of shape"):
        greedy_generate(lambda ids: ids, [1], max_new_tokens=1)
    with pytest.raises(ValueError, match="at least one token"):
        greedy_generate(count_up, [], max_new_tokens=1)


@pytest.mark.parametrize("strategy", ["badam_fsdp", "badam_ddp"])
def test_distributed_badam_generates_on_every_rank_and_trains_the_same(tmp_path, model_dir, strategy):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--model-dir", str(model_dir), "--strategy", strategy],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # every rank ran the same forwards and holds the same samples; rank 0 alone wrote and printed them
    assert r0["samples"] == r1["samples"] and [s["step"] for s in r0["samples"]] == [4, 4]
    records = [json.loads(line) for line in (tmp_path / "with" / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 2, 4, 4] and records[2:] == r0["samples"]
    assert (proc.stdout + proc.stderr).count("SampleGeneration at step") == 2
    # training with the callback is bit-identical to training without it, on both ranks
    for rank in (r0, r1):
        assert rank["with"].keys() == rank["without"].keys()
        for name in rank["with"]:
            assert torch.equal(rank["with"][name], rank["without"][name]), name
    # and the samples equal transformers' greedy decoding with the trained (gathered) weights
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype="auto")
    assert model.dtype == torch.bfloat16  # as saved, with FP32 rotary frequencies, as CausalLM trains it
    model.load_state_dict({n.removeprefix("model."): t for n, t in r0["with"].items()}, strict=False)
    data = ChatData(str(model_dir))
    for sample in r0["samples"]:
        assert sample["tokens"] == _hf_greedy(model, data.encode_prompt(sample["prompt"]), 6)


def test_docstring_examples():
    result = doctest.testmod(lightning_memopt.callbacks.sample_generation, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
