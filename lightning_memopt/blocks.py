"""Partition a model's parameters into the blocks that BAdam trains one at a time.

Pure functions over ``torch.nn.Module``: nothing here knows about Lightning. A *block* is a named, ordered tuple of
parameter names (as ``module.named_parameters()`` spells them). The default partition finds the model's repeated
layers (``model.layers.N``, ``transformer.h.N``, ``encoder.layer.N``, ``blocks.N``, ...) and makes one block per
layer; the token embedding and the language-model head become blocks only when asked. ``granularity`` splits the
layers finer: one block per module of a layer (attention, MLP, norms) or per parameter tensor.

Example::

    >>> from torch import nn
    >>> net = nn.Sequential()
    >>> net.embed = nn.Embedding(10, 4)
    >>> net.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
    >>> [b.name for b in partition(net)]
    ['layers.0', 'layers.1', 'layers.2']
    >>> partition(net, block_prefixes=["layers.0", ["layers.1", "layers.2"]])[1].param_names
    ('layers.1.weight', 'layers.1.bias', 'layers.2.weight', 'layers.2.bias')
    >>> [b.name for b in partition(net, granularity="matrix")][:3]
    ['layers.0.weight', 'layers.0.bias', 'layers.1.weight']
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

__all__ = [
    "GRANULARITIES",
    "Block",
    "BlockPartitionError",
    "Granularity",
    "enclosing_layers",
    "find_embedding_params",
    "find_layer_lists",
    "find_lm_head_params",
    "matches_prefix",
    "partition",
]

Granularity = Literal["layer", "module", "matrix"]
GRANULARITIES: tuple[str, ...] = ("layer", "module", "matrix")


class BlockPartitionError(ValueError):
    """The parameters cannot be split into blocks as asked; the message says what to change.

    Example::

        >>> from torch import nn
        >>> from lightning_memopt.blocks import BlockPartitionError, partition
        >>> try:
        ...     partition(nn.Linear(2, 2), block_prefixes=["decoder."])
        ... except BlockPartitionError as error:
        ...     print(type(error).__name__)
        BlockPartitionError
    """


@dataclass(frozen=True)
class Block:
    """One unit of BAdam's block coordinate descent.

    Attributes:
        name: a readable name, e.g. ``"model.layers.3"`` or ``"embedding"``.
        param_names: names of the parameters in the block, in the model's ``named_parameters()`` order.
        module_paths: the submodules whose forward holds the block, as paths from the partitioned module: its layer
            (or layers), or the modules an explicit prefix names. The strategies hook the block's input there (for
            reentrant gradient checkpointing) and shard them as FSDP units. Empty where no such module exists (the
            embedding and head blocks, regex blocks, prefixes of single parameters). Derived from the partition, so
            it takes no part in comparing blocks.

    Example::

        >>> Block("model.layers.0", ("model.layers.0.weight",), module_paths=("model.layers.0",)).module_paths
        ('model.layers.0',)
    """

    name: str
    param_names: tuple[str, ...]
    module_paths: tuple[str, ...] = field(default=(), compare=False)


def matches_prefix(name: str, prefix: str) -> bool:
    """Whether the dotted parameter ``name`` lies under ``prefix``, respecting name boundaries.

    ``layers.1`` and ``layers.1.`` both match ``layers.1.weight`` but never ``layers.10.weight``.

    Example::

        >>> matches_prefix("model.layers.10.mlp.weight", "model.layers.1")
        False
        >>> matches_prefix("model.layers.1.mlp.weight", "model.layers.1.")
        True
    """
    prefix = prefix.rstrip(".")
    if not prefix:
        return True
    return name == prefix or name.startswith(prefix + ".")


def _is_composite(module: nn.Module) -> bool:
    return any(True for _ in module.children())


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def find_layer_lists(module: nn.Module) -> list[str]:
    """Dotted paths of the model's repeated-layer containers, outermost first, in registration order.

    A container counts when it is an ``nn.ModuleList`` (or an ``nn.Sequential`` of composite layers) with at least two
    children of one class that hold parameters. Containers nested inside a found one are not returned (the layers of a
    mixture-of-experts stay whole).

    Example::

        >>> from torch import nn
        >>> enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), num_layers=2, enable_nested_tensor=False)
        >>> find_layer_lists(enc)
        ['layers']
    """
    found: list[str] = []
    for path, sub in module.named_modules():
        if any(matches_prefix(path, outer) for outer in found):
            continue
        if not isinstance(sub, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(sub.children())
        if len(children) < 2 or len({type(c) for c in children}) != 1 or not all(_has_params(c) for c in children):
            continue
        if isinstance(sub, nn.Sequential) and not _is_composite(children[0]):
            # a Sequential of plain Linear/Conv layers is usually one layer, not a stack of layers
            continue
        found.append(path)
    return found


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def find_embedding_params(module: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
    """Names of the parameters of ``nn.Embedding`` modules outside the ``exclude`` prefixes (the layer containers).

    Example::

        >>> from torch import nn
        >>> from lightning_memopt.blocks import find_embedding_params
        >>> find_embedding_params(nn.ModuleDict({"tok": nn.Embedding(10, 4), "proj": nn.Linear(4, 4)}))
        ['tok.weight']
    """
    names: list[str] = []
    for path, sub in module.named_modules():
        if isinstance(sub, nn.Embedding) and not any(matches_prefix(path, ex) for ex in exclude):
            names.extend(_join(path, n) for n, _ in sub.named_parameters(recurse=False))
    return names


def find_lm_head_params(module: nn.Module, exclude: Sequence[str] = (), tied: bool = False) -> list[str]:
    """Names of the parameters of the output projection (the language-model head).

    Hugging Face models report it through ``get_output_embeddings()``; otherwise a ``Linear`` named ``lm_head`` or one
    that projects onto the vocabulary of the model's largest ``nn.Embedding`` counts. A weight shared with an
    embedding (a tied head) is the embedding's and left out, unless ``tied=True``.

    Example::

        >>> from torch import nn
        >>> from lightning_memopt.blocks import find_lm_head_params
        >>> model = nn.ModuleDict({"embed": nn.Embedding(10, 4), "lm_head": nn.Linear(4, 10, bias=False)})
        >>> find_lm_head_params(model)
        ['lm_head.weight']
    """
    by_id = {id(m): path for path, m in module.named_modules()}
    heads: list[str] = []
    for sub in module.modules():
        getter = getattr(sub, "get_output_embeddings", None)
        if callable(getter):
            try:
                head = getter()
            except (NotImplementedError, AttributeError):
                head = None
            if isinstance(head, nn.Module) and id(head) in by_id:
                heads.append(by_id[id(head)])
    if not heads:
        vocab = max(
            (m.num_embeddings for m in module.modules() if isinstance(m, nn.Embedding)),
            default=None,
        )
        for path, sub in module.named_modules():
            if not isinstance(sub, nn.Linear) or any(matches_prefix(path, ex) for ex in exclude):
                continue
            if path.split(".")[-1] == "lm_head" or (vocab is not None and sub.out_features == vocab):
                heads.append(path)
    # look parameters up by identity: a head's own parameter may be registered under another name too (BERT's
    # decoder bias is `cls.predictions.bias`), and a weight shared with an embedding is not the head's own
    name_of = {id(p): n for n, p in module.named_parameters()}
    embedding_ids = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    names: list[str] = []
    for path in dict.fromkeys(heads):
        for p in module.get_submodule(path).parameters():
            if id(p) in name_of and (tied or id(p) not in embedding_ids):
                names.append(name_of[id(p)])
    return list(dict.fromkeys(names))


def _module_paths(names: Sequence[str]) -> list[str]:
    paths: dict[str, None] = {}
    for n in names:
        parts = n.split(".")
        for i in range(1, len(parts)):
            paths[".".join(parts[:i])] = None
    return list(paths)


def _suggest(prefix: str, names: Sequence[str]) -> str:
    stripped = prefix.rstrip(".")
    paths = _module_paths(names)
    containing = [p for p in paths if p.endswith("." + stripped)]
    if containing:
        shown = ", ".join(repr(p) for p in containing[:4])
        return f" Did you mean {shown}? (prefixes are matched from the start of the parameter name)"
    close = difflib.get_close_matches(stripped, paths, n=3)
    if close:
        return f" The closest module names are {', '.join(repr(c) for c in close)}."
    return f" Parameter names start like {names[0]!r}." if names else ""


def partition(
    module: nn.Module,
    block_prefixes: Sequence[str | Sequence[str]] | None = None,
    block_regexes: Sequence[str] | None = None,
    include_embedding: bool = False,
    include_lm_head: bool = False,
    trainable_only: bool = True,
    granularity: Granularity = "layer",
    layers_per_block: int = 1,
) -> list[Block]:
    """Split ``module``'s parameters into BAdam blocks.

    Args:
        module: the model (a ``LightningModule`` works too; names are then relative to it).
        block_prefixes: explicit blocks, one entry per block: a dotted prefix (``"model.layers.0"``) or a list of
            prefixes that form one block together. Prefixes respect name boundaries.
        block_regexes: explicit blocks as regular expressions searched in each parameter name, one per block.
            Prefixes and regexes may be combined; prefix blocks come first.
        include_embedding: with the automatic partition, add the token/position embeddings as the first block.
        include_lm_head: with the automatic partition, add the output head and everything else outside the layers
            and the embeddings (the final norm, GPT-2's ``ln_f``) as the last block, as the official BlockOptimizer
            does. A head tied to the embedding trains through its shared weight, which joins this block unless
            ``include_embedding`` made the embedding a block already.
        trainable_only: ignore parameters with ``requires_grad=False`` (frozen by the user).
        granularity: how finely the automatic partition splits: ``"layer"`` (one block per repeated layer),
            ``"module"`` (one block per direct child module of a layer that holds parameters, e.g. ``self_attn``,
            ``mlp``, ``input_layernorm``; parameters registered on the layer itself form one more block named after
            the layer) or ``"matrix"`` (one block per parameter tensor, embedding and head included). Finer blocks
            need a smaller set of FP32 masters and optimizer state at a time (see ``BlockSwitch(budget=...)``).
            Only for the automatic partition: explicit prefixes/regexes already say what a block is.
        layers_per_block: with the automatic partition at ``"layer"`` granularity, blocks of this many consecutive
            layers (the last block of a layer list may hold fewer), named ``"layers.0 + layers.1 + ..."``. More of the
            model trains at each step, for proportionally more FP32 masters, gradients and optimizer state; on small
            models and short schedules it closes much of BAdam's gap to full AdamW (``docs/benchmarks.md``,
            "Fine-tuning").

    Returns:
        The blocks, in training order for ``order="ascending"``.

    Raises:
        BlockPartitionError: no repeated layers found, a prefix or regex matches no parameter, a parameter falls in
            two blocks, or ``granularity`` is unknown or combined with explicit blocks. The message says what to pass
            instead.

    Example::

        >>> from torch import nn
        >>> net = nn.Module()
        >>> net.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(11))
        >>> partition(net, block_prefixes=["layers.1"])[0].param_names
        ('layers.1.weight', 'layers.1.bias')
        >>> len(partition(net, granularity="matrix"))
        22
        >>> [b.name for b in partition(net, layers_per_block=4)][-1]
        'layers.8 + layers.9 + layers.10'
    """
    if granularity not in GRANULARITIES:
        raise BlockPartitionError(
            f"granularity={granularity!r} is not known; choose one of {', '.join(map(repr, GRANULARITIES))}."
        )
    _check_layers_per_block(layers_per_block)
    if layers_per_block > 1 and (block_prefixes is not None or block_regexes is not None or granularity != "layer"):
        raise BlockPartitionError(
            f"layers_per_block={layers_per_block} groups the automatic one-block-per-layer partition; it cannot be "
            "combined with block_prefixes / block_regexes (list the layers of each block there instead) or with "
            f"granularity={granularity!r} (use granularity='layer')."
        )
    names = [n for n, p in module.named_parameters() if p.requires_grad or not trainable_only]
    if not names:
        raise BlockPartitionError(
            "The model has no trainable parameters, so there is nothing for BAdam to train. "
            "Unfreeze the parameters you want to fine-tune (requires_grad=True)."
        )
    for arg, value in (("block_prefixes", block_prefixes), ("block_regexes", block_regexes)):
        if isinstance(value, str):
            raise BlockPartitionError(
                f"{arg} takes a list with one entry per block, not a string: pass {arg}=[{value!r}]."
            )
    blocks: list[Block] = []
    if block_prefixes is not None or block_regexes is not None:
        if granularity != "layer":
            raise BlockPartitionError(
                f"granularity={granularity!r} splits the automatic partition's layers and cannot be combined with "
                "block_prefixes/block_regexes. Name the finer blocks yourself (e.g. block_prefixes="
                "['model.model.layers.0.self_attn', 'model.model.layers.0.mlp', ...]) or leave granularity='layer'."
            )
        if not block_prefixes and not block_regexes:
            raise BlockPartitionError(
                "block_prefixes/block_regexes are empty, so there would be no block to train: give at least one "
                "block, or leave both as None for the automatic partition (one block per repeated layer)."
            )
        for entry in block_prefixes or ():
            prefixes = [entry] if isinstance(entry, str) else list(entry)
            if not prefixes:
                raise BlockPartitionError("An entry of block_prefixes is an empty list; give at least one prefix.")
            members: list[str] = []
            for prefix in prefixes:
                if not prefix.rstrip("."):
                    raise BlockPartitionError(
                        "An empty block prefix would match every parameter. Name the module, e.g. 'model' for a "
                        "LightningModule's self.model."
                    )
                hit = [n for n in names if matches_prefix(n, prefix)]
                if not hit:
                    raise BlockPartitionError(
                        f"Block prefix {prefix!r} matches no trainable parameter.{_suggest(prefix, names)}"
                    )
                members.extend(hit)
            member_set = set(members)
            stripped = [p.rstrip(".") for p in prefixes]
            paths = tuple(p for p in stripped if _is_submodule(module, p))
            blocks.append(Block(" + ".join(stripped), tuple(n for n in names if n in member_set), paths))
        for pattern in block_regexes or ():
            try:
                regex = re.compile(pattern)
            except re.error as err:
                raise BlockPartitionError(f"Block regex {pattern!r} is not a valid regular expression: {err}") from err
            hit = [n for n in names if regex.search(n)]
            if not hit:
                raise BlockPartitionError(
                    f"Block regex {pattern!r} matches no trainable parameter. Parameter names look like "
                    f"{names[0]!r}; regexes are applied with re.search."
                )
            blocks.append(Block(pattern, tuple(hit)))
    else:
        layer_lists = find_layer_lists(module)
        if not layer_lists:
            raise BlockPartitionError(
                f"Found no repeated layers (an nn.ModuleList of identical layers) in {type(module).__name__}, so the "
                "blocks cannot be chosen automatically. Pass block_prefixes=[...] (one prefix, or list of prefixes, "
                f"per block) or block_regexes=[...]; parameter names look like {names[0]!r}."
            )
        if include_embedding:
            emb = [n for n in find_embedding_params(module, exclude=layer_lists) if n in names]
            if emb:
                blocks.extend(_split_whole("embedding", tuple(emb), granularity))
        for path in layer_lists:
            container = module.get_submodule(path)
            in_list: list[Block] = []
            for child_name, layer_module in container.named_children():
                layer = _join(path, child_name)
                members_t = tuple(n for n in names if matches_prefix(n, layer))
                if members_t:
                    in_list.extend(_split_layer(layer, layer_module, members_t, granularity))
            blocks.extend(_group_layers(in_list, layers_per_block))
        if include_lm_head:
            head = _head_block_params(module, names, blocks, layer_lists)
            if head:
                blocks.extend(_split_whole("lm_head", tuple(head), granularity))
    _check_disjoint(blocks)
    return blocks


def _check_layers_per_block(layers_per_block: object) -> None:
    """Raise a clear error unless ``layers_per_block`` is an int >= 1."""
    if isinstance(layers_per_block, bool) or not isinstance(layers_per_block, int) or layers_per_block < 1:
        raise BlockPartitionError(f"layers_per_block must be an int >= 1 but is: {layers_per_block!r}")


def _group_layers(layers: Sequence[Block], size: int) -> list[Block]:
    """Consecutive layer blocks merged ``size`` at a time (one layer list's; the last group may be smaller)."""
    if size == 1:
        return list(layers)
    groups = [layers[i : i + size] for i in range(0, len(layers), size)]
    return [
        Block(
            " + ".join(b.name for b in g),
            tuple(n for b in g for n in b.param_names),
            tuple(dict.fromkeys(path for b in g for path in b.module_paths)),
        )
        for g in groups
    ]


def _head_block_params(
    module: nn.Module, names: Sequence[str], blocks: Sequence[Block], layer_lists: Sequence[str]
) -> list[str]:
    """The head block: the output head and everything else outside the layers and the embeddings (the final norm,
    GPT-2's ``ln_f``, BERT's prediction transform), as the official BlockOptimizer's head block. A head tied to the
    embedding shares its weight: that weight joins the head block unless the embedding is a block already, so the head
    the user asked to train is trained either way."""
    taken = {n for b in blocks for n in b.param_names}
    embedding = set(find_embedding_params(module, exclude=layer_lists))
    head = [n for n in find_lm_head_params(module, exclude=layer_lists, tied=True) if n in names and n not in taken]
    rest = [
        n for n in names
        if n not in taken and n not in embedding and not any(matches_prefix(n, layers) for layers in layer_lists)
    ]  # fmt: skip
    head_set = set(head) | set(rest)
    # in the model's own order, each once
    return [n for n in names if n in head_set]


def _split_whole(name: str, members: tuple[str, ...], granularity: str) -> list[Block]:
    # the embedding and the head are single modules already: only "matrix" splits them (e.g. GPT-2's wte and wpe)
    if granularity == "matrix":
        return [Block(n, (n,)) for n in members]
    return [Block(name, members)]


def _split_layer(layer: str, layer_module: nn.Module, members: tuple[str, ...], granularity: str) -> list[Block]:
    # a module or matrix block lies inside its layer; reentrant checkpointing and FSDP units wrap the whole layer
    paths = (layer,)
    if granularity == "layer":
        return [Block(layer, members, paths)]
    if granularity == "matrix":
        return [Block(n, (n,), paths) for n in members]
    children = {name for name, _ in layer_module.named_children()}
    groups: dict[str, list[str]] = {}
    for n in members:
        head = n[len(layer) + 1 :].split(".", 1)[0]
        # parameters registered on the layer itself (not in a child module) form one block named after the layer
        key = _join(layer, head) if head in children else layer
        groups.setdefault(key, []).append(n)
    return [Block(key, tuple(group), paths) for key, group in groups.items()]


def _is_submodule(module: nn.Module, path: str) -> bool:
    """Whether ``path`` names a submodule of ``module`` (not the module itself, not a parameter)."""
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def enclosing_layers(module: nn.Module, param_names: Sequence[str]) -> list[str]:
    """Paths of the repeated layers (children of :func:`find_layer_lists` containers) that hold ``param_names``.

    A module- or matrix-sized block lives inside one layer; gradient checkpointing and FSDP wrap whole layers, so
    they act on these paths. Parameters outside every layer (embedding, head) contribute nothing.

    Example::

        >>> from torch import nn
        >>> net = nn.Module()
        >>> net.layers = nn.ModuleList(nn.Sequential(nn.Linear(2, 2), nn.ReLU()) for _ in range(3))
        >>> enclosing_layers(net, ["layers.2.0.weight", "layers.0.0.bias", "layers.2.0.bias"])
        ['layers.2', 'layers.0']
    """
    found: dict[str, None] = {}
    for path in find_layer_lists(module):
        container = module.get_submodule(path)
        layers = [_join(path, child) for child, _ in container.named_children()]
        for name in param_names:
            for layer in layers:
                if matches_prefix(name, layer):
                    found[layer] = None
                    break
    return list(found)


def _check_disjoint(blocks: Sequence[Block]) -> None:
    owner: dict[str, str] = {}
    for block in blocks:
        for n in block.param_names:
            if n in owner:
                raise BlockPartitionError(
                    f"Parameter {n!r} is in two blocks ({owner[n]!r} and {block.name!r}). Blocks must not overlap: "
                    "make the prefixes or regexes more specific."
                )
            owner[n] = block.name
