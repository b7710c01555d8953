"""``lightning-memopt export``: a training checkpoint as a model that loads without Lightning or this package.

Two outputs:

- ``safetensors``: the LightningModule's ``state_dict`` in ``OUT/model.safetensors`` (key names as in the module,
  e.g. ``model.model.layers.0.self_attn.q_proj.weight``). It needs only the checkpoint. Tensors that share memory in
  the module (tied embeddings) are stored once per name, and the file's metadata records the pairs under ``shared``.
- ``hf``: when the LightningModule wraps a Hugging Face ``transformers`` model (like
  :class:`~lightning_memopt.lm.CausalLM`), that model's ``save_pretrained`` directory, which
  ``AutoModelForCausalLM.from_pretrained(OUT)`` loads. Rebuilding the module needs its class and arguments, from
  (first that applies) ``--module`` with ``--config`` or the checkpoint's hyper-parameters; ``--config``; the
  ``_class_path`` LightningCLI stores in the hyper-parameters of modules that call ``save_hyperparameters()``; or the
  ``config.yaml`` LightningCLI saved next to the run (the checkpoint's folder or the one above it).

``--format auto`` (the default) writes ``hf`` when the module can be rebuilt and wraps one transformers model, and
``safetensors`` otherwise.

An ``hf`` export also holds the tokenizer (``save_pretrained``), so ``AutoTokenizer.from_pretrained(OUT)`` loads it
next to the model. Its source, first that applies: ``--tokenizer DIR``; the datamodule's ``tokenizer``
hyper-parameter in the checkpoint (``TextDataModule(tokenizer=...)`` and ``InstructionDataModule`` record it); the
module's ``model_path`` when that directory holds tokenizer files. Without any, the model is exported alone (an info
line says so); ``--no-tokenizer`` skips it. A run of :class:`~lightning_memopt.data.InstructionDataModule` on the
``plain`` template (``template: plain``, or ``auto`` with a tokenizer that has no chat template) gets that template
written into the exported tokenizer as its chat template (:func:`plain_chat_template`), so
``tokenizer.apply_chat_template`` renders prompts exactly as the training data were.

The checkpoint is read with ``torch.load(weights_only=True)``: nothing in it is executed. The module class it names is
imported and constructed (as ``LightningModule.load_from_checkpoint`` does), and only when it is a LightningModule
subclass; a module that loads pretrained weights in ``__init__`` (``CausalLM(model_path=...)``) reads them once more.

Example::

    lightning-memopt export runs/lightning_logs/version_0/checkpoints/last.ckpt exported/
    lightning-memopt export last.ckpt exported/ --format safetensors --dtype bfloat16
    lightning-memopt export last.ckpt exported/ --module lightning_memopt.lm.CausalLM
    lightning-memopt export last.ckpt exported/ --tokenizer models/Llama-3.2-1B-Instruct
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pickle
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

__all__ = [
    "DTYPES",
    "TOKENIZER_FILES",
    "ExportError",
    "build_module",
    "export_checkpoint",
    "find_transformers_model",
    "load_checkpoint",
    "main",
    "module_spec",
    "plain_chat_template",
    "save_safetensors",
    "tokenizer_source",
    "training_chat_template",
]

Format = Literal["auto", "hf", "safetensors"]

DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""``--dtype`` choices: ``auto`` keeps the dtype the checkpoint's weights have (the training precision)."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
"""Files that make a directory hold a Hugging Face tokenizer (any one of them)."""


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked; the message says what to pass instead.

    Example::

        >>> try:
        ...     export_checkpoint("last.ckpt", "out", format="onnx")
        ... except ExportError as error:
        ...     print(error)
        format='onnx' is not known; choose 'auto', 'hf' or 'safetensors'.
    """


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a Lightning checkpoint safely (``weights_only=True``, memory-mapped) and check that it holds weights.

    Example::

        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "tiny.ckpt"
        >>> torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, path)
        >>> sorted(load_checkpoint(path)["state_dict"])
        ['w']
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"No checkpoint file at {str(path)!r}.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise ExportError(
            f"{str(path)!r} holds objects other than tensors and plain containers, which weights_only=True refuses to "
            f"load: it was not written by Lightning from a plain module, or was tampered with. ({err})"
        ) from err
    except RuntimeError as err:
        # not a zip-format torch file, or a truncated one
        raise ExportError(f"{str(path)!r} is not a readable torch checkpoint: {err}") from err
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise ExportError(
            f"{str(path)!r} holds no 'state_dict': it is not a Lightning checkpoint (a file written by "
            "Trainer.save_checkpoint or ModelCheckpoint)."
        )
    return dict(checkpoint)


def save_safetensors(
    state_dict: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``state_dict`` to a safetensors file, converting floating tensors to ``dtype`` if given.

    safetensors refuses tensors that share memory; each name gets its own copy here (a tied embedding is stored twice)
    and the metadata's ``shared`` entry (JSON) maps each copy to the first name that held it, so a loader can tie them
    again. The file is written under a temporary name and renamed, so it is never half-written.

    Example::

        >>> import tempfile
        >>> from safetensors.torch import load_file
        >>> emb = torch.ones(4, 2)
        >>> path = save_safetensors({"embed": emb, "head": emb}, Path(tempfile.mkdtemp()) / "m.safetensors")
        >>> sorted(load_file(path))
        ['embed', 'head']
    """
    try:
        from safetensors.torch import save_file
    except ImportError as err:
        raise ExportError(
            "Exporting needs the safetensors package: pip install 'lightning-memopt[recipes]' (or safetensors)."
        ) from err

    path = Path(path)
    tensors: dict[str, Tensor] = {}
    first_of_view: dict[tuple[Any, ...], str] = {}
    storages: set[int] = set()
    shared: dict[str, str] = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, Tensor):
            raise ExportError(f"state_dict[{name!r}] is a {type(tensor).__name__}, not a tensor.")
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        view = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        if view in first_of_view:
            shared[name] = first_of_view[view]
        first_of_view.setdefault(view, name)
        if view[0] in storages or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    info = {"format": "pt", **(metadata or {})}
    if shared:
        info["shared"] = json.dumps(shared)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(partial), metadata=info)
    os.replace(partial, path)
    return path


def module_spec(
    checkpoint: Mapping[str, Any],
    checkpoint_path: str | os.PathLike[str],
    module: str | None = None,
    config: str | os.PathLike[str] | None = None,
) -> tuple[str, dict[str, Any], str] | None:
    """Which LightningModule class (dotted path) and arguments rebuild the checkpoint's module, and where that came
    from; ``None`` when nothing says (see the module docstring for the order of the sources).

    Example::

        >>> module_spec({"hyper_parameters": {"lr": 0.1}}, "x.ckpt", module="lightning_memopt.lm.CausalLM")
        ('lightning_memopt.lm.CausalLM', {'lr': 0.1}, "--module and the checkpoint's hyper-parameters")
    """
    hparams = {k: v for k, v in dict(checkpoint.get("hyper_parameters") or {}).items() if k != "_instantiator"}
    class_path = hparams.pop("_class_path", None)
    if config is not None:
        config_class, init_args = _read_cli_config(Path(config))
        if module is not None:
            return module, init_args, "--module and --config"
        if config_class is None:
            raise ExportError(
                f"The model section of {str(config)!r} names no class_path (the CLI was given the class); pass "
                "--module package.ModuleClass too."
            )
        return config_class, init_args, f"--config {config}"
    if module is not None:
        return module, hparams, "--module and the checkpoint's hyper-parameters"
    if class_path is not None:
        return str(class_path), hparams, "the checkpoint's hyper-parameters (LightningCLI's _class_path)"
    here = Path(checkpoint_path).resolve().parent
    for candidate in (here / "config.yaml", here.parent / "config.yaml"):
        if candidate.is_file():
            found_class, init_args = _read_cli_config(candidate)
            if found_class is not None:
                return found_class, init_args, str(candidate)
    return None


def _read_cli_config(path: Path) -> tuple[str | None, dict[str, Any]]:
    if not path.is_file():
        raise ExportError(f"No config file at {str(path)!r}.")
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    model = config.get("model")
    if not isinstance(model, Mapping):
        raise ExportError(f"{str(path)!r} has no 'model' section: it is not a LightningCLI config.yaml.")
    if "class_path" in model:
        return str(model["class_path"]), dict(model.get("init_args") or {})
    return None, dict(model)


def build_module(class_path: str, init_args: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> LightningModule:
    """Construct ``class_path(**init_args)`` (a LightningModule subclass) and load ``state_dict`` into it, strictly.

    Nested ``class_path``/``init_args`` arguments are instantiated as LightningCLI does.

    Example::

        >>> checkpoint = load_checkpoint("last.ckpt")  # doctest: +SKIP
        >>> class_path, init_args = module_spec(checkpoint)  # doctest: +SKIP
        >>> module = build_module(class_path, init_args, checkpoint["state_dict"])  # doctest: +SKIP
    """
    from lightning.pytorch.cli import instantiate_module

    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name) if module_name else None
    except (ImportError, AttributeError) as err:
        raise ExportError(
            f"Cannot import the module class {class_path!r}: {err}. Install its package, pass the right --module, or "
            "export the weights alone with --format safetensors."
        ) from err
    if not (isinstance(cls, type) and issubclass(cls, LightningModule)):
        raise ExportError(f"{class_path!r} is not a LightningModule subclass; pass --module package.ModuleClass.")
    try:
        module = instantiate_module(cls, dict(init_args))
    except Exception as err:
        raise ExportError(
            f"Could not construct {class_path} from the arguments {dict(init_args)!r}: {err}. Pass the run's --config, "
            "or export the weights alone with --format safetensors."
        ) from err
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ExportError(
            f"The checkpoint's weights do not fit {class_path} built with {dict(init_args)!r}: it was written by "
            f"another model or configuration. Pass the run's --config or the right --module. ({err})"
        ) from err
    return module


def find_transformers_model(module: nn.Module) -> tuple[str, nn.Module] | None:
    """The outermost Hugging Face ``PreTrainedModel`` inside ``module``, with its attribute path; ``None`` when there
    is none. Several side by side are ambiguous and raise an :class:`ExportError`.

    Example::

        >>> from lightning_memopt.lm import CausalLM
        >>> find_transformers_model(CausalLM(config={"num_hidden_layers": 1}))[0]
        'model'
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    found = [(n, m) for n, m in module.named_modules() if isinstance(m, PreTrainedModel)]
    outermost = [(n, m) for n, m in found if not any(n != o and (o == "" or n.startswith(o + ".")) for o, _ in found)]
    if len(outermost) > 1:
        names = ", ".join(repr(n) for n, _ in outermost)
        raise ExportError(f"The module holds several transformers models ({names}); use --format safetensors.")
    return outermost[0] if outermost else None


def tokenizer_source(
    checkpoint: Mapping[str, Any],
    init_args: Mapping[str, Any],
    tokenizer: str | os.PathLike[str] | None = None,
) -> tuple[str, str] | None:
    """Where the tokenizer of an ``hf`` export comes from: ``(path, what said so)``, or ``None`` when nothing does.

    First that applies: ``tokenizer`` (``--tokenizer``); the checkpoint's ``datamodule_hyper_parameters["tokenizer"]``;
    the module's ``model_path`` argument (from ``init_args``) when that directory holds one of
    :data:`TOKENIZER_FILES`.

    Example::

        >>> tokenizer_source({"datamodule_hyper_parameters": {"tokenizer": "models/llama"}}, {"model_path": "x"})
        ('models/llama', "the datamodule's tokenizer hyper-parameter")
        >>> tokenizer_source({}, {"config": {"num_hidden_layers": 2}}) is None
        True
    """
    if tokenizer is not None:
        return str(tokenizer), "--tokenizer"
    data_hparams = checkpoint.get("datamodule_hyper_parameters")
    recorded = data_hparams.get("tokenizer") if isinstance(data_hparams, Mapping) else None
    if isinstance(recorded, str | os.PathLike) and str(recorded):
        return str(recorded), "the datamodule's tokenizer hyper-parameter"
    model_path = init_args.get("model_path")
    if isinstance(model_path, str | os.PathLike) and str(model_path):
        directory = Path(os.path.expanduser(model_path))
        if any((directory / name).is_file() for name in TOKENIZER_FILES):
            return str(model_path), "the module's model_path"
    return None


def plain_chat_template(system_prompt: str | None = None) -> str:
    """A Jinja chat template that renders a conversation as :func:`~lightning_memopt.instruct.render_plain` does with
    the tokenizer's BOS and EOS tokens, for ``tokenizer.apply_chat_template``.

    Built from :data:`~lightning_memopt.instruct.PLAIN_TEMPLATE`, so the two cannot drift apart. ``system_prompt``
    (``InstructionDataModule(system_prompt=...)``) opens every conversation that has no system turn, as it did in
    training. Roles other than the template's raise an error when rendered.

    Example::

        >>> from transformers import PreTrainedTokenizerFast
        >>> from tokenizers import Tokenizer, models
        >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), eos_token="</s>")
        >>> tokenizer.chat_template = plain_chat_template()
        >>> tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
        ...                               add_generation_prompt=True)
        '### User:\\nHi\\n\\n### Assistant:\\n'
    """
    from lightning_memopt.instruct import PLAIN_TEMPLATE

    def rendered(piece: str, content: str) -> str:
        # each PLAIN_TEMPLATE entry as Jinja expressions: its text as string literals, {content} and {eos} as variables
        out = []
        for text, field, _, _ in string.Formatter().parse(piece):
            if text:
                out.append("{{ " + _jinja_string(text) + " }}")
            if field == "content":
                out.append("{{ " + content + " }}")
            elif field == "eos":
                out.append("{{ eos_token }}")
            elif field is not None:
                raise ValueError(f"PLAIN_TEMPLATE has a field {{{field}}} that plain_chat_template does not know.")
        return "".join(out)

    roles = [role for role in PLAIN_TEMPLATE if role != "generation_prompt"]
    parts = ["{% if bos_token %}{{ bos_token }}{% endif %}"]
    if system_prompt is not None:
        parts.append(
            "{% set ns = namespace(system=false) %}"
            "{% for message in messages %}{% if message['role'] == 'system' %}{% set ns.system = true %}{% endif %}"
            "{% endfor %}"
            "{% if not ns.system %}" + rendered(PLAIN_TEMPLATE["system"], _jinja_string(system_prompt)) + "{% endif %}"
        )
    parts.append("{% for message in messages %}")
    for i, role in enumerate(roles):
        parts.append(("{% if" if i == 0 else "{% elif") + f" message['role'] == {_jinja_string(role)} %}}")
        parts.append(rendered(PLAIN_TEMPLATE[role], "message['content']"))
    error = f"The plain template knows the roles {', '.join(roles)}, not "
    parts.append("{% else %}{{ raise_exception(" + _jinja_string(error) + " + message['role']) }}{% endif %}")
    parts.append("{% endfor %}")
    parts.append("{% if add_generation_prompt %}" + rendered(PLAIN_TEMPLATE["generation_prompt"], "") + "{% endif %}")
    return "".join(parts)


def _jinja_string(text: str) -> str:
    # a JSON string is a valid Jinja string literal: Jinja undoes the same backslash escapes
    return json.dumps(text, ensure_ascii=False)


def training_chat_template(checkpoint: Mapping[str, Any], tokenizer: Any) -> str | None:
    """The chat template the exported ``tokenizer`` needs to render prompts as the checkpoint's run trained on them:
    :func:`plain_chat_template` when the run's data module was an
    :class:`~lightning_memopt.data.InstructionDataModule` with a tokenizer whose template resolved to ``plain``
    (``template="plain"``, or ``"auto"`` and ``tokenizer`` has no chat template); ``None`` otherwise (the tokenizer's
    own template, if any, is the training format, or the run did not train on conversations).

    Example::

        >>> data = {"_class_path": "lightning_memopt.data.InstructionDataModule", "tokenizer": "m", "template": "plain"}
        >>> training_chat_template({"datamodule_hyper_parameters": data}, tokenizer=None) == plain_chat_template()
        True
        >>> text = {"tokenizer": "llama", "seq_len": 512}  # a TextDataModule run
        >>> training_chat_template({"datamodule_hyper_parameters": text}, tokenizer=None) is None
        True
    """
    hparams = _instruction_hparams(checkpoint)
    if hparams is None or not hparams.get("tokenizer"):
        return None  # not conversations, or byte-level ones: no tokenizer can render those bytes
    template = hparams.get("template", "auto")
    if template == "plain" or (template == "auto" and not getattr(tokenizer, "chat_template", None)):
        system_prompt = hparams.get("system_prompt")
        return plain_chat_template(system_prompt if isinstance(system_prompt, str) else None)
    return None


def _instruction_hparams(checkpoint: Mapping[str, Any]) -> Mapping[str, Any] | None:
    from lightning_memopt.instruct import InstructionDataModule

    hparams = checkpoint.get("datamodule_hyper_parameters")
    if not isinstance(hparams, Mapping):
        return None
    class_path = hparams.get("_class_path")  # LightningCLI's; a plain Trainer run records the arguments alone
    if isinstance(class_path, str):
        module_name, _, class_name = class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError):
            cls = None
        if isinstance(cls, type):
            return hparams if issubclass(cls, InstructionDataModule) else None
    # save_hyperparameters() records every argument, defaults included; these ones only InstructionDataModule has
    arguments = ("paths", "tokenizer", "template", "system_prompt", "train_on")
    return hparams if all(name in hparams for name in arguments) else None


def _load_tokenizer(path: str, source: str) -> Any:
    from lightning_memopt.data import load_tokenizer

    hint = "Pass --tokenizer DIR with the model's tokenizer, or --no-tokenizer to export the model alone."
    expanded = os.path.expanduser(path)
    if not os.path.isdir(expanded) and (os.sep in path or path.startswith((".", "~"))):
        raise ExportError(f"No tokenizer directory at {path!r} (from {source}). {hint}")
    try:
        return load_tokenizer(path, argument="--tokenizer")
    except ImportError as err:
        raise ExportError(
            "Exporting the tokenizer needs Hugging Face transformers; install it, or pass --no-tokenizer."
        ) from err
    except Exception as err:  # OSError, or the tokenizers library's own errors for a corrupt file
        raise ExportError(f"{err} (from {source}). {hint}") from err


def export_checkpoint(
    checkpoint_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    format: Format = "auto",
    module: str | None = None,
    config: str | os.PathLike[str] | None = None,
    dtype: str = "auto",
    tokenizer: str | os.PathLike[str] | None = None,
    write_tokenizer: bool = True,
) -> Path:
    """Export a Lightning checkpoint to ``out`` (a directory) and return the path written (a file or ``out``).

    Args:
        checkpoint_path: a ``.ckpt`` written by ``ModelCheckpoint`` or ``trainer.save_checkpoint``.
        out: output directory (created).
        format: ``"hf"``, ``"safetensors"`` or ``"auto"`` (see the module docstring).
        module: dotted path of the LightningModule class, if the checkpoint does not name it.
        config: LightningCLI ``config.yaml`` of the run (its ``model:`` section builds the module).
        dtype: ``"auto"`` (as trained) or one of ``"float32"``, ``"bfloat16"``, ``"float16"``.
        tokenizer: directory of the tokenizer to save next to an ``hf`` export, instead of the one the checkpoint
            names (see :func:`tokenizer_source`).
        write_tokenizer: ``False`` exports the model alone.

    Example::

        >>> export_checkpoint("last.ckpt", "exported", module="lightning_memopt.lm.CausalLM")  # doctest: +SKIP
        PosixPath('exported')
    """
    if format not in ("auto", "hf", "safetensors"):
        raise ExportError(f"format={format!r} is not known; choose 'auto', 'hf' or 'safetensors'.")
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r} is not known; choose one of {', '.join(DTYPES)}.")
    if tokenizer is not None and not write_tokenizer:
        raise ExportError("Pass either a tokenizer to write or write_tokenizer=False (--no-tokenizer), not both.")
    checkpoint = load_checkpoint(checkpoint_path)
    state_dict: dict[str, Tensor] = dict(checkpoint["state_dict"])
    out = Path(out)
    metadata = {"source": Path(checkpoint_path).name, "global_step": str(checkpoint.get("global_step", ""))}
    spec = None if format == "safetensors" else module_spec(checkpoint, checkpoint_path, module, config)
    if spec is None:
        if format == "hf":
            raise ExportError(
                "An 'hf' export rebuilds the LightningModule, but nothing names its class: pass --module "
                "package.ModuleClass (its arguments then come from the checkpoint's hyper-parameters) or --config "
                "with the run's LightningCLI config.yaml. --format safetensors needs neither."
            )
        return _write_safetensors(state_dict, out, DTYPES[dtype], metadata, tokenizer)
    class_path, init_args, source = spec
    rank_zero_info(f"export: building {class_path} from {source}")
    lightning_module = build_module(class_path, init_args, state_dict)
    inner = find_transformers_model(lightning_module)
    if inner is None:
        if format == "hf":
            raise ExportError(
                f"{class_path} holds no transformers PreTrainedModel, so there is nothing for save_pretrained; "
                "use --format safetensors."
            )
        return _write_safetensors(state_dict, out, DTYPES[dtype], metadata, tokenizer)
    prefix, hf_model = inner
    left_out = [n for n in lightning_module.state_dict() if prefix and not n.startswith(prefix + ".")]
    if left_out:
        rank_zero_warn(
            f"export: {len(left_out)} tensors of {class_path} lie outside its transformers model {prefix!r} and are "
            f"not in the Hugging Face export (e.g. {left_out[0]!r}). Use --format safetensors to keep everything."
        )
    # loaded before anything is written: a bad tokenizer path leaves no half-made export behind
    found = tokenizer_source(checkpoint, init_args, tokenizer) if write_tokenizer else None
    hf_tokenizer = _load_tokenizer(*found) if found is not None else None
    vocab_size = getattr(getattr(hf_model, "config", None), "vocab_size", None)
    if (
        hf_tokenizer is not None
        and found is not None
        and isinstance(vocab_size, int)
        and len(hf_tokenizer) > vocab_size
    ):
        rank_zero_warn(
            f"export: the tokenizer from {found[0]} ({found[1]}) has {len(hf_tokenizer)} tokens but the model's "
            f"embedding only {vocab_size}: it is not the tokenizer this model was trained with. Pass the right one "
            "with --tokenizer DIR, or --no-tokenizer."
        )
    target = DTYPES[dtype] or _dominant_dtype(state_dict)
    if target is not None:
        hf_model.to(target)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out)  # type: ignore[operator]
    rank_zero_info(f"export: wrote a Hugging Face model ({type(hf_model).__name__}, {target}) to {out}")
    if hf_tokenizer is not None and found is not None:
        chat_template = training_chat_template(checkpoint, hf_tokenizer)
        replaced = " in place of its own" if getattr(hf_tokenizer, "chat_template", None) else ""
        if chat_template is not None:
            hf_tokenizer.chat_template = chat_template
        hf_tokenizer.save_pretrained(out)
        rank_zero_info(f"export: wrote the tokenizer from {found[0]} ({found[1]}) to {out}")
        if chat_template is not None:
            rank_zero_info(
                "export: the run trained on InstructionDataModule's plain template; "
                f"it is the exported tokenizer's chat template{replaced}, so apply_chat_template renders prompts as "
                "in training"
            )
    elif write_tokenizer:
        rank_zero_info(
            "export: no tokenizer written: neither the checkpoint's datamodule nor the module's model_path names one. "
            "Add it with --tokenizer DIR (the directory of the tokenizer the model was trained with)."
        )
    return out


def _write_safetensors(
    state_dict: Mapping[str, Tensor],
    out: Path,
    dtype: torch.dtype | None,
    metadata: Mapping[str, str],
    tokenizer: str | os.PathLike[str] | None = None,
) -> Path:
    if tokenizer is not None:
        rank_zero_warn(
            f"export: --tokenizer {str(tokenizer)!r} is not written: a safetensors export holds the weights alone. "
            "Use --format hf for a directory that AutoModelForCausalLM and AutoTokenizer load."
        )
    path = save_safetensors(state_dict, out / "model.safetensors", dtype=dtype, metadata=metadata)
    rank_zero_info(f"export: wrote {len(state_dict)} tensors to {path}")
    return path


def _dominant_dtype(state_dict: Mapping[str, Tensor]) -> torch.dtype | None:
    # the training precision: under bf16-true every weight is bf16; a module rebuilt in FP32 would otherwise double
    counts = Counter(t.dtype for t in state_dict.values() if isinstance(t, Tensor) and t.is_floating_point())
    return counts.most_common(1)[0][0] if counts else None


def main(argv: Sequence[str] | None = None) -> None:
    """``lightning-memopt export CKPT OUT [options]`` (the CLI dispatches here before LightningCLI sees argv).

    Example::

        >>> main(["last.ckpt", "exported", "--format", "safetensors"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(
        prog="lightning-memopt export",
        description="Export a training checkpoint as a Hugging Face model directory or a safetensors file.",
    )
    parser.add_argument("checkpoint", help="a .ckpt file written during or after training")
    parser.add_argument("out", help="output directory")
    parser.add_argument(
        "--format",
        choices=["auto", "hf", "safetensors"],
        default="auto",
        help="hf: save_pretrained of the wrapped transformers model; safetensors: OUT/model.safetensors with the "
        "LightningModule's state_dict; auto (default): hf when possible",
    )
    parser.add_argument("--module", help="dotted path of the LightningModule class, e.g. lightning_memopt.lm.CausalLM")
    parser.add_argument("--config", help="the run's LightningCLI config.yaml (found next to the checkpoint otherwise)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto", help="weight dtype (auto: as trained)")
    tokenizer = parser.add_mutually_exclusive_group()
    tokenizer.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="tokenizer directory to save with an hf export (default: the checkpoint's datamodule tokenizer, else the "
        "module's model_path)",
    )
    tokenizer.add_argument("--no-tokenizer", action="store_true", help="export the model without its tokenizer")
    args = parser.parse_args(argv)
    try:
        written = export_checkpoint(
            args.checkpoint,
            args.out,
            args.format,
            args.module,
            args.config,
            args.dtype,
            tokenizer=args.tokenizer,
            write_tokenizer=not args.no_tokenizer,
        )
    except ExportError as err:
        parser.exit(2, f"lightning-memopt export: error: {err}\n")
    print(written)
