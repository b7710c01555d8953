"""Instruction (supervised fine-tuning) data: Alpaca, chat and ShareGPT JSONL files as prompt/response samples.

Every record becomes a list of ``{"role", "content"}`` messages (roles ``system``, ``user``, ``assistant``), is rendered
with the tokenizer's chat template (or the plain template below) and tokenized once; ``labels`` equal ``input_ids``
(Hugging Face's convention: not shifted) with :data:`~lightning_memopt.lm.IGNORE_INDEX` on every token that gets no
loss, which by default is everything but the assistant turns. The pure functions at the top (formats, rendering,
labelling, packing, length grouping) hold the logic; :class:`InstructionDataModule` puts them behind Lightning's data
hooks, with an on-disk cache of the tokenized samples.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import inspect
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from typing_extensions import override

# The folders a directory walk skips are the ones `data.find_text_files` skips.
from lightning_memopt.data import EOS_BYTE, VOCAB_SIZE, find_text_files, load_tokenizer
from lightning_memopt.lm import IGNORE_INDEX, CausalLM

__all__ = [
    "FORMATS",
    "INSTRUCTION_SUFFIXES",
    "PLAIN_TEMPLATE",
    "ConversationEncoder",
    "InstructionDataModule",
    "LengthGroupedSampler",
    "Message",
    "TokenizedSamples",
    "detect_format",
    "find_instruction_files",
    "label_tokens",
    "length_grouped_order",
    "pack_samples",
    "read_records",
    "render_chat",
    "render_plain",
    "to_messages",
    "tokenize_files",
]

Message = dict[str, str]
"""One turn of a conversation: ``{"role": "system" | "user" | "assistant", "content": str}``."""

FORMATS = ("alpaca", "chat", "sharegpt")
"""Record formats; ``format="auto"`` picks one per file from the keys of its first record."""

INSTRUCTION_SUFFIXES = (".jsonl", ".json")
"""File types read from directories, globs and explicit paths: one JSON object per line."""

ROLES = ("system", "user", "assistant")

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "model": "assistant",
}
"""ShareGPT's ``from`` values and the role each one becomes."""

FIELDS = ("instruction", "input", "output", "system", "messages", "role", "content", "conversations", "from", "value")
"""The field names ``field_map`` can remap: the keys a record of each format has by default."""

PLAIN_TEMPLATE = {
    "system": "### System:\n{content}\n\n",
    "user": "### User:\n{content}\n\n",
    "assistant": "### Assistant:\n{content}{eos}\n\n",
    "generation_prompt": "### Assistant:\n",
}
"""The ``plain`` template (see :func:`render_plain`): one string per role, and the generation prompt."""

TEMPLATES = ("auto", "chat", "plain")
TRAIN_ON = ("responses", "all")
OVERLONG = ("truncate", "drop", "error")

_CACHE_VERSION = 2
_DATASETS_HINT_SHOWN = False


# --------------------------------------------------------------------------------------------------------------------
# Files and records
# --------------------------------------------------------------------------------------------------------------------


def find_instruction_files(paths: Sequence[str]) -> list[Path]:
    """Expand files, directories (recursively) and glob patterns into a deterministic list of JSONL files.

    :func:`~lightning_memopt.data.find_text_files` for ``.jsonl`` and ``.json`` (JSON lines) files only.

    Example::

        >>> find_instruction_files(["/no/such/dir"])
        Traceback (most recent call last):
        ...
        FileNotFoundError: Data path '/no/such/dir' does not exist. ...
    """
    return find_text_files(paths, suffixes=INSTRUCTION_SUFFIXES)


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """The JSON objects of a JSON-lines file with their 1-based line numbers; blank lines are skipped.

    Raises:
        ValueError: naming ``file:line`` for bytes that are not UTF-8, invalid JSON or a line that is not an object,
            and for a file that holds one JSON array (as ``alpaca_data.json`` does) instead of JSON lines.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "train.jsonl"
        >>> _ = path.write_text('{"instruction": "2+3?", "output": "5"}\\n\\n{"instruction": "Hi", "output": "Hi!"}\\n')
        >>> [line for line, _ in read_records(path)]
        [1, 3]
    """
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                # A byte-order mark may open the file (some Windows editors write one).
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}:{number}: byte {err.start + 1} of the line ({raw[err.start : err.start + 1]!r}) is not"
                    " UTF-8; instruction files must be UTF-8 encoded. Convert the file, e.g. with"
                    f" `iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}` (name its real encoding)."
                ) from err
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if number == 1 and line.lstrip().startswith("["):
                    raise ValueError(
                        f"{path}:1 starts a JSON array, but instruction data must be JSON lines (one object per"
                        f" line). Convert it, e.g. with `jq -c '.[]' {path.name} > {path.stem}.jsonl`."
                    ) from err
                raise ValueError(
                    f"{path}:{number} is not valid JSON ({err.msg}). Each line must be one object."
                ) from err
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}:{number} holds a JSON {type(record).__name__}, not an object. Each line must be one"
                    ' record such as {"instruction": ..., "output": ...}.'
                )
            yield number, record


# --------------------------------------------------------------------------------------------------------------------
# Formats: records -> messages
# --------------------------------------------------------------------------------------------------------------------


def _field(field_map: Mapping[str, str], name: str) -> str:
    return field_map.get(name, name)


def detect_format(record: Mapping[str, Any], field_map: Mapping[str, str] | None = None) -> str | None:
    """The format of ``record`` from its keys (after ``field_map``), or ``None`` if it matches none.

    Example::

        >>> detect_format({"instruction": "Add 2 and 2.", "output": "4"})
        'alpaca'
        >>> detect_format({"dialog": []}, {"messages": "dialog"})
        'chat'
        >>> detect_format({"conversations": []}), detect_format({"text": "..."})
        ('sharegpt', None)
    """
    fields = field_map or {}
    if _field(fields, "messages") in record:
        return "chat"
    if _field(fields, "conversations") in record:
        return "sharegpt"
    if _field(fields, "instruction") in record or _field(fields, "output") in record:
        return "alpaca"
    return None


def _missing(where: str, record: Mapping[str, Any], key: str, name: str, what: str) -> ValueError:
    remap = f"{{{name!r}: '<your key>'}}"
    return ValueError(
        f"{where}: the record has no {key!r} field ({what}); found keys {sorted(record)}. If your data calls it"
        f" differently, remap it with `field_map`, e.g. {remap}."
    )


def _text(where: str, value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__}.")
    return value


def _turns(
    where: str, record: Mapping[str, Any], list_name: str, role_name: str, content_name: str, fields: Mapping[str, str]
) -> list[tuple[Any, Any]]:
    list_key, role_key, content_key = (_field(fields, name) for name in (list_name, role_name, content_name))
    if list_key not in record:
        raise _missing(where, record, list_key, list_name, "the list of turns")
    turns = record[list_key]
    if not isinstance(turns, list):
        raise ValueError(f"{where}: field {list_key!r} must be a list of turns, got {type(turns).__name__}.")
    pairs = []
    for index, turn in enumerate(turns):
        at = f"{where}: {list_key}[{index}]"
        if not isinstance(turn, dict):
            raise ValueError(
                f"{at} must be an object with {role_key!r} and {content_key!r}, got {type(turn).__name__}."
            )
        for key, name in ((role_key, role_name), (content_key, content_name)):
            if key not in turn:
                raise _missing(at, turn, key, name, f"each turn needs {role_key!r} and {content_key!r}")
        pairs.append((turn[role_key], turn[content_key]))
    return pairs


def to_messages(
    record: Mapping[str, Any], format: str, field_map: Mapping[str, str] | None = None, where: str = "record"
) -> list[Message]:
    """Normalise one record of ``format`` (see :data:`FORMATS`) into a conversation of ``{"role", "content"}`` turns.

    * ``alpaca``: ``instruction``, optional ``input``, ``output``, optional ``system``. The user turn is the
      instruction, followed by ``"\\n\\n"`` and the input when the input is not empty.
    * ``chat``: ``messages``, a list of ``{"role", "content"}`` with roles ``system``, ``user``, ``assistant``.
    * ``sharegpt``: ``conversations``, a list of ``{"from", "value"}``; ``human``/``user`` become ``user``,
      ``gpt``/``assistant``/``chatgpt``/``bing``/``model`` become ``assistant``, ``system`` stays.

    In every format, a top-level ``system`` string becomes the system turn when the turns have none. ``field_map``
    maps these field names to the record's own (``{"instruction": "prompt", "output": "completion"}``).

    Raises:
        ValueError: naming ``where`` (``file:line``) for a missing field, a wrong type, an unknown role, an empty
            response or prompt (user turn), or a conversation without an assistant turn, or one that starts with one.

    Example::

        >>> to_messages({"instruction": "Translate to French.", "input": "cat", "output": "chat"}, "alpaca")
        [{'role': 'user', 'content': 'Translate to French.\\n\\ncat'}, {'role': 'assistant', 'content': 'chat'}]
        >>> to_messages({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        ...             "sharegpt")
        [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]
    """
    fields = field_map or {}
    messages: list[Message] = []
    if format == "alpaca":
        instruction_key, input_key, output_key = (_field(fields, n) for n in ("instruction", "input", "output"))
        for key, name, what in ((instruction_key, "instruction", "the prompt"), (output_key, "output", "the response")):
            if key not in record:
                raise _missing(where, record, key, name, what)
        user = _text(where, record[instruction_key], instruction_key)
        extra = record.get(input_key)
        if extra is not None and _text(where, extra, input_key):
            user = f"{user}\n\n{extra}" if user else extra
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _text(where, record[output_key], output_key)},
        ]
    elif format in ("chat", "sharegpt"):
        chat = format == "chat"
        names = ("messages", "role", "content") if chat else ("conversations", "from", "value")
        role_key, content_key = _field(fields, names[1]), _field(fields, names[2])
        for index, (role, content) in enumerate(_turns(where, record, *names, fields)):
            at = f"{where}: turn {index}"
            if not isinstance(role, str):
                raise ValueError(f"{at}: {role_key!r} must be a string, got {type(role).__name__}.")
            known = ROLES if chat else tuple(SHAREGPT_ROLES)
            if role not in known:
                other = "sharegpt" if chat and role in SHAREGPT_ROLES else None
                hint = f" (this looks like ShareGPT: set `format: {other}`)" if other else ""
                raise ValueError(f"{at} has unknown role {role!r}{hint}; the {format} format knows {list(known)}.")
            messages.append(
                {"role": role if chat else SHAREGPT_ROLES[role], "content": _text(at, content, content_key)}
            )
    else:
        raise ValueError(f"Unknown format {format!r}; choose one of {list(FORMATS)} (or 'auto').")

    system_key = _field(fields, "system")
    system = record.get(system_key)
    if system is not None and _text(where, system, system_key) and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})

    responses = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    if not responses:
        raise ValueError(
            f"{where}: the conversation has no assistant turn, so there is nothing to learn. Every sample needs at"
            " least one response."
        )
    for index in responses:
        if not messages[index]["content"].strip():
            raise ValueError(f"{where}: turn {index} is an empty response. Fill it in or remove the record.")
    for index, message in enumerate(messages):
        if message["role"] == "user" and not message["content"].strip():
            what = (
                f"the {_field(fields, 'instruction')!r} is empty and there is no {_field(fields, 'input')!r}"
                if format == "alpaca"
                else f"turn {index} is an empty user turn"
            )
            raise ValueError(f"{where}: {what}, so the response answers nothing. Fill it in or remove the record.")
    if all(message["role"] == "system" for message in messages[: responses[0]]):
        raise ValueError(
            f"{where}: the conversation starts with an assistant turn; a response needs a user turn before it."
            " Remove the leading assistant turn or add the prompt it answers."
        )
    return messages


def _with_system_prompt(messages: list[Message], system_prompt: str | None) -> list[Message]:
    if system_prompt is None or any(message["role"] == "system" for message in messages):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


# --------------------------------------------------------------------------------------------------------------------
# Rendering and labelling
# --------------------------------------------------------------------------------------------------------------------


def render_plain(
    messages: Sequence[Message], bos: str = "", eos: str = chr(EOS_BYTE), add_generation_prompt: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation with the ``plain`` template; returns the text and each response's character span.

    The template, for tokenizers without a chat template and for byte-level tokens::

        {bos}### System:\\n{system}\\n\\n### User:\\n{user}\\n\\n### Assistant:\\n{assistant}{eos}\\n\\n### User:\\n...

    ``bos`` opens the text (the tokenizer's BOS token, if it has one; nothing for bytes); each turn is a header line
    and its content followed by a blank line, and every assistant content ends with ``eos`` (the tokenizer's EOS
    token; byte :data:`~lightning_memopt.data.EOS_BYTE` for bytes). A response span covers the content and its
    ``eos``, so the model learns to stop; with ``add_generation_prompt`` the text ends in ``"### Assistant:\\n"``.

    Example::

        >>> text, spans = render_plain([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}],
        ...                            eos="</s>")
        >>> text
        '### User:\\nHi\\n\\n### Assistant:\\nHey</s>\\n\\n'
        >>> [text[start:end] for start, end in spans]
        ['Hey</s>']
    """
    parts = [bos]
    spans = []
    size = len(bos)
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "assistant":
            header = PLAIN_TEMPLATE["generation_prompt"]
            piece = PLAIN_TEMPLATE["assistant"].format(content=content, eos=eos)
            start = size + len(header)
            spans.append((start, start + len(content) + len(eos)))
        else:
            piece = PLAIN_TEMPLATE[role].format(content=content)
        parts.append(piece)
        size += len(piece)
    if add_generation_prompt:
        parts.append(PLAIN_TEMPLATE["generation_prompt"])
    return "".join(parts), spans


def render_chat(
    tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation with the tokenizer's chat template; returns the text and each response's character span.

    The span of assistant turn ``i`` runs from the end of the rendering of ``messages[:i]`` with the generation prompt
    to the end of the rendering of ``messages[:i + 1]``, so it includes the template's end-of-turn marker.

    Raises:
        ValueError: if a prefix of the conversation does not render as a prefix of the whole (the template changes
            earlier turns depending on later ones, e.g. by dropping reasoning), or the template rejects the
            conversation.

    Example::

        >>> from transformers import AutoTokenizer  # doctest: +SKIP
        >>> tokenizer = AutoTokenizer.from_pretrained("/models/Meta-Llama-3-8B-Instruct")  # doctest: +SKIP
        >>> text, spans = render_chat(tokenizer, [{"role": "user", "content": "Hi"},
        ...                                       {"role": "assistant", "content": "Hello"}])  # doctest: +SKIP
        >>> text[spans[0][0]:spans[0][1]]  # doctest: +SKIP
        'Hello<|eot_id|>'
    """

    def render(turns: Sequence[Message], generation_prompt: bool) -> str:
        text = tokenizer.apply_chat_template(list(turns), tokenize=False, add_generation_prompt=generation_prompt)
        return str(text)

    full = render(messages, add_generation_prompt)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:index], True)
        upto = (
            full if index + 1 == len(messages) and not add_generation_prompt else render(messages[: index + 1], False)
        )
        for name, prefix in (("with the generation prompt", prompt), ("", upto)):
            if not full.startswith(prefix):
                raise ValueError(
                    f"The chat template renders the first {index if name else index + 1} turn(s) {name}".rstrip()
                    + f" as {prefix[-80:]!r}, which is not a prefix of the whole conversation's rendering"
                    f" ({full[: len(prefix)][-80:]!r} there). Response tokens cannot be located: this template"
                    " rewrites earlier turns (e.g. drops reasoning) or ends a turn differently when more follow. Use"
                    " `template: plain`, or fix the template so each turn renders the same wherever it stands."
                )
        if len(upto) <= len(prompt):
            raise ValueError(
                f"The chat template renders assistant turn {index} as nothing after its generation prompt"
                f" {prompt[-80:]!r}; it drops the response. Use `template: plain` or fix the template."
            )
        spans.append((len(prompt), len(upto)))
    return full, spans


def label_tokens(
    input_ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]] | None
) -> list[int]:
    """Hugging Face ``labels``: the token id where a token's characters lie inside one of ``spans``, else ignored.

    ``offsets`` are each token's ``(start, end)`` characters in the rendered text; ``spans=None`` labels every token.

    Example::

        >>> label_tokens([5, 6, 7, 8], [(0, 2), (2, 3), (3, 5), (5, 6)], [(2, 5)])
        [-100, 6, 7, -100]
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    if spans is None:
        return ids.tolist()
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = bounds[:, 0], bounds[:, 1]
    inside = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        inside |= (starts >= start) & (ends <= end) & (ends > starts)
    return np.where(inside, ids, IGNORE_INDEX).tolist()


def _tokenizer_name(tokenizer: Any) -> str:
    # The directory it was loaded from is what the user wrote and can change; the class is an implementation detail.
    path = getattr(tokenizer, "name_or_path", None)
    return f"at {str(path)!r}" if path else f"{type(tokenizer).__name__} (loaded from memory)"


def _byte_offsets(text: str) -> list[tuple[int, int]]:
    return [(index, index + 1) for index, char in enumerate(text) for _ in range(len(char.encode("utf-8")))]


class ConversationEncoder:
    """Turns conversations into ``(input_ids, labels)`` with a tokenizer and a template.

    Args:
        tokenizer: a fast Hugging Face tokenizer, or ``None`` for byte-level tokens (the UTF-8 bytes; EOS is
            :data:`~lightning_memopt.data.EOS_BYTE`).
        template: ``"chat"`` (the tokenizer's chat template), ``"plain"`` (:func:`render_plain`) or ``"auto"`` (chat
            if the tokenizer has a template, else plain).
        train_on: ``"responses"`` labels only assistant turns; ``"all"`` every token.

    Example::

        >>> encoder = ConversationEncoder(None)
        >>> ids, labels = encoder.encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ok"}])
        >>> bytes(ids)
        b'### User:\\nHi\\n\\n### Assistant:\\nok\\x00\\n\\n'
        >>> bytes(label for label in labels if label != -100)
        b'ok\\x00'
    """

    def __init__(self, tokenizer: Any | None, template: str = "auto", train_on: str = "responses") -> None:
        if template not in TEMPLATES:
            raise ValueError(f"template should be one of {list(TEMPLATES)} but is: {template!r}")
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on should be one of {list(TRAIN_ON)} but is: {train_on!r}")
        has_template = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
        if template == "chat" and not has_template:
            source = (
                "byte-level tokens have" if tokenizer is None else f"the tokenizer {_tokenizer_name(tokenizer)} has"
            )
            raise ValueError(
                f"template='chat' but {source} no chat template. Use `template: plain` (or `auto`), or pass a"
                " tokenizer whose tokenizer_config.json (or chat_template.jinja) defines one."
            )
        if tokenizer is not None and not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"The tokenizer {_tokenizer_name(tokenizer)} is a slow (Python) tokenizer; locating response tokens"
                " needs character offsets, which only fast tokenizers give. Use a directory with a tokenizer.json."
            )
        self.tokenizer = tokenizer
        self._eos_token_id: tuple[int | None] | None = None
        self.template = "chat" if template == "chat" or (template == "auto" and has_template) else "plain"
        self.train_on = train_on
        if tokenizer is None:
            self._bos, self._eos = "", chr(EOS_BYTE)
        else:
            self._bos = tokenizer.bos_token or ""
            self._eos = tokenizer.eos_token or ""
            if self.template == "plain" and not self._eos:
                raise ValueError(
                    f"The tokenizer {_tokenizer_name(tokenizer)} has no end-of-sequence token, which the plain template"
                    " ends every response with. Set `eos_token` in its tokenizer_config.json."
                )

    def render(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        """The conversation's text and its responses' character spans (:func:`render_plain`, :func:`render_chat`)."""
        if self.template == "chat":
            return render_chat(self.tokenizer, messages, add_generation_prompt)
        return render_plain(messages, self._bos, self._eos, add_generation_prompt)

    def tokenize(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Token ids and character offsets of each text, without added special tokens (the template has them)."""
        if self.tokenizer is None:
            return [(list(text.encode("utf-8")), _byte_offsets(text)) for text in texts]
        # Samples longer than the model's context are cut afterwards; `verbose=False` silences that warning.
        encoded = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [
            (list(ids), list(offsets))
            for ids, offsets in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
        ]

    def encode_many(self, conversations: Sequence[tuple[str, list[Message]]]) -> list[tuple[list[int], list[int]]]:
        """``(input_ids, labels)`` of each ``(where, messages)``; errors name ``where``."""
        rendered = []
        for where, messages in conversations:
            try:
                rendered.append(self.render(messages))
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from err
            except Exception as err:  # jinja2's TemplateError and whatever a template raises
                raise ValueError(
                    f"{where}: the chat template failed on this conversation ({type(err).__name__}: {err}). Fix the"
                    " record (some templates reject a system turn or turns out of order) or use `template: plain`."
                ) from err
        samples = []
        for (where, _), (text, spans), (ids, offsets) in zip(
            conversations, rendered, self.tokenize([text for text, _ in rendered]), strict=True
        ):
            labels = label_tokens(ids, offsets, spans if self.train_on == "responses" else None)
            if all(label == IGNORE_INDEX for label in labels):
                raise ValueError(
                    f"{where}: no token lies inside the response text {[text[a:b][:40] for a, b in spans]}; the"
                    " tokenizer merges each response with the text around it. Use `template: plain` or another"
                    " tokenizer."
                )
            samples.append((ids, labels))
        return samples

    def encode(self, messages: list[Message]) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one conversation."""
        return self.encode_many([("conversation", messages)])[0]

    def encode_prompt(self, messages: list[Message]) -> list[int]:
        """Token ids of the conversation followed by the generation prompt, ready for the model to complete."""
        if self.template == "chat":
            assert self.tokenizer is not None
            text = str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        else:
            text = render_plain(messages, self._bos, self._eos, add_generation_prompt=True)[0]
        return self.tokenize([text])[0][0]

    @property
    def pad_token_id(self) -> int:
        """Token that fills batches: the tokenizer's pad token, else its EOS token, else 0 (never attended to)."""
        if self.tokenizer is None:
            return EOS_BYTE
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    @property
    def eos_token_id(self) -> int | None:
        """The token that ends a trained response: the chat template's end-of-turn marker (e.g. ``<|im_end|>``,
        Llama 3's ``<|eot_id|>``) if it has one, else the tokenizer's EOS token; :data:`EOS_BYTE` for bytes."""
        if self._eos_token_id is None:
            self._eos_token_id = (self._response_end(),)
        return self._eos_token_id[0]

    def _response_end(self) -> int | None:
        if self.tokenizer is None:
            return EOS_BYTE
        eos = self.tokenizer.eos_token_id
        if self.template != "chat":
            return None if eos is None else int(eos)
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        try:
            text, spans = self.render(probe)
        except Exception:  # a template that rejects the probe: the tokenizer's EOS is the best guess
            return None if eos is None else int(eos)
        start, end = spans[-1]
        marker = text[start:end]
        marker = marker[marker.find("Hello") + len("Hello") :] if "Hello" in marker else ""
        special = {
            int(index) for index, token in getattr(self.tokenizer, "added_tokens_decoder", {}).items() if token.special
        } | set(self.tokenizer.all_special_ids)
        for token in self.tokenize([marker])[0][0] if marker else []:
            if token in special:
                return int(token)
        return None if eos is None else int(eos)


# --------------------------------------------------------------------------------------------------------------------
# Tokenized storage
# --------------------------------------------------------------------------------------------------------------------


class TokenizedSamples(Dataset[dict[str, Tensor]]):
    """Variable-length samples stored flat: all ``input_ids`` (and ``labels``) one after the other, plus offsets.

    Indexing returns ``{"input_ids", "labels"}`` as int64 tensors; ``lengths`` holds every sample's token count.

    Example::

        >>> samples = TokenizedSamples.from_lists([([1, 2, 3], [-100, 2, 3]), ([4], [4])])
        >>> samples[0]["labels"].tolist(), samples.lengths.tolist()
        ([-100, 2, 3], [3, 1])
    """

    def __init__(self, input_ids: Tensor, labels: Tensor, offsets: Tensor) -> None:
        self.input_ids = input_ids
        self.labels = labels
        self.offsets = offsets

    @classmethod
    def from_lists(cls, samples: Sequence[tuple[Sequence[int], Sequence[int]]]) -> TokenizedSamples:
        lengths = torch.tensor([len(ids) for ids, _ in samples], dtype=torch.int64)
        offsets = torch.zeros(len(samples) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        flat_ids = [token for ids, _ in samples for token in ids]
        flat_labels = [label for _, labels in samples for label in labels]
        return cls(torch.tensor(flat_ids, dtype=torch.int32), torch.tensor(flat_labels, dtype=torch.int32), offsets)

    @property
    def lengths(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @override
    def __getitem__(self, index: int) -> dict[str, Tensor]:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return {"input_ids": self.input_ids[start:end].long(), "labels": self.labels[start:end].long()}


def tokenize_files(
    files: Sequence[Path],
    encoder: ConversationEncoder,
    *,
    max_length: int,
    format: str = "auto",
    field_map: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    overlong: str = "truncate",
    chunk: int = 256,
) -> tuple[TokenizedSamples, dict[str, int]]:
    """Read, validate, render and tokenize every record of ``files``; returns the samples and counts of what happened.

    Samples longer than ``max_length`` are cut there (``overlong="truncate"``), skipped (``"drop"``) or refused
    (``"error"``). The counts: ``samples`` kept, ``truncated``, ``dropped``, ``response_tokens_cut`` (labelled tokens
    beyond ``max_length`` in truncated samples), ``response_tokens_dropped`` (every labelled token of the dropped
    samples) and ``tokens`` kept. Labelled tokens count from a sample's second token: the first is never predicted.

    Raises:
        ValueError: naming ``file:line`` for bad records, for an overlong sample under ``"error"``, and for a sample
            whose every response token lies beyond ``max_length`` under ``"truncate"``.

    Example::

        >>> encoder = ConversationEncoder(tokenizer)  # doctest: +SKIP
        >>> samples, counts = tokenize_files([Path("train.jsonl")], encoder, max_length=2048)  # doctest: +SKIP
        >>> counts["samples"], counts["truncated"]  # doctest: +SKIP
        (52002, 31)
    """
    stats = {
        "samples": 0,
        "truncated": 0,
        "dropped": 0,
        "response_tokens_cut": 0,
        "response_tokens_dropped": 0,
        "tokens": 0,
    }
    kept: list[tuple[list[int], list[int]]] = []

    def flush(pending: list[tuple[str, list[Message]]]) -> None:
        for (where, _), (ids, labels) in zip(pending, encoder.encode_many(pending), strict=True):
            if len(ids) > max_length:
                # Position 0 is never predicted (labels are shifted), so it does not count as something to train.
                left = sum(label != IGNORE_INDEX for label in labels[1:max_length])
                cut = sum(label != IGNORE_INDEX for label in labels[max_length:])
                if overlong == "error":
                    raise ValueError(
                        f"{where} has {len(ids)} tokens, more than max_length={max_length}. Raise `max_length`, or set"
                        " `overlong` to 'truncate' (cut it) or 'drop' (skip it)."
                    )
                if overlong == "drop":
                    stats["dropped"] += 1
                    stats["response_tokens_dropped"] += left + cut
                    continue
                if left == 0:
                    raise ValueError(
                        f"{where}: all {cut} response tokens lie beyond max_length={max_length} (the sample has"
                        f" {len(ids)} tokens), so truncating leaves nothing to train. Raise `max_length`, or set"
                        " `overlong: drop` to skip such samples."
                    )
                stats["truncated"] += 1
                stats["response_tokens_cut"] += cut
                ids, labels = ids[:max_length], labels[:max_length]
            kept.append((ids, labels))
            stats["tokens"] += len(ids)

    for path in files:
        pending: list[tuple[str, list[Message]]] = []
        file_format, detected_at = format, 0
        for number, record in read_records(path):
            where = f"{path}:{number}"
            if file_format == "auto":
                detected = detect_format(record, field_map)
                if detected is None:
                    raise ValueError(
                        f"{where}: cannot tell the format from the keys {sorted(record)}: expected 'messages' (chat),"
                        " 'conversations' (ShareGPT) or 'instruction' and 'output' (Alpaca). Set `format`, or map"
                        " your keys with `field_map` (e.g. {'instruction': 'prompt', 'output': 'completion'})."
                    )
                file_format, detected_at = detected, number
            try:
                messages = to_messages(record, file_format, field_map, where)
            except ValueError as err:
                looks_like = detect_format(record, field_map) if detected_at else None
                if looks_like is None or looks_like == file_format:
                    raise
                raise ValueError(
                    f"{err} (The file was read as {file_format}, detected from line {detected_at}, but this record"
                    f" looks like {looks_like}: keep one format per file.)"
                ) from err
            messages = _with_system_prompt(messages, system_prompt)
            pending.append((where, messages))
            if len(pending) >= chunk:
                flush(pending)
                pending = []
        flush(pending)
    stats["samples"] = len(kept)
    return TokenizedSamples.from_lists(kept), stats


# --------------------------------------------------------------------------------------------------------------------
# Packing and length grouping
# --------------------------------------------------------------------------------------------------------------------


def pack_samples(lengths: Sequence[int], max_length: int, seed: int = 0) -> list[list[int]]:
    """Group sample indices into rows of at most ``max_length`` tokens, whole samples only.

    Samples are taken in a seeded random order and each goes into the fullest row it still fits in (best fit), so
    rows are nearly full without sorting long samples together.

    Example::

        >>> rows = pack_samples([6, 5, 4, 5], max_length=10)
        >>> sorted(sorted(row) for row in rows)
        [[0, 2], [1, 3]]
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row), sorted
    for index in order:
        length = int(lengths[index])
        if length > max_length:
            raise ValueError(f"Sample {index} has {length} tokens, more than max_length={max_length}; cut it first.")
        at = bisect.bisect_left(free, (length, -1))
        if at < len(free):
            space, row = free.pop(at)
        else:
            space, row = max_length, len(rows)
            rows.append([])
        rows[row].append(index)
        if space - length > 0:
            bisect.insort(free, (space - length, row))
    return rows


def length_grouped_order(
    lengths: Sequence[int], batch_size: int, seed: int = 0, epoch: int = 0, mega_batches: int = 50
) -> list[int]:
    """Indices in an order whose consecutive ``batch_size`` chunks hold samples of similar length.

    A seeded shuffle is cut into mega-batches of ``mega_batches * batch_size`` samples, each sorted by length
    (longest first), split into batches, and the batches shuffled; the same ``seed`` and ``epoch`` give the same order.

    Example::

        >>> order = length_grouped_order([1, 9, 2, 8, 3, 7], batch_size=2)
        >>> sorted(sorted([1, 9, 2, 8, 3, 7][i] for i in order[k : k + 2]) for k in range(0, 6, 2))
        [[1, 2], [3, 7], [8, 9]]
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    size = batch_size * mega_batches
    batches: list[list[int]] = []
    for start in range(0, len(order), size):
        mega = sorted(order[start : start + size], key=lambda index: -int(lengths[index]))
        batches.extend(mega[k : k + batch_size] for k in range(0, len(mega), batch_size))
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [index for batch in shuffled for index in batches[batch]]


class LengthGroupedSampler(Sampler[int]):
    """Yields sample indices so that each batch holds samples of similar length (less padding); see
    :func:`length_grouped_order`.

    Under DDP, Lightning wraps it in a ``DistributedSamplerWrapper`` that hands index ``r, r + N, r + 2N, ...`` of this
    order to rank ``r`` of ``N``: ``batch_size`` is therefore the *global* batch (per-device batch times world size), so
    that each rank's batch comes from one group. ``set_epoch`` (which Lightning calls) changes the order per epoch.

    Example::

        >>> lengths = [5, 1, 4, 2]
        >>> [lengths[index] for index in LengthGroupedSampler(lengths, batch_size=2)]
        [5, 4, 2, 1]
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega_batches: int = 50) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size should be >= 1 but is: {batch_size}")
        self.lengths = [int(length) for length in lengths]
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batches = mega_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    @override
    def __iter__(self) -> Iterator[int]:
        return iter(length_grouped_order(self.lengths, self.batch_size, self.seed, self.epoch, self.mega_batches))


class _Split(Dataset[dict[str, Tensor]]):
    """A subset of samples, one sample per item."""

    def __init__(self, samples: TokenizedSamples, indices: Sequence[int]) -> None:
        self.samples = samples
        self.indices = list(indices)
        self.lengths = [int(length) for length in samples.lengths[self.indices]] if self.indices else []

    def __len__(self) -> int:
        return len(self.indices)

    @override
    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.samples[self.indices[index]]


class _PackedRows(Dataset[dict[str, Tensor]]):
    """Rows of whole samples: ``position_ids`` restart at every sample, whose first token gets no label."""

    def __init__(self, samples: TokenizedSamples, rows: Sequence[Sequence[int]]) -> None:
        self.samples = samples
        self.rows = [list(row) for row in rows]
        sample_lengths = samples.lengths
        self.lengths = [int(sample_lengths[row].sum()) for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    @override
    def __getitem__(self, index: int) -> dict[str, Tensor]:
        parts = [self.samples[sample] for sample in self.rows[index]]
        labels = []
        for part in parts:
            label = part["labels"].clone()
            # Predicted from the previous sample's last token, which this sample cannot see.
            label[0] = IGNORE_INDEX
            labels.append(label)
        return {
            "input_ids": torch.cat([part["input_ids"] for part in parts]),
            "labels": torch.cat(labels),
            "position_ids": torch.cat([torch.arange(len(part["input_ids"])) for part in parts]),
        }


class _PadCollator:
    """Right-pads a batch to its longest sample. Padding is never attended to (``attention_mask`` 0, or a separate
    ``position_ids`` run from 0 in packed rows) and has no label."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        length = max(len(item["input_ids"]) for item in items)
        packed = "position_ids" in items[0]
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        mask_or_positions = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            size = len(item["input_ids"])
            input_ids[row, :size] = item["input_ids"]
            labels[row, :size] = item["labels"]
            if packed:
                mask_or_positions[row, :size] = item["position_ids"]
                mask_or_positions[row, size:] = torch.arange(length - size)
            else:
                mask_or_positions[row, :size] = 1
        second = "position_ids" if packed else "attention_mask"
        return {"input_ids": input_ids, second: mask_or_positions, "labels": labels}


# --------------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------------


def _import_datasets() -> Any | None:
    try:
        import datasets
    except ImportError:
        return None
    return datasets


def _default_cache_dir() -> Path:
    root = os.environ.get("LIGHTNING_MEMOPT_CACHE")
    return Path(root).expanduser() / "instruct" if root else Path("~/.cache/lightning_memopt/instruct").expanduser()


def _files_fingerprint(files: Sequence[Path]) -> list[list[Any]]:
    entries = []
    for path in files:
        stat = path.stat()
        entries.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return entries


def _tokenizer_fingerprint(tokenizer: Any | None) -> str:
    if tokenizer is None:
        return "bytes"
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode("utf-8"))
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    details = {
        "class": type(tokenizer).__name__,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_tokens": {name: str(value) for name, value in sorted(tokenizer.special_tokens_map.items())},
        "special_ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
    }
    digest.update(json.dumps(details, sort_keys=True, default=str).encode("utf-8"))
    return digest.hexdigest()


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in ("transformers", "tokenizers"):
        with contextlib.suppress(ImportError):
            versions[name] = __import__(name).__version__
    return versions


_COLUMNS = {"input_ids": np.int32, "labels": np.int32, "offsets": np.int64}


def _save_samples(datasets: Any, samples: TokenizedSamples, path: Path) -> None:
    import pyarrow as pa

    # One row holding each flat array whole: `save_to_disk` writes record batches of 1,000 rows, and a table of many
    # chunks could only become one tensor by copying. One row is one chunk, which `_load_samples` maps without a copy.
    arrays = {"input_ids": samples.input_ids, "labels": samples.labels, "offsets": samples.offsets}
    columns = {}
    for name, dtype in _COLUMNS.items():
        values = pa.array(arrays[name].numpy().astype(dtype, copy=False))
        columns[name] = pa.LargeListArray.from_arrays(pa.array([0, len(values)], type=pa.int64()), values)
    datasets.Dataset(pa.table(columns)).save_to_disk(str(path))


def _load_samples(datasets: Any, path: Path) -> TokenizedSamples:
    table = datasets.load_from_disk(str(path)).data.table
    tensors = {}
    for name in _COLUMNS:
        column = table.column(name)
        if column.num_chunks != 1 or len(column) != 1:
            raise ValueError(
                f"The cache entry {path} holds {len(column)} row(s) in {column.num_chunks} chunk(s) of {name!r}, not"
                " one: it was not written by this version. Delete it to rebuild it."
            )
        values = column.chunk(0).flatten().to_numpy(zero_copy_only=True)
        # A view of the memory-mapped file, shared by ranks and workers. It is read-only, which torch warns about:
        # nothing writes to these tensors (`TokenizedSamples` hands out copies).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")
            tensors[name] = torch.from_numpy(values)
    return TokenizedSamples(tensors["input_ids"], tensors["labels"], tensors["offsets"])


@contextlib.contextmanager
def _quiet_datasets(datasets: Any) -> Iterator[None]:
    progress = datasets.utils
    was_disabled = progress.are_progress_bars_disabled()
    progress.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            progress.enable_progress_bars()


# --------------------------------------------------------------------------------------------------------------------
# The data module
# --------------------------------------------------------------------------------------------------------------------


class InstructionDataModule(LightningDataModule):
    """Supervised fine-tuning data from local Alpaca, chat or ShareGPT JSONL files, with the loss on the responses.

    Each record becomes a conversation (:func:`to_messages`), rendered with the tokenizer's chat template or the plain
    template (:func:`render_plain`) and tokenized once. ``labels`` equal ``input_ids`` (not shifted; the model or
    :func:`~lightning_memopt.lm.next_token_loss` shifts them) with ``-100`` where there is no loss: on prompts,
    system and user turns and padding, so the model learns to answer (every assistant turn of a multi-turn
    conversation, with the template's end-of-turn marker, so it learns to stop). Batches are dicts of int64
    ``(batch, length)`` tensors, right-padded to their longest sample: ``input_ids``, ``attention_mask``, ``labels``;
    with ``packing`` they are ``input_ids``, ``position_ids``, ``labels`` and no ``attention_mask``.

    Tokenized samples are cached under ``cache_dir`` with Hugging Face ``datasets`` (when installed), keyed by the
    files (path, size, modification time), the tokenizer and every setting that changes tokens; the cache is built
    in ``prepare_data`` (once per node) and loaded in ``setup``, memory-mapped without a copy. Samples longer than
    ``max_length`` are counted in :attr:`stats` and reported in one line, a warning when anything was cut or dropped.

    Args:
        paths: files, directories (searched recursively) or glob patterns of ``.jsonl``/``.json`` JSON-lines files.
        tokenizer: local directory of a Hugging Face tokenizer, usually the model's own; nothing is downloaded.
            ``None`` uses UTF-8 bytes as tokens (vocabulary 256), for tiny models built from a config.
        max_length: most tokens per sample (and per packed row).
        batch_size: samples (packed rows) per batch, per device.
        val_fraction: share of the samples held out for validation, in ``[0, 1)``, a seeded choice that is the same on
            every run and rank; ``0`` disables validation. Ignored when ``val_paths`` is given.
        val_paths: separate validation files (same forms as ``paths``) instead of a fraction.
        format: ``"alpaca"``, ``"chat"``, ``"sharegpt"``, or ``"auto"`` to detect it per file from its first record.
        field_map: the record's names for the standard fields (:data:`FIELDS`), e.g. ``{"instruction": "prompt",
            "output": "completion"}`` or ``{"messages": "dialog", "role": "speaker", "content": "text"}``.
        template: ``"auto"`` (the tokenizer's chat template if it has one, else ``"plain"``), ``"chat"`` or
            ``"plain"`` (:func:`render_plain`).
        system_prompt: system turn added to every conversation that has none.
        train_on: ``"responses"`` (loss on the assistant turns only) or ``"all"`` (on every token).
        overlong: samples longer than ``max_length`` are cut there (``"truncate"``), skipped (``"drop"``) or refused
            (``"error"``). A sample whose responses would be cut away entirely is always an error under ``"truncate"``.
        packing: concatenate whole samples into rows of up to ``max_length`` tokens (no padding waste). The model must
            build a block-diagonal mask from ``position_ids`` (transformers' models do, via
            ``masking_utils.find_packed_sequence_indices``, when called with ``attention_mask=None`` and
            ``use_cache=False``, as :class:`~lightning_memopt.lm.CausalLM` does); ``setup`` checks the model.
        group_by_length: batch samples of similar length together (seeded by ``seed`` and the epoch), to pad less.
        cache_dir: where tokenized samples are kept; default ``$LIGHTNING_MEMOPT_CACHE/instruct`` or
            ``~/.cache/lightning_memopt/instruct``.
        num_workers: data-loader worker processes.
        seed: seed of the validation split, of packing and of ``group_by_length``. Otherwise the order of training
            batches follows the global seed (the ``seed_everything`` of the CLI).

    Attributes:
        stats: what tokenization did: ``files``, ``samples`` (kept), ``truncated``, ``dropped``,
            ``response_tokens_cut`` (past ``max_length`` in truncated samples), ``response_tokens_dropped`` (all of
            the dropped samples'), ``tokens``, ``train_samples``, ``val_samples``, and with packing ``train_rows``
            and ``val_rows``. Filled by ``setup``.

    Example::

        >>> import json, tempfile, os
        >>> scratch = tempfile.TemporaryDirectory()
        >>> folder = scratch.name
        >>> path = os.path.join(folder, "train.jsonl")
        >>> with open(path, "w") as f:
        ...     _ = f.write(json.dumps({"instruction": "Say hi.", "output": "Hi!"}) + "\\n")
        >>> data = InstructionDataModule([path], val_fraction=0, cache_dir=os.path.join(folder, "cache"))
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> data.decode([label for label in batch["labels"][0].tolist() if label != -100])
        'Hi!'
        >>> scratch.cleanup()
    """

    def __init__(
        self,
        paths: list[str],
        tokenizer: str | None = None,
        max_length: int = 1024,
        batch_size: int = 8,
        val_fraction: float = 0.02,
        val_paths: list[str] | None = None,
        format: str = "auto",
        field_map: dict[str, str] | None = None,
        template: str = "auto",
        system_prompt: str | None = None,
        train_on: str = "responses",
        overlong: str = "truncate",
        packing: bool = False,
        group_by_length: bool = False,
        cache_dir: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(paths, str) or not paths:
            raise ValueError(
                f"paths should be a non-empty list of files, directories or globs but is: {paths!r}."
                + (f" Write it as a list: [{paths!r}]." if isinstance(paths, str) else "")
            )
        if val_paths is not None and (isinstance(val_paths, str) or not val_paths):
            raise ValueError(
                f"val_paths should be a non-empty list of files, directories or globs, or None, but is: {val_paths!r}."
            )
        if max_length < 2:
            raise ValueError(
                f"max_length should be >= 2 (one token to predict from, one to predict) but is: {max_length}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size should be >= 1 but is: {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction should be in [0, 1) but is: {val_fraction}")
        if format not in ("auto", *FORMATS):
            raise ValueError(f"format should be one of {['auto', *FORMATS]} but is: {format!r}")
        if field_map is not None:
            unknown = sorted(set(field_map) - set(FIELDS))
            if unknown:
                raise ValueError(
                    f"field_map has unknown field(s) {unknown}; its keys are the standard names {list(FIELDS)} and its"
                    " values your data's names, e.g. {'instruction': 'prompt', 'output': 'completion'}."
                )
            wrong = sorted(key for key, value in field_map.items() if not isinstance(value, str) or not value)
            if wrong:
                raise ValueError(f"field_map values should be non-empty strings (your data's key names); fix {wrong}.")
        if template not in TEMPLATES:
            raise ValueError(f"template should be one of {list(TEMPLATES)} but is: {template!r}")
        if template == "chat" and tokenizer is None:
            raise ValueError(
                "template='chat' needs a tokenizer with a chat template, but tokenizer is None (byte-level tokens)."
                " Pass `tokenizer`, or use `template: plain`."
            )
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on should be one of {list(TRAIN_ON)} but is: {train_on!r}")
        if overlong not in OVERLONG:
            raise ValueError(f"overlong should be one of {list(OVERLONG)} but is: {overlong!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers should be >= 0 but is: {num_workers}")
        self.save_hyperparameters()
        self.paths = list(paths)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.val_paths = list(val_paths) if val_paths is not None else None
        self.format = format
        self.field_map = dict(field_map or {})
        self.template = template
        self.system_prompt = system_prompt
        self.train_on = train_on
        self.overlong = overlong
        self.packing = packing
        self.group_by_length = group_by_length
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
        self.num_workers = num_workers
        self.seed = seed
        self.stats: dict[str, int] = {}
        self.cache_path: Path | None = None
        """The cache entry that ``setup`` loaded (``None`` without ``datasets``)."""
        self.train_set: _Split | _PackedRows | None = None
        self.val_set: _Split | _PackedRows | None = None
        self._tokenizer: Any = None
        self._encoder: ConversationEncoder | None = None

    # -- tokenizer -----------------------------------------------------------------------------------------------

    def get_tokenizer(self) -> Any | None:
        """The Hugging Face tokenizer, loaded from ``tokenizer`` on first use; ``None`` for byte-level tokens."""
        if self.tokenizer is not None and self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer)
        return self._tokenizer

    def _get_encoder(self) -> ConversationEncoder:
        if self._encoder is None:
            self._encoder = ConversationEncoder(self.get_tokenizer(), self.template, self.train_on)
        return self._encoder

    def encode_prompt(self, prompt: str | list[Message]) -> list[int]:
        """Token ids of a prompt (a user message, or a conversation) with the generation prompt appended, rendered
        like the training data (same template, same ``system_prompt``), ready for greedy completion."""
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = [{"role": message["role"], "content": message["content"]} for message in prompt]
            unknown = sorted({message["role"] for message in messages} - set(ROLES))
            if unknown:
                raise ValueError(f"The prompt has unknown role(s) {unknown}; use {list(ROLES)}.")
        return self._get_encoder().encode_prompt(_with_system_prompt(messages, self.system_prompt))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids; special tokens (the EOS byte, for bytes) are left out unless ``skip_special_tokens`` is
        false."""
        tokenizer = self.get_tokenizer()
        ids = [int(token) for token in ids]
        if tokenizer is None:
            data = bytes(t for t in ids if 0 <= t < VOCAB_SIZE and not (skip_special_tokens and t == EOS_BYTE))
            return data.decode("utf-8", errors="replace")
        return str(tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens, for sizing a model's embedding."""
        tokenizer = self.get_tokenizer()
        return VOCAB_SIZE if tokenizer is None else len(tokenizer)

    @property
    def eos_token_id(self) -> int | None:
        """The token that ends a response, where generation stops: the chat template's end-of-turn marker (e.g.
        ``<|im_end|>``, Llama 3's ``<|eot_id|>``), else the tokenizer's EOS token; :data:`EOS_BYTE` for bytes."""
        return self._get_encoder().eos_token_id

    # -- cache -----------------------------------------------------------------------------------------------------

    def _splits(self) -> dict[str, list[Path]]:
        splits = {"train": find_instruction_files(self.paths)}
        if self.val_paths is not None:
            splits["val"] = find_instruction_files(self.val_paths)
        return splits

    def _cache_key(self, splits: Mapping[str, Sequence[Path]]) -> str:
        material = {
            "version": _CACHE_VERSION,
            "libraries": _library_versions(),
            "files": {name: _files_fingerprint(files) for name, files in splits.items()},
            "tokenizer": _tokenizer_fingerprint(self.get_tokenizer()),
            "settings": {
                "max_length": self.max_length,
                "format": self.format,
                "field_map": sorted(self.field_map.items()),
                "template": self._get_encoder().template,
                "system_prompt": self.system_prompt,
                "train_on": self.train_on,
                "overlong": self.overlong,
            },
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode("utf-8")).hexdigest()[:20]

    def _tokenize(self, splits: Mapping[str, Sequence[Path]]) -> tuple[dict[str, TokenizedSamples], dict[str, int]]:
        samples, stats = {}, {"files": 0}
        for name, files in splits.items():
            samples[name], counts = tokenize_files(
                files,
                self._get_encoder(),
                max_length=self.max_length,
                format=self.format,
                field_map=self.field_map,
                system_prompt=self.system_prompt,
                overlong=self.overlong,
            )
            if len(samples[name]) == 0:
                sources = [str(file) for file in files]
                raise ValueError(
                    f"No {name} samples are left from {sources}: all {counts['dropped']} are longer than"
                    f" max_length={self.max_length}. Raise `max_length`, or set `overlong: truncate`."
                    if counts["dropped"]
                    else f"The {name} files {sources} hold no records. Add JSON lines to them or remove them."
                )
            stats["files"] += len(files)
            for key, value in counts.items():
                stats[key] = stats.get(key, 0) + value
        return samples, stats

    def _build_cache(self, datasets: Any, splits: Mapping[str, Sequence[Path]], entry: Path) -> None:
        samples, stats = self._tokenize(splits)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        staging = self.cache_dir / f".{entry.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with _quiet_datasets(datasets):
                for name, split in samples.items():
                    _save_samples(datasets, split, staging / name)
            (staging / "stats.json").write_text(json.dumps(stats, indent=1))
            try:
                os.rename(staging, entry)
            except OSError:
                if not (entry / "stats.json").is_file():  # not another rank that finished first
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _load(self) -> tuple[dict[str, TokenizedSamples], dict[str, int]]:
        global _DATASETS_HINT_SHOWN
        splits = self._splits()
        datasets = _import_datasets()
        if datasets is None:
            if not _DATASETS_HINT_SHOWN:
                rank_zero_info(
                    "InstructionDataModule: tokenizing in memory, on every run. Caching tokenized samples on disk"
                    " needs Hugging Face datasets: `pip install datasets`."
                )
                _DATASETS_HINT_SHOWN = True
            self.cache_path = None
            return self._tokenize(splits)
        entry = self._cached(datasets, splits)
        self.cache_path = entry
        stats = json.loads((entry / "stats.json").read_text())
        with _quiet_datasets(datasets):
            return {name: _load_samples(datasets, entry / name) for name in splits}, stats

    def _cached(self, datasets: Any, splits: Mapping[str, Sequence[Path]]) -> Path:
        entry = self.cache_dir / self._cache_key(splits)
        # `stats.json` is written last, inside the staging directory that becomes the entry in one rename.
        if not (entry / "stats.json").is_file():
            self._build_cache(datasets, splits, entry)
        return entry

    @override
    def prepare_data(self) -> None:
        datasets = _import_datasets()
        if datasets is not None:
            self._cached(datasets, self._splits())

    # -- setup and loaders -------------------------------------------------------------------------------------------

    @override
    def setup(self, stage: str) -> None:
        if self.packing:
            self._check_packing_support()
        if self.train_set is not None:
            return
        samples, stats = self._load()
        train = samples["train"]
        if "val" in samples:
            train_indices, val_split = list(range(len(train))), samples["val"]
            val_indices = list(range(len(val_split)))
        else:
            count = len(train)
            num_val = max(1, round(count * self.val_fraction)) if self.val_fraction > 0 else 0
            if num_val >= count:
                raise ValueError(
                    f"The data gives {count} sample(s), too few to hold out {num_val} for validation and still train."
                    " Add records to `paths`, pass `val_paths`, or set `val_fraction: 0`."
                )
            order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed))
            val_indices, train_indices = order[:num_val].sort().values.tolist(), order[num_val:].sort().values.tolist()
            val_split = train
        stats["train_samples"], stats["val_samples"] = len(train_indices), len(val_indices)
        self.train_set = self._dataset(train, train_indices)
        self.val_set = self._dataset(val_split, val_indices) if val_indices else None
        if self.packing:
            stats["train_rows"] = len(self.train_set)
            stats["val_rows"] = len(self.val_set) if self.val_set is not None else 0
        self.stats = stats
        # Lost training signal must not scroll by as one more info line.
        report = rank_zero_warn if stats["truncated"] or stats["dropped"] else rank_zero_info
        report(self._report())

    def _dataset(self, samples: TokenizedSamples, indices: list[int]) -> _Split | _PackedRows:
        if not self.packing:
            return _Split(samples, indices)
        lengths = samples.lengths[indices].tolist() if indices else []
        rows = pack_samples(lengths, self.max_length, self.seed)
        return _PackedRows(samples, [[indices[i] for i in row] for row in rows])

    def _report(self) -> str:
        stats = self.stats
        rows = f", packed into {stats['train_rows']:,} + {stats['val_rows']:,} rows" if self.packing else ""
        return (
            f"InstructionDataModule: {stats['samples']:,} samples ({stats['tokens']:,} tokens) from {stats['files']}"
            f" file(s): {stats['train_samples']:,} train, {stats['val_samples']:,} val{rows}; longer than"
            f" max_length={self.max_length}: {stats['truncated']:,} truncated ({stats['response_tokens_cut']:,}"
            f" response tokens cut), {stats['dropped']:,} dropped ({stats['response_tokens_dropped']:,} response"
            " tokens in them)."
        )

    def _check_packing_support(self) -> None:
        trainer = self.trainer
        module = trainer.lightning_module if trainer is not None else None
        if module is None:
            return
        model: torch.nn.Module | None = None
        packed_masks = False
        try:
            from transformers import PreTrainedModel, masking_utils
        except ImportError:
            pass
        else:
            model = next((m for m in module.modules() if isinstance(m, PreTrainedModel)), None)
            packed_masks = hasattr(masking_utils, "find_packed_sequence_indices")
        if model is None:
            problem = f"{type(module).__name__} holds no Hugging Face transformers model (PreTrainedModel)"
        elif "position_ids" not in inspect.signature(model.forward).parameters:
            problem = f"{type(model).__name__}.forward takes no `position_ids`"
        elif not packed_masks:
            problem = "this transformers version cannot build masks from `position_ids` (it needs transformers >= 4.53)"
        else:
            if not isinstance(module, CausalLM) and getattr(model.config, "use_cache", False):
                rank_zero_warn(
                    f"packing=True: make sure {type(module).__name__} calls its model with `use_cache=False`. With a"
                    " cache (the default, as `config.use_cache` is true) transformers does not build the packed mask"
                    " from `position_ids`, and packed samples silently attend to each other."
                )
            return
        raise ValueError(
            f"packing=True is unsupported for this model: {problem}, so samples packed into one row would attend to"
            " each other. Set `packing: false` (`group_by_length: true` also cuts padding)."
        )

    def _loader(self, dataset: _Split | _PackedRows | None, train: bool) -> DataLoader[dict[str, Tensor]]:
        if dataset is None:
            raise RuntimeError("Call `setup()` before asking for a data loader (the Trainer does this for you).")
        order: dict[str, Any] = {"shuffle": train}
        if train and self.group_by_length:
            # Lightning hands rank r of N every N-th index of this order (DistributedSamplerWrapper), so groups are
            # sized for the global batch: each rank's batch then comes from one group.
            world_size = self.trainer.world_size if self.trainer is not None else 1
            order = {"sampler": LengthGroupedSampler(dataset.lengths, self.batch_size * world_size, self.seed)}
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            collate_fn=_PadCollator(self._get_encoder().pad_token_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **order,
        )

    @override
    def train_dataloader(self) -> DataLoader[dict[str, Tensor]]:
        return self._loader(self.train_set, train=True)

    @override
    def val_dataloader(self) -> DataLoader[dict[str, Tensor]] | list[DataLoader[dict[str, Tensor]]]:
        if self.val_set is None:
            if self.train_set is None:
                raise RuntimeError("Call `setup()` before asking for a data loader (the Trainer does this for you).")
            return []
        return self._loader(self.val_set, train=False)
