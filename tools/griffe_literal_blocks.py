"""A griffe extension for the docs site: reST's ``Example::`` (a paragraph ending in ``::`` before an indented
literal block) reads ``Example:`` in Markdown, where the indented block is already a code block.

Loaded by ``mkdocs.yml`` (``mkdocstrings`` → ``python`` → ``options.extensions``); it changes only the rendered text.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_LITERAL_BLOCK_INTRO = re.compile(r"(?<=\S)::$", re.MULTILINE)


class LiteralBlocks(griffe.Extension):
    """Rewrite a line-final ``::`` to ``:`` in every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _LITERAL_BLOCK_INTRO.sub(":", obj.docstring.value)
