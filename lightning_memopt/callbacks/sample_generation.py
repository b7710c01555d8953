"""Greedy completions of a few fixed prompts after each validation: what the model has learned, in words."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_memopt.data import load_tokenizer
from lightning_memopt.log import get_logger, rank_zero_log

__all__ = ["STOP_REASONS", "SampleGeneration", "greedy_generate"]

_log = get_logger("sample_generation")

StopReason = Literal["eos", "max_new_tokens", "max_length"]
STOP_REASONS: tuple[StopReason, ...] = ("eos", "max_new_tokens", "max_length")
"""Why :func:`greedy_generate` stopped: a stop token, ``max_new_tokens``, or the model's longest sequence."""

_PROMPT_SHOWN = 60  # characters of each prompt in the printed block; samples.jsonl has them whole


def greedy_generate(
    model: Callable[[Tensor], Any],
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    stop_token_ids: Iterable[int] = (),
    max_length: int | None = None,
    device: torch.device | str = "cpu",
    agree: Callable[[int], int] | None = None,
) -> tuple[list[int], StopReason]:
    """Greedy decoding with one full forward pass per new token: ``model(input_ids)`` gives the logits.

    No KV cache, so any module whose forward maps ``(1, T)`` token ids to ``(1, T, vocab)`` logits (or to an output
    with ``.logits``) works unchanged, sharded ones included. The next token is the argmax of the last position's
    logits, taken in FP32 as transformers' ``generate(do_sample=False)`` does.

    Args:
        model: called with ``input_ids`` of shape ``(1, T)``.
        prompt_ids: the prompt's token ids (at least one).
        max_new_tokens: generate at most this many tokens.
        stop_token_ids: stop after generating one of these (it is the last id returned).
        max_length: the model's longest sequence (``max_position_embeddings``): prompt and completion together never
            exceed it.
        device: where ``input_ids`` are built.
        agree: called with each chosen token, returns the token to use. Distributed callers pass a broadcast from
            rank 0, so that every rank runs the same forwards (a sharded model's forward is a collective).

    Returns:
        The new token ids (a stop token included, as ``generate`` returns it) and why decoding stopped, one of
        :data:`STOP_REASONS`.

    Example::

        >>> import torch.nn.functional as F
        >>> def count_up(ids):  # logits that always predict "last token + 1"
        ...     return F.one_hot((ids + 1) % 8, 8).float()
        >>> greedy_generate(count_up, [2], max_new_tokens=10, stop_token_ids=[5])
        ([3, 4, 5], 'eos')
        >>> greedy_generate(count_up, [2], max_new_tokens=3)
        ([3, 4, 5], 'max_new_tokens')
        >>> greedy_generate(count_up, [2], max_new_tokens=10, max_length=4)
        ([3, 4, 5], 'max_length')
    """
    if len(prompt_ids) == 0:
        raise ValueError("greedy_generate needs a prompt of at least one token.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens should be >= 1 but is: {max_new_tokens}")
    stops = set(stop_token_ids)
    budget = max_new_tokens
    if max_length is not None and max_length - len(prompt_ids) < budget:
        budget = max(max_length - len(prompt_ids), 0)
    limit: StopReason = "max_length" if budget < max_new_tokens else "max_new_tokens"
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(budget):
            output = model(ids)
            logits = getattr(output, "logits", output)
            if not isinstance(logits, Tensor) or logits.ndim != 3:
                raise TypeError(
                    "greedy_generate needs model(input_ids) to return logits of shape (batch, seq_len, vocab) or an "
                    f"output with .logits, but got {type(output).__name__}"
                    + (f" of shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else "")
                    + "."
                )
            token = int(logits[0, -1].float().argmax())
            if agree is not None:
                token = int(agree(token))
            new.append(token)
            if token in stops:
                return new, "eos"
            ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    return new, limit


@dataclass(frozen=True)
class _Codec:
    """How prompts become token ids and completions text, and which token ends a completion."""

    encode: Callable[[str], Sequence[int]]
    decode: Callable[[list[int]], str]
    eos_token_id: int | None
    source: str


class SampleGeneration(Callback):
    """Greedily complete a few fixed prompts after each validation and log them, to see what the model learns.

    After every ``every_n_validations``-th validation run (the sanity check excluded), each prompt is completed
    greedily, one prompt at a time, until a stop token, ``max_new_tokens`` new tokens, or the model's
    ``max_position_embeddings``. Rank zero prints one short block, appends ``{"step", "prompt", "completion",
    "tokens", "stop"}`` lines to ``samples.jsonl`` in ``trainer.log_dir`` (the ``default_root_dir`` without a logger),
    and sends the samples to loggers that take text: a ``log_text`` method (``WandbLogger``: one table per
    validation) or an ``experiment.add_text`` (TensorBoard: one text per prompt). The latest samples are also in
    :attr:`samples` on every rank. ``trainer.validate`` generates too.

    How prompts become token ids, first that applies:

    1. With ``chat=True``, the datamodule's ``encode_prompt()``/``decode()`` (as
       :class:`~lightning_memopt.data.InstructionDataModule` has): prompts are rendered exactly like the training
       prompts (its chat template or plain template, its ``system_prompt``), and byte-level data works too. A
       ``tokenizer`` is then not used; one that is not the datamodule's gets a warning.
    2. ``tokenizer``: a local Hugging Face tokenizer directory (usually the model's), loaded with ``AutoTokenizer``;
       with ``chat=True`` and a chat template, a prompt becomes one user turn followed by the assistant's generation
       prompt, otherwise it is encoded as plain text.
    3. The datamodule's tokenizer: ``get_tokenizer()``, or its ``tokenizer`` hyper-parameter when that is a path (as
       :class:`~lightning_memopt.data.TextDataModule` has); used as in 2.
    4. With ``chat=False``, a byte-level datamodule's ``encode_prompt()``/``decode()`` (the only encoding it has).

    Completions stop at the end-of-sequence token of the tokenizer, of the datamodule (its ``eos_token_id``: what
    ends its training samples) and of the model (``generation_config.eos_token_id`` of a Hugging Face model, where
    ``generate()`` stops); the stop token is in ``tokens`` but not in ``completion``. A tokenizer decodes with its
    special tokens kept (a completion that runs past its turn shows it); a datamodule's ``decode()`` decides itself.

    Generation runs the LightningModule's forward in eval mode under ``no_grad`` and the precision's forward context,
    on every rank with the same inputs (rank zero's token is broadcast at each step): a sharded model's
    (``badam_fsdp``) forward needs all ranks, and no rank runs ahead to the next training step. Nothing of training
    changes: requires-grad flags, the optimizer, BAdam's active block and the random state are left as they were, so
    a run with this callback trains exactly the weights it trains without it.

    Args:
        prompts: the prompts, as plain user messages (the chat template, if any, is applied here).
        max_new_tokens: most tokens generated per prompt (a full forward pass each: keep it small for large models).
        tokenizer: local directory (or cached hub name) of a Hugging Face tokenizer; nothing is downloaded.
            ``None`` takes the encoding from the datamodule. For data modules without ``encode_prompt`` (e.g.
            ``TextDataModule`` without a tokenizer), or with ``chat=False``.
        chat: render prompts as the datamodule's ``encode_prompt`` does (the training format), else with the
            tokenizer's chat template (when it has one); ``False`` continues them as plain text.
        every_n_validations: generate after the n-th, 2n-th, ... validation run (1: after every one); the count is
            saved in checkpoints.
        filename: name of the JSON-lines file in the log directory; ``None`` writes none.

    Example::

        from lightning.pytorch import Trainer
        from lightning_memopt import BlockSwitch, SampleGeneration

        samples = SampleGeneration(["Write a haiku about the sea.", "What is 17 * 3?"], max_new_tokens=48,
                                   tokenizer="models/Llama-3.2-1B-Instruct")
        trainer = Trainer(strategy="badam", precision="bf16-true", val_check_interval=200,
                          callbacks=[BlockSwitch(every=100), samples])
        trainer.fit(model, datamodule)  # prints the completions; <log_dir>/samples.jsonl
    """

    def __init__(
        self,
        prompts: list[str],
        max_new_tokens: int = 64,
        tokenizer: str | None = None,
        chat: bool = True,
        every_n_validations: int = 1,
        filename: str | None = "samples.jsonl",
    ) -> None:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise ValueError(
                f"SampleGeneration(prompts=...) must be a list of strings, got {type(prompts).__name__}"
                + (": wrap a single prompt in a list." if isinstance(prompts, str) else ".")
            )
        if not prompts:
            raise ValueError("SampleGeneration(prompts=...) is empty: give at least one prompt.")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"SampleGeneration prompts[{i}] must be a string, got {type(prompt).__name__}.")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"SampleGeneration(max_new_tokens=...) must be an int >= 1, got {max_new_tokens!r}.")
        if tokenizer is not None and (not isinstance(tokenizer, str | os.PathLike) or not str(tokenizer)):
            raise ValueError(
                f"SampleGeneration(tokenizer=...) must be a tokenizer directory or None, got {tokenizer!r}."
            )
        if not isinstance(chat, bool):
            raise ValueError(f"SampleGeneration(chat=...) must be True or False, got {chat!r}.")
        if isinstance(every_n_validations, bool) or not isinstance(every_n_validations, int) or every_n_validations < 1:
            raise ValueError(
                f"SampleGeneration(every_n_validations=...) must be an int >= 1, got {every_n_validations!r}."
            )
        if filename is not None and (not filename or os.path.basename(filename) != filename):
            raise ValueError(
                f"SampleGeneration(filename=...) must be a plain file name (it is written in the log directory) or "
                f"None, got {filename!r}."
            )
        self.prompts = list(prompts)
        self.max_new_tokens = max_new_tokens
        self.tokenizer = None if tokenizer is None else str(tokenizer)
        self.chat = chat
        self.every_n_validations = every_n_validations
        self.filename = filename
        self.samples: list[dict[str, Any]] = []
        """The latest samples (on every rank), as written to ``samples.jsonl``."""
        self._validations = 0
        self._warned_unused_tokenizer = False
        self._codec: _Codec | None = None
        self._prompt_ids: list[list[int]] = []
        self._stop_ids: set[int] = set()
        self._max_length: int | None = None

    # ----------------------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage not in ("fit", "validate"):
            return
        # here rather than at the first validation: a missing tokenizer fails before any training step
        codec = self._resolve_codec(trainer)
        prompt_ids = []
        for i, prompt in enumerate(self.prompts):
            ids = [int(t) for t in codec.encode(prompt)]
            if not ids:
                raise MisconfigurationException(
                    f"SampleGeneration prompts[{i}] ({prompt!r}) encodes to no tokens with {codec.source}: give a "
                    "non-empty prompt, or chat=True with a tokenizer that has a chat template."
                )
            prompt_ids.append(ids)
        model = _transformers_model(pl_module)
        self._max_length = _max_length(model)
        data_eos = getattr(getattr(trainer, "datamodule", None), "eos_token_id", None)
        stops = [codec.eos_token_id, data_eos, *_model_eos_ids(model)]
        self._stop_ids = {t for t in stops if isinstance(t, int) and not isinstance(t, bool)}
        if self._max_length is not None:
            for i, ids in enumerate(prompt_ids):
                room = self._max_length - len(ids)
                if room < self.max_new_tokens:
                    rank_zero_warn(
                        f"SampleGeneration prompts[{i}] is {len(ids)} tokens and the model takes at most "
                        f"{self._max_length} (max_position_embeddings), so it gets {max(room, 0)} new tokens instead "
                        f"of {self.max_new_tokens}. Shorten the prompt or lower max_new_tokens."
                    )
        self._codec = codec
        self._prompt_ids = prompt_ids

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            self.generate(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"validations": self._validations}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validations = int(state_dict.get("validations", 0))

    # ------------------------------------------------------------------------------------------------ generation
    def generate(self, trainer: Trainer, pl_module: LightningModule) -> list[dict[str, Any]]:
        """Complete every prompt now, log the samples and return them (every rank must call it, as the hook does)."""
        if self._codec is None:
            raise RuntimeError("SampleGeneration generates once the Trainer has set it up (in fit or validate).")
        codec = self._codec
        # trainer.log_dir is a collective under DDP: every rank asks
        log_dir = trainer.log_dir or trainer.default_root_dir
        strategy = trainer.strategy
        agree = (lambda token: strategy.broadcast(token, src=0)) if trainer.world_size > 1 else None
        modes = [(module, module.training) for module in pl_module.modules()]
        samples = []
        pl_module.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                for prompt, ids in zip(self.prompts, self._prompt_ids, strict=True):
                    tokens, stop = greedy_generate(
                        pl_module,
                        ids,
                        self.max_new_tokens,
                        stop_token_ids=self._stop_ids,
                        max_length=self._max_length,
                        device=strategy.root_device,
                        agree=agree,
                    )
                    text = codec.decode(tokens[:-1] if stop == "eos" else tokens)
                    sample = {"step": trainer.global_step, "prompt": prompt, "completion": text}
                    samples.append({**sample, "tokens": tokens, "stop": stop})
        finally:
            for module, training in modes:
                module.training = training
        self.samples = samples
        if trainer.is_global_zero:
            self._publish(trainer, samples, log_dir)
        return samples

    def _publish(self, trainer: Trainer, samples: list[dict[str, Any]], log_dir: str | os.PathLike[str]) -> None:
        step = trainer.global_step
        lines = [f"SampleGeneration at step {step} (greedy, up to {self.max_new_tokens} new tokens):"]
        for i, sample in enumerate(samples):
            prompt = sample["prompt"]
            shown = prompt if len(prompt) <= _PROMPT_SHOWN else prompt[: _PROMPT_SHOWN - 3] + "..."
            lines.append(f"  [{i}] {shown!r} -> {sample['completion']!r}")
        rank_zero_log(_log, logging.INFO, "\n".join(lines))
        if self.filename is not None:
            path = Path(log_dir) / self.filename
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                for sample in samples:
                    f.write(json.dumps(sample, ensure_ascii=False) + "\n")
        for logger in trainer.loggers:
            log_text = getattr(logger, "log_text", None)
            if callable(log_text):  # WandbLogger
                rows = [[step, s["prompt"], s["completion"]] for s in samples]
                log_text(key="samples", columns=["step", "prompt", "completion"], data=rows, step=step)
                continue
            writer: Any = getattr(logger, "experiment", None)
            if callable(getattr(writer, "add_text", None)):  # TensorBoard's SummaryWriter
                for i, sample in enumerate(samples):
                    text = f"**{sample['prompt']}**\n\n```\n{sample['completion']}\n```"
                    writer.add_text(f"samples/{i}", text, global_step=step)

    # -------------------------------------------------------------------------------------------------- encoding
    def _resolve_codec(self, trainer: Trainer) -> _Codec:
        datamodule = getattr(trainer, "datamodule", None)
        name = type(datamodule).__name__
        own_encoding = callable(getattr(datamodule, "encode_prompt", None)) and callable(
            getattr(datamodule, "decode", None)
        )
        if own_encoding and self.chat:
            # the datamodule renders prompts as it rendered the training data (template, system prompt); a tokenizer's
            # own chat template may not be that format (a plain-template run), so tokenizer= does not override it
            self._warn_unused_tokenizer(datamodule)
            return _datamodule_codec(datamodule)
        if self.tokenizer is not None:
            return _tokenizer_codec(_load_tokenizer(self.tokenizer), self.chat, f"tokenizer={self.tokenizer!r}")
        tokenizer = None
        if callable(getattr(datamodule, "get_tokenizer", None)):
            tokenizer = datamodule.get_tokenizer()  # type: ignore[union-attr]
        source = f"{name}.get_tokenizer()"
        if tokenizer is None:
            path = _datamodule_tokenizer_path(datamodule)
            if path is not None:
                tokenizer, source = _load_tokenizer(path), f"{name}(tokenizer={path!r})"
        if tokenizer is not None:
            return _tokenizer_codec(tokenizer, self.chat, source)
        if own_encoding:
            rank_zero_warn(
                f"SampleGeneration(chat=False): {name} has no tokenizer (byte-level), so prompts are encoded by its "
                "encode_prompt(), which may add its chat format. Pass tokenizer=... to encode them as plain text."
            )
            return _datamodule_codec(datamodule)
        where = "The Trainer has no datamodule" if datamodule is None else f"The datamodule {name} has none"
        raise MisconfigurationException(
            f"SampleGeneration needs a tokenizer to encode its prompts. {where} (no encode_prompt()/decode(), "
            "get_tokenizer() or `tokenizer` path). Pass SampleGeneration(tokenizer='path/to/model_dir'), the local "
            "directory of the model's Hugging Face tokenizer."
        )

    def _warn_unused_tokenizer(self, datamodule: Any) -> None:
        if self.tokenizer is None or self._warned_unused_tokenizer:
            return
        own = _datamodule_tokenizer_path(datamodule)
        if own is not None and _same_path(own, self.tokenizer):
            return
        self._warned_unused_tokenizer = True
        name = type(datamodule).__name__
        theirs = "byte-level tokens" if own is None else f"tokenizer={own!r}"
        rank_zero_warn(
            f"SampleGeneration(tokenizer={self.tokenizer!r}) is not used: with chat=True the prompts are encoded by "
            f"{name}.encode_prompt() ({theirs}), exactly as its training data. Remove tokenizer=, or pass chat=False "
            "to continue the prompts as plain text with it."
        )


def _datamodule_tokenizer_path(datamodule: Any) -> str | None:
    # InstructionDataModule's `tokenizer` attribute, or a `tokenizer` hyper-parameter (TextDataModule's) that is a path
    hparams = getattr(datamodule, "hparams", None) or {}
    for value in (
        getattr(datamodule, "tokenizer", None),
        hparams.get("tokenizer") if hasattr(hparams, "get") else None,
    ):
        if isinstance(value, str | os.PathLike) and str(value):
            return str(value)
    return None


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def _load_tokenizer(path: str) -> Any:
    try:
        return load_tokenizer(path, argument="SampleGeneration(tokenizer=...)")
    except OSError as err:
        raise MisconfigurationException(str(err)) from err


def _tokenizer_codec(tokenizer: Any, chat: bool, source: str) -> _Codec:
    if chat and getattr(tokenizer, "chat_template", None):

        def encode(prompt: str) -> Sequence[int]:
            # rendered as text, then encoded without special tokens: the template writes BOS itself
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        source += " with its chat template"
    else:

        def encode(prompt: str) -> Sequence[int]:
            return list(tokenizer(prompt)["input_ids"])

    def decode(ids: list[int]) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=False))

    return _Codec(encode, decode, tokenizer.eos_token_id, source)


def _datamodule_codec(datamodule: Any) -> _Codec:
    return _Codec(
        datamodule.encode_prompt,
        datamodule.decode,
        getattr(datamodule, "eos_token_id", None),
        f"{type(datamodule).__name__}.encode_prompt()",
    )


def _transformers_model(module: nn.Module) -> nn.Module | None:
    # the outermost submodule with a Hugging Face style config; found by duck typing so that transformers stays optional
    for sub in module.modules():
        if hasattr(getattr(sub, "config", None), "max_position_embeddings") or hasattr(sub, "generation_config"):
            return sub
    return None


def _max_length(model: nn.Module | None) -> int | None:
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def _model_eos_ids(model: nn.Module | None) -> list[int]:
    for config in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(config, "eos_token_id", None)
        if eos is not None:
            return [eos] if isinstance(eos, int) else [int(t) for t in eos]
    return []
