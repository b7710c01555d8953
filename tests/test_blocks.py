"""Block partition on real models: tiny Hugging Face Llama/GPT-2/BERT, Lightning's demo Transformer, BoringModel."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.demos.transformer import LightningTransformer, Transformer
from models import LlamaModule, tiny_llama
from torch import nn
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from lightning_memopt.blocks import Block, BlockPartitionError, find_layer_lists, matches_prefix, partition


class Wrapped(L.LightningModule):
    """An ordinary LightningModule holding a model as ``self.model``: parameter names gain the ``model.`` prefix."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def tiny_gpt2(num_layers: int = 3) -> GPT2LMHeadModel:
    cfg = GPT2Config(
        n_layer=num_layers, n_embd=32, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg)


def tiny_bert(num_layers: int = 3) -> BertForMaskedLM:
    cfg = BertConfig(
        num_hidden_layers=num_layers,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=32,
    )
    return BertForMaskedLM(cfg)


def tiny_demo_transformer() -> Transformer:
    return Transformer(vocab_size=100, ninp=32, nhead=2, nhid=64, nlayers=2)


@dataclass(frozen=True)
class Arch:
    """A model and what its partition must look like (names relative to the bare model)."""

    build: Callable[[], nn.Module]
    wrapped: Callable[[], L.LightningModule]
    layers: tuple[str, ...]
    outside: frozenset[str]  # parameters that belong to no layer: embeddings, final norms, head
    embedding: tuple[str, ...]
    lm_head: tuple[str, ...]  # the head block (include_lm_head=True): the head, the final norm, a tied weight
    lm_head_with_embedding: tuple[str, ...]  # the head block when the embedding is a block too


ARCHS = {
    "llama": Arch(
        build=lambda: tiny_llama(num_layers=3),
        wrapped=lambda: LlamaModule(num_layers=3),
        layers=("model.layers.0", "model.layers.1", "model.layers.2"),
        outside=frozenset({"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}),
        embedding=("model.embed_tokens.weight",),
        lm_head=("model.norm.weight", "lm_head.weight"),
        lm_head_with_embedding=("model.norm.weight", "lm_head.weight"),
    ),
    "llama_tied": Arch(
        build=lambda: tiny_llama(num_layers=3, tie_word_embeddings=True),
        wrapped=lambda: LlamaModule(num_layers=3, tie_word_embeddings=True),
        layers=("model.layers.0", "model.layers.1", "model.layers.2"),
        outside=frozenset({"model.embed_tokens.weight", "model.norm.weight"}),
        embedding=("model.embed_tokens.weight",),
        # tied: the head trains through the embedding's weight unless the embedding is a block already
        lm_head=("model.embed_tokens.weight", "model.norm.weight"),
        lm_head_with_embedding=("model.norm.weight",),
    ),
    "gpt2": Arch(
        build=tiny_gpt2,
        wrapped=lambda: Wrapped(tiny_gpt2()),
        layers=("transformer.h.0", "transformer.h.1", "transformer.h.2"),
        outside=frozenset(
            {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"}
        ),
        embedding=("transformer.wte.weight", "transformer.wpe.weight"),
        lm_head=("transformer.wte.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"),
        lm_head_with_embedding=("transformer.ln_f.weight", "transformer.ln_f.bias"),
    ),
    "bert": Arch(
        build=tiny_bert,
        wrapped=lambda: Wrapped(tiny_bert()),
        layers=("bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2"),
        outside=frozenset(
            {
                "bert.embeddings.word_embeddings.weight",
                "bert.embeddings.position_embeddings.weight",
                "bert.embeddings.token_type_embeddings.weight",
                "bert.embeddings.LayerNorm.weight",
                "bert.embeddings.LayerNorm.bias",
                "cls.predictions.bias",
                "cls.predictions.transform.dense.weight",
                "cls.predictions.transform.dense.bias",
                "cls.predictions.transform.LayerNorm.weight",
                "cls.predictions.transform.LayerNorm.bias",
            }
        ),
        embedding=(
            "bert.embeddings.word_embeddings.weight",
            "bert.embeddings.position_embeddings.weight",
            "bert.embeddings.token_type_embeddings.weight",
        ),
        # the MLM decoder's weight is tied to word_embeddings, but its output bias is its own parameter; it is shared
        # with (and therefore named after) ``cls.predictions.bias``. The head block is "the head and everything else":
        # the prediction transform and the embeddings' LayerNorm (not an nn.Embedding) too.
        lm_head=(
            "bert.embeddings.word_embeddings.weight",
            "bert.embeddings.LayerNorm.weight",
            "bert.embeddings.LayerNorm.bias",
            "cls.predictions.bias",
            "cls.predictions.transform.dense.weight",
            "cls.predictions.transform.dense.bias",
            "cls.predictions.transform.LayerNorm.weight",
            "cls.predictions.transform.LayerNorm.bias",
        ),
        lm_head_with_embedding=(
            "bert.embeddings.LayerNorm.weight",
            "bert.embeddings.LayerNorm.bias",
            "cls.predictions.bias",
            "cls.predictions.transform.dense.weight",
            "cls.predictions.transform.dense.bias",
            "cls.predictions.transform.LayerNorm.weight",
            "cls.predictions.transform.LayerNorm.bias",
        ),
    ),
    "demo_transformer": Arch(
        build=tiny_demo_transformer,
        wrapped=lambda: LightningTransformer(vocab_size=100),
        layers=(
            "transformer.encoder.layers.0",
            "transformer.encoder.layers.1",
            "transformer.decoder.layers.0",
            "transformer.decoder.layers.1",
        ),
        outside=frozenset(
            {
                "embedding.weight",
                "transformer.encoder.norm.weight",
                "transformer.encoder.norm.bias",
                "transformer.decoder.norm.weight",
                "transformer.decoder.norm.bias",
                "decoder.weight",
                "decoder.bias",
            }
        ),
        embedding=("embedding.weight",),
        lm_head=(
            "transformer.encoder.norm.weight",
            "transformer.encoder.norm.bias",
            "transformer.decoder.norm.weight",
            "transformer.decoder.norm.bias",
            "decoder.weight",
            "decoder.bias",
        ),
        lm_head_with_embedding=(
            "transformer.encoder.norm.weight",
            "transformer.encoder.norm.bias",
            "transformer.decoder.norm.weight",
            "transformer.decoder.norm.bias",
            "decoder.weight",
            "decoder.bias",
        ),
    ),
}


def _prefixed(prefix: str, names: tuple[str, ...] | frozenset[str]) -> list[str]:
    return [f"{prefix}{n}" for n in names]


def _params_under(module: nn.Module, path: str) -> tuple[str, ...]:
    return tuple(n for n, _ in module.get_submodule(path).named_parameters(prefix=path))


def _assert_one_block_per_layer(module: nn.Module, blocks: list[Block], layers: list[str], outside: list[str]) -> None:
    assert [b.name for b in blocks] == layers
    for block in blocks:
        assert block.param_names == _params_under(module, block.name), block.name
    all_names = [n for n, _ in module.named_parameters()]
    in_blocks = Counter(n for b in blocks for n in b.param_names)
    assert max(in_blocks.values()) == 1
    # every parameter is in exactly one layer block, except embeddings / final norms / head, which are in none
    assert set(in_blocks) == set(all_names) - set(outside)
    assert not set(outside) & set(in_blocks)
    assert set(outside) <= set(all_names)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_automatic_partition_makes_one_block_per_layer(arch: str) -> None:
    spec = ARCHS[arch]
    model = spec.build()
    _assert_one_block_per_layer(model, partition(model), list(spec.layers), list(spec.outside))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_automatic_partition_inside_lightning_module(arch: str) -> None:
    spec = ARCHS[arch]
    module = spec.wrapped()
    blocks = partition(module)
    _assert_one_block_per_layer(module, blocks, _prefixed("model.", spec.layers), _prefixed("model.", spec.outside))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_include_embedding_adds_first_block(arch: str) -> None:
    spec = ARCHS[arch]
    model = spec.build()
    blocks = partition(model, include_embedding=True)
    assert blocks[0] == Block("embedding", spec.embedding)
    assert blocks[1:] == partition(model)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_include_lm_head_adds_the_head_and_the_final_norm_as_last_block(arch: str) -> None:
    # tied heads too (GPT-2, Llama tied, BERT's decoder): the head block is never missing nor frozen
    spec = ARCHS[arch]
    model = spec.build()
    blocks = partition(model, include_lm_head=True)
    assert blocks[-1] == Block("lm_head", spec.lm_head)
    assert blocks[:-1] == partition(model)
    # with the embedding as the first block, a tied weight stays there (one block per parameter)
    both = partition(model, include_embedding=True, include_lm_head=True)
    assert both[0] == Block("embedding", spec.embedding) and both[-1] == Block("lm_head", spec.lm_head_with_embedding)
    assert both[1:-1] == partition(model)
    # every parameter outside the layers and the nn.Embedding modules is in the head block
    in_layers = {n for b in partition(model) for n in b.param_names}
    assert set(spec.outside) - set(spec.embedding) <= set(spec.lm_head) <= set(spec.outside) - in_layers


@pytest.mark.parametrize("arch", ["gpt2", "llama_tied"])
def test_tied_head_weight_is_in_exactly_one_block(arch: str) -> None:
    # named_parameters() reports the shared weight once, as the embedding's: it is in the embedding block when there
    # is one, else in the head block
    model = ARCHS[arch].build()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    tied = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
    head_only = partition(model, include_lm_head=True)
    assert tied in head_only[-1].param_names
    both = partition(model, include_embedding=True, include_lm_head=True)
    assert tied in both[0].param_names and tied not in both[-1].param_names


def test_embedding_and_lm_head_blocks_wrap_the_layers_inside_lightning_module() -> None:
    module = LlamaModule(num_layers=3)
    blocks = partition(module, include_embedding=True, include_lm_head=True)
    names = ["embedding", "model.model.layers.0", "model.model.layers.1", "model.model.layers.2", "lm_head"]
    assert [b.name for b in blocks] == names
    assert blocks[0].param_names == ("model.model.embed_tokens.weight",)
    # the head block holds the final norm with the head, as the official BlockOptimizer's
    assert blocks[-1].param_names == ("model.model.norm.weight", "model.lm_head.weight")


@pytest.fixture(scope="module")
def llama12() -> nn.Module:
    return tiny_llama(num_layers=12, hidden=16, intermediate_size=16)


@pytest.mark.parametrize("prefix", ["model.layers.1", "model.layers.1."])
def test_prefix_respects_name_boundaries(llama12: nn.Module, prefix: str) -> None:
    (block,) = partition(llama12, block_prefixes=[prefix])
    assert block.name == "model.layers.1"
    assert block.param_names == _params_under(llama12, "model.layers.1")
    assert not any(n.startswith(("model.layers.10.", "model.layers.11.")) for n in block.param_names)


def test_prefixes_one_string_or_a_list_per_block(llama12: nn.Module) -> None:
    blocks = partition(
        llama12,
        block_prefixes=["model.layers.10", ["model.layers.1", "model.layers.11."], ["lm_head", "model.embed_tokens"]],
    )
    assert [b.name for b in blocks] == [
        "model.layers.10",
        "model.layers.1 + model.layers.11",
        "lm_head + model.embed_tokens",
    ]
    assert blocks[0].param_names == _params_under(llama12, "model.layers.10")
    # members of a block come in the model's named_parameters() order, whatever order the prefixes were given in
    assert blocks[1].param_names == _params_under(llama12, "model.layers.1") + _params_under(llama12, "model.layers.11")
    assert blocks[2].param_names == ("model.embed_tokens.weight", "lm_head.weight")


def test_prefixes_on_a_plain_module_list() -> None:
    net = nn.Module()
    net.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(12))
    blocks = partition(net, block_prefixes=["layers.1", "layers.10."])
    assert blocks == [
        Block("layers.1", ("layers.1.weight", "layers.1.bias")),
        Block("layers.10", ("layers.10.weight", "layers.10.bias")),
    ]


@pytest.mark.parametrize(
    ("name", "prefix", "expected"),
    [
        ("layers.1.weight", "layers.1", True),
        ("layers.1.weight", "layers.1.", True),
        ("layers.1.weight", "layers", True),
        ("layers.1", "layers.1", True),
        ("layers.1", "layers.1.", True),
        ("model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp", True),
        ("layers.10.weight", "layers.1", False),
        ("layers.10.weight", "layers.1.", False),
        ("layers.1.weight", "layers.10", False),
        ("layers.1.weight", "lay", False),
        ("model.layers.1.weight", "layers.1", False),
        ("layers.1_extra.weight", "layers.1", False),
    ],
)
def test_matches_prefix(name: str, prefix: str, expected: bool) -> None:
    assert matches_prefix(name, prefix) is expected


def test_regex_blocks() -> None:
    model = tiny_llama(num_layers=3)
    blocks = partition(model, block_regexes=[r"layers\.[01]\.", r"layers\.2\.mlp\."])
    assert [b.name for b in blocks] == [r"layers\.[01]\.", r"layers\.2\.mlp\."]
    assert blocks[0].param_names == _params_under(model, "model.layers.0") + _params_under(model, "model.layers.1")
    assert blocks[1].param_names == _params_under(model, "model.layers.2.mlp")


def test_prefix_blocks_come_before_regex_blocks() -> None:
    model = tiny_llama(num_layers=3)
    blocks = partition(
        model, block_regexes=[r"\.mlp\."], block_prefixes=["model.embed_tokens", "model.layers.1.self_attn"]
    )
    assert [b.name for b in blocks] == ["model.embed_tokens", "model.layers.1.self_attn", r"\.mlp\."]
    assert blocks[0].param_names == ("model.embed_tokens.weight",)
    assert blocks[1].param_names == _params_under(model, "model.layers.1.self_attn")
    assert blocks[2].param_names == tuple(n for n, _ in model.named_parameters() if ".mlp." in n)


@pytest.mark.parametrize(
    ("kwargs", "first", "second"),
    [
        (dict(block_prefixes=["model.layers.0", "model.layers"]), "model.layers.0", "model.layers"),
        (
            dict(block_prefixes=[["model.layers.1", "model.norm"], "model.norm."]),
            "model.layers.1 + model.norm",
            "model.norm",
        ),
        (dict(block_regexes=[r"layers\.0\.", r"self_attn"]), r"layers\.0\.", "self_attn"),
        (dict(block_prefixes=["model.layers.2"], block_regexes=[r"\.2\.mlp"]), "model.layers.2", r"\.2\.mlp"),
    ],
    ids=["prefix-prefix", "list-prefix", "regex-regex", "prefix-regex"],
)
def test_overlapping_blocks_name_both(kwargs: dict, first: str, second: str) -> None:
    with pytest.raises(BlockPartitionError, match="in two blocks") as err:
        partition(tiny_llama(num_layers=3), **kwargs)
    assert f"({first!r} and {second!r})" in str(err.value)
    assert "more specific" in str(err.value)


def test_no_repeated_layers_asks_for_explicit_blocks() -> None:
    model = BoringModel()
    with pytest.raises(BlockPartitionError, match="no repeated layers") as err:
        partition(model)
    message = str(err.value)
    assert "BoringModel" in message
    assert "block_prefixes=[" in message
    assert "block_regexes=[" in message
    assert "'layer.weight'" in message
    # and the advice works
    assert partition(model, block_prefixes=["layer"]) == [Block("layer", ("layer.weight", "layer.bias"))]


@pytest.mark.parametrize(
    ("prefix", "hint"),
    [
        ("layers.0", "Did you mean 'model.model.layers.0'?"),
        ("model.layers.0", "Did you mean 'model.model.layers.0'?"),
        ("layers.0.mlp.", "Did you mean 'model.model.layers.0.mlp'?"),
        ("lm_head", "Did you mean 'model.lm_head'?"),
        ("model.model.layer.0", "'model.model.layers.0"),
    ],
)
def test_prefix_matching_nothing_suggests_the_right_name(prefix: str, hint: str) -> None:
    with pytest.raises(BlockPartitionError, match="matches no trainable parameter") as err:
        partition(LlamaModule(num_layers=3), block_prefixes=["model.model.layers.1", prefix])
    assert f"Block prefix {prefix!r}" in str(err.value)
    assert hint in str(err.value)


def test_regex_matching_nothing_shows_parameter_names() -> None:
    with pytest.raises(BlockPartitionError, match=r"Block regex '\^layers' matches no trainable parameter") as err:
        partition(LlamaModule(num_layers=3), block_regexes=[r"^layers"])
    assert "'model.model.embed_tokens.weight'" in str(err.value)
    assert "re.search" in str(err.value)


def test_invalid_regex() -> None:
    with pytest.raises(BlockPartitionError, match=r"Block regex 'layers.\(0' is not a valid regular expression"):
        partition(tiny_llama(num_layers=3), block_regexes=["layers.(0"])


def test_empty_prefix_list_for_a_block() -> None:
    with pytest.raises(BlockPartitionError, match="empty list; give at least one prefix"):
        partition(tiny_llama(num_layers=3), block_prefixes=["model.layers.0", []])


@pytest.mark.parametrize(
    "kwargs",
    [dict(block_prefixes=[]), dict(block_regexes=[]), dict(block_prefixes=[], block_regexes=[])],
    ids=["prefixes", "regexes", "both"],
)
def test_empty_explicit_block_list_is_an_error(kwargs: dict) -> None:
    # zero blocks leaves BAdam nothing to train; it must not pass silently
    with pytest.raises(BlockPartitionError, match=r"block_prefixes|block_regexes"):
        partition(tiny_llama(num_layers=3), **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [dict(block_prefixes="model.layers.0"), dict(block_regexes=r"layers\.0\.")],
    ids=["prefixes", "regexes"],
)
def test_a_bare_string_instead_of_a_list_is_an_error(kwargs: dict) -> None:
    # a str is a Sequence[str]: without a check every character becomes a block ("Block prefix 'm' matches ...")
    ((arg, value),) = kwargs.items()
    with pytest.raises(BlockPartitionError) as err:
        partition(tiny_llama(num_layers=3), **kwargs)
    assert arg in str(err.value)
    assert repr(value) in str(err.value)
    assert "list" in str(err.value)


def test_all_parameters_frozen() -> None:
    model = tiny_llama(num_layers=3).requires_grad_(False)
    with pytest.raises(BlockPartitionError, match="no trainable parameters") as err:
        partition(model)
    assert "requires_grad=True" in str(err.value)


def test_frozen_parameters_are_left_out_by_default() -> None:
    model = tiny_llama(num_layers=3)
    model.model.layers[0].requires_grad_(False)
    model.model.layers[1].mlp.requires_grad_(False)
    model.model.embed_tokens.requires_grad_(False)

    blocks = partition(model, include_embedding=True)
    assert [b.name for b in blocks] == ["model.layers.1", "model.layers.2"]
    assert blocks[0].param_names == tuple(n for n in _params_under(model, "model.layers.1") if ".mlp." not in n)
    assert blocks[1].param_names == _params_under(model, "model.layers.2")

    with pytest.raises(BlockPartitionError, match=r"'model\.layers\.0' matches no trainable parameter"):
        partition(model, block_prefixes=["model.layers.0"])

    everything = partition(model, include_embedding=True, trainable_only=False)
    assert [b.name for b in everything] == ["embedding", "model.layers.0", "model.layers.1", "model.layers.2"]
    assert everything[1:] == [Block(p, _params_under(model, p)) for p in ARCHS["llama"].layers]


class MoELayer(nn.Module):
    def __init__(self, dim: int = 4, num_experts: int = 3) -> None:
        super().__init__()
        self.router = nn.Linear(dim, num_experts)
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_experts))


def _with_children(**children: nn.Module) -> nn.Module:
    net = nn.Module()
    for name, child in children.items():
        net.add_module(name, child)
    return net


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: _with_children(layers=nn.ModuleList(MoELayer() for _ in range(2))), ["layers"]),
        (lambda: _with_children(moe=MoELayer()), ["moe.experts"]),
        (lambda: _with_children(mlp=nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))), []),
        (
            lambda: _with_children(stack=nn.Sequential(*(nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3)))),
            ["stack"],
        ),
        (lambda: _with_children(mixed=nn.ModuleList([nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4)])), []),
        (lambda: _with_children(single=nn.ModuleList([nn.Linear(4, 4)])), []),
        (lambda: _with_children(acts=nn.ModuleList(nn.ReLU() for _ in range(3))), []),
        (
            lambda: _with_children(
                enc=nn.ModuleList(nn.Linear(4, 4) for _ in range(2)), dec=nn.ModuleList(MoELayer() for _ in range(2))
            ),
            ["enc", "dec"],
        ),
        (tiny_demo_transformer, ["transformer.encoder.layers", "transformer.decoder.layers"]),
    ],
    ids=[
        "moe-outer-only",
        "lone-experts",
        "sequential-of-linear",
        "sequential-of-composites",
        "heterogeneous",
        "single-layer",
        "no-parameters",
        "two-lists-in-order",
        "demo-transformer",
    ],
)
def test_find_layer_lists(build: Callable[[], nn.Module], expected: list[str]) -> None:
    assert find_layer_lists(build()) == expected


def test_moe_layers_stay_whole() -> None:
    net = _with_children(embed=nn.Embedding(10, 4), layers=nn.ModuleList(MoELayer() for _ in range(2)))
    blocks = partition(net)
    assert [b.name for b in blocks] == ["layers.0", "layers.1"]
    assert blocks[0].param_names == _params_under(net, "layers.0")
    assert sum(".experts." in n for n in blocks[0].param_names) == 6


def test_partition_leaves_the_model_untouched() -> None:
    # the partition is pure: it must not touch parameter values or flags
    model = tiny_demo_transformer()
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    partition(model, include_embedding=True, include_lm_head=True)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0])
        assert p.requires_grad == before[n][1]


# ------------------------------------------------------------------------------------------------ layers_per_block
def test_layers_per_block_groups_consecutive_layers_within_each_layer_list() -> None:
    model = tiny_llama(num_layers=5, hidden=16, intermediate_size=16)
    single = partition(model)
    blocks = partition(model, layers_per_block=2, include_embedding=True, include_lm_head=True)
    assert [b.name for b in blocks] == [
        "embedding", "model.layers.0 + model.layers.1", "model.layers.2 + model.layers.3", "model.layers.4", "lm_head",
    ]  # fmt: skip
    # the same parameters, in the same order, as the one-layer blocks they merge
    assert blocks[1].param_names == single[0].param_names + single[1].param_names
    assert [n for b in blocks[1:-1] for n in b.param_names] == [n for b in single for n in b.param_names]
    # the blocks a user would spell out with block_prefixes are the same blocks
    prefixes = [["model.layers.0", "model.layers.1"], ["model.layers.2", "model.layers.3"], ["model.layers.4"]]
    explicit = partition(model, block_prefixes=prefixes)
    assert [b.param_names for b in explicit] == [b.param_names for b in blocks[1:-1]]
    # an encoder-decoder: groups never straddle two layer lists
    demo = partition(tiny_demo_transformer(), layers_per_block=4)
    assert [b.name for b in demo] == [
        "transformer.encoder.layers.0 + transformer.encoder.layers.1",
        "transformer.decoder.layers.0 + transformer.decoder.layers.1",
    ]
    assert partition(model, layers_per_block=1) == single


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_prefixes": ["model.layers.0"]}, "block_prefixes / block_regexes"),
        ({"block_regexes": [r"layers\.0\."]}, "block_prefixes / block_regexes"),
        ({"granularity": "module"}, "granularity='module'"),
    ],
)
def test_layers_per_block_refuses_what_it_cannot_group(kwargs: dict, match: str) -> None:
    model = tiny_llama(num_layers=2, hidden=16, intermediate_size=16)
    with pytest.raises(BlockPartitionError, match=match):
        partition(model, layers_per_block=2, **kwargs)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_layers_per_block_must_be_a_positive_int(bad: object) -> None:
    from lightning_memopt import BAdamStrategy

    model = tiny_llama(num_layers=2, hidden=16, intermediate_size=16)
    with pytest.raises(BlockPartitionError, match="layers_per_block must be an int >= 1"):
        partition(model, layers_per_block=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layers_per_block must be an int >= 1"):
        BAdamStrategy(layers_per_block=bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ module paths
def test_blocks_carry_the_module_paths_that_hold_them():
    # where the strategies hook a block's input (reentrant checkpointing) and which FSDP units they shard: recorded by
    # the partition itself, never parsed back out of the block's name
    model = tiny_llama(num_layers=4)
    layers = [f"model.layers.{i}" for i in range(4)]
    auto = partition(model, include_embedding=True, include_lm_head=True)
    assert [b.module_paths for b in auto] == [(), *((p,) for p in layers), ()]  # embedding and head: no module
    grouped = partition(model, layers_per_block=3)
    assert [b.module_paths for b in grouped] == [tuple(layers[:3]), (layers[3],)]
    for granularity in ("module", "matrix"):
        fine = partition(model, granularity=granularity)
        # a module or matrix block sits inside its layer, which is what checkpointing and FSDP wrap
        for block in fine:
            (layer,) = {re.match(r"model\.layers\.\d+", n).group(0) for n in block.param_names}
            assert block.module_paths == (layer,), block
    explicit = partition(
        model,
        block_prefixes=[["model.layers.0", "model.norm.weight"], "model.layers.1.mlp"],
        block_regexes=[r"layers\.2\."],
    )
    # prefixes that name modules count; a prefix of one parameter and a regex name no module
    assert [b.module_paths for b in explicit] == [("model.layers.0",), ("model.layers.1.mlp",), ()]
    assert explicit[0].name == "model.layers.0 + model.norm.weight"
    # derived data: blocks compare by name and parameters only
    assert explicit[1] == Block("model.layers.1.mlp", explicit[1].param_names)


def test_the_partition_is_computed_once_per_fit(tmp_path, monkeypatch):
    import lightning_memopt.strategies.badam as badam_module
    from lightning_memopt import BAdamStrategy, BlockSwitch

    calls: list[int] = []
    real = badam_module.partition
    monkeypatch.setattr(badam_module, "partition", lambda *a, **k: calls.append(1) or real(*a, **k))
    strategy = BAdamStrategy()
    trainer = L.Trainer(
        strategy=strategy,
        precision="bf16-true",
        max_steps=3,
        callbacks=[BlockSwitch(every=1, order="ascending")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(LlamaModule(num_layers=2, hidden=16))
    assert len(calls) == 1 and len(strategy.blocks) == 2
    assert not strategy._partitioned  # the next fit partitions its own module again
