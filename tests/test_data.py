import json
import sysconfig
from pathlib import Path

import pytest
import torch

from lightning_memopt.data import (
    EOS_BYTE,
    VOCAB_SIZE,
    TextDataModule,
    default_corpus_paths,
    find_text_files,
    read_corpus,
)


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    (tmp_path / "a.txt").write_bytes(b"alpha text\n")
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"text": "first record", "id": 1}) + "\n\n" + json.dumps({"text": "zweiter Datensatz \u00e4"}) + "\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_bytes(b"# beta\n")
    (tmp_path / "sub" / "skip.bin").write_bytes(b"\x01\x02")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.txt").write_bytes(b"hidden")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "cached.py").write_bytes(b"cached")
    return tmp_path


def test_directory_is_read_recursively_in_sorted_order(corpus_dir: Path) -> None:
    files = find_text_files([str(corpus_dir)])
    assert [f.relative_to(corpus_dir).as_posix() for f in files] == ["a.txt", "c.jsonl", "sub/b.md"]
    corpus = bytes(read_corpus(files).tolist())
    sep = bytes([EOS_BYTE])
    expected = sep.join([b"alpha text\n", b"first record", "zweiter Datensatz \u00e4".encode(), b"# beta\n"])
    assert corpus == expected


def test_globs_and_files_keep_entry_order_and_read_once(corpus_dir: Path) -> None:
    files = find_text_files([str(corpus_dir / "**" / "*.md"), str(corpus_dir / "a.txt"), str(corpus_dir)])
    assert [f.name for f in files] == ["b.md", "a.txt", "c.jsonl"]


def test_jsonl_text_field(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"content": "hello"}) + "\n" + json.dumps({"content": "world"}) + "\n")
    assert bytes(read_corpus([path], text_field="content").tolist()) == b"hello" + bytes([EOS_BYTE]) + b"world"
    with pytest.raises(ValueError, match=r"chat.jsonl:1 has no 'text' field \(found \['content'\]\).*text_field"):
        read_corpus([path])


def test_max_bytes_caps_the_corpus(corpus_dir: Path) -> None:
    files = find_text_files([str(corpus_dir)])
    full = read_corpus(files)
    for cap in (1, 5, 11, 12, 20, full.numel() + 100):
        capped = read_corpus(files, max_bytes=cap)
        assert torch.equal(capped, full[:cap])


def test_windows_are_non_overlapping_next_token_pairs(tmp_path: Path) -> None:
    text = bytes(range(32, 127)) * 3  # 285 bytes
    (tmp_path / "t.txt").write_bytes(text)
    data = TextDataModule(paths=[str(tmp_path)], seq_len=9, batch_size=4, val_fraction=0.0)
    data.setup("fit")
    assert data.train_set is not None
    samples = [data.train_set[i] for i in range(len(data.train_set))]
    assert len(samples) == len(text) // 10
    for i, sample in enumerate(samples):
        window = torch.tensor(list(text[10 * i : 10 * i + 10]))
        assert torch.equal(sample["input_ids"], window[:-1])
        assert torch.equal(sample["targets"], window[1:])
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (4, 9) and batch["input_ids"].dtype == torch.long
    assert int(batch["input_ids"].max()) < VOCAB_SIZE
    assert data.val_dataloader() == []


def test_split_is_deterministic_disjoint_and_seeded(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_bytes(bytes(range(256)) * 40)  # 10240 bytes -> 160 windows of 64

    def split(seed: int) -> tuple[list[int], list[int]]:
        data = TextDataModule(paths=[str(tmp_path / "t.txt")], seq_len=63, val_fraction=0.1, seed=seed)
        data.setup("fit")
        assert data.train_set is not None and data.val_set is not None
        return data.train_set.starts.tolist(), data.val_set.starts.tolist()

    train, val = split(0)
    assert len(val) == 16 and len(train) == 144
    assert sorted(train + val) == list(range(0, 10240, 64))
    assert split(0) == (train, val)
    assert split(1)[1] != val
    assert val != list(range(0, 16 * 64, 64)), "validation windows should be spread over the corpus"


def test_default_corpus_is_the_stdlib_without_installed_packages() -> None:
    assert default_corpus_paths() == [sysconfig.get_paths()["stdlib"]]
    files = find_text_files(default_corpus_paths())
    assert len(files) > 100
    assert not any(part in {"site-packages", "dist-packages"} for f in files for part in f.parts)
    data = TextDataModule(seq_len=32, batch_size=2, max_bytes=10_000)
    data.setup("fit")
    assert data.train_set is not None and data.val_set is not None
    assert len(data.train_set) + len(data.val_set) == 10_000 // 33


@pytest.mark.parametrize(
    ("make_paths", "error", "message"),
    [
        (lambda d: [str(d / "missing")], FileNotFoundError, r"'.*missing' does not exist"),
        (lambda d: [str(d / "sub" / "*.txt")], FileNotFoundError, r"matched no .*txt.* files"),
        (lambda d: [str(d / "empty")], FileNotFoundError, r"matched no"),
        (lambda d: [str(d / "sub" / "skip.bin")], ValueError, r"supported file types are .*\.jsonl"),
    ],
)
def test_paths_that_match_nothing_say_what_to_change(corpus_dir: Path, make_paths, error, message) -> None:
    (corpus_dir / "empty").mkdir()
    data = TextDataModule(paths=make_paths(corpus_dir))
    with pytest.raises(error, match=message):
        data.setup("fit")


def test_corpus_shorter_than_one_window(tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match=r"100 bytes, fewer than one sample of seq_len \+ 1 = 129 bytes.*seq_len"):
        TextDataModule(paths=[str(tmp_path)], seq_len=128).setup("fit")
    with pytest.raises(ValueError, match=r"raise `max_bytes`"):
        TextDataModule(seq_len=128, max_bytes=100).setup("fit")
    with pytest.raises(ValueError, match=r"gives 1 sample.*val_fraction: 0"):
        TextDataModule(paths=[str(tmp_path)], seq_len=60).setup("fit")
    TextDataModule(paths=[str(tmp_path)], seq_len=60, val_fraction=0.0).setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_len": 0}, "seq_len should be >= 1"),
        ({"val_fraction": 1.0}, r"val_fraction should be in \[0, 1\)"),
        ({"max_bytes": 0}, "max_bytes should be >= 1 or None"),
        ({"paths": []}, "paths is empty"),
    ],
)
def test_invalid_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TextDataModule(**kwargs)


def _save_word_tokenizer(directory: Path, eos_token: str | None = "</s>") -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3, "again": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token=eos_token).save_pretrained(directory)


def test_tokenizer_gives_model_token_ids(tmp_path: Path) -> None:
    _save_word_tokenizer(tmp_path / "tok")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d.jsonl").write_text(
        "\n".join(json.dumps({"text": t}) for t in ["hello world", "world again hello", "again"]) + "\n"
    )
    data = TextDataModule(paths=[str(tmp_path / "data")], tokenizer=str(tmp_path / "tok"), seq_len=3, val_fraction=0)
    assert data.vocab_size == 5
    data.setup("fit")
    assert data.train_set is not None
    assert data.train_set.corpus.tolist() == [2, 3, 1, 3, 4, 2, 1, 4]
    assert data.train_set[1]["input_ids"].tolist() == [4, 2, 1] and data.train_set[1]["targets"].tolist() == [2, 1, 4]


def test_tokenizer_errors_say_what_to_change(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("hello world " * 10)
    with pytest.raises(OSError, match="point it at a local model directory"):
        TextDataModule(paths=[str(tmp_path / "t.txt")], tokenizer=str(tmp_path / "missing")).setup("fit")
    _save_word_tokenizer(tmp_path / "tok", eos_token=None)
    with pytest.raises(ValueError, match="no end-of-sequence token"):
        TextDataModule(paths=[str(tmp_path / "t.txt")], tokenizer=str(tmp_path / "tok")).setup("fit")
