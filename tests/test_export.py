"""Results usable anywhere: BAdam checkpoints without this package, and `lightning-memopt export` to Hugging Face and
safetensors, loaded back offline with the same weights, logits and tokenizer.

One tiny CausalLM (tied embeddings) is trained once through the CLI, BAdam in bf16; most export tests read its
checkpoint. Another, loaded from a pretrained directory with its tokenizer (untied head, the ``model_dir`` fixture),
is fine-tuned by a plain Trainer for the tokenizer tests, once on instruction data with the plain template, and once
under ``badam_fsdp`` on two gloo processes. Every exported model is compared with the trained LightningModule itself
(for FSDP: the outputs its ranks recorded at the end of fit): bit-identical logits, and transformers' greedy
``generate`` equal to a greedy decode of the module.
"""

from __future__ import annotations

import copy
import doctest
import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.demos.boring_classes import BoringModel
from models import LlamaModule, trainer_kwargs

import lightning_memopt.export
from lightning_memopt import BAdamStrategy, BlockSwitch
from lightning_memopt.callbacks.sample_generation import greedy_generate
from lightning_memopt.cli import MemoptCLI, main
from lightning_memopt.data import InstructionDataModule, TextDataModule
from lightning_memopt.export import TOKENIZER_FILES
from lightning_memopt.instruct import render_plain
from lightning_memopt.lm import CausalLM

MODEL_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "tie_word_embeddings": True}
TESTS = Path(__file__).parent
NO_PACK_SCRIPT = TESTS / "load_without_pack.py"
DOCS = Path(__file__).parents[1] / "docs"


def _cli_config(root: Path) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "strategy": "badam",
            "precision": "bf16-true",
            "max_steps": 3,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(root),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root)}},
            "callbacks": [{"class_path": "lightning_memopt.BlockSwitch", "init_args": {"every": 1}}],
        },
        "model": {"class_path": "lightning_memopt.lm.CausalLM", "init_args": {"config": MODEL_CONFIG}},
        "data": {
            "class_path": "lightning_memopt.data.TextDataModule",
            "init_args": {"seq_len": 32, "batch_size": 4, "max_bytes": 20000, "val_fraction": 0.1},
        },
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
    }


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """(trained LightningModule, its checkpoint, the run's config.yaml): a LightningCLI run as users make them."""
    root = tmp_path_factory.mktemp("cli_run")
    config = root / "recipe.yaml"
    config.write_text(yaml.safe_dump(_cli_config(root)))
    cli = MemoptCLI(args=["--config", str(config)], run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    (checkpoint,) = (root / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt")
    saved_config = root / "lightning_logs" / "version_0" / "config.yaml"
    assert saved_config.is_file()
    return cli.model, checkpoint, saved_config


def _greedy(loaded, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy ``generate``: the new tokens, up to the model's EOS."""
    ids = torch.tensor([prompt])
    # use_cache=False: the KV-cached path sums in another order, which can flip a near-tie in bf16; without the cache
    # generate recomputes the whole sequence for each token, as greedy_generate does
    out = loaded.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens, use_cache=False
    )
    return out[0, len(prompt) :].tolist()


def _eos_ids(loaded) -> list[int]:
    eos = loaded.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def _assert_computes_as(loaded, module: CausalLM, x: torch.Tensor, prompt: list[int], max_new_tokens: int = 8) -> None:
    """The exported model is the trained LightningModule: bit-identical logits on ``x``, and its greedy ``generate``
    continues ``prompt`` exactly as a greedy decode with the module does."""
    module.eval()
    with torch.no_grad():
        logits = loaded(input_ids=x).logits
        assert logits.dtype == next(module.parameters()).dtype
        assert torch.equal(logits, module(x))
    expected, _ = greedy_generate(module, prompt, max_new_tokens, stop_token_ids=_eos_ids(loaded))
    assert _greedy(loaded, prompt, max_new_tokens) == expected


def _tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def _without_class_path(checkpoint: Path, target: Path) -> Path:
    """The checkpoint as a plain Trainer run writes it: hyper-parameters, but no LightningCLI `_class_path`."""
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["hyper_parameters"] = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, target)
    return target


def test_cli_run_exports_a_transformers_model_that_loads_offline(cli_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    module, checkpoint, _ = cli_run
    out = tmp_path / "hf"
    with _info_messages() as messages:
        main(["export", str(checkpoint), str(out)])  # format auto: CausalLM wraps a transformers model
    assert capsys.readouterr().out.strip() == str(out)
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    # a byte-level model built from a config has no tokenizer to write, and the export says how to add one
    assert not any((out / name).exists() for name in TOKENIZER_FILES)
    assert any("no tokenizer written" in m and "--tokenizer DIR" in m for m in messages)

    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert loaded.dtype == torch.bfloat16  # as trained (bf16-true)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied again
    trained = dict(module.model.named_parameters())
    assert set(dict(loaded.named_parameters())) == set(trained)
    for name, param in loaded.named_parameters():
        assert torch.equal(param, trained[name]), name
    _assert_computes_as(loaded, module, _tokens(), _tokens()[0, :12].tolist())


@pytest.mark.parametrize("source", ["--module", "--config", "config.yaml next to the run"])
def test_the_module_class_comes_from_options_or_the_runs_config(cli_run, tmp_path, source):
    from transformers import AutoModelForCausalLM

    module, checkpoint, saved_config = cli_run
    args: list[str] = []
    if source == "config.yaml next to the run":
        # a copy of the run's layout: version_0/{config.yaml, checkpoints/x.ckpt}
        shutil.copy(saved_config, tmp_path / "config.yaml")
        ckpt = _without_class_path(checkpoint, tmp_path / "checkpoints" / "x.ckpt")
    else:
        ckpt = _without_class_path(checkpoint, tmp_path / "x.ckpt")
        args = ["--module", "lightning_memopt.lm.CausalLM"] if source == "--module" else ["--config", str(saved_config)]
    out = tmp_path / "out"
    main(["export", str(ckpt), str(out), "--format", "hf", "--dtype", "float32", *args])
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert loaded.dtype == torch.float32
    trained = dict(module.model.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(param, trained[name].float()), name
    # bf16 weights widened to FP32 exactly: the FP32 export computes what the trained module computes in FP32
    _assert_computes_as(loaded, copy.deepcopy(module).float(), _tokens(), _tokens()[0, :12].tolist())


def test_safetensors_export_holds_the_modules_state_dict(cli_run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    module, checkpoint, _ = cli_run
    out = tmp_path / "st"
    main(["export", str(checkpoint), str(out), "--format", "safetensors"])
    path = out / "model.safetensors"
    tensors = load_file(path)
    expected = module.state_dict()
    assert set(tensors) == set(expected)
    for name, tensor in tensors.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, expected[name]), name
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["shared"]) == {"model.lm_head.weight": "model.model.embed_tokens.weight"}
    assert metadata["global_step"] == "3"

    # anyone can rebuild the module and load the file strictly, without Lightning's checkpoint machinery
    fresh = CausalLM(config=MODEL_CONFIG)
    fresh.load_state_dict(tensors, strict=True)
    fresh.to(torch.bfloat16)  # what bf16-true did to the trained module (CausalLM keeps its rotary frequencies FP32)
    with torch.no_grad():
        assert torch.equal(fresh(_tokens()), module(_tokens()))


@pytest.fixture(scope="module")
def plain_module_checkpoint(tmp_path_factory):
    """A BAdam checkpoint of a LightningModule that saves no hyper-parameters (tests/models.py)."""
    root = tmp_path_factory.mktemp("plain")
    module = LlamaModule(num_layers=2, hidden=16, n=8)
    trainer = L.Trainer(
        strategy=BAdamStrategy(),
        precision="bf16-true",
        max_steps=3,
        callbacks=[BlockSwitch(every=1, order="ascending")],
        **trainer_kwargs(root),
    )
    trainer.fit(module)
    path = root / "badam.ckpt"
    trainer.save_checkpoint(path)
    return module, path


def test_a_badam_checkpoint_loads_where_the_pack_is_not_installed(plain_module_checkpoint):
    module, path = plain_module_checkpoint
    assert "badam" in torch.load(path, weights_only=True)["optimizer_states"][0]  # a real BAdam checkpoint
    result = subprocess.run(
        [sys.executable, str(NO_PACK_SCRIPT), str(path), "2", "16"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])

    class ValidatedLlama(LlamaModule):
        def validation_step(self, batch, batch_idx):
            (x,) = batch
            self.log("val_loss", self.model(input_ids=x, labels=x).loss)

    from models import token_loader

    # the trained module itself, validated here, scores exactly what the bare environment computed from the file
    trained = ValidatedLlama(num_layers=2, hidden=16)
    trained.load_state_dict(module.state_dict(), strict=True)
    expected = L.Trainer(precision="bf16-true", **trainer_kwargs(path.parent)).validate(
        trained, dataloaders=token_loader(n=8, seed=1), verbose=False
    )[0]["val_loss"]
    assert got["val_loss"] == got["from_file"] == expected
    assert got["steps"] == 2 and got["moved"] > 0


def test_plain_checkpoint_exports_safetensors_unless_asked_for_hf(plain_module_checkpoint, tmp_path, capsys):
    module, path = plain_module_checkpoint
    main(["export", str(path), str(tmp_path / "auto")])  # nothing names the class: the state_dict alone
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "auto" / "model.safetensors")
    assert {n: t.dtype for n, t in tensors.items()} == {n: torch.bfloat16 for n in module.state_dict()}
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(path), str(tmp_path / "hf"), "--format", "hf"])
    assert exit_info.value.code == 2
    assert "pass --module package.ModuleClass" in capsys.readouterr().err


def _wrong_layers_config(tmp_path: Path, saved_config: Path) -> Path:
    config = yaml.safe_load(saved_config.read_text())
    config["model"]["init_args"]["config"] = {**MODEL_CONFIG, "num_hidden_layers": 3}
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing file", "No checkpoint file at"),
        ("not a Lightning checkpoint", "holds no 'state_dict'"),
        ("not a LightningModule", "'torch.nn.Linear' is not a LightningModule subclass"),
        ("class not importable", "Cannot import the module class 'no_such_package.Model'"),
        ("another model's weights", "do not fit lightning_memopt.lm.CausalLM"),
        ("no transformers model", "BoringModel holds no transformers PreTrainedModel"),
        ("unknown dtype", "invalid choice: 'int8'"),
        ("no tokenizer directory", "No tokenizer directory at"),
        ("not a tokenizer", "Could not load a tokenizer from"),
        ("both tokenizer options", "argument --no-tokenizer: not allowed with argument --tokenizer"),
    ],
)
def test_export_errors_say_what_to_pass(cli_run, tmp_path, capsys, case, message):
    _, checkpoint, saved_config = cli_run
    args = [str(checkpoint), str(tmp_path / "out")]
    if case == "missing file":
        args[0] = str(tmp_path / "nothing.ckpt")
    elif case == "not a Lightning checkpoint":
        torch.save({"weights": torch.ones(2)}, tmp_path / "plain.pt")
        args[0] = str(tmp_path / "plain.pt")
    elif case == "not a LightningModule":
        args += ["--module", "torch.nn.Linear"]
    elif case == "class not importable":
        args += ["--module", "no_such_package.Model"]
    elif case == "another model's weights":
        args += ["--config", str(_wrong_layers_config(tmp_path, saved_config))]
    elif case == "no transformers model":
        torch.save({"state_dict": BoringModel().state_dict()}, tmp_path / "boring.ckpt")
        boring = "lightning.pytorch.demos.boring_classes.BoringModel"
        args = [str(tmp_path / "boring.ckpt"), args[1], "--format", "hf", "--module", boring]
    elif case == "no tokenizer directory":
        args += ["--tokenizer", str(tmp_path / "no_such_dir")]
    elif case == "not a tokenizer":
        (tmp_path / "empty").mkdir()
        args += ["--tokenizer", str(tmp_path / "empty")]
    elif case == "both tokenizer options":
        args += ["--tokenizer", str(tmp_path), "--no-tokenizer"]
    else:
        args += ["--dtype", "int8"]
    with pytest.raises(SystemExit) as exit_info:
        main(["export", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> list[str]:
        logging.getLogger("lightning.pytorch").addHandler(self)
        return self.messages

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("lightning.pytorch").removeHandler(self)


def _info_messages() -> _Messages:
    """What rank_zero_info prints (Lightning's logger does not propagate to pytest's caplog in every setup)."""
    return _Messages()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text((Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()[:12000])
    return path


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory, model_dir, corpus):
    """A CausalLM loaded from a pretrained directory (untied head), fine-tuned 4 steps by BAdam in bf16 -- the head
    first, then the last layer -- on text its tokenizer encodes; the datamodule records the tokenizer's path."""
    root = tmp_path_factory.mktemp("pretrained_run")
    L.seed_everything(0)
    module = CausalLM(model_path=str(model_dir), lr=1e-2)
    data = TextDataModule(paths=[str(corpus)], tokenizer=str(model_dir), seq_len=32, batch_size=4, val_fraction=0.0)
    trainer = L.Trainer(
        strategy=BAdamStrategy(include_lm_head=True),
        precision="bf16-true",
        max_steps=4,
        callbacks=[BlockSwitch(every=2, order="descending")],
        **trainer_kwargs(root),
    )
    trainer.fit(module, data)
    path = root / "finetuned.ckpt"
    trainer.save_checkpoint(path)
    return module, path


def _prompt_ids(tokenizer) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Wrap this text."}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_fine_tuned_pretrained_model_exports_with_its_tokenizer(pretrained_run, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module, checkpoint = pretrained_run
    out = tmp_path / "hf"
    main(["export", str(checkpoint), str(out), "--module", "lightning_memopt.lm.CausalLM"])
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    original = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    assert tokenizer.get_vocab() == original.get_vocab()
    assert tokenizer.chat_template == original.chat_template and tokenizer.eos_token == original.eos_token
    assert loaded.dtype == torch.bfloat16

    # the trained LightningModule's logits, exactly, and its greedy continuation of a chat prompt
    x = torch.tensor([tokenizer("def wrap(text, width=70):")["input_ids"]])
    _assert_computes_as(loaded, module, x, _prompt_ids(tokenizer))

    # the untied head is exported as BAdam trained it; the frozen embedding as it was
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    pretrained = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    assert not loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)
    assert torch.equal(loaded.lm_head.weight, state["model.lm_head.weight"])
    assert not torch.equal(loaded.lm_head.weight, pretrained.lm_head.weight)
    assert torch.equal(loaded.model.embed_tokens.weight, pretrained.model.embed_tokens.weight)


def test_float16_export_is_the_module_in_float16(pretrained_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module, checkpoint = pretrained_run
    out = tmp_path / "fp16"
    main(["export", str(checkpoint), str(out), "--module", "lightning_memopt.lm.CausalLM", "--dtype", "float16"])
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert loaded.dtype == torch.float16
    half = copy.deepcopy(module).to(torch.float16)
    trained = dict(module.model.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(param, half.model.get_parameter(name)), name
        # bf16 -> fp16 rounds a weight by at most half an fp16 ulp: exact where fp16 has the bits (it has more
        # mantissa), rounded only for the tiny values below fp16's normal range (2^-14), whose spacing is 2^-24
        want = trained[name].float()
        torch.testing.assert_close(param.float(), want, rtol=2**-11, atol=2**-25, msg=name)
        assert torch.equal(param.float()[want.abs() >= 2**-14], want[want.abs() >= 2**-14]), name
    # short inputs and few tokens: fp16 matmul is slow on CPU
    x = torch.tensor([[5, 77, 301, 12, 460, 88, 2, 199]])
    _assert_computes_as(loaded, half, x, _prompt_ids(AutoTokenizer.from_pretrained(out)), max_new_tokens=4)
    # and within fp16 rounding of what the trained weights compute in FP32
    with torch.no_grad():
        full = copy.deepcopy(module).float()(x)
        torch.testing.assert_close(loaded(input_ids=x).logits.float(), full, rtol=1e-2, atol=2e-3)


def _tokenizer_dir(model_dir: Path, out: Path, model_max_length: int) -> Path:
    """The model's tokenizer, told apart by its model_max_length."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tokenizer.model_max_length = model_max_length
    tokenizer.save_pretrained(out)
    return out


def _rewritten(checkpoint: Path, target: Path, data_tokenizer: object = "keep", model_path: str | None = None) -> Path:
    ckpt = torch.load(checkpoint, weights_only=True)
    if data_tokenizer != "keep":
        ckpt["datamodule_hyper_parameters"]["tokenizer"] = data_tokenizer
    if model_path is not None:
        ckpt["hyper_parameters"]["model_path"] = model_path
    torch.save(ckpt, target)
    return target


@pytest.mark.parametrize(
    "source", ["datamodule", "--tokenizer", "model_path", "--no-tokenizer", "none", "datamodule's is gone"]
)
def test_the_tokenizer_comes_from_the_option_the_datamodule_or_model_path(
    pretrained_run, model_dir, tmp_path, capsys, source
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, checkpoint = pretrained_run
    assert torch.load(checkpoint, weights_only=True)["datamodule_hyper_parameters"]["tokenizer"] == str(model_dir)
    data_tokenizer = str(_tokenizer_dir(model_dir, tmp_path / "data_tokenizer", 1001))
    ckpt = _rewritten(checkpoint, tmp_path / "x.ckpt", data_tokenizer)
    args = ["--module", "lightning_memopt.lm.CausalLM"]
    expected: int | None = 1001
    if source == "--tokenizer":
        args += ["--tokenizer", str(_tokenizer_dir(model_dir, tmp_path / "option_tokenizer", 1002))]
        expected = 1002
    elif source == "model_path":
        ckpt = _rewritten(checkpoint, tmp_path / "x.ckpt", data_tokenizer=None)  # a byte-level datamodule
        expected = AutoTokenizer.from_pretrained(model_dir, local_files_only=True).model_max_length
    elif source == "--no-tokenizer":
        args += ["--no-tokenizer"]
        expected = None
    elif source == "none":
        bare = tmp_path / "bare_model"  # the model without its tokenizer files
        bare.mkdir()
        for name in ("config.json", "generation_config.json", "model.safetensors"):
            shutil.copy(model_dir / name, bare / name)
        ckpt = _rewritten(checkpoint, tmp_path / "x.ckpt", data_tokenizer=None, model_path=str(bare))
        expected = None
    elif source == "datamodule's is gone":
        ckpt = _rewritten(checkpoint, tmp_path / "x.ckpt", data_tokenizer=str(tmp_path / "moved_away"))
    out = tmp_path / "out"
    if source == "datamodule's is gone":
        with pytest.raises(SystemExit) as exit_info:
            main(["export", str(ckpt), str(out), *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "No tokenizer directory at" in err and "the datamodule's tokenizer hyper-parameter" in err
        assert "--no-tokenizer" in err and not out.exists()
        return
    with _info_messages() as messages:
        main(["export", str(ckpt), str(out), *args])
    AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    if expected is None:
        assert not any((out / name).exists() for name in TOKENIZER_FILES)
        said = any("no tokenizer written" in m for m in messages)
        assert said == (source == "none")
    else:
        assert AutoTokenizer.from_pretrained(out, local_files_only=True).model_max_length == expected


def test_a_safetensors_export_says_it_leaves_the_tokenizer_out(cli_run, model_dir, tmp_path):
    _, checkpoint, _ = cli_run
    out = tmp_path / "st"
    with pytest.warns(UserWarning, match="is not written: a safetensors export holds the weights alone"):
        main(["export", str(checkpoint), str(out), "--format", "safetensors", "--tokenizer", str(model_dir)])
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]


def test_a_tokenizer_larger_than_the_models_vocabulary_is_flagged(cli_run, model_dir, tmp_path):
    _, checkpoint, _ = cli_run  # a byte-level model: 256 tokens; the pretrained directory's tokenizer has 512
    with pytest.warns(UserWarning, match="has 512 tokens but the model's embedding only 256"):
        main(["export", str(checkpoint), str(tmp_path / "hf"), "--tokenizer", str(model_dir)])


ANSWERS = [("Say hello.", "Hello!"), ("Count to three.", "One, two, three."), ("Name a colour.", "Blue.")]


def _instructions(path: Path) -> Path:
    path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in ANSWERS * 3))
    return path


def test_a_badam_fsdp_checkpoint_from_the_cli_exports(model_dir, tmp_path):
    """``lightning-memopt fit`` on two gloo processes (~20 s), instruction data; the consolidated checkpoint exports
    the model that the sharded module was at the end of fit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    instructions = _instructions(tmp_path / "train.jsonl")
    recorded = tmp_path / "live.pt"
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 2,
            "strategy": {
                "class_path": "lightning_memopt.BAdamFSDPStrategy",
                "init_args": {"process_group_backend": "gloo"},
            },
            "precision": "bf16-true",
            "max_steps": 3,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path),
            "logger": False,
            "callbacks": [
                {"class_path": "lightning_memopt.BlockSwitch", "init_args": {"every": 1, "order": "ascending"}},
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp_path / "checkpoints"), "save_last": True},
                },
                # the sharded module's own logits and greedy tokens at the end of fit, saved by rank 0
                {
                    "class_path": "live_outputs.RecordOutputs",
                    "init_args": {"path": str(recorded), "prompt": "Count to three."},
                },
            ],
        },
        "model": {
            "class_path": "lightning_memopt.lm.CausalLM",
            "init_args": {"model_path": str(model_dir), "lr": 0.01},
        },
        "data": {
            "class_path": "lightning_memopt.data.InstructionDataModule",
            "init_args": {
                "paths": [str(instructions)],
                "tokenizer": str(model_dir),
                "max_length": 64,
                "batch_size": 2,
                "val_fraction": 0.0,
                "cache_dir": str(tmp_path / "cache"),
            },
        },
    }
    recipe = tmp_path / "fsdp.yaml"
    recipe.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lightning-memopt"), "fit", "--config", str(recipe)],
        cwd=tmp_path,
        env={
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)["state_dict"]
    assert all(type(t) is torch.Tensor for t in state.values())  # consolidated full tensors, no DTensor shards

    out = tmp_path / "hf"
    # LightningCLI's _class_path names the module, the datamodule's hyper-parameters the tokenizer
    assert torch.load(last, weights_only=True)["datamodule_hyper_parameters"]["tokenizer"] == str(model_dir)
    main(["export", str(last), str(out)])
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    # a chat-template run: the tokenizer's own template is the training format, kept as it is
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(model_dir, local_files_only=True).chat_template
    pretrained = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    assert not torch.equal(loaded.model.layers[0].mlp.up_proj.weight, pretrained.model.layers[0].mlp.up_proj.weight)

    live = torch.load(recorded, weights_only=True)
    prompt = live["prompt_ids"]
    assert (
        prompt
        == tokenizer.apply_chat_template(
            [{"role": "user", "content": "Count to three."}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
    )
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=torch.tensor([prompt])).logits, live["logits"])
        assert not torch.equal(pretrained(input_ids=torch.tensor([prompt])).logits, live["logits"])  # it trained
    assert _greedy(loaded, prompt, 8) == live["tokens"]


def _chat_example(section: str) -> str:
    """The Python block of a section of docs/instruction-tuning.md."""
    text = (DOCS / "instruction-tuning.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return body.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("case", ["auto, tokenizer without a chat template", "template: plain, system_prompt"])
def test_a_plain_template_run_exports_its_format_as_the_chat_template(model_dir, tmp_path, capsys, case):
    """Chatting with the export renders prompts exactly as InstructionDataModule's plain template rendered the
    training data, also where the tokenizer had no chat template at all, or another one."""
    from pretrained import make_model_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if case.startswith("auto"):
        base, template, system_prompt = make_model_dir(tmp_path / "no_template", chat_template=False), "auto", None
        assert AutoTokenizer.from_pretrained(base, local_files_only=True).chat_template is None
    else:
        base, template, system_prompt = model_dir, "plain", 'Answer in "one" line.\n'
    data = InstructionDataModule(
        [str(_instructions(tmp_path / "train.jsonl"))],
        tokenizer=str(base),
        template=template,
        system_prompt=system_prompt,
        max_length=64,
        batch_size=2,
        val_fraction=0.0,
        cache_dir=str(tmp_path / "cache"),
    )
    L.seed_everything(0)
    module = CausalLM(model_path=str(base), lr=1e-2)
    trainer = L.Trainer(
        strategy=BAdamStrategy(include_lm_head=True),
        precision="bf16-true",
        max_steps=2,
        callbacks=[BlockSwitch(every=1, order="descending")],
        **trainer_kwargs(tmp_path),
    )
    trainer.fit(module, data)
    checkpoint = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(checkpoint)
    out = tmp_path / "hf"
    with _info_messages() as messages:
        main(["export", str(checkpoint), str(out), "--module", "lightning_memopt.lm.CausalLM"])

    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    chat = [
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": 'Now "count" to three.'},
        {"role": "assistant", "content": "One, two, three."},
    ]

    def as_trained(turns: list[dict]) -> list[dict]:
        # InstructionDataModule opens a conversation without a system turn with its system_prompt
        if system_prompt is None or any(turn["role"] == "system" for turn in turns):
            return turns
        return [{"role": "system", "content": system_prompt}, *turns]

    for conversation in (chat, [{"role": "system", "content": "Be brief."}, *chat]):
        for generation_prompt, turns in ((False, conversation), (True, conversation[:3])):
            expected, _ = render_plain(
                as_trained(turns), tokenizer.bos_token, tokenizer.eos_token, add_generation_prompt=generation_prompt
            )
            assert tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt) == (
                expected
            )
        # the prompt's token ids are those the data module encodes for generation (SampleGeneration's)
        ids = tokenizer.apply_chat_template(conversation[:3], add_generation_prompt=True, return_dict=True)
        assert ids["input_ids"] == data.encode_prompt(conversation[:3])
    replaced = "in place of its own" if template == "plain" else "chat template, so"
    assert any("plain template" in m and replaced in m for m in messages)

    # the model continues such a prompt as the trained module does
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    prompt = data.encode_prompt("Count to three.")
    _assert_computes_as(loaded, module, torch.tensor([prompt]), prompt)
    # and the docs' chat example runs on it as written
    capsys.readouterr()
    exec(_chat_example("Export and chat with the result").replace('"my-model"', repr(str(out))), {})
    assert capsys.readouterr().out.endswith("\n")


def test_docstring_examples():
    result = doctest.testmod(lightning_memopt.export, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
