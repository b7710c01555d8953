"""A plain LightningModule around a Hugging Face causal language model.

Nothing in it knows about BAdam: it is the kind of module users already have, and the strategies and callbacks of
this package must work with it unchanged.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning_utilities.core.imports import RequirementCache
from torch import Tensor
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_memopt.compat import buffer, replace_buffer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["IGNORE_INDEX", "TINY_LLAMA", "CausalLM", "TokenPerplexity", "next_token_loss"]

_TRANSFORMERS_DTYPE_KWARG = RequirementCache("transformers>=4.56")

IGNORE_INDEX = -100
"""Target value that is left out of the loss (Hugging Face's convention for padding and prompt tokens)."""

TINY_LLAMA: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
}
"""Default ``LlamaConfig`` arguments: a byte-level model of about 0.9 M parameters that trains in minutes on a CPU.

``num_key_value_heads`` is left to ``LlamaConfig``, which makes it equal to ``num_attention_heads`` (no grouped-query
attention), so changing the number of heads alone gives a valid model."""


def next_token_loss(logits: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy per predicted token and the number of tokens it averages over.

    ``batch`` holds either ``targets`` aligned with the logits (``targets[:, t]`` is the token after position ``t``,
    as :class:`~lightning_memopt.data.TextDataModule` yields), or Hugging Face style ``labels`` equal to the inputs,
    which are shifted here. Positions whose target is :data:`IGNORE_INDEX` are left out.

    Example::

        >>> logits = torch.zeros(1, 3, 256)
        >>> loss, tokens = next_token_loss(logits, {"targets": torch.tensor([[1, 2, IGNORE_INDEX]])})
        >>> round(loss.item(), 4), tokens.item()
        (5.5452, 2)
    """
    if "targets" in batch:
        targets = batch["targets"]
    elif "labels" in batch:
        logits, targets = logits[:, :-1], batch["labels"][:, 1:]
    else:
        raise KeyError(f"The batch needs `targets` or `labels` next to `input_ids`, but has keys {sorted(batch)}.")
    # Half-precision logits lose the small probabilities that dominate the loss of a good model.
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    tokens = (targets != IGNORE_INDEX).sum()
    return loss_sum / tokens.clamp(min=1), tokens


class TokenPerplexity(MeanMetric):
    """Perplexity: the exponential of the mean negative log-likelihood per token.

    Update it with a batch's mean loss and its token count as ``weight``; batches then count in proportion to their
    tokens, so the result equals the perplexity of the whole split rather than a mean over batches.

    Example::

        >>> ppl = TokenPerplexity()
        >>> ppl.update(torch.tensor(1.0), weight=3)
        >>> ppl.update(torch.tensor(2.0), weight=1)
        >>> round(ppl.compute().item(), 4)  # exp(1.25)
        3.4903
    """

    @override
    def compute(self) -> Tensor:
        return super().compute().exp()


def _float32_rope_buffers(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str, Tensor]]:
    # every rotary embedding's inverse frequencies (`inv_freq`, `original_inv_freq`, `long_inv_freq`, ...), as built
    return [
        (sub, name, buffer.detach().clone())
        for sub in module.modules()
        for name, buffer in sub.named_buffers(recurse=False)
        if "inv_freq" in name and buffer.dtype == torch.float32
    ]


class CausalLM(LightningModule):
    """Next-token training of a Hugging Face causal language model, loaded from disk or built from a config.

    The model is built in ``__init__`` so that it exists, with its weights, before the ``Trainer`` starts, and the
    CLI's seed makes a from-scratch model reproducible. Pretrained models load in the dtype they were saved in
    (``dtype="auto"``), so an 8B model does not pass through a 32 GB float32 copy; train it with
    ``precision="bf16-true"``.

    Logs ``train_loss`` and ``train_ppl`` every step and ``val_loss`` and ``val_ppl`` per validation run; both are
    token-weighted means, so the perplexity is that of the whole validation split.

    Args:
        model_path: local directory (or hub name, if ``local_files_only=False``) of a pretrained model for
            ``AutoModelForCausalLM.from_pretrained``. ``None`` builds a fresh Llama from ``config``.
        config: ``transformers.LlamaConfig`` arguments for a model built from scratch, merged over
            :data:`TINY_LLAMA` (so ``{"num_hidden_layers": 8}`` changes only the depth). Not allowed with
            ``model_path``.
        local_files_only: never download; a hub name then only resolves from the local cache. Set ``False`` to let
            ``from_pretrained`` fetch from the Hugging Face Hub.
        dtype: dtype ``from_pretrained`` loads the weights in (``"auto"``: as saved; or e.g. ``"bfloat16"``).
        lr: learning rate of the AdamW from :meth:`configure_optimizers`. The CLI's ``optimizer:`` replaces that
            method, and with it this value.
        gradient_checkpointing: recompute each decoder layer's activations in the backward pass instead of storing
            them.
        gradient_checkpointing_reentrant: use ``torch.utils.checkpoint``'s reentrant variant, which only passes
            gradients to a layer whose input requires grad. (transformers 5 makes the embedding output require grad
            whenever checkpointing is on; a strategy that freezes layers can narrow that.)

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_memopt.data import TextDataModule
        >>> model = CausalLM(config={"num_hidden_layers": 2})
        >>> trainer = Trainer(max_steps=2, precision="bf16-true", logger=False, enable_checkpointing=False)
        >>> trainer.fit(model, TextDataModule(max_bytes=50_000))  # doctest: +SKIP
    """

    def __init__(
        self,
        model_path: str | None = None,
        config: dict[str, Any] | None = None,
        local_files_only: bool = True,
        dtype: str = "auto",
        lr: float = 3e-4,
        gradient_checkpointing: bool = False,
        gradient_checkpointing_reentrant: bool = False,
    ) -> None:
        super().__init__()
        if model_path is not None and config is not None:
            raise ValueError(
                "Pass either `model_path` (load a pretrained model) or `config` (build one from scratch), not both."
                " To change a pretrained model's configuration, edit its config.json."
            )
        if lr <= 0:
            raise ValueError(f"lr should be > 0 but is: {lr}")
        self.save_hyperparameters()
        self.lr = lr
        self.model = self._build(model_path, config, local_files_only, dtype)
        self._rope_float32 = _float32_rope_buffers(self)
        if gradient_checkpointing:
            self._enable_checkpointing(gradient_checkpointing_reentrant)
        self.train_loss = MeanMetric()
        self.train_ppl = TokenPerplexity()
        self.val_loss = MeanMetric()
        self.val_ppl = TokenPerplexity()

    @staticmethod
    def _build(
        model_path: str | None, config: dict[str, Any] | None, local_files_only: bool, dtype: str
    ) -> PreTrainedModel:
        try:
            from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
        except ImportError as err:
            raise ImportError(
                "CausalLM wraps Hugging Face models: install them with `pip install 'lightning-memopt[recipes]'`."
            ) from err

        if model_path is None:
            return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **(config or {})}))
        # transformers 4.56 renamed `torch_dtype` to `dtype`.
        dtype_key = "dtype" if _TRANSFORMERS_DTYPE_KWARG else "torch_dtype"
        model_path = os.path.expanduser(model_path)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_path, local_files_only=local_files_only, **{dtype_key: dtype}
            )
        except OSError as err:
            if os.path.isdir(model_path):
                hint = "The directory exists but does not hold a loadable model (a config.json and weights)."
            elif model_path.startswith(("/", ".")):
                hint = "No such directory: point `model_path` at a local model directory (with a config.json)."
            elif local_files_only:
                hint = "It is not in the local Hugging Face cache; pass `local_files_only: false` to download it."
            else:
                hint = "Check the name on the Hugging Face Hub and your access to it."
            raise OSError(f"Could not load a model from model_path={model_path!r}. {hint} ({err})") from err
        # `from_pretrained` returns the model in eval mode, and Lightning does not switch it back: dropout would stay
        # off and transformers' gradient checkpointing (active only while `self.training`) would silently not run.
        return model.train()

    @override
    def _apply(self, fn: Any, recurse: bool = True) -> CausalLM:
        super()._apply(fn, recurse)
        # `bf16-true`/`16-true` cast the whole module with `.to(dtype)`, rotary inverse frequencies included: rounded
        # to bf16 they shift a rotary angle by radians at position 1000 (Llama 3's theta 500000), so training would
        # run a different model from the FP32-frequency one transformers loads after export. Keep them in FP32.
        for module, name, exact in getattr(self, "_rope_float32", ()):
            current = buffer(module, name)
            if current is not None and current.dtype != torch.float32:
                replace_buffer(module, name, exact.to(current.device))
        return self

    def _enable_checkpointing(self, reentrant: bool) -> None:
        kwargs = {"use_reentrant": reentrant}
        # transformers 5 renamed the method and deprecated the old name; 4.x only has the old one.
        if hasattr(self.model, "activation_checkpointing_enable"):
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    @override
    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> Tensor:
        """Logits of shape ``(batch, seq_len, vocab_size)``.

        ``position_ids`` that restart at 0 inside a row, with no ``attention_mask``, mark several samples packed into
        one sequence (as :class:`~lightning_memopt.data.InstructionDataModule` yields with ``packing=True``):
        transformers then keeps each sample from attending to the others.
        """
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).logits

    def _loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logits = self(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
        return next_token_loss(logits, batch)

    @staticmethod
    def _in_float32(*metrics: MeanMetric) -> None:
        # `bf16-true`/`16-true` cast the whole LightningModule with `.to(dtype)`, metric states included, and run the
        # step under a half-precision default dtype, in which Lightning's logging resets a metric's `dtype` (the one
        # it casts inputs to). bf16 keeps 8 significant bits: a running sum over batches would drop most of each one.
        for metric in metrics:
            metric.set_dtype(torch.float32)

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, tokens = self._loss(batch)
        self._in_float32(self.train_loss, self.train_ppl)
        self.train_loss(loss.detach(), tokens)
        self.train_ppl(loss.detach(), tokens)
        self.log("train_loss", self.train_loss, prog_bar=True)
        self.log("train_ppl", self.train_ppl)
        return loss

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, tokens = self._loss(batch)
        self._in_float32(self.val_loss, self.val_ppl)
        self.val_loss.update(loss, tokens)
        self.val_ppl.update(loss, tokens)
        self.log("val_loss", self.val_loss, prog_bar=True)
        self.log("val_ppl", self.val_ppl)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)
