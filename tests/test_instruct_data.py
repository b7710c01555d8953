"""InstructionDataModule: formats, masking checked against the tokenizer's own rendering (ChatML and Llama 3
templates), truncation, errors, padding, packing checked against a real model and CausalLM's loss, length grouping,
the memory-mapped on-disk cache, validation splits and a real fit whose val_loss is recomputed by hand."""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
from lightning.pytorch.utilities.data import _is_dataloader_shuffled
from pretrained import instruction_records, make_tokenizer, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

import lightning_memopt.instruct as instruct
from lightning_memopt.data import EOS_BYTE, InstructionDataModule
from lightning_memopt.instruct import ConversationEncoder, render_chat
from lightning_memopt.lm import IGNORE_INDEX, CausalLM, next_token_loss

# Many fixtures here are longer than their max_length on purpose; the tests that check the report catch it themselves.
pytestmark = pytest.mark.filterwarnings("ignore:InstructionDataModule.*truncated:UserWarning")

END = "<|im_end|>\n"  # what the test template renders after every turn's content

# Llama 3's own template, with its header and end-of-turn markers.
LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA3_END = "<|eot_id|>"


def make_llama3_tokenizer(out: Path) -> Path:
    """The test BPE tokenizer with Llama 3's marker tokens and chat template; like Llama 3, its EOS token is
    ``<|end_of_text|>``, not the end-of-turn ``<|eot_id|>``."""
    tokenizer = make_tokenizer(chat_template=False)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", LLAMA3_END]}
    )
    tokenizer.chat_template = LLAMA3_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def plain_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The BPE tokenizer without a chat template."""
    out = tmp_path_factory.mktemp("plain-tokenizer")
    make_tokenizer(out, chat_template=False)
    return out


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def chat_tokenizer(request: pytest.FixtureRequest, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tokenizer with a chat template and what that template renders after each turn's content."""
    if request.param == "chatml":
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True), END
    directory = make_llama3_tokenizer(tmp_path_factory.mktemp("llama3-tokenizer"))
    return AutoTokenizer.from_pretrained(directory, local_files_only=True), LLAMA3_END


def _data(paths: list[Path], tmp_path: Path, **kwargs: Any) -> InstructionDataModule:
    kwargs.setdefault("val_fraction", 0.0)
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    data = InstructionDataModule([str(path) for path in paths], **kwargs)
    data.setup("fit")
    return data


def _samples(data: InstructionDataModule) -> list[dict[str, torch.Tensor]]:
    assert data.train_set is not None
    return [data.train_set[index] for index in range(len(data.train_set))]


def _runs(ids: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """The labelled tokens as maximal runs of consecutive positions."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(ids.tolist(), labels.tolist(), strict=True):
        labelled = label != IGNORE_INDEX
        if labelled:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = labelled
    return runs


def _decoded_runs(tokenizer: Any, sample: dict[str, torch.Tensor]) -> list[str]:
    return [tokenizer.decode(run) for run in _runs(sample["input_ids"], sample["labels"])]


ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "They add up to 5."},
    {"instruction": "Name a colour.", "input": "", "output": "Blue.", "system": "Answer in one word."},
]
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome, since 1871."},
        ]
    }
]
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Hello there"}, {"from": "gpt", "value": "General Kenobi!"}]},
    {
        "system": "Be kind.",
        "conversations": [
            {"from": "user", "value": "Hi"},
            {"from": "chatgpt", "value": "Hello!"},
            {"from": "human", "value": "Bye"},
            {"from": "model", "value": "Goodbye!"},
        ],
    },
]
EXPECTED_MESSAGES = [
    [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "They add up to 5."}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ],
    CHAT[0]["messages"],
    [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "General Kenobi!"}],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye!"},
    ],
]


def _assert_masked_like_the_template(
    tokenizer: Any, sample: dict[str, torch.Tensor], messages: list[dict], end: str = END
) -> None:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert sample["input_ids"].tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    responses = [m["content"] for m in messages if m["role"] == "assistant"]
    # each labelled run is one response and its end-of-turn marker; every other token is IGNORE_INDEX (`_runs`)
    assert _decoded_runs(tokenizer, sample) == [response + end for response in responses]
    # Everything else (BOS, system, user turns, the assistant headers) is ignored.
    unlabelled = tokenizer.decode(sample["input_ids"][sample["labels"] == IGNORE_INDEX].tolist())
    for message in messages:
        if message["role"] != "assistant":
            assert message["content"] in unlabelled
    assert all(response not in unlabelled for response in responses)


def test_three_formats_are_detected_per_file_and_masked_like_the_chat_template(
    chat_tokenizer: tuple[Any, str], tmp_path: Path
) -> None:
    tokenizer, end = chat_tokenizer
    folder = tmp_path / "data"
    write_jsonl(folder / "a_alpaca.jsonl", ALPACA)
    write_jsonl(folder / "b_chat.json", CHAT)
    write_jsonl(folder / "c_sharegpt.jsonl", SHAREGPT)
    data = _data([folder], tmp_path, tokenizer=tokenizer.name_or_path)
    samples = _samples(data)
    assert len(samples) == len(EXPECTED_MESSAGES)
    for sample, messages in zip(samples, EXPECTED_MESSAGES, strict=True):
        _assert_masked_like_the_template(tokenizer, sample, messages, end)
    # multi-turn: both assistant turns of the chat record are trained
    assert _decoded_runs(tokenizer, samples[2]) == ["Paris." + end, "Rome, since 1871." + end]
    assert data.stats["samples"] == 5 and data.stats["files"] == 3 and data.stats["truncated"] == 0
    # generation stops at the template's end-of-turn marker, not at the tokenizer's EOS token
    marker = tokenizer.convert_tokens_to_ids(end.strip())
    assert data.eos_token_id == marker != tokenizer.eos_token_id


@pytest.mark.parametrize(
    ("records", "format", "field_map", "expected"),
    [
        (
            [{"prompt": "Say yes.", "completion": "Yes."}],
            "auto",
            {"instruction": "prompt", "output": "completion"},
            [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}],
        ),
        (
            [{"dialog": [{"speaker": "user", "text": "Ping"}, {"speaker": "assistant", "text": "Pong"}]}],
            "chat",
            {"messages": "dialog", "role": "speaker", "content": "text"},
            [{"role": "user", "content": "Ping"}, {"role": "assistant", "content": "Pong"}],
        ),
        (
            [{"turns": [{"who": "human", "says": "Ping"}, {"who": "gpt", "says": "Pong"}]}],
            "auto",
            {"conversations": "turns", "from": "who", "value": "says"},
            [{"role": "user", "content": "Ping"}, {"role": "assistant", "content": "Pong"}],
        ),
    ],
)
def test_field_map_remaps_keys(
    model_dir: Path, tokenizer: Any, tmp_path: Path, records: list, format: str, field_map: dict, expected: list
) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", records)
    data = _data([path], tmp_path, tokenizer=str(model_dir), format=format, field_map=field_map)
    _assert_masked_like_the_template(tokenizer, _samples(data)[0], expected)


def test_system_prompt_is_added_only_where_a_sample_has_none(model_dir: Path, tokenizer: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", ALPACA)
    data = _data([path], tmp_path, tokenizer=str(model_dir), system_prompt="Be helpful.")
    first, second = _samples(data)
    _assert_masked_like_the_template(
        tokenizer, first, [{"role": "system", "content": "Be helpful."}, *EXPECTED_MESSAGES[0]]
    )
    _assert_masked_like_the_template(tokenizer, second, EXPECTED_MESSAGES[1])


def test_train_on_all_labels_every_token_but_padding(model_dir: Path, tmp_path: Path) -> None:
    paths = [write_jsonl(tmp_path / "a.jsonl", ALPACA), write_jsonl(tmp_path / "s.jsonl", SHAREGPT)]
    data = _data(paths, tmp_path, tokenizer=str(model_dir), train_on="all", batch_size=4)
    batch = next(iter(data.train_dataloader()))
    real = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])
    assert (batch["labels"][~real] == IGNORE_INDEX).all() and (~real).any()


def test_plain_template_for_a_tokenizer_without_chat_template(plain_tokenizer_dir: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(plain_tokenizer_dir, local_files_only=True)
    path = write_jsonl(tmp_path / "data.jsonl", [CHAT[0]])
    data = _data([path], tmp_path, tokenizer=str(plain_tokenizer_dir))
    (sample,) = _samples(data)
    expected = (
        "<|begin_of_text|>### System:\nYou are terse.\n\n### User:\nCapital of France?\n\n### Assistant:\n"
        "Paris.<|end_of_text|>\n\n### User:\nAnd of Italy?\n\n### Assistant:\nRome, since 1871.<|end_of_text|>\n\n"
    )
    assert tokenizer.decode(sample["input_ids"].tolist()) == expected
    assert sample["input_ids"][0] == tokenizer.bos_token_id
    assert _decoded_runs(tokenizer, sample) == ["Paris.<|end_of_text|>", "Rome, since 1871.<|end_of_text|>"]
    assert data.eos_token_id == tokenizer.eos_token_id
    prompt = data.encode_prompt("Capital of Spain?")
    assert tokenizer.decode(prompt) == "<|begin_of_text|>### User:\nCapital of Spain?\n\n### Assistant:\n"
    # the message names the directory the user passed, not the tokenizer's class
    named = re.escape(repr(str(plain_tokenizer_dir)))
    with pytest.raises(ValueError, match=rf"template='chat' but the tokenizer at {named} has no chat template.*plain"):
        _data([path], tmp_path, tokenizer=str(plain_tokenizer_dir), template="chat")


def test_byte_level_plain_template(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"instruction": "Grüß dich", "output": "Hallo, Welt ✓"}])
    data = _data([path], tmp_path)
    (sample,) = _samples(data)
    expected = "### User:\nGrüß dich\n\n### Assistant:\nHallo, Welt ✓\x00\n\n".encode()
    assert bytes(sample["input_ids"].tolist()) == expected
    assert [bytes(run) for run in _runs(sample["input_ids"], sample["labels"])] == ["Hallo, Welt ✓\x00".encode()]
    assert data.vocab_size == 256 and data.eos_token_id == EOS_BYTE and data.get_tokenizer() is None
    assert data.decode(list("Grüß\x00".encode())) == "Grüß"
    assert bytes(data.encode_prompt("Hi")) == b"### User:\nHi\n\n### Assistant:\n"


def test_prompt_encoding_matches_the_template_and_the_response_end_marker(
    model_dir: Path, tokenizer: Any, tmp_path: Path
) -> None:
    data = InstructionDataModule(["unused.jsonl"], tokenizer=str(model_dir), system_prompt="Be brief.")
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hey"},
        {"role": "user", "content": "2+2?"},
    ]
    for prompt, messages in (("Hi", conversation[:1]), (conversation, conversation)):
        messages = [{"role": "system", "content": "Be brief."}, *messages]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert data.encode_prompt(prompt) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert data.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>") != tokenizer.eos_token_id
    assert data.vocab_size == len(tokenizer)
    ids = tokenizer("Hello world<|im_end|>", add_special_tokens=False)["input_ids"]
    assert data.decode(ids) == "Hello world"
    assert data.decode(ids, skip_special_tokens=False) == "Hello world<|im_end|>"


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer: Any) -> None:
    rewriting = AutoTokenizer.from_pretrained(tokenizer.name_or_path, local_files_only=True)
    # like templates that strip reasoning from all but the last assistant turn
    rewriting.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|im_start|>assistant\n...<|im_end|>"
        "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages = CHAT[0]["messages"]
    with pytest.raises(ValueError, match=r"not a prefix of the whole conversation's rendering.*template: plain"):
        render_chat(rewriting, messages)
    render_chat(rewriting, messages[:3])  # one response: nothing to rewrite


def _lengths_data(tmp_path: Path, records: list[dict], **kwargs: Any) -> InstructionDataModule:
    path = write_jsonl(tmp_path / "data.jsonl", records)
    return _data([path], tmp_path, **kwargs)


def test_truncation_is_counted_and_never_silent(tmp_path: Path) -> None:
    # byte-level: "### User:\na\n\n### Assistant:\n" is 28 bytes, then the output, its EOS byte and "\n\n"
    records = [
        {"instruction": "a", "output": "b" * 10},  # 41 bytes
        {"instruction": "a", "output": "b" * 40},  # 71 bytes; response bytes 28..68
        {"instruction": "a", "output": "b" * 30},  # 61 bytes; response bytes 28..58
    ]
    data = _lengths_data(tmp_path, records, max_length=50)
    assert [len(sample["input_ids"]) for sample in _samples(data)] == [41, 50, 50]
    assert data.stats["truncated"] == 2 and data.stats["dropped"] == 0
    assert data.stats["response_tokens_cut"] == (69 - 50) + (59 - 50)
    assert data.stats["response_tokens_dropped"] == 0

    dropped = _lengths_data(tmp_path, records, max_length=50, overlong="drop")
    assert [len(sample["input_ids"]) for sample in _samples(dropped)] == [41]
    assert dropped.stats["dropped"] == 2 and dropped.stats["truncated"] == 0 and dropped.stats["samples"] == 1
    # a dropped sample loses all its response tokens, not only those past max_length
    assert dropped.stats["response_tokens_dropped"] == (69 - 28) + (59 - 28)
    assert dropped.stats["response_tokens_cut"] == 0

    with pytest.raises(ValueError, match=r"data.jsonl:2 has 71 tokens, more than max_length=50.*'truncate'"):
        _lengths_data(tmp_path, records, max_length=50, overlong="error")

    long_prompt = [records[0], {"instruction": "x" * 60, "output": "never seen"}]
    with pytest.raises(ValueError, match=r"data.jsonl:2: all 11 response tokens lie beyond.*`overlong: drop`"):
        _lengths_data(tmp_path, long_prompt, max_length=50)
    skipped = _lengths_data(tmp_path, long_prompt, max_length=50, overlong="drop")
    assert skipped.stats["dropped"] == 1 and skipped.stats["response_tokens_dropped"] == len("never seen") + 1


@pytest.mark.parametrize(
    ("overlong", "expected"),
    [
        ("truncate", "2 samples (92 tokens) ...: 1 truncated (19 response tokens cut), 0 dropped (0 response tokens"),
        ("drop", "1 samples (42 tokens) ...: 0 truncated (0 response tokens cut), 1 dropped (41 response tokens in"),
        (None, "2 samples (84 tokens) ...: 0 truncated (0 response tokens cut), 0 dropped (0 response tokens in"),
    ],
)
def test_the_report_is_one_line_and_a_warning_when_tokens_are_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, overlong: str | None, expected: str
) -> None:
    # byte-level: 71 and 42 tokens, the first with 41 response tokens ("b" * 40 and the EOS byte) from byte 28 on
    records = [{"instruction": "a", "output": "b" * 40}, {"instruction": "a", "output": "b" * 11}]
    if overlong is None:  # nothing longer than max_length
        records[0]["output"] = "b" * 11
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _lengths_data(tmp_path, records, max_length=50, overlong=overlong or "error")
    infos = [r.getMessage() for r in caplog.records if r.getMessage().startswith("InstructionDataModule:")]
    warned = [str(w.message) for w in caught if str(w.message).startswith("InstructionDataModule:")]
    # lost training signal is a warning (`rank_zero_warn`: printed once under DDP); a clean setup an info line
    (line,) = warned if overlong else infos
    assert (infos if overlong else warned) == []
    head, tail = expected.split(" ...: ")
    assert line.startswith(f"InstructionDataModule: {head} from 1 file(s)") and f"max_length=50: {tail}" in line


GOOD = {"instruction": "Say hi.", "output": "Hi."}
FIRST = {
    "alpaca": GOOD,
    "chat": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
}


def _turns(*roles: str) -> str:
    return json.dumps({"messages": [{"role": role, "content": "Hi"} for role in roles]})


@pytest.mark.parametrize(
    ("format", "bad", "message"),
    [
        ("alpaca", "{not json", r"is not valid JSON"),
        ("alpaca", '["a", "list"]', r"holds a JSON list, not an object"),
        (
            "alpaca",
            json.dumps({"instruction": "Hi", "answer": "Hey"}),
            r"no 'output' field .*\['answer', 'instruction'\].*field_map",
        ),
        ("alpaca", json.dumps({"text": "Hi"}), r"no 'instruction' field .*found keys \['text'\].*field_map"),
        ("alpaca", json.dumps({"instruction": "Hi", "output": 3}), r"field 'output' must be a string, got int"),
        ("alpaca", json.dumps({"instruction": "Hi", "output": "  "}), r"turn 1 is an empty response"),
        (
            "alpaca",
            json.dumps({"instruction": " ", "output": "Hey"}),
            r"'instruction' is empty and there is no 'input'",
        ),
        (
            "alpaca",
            json.dumps({"instruction": "", "input": "", "output": "Hey"}),
            r"'instruction' is empty and there is no 'input'",
        ),
        (
            "chat",
            json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "Hey"}]}),
            r"turn 0 is an empty user turn",
        ),
        ("chat", _turns("user"), r"has no assistant turn"),
        ("chat", _turns("assistant", "user"), r"starts with an assistant turn"),
        ("chat", _turns("user", "bot"), r"turn 1 has unknown role 'bot'"),
        ("chat", _turns("human", "gpt"), r"unknown role 'human' \(this looks like ShareGPT: set `format: sharegpt`\)"),
        ("chat", json.dumps({"messages": "Hi"}), r"field 'messages' must be a list of turns, got str"),
        ("chat", json.dumps({"messages": [{"role": "user"}]}), r"messages\[0\]: the record has no 'content' field"),
        (
            "chat",
            json.dumps({"messages": [{"role": "user", "content": None}]}),
            r"'content' must be a string, got NoneType",
        ),
        ("sharegpt", json.dumps({"conversations": [{"from": "robot", "value": "Hey"}]}), r"unknown role 'robot'"),
        (
            "sharegpt",
            json.dumps(
                {
                    "conversations": [
                        {"from": f, "value": v}
                        for f, v in [("human", "a"), ("gpt", "b"), ("human", "\n"), ("gpt", "c")]
                    ]
                }
            ),
            r"turn 2 is an empty user turn",
        ),
    ],
)
def test_bad_records_name_file_and_line(tmp_path: Path, format: str, bad: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(FIRST[format]) + "\n\n" + bad + "\n")
    # `auto` takes the format from a file's first record, so the bad one on line 3 is read as that format
    with pytest.raises(ValueError, match=rf"bad.jsonl:3\b.*{message}"):
        _data([path], tmp_path)


def test_a_file_that_is_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        json.dumps(GOOD).encode() + b"\n" + '{"instruction": "Caf\u00e9?", "output": "Oui."}\n'.encode("latin-1")
    )
    with pytest.raises(
        ValueError, match=r"latin1.jsonl:2: byte 21 of the line \(b'\\xe9'\) is not UTF-8.*must be UTF-8"
    ):
        _data([path], tmp_path)
    # a byte-order mark (what some editors write) is no error
    marked = tmp_path / "bom.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert _data([marked], tmp_path).stats["samples"] == 1


def test_an_undetectable_format_names_the_keys(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "Hi"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: cannot tell the format from the keys \['text'\].*field_map"):
        _data([path], tmp_path)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [GOOD, FIRST["chat"]])
    with pytest.raises(ValueError, match=r"mixed.jsonl:2: .*read as alpaca, detected from line 1.*looks like chat"):
        _data([mixed], tmp_path)


def test_a_json_array_file_is_refused_with_a_conversion_hint(tmp_path: Path) -> None:
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps([GOOD, GOOD], indent=2))
    with pytest.raises(ValueError, match=r"alpaca_data.json:1 starts a JSON array.*jq -c"):
        _data([path], tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"paths": []}, "paths should be a non-empty list"),
        ({"paths": "data.jsonl"}, r"Write it as a list: \['data.jsonl'\]"),
        ({"max_length": 1}, "max_length should be >= 2"),
        ({"batch_size": 0}, "batch_size should be >= 1"),
        ({"val_fraction": 1.0}, r"val_fraction should be in \[0, 1\)"),
        ({"format": "openai"}, "format should be one of"),
        ({"field_map": {"prompt": "instruction"}}, r"field_map has unknown field\(s\) \['prompt'\]"),
        ({"template": "jinja"}, "template should be one of"),
        ({"template": "chat"}, "template='chat' needs a tokenizer"),
        ({"train_on": "prompts"}, "train_on should be one of"),
        ({"overlong": "skip"}, "overlong should be one of"),
        ({"num_workers": -1}, "num_workers should be >= 0"),
    ],
)
def test_invalid_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InstructionDataModule(**{"paths": ["data.jsonl"], **kwargs})


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _data([tmp_path / "nope.jsonl"], tmp_path)
    (tmp_path / "notes.txt").write_text("text")
    with pytest.raises(ValueError, match=r"supported file types are .jsonl, .json\."):
        _data([tmp_path / "notes.txt"], tmp_path)
    with pytest.raises(FileNotFoundError, match=r"matched no .jsonl/.json files"):
        _data([tmp_path], tmp_path)


def test_dynamic_padding_and_pad_id_fallback(model_dir: Path, tokenizer: Any, tmp_path: Path) -> None:
    paths = [write_jsonl(tmp_path / "a.jsonl", ALPACA), write_jsonl(tmp_path / "s.jsonl", SHAREGPT)]
    data = _data(paths, tmp_path, tokenizer=str(model_dir), batch_size=4)
    assert data.train_set is not None
    items = [data.train_set[index] for index in range(4)]
    lengths = [len(item["input_ids"]) for item in items]
    batch = data.train_dataloader().collate_fn(items)  # type: ignore[misc]
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (4, max(lengths)) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, item in enumerate(items):
        size = len(item["input_ids"])
        assert torch.equal(batch["input_ids"][row, :size], item["input_ids"])
        assert torch.equal(batch["labels"][row, :size], item["labels"])
        # no pad token (like Llama 3): EOS pads, never attended to and without a label
        assert (batch["input_ids"][row, size:] == tokenizer.eos_token_id).all()
        assert (batch["labels"][row, size:] == IGNORE_INDEX).all()

    padded = tmp_path / "with-pad"
    with_pad = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    with_pad.add_special_tokens({"pad_token": "<|pad|>"})
    with_pad.save_pretrained(padded)
    assert ConversationEncoder(with_pad).pad_token_id == with_pad.pad_token_id != with_pad.eos_token_id
    without_eos = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    without_eos.eos_token = None
    assert ConversationEncoder(without_eos).pad_token_id == 0
    assert ConversationEncoder(None).pad_token_id == EOS_BYTE


def _packing_records() -> list[dict[str, str]]:
    return [
        {
            "instruction": f"Repeat the word {word}.",
            "input": "twice" if i % 2 else "",
            "output": f"{word} " * (i % 4 + 1),
        }
        for i, word in enumerate(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota"])
    ]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_each_sample_the_logits_it_has_alone(model_dir: Path, tmp_path: Path, attention: str) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", _packing_records())
    unpacked = _data([path], tmp_path, tokenizer=str(model_dir))
    data = _data([path], tmp_path, tokenizer=str(model_dir), packing=True, max_length=96, batch_size=2)
    rows = data.train_set
    assert rows is not None and data.stats["train_rows"] == len(rows) < len(unpacked.train_set or [])
    assert sorted(index for row in rows.rows for index in row) == list(range(9))  # type: ignore[union-attr]
    assert all(len(row) >= 2 for row in rows.rows[:2])  # type: ignore[union-attr]
    batch = data.train_dataloader().collate_fn([rows[0], rows[1]])  # type: ignore[misc]
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape[1] <= 96

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True, dtype=torch.float32, attn_implementation=attention
    )
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for row in range(2):
            start = 0
            for index in rows.rows[row]:  # type: ignore[union-attr]
                sample = unpacked.train_set[index]  # type: ignore[index]
                size = len(sample["input_ids"])
                span = slice(start, start + size)
                assert torch.equal(batch["input_ids"][row, span], sample["input_ids"])
                assert batch["position_ids"][row, span].tolist() == list(range(size))
                # the first token would be predicted from the previous sample: no label
                assert batch["labels"][row, start] == IGNORE_INDEX
                assert torch.equal(batch["labels"][row, start + 1 : start + size], sample["labels"][1:])
                alone = model(input_ids=sample["input_ids"][None], use_cache=False).logits[0]
                torch.testing.assert_close(packed[row, span], alone, atol=1e-5, rtol=1e-5)
                start += size
            assert (batch["labels"][row, start:] == IGNORE_INDEX).all()
        # without the restarts, later samples would see the earlier ones
        positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
        mixed = model(input_ids=batch["input_ids"], position_ids=positions, use_cache=False).logits
        sizes = [len(unpacked.train_set[index]["input_ids"]) for index in rows.rows[0]]  # type: ignore[index, union-attr]
        later = slice(sizes[0], sum(sizes))
        assert not torch.allclose(mixed[0, later], packed[0, later], atol=1e-3)


@pytest.mark.parametrize("train_on", ["responses", "all"])  # "all" labels each sample's first token too
def test_packed_loss_through_causal_lm_equals_the_samples_alone(model_dir: Path, tmp_path: Path, train_on: str) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", _packing_records())
    unpacked = _data([path], tmp_path, tokenizer=str(model_dir), train_on=train_on)
    data = _data(
        [path], tmp_path, tokenizer=str(model_dir), train_on=train_on, packing=True, max_length=96, batch_size=2
    )
    rows = data.train_set
    assert isinstance(rows, instruct._PackedRows) and unpacked.train_set is not None
    batch = data.train_dataloader().collate_fn([rows[0], rows[1]])  # type: ignore[misc]
    module = CausalLM(model_path=str(model_dir), dtype="float32")
    with torch.no_grad():
        packed, tokens = module._loss(batch)  # what `training_step` returns
        losses, counts = [], []
        for index in rows.rows[0] + rows.rows[1]:
            sample = unpacked.train_set[index]
            loss, count = module._loss({key: value[None] for key, value in sample.items()})
            losses.append(loss)
            counts.append(count)
        alone = sum(loss * count for loss, count in zip(losses, counts, strict=True)) / sum(counts)
        # the control: without the restarting positions the samples see each other, and the loss changes
        mixed, _ = module._loss({key: value for key, value in batch.items() if key != "position_ids"})
    assert int(tokens) == int(sum(counts))
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    # an untrained model leans little on context (about 2e-3 here): ten times the tolerance above tells them apart
    assert abs(float(mixed) - float(packed)) > 1e-4


class _WrapsLlama(LightningModule):
    def __init__(self, model_dir: Path) -> None:
        super().__init__()
        self.net = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)


def _attach(data: InstructionDataModule, module: LightningModule) -> Trainer:
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    data.trainer = trainer
    return trainer


def test_packing_checks_the_model(model_dir: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", _packing_records())
    data = InstructionDataModule([str(path)], tokenizer=str(model_dir), packing=True, cache_dir=str(tmp_path))
    _attach(data, BoringModel())
    with pytest.raises(
        ValueError, match=r"packing=True is unsupported for this model: BoringModel holds no.*`packing: false`"
    ):
        data.setup("fit")
    _attach(data, CausalLM(model_path=str(model_dir)))
    data.setup("fit")
    with pytest.warns(UserWarning, match="use_cache=False"):
        _attach(data, _WrapsLlama(model_dir))
        data.setup("fit")


def _padding(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(max(lengths[i] for i in batch) * len(batch) - sum(lengths[i] for i in batch) for batch in batches)


def test_group_by_length_pads_less_and_shards_under_ddp(tmp_path: Path) -> None:
    records = instruction_records(120)
    data = _lengths_data(tmp_path, records, max_length=512, batch_size=4, group_by_length=True, seed=3)
    assert data.train_set is not None
    lengths = data.train_set.lengths
    loader = data.train_dataloader()
    sampler = loader.sampler
    assert isinstance(sampler, instruct.LengthGroupedSampler)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths))) and order == list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(sampler) == sorted(order)
    sampler.set_epoch(0)

    grouped = [batch["attention_mask"].numel() - int(batch["attention_mask"].sum()) for batch in loader]
    generator = torch.Generator().manual_seed(0)
    random_order = torch.randperm(len(lengths), generator=generator).tolist()
    random = _padding([random_order[k : k + 4] for k in range(0, len(random_order), 4)], lengths)
    assert sum(grouped) < random / 3

    # Under DDP Lightning wraps the sampler (DistributedSamplerWrapper); groups are sized for the global batch, so
    # each rank's batches still hold similar lengths.
    data.trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    loader = data.train_dataloader()
    seen: list[int] = []
    for rank in range(2):
        shard = list(_get_distributed_sampler(loader, _is_dataloader_shuffled(loader), 0, num_replicas=2, rank=rank))
        seen.extend(shard)
        batches = [shard[k : k + 4] for k in range(0, len(shard), 4)]
        random_shard = random_order[rank::2]
        assert (
            _padding(batches, lengths)
            < _padding([random_shard[k : k + 4] for k in range(0, len(random_shard), 4)], lengths) / 3
        )
    assert sorted(set(seen)) == list(range(len(lengths)))


def _entries(cache: Path) -> list[Path]:
    return sorted(path for path in cache.iterdir() if not path.name.startswith("."))


def test_tokenized_samples_are_cached_and_keyed_by_files_and_settings(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    path = write_jsonl(tmp_path / "data.jsonl", [*ALPACA, *ALPACA])
    first = InstructionDataModule([str(path)], tokenizer=str(model_dir), val_fraction=0, cache_dir=str(cache))
    first.prepare_data()
    (entry,) = _entries(cache)
    built = entry.stat().st_mtime_ns
    first.setup("fit")
    assert first.cache_path == entry

    calls = []
    tokenize = instruct.tokenize_files
    monkeypatch.setattr(instruct, "tokenize_files", lambda *a, **k: calls.append(1) or tokenize(*a, **k))
    again = InstructionDataModule([str(path)], tokenizer=str(model_dir), val_fraction=0, cache_dir=str(cache))
    again.prepare_data()
    again.setup("fit")
    assert calls == [] and _entries(cache) == [entry] and entry.stat().st_mtime_ns == built
    for a, b in zip(_samples(first), _samples(again), strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert again.stats == first.stats

    _data([path], tmp_path, tokenizer=str(model_dir), train_on="all")
    _data([path], tmp_path, tokenizer=str(model_dir), system_prompt="Be brief.")
    _data([path], tmp_path)  # bytes
    assert len(calls) == 3 and len(_entries(cache)) == 4
    write_jsonl(path, ALPACA)  # the file changes
    changed = _data([path], tmp_path, tokenizer=str(model_dir))
    assert len(calls) == 4 and len(_entries(cache)) == 5 and changed.stats["samples"] == 2
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no staging directory left


def _mapped(files: list[Path]) -> list[tuple[int, int]]:
    """The address ranges at which this process has ``files`` memory-mapped (from Linux's /proc/self/maps)."""
    names = {os.path.realpath(file) for file in files}
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in names:
            start, end = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the memory map of a Linux process")
def test_cached_samples_stay_memory_mapped_beyond_one_record_batch(tmp_path: Path) -> None:
    # `datasets` writes record batches of 1,000 rows; 3,000 samples would span three of them, one row per sample
    records = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(3000)]
    data = _lengths_data(tmp_path, records, max_length=64)
    assert data.cache_path is not None and isinstance(data.train_set, instruct._Split)
    samples = data.train_set.samples
    ranges = _mapped(list(data.cache_path.rglob("*.arrow")))
    assert ranges
    for name in ("input_ids", "labels", "offsets"):
        tensor = getattr(samples, name)
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        # every rank and data-loader worker reads the same page cache instead of holding a copy
        assert any(low <= start and end <= high for low, high in ranges), f"{name} is a copy, not the mapped file"
    fresh, _ = instruct.tokenize_files(
        instruct.find_instruction_files([str(tmp_path / "data.jsonl")]), ConversationEncoder(None), max_length=64
    )
    for name in ("input_ids", "labels", "offsets"):
        assert torch.equal(getattr(samples, name), getattr(fresh, name))
    assert data.decode(samples[2999]["input_ids"]).endswith("Answer 2999.\n\n")


def test_without_datasets_tokenizes_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(instruct, "_import_datasets", lambda: None)
    monkeypatch.setattr(instruct, "_DATASETS_HINT_SHOWN", False)
    path = write_jsonl(tmp_path / "data.jsonl", ALPACA)
    with caplog.at_level(logging.INFO):
        data = _data([path], tmp_path)
        _data([path], tmp_path)
    assert not (tmp_path / "cache").exists() and data.cache_path is None
    assert sum("pip install datasets" in record.getMessage() for record in caplog.records) == 1
    assert len(_samples(data)) == 2


def test_validation_split_by_fraction_and_by_files(model_dir: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", instruction_records(50))
    data = _data([path], tmp_path, val_fraction=0.1, max_length=512, seed=1)
    same = _data([path], tmp_path, val_fraction=0.1, max_length=512, seed=1)
    assert data.train_set is not None and data.val_set is not None and same.val_set is not None
    assert data.stats["train_samples"] == 45 and data.stats["val_samples"] == 5
    val = set(data.val_set.indices)  # type: ignore[union-attr]
    assert val == set(same.val_set.indices) and not val & set(data.train_set.indices)  # type: ignore[union-attr]
    other = _data([path], tmp_path, val_fraction=0.1, max_length=512, seed=2)
    assert set(other.val_set.indices) != val  # type: ignore[union-attr]
    assert len(data.val_dataloader()) == 1  # type: ignore[arg-type]
    assert _data([path], tmp_path, val_fraction=0, max_length=512).val_dataloader() == []

    val_path = write_jsonl(tmp_path / "val.jsonl", ALPACA)
    split = _data([path], tmp_path, val_paths=[str(val_path)], max_length=512)
    assert split.stats["train_samples"] == 50 and split.stats["val_samples"] == 2
    loader = split.val_dataloader()
    assert not isinstance(loader, list)
    batch = next(iter(loader))
    assert bytes(batch["input_ids"][0, : int(batch["attention_mask"][0].sum())].tolist()).startswith(b"### User:\nAdd")
    with pytest.raises(ValueError, match=r"1 sample.*too few to hold out 1 for validation.*`val_fraction: 0`"):
        _data([write_jsonl(tmp_path / "one.jsonl", [GOOD])], tmp_path, val_fraction=0.5)


def test_fit_a_pretrained_model_on_chat_data(model_dir: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", instruction_records(40))
    settings: dict[str, Any] = dict(
        tokenizer=str(model_dir), max_length=192, batch_size=4, val_fraction=0.2, cache_dir=str(tmp_path)
    )
    data = InstructionDataModule([str(path)], **settings)
    model = CausalLM(model_path=str(model_dir), lr=1e-2)  # enough to move the response loss in 3 steps
    trainer = Trainer(
        accelerator="cpu",
        precision="bf16-true",
        max_steps=3,
        limit_train_batches=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    assert trainer.global_step == 3
    val_loss = float(trainer.callback_metrics["val_loss"])

    def by_hand(loader: Any) -> float:
        """The mean loss per labelled token over the loader's batches, with the trained weights."""
        total, count = 0.0, 0
        model.eval()
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            for batch in loader:
                loss, tokens = next_token_loss(model(batch["input_ids"], batch["attention_mask"]), batch)
                total += float(loss) * int(tokens)
                count += int(tokens)
        return total / count

    # 8 validation samples in 2 batches of different token counts: the logged value is the token-weighted mean
    counts = [int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in data.val_dataloader()]
    assert data.stats["val_samples"] == 8 and len(counts) == 2 and counts[0] != counts[1]
    responses = by_hand(data.val_dataloader())
    assert val_loss == pytest.approx(responses, rel=1e-5)
    # The loss is on the responses only: labelling every token gives another value on the same samples (about 0.04
    # apart after these steps, against agreement to 1e-5 above).
    everything = InstructionDataModule([str(path)], train_on="all", **settings)
    everything.setup("validate")
    assert everything.val_set is not None and data.val_set is not None
    assert everything.val_set.indices == data.val_set.indices  # type: ignore[union-attr]
    all_tokens = by_hand(everything.val_dataloader())
    assert abs(all_tokens - responses) > 0.01
    (logged,) = trainer.validate(model, everything, verbose=False)
    assert logged["val_loss"] == pytest.approx(all_tokens, rel=1e-5)

    trainer.save_checkpoint(tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert checkpoint["datamodule_hyper_parameters"]["tokenizer"] == str(model_dir)


def test_default_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_MEMOPT_CACHE", str(tmp_path / "memopt"))
    assert InstructionDataModule(["data.jsonl"]).cache_dir == tmp_path / "memopt" / "instruct"
    monkeypatch.delenv("LIGHTNING_MEMOPT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert InstructionDataModule(["data.jsonl"]).cache_dir == tmp_path / ".cache" / "lightning_memopt" / "instruct"
