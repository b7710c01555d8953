"""A plain LightningModule around a Hugging Face causal language model.

Nothing in it knows about BAdam: it is the kind of module users already have, and the strategies and callbacks of
this package must work with it unchanged.
"""

from __future__ import annotations

import os
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning_utilities.core.imports import RequirementCache
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_memopt.compat import buffer, replace_buffer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["IGNORE_INDEX", "TINY_LLAMA", "CausalLM", "TokenPerplexity", "chunked_next_token_loss", "next_token_loss"]

_TRANSFORMERS_DTYPE_KWARG = RequirementCache("transformers>=4.56")
# transformers 5's `_init_weights` recomputes rotary frequencies (its `from_pretrained` builds on the meta device too);
# 4.x leaves a non-persistent buffer materialised from the meta device as uninitialised memory.
_TRANSFORMERS_INITS_ROPE = RequirementCache("transformers>=5")

# config entries with which a model's forward changes the logits after its output head (Gemma 2/3's tanh soft-cap,
# Cohere's scale, Granite's divisor, ...): the chunked loss, which applies the head alone, would compute another loss
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")

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


def _next_token_targets(batch: dict[str, Tensor]) -> Tensor:
    # the target of every position: `targets` as given; `labels` shifted left, the last position without one (padding
    # the targets instead of slicing the logits keeps the hidden states / logits contiguous: no copy of either)
    if "targets" in batch:
        return batch["targets"]
    if "labels" in batch:
        labels = batch["labels"]
        return torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), IGNORE_INDEX)], dim=1)
    raise KeyError(f"The batch needs `targets` or `labels` next to `input_ids`, but has keys {sorted(batch)}.")


def _check_positions(outputs: Tensor, targets: Tensor, what: str) -> None:
    if outputs.shape[:-1] != targets.shape:
        raise ValueError(
            f"The {what} of shape {tuple(outputs.shape)} do not fit the batch's targets of shape"
            f" {tuple(targets.shape)}: pass one position per input token, `(batch, seq_len, ...)`, as the model"
            " returns them."
        )


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
    targets = _next_token_targets(batch)
    _check_positions(logits, targets, "logits")
    loss_sum = _cross_entropy_sum(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
    tokens = (targets != IGNORE_INDEX).sum()
    return loss_sum / tokens.clamp(min=1), tokens


def _cross_entropy_sum(logits: Tensor, targets: Tensor) -> Tensor:
    # Half-precision logits lose the small probabilities that dominate the loss of a good model.
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _head_cross_entropy_sum(head: torch.nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    return _cross_entropy_sum(head(hidden), targets)


def chunked_next_token_loss(
    hidden: Tensor, head: torch.nn.Module, batch: dict[str, Tensor], chunk_size: int
) -> tuple[Tensor, Tensor]:
    """:func:`next_token_loss` of ``head(hidden)``, without ever holding more than ``chunk_size`` positions' logits.

    The logits are the largest activation of a model with a large vocabulary: ``batch * seq_len * vocab_size`` floats
    (2 GB in FP32 for 4096 tokens of Llama 3's 128 K vocabulary), held for backward by the cross-entropy, while the
    hidden states they come from are ``vocab_size / hidden_size`` (32 for Llama 3 8B) times smaller. Here the
    ``batch * seq_len`` positions are split into chunks of ``chunk_size``; each chunk's head projection, FP32 upcast
    and cross-entropy run under non-reentrant activation checkpointing, so the forward pass keeps only views of the
    hidden states and the backward pass recomputes one chunk's logits at a time. The result, loss and gradients
    alike, is that of :func:`next_token_loss` up to floating-point summation order; the cost is one more head
    projection per chunk in backward.

    Args:
        hidden: final hidden states ``(batch, seq_len, hidden_size)``, what the model feeds its output head.
        head: the output head (``model.get_output_embeddings()`` of a Hugging Face model); any module that maps
            hidden states to logits position by position.
        batch: ``targets`` or ``labels``, as for :func:`next_token_loss`.
        chunk_size: positions (of the flattened ``batch * seq_len``) whose logits exist at once.

    Returns:
        The mean cross-entropy per predicted token and the number of predicted tokens.

    Example::

        >>> head = torch.nn.Linear(8, 256, bias=False)
        >>> hidden = torch.randn(2, 5, 8, requires_grad=True)
        >>> batch = {"labels": torch.randint(0, 256, (2, 5))}
        >>> loss, tokens = chunked_next_token_loss(hidden, head, batch, chunk_size=3)
        >>> expected, _ = next_token_loss(head(hidden), batch)
        >>> tokens.item(), torch.allclose(loss, expected)
        (8, True)
        >>> loss.backward()  # recomputes each chunk's logits, one chunk at a time
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size should be >= 1 but is: {chunk_size}")
    targets = _next_token_targets(batch)
    _check_positions(hidden, targets, "hidden states")
    loss_of_chunk = partial(_head_cross_entropy_sum, head)
    parts = []
    for hidden_chunk, targets_chunk in zip(
        hidden.reshape(-1, hidden.size(-1)).split(chunk_size), targets.reshape(-1).split(chunk_size), strict=True
    ):
        if torch.is_grad_enabled():
            # RNG state preserved: a head with dropout (a LoRA adapter on it) must recompute the same mask
            parts.append(checkpoint(loss_of_chunk, hidden_chunk, targets_chunk, use_reentrant=False))
        else:
            parts.append(loss_of_chunk(hidden_chunk, targets_chunk))
    tokens = (targets != IGNORE_INDEX).sum()
    loss_sum = torch.stack(parts).sum() if parts else hidden.new_zeros((), dtype=torch.float32)
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
    ``precision="bf16-true"``. A model built from a config with ``dtype="bfloat16"`` is likewise created on the meta
    device and materialised in bf16, with no FP32 copy.

    The loss does not materialise the full logits: with ``loss_chunk_size`` set (the default), the model runs with its
    output head skipped and :func:`chunked_next_token_loss` applies the head, the FP32 upcast and the cross-entropy a
    chunk of positions at a time, recomputing each chunk's logits in backward. With a 128 K vocabulary the logits are
    the largest activation of a step (2 GB in FP32 per 4096 tokens); chunked, one chunk's logits exist at a time.
    :meth:`forward` still returns the full logits.

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
        dtype: dtype of the weights. With ``model_path``: the dtype ``from_pretrained`` loads them in (``"auto"``: as
            saved; or e.g. ``"bfloat16"``). With ``config``: ``"auto"`` (or ``"float32"``) initialises in FP32 as
            ``LlamaForCausalLM(config)`` does; another dtype (``"bfloat16"``, ``"float16"``) builds the model on the
            meta device and materialises it in that dtype with transformers' own initialisation (same distribution,
            not the same numbers as the FP32 init under the same seed; rotary frequencies exact, in FP32; tied
            weights tied), so building takes the memory of the half-precision weights only.
        lr: learning rate of the AdamW from :meth:`configure_optimizers`. The CLI's ``optimizer:`` replaces that
            method, and with it this value.
        gradient_checkpointing: recompute each decoder layer's activations in the backward pass instead of storing
            them.
        gradient_checkpointing_reentrant: use ``torch.utils.checkpoint``'s reentrant variant, which only passes
            gradients to a layer whose input requires grad. (transformers 5 makes the embedding output require grad
            whenever checkpointing is on; a strategy that freezes layers can narrow that.)
        loss_chunk_size: positions (of the flattened ``batch * seq_len``) whose logits the training and validation
            loss computes at once (:func:`chunked_next_token_loss`); ``None`` computes the full logits first, as
            :meth:`forward` returns them. The result is the same up to floating-point summation order. Models that
            change the logits after their output head (a config with ``final_logit_softcapping``, ``logit_scale``,
            ``logits_scaling`` or ``output_multiplier``, as Gemma 2, Cohere and Granite have; a forward that returns
            something other than the head's output) or have no ``get_output_embeddings()`` fall back to the full
            logits, with a warning.

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
        loss_chunk_size: int | None = 1024,
    ) -> None:
        super().__init__()
        if model_path is not None and config is not None:
            raise ValueError(
                "Pass either `model_path` (load a pretrained model) or `config` (build one from scratch), not both."
                " To change a pretrained model's configuration, edit its config.json."
            )
        if lr <= 0:
            raise ValueError(f"lr should be > 0 but is: {lr}")
        if loss_chunk_size is not None and loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size should be >= 1 (or None for the full logits) but is: {loss_chunk_size}")
        self.save_hyperparameters()
        self.lr = lr
        self.loss_chunk_size = loss_chunk_size
        self._full_logits_reason: str | None = None
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

        # transformers 4.56 renamed `torch_dtype` to `dtype`.
        dtype_key = "dtype" if _TRANSFORMERS_DTYPE_KWARG else "torch_dtype"
        if model_path is None:
            llama_config = LlamaConfig(**{**TINY_LLAMA, **(config or {})})
            if dtype in ("auto", "float32"):
                return LlamaForCausalLM(llama_config)  # the seed's FP32 init, as before `dtype` applied to configs
            weight_dtype = getattr(torch, dtype, None)
            if not isinstance(weight_dtype, torch.dtype) or not weight_dtype.is_floating_point:
                raise ValueError(
                    f"dtype should be 'auto' or a floating-point torch dtype such as 'bfloat16' but is: {dtype!r}"
                )
            if not _TRANSFORMERS_INITS_ROPE:
                # 4.x cannot initialise a meta-built model's rotary buffers; building under the default dtype
                # still holds the half-precision weights only (initialised twice: torch's init, then transformers')
                return AutoModelForCausalLM.from_config(llama_config, **{dtype_key: weight_dtype})
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(llama_config, **{dtype_key: weight_dtype})
            model.to_empty(device="cpu")
            # `to_empty` gives each module that shares a tied weight its own empty tensor: tie them again before any
            # is written, so the duplicate's pages are never touched and the embedding is not held twice
            model.tie_weights()
            # transformers' initialisation of every weight, and of the rotary frequencies (FP32, from the config)
            model.init_weights()
            return model
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
        head = self._chunked_head()
        if head is not None and self.loss_chunk_size is not None:
            hidden = self._hidden_states(batch, head)
            if hidden is not None:
                return chunked_next_token_loss(hidden, head, batch, self.loss_chunk_size)
        logits = self(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
        return next_token_loss(logits, batch)

    def _chunked_head(self) -> torch.nn.Module | None:
        # looked up at every step: the model can be replaced after `__init__` (peft's `get_peft_model` wraps it)
        if self.loss_chunk_size is None or self._full_logits_reason is not None:
            return None
        get_head = getattr(self.model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        config = getattr(self.model, "config", None)
        get_text_config = getattr(config, "get_text_config", None)
        if callable(get_text_config):
            config = get_text_config()
        transforms = [key for key in _LOGIT_TRANSFORMS if getattr(config, key, None) is not None]
        if not isinstance(head, torch.nn.Module):
            self._use_full_logits("it has no output head (`get_output_embeddings()` returns None)")
        elif transforms:
            self._use_full_logits(f"its forward changes the logits after the head ({', '.join(transforms)})")
        else:
            return head
        return None

    def _hidden_states(self, batch: dict[str, Tensor], head: torch.nn.Module) -> Tensor | None:
        """The model's output with its head skipped: the final hidden states, or ``None`` if its forward changed them.

        The head's ``forward`` (not the module: its hooks, peft's wrappers and the model's forward all stay as they
        are) passes its input through for one call, so whatever the model's forward and transformers' gradient
        checkpointing do before the head still happens.
        """
        fed: list[Tensor] = []

        def skip_head(hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            fed.append(hidden)
            return hidden

        own = head.__dict__.get("forward")  # an instance-level forward, as accelerate's hooks install
        head.forward = skip_head  # type: ignore[method-assign]
        try:
            # `forward`, not `__call__`: under `badam_fsdp` the step already runs inside this module's call, and a
            # nested one would reshard its weights (the head's among them) on return, before the chunks need them
            out = self.forward(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
        finally:
            if own is None:
                del head.forward
            else:
                head.forward = own
        if len(fed) == 1 and out is fed[0]:
            return out
        # scaled, soft-capped, sliced or upcast after the head (a model we do not know): this step, and every later
        # one, computes the full logits; the wasted forward happens once
        self._use_full_logits("its forward changes the output of the head (or calls it more than once)")
        return None

    def _use_full_logits(self, reason: str) -> None:
        self._full_logits_reason = reason
        rank_zero_warn(
            f"CausalLM(loss_chunk_size={self.loss_chunk_size}) computes this model's loss from the full logits, not in"
            f" chunks: {reason}. Pass `loss_chunk_size=None` to choose the full logits and silence this warning."
        )

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
