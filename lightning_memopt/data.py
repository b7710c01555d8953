"""Language-modelling data: plain text, Markdown, source code and JSONL files as one token stream.

By default tokens are raw UTF-8 bytes (vocabulary of 256), so no tokenizer has to be downloaded and a tiny model built
from a config can train on the result; a pretrained model needs its own tokenizer instead (``tokenizer=``). Documents
are concatenated with an end-of-document token between them and the stream is cut into non-overlapping windows of
``seq_len + 1`` tokens; each window gives ``input_ids`` (its first ``seq_len`` tokens) and ``targets`` (its last
``seq_len`` tokens, i.e. the next token at every position).
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

__all__ = [
    "EOS_BYTE",
    "TEXT_SUFFIXES",
    "VOCAB_SIZE",
    "InstructionDataModule",
    "TextDataModule",
    "TokenWindows",
    "default_corpus_paths",
    "find_text_files",
    "iter_documents",
    "load_tokenizer",
    "read_corpus",
    "tokenize_corpus",
]

VOCAB_SIZE = 256
"""Number of distinct byte-level tokens: one per byte value."""

EOS_BYTE = 0
"""Byte placed between documents; NUL does not occur in text, so the model can learn where documents end."""

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".jsonl")
"""File types read from directories, globs and explicit paths. ``.jsonl`` files are parsed, the rest read raw."""

# Walking a directory skips these: `sysconfig.get_paths()["stdlib"]` contains `site-packages`, whose content differs
# from machine to machine and would make the default corpus non-reproducible.
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "node_modules"})


def default_corpus_paths() -> list[str]:
    """The corpus used when none is given: the Python standard library's sources, present on every machine.

    Example::

        >>> from lightning_memopt.data import default_corpus_paths
        >>> import sysconfig
        >>> default_corpus_paths() == [sysconfig.get_paths()["stdlib"]]
        True
    """
    return [sysconfig.get_paths()["stdlib"]]


def _walk_text_files(directory: Path, suffixes: tuple[str, ...]) -> Iterator[Path]:
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(suffixes):
                yield Path(root, name)


def find_text_files(paths: Sequence[str], suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> list[Path]:
    """Expand files, directories (recursively) and glob patterns into a deterministic list of text files.

    Entries keep the order given; the files one directory or glob yields are sorted. Directories skip hidden folders,
    ``__pycache__`` and installed packages (``site-packages``). A file listed twice is read once. Only files whose
    name ends with one of ``suffixes`` are found.

    Raises:
        FileNotFoundError: if an entry matches no file with one of the ``suffixes``.
        ValueError: if an explicitly named file has another suffix.

    Example::

        >>> files = find_text_files(default_corpus_paths())
        >>> files[0].suffix in TEXT_SUFFIXES
        True
    """
    found: list[Path] = []
    seen: set[Path] = set()
    for entry in paths:
        expanded = os.path.expanduser(entry)
        if any(char in expanded for char in "*?["):
            matches: list[Path] = []
            for match in sorted(glob.glob(expanded, recursive=True)):
                path = Path(match)
                if path.is_dir():
                    matches.extend(_walk_text_files(path, suffixes))
                elif path.is_file() and path.name.endswith(suffixes):
                    matches.append(path)
        elif os.path.isdir(expanded):
            matches = list(_walk_text_files(Path(expanded), suffixes))
        elif os.path.isfile(expanded):
            if not expanded.endswith(suffixes):
                raise ValueError(
                    f"Cannot read {entry!r}: supported file types are {', '.join(suffixes)}."
                    " Convert it (JSON records to one object per line in a .jsonl file), or rename a file that"
                    " already has one of these formats."
                )
            matches = [Path(expanded)]
        else:
            raise FileNotFoundError(
                f"Data path {entry!r} does not exist. Pass existing files, directories or glob patterns"
                " (for example 'data/**/*.jsonl') in `paths`."
            )
        if not matches:
            raise FileNotFoundError(
                f"Data path {entry!r} matched no {'/'.join(suffixes)} files. Point `paths` at a directory or"
                " glob that contains some, or remove the entry."
            )
        for path in matches:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                found.append(path)
    return found


def _jsonl_documents(path: Path, text_field: str) -> Iterator[bytes]:
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{number} is not valid JSON ({err.msg}). Each line must be one object."
                ) from err
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"{path}:{number} has no {text_field!r} field (found {keys}). Set `text_field` to the key that"
                    " holds the text."
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number}: field {text_field!r} must be a string, got {type(text).__name__}.")
            yield text.encode("utf-8")


def iter_documents(files: Sequence[Path], text_field: str = "text", max_bytes: int | None = None) -> Iterator[bytes]:
    """The documents of ``files`` in order, as UTF-8 bytes: a plain file is one document, a JSONL line another.

    Reading stops once ``max_bytes`` bytes are collected, counting one byte per document boundary (the separator of
    the byte-level stream), and the last document is cut there; a huge corpus costs only what is kept.

    Example::

        >>> from pathlib import Path
        >>> import lightning_memopt.data
        >>> from lightning_memopt.data import iter_documents
        >>> [len(document) for document in iter_documents([Path(lightning_memopt.data.__file__)], max_bytes=100)]
        [100]
    """
    size = 0
    first = True
    for path in files:
        if path.suffix == ".jsonl":
            documents: Iterator[bytes] = _jsonl_documents(path, text_field)
        else:
            with path.open("rb") as handle:
                documents = iter([handle.read(-1 if max_bytes is None else max(max_bytes - size, 0))])
        for document in documents:
            size += 0 if first else 1
            first = False
            if max_bytes is not None:
                document = document[: max(max_bytes - size, 0)]
            size += len(document)
            yield document
            if max_bytes is not None and size >= max_bytes:
                return


def read_corpus(files: Sequence[Path], text_field: str = "text", max_bytes: int | None = None) -> Tensor:
    """Read ``files`` into one byte-level ``uint8`` token stream, documents separated by :data:`EOS_BYTE`.

    ``max_bytes`` caps the length of the stream (see :func:`iter_documents`).

    Example::

        >>> corpus = read_corpus(find_text_files(default_corpus_paths()), max_bytes=1000)
        >>> corpus.dtype, corpus.numel()
        (torch.uint8, 1000)
    """
    stream = bytes([EOS_BYTE]).join(iter_documents(files, text_field, max_bytes))
    return torch.frombuffer(bytearray(stream), dtype=torch.uint8) if stream else torch.empty(0, dtype=torch.uint8)


def tokenize_corpus(documents: Iterable[bytes], tokenizer: Any) -> Tensor:
    """Token ids of ``documents`` from a Hugging Face tokenizer, joined by its end-of-sequence token, as ``int32``.

    Example::

        >>> from transformers import AutoTokenizer
        >>> tokenizer = AutoTokenizer.from_pretrained("/path/to/model")  # doctest: +SKIP
        >>> ids = tokenize_corpus([b"Hello", b"world"], tokenizer)  # doctest: +SKIP
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            f"The tokenizer {type(tokenizer).__name__} has no end-of-sequence token to separate documents. Set"
            " `eos_token` in its tokenizer_config.json."
        )
    pieces: list[Tensor] = []
    separator = torch.tensor([eos], dtype=torch.int32)
    for chunk in _chunks(documents, 1024):
        texts = [document.decode("utf-8", errors="replace") for document in chunk]
        # Whole documents are longer than the model's context; `verbose=False` silences the warning, as the stream
        # is cut into windows afterwards.
        for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
            if pieces:
                pieces.append(separator)
            pieces.append(torch.tensor(ids, dtype=torch.int32))
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int32)


def load_tokenizer(path: str | os.PathLike[str], argument: str = "tokenizer") -> Any:
    """The Hugging Face tokenizer in a local directory (``AutoTokenizer``, ``local_files_only``: nothing is downloaded).

    The one loader the data modules, :class:`~lightning_memopt.SampleGeneration` and ``lightning-memopt export`` use;
    ``argument`` names the setting in the error messages.

    Raises:
        ImportError: if transformers is not installed.
        OSError: if ``path`` holds no loadable tokenizer.

    Example::

        >>> load_tokenizer("/no/such/model")
        Traceback (most recent call last):
        ...
        OSError: Could not load a tokenizer from tokenizer='/no/such/model': ...
    """
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise ImportError(
            f"`{argument}` needs Hugging Face transformers: `pip install 'lightning-memopt[recipes]'`."
        ) from err
    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(str(path)), local_files_only=True)
    except (OSError, ValueError) as err:  # a missing directory, or one without tokenizer files
        unset = ", or leave it unset for byte-level tokens" if argument == "tokenizer" else ""
        raise OSError(
            f"Could not load a tokenizer from {argument}={str(path)!r}: point it at a local model directory (with"
            f" tokenizer.json or tokenizer.model){unset}. ({type(err).__name__}: {err})"
        ) from err


def _chunks(items: Iterable[bytes], size: int) -> Iterator[tuple[bytes, ...]]:
    # `itertools.batched` needs Python 3.12.
    iterator = iter(items)
    while chunk := tuple(itertools.islice(iterator, size)):
        yield chunk


class TokenWindows(Dataset[dict[str, Tensor]]):
    """Fixed windows of a token stream as next-token samples.

    Args:
        corpus: 1-D integer token stream.
        starts: offset of each window in ``corpus``.
        seq_len: tokens per sample; each window spans ``seq_len + 1`` tokens.

    Example::

        >>> data = TokenWindows(torch.arange(10, dtype=torch.uint8), torch.tensor([0, 5]), seq_len=4)
        >>> data[1]["input_ids"].tolist(), data[1]["targets"].tolist()
        ([5, 6, 7, 8], [6, 7, 8, 9])
    """

    def __init__(self, corpus: Tensor, starts: Tensor, seq_len: int) -> None:
        self.corpus = corpus
        self.starts = starts
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.starts)

    @override
    def __getitem__(self, index: int) -> dict[str, Tensor]:
        start = int(self.starts[index])
        window = self.corpus[start : start + self.seq_len + 1].long()
        return {"input_ids": window[:-1], "targets": window[1:]}


class TextDataModule(LightningDataModule):
    """Next-token data from local text, Markdown, source and JSONL files, byte-level or with a model's tokenizer.

    By default every byte is a token (``VOCAB_SIZE = 256``), so a model built from a config with ``vocab_size=256``
    trains on it without a tokenizer. A pretrained model needs its own tokenizer: pass its directory as
    ``tokenizer``. The files are read in a fixed order, cut into non-overlapping windows of ``seq_len + 1`` tokens,
    and a seeded random subset of the windows becomes the validation set, the same on every run and rank. Batches
    are dicts of ``input_ids`` and ``targets`` (already shifted: ``targets[:, t]`` follows ``input_ids[:, t]``),
    both ``(batch_size, seq_len)`` int64 tensors.

    Args:
        paths: files, directories (searched recursively) or glob patterns of ``.txt``, ``.md``, ``.py``, ``.rst`` or
            ``.jsonl`` files. ``None`` uses the Python standard library's sources, which exist on every machine.
        text_field: key that holds the text in each JSONL record.
        tokenizer: local directory (or cached hub name) of a Hugging Face tokenizer, usually the model's own
            directory; nothing is downloaded. ``None`` uses bytes as tokens.
        seq_len: tokens per sample.
        batch_size: samples per batch, per device.
        val_fraction: share of the windows held out for validation, in ``[0, 1)``; ``0`` disables validation.
        max_bytes: stop reading after this many bytes of text; ``None`` reads everything.
        num_workers: data-loader worker processes.
        seed: seed of the train/validation split. The order of training batches follows the global seed (the
            ``seed_everything`` of the CLI).

    Example::

        >>> data = TextDataModule(seq_len=64, batch_size=4, max_bytes=100_000)
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> batch["input_ids"].shape, batch["targets"].shape
        (torch.Size([4, 64]), torch.Size([4, 64]))
    """

    def __init__(
        self,
        paths: list[str] | None = None,
        text_field: str = "text",
        tokenizer: str | None = None,
        seq_len: int = 128,
        batch_size: int = 8,
        val_fraction: float = 0.02,
        max_bytes: int | None = 4_000_000,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if seq_len < 1:
            raise ValueError(f"seq_len should be >= 1 but is: {seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size should be >= 1 but is: {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction should be in [0, 1) but is: {val_fraction}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes should be >= 1 or None (no cap) but is: {max_bytes}")
        if num_workers < 0:
            raise ValueError(f"num_workers should be >= 0 but is: {num_workers}")
        if paths is not None and not paths:
            raise ValueError(
                "paths is empty. Pass at least one file, directory or glob, or None for the default corpus."
            )
        self.save_hyperparameters()
        self.paths = list(paths) if paths is not None else default_corpus_paths()
        self.text_field = text_field
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.max_bytes = max_bytes
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: TokenWindows | None = None
        self.val_set: TokenWindows | None = None
        self._tokenizer: Any = None

    def _load_tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(str(self.tokenizer))
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens, for sizing a model's embedding."""
        return VOCAB_SIZE if self.tokenizer is None else len(self._load_tokenizer())

    @override
    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        files = find_text_files(self.paths)
        if self.tokenizer is None:
            corpus, unit = read_corpus(files, self.text_field, self.max_bytes), "bytes"
        else:
            documents = iter_documents(files, self.text_field, self.max_bytes)
            corpus, unit = tokenize_corpus(documents, self._load_tokenizer()), "tokens"
        window = self.seq_len + 1
        num_windows = corpus.numel() // window
        if num_windows == 0:
            capped = self.max_bytes is not None and sum(f.stat().st_size for f in files) > self.max_bytes
            raise ValueError(
                f"The corpus from paths={self.paths} has {corpus.numel()} {unit}, fewer than one sample of"
                f" seq_len + 1 = {window} {unit}. Add text to `paths`, lower `seq_len`"
                + (" or raise `max_bytes`." if capped else ".")
            )
        num_val = max(1, round(num_windows * self.val_fraction)) if self.val_fraction > 0 else 0
        if num_val >= num_windows:
            raise ValueError(
                f"The corpus gives {num_windows} sample(s) of {window} {unit}, too few to hold out {num_val} for"
                " validation and still train. Add text to `paths`, lower `seq_len`, or set `val_fraction: 0`."
            )
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(num_windows, generator=generator)
        starts = torch.arange(num_windows) * window
        self.val_set = TokenWindows(corpus, starts[order[:num_val].sort().values], self.seq_len)
        self.train_set = TokenWindows(corpus, starts[order[num_val:].sort().values], self.seq_len)

    def _loader(self, dataset: TokenWindows | None, shuffle: bool) -> DataLoader[dict[str, Tensor]]:
        if dataset is None:
            raise RuntimeError("Call `setup()` before asking for a data loader (the Trainer does this for you).")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader[dict[str, Tensor]]:
        return self._loader(self.train_set, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader[dict[str, Tensor]] | list[DataLoader[dict[str, Tensor]]]:
        if self.val_fraction == 0:
            return []
        return self._loader(self.val_set, shuffle=False)


if TYPE_CHECKING:
    from lightning_memopt.instruct import InstructionDataModule


def __getattr__(name: str) -> Any:
    # `lightning_memopt.instruct` builds on this module, so it is imported on first use rather than at the top (an
    # import cycle otherwise breaks whichever of the two is imported first).
    if name == "InstructionDataModule":
        from lightning_memopt.instruct import InstructionDataModule

        globals()[name] = InstructionDataModule
        return InstructionDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
